"""Metrics for explanations and sanity checks: pure torch + torchmetrics, no Lightning import.

Every metric is a :class:`torchmetrics.Metric` (DDP-synchronised ``compute()``) with a functional twin that
returns per-sample values:

* faithfulness - :class:`DeletionAUC`, :class:`InsertionAUC` (RISE), :class:`AOPC` (MoRF / LeRF),
  :class:`Infidelity`, :class:`MaxSensitivity`;
* localisation against ground-truth masks - :class:`PointingGame`, :class:`MaskIoU`, :class:`RelevanceMass`,
  :class:`RelevanceRank`;
* complexity - :class:`Sparseness` (Gini index);
* sanity checks - :class:`ModelRandomization`, :class:`DataRandomization` (Adebayo et al. 2018);
* similarity of maps - Spearman / Pearson correlation, SSIM, HOG-feature correlation (scikit-image's HOG).

Every metric computes under DDP also on a rank that saw no data; the random ones (:class:`AOPC` with uniform
noise, :class:`Infidelity`, :class:`MaxSensitivity`) take ``update(..., sample_ids=)`` - the samples' dataset
indices - so that their value does not depend on how the data is sharded. ``NaN``/``inf`` in inputs, maps or
model scores raise; undefined samples (empty masks, constant maps) are excluded and counted.
"""

from lightning_xai.evaluation.complexity import Sparseness, gini_index, sparseness
from lightning_xai.evaluation.faithfulness import (
    AOPC,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    MaxSensitivity,
    aopc,
    deletion_auc,
    deletion_curve,
    gaussian_blur,
    infidelity,
    insertion_auc,
    insertion_curve,
    max_sensitivity,
    region_perturbation_curve,
)
from lightning_xai.evaluation.localization import (
    MaskIoU,
    PerSampleMeanMetric,
    PointingGame,
    RelevanceMass,
    RelevanceRank,
    binarize_heatmap,
    heatmap_batch,
    mask_iou,
    otsu_threshold,
    pointing_game,
    relevance_mass,
    relevance_rank,
)
from lightning_xai.evaluation.randomization import (
    SIMILARITY_MEASURES,
    DataRandomization,
    DataRandomizationResult,
    ModelRandomization,
    RandomizationResult,
    compare_maps,
    parametrised_layers,
)
from lightning_xai.evaluation.similarity import (
    hog_descriptor,
    hog_features,
    hog_pearson,
    pearson_correlation,
    rank_data,
    spearman_correlation,
    ssim,
)

__all__ = [
    "AOPC",
    "SIMILARITY_MEASURES",
    "DataRandomization",
    "DataRandomizationResult",
    "DeletionAUC",
    "Infidelity",
    "InsertionAUC",
    "MaskIoU",
    "MaxSensitivity",
    "ModelRandomization",
    "PerSampleMeanMetric",
    "PointingGame",
    "RandomizationResult",
    "RelevanceMass",
    "RelevanceRank",
    "Sparseness",
    "aopc",
    "binarize_heatmap",
    "compare_maps",
    "deletion_auc",
    "deletion_curve",
    "gaussian_blur",
    "gini_index",
    "heatmap_batch",
    "hog_descriptor",
    "hog_features",
    "hog_pearson",
    "infidelity",
    "insertion_auc",
    "insertion_curve",
    "mask_iou",
    "max_sensitivity",
    "otsu_threshold",
    "parametrised_layers",
    "pearson_correlation",
    "pointing_game",
    "rank_data",
    "region_perturbation_curve",
    "relevance_mass",
    "relevance_rank",
    "sparseness",
    "spearman_correlation",
    "ssim",
]
