"""The LRP attributor: canonize, attach the composite's rules, one forward and one backward pass, undo.

Layer-wise Relevance Propagation (Bach et al., PLOS ONE 2015; Montavon et al., "Layer-Wise Relevance
Propagation: An Overview", 2019). The explained score's relevance starts at the model output as
``output * d score / d output``: for a class target that is the one-hot vector times the logit, so the relevance
of the output *is* the explained logit. It is propagated back with the composite's rules (see
:mod:`~lightning_xai.attribution.lrp.rules` for how each rule is a modified gradient) and returned as the
relevance of every input element, ``Tensor`` of the input's shape (``[B, C, H, W]`` for images: one value per
channel, signed, not normalised). With zero biases and small stabilisers it sums to the explained score
(conservation); biases and stabilisers absorb some relevance otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_xai.attribution.base import Attributor, Target, model_logits, select_scores
from lightning_xai.attribution.lrp.canonizers import CANONIZERS, Canonizer, auto_canonizers, canonize, is_folded
from lightning_xai.attribution.lrp.composites import Bound, Composite, build_composite
from lightning_xai.attribution.lrp.modules import EXPLAINED_LAYERS, check_explainable
from lightning_xai.attribution.lrp.rules import Rule, RuleContext, ZBox, stabilize
from lightning_xai.checks import check_float

__all__ = ["LRP", "LRPEpsilon", "LRPEpsilonAlpha2Beta1", "LRPEpsilonGammaBox", "LRPEpsilonPlus", "LRPEpsilonPlusFlat"]

#: Normalisation layers LRP has no rule for (BatchNorm is explained once folded by a canonizer).
_NORMS = (
    _BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)
#: Modules with parameters whose gradient already conserves relevance (positively homogeneous activations).
_PARAMETRIC_PASS = (nn.PReLU,)
#: Parameter-free modules whose gradient does not pass relevance on and that have no rule.
_UNSUPPORTED = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)

CanonizerSpec = str | Canonizer | Sequence[str | Canonizer] | None


def _check_canonizers(spec: CanonizerSpec) -> str | list[Canonizer]:
    if isinstance(spec, str) and spec == "auto":
        return "auto"
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, Canonizer)) else spec
    if not isinstance(items, Sequence):
        raise TypeError(f"LRP: canonizers must be 'auto', None or a list of canonizers, got {type(spec).__name__}")
    result: list[Canonizer] = []
    for item in items:
        if isinstance(item, Canonizer):
            result.append(item)
        elif isinstance(item, str) and item in CANONIZERS:
            result.append(CANONIZERS[item]())
        else:
            raise ValueError(
                f"LRP: unknown canonizer {item!r}; give Canonizer instances, 'auto', None, or names from "
                f"{sorted(CANONIZERS)}"
            )
    return result


class _Propagation:
    """The hooks of one LRP pass: rules on the layers, a stop on modules LRP cannot explain."""

    def __init__(self, model: nn.Module, composite: Composite, input_shape: torch.Size) -> None:
        self.model = model
        self.composite = composite
        self.input_shape = input_shape
        self.leaves: list[Tensor] = []
        self.first_seen = False

    def _rule_hooks(self, name: str, module: nn.Module) -> tuple:
        stash: list[tuple] = []
        inplace = bool(getattr(module, "inplace", False))

        def pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"LRP: layer {name!r} must be called with its input tensor as positional argument")
            stash.append(args)
            # an in-place module would overwrite the input its rule needs: it gets a copy
            return tuple(a.clone() if isinstance(a, Tensor) else a for a in args) if inplace else None

        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
            inputs = stash.pop()
            first = False
            if isinstance(module, EXPLAINED_LAYERS):
                first, self.first_seen = not self.first_seen, True
            rule = self.composite.rule_for(name, module, first=first)
            if rule is None:
                return None
            if rule.input_layer_rule and not first:
                raise ValueError(
                    f"LRP: {rule!r} computes the relevance of the model input and can only be the rule of the first "
                    f"layer; {name!r} ({type(module).__name__}) is not the first Linear/Conv layer called"
                )
            if not isinstance(output, Tensor):
                raise TypeError(f"LRP: layer {name!r} returned {type(output).__name__}, not a Tensor")
            context = RuleContext(name, self.input_shape)
            result = rule.forward(module, inputs, output, context)
            self.leaves.extend(context.leaves)
            return result

        return pre_hook, hook

    @staticmethod
    def _stop(name: str, module: nn.Module):
        if isinstance(module, _UNSUPPORTED):
            message = (
                f"LRP has no rule for {name!r} ({type(module).__name__}): it explains scores before the "
                "normalisation; explain a model that returns logits (or use a callable target on them)"
            )
        elif isinstance(module, _BatchNorm):
            message = (
                f"LRP cannot explain BatchNorm {name!r}: it is not folded into the Linear/Conv layer before it; use "
                "canonizers='auto' (or BatchNormFolding / ResNetCanonizer)"
            )
        else:
            message = (
                f"LRP has no rule for {name!r} ({type(module).__name__}): it explains Linear/Conv layers (BatchNorm "
                "once folded), explicit residual sums, element-wise activations and parameter-free linear modules "
                "(pooling, flatten, dropout in eval mode)"
            )

        def pre_hook(_module: nn.Module, _args: tuple) -> None:
            raise ValueError(message)

        return pre_hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        try:
            for name, module in self.model.named_modules():
                if isinstance(module, EXPLAINED_LAYERS):
                    check_explainable(name, module)
                if isinstance(module, EXPLAINED_LAYERS) or self.composite.rule_for(name, module, first=False):
                    pre_hook, hook = self._rule_hooks(name, module)
                    handles.append(module.register_forward_pre_hook(pre_hook))
                    handles.append(module.register_forward_hook(hook))
                elif (isinstance(module, (*_NORMS, *_UNSUPPORTED)) and not is_folded(module)) or (
                    not isinstance(module, _PARAMETRIC_PASS)
                    and not is_folded(module)
                    and next(module.parameters(recurse=False), None) is not None
                ):
                    handles.append(module.register_forward_pre_hook(self._stop(name, module)))
            yield
        finally:
            for handle in handles:
                handle.remove()


class LRP(Attributor):
    """Layer-wise Relevance Propagation (Bach et al., PLOS ONE 2015; Montavon et al. 2019), in the modular form
    of rules, composites and canonizers.

    Args:
        composite: which rule explains which layer: a name from
            :data:`~lightning_xai.attribution.lrp.composites.COMPOSITES` (``"epsilon_plus"``: zB at the first
            layer, z+ for convolutions, epsilon for dense layers; ``"epsilon_plus_flat"``, ``"epsilon_gamma_box"``,
            ``"epsilon_alpha2_beta1"``, ``"epsilon"``), a mapping ``{nn.Conv2d: Gamma(0.25), "classifier.6":
            Epsilon(1e-6)}`` (names override types; other layers get epsilon) or a
            :class:`~lightning_xai.attribution.lrp.composites.Composite`.
        canonizers: ``"auto"`` (a ResNetCanonizer for torchvision ResNet blocks, BatchNorm folding for any
            BatchNorm), ``None`` or a list of canonizers or names (``"resnet"``, ``"batchnorm_folding"``).
            They are undone after every call, also on error.
        epsilon: stabiliser of the epsilon rule (> 0), for the named composites and for layers a mapping leaves out.
        gamma: gamma of ``"epsilon_gamma_box"`` (>= 0).
        low, high: input bounds of the zB rule (numbers or per-channel sequences, in the units of the first
            layer's input, e.g. the normalised pixel range); inputs outside raise a ``ValueError``.

    Returns relevance with the input's shape (``[B, C, H, W]`` for images), signed, unnormalised. The model must
    consist of modules LRP has rules for (Linear/Conv, BatchNorm after folding, element-wise activations,
    pooling, flatten, dropout, parameter-free modules); any other module with parameters raises a ``ValueError``
    when it is called. Parameter-free functional operations in ``forward`` are handled by their gradient, which
    conserves relevance for additions, concatenations, reshapes and other linear homogeneous operations.
    """

    name = "lrp"
    requires_image = False

    def __init__(
        self,
        composite: str | Mapping[type[nn.Module] | str, Rule] | Composite = "epsilon_plus",
        canonizers: CanonizerSpec = "auto",
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        low: Bound = 0.0,
        high: Bound = 1.0,
    ) -> None:
        self.composite = composite
        self.canonizers = canonizers
        self.epsilon = check_float("epsilon", epsilon, minimum=0.0, strict=True, owner="LRP")
        self.gamma = check_float("gamma", gamma, minimum=0.0, owner="LRP")
        ZBox(low, high)  # validates the bounds
        self.low, self.high = low, high
        self._composite = build_composite(composite, epsilon=self.epsilon, gamma=self.gamma, low=low, high=high)
        self._canonizers = _check_canonizers(canonizers)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        canonizers = auto_canonizers(model) if self._canonizers == "auto" else self._canonizers
        with canonize(model, canonizers):
            self._composite.check(model)
            propagation = _Propagation(model, self._composite, inputs.shape)
            with propagation.installed():
                output = model_logits(model(inputs.clone()))
                seed = self._output_seed(output, target)
                leaves = propagation.leaves
                grads = torch.autograd.grad(output, [inputs, *leaves], grad_outputs=seed, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError("LRP: the explained score does not depend on the input: there is no gradient path to it")
        relevance = torch.zeros_like(inputs) if grads[0] is None else inputs.detach() * grads[0]
        for leaf, grad in zip(leaves, grads[1:]):
            if grad is not None:
                relevance = relevance + (leaf.detach() * grad).reshape(inputs.shape)
        return relevance

    def _output_seed(self, output: Tensor, target: Target) -> Tensor:
        """The gradient that starts the backward pass, so that ``output * seed`` is the output's relevance.

        For a class target ``d logit / d output`` is one-hot, and ``output * seed`` is one-hot times the logit.
        For a callable target the first-order decomposition ``output * d score / d output`` is used, rescaled to sum
        to the callable's score where it does not already:

        * where the decomposition sums to the score up to rounding (``|score - sum| <= 1e-5 * sum |terms|`` -
          every linear, bias-free score such as ``y[:, a] - y[:, b]``, also at near ties where the score itself
          is tiny), it is used exactly as it is (factor 1), so relevance is conserved exactly;
        * otherwise (a non-linear score, e.g. a softmax probability) it is rescaled by ``score / stabilize(sum,
          epsilon)`` (the epsilon rule applied to the score function).
        """
        scores = select_scores(output, target)
        if not scores.requires_grad:
            raise ValueError("LRP: the explained score does not depend differentiably on the model output")
        (seed,) = torch.autograd.grad(scores.sum(), output, retain_graph=True, allow_unused=True)
        if seed is None:
            raise ValueError("LRP: the explained score does not depend on the model output")
        if callable(target):
            terms = (output.detach() * seed).reshape(len(output), -1)
            total, size = terms.sum(1), terms.abs().sum(1)
            value = scores.detach()
            tolerance = 1e-5 * size + torch.finfo(size.dtype).tiny
            exact = (value - total).abs() <= tolerance
            factor = torch.where(exact, torch.ones_like(value), value / stabilize(total, self.epsilon))
            seed = seed * factor.view(-1, *([1] * (seed.ndim - 1)))
        return seed


class _EpsilonPreset(LRP):
    """An :class:`LRP` preset whose composite (``preset``) takes only the epsilon of its dense layers."""

    preset = ""

    def __init__(self, canonizers: CanonizerSpec = "auto", epsilon: float = 1e-6) -> None:
        super().__init__(self.preset, canonizers=canonizers, epsilon=epsilon)


class _BoxPreset(LRP):
    """An :class:`LRP` preset whose composite (``preset``) also has a zB rule at the first layer, bounded by
    ``[low, high]``."""

    preset = ""

    def __init__(
        self, canonizers: CanonizerSpec = "auto", epsilon: float = 1e-6, low: Bound = 0.0, high: Bound = 1.0
    ) -> None:
        super().__init__(self.preset, canonizers=canonizers, epsilon=epsilon, low=low, high=high)


class LRPEpsilon(_EpsilonPreset):
    """:class:`LRP` with the ``"epsilon"`` composite (epsilon rule everywhere), registered as ``"lrp_epsilon"``."""

    name = "lrp_epsilon"
    preset = "epsilon"


class LRPEpsilonPlus(_BoxPreset):
    """:class:`LRP` with ``"epsilon_plus"`` (zB / z+ / epsilon), registered as ``"lrp_epsilon_plus"``."""

    name = "lrp_epsilon_plus"
    preset = "epsilon_plus"


class LRPEpsilonPlusFlat(_EpsilonPreset):
    """:class:`LRP` with ``"epsilon_plus_flat"`` (flat / z+ / epsilon), registered as ``"lrp_epsilon_plus_flat"``."""

    name = "lrp_epsilon_plus_flat"
    preset = "epsilon_plus_flat"


class LRPEpsilonGammaBox(LRP):
    """:class:`LRP` with ``"epsilon_gamma_box"`` (zB / gamma / epsilon), registered as ``"lrp_epsilon_gamma_box"``."""

    name = "lrp_epsilon_gamma_box"

    def __init__(
        self,
        canonizers: CanonizerSpec = "auto",
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        low: Bound = 0.0,
        high: Bound = 1.0,
    ) -> None:
        super().__init__("epsilon_gamma_box", canonizers=canonizers, epsilon=epsilon, gamma=gamma, low=low, high=high)


class LRPEpsilonAlpha2Beta1(_BoxPreset):
    """:class:`LRP` with ``"epsilon_alpha2_beta1"`` (zB / alpha2-beta1 / epsilon), registered as
    ``"lrp_epsilon_alpha2_beta1"``."""

    name = "lrp_epsilon_alpha2_beta1"
    preset = "epsilon_alpha2_beta1"
