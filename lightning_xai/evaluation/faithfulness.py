"""Faithfulness metrics: does the explanation reflect what the model actually uses?

All metrics perturb the input guided by the attribution map and watch the model's score for the explained
class. Conventions shared by every function and metric here:

* **Inputs** are image batches ``[B, C, H, W]``; **attributions** ``[B, 1|C, H, W]`` (or ``[B, H, W]``) at the
  same spatial size, reduced to one signed relevance per pixel by summing channels. A pixel is perturbed in all
  channels at once. Maps with ``NaN``/``inf`` raise ``ValueError``. Deletion and insertion also take **token
  ids** ``LongTensor[B, T]`` with token maps ``[B, T]``: a removed token's id becomes ``mask_token`` (ids are
  never interpolated or cast to float) and ``pad_token`` positions are never touched nor counted (see
  :mod:`~lightning_xai.evaluation.deletion`).
* **Score** ``f(x)``: the model output for ``target`` (an int, a ``LongTensor[B]``, or a callable applied
  row-wise to the output, ``output -> Tensor[n]``), after a softmax over dim 1 when ``softmax=True``.
* **Model evaluation**: under ``torch.no_grad()`` in eval mode, every submodule's mode, ``requires_grad`` and
  ``.grad`` restored afterwards (:func:`~lightning_xai.attribution.base.model_state_guard`), also on error.
* **Bounded memory, no host round-trips**: all perturbed images of a batch (images x steps) are enumerated as
  one flat list of (image, step) pairs and evaluated in chunks of ``batch_size`` images per forward pass, each
  chunk mixing steps and images; the perturbed images are built on the inputs' device from a precomputed rank
  map (one comparison and one ``torch.where`` per chunk). Random perturbations are seeded per (image, sample)
  pair, so results depend neither on ``batch_size`` nor (for the metrics, which count the images they have
  seen) on how the data is split into ``update`` calls; pass ``sample_ids`` (the images' dataset indices) to
  ``update`` and they do not depend on how the data is sharded over DDP processes either.
* **Non-finite numbers** never become scores: ``NaN``/``inf`` in the inputs, the maps or the model's scores
  raise a ``ValueError`` naming the samples. A constant map orders no pixel before another: its area is
  ``NaN``, excluded from the metrics' means and counted in ``num_excluded``; ties in other maps are broken
  in a fixed pseudo-random order, never by position.

Metrics are :class:`torchmetrics.Metric` subclasses whose state is a sum and a count (``dist_reduce_fx="sum"``)
plus, for curve metrics, the per-sample curves (``"cat"``), so ``compute()`` is exact under DDP, also on a
rank that saw no data.

The functions and metrics live in :mod:`~lightning_xai.evaluation.deletion` (deletion / insertion, RISE),
:mod:`~lightning_xai.evaluation.region_perturbation` (AOPC) and :mod:`~lightning_xai.evaluation.infidelity`
(infidelity, max-sensitivity), on the engine of :mod:`~lightning_xai.evaluation.scoring`; this module gathers
them under their historical import path.
"""

from __future__ import annotations

# private names other modules imported from here before the split
from lightning_xai.evaluation.base import CurveMetric as _CurveMetric  # noqa: F401
from lightning_xai.evaluation.deletion import (
    DeletionAUC,
    InsertionAUC,
    deletion_auc,
    deletion_curve,
    gaussian_blur,
    insertion_auc,
    insertion_curve,
)
from lightning_xai.evaluation.infidelity import Infidelity, MaxSensitivity, infidelity, max_sensitivity
from lightning_xai.evaluation.region_perturbation import AOPC, aopc, region_perturbation_curve
from lightning_xai.evaluation.scoring import DEFAULT_STEPS, AttributorSpec
from lightning_xai.evaluation.scoring import resolve_attributor as _resolve_attributor  # noqa: F401

__all__ = [
    "AOPC",
    "DEFAULT_STEPS",
    "AttributorSpec",
    "DeletionAUC",
    "Infidelity",
    "InsertionAUC",
    "MaxSensitivity",
    "aopc",
    "deletion_auc",
    "deletion_curve",
    "gaussian_blur",
    "infidelity",
    "insertion_auc",
    "insertion_curve",
    "max_sensitivity",
    "region_perturbation_curve",
]
