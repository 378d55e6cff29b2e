"""``ConceptMaskDataModule``: a concept datamodule's images with their pixel-level concept masks, for Net2Vec.

Wraps a datamodule whose datasets hold concept masks (e.g. :class:`~lightning_xai.data.concepts.ConceptDataModule`)
and yields ``(images, labels, concept_labels, masks)`` batches, the masks built per batch by a collate function
(the scenes render them on demand). Moved here from ``lightning_xai.models.net2vec``, which re-exports it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_xai.data.base import SplitLoaders, make_loader
from lightning_xai.namespace import pl

__all__ = ["ConceptMaskDataModule"]


class _Indices(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class _MaskCollate:
    """Indices -> ``(images, labels, concept_labels, concept_masks)`` of a ``ConceptScenes`` (vectorised)."""

    def __init__(self, scenes: Any) -> None:
        self.scenes = scenes

    def __call__(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        s = self.scenes
        return s.images[index], s.labels[index], s.concept_labels[index], s.concept_masks_for(index)


class ConceptMaskDataModule(SplitLoaders, pl.LightningDataModule):
    """A ``ConceptDataModule`` whose batches also carry the pixel masks of every concept.

    Batches: ``(images [B, 3, H, W], labels [B], concept_labels [B, K], concept_masks bool [B, K, H, W])``; the
    masks are computed per batch with ``ConceptScenes.concept_masks_for`` (not stored). Splits, seeds and
    batch size are those of the wrapped ``datamodule`` (any datamodule whose ``dataset(split)`` returns a dataset
    with ``images``, ``labels``, ``concept_labels`` and ``concept_masks_for``).
    """

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        super().__init__()
        if not callable(getattr(datamodule, "dataset", None)):
            raise TypeError(
                f"datamodule must provide dataset(split) (e.g. ConceptDataModule), got {type(datamodule).__name__}"
            )
        self.datamodule = datamodule

    @property
    def concept_names(self) -> list[str]:
        return list(self.datamodule.concept_names)  # type: ignore[attr-defined]

    @property
    def hparams(self) -> Any:  # the wrapped module's hyper-parameters identify the data
        return self.datamodule.hparams

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        scenes = self.datamodule.dataset(split)  # type: ignore[attr-defined]
        for attribute in ("images", "labels", "concept_labels", "concept_masks_for"):
            if not hasattr(scenes, attribute):
                raise TypeError(f"the {split} dataset {type(scenes).__name__} has no {attribute!r}")
        return make_loader(
            _Indices(len(scenes)),
            batch_size=getattr(self.datamodule, "batch_size", 64),
            num_workers=getattr(self.datamodule, "num_workers", 0),
            shuffle=shuffle,
            collate_fn=_MaskCollate(scenes),
        )
