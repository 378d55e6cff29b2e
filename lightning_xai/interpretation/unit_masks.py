"""Unit masks of network dissection (Bau et al., CVPR 2017): a unit's map upsampled to the concept masks' size and
thresholded, ``M_k(x) = upsample(A_k(x)) > T_k``; their overlap counts with the concept masks, which the IoU is
made of; and their rendering on the images.

The counting is the inner loop of :class:`~lightning_xai.interpretation.dissection.NetworkDissection`'s second
pass; :func:`threshold_maps` is the same mask for the few units that are rendered or explained compositionally.
Pure torch (and NumPy for the pictures); no hooks, no state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_xai.interpretation.layer_maps import ROUNDING_MARGIN, upsample_bilinear
from lightning_xai.viz.render import overlay

__all__ = ["count_overlaps", "mask_overlay", "threshold_maps"]


def threshold_maps(maps: Tensor, thresholds: Tensor, size: tuple[int, int]) -> Tensor:
    """``BoolTensor[B, U, *size]``: unit maps ``[B, U, h, w]`` upsampled bilinearly to ``size``
    (:func:`~lightning_xai.interpretation.layer_maps.upsample_bilinear`) and compared with one threshold per unit
    (strictly greater)."""
    up = upsample_bilinear(maps.float(), (int(size[0]), int(size[1])))
    return up > thresholds.to(up.device).view(1, -1, 1, 1)


def count_overlaps(
    acts: Tensor, masks: Tensor, thresholds: Tensor, chunk_elements: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(|M_k & L_c| [U, C], |M_k| [U], |L_c| [C])`` of one batch of unit maps ``acts [B, U, h, w]`` and concept
    masks ``masks [B, C, H, W]`` (nonzero = present), at the masks' resolution.

    Only maps that can exceed their threshold are upsampled: bilinear interpolation is a convex combination, so
    a map whose maximum is below ``T_k`` (by more than the rounding of ``upsample_bilinear``) has an empty mask.
    With a top-0.5% threshold that skips most maps. The candidates are upsampled in chunks of at most
    ``chunk_elements`` values and counted image by image with one small matrix product each; the counts are exact
    integers (float64 products once an image has 2**24 positions).
    """
    units = acts.shape[1]
    size = (int(masks.shape[-2]), int(masks.shape[-1]))
    positions = size[0] * size[1]
    dtype = torch.float32 if positions < 2**24 else torch.float64  # exact per-image integer sums
    concepts = masks.to(acts.device).flatten(2)
    concepts = (concepts if concepts.dtype == torch.bool else concepts != 0).to(dtype)  # [B, C, HW]
    concept_area = concepts.sum(dim=(0, 2)).to(torch.int64)
    intersection = torch.zeros(concepts.shape[1], units, dtype=torch.int64, device=acts.device)
    area = torch.zeros(units, dtype=torch.int64, device=acts.device)
    flat = acts.float().flatten(2)
    top, magnitude = flat.amax(dim=2), flat.abs().amax(dim=2)
    t = thresholds.to(acts.device)
    image, unit = torch.nonzero(top >= t[None, :] - ROUNDING_MARGIN * magnitude, as_tuple=True)
    step = max(1, chunk_elements // positions)
    for start in range(0, image.shape[0], step):
        b, u = image[start : start + step], unit[start : start + step]
        fires = upsample_bilinear(acts[b, u].float(), size).flatten(1).gt_(t[u][:, None]).to(dtype)  # [P, HW]
        area.index_add_(0, u, fires.sum(dim=1).to(torch.int64))
        # candidates come in image order: one product per image, concepts [C, HW] x fires [HW, n]
        images, counts = torch.unique_consecutive(b, return_counts=True)
        offset = 0
        for i, n in zip(images.tolist(), counts.tolist()):
            rows = slice(offset, offset + n)
            product = concepts[i] @ fires[rows].T
            intersection.index_add_(1, u[rows], product.to(torch.int64))
            offset += n
    return intersection.T, area, concept_area


def mask_overlay(
    images: Tensor,
    masks: Tensor,
    *,
    alpha: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Binary unit masks ``[n, 1, H, W]`` drawn on ``images [n, C, H, W]``: the warm end of the colour map of
    :func:`lightning_xai.viz.render.overlay` (weight ``alpha``) inside the mask, the plain grayscale image outside
    it (whatever colour the map gives to zero). ``uint8 [n, H, W, 3]``."""
    kwargs = {"signed": False, "percentile": 100.0, "mean": mean, "std": std}
    images, masks = images.detach().cpu(), masks.detach().cpu().float()
    coloured = overlay(images, masks, alpha=alpha, **kwargs)
    plain = overlay(images, masks, alpha=0.0, **kwargs)
    inside = masks.reshape(coloured.shape[0], *coloured.shape[1:3], 1).numpy() > 0.5
    return np.where(inside, coloured, plain)
