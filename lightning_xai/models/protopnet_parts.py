"""The parts of ProtoPNet that are plain torch: distances, similarity, the receptive field of the trunk, the output
and explanation records, and the distributed helpers of the push (Chen et al., "This Looks Like That", NeurIPS
2019; see :mod:`lightning_xai.models.protopnet`, which re-exports every public name).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.distributed import default_reducer, rank_and_world_size
from lightning_xai.interpretation.receptive_field import ReceptiveField
from lightning_xai.interpretation.receptive_field import receptive_field as shared_receptive_field
from lightning_xai.models.backbones import BACKBONES, SmallCNN, VGGSmall, build_backbone

__all__ = [
    "STAGES",
    "ProtoPNetOutput",
    "PrototypeExplanation",
    "ReceptiveField",
    "build_trunk",
    "l2_distances",
    "log_similarity",
    "receptive_field",
]


STAGES = ("warm", "joint", "last_layer")


_PROBE_SIZE = 64


def l2_distances(z: Tensor, prototypes: Tensor) -> Tensor:
    """Squared L2 distance of every latent patch to every prototype, as convolutions.

    Args:
        z: latent map ``[B, D, h, w]``.
        prototypes: ``[P, D, 1, 1]``.

    Returns:
        ``[B, P, h, w]``: ``||z[b, :, i, j]||^2 - 2 z[b, :, i, j].p_k + ||p_k||^2``, clamped at 0 (the expansion can
        round slightly below zero). The cross term is ``conv2d(z, prototypes)``; ``||z||^2`` is the convolution of
        ``z^2`` with a ones kernel of the prototypes' spatial shape (1x1: a sum over channels).
    """
    if z.ndim != 4 or prototypes.ndim != 4 or prototypes.shape[1] != z.shape[1]:
        raise ValueError(
            f"expected z [B, D, h, w] and prototypes [P, D, kh, kw] with the same D, got {list(z.shape)} and "
            f"{list(prototypes.shape)}"
        )
    ones = torch.ones((1, *prototypes.shape[1:]), dtype=z.dtype, device=z.device)
    z_sq = F.conv2d(z * z, ones)  # [B, 1, h, w]
    cross = F.conv2d(z, prototypes)  # [B, P, h, w]
    p_sq = prototypes.pow(2).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    return F.relu(z_sq - 2 * cross + p_sq)


def log_similarity(distances: Tensor, epsilon: float = 1e-4) -> Tensor:
    """ProtoPNet's similarity ``log((d + 1) / (d + epsilon))``: ``log(1 / epsilon)`` at ``d = 0``, decreasing to 0."""
    return torch.log((distances + 1) / (distances + epsilon))


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and restore each one's own mode afterwards (also on error)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def receptive_field(trunk: nn.Module, in_channels: int = 3) -> ReceptiveField:
    """The receptive field of the output positions of a convolutional ``trunk``: the shared exact computation of
    :func:`lightning_xai.interpretation.receptive_field.receptive_field` (layer geometry along the ``torch.fx``
    graph; Araujo, Norris & Sim, Distill 2019), which falls back to a gradient estimate (``exact=False``) with a
    warning when the trunk cannot be traced."""
    return shared_receptive_field(trunk, None, in_channels=in_channels)


def build_trunk(backbone: str, num_classes: int, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """The convolutional trunk (no global pooling, no classifier) of the backbone called ``backbone``.

    ``"small_cnn"``: ``blocks`` + ``features`` of :class:`~lightning_xai.models.backbones.SmallCNN` (1/4 of the input
    resolution); ``"resnet18"``: stem + ``layer1`` .. ``layer4`` (1/32, or 1/8 with ``small_input``);
    ``"vgg_small"``: ``features`` of :class:`~lightning_xai.models.backbones.VGGSmall` (1/4).
    """
    if not isinstance(backbone, str) or backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid names: {list(BACKBONES)} (or pass an nn.Module)")
    model = build_backbone(backbone, num_classes=num_classes, in_channels=in_channels, small_input=small_input)
    if isinstance(model, SmallCNN):
        return nn.Sequential(OrderedDict(blocks=model.blocks, features=model.features))
    if isinstance(model, VGGSmall):
        return model.features
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))


@dataclass
class ProtoPNetOutput:
    """Everything one forward pass computes: ``logits [B, C]``, ``min_distances [B, P]`` (min-pooled squared
    distances), ``similarities [B, P]`` (their log-similarities) and ``distance_maps [B, P, h, w]``."""

    logits: Tensor
    min_distances: Tensor
    similarities: Tensor
    distance_maps: Tensor


@dataclass
class PrototypeExplanation:
    """Why an input got its score, "this looks like that", for ``B`` inputs and the top ``k`` prototypes of each.

    Prototypes are ranked by their contribution to the target logit, ``similarity * last_layer.weight[target,
    prototype]`` (the "points" of Chen et al. 2019), largest first; ``similarity_maps`` are each prototype's
    log-similarity at every latent position, upsampled bilinearly to the input size (large = looks like the
    prototype). ``source_indices`` / ``source_boxes`` come from the last push (-1 before any push).
    """

    logits: Tensor  # [B, C]
    target: Tensor  # [B] long
    prototype_indices: Tensor  # [B, k] long
    prototype_classes: Tensor  # [B, k] long
    similarities: Tensor  # [B, k]
    weights: Tensor  # [B, k] last-layer weight (target class, prototype)
    contributions: Tensor  # [B, k] similarities * weights
    similarity_maps: Tensor  # [B, k, H, W]
    source_indices: Tensor  # [B, k] long: training-set index of each prototype's source image
    source_boxes: Tensor  # [B, k, 4] long: (top, left, bottom, right) of the source patch


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    return rank_and_world_size()


def _gather(tensor: Tensor, world_size: int) -> Tensor:
    """``[world_size, *tensor.shape]``: ``tensor`` from every rank (``tensor[None]`` without a process group)."""
    return default_reducer()(tensor.contiguous(), "gather")

