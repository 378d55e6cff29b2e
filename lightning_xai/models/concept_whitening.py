"""Concept Whitening: a BatchNorm replacement whose output axes are decorrelated and aligned with concepts.

Z. Chen, Y. Bei and C. Rudin, "Concept Whitening for Interpretable Image Recognition", Nature Machine Intelligence
2020. A :class:`ConceptWhitening` (CW) layer maps the activations ``z`` (``C`` channels, every pixel a sample) to

    ``y = Q^T W (z - mu)``

where ``mu`` is the mean and ``W = Sigma^{-1/2}`` the ZCA whitening matrix of the channel covariance ``Sigma``
(so ``W (z - mu)`` has identity covariance), and ``Q`` is an orthogonal ``C x C`` matrix whose column ``q_j``
points along concept ``j`` for ``j < k``: output channel ``j`` is the *concept axis* of concept ``j``. The
remaining ``C - k`` axes are free. Because the whitened space has identity covariance, any rotation keeps the
axes decorrelated, so aligning one axis with a concept does not leak it into the others.

**Whitening** (``whitening``), always computed in float32 (or float64 for float64 inputs), also under autocast:

* ``"zca"``: eigendecomposition ``Sigma + eps I = U diag(lambda) U^T``, ``W = U diag(lambda^{-1/2}) U^T``. The
  backward pass uses the Daleckii-Krein formula for matrix functions with the divided differences of
  ``lambda^{-1/2}`` written as ``-1 / (sqrt(a) sqrt(b) (sqrt(a) + sqrt(b)))``, which stays finite for equal or
  nearly equal eigenvalues (plain autograd through ``eigh`` divides by ``lambda_i - lambda_j``).
* ``"newton"``: coupled Newton-Schulz iterations for ``Sigma_N^{-1/2}``, ``Sigma_N = Sigma / tr(Sigma)``,
  ``W = Sigma_N^{-1/2} / sqrt(tr(Sigma))`` (:func:`newton_inverse_sqrt`), the iterative normalisation of
  L. Huang, Y. Zhou, F. Zhu, L. Liu and L. Shao, "Iterative Normalization: Beyond Standardization towards
  Efficient Whitening", CVPR 2019: only matrix products, differentiated by autograd; the output is approximately
  white after a few iterations (IterNorm uses 5) and exactly white in the limit.

In training mode the batch statistics are used (with ``1/m`` normalisation over the ``m = B * H * W`` samples)
and running averages of ``mu`` and ``W`` (``momentum``, as in BatchNorm) are kept for eval mode. Under DDP with
``sync_stats=True`` the sums behind ``mu`` and ``Sigma`` are all-reduced across ranks (differentiably, like
``SyncBatchNorm``), so every rank whitens with the statistics of the global batch; every rank must then run the
layer in training mode the same number of times.

**Concept alignment.** ``Q`` is a buffer, not a parameter: it is updated every few training steps from batches of
concept examples. For each concept ``j`` the examples go through the network (eval mode: running statistics)
up to the CW layer, where :meth:`ConceptWhitening.accumulate_concept` sums ``d a_j / d q_j`` of the axis
activation ``a_j`` pooled over space: the spatial mean of the whitened features (``pool="mean"``) or the
whitened feature vector at the pixel where ``q_j^T x`` is largest (``pool="max"``). :meth:`update_rotation`
averages these sums into ``g_j`` (all-reduced over DDP ranks first) and takes one step on the Stiefel manifold
that increases ``sum_j q_j^T g_j``, i.e. decreases the concept loss ``F(Q) = -sum_j q_j^T g_j`` (exact for mean
pooling, the linearisation at the current ``Q`` for max pooling): the Cayley transform
``Y(tau) = (I + tau/2 A)^{-1} (I - tau/2 A) Q`` with the skew-symmetric ``A = G Q^T - Q G^T``, ``G = dF/dQ``,
and a curvilinear backtracking line search on ``tau`` with the Armijo condition
``F(Y(tau)) <= F(Q) - rho * tau * ||A||_F^2 / 2`` (Z. Wen and W. Yin, "A feasible method for optimization with
orthogonality constraints", Mathematical Programming 2013). ``Y(tau)`` is orthogonal for every ``tau``; the step
is computed in float64 and re-projected onto the orthogonal group if rounding ever drifts by more than 1e-6.
Cayley steps are rotations, so ``Q`` stays in the connected component of its start (``det Q = +1`` from the
identity); with ``k < C`` a free axis absorbs the sign, so every alignment of the ``k`` concept axes is reachable.

:class:`ConceptWhiteningClassifier` is the LightningModule: a classifier whose chosen BatchNorm2d became a CW
layer, aligned every ``update_every`` steps with concept examples from
:meth:`~lightning_xai.data.concepts.ConceptScenes.concept_examples`. :func:`concept_purity`,
:func:`best_filter_auc` and :func:`orthogonality_error` evaluate the result as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.attribution.layers import StopForward, forward_until_stopped, resolve_layer
from lightning_xai.batch import BatchReader, Key
from lightning_xai.checks import check_bool, check_choice, check_int
from lightning_xai.distributed import sum_over_ranks
from lightning_xai.models.backbones import resolve_backbone
from lightning_xai.models.base import StepOutput, XAIModule
from lightning_xai.models.concept_bottleneck import ConceptAUROC, auc_matrix
from lightning_xai.models.whitening import (
    POOLINGS,
    WHITENINGS,
    ConceptWhitening,
    _distributed_rank,
    _distributed_world,
    best_filter_auc,
    cayley_step,
    concept_purity,
    newton_inverse_sqrt,
    orthogonality_error,
    pooled_activations,
    replace_batchnorm,
    zca_inverse_sqrt,
)

__all__ = [
    "POOLINGS",
    "WHITENINGS",
    "ConceptAUROC",
    "ConceptWhitening",
    "ConceptWhiteningClassifier",
    "auc_matrix",
    "best_filter_auc",
    "cayley_step",
    "concept_purity",
    "newton_inverse_sqrt",
    "orthogonality_error",
    "pooled_activations",
    "replace_batchnorm",
    "zca_inverse_sqrt",
]


# ---------------------------------------------------------------------------------------------------- whitening


# ---------------------------------------------------------------------------------------------------- rotation


# ---------------------------------------------------------------------------------------------------- evaluation


# ---------------------------------------------------------------------------------------------- LightningModule
class ConceptWhiteningClassifier(XAIModule):
    """An image classifier whose BatchNorm2d ``layer`` is a :class:`ConceptWhitening` layer aligned with concepts.

    Args:
        concepts: the concepts to align, by name (e.g. ``"shape:circle"``) in the concept dataset; axis ``j`` of
            the CW layer is aligned with ``concepts[j]``. At most as many as the layer has channels.
        backbone: a name of :func:`~lightning_xai.models.backbones.build_backbone` or an ``nn.Module`` (images to
            ``[B, num_classes]`` logits) containing the BatchNorm2d ``layer``.
        layer: dotted name of the BatchNorm2d to replace (``"features.1"``: the last block of ``"small_cnn"``).
        num_classes, in_channels: as for :class:`~lightning_xai.models.classifier.ImageClassifier`.
        update_every: update the rotation after every ``update_every`` optimiser steps.
        concept_batch_size: examples per concept per update (fewer if the dataset has fewer); under DDP they are
            split across ranks and the gradients all-reduced.
        whitening, pool, rotation_step, cw_momentum, cw_eps: of the :class:`ConceptWhitening` layer
            (``cw_momentum`` and ``cw_eps`` are its ``momentum`` and ``eps``).
        concept_split: the split of the datamodule whose dataset supplies concept examples.
        concept_seed: seed of the concept example draws (update ``u`` uses ``concept_seed + u``, so a resumed run
            draws what the uninterrupted run would have drawn).
        recalibrate: at the end of ``fit``, recompute the CW layer's running statistics with the final weights
            over the training data (:meth:`recalibrate_whitening`; as one recomputes BatchNorm statistics). The
            running average of per-batch whitening matrices lags the features while they train, so without it
            the eval-mode output can be far from white (max ``|cov - I|`` 1.76 on the training data after 3
            epochs at a constant rate in the tests, 0.003 after the recalibration; with a cosine schedule the lag
            is smaller: 0.12 -> 0.10 on test activations at the by-design benchmark's defaults).
        optimizer, lr, weight_decay, scheduler, momentum, on_nonfinite_loss, input_key, label_key: see
            :class:`~lightning_xai.models.base.XAIModule`.
        concept_key: where a batch's concept labels are (see :class:`~lightning_xai.batch.BatchReader`; default: a
            tuple's third element, a dict's ``"concepts"``); only evaluation batches that have them are scored.

    Concept examples come from the datamodule's ``dataset(concept_split)`` (anything with ``concept_index`` and
    ``concept_examples``, e.g. :class:`~lightning_xai.data.concepts.ConceptScenes`) or from
    :meth:`set_concept_dataset`. Logged: ``train_loss``, ``train_acc``, ``val_*``/``test_*`` loss and accuracy,
    ``concept_alignment`` (mean ``q_j^T g_j`` after each update), ``cw_orthogonality_error``, and, when the batches
    carry concept labels ``(images, labels, concept_labels)``, ``{val,test}_concept_purity`` (mean AUC of the
    aligned axes, mean-pooled; per concept under ``{split}_concept_purity/<name>``), DDP-reduced by torchmetrics.
    """

    def __init__(
        self,
        concepts: list[str],
        backbone: str | nn.Module = "small_cnn",
        layer: str = "features.1",
        num_classes: int = 8,
        in_channels: int = 3,
        update_every: int = 20,
        concept_batch_size: int = 32,
        whitening: str = "zca",
        pool: str = "mean",
        rotation_step: float = 0.5,
        cw_momentum: float = 0.1,
        cw_eps: float = 1e-5,
        concept_split: str = "train",
        concept_seed: int = 0,
        recalibrate: bool = True,
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
        self.batch_reader = BatchReader(input_key, label_key, owner=type(self).__name__, concept_key=concept_key)
        self.recalibrate = check_bool("recalibrate", recalibrate, owner="ConceptWhiteningClassifier")
        if isinstance(concepts, str) or not isinstance(concepts, Sequence) or not concepts:
            raise ValueError(f"concepts must be a non-empty list of concept names, got {concepts!r}")
        if not all(isinstance(c, str) for c in concepts) or len(set(concepts)) != len(concepts):
            raise ValueError(f"concepts must be distinct concept names (strings), got {list(concepts)!r}")
        for name, value, minimum in (("num_classes", num_classes, 2), ("update_every", update_every, 1),
                                     ("concept_batch_size", concept_batch_size, 1)):
            check_int(name, value, minimum=minimum, owner=type(self).__name__)
        check_choice("concept_split", concept_split, ("train", "val", "test"), owner=type(self).__name__)
        self.backbone = resolve_backbone(backbone, num_classes, in_channels, owner=type(self).__name__)
        cw = replace_batchnorm(
            self.backbone,
            layer,
            len(concepts),
            whitening=whitening,
            pool=pool,
            rotation_step=rotation_step,
            momentum=cw_momentum,
            eps=cw_eps,
        )
        self.cw_layer = resolve_layer(self.backbone, cw)[0]
        self.concepts = list(concepts)
        self.num_classes = num_classes
        self.update_every = update_every
        self.concept_batch_size = concept_batch_size
        self.concept_split = concept_split
        self.concept_seed = concept_seed
        self._concept_dataset: Any = None
        self._concept_indices: list[int] | None = None
        self._concept_available: list[int] = []
        self._last_update_step = -1
        self.set_metrics(MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}))
        self.set_metrics(MetricCollection({"concept_purity": ConceptAUROC()}), name="purity")

    @property
    def cw(self) -> ConceptWhitening:
        """The concept whitening layer (inside ``backbone``; not registered twice)."""
        return self.backbone.get_submodule(self.cw_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    # ------------------------------------------------------------------------------------------ concept data
    def set_concept_dataset(self, dataset: Any) -> None:
        """Use ``dataset`` (with ``concept_index`` and ``concept_examples``) for concept examples."""
        for attr in ("concept_index", "concept_examples"):
            if not callable(getattr(dataset, attr, None)):
                raise TypeError(
                    f"the concept dataset must have a {attr}() method (e.g. ConceptScenes), "
                    f"got {type(dataset).__name__}"
                )
        indices = [dataset.concept_index(name) for name in self.concepts]  # raises naming the valid concepts
        num_concepts = getattr(dataset, "num_concepts", None)
        if isinstance(num_concepts, int) and any(i >= num_concepts for i in indices):
            raise ValueError(f"concept indices {indices} out of range for a dataset of {num_concepts} concepts")
        labels = getattr(dataset, "concept_labels", None)
        available = [
            int(labels[:, i].sum()) if isinstance(labels, Tensor) else self.concept_batch_size for i in indices
        ]
        empty = [name for name, count in zip(self.concepts, available) if count == 0]
        if empty:
            raise ValueError(f"the concept dataset has no examples of {empty}")
        self._concept_dataset = dataset
        self._concept_indices = indices
        self._concept_available = available

    def setup(self, stage: str) -> None:
        super().setup(stage)  # num_classes against the datamodule's
        if self._concept_dataset is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dataset_fn = getattr(datamodule, "dataset", None)
        if callable(dataset_fn):
            dataset = dataset_fn(self.concept_split)
            if callable(getattr(dataset, "concept_examples", None)):
                self.set_concept_dataset(dataset)
                return
        if stage == "fit":
            raise ValueError(
                "ConceptWhiteningClassifier needs concept examples: use a datamodule whose dataset(split) has "
                "concept_examples() (e.g. ConceptDataModule) or call set_concept_dataset(dataset) before fitting"
            )

    def update_concept_alignment(self) -> dict[str, float]:
        """Accumulate the concept gradients from fresh concept examples and take one rotation step.

        The backbone runs in eval mode (restored afterwards) and without gradients; each rank takes its share of
        every concept's examples and the CW layer all-reduces the sums (so all ranks must call this together).
        """
        if self._concept_dataset is None or self._concept_indices is None:
            raise RuntimeError("no concept dataset: fit with a ConceptDataModule or call set_concept_dataset first")
        cw = self.cw
        world, rank = _distributed_world(), _distributed_rank()
        seed = self.concept_seed + int(cw.num_rotation_updates)
        with model_state_guard(self.backbone), torch.no_grad():
            for j, index in enumerate(self._concept_indices):
                n = min(self.concept_batch_size, self._concept_available[j])
                images = self._concept_dataset.concept_examples(index, n, seed=seed)[rank::world]
                if len(images):
                    with cw.accumulate_concept(j):
                        self.backbone(images.to(self.device))
        return cw.update_rotation()

    # --------------------------------------------------------------------------------------------- training
    def compute_losses(self, batch: Any, split: str) -> StepOutput:
        """Cross-entropy; outside training, batches with concept labels (``concept_key``) also update the concept
        purity (AUC of each aligned axis, mean-pooled)."""
        x, y = self.batch_reader.inputs(batch), self.batch_reader.labels(batch)
        self.check_class_labels(y)
        concepts = self.batch_reader.concepts(batch) if split != "train" else None
        if concepts is not None and self._concept_indices is not None:
            outputs: list[Tensor] = []
            handle = self.cw.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
            try:
                logits = self(x)
            finally:
                handle.remove()
            axes = outputs[-1][:, : len(self.concepts)].float().mean(dim=(2, 3))
            labels = concepts[:, self._concept_indices].long()
            self.metrics_of(split, "purity")["concept_purity"].update(axes, labels)
        else:
            logits = self(x)
        return StepOutput(F.cross_entropy(logits, y), {}, logits)

    def _step(self, batch: Any, split: str) -> Tensor | None:
        """One step of ``split`` (kept for callers of the earlier private API)."""
        return self.shared_step(batch, 0, split)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(self.batch_reader.inputs(batch))

    # -------------------------------------------------------------------------------------- recalibration
    @torch.no_grad()
    def recalibrate_whitening(self, data: Any = None, max_batches: int | None = None) -> dict[str, float]:
        """Recompute the CW layer's running mean and whitening matrix with the current weights (issue: the running
        average of per-batch whitening matrices lags the features while they train).

        One eval-mode pass over ``data`` (a DataLoader, any iterable of batches, or a datamodule whose training
        loader is used; default: the trainer's training loader) accumulates the sum and the outer products of the
        CW layer's input pixels in float64 (the forward stops right after the layer), summed over DDP ranks (every
        rank must call this together: :meth:`on_fit_end` does), and sets the running statistics to the
        population's (:meth:`ConceptWhitening.set_statistics`). The model's train/eval modes are restored.
        Returns ``{"pixels": count, "batches": local batch count}``.
        """
        loader = self._recalibration_loader(data)
        cw = self.cw
        c = cw.num_features
        total = torch.zeros(c, dtype=torch.float64, device=self.device)
        outer = torch.zeros(c, c, dtype=torch.float64, device=self.device)
        count = torch.zeros(1, dtype=torch.float64, device=self.device)

        def accumulate(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            flat = inputs[0].detach().double().transpose(0, 1).reshape(c, -1)
            total.add_(flat.sum(dim=1))
            outer.add_(flat @ flat.mT)
            count.add_(flat.shape[1])
            raise StopForward

        batches = 0
        with model_state_guard(self.backbone):
            self.backbone.eval()
            handle = cw.register_forward_pre_hook(accumulate)
            try:
                for i, batch in enumerate(loader):
                    if max_batches is not None and i >= max_batches:
                        break
                    forward_until_stopped(self.backbone, self.batch_reader.inputs(batch).to(self.device))
                    batches += 1
            finally:
                handle.remove()
        sums = sum_over_ranks(torch.cat([total, outer.flatten(), count]))
        pixels = float(sums[-1])
        if pixels == 0:
            raise ValueError(f"{type(self).__name__}.recalibrate_whitening got no batches")
        cw.set_statistics(sums[:c], sums[c:-1].view(c, c), pixels)
        return {"pixels": pixels, "batches": float(batches)}

    def _recalibration_loader(self, data: Any) -> Any:
        if data is not None:
            loader_fn = getattr(data, "train_dataloader", None)
            return loader_fn() if callable(loader_fn) and not isinstance(data, Iterable) else data
        if self._trainer is not None:
            loader = self.trainer.train_dataloader
            if loader is not None:
                return loader
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None:
                return datamodule.train_dataloader()
        raise ValueError(f"{type(self).__name__}.recalibrate_whitening needs data: pass a DataLoader or datamodule")

    def on_fit_end(self) -> None:
        """Recalibrate the whitening statistics with the final weights (``recalibrate=True``, the default)."""
        if not self.recalibrate:
            return
        max_batches = 1 if getattr(self.trainer, "fast_dev_run", False) else None
        self.recalibrate_whitening(max_batches=max_batches)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step > 0 and step % self.update_every == 0 and step != self._last_update_step:
            self._last_update_step = step
            info = self.update_concept_alignment()
            self.log("concept_alignment", info["alignment"], on_step=True, on_epoch=False, batch_size=1)
            self.log("cw_orthogonality_error", orthogonality_error(self.cw.rotation), on_step=True, batch_size=1)

    def _log_purity(self, split: str) -> None:
        metric = self.metrics_of(split, "purity")["concept_purity"]
        if not metric.update_called:
            return
        auc = metric.compute()
        metric.reset()
        self.log(f"{split}_concept_purity", auc.nanmean())
        self.log_dict({f"{split}_concept_purity/{name}": value for name, value in zip(self.concepts, auc)})

    def on_validation_epoch_end(self) -> None:
        self._log_purity("val")

    def on_test_epoch_end(self) -> None:
        self._log_purity("test")
