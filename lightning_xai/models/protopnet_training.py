"""ProtoPNet's training: the stage schedule (warm, joint, push, last layer), one optimiser per stage under manual
optimisation, the training / evaluation steps and the push at the end of each cycle's last joint epoch (Chen et
al., "This Looks Like That", NeurIPS 2019). The method, the schedule and why nothing is ever frozen (DDP) are
described in :mod:`lightning_xai.models.protopnet`, whose :class:`~lightning_xai.models.protopnet.ProtoPNet`
mixes this in; the model itself (``outputs``, ``loss_terms``, the parameters) lives there.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_xai.checks import check_int
from lightning_xai.models.base import StepOutput
from lightning_xai.models.protopnet_parts import STAGES
from lightning_xai.viz.logging import log_image

__all__ = ["PrototypeTrainingMixin"]


class PrototypeTrainingMixin:
    """The stage schedule and the training loop of :class:`~lightning_xai.models.protopnet.ProtoPNet` (the model
    supplies ``features``, ``add_on``, ``prototypes``, ``last_layer``, ``outputs``, ``loss_terms``, the push and
    the epoch counts)."""

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
        check_int("epoch", epoch, minimum=0, owner="ProtoPNet.stage_of_epoch")
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
            self._explain_batch = self.batch_reader.inputs(batch)[: self.explain_samples].detach().clone()
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits ``[B, num_classes]`` of ``batch`` (an image tensor, or a tuple whose first item is one)."""
        return self(self.batch_reader.inputs(batch))

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
