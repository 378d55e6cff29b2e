"""Concept metrics (torchmetrics, DDP-reduced): how well activations, probes or filters detect concepts.

* :func:`auc_matrix` / :class:`ConceptAUROC` - exact ROC AUC (Mann-Whitney with average ranks for ties) of score
  columns as detectors of binary concept labels; the concept bottleneck's ``concept_auc`` and concept whitening's
  ``concept_purity`` (Chen et al., 2020).
* :class:`ConceptProbeMetrics` - balanced accuracy and ROC AUC of linear concept probes (Alain and Bengio, 2017).
* :func:`set_iou_counts` / :class:`SetIoU` - dataset-level set IoU of Net2Vec concept masks and of single filters
  (Fong and Vedaldi, CVPR 2018).

Pure torch and torchmetrics: no Lightning import. The models in :mod:`lightning_xai.models` use them and re-export
them under their former paths.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["CHUNK_ELEMENTS", "ConceptAUROC", "ConceptProbeMetrics", "SetIoU", "auc_matrix", "set_iou_counts"]


def auc_matrix(scores: Tensor, labels: Tensor) -> Tensor:
    """ROC AUC ``[C, K]`` of every score column ``scores [N, C]`` as a detector of every label ``labels [N, K]``.

    The Mann-Whitney statistic with average ranks for ties (so a constant score has AUC 0.5); NaN for a label
    column without positives or without negatives.
    """
    if scores.ndim != 2 or labels.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores [N, C] and labels [N, K] must share N, got {tuple(scores.shape)} / {tuple(labels.shape)}"
        )
    s = scores.double().mT.contiguous()  # [C, N]
    ordered = s.sort(dim=1).values
    low = torch.searchsorted(ordered, s, right=False)
    high = torch.searchsorted(ordered, s, right=True)
    ranks = (low + high + 1).double() / 2  # 1-based average rank of every value in its column
    positive = labels.double()
    n_pos = positive.sum(dim=0)  # [K]
    n_neg = labels.shape[0] - n_pos
    rank_sums = ranks @ positive  # [C, K]
    auc = (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, math.nan)).float()


class ConceptAUROC(Metric):
    """Per-column ROC AUC ``[k]``: score column ``j`` as a detector of binary label column ``j``.

    The exact AUC of :func:`auc_matrix` (ties count one half; NaN for a column without positives or without
    negatives, instead of torchmetrics' 0) on raw scores (logits or activations, never squashed into ties by a
    sigmoid). Scores and labels are kept (``"cat"`` states) and gathered across DDP ranks by torchmetrics.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # flattened rows (1-D "cat" states, so that a DDP rank without data synchronises an empty placeholder of
        # the same number of dimensions) and the number of columns ("max": known on every rank after a sync)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("num_columns", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        if scores.shape != labels.shape or scores.ndim != 2:
            raise ValueError(
                f"scores and labels must both be [N, k], got {tuple(scores.shape)} / {tuple(labels.shape)}"
            )
        if int(self.num_columns) not in (0, scores.shape[1]):
            raise ValueError(f"ConceptAUROC: got {scores.shape[1]} columns after {int(self.num_columns)} before")
        self.num_columns.fill_(scores.shape[1])
        self.scores.append(scores.detach().float().reshape(-1))
        self.labels.append(labels.detach().float().reshape(-1))

    def compute(self) -> Tensor:
        """Per-column AUC ``[k]`` (``Tensor[0]`` before any update on any rank)."""
        k = int(self.num_columns)
        if k == 0 or not len(self.scores):
            return torch.zeros(0, device=self.num_columns.device)
        scores, labels = dim_zero_cat(self.scores).view(-1, k), dim_zero_cat(self.labels).view(-1, k)
        return auc_matrix(scores, labels).diagonal()



class ConceptProbeMetrics(Metric):
    """Per-concept confusion counts at ``sigmoid(logit) > 0.5`` -> balanced accuracy; exact ROC AUC."""

    full_state_update = False

    def __init__(self, num_concepts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fn", "tn", "fp"):
            self.add_state(name, torch.zeros(num_concepts, dtype=torch.float64), dist_reduce_fx="sum")
        # the exact AUC of ConceptAUROC (flattened "cat" states: computes on a DDP rank without data, unlike
        # MultilabelAUROC's [N, C] lists); it synchronises like its parent
        self.auroc = ConceptAUROC(**kwargs)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        pred = logits.detach() > 0
        truth = targets.detach() > 0.5
        self.tp += (pred & truth).sum(dim=0)
        self.fn += (~pred & truth).sum(dim=0)
        self.tn += (~pred & ~truth).sum(dim=0)
        self.fp += (pred & ~truth).sum(dim=0)
        self.auroc.update(logits.detach().float(), truth.float())

    def compute(self) -> dict[str, Tensor]:
        positives, negatives = self.tp + self.fn, self.tn + self.fp
        valid = (positives > 0) & (negatives > 0)
        bacc = 0.5 * (self.tp / positives.clamp_min(1) + self.tn / negatives.clamp_min(1))
        bacc = torch.where(valid, bacc, torch.full_like(bacc, float("nan")))
        auroc = self.auroc.compute().double().to(bacc.device)
        if auroc.numel() == 0:  # no sample on any rank
            auroc = torch.full_like(bacc, float("nan"))
        auroc = torch.where(valid, auroc, torch.full_like(auroc, float("nan")))
        return {"bacc": bacc, "auroc": auroc}

    def reset(self) -> None:
        super().reset()
        self.auroc.reset()



CHUNK_ELEMENTS = 2**22


def set_iou_counts(
    concept_logits: Tensor, filter_maps: Tensor | None, thresholds: Tensor | None, masks: Tensor
) -> dict[str, Tensor]:
    """Set-IoU counts of one batch (sums over its pixels), float64:

    ``net2vec_inter [C]``, ``net2vec_union [C]`` of ``concept_logits > 0`` (``[B, C, H, W]``, at mask resolution)
    against ``masks``; with ``filter_maps`` (``[B, K, h, w]``) and ``thresholds [K]`` also ``single_inter [K, C]``,
    ``single_area [K]`` of ``upsample(filter_maps) > thresholds`` (bilinear, ``align_corners=False``), and
    ``concept_area [C]``.
    """
    truth = masks.to(concept_logits.device) != 0
    pred = concept_logits > 0
    counts = {
        "net2vec_inter": (pred & truth).sum(dim=(0, 2, 3)).double(),
        "net2vec_union": (pred | truth).sum(dim=(0, 2, 3)).double(),
        "concept_area": truth.sum(dim=(0, 2, 3)).double(),
    }
    if filter_maps is not None and thresholds is not None:
        size = tuple(masks.shape[-2:])
        batch, units = filter_maps.shape[:2]
        per_image = units * size[0] * size[1]
        step = max(1, CHUNK_ELEMENTS // per_image)
        inter = torch.zeros(units, truth.shape[1], dtype=torch.float64, device=filter_maps.device)
        area = torch.zeros(units, dtype=torch.float64, device=filter_maps.device)
        t = thresholds.to(filter_maps.device, torch.float32).view(1, -1, 1, 1)
        for start in range(0, batch, step):
            chunk = slice(start, start + step)
            up = F.interpolate(filter_maps[chunk].float(), size=size, mode="bilinear", align_corners=False)
            fires = (up > t).flatten(2).float()  # [b, K, HW]
            concepts = truth[chunk].flatten(2).float().to(fires.device)  # [b, C, HW]
            area += fires.sum(dim=(0, 2)).double()
            inter += torch.bmm(fires, concepts.transpose(1, 2)).sum(dim=0).double()
        counts["single_inter"] = inter
        counts["single_area"] = area
    return counts


class SetIoU(Metric):
    """Dataset-level IoU of Net2Vec's concept masks and of every single filter (see the module docstring)."""

    full_state_update = False

    def __init__(self, num_filters: int, num_concepts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c, k = num_concepts, num_filters
        self.add_state("net2vec_inter", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("net2vec_union", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("concept_area", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("single_inter", torch.zeros(k, c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("single_area", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("with_single", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, counts: dict[str, Tensor]) -> None:
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value.to(self.device))
        if "single_inter" in counts:
            self.with_single += 1

    def compute(self) -> dict[str, Tensor]:
        """``net2vec_iou [C]``, ``concept_present [C]`` (bool) and, when single-filter counts were given on
        every update, ``single_iou [K, C]``, ``best_filter [C]`` and ``best_single_iou [C]``."""
        out = {
            "net2vec_iou": self.net2vec_inter / self.net2vec_union.clamp_min(1),
            "concept_present": self.concept_area > 0,
        }
        if float(self.with_single) > 0:
            union = self.single_area[:, None] + self.concept_area[None, :] - self.single_inter
            single = self.single_inter / union.clamp_min(1)
            best, best_filter = single.max(dim=0)
            out.update(single_iou=single, best_filter=best_filter, best_single_iou=best)
        return out

