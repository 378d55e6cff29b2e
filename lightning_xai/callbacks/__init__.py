"""Thin Lightning adapters: pick probe data, call the layers below, gather across ranks, log."""

from lightning_xai.callbacks.atlas import ActivationAtlas
from lightning_xai.callbacks.base import XAICallback
from lightning_xai.callbacks.dissection import DissectionScores
from lightning_xai.callbacks.explanation_monitor import ExplanationMonitor
from lightning_xai.callbacks.interpretation import ClassPrototypes, EmbeddingProjector, RelevantUnits, TCAVScores
from lightning_xai.callbacks.probe import ProbeBatch, ProbeSet, split_sample
from lightning_xai.callbacks.quality import QUALITY_METRICS, ExplanationQuality
from lightning_xai.callbacks.records import ConfigurationError
from lightning_xai.callbacks.sanity import SanityCheck

__all__ = [
    "QUALITY_METRICS",
    "ActivationAtlas",
    "ClassPrototypes",
    "ConfigurationError",
    "DissectionScores",
    "EmbeddingProjector",
    "ExplanationMonitor",
    "ExplanationQuality",
    "ProbeBatch",
    "ProbeSet",
    "RelevantUnits",
    "SanityCheck",
    "TCAVScores",
    "XAICallback",
    "split_sample",
]
