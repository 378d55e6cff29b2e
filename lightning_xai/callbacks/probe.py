"""The fixed probe set that epoch-end callbacks explain, and its sharding over DDP ranks.

A probe set is drawn once, with a seed, from the validation dataset, so the same images are explained at every
epoch (a W&B slider then shows one explanation evolving). Under DDP every rank draws the same indices, explains
a contiguous shard of them, and the shards are gathered so that every rank ends up with the full, identically
ordered result - callback state stays identical across ranks, and rank zero logs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ProbeBatch", "ProbeSet", "split_sample"]

_IMAGE_KEYS = ("image", "images", "input", "inputs", "x")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_MASK_KEYS = ("mask", "masks")


def split_sample(sample: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Read ``(input, label, mask)`` from one dataset item or one batch.

    Accepts a tensor (input only), a tuple/list ``(input, label, mask?, ...)`` - this project's datasets yield
    ``(image, label, mask)`` - or a mapping with keys such as ``"image"``, ``"label"``, ``"mask"``.
    """
    if isinstance(sample, Tensor):
        return sample, None, None
    if isinstance(sample, Mapping):
        x = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
        if x is None:
            raise ValueError(
                f"cannot find the input in a batch dict with keys {sorted(sample)}; use one of {_IMAGE_KEYS}"
            )
        y = next((sample[k] for k in _LABEL_KEYS if k in sample), None)
        m = next((sample[k] for k in _MASK_KEYS if k in sample), None)
        return x, _as_tensor(y), _as_tensor(m)
    if isinstance(sample, Sequence) and not isinstance(sample, str) and len(sample) > 0:
        x = sample[0]
        y = sample[1] if len(sample) > 1 else None
        m = sample[2] if len(sample) > 2 and isinstance(sample[2], Tensor) else None
        return x, _as_tensor(y), m
    raise TypeError(
        f"cannot read an input from a {type(sample).__name__}; expected a Tensor, (input, label, ...) or a dict"
    )


def _as_tensor(value: Any) -> Tensor | None:
    if value is None or isinstance(value, Tensor):
        return value
    return torch.as_tensor(value)


@dataclass
class ProbeBatch:
    """Inputs (and labels / masks, where the data has them) of the probe samples held by this rank."""

    inputs: Tensor
    labels: Tensor | None
    masks: Tensor | None
    #: Number of real (not padding) samples at the front of this shard.
    num_real: int

    def to(self, device: torch.device) -> ProbeBatch:
        return ProbeBatch(
            self.inputs.to(device),
            None if self.labels is None else self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
            self.num_real,
        )


class ProbeSet:
    """A fixed, seeded selection of validation samples, shardable across ranks.

    Args:
        num_samples: how many samples to explain.
        seed: the seed of the selection; the same seed selects the same samples on every rank and every run.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        self.num_samples = num_samples
        self.seed = seed
        self.indices: list[int] | None = None
        self._fixed: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    # ----------------------------------------------------------------------------------------------- selection
    def set_batch(self, batch: Any) -> None:
        """Use a user-given batch as the probe set instead of drawing from a dataset."""
        x, y, m = split_sample(batch)
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise ValueError(f"a probe batch needs a batched input tensor, got {type(x).__name__}")
        n = min(self.num_samples, x.shape[0])
        self._fixed = (x[:n], None if y is None else y[:n], None if m is None else m[:n])
        self.indices = list(range(n))

    def select(self, dataset: Any) -> list[int]:
        """Draw the probe indices from a map-style dataset (once; later calls keep the first choice)."""
        if self.indices is not None:
            return self.indices
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"the validation dataset ({type(dataset).__name__}) is not indexable; pass `probe_batch=` to the "
                "callback instead"
            )
        total = len(dataset)
        if total == 0:
            raise ValueError("the validation dataset is empty: there is nothing to explain")
        g = torch.Generator().manual_seed(self.seed)
        self.indices = torch.randperm(total, generator=g)[: self.num_samples].tolist()
        return self.indices

    # ------------------------------------------------------------------------------------------------ sharding
    @staticmethod
    def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int, int]:
        """``(start, stop, per_rank)``: this rank's contiguous slice of ``total`` items, padded to equal size."""
        per_rank = -(-total // world_size)
        start = min(rank * per_rank, total)
        stop = min(start + per_rank, total)
        return start, stop, per_rank

    def load_shard(self, dataset: Any, world_size: int = 1, rank: int = 0) -> ProbeBatch:
        """Load this rank's shard of the probe samples, padded (by repeating a sample) to equal shard sizes."""
        if self.indices is None:
            raise RuntimeError("select() or set_batch() must be called before load_shard()")
        total = len(self.indices)
        start, stop, per_rank = self.shard_bounds(total, world_size, rank)
        positions = list(range(start, stop))
        num_real = len(positions)
        positions += [positions[-1] if positions else 0] * (per_rank - num_real)
        if self._fixed is not None:
            x, y, m = self._fixed
            idx = torch.tensor(positions, dtype=torch.long)
            return ProbeBatch(x[idx], None if y is None else y[idx], None if m is None else m[idx], num_real)
        items = [split_sample(dataset[self.indices[p]]) for p in positions]
        xs = torch.stack([torch.as_tensor(it[0]) for it in items])
        ys = None if any(it[1] is None for it in items) else torch.stack([it[1].reshape(()) for it in items]).long()
        ms = None if any(it[2] is None for it in items) else torch.stack([it[2] for it in items])
        return ProbeBatch(xs, ys, ms, num_real)

    @staticmethod
    def gather(local: Tensor, total: int, all_gather: Any, world_size: int) -> Tensor:
        """Gather equal-sized shards from every rank and return the first ``total`` items in probe order.

        ``all_gather`` is ``trainer.strategy.all_gather`` (returns ``[world, ...]`` under DDP and the tensor
        itself on one device).
        """
        if world_size == 1:
            return local[:total]
        gathered = all_gather(local.contiguous())
        return gathered.reshape(-1, *local.shape[1:])[:total]
