"""Attention-based attributions for transformers: attention rollout and gradient-weighted attention.

=================================================  ============================================  ===================
class (registry name)                              per-layer matrix ``A_l`` (heads fused)        combination
=================================================  ============================================  ===================
``AttentionRollout`` ("attention_rollout")         ``(1 - r) mean_h P_lh + r I``, rows sum to 1  ``A_L ... A_2 A_1``
``TransformerAttribution``                         ``mean_h relu(dS/dP_lh * P_lh)``              ``prod_l (I + A_l)``
("transformer_attribution")
=================================================  ============================================  ===================

``P_lh`` is the attention probability matrix ``[T, T]`` of head ``h`` in the ``l``-th attention call of the forward
pass, ``S`` the explained score. The relevance of the input tokens is the row of the query token (the class token,
``query=0``) of the combined matrix, without the prefix tokens (class / register tokens). For images
(``[B, C, H, W]``) the patch scores are laid out on the patch grid (:func:`~lightning_xai.attribution.token_grid.
infer_grid`) and upsampled: ``Tensor[B, 1, H, W]``; for token ids (``[B, T]``) they are returned per token:
``Tensor[B, T]`` (the model's own prefix tokens, e.g. a class token it prepends, are dropped).

**How the probabilities are obtained.** Every ``nn.MultiheadAttention`` (torchvision's ``VisionTransformer``,
``nn.TransformerEncoderLayer``, :mod:`lightning_xai.models.transformers`) is usually called with
``need_weights=False``, i.e. the fused kernel that never materialises ``P``. :func:`capture_attention` installs a
forward hook on each attention module that recomputes the module's output from its own parameters and arguments
(:func:`attention_forward`: the same projections, masks and softmax) with ``P`` materialised as a node of the
autograd graph, and hands that output downstream in place of the module's. Nothing of the model is changed (no
attribute, no flag, no parameter); the hooks are removed on exit, also on error. The recomputation agrees with the
module's own output to float rounding (tested). Dropout on the attention is not applied: attributors run in eval
mode.

References: Abnar and Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020 (rollout; ``r = 1/2`` models
the residual connection). Chefer, Gur and Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal
and Encoder-Decoder Transformers", ICCV 2021 (the gradient-weighted attention rule and the ``R <- R + A_l R``
update for self-attention), which simplifies the relevance-weighted rule of their "Transformer Interpretability
Beyond Attention Visualization", CVPR 2021.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.base import Attributor, Target, select_scores
from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.attribution.token_grid import UPSAMPLE_MODES, check_reshape, grid_to_image, infer_grid
from lightning_xai.attribution.tokens import run_on_tokens
from lightning_xai.checks import check_choice, check_float, check_int, check_optional_int

__all__ = [
    "AttentionRecord",
    "AttentionRollout",
    "TransformerAttribution",
    "attention_forward",
    "capture_attention",
    "rollout",
    "transformer_relevance",
]

_T = TypeVar("_T")
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
HEAD_FUSIONS = ("mean", "max", "min")


@dataclass
class AttentionRecord:
    """One call of an attention module: its dotted name and its probabilities ``[B, heads, T, S]`` (in the graph)."""

    name: str
    probs: Tensor


class _HalfGradient(torch.autograd.Function):
    """Identity forward, gradient halved backward: after a product of two inputs, each receives half of the
    relevance (the uniform rule in the gradient x input form of LRP)."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad / 2


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = not allowed) as an additive ``-inf`` mask; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_forward(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    relevance_rule: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``module``'s attention output (its own layout) and the probabilities ``[B, heads, T, S]``, computed as
    ``nn.MultiheadAttention`` computes them in eval mode (no dropout), with the probabilities materialised.

    ``relevance_rule`` changes only the backward pass, for LRP as a modified gradient (the forward values are the
    same): ``"attnlrp"`` halves the gradient after both matrix products ``Q K^T`` and ``P V`` (the uniform rule of
    AttnLRP for bilinear products; the softmax's plain gradient times its input is AttnLRP's softmax rule);
    ``"cp"`` treats the probabilities as constants in ``P V`` (CP-LRP, Ali et al., ICML 2022). ``None``: the
    plain gradient."""
    if relevance_rule not in (None, "attnlrp", "cp"):
        raise ValueError(f"unknown relevance_rule {relevance_rule!r}; valid values: [None, 'attnlrp', 'cp']")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("attention with bias_k / bias_v or add_zero_attn is not supported by the attention methods")
    unbatched = query.ndim == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if module.batch_first or unbatched:
        if unbatched:  # unbatched inputs are [T, E]: unsqueeze(1) made them [T, 1, E] (sequence first)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    else:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, tgt, embed = query.shape
    src = key.shape[1]
    heads, head_dim = module.num_heads, module.head_dim
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(batch, tgt, heads, head_dim).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(batch, src, heads, head_dim).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(batch, src, heads, head_dim).transpose(1, 2)
    scores = q @ k.transpose(-2, -1)
    if relevance_rule == "attnlrp":
        scores = _HalfGradient.apply(scores)
    scores = scores / math.sqrt(head_dim)  # [B, h, T, S]
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        mask = _additive(attn_mask, scores.dtype)
        scores = scores + (mask.view(batch, heads, tgt, src) if mask.ndim == 3 else mask)
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores.dtype)[:, None, None, :]
    probs = scores.softmax(dim=-1)
    mixed = (probs.detach() if relevance_rule == "cp" else probs) @ v
    if relevance_rule == "attnlrp":
        mixed = _HalfGradient.apply(mixed)
    out = mixed.transpose(1, 2).reshape(batch, tgt, embed)
    out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
    if unbatched:
        out = out.squeeze(0)
    elif not module.batch_first:
        out = out.transpose(0, 1)
    return out, probs


def _attention_modules(model: nn.Module, modules: Sequence[str | nn.Module] | None) -> list[tuple[str, nn.Module]]:
    if modules is None:
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no nn.MultiheadAttention module; the attention methods read the "
                "attention probabilities of nn.MultiheadAttention layers"
            )
        return found
    named = [resolve_layer(model, m) for m in modules]
    for name, module in named:
        if not isinstance(module, nn.MultiheadAttention):
            raise ValueError(f"attention module {name!r} is a {type(module).__name__}, not an nn.MultiheadAttention")
    return named


@contextlib.contextmanager
def capture_attention(
    model: nn.Module, modules: Sequence[str | nn.Module] | None = None, *, relevance_rule: str | None = None
) -> Iterator[list[AttentionRecord]]:
    """Record the attention probabilities of every call of the attention modules while the context is open.

    ``modules``: dotted names (or modules) of ``nn.MultiheadAttention`` layers; ``None`` = all of them. Yields the
    list of :class:`AttentionRecord`, in call order (one per call). See the module docstring for how; the hooks
    are removed on exit, also on error. ``relevance_rule``: see :func:`attention_forward`.
    """
    records: list[AttentionRecord] = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, _output: object) -> tuple:
            bound = _SIGNATURE.bind(module, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            out, probs = attention_forward(
                module,
                a["query"],
                a["key"],
                a["value"],
                a["key_padding_mask"],
                a["attn_mask"],
                a["is_causal"],
                relevance_rule=relevance_rule,
            )
            records.append(AttentionRecord(name, probs))
            weights = None
            if a["need_weights"]:
                weights = probs.mean(dim=1) if a["average_attn_weights"] else probs
                if a["query"].ndim == 2:
                    weights = weights.squeeze(0)
            return out, weights

        return hook

    handles = []
    try:
        for name, module in _attention_modules(model, modules):
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _fuse_heads(probs: Tensor, fusion: str) -> Tensor:
    if fusion == "mean":
        return probs.mean(dim=1)
    if fusion == "max":
        return probs.amax(dim=1)
    return probs.amin(dim=1)


def rollout(attentions: Sequence[Tensor], head_fusion: str = "mean", residual: float = 0.5) -> Tensor:
    """Attention rollout ``A_L ... A_1`` of per-layer probabilities ``[B, heads, T, T]`` (first layer first).

    ``A_l = (1 - residual) fuse_h(P_l) + residual I``, each row renormalised to sum to 1 (it already does for the
    mean fusion). Returns ``[B, T, T]``; row ``i`` is how much each token flows into token ``i`` at the top.
    """
    result: Tensor | None = None
    for probs in attentions:
        fused = _fuse_heads(probs, head_fusion)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        layer = (1 - residual) * fused + residual * eye
        layer = layer / layer.sum(dim=-1, keepdim=True)
        result = layer if result is None else layer @ result
    if result is None:
        raise ValueError("rollout needs at least one attention matrix")
    return result


def transformer_relevance(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Chefer et al.'s self-attention relevance: ``R = I``, then ``R <- R + mean_h relu(G_l * P_l) R`` per layer
    (first layer first). ``attentions`` / ``gradients``: ``[B, heads, T, T]`` each. Returns ``[B, T, T]``."""
    result: Tensor | None = None
    for probs, grad in zip(attentions, gradients, strict=True):
        layer = (grad * probs).clamp_min(0).mean(dim=1)
        if result is None:
            result = torch.eye(layer.shape[-1], dtype=layer.dtype, device=layer.device).expand_as(layer)
        result = result + layer @ result
    if result is None:
        raise ValueError("transformer_relevance needs at least one attention matrix")
    return result


class _AttentionMethod(Attributor):
    """Shared configuration, input handling and output layout of the attention methods (not registered)."""

    #: Explains token ids ``[B, T]`` as well as images (see :class:`~lightning_xai.attribution.tokens.TokenAttributor`).
    accepts_token_ids: bool = True
    #: Whether the method differentiates the score by the attention; if not, the forward pass runs without
    #: autograd first, and again with it only if some attention module was skipped.
    needs_gradient: bool = True

    def __init__(
        self,
        attention: Sequence[str] | None = None,
        query: int | str = 0,
        prefix_tokens: int | None = None,
        reshape: tuple[int, int] | None = None,
        upsample: str = "bilinear",
    ) -> None:
        owner = type(self).__name__
        if attention is not None and (isinstance(attention, str) or not isinstance(attention, Sequence)):
            raise ValueError(
                f"{owner}: attention must be None (every nn.MultiheadAttention) or a list of dotted "
                f"module names, got {attention!r}"
            )
        self.attention = None if attention is None else list(attention)
        if query != "mean":
            try:
                check_int("query", query, minimum=0, owner=owner)
            except ValueError:
                raise ValueError(
                    f"{owner}: query must be a token index >= 0 (0 = the class token) or 'mean', got {query!r}"
                ) from None
        self.query = query
        self.prefix_tokens = check_optional_int(
            "prefix_tokens", prefix_tokens, minimum=0, owner=owner, none_means="inferred"
        )
        self.reshape = check_reshape(reshape, owner)
        if callable(self.reshape):
            raise ValueError(f"{owner}: reshape must be None or a grid (h, w) for attention maps, not a callable")
        self.upsample = check_choice("upsample", upsample, UPSAMPLE_MODES, owner=owner)

    def run_in_context(
        self, model: nn.Module, inputs: Tensor, target: Target, fn: Callable[[nn.Module, Tensor, Target], _T]
    ) -> _T:
        if isinstance(inputs, Tensor) and not inputs.is_floating_point():
            return run_on_tokens(type(self).__name__, model, inputs, target, fn)
        return super().run_in_context(model, inputs, target, fn)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        modules = _attention_modules(model, self.attention)
        names = [name for name, _ in modules]
        output, records = None, []
        if not self.needs_gradient:
            with torch.no_grad(), capture_attention(model, names) as records:
                output = model(inputs)
        if self.needs_gradient or set(names) - {r.name for r in records}:
            for _, module in modules:
                # a fused fast path could skip nn.MultiheadAttention when nothing it reads requires grad (torch's
                # own nn.TransformerEncoderLayer also checks for hooks): with these parameters requiring grad it
                # cannot (model_state_guard restores the flags)
                for param in module.parameters():
                    param.requires_grad_(True)
            with capture_attention(model, names) as records:
                output = model(inputs)
        missing = sorted(set(names) - {r.name for r in records})
        if missing:
            raise ValueError(
                f"{type(self).__name__}: attention modules {missing} were not called in the forward pass; pass "
                "attention=[...] with the dotted names of the nn.MultiheadAttention modules the model uses"
            )
        probs = [r.probs for r in records]
        tokens = probs[0].shape[-1]
        for record in records:
            if record.probs.shape[-2:] != (tokens, tokens):
                raise ValueError(
                    f"{type(self).__name__} explains self-attention stacks with one token count; attention "
                    f"{record.name!r} has probabilities of shape {list(record.probs.shape)}, the first {tokens} tokens"
                )
        relevance = self._relevance(probs, output, target, [r.name for r in records]).detach()  # [B, T, T]
        row = relevance.mean(dim=1) if self.query == "mean" else relevance[:, self._query_index(tokens)]
        return self._layout(row, inputs)

    def _query_index(self, tokens: int) -> int:
        if int(self.query) >= tokens:
            raise ValueError(f"{type(self).__name__}: query={self.query} but the attention has {tokens} tokens")
        return int(self.query)

    def _layout(self, row: Tensor, inputs: Tensor) -> Tensor:
        """Token scores ``[B, T_attn]`` -> ``[B, T]`` (token inputs) or ``[B, 1, H, W]`` (images)."""
        batch, tokens = row.shape
        if inputs.ndim == 4:
            size = (inputs.shape[-2], inputs.shape[-1])
            if self.reshape is not None:
                h, w = self.reshape
                prefix = tokens - h * w
                if prefix < 0:
                    raise ValueError(f"reshape={self.reshape} needs {h * w} patch tokens, the attention has {tokens}")
            else:
                prefix, (h, w) = infer_grid(tokens, size, self.prefix_tokens)
            return grid_to_image(row[:, prefix:].reshape(batch, h, w), size, self.upsample)
        length = inputs.shape[1]
        prefix = tokens - length if self.prefix_tokens is None else self.prefix_tokens
        if prefix < 0 or tokens - prefix != length:
            raise ValueError(
                f"{type(self).__name__}: the attention has {tokens} tokens but the input has {length} tokens "
                f"(prefix_tokens={self.prefix_tokens}); set prefix_tokens to the number of tokens the model prepends"
            )
        return row[:, prefix:]

    def _relevance(self, probs: list[Tensor], output: object, target: Target, names: list[str]) -> Tensor:
        raise NotImplementedError


class AttentionRollout(_AttentionMethod):
    """Attention rollout (Abnar and Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

    The attention of every layer, heads fused and mixed with the identity for the residual connection, multiplied
    through the layers (see the module docstring). Class-agnostic: ``target`` is validated but does not change
    the map (the paper's method explains what the query token attends to, not a class). One forward pass.

    Args:
        attention: dotted names of the ``nn.MultiheadAttention`` modules, in any order (they are used in call
            order); ``None`` = all.
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"``.
        residual: weight ``r`` of the identity, in ``[0, 1]`` (the paper: 0.5).
        query: the token whose row is read (0 = the class token), or ``"mean"`` (the mean over all rows, for
            mean-pooled models).
        prefix_tokens: leading non-input tokens (class, register tokens); ``None`` = inferred.
        reshape: the patch grid ``(h, w)`` for images; ``None`` = inferred from the token count.
        upsample: ``"bilinear"`` (as the CAM family) or ``"nearest"`` (one constant value per patch).

    Returns ``Tensor[B, 1, H, W]`` for images, ``Tensor[B, T]`` for token ids; non-negative.
    """

    name = "attention_rollout"
    needs_gradient = False

    def __init__(
        self,
        attention: Sequence[str] | None = None,
        head_fusion: str = "mean",
        residual: float = 0.5,
        query: int | str = 0,
        prefix_tokens: int | None = None,
        reshape: tuple[int, int] | None = None,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__(attention, query, prefix_tokens, reshape, upsample)
        self.head_fusion = check_choice("head_fusion", head_fusion, HEAD_FUSIONS, owner=type(self).__name__)
        self.residual = check_float("residual", residual, minimum=0.0, maximum=1.0, owner=type(self).__name__)

    def _relevance(self, probs: list[Tensor], output: object, target: Target, names: list[str]) -> Tensor:
        select_scores(output, target)  # validates the target against the output
        return rollout([p.detach() for p in probs], self.head_fusion, self.residual)


class TransformerAttribution(_AttentionMethod):
    """Gradient-weighted attention relevance (Chefer, Gur and Wolf, "Generic Attention-model Explainability for
    Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021; the self-attention rule).

    ``A_l = mean_h relu(dS/dP_lh * P_lh)`` and ``R = prod_l (I + A_l)`` (``R <- R + A_l R``, first layer first):
    class-specific, because the gradient of the explained score weighs each head's attention. One forward and
    one backward pass (gradients with respect to the attention probabilities only).

    Args: as :class:`AttentionRollout`, without ``head_fusion`` / ``residual``.

    Returns ``Tensor[B, 1, H, W]`` for images, ``Tensor[B, T]`` for token ids; non-negative.
    """

    name = "transformer_attribution"

    def _relevance(self, probs: list[Tensor], output: object, target: Target, names: list[str]) -> Tensor:
        scores = select_scores(output, target)
        if not scores.requires_grad:
            raise ValueError(f"{type(self).__name__}: the explained score has no gradient path to the attention")
        grads = torch.autograd.grad(scores.sum(), probs, allow_unused=True)
        unused = [n for n, g in zip(names, grads, strict=True) if g is None]
        if len(unused) == len(names):
            raise ValueError(f"{type(self).__name__}: the explained score does not depend on any attention layer")
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(probs, grads, strict=True)]
        return transformer_relevance([p.detach() for p in probs], grads)
