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

  - ``"tokens"``: one ``D``-vector per real (non-padding) token of a layer emitting ``[B, T, D]`` for integer
    token ids (a transformer's residual stream; see :mod:`lightning_xai.data.activation_source`).

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
divisible by ``W`` nothing is dropped). With ``spatial="tokens"`` the rows of a shard are its real tokens, so
shards differ in size: a first pass over the token ids (no model) counts them, and ``n_min`` is the minimum over
processes (all-reduced).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_xai.attribution.base import model_device
from lightning_xai.batch import BatchReader, Key
from lightning_xai.checks import check_bool, check_int
from lightning_xai.data.activation_batch import ActivationBatch, _attention_mask_of, as_activation_batch, batch_extras
from lightning_xai.data.activation_source import (
    CACHE_DTYPES,
    CACHE_FORMAT,
    SPATIAL_MODES,
    ActivationSource,
    find_activation_source,
)
from lightning_xai.data.frozen_model import load_weights, model_fingerprint
from lightning_xai.distributed import Reducer, default_reducer, rank_and_world_size
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
        owner = type(self).__name__
        self.rows_per_epoch = check_int("rows_per_epoch", rows_per_epoch, minimum=1, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
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
        layer, spatial, normalize, weights, stop_at_layer, pad_token: see :class:`ActivationSource` (token models:
            ``spatial="tokens"``, batches ``(token_ids, labels, ...)`` or dicts with ``"attention_mask"``).
        cache_dir: ``None``: compute activations on the fly for every batch, on the training device. A folder:
            the training split's activation vectors are cached there (written once per process shard, reused
            while the metadata matches) and read from disk in batches of ``batch_size``.
        cache_dtype: ``"float32"`` or ``"float16"``.
        batch_size: vectors per cached training batch (on-the-fly batches keep the wrapped datamodule's size).
        scale_batches: image batches (per process) used to estimate the normalisation scale.
        shuffle: reshuffle the cached vectors every epoch.
        seed: seed of that shuffling.
        input_key, label_key, concept_key: where the wrapped batches hold the inputs, the class labels and the
            concept labels (see :class:`~lightning_xai.batch.BatchReader`; default: a tuple's first / second / third
            element, a dict's usual keys). A tuple batch's elements after the input become the
            :class:`ActivationBatch`'s ``extras``; a dict batch gives ``(labels, concept_labels)``, so that the
            downstream figures of a :class:`~lightning_xai.models.sae.SparseAutoencoder` need labels only.

    The activations are computed in :meth:`on_after_batch_transfer`, i.e. after the image batch reached the
    training device; the source (and the model in it) is moved to that device. The estimated scale is part of
    this datamodule's ``state_dict`` (saved in checkpoints). ``extras`` of cached batches are empty.

    :attr:`reducer` (default ``None``: ``torch.distributed`` when initialised) names the processes outside a
    Trainer, e.g. the simulated ranks of :class:`~lightning_xai.distributed.ThreadGroup` in tests.
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
        pad_token: int | None = None,
        input_key: Key | None = None,
        label_key: Key | None = None,
        concept_key: Key | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}")
        if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
            raise TypeError(f"cache_dir must be a folder path or None, got {type(cache_dir).__name__}")
        owner = type(self).__name__
        check_int("batch_size", batch_size, minimum=1, owner=owner)
        check_int("scale_batches", scale_batches, minimum=1, owner=owner)
        check_bool("shuffle", shuffle, owner=owner)
        check_int("seed", seed, owner=owner)
        self.source = ActivationSource(model, layer, spatial, normalize, weights, stop_at_layer, pad_token)
        #: How the wrapped batches are read (inputs, and labels / concept labels of dict batches).
        self.batch_reader = BatchReader(input_key, label_key, owner=owner, concept_key=concept_key)
        #: The processes' reducer outside a Trainer (``None``: ``torch.distributed`` when initialised).
        self.reducer: Reducer | None = None
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
        return rank_and_world_size(self.reducer)

    def _device(self) -> torch.device:
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device
        return model_device(self.source.model)

    def _place_source(self, device: torch.device) -> None:
        if self.source.device != device or model_device(self.source.model) != device:
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
            images = self.batch_reader.inputs(loader.collate_fn([loader.dataset[0]]))
        except Exception:  # no map-style dataset to peek into: the shape is learned on the first batch
            return
        tokens = self.source.spatial == "tokens"
        if isinstance(images, Tensor) and (images.is_floating_point() or tokens) and images.ndim >= 2:
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
            norms = float(raw.double().norm(dim=1).sum())
            self.source.set_scale_from_norms(norms, raw.shape[0], raw.shape[1], self.reducer)
            return
        self.source.estimate_scale(shard_loader, self.scale_batches, self.reducer, self.batch_reader)

    def _prepare_cache(self, train_loader: DataLoader, shard_loader: DataLoader) -> CachedActivationBatches:
        assert self.cache is not None
        if self.source.spatial == "maps":
            raise ValueError("spatial='maps' cannot be cached (the cache stores [N, d] vectors); use on-the-fly mode")
        rank, world = self._rank_world()
        dataset = train_loader.dataset
        num_images = len(dataset)  # type: ignore[arg-type]
        first = next(iter(shard_loader))
        self.source.vector_dim(self.batch_reader.inputs(first).to(self._device()))
        expected = {
            "format": CACHE_FORMAT,
            "model": self.source.fingerprint(),
            "layer": self.source.layer,
            "spatial": self.source.spatial,
            "layer_shape": list(self.source.layer_shape or ()),
            "data": _data_fingerprint(self.datamodule, dataset),
            "num_images": num_images,
        }
        tokens = self.source.spatial == "tokens"
        if tokens:  # the rows depend on what counts as padding
            expected["pad_token"] = self.source.pad_token
        array = self.cache.open(expected, rank, world)
        if array is None:
            if self.cache.metadata(rank, world) is not None:
                warnings.warn(
                    f"activation cache {self.cache.paths(rank, world)[0]} was written for another model, layer or "
                    "data; rewriting it",
                    stacklevel=2,
                )
            device = self._device()
            rows = sum(self.source.count_rows(self.batch_reader.inputs(b), _attention_mask_of(b)) for b in shard_loader)
            batches = (self._raw_vectors(b, device) for b in shard_loader)
            array = self.cache.write(expected, rank, world, rows, batches)
            self.cache_status = "written"
        else:
            self.cache_status = "reused"
        if tokens:  # shards hold different numbers of real tokens: every process uses the smallest count
            reduce = default_reducer() if self.reducer is None else self.reducer
            smallest = int(reduce(torch.tensor([array.shape[0]], dtype=torch.long), "min").reshape(-1)[0])
        else:  # the last rank's shard (ranks below hold one more image when uneven)
            smallest = num_images // world * self.source.vectors_per_image()
        if smallest < 1:
            raise ValueError(f"{num_images} training images cannot be sharded over {world} processes")
        path = self.cache.paths(rank, world)[0]
        return CachedActivationBatches(path, smallest, self.batch_size, self.shuffle, self.seed)

    def _raw_vectors(self, batch: Any, device: torch.device) -> Tensor:
        """Unscaled training rows of one wrapped batch (padding left out for token batches)."""
        inputs = self.batch_reader.inputs(batch).to(device)
        mask = self.source.token_mask(inputs, _attention_mask_of(batch))
        return self.source.to_vectors(self.source.layer_output(inputs), scaled=False, mask=mask)

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
        images = self.batch_reader.inputs(batch)
        self._place_source(images.device)
        extras = batch_extras(batch, self.batch_reader)
        mask = self.source.token_mask(images, _attention_mask_of(batch))
        vectors = self.source.to_vectors(self.source.layer_output(images), mask=mask)
        return ActivationBatch(vectors, images, extras, token_mask=mask)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self.source.scale), "scale_estimated": bool(self.source.scale_estimated)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source.scale.fill_(float(state_dict["scale"]))
        self.source.scale_estimated.fill_(bool(state_dict["scale_estimated"]))

