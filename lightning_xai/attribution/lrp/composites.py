"""Composites: which LRP rule explains which layer.

A :class:`Composite` maps layer *types* and layer *names* to rules, plus an optional rule for the first layer
(the first Linear/Conv call of the forward pass, the one that receives the input). Lookup order for a layer:
its dotted name, then the first-layer rule, then its type (most specific class first), then the defaults
(:class:`~.rules.Epsilon` for Linear/Conv layers and explicit residual sums, :class:`~.rules.Pass` for
element-wise activations other than ReLU). The named composites follow the recommendations of Montavon et al.,
"Layer-Wise Relevance Propagation: An Overview" (2019) and Kohlbrenner et al., "Towards Best Practice in
Explaining Neural Network Decisions with LRP" (IJCNN 2020): a rule for the input domain at the first layer,
z+ / gamma / alpha-beta for convolutions (lower layers), epsilon for dense layers (upper layers).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.attribution.lrp.modules import EXPLAINED_LAYERS, ResidualAdd
from lightning_xai.attribution.lrp.rules import (
    ACTIVATIONS,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Pass,
    Rule,
    ZBox,
    ZPlus,
)

__all__ = ["COMPOSITES", "Composite", "build_composite"]

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Activations that are hooked by default: those whose gradient does not already pass relevance through.
_PASS_BY_DEFAULT = tuple(a for a in ACTIVATIONS if a not in (nn.ReLU, nn.LeakyReLU))

Bound = float | Sequence[float] | Tensor


class Composite:
    """Rules for layers, by type and by dotted name (names override types).

    Args:
        rules: ``{nn.Conv2d: Gamma(0.25), "classifier.6": Epsilon(1e-6), ...}``. Type keys apply to instances of
            the type and its subclasses (the most specific entry wins). First-layer rules (zB, flat, w-square)
            are only accepted under a name key or as ``first_layer``.
        first_layer: rule of the first Linear/Conv layer called in the forward pass, unless that layer is named
            in ``rules``.
        epsilon: epsilon of the default :class:`~.rules.Epsilon` rule for layers no entry covers.
    """

    def __init__(
        self,
        rules: Mapping[type[nn.Module] | str, Rule] | None = None,
        *,
        first_layer: Rule | None = None,
        epsilon: float = 1e-6,
    ) -> None:
        default = Epsilon(epsilon)
        self.by_type: dict[type[nn.Module], Rule] = {kind: default for kind in (*EXPLAINED_LAYERS, ResidualAdd)}
        self.by_type.update({kind: Pass() for kind in _PASS_BY_DEFAULT})
        self.by_name: dict[str, Rule] = {}
        if rules is not None and not isinstance(rules, Mapping):
            raise TypeError(f"Composite rules must be a mapping {{type or name: Rule}}, got {type(rules).__name__}")
        for key, rule in (rules or {}).items():
            if not isinstance(rule, Rule):
                raise TypeError(f"Composite: the rule for {key!r} must be a Rule instance, got {rule!r}")
            if isinstance(key, str):
                if not key:
                    raise ValueError("Composite: a layer name must not be empty (the root module has no rule)")
                self.by_name[key] = rule
            elif isinstance(key, type) and issubclass(key, nn.Module):
                rule.check_supports(key, f"layers of type {key.__name__}")
                if rule.input_layer_rule:
                    raise ValueError(
                        f"Composite: {rule!r} computes the relevance of the model input and can only be the rule of "
                        f"the first layer; pass it as first_layer= or under the first layer's name, not for every "
                        f"{key.__name__}"
                    )
                self.by_type[key] = rule
            else:
                raise TypeError(f"Composite: keys must be nn.Module types or dotted layer names, got {key!r}")
        if first_layer is not None:
            if not isinstance(first_layer, Rule):
                raise TypeError(f"Composite: first_layer must be a Rule instance, got {first_layer!r}")
            for kind in EXPLAINED_LAYERS:
                first_layer.check_supports(kind, "the first layer")
        self.first_layer = first_layer

    def rule_for(self, name: str, module: nn.Module, *, first: bool) -> Rule | None:
        """The rule of ``module`` (called ``name``); ``first`` when it is the first Linear/Conv call."""
        if name in self.by_name:
            return self.by_name[name]
        if first and self.first_layer is not None and isinstance(module, EXPLAINED_LAYERS):
            return self.first_layer
        for kind in type(module).__mro__:
            if kind in self.by_type:
                return self.by_type[kind]
        return None

    def check(self, model: nn.Module) -> None:
        """Check that every named layer exists in ``model`` and that its rule supports it."""
        for name, rule in self.by_name.items():
            _, module = resolve_layer(model, name)
            rule.check_supports(module, f"layer {name!r}")

    def __repr__(self) -> str:
        named = dict(self.by_name)
        typed = {k.__name__: v for k, v in self.by_type.items() if not isinstance(v, Pass)}
        return f"Composite(types={typed}, names={named}, first_layer={self.first_layer!r})"


def _epsilon(epsilon: float, gamma: float, low: Bound, high: Bound) -> Composite:
    return Composite(epsilon=epsilon)


def _epsilon_plus(epsilon: float, gamma: float, low: Bound, high: Bound) -> Composite:
    return Composite(dict.fromkeys(_CONVS, ZPlus()), first_layer=ZBox(low, high), epsilon=epsilon)


def _epsilon_plus_flat(epsilon: float, gamma: float, low: Bound, high: Bound) -> Composite:
    return Composite(dict.fromkeys(_CONVS, ZPlus()), first_layer=Flat(), epsilon=epsilon)


def _epsilon_gamma_box(epsilon: float, gamma: float, low: Bound, high: Bound) -> Composite:
    return Composite(dict.fromkeys(_CONVS, Gamma(gamma)), first_layer=ZBox(low, high), epsilon=epsilon)


def _epsilon_alpha2_beta1(epsilon: float, gamma: float, low: Bound, high: Bound) -> Composite:
    return Composite(dict.fromkeys(_CONVS, AlphaBeta(2.0, 1.0)), first_layer=ZBox(low, high), epsilon=epsilon)


#: Named composites, built from ``(epsilon, gamma, low, high)``:
#:
#: * ``"epsilon"``: epsilon everywhere (with ``epsilon -> 0``: gradient x input on ReLU networks).
#: * ``"epsilon_plus"``: zB (``low``/``high``) at the first layer, z+ for convolutions, epsilon for dense layers.
#: * ``"epsilon_plus_flat"``: as ``epsilon_plus`` with the flat rule at the first layer (no input bounds).
#: * ``"epsilon_gamma_box"``: zB at the first layer, gamma for convolutions, epsilon for dense layers.
#: * ``"epsilon_alpha2_beta1"``: zB at the first layer, alpha2-beta1 for convolutions, epsilon for dense layers.
COMPOSITES: dict[str, Callable[[float, float, Bound, Bound], Composite]] = {
    "epsilon": _epsilon,
    "epsilon_plus": _epsilon_plus,
    "epsilon_plus_flat": _epsilon_plus_flat,
    "epsilon_gamma_box": _epsilon_gamma_box,
    "epsilon_alpha2_beta1": _epsilon_alpha2_beta1,
}


def build_composite(
    spec: str | Mapping[type[nn.Module] | str, Rule] | Composite,
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Bound = 0.0,
    high: Bound = 1.0,
) -> Composite:
    """A composite from a name in :data:`COMPOSITES`, a ``{type or name: Rule}`` mapping (other layers get the
    defaults, with ``epsilon``) or a :class:`Composite` (returned as is)."""
    if isinstance(spec, Composite):
        return spec
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key not in COMPOSITES:
            close = difflib.get_close_matches(key, list(COMPOSITES), n=3, cutoff=0.5)
            hint = f"did you mean {close}? " if close else ""
            raise ValueError(f"unknown LRP composite {spec!r}; {hint}valid names: {sorted(COMPOSITES)}")
        return COMPOSITES[key](epsilon, gamma, low, high)
    if isinstance(spec, Mapping):
        return Composite(spec, epsilon=epsilon)
    raise TypeError(
        f"an LRP composite is a name {sorted(COMPOSITES)}, a {{type or name: Rule}} mapping or a Composite, "
        f"got {type(spec).__name__}"
    )
