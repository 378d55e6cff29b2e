"""Similarity between explanations: rank correlation of heatmaps.

Used for explanation drift between epochs (``ExplanationMonitor``) and by the model-randomisation sanity check
(Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018), which compares maps by Spearman rank
correlation with and without absolute values.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pearson_correlation", "rank_data", "spearman_correlation"]


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
