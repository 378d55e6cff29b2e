"""Compositional explanations of units: logical formulas over concepts (Mu & Andreas, NeurIPS 2020).

A unit that fires on "water" and "river" but not on "blue" is described better by ``(water OR river) AND NOT
blue`` than by any single concept. Mu & Andreas ("Compositional Explanations of Neurons", NeurIPS 2020) search
such formulas with a beam search that maximises the intersection over union between the unit's binarised
activation mask and the formula's mask, accumulated over the probe set like in network dissection.

Formulas here are *left-deep*: a first concept, then up to ``max_length - 1`` steps ``op concept`` with
``op`` in ``AND``, ``OR``, ``AND NOT``, read left to right (``(a OR b) AND NOT c``); the length is the number of
concepts. A step never repeats a concept already in the formula.

The search streams over the data once per added concept and holds only counts: for each beam formula ``F`` of a
unit with mask ``M`` it accumulates ``|F|``, ``|F & M|`` and, for every concept ``c``, ``|F & c|`` and
``|F & c & M|``. Those give the IoU of all three extensions exactly (inclusion-exclusion, e.g.
``|(F OR c) & M| = |F & M| + |c & M| - |F & c & M|``). Counts are summed over processes with a
:class:`~lightning_xai.distributed.Reducer`, so the result under DDP equals the single-process one.
Ties are broken towards shorter formulas, then by concept order, so the search is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_xai.distributed import Reducer, default_reducer

__all__ = ["OPERATORS", "CompositionalExplanation", "Formula", "compositional_search"]

#: The binary operators of a formula step.
OPERATORS = ("AND", "OR", "AND NOT")


@dataclass(frozen=True)
class Formula:
    """A left-deep formula ``atoms[0] ops[0] atoms[1] ops[1] atoms[2] ...`` over concept indices."""

    atoms: tuple[int, ...]
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.atoms or len(self.ops) != len(self.atoms) - 1:
            raise ValueError(f"a formula needs n >= 1 concepts and n - 1 operators, got {self.atoms} and {self.ops}")
        bad = [op for op in self.ops if op not in OPERATORS]
        if bad:
            raise ValueError(f"unknown operator(s) {bad}; valid operators: {list(OPERATORS)}")

    @property
    def length(self) -> int:
        """Number of concepts in the formula."""
        return len(self.atoms)

    def extend(self, op: str, atom: int) -> Formula:
        """``(self) op atom``, in canonical form (see :meth:`canonical`)."""
        return Formula((*self.atoms, atom), (*self.ops, op)).canonical()

    def canonical(self) -> Formula:
        """The same formula with commutative operands in concept order, so that ``b OR a`` and ``a OR b`` (and
        ``(c AND a) AND b`` and ``(a AND b) AND c``, ``(a AND NOT c) AND NOT b`` and ``(a AND NOT b) AND NOT c``)
        are one formula, not two beam entries."""
        atoms = list(self.atoms)
        if self.ops and len(set(self.ops)) == 1 and self.ops[0] in ("AND", "OR"):
            atoms.sort()
        elif self.ops and set(self.ops) == {"AND NOT"}:  # a AND NOT b AND NOT c == a AND NOT c AND NOT b
            atoms[1:] = sorted(atoms[1:])
        elif self.ops and self.ops[0] in ("AND", "OR"):
            atoms[:2] = sorted(atoms[:2])
        return Formula(tuple(atoms), self.ops)

    def evaluate(self, concept_masks: Tensor, dim: int = 1) -> Tensor:
        """The formula's mask: ``concept_masks`` (bool) with the concepts along ``dim``; that dimension is removed."""
        masks = concept_masks if concept_masks.dtype == torch.bool else concept_masks != 0
        result = masks.select(dim, self.atoms[0])
        for op, atom in zip(self.ops, self.atoms[1:]):
            other = masks.select(dim, atom)
            if op == "AND":
                result = result & other
            elif op == "OR":
                result = result | other
            else:
                result = result & ~other
        return result

    def to_string(self, names: Sequence[str] | None = None) -> str:
        """Readable form, e.g. ``"(water OR river) AND NOT blue"`` (concept indices when ``names`` is None)."""

        def name(i: int) -> str:
            return str(names[i]) if names is not None else str(i)

        text = name(self.atoms[0])
        for k, (op, atom) in enumerate(zip(self.ops, self.atoms[1:])):
            if k > 0:
                text = f"({text})"
            text = f"{text} {op} {name(atom)}"
        return text

    def _sort_key(self) -> tuple:
        return (self.length, self.atoms, tuple(OPERATORS.index(op) for op in self.ops))


@dataclass
class CompositionalExplanation:
    """The best formula found for one unit, and the final beam (best first) as ``(formula string, IoU)`` with
    the formulas themselves in ``beam_formulas``."""

    unit: int
    formula: Formula
    label: str
    iou: float
    beam: list[tuple[str, float]] = field(default_factory=list)
    beam_formulas: list[Formula] = field(default_factory=list)


def _iou(intersection: Tensor, area: Tensor, unit_area: Tensor) -> Tensor:
    union = area + unit_area - intersection
    return torch.where(union > 0, intersection.double() / union.clamp_min(1).double(), torch.zeros_like(union).double())


def _check_batch(unit_masks: Tensor, concept_masks: Tensor, num_units: int, num_concepts: int) -> tuple[Tensor, Tensor]:
    for name, t in (("unit masks", unit_masks), ("concept masks", concept_masks)):
        if not isinstance(t, Tensor) or t.ndim < 2:
            raise ValueError(f"{name} must be tensors [B, N, ...], got {getattr(t, 'shape', type(t).__name__)}")
    if unit_masks.shape[1] != num_units or concept_masks.shape[1] != num_concepts:
        raise ValueError(
            f"expected unit masks [B, {num_units}, ...] and concept masks [B, {num_concepts}, ...], got "
            f"{list(unit_masks.shape)} and {list(concept_masks.shape)}"
        )
    if unit_masks.shape[0] != concept_masks.shape[0] or unit_masks.shape[2:] != concept_masks.shape[2:]:
        raise ValueError(
            f"unit and concept masks must share batch and spatial sizes, got {list(unit_masks.shape)} and "
            f"{list(concept_masks.shape)}"
        )
    units = (unit_masks != 0).flatten(2)
    concepts = (concept_masks != 0).to(units.device).flatten(2)
    return units, concepts


def _count_pairs(
    batches: Iterable[tuple[Tensor, Tensor]],
    pairs: list[tuple[int, Formula]],
    num_units: int,
    num_concepts: int,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass: for each ``(unit, formula)`` pair, ``|F|``, ``|F & M|``, ``|F & c|`` and ``|F & c & M|``."""
    f_area = torch.zeros(len(pairs), dtype=torch.int64)
    fm_area = torch.zeros(len(pairs), dtype=torch.int64)
    f_and_c = torch.zeros(len(pairs), num_concepts, dtype=torch.int64)
    fm_and_c = torch.zeros(len(pairs), num_concepts, dtype=torch.int64)
    for unit_masks, concept_masks in batches:
        units, concepts = _check_batch(unit_masks, concept_masks, num_units, num_concepts)
        positions = concepts.shape[-1]
        dtype = torch.float32 if positions < 2**24 else torch.float64
        concepts_t = concepts.to(dtype).transpose(1, 2)  # [B, HW, C]
        cache: dict[Formula, Tensor] = {}
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            f_masks = []
            for _unit, formula in part:
                if formula not in cache:
                    cache[formula] = formula.evaluate(concepts, dim=1)
                f_masks.append(cache[formula])
            f = torch.stack(f_masks, dim=1)  # [B, P, HW]
            fm = f & units[:, [u for u, _ in part]]
            sl = slice(start, start + len(part))
            f_area[sl] += f.sum(dim=(0, 2)).cpu()
            fm_area[sl] += fm.sum(dim=(0, 2)).cpu()
            f_and_c[sl] += torch.bmm(f.to(dtype), concepts_t).to(torch.int64).sum(dim=0).cpu()
            fm_and_c[sl] += torch.bmm(fm.to(dtype), concepts_t).to(torch.int64).sum(dim=0).cpu()
    return f_area, fm_area, f_and_c, fm_and_c


def _count_singles(
    batches: Iterable[tuple[Tensor, Tensor]], num_units: int, num_concepts: int
) -> tuple[Tensor, Tensor, Tensor]:
    intersection = torch.zeros(num_units, num_concepts, dtype=torch.int64)
    unit_area = torch.zeros(num_units, dtype=torch.int64)
    concept_area = torch.zeros(num_concepts, dtype=torch.int64)
    for unit_masks, concept_masks in batches:
        units, concepts = _check_batch(unit_masks, concept_masks, num_units, num_concepts)
        dtype = torch.float32 if concepts.shape[-1] < 2**24 else torch.float64
        intersection += torch.bmm(units.to(dtype), concepts.to(dtype).transpose(1, 2)).to(torch.int64).sum(0).cpu()
        unit_area += units.sum(dim=(0, 2)).cpu()
        concept_area += concepts.sum(dim=(0, 2)).cpu()
    return intersection, unit_area, concept_area


def compositional_search(
    passes: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    concept_names: Sequence[str],
    *,
    units: Sequence[int] | None = None,
    beam_size: int = 5,
    max_length: int = 3,
    single_counts: tuple[Tensor, Tensor, Tensor] | None = None,
    reduce: Reducer | None = None,
    chunk: int = 64,
) -> list[CompositionalExplanation]:
    """Beam search for the formula whose mask best matches each unit's mask (IoU over the whole data).

    Args:
        passes: called once per pass over the data (``max_length - 1`` times, once more without
            ``single_counts``); each call returns a fresh iterable of ``(unit_masks, concept_masks)`` batches,
            ``[B, U, ...]`` and ``[B, C, ...]`` bool with the same batch and spatial sizes.
        concept_names: the ``C`` concept names, used in the formula strings.
        units: labels of the ``U`` units in the results (default ``0..U-1``).
        beam_size: formulas kept per unit after each step (Mu & Andreas use 5... 10).
        max_length: maximum number of concepts in a formula.
        single_counts: ``(intersection [U, C], unit_area [U], concept_area [C])`` if already known (e.g. from
            network dissection); saves the first pass.
        reduce: sums counts over processes (default: ``torch.distributed`` when initialised).
        chunk: ``(unit, formula)`` pairs counted at once (bounds memory).

    Returns:
        One :class:`CompositionalExplanation` per unit, in unit order.
    """
    for name, value in (("beam_size", beam_size), ("max_length", max_length), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not callable(passes):
        raise TypeError(f"passes must be a callable returning an iterable of batches, got {type(passes).__name__}")
    names = list(concept_names)
    num_concepts = len(names)
    if num_concepts == 0:
        raise ValueError("concept_names is empty: there is nothing to compose")
    reducer = default_reducer() if reduce is None else reduce

    if single_counts is None:
        if units is None:
            raise ValueError("pass `units` (or `single_counts`) so that the number of units is known")
        intersection, unit_area, concept_area = _count_singles(passes(), len(units), num_concepts)
        intersection = reducer(intersection, "sum")
        unit_area = reducer(unit_area, "sum")
        concept_area = reducer(concept_area, "sum")
    else:
        intersection, unit_area, concept_area = (t.detach().cpu().to(torch.int64) for t in single_counts)
    num_units = intersection.shape[0]
    if intersection.shape != (num_units, num_concepts) or unit_area.shape != (num_units,):
        raise ValueError(
            f"single_counts must be shaped [U, {num_concepts}], [U], [{num_concepts}]; got "
            f"{list(intersection.shape)}, {list(unit_area.shape)}, {list(concept_area.shape)}"
        )
    labels = list(range(num_units)) if units is None else [int(u) for u in units]
    if len(labels) != num_units:
        raise ValueError(f"got {len(labels)} unit labels for {num_units} units")

    single_iou = _iou(intersection, concept_area[None, :], unit_area[:, None])
    beams: list[list[tuple[float, Formula]]] = []
    for u in range(num_units):
        scored = [(float(single_iou[u, c]), Formula((c,))) for c in range(num_concepts)]
        beams.append(sorted(scored, key=lambda s: (-s[0], s[1]._sort_key()))[:beam_size])
    expanded: list[set[Formula]] = [set() for _ in range(num_units)]

    for _step in range(max_length - 1):
        pairs = [
            (u, formula)
            for u in range(num_units)
            for _score, formula in beams[u]
            if formula.length < max_length and formula not in expanded[u]
        ]
        if not pairs:
            break
        f_area, fm_area, f_and_c, fm_and_c = (
            reducer(t, "sum") for t in _count_pairs(passes(), pairs, num_units, num_concepts, chunk)
        )
        candidates: list[dict[Formula, float]] = [{} for _ in range(num_units)]
        for p, (u, formula) in enumerate(pairs):
            expanded[u].add(formula)
            m_area = unit_area[u]
            ious = {
                "AND": _iou(fm_and_c[p], f_and_c[p], m_area),
                "OR": _iou(fm_area[p] + intersection[u] - fm_and_c[p], f_area[p] + concept_area - f_and_c[p], m_area),
                "AND NOT": _iou(fm_area[p] - fm_and_c[p], f_area[p] - f_and_c[p], m_area),
            }
            used = set(formula.atoms)
            for op in OPERATORS:
                values = ious[op].tolist()
                for c in range(num_concepts):
                    if c not in used:
                        candidates[u][formula.extend(op, c)] = values[c]
        for u in range(num_units):
            pool = dict((f, s) for s, f in beams[u])
            pool.update(candidates[u])
            ranked = sorted(((s, f) for f, s in pool.items()), key=lambda s: (-s[0], s[1]._sort_key()))
            beams[u] = ranked[:beam_size]

    results = []
    for u in range(num_units):
        best_iou, best = beams[u][0]
        results.append(
            CompositionalExplanation(
                unit=labels[u],
                formula=best,
                label=best.to_string(names),
                iou=best_iou,
                beam=[(f.to_string(names), s) for s, f in beams[u]],
                beam_formulas=[f for _s, f in beams[u]],
            )
        )
    return results
