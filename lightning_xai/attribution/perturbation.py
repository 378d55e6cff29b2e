"""Perturbation attributors (kept importable from here for backwards compatibility).

The methods live one family per module: :mod:`~lightning_xai.attribution.occlusion` (Occlusion),
:mod:`~lightning_xai.attribution.rise` (RISE), :mod:`~lightning_xai.attribution.surrogate` (LIME, KernelSHAP),
:mod:`~lightning_xai.attribution.meaningful_perturbation` (MeaningfulPerturbation) and
:mod:`~lightning_xai.attribution.prediction_difference` (PredictionDifference); what they share (chunked
evaluation of perturbed inputs, windows, baselines, seeded generators) is in
:mod:`~lightning_xai.attribution.perturbing`. This module only re-exports them.
"""

from __future__ import annotations

from lightning_xai.attribution.filters import gaussian_blur
from lightning_xai.attribution.meaningful_perturbation import MeaningfulPerturbation
from lightning_xai.attribution.occlusion import Occlusion
from lightning_xai.attribution.prediction_difference import PredictionDifference
from lightning_xai.attribution.regression import lasso_selection as _lasso_selection
from lightning_xai.attribution.regression import weighted_ridge as _weighted_ridge
from lightning_xai.attribution.rise import RISE
from lightning_xai.attribution.surrogate import LIME, KernelSHAP, SegmentExplanation

__all__ = [
    "LIME",
    "RISE",
    "KernelSHAP",
    "MeaningfulPerturbation",
    "Occlusion",
    "PredictionDifference",
    "SegmentExplanation",
    "gaussian_blur",
]

# private names that older code and tests imported from here
_PRIVATE = (_lasso_selection, _weighted_ridge)
