"""LightningModules: classifiers, interpretable-by-design models and post-hoc method modules, on one base."""

from lightning_xai.models.activations import (
    ActivationBatch,
    ActivationCache,
    ActivationDataModule,
    ActivationSource,
)
from lightning_xai.models.adversarial import AdversarialClassifier, AdversarialTrainingMixin, PGDAttack
from lightning_xai.models.backbones import BACKBONES, SmallCNN, VGGSmall, build_backbone
from lightning_xai.models.base import XAIModule
from lightning_xai.models.classifier import ImageClassifier
from lightning_xai.models.concept_bottleneck import ConceptBottleneckModel, InterventionCurve, log_intervention_curve
from lightning_xai.models.concept_whitening import ConceptWhitening, ConceptWhiteningClassifier, replace_batchnorm
from lightning_xai.models.interpretable_filters import InterpretableFilterClassifier
from lightning_xai.models.net2vec import ConceptMaskDataModule, Net2Vec
from lightning_xai.models.probes import ConceptProbes
from lightning_xai.models.protopnet import ProtoPNet
from lightning_xai.models.sae import ReLUSAEConfig, SparseAutoencoder, TiedSAEConfig, TopKSAEConfig
from lightning_xai.models.transformers import TextClassifier, TextTransformer, ViTClassifier, vit_tiny

__all__ = [
    "BACKBONES",
    "ActivationBatch",
    "ActivationCache",
    "ActivationDataModule",
    "ActivationSource",
    "AdversarialClassifier",
    "AdversarialTrainingMixin",
    "ConceptBottleneckModel",
    "ConceptMaskDataModule",
    "ConceptProbes",
    "ConceptWhitening",
    "ConceptWhiteningClassifier",
    "ImageClassifier",
    "InterpretableFilterClassifier",
    "InterventionCurve",
    "Net2Vec",
    "PGDAttack",
    "ProtoPNet",
    "ReLUSAEConfig",
    "SmallCNN",
    "SparseAutoencoder",
    "TextClassifier",
    "TextTransformer",
    "TiedSAEConfig",
    "TopKSAEConfig",
    "VGGSmall",
    "ViTClassifier",
    "XAIModule",
    "build_backbone",
    "log_intervention_curve",
    "replace_batchnorm",
    "vit_tiny",
]
