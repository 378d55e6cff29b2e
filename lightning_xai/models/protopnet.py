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

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_xai.batch import Key
from lightning_xai.checks import check_float, check_int
from lightning_xai.models.base import XAIModule, config_dataclass
from lightning_xai.models.protopnet_explain import PrototypeExplanationMixin
from lightning_xai.models.protopnet_parts import (
    _PROBE_SIZE,
    STAGES,
    ProtoPNetOutput,
    PrototypeExplanation,
    ReceptiveField,
    _eval_mode,
    build_trunk,
    l2_distances,
    log_similarity,
    receptive_field,
)
from lightning_xai.models.protopnet_push import PrototypePushMixin
from lightning_xai.models.protopnet_training import PrototypeTrainingMixin

__all__ = [
    "STAGES",
    "ProtoPNet",
    "ProtoPNetConfig",
    "ProtoPNetOutput",
    "PrototypeExplanation",
    "ReceptiveField",
    "l2_distances",
    "log_similarity",
    "receptive_field",
]


class ProtoPNet(PrototypeTrainingMixin, PrototypePushMixin, PrototypeExplanationMixin, XAIModule):
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
        optimizer, lr, weight_decay, scheduler, momentum, on_nonfinite_loss, input_key, label_key: see
            :class:`~lightning_xai.models.base.XAIModule`.
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
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum,
                         on_nonfinite_loss=on_nonfinite_loss, input_key=input_key, label_key=label_key)
        owner = type(self).__name__
        for name, value, minimum in (
            ("num_classes", num_classes, 2), ("in_channels", in_channels, 1),
            ("prototypes_per_class", prototypes_per_class, 1), ("prototype_dim", prototype_dim, 1),
            ("warm_epochs", warm_epochs, 0), ("joint_epochs", joint_epochs, 1),
            ("last_layer_epochs", last_layer_epochs, 0), ("push_cycles", push_cycles, 1),
            ("push_batch_size", push_batch_size, 1), ("explain_samples", explain_samples, 0),
            ("explain_top_k", explain_top_k, 1),
        ):
            check_int(name, value, minimum=minimum, owner=owner)
        self.epsilon = check_float("epsilon", epsilon, minimum=0, strict=True, owner=owner)
        self.lambda_clst = check_float("lambda_clst", lambda_clst, minimum=0, owner=owner)
        self.lambda_sep = check_float("lambda_sep", lambda_sep, minimum=0, owner=owner)
        self.lambda_l1 = check_float("lambda_l1", lambda_l1, minimum=0, owner=owner)
        self.incorrect_class_connection = check_float("incorrect_class_connection", incorrect_class_connection,
                                                      owner=owner)
        self.warm_epochs, self.joint_epochs = warm_epochs, joint_epochs
        self.last_layer_epochs, self.push_cycles = last_layer_epochs, push_cycles
        self.backbone_lr = self.lr if backbone_lr is None else check_float(
            "backbone_lr", backbone_lr, minimum=0, strict=True, owner=owner)
        self.last_layer_lr = self.lr if last_layer_lr is None else check_float(
            "last_layer_lr", last_layer_lr, minimum=0, strict=True, owner=owner)
        self.push_batch_size, self.explain_samples = push_batch_size, explain_samples
        num_prototypes = num_classes * prototypes_per_class
        self.explain_top_k = min(explain_top_k, num_prototypes)

        if isinstance(backbone, str):
            self.features = build_trunk(backbone, num_classes, in_channels, small_input=small_input)
        elif isinstance(backbone, nn.Module):
            if small_input:
                raise ValueError("small_input only applies to a backbone given by name ('resnet18')")
            self.features = backbone
        else:
            raise TypeError(f"{type(self).__name__}: backbone must be a backbone name (str) or an nn.Module, got "
                            f"{type(backbone).__name__}")
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


#: The settings of :class:`ProtoPNet` as one frozen dataclass (every constructor argument but ``backbone``):
#: ``ProtoPNet.from_config(ProtoPNetConfig(...), backbone=...)``; ``model.to_config()`` gives them back.
ProtoPNetConfig = config_dataclass(ProtoPNet, "ProtoPNetConfig", exclude=("backbone",))
ProtoPNet.config_class = ProtoPNetConfig
