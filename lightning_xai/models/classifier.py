"""``ImageClassifier``: a plain image classifier (cross-entropy) - the model the explanation callbacks watch."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_xai.models.backbones import build_backbone
from lightning_xai.models.base import XAIModule

__all__ = ["ImageClassifier"]


class ImageClassifier(XAIModule):
    """Cross-entropy image classifier around a backbone built by name or passed as a module.

    Args:
        backbone: a name of :func:`~lightning_xai.models.backbones.build_backbone` (``"small_cnn"``,
            ``"resnet18"``, ``"vgg_small"``) or any ``nn.Module`` mapping ``[B, C, H, W]`` images to logits
            ``[B, num_classes]`` (in YAML: ``class_path`` / ``init_args``).
        num_classes: number of classes.
        in_channels: number of input channels (used when ``backbone`` is a name).
        optimizer, lr, weight_decay, scheduler, momentum: see :class:`~lightning_xai.models.base.XAIModule`.

    Batches are ``(images, labels, ...)``: only ``batch[0]`` and ``batch[1]`` are read, so the project's
    ``(image, label, mask)`` batches and plain ``(x, y)`` batches both work. Logged per epoch: ``train_acc``,
    ``train_loss_epoch`` (and ``train_loss_step`` per step), ``val_loss``, ``val_acc``, ``test_loss``,
    ``test_acc``. Accuracies are torchmetrics ``MulticlassAccuracy`` (micro average: the fraction of correct
    predictions), whose states are reduced across DDP ranks; losses are logged with ``sync_dist=True``.

    For attribution, explain either this module (layer names are then prefixed with ``"backbone."``, e.g.
    ``"backbone.features"``) or ``module.backbone`` directly.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small_cnn",
        num_classes: int = 6,
        in_channels: int = 3,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(backbone, str):
            self.backbone = build_backbone(backbone, num_classes=num_classes, in_channels=in_channels)
        elif isinstance(backbone, nn.Module):
            self.backbone = backbone
        else:
            raise TypeError(f"backbone must be a backbone name (str) or an nn.Module, got {type(backbone).__name__}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.backbone(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the backbone returned shape {tuple(logits.shape)}; expected logits [B, {self.num_classes}]"
            )
        loss = F.cross_entropy(logits, y)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(
            f"{stage}_loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(y),
            prog_bar=stage != "test",
        )
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, batch_size=len(y), prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits ``[B, num_classes]`` of ``batch`` (an image tensor, or a tuple whose first item is one)."""
        x = batch if isinstance(batch, Tensor) else batch[0]
        return self(x)
