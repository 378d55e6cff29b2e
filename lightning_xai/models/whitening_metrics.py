"""How well a concept whitening layer's axes detect their concepts (Chen, Bei & Rudin, "Concept Whitening for
Interpretable Image Recognition", Nature Machine Intelligence 2020), pure torch: :func:`pooled_activations` (a
layer's output pooled over space, with the batches' concept labels), :func:`concept_purity` (the AUC of each
aligned axis as a detector of its concept) and its baseline :func:`best_filter_auc` (the best single channel of an
ordinary layer). Re-exported by :mod:`lightning_xai.models.whitening` and
:mod:`lightning_xai.models.concept_whitening`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import model_device, model_state_guard
from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.batch import BatchReader
from lightning_xai.checks import check_choice
from lightning_xai.evaluation.concepts import auc_matrix
from lightning_xai.models.cbm_interventions import _loader_from

__all__ = ["POOLINGS", "best_filter_auc", "concept_purity", "pooled_activations"]

#: How a feature map is pooled over space into one value per channel.
POOLINGS = ("mean", "max")


def pooled_activations(
    model: nn.Module, layer: str | nn.Module, data: Any, pool: str = "mean", split: str = "test",
    reader: BatchReader | None = None,
) -> tuple[Tensor, Tensor]:
    """``(activations [N, C], concept_labels [N, K])``: the output of ``layer`` pooled over space, per image.

    ``data`` is a DataLoader (or iterable) of batches with images and concept labels, read by ``reader`` (default:
    :class:`~lightning_xai.batch.BatchReader`'s defaults: ``(images, labels, concept_labels)`` tuples, dicts with
    ``"image"`` and ``"concepts"``), or a datamodule (its ``split`` loader). Eval mode, no gradients, modes
    restored; the forward hook is removed also on error.
    """
    reader = BatchReader(owner="pooled_activations") if reader is None else reader
    check_choice("pool", pool, POOLINGS, owner="pooled_activations")
    _, module = resolve_layer(model, layer)
    outputs: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        flat = output.detach().float().flatten(2)
        outputs.append((flat.mean(dim=2) if pool == "mean" else flat.amax(dim=2)).cpu())

    activations, concepts = [], []
    handle = module.register_forward_hook(hook)
    try:
        device = model_device(model)
        with model_state_guard(model), torch.no_grad():
            for batch in _loader_from(data, split):
                labels = reader.concepts(batch, required=True)
                outputs.clear()
                model(reader.inputs(batch).to(device))
                if len(outputs) != 1:
                    raise ValueError(f"layer {layer!r} ran {len(outputs)} times per forward pass; expected once")
                activations.append(outputs[0])
                concepts.append(labels.float().cpu())
    finally:
        handle.remove()
    if not activations:
        raise ValueError("pooled_activations got no batches")
    return torch.cat(activations), torch.cat(concepts)


def concept_purity(
    model: nn.Module,
    layer: str | nn.Module,
    data: Any,
    concepts: Sequence[int],
    pool: str = "mean",
    split: str = "test",
) -> Tensor:
    """Concept purity (Chen et al. 2020): the AUC ``[k]`` of axis ``j`` of ``layer`` (a CW layer) as a detector of
    concept ``concepts[j]`` on held-out data, with image-level labels and the axis map pooled over space."""
    activations, labels = pooled_activations(model, layer, data, pool, split)
    concepts = list(concepts)
    if len(concepts) > activations.shape[1]:
        raise ValueError(f"{len(concepts)} concepts but the layer has only {activations.shape[1]} channels")
    aucs = auc_matrix(activations[:, : len(concepts)], labels[:, concepts])
    return aucs.diagonal()


def best_filter_auc(
    model: nn.Module,
    layer: str | nn.Module,
    data: Any,
    concepts: Sequence[int],
    pool: str = "mean",
    split: str = "test",
) -> tuple[Tensor, Tensor]:
    """The baseline of concept purity: for each concept, the best AUC ``[k]`` of any single channel of ``layer``
    (e.g. the BatchNorm layer of an ordinary network), and which channel ``[k]`` achieves it."""
    activations, labels = pooled_activations(model, layer, data, pool, split)
    aucs = auc_matrix(activations, labels[:, list(concepts)])  # [C, k]
    best, channel = aucs.nan_to_num(-1.0).max(dim=0)
    return best, channel
