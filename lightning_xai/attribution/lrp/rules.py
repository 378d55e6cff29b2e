"""LRP rules as modified gradients, evaluated in the ordinary forward and backward pass.

Layer-wise Relevance Propagation (Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions
by Layer-Wise Relevance Propagation", PLOS ONE 2015; Montavon et al., "Layer-Wise Relevance Propagation: An
Overview", in *Explainable AI*, LNCS 11700, Springer 2019) distributes the explained score backwards, layer by
layer. For a layer with inputs ``x_j`` and outputs ``z_k`` most rules have the form

    R_j = sum_k  c_jk / (sum_j' c_j'k  [+ eps sign]) * R_k,

where the contribution ``c_jk`` is rule specific (``x_j w_jk`` for the epsilon rule, ``x_j w_jk^+`` for z+,
...). The relevance of a layer is conserved (``sum_j R_j = sum_k R_k``) up to stabiliser and bias terms.

**How it is computed here: relevance = input x modified gradient.** Write the relevance of a layer's output as
``R_k = z_k g_k`` with ``g_k`` the gradient arriving at ``z_k``. A rule's forward hook evaluates the modified
pre-activations ``z'_k = sum_j c_jk`` with *functional* copies of the modified parameters (the module's own
parameters are never written) and returns

    out = z.detach() + (y - y.detach()),      y = z' * (z / stab(z')).detach(),

whose *value* is exactly the layer's output ``z`` (the forward pass is unchanged) and whose *gradient* with
respect to ``x`` is ``sum_k dz'_k/dx_j * z_k g_k / stab(z'_k)``, so that ``x_j * grad_j`` is the rule's ``R_j``.
One forward and one backward pass explain the batch; nothing is re-run in a backward hook. Element-wise ReLUs,
max pooling (winner takes all) and average pooling need no rule: their ordinary gradient times input already
conserves relevance (for average pooling it *is* the z-rule). Rules for the first layer (zB, flat, w-square)
compute the relevance of the layer's input from auxiliary leaf tensors (``R = sum leaf * grad(leaf)``), which
the :class:`~lightning_xai.attribution.lrp.attributor.LRP` attributor adds to its result.

Stabiliser convention: ``stab(z) = z + eps`` for ``z >= 0`` and ``z - eps`` for ``z < 0`` (never zero).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_xai.attribution.lrp.modules import EXPLAINED_LAYERS, ResidualAdd, layer_forward, layer_parameters
from lightning_xai.checks import check_float

__all__ = [
    "ACTIVATIONS",
    "AlphaBeta",
    "Epsilon",
    "Flat",
    "Gamma",
    "Pass",
    "Rule",
    "RuleContext",
    "WSquare",
    "ZBox",
    "ZPlus",
    "stabilize",
]

#: Element-wise activations handled by :class:`Pass` (relevance passes through unchanged). ReLU, LeakyReLU and
#: PReLU need no rule: ``f(x) = x f'(x)``, so their gradient already passes relevance through.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,  # includes ReLU6
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softsign,
    nn.ReLU,
    nn.LeakyReLU,
)


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``, so the result is never zero (``eps`` is raised to the
    smallest normal number of ``z``'s dtype, for half precision)."""
    eps = max(float(epsilon), torch.finfo(z.dtype).tiny)
    return torch.where(z >= 0, z + eps, z - eps)


def _redistribute(modified: Tensor, output: Tensor, epsilon: float) -> Tensor:
    """The layer output (exact value) with the gradient of ``modified * (output / stab(modified))``."""
    ratio = output.detach() / stabilize(modified.detach(), epsilon)
    y = modified * ratio
    return output.detach() + (y - y.detach())


class RuleContext:
    """What a rule may need besides its layer: the layer's name (for messages) and, for first-layer rules, a way
    to create auxiliary leaf tensors whose ``leaf * grad`` is relevance of the model input."""

    def __init__(self, name: str, input_shape: torch.Size) -> None:
        self.name = name
        self.input_shape = input_shape
        self.leaves: list[Tensor] = []

    def leaf(self, tensor: Tensor, rule: Rule) -> Tensor:
        """A fresh leaf copy of ``tensor`` (a tensor shaped like the layer input) that requires grad.

        The layer input must hold one value per model-input element (the model input itself, a flattened view
        or an element-wise transform of it), since its relevance is returned as the relevance of the input.
        """
        batch = self.input_shape[0]
        per_sample = math.prod(self.input_shape[1:])
        if tensor.shape[0] != batch or tensor[0].numel() != per_sample:
            raise ValueError(
                f"{rule!r} computes the relevance of its layer's input, so it must be the rule of the layer that "
                f"receives the model input; layer {self.name!r} receives shape {list(tensor.shape)}, the model "
                f"input has shape {list(self.input_shape)}"
            )
        leaf = tensor.detach().clone().requires_grad_(True)
        self.leaves.append(leaf)
        return leaf


class Rule(abc.ABC):
    """An LRP rule for one kind of layer.

    Subclasses implement :meth:`forward`: given the layer, its inputs and its output, return a tensor with the
    output's value whose gradient with respect to the inputs is the rule's modified gradient (see the module
    docstring).
    """

    #: Module types the rule can be applied to.
    supported: ClassVar[tuple[type[nn.Module], ...]] = EXPLAINED_LAYERS
    #: Whether the rule computes the relevance of its layer's *input* from auxiliary leaves (zB, flat,
    #: w-square): such a rule must be the rule of the first layer, the one that receives the model input.
    input_layer_rule: ClassVar[bool] = False

    def supports(self, module: nn.Module | type) -> bool:
        kind = module if isinstance(module, type) else type(module)
        return issubclass(kind, self.supported)

    def check_supports(self, module: nn.Module | type, where: str) -> None:
        """Raise a ``ValueError`` when the rule cannot be applied to ``module`` (named by ``where``)."""
        if not self.supports(module):
            kind = module if isinstance(module, type) else type(module)
            raise ValueError(
                f"{self!r} cannot be applied to {where} ({kind.__name__}); it supports "
                f"{[t.__name__ for t in self.supported]}"
            )

    @abc.abstractmethod
    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, context: RuleContext) -> Tensor:
        """The layer output with the rule's gradient (see the module docstring)."""

    def _params(self) -> dict[str, object]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


def _signed_contributions(
    module: nn.Module,
    x: Tensor,
    *,
    positive: bool = True,
    negative: bool = True,
    output: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(sum_j (x_j w_jk)^+ + b_k^+, sum_j (x_j w_jk)^- + b_k^-)``: the positive and negative parts of the
    pre-activations, as functions of ``x`` (so their gradients select the matching weight signs).

    ``output`` (the layer's own output ``sum_j x_j w_jk + b_k``, as a function of ``x``) saves a layer evaluation
    when both parts are wanted and ``x >= 0`` (inputs after a ReLU): then the negative part is ``output - pos``,
    whose gradient is ``w - w^+ = w^-``. Its backward computes ``w^-`` as a difference, so only a rule whose
    coefficient on the negative part is bounded may pass ``output`` (Gamma: ``|output / z'| <= 1``); alpha-beta
    divides by ``stab(z^-)``, up to ``1 / stabilizer`` where ``z^- = 0``, and the difference would absorb the rest
    of the gradient in float32."""
    weight, bias = layer_parameters(module)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    b_pos = None if bias is None else bias.clamp(min=0)
    b_neg = None if bias is None else bias.clamp(max=0)
    x_pos = x.clamp(min=0)
    x_neg = x.clamp(max=0) if bool((x < 0).any()) else None
    pos = neg = None
    if positive:
        pos = layer_forward(module, x_pos, w_pos, b_pos)
        if x_neg is not None:
            pos = pos + layer_forward(module, x_neg, w_neg, None)
    if negative:
        if positive and x_neg is None and output is not None:
            neg = output - pos
        else:
            neg = layer_forward(module, x_pos, w_neg, b_neg)
            if x_neg is not None:
                neg = neg + layer_forward(module, x_neg, w_pos, None)
    return pos, neg


class Epsilon(Rule):
    """LRP-epsilon (Bach et al. 2015; Montavon et al. 2019): ``c_jk = x_j w_jk`` with the stabiliser ``epsilon``
    in the denominator, which absorbs relevance of weak or contradictory outputs. With ``epsilon -> 0`` on a ReLU
    network it equals gradient x input. Also the z-rule of an explicit residual sum (:class:`ResidualAdd`):
    ``R_a = a / stab(a + b) * R``."""

    supported = (*EXPLAINED_LAYERS, ResidualAdd)

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = check_float("epsilon", epsilon, minimum=0.0, strict=True, owner="Epsilon")

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, context: RuleContext) -> Tensor:
        return _redistribute(output, output, self.epsilon)

    def _params(self) -> dict[str, object]:
        return {"epsilon": self.epsilon}


class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015): positive and negative contributions are redistributed separately,

        R_j = sum_k (alpha (x_j w_jk)^+ / z_k^+  -  beta (x_j w_jk)^- / z_k^-) R_k,

    with ``z^+ = sum_j (x_j w_jk)^+ + b^+`` and ``z^- = sum_j (x_j w_jk)^- + b^-``. ``alpha - beta = 1`` keeps
    relevance conserved. Inputs of either sign are handled (a negative input with a negative weight is a
    positive contribution). ``AlphaBeta(1, 0)`` is the z+ rule (:class:`ZPlus`)."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-9) -> None:
        owner = type(self).__name__
        self.alpha = check_float("alpha", alpha, minimum=1.0, strict=False, owner=owner)
        self.beta = check_float("beta", beta, minimum=0.0, strict=False, owner=owner)
        if abs(self.alpha - self.beta - 1.0) > 1e-6:
            raise ValueError(
                f"{owner}: alpha - beta must be 1 for relevance to be conserved, got alpha={alpha!r}, beta={beta!r}"
            )
        self.stabilizer = check_float("stabilizer", stabilizer, minimum=0.0, strict=True, owner=owner)

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, context: RuleContext) -> Tensor:
        pos, neg = _signed_contributions(module, inputs[0], negative=self.beta > 0)
        z = output.detach()
        y = self.alpha * pos * (z / stabilize(pos.detach(), self.stabilizer))
        if neg is not None:
            y = y - self.beta * neg * (z / stabilize(neg.detach(), self.stabilizer))
        return z + (y - y.detach())

    def _params(self) -> dict[str, object]:
        return {"alpha": self.alpha, "beta": self.beta, "stabilizer": self.stabilizer}


class ZPlus(AlphaBeta):
    """The z+ rule, LRP-alpha1-beta0 (Montavon et al., "Explaining nonlinear classification decisions with deep
    Taylor decomposition", Pattern Recognition 2017): only positive contributions receive relevance. For
    non-negative inputs (after a ReLU) and non-negative output relevance, all relevance is non-negative."""

    def __init__(self, stabilizer: float = 1e-9) -> None:
        super().__init__(alpha=1.0, beta=0.0, stabilizer=stabilizer)

    def _params(self) -> dict[str, object]:
        return {"stabilizer": self.stabilizer}


class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019): contributions of the output's sign are favoured by ``gamma``,

        z'_k = z_k + gamma * (sum_j (x_j w_jk)^+ + b_k^+)   for z_k > 0,
        z'_k = z_k + gamma * (sum_j (x_j w_jk)^- + b_k^-)   for z_k <= 0,

    ``R_j = sum_k dz'_k/dx_j x_j / z'_k R_k``. For non-negative inputs and positive outputs this is the paper's
    ``rho(w) = w + gamma w^+``; the sign-aware form keeps the denominator away from zero for negative outputs
    too. ``gamma = 0`` is the z-rule, ``gamma -> inf`` tends to z+."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-9) -> None:
        self.gamma = check_float("gamma", gamma, minimum=0.0, strict=False, owner="Gamma")
        self.stabilizer = check_float("stabilizer", stabilizer, minimum=0.0, strict=True, owner="Gamma")

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, context: RuleContext) -> Tensor:
        pos, neg = _signed_contributions(module, inputs[0], output=output)
        modified = output + self.gamma * torch.where(output.detach() > 0, pos, neg)
        return _redistribute(modified, output, self.stabilizer)

    def _params(self) -> dict[str, object]:
        return {"gamma": self.gamma, "stabilizer": self.stabilizer}


def _as_bound(value: float | Sequence[float] | Tensor, name: str) -> Tensor:
    try:
        bound = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"ZBox: {name} must be a number or a sequence of per-channel numbers, got {value!r}") from err
    if bound.ndim > 1 or bound.numel() == 0 or not bool(torch.isfinite(bound).all()):
        raise ValueError(f"ZBox: {name} must be a finite number or a 1-D per-channel sequence, got {value!r}")
    return bound


class ZBox(Rule):
    """The zB rule for an input layer whose inputs are bounded, ``low <= x <= high`` (Montavon et al. 2017,
    deep Taylor decomposition; Montavon et al. 2019):

        R_j = sum_k (x_j w_jk - l_j w_jk^+ - h_j w_jk^-) / sum_j' (...) R_k.

    Every contribution is non-negative inside the box, so it explains with the pixel domain in mind. ``low`` and
    ``high`` are numbers or per-channel sequences (channel dimension 1), in the units of the layer's input (for
    normalised images, the normalised pixel range). Inputs outside the box raise a ``ValueError``. The bias is
    not a contribution, so all relevance reaches the input. Must be the rule of the first layer.
    """

    input_layer_rule = True

    def __init__(
        self,
        low: float | Sequence[float] | Tensor = 0.0,
        high: float | Sequence[float] | Tensor = 1.0,
        stabilizer: float = 1e-9,
    ) -> None:
        lo, hi = _as_bound(low, "low"), _as_bound(high, "high")
        if lo.numel() > 1 and hi.numel() > 1 and lo.numel() != hi.numel():
            raise ValueError(f"ZBox: low and high have {lo.numel()} and {hi.numel()} channels; they must match")
        if not bool((lo < hi).all()):
            raise ValueError(f"ZBox: low must be < high (element-wise), got low={low!r}, high={high!r}")
        self.low = low if isinstance(low, (int, float)) else lo.tolist()
        self.high = high if isinstance(high, (int, float)) else hi.tolist()
        self._low, self._high = lo, hi
        self.stabilizer = check_float("stabilizer", stabilizer, minimum=0.0, strict=True, owner="ZBox")

    def _bound(self, bound: Tensor, x: Tensor, name: str, context: RuleContext) -> Tensor:
        if bound.numel() > 1:
            if x.ndim < 2 or x.shape[1] != bound.numel():
                raise ValueError(
                    f"ZBox at layer {context.name!r}: {name} has {bound.numel()} per-channel values but the layer "
                    f"input has shape {list(x.shape)} (channel dimension 1)"
                )
            bound = bound.view(1, -1, *([1] * (x.ndim - 2)))
        return bound.to(device=x.device, dtype=x.dtype).expand_as(x)

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, context: RuleContext) -> Tensor:
        x = inputs[0]
        low, high = self._bound(self._low, x, "low", context), self._bound(self._high, x, "high", context)
        tol = 1e-5 * float((self._high - self._low).abs().max().clamp(min=1.0))
        if bool((x < low - tol).any()) or bool((x > high + tol).any()):
            lo, hi = float(x.detach().min()), float(x.detach().max())
            raise ValueError(
                f"ZBox at layer {context.name!r}: the input lies outside the box [low, high] = [{self.low}, "
                f"{self.high}] (input min {lo:.4g}, max {hi:.4g}); pass the input range as "
                "low/high (per channel for normalised images) or use a composite without zB, e.g. "
                "'epsilon_plus_flat'"
            )
        weight, _ = layer_parameters(module)
        x_leaf, low_leaf, high_leaf = (context.leaf(t, self) for t in (x, low, high))
        modified = (
            layer_forward(module, x_leaf, weight, None)
            - layer_forward(module, low_leaf, weight.clamp(min=0), None)
            - layer_forward(module, high_leaf, weight.clamp(max=0), None)
        )
        return _redistribute(modified, output, self.stabilizer)

    def _params(self) -> dict[str, object]:
        return {"low": self.low, "high": self.high}


class _WeightsOnlyRule(Rule):
    """A first-layer rule that redistributes relevance by a function of the weights alone, independent of the
    input values: the layer is evaluated on an all-ones input with the weights replaced by :meth:`_weights`."""

    input_layer_rule = True

    def __init__(self, stabilizer: float = 1e-9) -> None:
        self.stabilizer = check_float("stabilizer", stabilizer, minimum=0.0, strict=True, owner=type(self).__name__)

    def _weights(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, context: RuleContext) -> Tensor:
        weight, _ = layer_parameters(module)
        ones = context.leaf(torch.ones_like(inputs[0]), self)
        return _redistribute(layer_forward(module, ones, self._weights(weight), None), output, self.stabilizer)


class Flat(_WeightsOnlyRule):
    """The flat rule (Lapuschkin et al., "Unmasking Clever Hans predictors...", Nature Communications 2019):
    every input in a unit's receptive field receives an equal share, ``R_j = sum_k 1 / (sum_j' 1) R_k``,
    independent of input values and weights. For the first layer only."""

    def _weights(self, weight: Tensor) -> Tensor:
        return torch.ones_like(weight)


class WSquare(_WeightsOnlyRule):
    """The w-square rule (Montavon et al. 2017, deep Taylor decomposition for unbounded inputs):
    ``R_j = sum_k w_jk^2 / sum_j' w_j'k^2 R_k``, independent of input values. For the first layer only."""

    def _weights(self, weight: Tensor) -> Tensor:
        return weight * weight


class Pass(Rule):
    """Pass relevance through an element-wise activation unchanged, ``R_in = R_out`` (the convention of the
    LRP literature for activations). For ReLU-like activations (``f(x) = x f'(x)``) this equals the ordinary
    gradient; for others (tanh, sigmoid, GELU, SiLU, ...) gradient x input would not conserve relevance."""

    supported = ACTIVATIONS

    def __init__(self, stabilizer: float = 1e-9) -> None:
        self.stabilizer = check_float("stabilizer", stabilizer, minimum=0.0, strict=True, owner="Pass")

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, context: RuleContext) -> Tensor:
        x = inputs[0]
        y = x * (output.detach() / stabilize(x.detach(), self.stabilizer))
        return output.detach() + (y - y.detach())
