"""Callbacks that interpret what the model has learned, during training (re-exported from one module each):

* :class:`~lightning_xai.callbacks.tcav.TCAVScores` - TCAV scores of (class, concept) pairs at one layer;
* :class:`~lightning_xai.callbacks.relevant_units.RelevantUnits` - the relevant units of each class, their visuals
  and an ablation check;
* :class:`~lightning_xai.callbacks.prototypes.ClassPrototypes` - activation-maximisation images of the classes;
* :class:`~lightning_xai.callbacks.embedding.EmbeddingProjector` - a 2-D map of a layer's features.

Each is an :class:`~lightning_xai.callbacks.base.XAICallback` (schedule, setup-time checks, error policy, ranks,
state and files as described there) and a thin adapter over :mod:`lightning_xai.interpretation`. This module
keeps the old import path working.
"""

from lightning_xai.callbacks.embedding import EmbeddingProjector
from lightning_xai.callbacks.prototypes import ClassPrototypes
from lightning_xai.callbacks.relevant_units import RelevantUnits
from lightning_xai.callbacks.tcav import TCAVScores
from lightning_xai.viz.dashboard import log_scatter  # moved to viz; the old import path keeps working

__all__ = ["ClassPrototypes", "EmbeddingProjector", "RelevantUnits", "TCAVScores", "log_scatter"]
