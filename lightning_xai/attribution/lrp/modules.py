"""Building blocks shared by LRP rules and canonizers: which layers LRP explains, their *effective* parameters
while a canonizer has rewritten them, and the explicit residual sum.

Canonizers never write to a parameter. Folding a BatchNorm into the convolution before it replaces the
convolution's ``forward`` (an instance attribute, removed afterwards) by a :class:`FoldedLayer` that evaluates the
layer with folded copies of its weight and bias; :func:`layer_parameters` returns those copies, so rules build
their modified forward passes from exactly the parameters the model is using.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EXPLAINED_LAYERS",
    "FoldedAway",
    "FoldedLayer",
    "ResidualAdd",
    "check_explainable",
    "layer_forward",
    "layer_parameters",
]

#: Layers with weights that LRP rules redistribute relevance through.
EXPLAINED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_ORIGINAL_FORWARDS = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


class ResidualAdd(nn.Module):
    """``a + b`` as a module, so that a residual sum gets its own LRP rule (see ``ResNetCanonizer``).

    Under the z-rule the relevance ``R`` of the sum is split between the two summands in proportion to their
    values, ``R_a = a / (a + b) * R`` and ``R_b = b / (a + b) * R``, instead of being copied to both branches.
    """

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class FoldedLayer:
    """Replacement ``forward`` of a Linear/Conv layer that evaluates it with folded (weight, bias) copies."""

    def __init__(self, layer: nn.Module, weight: Tensor, bias: Tensor) -> None:
        self.layer = layer
        self.weight = weight
        self.bias = bias

    def __call__(self, x: Tensor) -> Tensor:
        return layer_forward(self.layer, x, self.weight, self.bias)

    def __repr__(self) -> str:
        return f"FoldedLayer({type(self.layer).__name__})"


class FoldedAway:
    """Replacement ``forward`` of a BatchNorm whose affine map was folded into the layer before it: identity."""

    def __init__(self, into: nn.Module) -> None:
        self.into = into

    def __call__(self, x: Tensor) -> Tensor:
        return x

    def __repr__(self) -> str:
        return f"FoldedAway(into={type(self.into).__name__})"


def check_explainable(name: str, module: nn.Module) -> None:
    """Raise unless ``module`` is a Linear/Conv layer whose forward LRP knows: the stock one or a folded one.

    A subclass with its own ``forward`` (weight standardisation, LoRA, quantisation...) computes with weights LRP
    cannot see, so its relevance would be silently wrong.
    """
    instance_forward = module.__dict__.get("forward")
    if instance_forward is not None:
        if isinstance(instance_forward, FoldedLayer):
            return
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has a patched forward method; LRP cannot know which "
            "weights it computes with"
        )
    if type(module).forward not in _ORIGINAL_FORWARDS:
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}, a subclass of a Linear/Conv layer with its own forward; "
            "LRP cannot know which weights it computes with. Map it to a stock nn.Linear / nn.ConvNd."
        )


def layer_parameters(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) a Linear/Conv layer computes with right now, detached: folded copies while a
    BatchNorm is folded into it, its own parameters otherwise."""
    instance_forward = module.__dict__.get("forward")
    if isinstance(instance_forward, FoldedLayer):
        return instance_forward.weight, instance_forward.bias
    bias = module.bias
    return module.weight.detach(), None if bias is None else bias.detach()


def layer_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Evaluate a Linear/Conv layer's operation on ``x`` with the given weight and bias (functional, so the
    module's parameters are never touched). Convolutions keep their stride, padding (and padding mode),
    dilation and groups."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(x, weight, bias)
    raise TypeError(f"no functional forward for {type(module).__name__}; LRP explains {_names(EXPLAINED_LAYERS)}")


def _names(types: tuple[type, ...]) -> list[str]:
    return [t.__name__ for t in types]
