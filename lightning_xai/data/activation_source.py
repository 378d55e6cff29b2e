"""Activations of a frozen model's layer as training data: the source (which layer, which vectors) and the batch.

See :mod:`lightning_xai.data.activations` for the overview (source, on-disk cache, datamodule). This module holds
:class:`ActivationSource` (a frozen model and a layer named by dotted path, read in eval mode under ``no_grad``,
turned into vectors by ``spatial``), :class:`ActivationBatch` and the helpers the post-hoc modules use to read
batches.

**Token models** (``spatial="tokens"``): a layer of a transformer that emits the residual stream ``[B, T, D]`` for
integer token ids ``[B, T_in]`` gives one ``D``-vector per *non-padding* position, ``[N, D]`` with ``N`` the number
of real tokens (sequence-major, then position order), as the sparse autoencoders on language models of Cunningham
et al. (ICLR 2024) and Bricken et al. (2023) are trained. Padding is the ``pad_token`` id of the inputs (default:
the model's own ``pad_token`` attribute, e.g. :class:`~lightning_xai.models.transformers.TextTransformer`'s) and/or
an ``attention_mask`` (1 = real token) of a dict batch. A layer may emit more positions than there are input
tokens (a class token the model prepends): the ``T - T_in`` extra positions are taken as *leading* and real.
Padding positions are left out of the training rows, the metrics and the scale estimate; when a reconstruction is
spliced back (:meth:`ActivationSource.splice`, :meth:`ActivationSource.model_output`) they keep the layer's own
output, and zero-ablation zeroes the real positions only, so the downstream figures compare like with like.

Formerly part of ``lightning_xai.models.activations``, which re-exports every name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import model_device, model_state_guard
from lightning_xai.attribution.layers import capture_layer, forward_until_stopped, resolve_layer, stop_after_calls
from lightning_xai.batch import BatchReader
from lightning_xai.checks import check_bool, check_choice, check_int
from lightning_xai.data.activation_batch import (
    ActivationBatch,
    _attention_mask_of,
    as_activation_batch,
)
from lightning_xai.data.frozen_model import (
    _layers_with_token_outputs,
    _model_pad_token,
    load_weights,
    model_fingerprint,
)
from lightning_xai.distributed import Reducer, default_reducer

__all__ = [
    "CACHE_DTYPES",
    "SPATIAL_MODES",
    "ActivationBatch",
    "ActivationSource",
    "as_activation_batch",
    "find_activation_source",
    "load_weights",
    "model_fingerprint",
]


SPATIAL_MODES = ("positions", "flatten", "pool", "maps", "tokens")


CACHE_DTYPES = ("float32", "float16")


CACHE_FORMAT = 1


class ActivationSource(nn.Module):
    """A frozen model and one of its layers, read as training vectors (see the module docstring).

    Args:
        model: the trained network (any ``nn.Module`` mapping images to outputs); used read-only.
        layer: dotted module name as in ``model.named_modules()``; a wrong name raises a ``ValueError`` listing
            close matches. For a module called more than once per forward pass the last call is used.
        spatial: ``"positions"``, ``"flatten"``, ``"pool"`` or ``"maps"`` (module docstring).
        normalize: scale vectors to a mean L2 norm of ``sqrt(d)`` (the factor is :attr:`scale`, estimated by
            :meth:`estimate_scale`; until then it is 1).
        weights: optional path of a state dict / Lightning checkpoint loaded into ``model`` (:func:`load_weights`).
        stop_at_layer: end the forward pass after the layer (learned on the first batch: how often it is called).
        pad_token: ``spatial="tokens"`` only: the padding id of the token inputs; ``None`` uses the ``pad_token``
            attribute of the model (or of its first submodule that has one), else nothing is padding.

    ``source(inputs)`` returns the (scaled) vectors, detached; :meth:`layer_output` the raw layer output.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        spatial: str = "positions",
        normalize: bool = False,
        weights: str | None = None,
        stop_at_layer: bool = True,
        pad_token: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_choice("spatial mode", spatial, SPATIAL_MODES, owner="ActivationSource")
        check_bool("normalize", normalize, owner="ActivationSource")
        check_bool("stop_at_layer", stop_at_layer, owner="ActivationSource")
        if pad_token is not None:
            check_int("pad_token", pad_token, minimum=0, owner="ActivationSource")
            if spatial != "tokens":
                raise ValueError(
                    f"ActivationSource: pad_token={pad_token} is used by spatial='tokens' only, got spatial={spatial!r}"
                )
        elif spatial == "tokens":
            pad_token = _model_pad_token(model)
        if weights is not None:
            load_weights(model, weights)
        self.layer, _ = resolve_layer(model, layer)
        self.model = model
        self.spatial = spatial
        self.normalize = normalize
        self.stop_at_layer = stop_at_layer
        self.pad_token = pad_token
        #: Multiplies every vector (1 until :meth:`estimate_scale`, always 1 without ``normalize``).
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("scale_estimated", torch.zeros((), dtype=torch.bool))
        self._calls: int | None = None  # calls of the layer per forward pass, learned on the first batch
        self._layer_shape: tuple[int, ...] | None = None  # [C, h, w], [T, D] or [D] of the last batch
        self._extra_positions: int | None = None  # tokens: layer positions beyond the input tokens (a class token)

    def extra_repr(self) -> str:
        pad = f", pad_token={self.pad_token}" if self.spatial == "tokens" else ""
        return f"layer={self.layer!r}, spatial={self.spatial!r}, normalize={self.normalize}{pad}"

    def train(self, mode: bool = True) -> ActivationSource:
        """Only this wrapper's flag changes: the frozen model's modes are its own (extraction runs in eval)."""
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return self.scale.device

    # ------------------------------------------------------------------------------------------ reading
    def layer_output(self, images: Tensor) -> Tensor:
        """The layer's raw output for ``images`` (token ids ``[B, T_in]`` for ``spatial="tokens"``; moved to the
        model's device, ids keep their integer dtype), detached.

        Eval mode, ``no_grad``; the model's modes, ``requires_grad`` and ``.grad`` are restored and the hooks
        removed afterwards, also on error.
        """
        self._check_inputs(images)
        images = images.to(model_device(self.model))
        stop_early = self.stop_at_layer and self._calls is not None
        with (
            torch.no_grad(),
            model_state_guard(self.model),
            capture_layer(self.model, self.layer, clone_output=not stop_early) as capture,
        ):
            with stop_after_calls(capture.module, self._calls) if stop_early else contextlib.nullcontext():
                forward_until_stopped(self.model, images)
            activation = capture.activation
            if self._calls is None:
                self._calls = len(capture.outputs)
        if activation.shape[0] != images.shape[0] or activation.ndim < 2:
            raise ValueError(
                f"layer {self.layer!r} outputs shape {list(activation.shape)}; expected [B, C, ...] with "
                f"B = {images.shape[0]}"
            )
        if self.spatial == "tokens":
            self._check_token_output(images, activation)
            self._extra_positions = activation.shape[1] - images.shape[1] if images.ndim == 2 else 0
        self._layer_shape = tuple(activation.shape[1:])
        return activation.detach()

    def _check_inputs(self, inputs: object) -> None:
        if self.spatial == "tokens":
            if not isinstance(inputs, Tensor) or inputs.is_floating_point() or inputs.is_complex():
                got = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
                raise TypeError(f"ActivationSource: spatial='tokens' reads integer token ids [B, T], got {got}")
            return
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            got = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
            hint = " (token ids need spatial='tokens')" if isinstance(inputs, Tensor) else ""
            raise TypeError(f"images must be a floating-point tensor [B, C, H, W], got {got}{hint}")

    def _check_token_output(self, inputs: Tensor, activation: Tensor) -> None:
        if activation.ndim != 3:
            emitting = _layers_with_token_outputs(self.model, inputs[:1])
            raise ValueError(
                f"ActivationSource: spatial='tokens' needs a layer that outputs [B, T, D]; layer {self.layer!r} "
                f"({type(resolve_layer(self.model, self.layer)[1]).__name__}) outputs {list(activation.shape)}. "
                f"Layers of this model with [B, T, D] outputs: {emitting[:20]}; for other outputs use spatial in "
                f"{[m for m in SPATIAL_MODES if m != 'tokens']}"
            )
        if inputs.ndim == 2 and activation.shape[1] < inputs.shape[1]:
            raise ValueError(
                f"ActivationSource: layer {self.layer!r} outputs {activation.shape[1]} positions for "
                f"{inputs.shape[1]} input tokens; spatial='tokens' needs one position per token (plus leading "
                "extra positions such as a class token)"
            )

    # ------------------------------------------------------------------------------------------ tokens
    def token_mask(self, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor | None:
        """``BoolTensor[B, T_in]``, True at the real (non-padding) tokens of ``inputs`` (``pad_token`` and
        ``attention_mask``, 1 = real, combined); ``None`` when nothing marks padding or not ``spatial="tokens"``."""
        if self.spatial != "tokens":
            return None
        mask = None if self.pad_token is None else inputs != self.pad_token
        if attention_mask is not None:
            if attention_mask.shape != inputs.shape:
                raise ValueError(
                    f"ActivationSource: attention_mask has shape {list(attention_mask.shape)}, the token ids "
                    f"{list(inputs.shape)}"
                )
            keep = attention_mask.to(inputs.device).bool()
            mask = keep if mask is None else mask & keep
        return mask

    def _row_mask(self, mask: Tensor, activation: Tensor) -> Tensor:
        """Input-token mask ``[B, T_in]`` -> layer-position mask ``[B, T]`` (leading extra positions are real)."""
        extra = activation.shape[1] - mask.shape[1]
        if extra < 0 or mask.shape[0] != activation.shape[0]:
            raise ValueError(
                f"ActivationSource: a token mask {list(mask.shape)} does not fit the layer output "
                f"{list(activation.shape)}"
            )
        mask = mask.to(activation.device, torch.bool)
        return torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1) if extra else mask

    def count_rows(self, inputs: Tensor, attention_mask: Tensor | None = None) -> int:
        """Training rows that ``inputs`` give: one per real token (plus the extra leading positions) for
        ``spatial="tokens"``; runs the model on one sample only when the layer's shape is not known yet."""
        if self.spatial != "tokens":
            return inputs.shape[0] * self.vectors_per_image()
        if self._extra_positions is None:
            self.layer_output(inputs[:1])
        assert self._extra_positions is not None
        mask = self.token_mask(inputs, attention_mask)
        real = inputs.numel() if mask is None else int(mask.sum())
        return real + inputs.shape[0] * self._extra_positions

    def to_vectors(self, activation: Tensor, *, scaled: bool = True, mask: Tensor | None = None) -> Tensor:
        """Raw layer output ``[B, C, ...]`` -> training vectors of the ``spatial`` mode (times ``scale``).

        ``mask`` (``spatial="tokens"``): the :meth:`token_mask` of the inputs; only real positions become rows.
        """
        if self.spatial == "tokens" and activation.ndim == 3:
            if mask is None:
                vectors = activation.reshape(-1, activation.shape[2])
            else:
                vectors = activation[self._row_mask(mask, activation)]
        elif activation.ndim == 2:
            if self.spatial == "maps":
                raise ValueError(f"spatial='maps' needs a layer with feature maps; {self.layer!r} outputs [B, D]")
            vectors = activation
        elif self.spatial == "positions":
            vectors = activation.flatten(2).transpose(1, 2).reshape(-1, activation.shape[1])
        elif self.spatial == "flatten":
            vectors = activation.flatten(1)
        elif self.spatial == "pool":
            vectors = activation.flatten(2).mean(dim=2)
        else:
            vectors = activation
        if scaled and self.normalize:
            vectors = vectors * self.scale.to(vectors.device, vectors.dtype)
        return vectors

    def from_vectors(
        self,
        vectors: Tensor,
        shape: Sequence[int],
        *,
        scaled: bool = True,
        mask: Tensor | None = None,
        fill: Tensor | None = None,
    ) -> Tensor:
        """Inverse of :meth:`to_vectors`: vectors back to a layer output of ``shape`` (divided by ``scale``).

        ``spatial="tokens"`` with a ``mask``: the rows go to the real positions, every padding position takes
        ``fill``'s value there (the layer's own output). Not available for ``spatial="pool"`` (an average cannot be
        undone).
        """
        shape = tuple(shape)
        if scaled and self.normalize:
            vectors = vectors / self.scale.to(vectors.device, vectors.dtype)
        if self.spatial == "tokens" and len(shape) == 3 and mask is not None:
            if fill is None or tuple(fill.shape) != shape:
                raise ValueError("ActivationSource: token rows go back into fill=, the layer output of that shape")
            out = fill.clone()
            out[self._row_mask(mask, fill)] = vectors.to(out.dtype)
            return out
        if len(shape) == 2 or self.spatial in ("flatten", "maps", "tokens"):
            return vectors.reshape(shape)
        if self.spatial == "pool":
            raise ValueError("spatial='pool' vectors cannot be put back into the layer (the average is not invertible)")
        batch, channels = shape[0], shape[1]
        return vectors.reshape(batch, -1, channels).transpose(1, 2).reshape(shape)

    def forward(self, images: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Training vectors of ``images`` (see ``spatial``; token ids and their optional ``attention_mask`` for
        ``"tokens"``), scaled, detached."""
        return self.to_vectors(self.layer_output(images), mask=self.token_mask(images, attention_mask))

    def vector_dim(self, images: Tensor | None = None) -> int:
        """``d``: the size of one training vector (runs ``images[:1]`` through the model if not known yet)."""
        if self._layer_shape is None:
            if images is None:
                raise ValueError("the layer's output shape is not known yet; pass example images")
            self.layer_output(images[:1])
        dim = self.known_vector_dim()
        assert dim is not None
        return dim

    def known_vector_dim(self) -> int | None:
        """``d`` if the layer's output shape is already known (after any batch), else ``None``; runs nothing."""
        shape = self._layer_shape
        if shape is None:
            return None
        if self.spatial == "tokens":
            return shape[-1]
        if len(shape) == 1 or self.spatial in ("positions", "pool", "maps"):
            return shape[0]
        return math.prod(shape)

    def vectors_per_image(self) -> int:
        """Rows per image: ``h * w`` for ``"positions"``, else 1 (``"maps"``: one map stack per image); not
        fixed for ``"tokens"`` (see :meth:`count_rows`)."""
        if self._layer_shape is None:
            raise ValueError("the layer's output shape is not known yet; call the source on a batch first")
        if self.spatial == "tokens":
            raise ValueError("spatial='tokens' has a varying number of rows per sequence; use count_rows()")
        if self.spatial == "positions" and len(self._layer_shape) > 1:
            return math.prod(self._layer_shape[1:])
        return 1

    @property
    def layer_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample's layer output (``[C, h, w]``, ``[T, D]`` or ``[D]``), known after the first batch."""
        return self._layer_shape

    # ------------------------------------------------------------------------------------------ scale
    def set_scale_from_norms(self, norm_sum: float, count: int, dim: int, reduce: Reducer | None = None) -> float:
        """Set ``scale = sqrt(dim) / mean_norm`` from a sum of raw vector norms and their count, summed over all
        processes with ``reduce`` (default: ``torch.distributed`` when initialised). Returns the scale."""
        reduce = default_reducer() if reduce is None else reduce
        totals = reduce(torch.tensor([float(norm_sum), float(count)], dtype=torch.float64), "sum")
        norm_sum, count = float(totals[0]), float(totals[1])
        if count <= 0 or not norm_sum > 0 or not math.isfinite(norm_sum):
            raise ValueError(
                f"cannot normalise layer {self.layer!r}: the mean activation norm is {norm_sum / max(count, 1)!r} "
                "(all-zero or non-finite activations?)"
            )
        value = math.sqrt(dim) * count / norm_sum
        self.scale.fill_(value)
        self.scale_estimated.fill_(True)
        return value

    def estimate_scale(
        self,
        batches: Iterable[Any],
        max_batches: int = 16,
        reduce: Reducer | None = None,
        reader: BatchReader | None = None,
    ) -> float:
        """Estimate :attr:`scale` from up to ``max_batches`` image batches (tensors or ``(images, ...)``; padding
        positions of token batches do not count). ``reader`` finds the inputs in a batch (default: a
        :class:`~lightning_xai.batch.BatchReader` with its default keys).

        Every process must call it (the sums are all-reduced), so that all use the same scale.
        """
        check_int("max_batches", max_batches, minimum=1, owner="ActivationSource.estimate_scale")
        reader = BatchReader(owner="ActivationSource") if reader is None else reader
        norm_sum, count, dim = 0.0, 0, 0
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            inputs = reader.inputs(batch)
            mask = self.token_mask(inputs, _attention_mask_of(batch))
            vectors = self.to_vectors(self.layer_output(inputs), scaled=False, mask=mask)
            if self.spatial == "maps":
                vectors = vectors.flatten(2).transpose(1, 2).reshape(-1, vectors.shape[1])
            norm_sum += float(vectors.double().norm(dim=1).sum())
            count += vectors.shape[0]
            dim = vectors.shape[1]
        return self.set_scale_from_norms(norm_sum, count, dim, reduce)

    # ------------------------------------------------------------------------------------------ intervention
    @contextlib.contextmanager
    def replace_output(self, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """While open, the layer's output (its last call per forward pass) is replaced by ``fn(output)``.

        The hook is removed on exit, also on error. Call the source once before (the number of calls of the
        layer per forward pass is learned on the first batch).
        """
        if self._calls is None:
            raise ValueError("call the source on a batch first: it learns how often the layer runs per forward pass")
        _, module = resolve_layer(self.model, self.layer)
        calls = self._calls
        seen = [0]

        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
            seen[0] += 1
            if seen[0] % calls != 0:
                return None
            new = fn(output)
            if not isinstance(new, Tensor) or new.shape != output.shape:
                shape = list(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(f"a replaced layer output must keep the shape {list(output.shape)}, got {shape}")
            return new

        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def splice(
        self, transform: Callable[[Tensor], Tensor], mask: Tensor | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Context in which the layer outputs ``from_vectors(transform(to_vectors(output)))``: e.g. an SAE's
        reconstruction of the (scaled) vectors, put back in place. ``mask`` (``spatial="tokens"``): the
        :meth:`token_mask` of the inputs; padding positions keep the layer's own output."""

        def replace(output: Tensor) -> Tensor:
            vectors = self.to_vectors(output, mask=mask)
            new = transform(vectors)
            if not isinstance(new, Tensor) or new.shape != vectors.shape:
                shape = list(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(
                    f"a splice transform must keep the shape {list(vectors.shape)} of the vectors, got {shape}"
                )
            return self.from_vectors(new, output.shape, mask=mask, fill=output)

        return self.replace_output(replace)

    def model_output(
        self,
        images: Tensor,
        replace: Callable[[Tensor], Tensor] | str | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The frozen model's output on ``images`` in eval mode under ``no_grad`` (state restored), optionally
        with the layer's output replaced: ``"zero"`` (zero-ablation) or a function of the *vectors*
        (:meth:`splice`). For ``spatial="tokens"`` both act on the real positions only (padding given by
        ``pad_token`` and ``attention_mask``); padding positions keep the layer's own output."""
        images = images.to(model_device(self.model))
        if self._calls is None:
            self.layer_output(images[:1])
        mask = self.token_mask(images, attention_mask)
        if replace is None:
            context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        elif isinstance(replace, str) and replace == "zero":
            context = self.splice(torch.zeros_like, mask) if self.spatial == "tokens" else self.replace_output(
                torch.zeros_like
            )
        elif callable(replace):
            context = self.splice(replace, mask)
        else:
            raise ValueError(f"replace must be None, 'zero' or a callable on vectors, got {replace!r}")
        with torch.no_grad(), model_state_guard(self.model), context:
            return self.model(images)

    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of the model (cache key)."""
        return model_fingerprint(self.model)


def find_activation_source(trainer: Any) -> ActivationSource | None:
    """The :class:`ActivationSource` of the trainer's datamodule (``trainer.datamodule.source``), if any."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    source = getattr(datamodule, "source", None)
    return source if isinstance(source, ActivationSource) else None

