"""What post-hoc method modules receive: :class:`ActivationBatch` (activation vectors with the batch they came
from) and the readers of the wrapped datamodule's batches (inputs, attention mask).

Split from ``lightning_xai.data.activation_source``, which re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_xai.batch import BatchReader

__all__ = ["ActivationBatch", "as_activation_batch", "batch_extras"]


def _attention_mask_of(batch: Any) -> Tensor | None:
    """The ``"attention_mask"`` (1 = real token) of a dict batch, else ``None`` (tuple batches carry none:
    :class:`~lightning_xai.data.tokens.PlantedTokens`'s third element is the ground-truth key mask)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"]
    return None


def batch_extras(batch: Any, reader: BatchReader) -> tuple[Any, ...]:
    """What travels with the activations of one wrapped batch: a tuple batch's elements after the input (e.g.
    ``(labels, concept_labels)`` of a ``ConceptDataModule``); for a dict or object batch, ``(labels,
    concept_labels)`` as the ``reader`` finds them (``label_key`` / ``concept_key``; ``None`` where absent, the
    tuple shortened to the last one found), so that labelled dict batches give the same downstream figures."""
    if isinstance(batch, Tensor):
        return ()
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return tuple(batch[1:])
    extras = (reader.labels(batch), reader.concepts(batch))
    while extras and extras[-1] is None:
        extras = extras[:-1]
    return extras


@dataclass
class ActivationBatch:
    """What post-hoc method modules receive.

    ``activations``: ``[N, d]`` vectors (``[B, C, h, w]`` for ``spatial="maps"``), scaled. ``images``: the image
    batch they came from (token ids for ``spatial="tokens"``; ``None`` for cached batches). ``extras``: the rest of
    the image batch, e.g. ``(labels, concept_labels)`` of a ``ConceptDataModule`` or ``(labels, concept_labels,
    concept_masks)``. ``token_mask``: ``spatial="tokens"`` only, the
    :meth:`~lightning_xai.data.activation_source.ActivationSource.token_mask` of the token ids (True = real token;
    ``None``: every position is a row).
    """

    activations: Tensor
    images: Tensor | None = None
    extras: tuple[Any, ...] = ()
    token_mask: Tensor | None = None

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
