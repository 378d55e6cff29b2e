"""Concept interventions of a concept bottleneck model (Koh et al., ICML 2020): replace predicted concepts by true
ones and measure the task accuracy, per group of concepts, in random or uncertainty order.

:class:`InterventionMixin` holds :meth:`~InterventionMixin.intervene`, the logit bottleneck's percentile
calibration and :meth:`~InterventionMixin.intervention_curve`; :class:`InterventionCurve` and
:func:`log_intervention_curve` report the result. Formerly part of ``lightning_xai.models.concept_bottleneck``,
which re-exports every public name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.checks import check_choice, check_int
from lightning_xai.distributed import gather_rows, sum_over_ranks
from lightning_xai.namespace import pl
from lightning_xai.viz.logging import log_line_plot

__all__ = [
    "INTERVENTION_ORDERS",
    "LOGIT_PERCENTILES",
    "GroupSpec",
    "InterventionCurve",
    "InterventionMixin",
    "column_quantiles",
    "log_intervention_curve",
]


INTERVENTION_ORDERS = ("random", "uncertainty")


LOGIT_PERCENTILES = (0.05, 0.95)


GroupSpec = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]


def column_quantiles(values: Tensor, q: Sequence[float]) -> Tensor:
    """Quantiles ``[len(q), k]`` of each column of ``values [n, k]`` (linear interpolation, as ``numpy.quantile``).

    Implemented by sorting, so unlike ``torch.quantile`` it has no input-size limit.
    """
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"values must be a non-empty [n, k] tensor, got shape {tuple(values.shape)}")
    ordered = values.float().sort(dim=0).values
    n = ordered.shape[0]
    out = []
    for level in q:
        position = level * (n - 1)
        lo, hi = math.floor(position), math.ceil(position)
        frac = position - lo
        out.append(ordered[lo] * (1 - frac) + ordered[hi] * frac)
    return torch.stack(out)


def _binary_entropy(probabilities: Tensor) -> Tensor:
    p = probabilities.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@dataclass
class InterventionCurve:
    """Task accuracy against the number of intervened concept groups.

    Attributes:
        num_groups: ``[G + 1]`` - 0, 1, ..., G intervened groups.
        accuracy: ``[G + 1]`` - the mean accuracy over the orders (the curve to report).
        per_order: ``[n_orders, G + 1]`` - the accuracy of each order (one row for ``"uncertainty"``).
        orders: ``[n_orders, G]`` - the group indices of each random order, first intervened first (``None`` for
            ``"uncertainty"``, whose order differs per image).
        group_names: the name of each group.
        order: ``"random"`` or ``"uncertainty"``.
    """

    num_groups: Tensor
    accuracy: Tensor
    per_order: Tensor
    orders: Tensor | None
    group_names: list[str]
    order: str


def _positions(orders: Tensor) -> Tensor:
    """``positions[r, g]``: where group ``g`` comes in ``orders[r]`` (a permutation of the groups per row)."""
    positions = torch.empty_like(orders)
    positions.scatter_(1, orders, torch.arange(orders.shape[1], device=orders.device).expand_as(orders).contiguous())
    return positions


def _intervention_masks(positions: Tensor, membership: Tensor) -> Tensor:
    """``masks [R, G+1, k]``: concept ``j`` is intervened on after the first ``i`` groups of row ``r``'s order."""
    steps = torch.arange(membership.shape[0] + 1, device=positions.device)
    chosen = positions[:, None, :] < steps[None, :, None]  # [R, G+1, G]
    return (chosen[..., None] & membership[None, None]).any(dim=2)


def _loader_from(data: Any, split: str) -> Iterable[Any]:
    """The ``split`` loader of a datamodule (set up for it), or ``data`` itself (a DataLoader or any iterable)."""
    if isinstance(data, pl.LightningDataModule):
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; valid splits: ['train', 'val', 'test']")
        data.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return getattr(data, f"{split}_dataloader")()
    if isinstance(data, Iterable):
        return data
    raise TypeError(f"data must be a DataLoader, an iterable of batches or a LightningDataModule, got {type(data)}")


def _dataset_groups(data: Any, split: str) -> dict[str, list[int]] | None:
    """The ``categories`` of the dataset behind ``data`` (a datamodule or a loader), if it has them."""
    dataset = None
    if isinstance(data, pl.LightningDataModule) and callable(getattr(data, "dataset", None)):
        dataset = data.dataset(split)
    elif hasattr(data, "dataset"):
        dataset = data.dataset
    categories = getattr(dataset, "categories", None)
    return dict(categories) if isinstance(categories, Mapping) else None


def log_intervention_curve(
    loggers: Sequence[object] | None,
    curve: InterventionCurve,
    *,
    step: int,
    key: str = "cbm/intervention_curve",
    fallback_dir: str | None = None,
) -> list[str]:
    """Log an :class:`InterventionCurve` (mean accuracy vs intervened groups) as a line plot; rank zero only.

    W&B gets a ``wandb.plot.line`` chart, other loggers a CSV (see :func:`lightning_xai.viz.logging.log_line_plot`).
    """
    return log_line_plot(
        loggers,
        key,
        curve.num_groups.float(),
        curve.accuracy,
        step=step,
        title=f"task accuracy vs intervened concept groups ({curve.order} order)",
        x_label="intervened groups",
        y_label="task accuracy",
        fallback_dir=fallback_dir,
    )



class InterventionMixin:
    """Interventions of :class:`~lightning_xai.models.concept_bottleneck.ConceptBottleneckModel` (the model supplies
    ``concept_logits``, ``bottleneck_values``, ``true_concept_values``, ``head`` and its buffers)."""

    def intervene(self, concept_logits: Tensor, concept_labels: Tensor, mask: Tensor) -> Tensor:
        """Task logits after replacing the concepts selected by ``mask`` with their true values.

        Args:
            concept_logits: predicted concept logits ``[B, k]``.
            concept_labels: true concepts ``[B, k]`` (0/1).
            mask: bool ``[k]`` (the same concepts for every image) or ``[B, k]``: which concepts to replace.
        """
        if mask.dtype != torch.bool or mask.shape[-1] != self.num_concepts or mask.ndim not in (1, 2):
            raise ValueError(
                f"mask must be a bool tensor [k] or [B, k] with k={self.num_concepts}, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        values = torch.where(
            mask.to(concept_logits.device),
            self.true_concept_values(concept_labels).to(concept_logits),
            self.bottleneck_values(concept_logits),
        )
        return self.head(values)

    def calibrate_interventions(self, data: Any, split: str = "train", max_batches: int | None = None) -> Tensor:
        """Recompute the logit-bottleneck intervention values from one eval-mode pass over the training data.

        ``data`` is a DataLoader (or any iterable of batches the model's ``batch_reader`` reads) or a datamodule
        (its ``split`` loader is used). Sets and returns the ``[2, k]`` 5th/95th percentiles of the concept logits.
        Restores the model's modes afterwards; DDP ranks' logits are gathered when a process group is initialised.
        """
        rows = []
        with model_state_guard(self), torch.no_grad():
            for i, batch in enumerate(_loader_from(data, split)):
                if max_batches is not None and i >= max_batches:
                    break
                rows.append(self.concept_logits(self.batch_reader.inputs(batch).to(self.device)).float())
        if not rows:
            raise ValueError("calibrate_interventions got no batches")
        return self._set_percentiles(torch.cat(rows))

    def _set_percentiles(self, rows: Tensor) -> Tensor:
        quantiles = column_quantiles(gather_rows(rows.detach().float()), LOGIT_PERCENTILES)
        self.concept_low.copy_(quantiles[0])
        self.concept_high.copy_(quantiles[1])
        self.intervention_calibrated.fill_(True)
        return quantiles

    def intervention_curve(
        self,
        data: Any,
        groups: GroupSpec | None = None,
        n_orders: int = 10,
        order: str = "random",
        seed: int = 0,
        split: str = "test",
    ) -> InterventionCurve:
        """Task accuracy after intervening on 0, 1, ..., G concept groups (mean over random orders).

        Args:
            data: a DataLoader (or iterable) of batches with images, labels and concepts, or a datamodule
                (its ``split`` loader is used).
            groups: the concept groups: a mapping ``name -> concept indices`` or a list of index lists. ``None``:
                the ``categories`` of the dataset behind ``data`` when it has them (e.g. ``ConceptScenes``), else
                every concept alone.
            n_orders: number of random orders averaged (``"random"``); ignored by ``"uncertainty"``.
            order: ``"random"``: one random permutation of the groups per order, the same for every image, and
                the curve is the mean over orders (the expected effect, not the best order). ``"uncertainty"``:
                per image, groups sorted by decreasing mean binary entropy of their predicted concepts.
            seed: seed of the random orders.
            split: the loader of a datamodule to use.

        Runs in eval mode under ``no_grad`` (modes restored afterwards). Under DDP (process group initialised)
        the correct/total counts are summed over ranks, so sharded loaders give the global curve.
        """
        check_choice("order", order, INTERVENTION_ORDERS, owner="ConceptBottleneckModel")
        check_int("n_orders", n_orders, minimum=1, owner="ConceptBottleneckModel")
        names, membership = self._resolve_groups(groups if groups is not None else _dataset_groups(data, split))
        num_groups = membership.shape[0]
        steps = torch.arange(num_groups + 1)
        membership = membership.to(self.device)
        if order == "random":
            generator = torch.Generator().manual_seed(seed)
            orders: Tensor | None = torch.stack(
                [torch.randperm(num_groups, generator=generator) for _ in range(n_orders)]
            )
            # masks [O, G+1, 1, k]: the concepts intervened on after the first i groups of order o
            masks = _intervention_masks(_positions(orders.to(self.device)), membership)[:, :, None, :]
        else:
            orders = None
        correct = torch.zeros(n_orders if order == "random" else 1, num_groups + 1, dtype=torch.float64)
        total = 0
        with model_state_guard(self), torch.no_grad():
            for batch in _loader_from(data, split):
                x, y, c = self._unpack(batch, need_concepts=True)
                x, y, c = x.to(self.device), y.to(self.device), c.to(self.device)
                logits = self.concept_logits(x)
                base = self.bottleneck_values(logits)
                true = self.true_concept_values(c).to(base)
                if order == "uncertainty":
                    entropy = _binary_entropy(torch.sigmoid(logits.float()))  # [B, k]
                    member = membership.float()
                    uncertainty = entropy @ member.T / member.sum(dim=1)  # [B, G]: mean entropy of each group
                    most_uncertain_first = uncertainty.argsort(dim=1, descending=True, stable=True)
                    masks = _intervention_masks(_positions(most_uncertain_first), membership).transpose(0, 1)[None]
                values = torch.where(masks, true, base)  # [rows, G+1, B, k]
                predictions = self.head(values).argmax(dim=-1)  # [rows, G+1, B]
                correct += (predictions == y).sum(dim=-1).double().cpu()
                total += y.shape[0]
        counts = torch.cat([correct.flatten(), torch.tensor([float(total)], dtype=torch.float64)])
        counts = sum_over_ranks(counts.to(self.device)).cpu()
        correct, total = counts[:-1].view_as(correct), float(counts[-1])
        if total == 0:
            raise ValueError("intervention_curve got no data")
        per_order = (correct / total).float()
        return InterventionCurve(
            num_groups=steps,
            accuracy=per_order.mean(dim=0),
            per_order=per_order,
            orders=orders,
            group_names=names,
            order=order,
        )

    def _resolve_groups(self, groups: GroupSpec | None) -> tuple[list[str], Tensor]:
        """``(names, membership bool [G, k])`` of a group specification (``None``: each concept alone)."""
        if groups is None:
            items = [(name, [j]) for j, name in enumerate(self.concept_names)]
        elif isinstance(groups, Mapping):
            items = [(str(name), list(idx)) for name, idx in groups.items()]
        elif isinstance(groups, Sequence) and not isinstance(groups, str):
            items = [(f"group{g}", list(idx)) for g, idx in enumerate(groups)]
        else:
            raise TypeError(
                f"groups must be a mapping name -> concept indices or a list of index lists, got {groups!r}"
            )
        if not items:
            raise ValueError("groups must hold at least one group")
        membership = torch.zeros(len(items), self.num_concepts, dtype=torch.bool)
        for g, (name, indices) in enumerate(items):
            if not indices:
                raise ValueError(f"concept group {name!r} is empty")
            for j in indices:
                if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < self.num_concepts:
                    raise ValueError(
                        f"concept group {name!r} holds {j!r}, not a concept index in [0, {self.num_concepts})"
                    )
                membership[g, j] = True
        return [name for name, _ in items], membership
