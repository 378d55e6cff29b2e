"""Sparse-autoencoder metrics (torchmetrics, DDP-reduced): reconstruction quality and downstream loss.

* :class:`SAEReconstructionMetrics` - ``l0``, fraction of variance unexplained (and explained variance, its
  complement), normalised MSE and the fraction
  of dead latents (Bricken et al., "Towards Monosemanticity", 2023; Gao et al., "Scaling and evaluating sparse
  autoencoders", 2024).
* :class:`DownstreamScore` - the frozen model's cross-entropy with the layer's own output, with the SAE
  reconstruction spliced in and with the layer zero-ablated, and the score
  ``(ce_zero - ce_sae) / (ce_zero - ce_orig)`` (NaN with a warning when zero-ablation does not hurt).

Pure torch and torchmetrics: no Lightning import. Re-exported by :mod:`lightning_xai.models.sae`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["DownstreamScore", "SAEReconstructionMetrics"]


class SAEReconstructionMetrics(Metric):
    """``l0``, ``fvu`` (centred), ``explained_variance`` (``1 - fvu``), ``nmse`` and ``dead_fraction`` over all
    updated vectors (module docstring).

    States are sums (float64) reduced over processes, so the result equals a single-process evaluation.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, d_in: int, d_sae: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("active", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fired", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor) -> None:
        x64, x_hat64 = x.detach().double(), x_hat.detach().double()
        self.sse += (x64 - x_hat64).square().sum()
        self.sum_sq += x64.square().sum()
        self.sum_x += x64.sum(dim=0)
        self.n += x.shape[0]
        nonzero = latents.detach() != 0
        self.active += nonzero.sum()
        self.fired += nonzero.sum(dim=0)

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1.0)
        variance = self.sum_sq - self.sum_x.square().sum() / n
        return {
            "l0": self.active / n,
            "fvu": self.sse / variance,
            "explained_variance": 1.0 - self.sse / variance,
            "nmse": self.sse / self.sum_sq,
            "dead_fraction": (self.fired == 0).double().mean(),
        }


class DownstreamScore(Metric):
    """Mean cross-entropy / accuracy of the frozen model with the layer's own output, the SAE reconstruction
    spliced in, and the layer zero-ablated; ``downstream_score = (ce_zero - ce_sae) / (ce_zero - ce_orig)``, the
    fraction of the loss that zero-ablation adds which the SAE recovers ("loss recovered")."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("ce_orig", "ce_sae", "ce_zero", "correct_orig", "correct_sae", "n"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits_orig: Tensor, logits_sae: Tensor, logits_zero: Tensor, labels: Tensor) -> None:
        labels = labels.long()
        for name, logits in (("ce_orig", logits_orig), ("ce_sae", logits_sae), ("ce_zero", logits_zero)):
            setattr(self, name, getattr(self, name) + F.cross_entropy(logits.double(), labels, reduction="sum"))
        self.correct_orig += (logits_orig.argmax(dim=1) == labels).sum()
        self.correct_sae += (logits_sae.argmax(dim=1) == labels).sum()
        self.n += labels.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1.0)
        ce_orig, ce_sae, ce_zero = self.ce_orig / n, self.ce_sae / n, self.ce_zero / n
        gap = ce_zero - ce_orig
        if float(gap) > 0.0:
            score = (ce_zero - ce_sae) / gap
        else:
            # zero-ablating the layer does not hurt (or helps): the score has no scale (it could exceed 1)
            if int(self.n) > 0:
                warnings.warn(
                    f"DownstreamScore: zero-ablating the layer does not increase the cross-entropy (ce_zero "
                    f"{float(ce_zero):.4g} <= ce_orig {float(ce_orig):.4g}): downstream_score is NaN",
                    stacklevel=2,
                )
            score = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "ce_orig": ce_orig,
            "ce_sae": ce_sae,
            "ce_zero": ce_zero,
            "acc_orig": self.correct_orig / n,
            "acc_sae": self.correct_sae / n,
            "downstream_score": score,
        }

