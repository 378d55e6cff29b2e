"""Token attributions: which tokens of a sequence drove one decision of a model that reads token ids.

A text model's input is a ``LongTensor[B, T]`` of token ids, which has no gradient. The gradient methods therefore
work on the output of an **embedding layer named by dotted path** (``"embedding"``, ``"backbone.embed_tokens"``;
the first call of that module in each forward pass), exactly as gradient methods on images work on pixels, and
reduce the embedding dimension to one score per token. The perturbation methods replace tokens by a mask token.
All return ``Tensor[B, T]`` (signed raw values, one per input token), detached, on the inputs' device.

=======================================  ======================================================  ==================
class (registry name)                    score of token ``t``                                    model evaluations
=======================================  ======================================================  ==================
``TokenSaliency`` ("token_saliency")     ``||ds/de_t||_2`` (or the L1 norm)                      1 fwd + bwd
``TokenInputXGradient``                  ``<e_t, ds/de_t>``                                      1 fwd + bwd
``TokenIntegratedGradients``             ``<e_t - e'_t, integral of ds/de along e' -> e>``       ``steps`` fwd + bwd
``TokenOcclusion`` ("token_occlusion")   ``s(x) - s(x with t masked)``, averaged over windows    ``T`` forwards
=======================================  ======================================================  ==================

``e_t`` is the embedding-layer output at position ``t``; ``e'`` the baseline: the zero vector (``baseline=
"zeros"``) or the embedding of a token id (``baseline=PAD`` / ``MASK``; Captum's ``LayerIntegratedGradients`` on
an embedding layer with a pad reference is the same method). ``skip_tokens`` are ids that are never perturbed and
get attribution 0 (padding, ``[CLS]``, ``[SEP]``): they keep their id in the baseline and are never occluded.

The attributor contract holds as for image methods (:mod:`lightning_xai.attribution.base`): no side effects (the
embedding hook is removed in ``finally``, parameter ``.grad`` untouched), usable under ``no_grad`` /
``inference_mode``, multi-evaluation methods chunked by ``batch_size`` model inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import (
    Attributor,
    Target,
    chunk_slices,
    gradient_context,
    model_state_guard,
    select_scores,
    validate_target,
)
from lightning_xai.attribution.gradient import IntegratedGradients
from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.checks import check_choice, check_int

__all__ = [
    "EmbeddingSwap",
    "TokenAttributor",
    "TokenInputXGradient",
    "TokenIntegratedGradients",
    "TokenOcclusion",
    "TokenSaliency",
    "embedding_swap",
    "run_on_tokens",
    "validate_token_batch",
]

_T = TypeVar("_T")


def validate_token_batch(inputs: Tensor, method: str) -> None:
    """Raise a clear error for inputs that are not a batch of token ids ``LongTensor[B, T]``."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{method}: inputs must be a torch.Tensor of token ids, got {type(inputs).__name__}")
    if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool:
        raise TypeError(f"{method} explains token ids (an integer tensor [B, T]); got dtype {inputs.dtype}")
    if inputs.ndim != 2 or inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"{method} explains token batches of shape [B, T] with B, T >= 1; got {list(inputs.shape)}")


def _check_token_ids(name: str, values: Sequence[int], owner: str) -> tuple[int, ...]:
    if isinstance(values, (int, str)) or not isinstance(values, Sequence):
        raise ValueError(f"{owner}: {name} must be a list of token ids, got {values!r}")
    return tuple(check_int(f"{name}[{i}]", v, minimum=0, owner=owner) for i, v in enumerate(values))


def _chunk_target(target: Target, index: Tensor | slice) -> Target:
    if isinstance(target, Tensor) and target.ndim == 1:
        return target[index]
    return target


def run_on_tokens(
    method: str, model: nn.Module, inputs: Tensor, target: Target, fn: Callable[[nn.Module, Tensor, Target], _T]
) -> _T:
    """``fn(model, ids, target)`` for token-id inputs, in the no-side-effect context of
    :meth:`~lightning_xai.attribution.base.Attributor.run_in_context` (checks, eval mode, state restored,
    autograd enabled also under ``no_grad`` / ``inference_mode``); ``ids`` is a copy of ``inputs``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{method}: model must be a torch.nn.Module, got {type(model).__name__}")
    validate_token_batch(inputs, method)
    if not callable(target):
        validate_target(target, inputs.shape[0], None)
    with model_state_guard(model), gradient_context():
        ids = inputs.detach().clone()
        if isinstance(target, Tensor):
            target = target.detach().clone().to(ids.device)
        return fn(model, ids, target)


class TokenAttributor(Attributor):
    """Base of the methods that explain token-id inputs ``LongTensor[B, T]`` (not registered).

    ``__call__`` checks the ids and the target, enters the no-side-effect context of
    :class:`~lightning_xai.attribution.base.Attributor` and passes a copy of the ids (token ids have no gradient;
    the methods take gradients at the embedding layer).
    """

    #: Explains token ids ``[B, T]`` (callbacks check this before passing integer inputs; image methods lack it).
    accepts_token_ids: bool = True

    def __init__(self, skip_tokens: Sequence[int] = ()) -> None:
        self.skip_tokens = _check_token_ids("skip_tokens", skip_tokens, type(self).__name__)

    def run_in_context(
        self, model: nn.Module, inputs: Tensor, target: Target, fn: Callable[[nn.Module, Tensor, Target], _T]
    ) -> _T:
        return run_on_tokens(type(self).__name__, model, inputs, target, fn)

    def skipped(self, ids: Tensor) -> Tensor:
        """``bool[B, T]``: positions holding a ``skip_tokens`` id (never perturbed, attribution 0)."""
        skip = torch.zeros_like(ids, dtype=torch.bool)
        for token in self.skip_tokens:
            skip |= ids == token
        return skip


# ---------------------------------------------------------------------------------------------------------------
# the embedding hook
# ---------------------------------------------------------------------------------------------------------------


class EmbeddingSwap:
    """State of :func:`embedding_swap`: runs the model with the embedding layer's output recorded or replaced."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.replace: Tensor | Callable[[Tensor], Tensor] | None = None
        self.output: Tensor | None = None
        self.calls = 0

    def run(self, model: nn.Module, ids: Tensor, replace: Tensor | Callable[[Tensor], Tensor] | None = None) -> object:
        """``model(ids)`` with the first embedding call's output replaced by ``replace`` (a tensor of the same shape,
        or a callable ``output -> new output``); the tensor used downstream is left in ``self.output``."""
        self.calls, self.output, self.replace = 0, None, replace
        try:
            out = model(ids)
        finally:
            self.replace = None
        if self.calls == 0:
            raise ValueError(
                f"the embedding layer {self.name!r} was not called in the forward pass; name the layer "
                "that embeds the input tokens"
            )
        return out

    def hook(self, _module: nn.Module, _inputs: tuple, output: object) -> Tensor | None:
        self.calls += 1
        if self.calls > 1:
            return None
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise TypeError(
                f"embedding layer {self.name!r} must return a floating-point tensor, got "
                f"{getattr(output, 'dtype', type(output).__name__)}"
            )
        new = output
        if callable(self.replace):
            new = self.replace(output)
        elif self.replace is not None:
            if self.replace.shape != output.shape:
                raise ValueError(
                    f"replacement of shape {list(self.replace.shape)} for embedding {self.name!r} of "
                    f"shape {list(output.shape)}"
                )
            new = self.replace.to(output.dtype)
        self.output = new
        return None if new is output else new


@contextlib.contextmanager
def embedding_swap(model: nn.Module, layer: str | nn.Module) -> Iterator[EmbeddingSwap]:
    """A forward hook on ``layer`` (dotted name or module) for :class:`EmbeddingSwap`, removed on exit."""
    name, module = resolve_layer(model, layer)
    swap = EmbeddingSwap(name)
    handle = module.register_forward_hook(swap.hook)
    try:
        yield swap
    finally:
        handle.remove()


def _leaf(output: Tensor) -> Tensor:
    return output.detach().requires_grad_(True)


def _check_layer(layer: object, owner: str) -> str | nn.Module:
    if isinstance(layer, nn.Module) or (isinstance(layer, str) and layer):
        return layer
    raise ValueError(
        f"{owner}: embedding must be the dotted name of the embedding layer (e.g. 'embedding') or the "
        f"module itself, got {layer!r}"
    )


class _EmbeddingGradient(TokenAttributor):
    """One forward + backward per chunk of ``batch_size`` sequences, gradient at the embedding (not registered)."""

    def __init__(
        self, embedding: str | nn.Module = "embedding", skip_tokens: Sequence[int] = (), batch_size: int = 64
    ) -> None:
        super().__init__(skip_tokens)
        self.embedding = _check_layer(embedding, type(self).__name__)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=type(self).__name__)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        parts = []
        with embedding_swap(model, self.embedding) as swap:
            for sl in chunk_slices(inputs.shape[0], self.batch_size):
                scores = select_scores(swap.run(model, inputs[sl], _leaf), _chunk_target(target, sl))
                emb = swap.output
                assert emb is not None
                if not scores.requires_grad:
                    raise ValueError(
                        f"{type(self).__name__}: the explained score has no gradient path to the "
                        f"embedding layer {swap.name!r}"
                    )
                (grad,) = torch.autograd.grad(scores.sum(), emb, allow_unused=True)
                if grad is None:
                    raise ValueError(f"{type(self).__name__}: the score does not depend on embedding {swap.name!r}")
                parts.append(self._reduce(emb.detach(), grad))
        return torch.cat(parts).masked_fill(self.skipped(inputs), 0.0)

    def _reduce(self, embedding: Tensor, grad: Tensor) -> Tensor:
        raise NotImplementedError


class TokenSaliency(_EmbeddingGradient):
    """Gradient magnitude per token: ``||d s / d e_t||`` over the embedding dimension.

    The saliency of Simonyan et al. (ICLR Workshop 2014) carried to text by Li, Chen, Hovy and Jurafsky,
    "Visualizing and Understanding Neural Models in NLP", NAACL 2016 (first-derivative saliency of word
    embeddings). ``norm="l2"`` (default) or ``"l1"``. Non-negative.

    Args:
        embedding: dotted name (or module) of the embedding layer.
        norm: ``"l2"`` or ``"l1"``.
        skip_tokens: token ids given attribution 0.
        batch_size: most sequences per forward pass.
    """

    name = "token_saliency"

    def __init__(
        self,
        embedding: str | nn.Module = "embedding",
        norm: str = "l2",
        skip_tokens: Sequence[int] = (),
        batch_size: int = 64,
    ) -> None:
        super().__init__(embedding, skip_tokens, batch_size)
        self.norm = check_choice("norm", norm, ("l2", "l1"), owner=type(self).__name__)

    def _reduce(self, embedding: Tensor, grad: Tensor) -> Tensor:
        return grad.norm(p=2 if self.norm == "l2" else 1, dim=-1)


class TokenInputXGradient(_EmbeddingGradient):
    """``<e_t, d s / d e_t>``: input x gradient (Shrikumar et al., arXiv:1605.01713, 2016) on the embeddings,
    summed over the embedding dimension. Signed; for a model linear in the embeddings it sums to
    ``s(e) - s(0)``.

    Args: as :class:`TokenSaliency`, without ``norm``.
    """

    name = "token_input_x_gradient"

    def _reduce(self, embedding: Tensor, grad: Tensor) -> Tensor:
        return (embedding * grad).sum(dim=-1)


class TokenIntegratedGradients(TokenAttributor):
    """Integrated Gradients (Sundararajan, Taly and Yan, ICML 2017) in embedding space, one score per token.

    ``IG_t = <e_t - e'_t, integral_0^1 d s(e' + a (e - e')) / d e_t da>``: the path runs from the baseline
    embeddings ``e'`` to the input's embeddings ``e`` at the embedding layer; the positions of ``skip_tokens``
    keep their own embedding on the whole path (so they get exactly 0). Completeness: ``sum_t IG_t = s(e) -
    s(e')`` up to the quadrature error (:meth:`attribute_with_gap` returns the gap).

    Args:
        embedding: dotted name (or module) of the embedding layer.
        baseline: ``"zeros"`` (the zero vector at every position) or a token id (``e'_t`` = the embedding layer's
            output when every non-skipped token is replaced by that id, e.g. a pad or mask token).
        steps, method: quadrature, as :class:`~lightning_xai.attribution.gradient.IntegratedGradients`
            (``"riemann_trapezoid"`` or ``"gauss_legendre"``).
        skip_tokens: token ids never perturbed, attribution 0.
        batch_size: most path points per forward pass.
    """

    name = "token_integrated_gradients"

    def __init__(
        self,
        embedding: str | nn.Module = "embedding",
        baseline: str | int = "zeros",
        steps: int = 32,
        method: str = "gauss_legendre",
        skip_tokens: Sequence[int] = (),
        batch_size: int = 64,
    ) -> None:
        super().__init__(skip_tokens)
        owner = type(self).__name__
        self.embedding = _check_layer(embedding, owner)
        if not (
            baseline == "zeros" or (isinstance(baseline, int) and not isinstance(baseline, bool) and baseline >= 0)
        ):
            raise ValueError(
                f"{owner}: baseline must be 'zeros' or a token id (int >= 0, e.g. the pad or mask token), "
                f"got {baseline!r}"
            )
        self.baseline = baseline
        self._quadrature = IntegratedGradients(steps=steps, method=method)  # validates steps and method
        self.steps, self.method = steps, method
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        return self._integrate(model, inputs, target, with_gap=False)[0]

    def attribute_with_gap(self, model: nn.Module, inputs: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        """Attributions and the completeness gap ``sum_t IG_t - (s(e) - s(e'))`` per sample, ``Tensor[B]``."""
        attributions, gap = self.run_in_context(
            model, inputs, target, lambda m, x, t: self._integrate(m, x, t, with_gap=True)
        )
        assert gap is not None
        return attributions.detach(), gap.detach()

    def _embeddings(self, swap: EmbeddingSwap, model: nn.Module, ids: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        """The embeddings and scores of ``ids`` (no gradient), in chunks."""
        embeddings, scores = [], []
        with torch.no_grad():
            for sl in chunk_slices(ids.shape[0], self.batch_size):
                scores.append(select_scores(swap.run(model, ids[sl]), _chunk_target(target, sl)))
                embeddings.append(swap.output)
        return torch.cat(embeddings), torch.cat(scores)

    def _integrate(
        self, model: nn.Module, ids: Tensor, target: Target, *, with_gap: bool
    ) -> tuple[Tensor, Tensor | None]:
        skip = self.skipped(ids)
        with embedding_swap(model, self.embedding) as swap:
            emb, scores = self._embeddings(swap, model, ids, target)
            if self.baseline == "zeros":
                base = torch.where(skip[..., None], emb, torch.zeros_like(emb))
            else:
                base_ids = torch.where(skip, ids, torch.full_like(ids, int(self.baseline)))
                base = self._embeddings(swap, model, base_ids, target)[0]
            delta = emb - base
            alphas, weights = self._quadrature.quadrature(emb.dtype, emb.device)
            batch, n = ids.shape[0], alphas.numel()
            integral = torch.zeros_like(emb)
            for sl in chunk_slices(batch * n, self.batch_size):
                rows = torch.arange(sl.start, sl.stop, device=ids.device)
                k, b = rows // batch, rows % batch
                points = (base[b] + alphas[k, None, None] * delta[b]).requires_grad_(True)
                out = select_scores(swap.run(model, ids[b], points), _chunk_target(target, b))
                if not out.requires_grad:
                    raise ValueError(
                        f"{type(self).__name__}: the explained score has no gradient path to the "
                        f"embedding layer {swap.name!r}"
                    )
                (grad,) = torch.autograd.grad(out.sum(), points)
                integral.index_add_(0, b, grad * weights[k, None, None])
            attributions = (delta * integral).sum(dim=-1).masked_fill(skip, 0.0)
            if not with_gap:
                return attributions, None
            reference = torch.cat(
                [
                    select_scores(swap.run(model, ids[sl], base[sl]), _chunk_target(target, sl)).detach()
                    for sl in chunk_slices(batch, self.batch_size)
                ]
            )
        return attributions, attributions.sum(dim=1) - (scores - reference)


class TokenOcclusion(TokenAttributor):
    """Occlusion over tokens: the score drop when a window of tokens is replaced by a mask token.

    The occlusion of Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, with
    tokens for pixels (leave-one-out for ``window=1``, as in Li, Monroe and Jurafsky, "Understanding Neural
    Networks through Representation Erasure", arXiv:1612.08220, 2016). Every window of ``window`` consecutive
    positions (stride 1) is evaluated with its non-skipped tokens replaced by ``mask_token``; each token's score
    is the mean of ``s(x) - s(x_occluded)`` over the windows that cover it. Model-agnostic (no embedding layer,
    no gradient). Cost: at most ``B * (T - window + 1)`` forward passes in chunks of ``batch_size`` (windows made
    of skipped tokens only, e.g. padding, are not evaluated).

    Args:
        mask_token: the id that replaces occluded tokens (a ``[MASK]``/``[UNK]``/pad id).
        window: tokens occluded together, ``>= 1``.
        skip_tokens: ids never occluded, attribution 0 (e.g. padding, whose replacement would change the
            attention mask).
        batch_size: most occluded sequences per forward pass.
    """

    name = "token_occlusion"

    def __init__(
        self, mask_token: int = 1, window: int = 1, skip_tokens: Sequence[int] = (), batch_size: int = 64
    ) -> None:
        super().__init__(skip_tokens)
        owner = type(self).__name__
        self.mask_token = check_int("mask_token", mask_token, minimum=0, owner=owner)
        self.window = check_int("window", window, minimum=1, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        ids = inputs
        batch, length = ids.shape
        if self.window > length:
            raise ValueError(f"{type(self).__name__}: window={self.window} is longer than the sequences ({length})")
        skip = self.skipped(ids)
        starts = length - self.window + 1
        with torch.no_grad():
            scores = torch.cat(
                [
                    select_scores(model(ids[sl]), _chunk_target(target, sl))
                    for sl in chunk_slices(batch, self.batch_size)
                ]
            )
            total = torch.zeros(batch, length, dtype=scores.dtype, device=ids.device)
            count = torch.zeros(batch, length, dtype=scores.dtype, device=ids.device)
            offsets = torch.arange(self.window, device=ids.device)
            # the (window, sample) pairs with something to occlude, window-major; windows of skipped tokens only
            # (padding) change nothing and are not evaluated
            windows = torch.arange(starts, device=ids.device)[:, None] + offsets  # [starts, window]
            useful = (~skip[:, windows]).any(dim=2).T  # [starts, B]
            pairs_w, pairs_b = useful.nonzero(as_tuple=True)
            for sl in chunk_slices(pairs_w.numel(), self.batch_size):
                w, b = pairs_w[sl], pairs_b[sl]
                positions = windows[w]  # [n, window]
                occluded = ids[b].clone()
                keep = skip[b].gather(1, positions)
                occluded.scatter_(1, positions, torch.where(keep, occluded.gather(1, positions), self.mask_token))
                drop = scores[b] - select_scores(model(occluded), _chunk_target(target, b))
                total.index_put_(
                    (b[:, None].expand_as(positions), positions), drop[:, None].expand_as(positions), accumulate=True
                )
                count.index_put_(
                    (b[:, None].expand_as(positions), positions),
                    torch.ones_like(positions, dtype=count.dtype),
                    accumulate=True,
                )
        return (total / count).masked_fill(skip, 0.0)
