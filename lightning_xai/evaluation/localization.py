"""Localisation metrics: does the explanation point at the ground-truth evidence?

Every metric compares attribution maps ``[B, 1|C, H, W]`` (channels are summed into one signed map per image,
``[B, H, W]`` is accepted too) with ground-truth masks ``[B, 1, H, W]`` or ``[B, H, W]`` of the same spatial
size. A mask is boolean, integer (non-zero = inside) or floating point (``> 0.5`` = inside, so that a mask
resized with bilinear interpolation keeps its area).

**Excluded samples.** Images whose mask is empty have no defined localisation score. They are *excluded and
counted*, never scored as hits or misses: the functional forms return ``NaN`` for them, the metrics skip them in
the mean and report how many were skipped in :attr:`PerSampleMeanMetric.num_excluded`. Maps containing ``NaN``
or ``inf`` raise a ``ValueError`` (a broken explanation should be loud, not averaged away).

This module also holds the two pieces every metric of :mod:`lightning_xai.evaluation` shares:
:func:`heatmap_batch` (validation and channel reduction) and :class:`PerSampleMeanMetric` (the DDP-correct
mean-with-exclusions state).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "MaskIoU",
    "PerSampleMeanMetric",
    "PointingGame",
    "RelevanceMass",
    "RelevanceRank",
    "binarize_heatmap",
    "heatmap_batch",
    "mask_batch",
    "mask_iou",
    "otsu_threshold",
    "pointing_game",
    "relevance_mass",
    "relevance_rank",
]


# --------------------------------------------------------------------------------------------------------------
# Shared validation and metric state
# --------------------------------------------------------------------------------------------------------------


def heatmap_batch(attributions: Tensor, name: str = "attributions") -> Tensor:
    """Validate attribution maps and reduce them to one signed map per image, ``Tensor[B, H, W]``.

    Accepts ``[B, C, H, W]`` (channels are summed, so ``[B, 1, H, W]`` is simply squeezed) or ``[B, H, W]``.
    Raises ``TypeError`` for non-tensors or non-floating tensors and ``ValueError`` for other ranks, an empty
    batch and non-finite values (``NaN``/``inf``), naming the offending samples.
    """
    if not isinstance(attributions, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attributions).__name__}")
    if not attributions.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {attributions.dtype}")
    if attributions.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape [B, C, H, W] or [B, H, W], got {list(attributions.shape)}")
    if attributions.shape[0] == 0:
        raise ValueError(f"{name}: got an empty batch")
    heat = attributions.sum(dim=1) if attributions.ndim == 4 else attributions
    finite = torch.isfinite(attributions.reshape(attributions.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"{name} contain NaN or inf values (samples {bad}); fix the explanation before scoring it")
    return heat


def mask_batch(masks: Tensor, heat: Tensor) -> Tensor:
    """Validate ground-truth ``masks`` against heatmaps ``heat [B, H, W]``; return a bool ``Tensor[B, H, W]``.

    Masks are ``[B, 1, H, W]`` or ``[B, H, W]``; bool, integer (non-zero = inside) or floating (``> 0.5``).
    """
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    squeezed = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    if squeezed.ndim != 3 or squeezed.shape != heat.shape:
        raise ValueError(
            f"masks of shape {list(masks.shape)} do not match the attribution maps: expected [B, 1, H, W] or "
            f"[B, H, W] with [B, H, W] = {list(heat.shape)}"
        )
    if squeezed.dtype == torch.bool:
        out = squeezed
    elif squeezed.is_floating_point():
        if not bool(torch.isfinite(squeezed).all()):
            raise ValueError("masks contain NaN or inf values")
        out = squeezed > 0.5
    else:
        out = squeezed != 0
    return out.to(heat.device)


def descending_ranks(heat: Tensor) -> Tensor:
    """Rank of every pixel of ``heat [B, H, W]`` by decreasing value, 0 = most relevant, as ``Tensor[B, H, W]``.

    Ties keep row-major order (stable sort), so the ranking is deterministic.
    """
    flat = heat.reshape(heat.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view_as(heat)


class PerSampleMeanMetric(Metric):
    """A metric that is the mean of one value per sample, with undefined samples excluded and counted.

    Subclasses compute a ``Tensor[B]`` per batch (``NaN`` = excluded) and pass it to :meth:`_accumulate`. The
    states are a float64 sum, a count and an exclusion count (all ``dist_reduce_fx="sum"``), so :meth:`compute`
    is exact under DDP. With ``return_per_sample=True`` the per-sample values are also kept (a ``"cat"`` state)
    and :meth:`compute` returns them, ``NaN`` for excluded samples, in update order (under DDP: rank by rank).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, return_per_sample: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not isinstance(return_per_sample, bool):
            raise TypeError(f"return_per_sample must be a bool, got {return_per_sample!r}")
        self.return_per_sample = return_per_sample
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("excluded", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if return_per_sample:
            self.add_state("values", [], dist_reduce_fx="cat")
        # Images seen since the last reset (a plain attribute, local to the process): metrics with seeded random
        # perturbations seed each image by its position in the stream, so results do not depend on batching.
        self._seen = 0
        self._in_forward = False

    def forward(self, *args: object, **kwargs: object) -> object:
        self._in_forward = True  # Metric.forward resets the states internally; keep the stream position
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._in_forward = False

    def reset(self) -> None:
        super().reset()
        if not getattr(self, "_in_forward", False):
            self._seen = 0

    def _accumulate(self, values: Tensor) -> None:
        self._seen += values.shape[0]
        values = values.detach().to(self.total.device)
        valid = ~torch.isnan(values)
        self.total += values[valid].double().sum()
        self.count += valid.sum()
        self.excluded += (~valid).sum()
        if self.return_per_sample:
            self.values.append(values.float())

    def compute(self) -> Tensor:
        """The mean over the non-excluded samples (``NaN`` if there are none), or the per-sample values."""
        if self.return_per_sample:
            return dim_zero_cat(self.values) if len(self.values) else torch.zeros(0, device=self.total.device)
        if int(self.count) == 0:
            return torch.tensor(float("nan"), device=self.total.device)
        return (self.total / self.count).float()

    @property
    def num_excluded(self) -> int:
        """How many samples were skipped as undefined (e.g. empty masks) since the last reset, in this process.
        Under DDP, read it inside ``with metric.sync_context():`` (on every rank) for the global count."""
        return int(self.excluded)


# --------------------------------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------------------------------


def _check_nonneg_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Dilate a bool mask ``[B, H, W]`` by a Euclidean disc of ``radius`` pixels."""
    if radius == 0:
        return mask
    r = torch.arange(-radius, radius + 1, device=mask.device)
    disc = ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= radius**2).float()
    hit = F.conv2d(mask.float().unsqueeze(1), disc.view(1, 1, *disc.shape), padding=radius)
    return hit.squeeze(1) > 0.5


def pointing_game(attributions: Tensor, masks: Tensor, *, tolerance: int = 0) -> Tensor:
    """Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016) per sample.

    A *hit* (1.0) when the maximum of the map lies inside the mask dilated by a disc of ``tolerance`` pixels
    (Euclidean distance), a miss (0.0) otherwise. When several pixels share the maximum, **all** of them must
    lie in the dilated mask, so a constant (uninformative) map is not rewarded. Images with an empty mask give
    ``NaN`` (excluded). Returns ``Tensor[B]`` (float32).
    """
    _check_nonneg_int("tolerance", tolerance)
    heat = heatmap_batch(attributions)
    mask = mask_batch(masks, heat)
    flat = heat.reshape(heat.shape[0], -1)
    is_max = (flat == flat.max(dim=1, keepdim=True).values).view_as(heat)
    region = _dilate(mask, tolerance)
    hit = ~(is_max & ~region).flatten(1).any(dim=1)
    empty = ~mask.flatten(1).any(dim=1)
    return torch.where(empty, torch.full_like(hit, float("nan"), dtype=torch.float32), hit.float())


class PointingGame(PerSampleMeanMetric):
    """Fraction of images whose attribution maximum falls in the ground-truth mask; see :func:`pointing_game`.

    Args:
        tolerance: dilation radius of the mask in pixels (Zhang et al. use 15 at 224x224); default 0.
        return_per_sample: :meth:`compute` returns the per-sample hits (``NaN`` for empty masks) instead.

    ``update(attributions, masks)``. Images with an empty mask are excluded and counted in ``num_excluded``.
    """

    higher_is_better = True

    def __init__(self, tolerance: int = 0, return_per_sample: bool = False, **kwargs: object) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.tolerance = _check_nonneg_int("tolerance", tolerance)

    def update(self, attributions: Tensor, masks: Tensor) -> None:
        self._accumulate(pointing_game(attributions, masks, tolerance=self.tolerance))


# --------------------------------------------------------------------------------------------------------------
# Binarisation and IoU
# --------------------------------------------------------------------------------------------------------------


def otsu_threshold(maps: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold (Otsu, IEEE Trans. SMC 1979) of each map in ``maps [B, ...]``: ``Tensor[B]`` (float64).

    The values of each map are histogrammed into ``bins`` equal bins between its minimum and maximum; the split
    maximising the between-class variance is chosen and the threshold is the centre of the last bin of the lower
    class (the convention of ``skimage.filters.threshold_otsu``): foreground is ``value > threshold``. A
    constant map returns its value (so its foreground is empty).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    flat = maps.reshape(maps.shape[0], -1).double()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    width = (hi - lo) / bins
    safe_width = torch.where(width > 0, width, torch.ones_like(width))
    idx = ((flat - lo) / safe_width).floor().long().clamp_(0, bins - 1)
    counts = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=flat.device)
    counts.scatter_add_(1, idx, torch.ones_like(flat))
    centres = lo + (torch.arange(bins, device=flat.device, dtype=torch.float64) + 0.5) * width
    w_low = counts.cumsum(dim=1)
    w_high = counts.flip(1).cumsum(dim=1).flip(1)
    s_low = (counts * centres).cumsum(dim=1)
    s_high = (counts * centres).flip(1).cumsum(dim=1).flip(1)
    mean_low = s_low / w_low.clamp_min(1)
    mean_high = s_high / w_high.clamp_min(1)
    between = w_low[:, :-1] * w_high[:, 1:] * (mean_low[:, :-1] - mean_high[:, 1:]) ** 2
    best = between.argmax(dim=1, keepdim=True)
    threshold = centres.gather(1, best).squeeze(1)
    return torch.where(width.squeeze(1) > 0, threshold, lo.squeeze(1))


def binarize_heatmap(
    heat: Tensor,
    method: Literal["topk", "otsu"] = "topk",
    *,
    fraction: float | Tensor | None = None,
) -> Tensor:
    """Binarise maps ``heat [B, H, W]`` into bool foreground masks.

    * ``"topk"``: the ``round(fraction * H * W)`` highest-valued pixels (signed values, ties in row-major
      order). ``fraction`` is a float in [0, 1] or a ``Tensor[B]`` of per-image fractions.
    * ``"otsu"``: pixels above :func:`otsu_threshold`.
    """
    if method == "otsu":
        thr = otsu_threshold(heat)
        return heat.double() > thr.view(-1, *([1] * (heat.ndim - 1)))
    if method != "topk":
        raise ValueError(f"unknown binarisation {method!r}; valid: 'topk', 'otsu'")
    if fraction is None:
        raise ValueError("'topk' binarisation needs a fraction")
    n = heat[0].numel()
    frac = torch.as_tensor(fraction, dtype=torch.float64, device=heat.device).expand(heat.shape[0])
    k = torch.round(frac * n).long()
    return descending_ranks(heat) < k.view(-1, 1, 1)


def _check_fraction(fraction: float | None) -> float | None:
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a float in (0, 1] or None (= the mask's own area), got {fraction!r}")
    return float(fraction)


_BINARIZATIONS = ("topk", "otsu")


def mask_iou(
    attributions: Tensor,
    masks: Tensor,
    *,
    binarization: Literal["topk", "otsu"] = "topk",
    fraction: float | None = None,
) -> Tensor:
    """Intersection over union of the binarised map with the mask, per sample: ``Tensor[B]``.

    The evaluation protocol of Oramas et al., "Visual Explanation by Interpretation: Improving Visual Feedback
    Capabilities of Deep Neural Networks", ICLR 2019: binarise the heatmap, then IoU with the ground truth.

    Binarisation (see :func:`binarize_heatmap`): ``"topk"`` keeps the top ``fraction`` of pixels by signed
    relevance; by default (``fraction=None``) that fraction is **the mask's own area**, so a perfect map scores
    1 and no threshold needs tuning. ``"otsu"`` uses Otsu's threshold of each map. Empty masks give ``NaN``.
    """
    if binarization not in _BINARIZATIONS:
        raise ValueError(f"unknown binarization {binarization!r}; valid: {list(_BINARIZATIONS)}")
    fraction = _check_fraction(fraction)
    heat = heatmap_batch(attributions)
    mask = mask_batch(masks, heat)
    area = mask.flatten(1).sum(dim=1)
    frac = area.double() / mask[0].numel() if fraction is None else fraction
    binary = binarize_heatmap(heat, binarization, fraction=frac)
    inter = (binary & mask).flatten(1).sum(dim=1).double()
    union = (binary | mask).flatten(1).sum(dim=1).double()
    iou = inter / union.clamp_min(1)
    return torch.where(area == 0, torch.full_like(iou, float("nan")), iou).float()


class MaskIoU(PerSampleMeanMetric):
    """Mean IoU of the binarised attribution map with the ground-truth mask; see :func:`mask_iou`.

    Args:
        binarization: ``"topk"`` (default) or ``"otsu"``.
        fraction: for ``"topk"``, the fraction of pixels kept; ``None`` (default) = the mask's own area.
        return_per_sample: :meth:`compute` returns per-sample IoUs (``NaN`` for empty masks) instead.

    ``update(attributions, masks)``. Empty masks are excluded and counted in ``num_excluded``.
    """

    higher_is_better = True

    def __init__(
        self,
        binarization: Literal["topk", "otsu"] = "topk",
        fraction: float | None = None,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        if binarization not in _BINARIZATIONS:
            raise ValueError(f"unknown binarization {binarization!r}; valid: {list(_BINARIZATIONS)}")
        if binarization == "otsu" and fraction is not None:
            raise ValueError("fraction only applies to binarization='topk'")
        self.binarization = binarization
        self.fraction = _check_fraction(fraction)

    def update(self, attributions: Tensor, masks: Tensor) -> None:
        self._accumulate(mask_iou(attributions, masks, binarization=self.binarization, fraction=self.fraction))


# --------------------------------------------------------------------------------------------------------------
# Relevance mass and rank accuracy (Arras et al. 2022)
# --------------------------------------------------------------------------------------------------------------


def relevance_mass(attributions: Tensor, masks: Tensor) -> Tensor:
    """Relevance mass accuracy (Arras, Osman & Samek, "CLEVR-XAI", Information Fusion 2022), per sample.

    The share of the **positive** relevance that falls inside the mask: ``sum(R+ in mask) / sum(R+)`` in
    [0, 1], with ``R+ = max(R, 0)`` of the channel-summed map. Undefined (``NaN``, excluded) when the mask is
    empty or the map has no positive relevance.
    """
    heat = heatmap_batch(attributions)
    mask = mask_batch(masks, heat)
    pos = heat.clamp_min(0).double().flatten(1)
    total = pos.sum(dim=1)
    inside = (pos * mask.flatten(1)).sum(dim=1)
    undefined = (total <= 0) | ~mask.flatten(1).any(dim=1)
    mass = inside / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(undefined, torch.full_like(mass, float("nan")), mass).float()


def relevance_rank(attributions: Tensor, masks: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras, Osman & Samek, "CLEVR-XAI", Information Fusion 2022), per sample.

    With ``K`` = the number of mask pixels: the fraction of the ``K`` highest-relevance pixels (signed values,
    ties in row-major order) that lie inside the mask, in [0, 1]. Empty masks give ``NaN`` (excluded).
    """
    heat = heatmap_batch(attributions)
    mask = mask_batch(masks, heat)
    k = mask.flatten(1).sum(dim=1)
    top = descending_ranks(heat) < k.view(-1, 1, 1)
    inside = (top & mask).flatten(1).sum(dim=1).double()
    rank = inside / k.clamp_min(1)
    return torch.where(k == 0, torch.full_like(rank, float("nan")), rank).float()


class RelevanceMass(PerSampleMeanMetric):
    """Mean relevance mass accuracy (Arras et al., Information Fusion 2022); see :func:`relevance_mass`.

    ``update(attributions, masks)``. Empty masks and maps without positive relevance are excluded and counted.
    """

    higher_is_better = True

    def update(self, attributions: Tensor, masks: Tensor) -> None:
        self._accumulate(relevance_mass(attributions, masks))


class RelevanceRank(PerSampleMeanMetric):
    """Mean relevance rank accuracy (Arras et al., Information Fusion 2022); see :func:`relevance_rank`.

    ``update(attributions, masks)``. Empty masks are excluded and counted.
    """

    higher_is_better = True

    def update(self, attributions: Tensor, masks: Tensor) -> None:
        self._accumulate(relevance_rank(attributions, masks))
