"""Interpretation: what the model learned (pure torch, no Lightning import).

Network dissection and compositional explanations, TCAV concept sensitivity, relevant units, activation
maximisation and example ranking, embeddings, and the receptive fields (exact, from the layer geometry) that
relevant units and prototype networks crop with.
"""

from lightning_xai.interpretation.atlas import ActivationAtlas, AtlasResult
from lightning_xai.interpretation.compositional import Formula, compositional_search
from lightning_xai.interpretation.dissection import DissectionResult, NetworkDissection, dissect
from lightning_xai.interpretation.embedding import Embedding, embed_layer, layer_features, project_features
from lightning_xai.interpretation.quantiles import DistributedReducer, QuantileSketch, Reducer
from lightning_xai.interpretation.receptive_field import (
    ReceptiveField,
    crop_receptive_fields,
    measure_receptive_field,
    receptive_field,
)
from lightning_xai.interpretation.relevant_units import (
    AblationReport,
    RelevantUnitAnalysis,
    RelevantUnitsResult,
    ablate_units,
    constrained_lasso,
    project_l1_ball,
    unit_ablation,
)
from lightning_xai.interpretation.tcav import TCAV, TCAVResult, directional_derivatives, train_cav, welch_t_test
from lightning_xai.interpretation.visualization import ActivationMaximization, rank_examples, total_variation

__all__ = [
    "TCAV",
    "AblationReport",
    "ActivationAtlas",
    "ActivationMaximization",
    "AtlasResult",
    "DissectionResult",
    "DistributedReducer",
    "Embedding",
    "Formula",
    "NetworkDissection",
    "QuantileSketch",
    "ReceptiveField",
    "Reducer",
    "RelevantUnitAnalysis",
    "RelevantUnitsResult",
    "TCAVResult",
    "ablate_units",
    "compositional_search",
    "constrained_lasso",
    "crop_receptive_fields",
    "directional_derivatives",
    "dissect",
    "embed_layer",
    "layer_features",
    "measure_receptive_field",
    "project_features",
    "project_l1_ball",
    "rank_examples",
    "receptive_field",
    "total_variation",
    "train_cav",
    "unit_ablation",
    "welch_t_test",
]
