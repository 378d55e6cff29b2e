"""Concept Bottleneck Models: predict human concepts first, then the class from the concepts alone.

P. W. Koh, T. Nguyen, Y. S. Tang, S. Mussmann, E. Pierson, B. Kim and P. Liang, "Concept Bottleneck Models",
ICML 2020. A backbone maps the image ``x`` to ``k`` concept logits ``g(x)``; a task head ``f`` maps the
*bottleneck* ``b`` - the concept probabilities ``sigmoid(g(x))`` (``bottleneck="sigmoid"``) or the logits
themselves (``bottleneck="logit"``) - to class logits. Because the class is computed from the concepts only, a user
can correct a predicted concept at test time and see the prediction change (an *intervention*).

**Training modes** (``mode``), all in one ``trainer.fit`` run:

* ``"joint"``: minimise ``L_task(f(b), y) + concept_loss_weight * L_concept(g(x), c)`` end to end, with
  ``L_task`` the cross-entropy and ``L_concept`` the mean binary cross-entropy with logits over the ``k`` concepts
  (optionally with per-concept positive-class weights ``concept_pos_weight``, as ``BCEWithLogitsLoss``'s
  ``pos_weight``).
* ``"standard"``: the same architecture trained on ``L_task`` alone (``concept_loss_weight`` is forced to 0):
  the baseline that shows what the concept supervision costs in accuracy. Its "concepts" are not concepts.
* ``"independent"`` and ``"sequential"``: two stages split by epochs. During the first ``concept_epochs`` epochs
  (stage ``"concepts"``) only the concept model ``g`` is trained, on ``L_concept``; the head receives no gradient
  and does not change. In the remaining epochs (stage ``"task"``) ``g`` is frozen (run in eval mode under
  ``no_grad``, so neither its parameters nor its BatchNorm statistics move) and only the head is trained on
  ``L_task``: on the **true** concepts for ``"independent"`` (0/1 for a sigmoid bottleneck; the intervention
  values below for a logit bottleneck) and on the frozen concept model's **predicted** bottleneck for
  ``"sequential"``. Set ``max_epochs > concept_epochs`` on the Trainer (checked when fitting starts). The
  stage is a function of ``current_epoch`` (:attr:`ConceptBottleneckModel.stage`), so resuming from a checkpoint
  resumes the right stage. Under DDP the parameters unused in a stage need
  ``strategy="ddp_find_unused_parameters_true"`` (checked when fitting starts).

Evaluation (validation, test, prediction, interventions) always runs the full model ``f(b(g(x)))``.

**Interventions.** Replacing a concept by its true value means: 0 or 1 for a sigmoid bottleneck; for a logit
bottleneck the 5th (concept absent) or 95th (present) percentile of that concept's logit over the training data,
as in Koh et al. The percentiles are recorded from the training logits of every training epoch (the last epoch
wins; at most ``percentile_samples`` rows per rank and epoch, gathered across DDP ranks) and can be recomputed
exactly in eval mode with :meth:`ConceptBottleneckModel.calibrate_interventions`. Concepts are intervened on in
**groups** (e.g. all colour concepts at once: the categories of
:class:`~lightning_xai.data.concepts.ConceptScenes`), in a ``"random"`` order or in ``"uncertainty"`` order (per
image, the groups whose predicted concepts have the highest mean binary entropy first).
:meth:`ConceptBottleneckModel.intervention_curve` reports task accuracy against the number of intervened groups;
for random orders it is the **mean** over ``n_orders`` random orders (the expected gain of intervening on that many
groups), never the best order. :func:`log_intervention_curve` sends it to W&B as a line plot.

**Metrics** (torchmetrics, reduced across DDP ranks): task accuracy ``{stage}_acc``, concept accuracy
``{stage}_concept_acc`` (fraction of the ``N x k`` concept decisions ``g(x) > 0`` that are right), per-concept
ROC AUC of the concept logits ``{stage}_concept_auc/<concept name>`` (:class:`ConceptAUROC`: NaN for a concept
that is always or never present in the evaluated data) and their mean over the defined ones
``{stage}_concept_auc`` (validation and test), and the losses ``{stage}_loss``, ``{stage}_task_loss``,
``{stage}_concept_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.batch import BatchReader, Key
from lightning_xai.checks import check_choice, check_float, check_int
from lightning_xai.evaluation.concepts import ConceptAUROC, auc_matrix
from lightning_xai.models.backbones import resolve_backbone
from lightning_xai.models.base import XAIModule, config_dataclass
from lightning_xai.models.cbm_interventions import (
    INTERVENTION_ORDERS,
    LOGIT_PERCENTILES,  # noqa: F401 - re-exported
    GroupSpec,  # noqa: F401 - re-exported
    InterventionCurve,
    InterventionMixin,
    _loader_from,  # noqa: F401 - re-exported (concept whitening and older callers import it from here)
    column_quantiles,
    log_intervention_curve,
)
from lightning_xai.models.cbm_training import CBMTrainingMixin

__all__ = [
    "BOTTLENECKS",
    "INTERVENTION_ORDERS",
    "MODES",
    "CBMConfig",
    "CBMLosses",
    "ConceptAUROC",
    "ConceptBottleneckModel",
    "InterventionCurve",
    "auc_matrix",
    "column_quantiles",
    "log_intervention_curve",
]

MODES = ("independent", "sequential", "joint", "standard")
BOTTLENECKS = ("sigmoid", "logit")


@dataclass
class CBMLosses:
    """One forward pass of training: the total ``loss`` and its named parts (``None`` when not computed)."""

    loss: Tensor
    task_loss: Tensor | None
    concept_loss: Tensor | None
    concept_logits: Tensor | None
    task_logits: Tensor | None


class ConceptBottleneckModel(CBMTrainingMixin, InterventionMixin, XAIModule):
    """A concept bottleneck model (Koh et al., ICML 2020): ``x -> k concept logits -> task head -> class logits``.

    Args:
        backbone: the concept model ``g``: a name of :func:`~lightning_xai.models.backbones.build_backbone`
            (built with ``num_classes=num_concepts`` outputs) or any ``nn.Module`` mapping ``[B, C, H, W]`` images
            to concept logits ``[B, num_concepts]``.
        num_concepts: ``k``, the number of binary concepts (the width of the batches' concept labels).
        num_classes: number of task classes.
        in_channels: input channels (used when ``backbone`` is a name).
        mode: ``"joint"``, ``"standard"``, ``"independent"`` or ``"sequential"`` (see the module docstring).
        bottleneck: ``"sigmoid"`` (the head sees concept probabilities) or ``"logit"`` (the head sees logits).
        concept_loss_weight: ``lambda`` of the joint loss, >= 0 (ignored by ``"standard"``, which uses 0).
        concept_pos_weight: optional per-concept weights (``k`` positive numbers) of the positive class in the
            binary cross-entropy, e.g. ``n_negative / n_positive`` to balance rare concepts.
        head_hidden: ``None`` for a linear head, or the width of the hidden layer of a two-layer MLP head
            (linear - ReLU - linear).
        concept_epochs: for ``"independent"`` / ``"sequential"`` (required there): the number of epochs of the
            concept stage; the remaining epochs of the fit train the head.
        concept_names: optional names of the ``k`` concepts (metric keys); taken from the datamodule's
            ``concept_names`` when left out and available, else ``"c0"``, ``"c1"``, ...
        percentile_samples: at most this many training rows per rank and epoch are kept to compute the
            intervention percentiles of a logit bottleneck.
        head_lr: learning rate of the task head (``None``: ``lr``). The head is a small model on ``k`` inputs that
            usually tolerates a larger rate, which shortens the head stage of ``"independent"``/``"sequential"``.
        optimizer, lr, weight_decay, scheduler, momentum, on_nonfinite_loss, input_key, label_key: see
            :class:`~lightning_xai.models.base.XAIModule`.
        concept_key: where the concept labels are in a batch (see :class:`~lightning_xai.batch.BatchReader`);
            ``None``: a tuple's third element, or a dict's / object's ``"concepts"`` (or ``"concept_labels"``).

    Batches are read by :class:`~lightning_xai.batch.BatchReader`: by default ``(images, labels, concept_labels)``
    tuples with ``concept_labels`` float 0/1 ``[B, k]`` (the batches of
    :class:`~lightning_xai.data.concepts.ConceptDataModule`) or dicts ``{"image", "label", "concepts"}``; other
    layouts with ``input_key`` / ``label_key`` / ``concept_key``. ``"standard"`` mode and evaluation also accept
    batches without concepts. A batch without the labels or concepts a step needs raises a ``ValueError`` naming
    the model, what is missing, the batch's fields and the argument to pass.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small_cnn",
        num_concepts: int = 18,
        num_classes: int = 8,
        in_channels: int = 3,
        mode: str = "joint",
        bottleneck: str = "sigmoid",
        concept_loss_weight: float = 1.0,
        concept_pos_weight: list[float] | None = None,
        head_hidden: int | None = None,
        concept_epochs: int | None = None,
        concept_names: list[str] | None = None,
        percentile_samples: int = 10_000,
        head_lr: float | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
        concept_key: Key | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum,
                         on_nonfinite_loss=on_nonfinite_loss, input_key=input_key, label_key=label_key)
        owner = type(self).__name__
        self.batch_reader = BatchReader(input_key, label_key, owner=owner, concept_key=concept_key)
        check_choice("mode", mode, MODES, owner=owner)
        check_choice("bottleneck", bottleneck, BOTTLENECKS, owner=owner)
        k = check_int("num_concepts", num_concepts, minimum=1, owner=owner)
        check_int("num_classes", num_classes, minimum=2, owner=owner)
        check_int("percentile_samples", percentile_samples, minimum=1, owner=owner)
        if head_lr is not None:  # None: the head learns at lr
            check_float("head_lr", head_lr, minimum=0, strict=True, owner=owner)
        check_float("concept_loss_weight", concept_loss_weight, minimum=0, owner=owner)
        if head_hidden is not None:
            check_int("head_hidden", head_hidden, minimum=1, owner=owner)
        if mode in ("independent", "sequential"):
            if concept_epochs is None:
                raise ValueError(
                    f"mode={mode!r} trains in two stages: set concept_epochs (the number of epochs of the concept "
                    "stage; the remaining epochs train the task head)"
                )
            check_int("concept_epochs", concept_epochs, minimum=1, owner=owner)
        elif concept_epochs is not None:
            raise ValueError(f"concept_epochs only applies to 'independent' and 'sequential', not mode={mode!r}")
        if concept_names is not None:
            if not isinstance(concept_names, list | tuple) or not all(isinstance(n, str) for n in concept_names):
                raise TypeError(f"concept_names must be a list of strings, got {concept_names!r}")
            if len(concept_names) != k:
                raise ValueError(f"concept_names has {len(concept_names)} names but num_concepts is {k}")
        if concept_pos_weight is not None:
            weights = torch.as_tensor(concept_pos_weight, dtype=torch.float32)
            if weights.ndim != 1 or weights.numel() != k:
                raise ValueError(
                    f"concept_pos_weight must hold one weight per concept: got {weights.numel()} weights for "
                    f"num_concepts={k}"
                )
            if not torch.isfinite(weights).all() or (weights <= 0).any():
                raise ValueError(f"concept_pos_weight must be finite and > 0, got {list(concept_pos_weight)}")
        else:
            weights = None
        self.register_buffer("concept_pos_weight", weights)

        self.backbone = resolve_backbone(backbone, k, in_channels, owner=owner)  # g: k concept logits
        if head_hidden is None:
            self.head: nn.Module = nn.Linear(k, num_classes)
        else:
            self.head = nn.Sequential(nn.Linear(k, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))

        self.num_concepts = k
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.mode = mode
        self.bottleneck = bottleneck
        self.concept_loss_weight = 0.0 if mode == "standard" else float(concept_loss_weight)
        self.concept_epochs = concept_epochs
        self.concept_names = list(concept_names) if concept_names is not None else [f"c{j}" for j in range(k)]
        self._names_given = concept_names is not None
        self.percentile_samples = percentile_samples
        self.head_lr = float(head_lr) if head_lr is not None else None
        # Intervention values of a logit bottleneck (5th / 95th percentile of the training logits per concept).
        self.register_buffer("concept_low", torch.zeros(k))
        self.register_buffer("concept_high", torch.zeros(k))
        self.register_buffer("intervention_calibrated", torch.tensor(False))
        self._epoch_logits: list[Tensor] = []
        self._epoch_rows = 0

        self.set_metrics(MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}))
        self.set_metrics(
            MetricCollection({"concept_acc": MultilabelAccuracy(k, threshold=0.5, average="micro")}), name="concept"
        )
        self.set_metrics(MetricCollection({"concept_auc": ConceptAUROC()}), name="auc")

    # ------------------------------------------------------------------------------------------------ model
    @property
    def stage(self) -> str:
        """``"joint"`` (modes joint/standard), else ``"concepts"`` during the first ``concept_epochs`` epochs, then
        ``"task"``."""
        if self.mode in ("joint", "standard"):
            return "joint"
        return "concepts" if self.current_epoch < self.concept_epochs else "task"

    def concept_logits(self, x: Tensor) -> Tensor:
        """The concept model's logits ``[B, k]``."""
        logits = self.backbone(x)
        if logits.ndim != 2 or logits.shape[1] != self.num_concepts:
            raise ValueError(
                f"the backbone returned shape {tuple(logits.shape)}; expected concept logits [B, {self.num_concepts}]"
            )
        return logits

    def bottleneck_values(self, concept_logits: Tensor) -> Tensor:
        """What the head sees: ``sigmoid(logits)`` for a sigmoid bottleneck, the logits for a logit bottleneck."""
        return torch.sigmoid(concept_logits) if self.bottleneck == "sigmoid" else concept_logits

    def forward_with_concepts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(concept_logits [B, k], task_logits [B, num_classes])``."""
        concept_logits = self.concept_logits(x)
        return concept_logits, self.head(self.bottleneck_values(concept_logits))

    def forward(self, x: Tensor) -> Tensor:
        """Task logits ``[B, num_classes]`` of the full model ``head(bottleneck(g(x)))``."""
        return self.forward_with_concepts(x)[1]

    # ------------------------------------------------------------------------------------------ interventions
    def true_concept_values(self, concept_labels: Tensor) -> Tensor:
        """The bottleneck values standing for the true concepts ``concept_labels [B, k]`` (0/1).

        Sigmoid bottleneck: the labels themselves. Logit bottleneck: the 5th percentile of the concept's training
        logits where the label is 0 and the 95th where it is 1 (needs the percentiles, see
        :meth:`calibrate_interventions`).
        """
        labels = self._check_concept_labels(concept_labels).float()
        if self.bottleneck == "sigmoid":
            return labels
        if not bool(self.intervention_calibrated):
            raise RuntimeError(
                "a logit bottleneck intervenes with the 5th/95th percentiles of the training logits, which are not "
                "recorded yet: train the model or call calibrate_interventions(train_data) first"
            )
        low, high = self.concept_low.to(labels), self.concept_high.to(labels)
        return low + labels * (high - low)

    # ------------------------------------------------------------------------------------------------ losses
    def _check_concept_labels(self, concept_labels: Tensor) -> Tensor:
        if concept_labels.ndim != 2 or concept_labels.shape[1] != self.num_concepts:
            raise ValueError(
                f"the concept labels have shape {tuple(concept_labels.shape)}, i.e. {concept_labels.shape[-1]} "
                f"concepts, but the model has num_concepts={self.num_concepts}"
            )
        return concept_labels

    def _unpack(self, batch: Any, need_concepts: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(images, labels, concept labels or None)`` of ``batch``, read by :attr:`batch_reader`."""
        reader = self.batch_reader
        x, y = reader.inputs(batch), reader.labels(batch, required=True)
        self.check_class_labels(y)
        c = reader.concepts(batch, required=need_concepts)
        return x, y, None if c is None else self._check_concept_labels(c).float()

    def _concept_loss(self, concept_logits: Tensor, concept_labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            concept_logits.float(), concept_labels.float(), pos_weight=self.concept_pos_weight
        )

    def compute_losses(self, batch: Any, stage: str | None = None) -> CBMLosses:
        """The training loss of ``batch`` in training stage ``stage`` (default: :attr:`stage`) and its parts.

        ``"joint"``: ``task + concept_loss_weight * concept`` (the concept part is skipped, ``None``, when the
        weight is 0 and the batch has no concept labels). ``"concepts"``: the concept loss alone (the head is not
        run). ``"task"``: the task loss of the head on the true (``"independent"``) or frozen-predicted
        (``"sequential"``) bottleneck; the concept model runs in eval mode under ``no_grad``.
        """
        stage = self.stage if stage is None else stage
        if stage not in ("joint", "concepts", "task"):
            raise ValueError(f"unknown training stage {stage!r}; valid stages: ['joint', 'concepts', 'task']")
        x, y, c = self._unpack(batch, need_concepts=self.mode != "standard")
        if stage == "concepts":
            concept_logits = self.concept_logits(x)
            concept_loss = self._concept_loss(concept_logits, c)
            return CBMLosses(concept_loss, None, concept_loss, concept_logits, None)
        if stage == "task":
            concept_logits = None
            # the logits of the frozen concept model also feed the logit percentiles (see _record_logits)
            if self.mode == "sequential" or self.bottleneck == "logit":
                with model_state_guard(self.backbone), torch.no_grad():
                    concept_logits = self.concept_logits(x)
            if self.mode == "independent":
                values = self.true_concept_values(c)
            else:
                values = self.bottleneck_values(concept_logits)
            task_logits = self.head(values)
            task_loss = F.cross_entropy(task_logits, y)
            return CBMLosses(task_loss, task_loss, None, concept_logits, task_logits)
        concept_logits, task_logits = self.forward_with_concepts(x)
        task_loss = F.cross_entropy(task_logits, y)
        concept_loss = self._concept_loss(concept_logits, c) if c is not None else None
        loss = task_loss
        if concept_loss is not None and self.concept_loss_weight > 0:
            loss = task_loss + self.concept_loss_weight * concept_loss
        return CBMLosses(loss, task_loss, concept_loss, concept_logits, task_logits)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Task logits ``[B, num_classes]`` of ``batch`` (an image tensor, or a batch whose input the reader finds)."""
        return self(self.batch_reader.inputs(batch))

    # ------------------------------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        super().setup(stage)  # num_classes against the datamodule's
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_concepts = getattr(datamodule, "num_concepts", None)
        if isinstance(data_concepts, int) and data_concepts != self.num_concepts:
            raise ValueError(
                f"the datamodule has {data_concepts} concepts but the model has num_concepts={self.num_concepts}"
            )
        names = getattr(datamodule, "concept_names", None)
        if not self._names_given and isinstance(names, list | tuple) and len(names) == self.num_concepts:
            self.concept_names = [str(n) for n in names]


#: The settings of :class:`ConceptBottleneckModel` as one frozen dataclass (every constructor argument but
#: ``backbone``):
#: ``ConceptBottleneckModel.from_config(CBMConfig(...), backbone=...)``; ``model.to_config()`` gives them back.
CBMConfig = config_dataclass(ConceptBottleneckModel, "CBMConfig", exclude=("backbone",))
ConceptBottleneckModel.config_class = CBMConfig
