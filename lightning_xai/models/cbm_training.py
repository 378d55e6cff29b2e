"""The training of :class:`~lightning_xai.models.concept_bottleneck.ConceptBottleneckModel` (Koh et al., "Concept
Bottleneck Models", ICML 2020): the per-stage parameter groups and cosine schedules, the training step with its
named losses and metrics, the recording of the logit percentiles for interventions, the evaluation steps with the
per-concept AUCs, and the checks made when fitting starts. The modes and stages are described in
:mod:`lightning_xai.models.concept_bottleneck`, whose model mixes this in and supplies ``compute_losses``,
``_unpack``, ``_concept_loss``, ``forward_with_concepts``, its settings and buffers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.distributed import sum_over_ranks
from lightning_xai.models.base import StepOutput
from lightning_xai.namespace import pl

__all__ = ["CBMTrainingMixin"]


class CBMTrainingMixin:
    """Optimisation, training / evaluation steps and fit-time checks of the concept bottleneck model."""

    # ------------------------------------------------------------------------------------------ optimisation
    def optimizer_parameters(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Two parameter groups: the concept model (``lr``) and the head (``head_lr``, default ``lr``), each tagged
        with the ``"stage"`` it trains in (``"concepts"`` / ``"task"``) for the per-stage schedule."""
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "stage": "concepts"},
            {"params": [p for p in self.head.parameters() if p.requires_grad], "stage": "task"},
        ]
        if self.head_lr is not None:
            groups[1]["lr"] = self.head_lr
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        """The base class's optimiser; with ``scheduler="cosine"`` in ``"independent"`` / ``"sequential"`` mode each
        stage gets its own cosine cycle: the concept model's rate anneals over the concept epochs, the head's over
        the task epochs (it keeps its full rate until then). One cosine over the whole fit would leave the head
        stage, at the end of the run, with a rate close to zero."""
        configured = super().configure_optimizers()
        if self.scheduler_name is None or self.mode not in ("independent", "sequential"):
            return configured
        optimizer = configured["optimizer"]
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError("scheduler='cosine' needs a finite training length: set max_epochs")
        per_epoch = self.trainer.estimated_stepping_batches / max_epochs
        concept_steps = max(1, round(self.concept_epochs * per_epoch))
        task_steps = max(1, round((max_epochs - self.concept_epochs) * per_epoch))

        def concept_rate(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, concept_steps) / concept_steps))

        def head_rate(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(max(step - concept_steps, 0), task_steps) / task_steps))

        # each parameter group carries the stage it trains in (see optimizer_parameters)
        rates = {"concepts": concept_rate, "task": head_rate}
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [rates[g["stage"]] for g in optimizer.param_groups])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        out = self.compute_losses(batch)
        parts = {"task_loss": out.task_loss, "concept_loss": out.concept_loss}
        if not self.loss_is_usable(StepOutput(out.loss, {k: v for k, v in parts.items() if v is not None}), "train",
                                   batch_idx):
            return None
        _, y, c = self._unpack(batch, need_concepts=False)
        n = len(y)
        self.log("train_loss", out.loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=n, prog_bar=True)
        if out.task_loss is not None:
            self.log("train_task_loss", out.task_loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
            accuracy = self.metrics_of("train")["acc"]
            accuracy(out.task_logits.detach(), y)
            self.log("train_acc", accuracy, on_step=False, on_epoch=True, batch_size=n)
        if out.concept_logits is not None and c is not None:
            if out.concept_loss is not None:
                self.log(
                    "train_concept_loss", out.concept_loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n
                )
            concept_acc = self.metrics_of("train", "concept")["concept_acc"]
            concept_acc(torch.sigmoid(out.concept_logits.detach().float()), c.long())
            self.log("train_concept_acc", concept_acc, on_step=False, on_epoch=True, batch_size=n)
        # Intervention values follow the concept model while it trains and are frozen when its stage ends (Koh et
        # al. compute them on the trained concept model): the head stage never moves the values it trains on.
        if self.bottleneck == "logit" and out.concept_logits is not None and self.stage != "task":
            self._record_logits(out.concept_logits)
        return out.loss

    def _record_logits(self, logits: Tensor) -> None:
        room = self.percentile_samples - self._epoch_rows
        if room > 0:
            rows = logits.detach().float()[:room]
            self._epoch_logits.append(rows)
            self._epoch_rows += rows.shape[0]

    def on_train_epoch_start(self) -> None:
        self._epoch_logits, self._epoch_rows = [], 0

    def on_train_epoch_end(self) -> None:
        if self.bottleneck != "logit" or self.stage == "task":
            self._epoch_logits, self._epoch_rows = [], 0
            return
        # every rank must take part in the gather, also a rank that recorded nothing this epoch
        has_rows = torch.tensor(float(self._epoch_rows > 0), device=self.device)
        if float(sum_over_ranks(has_rows.clone())) > 0:
            rows = torch.cat(self._epoch_logits) if self._epoch_logits else torch.zeros(0, self.num_concepts)
            self._set_percentiles(rows.to(self.device))
        self._epoch_logits, self._epoch_rows = [], 0

    def _eval_step(self, batch: Any, split: str) -> Tensor:
        x, y, c = self._unpack(batch, need_concepts=False)
        concept_logits, task_logits = self.forward_with_concepts(x)
        task_loss = F.cross_entropy(task_logits, y)
        n = len(y)
        loss = task_loss
        accuracy = self.metrics_of(split)["acc"]
        accuracy(task_logits, y)
        self.log(f"{split}_acc", accuracy, on_epoch=True, batch_size=n, prog_bar=split == "val")
        self.log(f"{split}_task_loss", task_loss, on_epoch=True, sync_dist=True, batch_size=n)
        if c is not None:
            concept_loss = self._concept_loss(concept_logits, c)
            loss = task_loss + self.concept_loss_weight * concept_loss
            self.log(f"{split}_concept_loss", concept_loss, on_epoch=True, sync_dist=True, batch_size=n)
            probabilities = torch.sigmoid(concept_logits.float())
            concept_acc = self.metrics_of(split, "concept")["concept_acc"]
            concept_acc(probabilities, c.long())
            self.log(f"{split}_concept_acc", concept_acc, on_epoch=True, batch_size=n)
            self.metrics_of(split, "auc")["concept_auc"].update(concept_logits, c)
        self.log(f"{split}_loss", loss, on_epoch=True, sync_dist=True, batch_size=n, prog_bar=split == "val")
        return loss

    def _log_auc(self, split: str) -> None:
        metric = self.metrics_of(split, "auc")["concept_auc"]
        if not metric.update_called:
            return
        auc = metric.compute()  # reduced over DDP ranks by torchmetrics
        metric.reset()
        self.log(f"{split}_concept_auc", auc.nanmean())
        self.log_dict({f"{split}_concept_auc/{name}": value for name, value in zip(self.concept_names, auc)})

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_auc("val")

    def on_test_epoch_end(self) -> None:
        self._log_auc("test")

    # ------------------------------------------------------------------------------------------ checks
    def on_fit_start(self) -> None:
        if self.mode not in ("independent", "sequential"):
            return
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs != -1 and max_epochs <= self.concept_epochs:
            raise ValueError(
                f"mode={self.mode!r} trains the concept model for concept_epochs={self.concept_epochs} epochs and the "
                f"head afterwards, but the Trainer stops after max_epochs={max_epochs}: set max_epochs > "
                f"{self.concept_epochs}"
            )
        strategy = self.trainer.strategy
        ddp = isinstance(strategy, pl.strategies.DDPStrategy)
        if ddp and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
            raise ValueError(
                f"mode={self.mode!r} leaves the head unused in the concept stage and the concept model unused in the "
                "task stage, which plain DDP rejects: use strategy='ddp_find_unused_parameters_true'"
            )
