"""Deletion and insertion curves and their areas (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for
Explanation of Black-box Models", BMVC 2018): remove (or insert) pixels in order of decreasing relevance and watch
the model's score for the explained class. See :mod:`lightning_xai.evaluation.faithfulness` for the conventions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import Target
from lightning_xai.attribution.filters import gaussian_blur as shared_gaussian_blur
from lightning_xai.checks import check_int
from lightning_xai.evaluation.base import CurveMetric, check_image_batch, constant_maps, descending_ranks, heatmap_batch
from lightning_xai.evaluation.scoring import (
    baseline_images,
    check_baseline,
    check_steps,
    heat_for,
    positive_float,
    prepare_target,
    rows_of,
    score_pairs,
)

__all__ = [
    "DeletionAUC",
    "InsertionAUC",
    "deletion_auc",
    "deletion_curve",
    "gaussian_blur",
    "insertion_auc",
    "insertion_curve",
]


def gaussian_blur(images: Tensor, sigma: float = 5.0, kernel_size: int = 11) -> Tensor:
    """Blur ``images [B, C, H, W]`` with a normalised, separable Gaussian of ``sigma`` over a ``kernel_size``
    window (odd), replicating border pixels. ``sigma`` and the window are those of the RISE insertion baseline
    (Petsiuk et al., BMVC 2018), but the borders are not: RISE's reference code zero-pads, which darkens a
    band of about ``kernel_size // 2`` pixels along the edges of the blurred image, whereas here the edge
    pixels are replicated so that the start of the insertion curve carries no border artefact. The filter is
    :func:`lightning_xai.attribution.filters.gaussian_blur`."""
    sigma = positive_float("blur_sigma", sigma, owner="gaussian_blur")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur_kernel_size must be a positive odd integer, got {kernel_size!r}")
    check_image_batch(images)
    return shared_gaussian_blur(images, sigma, radius=kernel_size // 2)


def _pixel_counts(num_pixels: int, steps: int | None, step: int | None) -> list[int]:
    if step is not None:
        return [min(k * step, num_pixels) for k in range(math.ceil(num_pixels / step) + 1)]
    assert steps is not None
    if steps > num_pixels:
        raise ValueError(f"steps={steps} exceeds the {num_pixels} pixels of the image; use steps <= {num_pixels}")
    return [(2 * k * num_pixels + steps) // (2 * steps) for k in range(steps + 1)]


def _pixel_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    insertion: bool,
    steps: int | None,
    step: int | None,
    baseline: float | Tensor | str,
    batch_size: int,
    softmax: bool,
    blur_sigma: float = 5.0,
    blur_kernel_size: int = 11,
) -> tuple[Tensor, Tensor]:
    steps, step = check_steps(steps, step)
    check_int("batch_size", batch_size, minimum=1, owner="_pixel_curve")
    heat = heat_for(attributions, inputs)
    b, _, h, w = inputs.shape
    target = prepare_target(target, b, inputs.device)
    counts = _pixel_counts(h * w, steps, step)
    n = torch.tensor(counts, device=inputs.device, dtype=torch.int32)
    ranks = descending_ranks(heat, tie_break="random").to(torch.int32).unsqueeze(1)
    if isinstance(baseline, str):
        other = gaussian_blur(inputs.detach(), blur_sigma, blur_kernel_size)
    else:
        other = baseline_images(check_baseline(baseline), inputs)
    x = inputs.detach()

    def build(_sl: slice, images: Tensor, points: Tensor) -> Tensor:
        changed = ranks.index_select(0, images) < n.index_select(0, points).view(-1, 1, 1, 1)
        if insertion:
            return torch.where(changed, x.index_select(0, images), rows_of(other, images))
        return torch.where(changed, rows_of(other, images), x.index_select(0, images))

    scores = score_pairs(
        model, build, b, len(counts), target, batch_size=batch_size, softmax=softmax, device=inputs.device
    )
    fractions = n.to(torch.float32) / (h * w)
    return fractions, scores


def deletion_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    steps: int | None = None,
    step: int | None = None,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    softmax: bool = True,
) -> tuple[Tensor, Tensor]:
    """The deletion curve of RISE (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018).

    Pixels are replaced by ``baseline`` (a number, or a tensor broadcastable to the inputs) in order of
    decreasing relevance (ties in a fixed pseudo-random order, never by position: see
    :func:`~lightning_xai.evaluation.base.descending_ranks`), all channels of a pixel together: after ``steps`` equal
    steps (default 64; point ``k`` has ``round(k * H * W / steps)`` pixels deleted) or ``step`` pixels per step.

    Returns ``(fractions, scores)``: ``fractions [P]`` in [0, 1] (fraction of pixels deleted, from 0 to 1) and
    ``scores [B, P]`` (score of the target at each point; ``scores[:, 0]`` is the unperturbed input).
    """
    return _pixel_curve(
        attributions,
        inputs,
        model,
        target,
        insertion=False,
        steps=steps,
        step=step,
        baseline=check_baseline(baseline),
        batch_size=batch_size,
        softmax=softmax,
    )


def insertion_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    steps: int | None = None,
    step: int | None = None,
    baseline: float | Tensor | Literal["blur"] = "blur",
    blur_sigma: float = 5.0,
    blur_kernel_size: int = 11,
    batch_size: int = 64,
    softmax: bool = True,
) -> tuple[Tensor, Tensor]:
    """The insertion curve of RISE (Petsiuk et al., BMVC 2018).

    Starts from ``baseline`` - by default the input blurred by :func:`gaussian_blur` (``blur_sigma``,
    ``blur_kernel_size``), or a number / tensor - and inserts the original pixels in order of decreasing
    relevance (all channels together), with the step grid of :func:`deletion_curve`. Returns
    ``(fractions [P], scores [B, P])``; ``fractions`` is the fraction of pixels inserted, ``scores[:, -1]`` is
    the unperturbed input.
    """
    return _pixel_curve(
        attributions,
        inputs,
        model,
        target,
        insertion=True,
        steps=steps,
        step=step,
        baseline=check_baseline(baseline, ("blur",)),
        batch_size=batch_size,
        softmax=softmax,
        blur_sigma=blur_sigma,
        blur_kernel_size=blur_kernel_size,
    )


def deletion_auc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area under :func:`deletion_curve` (trapezoid rule over the fraction of pixels), ``Tensor[B]``.

    With ``softmax=True`` the score is a probability and the AUC lies in [0, 1]; **lower is better** (the
    score should collapse when the most relevant pixels go first). Keyword arguments as for the curve. A
    constant map orders no pixel before another: its AUC is ``NaN`` (excluded and counted by the metrics).
    """
    fractions, scores = deletion_curve(attributions, inputs, model, target, **kwargs)
    return _area(fractions, scores, heatmap_batch(attributions))


def _area(fractions: Tensor, scores: Tensor, heat: Tensor) -> Tensor:
    area = torch.trapezoid(scores, x=fractions, dim=1)
    return torch.where(constant_maps(heat).to(area.device), torch.full_like(area, float("nan")), area)


def insertion_auc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area under :func:`insertion_curve` (trapezoid rule over the fraction of pixels), ``Tensor[B]``.

    In [0, 1] with ``softmax=True``; **higher is better**. Keyword arguments as for the curve. ``NaN`` for a
    constant map, as for :func:`deletion_auc`.
    """
    fractions, scores = insertion_curve(attributions, inputs, model, target, **kwargs)
    return _area(fractions, scores, heatmap_batch(attributions))


class _PixelCurveMetric(CurveMetric):
    def __init__(
        self,
        steps: int | None,
        step: int | None,
        baseline: float | Tensor | str,
        batch_size: int,
        softmax: bool,
        return_per_sample: bool,
        allowed_baselines: tuple[str, ...] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.steps, self.step = check_steps(steps, step, owner=type(self).__name__)
        self.baseline = check_baseline(baseline, allowed_baselines, owner=type(self).__name__)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=type(self).__name__)
        self.softmax = bool(softmax)


class DeletionAUC(_PixelCurveMetric):
    """Mean area under the deletion curve (Petsiuk et al., "RISE", BMVC 2018); **lower is better**.

    See :func:`deletion_curve` for the protocol. ``update(attributions, inputs, model, target)``;
    :meth:`curve` gives ``(fraction of pixels deleted, mean score)`` over the scored samples. Constant maps
    are excluded and counted in ``num_excluded``.

    Args:
        steps: number of deletion steps (default 64); or ``step``: pixels deleted per step (not both).
        baseline: value (or tensor broadcastable to the inputs) written into deleted pixels; default 0.
        batch_size: perturbed images per forward pass.
        softmax: score = softmax probability of the target (default) or the raw output.
        return_per_sample: :meth:`compute` returns per-sample AUCs instead of the mean.
    """

    higher_is_better = False

    def __init__(
        self,
        steps: int | None = None,
        step: int | None = None,
        baseline: float | Tensor = 0.0,
        batch_size: int = 64,
        softmax: bool = True,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(steps, step, baseline, batch_size, softmax, return_per_sample, **kwargs)

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        fractions, scores = deletion_curve(
            attributions,
            inputs,
            model,
            target,
            steps=self.steps,
            step=self.step,
            baseline=self.baseline,
            batch_size=self.batch_size,
            softmax=self.softmax,
        )
        self._record(fractions, scores, _area(fractions, scores, heatmap_batch(attributions)))


class InsertionAUC(_PixelCurveMetric):
    """Mean area under the insertion curve (Petsiuk et al., "RISE", BMVC 2018); **higher is better**.

    See :func:`insertion_curve`. ``update(attributions, inputs, model, target)``; :meth:`curve` gives
    ``(fraction of pixels inserted, mean score)``.

    Args:
        steps / step: as for :class:`DeletionAUC`.
        baseline: ``"blur"`` (default: the Gaussian-blurred input) or a value / tensor to start from.
        blur_sigma, blur_kernel_size: the blur (RISE: sigma 5, 11x11 window).
        batch_size, softmax, return_per_sample: as for :class:`DeletionAUC`.
    """

    higher_is_better = True

    def __init__(
        self,
        steps: int | None = None,
        step: int | None = None,
        baseline: float | Tensor | Literal["blur"] = "blur",
        blur_sigma: float = 5.0,
        blur_kernel_size: int = 11,
        batch_size: int = 64,
        softmax: bool = True,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(steps, step, baseline, batch_size, softmax, return_per_sample, ("blur",), **kwargs)
        self.blur_sigma = positive_float("blur_sigma", blur_sigma, owner=type(self).__name__)
        if isinstance(blur_kernel_size, bool) or not isinstance(blur_kernel_size, int) or blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be a positive odd integer, got {blur_kernel_size!r}")
        self.blur_kernel_size = blur_kernel_size

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        fractions, scores = insertion_curve(
            attributions,
            inputs,
            model,
            target,
            steps=self.steps,
            step=self.step,
            baseline=self.baseline,
            blur_sigma=self.blur_sigma,
            blur_kernel_size=self.blur_kernel_size,
            batch_size=self.batch_size,
            softmax=self.softmax,
        )
        self._record(fractions, scores, _area(fractions, scores, heatmap_batch(attributions)))
