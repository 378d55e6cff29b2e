"""Datasets with ground truth and LightningDataModules (generated or bundled: nothing is downloaded)."""

from lightning_xai.data.activation_source import ActivationBatch, ActivationSource
from lightning_xai.data.activations import ActivationCache, ActivationDataModule
from lightning_xai.data.base import InMemoryDataModule, derive_seeds
from lightning_xai.data.concept_masks import ConceptMaskDataModule
from lightning_xai.data.concepts import (
    CONCEPT_CATEGORIES,
    CONCEPT_NAMES,
    ConceptDataModule,
    ConceptScenes,
    class_from_concepts,
)
from lightning_xai.data.digits import DigitsDataModule
from lightning_xai.data.groundtruth import GroundTruthDataModule, GroundTruthShapes
from lightning_xai.data.tokens import PlantedTokens, PlantedTokensDataModule, patch_masks

__all__ = [
    "CONCEPT_CATEGORIES",
    "CONCEPT_NAMES",
    "ActivationBatch",
    "ActivationCache",
    "ActivationDataModule",
    "ActivationSource",
    "ConceptDataModule",
    "ConceptMaskDataModule",
    "ConceptScenes",
    "DigitsDataModule",
    "GroundTruthDataModule",
    "GroundTruthShapes",
    "InMemoryDataModule",
    "PlantedTokens",
    "PlantedTokensDataModule",
    "class_from_concepts",
    "derive_seeds",
    "patch_masks",
]
