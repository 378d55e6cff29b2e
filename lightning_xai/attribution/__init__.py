"""Attribution: what in the input drove one decision. Pure torch, no Lightning import.

Every method is an :class:`Attributor`: ``method(model, inputs, target) -> Tensor`` (see ``base.py``), and can
be built by its registered name with :func:`build_attributor` (``"gradcam"``, ``{"name": "integrated_gradients",
"steps": 64}``).
"""

from lightning_xai.attribution.attention import AttentionRollout, TransformerAttribution
from lightning_xai.attribution.base import ATTRIBUTORS, Attributor, Target, build_attributor
from lightning_xai.attribution.cam import CAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from lightning_xai.attribution.cem import CEMPertinentNegative, CEMPertinentPositive, ContrastiveExplanation
from lightning_xai.attribution.gradient import InputXGradient, IntegratedGradients, Saliency, SmoothGrad
from lightning_xai.attribution.guided import Deconvnet, GuidedBackprop, GuidedGradCAM
from lightning_xai.attribution.layers import capture_layer, default_layer, resolve_layer
from lightning_xai.attribution.lrp import LRP
from lightning_xai.attribution.lrp.transformer import AttnLRP
from lightning_xai.attribution.meaningful_perturbation import MeaningfulPerturbation
from lightning_xai.attribution.occlusion import Occlusion
from lightning_xai.attribution.pattern import PatternAttribution, PatternNet, PatternSet, fit_patterns
from lightning_xai.attribution.prediction_difference import PredictionDifference
from lightning_xai.attribution.rise import RISE
from lightning_xai.attribution.surrogate import LIME, KernelSHAP
from lightning_xai.attribution.targets import ContrastiveTarget, contrastive_target
from lightning_xai.attribution.token_surrogate import TokenKernelSHAP, TokenLIME
from lightning_xai.attribution.tokens import (
    TokenInputXGradient,
    TokenIntegratedGradients,
    TokenOcclusion,
    TokenSaliency,
)

__all__ = [
    "ATTRIBUTORS",
    "CAM",
    "LIME",
    "LRP",
    "RISE",
    "AttentionRollout",
    "AttnLRP",
    "Attributor",
    "CEMPertinentNegative",
    "CEMPertinentPositive",
    "ContrastiveExplanation",
    "ContrastiveTarget",
    "Deconvnet",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "InputXGradient",
    "IntegratedGradients",
    "KernelSHAP",
    "LayerCAM",
    "MeaningfulPerturbation",
    "Occlusion",
    "PatternAttribution",
    "PatternNet",
    "PatternSet",
    "PredictionDifference",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "Target",
    "TokenInputXGradient",
    "TokenIntegratedGradients",
    "TokenKernelSHAP",
    "TokenLIME",
    "TokenOcclusion",
    "TokenSaliency",
    "TransformerAttribution",
    "build_attributor",
    "capture_layer",
    "contrastive_target",
    "default_layer",
    "fit_patterns",
    "resolve_layer",
]
