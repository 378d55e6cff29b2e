"""LRP for transformers: AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022).

Relevance is computed in the *gradient x input* form of LRP (as the rest of :mod:`lightning_xai.attribution.lrp`):
the explained logit's gradient is propagated with each operation's backward pass replaced by its rule, and the
relevance of a tensor ``x`` is ``x * (modified gradient at x)``. The forward values are never changed. The rules:

=============================  ===========================================================================
operation                      rule (modified backward)
=============================  ===========================================================================
linear layers, convolutions,   epsilon rule with a vanishing stabiliser: the plain gradient (LRP-0)
residual sums, token pooling
``nn.LayerNorm``               the standard deviation is a constant (identity rule on the normalisation):
                               the gradient of ``(x - mean(x)) / stop_grad(std) * w + b``
``nn.GELU``, ``nn.SiLU``,      identity rule, ``R_in = R_out``: gradient ``g_out * f(x) / x``
``nn.Tanh``, ``nn.ELU``, ...
attention ``softmax``          AttnLRP: plain gradient x input, which is exactly the paper's softmax rule
                               ``R_in = x * (R_out - s * sum(R_out))``
``Q K^T`` and ``P V``          AttnLRP: uniform rule, each factor gets half the relevance (gradient / 2);
                               CP-LRP (``attention_rule="cp"``): ``P`` is a constant, ``V`` gets it all
=============================  ===========================================================================

Conservation: every rule above conserves relevance except AttnLRP's softmax rule, whose Taylor expansion leaves
a bias term, and the additive parameters (biases, LayerNorm shifts, position embeddings, the class token), which
absorb their share. So on a model without additive parameters CP-LRP's input relevance sums exactly to the
explained logit, and AttnLRP's up to the softmax terms (both tested on a small ViT).

Models: every ``nn.MultiheadAttention`` is explained through the hook of
:func:`~lightning_xai.attribution.attention.capture_attention` (torchvision's ``VisionTransformer``,
``nn.TransformerEncoderLayer``, :mod:`lightning_xai.models.transformers`); LayerNorm and the activations must be
modules (a functional ``F.gelu`` in a ``forward`` is seen as its plain gradient). Normalisations without a rule
(BatchNorm, GroupNorm, ...) and ``nn.Softmax`` modules raise. Token-id inputs are explained at the embedding layer
named by ``embedding`` (relevance summed over the embedding dimension, ``Tensor[B, T]``); image inputs return the
relevance of every input element, ``Tensor[B, C, H, W]``, like :class:`~lightning_xai.attribution.lrp.LRP`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_xai.attribution.attention import capture_attention
from lightning_xai.attribution.base import Attributor, Target, select_scores
from lightning_xai.attribution.tokens import embedding_swap, run_on_tokens
from lightning_xai.checks import check_choice, check_float

__all__ = ["AttnLRP", "transformer_rules"]

_T = TypeVar("_T")
#: Element-wise activations explained by the identity rule (ReLU-like activations need none: their gradient x
#: input already passes the relevance unchanged).
IDENTITY_RULE = (nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.Softplus, nn.Mish, nn.Sigmoid, nn.Hardswish)
#: Modules without a rule here.
UNSUPPORTED = (
    _BatchNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
)
ATTENTION_RULES = ("attnlrp", "cp")


class _IdentityRule(torch.autograd.Function):
    """Forward: ``f(x)`` (given); backward: ``g * f(x) / x``, so that ``x * grad_x = f(x) * g`` (``R_in = R_out``)."""

    @staticmethod
    def forward(ctx: object, x: Tensor, y: Tensor, epsilon: float) -> Tensor:
        ctx.save_for_backward(y / torch.where(x >= 0, x + epsilon, x - epsilon))
        return y.view_as(y)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None, None]:
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None, None


def _layer_norm_constant_std(module: nn.LayerNorm, x: Tensor) -> Tensor:
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = x - x.mean(dim=dims, keepdim=True)
    std = (centred.square().mean(dim=dims, keepdim=True) + module.eps).sqrt()
    y = centred / std.detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


@contextlib.contextmanager
def transformer_rules(model: nn.Module, attention_rule: str = "attnlrp", epsilon: float = 1e-9) -> Iterator[None]:
    """Attach the rules of the module docstring to ``model`` for the duration (hooks, removed on exit)."""
    unsupported = sorted({type(m).__name__ for m in model.modules() if isinstance(m, UNSUPPORTED)})
    if unsupported:
        raise ValueError(
            f"AttnLRP has no rule for {unsupported} in {type(model).__name__}; explain a model built from linear "
            "layers, LayerNorm, element-wise activations and nn.MultiheadAttention"
        )
    handles = []

    def layer_norm_hook(module: nn.LayerNorm, args: tuple, _output: Tensor) -> Tensor:
        return _layer_norm_constant_std(module, args[0])

    def identity_hook(_module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return _IdentityRule.apply(args[0], output, epsilon)

    try:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                handles.append(module.register_forward_hook(layer_norm_hook))
            elif isinstance(module, IDENTITY_RULE):
                handles.append(module.register_forward_hook(identity_hook))
        has_attention = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        with capture_attention(model, relevance_rule=attention_rule) if has_attention else contextlib.nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()


class AttnLRP(Attributor):
    """Layer-wise Relevance Propagation for transformers (see the module docstring for the rules).

    Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin and Samek, "AttnLRP: Attention-Aware Layer-Wise Relevance
    Propagation for Transformers", ICML 2024; with ``attention_rule="cp"``: Ali, Schnake, Eberle, Montavon, Müller
    and Wolf, "XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022.

    Args:
        attention_rule: ``"attnlrp"`` (softmax rule + uniform rule on the attention products) or ``"cp"``
            (attention probabilities as constants).
        embedding: for token-id inputs, the dotted name of the embedding layer whose output's relevance is
            reported (summed over the embedding dimension); ignored for float inputs.
        epsilon: stabiliser of the identity rule's division.

    One forward and one backward pass. Returns the input's shape for float inputs (``[B, C, H, W]`` for images),
    ``Tensor[B, T]`` for token ids. Signed, not normalised.
    """

    name = "attnlrp"

    def __init__(self, attention_rule: str = "attnlrp", embedding: str | None = None, epsilon: float = 1e-9) -> None:
        owner = type(self).__name__
        self.attention_rule = check_choice("attention_rule", attention_rule, ATTENTION_RULES, owner=owner)
        if embedding is not None and (not isinstance(embedding, str) or not embedding):
            raise ValueError(f"{owner}: embedding must be None or a dotted layer name, got {embedding!r}")
        self.embedding = embedding
        self.epsilon = check_float("epsilon", epsilon, minimum=0.0, strict=True, owner=owner)

    @property
    def accepts_token_ids(self) -> bool:
        """Token ids ``[B, T]`` are explained when an ``embedding`` layer is named."""
        return self.embedding is not None

    def run_in_context(
        self, model: nn.Module, inputs: Tensor, target: Target, fn: Callable[[nn.Module, Tensor, Target], _T]
    ) -> _T:
        if isinstance(inputs, Tensor) and not inputs.is_floating_point():
            if self.embedding is None:
                raise ValueError(
                    f"{type(self).__name__} explains token ids at an embedding layer: pass embedding='<dotted name>'"
                )
            return run_on_tokens(type(self).__name__, model, inputs, target, fn)
        return super().run_in_context(model, inputs, target, fn)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        if inputs.is_floating_point():
            with transformer_rules(model, self.attention_rule, self.epsilon):
                scores = select_scores(model(inputs.clone()), target)
            return inputs.detach() * self._gradient(scores, inputs)
        assert self.embedding is not None
        with embedding_swap(model, self.embedding) as swap, transformer_rules(model, self.attention_rule, self.epsilon):
            scores = select_scores(swap.run(model, inputs, lambda e: e.detach().requires_grad_(True)), target)
        embedded = swap.output
        assert embedded is not None
        return (embedded.detach() * self._gradient(scores, embedded)).sum(dim=-1)

    def _gradient(self, scores: Tensor, at: Tensor) -> Tensor:
        if not scores.requires_grad:
            raise ValueError(f"{type(self).__name__}: the explained score has no gradient path to the input")
        (grad,) = torch.autograd.grad(scores.sum(), at, allow_unused=True)
        if grad is None:
            raise ValueError(f"{type(self).__name__}: the explained score does not depend on the input")
        return grad
