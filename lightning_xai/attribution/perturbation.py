"""Perturbation attributors: explain a decision by changing the input and watching the score.

Every method here evaluates the model on many perturbed copies of each input. The promises they share:

* **Chunked, gradient-free evaluation.** Perturbed inputs are built lazily and evaluated under
  ``torch.no_grad()`` in chunks of at most ``batch_size`` inputs (perturbations of different samples share a
  chunk), never all at once and never one at a time. Only :class:`MeaningfulPerturbation` needs gradients, and
  it takes them with :func:`torch.autograd.grad` with respect to its mask only.
* **Seeded, private randomness.** Random methods draw from their own ``torch.Generator`` seeded with ``seed``
  at every call (``seed=None``: a fresh non-deterministic seed), so equal seeds give equal results and the
  global RNG is never touched. Random numbers are drawn up front (they are small: mask grids, coalitions,
  indices) or per image, so results do not depend on ``batch_size``.
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

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.base import (
    Attributor,
    Target,
    check_positive_int,
    chunk_slices,
    model_state_guard,
    select_scores,
    validate_image_batch,
    validate_target,
)
from lightning_xai.attribution.filters import gaussian_blur
from lightning_xai.attribution.segmentation import Segmentation

__all__ = [
    "LIME",
    "RISE",
    "KernelSHAP",
    "MeaningfulPerturbation",
    "Occlusion",
    "PredictionDifference",
    "SegmentExplanation",
    "gaussian_blur",
]

_FILLS = ("mean", "blur")


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------


def _pair(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
    ):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _number(name: str, value: float, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _stride(stride: int | tuple[int, int] | None, window: tuple[int, int]) -> tuple[int, int]:
    """The window step: ``None`` = half the window (at least 1); must not exceed the window (full coverage)."""
    if stride is None:
        return max(1, window[0] // 2), max(1, window[1] // 2)
    step = _pair("stride", stride)
    if step[0] > window[0] or step[1] > window[1]:
        raise ValueError(
            f"stride {step} must not exceed the window {window}: pixels between windows would never be covered"
        )
    return step


def _seed(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"seed must be an int or None, got {value!r}")
    return value


def _fill(value: float | str) -> float | str:
    if isinstance(value, str):
        if value not in _FILLS:
            raise ValueError(f"unknown fill {value!r}; valid fills: a number or one of {list(_FILLS)}")
        return value
    return _number("fill", value)


def _generator(seed: int | None) -> torch.Generator:
    """A private CPU generator (the global RNG is never used)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _check_fits(method: str, what: str, size: tuple[int, int], height: int, width: int) -> None:
    if size[0] > height or size[1] > width:
        raise ValueError(
            f"{method}: {what} {size[0]}x{size[1]} is larger than the {height}x{width} image; "
            f"choose {what} <= ({height}, {width})"
        )


# --------------------------------------------------------------------------------------------------------------
# shared building blocks
# --------------------------------------------------------------------------------------------------------------


def _fill_images(images: Tensor, fill: float | str, sigma: float) -> Tensor:
    """What replaces removed pixels: a constant, the per-image per-channel mean, or the blurred image."""
    if fill == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if fill == "blur":
        return gaussian_blur(images, sigma)
    return torch.full_like(images, float(fill))


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis; the last window is aligned to the border."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def _windows(height: int, width: int, window: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """``LongTensor[n, 2]`` of window top-left corners, row-major."""
    rows = _window_starts(height, window[0], stride[0])
    cols = _window_starts(width, window[1], stride[1])
    return torch.tensor([(r, c) for r in rows for c in cols], dtype=torch.long)


def _window_masks(corners: Tensor, window: tuple[int, int], height: int, width: int, device: torch.device) -> Tensor:
    """Boolean masks ``[n, H, W]``, True inside each window."""
    corners = corners.to(device)
    ar_h = torch.arange(height, device=device)
    ar_w = torch.arange(width, device=device)
    r, c = corners[:, :1], corners[:, 1:]
    in_rows = (ar_h >= r) & (ar_h < r + window[0])
    in_cols = (ar_w >= c) & (ar_w < c + window[1])
    return in_rows[:, :, None] & in_cols[:, None, :]


def _average_over_windows(values: Tensor, corners: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """``values [B, n]`` per window -> ``[B, 1, H, W]``: each pixel gets the mean over the windows covering it."""
    sums = values.new_zeros(values.shape[0], 1, height, width)
    counts = values.new_zeros(1, 1, height, width)
    for k, (r, c) in enumerate(corners.tolist()):
        sums[:, 0, r : r + window[0], c : c + window[1]] += values[:, k, None, None]
        counts[:, :, r : r + window[0], c : c + window[1]] += 1
    return sums / counts


def _expand_target(target: Target, owners: Tensor) -> Target:
    """The target for perturbed copies whose original sample indices are ``owners``."""
    if isinstance(target, Tensor) and target.ndim == 1:
        return target.to(owners.device)[owners]
    return target


def _default_score(output: Tensor, target: Target) -> Tensor:
    return select_scores(output, target)


def _chunked_scores(
    model: nn.Module,
    total: int,
    make_batch: Callable[[slice], tuple[Tensor, Any]],
    owners: Tensor,
    target: Target,
    batch_size: int,
    score: Callable[[Tensor, Target], Any] = _default_score,
) -> Iterator[tuple[slice, Any, Any]]:
    """Evaluate ``total`` perturbed inputs in chunks of ``batch_size``; yields ``(slice, scores, aux)``.

    ``make_batch(slice)`` builds the chunk's inputs (and anything the caller wants back, ``aux``); ``owners``
    holds the original sample index of each perturbed input, to pick its target class.
    """
    for part in chunk_slices(total, batch_size):
        batch, aux = make_batch(part)
        output = model(batch)
        yield part, score(output, _expand_target(target, owners[part])), aux


def _all_scores(
    model: nn.Module,
    total: int,
    make_batch: Callable[[slice], tuple[Tensor, Any]],
    owners: Tensor,
    target: Target,
    batch_size: int,
    score: Callable[[Tensor, Target], Tensor] = _default_score,
) -> Tensor:
    """All scores of :func:`_chunked_scores`, concatenated, as float64."""
    chunks = _chunked_scores(model, total, make_batch, owners, target, batch_size, score)
    return torch.cat([s for _, s, _ in chunks]).double()


def _scores_of(model: nn.Module, inputs: Tensor, target: Target, batch_size: int) -> Tensor:
    """Scores of unperturbed ``inputs`` ``[B]`` (float64), chunked like everything else."""
    owners = torch.arange(inputs.shape[0], device=inputs.device)
    return _all_scores(model, inputs.shape[0], lambda p: (inputs[p], None), owners, target, batch_size)


# --------------------------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------------------------


class Occlusion(Attributor):
    """Occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
    ECCV 2014): slide a window over the image, replace it by ``fill`` and record the drop of the score.

    Attribution of a pixel = mean over the windows ``w`` covering it of ``f(x) - f(x with w occluded)``:
    positive where hiding the pixel lowers the score (evidence for the target). Windows span all channels.

    Args:
        window: window size, ``int`` or ``(height, width)``; must fit the image (checked per call).
        stride: step between windows, ``int`` or pair; ``None`` = half the window (at least 1).
        fill: a number (constant fill, default 0), ``"mean"`` (per-image, per-channel mean) or ``"blur"``
            (the Gaussian-blurred image, ``blur_sigma`` pixels).
        blur_sigma: standard deviation of the blur for ``fill="blur"``.
        batch_size: maximal number of inputs per forward pass.

    Cost: ``B * (1 + number of windows)`` model evaluations.
    """

    name = "occlusion"
    requires_image = True

    def __init__(
        self,
        window: int | tuple[int, int] = 16,
        stride: int | tuple[int, int] | None = None,
        fill: float | str = 0.0,
        blur_sigma: float = 5.0,
        batch_size: int = 64,
    ) -> None:
        self.window = _pair("window", window)
        self.stride = _stride(stride, self.window)
        self.fill = _fill(fill)
        self.blur_sigma = _number("blur_sigma", blur_sigma, minimum=0.0)
        self.batch_size = check_positive_int("batch_size", batch_size)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        _check_fits("Occlusion", "window", self.window, height, width)
        corners = _windows(height, width, self.window, self.stride)
        n_win = corners.shape[0]
        fill = _fill_images(x, self.fill, self.blur_sigma)
        total = batch * n_win
        owners = torch.arange(total, device=x.device) // n_win
        which = torch.arange(total) % n_win

        def make_batch(part: slice) -> tuple[Tensor, None]:
            masks = _window_masks(corners[which[part]], self.window, height, width, x.device)[:, None]
            own = owners[part]
            return torch.where(masks, fill[own], x[own]), None

        with torch.no_grad():
            base = _scores_of(model, x, target, self.batch_size)
            occluded = _all_scores(model, total, make_batch, owners, target, self.batch_size)
        drops = base[:, None] - occluded.view(batch, n_win)
        return _average_over_windows(drops, corners, self.window, height, width).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# RISE
# --------------------------------------------------------------------------------------------------------------


class RISE(Attributor):
    """RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

    ``n_masks`` random binary grids of ``grid x grid`` cells, each cell kept with probability ``p``, are
    upsampled bilinearly to ``(grid + 1) * cell`` pixels (``cell = ceil(H / grid)``), shifted by a random offset
    in ``[0, cell)`` and cropped to ``H x W`` - smooth masks in ``[0, 1]``. The saliency is the paper's Monte
    Carlo estimate

        ``S(u) = 1 / (N * p) * sum_i f(x * M_i) * M_i(u)``,

    i.e. the expected score given that pixel ``u`` is kept, normalised by ``E[M(u)] = p`` (so a constant score
    ``c`` gives ``S ~ c``). Masked-out pixels are zero (the paper's ``I * M``). The masks are the same for
    every image of the batch; the small binary grids and shifts are drawn up front, the full-resolution masks
    are rendered per chunk.

    Args:
        n_masks: number of masks ``N`` (the paper uses 4000-8000 for ImageNet).
        grid: cells per side ``s`` (``int`` or ``(rows, cols)``); must not exceed the image size.
        p: probability of keeping a cell, in ``(0, 1]``.
        batch_size: maximal number of masked inputs per forward pass.
        seed: seed of the private generator (``None``: non-deterministic).

    Cost: ``B * n_masks`` model evaluations.
    """

    name = "rise"
    requires_image = True

    def __init__(
        self,
        n_masks: int = 2000,
        grid: int | tuple[int, int] = 7,
        p: float = 0.5,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        self.n_masks = check_positive_int("n_masks", n_masks)
        self.grid = _pair("grid", grid)
        p = _number("p", p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p (probability of keeping a cell) must be in (0, 1], got {p!r}")
        self.p = p
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = _seed(seed)

    def _draw(self, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """Binary grids ``[N, s, s]`` and shifts ``[N]``, ``[N]`` (small; drawn once per call)."""
        _check_fits("RISE", "grid", self.grid, height, width)
        g = _generator(self.seed)
        cell = (math.ceil(height / self.grid[0]), math.ceil(width / self.grid[1]))
        grids = torch.rand(self.n_masks, *self.grid, generator=g) < self.p
        dy = torch.randint(0, cell[0], (self.n_masks,), generator=g)
        dx = torch.randint(0, cell[1], (self.n_masks,), generator=g)
        return grids, dy, dx, cell

    def _render(
        self, grids: Tensor, dy: Tensor, dx: Tensor, cell: tuple[int, int], height: int, width: int, like: Tensor
    ) -> Tensor:
        """Full-resolution masks ``[n, H, W]`` in ``[0, 1]`` for the given grids and shifts."""
        size = ((self.grid[0] + 1) * cell[0], (self.grid[1] + 1) * cell[1])
        up = F.interpolate(
            grids[:, None].to(device=like.device, dtype=like.dtype), size=size, mode="bilinear", align_corners=False
        )[:, 0]
        rows = dy.to(like.device)[:, None] + torch.arange(height, device=like.device)
        cols = dx.to(like.device)[:, None] + torch.arange(width, device=like.device)
        index = torch.arange(up.shape[0], device=like.device)[:, None, None]
        return up[index, rows[:, :, None], cols[:, None, :]]

    def masks(self, height: int, width: int, start: int = 0, stop: int | None = None) -> Tensor:
        """The masks ``[stop - start, H, W]`` that a call on ``H x W`` images uses (for inspection and tests)."""
        grids, dy, dx, cell = self._draw(height, width)
        part = slice(start, self.n_masks if stop is None else stop)
        return self._render(grids[part], dy[part], dx[part], cell, height, width, torch.empty(0))

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        grids, dy, dx, cell = self._draw(height, width)
        total = self.n_masks * batch
        owners = torch.arange(total, device=x.device) % batch
        mask_of = torch.arange(total) // batch

        def make_batch(part: slice) -> tuple[Tensor, Tensor]:
            first, last = int(mask_of[part.start]), int(mask_of[part.stop - 1]) + 1
            rendered = self._render(grids[first:last], dy[first:last], dx[first:last], cell, height, width, x)
            m = rendered[(mask_of[part] - first).to(x.device)]
            return x[owners[part]] * m[:, None], m

        saliency = torch.zeros(batch, height, width, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for part, scores, m in _chunked_scores(model, total, make_batch, owners, target, self.batch_size):
                saliency.index_add_(0, owners[part], scores.double()[:, None, None] * m.double())
        return (saliency / (self.n_masks * self.p))[:, None].to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# LIME and KernelSHAP: surrogate models over segments
# --------------------------------------------------------------------------------------------------------------


class SegmentExplanation(NamedTuple):
    """Per-segment result of :class:`LIME` / :class:`KernelSHAP`.

    ``values[b]`` holds one value per segment of image ``b`` (``Tensor[M_b]``, float64), ``segments`` the label
    map ``LongTensor[B, H, W]``, ``intercept[b]`` the surrogate's intercept (KernelSHAP: ``f(baseline)``) and
    ``score[b]`` the explained score ``f(x)``.
    """

    values: list[Tensor]
    segments: Tensor
    intercept: Tensor
    score: Tensor

    def heatmap(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Paint every segment with its value: ``Tensor[B, 1, H, W]``."""
        maps = [v.to(self.segments.device)[seg] for v, seg in zip(self.values, self.segments)]
        return torch.stack(maps)[:, None].to(dtype)


class _Design(NamedTuple):
    coalitions: Tensor  # bool [n, M]: which segments are present in each evaluated input
    weights: Tensor  # float64 [n]


class _SegmentSurrogate(Attributor):
    """Shared plumbing of LIME and KernelSHAP: segments, coalition inputs, chunked evaluation, painting."""

    requires_image = True

    def __init__(
        self,
        n_samples: int,
        segmentation: str,
        grid: int | tuple[int, int],
        n_segments: int,
        compactness: float,
        fill: float | str,
        blur_sigma: float,
        batch_size: int,
        seed: int | None,
    ) -> None:
        self.n_samples = check_positive_int("n_samples", n_samples, minimum=2)
        self.segmentation = segmentation
        self._segmenter = Segmentation(segmentation, grid=grid, n_segments=n_segments, compactness=compactness)
        self.grid = self._segmenter.grid
        self.n_segments = n_segments
        self.compactness = compactness
        self.fill = _fill(fill)
        self.blur_sigma = _number("blur_sigma", blur_sigma, minimum=0.0)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = _seed(seed)

    def _design(self, n_features: int, generator: torch.Generator) -> _Design:
        raise NotImplementedError

    def _fit(self, design: _Design, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``(values [M], intercept)`` from the coalitions and their scores (float64)."""
        raise NotImplementedError

    def explain_segments(self, model: nn.Module, inputs: Tensor, target: Target) -> SegmentExplanation:
        """The per-segment values with the segments, in the same no-side-effect context as ``__call__``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}")
        validate_image_batch(inputs, type(self).__name__)
        if not callable(target):
            validate_target(target, inputs.shape[0], None)
        with model_state_guard(model), torch.no_grad():
            return self._explain(model, inputs.detach(), target)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        with torch.no_grad():
            return self._explain(model, inputs.detach(), target).heatmap(inputs.dtype)

    def _explain(self, model: nn.Module, x: Tensor, target: Target) -> SegmentExplanation:
        segments, counts = self._segmenter(x)
        fill = _fill_images(x, self.fill, self.blur_sigma)
        g = _generator(self.seed)
        designs = [self._design(m, g) for m in counts]
        sizes = [d.coalitions.shape[0] for d in designs]
        owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(x.device)
        rows = torch.cat([torch.arange(n) for n in sizes])
        present = [d.coalitions.to(x.device) for d in designs]

        def make_batch(part: slice) -> tuple[Tensor, None]:
            own = owners[part]
            keep = torch.stack(
                [present[b][r][segments[b]] for b, r in zip(own.tolist(), rows[part].tolist())]
            )  # [n, H, W]
            return torch.where(keep[:, None], x[own], fill[own]), None

        scores = _all_scores(model, len(owners), make_batch, owners, target, self.batch_size)
        values, intercepts, full = [], [], []
        for design, part in zip(designs, torch.split(scores, sizes)):
            v, c = self._fit(design, part.cpu())
            values.append(v.to(x.device))
            intercepts.append(c)
            full.append(part[0])  # the first coalition of every design keeps every segment: it is x itself
        return SegmentExplanation(values, segments, torch.stack(intercepts).to(x.device), torch.stack(full))


def _random_subsets(sizes: Tensor, n_features: int, generator: torch.Generator) -> Tensor:
    """Bool ``[n, M]``: row ``i`` has ``sizes[i]`` present features chosen uniformly at random."""
    ranks = torch.rand(sizes.shape[0], n_features, generator=generator).argsort(1).argsort(1)
    return ranks < sizes[:, None]


def _weighted_ridge(z: Tensor, y: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``argmin_{beta, b} sum_i w_i (y_i - z_i beta - b)^2 + alpha |beta|^2`` (intercept unpenalised), float64.

    Solved as a least-squares problem on weighted, centred data stacked with ``sqrt(alpha) I`` rows
    (minimum-norm solution when ``alpha = 0`` and the design is rank deficient).
    """
    z, y, w = z.double(), y.double(), w.double()
    wn = w / w.sum()
    z_mean, y_mean = wn @ z, wn @ y
    sw = w.sqrt()[:, None]
    a = sw * (z - z_mean)
    rhs = sw[:, 0] * (y - y_mean)
    if alpha > 0:
        a = torch.cat([a, math.sqrt(alpha) * torch.eye(z.shape[1], dtype=torch.float64)])
        rhs = torch.cat([rhs, torch.zeros(z.shape[1], dtype=torch.float64)])
    beta = torch.linalg.lstsq(a, rhs[:, None], driver="gelsd").solution[:, 0]
    return beta, y_mean - z_mean @ beta


def _lasso_selection(z: Tensor, y: Tensor, w: Tensor, k: int, steps: int = 50) -> list[int]:
    """The features of the K-Lasso of Ribeiro et al.: walk the weighted Lasso regularisation path from
    ``lambda_max`` (nothing selected) down to ``1e-4 lambda_max`` with warm-started coordinate descent and keep
    the active set at the smallest ``lambda`` that has at most ``k`` non-zero coefficients."""
    zc, yc, wn = z.double().numpy(), y.double().numpy(), w.double().numpy()
    wn = wn / wn.sum()
    zc = zc - wn @ zc
    yc = yc - wn @ yc
    gram = (zc * wn[:, None]).T @ zc
    corr = (zc * wn[:, None]).T @ yc
    lam_max = float(np.abs(corr).max())
    if lam_max == 0.0:
        return []
    beta = np.zeros(z.shape[1])
    chosen: list[int] = []
    for lam in lam_max * np.logspace(0, -4, steps):
        for _ in range(500):
            delta = 0.0
            for j in range(beta.shape[0]):
                if gram[j, j] <= 0:
                    continue
                rho = corr[j] - gram[j] @ beta + gram[j, j] * beta[j]
                new = np.sign(rho) * max(abs(rho) - lam, 0.0) / gram[j, j]
                delta = max(delta, abs(new - beta[j]))
                beta[j] = new
            if delta < 1e-10 * (1.0 + np.abs(beta).max()):
                break
        active = [int(j) for j in np.flatnonzero(beta)]
        if len(active) > k:
            break
        chosen = active
    return chosen


class LIME(_SegmentSurrogate):
    """LIME: Local Interpretable Model-agnostic Explanations (Ribeiro, Singh & Guestrin, KDD 2016), over segments.

    Interpretable features are segments (``segmentation="grid"``, default, or ``"slic"`` superpixels - see
    :mod:`lightning_xai.attribution.segmentation`). Each sample ``z`` in ``{0,1}^M`` keeps the present segments
    and replaces the absent ones by ``fill`` (``"mean"``: the per-image, per-channel mean, default; a number;
    ``"blur"``). Sampling follows the paper: the number of present segments is uniform in ``1..M``, the segments
    uniform given that number; the first sample is the unperturbed image. Samples are weighted with the
    exponential kernel ``pi(z) = exp(-d(z)^2 / kernel_width^2)`` on the cosine distance ``d(z) = 1 - |z| /
    sqrt(|z| M)`` to the all-present vector, and the local linear surrogate ``g(z) = b + w.z`` is fitted by

    * ``solver="ridge"`` (default): weighted ridge regression, closed form (``alpha`` = L2 penalty, intercept
      unpenalised; ``alpha=0`` is weighted least squares);
    * ``solver="k_lasso"``: the paper's K-Lasso - the ``n_features`` segments that enter first along the
      weighted Lasso path (coordinate descent, warm starts) are kept and refitted by weighted ridge; the other
      segments get weight 0.

    The heatmap paints each segment with its weight (signed, in score units per segment). Use
    :meth:`explain_segments` for the weights, intercept and segments themselves.

    Cost: ``B * (n_samples + 1)`` model evaluations.
    """

    name = "lime"

    def __init__(
        self,
        n_samples: int = 256,
        segmentation: str = "grid",
        grid: int | tuple[int, int] = 4,
        n_segments: int = 50,
        compactness: float = 10.0,
        fill: float | str = "mean",
        blur_sigma: float = 5.0,
        kernel_width: float = 0.25,
        solver: str = "ridge",
        alpha: float = 1.0,
        n_features: int = 5,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        super().__init__(n_samples, segmentation, grid, n_segments, compactness, fill, blur_sigma, batch_size, seed)
        self.kernel_width = _number("kernel_width", kernel_width, minimum=0.0, strict=True)
        if solver not in ("ridge", "k_lasso"):
            raise ValueError(f"unknown solver {solver!r}; valid solvers: ['ridge', 'k_lasso']")
        self.solver = solver
        self.alpha = _number("alpha", alpha, minimum=0.0)
        self.n_features = check_positive_int("n_features", n_features)

    def _design(self, n_features: int, generator: torch.Generator) -> _Design:
        sizes = torch.randint(1, n_features + 1, (self.n_samples - 1,), generator=generator)
        coalitions = torch.cat(
            [torch.ones(1, n_features, dtype=torch.bool), _random_subsets(sizes, n_features, generator)]
        )
        present = coalitions.sum(1).double()
        distance = 1.0 - torch.sqrt(present / n_features)
        return _Design(coalitions, torch.exp(-(distance**2) / self.kernel_width**2))

    def _fit(self, design: _Design, scores: Tensor) -> tuple[Tensor, Tensor]:
        z = design.coalitions.double()
        if self.solver == "ridge":
            return _weighted_ridge(z, scores, design.weights, self.alpha)
        chosen = _lasso_selection(z, scores, design.weights, self.n_features)
        values = torch.zeros(z.shape[1], dtype=torch.float64)
        if not chosen:
            return values, (design.weights / design.weights.sum()) @ scores
        beta, intercept = _weighted_ridge(z[:, chosen], scores, design.weights, self.alpha)
        values[chosen] = beta
        return values, intercept


class KernelSHAP(_SegmentSurrogate):
    """KernelSHAP (Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017) over
    segments: Shapley values of the game ``v(S) = f(x with the segments outside S replaced by fill)``.

    Coalitions ``z`` (``0 < |z| < M``) are weighted with the Shapley kernel ``pi(z) = (M - 1) / (C(M, |z|) |z|
    (M - |z|))``; the empty and full coalitions are enforced exactly as constraints (``phi_0 = f(baseline)`` and
    efficiency ``sum_j phi_j = f(x) - f(baseline)``), and the remaining weighted least-squares problem is solved
    in the orthonormal coordinates of the constraint's null space (minimum-norm when under-determined, so
    symmetric segments get equal values).

    * When ``2^M <= n_samples`` every coalition is evaluated: the result is then the exact Shapley values.
    * Otherwise ``n_samples - 2`` coalitions are sampled from the kernel itself (size ``s`` with probability
      proportional to ``(M - 1) / (s (M - s))``, then a uniform subset), in complementary pairs, and weighted
      equally; plus the empty and full coalitions. For an additive model the result is still exact.

    ``fill`` defines the baseline (``"mean"``, default; a number; ``"blur"``). The heatmap paints each segment
    with its Shapley value; :meth:`explain_segments` returns the values (``intercept`` = ``f(baseline)``).

    Cost: ``B * (min(n_samples, 2^M) + 1)`` model evaluations.
    """

    name = "kernel_shap"

    def __init__(
        self,
        n_samples: int = 256,
        segmentation: str = "grid",
        grid: int | tuple[int, int] = 4,
        n_segments: int = 50,
        compactness: float = 10.0,
        fill: float | str = "mean",
        blur_sigma: float = 5.0,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        super().__init__(n_samples, segmentation, grid, n_segments, compactness, fill, blur_sigma, batch_size, seed)

    def _design(self, n_features: int, generator: torch.Generator) -> _Design:
        m = n_features
        full = torch.ones(1, m, dtype=torch.bool)
        empty = torch.zeros(1, m, dtype=torch.bool)
        if m < 63 and 2**m <= self.n_samples:  # exact: every coalition
            codes = torch.arange(1, 2**m - 1)
            others = ((codes[:, None] >> torch.arange(m)) & 1).bool()
            sizes = others.sum(1)
            weights = torch.tensor(
                [(m - 1) / (math.comb(m, s) * s * (m - s)) for s in sizes.tolist()], dtype=torch.float64
            )
        else:
            count = self.n_samples - 2
            if m > 1 and count > 0:
                s = torch.arange(1, m, dtype=torch.float64)
                size_probs = (m - 1) / (s * (m - s))
                n_pairs = (count + 1) // 2
                sizes = torch.multinomial(size_probs, n_pairs, replacement=True, generator=generator) + 1
                first = _random_subsets(sizes, m, generator)
                others = torch.stack([first, ~first], 1).view(-1, m)[:count]
            else:
                others = torch.zeros(0, m, dtype=torch.bool)
            weights = torch.ones(others.shape[0], dtype=torch.float64)
        coalitions = torch.cat([full, empty, others])
        return _Design(coalitions, torch.cat([torch.zeros(2, dtype=torch.float64), weights]))

    def _fit(self, design: _Design, scores: Tensor) -> tuple[Tensor, Tensor]:
        m = design.coalitions.shape[1]
        f_full, f_empty = scores[0], scores[1]
        gain = f_full - f_empty
        if m == 1:
            return gain.view(1), f_empty
        z = design.coalitions[2:].double()
        w = design.weights[2:]
        even = torch.full((m,), 1.0 / m, dtype=torch.float64) * gain
        if z.shape[0] == 0:
            return even, f_empty
        # phi = even + basis @ gamma satisfies sum(phi) = gain for any gamma (basis spans {v : sum v = 0}).
        basis = torch.linalg.qr(torch.eye(m, dtype=torch.float64) - 1.0 / m).Q[:, : m - 1]
        sw = w.sqrt()[:, None]
        residual = scores[2:] - f_empty - z @ even
        gamma = torch.linalg.lstsq(sw * (z @ basis), (sw[:, 0] * residual)[:, None], driver="gelsd").solution[:, 0]
        return even + basis @ gamma, f_empty


# --------------------------------------------------------------------------------------------------------------
# Meaningful perturbation
# --------------------------------------------------------------------------------------------------------------


def _class_probability(output: Tensor, target: Target) -> Tensor:
    """Softmax probability of the target class; a callable target's value is used as it is."""
    if callable(target):
        return select_scores(output, target)
    if not isinstance(output, Tensor) or output.ndim != 2:
        return select_scores(output, target)  # raises the standard, helpful error
    return select_scores(output.softmax(dim=1), target)


class MeaningfulPerturbation(Attributor):
    """Meaningful perturbation (Fong & Vedaldi, "Interpretable Explanations of Black Boxes by Meaningful
    Perturbation", ICCV 2017): the smallest, smoothest region whose blurring destroys the class score.

    A low-resolution deletion mask ``m`` (``mask_size``, upsampled bilinearly to the image) blends the input
    with its Gaussian blur, ``x' = (1 - m) * x + m * blur(x)``, and is optimised with Adam (``iterations``,
    ``lr``) to minimise

        ``score(x') + l1_coeff * mean(m) + tv_coeff * mean(|grad m|^tv_beta)``,

    clamping ``m`` to ``[0, 1]`` after each step (the paper's projected gradient). ``score`` is the softmax
    probability of the target class for int / LongTensor targets (as in the paper) and the callable's value for
    callable targets. Optionally the input is randomly translated by up to ``jitter`` pixels at every step (the
    paper's remedy against adversarial masks; shifts drawn from the seeded generator). Returns the upsampled
    deletion mask in ``[0, 1]`` (``1`` = evidence: blurring it removes the class), ``Tensor[B, 1, H, W]``.

    Gradients are taken with :func:`torch.autograd.grad` with respect to the mask only; samples are optimised
    in chunks of ``batch_size`` (independently: per-sample losses and element-wise Adam).

    Cost: ``B * iterations`` forward and backward passes.
    """

    name = "meaningful_perturbation"
    requires_image = True

    def __init__(
        self,
        mask_size: int | tuple[int, int] = 8,
        iterations: int = 300,
        lr: float = 0.1,
        l1_coeff: float = 0.2,
        tv_coeff: float = 0.2,
        tv_beta: float = 3.0,
        blur_sigma: float = 5.0,
        jitter: int = 0,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        self.mask_size = _pair("mask_size", mask_size)
        self.iterations = check_positive_int("iterations", iterations)
        self.lr = _number("lr", lr, minimum=0.0, strict=True)
        self.l1_coeff = _number("l1_coeff", l1_coeff, minimum=0.0)
        self.tv_coeff = _number("tv_coeff", tv_coeff, minimum=0.0)
        self.tv_beta = _number("tv_beta", tv_beta, minimum=1.0)
        self.blur_sigma = _number("blur_sigma", blur_sigma, minimum=0.0)
        self.jitter = check_positive_int("jitter", jitter, minimum=0)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = _seed(seed)

    def _total_variation(self, mask: Tensor) -> Tensor:
        dh = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().pow(self.tv_beta).flatten(1)
        dw = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().pow(self.tv_beta).flatten(1)
        parts = [d.mean(1) for d in (dh, dw) if d.shape[1] > 0]
        return sum(parts) if parts else mask.new_zeros(mask.shape[0])

    @staticmethod
    def _shift(images: Tensor, shifts: Tensor) -> Tensor:
        """Translate each image by ``shifts[i] = (dy, dx)`` pixels, replicating the border."""
        n, c, h, w = images.shape
        rows = (torch.arange(h, device=images.device) - shifts[:, :1]).clamp(0, h - 1)
        cols = (torch.arange(w, device=images.device) - shifts[:, 1:]).clamp(0, w - 1)
        out = images.gather(2, rows[:, None, :, None].expand(n, c, h, w))
        return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        _check_fits("MeaningfulPerturbation", "mask_size", self.mask_size, height, width)
        blurred = gaussian_blur(x, self.blur_sigma)
        shifts = None
        if self.jitter > 0:
            g = _generator(self.seed)
            shifts = torch.randint(0, self.jitter + 1, (self.iterations, batch, 2), generator=g).to(x.device)
        result = x.new_zeros(batch, 1, height, width)
        for part in chunk_slices(batch, self.batch_size):
            xs, bs = x[part], blurred[part]
            t = _expand_target(target, torch.arange(batch, device=x.device)[part])
            mask = torch.full((xs.shape[0], 1, *self.mask_size), 0.5, dtype=x.dtype, device=x.device)
            mask.requires_grad_(True)
            optimiser = torch.optim.Adam([mask], lr=self.lr)
            for step in range(self.iterations):
                up = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
                xi, bi = (
                    (xs, bs)
                    if shifts is None
                    else (self._shift(xs, shifts[step, part]), self._shift(bs, shifts[step, part]))
                )
                score = _class_probability(model(xi * (1 - up) + bi * up), t)
                loss = (
                    score + self.l1_coeff * mask.abs().flatten(1).mean(1) + self.tv_coeff * self._total_variation(mask)
                ).sum()
                (grad,) = torch.autograd.grad(loss, mask)
                mask.grad = grad
                optimiser.step()
                mask.grad = None
                with torch.no_grad():
                    mask.clamp_(0.0, 1.0)
            with torch.no_grad():
                result[part] = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        return result


# --------------------------------------------------------------------------------------------------------------
# Prediction difference analysis
# --------------------------------------------------------------------------------------------------------------


def _log_odds_parts(output: Tensor, target: Target) -> Tensor:
    """``[n, 2]``: ``(log p, log (1 - p))`` of the explained class, computed stably from the logits.

    Int / LongTensor targets: ``p`` = softmax probability of the class (needs at least 2 outputs). Callable
    targets: the callable's value ``v`` is read as the logit of a binary decision, ``p = sigmoid(v)`` (so
    ``lambda y: y[:, a] - y[:, b]`` gives ``p(a | a or b)``).
    """
    if callable(target):
        v = select_scores(output, target)
        return torch.stack([F.logsigmoid(v), F.logsigmoid(-v)], 1)
    if not isinstance(output, Tensor) or output.ndim != 2:
        select_scores(output, target)  # raises the standard error
    if output.shape[1] < 2:
        raise ValueError(
            "PredictionDifference needs class probabilities: a model output [B, K] with K >= 2 classes for an "
            f"int / LongTensor target (got {list(output.shape)}); for a single logit pass target=lambda y: y[:, 0]"
        )
    validate_target(target, output.shape[0], output.shape[1])
    index = target.to(output.device).long().view(-1, 1) if isinstance(target, Tensor) and target.ndim == 1 else None
    if index is None:
        index = torch.full((output.shape[0], 1), int(target), device=output.device, dtype=torch.long)
    lse = output.logsumexp(1)
    log_p = output.gather(1, index)[:, 0] - lse
    log_q = output.scatter(1, index, float("-inf")).logsumexp(1) - lse
    return torch.stack([log_p, log_q], 1)


class PredictionDifference(Attributor):
    """Prediction difference analysis (Zintgraf, Cohen, Adel & Welling, "Visualizing Deep Neural Network
    Decisions: Prediction Difference Analysis", ICLR 2017).

    For every ``window`` patch (all channels; sliding with ``stride``) the patch is replaced by ``n_samples``
    plausible values and the class probability without the patch is ``p(c | x without patch) = mean_s p(c |
    x_s)``. The relevance is the weight of evidence, in bits,

        ``WE = log2 odds(c | x) - log2 odds(c | x without patch)``,  ``odds(p) = p / (1 - p)``,

    positive where the patch is evidence for ``c``; each pixel gets the mean over the patches covering it.
    Probabilities: int / LongTensor targets use the softmax probability of the class; a callable target's value
    ``v`` is read as a binary logit, ``p = sigmoid(v)``. Log-odds are computed from the logits in a numerically
    stable way (no clamping; the paper's Laplace correction is not needed).

    Samplers (the reference images are ``reference`` - e.g. a held-out set - or, when ``None``, the batch):

    * ``"marginal"``: the patch is copied from the same location of a reference image drawn uniformly at
      random (the empirical marginal of the patch); with the batch as reference it needs ``B >= 2``.
    * ``"conditional"`` (the paper's best): a multivariate Gaussian over a ``(window + 2 padding)`` square
      (all channels) is fitted to patches of the reference images (mean and covariance, position-independent,
      a small ridge ``1e-5 * mean variance`` added), and the patch is sampled from its Gaussian conditional
      given the surrounding ``padding``-pixel frame of the explained image (at borders, given the part of the
      frame inside the image).

    Cost: ``B * (1 + windows * n_samples)`` model evaluations (the paper uses stride 1 and 10 samples).
    """

    name = "prediction_difference"
    requires_image = True

    def __init__(
        self,
        window: int | tuple[int, int] = 4,
        stride: int | tuple[int, int] | None = None,
        sampling: str = "conditional",
        padding: int = 2,
        n_samples: int = 10,
        reference: Tensor | None = None,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        self.window = _pair("window", window)
        self.stride = _stride(stride, self.window)
        if sampling not in ("marginal", "conditional"):
            raise ValueError(f"unknown sampling {sampling!r}; valid samplings: ['marginal', 'conditional']")
        self.sampling = sampling
        self.padding = check_positive_int("padding", padding, minimum=0)
        self.n_samples = check_positive_int("n_samples", n_samples)
        if reference is not None:
            if not isinstance(reference, Tensor) or not reference.is_floating_point() or reference.ndim != 4:
                raise ValueError(
                    "reference must be None or a floating-point image tensor [N, C, H, W], got "
                    f"{type(reference).__name__ if not isinstance(reference, Tensor) else list(reference.shape)}"
                )
            if reference.shape[0] < 1:
                raise ValueError("reference must hold at least one image")
            reference = reference.detach()
        self.reference = reference
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = _seed(seed)

    def _reference(self, x: Tensor) -> Tensor:
        if self.reference is None:
            if self.sampling == "marginal" and x.shape[0] < 2:
                raise ValueError(
                    "PredictionDifference(sampling='marginal') with reference=None samples patches from the other "
                    "images of the batch and needs a batch of >= 2 images; pass reference=<images [N, C, H, W]>"
                )
            return x
        ref = self.reference.to(device=x.device, dtype=x.dtype)
        if ref.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"reference images have shape {list(ref.shape[1:])} but the inputs have {list(x.shape[1:])}"
            )
        return ref

    def _gaussian(self, ref: Tensor, outer: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Mean ``[D]`` and covariance ``[D, D]`` (float64) of ``outer`` patches of the reference images."""
        h, w = ref.shape[2:]
        positions = (h - outer[0] + 1) * (w - outer[1] + 1)
        step = max(1, math.ceil(math.sqrt(positions * ref.shape[0] / 20000)))  # at most ~20k patches
        patches = (
            F.unfold(ref.double(), outer, stride=step).transpose(1, 2).reshape(-1, ref.shape[1] * outer[0] * outer[1])
        )
        mean = patches.mean(0)
        centred = patches - mean
        cov = centred.T @ centred / max(1, patches.shape[0] - 1)
        ridge = 1e-5 * float(cov.diagonal().mean()) + 1e-12
        return mean, cov + ridge * torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)

    def _conditional_patches(
        self, image: Tensor, corners: Tensor, gauss: tuple[Tensor, Tensor], g: torch.Generator
    ) -> Tensor:
        """Samples ``[windows, n_samples, C, kh, kw]`` of each patch given its frame in ``image [C, H, W]``."""
        mean, cov = gauss
        c, h, w = image.shape
        kh, kw = self.window
        pad = self.padding
        oh, ow = kh + 2 * pad, kw + 2 * pad
        stencil = torch.arange(c * oh * ow).view(c, oh, ow)
        inner = stencil[:, pad : pad + kh, pad : pad + kw].reshape(-1)
        d_in = inner.numel()
        eps = torch.randn(corners.shape[0], self.n_samples, d_in, generator=g, dtype=torch.float64)
        cache: dict[tuple[int, int, int, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        img = image.double().cpu()
        out = torch.empty(corners.shape[0], self.n_samples, d_in, dtype=torch.float64)
        for k, (r, col) in enumerate(corners.tolist()):
            top, left = r - pad, col - pad
            i0, i1 = max(0, -top), min(oh, h - top)
            j0, j1 = max(0, -left), min(ow, w - left)
            key = (i0, i1, j0, j1)
            if key not in cache:
                frame = torch.zeros(c, oh, ow, dtype=torch.bool)
                frame[:, i0:i1, j0:j1] = True
                frame[:, pad : pad + kh, pad : pad + kw] = False
                observed = stencil[frame]
                s_oo = cov[observed][:, observed]
                s_io = cov[inner][:, observed]
                gain = torch.linalg.solve(s_oo, s_io.T).T if observed.numel() else s_io[:, :0]
                s_cond = cov[inner][:, inner] - gain @ s_io.T
                s_cond = 0.5 * (s_cond + s_cond.T)
                jitter = 1e-10 * float(s_cond.diagonal().abs().mean()) + 1e-12
                chol = torch.linalg.cholesky(s_cond + jitter * torch.eye(d_in, dtype=torch.float64))
                cache[key] = (observed, gain, chol, frame)
            observed, gain, chol, _ = cache[key]
            window_vals = torch.zeros(c, oh, ow, dtype=torch.float64)
            window_vals[:, i0:i1, j0:j1] = img[:, top + i0 : top + i1, left + j0 : left + j1]
            x_obs = window_vals.reshape(-1)[observed]
            mu = mean[inner] + gain @ (x_obs - mean[observed])
            out[k] = mu + eps[k] @ chol.T
        return out.view(corners.shape[0], self.n_samples, c, kh, kw).to(device=image.device, dtype=image.dtype)

    def _patcher(self, image: Tensor, corners: Tensor, patches: Tensor) -> Callable[[slice], tuple[Tensor, None]]:
        """``make_batch`` for evaluation ``k * n_samples + s``: ``image`` with window ``k`` set to sample ``s``."""
        kh, kw = self.window
        n_s = self.n_samples

        def make_batch(part: slice) -> tuple[Tensor, None]:
            images = image.expand(part.stop - part.start, -1, -1, -1).clone()
            for i, flat in enumerate(range(part.start, part.stop)):
                k, s = divmod(flat, n_s)
                r, c = corners[k].tolist()
                images[i, :, r : r + kh, c : c + kw] = patches[k, s]
            return images, None

        return make_batch

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        kh, kw = self.window
        _check_fits("PredictionDifference", "window", self.window, height, width)
        outer = (kh + 2 * self.padding, kw + 2 * self.padding)
        if self.sampling == "conditional":
            _check_fits("PredictionDifference", "window + 2 * padding", outer, height, width)
        ref = self._reference(x)
        corners = _windows(height, width, self.window, self.stride)
        n_win, n_s = corners.shape[0], self.n_samples
        g = _generator(self.seed)
        gauss = None
        if self.sampling == "conditional":
            gauss = tuple(t.cpu() for t in self._gaussian(ref, outer))
        evidence = torch.empty(batch, n_win, dtype=torch.float64)
        with torch.no_grad():
            images = torch.arange(batch, device=x.device)
            base = _all_scores(model, batch, lambda p: (x[p], None), images, target, self.batch_size, _log_odds_parts)
            base_log_odds = base[:, 0] - base[:, 1]
            for b in range(batch):
                if self.sampling == "conditional":
                    patches = self._conditional_patches(x[b], corners, gauss, g)
                else:
                    donors = torch.randint(0, ref.shape[0], (n_win, n_s), generator=g).to(x.device)
                    patches = torch.stack(
                        [ref[donors[k], :, r : r + kh, c : c + kw] for k, (r, c) in enumerate(corners.tolist())]
                    )
                owners = torch.full((n_win * n_s,), b, dtype=torch.long, device=x.device)
                make_batch = self._patcher(x[b], corners, patches)
                parts = _all_scores(model, n_win * n_s, make_batch, owners, target, self.batch_size, _log_odds_parts)
                parts = parts.view(n_win, n_s, 2).logsumexp(1)  # log sum_s p_s, log sum_s (1 - p_s)
                evidence[b] = (base_log_odds[b] - (parts[:, 0] - parts[:, 1])).cpu()
        relevance = _average_over_windows(evidence / math.log(2.0), corners, self.window, height, width)
        return relevance.to(device=x.device, dtype=x.dtype)
