"""Shared plumbing of this project's DataModules: in-memory datasets built per split, validated loader options."""

from __future__ import annotations

import abc

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_xai.namespace import pl

__all__ = ["SPLITS", "InMemoryDataModule", "derive_seeds"]

SPLITS = ("train", "val", "test")
#: Which splits a Trainer stage needs (``predict`` runs on the test split).
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def derive_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``seed`` (NumPy ``SeedSequence``).

    Unlike ``seed, seed + 1, ...``, the derived seeds of two different ``seed`` values do not overlap, so e.g. the
    validation split of ``seed=0`` is not the training split of ``seed=1``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    states = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)
    return [int(s >> np.uint64(1)) for s in states]


def check_loader_args(batch_size: int, num_workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int (0 = load in the main process), got {num_workers!r}")


class InMemoryDataModule(pl.LightningDataModule, abc.ABC):
    """A DataModule whose splits are built in memory by :meth:`make_dataset` (seeded, no download).

    ``setup(stage)`` builds only the splits the stage needs, once; the datasets are then ``self.datasets[split]``.
    The training loader shuffles (seed it with ``pl.seed_everything``), the others keep their order.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    @abc.abstractmethod
    def make_dataset(self, split: str) -> Dataset:
        """Build the dataset of ``split`` (one of :data:`SPLITS`)."""

    def setup(self, stage: str | None = None) -> None:
        if stage is not None and stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; valid stages: {sorted(_STAGE_SPLITS)} or None (all splits)")
        for split in SPLITS if stage is None else _STAGE_SPLITS[stage]:
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``, built on first use (also outside a Trainer, e.g. to pick probe images)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
