"""Attribution: what in the input drove one decision. Pure torch, no Lightning import.

Every method is an :class:`Attributor`: ``method(model, inputs, target) -> Tensor`` (see ``base.py``).
"""

from lightning_xai.attribution.base import ATTRIBUTORS, Attributor, Target, build_attributor
from lightning_xai.attribution.layers import capture_layer, default_layer, resolve_layer

__all__ = [
    "ATTRIBUTORS",
    "Attributor",
    "Target",
    "build_attributor",
    "capture_layer",
    "default_layer",
    "resolve_layer",
]
