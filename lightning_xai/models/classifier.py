"""``ImageClassifier``: a plain image classifier (cross-entropy) - the model the explanation callbacks watch."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_xai.batch import Key
from lightning_xai.checks import check_int
from lightning_xai.models.backbones import resolve_backbone
from lightning_xai.models.base import StepOutput, XAIModule

__all__ = ["ImageClassifier"]


class ImageClassifier(XAIModule):
    """Cross-entropy image classifier around a backbone built by name or passed as a module.

    Args:
        backbone: a name of :func:`~lightning_xai.models.backbones.build_backbone` (``"small_cnn"``,
            ``"resnet18"``, ``"vgg_small"``) or any ``nn.Module`` mapping ``[B, C, H, W]`` images to logits
            ``[B, num_classes]`` (in YAML: ``class_path`` / ``init_args``).
        num_classes: number of classes.
        in_channels: number of input channels (used when ``backbone`` is a name).
        optimizer, lr, weight_decay, scheduler, momentum, on_nonfinite_loss, input_key, label_key: see
            :class:`~lightning_xai.models.base.XAIModule`.

    Batches are read with :class:`~lightning_xai.batch.BatchReader`: by default ``batch[0]`` / ``batch[1]`` of
    tuples (so the project's ``(image, label, mask)`` batches and plain ``(x, y)`` batches both work) and the
    usual keys of dict batches (``image`` / ``pixel_values``, ``label`` / ``labels``). Logged per epoch:
    ``train_acc``, ``train_loss_epoch`` (and ``train_loss_step`` per step), ``val_loss``, ``val_acc``,
    ``test_loss``, ``test_acc``. Accuracies are torchmetrics ``MulticlassAccuracy`` (micro average: the fraction
    of correct predictions) in one ``MetricCollection`` per split, whose states are reduced across DDP ranks;
    losses are logged with ``sync_dist=True``. A non-finite loss raises (see ``on_nonfinite_loss``).

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
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum,
                         on_nonfinite_loss=on_nonfinite_loss, input_key=input_key, label_key=label_key)
        check_int("num_classes", num_classes, minimum=2, owner=type(self).__name__)
        self.backbone = resolve_backbone(backbone, num_classes, in_channels, owner=type(self).__name__)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.set_metrics(MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.backbone(x)

    def classify(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(logits, labels)`` of ``batch``, the logits' shape checked."""
        sample = self.batch_reader.read(batch)
        if sample.labels is None:
            raise ValueError(f"{type(self).__name__}: the batch has no labels ({self.batch_reader!r}); pass label_key=")
        self.check_class_labels(sample.labels)
        logits = self(sample.inputs)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the backbone returned shape {tuple(logits.shape)}; expected logits [B, {self.num_classes}]"
            )
        return logits, sample.labels

    def compute_losses(self, batch: Any, split: str) -> StepOutput:
        """Cross-entropy of the batch's logits and labels."""
        logits, labels = self.classify(batch)
        return StepOutput(F.cross_entropy(logits, labels), {}, logits)

    def _step(self, batch: Any, stage: str) -> Tensor | None:
        """One step of split ``stage`` (kept for subclasses written against the old base)."""
        return self.shared_step(batch, 0, stage)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits ``[B, num_classes]`` of ``batch`` (an image tensor, or a batch whose input the reader finds)."""
        return self(self.batch_reader.inputs(batch))
