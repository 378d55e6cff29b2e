"""Net2Vec: concepts as learned combinations of a layer's filters (Fong and Vedaldi, CVPR 2018).

R. Fong and A. Vedaldi, "Net2Vec: Quantifying and Explaining how Concepts are Encoded by Filters in Deep Neural
Networks", CVPR 2018. Network dissection (Bau et al., CVPR 2017) asks which *single* filter segments a concept;
Net2Vec asks how well a *weighted combination* of all ``K`` filters of the layer does. Per concept ``c``:

    M_c(x) = sigmoid(sum_k w_ck A_k(x) + b_c)

where ``A_k(x)`` is filter ``k``'s activation map, bilinearly upsampled (``align_corners=False``) to the concept
masks' resolution. (Upsampling is linear, so the weighted sum is computed at the layer's resolution and only the
``C`` concept maps are upsampled: identical, ``K / C`` times cheaper.)

**Training** - class-balanced per-pixel binary cross-entropy against the concept masks ``L_c``:
``-(alpha_c L log M + (1 - alpha_c) (1 - L) log(1 - M))`` averaged over pixels and concepts, with ``alpha_c = 1 -
(fraction of pixels in concept c)`` (the paper's weighting, which keeps small concepts from collapsing to "never").
The fraction is the running one over all training pixels seen so far (counts summed over processes every step),
so the loss is the same on every process. Weights and biases start at zero (a deterministic start).

**Evaluation - set IoU** over the whole evaluation set (sums over all images, not a mean of per-image IoUs):

* Net2Vec: ``IoU_c = sum_x |(M_c(x) > 0.5) & L_c(x)| / sum_x |(M_c(x) > 0.5) | L_c(x)|``;
* best single filter (the dissection baseline): filter ``k``'s mask is ``upsample(A_k) > T_k`` with ``T_k`` the
  top-``quantile`` (0.005) value of filter ``k``'s activations, estimated with a
  :class:`~lightning_xai.interpretation.quantiles.QuantileSketch` over the training activations seen before the
  first (non-sanity-check) validation and merged over processes; the baseline IoU of ``c`` is
  ``max_k IoU(k, c)``. (Fong and Vedaldi report Net2Vec's combination beating the best single filter on most
  concepts.)

Logged: ``val_net2vec_miou`` and ``val_single_filter_miou`` (means over the concepts present in the evaluation
set), and - with ``train_probes`` - the image-level probes of :mod:`lightning_xai.models.probes`, trained in the same
loop on the spatially averaged maps (``val_probe_bacc``, ``val_probe_auroc``). Per-concept values:
:meth:`Net2Vec.result_rows`.

**Data.** Batches of an :class:`~lightning_xai.models.activations.ActivationDataModule` with ``spatial="maps"``
wrapping a :class:`ConceptMaskDataModule`: image batches ``(images, labels, concept_labels, concept_masks)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.checks import check_bool, check_float, check_int
from lightning_xai.data.concept_masks import ConceptMaskDataModule
from lightning_xai.distributed import default_reducer
from lightning_xai.evaluation.concepts import SetIoU, set_iou_counts
from lightning_xai.interpretation.quantiles import QuantileSketch
from lightning_xai.models.activations import as_activation_batch
from lightning_xai.models.base import XAIModule
from lightning_xai.models.probes import (
    ConceptProbeMetrics,
    LinearConceptProbes,
    _ProbeHead,
    balanced_bce,
    check_concept_names,
    check_source_features,
    concept_labels_of,
    sum_over_processes,
    world_size,
)

__all__ = ["ConceptMaskDataModule", "Net2Vec", "SetIoU", "set_iou_counts"]

# ---------------------------------------------------------------------------------------------------------- data


# ---------------------------------------------------------------------------------------------------------- metric


# ---------------------------------------------------------------------------------------------------------- module
class Net2Vec(_ProbeHead, XAIModule):
    """Net2Vec concept filters (and optionally image-level concept probes) on a frozen layer.

    Args:
        num_filters: ``K``, channels of the layer.
        num_concepts: ``C``, concepts of the masks.
        concept_names: their names (for results).
        train_probes: also train :class:`~lightning_xai.models.probes.LinearConceptProbes` on the spatially
            averaged maps in the same loop (their loss is added).
        quantile: top fraction for the single-filter thresholds (0.005).
        masks_at, concepts_at: positions of the concept masks and the image-level concept labels in the image
            batch (``ConceptMaskDataModule``: 3 and 2).
        optimizer, lr, weight_decay, scheduler, momentum: see :class:`~lightning_xai.models.base.XAIModule`.
    """

    def __init__(
        self,
        num_filters: int,
        num_concepts: int,
        concept_names: list[str] | None = None,
        train_probes: bool = True,
        quantile: float = 0.005,
        masks_at: int = 3,
        concepts_at: int = 2,
        optimizer: str = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum)
        owner = type(self).__name__
        self.num_filters = check_int("num_filters", num_filters, minimum=1, owner=owner)
        self.num_concepts = check_int("num_concepts", num_concepts, minimum=1, owner=owner)
        self.concept_names = check_concept_names(concept_names, num_concepts)
        self.train_probes = check_bool("train_probes", train_probes, owner=owner)
        # e.g. 0.005 for the top 0.5 %
        self.quantile = check_float("quantile", quantile, minimum=0, maximum=1, strict=True, owner=owner)
        self.masks_at = check_int("masks_at", masks_at, minimum=1, owner=owner)
        self.concepts_at = check_int("concepts_at", concepts_at, minimum=1, owner=owner)
        self.weight = nn.Parameter(torch.zeros(num_concepts, num_filters))
        self.bias = nn.Parameter(torch.zeros(num_concepts))
        self.probes = LinearConceptProbes(num_filters, num_concepts) if train_probes else None
        #: running pixel counts per concept, then all pixels (summed over processes)
        self.register_buffer("pixel_counts", torch.zeros(num_concepts + 1, dtype=torch.float64))
        self.register_buffer("concept_counts", torch.zeros(num_concepts + 1, dtype=torch.float64))
        #: single-filter thresholds ``T_k`` (valid once ``thresholds_ready``)
        self.register_buffer("thresholds", torch.zeros(num_filters))
        self.register_buffer("thresholds_ready", torch.zeros((), dtype=torch.bool))
        self._sketch: QuantileSketch | None = None
        self.val_iou = SetIoU(num_filters, num_concepts)
        self.test_iou = SetIoU(num_filters, num_concepts)
        self.val_probe_metrics = ConceptProbeMetrics(num_concepts) if train_probes else None
        self.test_probe_metrics = ConceptProbeMetrics(num_concepts) if train_probes else None
        #: per-concept results of the last evaluation epoch (see :meth:`result_rows`)
        self.results: dict[str, Tensor] = {}

    def setup(self, stage: str) -> None:
        check_source_features("Net2Vec (num_filters)", self._trainer, self.num_filters, maps=True)

    # ------------------------------------------------------------------------------------------ model
    def concept_logits(self, maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """``sum_k w_ck A_k + b_c``: ``[B, C, h, w]``, bilinearly upsampled to ``size`` when given."""
        self._check_maps(maps)
        logits = torch.einsum("bkhw,ck->bchw", maps, self.weight) + self.bias.view(1, -1, 1, 1)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def forward(self, maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Concept probability maps ``M_c = sigmoid(concept_logits)``."""
        return torch.sigmoid(self.concept_logits(maps, size))

    def concept_weights(self) -> Tensor:
        """The learned filter weights ``[C, K]`` (Fong and Vedaldi's concept embeddings)."""
        return self.weight.detach().clone()

    def _check_maps(self, maps: Tensor) -> None:
        if maps.ndim != 4 or maps.shape[1] != self.num_filters:
            raise ValueError(
                f"Net2Vec expects feature maps [B, {self.num_filters}, h, w] (num_filters = {self.num_filters}), got "
                f"shape {list(maps.shape)}; use an activation source with spatial='maps' on a layer with "
                f"{self.num_filters} channels"
            )

    def _batch(self, batch: Any) -> tuple[Tensor, Tensor, Any]:
        b = as_activation_batch(batch)
        self._check_maps(b.activations)
        if len(b.extras) < self.masks_at:
            raise ValueError(
                f"Net2Vec needs concept masks at position {self.masks_at} of the image batch; got "
                f"{1 + len(b.extras)} items (use ConceptMaskDataModule and on-the-fly activations)"
            )
        masks = b.extras[self.masks_at - 1]
        if not isinstance(masks, Tensor) or masks.ndim != 4 or masks.shape[1] != self.num_concepts:
            shape = list(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"concept masks must be [B, {self.num_concepts}, H, W], got {shape}")
        return b.activations, masks, b

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        maps, masks, b = self._batch(batch)
        size = (masks.shape[-2], masks.shape[-1])
        logits = self.concept_logits(maps, size)
        truth = masks != 0
        with torch.no_grad():
            pieces = [truth.sum(dim=(0, 2, 3)).double(), maps.new_tensor([truth[:, 0].numel()]).double()]
            targets = None
            if self.probes is not None:
                targets = concept_labels_of(b, self.concepts_at, self.num_concepts)
                pieces += [(targets > 0.5).sum(dim=0).double(), maps.new_tensor([targets.shape[0]]).double()]
            totals = sum_over_processes(torch.cat(pieces)).to(self.pixel_counts.device)
            c = self.num_concepts
            self.pixel_counts += totals[: c + 1]
        alpha = 1.0 - self.pixel_counts[:-1] / self.pixel_counts[-1].clamp_min(1)
        normalizer = float(totals[c]) * c / world_size()
        loss = balanced_bce(logits, truth, alpha.view(1, -1, 1, 1).to(logits.device), normalizer)
        n = maps.shape[0]
        self.log("train_net2vec_loss", loss, on_step=True, on_epoch=True, batch_size=n)
        if self.probes is not None:
            assert targets is not None
            with torch.no_grad():
                self.concept_counts += totals[c + 1 :]
            probe_loss = self._probe_loss(
                self.probes(self._probe_features(maps, self.num_filters)),
                targets,
                self.concept_counts,
                float(totals[-1]),
            )
            self.log("train_probe_loss", probe_loss, on_step=True, on_epoch=True, batch_size=n)
            loss = loss + probe_loss
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=n, prog_bar=True)
        if not bool(self.thresholds_ready):
            if self._sketch is None:
                self._sketch = QuantileSketch(self.num_filters, device=maps.device)
            self._sketch.update(maps.detach(), dim=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        if bool(self.thresholds_ready) or self.trainer.sanity_checking:
            return
        self._finalize_thresholds()

    def on_test_epoch_start(self) -> None:
        if not bool(self.thresholds_ready):
            self._finalize_thresholds()

    def _finalize_thresholds(self) -> None:
        """Merge the sketches of all processes and set ``T_k`` (every process must call it)."""
        reducer = default_reducer()
        local = self._sketch
        seen = 0.0 if local is None else float(local.total.sum())
        if float(reducer(torch.tensor([seen], dtype=torch.float64, device=self.device), "min")[0]) == 0.0:
            return  # some process has seen no training activation yet
        assert local is not None
        local.all_reduce(reducer)
        self.thresholds.copy_(local.quantile(1.0 - self.quantile).to(self.thresholds.device))
        self.thresholds_ready.fill_(True)
        self._sketch = None

    def set_thresholds(self, thresholds: Tensor) -> None:
        """Set the single-filter thresholds ``T_k`` explicitly (e.g. from a network dissection result)."""
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        if thresholds.shape[0] != self.num_filters:
            raise ValueError(f"got {thresholds.shape[0]} thresholds for {self.num_filters} filters")
        self.thresholds.copy_(thresholds.to(self.thresholds.device))
        self.thresholds_ready.fill_(True)
        self._sketch = None

    # ------------------------------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any, stage: str) -> None:
        maps, masks, b = self._batch(batch)
        size = (masks.shape[-2], masks.shape[-1])
        ready = bool(self.thresholds_ready)
        counts = set_iou_counts(
            self.concept_logits(maps, size), maps if ready else None, self.thresholds if ready else None, masks
        )
        getattr(self, f"{stage}_iou").update(counts)
        if self.probes is not None:
            targets = concept_labels_of(b, self.concepts_at, self.num_concepts)
            logits = self.probes(self._probe_features(maps, self.num_filters))
            getattr(self, f"{stage}_probe_metrics").update(logits, targets)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_eval(self, stage: str) -> None:
        iou = getattr(self, f"{stage}_iou")
        if not iou.update_called:
            return
        results = {k: v.cpu() for k, v in iou.compute().items()}
        iou.reset()
        present = results["concept_present"]
        values = {f"{stage}_net2vec_miou": results["net2vec_iou"][present].mean()}
        if "best_single_iou" in results:
            values[f"{stage}_single_filter_miou"] = results["best_single_iou"][present].mean()
        probe_metrics = getattr(self, f"{stage}_probe_metrics")
        if probe_metrics is not None and probe_metrics.update_called:
            probe = probe_metrics.compute()
            probe_metrics.reset()
            results.update({f"probe_{k}": v.cpu() for k, v in probe.items()})
            values.update({f"{stage}_probe_{k}": v.nanmean() for k, v in probe.items()})
        self.results = results
        self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def result_rows(self) -> list[list[Any]]:
        """Per concept: ``[concept, net2vec_iou, best_filter, best_single_iou, probe_bacc]`` of the last
        evaluation epoch (``-1`` / NaN where not computed)."""
        if not self.results:
            raise ValueError("no results yet: run a validation or test epoch first")
        r = self.results
        rows = []
        for i, name in enumerate(self.concept_names):
            best_filter = int(r["best_filter"][i]) if "best_filter" in r else -1
            single = float(r["best_single_iou"][i]) if "best_single_iou" in r else math.nan
            bacc = float(r["probe_bacc"][i]) if "probe_bacc" in r else math.nan
            rows.append([name, float(r["net2vec_iou"][i]), best_filter, single, bacc])
        return rows

    def cavs(self) -> Tensor:
        """Unit directions ``[C, K]`` of the image-level probes (requires ``train_probes``)."""
        if self.probes is None:
            raise ValueError("this Net2Vec was built with train_probes=False: it has no probes")
        return self.probes.cavs()
