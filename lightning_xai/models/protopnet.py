"""``ProtoPNet``: the prototypical part network, an image classifier that explains by "this looks like that".

C. Chen, O. Li, D. Tao, A. Barnett, C. Rudin and J. K. Su, "This Looks Like That: Deep Learning for Interpretable
Image Recognition", NeurIPS 2019.

**Architecture.** ``features`` (the convolutional trunk of a backbone, without its pooling and classifier head)
-> ``add_on`` (two 1x1 convolutions, ReLU after the first, sigmoid after the second, so latent vectors lie in
``[0, 1]^D``) -> a latent map ``z [B, D, h, w]`` -> ``prototypes [P, D, 1, 1]`` with ``P = num_classes *
prototypes_per_class`` (prototype ``j`` belongs to class ``j // prototypes_per_class``) -> squared L2 distances of
every latent patch to every prototype, computed as convolutions, ``||z||^2 - 2 z.p + ||p||^2`` clamped at 0
(:func:`l2_distances`) -> min-pooling over positions -> similarity ``log((d + 1) / (d + epsilon))``
(:func:`log_similarity`, decreasing in ``d``, ``log(1 / epsilon)`` at ``d = 0``) -> ``last_layer`` (linear, no
bias) -> logits. The last layer starts at ``+1`` for a prototype's own class and ``incorrect_class_connection``
(-0.5) for every other class.

**Loss** (per batch, means over the batch): ``CE + lambda_clst * cluster - lambda_sep * separation + lambda_l1 *
L1`` with ``cluster`` = the smallest (min-pooled) distance from an image to a prototype of its own class,
``separation`` = the smallest distance to a prototype of any other class, ``L1`` = the sum of absolute last-layer
weights between a prototype and the classes it does not belong to (:meth:`ProtoPNet.loss_terms`).

**Training schedule** (stages by epoch, :meth:`ProtoPNet.stage_of_epoch`)::

    warm x warm_epochs | (joint x joint_epochs, push, last_layer x last_layer_epochs) x push_cycles | last_layer ...

* ``"warm"``: only ``add_on`` and ``prototypes`` learn (the trunk is frozen);
* ``"joint"``: everything but the last layer learns (the last layer is fixed);
* push, at the end of the last joint epoch of each cycle (``on_train_epoch_end``, or by calling
  :meth:`ProtoPNet.push` yourself): every prototype is replaced by the latent vector of its nearest latent patch
  among the training images of its class;
* ``"last_layer"``: only the last layer learns - with the trunk, add-on and prototypes fixed the loss is convex in
  the last-layer weights (cross-entropy of a linear model plus an L1 term).

Epochs after the schedule (``max_epochs`` larger than :attr:`ProtoPNet.schedule_length`) stay in the last-layer
stage, so the model keeps its pushed prototypes; a ``max_epochs`` smaller than the schedule is refused in
``setup`` (the push would never run).

**How stages switch, also under DDP.** DDP fixes its gradient buckets when it wraps the model and then expects
*every* parameter it registered to receive a gradient in *every* backward pass (unless
``find_unused_parameters=True``, which costs a graph traversal each step). Toggling ``requires_grad`` between
stages would break that contract: a parameter frozen at wrap time is never all-reduced when it is unfrozen later
(ranks silently diverge), one frozen later makes the reducer wait forever or raise. So nothing is ever frozen
here: this module uses **manual optimisation with one optimiser per stage** (``configure_optimizers`` returns
``[warm, joint, last_layer]``), every parameter keeps ``requires_grad=True``, and every training step backpropagates
one loss through which every parameter receives a gradient; only the current stage's optimiser steps, and all
gradients are then cleared. Parts that are frozen in a stage run under ``torch.no_grad()`` (no backward through
the trunk in the warm and last-layer stages) and enter the loss through an exact-zero term ``0 * sum(p)``, so they
still receive a (zero) gradient that DDP all-reduces with the rest: the same parameter set takes part in every
backward on every rank, the default ``strategy="ddp"`` works, and each stage's Adam state only ever sees its own
stage's gradients. In the warm stage the frozen trunk stays in train mode (its BatchNorm layers keep normalising
with batch statistics and updating their running statistics, as in the authors' code); in the last-layer stage the
trunk and add-on layers run in eval mode, so the features are a fixed function of the image (the problem is
convex) and the latent patches the prototypes were pushed onto do not drift.

**Push under DDP.** :meth:`ProtoPNet.push` runs on every rank: each rank scans its shard of the training set
(dataset indices ``rank, rank + world_size, ...``) in eval mode and keeps, per prototype, its best ``(distance,
dataset index, position, source image)``; an all-gather and a lexicographic argmin over ``(distance, dataset index,
position)`` picks the global winner, the same one on every rank. The prototype becomes the winning patch's latent
vector, taken from the latent map of its source image computed on its own, ``latent(image[None].contiguous())``
in eval mode (convolution results may differ in the last bits with the batch composition and memory format, so
"this patch's latent vector" needs one canonical computation), computed from the same gathered image on every rank
and broadcast from rank 0, so the prototype
holds the same bytes everywhere and equals that patch's latent vector exactly. Before the scan, the trunk's and
add-on's buffers (BatchNorm running statistics) are broadcast from rank 0, so every rank computes the latent
vectors of the model that rank 0 checkpoints.

**Interpretation.** The push record is kept in buffers (saved in checkpoints): per prototype the dataset index of
its source image, the latent position, the receptive-field box in the image (:func:`receptive_field`) and the
source crop with the prototype's similarity map over it. :meth:`ProtoPNet.explain` ranks the prototypes of an
input by their contribution to the target logit (similarity x last-layer weight) and upsamples their similarity
maps to the image; :meth:`ProtoPNet.log_explanations` logs them as an image table ("this" = the input with the
similarity map, "looks like that" = the source crop) and :meth:`ProtoPNet.prototype_gallery` renders all source
crops (logged after each push).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_xai.distributed import broadcast, default_reducer, rank_and_world_size
from lightning_xai.interpretation.receptive_field import ReceptiveField
from lightning_xai.interpretation.receptive_field import receptive_field as shared_receptive_field
from lightning_xai.models.backbones import BACKBONES, SmallCNN, VGGSmall, build_backbone
from lightning_xai.models.base import StepOutput, XAIModule
from lightning_xai.namespace import pl
from lightning_xai.viz.logging import log_image, log_table
from lightning_xai.viz.render import overlay, to_uint8_images

__all__ = [
    "STAGES",
    "ProtoPNet",
    "ProtoPNetOutput",
    "PrototypeExplanation",
    "ReceptiveField",
    "l2_distances",
    "log_similarity",
    "receptive_field",
]

#: Training stages, in the order of the optimisers returned by ``configure_optimizers``.
STAGES = ("warm", "joint", "last_layer")
#: Input side (pixels) of the dummy forward that measures the trunk's channels.
_PROBE_SIZE = 64


# --------------------------------------------------------------------------------------------------------------------
# Distances and similarities


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


# --------------------------------------------------------------------------------------------------------------------
# Receptive fields (the shared exact computation of lightning_xai.interpretation.receptive_field)


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


# --------------------------------------------------------------------------------------------------------------------
# Backbone trunks


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


# --------------------------------------------------------------------------------------------------------------------
# Outputs


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


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    return rank_and_world_size()


def _gather(tensor: Tensor, world_size: int) -> Tensor:
    """``[world_size, *tensor.shape]``: ``tensor`` from every rank (``tensor[None]`` without a process group)."""
    return default_reducer()(tensor.contiguous(), "gather")


# --------------------------------------------------------------------------------------------------------------------
# The module


class ProtoPNet(XAIModule):
    """Prototypical part network (Chen et al., NeurIPS 2019); see the module docstring for the method, the stage
    schedule and how stages and the push work under DDP.

    Args:
        backbone: ``"small_cnn"``, ``"resnet18"`` or ``"vgg_small"`` (its convolutional trunk is used, see
            :func:`build_trunk`), or an ``nn.Module`` mapping images ``[B, in_channels, H, W]`` to feature maps
            ``[B, D, h, w]`` (in YAML: ``class_path`` / ``init_args``). Randomly initialised when given by name.
        num_classes: number of classes, >= 2.
        in_channels: image channels.
        prototypes_per_class: prototypes per class, >= 1 (the paper: 10).
        prototype_dim: channels ``D`` of the latent space (add-on output and prototypes; the paper: 128).
        small_input: ``"resnet18"`` only: the 3x3 stride-1 stem for 32x32..64x64 inputs.
        epsilon: the ``epsilon`` of the similarity ``log((d + 1) / (d + epsilon))``, > 0.
        lambda_clst, lambda_sep, lambda_l1: weights of the cluster, separation and L1 terms, >= 0 (the paper: 0.8,
            0.08, 1e-4).
        incorrect_class_connection: initial last-layer weight between a prototype and the other classes (-0.5).
        warm_epochs: epochs of the warm-up stage (>= 0).
        joint_epochs: epochs of the joint stage in each cycle (>= 1); the push runs at the end of the last one.
        last_layer_epochs: epochs of the last-layer stage after each push (>= 0).
        push_cycles: number of (joint, push, last-layer) cycles (>= 1).
        backbone_lr: learning rate of the trunk in the joint stage (``None``: ``lr``).
        last_layer_lr: learning rate of the last layer (``None``: ``lr``).
        push_batch_size: images per forward pass during the push.
        explain_samples: after each validation epoch in which the prototypes are pushed, the first
            ``explain_samples`` validation images are explained and logged (:meth:`log_explanations`); 0 disables.
        explain_top_k: prototypes per explained image.
        optimizer, lr, weight_decay, scheduler, momentum: see :class:`~lightning_xai.models.base.XAIModule`.
            ``lr`` is the learning rate of the add-on layers and prototypes. ``weight_decay`` applies to the trunk
            and add-on layers only (prototypes and the last layer have their own terms). ``scheduler="cosine"``
            anneals each stage's optimiser over the steps that stage gets in the whole run.

    Batches are ``(images, labels, ...)``. Logged: ``train_loss``, ``train_ce``, ``train_cluster``,
    ``train_separation``, ``train_l1``, ``train_acc``, ``train_stage`` (index into :data:`STAGES`), ``val_loss``,
    ``val_acc``, ``test_loss``, ``test_acc``, and after each push ``push_mean_distance`` / ``push_max_distance``
    (how far the prototypes moved), the image ``protopnet/prototypes`` (the gallery) and, after validation, the
    table ``protopnet/explanations``. Accuracies are torchmetrics (reduced across ranks); losses use
    ``sync_dist=True``.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small_cnn",
        num_classes: int = 6,
        in_channels: int = 3,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        small_input: bool = False,
        epsilon: float = 1e-4,
        lambda_clst: float = 0.8,
        lambda_sep: float = 0.08,
        lambda_l1: float = 1e-4,
        incorrect_class_connection: float = -0.5,
        warm_epochs: int = 2,
        joint_epochs: int = 10,
        last_layer_epochs: int = 3,
        push_cycles: int = 1,
        backbone_lr: float | None = None,
        last_layer_lr: float | None = None,
        push_batch_size: int = 64,
        explain_samples: int = 4,
        explain_top_k: int = 3,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        _check_int("in_channels", in_channels, 1)
        _check_int("prototypes_per_class", prototypes_per_class, 1)
        _check_int("prototype_dim", prototype_dim, 1)
        self.epsilon = _check_number("epsilon", epsilon, positive=True)
        self.lambda_clst = _check_number("lambda_clst", lambda_clst, minimum=0)
        self.lambda_sep = _check_number("lambda_sep", lambda_sep, minimum=0)
        self.lambda_l1 = _check_number("lambda_l1", lambda_l1, minimum=0)
        self.incorrect_class_connection = _check_number("incorrect_class_connection", incorrect_class_connection)
        self.warm_epochs = _check_int("warm_epochs", warm_epochs, 0)
        self.joint_epochs = _check_int("joint_epochs", joint_epochs, 1)
        self.last_layer_epochs = _check_int("last_layer_epochs", last_layer_epochs, 0)
        self.push_cycles = _check_int("push_cycles", push_cycles, 1)
        self.backbone_lr = self.lr if backbone_lr is None else _check_number("backbone_lr", backbone_lr, positive=True)
        self.last_layer_lr = (
            self.lr if last_layer_lr is None else _check_number("last_layer_lr", last_layer_lr, positive=True)
        )
        self.push_batch_size = _check_int("push_batch_size", push_batch_size, 1)
        self.explain_samples = _check_int("explain_samples", explain_samples, 0)
        num_prototypes = num_classes * prototypes_per_class
        if isinstance(explain_top_k, bool) or not isinstance(explain_top_k, int) or not 1 <= explain_top_k:
            raise ValueError(f"explain_top_k must be an int >= 1, got {explain_top_k!r}")
        self.explain_top_k = min(explain_top_k, num_prototypes)

        if isinstance(backbone, str):
            self.features = build_trunk(backbone, num_classes, in_channels, small_input=small_input)
        elif isinstance(backbone, nn.Module):
            if small_input:
                raise ValueError("small_input only applies to a backbone given by name ('resnet18')")
            self.features = backbone
        else:
            raise TypeError(f"backbone must be a backbone name (str) or an nn.Module, got {type(backbone).__name__}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.prototypes_per_class = prototypes_per_class
        self.num_prototypes = num_prototypes
        self.prototype_dim = prototype_dim

        trunk_channels = self._trunk_channels()
        self.add_on = nn.Sequential(
            nn.Conv2d(trunk_channels, prototype_dim, 1),
            nn.ReLU(),
            nn.Conv2d(prototype_dim, prototype_dim, 1),
            nn.Sigmoid(),
        )
        for m in self.add_on:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Uniform in [0, 1]^D, the range of the sigmoid latent space (as in the authors' code).
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, prototype_dim, 1, 1))
        self.last_layer = nn.Linear(num_prototypes, num_classes, bias=False)
        identity = F.one_hot(torch.arange(num_prototypes) // prototypes_per_class, num_classes).float()
        self.register_buffer("prototype_class_identity", identity, persistent=False)  # [P, C]
        self.reset_last_layer()
        self.rf = receptive_field(self.features, in_channels)

        # The push record (saved in checkpoints; the crop buffers get their size at the first push).
        self.register_buffer("push_index", torch.full((num_prototypes,), -1, dtype=torch.long))
        self.register_buffer("push_position", torch.full((num_prototypes, 2), -1, dtype=torch.long))
        self.register_buffer("push_box", torch.full((num_prototypes, 4), -1, dtype=torch.long))
        self.register_buffer("push_distance", torch.full((num_prototypes,), float("nan")))
        self.register_buffer("push_crops", torch.zeros(num_prototypes, in_channels, 1, 1))
        self.register_buffer("push_crop_maps", torch.zeros(num_prototypes, 1, 1, 1))
        self.register_buffer("push_count", torch.zeros((), dtype=torch.long))
        #: 1 while the prototypes equal their pushed patches (set by a push, cleared when a step moves them).
        self.register_buffer("prototypes_pushed", torch.zeros((), dtype=torch.long))

        self.set_metrics(MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}))
        self.automatic_optimization = False
        self._explain_batch: Tensor | None = None

    # ---------------------------------------------------------------------------------------------------- structure

    def _trunk_channels(self) -> int:
        probe = torch.zeros(1, self.in_channels, _PROBE_SIZE, _PROBE_SIZE)
        param = next(self.features.parameters(), None)
        if param is not None:
            probe = probe.to(param.device, param.dtype)
        try:
            with _eval_mode(self.features), torch.no_grad():
                out = self.features(probe)
        except Exception as err:
            raise ValueError(
                f"the backbone must map [B, {self.in_channels}, H, W] images to feature maps [B, D, h, w]; running it "
                f"on a [1, {self.in_channels}, {_PROBE_SIZE}, {_PROBE_SIZE}] input failed: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(out, Tensor) or out.ndim != 4:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the backbone must map [B, {self.in_channels}, H, W] images to feature maps [B, D, h, w], got {shape}"
            )
        return int(out.shape[1])

    def reset_last_layer(self) -> None:
        """Set the last layer to ``+1`` for each prototype's own class and ``incorrect_class_connection`` elsewhere."""
        positive = self.prototype_class_identity.t()  # [C, P]
        with torch.no_grad():
            self.last_layer.weight.copy_(positive + self.incorrect_class_connection * (1 - positive))

    @property
    def prototype_classes(self) -> Tensor:
        """``[P]`` long: the class of each prototype (``j // prototypes_per_class``)."""
        return self.prototype_class_identity.argmax(dim=1)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """The parameters the optimiser of ``stage`` (one of :data:`STAGES`) updates."""
        if stage == "warm":
            return [*self.add_on.parameters(), self.prototypes]
        if stage == "joint":
            return [*self.features.parameters(), *self.add_on.parameters(), self.prototypes]
        if stage == "last_layer":
            return [self.last_layer.weight]
        raise ValueError(f"unknown stage {stage!r}; valid stages: {list(STAGES)}")

    # ---------------------------------------------------------------------------------------------------- schedule

    @property
    def schedule_length(self) -> int:
        """Epochs of the whole schedule: ``warm_epochs + push_cycles * (joint_epochs + last_layer_epochs)``."""
        return self.warm_epochs + self.push_cycles * (self.joint_epochs + self.last_layer_epochs)

    @property
    def push_epochs(self) -> list[int]:
        """The (0-based) epochs at whose end the push runs: the last joint epoch of each cycle."""
        cycle = self.joint_epochs + self.last_layer_epochs
        return [self.warm_epochs + c * cycle + self.joint_epochs - 1 for c in range(self.push_cycles)]

    def stage_of_epoch(self, epoch: int) -> str:
        """The stage of (0-based) ``epoch``; epochs after the schedule are last-layer epochs."""
        _check_int("epoch", epoch, 0)
        if epoch < self.warm_epochs:
            return "warm"
        if epoch >= self.schedule_length:
            return "last_layer"
        offset = (epoch - self.warm_epochs) % (self.joint_epochs + self.last_layer_epochs)
        return "joint" if offset < self.joint_epochs else "last_layer"

    @property
    def current_stage(self) -> str:
        """The stage of the trainer's current epoch (of epoch 0 outside a trainer)."""
        return self.stage_of_epoch(self.current_epoch)

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            super().setup(stage)  # num_classes against the datamodule's
        if stage != "fit" or self._trainer is None:
            return
        trainer = self.trainer
        max_epochs = trainer.max_epochs
        if trainer.fast_dev_run or max_epochs is None or max_epochs < 0:
            return
        if max_epochs < self.schedule_length:
            raise ValueError(
                f"the ProtoPNet schedule needs {self.schedule_length} epochs (warm_epochs={self.warm_epochs} + "
                f"push_cycles={self.push_cycles} x (joint_epochs={self.joint_epochs} + last_layer_epochs="
                f"{self.last_layer_epochs})) but the trainer has max_epochs={max_epochs}: the push at epoch(s) "
                f"{self.push_epochs} would not all run. Set max_epochs >= {self.schedule_length} or shorten the stages"
            )
        if max_epochs > self.schedule_length:
            warnings.warn(
                f"max_epochs={max_epochs} exceeds the ProtoPNet schedule ({self.schedule_length} epochs): the last "
                f"{max_epochs - self.schedule_length} epochs train the last layer only",
                stacklevel=2,
            )

    # ---------------------------------------------------------------------------------------------------- forward

    def latent(self, x: Tensor) -> Tensor:
        """The latent map ``z = add_on(features(x))``, ``[B, prototype_dim, h, w]`` in ``[0, 1]``."""
        return self.add_on(self.features(x))

    def outputs(self, x: Tensor, stage: str = "joint") -> ProtoPNetOutput:
        """One forward pass with all intermediate results.

        ``stage`` decides where autograd starts: ``"warm"`` runs the trunk under ``no_grad``, ``"last_layer"``
        everything but the last layer - and in eval mode (BatchNorm running statistics, no dropout), so that the
        last-layer problem is convex in fixed features and the pushed prototypes stay exact latent patches.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid stages: {list(STAGES)}")
        grad = torch.is_grad_enabled()
        with _eval_mode(self.features) if stage == "last_layer" else nullcontext():
            with torch.set_grad_enabled(grad and stage == "joint"):
                feats = self.features(x)
        with _eval_mode(self.add_on) if stage == "last_layer" else nullcontext():
            with torch.set_grad_enabled(grad and stage != "last_layer"):
                z = self.add_on(feats)
                distance_maps = l2_distances(z, self.prototypes)
                min_distances = distance_maps.amin(dim=(2, 3))
                similarities = log_similarity(min_distances, self.epsilon)
        logits = self.last_layer(similarities)
        return ProtoPNetOutput(logits, min_distances, similarities, distance_maps)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.outputs(x).logits

    def loss_terms(self, logits: Tensor, min_distances: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The loss and its parts: ``ce``, ``cluster``, ``separation``, ``l1`` and ``loss`` (see the module docstring).

        ``cluster`` and ``separation`` are batch means of the smallest min-pooled distance to a prototype of the
        image's own class / of another class; ``l1`` is ``sum |w[c, j]|`` over prototypes ``j`` not of class ``c``.
        """
        own = self.prototype_class_identity.t()[labels].bool()  # [B, P]: prototype of the image's class
        inf = torch.full_like(min_distances, float("inf"))
        cluster = torch.where(own, min_distances, inf).amin(dim=1).mean()
        separation = torch.where(own, inf, min_distances).amin(dim=1).mean()
        l1 = (self.last_layer.weight * (1 - self.prototype_class_identity.t())).abs().sum()
        ce = F.cross_entropy(logits, labels)
        loss = ce + self.lambda_clst * cluster - self.lambda_sep * separation + self.lambda_l1 * l1
        return {"loss": loss, "ce": ce, "cluster": cluster, "separation": separation, "l1": l1}

    # ---------------------------------------------------------------------------------------------------- training

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return self.build_optimizer(groups)  # every group states its own lr and weight decay

    def configure_optimizers(self) -> Any:
        """One optimiser per stage, in the order of :data:`STAGES` (manual optimisation steps only the current one)."""
        wd = self.weight_decay
        # AdamW's default weight decay is 0.01: state every group's value explicitly.
        add_on = {"params": list(self.add_on.parameters()), "lr": self.lr, "weight_decay": wd}
        prototypes = {"params": [self.prototypes], "lr": self.lr, "weight_decay": 0.0}
        trunk = {"params": list(self.features.parameters()), "lr": self.backbone_lr, "weight_decay": wd}
        last = {"params": [self.last_layer.weight], "lr": self.last_layer_lr, "weight_decay": 0.0}
        groups = {"warm": [add_on, prototypes], "joint": [trunk, add_on, prototypes], "last_layer": [last]}
        optimizers = [self._make_optimizer([{**g} for g in groups[s] if g["params"]]) for s in STAGES]
        if self.scheduler_name is None:
            return optimizers
        total, max_epochs = self.trainer.estimated_stepping_batches, self.trainer.max_epochs
        if not math.isfinite(total) or max_epochs is None or max_epochs < 1:
            raise ValueError("scheduler='cosine' needs a finite training length: set max_epochs")
        per_epoch = total / max_epochs
        schedulers = []
        for stage, opt in zip(STAGES, optimizers):
            epochs = sum(self.stage_of_epoch(e) == stage for e in range(max_epochs))
            steps = max(1, round(epochs * per_epoch))
            schedulers.append(self.cosine_scheduler(opt, steps))
        return optimizers, schedulers

    def _frozen_parameters(self, stage: str) -> list[nn.Parameter]:
        """Parameters that :meth:`outputs` leaves out of the autograd graph in ``stage``."""
        if stage == "warm":
            return list(self.features.parameters())
        if stage == "last_layer":
            return [*self.features.parameters(), *self.add_on.parameters(), self.prototypes]
        return []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = self.batch_reader.inputs(batch), self.batch_reader.labels(batch)
        self.check_class_labels(y)
        stage = self.current_stage
        index = STAGES.index(stage)
        out = self.outputs(x, stage)
        terms = self.loss_terms(out.logits, out.min_distances, y)
        loss = terms["loss"]
        parts = {name: terms[name] for name in ("ce", "cluster", "separation", "l1")}
        if not self.loss_is_usable(StepOutput(loss, parts), "train", batch_idx):
            return None
        frozen = self._frozen_parameters(stage)
        if frozen:  # exact zero, but every parameter receives a gradient: DDP's reducer sees the same set each step
            loss = loss + 0.0 * sum(p.sum() for p in frozen)
        optimizers = self.optimizers()
        optimizer = optimizers[index] if isinstance(optimizers, list) else optimizers
        self.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        self.zero_grad(set_to_none=True)
        if self.scheduler_name is not None:
            schedulers = self.lr_schedulers()
            (schedulers[index] if isinstance(schedulers, list) else schedulers).step()
        if stage != "last_layer":
            self.prototypes_pushed.zero_()
        accuracy = self.metrics_of("train")["acc"]
        accuracy(out.logits.detach(), y)
        n = len(y)
        self.log("train_loss", terms["loss"].detach(), on_step=True, on_epoch=True, sync_dist=True, batch_size=n)
        for name in ("ce", "cluster", "separation", "l1"):
            self.log(f"train_{name}", terms[name].detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("train_acc", accuracy, on_step=False, on_epoch=True, batch_size=n)
        self.log("train_stage", float(index), on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        return terms["loss"].detach()

    def _eval_step(self, batch: Any, split: str) -> Tensor:
        x, y = self.batch_reader.inputs(batch), self.batch_reader.labels(batch)
        self.check_class_labels(y)
        out = self.outputs(x)
        loss = self.loss_terms(out.logits, out.min_distances, y)["loss"]
        accuracy = self.metrics_of(split)["acc"]
        accuracy(out.logits, y)
        self.log(f"{split}_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y), prog_bar=split == "val")
        self.log(f"{split}_acc", accuracy, on_epoch=True, batch_size=len(y), prog_bar=split == "val")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        if batch_idx == 0 and self.explain_samples > 0:
            self._explain_batch = batch[0][: self.explain_samples].detach().clone()
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits ``[B, num_classes]`` of ``batch`` (an image tensor, or a tuple whose first item is one)."""
        return self(batch if isinstance(batch, Tensor) else batch[0])

    def on_train_epoch_end(self) -> None:
        if self.current_epoch not in self.push_epochs:
            return
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if not isinstance(dataset, Dataset):
            raise ValueError(
                "the push needs the training set: train with a single DataLoader (or call push() yourself), got "
                f"{type(loader).__name__}"
            )
        summary = self.push(dataset)
        self.log("push_mean_distance", summary["mean_distance"], on_step=False, on_epoch=True, sync_dist=True)
        self.log("push_max_distance", summary["max_distance"], on_step=False, on_epoch=True, sync_dist=True)
        if self.trainer.is_global_zero and self.trainer.loggers:
            log_image(
                self.trainer.loggers,
                "protopnet/prototypes",
                self.prototype_gallery(),
                step=self.global_step,
                caption=f"prototype source patches after push {int(self.push_count)} (rows: classes)",
            )

    def on_validation_epoch_end(self) -> None:
        images, self._explain_batch = self._explain_batch, None
        trainer = self.trainer
        if (
            images is None
            or trainer.sanity_checking
            or not bool(self.prototypes_pushed)
            or not trainer.is_global_zero
            or not trainer.loggers
        ):
            return
        try:
            self.log_explanations(trainer.loggers, images, step=self.global_step)
        except Exception as err:  # a failed picture must not end the training run
            warnings.warn(f"logging ProtoPNet explanations failed: {type(err).__name__}: {err}", stacklevel=2)

    # ---------------------------------------------------------------------------------------------------- push

    def push(self, data: Dataset | DataLoader | pl.LightningDataModule, batch_size: int | None = None) -> dict:
        """Project every prototype onto its nearest latent patch among the training images of its class.

        Args:
            data: the training set - a ``Dataset`` of ``(image, label, ...)`` items, a ``DataLoader`` (its
                ``dataset`` is used in its own order; its sampler and batch size are ignored) or a DataModule (its
                ``dataset("train")`` if it has one, else its ``train_dataloader().dataset``). Dataset indices are
                what the push record stores.
            batch_size: images per forward pass (default ``push_batch_size``).

        Call it on every rank of a distributed run, with the same dataset everywhere: each rank scans the indices
        ``rank::world_size`` and the global nearest patch wins (ties: smaller dataset index, then row-major
        position). The latent vectors are computed in eval mode without gradients; every submodule's train/eval
        mode is restored afterwards. Under DDP, the buffers of ``features`` and ``add_on`` are first broadcast
        from rank 0. The new prototype is, bit for bit, the winning patch's vector in the latent map of its image
        computed on its own: ``latent(image[None].contiguous())`` in eval mode.

        Returns:
            ``{"mean_distance", "max_distance"}``: squared distances between the prototypes before the push and
            their new values (how far they moved).
        """
        dataset = self._push_dataset(data)
        batch_size = self.push_batch_size if batch_size is None else _check_int("batch_size", batch_size, 1)
        if len(dataset) == 0:
            raise ValueError("cannot push onto an empty dataset")
        rank, world = _distributed()
        with torch.inference_mode(False), torch.no_grad(), _eval_mode(self):
            if world > 1:
                for buffer in [*self.features.buffers(), *self.add_on.buffers()]:
                    buffer.copy_(broadcast(buffer, src=0))
            local = self._scan(dataset, range(rank, len(dataset), world), batch_size)
            distance, index, position, images = (_gather(t, world) for t in local)  # each [world, P, ...]
            winners = self._pick_winners(distance, index, position)
            p = torch.arange(self.num_prototypes, device=self.device)
            chosen = distance[winners, p]
            missing = (~torch.isfinite(chosen)).nonzero().flatten()
            if missing.numel():
                classes = sorted({int(c) for c in self.prototype_classes[missing]})
                raise ValueError(
                    f"the push data has no images of class(es) {classes}: their prototypes cannot be pushed"
                )
            self._project(index[winners, p], position[winners, p], chosen, images[winners, p], world)
        return {"mean_distance": float(chosen.mean()), "max_distance": float(chosen.max())}

    @staticmethod
    def _push_dataset(data: Any) -> Dataset:
        if isinstance(data, DataLoader):
            return data.dataset
        if isinstance(data, pl.LightningDataModule):
            if callable(getattr(data, "dataset", None)):
                return data.dataset("train")
            data.setup("fit")
            return data.train_dataloader().dataset
        if isinstance(data, Dataset) and hasattr(data, "__len__"):
            return data
        raise TypeError(
            f"data must be a Dataset (with __len__), a DataLoader or a LightningDataModule, got {type(data).__name__}"
        )

    def _scan(self, dataset: Dataset, indices: range, batch_size: int) -> tuple[Tensor, ...]:
        """This rank's best patch per prototype among ``indices``: distance, dataset index, position, image."""
        P, device, dtype = self.num_prototypes, self.device, self.prototypes.dtype
        image_shape = dataset[0][0].shape
        best_dist = torch.full((P,), float("inf"), device=device, dtype=dtype)
        best_index = torch.full((P,), -1, dtype=torch.long, device=device)
        best_pos = torch.full((P,), -1, dtype=torch.long, device=device)
        best_img = torch.zeros(P, *image_shape, device=device, dtype=dtype)
        classes = self.prototype_classes
        loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False)
        offset = 0
        for batch in loader:
            x = batch[0].to(device, dtype).contiguous()
            y = torch.as_tensor(batch[1], device=device).long()
            distances = l2_distances(self.latent(x), self.prototypes)  # [B, P, h, w]
            own = (y[:, None] == classes[None, :])[:, :, None, None]
            distances = torch.where(own, distances, torch.full_like(distances, float("inf")))
            b, _, h, w = distances.shape
            flat = distances.permute(1, 0, 2, 3).reshape(P, -1)  # [P, B*h*w], row-major over (image, row, col)
            values, where = flat.min(dim=1)  # first occurrence on ties
            better = values < best_dist
            if bool(better.any()):
                img = where // (h * w)
                global_index = torch.as_tensor(list(indices[offset : offset + b]), device=device)[img]
                best_dist = torch.where(better, values, best_dist)
                best_index = torch.where(better, global_index, best_index)
                best_pos = torch.where(better, where % (h * w), best_pos)
                best_img = torch.where(better.view(-1, 1, 1, 1), x[img], best_img)
            offset += b
        return best_dist, best_index, best_pos, best_img

    @staticmethod
    def _pick_winners(distance: Tensor, index: Tensor, position: Tensor) -> Tensor:
        """Per prototype, the rank whose candidate is smallest in ``(distance, index, position)`` order."""
        world, P = distance.shape
        winners = torch.zeros(P, dtype=torch.long, device=distance.device)
        d, i, q = distance.tolist(), index.tolist(), position.tolist()
        for p in range(P):
            winners[p] = min(range(world), key=lambda r: (d[r][p], i[r][p] if i[r][p] >= 0 else math.inf, q[r][p]))
        return winners

    def _project(self, index: Tensor, position: Tensor, distance: Tensor, images: Tensor, world: int) -> None:
        """Copy the winning patches into the prototypes and store the push record.

        A patch's latent vector is taken from its image's latent map computed *on its own*, in eval mode, as
        ``latent(image[None].contiguous())``: convolution kernels can round differently with the batch composition
        and the memory format (e.g. channels-last images), so the scan's batched vectors may differ from it in the
        last bits, and "the prototype is exactly this image's latent vector" needs one canonical computation.
        Every rank computes the same thing from the same gathered images; rank 0's result is then broadcast so that
        the bytes are identical everywhere even where kernels are not bitwise deterministic across processes.
        """
        P, (C, H, W) = self.num_prototypes, images.shape[1:]
        vectors, maps = [], []
        for p in range(P):
            z = self.latent(images[p : p + 1].contiguous())  # [1, D, h, w]: the image alone, contiguous memory
            w = z.shape[3]
            vector = z[0, :, int(position[p]) // w, int(position[p]) % w]
            d = l2_distances(z, vector.view(1, -1, 1, 1))  # [1, 1, h, w]: the pushed prototype on its source
            vectors.append(vector)
            maps.append(log_similarity(d, self.epsilon))
        rows, cols = position // w, position % w
        boxes = torch.tensor(
            [self.rf.box(int(r), int(c), (H, W)) for r, c in zip(rows.tolist(), cols.tolist())], dtype=torch.long
        )
        sim = F.interpolate(torch.cat(maps), size=(H, W), mode="bilinear", align_corners=False)  # [P, 1, H, W]
        crop_h = int((boxes[:, 2] - boxes[:, 0]).max())
        crop_w = int((boxes[:, 3] - boxes[:, 1]).max())
        crops = torch.zeros(P, C, crop_h, crop_w, device=self.device, dtype=images.dtype)
        crop_maps = torch.zeros(P, 1, crop_h, crop_w, device=self.device, dtype=sim.dtype)
        for p, (top, left, bottom, right) in enumerate(boxes.tolist()):
            crops[p, :, : bottom - top, : right - left] = images[p, :, top:bottom, left:right]
            crop_maps[p, :, : bottom - top, : right - left] = sim[p, :, top:bottom, left:right]
        new_prototypes = torch.stack(vectors).view_as(self.prototypes).contiguous()
        if world > 1:
            for tensor in (new_prototypes, crop_maps):
                tensor.copy_(broadcast(tensor, src=0))
        self.prototypes.copy_(new_prototypes)
        self.push_index.copy_(index)
        self.push_position.copy_(torch.stack([rows, cols], dim=1))
        self.push_box.copy_(boxes)
        self.push_distance.copy_(distance)
        self.push_crops = crops
        self.push_crop_maps = crop_maps
        self.push_count += 1
        self.prototypes_pushed.fill_(1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The crop buffers' size is only known after a push: take the checkpoint's.
        for name in ("push_crops", "push_crop_maps"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(saved, Tensor) and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def source_crop(self, prototype: int) -> tuple[Tensor, Tensor]:
        """The source patch of ``prototype`` from the last push, ``([C, h, w] crop, [1, h, w] similarity map)``."""
        _check_int("prototype", prototype, 0)
        if prototype >= self.num_prototypes:
            raise ValueError(f"prototype must be < {self.num_prototypes}, got {prototype}")
        if int(self.push_count) == 0:
            raise ValueError("the prototypes have not been pushed yet: there are no source patches")
        top, left, bottom, right = self.push_box[prototype].tolist()
        return (
            self.push_crops[prototype, :, : bottom - top, : right - left],
            self.push_crop_maps[prototype, :, : bottom - top, : right - left],
        )

    # ---------------------------------------------------------------------------------------------------- explain

    def explain(
        self, images: Tensor, top_k: int | None = None, target: int | Tensor | None = None
    ) -> PrototypeExplanation:
        """Explain ``images [B, C, H, W]`` as "this looks like that": the ``top_k`` prototypes by contribution to
        the ``target`` logit, with their similarity maps.

        ``target``: ``None`` (the predicted class), a class index or a LongTensor ``[B]``. Runs in eval mode without
        gradients and restores every submodule's mode (works inside ``no_grad`` / ``inference_mode``).
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != self.in_channels:
            shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, {self.in_channels}, H, W], got {shape}")
        k = self.explain_top_k if top_k is None else _check_int("top_k", top_k, 1)
        if k > self.num_prototypes:
            raise ValueError(f"top_k must be <= the number of prototypes ({self.num_prototypes}), got {k}")
        with torch.no_grad(), _eval_mode(self):
            out = self.outputs(images.to(self.device))
        B = images.shape[0]
        if target is None:
            target_t = out.logits.argmax(dim=1)
        elif isinstance(target, int) and not isinstance(target, bool):
            target_t = torch.full((B,), target, dtype=torch.long, device=self.device)
        elif isinstance(target, Tensor) and target.shape == (B,) and not target.is_floating_point():
            target_t = target.to(self.device).long()
        else:
            raise ValueError(f"target must be None, an int or a LongTensor [{B}], got {target!r}")
        if bool(((target_t < 0) | (target_t >= self.num_classes)).any()):
            raise ValueError(f"target classes must lie in [0, {self.num_classes}), got {target_t.tolist()}")
        weights = self.last_layer.weight.detach()[target_t]  # [B, P]
        contributions = out.similarities * weights
        top = contributions.topk(k, dim=1).indices  # [B, k]
        rows = torch.arange(B, device=self.device)[:, None]
        maps = log_similarity(out.distance_maps[rows, top], self.epsilon)  # [B, k, h, w]
        maps = F.interpolate(maps, size=images.shape[2:], mode="bilinear", align_corners=False)
        return PrototypeExplanation(
            logits=out.logits,
            target=target_t,
            prototype_indices=top,
            prototype_classes=self.prototype_classes[top],
            similarities=out.similarities[rows, top],
            weights=weights[rows, top],
            contributions=contributions[rows, top],
            similarity_maps=maps,
            source_indices=self.push_index[top],
            source_boxes=self.push_box[top],
        )

    def explanation_table(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        top_k: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of the explanation table (one row per image and prototype rank; images are ``uint8``).

        ``"this"``: the input with the prototype's similarity map; ``"looks_like_that"``: the prototype's source
        crop with its own similarity map. Needs pushed prototypes. ``mean``/``std`` undo an input normalisation for
        display.
        """
        if int(self.push_count) == 0:
            raise ValueError("the prototypes have not been pushed yet: push() before explaining with source patches")
        exp = self.explain(images, top_k=top_k)
        B, k = exp.prototype_indices.shape
        this = overlay(
            images.detach().cpu().repeat_interleave(k, dim=0),
            exp.similarity_maps.reshape(B * k, 1, *images.shape[2:]).cpu(),
            signed=False,
            mean=mean,
            std=std,
        )
        columns = ["sample", "label", "prediction", "rank", "prototype", "prototype_class", "similarity",
                   "class_weight", "contribution", "source_index", "this", "looks_like_that"]  # fmt: skip
        predictions = exp.logits.argmax(dim=1).tolist()
        rows: list[list[Any]] = []
        for b in range(B):
            for r in range(k):
                j = int(exp.prototype_indices[b, r])
                crop, crop_map = self.source_crop(j)
                that = overlay(crop[None].cpu(), crop_map[None].cpu(), signed=False, mean=mean, std=std)[0]
                rows.append([
                    b,
                    -1 if labels is None else int(labels[b]),
                    predictions[b],
                    r + 1,
                    j,
                    int(exp.prototype_classes[b, r]),
                    float(exp.similarities[b, r]),
                    float(exp.weights[b, r]),
                    float(exp.contributions[b, r]),
                    int(exp.source_indices[b, r]),
                    this[b * k + r],
                    that,
                ])  # fmt: skip
        return columns, rows

    def log_explanations(
        self,
        loggers: Sequence[object] | None,
        images: Tensor,
        *,
        step: int,
        labels: Tensor | None = None,
        top_k: int | None = None,
        key: str = "protopnet/explanations",
        fallback_dir: str | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> list[str]:
        """Log :meth:`explanation_table` with :func:`~lightning_xai.viz.logging.log_table` (call on rank zero)."""
        columns, rows = self.explanation_table(images, labels=labels, top_k=top_k, mean=mean, std=std)
        return log_table(loggers, key, columns, rows, step=step, fallback_dir=fallback_dir)

    def prototype_gallery(self, tile: int = 32, pad: int = 2) -> np.ndarray:
        """All source patches as one ``uint8 [H, W, 3]`` image: a row per class, a column per prototype of it.

        Each crop is resized (nearest neighbour) to ``tile x tile`` pixels; tiles are separated by ``pad`` white
        pixels. Needs pushed prototypes.
        """
        _check_int("tile", tile, 1)
        _check_int("pad", pad, 0)
        if int(self.push_count) == 0:
            raise ValueError("the prototypes have not been pushed yet: there is no gallery")
        m = self.prototypes_per_class
        canvas = np.full((pad + self.num_classes * (tile + pad), pad + m * (tile + pad), 3), 255, dtype=np.uint8)
        for j in range(self.num_prototypes):
            crop, _ = self.source_crop(j)
            resized = F.interpolate(crop[None].float().cpu(), size=(tile, tile), mode="nearest")
            row, col = divmod(j, m)
            top, left = pad + row * (tile + pad), pad + col * (tile + pad)
            canvas[top : top + tile, left : left + tile] = to_uint8_images(resized)[0]
        return canvas
