"""LightningModules: classifiers, interpretable-by-design models and post-hoc method modules, on one base."""

from lightning_xai.models.backbones import BACKBONES, SmallCNN, VGGSmall, build_backbone
from lightning_xai.models.base import XAIModule
from lightning_xai.models.classifier import ImageClassifier

__all__ = ["BACKBONES", "ImageClassifier", "SmallCNN", "VGGSmall", "XAIModule", "build_backbone"]
