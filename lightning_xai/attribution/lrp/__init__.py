"""Layer-wise Relevance Propagation in four orthogonal pieces (the design of Zennit; Anders et al., "Software
for Dataset-wide XAI: From Local Explanations to Global Insights with Zennit, CoRelAy, and ViRelAy", 2021):

* **rules** (:mod:`.rules`): how relevance passes through one layer, as a modified gradient;
* **composites** (:mod:`.composites`): which rule for which layer, by type and by name;
* **canonizers** (:mod:`.canonizers`): reversible rewrites (BatchNorm folding, explicit residual sums);
* the **attributor** :class:`LRP` (registered as ``"lrp"``, plus ``"lrp_epsilon"``, ``"lrp_epsilon_plus"``,
  ``"lrp_epsilon_plus_flat"``, ``"lrp_epsilon_gamma_box"``, ``"lrp_epsilon_alpha2_beta1"``).

Importing this package registers the attributors for :func:`~lightning_xai.attribution.base.build_attributor`.
"""

from lightning_xai.attribution.lrp.attributor import (
    LRP,
    LRPEpsilon,
    LRPEpsilonAlpha2Beta1,
    LRPEpsilonGammaBox,
    LRPEpsilonPlus,
    LRPEpsilonPlusFlat,
)
from lightning_xai.attribution.lrp.canonizers import (
    CANONIZERS,
    BatchNormFolding,
    Canonizer,
    CanonizerHandle,
    ResNetCanonizer,
    auto_canonizers,
    canonize,
)
from lightning_xai.attribution.lrp.composites import COMPOSITES, Composite, build_composite
from lightning_xai.attribution.lrp.modules import ResidualAdd
from lightning_xai.attribution.lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, WSquare, ZBox, ZPlus

__all__ = [
    "CANONIZERS",
    "COMPOSITES",
    "LRP",
    "AlphaBeta",
    "BatchNormFolding",
    "Canonizer",
    "CanonizerHandle",
    "Composite",
    "Epsilon",
    "Flat",
    "Gamma",
    "LRPEpsilon",
    "LRPEpsilonAlpha2Beta1",
    "LRPEpsilonGammaBox",
    "LRPEpsilonPlus",
    "LRPEpsilonPlusFlat",
    "Pass",
    "ResNetCanonizer",
    "ResidualAdd",
    "Rule",
    "WSquare",
    "ZBox",
    "ZPlus",
    "auto_canonizers",
    "build_composite",
    "canonize",
]
