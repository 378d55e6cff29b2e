"""Shared plumbing of this project's generated data: balanced seeded labels, datasets held as whole-dataset
tensors, and DataModules whose splits are built in memory with validated loader options."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_xai.checks import check_int
from lightning_xai.namespace import pl

__all__ = [
    "SPLITS",
    "GeneratedDataset",
    "InMemoryDataModule",
    "SplitLoaders",
    "balanced_labels",
    "check_generator_seed",
    "check_image_size",
    "derive_seeds",
    "make_loader",
]

SPLITS = ("train", "val", "test")
#: Which splits a Trainer stage needs (``predict`` runs on the test split).
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def derive_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``seed`` (NumPy ``SeedSequence``).

    Unlike ``seed, seed + 1, ...``, the derived seeds of two different ``seed`` values do not overlap, so e.g. the
    validation split of ``seed=0`` is not the training split of ``seed=1``.
    """
    check_int("seed", seed, minimum=0, owner="derive_seeds")
    states = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)
    return [int(s >> np.uint64(1)) for s in states]


def check_image_size(image_size: int, minimum: int) -> int:
    """``image_size`` (pixels per side) of a generated dataset, at least ``minimum``: its smallest drawable scene."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < minimum:
        raise ValueError(f"image_size must be an int >= {minimum} (pixels), got {image_size!r}")
    return image_size


def check_generator_seed(seed: int, owner: str) -> int:
    """The integer seed of a generated dataset's ``torch.Generator``; a ``TypeError`` for anything else (a float
    or bool seed would silently stand for another integer)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner}: seed must be an int, got {type(seed).__name__}")
    return seed


def balanced_labels(size: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """``size`` class labels, exactly balanced (``size // num_classes`` or one more per class), in a random order
    drawn from ``generator``: the labels of every generated dataset."""
    return (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]


class GeneratedDataset(Dataset):
    """A generated dataset held as whole-dataset tensors with one row per sample.

    Item ``i`` is row ``i`` of each tensor attribute named in :attr:`item_fields`; the ``repr`` shows the
    attributes named in :attr:`repr_fields` (``size`` is the number of samples). Subclasses set ``labels``.
    """

    item_fields: ClassVar[tuple[str, ...]]
    repr_fields: ClassVar[tuple[str, ...]]
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name)[index] for name in self.item_fields)

    def __repr__(self) -> str:
        shown = (f"{name}={len(self) if name == 'size' else getattr(self, name)!r}" for name in self.repr_fields)
        return f"{type(self).__name__}({', '.join(shown)})"


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The project's one ``DataLoader`` recipe: workers kept alive between epochs, memory pinned on CUDA."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class SplitLoaders:
    """The four Lightning loader hooks of a DataModule with train/val/test splits: ``train`` shuffled, the
    others in order, ``predict`` on the test split. A subclass supplies ``_loader(split, shuffle)``; list this
    class before ``LightningDataModule`` among the bases."""

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class InMemoryDataModule(SplitLoaders, pl.LightningDataModule, abc.ABC):
    """A DataModule whose splits are built in memory by :meth:`make_dataset` (seeded, no download).

    ``setup(stage)`` builds only the splits the stage needs, once; the datasets are then ``self.datasets[split]``.
    The training loader shuffles (seed it with ``pl.seed_everything``), the others keep their order.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.num_workers = check_int("num_workers", num_workers, minimum=0, owner=owner)
        self.datasets: dict[str, Dataset] = {}

    def seeded_splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> None:
        """Set ``sizes`` (images per split, each checked >= 1), ``seed`` and ``split_seeds``: every split is
        generated from its own seed derived from ``seed`` (:func:`derive_seeds`)."""
        owner = type(self).__name__
        self.sizes = {
            split: check_int(f"n_{split}", value, minimum=1, owner=owner)
            for split, value in zip(SPLITS, (n_train, n_val, n_test))
        }
        self.seed = seed
        self.split_seeds = dict(zip(SPLITS, derive_seeds(seed, len(SPLITS))))

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
        return make_loader(self.dataset(split), self.batch_size, self.num_workers, shuffle)
