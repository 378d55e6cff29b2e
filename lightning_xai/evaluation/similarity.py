"""Similarity between explanations: rank correlation, SSIM and HOG-feature correlation of heatmaps.

Used for explanation drift between epochs (``ExplanationMonitor``) and by the model-randomisation sanity check
(Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018), which compares maps by Spearman rank
correlation with and without absolute values, by the structural similarity index (SSIM) and by the Pearson
correlation of histogram-of-oriented-gradients (HOG) features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hog_features", "hog_pearson", "pearson_correlation", "rank_data", "spearman_correlation", "ssim"]


def rank_data(values: Tensor) -> Tensor:
    """Rank each row of ``values [B, N]`` (0-based), giving tied values their average rank.

    Ties matter for heatmaps: a ReLU-ed Grad-CAM map is often zero over most pixels, and breaking those ties
    arbitrarily would make two identical maps look dissimilar.
    """
    if values.ndim != 2:
        raise ValueError(f"rank_data expects a [B, N] tensor, got shape {list(values.shape)}")
    values = values.double()
    sorted_values, order = values.sort(dim=1)
    first = torch.searchsorted(sorted_values, sorted_values, right=False)
    last = torch.searchsorted(sorted_values, sorted_values, right=True)
    avg = (first + last - 1).double() / 2.0
    ranks = torch.empty_like(avg)
    ranks.scatter_(1, order, avg)
    return ranks


def pearson_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample Pearson correlation of two batches, flattened per sample: ``Tensor[B]`` (float64).

    A sample where either map is constant has no defined correlation and gives ``NaN``; callers exclude and
    count such samples rather than averaging a silent NaN.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot correlate maps of different shapes {list(a.shape)} and {list(b.shape)}")
    x = a.reshape(a.shape[0], -1).double()
    y = b.reshape(b.shape[0], -1).double()
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    denom = x.norm(dim=1) * y.norm(dim=1)
    corr = (x * y).sum(dim=1) / denom
    return torch.where(denom > 0, corr, torch.full_like(corr, float("nan")))


def spearman_correlation(a: Tensor, b: Tensor, *, absolute: bool = False) -> Tensor:
    """Per-sample Spearman rank correlation of two batches of maps ``[B, ...]``: ``Tensor[B]`` (float64).

    With ``absolute=True`` the maps are compared by magnitude (``|a|`` vs ``|b|``), as in Adebayo et al. 2018.
    Tied values get their average rank. Samples with a constant map give ``NaN`` (see
    :func:`pearson_correlation`).
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot correlate maps of different shapes {list(a.shape)} and {list(b.shape)}")
    x = a.detach().reshape(a.shape[0], -1)
    y = b.detach().reshape(b.shape[0], -1)
    if absolute:
        x, y = x.abs(), y.abs()
    return pearson_correlation(rank_data(x), rank_data(y))


def _as_image_batch(maps: Tensor, name: str) -> Tensor:
    """``[B, H, W]`` or ``[B, C, H, W]`` -> float64 ``[B, C, H, W]``."""
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if maps.ndim == 3:
        maps = maps.unsqueeze(1)
    if maps.ndim != 4:
        raise ValueError(f"{name} must have shape [B, H, W] or [B, C, H, W], got {list(maps.shape)}")
    return maps.detach().double()


def ssim(
    a: Tensor,
    b: Tensor,
    *,
    data_range: float | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity index of two batches of maps (Wang, Bovik, Sheikh & Simoncelli, "Image
    Quality Assessment: From Error Visibility to Structural Similarity", IEEE TIP 2004): ``Tensor[B]`` (float64).

    Local statistics use a normalised Gaussian window of ``window_size`` (odd) and ``sigma`` (the paper's 11 and
    1.5), evaluated only where the window fits inside the map ("valid" positions, no padding), with population
    (not sample) covariances; ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``. Maps are ``[B, H, W]`` or ``[B, C, H, W]``
    (the mean runs over channels too). ``data_range`` ``L`` defaults to each pair's joint value range
    ``max(a, b) - min(a, b)`` (1 where that is 0). ``ssim(x, x) = 1``; values lie in [-1, 1].
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of different shapes {list(a.shape)} and {list(b.shape)}")
    x, y = _as_image_batch(a, "a"), _as_image_batch(b, "b")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    _, c, h, w = x.shape
    if min(h, w) < window_size:
        raise ValueError(f"maps of size {h}x{w} are smaller than the SSIM window {window_size}; pass a smaller one")
    if data_range is None:
        flat = torch.cat([x.flatten(1), y.flatten(1)], dim=1)
        rng = flat.max(dim=1).values - flat.min(dim=1).values
        rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    else:
        if not data_range > 0:
            raise ValueError(f"data_range must be positive, got {data_range!r}")
        rng = torch.full((x.shape[0],), float(data_range), dtype=torch.float64, device=x.device)
    r = torch.arange(window_size, dtype=torch.float64, device=x.device) - window_size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel_w = g.view(1, 1, 1, -1).expand(c, 1, 1, window_size)
    kernel_h = g.view(1, 1, -1, 1).expand(c, 1, window_size, 1)

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, kernel_w, groups=c), kernel_h, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1 = ((k1 * rng) ** 2).view(-1, 1, 1, 1)
    c2 = ((k2 * rng) ** 2).view(-1, 1, 1, 1)
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def hog_features(maps: Tensor, *, cell_size: int = 8, bins: int = 9) -> Tensor:
    """Simplified HOG features (Dalal & Triggs, "Histograms of Oriented Gradients for Human Detection",
    CVPR 2005) of single-channel maps ``[B, H, W]`` or ``[B, 1, H, W]``: ``Tensor[B, cells_y, cells_x, bins]``.

    Gradients are central differences ``[-1, 0, 1]`` (zero on the border rows / columns); each pixel votes its
    gradient magnitude into one of ``bins`` unsigned-orientation bins of equal width over [0, 180) degrees
    (0 = gradient along the width axis, i.e. a vertical edge), in non-overlapping ``cell_size`` x ``cell_size``
    cells (a remainder at the right / bottom is dropped). Histograms are averaged over the cell; there is no
    block normalisation (Pearson correlation of the features is scale-invariant anyway).
    """
    x = _as_image_batch(maps, "maps")
    if x.shape[1] != 1:
        raise ValueError(f"hog_features expects single-channel maps, got {x.shape[1]} channels")
    for name, value, minimum in (("cell_size", cell_size, 1), ("bins", bins, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    x = x[:, 0]
    bsz, h, w = x.shape
    cy, cx = h // cell_size, w // cell_size
    if cy == 0 or cx == 0:
        raise ValueError(f"maps of size {h}x{w} are smaller than one HOG cell of {cell_size}x{cell_size}")
    gx = torch.zeros_like(x)
    gy = torch.zeros_like(x)
    gx[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    gy[:, 1:-1, :] = x[:, 2:, :] - x[:, :-2, :]
    magnitude = torch.sqrt(gx**2 + gy**2)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    index = (angle / (180.0 / bins)).floor().long().clamp_(0, bins - 1)
    magnitude = magnitude[:, : cy * cell_size, : cx * cell_size]
    index = index[:, : cy * cell_size, : cx * cell_size]
    rows = torch.arange(cy * cell_size, device=x.device) // cell_size
    cols = torch.arange(cx * cell_size, device=x.device) // cell_size
    cell = (rows.view(-1, 1) * cx + cols.view(1, -1)).expand(bsz, -1, -1)
    slot = (cell * bins + index).reshape(bsz, -1)
    hist = torch.zeros(bsz, cy * cx * bins, dtype=torch.float64, device=x.device)
    hist.scatter_add_(1, slot, magnitude.reshape(bsz, -1))
    return hist.view(bsz, cy, cx, bins) / (cell_size * cell_size)


def hog_pearson(a: Tensor, b: Tensor, *, cell_size: int = 8, bins: int = 9) -> Tensor:
    """Pearson correlation of the :func:`hog_features` of two batches of maps, ``Tensor[B]`` (float64).

    ``NaN`` where either map has constant HOG features (e.g. a constant map), as in
    :func:`pearson_correlation`.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of different shapes {list(a.shape)} and {list(b.shape)}")
    return pearson_correlation(
        hog_features(a, cell_size=cell_size, bins=bins), hog_features(b, cell_size=cell_size, bins=bins)
    )
