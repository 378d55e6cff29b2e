"""Thin Lightning adapters: pick probe data, call the layers below, gather across ranks, log."""

from lightning_xai.callbacks.explanation_monitor import ExplanationMonitor
from lightning_xai.callbacks.probe import ProbeBatch, ProbeSet, split_sample
from lightning_xai.callbacks.quality import QUALITY_METRICS, ExplanationQuality, SanityCheck

__all__ = [
    "QUALITY_METRICS",
    "ExplanationMonitor",
    "ExplanationQuality",
    "ProbeBatch",
    "ProbeSet",
    "SanityCheck",
    "split_sample",
]
