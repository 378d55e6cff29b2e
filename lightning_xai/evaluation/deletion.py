"""Deletion and insertion curves and their areas (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for
Explanation of Black-box Models", BMVC 2018): remove (or insert) pixels in order of decreasing relevance and watch
the model's score for the explained class. See :mod:`lightning_xai.evaluation.faithfulness` for the conventions.

**Token models.** For token ids ``LongTensor[B, T]`` with token attributions ``[B, T]``, *removing* a token
replaces its id by ``mask_token`` (the id of a ``[MASK]`` / ``[UNK]`` token; ids are never interpolated or cast
to float) and *inserting* starts from every token masked. Positions holding ``pad_token`` are never removed nor
inserted and do not count: the x axis is the fraction of each sequence's own (non-padding) tokens, point ``k``
of ``steps`` having ``round(k * L / steps)`` of its ``L`` tokens removed, most relevant first (ties in a fixed
pseudo-random order). A map that is constant over a sequence's tokens orders none before another: its area is
``NaN`` (excluded and counted), as for a constant image map.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import Target
from lightning_xai.attribution.filters import gaussian_blur as shared_gaussian_blur
from lightning_xai.checks import check_int, check_optional_int
from lightning_xai.evaluation.base import (
    CurveMetric,
    check_image_batch,
    check_token_batch,
    constant_maps,
    descending_ranks,
    heatmap_batch,
    is_token_batch,
    token_map_batch,
)
from lightning_xai.evaluation.scoring import (
    DEFAULT_STEPS,
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


def _token_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    insertion: bool,
    steps: int | None,
    step: int | None,
    mask_token: int | None,
    pad_token: int | None,
    batch_size: int,
    softmax: bool,
) -> tuple[Tensor, Tensor]:
    """The curve over token ids ``[B, T]`` (see the module docstring): ``(fractions [P], scores [B, P])``."""
    owner = "insertion_curve" if insertion else "deletion_curve"
    ids = check_token_batch(inputs)
    heat = token_map_batch(attributions)
    if heat.shape != ids.shape:
        raise ValueError(
            f"{owner}: token attributions of shape {list(heat.shape)} do not match token ids of shape "
            f"{list(ids.shape)}: expected one relevance per token, [B, T]"
        )
    if mask_token is None:
        raise ValueError(
            f"{owner}: token inputs need mask_token= (the id that replaces a removed token, e.g. the [MASK] or [UNK] "
            "id); token ids are never interpolated"
        )
    check_int("mask_token", mask_token, minimum=0, owner=owner)
    if step is not None:
        raise ValueError(
            f"{owner}: step= (features per step) does not apply to token inputs, whose sequences differ in length; "
            "use steps= (the curve's points over each sequence's own tokens)"
        )
    steps = check_int("steps", DEFAULT_STEPS if steps is None else steps, minimum=1, owner=owner)
    check_int("batch_size", batch_size, minimum=1, owner=owner)
    x = ids.detach()
    heat = heat.to(x.device)
    b = x.shape[0]
    target = prepare_target(target, b, x.device)
    valid = torch.ones_like(x, dtype=torch.bool) if pad_token is None else x != pad_token
    lengths = valid.sum(dim=1)
    ranked = heat.masked_fill(~valid, float("-inf"))  # padding ranks after every token: never removed
    ranks = descending_ranks(ranked, tie_break="random")
    points = torch.arange(steps + 1, device=x.device)
    counts = (2 * points.view(1, -1) * lengths.view(-1, 1) + steps) // (2 * steps)  # round(k * L / steps)
    mask = torch.tensor(mask_token, dtype=x.dtype, device=x.device)

    def build(_sl: slice, images: Tensor, at: Tensor) -> Tensor:
        changed = ranks.index_select(0, images) < counts[images, at].view(-1, 1)
        rows = x.index_select(0, images)
        if insertion:
            return torch.where(changed | ~valid.index_select(0, images), rows, mask)
        return torch.where(changed, mask, rows)

    scores = score_pairs(model, build, b, steps + 1, target, batch_size=batch_size, softmax=softmax, device=x.device)
    return points.to(torch.float32) / steps, scores


def _curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    insertion: bool,
    steps: int | None,
    step: int | None,
    baseline: float | Tensor | str,
    mask_token: int | None,
    pad_token: int | None,
    batch_size: int,
    softmax: bool,
    blur_sigma: float = 5.0,
    blur_kernel_size: int = 11,
) -> tuple[Tensor, Tensor]:
    """The image or the token curve, by the inputs' dtype: ``(fractions [P], scores [B, P])``."""
    if is_token_batch(inputs):
        return _token_curve(
            attributions, inputs, model, target, insertion=insertion, steps=steps, step=step, mask_token=mask_token,
            pad_token=pad_token, batch_size=batch_size, softmax=softmax,
        )
    if mask_token is not None or pad_token is not None:
        raise ValueError(
            f"mask_token / pad_token apply to token ids (an integer tensor [B, T]), but the inputs are "
            f"{inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__}"
            + (f" {list(inputs.shape)}" if isinstance(inputs, Tensor) else "")
            + "; for images use baseline="
        )
    return _pixel_curve(
        attributions, inputs, model, target, insertion=insertion, steps=steps, step=step, baseline=baseline,
        batch_size=batch_size, softmax=softmax, blur_sigma=blur_sigma, blur_kernel_size=blur_kernel_size,
    )


def deletion_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    steps: int | None = None,
    step: int | None = None,
    baseline: float | Tensor = 0.0,
    mask_token: int | None = None,
    pad_token: int | None = None,
    batch_size: int = 64,
    softmax: bool = True,
) -> tuple[Tensor, Tensor]:
    """The deletion curve of RISE (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018).

    Pixels are replaced by ``baseline`` (a number, or a tensor broadcastable to the inputs) in order of
    decreasing relevance (ties in a fixed pseudo-random order, never by position: see
    :func:`~lightning_xai.evaluation.base.descending_ranks`), all channels of a pixel together: after ``steps`` equal
    steps (default 64; point ``k`` has ``round(k * H * W / steps)`` pixels deleted) or ``step`` pixels per step.

    **Token ids** ``LongTensor[B, T]`` with token maps ``[B, T]``: tokens are replaced by the id ``mask_token``
    (required), positions holding ``pad_token`` are never removed and do not count (point ``k`` has
    ``round(k * L / steps)`` of a sequence's ``L`` tokens removed); ``baseline`` and ``step`` do not apply.

    Returns ``(fractions, scores)``: ``fractions [P]`` in [0, 1] (fraction of pixels deleted, from 0 to 1) and
    ``scores [B, P]`` (score of the target at each point; ``scores[:, 0]`` is the unperturbed input).
    """
    return _curve(
        attributions,
        inputs,
        model,
        target,
        insertion=False,
        steps=steps,
        step=step,
        baseline=check_baseline(baseline),
        mask_token=mask_token,
        pad_token=pad_token,
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
    mask_token: int | None = None,
    pad_token: int | None = None,
    batch_size: int = 64,
    softmax: bool = True,
) -> tuple[Tensor, Tensor]:
    """The insertion curve of RISE (Petsiuk et al., BMVC 2018).

    Starts from ``baseline`` - by default the input blurred by :func:`gaussian_blur` (``blur_sigma``,
    ``blur_kernel_size``), or a number / tensor - and inserts the original pixels in order of decreasing
    relevance (all channels together), with the step grid of :func:`deletion_curve`. Token ids start from every
    (non-padding) token replaced by ``mask_token``, as for :func:`deletion_curve`. Returns
    ``(fractions [P], scores [B, P])``; ``fractions`` is the fraction of pixels inserted, ``scores[:, -1]`` is
    the unperturbed input.
    """
    return _curve(
        attributions,
        inputs,
        model,
        target,
        insertion=True,
        steps=steps,
        step=step,
        baseline=check_baseline(baseline, ("blur",)),
        mask_token=mask_token,
        pad_token=pad_token,
        batch_size=batch_size,
        softmax=softmax,
        blur_sigma=blur_sigma,
        blur_kernel_size=blur_kernel_size,
    )


def _undefined(attributions: Tensor, inputs: Tensor, pad_token: int | None) -> Tensor:
    """``bool[B]``: maps that order no pixel (token) before another - constant over the image, or over the
    sequence's non-padding tokens (or a sequence of padding only). Their areas are ``NaN``."""
    if not is_token_batch(inputs):
        return constant_maps(heatmap_batch(attributions))
    valid = torch.ones_like(inputs, dtype=torch.bool) if pad_token is None else inputs != pad_token
    heat = attributions.to(inputs.device)
    highest = heat.masked_fill(~valid, float("-inf")).amax(dim=1)
    lowest = heat.masked_fill(~valid, float("inf")).amin(dim=1)
    return ~(highest > lowest)


def _area(fractions: Tensor, scores: Tensor, undefined: Tensor) -> Tensor:
    area = torch.trapezoid(scores, x=fractions.to(scores.device), dim=1)
    return torch.where(undefined.to(area.device), torch.full_like(area, float("nan")), area)


def deletion_auc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area under :func:`deletion_curve` (trapezoid rule over the fraction of pixels), ``Tensor[B]``.

    With ``softmax=True`` the score is a probability and the AUC lies in [0, 1]; **lower is better** (the
    score should collapse when the most relevant pixels go first). Keyword arguments as for the curve. A
    constant map orders no pixel before another: its AUC is ``NaN`` (excluded and counted by the metrics); so
    does a token map constant over a sequence's tokens.
    """
    fractions, scores = deletion_curve(attributions, inputs, model, target, **kwargs)
    return _area(fractions, scores, _undefined(attributions, inputs, kwargs.get("pad_token")))


def insertion_auc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area under :func:`insertion_curve` (trapezoid rule over the fraction of pixels), ``Tensor[B]``.

    In [0, 1] with ``softmax=True``; **higher is better**. Keyword arguments as for the curve. ``NaN`` for a
    constant map, as for :func:`deletion_auc`.
    """
    fractions, scores = insertion_curve(attributions, inputs, model, target, **kwargs)
    return _area(fractions, scores, _undefined(attributions, inputs, kwargs.get("pad_token")))


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
        mask_token: int | None = None,
        pad_token: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        owner = type(self).__name__
        self.steps, self.step = check_steps(steps, step, owner=owner)
        self.baseline = check_baseline(baseline, allowed_baselines, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.softmax = bool(softmax)
        self.mask_token = check_optional_int("mask_token", mask_token, minimum=0, owner=owner, none_means="images only")
        self.pad_token = check_optional_int("pad_token", pad_token, minimum=0, owner=owner, none_means="no padding")
        if self.step is not None and self.mask_token is not None:
            raise ValueError(f"{owner}: step= does not apply to token inputs (mask_token=); use steps=")

    def _update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, insertion: bool,
                **blur: float) -> None:
        fractions, scores = _curve(
            attributions,
            inputs,
            model,
            target,
            insertion=insertion,
            steps=self.steps,
            step=self.step,
            baseline=self.baseline,
            mask_token=self.mask_token,
            pad_token=self.pad_token,
            batch_size=self.batch_size,
            softmax=self.softmax,
            **blur,
        )
        self._record(fractions, scores, _area(fractions, scores, _undefined(attributions, inputs, self.pad_token)))


class DeletionAUC(_PixelCurveMetric):
    """Mean area under the deletion curve (Petsiuk et al., "RISE", BMVC 2018); **lower is better**.

    See :func:`deletion_curve` for the protocol. ``update(attributions, inputs, model, target)``;
    :meth:`curve` gives ``(fraction of pixels deleted, mean score)`` over the scored samples. Constant maps
    are excluded and counted in ``num_excluded``.

    Args:
        steps: number of deletion steps (default 64); or ``step``: pixels deleted per step (not both).
        baseline: value (or tensor broadcastable to the inputs) written into deleted pixels; default 0.
        mask_token: for token ids ``[B, T]``: the id written into deleted tokens (required for token inputs).
        pad_token: for token ids: the padding id, never deleted and not counted (``None``: no padding).
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
        mask_token: int | None = None,
        pad_token: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(
            steps, step, baseline, batch_size, softmax, return_per_sample, mask_token=mask_token, pad_token=pad_token,
            **kwargs,
        )

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        self._update(attributions, inputs, model, target, insertion=False)


class InsertionAUC(_PixelCurveMetric):
    """Mean area under the insertion curve (Petsiuk et al., "RISE", BMVC 2018); **higher is better**.

    See :func:`insertion_curve`. ``update(attributions, inputs, model, target)``; :meth:`curve` gives
    ``(fraction of pixels inserted, mean score)``.

    Args:
        steps / step: as for :class:`DeletionAUC`.
        baseline: ``"blur"`` (default: the Gaussian-blurred input) or a value / tensor to start from.
        blur_sigma, blur_kernel_size: the blur (RISE: sigma 5, 11x11 window).
        mask_token, pad_token: for token ids, as for :class:`DeletionAUC` (the curve starts from every token
            masked).
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
        mask_token: int | None = None,
        pad_token: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(
            steps, step, baseline, batch_size, softmax, return_per_sample, ("blur",), mask_token=mask_token,
            pad_token=pad_token, **kwargs,
        )
        self.blur_sigma = positive_float("blur_sigma", blur_sigma, owner=type(self).__name__)
        if isinstance(blur_kernel_size, bool) or not isinstance(blur_kernel_size, int) or blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be a positive odd integer, got {blur_kernel_size!r}")
        self.blur_kernel_size = blur_kernel_size

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        self._update(
            attributions, inputs, model, target, insertion=True, blur_sigma=self.blur_sigma,
            blur_kernel_size=self.blur_kernel_size,
        )
