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

from lightning_xai.checks import check_choice, check_int

__all__ = [
    "hog_descriptor",
    "hog_features",
    "hog_pearson",
    "pearson_correlation",
    "rank_data",
    "spearman_correlation",
    "ssim",
]

#: The block normalisations of :func:`hog_descriptor` (those of Dalal & Triggs 2005 and scikit-image).
HOG_BLOCK_NORMS = ("L2-Hys", "L2", "L1", "L1-sqrt")


def check_finite_maps(*maps: Tensor, names: tuple[str, ...] = ("a", "b")) -> None:
    """Raise a ``ValueError`` naming the samples if any map holds ``NaN``/``inf``: a similarity of a broken map
    is meaningless (a ``NaN`` pixel would otherwise be ranked as the maximum, or turn the value into ``NaN``)."""
    for name, m in zip(names, maps, strict=False):
        if not isinstance(m, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
        if m.ndim == 0 or m.shape[0] == 0:
            continue
        finite = torch.isfinite(m.reshape(m.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"{name} contains NaN or inf values (samples {bad}); cannot compare such maps")


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
    check_finite_maps(a, b)
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
    :func:`pearson_correlation`); ``NaN``/``inf`` values raise a ``ValueError`` naming the samples.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot correlate maps of different shapes {list(a.shape)} and {list(b.shape)}")
    check_finite_maps(a, b)
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
    ``max(a, b) - min(a, b)`` (1 where that is 0). ``ssim(x, x) = 1``; values lie in [-1, 1]. ``NaN``/``inf``
    values raise a ``ValueError`` naming the samples.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of different shapes {list(a.shape)} and {list(b.shape)}")
    x, y = _as_image_batch(a, "a"), _as_image_batch(b, "b")
    check_finite_maps(x, y)
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
    cells (a remainder at the right / bottom is dropped). Histograms are averaged over the cell. These are the
    cell histograms of ``skimage.feature.hog`` before block normalisation; :func:`hog_descriptor` adds it.
    """
    x = _as_image_batch(maps, "maps")
    check_finite_maps(x, names=("maps",))
    if x.shape[1] != 1:
        raise ValueError(f"hog_features expects single-channel maps, got {x.shape[1]} channels")
    check_int("cell_size", cell_size, minimum=1, owner="hog_features")
    check_int("bins", bins, minimum=1, owner="hog_features")
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


def hog_descriptor(
    maps: Tensor,
    *,
    cell_size: int = 8,
    block_size: int = 3,
    block_norm: str = "L2-Hys",
    bins: int = 9,
    eps: float = 1e-5,
) -> Tensor:
    """HOG descriptor (Dalal & Triggs, CVPR 2005) of single-channel maps ``[B, H, W]``: the
    :func:`hog_features` cell histograms, grouped into overlapping ``block_size`` x ``block_size`` blocks of
    cells (stride one cell) and normalised per block, ``Tensor[B, blocks_y, blocks_x, block_size, block_size,
    bins]`` - the feature vector of ``skimage.feature.hog(..., orientations=bins, pixels_per_cell=(cell_size,
    cell_size), cells_per_block=(block_size, block_size), block_norm=block_norm)``, the HOG that Adebayo et al.
    (NeurIPS 2018) compare saliency maps with.

    Block normalisation is local (each block is scaled by its own norm), so it changes the correlation of two
    descriptors; it is not a global rescaling. Norms, with ``v`` a block and ``eps`` = 1e-5: ``"L1"``
    ``v / (|v|_1 + eps)``; ``"L1-sqrt"`` its square root; ``"L2"`` ``v / sqrt(|v|_2^2 + eps^2)``; ``"L2-Hys"``
    L2, clipped at 0.2, then L2 again (the default, as in Dalal & Triggs and scikit-image).
    """
    check_choice("block_norm", block_norm, HOG_BLOCK_NORMS, owner="hog_descriptor")
    check_int("block_size", block_size, minimum=1, owner="hog_descriptor")
    cells = hog_features(maps, cell_size=cell_size, bins=bins)
    _, cy, cx, _ = cells.shape
    if cy < block_size or cx < block_size:
        raise ValueError(
            f"hog_descriptor: maps give {cy}x{cx} cells of {cell_size}x{cell_size} pixels, fewer than one block of "
            f"{block_size}x{block_size} cells; use smaller cells or blocks"
        )
    # [B, by, bx, bins, block, block] -> [B, by, bx, block_y, block_x, bins]
    blocks = cells.unfold(1, block_size, 1).unfold(2, block_size, 1).permute(0, 1, 2, 4, 5, 3)
    flat = blocks.reshape(*blocks.shape[:3], -1)
    if block_norm == "L1":
        flat = flat / (flat.abs().sum(-1, keepdim=True) + eps)
    elif block_norm == "L1-sqrt":
        flat = torch.sqrt(flat / (flat.abs().sum(-1, keepdim=True) + eps))
    else:
        flat = flat / torch.sqrt((flat**2).sum(-1, keepdim=True) + eps**2)
        if block_norm == "L2-Hys":
            flat = flat.clamp(max=0.2)
            flat = flat / torch.sqrt((flat**2).sum(-1, keepdim=True) + eps**2)
    return flat.view_as(blocks)


def hog_pearson(
    a: Tensor,
    b: Tensor,
    *,
    cell_size: int = 8,
    block_size: int = 3,
    block_norm: str = "L2-Hys",
    bins: int = 9,
) -> Tensor:
    """Pearson correlation of the :func:`hog_descriptor` of two batches of maps, ``Tensor[B]`` (float64): the
    HOG similarity of Adebayo et al. (NeurIPS 2018), who used scikit-image's HOG (8x8-pixel cells, 3x3-cell
    blocks, L2-Hys).

    Maps with fewer than ``block_size`` cells along a side use blocks of the cells that fit (1x1 blocks are
    per-cell normalisation). ``NaN`` where either map has constant HOG features (e.g. a constant map), as in
    :func:`pearson_correlation`; ``NaN``/``inf`` in a map raises a ``ValueError`` naming the samples.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of different shapes {list(a.shape)} and {list(b.shape)}")
    if isinstance(cell_size, int) and not isinstance(cell_size, bool) and cell_size >= 1:
        cells = min(a.shape[-2:]) // cell_size
        if cells >= 1 and isinstance(block_size, int) and not isinstance(block_size, bool):
            block_size = min(block_size, cells)
    kwargs = {"cell_size": cell_size, "block_size": block_size, "block_norm": block_norm, "bins": bins}
    return pearson_correlation(hog_descriptor(a, **kwargs), hog_descriptor(b, **kwargs))
