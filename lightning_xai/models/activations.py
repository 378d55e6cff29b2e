"""Activations of a frozen model's layer as training data for post-hoc method modules.

Sparse autoencoders, Net2Vec concept filters and concept probes are trained on what one layer of an already
trained ("frozen") network computes. This module provides that data in three pieces:

* :class:`ActivationSource` wraps the frozen model and a layer named by dotted path (``"features"``,
  ``"layer4.1"``). It reads the layer's output with :func:`~lightning_xai.attribution.layers.capture_layer` in
  eval mode under ``no_grad``; afterwards every submodule's mode, every ``requires_grad`` and ``.grad`` of the
  model are as before and no hook is left (the model is never modified: "frozen" means *used read-only*, not
  ``requires_grad_(False)``). By default the forward pass stops right after the layer's last call, so extraction
  costs a forward pass up to the layer only. The output is turned into training vectors by ``spatial``:

  - ``"positions"``: one ``C``-vector per spatial position, ``[B, C, h, w] -> [B * h * w, C]`` (image-major,
    then row-major positions), the usual input of an SAE on a convolutional layer;
  - ``"flatten"``: one ``C * h * w``-vector per image;
  - ``"pool"``: the global average over positions, one ``C``-vector per image (image-level probes);
  - ``"maps"``: the feature maps unchanged, ``[B, C, h, w]`` (Net2Vec).

  A 2-D layer output ``[B, D]`` is returned as is for every mode but ``"maps"``. With ``normalize=True`` the
  vectors are multiplied by one fixed scalar ``scale`` so that their **mean L2 norm is** ``sqrt(d)`` (``d`` the
  vector size: ``C`` per position for ``"positions"`` / ``"maps"``): a layer-independent scale, so that SAE
  hyper-parameters such as the L1 coefficient transfer between layers (Bricken et al., "Towards
  Monosemanticity", Anthropic 2023; Gao et al., "Scaling and evaluating sparse autoencoders", 2024). The scale is
  estimated once from training data (:meth:`ActivationSource.estimate_scale`, all-reduced over processes) and
  kept in the buffer ``scale``; a single positive scalar changes no direction and no IoU.
* :class:`ActivationCache` stores raw (unscaled) training vectors on disk as NumPy ``.npy`` memory maps, one
  shard file per process ``shard{rank}of{world}.npy`` plus a JSON metadata file. A shard is written once and
  reused when its metadata matches: model fingerprint (SHA-256 of the state dict), layer, spatial mode, shape,
  dtype, world size and the data's fingerprint.
* :class:`ActivationDataModule` wraps any image ``LightningDataModule`` and yields :class:`ActivationBatch`
  objects: either computed on the fly from each image batch on the training device (``cache_dir=None``), or, for
  the training split, read from the cache (validation and test batches are always computed on the fly, because
  the downstream metrics need the images). Modules find the source as ``trainer.datamodule.source``.

**Distributed.** Every process reads its own shard: the process of rank ``r`` of ``W`` caches the training images
``r, r + W, r + 2W, ...``. Cached batches are served by an ``IterableDataset`` (so Lightning adds no
``DistributedSampler`` on top of the sharding), reshuffled every epoch from ``seed`` and the epoch number, and
every process yields the same number of batches: ``ceil(n_min / batch_size)`` where ``n_min`` is the number of
rows of the smallest shard (a larger shard uses a random ``n_min`` of its rows each epoch; with a number of images
divisible by ``W`` nothing is dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.interpretation.quantiles import Reducer, default_reducer
from lightning_xai.namespace import pl

__all__ = [
    "CACHE_DTYPES",
    "SPATIAL_MODES",
    "ActivationBatch",
    "ActivationCache",
    "ActivationDataModule",
    "ActivationSource",
    "CachedActivationBatches",
    "as_activation_batch",
    "find_activation_source",
    "load_weights",
    "model_fingerprint",
]

SPATIAL_MODES = ("positions", "flatten", "pool", "maps")
CACHE_DTYPES = ("float32", "float16")
#: Version of the cache's file layout, part of the metadata.
CACHE_FORMAT = 1


class _StopForward(BaseException):
    """Raised by a hook to end the forward pass after the layer's last call (a ``BaseException`` so that a
    model's own ``except Exception`` cannot swallow it)."""


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of the model's state dict: every name, dtype, shape and value (parameters and buffers).

    Identical weights give identical fingerprints on any device; used to tell whether an activation cache was
    written by this very model.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, Tensor):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{list(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict file into ``model`` (strict): a ``torch.save``-d state dict, or a Lightning checkpoint
    (its ``"state_dict"``). When the keys only match after removing a common prefix (``"backbone."`` of an
    :class:`~lightning_xai.models.ImageClassifier` checkpoint, ``"model."``), the prefix is removed."""
    if not os.path.isfile(path):
        raise ValueError(f"weights file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict or a Lightning checkpoint")
    expected = set(model.state_dict())
    if set(state) != expected:
        prefixes = {key.split(".", 1)[0] + "." for key in state if "." in key}
        for prefix in sorted(prefixes):
            stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if set(stripped) == expected:
                state = stripped
                break
    model.load_state_dict(state, strict=True)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------- source
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

    ``source(images)`` returns the (scaled) vectors, detached; :meth:`layer_output` the raw layer output.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        spatial: str = "positions",
        normalize: bool = False,
        weights: str | None = None,
        stop_at_layer: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if spatial not in SPATIAL_MODES:
            raise ValueError(f"unknown spatial mode {spatial!r}; valid modes: {list(SPATIAL_MODES)}")
        _check_bool("normalize", normalize)
        _check_bool("stop_at_layer", stop_at_layer)
        if weights is not None:
            load_weights(model, weights)
        self.layer, _ = resolve_layer(model, layer)
        self.model = model
        self.spatial = spatial
        self.normalize = normalize
        self.stop_at_layer = stop_at_layer
        #: Multiplies every vector (1 until :meth:`estimate_scale`, always 1 without ``normalize``).
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("scale_estimated", torch.zeros((), dtype=torch.bool))
        self._calls: int | None = None  # calls of the layer per forward pass, learned on the first batch
        self._layer_shape: tuple[int, ...] | None = None  # [C, h, w] or [D] of the last batch

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, spatial={self.spatial!r}, normalize={self.normalize}"

    def train(self, mode: bool = True) -> ActivationSource:
        """Only this wrapper's flag changes: the frozen model's modes are its own (extraction runs in eval)."""
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return self.scale.device

    # ------------------------------------------------------------------------------------------ reading
    def layer_output(self, images: Tensor) -> Tensor:
        """The layer's raw output for ``images`` (moved to the model's device), detached.

        Eval mode, ``no_grad``; the model's modes, ``requires_grad`` and ``.grad`` are restored and the hooks
        removed afterwards, also on error.
        """
        if not isinstance(images, Tensor) or not images.is_floating_point():
            got = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"images must be a floating-point tensor [B, C, H, W], got {got}")
        images = images.to(_model_device(self.model))
        stop_early = self.stop_at_layer and self._calls is not None
        with (
            torch.no_grad(),
            model_state_guard(self.model),
            capture_layer(self.model, self.layer, clone_output=not stop_early) as capture,
        ):
            handle = None
            if stop_early:
                calls = self._calls

                def stop(_module: nn.Module, _inputs: tuple, _output: Any) -> None:
                    if len(capture.outputs) >= calls:
                        raise _StopForward

                handle = capture.module.register_forward_hook(stop)
            try:
                self.model(images)
            except _StopForward:
                pass
            finally:
                if handle is not None:
                    handle.remove()
            activation = capture.activation
            if self._calls is None:
                self._calls = len(capture.outputs)
        if activation.shape[0] != images.shape[0] or activation.ndim < 2:
            raise ValueError(
                f"layer {self.layer!r} outputs shape {list(activation.shape)}; expected [B, C, ...] with "
                f"B = {images.shape[0]}"
            )
        self._layer_shape = tuple(activation.shape[1:])
        return activation.detach()

    def to_vectors(self, activation: Tensor, *, scaled: bool = True) -> Tensor:
        """Raw layer output ``[B, C, ...]`` -> training vectors of the ``spatial`` mode (times ``scale``)."""
        if activation.ndim == 2:
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

    def from_vectors(self, vectors: Tensor, shape: Sequence[int], *, scaled: bool = True) -> Tensor:
        """Inverse of :meth:`to_vectors`: vectors back to a layer output of ``shape`` (divided by ``scale``).

        Not available for ``spatial="pool"`` (an average cannot be undone).
        """
        shape = tuple(shape)
        if scaled and self.normalize:
            vectors = vectors / self.scale.to(vectors.device, vectors.dtype)
        if len(shape) == 2 or self.spatial in ("flatten", "maps"):
            return vectors.reshape(shape)
        if self.spatial == "pool":
            raise ValueError("spatial='pool' vectors cannot be put back into the layer (the average is not invertible)")
        batch, channels = shape[0], shape[1]
        return vectors.reshape(batch, -1, channels).transpose(1, 2).reshape(shape)

    def forward(self, images: Tensor) -> Tensor:
        """Training vectors of ``images`` (see ``spatial``), scaled, detached."""
        return self.to_vectors(self.layer_output(images))

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
        if len(shape) == 1 or self.spatial in ("positions", "pool", "maps"):
            return shape[0]
        return math.prod(shape)

    def vectors_per_image(self) -> int:
        """Rows per image: ``h * w`` for ``"positions"``, else 1 (``"maps"``: one map stack per image)."""
        if self._layer_shape is None:
            raise ValueError("the layer's output shape is not known yet; call the source on a batch first")
        if self.spatial == "positions" and len(self._layer_shape) > 1:
            return math.prod(self._layer_shape[1:])
        return 1

    @property
    def layer_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample's layer output (``[C, h, w]`` or ``[D]``), known after the first batch."""
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

    def estimate_scale(self, batches: Iterable[Any], max_batches: int = 16, reduce: Reducer | None = None) -> float:
        """Estimate :attr:`scale` from up to ``max_batches`` image batches (tensors or ``(images, ...)``).

        Every process must call it (the sums are all-reduced), so that all use the same scale.
        """
        _check_int("max_batches", max_batches)
        norm_sum, count, dim = 0.0, 0, 0
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            vectors = self.to_vectors(self.layer_output(_images_of(batch)), scaled=False)
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

    def splice(self, transform: Callable[[Tensor], Tensor]) -> contextlib.AbstractContextManager[None]:
        """Context in which the layer outputs ``from_vectors(transform(to_vectors(output)))``: e.g. an SAE's
        reconstruction of the (scaled) vectors, put back in place."""

        def replace(output: Tensor) -> Tensor:
            vectors = self.to_vectors(output)
            new = transform(vectors)
            if not isinstance(new, Tensor) or new.shape != vectors.shape:
                shape = list(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(
                    f"a splice transform must keep the shape {list(vectors.shape)} of the vectors, got {shape}"
                )
            return self.from_vectors(new, output.shape)

        return self.replace_output(replace)

    def model_output(self, images: Tensor, replace: Callable[[Tensor], Tensor] | str | None = None) -> Tensor:
        """The frozen model's output on ``images`` in eval mode under ``no_grad`` (state restored), optionally
        with the layer's output replaced: ``"zero"`` (zero-ablation) or a function of the *vectors*
        (:meth:`splice`)."""
        images = images.to(_model_device(self.model))
        if self._calls is None:
            self.layer_output(images[:1])
        if replace is None:
            context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        elif replace == "zero":
            context = self.replace_output(torch.zeros_like)
        elif callable(replace):
            context = self.splice(replace)
        else:
            raise ValueError(f"replace must be None, 'zero' or a callable on vectors, got {replace!r}")
        with torch.no_grad(), model_state_guard(self.model), context:
            return self.model(images)

    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of the model (cache key)."""
        return model_fingerprint(self.model)


def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("image", "images", "input", "inputs", "x"):
            if key in batch:
                return batch[key]
        raise ValueError(f"cannot find images in a batch dict with keys {sorted(batch)}")
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        return batch[0]
    raise TypeError(f"a batch must be an image tensor or a sequence (images, ...), got {type(batch).__name__}")


# ---------------------------------------------------------------------------------------------------------- batches
@dataclass
class ActivationBatch:
    """What post-hoc method modules receive.

    ``activations``: ``[N, d]`` vectors (``[B, C, h, w]`` for ``spatial="maps"``), scaled. ``images``: the image
    batch they came from (``None`` for cached batches). ``extras``: the rest of the image batch, e.g. ``(labels,
    concept_labels)`` of a ``ConceptDataModule`` or ``(labels, concept_labels, concept_masks)``.
    """

    activations: Tensor
    images: Tensor | None = None
    extras: tuple[Any, ...] = ()

    @property
    def labels(self) -> Tensor | None:
        """``extras[0]`` (the class labels of an image batch), if any."""
        return self.extras[0] if self.extras and isinstance(self.extras[0], Tensor) else None

    def __len__(self) -> int:
        return self.activations.shape[0]


def as_activation_batch(batch: Any) -> ActivationBatch:
    """Accept an :class:`ActivationBatch`, a tensor of vectors, ``(vectors, ...)`` (e.g. a ``TensorDataset``
    batch) or a :class:`CachedActivationBatches` item (used as is, without the source's scale): all but the first
    become an :class:`ActivationBatch` without images."""
    if isinstance(batch, ActivationBatch):
        return batch
    if isinstance(batch, Tensor):
        return ActivationBatch(batch)
    if isinstance(batch, Mapping) and "cached_activations" in batch:  # a CachedActivationBatches item (unscaled)
        return ActivationBatch(batch["cached_activations"])
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch and isinstance(batch[0], Tensor):
        return ActivationBatch(batch[0], None, tuple(batch[1:]))
    raise TypeError(
        f"expected an ActivationBatch (from ActivationDataModule), a tensor of activation vectors or (vectors, ...); "
        f"got {type(batch).__name__}"
    )


def find_activation_source(trainer: Any) -> ActivationSource | None:
    """The :class:`ActivationSource` of the trainer's datamodule (``trainer.datamodule.source``), if any."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    source = getattr(datamodule, "source", None)
    return source if isinstance(source, ActivationSource) else None


# ---------------------------------------------------------------------------------------------------------- cache
class ActivationCache:
    """Raw activation vectors on disk, one ``.npy`` shard per process (see the module docstring).

    Args:
        directory: folder of the shards (created when needed).
        dtype: ``"float32"`` or ``"float16"`` (half the disk, rounded activations).
    """

    def __init__(self, directory: str | os.PathLike, dtype: str = "float32") -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"unknown cache dtype {dtype!r}; valid dtypes: {list(CACHE_DTYPES)}")
        self.directory = Path(directory)
        self.dtype = dtype

    def paths(self, rank: int, world_size: int) -> tuple[Path, Path]:
        """``(array file, metadata file)`` of the shard of ``rank``."""
        stem = f"shard{rank}of{world_size}"
        return self.directory / f"{stem}.npy", self.directory / f"{stem}.json"

    def metadata(self, rank: int, world_size: int) -> dict[str, Any] | None:
        """The stored metadata of a shard, or ``None`` when there is no (complete) shard."""
        array_path, meta_path = self.paths(rank, world_size)
        if not (array_path.is_file() and meta_path.is_file()):
            return None
        try:
            return json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None

    def open(self, expected: Mapping[str, Any], rank: int, world_size: int) -> np.ndarray | None:
        """The shard as a read-only memory map if it exists and its metadata equals ``expected`` (plus shape and
        dtype, which are checked against the file itself); ``None`` otherwise."""
        stored = self.metadata(rank, world_size)
        if stored is None:
            return None
        stored_key = {k: v for k, v in stored.items() if k not in ("rows", "dim")}
        if stored_key != {**expected, "dtype": self.dtype, "rank": rank, "world_size": world_size}:
            return None
        array = np.load(self.paths(rank, world_size)[0], mmap_mode="r")
        if list(array.shape) != [stored.get("rows"), stored.get("dim")] or str(array.dtype) != self.dtype:
            return None
        return array

    def write(
        self, expected: Mapping[str, Any], rank: int, world_size: int, rows: int, batches: Iterable[Tensor]
    ) -> np.ndarray:
        """Write a shard of ``rows`` vectors from ``batches`` (``[n, d]`` tensors), then its metadata; returns
        the read-only memory map. Written to temporary files first and renamed, so a crash leaves no half shard
        that looks complete."""
        self.directory.mkdir(parents=True, exist_ok=True)
        array_path, meta_path = self.paths(rank, world_size)
        tmp_array = array_path.with_name(array_path.stem + ".tmp.npy")
        array = None
        filled = 0
        for vectors in batches:
            if vectors.ndim != 2:
                raise ValueError(f"cached activations must be [n, d] vectors, got shape {list(vectors.shape)}")
            if array is None:
                array = np.lib.format.open_memmap(
                    tmp_array, mode="w+", dtype=self.dtype, shape=(rows, vectors.shape[1])
                )
            if filled + vectors.shape[0] > rows:
                raise ValueError(f"got more than the announced {rows} activation vectors")
            array[filled : filled + vectors.shape[0]] = vectors.detach().to("cpu", torch.float32).numpy()
            filled += vectors.shape[0]
        if array is None or filled != rows:
            raise ValueError(f"expected {rows} activation vectors for the cache, got {filled}")
        dim = array.shape[1]
        array.flush()
        del array
        os.replace(tmp_array, array_path)
        meta = {**expected, "dtype": self.dtype, "rank": rank, "world_size": world_size, "rows": rows, "dim": dim}
        tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp_meta, meta_path)
        opened = self.open(expected, rank, world_size)
        assert opened is not None
        return opened


class CachedActivationBatches(IterableDataset):
    """Batches of one cache shard: ``{"cached_activations": Tensor[n, d]}`` (raw, float32).

    Each pass (epoch) draws a fresh permutation from ``seed + epoch`` (when ``shuffle``) and uses its first
    ``rows_per_epoch`` rows, ``batch_size`` at a time (rows of one batch are read in file order). Use with
    ``DataLoader(..., batch_size=None)``.
    """

    def __init__(self, path: str | os.PathLike, rows_per_epoch: int, batch_size: int, shuffle: bool, seed: int = 0):
        super().__init__()
        self.path = str(path)
        self.rows_per_epoch = _check_int("rows_per_epoch", rows_per_epoch)
        self.batch_size = _check_int("batch_size", batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.rows_per_epoch / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        array = np.load(self.path, mmap_mode="r")
        if self.rows_per_epoch > array.shape[0]:
            raise ValueError(f"the cache shard {self.path} has {array.shape[0]} rows, fewer than {self.rows_per_epoch}")
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(array.shape[0], generator=generator)[: self.rows_per_epoch].numpy()
        else:
            order = np.arange(self.rows_per_epoch)
        self.epoch += 1
        for start in range(0, self.rows_per_epoch, self.batch_size):
            index = np.sort(order[start : start + self.batch_size])
            rows = np.asarray(array[index], dtype=np.float32)
            yield {"cached_activations": torch.from_numpy(rows)}


# ---------------------------------------------------------------------------------------------------------- datamodule
def _data_fingerprint(datamodule: pl.LightningDataModule, dataset: Dataset) -> str:
    """What identifies the training data: the datamodule's class, its hyper-parameters and the dataset length."""
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    text = json.dumps(
        {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", "hparams": hparams},
        sort_keys=True,
        default=repr,
    )
    return f"{hashlib.sha256(text.encode()).hexdigest()}:{len(dataset)}"  # type: ignore[arg-type]


class ActivationDataModule(pl.LightningDataModule):
    """Wraps an image ``LightningDataModule`` and yields :class:`ActivationBatch` objects of a frozen layer.

    Args:
        datamodule: any image DataModule whose batches are ``images`` or ``(images, ...)`` (e.g.
            ``ConceptDataModule``: ``(images, labels, concept_labels)``).
        model: the frozen network (in YAML: ``class_path``/``init_args`` of a backbone, plus ``weights``).
        layer, spatial, normalize, weights, stop_at_layer: see :class:`ActivationSource`.
        cache_dir: ``None``: compute activations on the fly for every batch, on the training device. A folder:
            the training split's activation vectors are cached there (written once per process shard, reused
            while the metadata matches) and read from disk in batches of ``batch_size``.
        cache_dtype: ``"float32"`` or ``"float16"``.
        batch_size: vectors per cached training batch (on-the-fly batches keep the wrapped datamodule's size).
        scale_batches: image batches (per process) used to estimate the normalisation scale.
        shuffle: reshuffle the cached vectors every epoch.
        seed: seed of that shuffling.

    The activations are computed in :meth:`on_after_batch_transfer`, i.e. after the image batch reached the
    training device; the source (and the model in it) is moved to that device. The estimated scale is part of
    this datamodule's ``state_dict`` (saved in checkpoints). ``extras`` of cached batches are empty.
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        model: nn.Module,
        layer: str,
        spatial: str = "positions",
        normalize: bool = False,
        weights: str | None = None,
        cache_dir: str | None = None,
        cache_dtype: str = "float32",
        batch_size: int = 4096,
        scale_batches: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        stop_at_layer: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}")
        if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
            raise TypeError(f"cache_dir must be a folder path or None, got {type(cache_dir).__name__}")
        _check_int("batch_size", batch_size)
        _check_int("scale_batches", scale_batches)
        _check_bool("shuffle", shuffle)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.source = ActivationSource(model, layer, spatial, normalize, weights, stop_at_layer)
        self.datamodule = datamodule
        self.cache = None if cache_dir is None else ActivationCache(cache_dir, cache_dtype)
        self.batch_size = batch_size
        self.scale_batches = scale_batches
        self.shuffle = shuffle
        self.seed = seed
        self._cached_train: CachedActivationBatches | None = None
        #: ``"written"`` or ``"reused"`` after the cache was prepared in ``setup("fit")``.
        self.cache_status: str | None = None
        self.save_hyperparameters(ignore=["datamodule", "model"])

    # ------------------------------------------------------------------------------------------ plumbing
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _device(self) -> torch.device:
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device
        return _model_device(self.source.model)

    def _place_source(self, device: torch.device) -> None:
        if self.source.device != device or _model_device(self.source.model) != device:
            self.source.to(device)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        self._place_source(self._device())
        if stage in (None, "fit"):
            train_loader = self.datamodule.train_dataloader()
            shard_loader = self._shard_loader(train_loader)
            if self.cache is not None and self._cached_train is None:
                self._cached_train = self._prepare_cache(train_loader, shard_loader)
            if self.source.normalize and not bool(self.source.scale_estimated):
                self._estimate_scale(shard_loader)
        elif self.source.normalize and not bool(self.source.scale_estimated):
            # evaluation without training: the scale of the training data (a checkpoint's datamodule state,
            # restored after setup, replaces it)
            try:
                loader = self.datamodule.train_dataloader()
            except Exception:
                loader = None
            if loader is None:
                raise ValueError(
                    "normalize=True needs the scale of the training activations: the wrapped datamodule has no "
                    "train_dataloader(); restore it from a checkpoint or load_state_dict() before evaluating"
                )
            self._estimate_scale(self._shard_loader(loader))
        if self.source.layer_shape is None:
            self._probe_shape(stage)

    def _probe_shape(self, stage: str | None) -> None:
        """Run one image through the model so that the layer's output shape is known before training starts
        (modules check their sizes against it in their own ``setup``)."""
        getter = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}
        try:
            loader = getattr(self.datamodule, getter.get(stage or "fit", "train_dataloader"))()
            images = _images_of(loader.collate_fn([loader.dataset[0]]))
        except Exception:  # no map-style dataset to peek into: the shape is learned on the first batch
            return
        if isinstance(images, Tensor) and images.is_floating_point() and images.ndim >= 2:
            self.source.layer_output(images.to(self._device()))

    def _shard_loader(self, loader: DataLoader) -> DataLoader:
        """This process's images of the training set (``rank::world``), in order."""
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "caching and scale estimation need the wrapped datamodule's train_dataloader() to be a DataLoader "
                "over a map-style dataset"
            )
        rank, world = self._rank_world()
        subset = Subset(loader.dataset, range(rank, len(loader.dataset), world))  # type: ignore[arg-type]
        return DataLoader(subset, batch_size=loader.batch_size or 64, shuffle=False, collate_fn=loader.collate_fn)

    def _estimate_scale(self, shard_loader: DataLoader) -> None:
        if self._cached_train is not None:
            array = np.load(self._cached_train.path, mmap_mode="r")
            rows = min(array.shape[0], self.scale_batches * self.batch_size)
            raw = torch.from_numpy(np.asarray(array[:rows], dtype=np.float32))
            if self.source.spatial == "maps":
                raise ValueError("spatial='maps' cannot be cached")
            self.source.set_scale_from_norms(float(raw.double().norm(dim=1).sum()), raw.shape[0], raw.shape[1])
            return
        self.source.estimate_scale(shard_loader, self.scale_batches)

    def _prepare_cache(self, train_loader: DataLoader, shard_loader: DataLoader) -> CachedActivationBatches:
        assert self.cache is not None
        if self.source.spatial == "maps":
            raise ValueError("spatial='maps' cannot be cached (the cache stores [N, d] vectors); use on-the-fly mode")
        rank, world = self._rank_world()
        dataset = train_loader.dataset
        num_images = len(dataset)  # type: ignore[arg-type]
        first = next(iter(shard_loader))
        self.source.vector_dim(_images_of(first).to(self._device()))
        per_image = self.source.vectors_per_image()
        expected = {
            "format": CACHE_FORMAT,
            "model": self.source.fingerprint(),
            "layer": self.source.layer,
            "spatial": self.source.spatial,
            "layer_shape": list(self.source.layer_shape or ()),
            "data": _data_fingerprint(self.datamodule, dataset),
            "num_images": num_images,
        }
        shard_images = len(range(rank, num_images, world))
        array = self.cache.open(expected, rank, world)
        if array is None:
            if self.cache.metadata(rank, world) is not None:
                warnings.warn(
                    f"activation cache {self.cache.paths(rank, world)[0]} was written for another model, layer or "
                    "data; rewriting it",
                    stacklevel=2,
                )
            device = self._device()
            batches = (
                self.source.to_vectors(self.source.layer_output(_images_of(b).to(device)), scaled=False)
                for b in shard_loader
            )
            array = self.cache.write(expected, rank, world, shard_images * per_image, batches)
            self.cache_status = "written"
        else:
            self.cache_status = "reused"
        smallest = num_images // world * per_image  # the last rank's shard (ranks below hold one more when uneven)
        if smallest < 1:
            raise ValueError(f"{num_images} training images cannot be sharded over {world} processes")
        path = self.cache.paths(rank, world)[0]
        return CachedActivationBatches(path, smallest, self.batch_size, self.shuffle, self.seed)

    # ------------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> Any:
        if self._cached_train is not None:
            return DataLoader(self._cached_train, batch_size=None)
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> ActivationBatch:
        """Turn the transferred batch into an :class:`ActivationBatch` (on the batch's device)."""
        if isinstance(batch, Mapping) and "cached_activations" in batch:
            raw = batch["cached_activations"]
            return ActivationBatch(self.source.to_vectors(raw.float()) if raw.ndim == 2 else raw)
        images = _images_of(batch)
        self._place_source(images.device)
        extras = tuple(batch[1:]) if isinstance(batch, Sequence) and not isinstance(batch, str) else ()
        return ActivationBatch(self.source(images), images, extras)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self.source.scale), "scale_estimated": bool(self.source.scale_estimated)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source.scale.fill_(float(state_dict["scale"]))
        self.source.scale_estimated.fill_(bool(state_dict["scale_estimated"]))
