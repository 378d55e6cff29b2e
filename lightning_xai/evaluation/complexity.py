"""Complexity of explanations: how concentrated is the relevance?

A concise explanation puts its relevance on few pixels. Sparseness measures this with the Gini index of the
absolute attribution, as proposed by Chalasani, Chen, Chowdhury, Wu & Jha, "Concise Explanations of Neural
Networks using Adversarial Training", ICML 2020, using the Gini index of Hurley & Rickard, "Comparing Measures
of Sparsity", IEEE Trans. Information Theory 2009.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai.evaluation.localization import PerSampleMeanMetric, heatmap_batch

__all__ = ["Sparseness", "gini_index", "sparseness"]


def gini_index(values: Tensor) -> Tensor:
    """Gini index of each row of non-negative ``values [B, N]``: ``Tensor[B]`` (float64).

    With the row sorted ascending, ``a_(1) <= ... <= a_(N)``::

        G = 1 - 2 * sum_k (a_(k) / ||a||_1) * (N - k + 1/2) / N

    ``G = 0`` for a constant row, ``G = 1 - 1/N`` for a one-hot row (the maximum). An all-zero row has no
    defined Gini index and gives ``NaN``.
    """
    if values.ndim != 2:
        raise ValueError(f"gini_index expects a [B, N] tensor, got shape {list(values.shape)}")
    if bool((values < 0).any()):
        raise ValueError("gini_index expects non-negative values; pass the absolute attribution")
    a = values.double().sort(dim=1).values
    n = a.shape[1]
    total = a.sum(dim=1, keepdim=True)
    k = torch.arange(1, n + 1, device=a.device, dtype=torch.float64)
    weights = (n - k + 0.5) / n
    gini = 1.0 - 2.0 * ((a / torch.where(total > 0, total, torch.ones_like(total))) * weights).sum(dim=1)
    return torch.where(total.squeeze(1) > 0, gini, torch.full_like(gini, float("nan")))


def sparseness(attributions: Tensor) -> Tensor:
    """Sparseness of each map: the Gini index of ``|R|`` with ``R`` the channel-summed map, ``Tensor[B]``.

    In [0, 1 - 1/(H*W)]: 0 for a uniform map, ``1 - 1/(H*W)`` when all relevance sits on one pixel. An
    all-zero map gives ``NaN`` (excluded by :class:`Sparseness`).
    """
    heat = heatmap_batch(attributions)
    return gini_index(heat.abs().flatten(1)).float()


class Sparseness(PerSampleMeanMetric):
    """Mean Gini index of the absolute attribution maps (Chalasani et al., ICML 2020); see :func:`sparseness`.

    ``update(attributions)``. All-zero maps are excluded and counted in ``num_excluded``. With
    ``return_per_sample=True`` :meth:`compute` returns the per-sample values instead of the mean.
    """

    higher_is_better = True

    def update(self, attributions: Tensor) -> None:
        self._accumulate(sparseness(attributions))
