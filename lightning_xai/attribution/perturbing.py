"""What the perturbation attributors share: perturbed inputs built lazily and evaluated in chunks.

Used by :mod:`~lightning_xai.attribution.occlusion`, :mod:`~lightning_xai.attribution.rise`,
:mod:`~lightning_xai.attribution.surrogate` (LIME, KernelSHAP), :mod:`~lightning_xai.attribution.
meaningful_perturbation` and :mod:`~lightning_xai.attribution.prediction_difference`. The promises they share:

* **Chunked, gradient-free evaluation.** Perturbed inputs are built lazily and evaluated under
  ``torch.no_grad()`` in chunks of at most ``batch_size`` inputs (perturbations of different samples share a
  chunk), never all at once and never one at a time. Only :class:`MeaningfulPerturbation` needs gradients, and
  it takes them with :func:`torch.autograd.grad` with respect to its mask only.
* **Seeded, private randomness.** Random methods draw from their own ``torch.Generator`` seeded with ``seed``
  at every call (``seed=None``: a fresh non-deterministic seed), so equal seeds give equal results and the
  global RNG is never touched. Small random numbers (mask grids, coalitions, indices) are drawn up front; large
  ones (prediction-difference patches) per chunk, in a fixed order, so results do not depend on ``batch_size``.
* **What is explained.** ``target`` selects one score per sample as everywhere in
  :mod:`lightning_xai.attribution` (the logit of a class, or any callable ``output -> Tensor[n]`` - it is
  applied to chunks of perturbed inputs, so it must act per sample). Exceptions, stated per class:
  :class:`MeaningfulPerturbation` minimises the softmax probability (as in the paper) and
  :class:`PredictionDifference` works with log-odds of probabilities. To explain probabilities with the other
  methods (as the RISE and LIME papers do), pass ``target=lambda y: y.softmax(1)[:, c]``.
* **Output.** ``Tensor[B, 1, H, W]`` (one value per pixel, shared by the channels), raw and signed, in the
  inputs' dtype and device.

Occlusion windows and prediction-difference patches do not wrap around at the borders: windows start every
``stride`` pixels and one more window is aligned to the bottom/right border when the stride does not land
there, so every pixel is covered at least once; a pixel's value is the mean over the windows covering it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import Target, chunk_slices, select_scores
from lightning_xai.attribution.filters import gaussian_blur
from lightning_xai.checks import check_choice, check_float, prefix

__all__ = [
    "BASELINES",
    "all_scores",
    "average_over_windows",
    "baseline_images",
    "check_baseline",
    "check_fits",
    "check_pair",
    "check_seed",
    "check_stride",
    "chunked_scores",
    "expand_target",
    "generator",
    "scores_of",
    "window_masks",
    "windows",
]

#: The named baselines (values that replace removed pixels), besides a number.
BASELINES = ("mean", "blur")


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------


def check_pair(name: str, value: int | tuple[int, int], *, owner: str | None = None) -> tuple[int, int]:
    """A positive int or a pair ``(height, width)`` of positive ints, as a pair."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
    ):
        raise ValueError(
            f"{prefix(owner)}{name} must be a positive int or a pair (height, width) of positive ints, got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def check_stride(
    stride: int | tuple[int, int] | None, window: tuple[int, int], *, owner: str | None = None
) -> tuple[int, int]:
    """The window step: ``None`` = half the window (at least 1); must not exceed the window (full coverage)."""
    if stride is None:
        return max(1, window[0] // 2), max(1, window[1] // 2)
    step = check_pair("stride", stride, owner=owner)
    if step[0] > window[0] or step[1] > window[1]:
        raise ValueError(
            f"{prefix(owner)}stride {step} must not exceed the window {window}: pixels between windows would never "
            "be covered"
        )
    return step


def check_seed(value: int | None, *, owner: str | None = None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{prefix(owner)}seed must be an int or None, got {value!r}")
    return value


def check_baseline(value: float | str, *, owner: str | None = None) -> float | str:
    """A number (constant baseline) or one of :data:`BASELINES`."""
    if isinstance(value, str):
        try:
            return check_choice("baseline", value, BASELINES, owner=owner)
        except ValueError:
            raise ValueError(
                f"{prefix(owner)}unknown baseline {value!r}; valid baselines: a number or one of {list(BASELINES)}"
            ) from None
    return check_float("baseline", value, owner=owner)


def generator(seed: int | None) -> torch.Generator:
    """A private CPU generator (the global RNG is never used)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def check_fits(method: str, what: str, size: tuple[int, int], height: int, width: int) -> None:
    if size[0] > height or size[1] > width:
        raise ValueError(
            f"{method}: {what} {size[0]}x{size[1]} is larger than the {height}x{width} image; "
            f"choose {what} <= ({height}, {width})"
        )


# --------------------------------------------------------------------------------------------------------------
# shared building blocks
# --------------------------------------------------------------------------------------------------------------


def baseline_images(images: Tensor, baseline: float | str, sigma: float) -> Tensor:
    """What replaces removed pixels: a constant, the per-image per-channel mean, or the blurred image."""
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if baseline == "blur":
        return gaussian_blur(images, sigma)
    return torch.full_like(images, float(baseline))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis; the last window is aligned to the border."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def windows(height: int, width: int, window: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """``LongTensor[n, 2]`` of window top-left corners, row-major."""
    rows = window_starts(height, window[0], stride[0])
    cols = window_starts(width, window[1], stride[1])
    return torch.tensor([(r, c) for r in rows for c in cols], dtype=torch.long)


def window_masks(corners: Tensor, window: tuple[int, int], height: int, width: int, device: torch.device) -> Tensor:
    """Boolean masks ``[n, H, W]``, True inside each window."""
    corners = corners.to(device)
    ar_h = torch.arange(height, device=device)
    ar_w = torch.arange(width, device=device)
    r, c = corners[:, :1], corners[:, 1:]
    in_rows = (ar_h >= r) & (ar_h < r + window[0])
    in_cols = (ar_w >= c) & (ar_w < c + window[1])
    return in_rows[:, :, None] & in_cols[:, None, :]


def average_over_windows(values: Tensor, corners: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """``values [B, n]`` per window -> ``[B, 1, H, W]``: each pixel gets the mean over the windows covering it."""
    sums = values.new_zeros(values.shape[0], 1, height, width)
    counts = values.new_zeros(1, 1, height, width)
    for k, (r, c) in enumerate(corners.tolist()):
        sums[:, 0, r : r + window[0], c : c + window[1]] += values[:, k, None, None]
        counts[:, :, r : r + window[0], c : c + window[1]] += 1
    return sums / counts


def expand_target(target: Target, owners: Tensor) -> Target:
    """The target for perturbed copies whose original sample indices are ``owners``."""
    if isinstance(target, Tensor) and target.ndim == 1:
        return target.to(owners.device)[owners]
    return target


def default_score(output: Tensor, target: Target) -> Tensor:
    return select_scores(output, target)


def chunked_scores(
    model: nn.Module,
    total: int,
    make_batch: Callable[[slice], tuple[Tensor, Any]],
    owners: Tensor,
    target: Target,
    batch_size: int,
    score: Callable[[Tensor, Target], Any] = default_score,
) -> Iterator[tuple[slice, Any, Any]]:
    """Evaluate ``total`` perturbed inputs in chunks of ``batch_size``; yields ``(slice, scores, aux)``.

    ``make_batch(slice)`` builds the chunk's inputs (and anything the caller wants back, ``aux``); ``owners``
    holds the original sample index of each perturbed input, to pick its target class.
    """
    for part in chunk_slices(total, batch_size):
        batch, aux = make_batch(part)
        output = model(batch)
        yield part, score(output, expand_target(target, owners[part])), aux


def all_scores(
    model: nn.Module,
    total: int,
    make_batch: Callable[[slice], tuple[Tensor, Any]],
    owners: Tensor,
    target: Target,
    batch_size: int,
    score: Callable[[Tensor, Target], Tensor] = default_score,
) -> Tensor:
    """All scores of :func:`chunked_scores`, concatenated, as float64."""
    chunks = chunked_scores(model, total, make_batch, owners, target, batch_size, score)
    return torch.cat([s for _, s, _ in chunks]).double()


def scores_of(model: nn.Module, inputs: Tensor, target: Target, batch_size: int) -> Tensor:
    """Scores of unperturbed ``inputs`` ``[B]`` (float64), chunked like everything else."""
    owners = torch.arange(inputs.shape[0], device=inputs.device)
    return all_scores(model, inputs.shape[0], lambda p: (inputs[p], None), owners, target, batch_size)
