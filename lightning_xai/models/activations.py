"""Activations of a frozen model's layer as training data (moved to :mod:`lightning_xai.data.activations` and
:mod:`lightning_xai.data.activation_source`; this module re-exports the names from their former path)."""

from lightning_xai.data.activation_source import (
    CACHE_DTYPES,
    SPATIAL_MODES,
    ActivationBatch,
    ActivationSource,
    as_activation_batch,
    find_activation_source,
    load_weights,
    model_fingerprint,
)
from lightning_xai.data.activations import ActivationCache, ActivationDataModule, CachedActivationBatches

__all__ = [
    "CACHE_DTYPES",
    "SPATIAL_MODES",
    "ActivationBatch",
    "ActivationCache",
    "ActivationDataModule",
    "ActivationSource",
    "CachedActivationBatches",
    "as_activation_batch",
    "find_activation_source",
    "load_weights",
    "model_fingerprint",
]
