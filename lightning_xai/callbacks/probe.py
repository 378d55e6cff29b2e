"""The fixed probe set that epoch-end callbacks explain, and its sharding over DDP ranks.

A probe set is drawn once, with a seed, from a dataset, so the same samples are explained at every epoch (a W&B
slider then shows one explanation evolving). Under DDP every rank draws the same indices, explains a contiguous
shard of them, and the shards are gathered so that every rank ends up with the full, identically ordered result -
callback state stays identical across ranks, and rank zero logs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_xai.batch import BatchReader
from lightning_xai.checks import check_int
from lightning_xai.distributed import Reducer, default_reducer, shard_bounds

__all__ = ["ProbeBatch", "ProbeSet", "split_sample"]

_DEFAULT_READER = BatchReader()


def split_sample(sample: Any, reader: BatchReader | None = None) -> tuple[Any, Tensor | None, Tensor | None]:
    """Read ``(input, label, mask)`` from one dataset item or one batch with ``reader`` (default keys otherwise).

    Accepts a tensor (input only), a tuple/list ``(input, label, mask?, ...)`` - this project's datasets yield
    ``(image, label, mask)`` - a mapping or an object with fields such as ``"image"``, ``"label"``, ``"mask"``
    (see :class:`lightning_xai.batch.BatchReader`).
    """
    sample_ = (reader or _DEFAULT_READER).read(sample)
    return sample_.inputs, sample_.labels, sample_.masks


@dataclass
class ProbeBatch:
    """Inputs (and labels / masks, where the data has them) of the probe samples held by this rank."""

    inputs: Tensor
    labels: Tensor | None
    masks: Tensor | None
    #: Number of real (not padding) samples at the front of this shard.
    num_real: int
    #: Identities of the samples that do not depend on the sharding - dataset indices, or positions in a
    #: user-given ``probe_batch`` - used to name samples in messages and tables and to seed per-sample randomness.
    sample_ids: Tensor | None = None

    def to(self, device: torch.device) -> ProbeBatch:
        return ProbeBatch(
            self.inputs.to(device),
            None if self.labels is None else self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
            self.num_real,
            None if self.sample_ids is None else self.sample_ids.to(device),
        )


def _spatial_masks(masks: Tensor | None, inputs: Tensor) -> Tensor | None:
    """``masks`` if they are pixel masks of the inputs (same spatial size) or token masks of token ids (one value
    per position of integer ``[B, T]`` inputs), else ``None`` (e.g. a concept vector)."""
    if (
        masks is not None and isinstance(inputs, Tensor) and inputs.ndim == 2 and not inputs.is_floating_point()
        and masks.shape == inputs.shape
    ):
        return masks
    if masks is None or not isinstance(inputs, Tensor) or inputs.ndim < 3 or masks.ndim < 2:
        return None
    return masks if tuple(masks.shape[-2:]) == tuple(inputs.shape[-2:]) else None


class ProbeSet:
    """A fixed, seeded selection of samples, shardable across ranks.

    Args:
        num_samples: how many samples to explain (fewer when the dataset is smaller; :attr:`shortfall` says so).
        seed: the seed of the selection; the same seed selects the same samples on every rank and every run.
        reader: reads inputs / labels / masks from the dataset items.
    """

    def __init__(self, num_samples: int, seed: int = 0, reader: BatchReader | None = None) -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.seed = seed
        self.reader = reader or _DEFAULT_READER
        self.indices: list[int] | None = None
        self._fixed: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    @property
    def size(self) -> int:
        return len(self.indices or [])

    @property
    def shortfall(self) -> bool:
        """Whether fewer samples were selected than asked for (a small dataset)."""
        return self.indices is not None and len(self.indices) < self.num_samples

    # ----------------------------------------------------------------------------------------------- selection
    def set_batch(self, batch: Any) -> None:
        """Use a user-given batch as the probe set instead of drawing from a dataset."""
        x, y, m = split_sample(batch, self.reader)
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise ValueError(f"a probe batch needs a batched input tensor, got {type(x).__name__}")
        n = min(self.num_samples, x.shape[0])
        self._fixed = (x[:n], None if y is None else y[:n], None if m is None else m[:n])
        self.indices = list(range(n))

    @property
    def fixed(self) -> bool:
        return self._fixed is not None

    def select(self, dataset: Any) -> list[int]:
        """Draw the probe indices from a map-style dataset (once; later calls keep the first choice)."""
        if self.indices is not None:
            return self.indices
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"the dataset ({type(dataset).__name__}) is not indexable; pass `probe_batch=` to the callback instead"
            )
        total = len(dataset)
        if total == 0:
            raise ValueError("the dataset is empty: there is nothing to explain")
        g = torch.Generator().manual_seed(self.seed)
        self.indices = torch.randperm(total, generator=g)[: self.num_samples].tolist()
        return self.indices

    # ------------------------------------------------------------------------------------------------ sharding
    shard_bounds = staticmethod(shard_bounds)

    def load(self, dataset: Any, positions: list[int]) -> ProbeBatch:
        """The probe samples at ``positions`` (indices into :attr:`indices`), stacked."""
        if self.indices is None:
            raise RuntimeError("select() or set_batch() must be called before loading probe samples")
        if self._fixed is not None:
            x, y, m = self._fixed
            idx = torch.tensor(positions, dtype=torch.long)
            ids = idx.clone()  # a given batch has no dataset indices: its samples are named by their positions
            return ProbeBatch(x[idx], None if y is None else y[idx], _spatial_masks(None if m is None else m[idx], x),
                              len(positions), ids)
        items = [split_sample(dataset[self.indices[p]], self.reader) for p in positions]
        xs = torch.stack([torch.as_tensor(it[0]) for it in items])
        ys = None
        if items and all(it[1] is not None for it in items):
            labels = [it[1] for it in items]
            ys = torch.stack([lab.reshape(()) if lab.numel() == 1 else lab for lab in labels])
            if ys.dtype.is_floating_point and ys.ndim == 1:
                ys = ys.long()
        ms = None if not items or any(it[2] is None for it in items) else torch.stack([it[2] for it in items])
        ids = torch.tensor([self.indices[p] for p in positions], dtype=torch.long)
        return ProbeBatch(xs, ys, _spatial_masks(ms, xs), len(positions), ids)

    def load_shard(self, dataset: Any, world_size: int = 1, rank: int = 0) -> ProbeBatch:
        """Load this rank's shard of the probe samples, padded (by repeating a sample) to equal shard sizes."""
        if self.indices is None:
            raise RuntimeError("select() or set_batch() must be called before load_shard()")
        total = len(self.indices)
        start, stop, per_rank = shard_bounds(total, world_size, rank)
        positions = list(range(start, stop))
        num_real = len(positions)
        positions += [positions[-1] if positions else 0] * (per_rank - num_real)
        batch = self.load(dataset, positions)
        batch.num_real = num_real
        return batch

    @staticmethod
    def gather(local: Tensor, total: int, all_gather: Any = None, world_size: int = 1,
               reducer: Reducer | None = None) -> Tensor:
        """Gather equal-sized shards from every rank and return the first ``total`` items in probe order.

        With ``reducer`` (default: :func:`lightning_xai.distributed.default_reducer`) the shards are exchanged
        through it; ``all_gather`` (``trainer.strategy.all_gather``) is still accepted for compatibility.
        """
        if world_size == 1 and all_gather is not None:
            return local[:total]
        if all_gather is not None:
            gathered = all_gather(local.contiguous())
            return gathered.reshape(-1, *local.shape[1:])[:total]
        reducer = default_reducer() if reducer is None else reducer
        if reducer.world_size == 1:
            return local[:total]
        return reducer(local.contiguous(), "gather").reshape(-1, *local.shape[1:])[:total]
