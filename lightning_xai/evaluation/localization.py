"""Localisation metrics: does the explanation point at the ground-truth evidence?

Every metric compares attribution maps ``[B, 1|C, H, W]`` (channels are summed into one signed map per image,
``[B, H, W]`` is accepted too) with ground-truth masks ``[B, 1, H, W]`` or ``[B, H, W]`` of the same spatial
size. A mask is boolean, integer (non-zero = inside) or floating point (``> 0.5`` = inside, so that a mask
resized with bilinear interpolation keeps its area).

**Excluded samples.** Images whose mask is empty have no defined localisation score. They are *excluded and
counted*, never scored as hits or misses: the functional forms return ``NaN`` for them, the metrics skip them in
the mean and report how many were skipped in :attr:`PerSampleMeanMetric.num_excluded`. Maps containing ``NaN``
or ``inf`` raise a ``ValueError`` (a broken explanation should be loud, not averaged away).

**Token models.** Token attributions ``[B, T]`` (one relevance per token position, e.g. of
``token_saliency`` or ``attention_rollout`` on a text model) are scored against token masks ``[B, T]`` (1 at the
evidence tokens, e.g. the planted keys of :class:`~lightning_xai.data.tokens.PlantedTokens`) exactly as a
one-row image: the pointing game's ``tolerance`` is then a distance in tokens. Token maps come with ``valid``
(below; all ``True`` without padding), which tells them from a single un-batched image map ``[H, W]`` (an
error).

**Padding.** Every function and metric takes ``valid`` (bool, the shape of the masks; ``False`` = padding): the
positions outside it take no part - they carry no mass, are never the maximum, are never ranked into the top
``k``, and do not count in the area that a top-``fraction`` binarisation keeps. A mask position outside
``valid`` is not evidence. ``valid=None`` (default): every position takes part.

The pieces every metric shares (:func:`heatmap_batch`, :func:`mask_batch`, :class:`PerSampleMeanMetric`) live
in :mod:`lightning_xai.evaluation.base` and are re-exported here, their historical import path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.checks import check_choice, check_int
from lightning_xai.evaluation.base import (
    PerSampleMeanMetric,
    as_token_rows,
    descending_ranks,
    heatmap_batch,
    mask_batch,
    scored_heat,
)

_BINARIZATIONS = ("topk", "otsu")

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



def _located(attributions: Tensor, masks: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(heat [B, H, W], mask bool [B, H, W], valid bool [B, H, W] or None)`` for image maps, or token maps
    ``[B, T]`` with masks / ``valid`` ``[B, T]`` seen as one-row images ``[B, 1, T]``; the mask is restricted to
    the valid positions."""
    heat, tokens = scored_heat(attributions, valid)
    if tokens:
        masks, valid = as_token_rows(masks), as_token_rows(valid)
    mask = mask_batch(masks, heat)
    if valid is None:
        return heat, mask, None
    keep = mask_batch(valid, heat, name="valid")
    return heat, mask & keep, keep


def _ranked_heat(heat: Tensor, valid: Tensor | None) -> Tensor:
    """``heat`` with the positions outside ``valid`` set to ``-inf`` (never ranked before a valid position)."""
    return heat if valid is None else heat.masked_fill(~valid, float("-inf"))


# --------------------------------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------------------------------


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Dilate a bool mask ``[B, H, W]`` by a Euclidean disc of ``radius`` pixels."""
    if radius == 0:
        return mask
    r = torch.arange(-radius, radius + 1, device=mask.device)
    disc = ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= radius**2).float()
    hit = F.conv2d(mask.float().unsqueeze(1), disc.view(1, 1, *disc.shape), padding=radius)
    return hit.squeeze(1) > 0.5


def pointing_game(attributions: Tensor, masks: Tensor, *, tolerance: int = 0, valid: Tensor | None = None) -> Tensor:
    """Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016) per sample.

    A *hit* (1.0) when the maximum of the map lies inside the mask dilated by a disc of ``tolerance`` pixels
    (Euclidean distance), a miss (0.0) otherwise. When several pixels share the maximum, **all** of them must
    lie in the dilated mask, so a constant (uninformative) map is not rewarded. Images with an empty mask give
    ``NaN`` (excluded). The maximum is taken over the ``valid`` positions only (padding never points). Token
    maps ``[B, T]``: ``tolerance`` is in tokens. Returns ``Tensor[B]`` (float32).
    """
    check_int("tolerance", tolerance, minimum=0, owner="pointing_game")
    heat, mask, valid = _located(attributions, masks, valid)
    flat = _ranked_heat(heat, valid).reshape(heat.shape[0], -1)
    is_max = (flat == flat.max(dim=1, keepdim=True).values).view_as(heat)
    if valid is not None:
        is_max &= valid
    region = _dilate(mask, tolerance)
    hit = ~(is_max & ~region).flatten(1).any(dim=1)
    empty = ~mask.flatten(1).any(dim=1)
    return torch.where(empty, torch.full_like(hit, float("nan"), dtype=torch.float32), hit.float())


class PointingGame(PerSampleMeanMetric):
    """Fraction of images whose attribution maximum falls in the ground-truth mask; see :func:`pointing_game`.

    Args:
        tolerance: dilation radius of the mask in pixels (Zhang et al. use 15 at 224x224); default 0.
        return_per_sample: :meth:`compute` returns the per-sample hits (``NaN`` for empty masks) instead.

    ``update(attributions, masks, valid=None)`` (``valid``: the positions that take part, ``False`` = padding).
    Images with an empty mask are excluded and counted in ``num_excluded``.
    """

    higher_is_better = True

    def __init__(self, tolerance: int = 0, return_per_sample: bool = False, **kwargs: object) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.tolerance = check_int("tolerance", tolerance, minimum=0, owner=type(self).__name__)

    def update(self, attributions: Tensor, masks: Tensor, valid: Tensor | None = None) -> None:
        self._accumulate(pointing_game(attributions, masks, tolerance=self.tolerance, valid=valid))


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
    check_int("bins", bins, minimum=2, owner="otsu_threshold")
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
        check_choice("binarisation", method, _BINARIZATIONS, owner="binarize_heatmap")
    if fraction is None:
        raise ValueError("'topk' binarisation needs a fraction")
    n = heat[0].numel()
    frac = torch.as_tensor(fraction, dtype=torch.float64, device=heat.device).expand(heat.shape[0])
    k = torch.round(frac * n).long()
    return descending_ranks(heat) < k.view(-1, 1, 1)


def _top_k_split(heat: Tensor, mask: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """How the top ``k`` pixels of each map fall on the mask when ties are not broken by position.

    With ``v`` the ``k``-th highest value of a map: ``inside`` = mask pixels strictly above ``v`` (always in the
    top ``k``), ``tied`` = pixels equal to ``v``, ``tied_inside`` = those in the mask, ``draws`` = how many of
    the tied pixels the top ``k`` takes (``k`` minus the pixels above ``v``). All ``Tensor[B]`` (float64).
    """
    flat = heat.reshape(heat.shape[0], -1).double()
    inside_mask = mask.reshape(mask.shape[0], -1)
    ordered = flat.sort(dim=1, descending=True).values
    kth = ordered.gather(1, (k.clamp_min(1) - 1).view(-1, 1))
    above = flat > kth
    tie = flat == kth
    has_k = (k > 0).view(-1, 1)
    inside = ((above & inside_mask & has_k).sum(1)).double()
    tied = (tie & has_k).sum(1).double()
    tied_inside = (tie & inside_mask & has_k).sum(1).double()
    draws = torch.where(k > 0, k - (above & has_k).sum(1), torch.zeros_like(k)).double()
    return inside, tied, tied_inside, draws


def _hypergeometric_mean(fn: object, base: Tensor, tied: Tensor, tied_inside: Tensor, draws: Tensor) -> Tensor:
    """``E[fn(i, base_i + X_i)]`` per sample with ``X_i`` hypergeometric: ``draws_i`` pixels drawn without
    replacement from ``tied_i`` tied pixels of which ``tied_inside_i`` are in the mask (a uniformly random
    order among ties). Computed on the CPU (a few scalars per sample), returned on ``base``'s device."""
    device = base.device
    base, tied, tied_inside, draws = (t.detach().cpu() for t in (base, tied, tied_inside, draws))
    out = torch.empty_like(base)
    for i in range(base.shape[0]):
        g, m, r = int(tied[i]), int(tied_inside[i]), int(draws[i])
        low, high = max(0, r - (g - m)), min(m, r)
        x = torch.arange(low, high + 1, dtype=torch.float64)
        log_p = (
            _log_comb(torch.tensor(float(m)), x)
            + _log_comb(torch.tensor(float(g - m)), r - x)
            - _log_comb(torch.tensor(float(g)), torch.tensor(float(r)))
        )
        prob = (log_p - log_p.max()).exp()
        out[i] = (prob * fn(i, base[i] + x)).sum() / prob.sum()  # type: ignore[operator]
    return out.to(device)


def _log_comb(n: Tensor, k: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _check_fraction(fraction: float | None, owner: str) -> float | None:
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(
            f"{owner}: fraction must be a float in (0, 1] or None (= the mask's own area), got {fraction!r}"
        )
    return float(fraction)




def mask_iou(
    attributions: Tensor,
    masks: Tensor,
    *,
    binarization: Literal["topk", "otsu"] = "topk",
    fraction: float | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Intersection over union of the binarised map with the mask, per sample: ``Tensor[B]``.

    The evaluation protocol of Oramas et al., "Visual Explanation by Interpretation: Improving Visual Feedback
    Capabilities of Deep Neural Networks", ICLR 2019: binarise the heatmap, then IoU with the ground truth.

    Binarisation (see :func:`binarize_heatmap`): ``"topk"`` keeps the top ``fraction`` of pixels by signed
    relevance; by default (``fraction=None``) that fraction is **the mask's own area**, so a perfect map scores
    1 and no threshold needs tuning. ``"otsu"`` uses Otsu's threshold of each map. Empty masks give ``NaN``.

    **Ties** at the top-``k`` boundary are scored by their expected value: the IoU averaged over every way of
    choosing the tied pixels (exactly, by the hypergeometric distribution), never by their position. A constant
    map thus scores the IoU of a random selection of ``k`` pixels, wherever the mask lies.

    **Padding** (``valid``): only valid positions are ever kept, ``fraction`` is a fraction of the valid
    positions, and Otsu's threshold is that of the valid values.
    """
    check_choice("binarization", binarization, _BINARIZATIONS, owner="mask_iou")
    fraction = _check_fraction(fraction, "mask_iou")
    heat, mask, valid = _located(attributions, masks, valid)
    area = mask.flatten(1).sum(dim=1)
    if binarization == "topk":
        n = torch.full_like(area, mask[0].numel()) if valid is None else valid.flatten(1).sum(dim=1)
        k = area if fraction is None else torch.round(n.double() * fraction).long()
        inside, tied, tied_inside, draws = _top_k_split(_ranked_heat(heat, valid), mask, k)
        total = (k + area).double().cpu()

        def iou_of(i: int, inter: Tensor) -> Tensor:
            return inter / (total[i] - inter).clamp_min(1)

        iou = _hypergeometric_mean(iou_of, inside, tied, tied_inside, draws)
    elif valid is None:
        binary = binarize_heatmap(heat, binarization)
        inter = (binary & mask).flatten(1).sum(dim=1).double()
        union = (binary | mask).flatten(1).sum(dim=1).double()
        iou = inter / union.clamp_min(1)
    else:  # Otsu's threshold of each map's valid values (a few scalars per sample)
        thresholds = [
            otsu_threshold(heat[i][valid[i]].view(1, -1))[0] if bool(valid[i].any()) else torch.tensor(0.0)
            for i in range(heat.shape[0])
        ]
        thr = torch.stack(thresholds).to(heat.device).view(-1, *([1] * (heat.ndim - 1)))
        binary = (heat.double() > thr) & valid
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

    ``update(attributions, masks, valid=None)``. Empty masks are excluded and counted in ``num_excluded``.
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
        check_choice("binarization", binarization, _BINARIZATIONS, owner=type(self).__name__)
        if binarization == "otsu" and fraction is not None:
            raise ValueError("fraction only applies to binarization='topk'")
        self.binarization = binarization
        self.fraction = _check_fraction(fraction, type(self).__name__)

    def update(self, attributions: Tensor, masks: Tensor, valid: Tensor | None = None) -> None:
        self._accumulate(
            mask_iou(attributions, masks, binarization=self.binarization, fraction=self.fraction, valid=valid)
        )


# --------------------------------------------------------------------------------------------------------------
# Relevance mass and rank accuracy (Arras et al. 2022)
# --------------------------------------------------------------------------------------------------------------


def relevance_mass(attributions: Tensor, masks: Tensor, *, valid: Tensor | None = None) -> Tensor:
    """Relevance mass accuracy (Arras, Osman & Samek, "CLEVR-XAI", Information Fusion 2022), per sample.

    The share of the **positive** relevance that falls inside the mask: ``sum(R+ in mask) / sum(R+)`` in
    [0, 1], with ``R+ = max(R, 0)`` of the channel-summed map. Undefined (``NaN``, excluded) when the mask is
    empty or the map has no positive relevance. Only ``valid`` positions carry mass (padding excluded).
    """
    heat, mask, valid = _located(attributions, masks, valid)
    pos = heat.clamp_min(0).double().flatten(1)
    if valid is not None:
        pos = pos * valid.flatten(1)
    total = pos.sum(dim=1)
    inside = (pos * mask.flatten(1)).sum(dim=1)
    undefined = (total <= 0) | ~mask.flatten(1).any(dim=1)
    mass = inside / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(undefined, torch.full_like(mass, float("nan")), mass).float()


def relevance_rank(attributions: Tensor, masks: Tensor, *, valid: Tensor | None = None) -> Tensor:
    """Relevance rank accuracy (Arras, Osman & Samek, "CLEVR-XAI", Information Fusion 2022), per sample.

    With ``K`` = the number of mask pixels: the fraction of the ``K`` highest-relevance pixels (signed values)
    that lie inside the mask, in [0, 1]. Pixels tied at the top-``K`` boundary count by their expected value
    (each tied pixel is in the top ``K`` with the same probability), never by position: a constant map scores
    the mask's share of the image, wherever the mask lies. Empty masks give ``NaN`` (excluded). Positions
    outside ``valid`` are never ranked into the top ``K``.
    """
    heat, mask, valid = _located(attributions, masks, valid)
    k = mask.flatten(1).sum(dim=1)
    inside, tied, tied_inside, draws = _top_k_split(_ranked_heat(heat, valid), mask, k)
    expected = inside + draws * tied_inside / tied.clamp_min(1)
    rank = expected / k.clamp_min(1)
    return torch.where(k == 0, torch.full_like(rank, float("nan")), rank).float()


class RelevanceMass(PerSampleMeanMetric):
    """Mean relevance mass accuracy (Arras et al., Information Fusion 2022); see :func:`relevance_mass`.

    ``update(attributions, masks, valid=None)``. Empty masks and maps without positive relevance are excluded
    and counted.
    """

    higher_is_better = True

    def update(self, attributions: Tensor, masks: Tensor, valid: Tensor | None = None) -> None:
        self._accumulate(relevance_mass(attributions, masks, valid=valid))


class RelevanceRank(PerSampleMeanMetric):
    """Mean relevance rank accuracy (Arras et al., Information Fusion 2022); see :func:`relevance_rank`.

    ``update(attributions, masks, valid=None)``. Empty masks are excluded and counted.
    """

    higher_is_better = True

    def update(self, attributions: Tensor, masks: Tensor, valid: Tensor | None = None) -> None:
        self._accumulate(relevance_rank(attributions, masks, valid=valid))
