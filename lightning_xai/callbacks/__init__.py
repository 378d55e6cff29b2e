"""Thin Lightning adapters: pick probe data, call the layers below, gather across ranks, log."""

from lightning_xai.callbacks.explanation_monitor import ExplanationMonitor
from lightning_xai.callbacks.probe import ProbeBatch, ProbeSet, split_sample

__all__ = ["ExplanationMonitor", "ProbeBatch", "ProbeSet", "split_sample"]
