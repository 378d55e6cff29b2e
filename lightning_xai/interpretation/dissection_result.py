"""The outcome of network dissection for one layer: per-unit IoU with every concept, the best concept per unit
and category, detectors and summary tables (Bau, Zhou, Khosla, Oliva & Torralba, "Network Dissection:
Quantifying Interpretability of Deep Visual Representations", CVPR 2017). Computed by
:class:`~lightning_xai.interpretation.dissection.NetworkDissection`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TABLE_COLUMNS", "DissectionResult", "categories_from_names", "concept_categories"]

#: Columns of :meth:`DissectionResult.rows`.
TABLE_COLUMNS = ("unit", "concept", "category", "iou", "detector")



def categories_from_names(concept_names: Sequence[str]) -> dict[str, list[int]]:
    """Group concepts named ``"category:value"`` by category; a name without ``":"`` is in category
    ``"concept"``. Categories are in order of first appearance."""
    categories: dict[str, list[int]] = {}
    for i, name in enumerate(concept_names):
        category = name.split(":", 1)[0] if ":" in name else "concept"
        categories.setdefault(category, []).append(i)
    return categories


def concept_categories(concept_names: Sequence[str], categories: Mapping[str, Sequence[int]] | None) -> list[str]:
    """The category of every concept; every concept must belong to exactly one category."""
    if categories is None:
        categories = categories_from_names(concept_names)
    num = len(concept_names)
    owner: list[str | None] = [None] * num
    for category, members in categories.items():
        for i in members:
            if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) < num:
                raise ValueError(f"category {category!r} lists concept index {i!r}; valid indices are 0..{num - 1}")
            if owner[int(i)] is not None:
                raise ValueError(
                    f"concept {concept_names[int(i)]!r} is in two categories: {owner[int(i)]!r}, {category!r}"
                )
            owner[int(i)] = str(category)
    missing = [concept_names[i] for i, o in enumerate(owner) if o is None]
    if missing:
        raise ValueError(f"every concept needs a category; these have none: {missing[:10]}")
    return [str(o) for o in owner]


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class DissectionResult:
    """Everything network dissection measured for one layer (identical on every process).

    Counts are in pixels of the concept masks, summed over the probe set.
    """

    layer: str
    concept_names: list[str]
    #: category of each concept
    concept_categories: list[str]
    quantile: float
    iou_threshold: float
    #: ``T_k``, ``Tensor[U]``
    thresholds: Tensor
    #: certified bound on the rank error of each ``T_k`` (a fraction of the unit's values), ``Tensor[U]``
    threshold_rank_error: Tensor
    #: ``sum_x |M_k & L_c|``, ``LongTensor[U, C]``
    intersection: Tensor
    #: ``sum_x |M_k|``, ``LongTensor[U]``
    unit_area: Tensor
    #: ``sum_x |L_c|``, ``LongTensor[C]``
    concept_area: Tensor
    num_images: int
    #: dataset indices of each unit's top-activating images (by the maximum of its map), best first; -1 = none
    top_indices: Tensor
    #: those maxima, ``Tensor[U, top_k]``
    top_scores: Tensor

    @property
    def num_units(self) -> int:
        return int(self.thresholds.shape[0])

    @property
    def categories(self) -> dict[str, list[int]]:
        """category -> concept indices, in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, category in enumerate(self.concept_categories):
            out.setdefault(category, []).append(i)
        return out

    @property
    def iou(self) -> Tensor:
        """``IoU(k, c)``, ``DoubleTensor[U, C]`` (0 where the union is empty)."""
        union = self.unit_area[:, None] + self.concept_area[None, :] - self.intersection
        return torch.where(union > 0, self.intersection.double() / union.clamp_min(1).double(), 0.0)

    def best(self, category: str | None = None) -> tuple[Tensor, Tensor]:
        """Each unit's best concept (overall, or within ``category``): ``(concept index [U], IoU [U])``."""
        iou = self.iou
        if category is None:
            columns = torch.arange(len(self.concept_names))
        else:
            if category not in self.categories:
                raise ValueError(f"unknown category {category!r}; valid categories: {list(self.categories)}")
            columns = torch.tensor(self.categories[category])
        values, where = iou[:, columns].max(dim=1)
        return columns[where], values

    def best_per_category(self) -> dict[str, tuple[Tensor, Tensor]]:
        """category -> each unit's best concept in it and its IoU."""
        return {category: self.best(category) for category in self.categories}

    @property
    def detectors(self) -> Tensor:
        """``BoolTensor[U]``: the unit's best IoU exceeds ``iou_threshold``."""
        return self.best()[1] > self.iou_threshold

    @property
    def num_detectors(self) -> int:
        return int(self.detectors.sum())

    def units_per_concept(self) -> dict[str, int]:
        """Histogram: concept -> number of detector units labelled with it (concepts without detectors left out),
        most frequent first."""
        concept, _ = self.best()
        counts: dict[str, int] = {}
        for k in torch.nonzero(self.detectors).flatten().tolist():
            name = self.concept_names[int(concept[k])]
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def unique_detectors_per_category(self) -> dict[str, int]:
        """category -> number of distinct concepts of the category that label at least one detector unit."""
        concept, _ = self.best()
        detected = {int(concept[k]) for k in torch.nonzero(self.detectors).flatten().tolist()}
        return {cat: sum(1 for c in members if c in detected) for cat, members in self.categories.items()}

    def detector_units_per_category(self) -> dict[str, int]:
        """category -> number of detector units whose label belongs to the category."""
        concept, _ = self.best()
        counts = dict.fromkeys(self.categories, 0)
        for k in torch.nonzero(self.detectors).flatten().tolist():
            counts[self.concept_categories[int(concept[k])]] += 1
        return counts

    def rows(self, only_detectors: bool = False) -> list[list[Any]]:
        """One row per unit, ``[unit, concept, category, iou, detector]`` (see :data:`TABLE_COLUMNS`), sorted by
        IoU, best first."""
        concept, iou = self.best()
        detectors = self.detectors
        order = sorted(range(self.num_units), key=lambda k: (-float(iou[k]), k))
        rows = []
        for k in order:
            if only_detectors and not bool(detectors[k]):
                continue
            c = int(concept[k])
            rows.append([k, self.concept_names[c], self.concept_categories[c], float(iou[k]), bool(detectors[k])])
        return rows

    def summary(self) -> str:
        unique = ", ".join(f"{cat}: {n}" for cat, n in self.unique_detectors_per_category().items())
        return (
            f"layer {self.layer!r}: {self.num_detectors}/{self.num_units} detector units (IoU > "
            f"{self.iou_threshold}) over {self.num_images} images; unique detectors per category: {unique}"
        )
