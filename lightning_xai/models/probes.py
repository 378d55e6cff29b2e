"""Linear concept probes: which image-level concepts can be read linearly from a frozen layer?

A probe for concept ``c`` is a logistic regression ``p(c | x) = sigmoid(w_c . a(x) + b_c)`` on the layer's
activation ``a(x)`` averaged over spatial positions (``[C]`` per image; any ``[B, D]`` vectors work). All concepts
are probed at once by one linear layer ``W [num_concepts, D]``. Uses:

* **Concept activation vectors.** The unit normal of concept ``c``'s decision boundary, ``w_c / ||w_c||``, is a
  CAV in the sense of Kim et al. ("Interpretability Beyond Feature Attribution: Quantitative Testing with Concept
  Activation Vectors (TCAV)", ICML 2018) learned against *all* images without the concept rather than a random
  set (:meth:`ConceptProbes.cavs`; the source's normalisation is one positive scalar, so directions are those of
  the raw activation space).
* **Concept purity baselines.** A concept that a linear probe cannot separate (balanced accuracy near 0.5) is not
  linearly represented at that layer (Alain and Bengio, "Understanding intermediate layers using linear classifier
  probes", ICLR workshop 2017).

**Loss.** Class-balanced binary cross-entropy per concept, as in Net2Vec (Fong and Vedaldi, CVPR 2018):
``-(alpha_c y log s + (1 - alpha_c) (1 - y) log(1 - s))`` with ``alpha_c = 1 - pi_c``, ``pi_c`` the fraction of
training images showing concept ``c``, averaged over images and concepts. ``pi_c`` is the running fraction over
all training images seen so far (counts summed over processes every step, the current batch included), so the
weights are identical on every process and converge to the training set's concept frequencies.

**Metrics** (``val_*`` / ``test_*``; states summed over processes): ``probe_bacc``, the balanced accuracy
``(TPR + TNR) / 2`` at ``s > 0.5`` averaged over the concepts that have both positive and negative images, and
``probe_auroc``, the mean per-concept ROC AUC (torchmetrics ``MultilabelAUROC``, exact). Per-concept values are in
:attr:`ConceptProbes.results` after every evaluation epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.checks import check_int
from lightning_xai.distributed import default_reducer, sum_over_ranks
from lightning_xai.evaluation.concepts import ConceptProbeMetrics
from lightning_xai.models.activations import as_activation_batch, find_activation_source
from lightning_xai.models.base import XAIModule

__all__ = ["ConceptProbeMetrics", "ConceptProbes", "LinearConceptProbes", "balanced_bce"]


def check_concept_names(concept_names: Sequence[str] | None, num_concepts: int) -> list[str]:
    """Validate the names (default ``"concept_<i>"``); their number must be ``num_concepts``."""
    if concept_names is None:
        return [f"concept_{i}" for i in range(num_concepts)]
    names = [str(n) for n in concept_names]
    if len(names) != num_concepts:
        raise ValueError(f"got {len(names)} concept names for num_concepts = {num_concepts}")
    if len(set(names)) != len(names):
        raise ValueError(f"concept names must be distinct, got {names}")
    return names


def balanced_bce(logits: Tensor, targets: Tensor, alpha: Tensor, normalizer: float) -> Tensor:
    """``sum(-(alpha y log s + (1 - alpha) (1 - y) log(1 - s))) / normalizer`` with ``s = sigmoid(logits)``.

    ``alpha`` broadcasts against ``logits`` (one weight per concept). Computed with ``logsigmoid`` (stable).
    """
    y = targets.to(logits.dtype)
    a = alpha.to(logits.dtype)
    loss = -(a * y * F.logsigmoid(logits) + (1 - a) * (1 - y) * F.logsigmoid(-logits))
    return loss.sum() / normalizer


def sum_over_processes(tensor: Tensor) -> Tensor:
    """All-reduce sum (identity without ``torch.distributed``)."""
    return sum_over_ranks(tensor)


def world_size() -> int:
    return default_reducer().world_size


class LinearConceptProbes(nn.Module):
    """``logits = x W^T + b`` for ``num_concepts`` probes on ``num_features`` inputs (zero-initialised)."""

    def __init__(self, num_features: int, num_concepts: int) -> None:
        super().__init__()
        check_int("num_features", num_features, minimum=1, owner="LinearConceptProbes")
        check_int("num_concepts", num_concepts, minimum=1, owner="LinearConceptProbes")
        self.weight = nn.Parameter(torch.zeros(num_concepts, num_features))
        self.bias = nn.Parameter(torch.zeros(num_concepts))

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.weight.t() + self.bias

    def cavs(self) -> Tensor:
        """Unit concept directions ``[num_concepts, num_features]`` (a zero row stays zero)."""
        w = self.weight.detach()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _ProbeHead:
    """Probe training and evaluation shared by :class:`ConceptProbes` and Net2Vec's probes."""

    probes: LinearConceptProbes

    def _probe_features(self, activations: Tensor, num_features: int) -> Tensor:
        features = activations.flatten(2).mean(dim=2) if activations.ndim > 2 else activations
        if features.ndim != 2 or features.shape[1] != num_features:
            raise ValueError(
                f"the probes expect {num_features} features per image, got activations of shape "
                f"{list(activations.shape)} (check the layer; spatial must be 'pool' or 'maps')"
            )
        return features

    @staticmethod
    def _probe_loss(logits: Tensor, targets: Tensor, counts: Tensor, global_images: float) -> Tensor:
        """Balanced BCE with the running positive fractions ``counts = [pos_0..pos_C-1, images]``, divided by
        ``global_images * C / world_size``: the DDP mean of the per-process losses is the mean over the global
        batch (a single process gets exactly the mean over its batch)."""
        alpha = 1.0 - counts[:-1] / counts[-1].clamp_min(1)
        normalizer = max(global_images, 1.0) * logits.shape[1] / world_size()
        return balanced_bce(logits, targets, alpha.to(logits.device), normalizer)


def check_source_features(module: str, trainer: Any, expected: int, maps: bool = False) -> None:
    """Raise a clear error in ``setup`` when the trainer's activation source gives another number of features than
    the module was built for (or, with ``maps``, no feature maps)."""
    source = find_activation_source(trainer)
    if source is None or source.layer_shape is None:
        return
    if maps and source.spatial != "maps":
        raise ValueError(
            f"{module} needs feature maps: use an activation source with spatial='maps', not {source.spatial!r}"
        )
    d = source.known_vector_dim()
    if d != expected:
        raise ValueError(
            f"{module} was built for {expected} features, but layer {source.layer!r} with spatial={source.spatial!r} "
            f"gives {d} (layer output per sample: {list(source.layer_shape)}); set it to {d}"
        )


def concept_labels_of(batch: Any, position: int, num_concepts: int) -> Tensor:
    """Image-level concept labels ``[B, C]``: item ``position`` of the image batch (``ActivationBatch.extras``
    holds items 1.. of it)."""
    b = as_activation_batch(batch)
    if len(b.extras) < position:
        raise ValueError(
            f"the batch has no item {position} (concept labels): got {1 + len(b.extras)} items (images and "
            f"{len(b.extras)} more). Probes need image batches (images, labels, concept_labels, ...) computed on the "
            "fly (cached activation batches carry no labels)"
        )
    labels = b.extras[position - 1]
    if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.shape[1] != num_concepts:
        shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"concept labels must be [B, {num_concepts}], got {shape}")
    return labels


class ConceptProbes(_ProbeHead, XAIModule):
    """Linear probes for image-level concepts on a frozen layer (see the module docstring).

    Args:
        num_features: ``D``, the size of the pooled activation (channels of the layer).
        num_concepts: number of concepts ``C``.
        concept_names: their names (``"category:value"``), for results and CAVs.
        concepts_at: position of the concept labels in the image batch (``ConceptDataModule``:
            ``(images, labels, concept_labels)`` -> 2).
        optimizer, lr, weight_decay, scheduler, momentum: see :class:`~lightning_xai.models.base.XAIModule`.

    Train with an :class:`~lightning_xai.models.activations.ActivationDataModule` with ``spatial="pool"`` (or
    ``"maps"``, pooled here).
    """

    def __init__(
        self,
        num_features: int,
        num_concepts: int,
        concept_names: list[str] | None = None,
        concepts_at: int = 2,
        optimizer: str = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum)
        owner = type(self).__name__
        self.num_features = check_int("num_features", num_features, minimum=1, owner=owner)
        self.num_concepts = check_int("num_concepts", num_concepts, minimum=1, owner=owner)
        self.concept_names = check_concept_names(concept_names, num_concepts)
        self.concepts_at = check_int("concepts_at", concepts_at, minimum=1, owner=owner)
        self.probes = LinearConceptProbes(num_features, num_concepts)
        #: running counts: images showing each concept, then all images (summed over processes)
        self.register_buffer("concept_counts", torch.zeros(num_concepts + 1, dtype=torch.float64))
        self.val_metrics = ConceptProbeMetrics(num_concepts)
        self.test_metrics = ConceptProbeMetrics(num_concepts)
        #: per-concept ``{"bacc": Tensor[C], "auroc": Tensor[C]}`` of the last evaluation epoch
        self.results: dict[str, Tensor] = {}

    def setup(self, stage: str) -> None:
        check_source_features("ConceptProbes (num_features)", self._trainer, self.num_features)

    def forward(self, features: Tensor) -> Tensor:
        """Concept logits ``[B, C]`` of pooled features ``[B, D]`` (or maps ``[B, D, h, w]``)."""
        return self.probes(self._probe_features(features, self.num_features))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        b = as_activation_batch(batch)
        targets = concept_labels_of(b, self.concepts_at, self.num_concepts)
        logits = self(b.activations)
        with torch.no_grad():
            local = torch.cat([(targets > 0.5).sum(dim=0).double(), targets.new_tensor([targets.shape[0]]).double()])
            batch_counts = sum_over_processes(local).to(self.concept_counts.device)
            self.concept_counts += batch_counts
        loss = self._probe_loss(logits, targets, self.concept_counts, float(batch_counts[-1]))
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=targets.shape[0], prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        b = as_activation_batch(batch)
        targets = concept_labels_of(b, self.concepts_at, self.num_concepts)
        getattr(self, f"{stage}_metrics").update(self(b.activations), targets)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_eval(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        if not metrics.update_called:
            return
        self.results = {k: v.cpu() for k, v in metrics.compute().items()}
        metrics.reset()
        self.log_dict({f"{stage}_probe_{k}": v.nanmean().float() for k, v in self.results.items()}, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def cavs(self) -> Tensor:
        """Unit concept directions ``[C, D]`` (row ``c``: concept ``concept_names[c]``)."""
        return self.probes.cavs()

    def cav(self, concept: str) -> Tensor:
        """The unit direction of one concept, by name."""
        if concept not in self.concept_names:
            raise ValueError(f"unknown concept {concept!r}; valid concepts: {self.concept_names}")
        return self.cavs()[self.concept_names.index(concept)]

    def result_rows(self) -> list[list[Any]]:
        """``[concept, balanced accuracy, auroc]`` per concept, from the last evaluation epoch."""
        if not self.results:
            raise ValueError("no results yet: run a validation or test epoch first")
        return [
            [name, _float(self.results["bacc"][i]), _float(self.results["auroc"][i])]
            for i, name in enumerate(self.concept_names)
        ]


def _float(value: Tensor) -> float:
    v = float(value)
    return v if math.isfinite(v) else float("nan")
