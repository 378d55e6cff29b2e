"""Complexity of explanations: how concentrated is the relevance?

A concise explanation puts its relevance on few pixels. Sparseness measures this with the Gini index of the
absolute attribution, as proposed by Chalasani, Chen, Chowdhury, Wu & Jha, "Concise Explanations of Neural
Networks using Adversarial Training", ICML 2020, using the Gini index of Hurley & Rickard, "Comparing Measures
of Sparsity", IEEE Trans. Information Theory 2009. Token maps ``[B, T]`` are scored over their real tokens
(``valid=``, padding excluded), as the localisation metrics score them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai.evaluation.base import PerSampleMeanMetric, as_token_rows, mask_batch, scored_heat

__all__ = ["Sparseness", "gini_index", "sparseness"]


def gini_index(values: Tensor, valid: Tensor | None = None) -> Tensor:
    """Gini index of each row of non-negative ``values [B, N]``: ``Tensor[B]`` (float64).

    With the row sorted ascending, ``a_(1) <= ... <= a_(N)``::

        G = 1 - 2 * sum_k (a_(k) / ||a||_1) * (N - k + 1/2) / N

    ``G = 0`` for a constant row, ``G = 1 - 1/N`` for a one-hot row (the maximum). An all-zero row has no
    defined Gini index and gives ``NaN``. ``valid`` (bool ``[B, N]``, ``False`` = padding) restricts each row to
    its valid entries: the index is that of the valid entries alone (``N`` = their number), and a row without a
    valid entry gives ``NaN``.
    """
    if values.ndim != 2:
        raise ValueError(f"gini_index expects a [B, N] tensor, got shape {list(values.shape)}")
    if valid is not None and (not isinstance(valid, Tensor) or valid.shape != values.shape):
        shape = list(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(
            f"gini_index: valid must be a bool tensor of the values' shape {list(values.shape)}, got {shape}"
        )
    keep = None if valid is None else valid.to(device=values.device, dtype=torch.bool)
    if bool((values < 0).any() if keep is None else (values[keep] < 0).any()):
        raise ValueError("gini_index expects non-negative values; pass the absolute attribution")
    a = values.double()
    if keep is None:
        a = a.sort(dim=1).values
        n = torch.full((a.shape[0], 1), float(a.shape[1]), dtype=torch.float64, device=a.device)
        pad = torch.zeros_like(n)
    else:  # padding sorts first (as -1) and is skipped: valid entry k of a row of n sits at column pad + k
        a = a.masked_fill(~keep, -1.0).sort(dim=1).values
        n = keep.sum(dim=1, keepdim=True).double()
        pad = a.shape[1] - n
        a = a.clamp(min=0.0)
    k = torch.arange(1, a.shape[1] + 1, device=a.device, dtype=torch.float64) - pad  # rank among the valid entries
    weights = torch.where(k >= 1, (n - k + 0.5) / n.clamp(min=1.0), torch.zeros_like(k))
    total = a.sum(dim=1, keepdim=True)
    gini = 1.0 - 2.0 * ((a / torch.where(total > 0, total, torch.ones_like(total))) * weights).sum(dim=1)
    return torch.where(total.squeeze(1) > 0, gini, torch.full_like(gini, float("nan")))


def sparseness(attributions: Tensor, valid: Tensor | None = None) -> Tensor:
    """Sparseness of each map: the Gini index of ``|R|`` with ``R`` the channel-summed map, ``Tensor[B]``.

    In [0, 1 - 1/(H*W)]: 0 for a uniform map, ``1 - 1/(H*W)`` when all relevance sits on one pixel. An
    all-zero map gives ``NaN`` (excluded by :class:`Sparseness`).

    **Token maps and padding.** Token attributions ``[B, T]`` are scored with ``valid`` (bool ``[B, T]``: ``True`` at
    the tokens, ``False`` at padding), as the localisation metrics score them: the index is that of the real
    tokens only (``N`` = their number), so padding neither dilutes nor concentrates the relevance. ``valid`` may
    also mark the positions of image maps (``[B, H, W]`` or ``[B, 1, H, W]``).
    """
    heat, tokens = scored_heat(attributions, valid)
    if tokens:
        valid = as_token_rows(valid)
    keep = None if valid is None else mask_batch(valid, heat, name="valid").flatten(1)
    return gini_index(heat.abs().flatten(1), keep).float()


class Sparseness(PerSampleMeanMetric):
    """Mean Gini index of the absolute attribution maps (Chalasani et al., ICML 2020); see :func:`sparseness`.

    ``update(attributions, valid=None)`` (``valid``: the positions that take part, ``False`` = padding; needed for
    token maps ``[B, T]``). All-zero maps are excluded and counted in ``num_excluded``. With
    ``return_per_sample=True`` :meth:`compute` returns the per-sample values instead of the mean.
    """

    higher_is_better = True

    def update(self, attributions: Tensor, valid: Tensor | None = None) -> None:
        self._accumulate(sparseness(attributions, valid))
