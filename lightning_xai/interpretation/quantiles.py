"""Streaming per-unit quantiles with a certified rank-error bound and exact, order-independent merging.

Network dissection thresholds every unit at a high quantile (the 99.5th percentile) of its activations over all
spatial positions of a probe set - far too many values to hold for a large layer and probe set. The
:class:`QuantileSketch` here reads them in one streaming pass with a fixed memory of ``num_units x bins`` counts.

**Why this design.** The sketch is a histogram on a *data-independent* grid: a value's cell is a prefix of the bits
of its float32 representation (sign, exponent, top mantissa bits), as in HdrHistogram. Such a grid is
logarithmic (each power of two is split into ``2 ** k`` equal cells, ``k <= resolution_bits``), so it copes with
outliers and any scale. Each unit keeps a window of ``bins`` consecutive cells; when its values no longer fit,
the grid is coarsened by dropping one more bit (two neighbouring cells become one, exactly). The grid in use is
a function of the unit's minimum and maximum only, so the final counts are the histogram of the whole multiset
on that grid, whatever the order of the data and however it was sharded: merging two sketches (or all-reducing
them over DDP ranks) gives *exactly* the single-process result. Randomised sketches (KLL, the one of Bau et
al.'s reference code) or adaptive-range histograms cannot promise that, and an exact top-``m`` buffer grows with
the probe set.

**Error bound.** A quantile estimate lies in the cell that holds the order statistic ``x_(j)``,
``j = floor((n - 1) p)``, so

* its *rank* error is at most the count of that cell (plus one for interpolation): :meth:`QuantileSketch.rank_error`
  returns this certified bound, per unit, as a fraction of the values seen;
* its distance to ``x_(j)`` is at most the cell's width, a relative ``2 ** -k`` of the value (``k =
  resolution_bits`` unless the unit spans too many powers of two for ``bins`` cells; :meth:`QuantileSketch.cell_width`
  reports it). This is **not** a bound on the distance to the interpolated quantile of :func:`torch.quantile`
  (``x_(j) + f (x_(j+1) - x_(j))`` for a fractional position): when ``x_(j+1)`` lies in another cell, that value
  can be further away, by up to the gap between the two order statistics. For dissection's thresholds the rank
  bound is the one that matters (how many activations lie between the estimate and the true threshold).

Magnitudes below ``2 ** floor_exponent`` (default ``2 ** -24``, about ``6e-8``) form a *zero class*, kept apart
from the positive values of its cell, so that a quantile falling on the exact zeros of a ReLU is exactly 0.

**Reductions.** :class:`Reducer` is the small hook through which mergeable counts are combined over processes
(``sum`` / ``min`` / ``max`` / ``gather``); :class:`DistributedReducer` uses :mod:`torch.distributed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_xai.distributed import DistributedReducer, Reducer, default_reducer

__all__ = ["DistributedReducer", "QuantileSketch", "Reducer", "default_reducer"]

_MANTISSA_BITS = 23
_SIGN_MASK = 0x7FFFFFFF
_MAX_FINITE_BITS = 0x7F7FFFFF
#: Sentinels of an empty unit (far outside the key range, which is |key| < 2 ** 31).
_EMPTY_MIN = 1 << 40
_EMPTY_MAX = -(1 << 40)
#: Coarsest level: every key then lies in one of two cells (-1, 0), so any ``bins >= 2`` fits.
_MAX_LEVEL = 33

#: ``reduce(tensor, op)`` with ``op`` in ``"sum" | "min" | "max"`` returns the reduction over all processes.
ReduceFn = Callable[[Tensor, str], Tensor]


class QuantileSketch:
    """Mergeable streaming quantiles of ``num_units`` value streams (e.g. the channels of a feature map).

    Args:
        num_units: number of independent streams.
        bins: cells kept per unit; memory is ``num_units * bins`` int64 counts, whatever the number of values.
        resolution_bits: ``k``: at most ``2 ** k`` cells per power of two (relative cell width ``2 ** -k``);
            the grid is coarsened when a unit's values span more than ``bins / 2 ** k`` powers of two.
        floor_exponent: magnitudes below ``2 ** floor_exponent`` fall into the cell of zero.
        device: where the counts live.

    See the module docstring for the error bound. Non-finite values are refused with a ``ValueError``.
    """

    def __init__(
        self,
        num_units: int,
        *,
        bins: int = 2048,
        resolution_bits: int = 7,
        floor_exponent: int = -24,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value, low, high in (
            ("num_units", num_units, 1, None),
            ("bins", bins, 2, None),
            ("resolution_bits", resolution_bits, 0, _MANTISSA_BITS),
            ("floor_exponent", floor_exponent, -126, 127),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < low
                or (high is not None and value > high)
            ):
                valid = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be an integer {valid}, got {value!r}")
        if num_units * bins >= 2**31:
            raise ValueError(f"num_units * bins must be < 2**31, got {num_units} * {bins}")
        self.num_units = num_units
        self.bins = bins
        self.resolution_bits = resolution_bits
        self.floor_exponent = floor_exponent
        self._min_level = _MANTISSA_BITS - resolution_bits
        self._floor_bits = (127 + floor_exponent) << _MANTISSA_BITS
        device = torch.device("cpu") if device is None else torch.device(device)
        self.counts = torch.zeros(num_units, bins, dtype=torch.int64, device=device)
        self.level = torch.full((num_units,), self._min_level, dtype=torch.int64, device=device)
        #: Exact minimum and maximum of each unit as raw keys (``+-`` the float32 magnitude bits).
        self.raw_min = torch.full((num_units,), _EMPTY_MIN, dtype=torch.int64, device=device)
        self.raw_max = torch.full((num_units,), _EMPTY_MAX, dtype=torch.int64, device=device)
        #: Number of values in the zero class (magnitude below ``2 ** floor_exponent``) per unit.
        self.zeros = torch.zeros(num_units, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def offset(self) -> Tensor:
        """Absolute index (at the unit's level) of each unit's first cell."""
        return self._floor_keys(self.raw_min) >> self.level

    @property
    def minimum(self) -> Tensor:
        """Exact minimum of each unit (``+inf`` before any value)."""
        return torch.where(self.raw_min == _EMPTY_MIN, float("inf"), self._raw_values(self.raw_min))

    @property
    def maximum(self) -> Tensor:
        """Exact maximum of each unit (``-inf`` before any value)."""
        return torch.where(self.raw_max == _EMPTY_MAX, float("-inf"), self._raw_values(self.raw_max))

    @property
    def total(self) -> Tensor:
        """Number of values seen per unit, ``LongTensor[num_units]``."""
        return self.counts.sum(dim=1)

    @property
    def nbytes(self) -> int:
        """Memory held by the sketch; independent of the number of values seen."""
        state = (self.counts, self.level, self.raw_min, self.raw_max, self.zeros)
        return sum(t.numel() * t.element_size() for t in state)

    def _check_compatible(self, other: QuantileSketch) -> None:
        if not isinstance(other, QuantileSketch):
            raise TypeError(f"can only merge another QuantileSketch, got {type(other).__name__}")
        mine = (self.num_units, self.bins, self.resolution_bits, self.floor_exponent)
        theirs = (other.num_units, other.bins, other.resolution_bits, other.floor_exponent)
        if mine != theirs:
            raise ValueError(
                f"cannot merge sketches with different (num_units, bins, resolution_bits, floor_exponent): "
                f"{mine} vs {theirs}"
            )

    # ------------------------------------------------------------------------------------------------ keys
    def _floor_keys(self, raw: Tensor) -> Tensor:
        """Grid keys from raw keys (``+-`` float32 magnitude bits): magnitudes below the floor map to 0.

        Monotone, so the grid keys' extremes are the floor keys of the raw extremes. Empty-unit sentinels pass
        through unchanged."""
        shifted = (raw.abs() - (self._floor_bits - 1)).clamp_min(0)
        keys = torch.where(raw < 0, -shifted, shifted)
        return torch.where(raw.abs() >= _EMPTY_MIN, raw, keys)

    def _values(self, keys: Tensor) -> Tensor:
        """Inverse of the grid keys on cell edges (key 0 is the value 0)."""
        shifted = keys.abs()
        magnitude = torch.where(shifted > 0, shifted + self._floor_bits - 1, torch.zeros_like(shifted))
        return self._raw_values(torch.where(keys < 0, -magnitude, magnitude))

    @staticmethod
    def _raw_values(raw: Tensor) -> Tensor:
        magnitude = raw.abs().clamp_max(_MAX_FINITE_BITS).to(torch.int32)
        value = magnitude.view(torch.float32)
        return torch.where(raw < 0, -value, value)

    def _fit_level(self, key_min: Tensor, key_max: Tensor, start: Tensor) -> Tensor:
        """Smallest level ``>= start`` at which each unit's key range fits in ``bins`` cells."""
        level = start.clone()
        for _ in range(_MAX_LEVEL + 1):
            too_wide = ((key_max >> level) - (key_min >> level)) >= self.bins
            if not bool(too_wide.any()):
                break
            level = level + too_wide.long()
        return level

    def _remap(self, counts: Tensor, level: Tensor, offset: Tensor, new_level: Tensor, new_offset: Tensor) -> Tensor:
        """Move counts from grid ``(level, offset)`` to the coarser-or-equal grid ``(new_level, new_offset)``."""
        cells = offset[:, None] + torch.arange(self.bins, device=counts.device)[None, :]
        target = (cells >> (new_level - level)[:, None]) - new_offset[:, None]
        # Non-empty cells always land inside the new window (it covers the old range); clamping only moves zeros.
        target = target.clamp(0, self.bins - 1)
        return torch.zeros_like(counts).scatter_add_(1, target, counts)

    def _regrid(self, raw_min: Tensor, raw_max: Tensor, start_level: Tensor) -> None:
        """Adopt the grid that covers ``[raw_min, raw_max]`` (a superset of the current range)."""
        key_min, key_max = self._floor_keys(raw_min), self._floor_keys(raw_max)
        new_level = self._fit_level(key_min, key_max, start_level)
        new_offset = key_min >> new_level
        old_offset = self.offset
        if not (torch.equal(new_level, self.level) and torch.equal(new_offset, old_offset)):
            self.counts = self._remap(self.counts, self.level, old_offset, new_level, new_offset)
        self.level, self.raw_min, self.raw_max = new_level, raw_min, raw_max

    # ------------------------------------------------------------------------------------------------ updates
    def update(self, values: Tensor, dim: int = 1) -> None:
        """Add values; ``values.shape[dim] == num_units`` and every other dimension is flattened into the stream.

        E.g. a feature map ``[B, U, h, w]`` with ``dim=1`` adds its ``B * h * w`` values to each of the ``U`` units.
        """
        if not isinstance(values, Tensor) or not values.is_floating_point():
            got = values.dtype if isinstance(values, Tensor) else type(values).__name__
            raise TypeError(f"values must be a floating-point tensor, got {got}")
        if values.ndim == 0 or not -values.ndim <= dim < values.ndim or values.shape[dim] != self.num_units:
            raise ValueError(f"values must have {self.num_units} units along dim {dim}, got shape {list(values.shape)}")
        dim = dim % values.ndim
        if values.numel() == 0:
            return
        # [before, U, after] without moving the unit axis (a view for contiguous input)
        after = math.prod(values.shape[dim + 1 :])
        flat = values.detach().to(self.device, torch.float32).contiguous().view(-1, self.num_units, after)
        bits = flat.view(torch.int32)
        magnitude = bits & _SIGN_MASK
        if bool((magnitude > _MAX_FINITE_BITS).any()):
            raise ValueError("values contain NaN or infinite entries; a quantile of them is undefined")
        raw = torch.where(bits < 0, -magnitude, magnitude)
        raw_min = torch.minimum(self.raw_min, raw.amin(dim=(0, 2)).long())
        raw_max = torch.maximum(self.raw_max, raw.amax(dim=(0, 2)).long())
        self._regrid(raw_min, raw_max, self.level)
        shifted = (magnitude - (self._floor_bits - 1)).clamp_min_(0)
        self.zeros += (shifted == 0).sum(dim=(0, 2))
        keys = torch.where(bits < 0, -shifted, shifted)
        # int32 throughout (keys, offsets and cell numbers all fit): half the memory traffic of int64
        level = self.level.to(torch.int32).view(1, -1, 1)
        cells = (keys >> level) - self.offset.to(torch.int32).view(1, -1, 1)
        cells += (torch.arange(self.num_units, device=self.device, dtype=torch.int32) * self.bins).view(1, -1, 1)
        self.counts += torch.bincount(cells.flatten(), minlength=self.num_units * self.bins).view(self.num_units, -1)

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Add the values seen by ``other`` (in place; returns ``self``). Exact: equal to one sketch of all values."""
        self._check_compatible(other)
        raw_min = torch.minimum(self.raw_min, other.raw_min.to(self.device))
        raw_max = torch.maximum(self.raw_max, other.raw_max.to(self.device))
        self._regrid(raw_min, raw_max, torch.maximum(self.level, other.level.to(self.device)))
        theirs = self._remap(
            other.counts.to(self.device),
            other.level.to(self.device),
            other.offset.to(self.device),
            self.level,
            self.offset,
        )
        self.counts += theirs
        self.zeros += other.zeros.to(self.device)
        return self

    def all_reduce(self, reduce: ReduceFn) -> QuantileSketch:
        """Merge the sketches of all processes in place with ``reduce(tensor, op)`` (``op``: sum / min / max).

        Every process must call it (it runs collectives); afterwards all hold the sketch of the union.
        """
        raw_min = reduce(self.raw_min, "min")
        raw_max = reduce(self.raw_max, "max")
        start = reduce(self.level, "max")
        self._regrid(raw_min, raw_max, start)
        self.counts = reduce(self.counts, "sum")
        self.zeros = reduce(self.zeros, "sum")
        return self

    # ------------------------------------------------------------------------------------------------ queries
    def _bracket(self, p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per unit: ``(low, high, inside, count)`` of the cell holding the order statistic at position
        ``(n - 1) * p``: its value range, the statistic's position inside it and its number of values.

        The zero class (magnitudes below the floor, e.g. the exact zeros of a ReLU) is a cell of its own, split
        off the cell that holds it, so that a quantile that falls on zeros is exactly zero.
        """
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"the quantile probability must be a number in [0, 1], got {p!r}")
        total = self.total
        if bool((total == 0).any()):
            raise ValueError("the sketch has not seen any value yet")
        position = (total - 1).double() * p
        cumulative = self.counts.cumsum(dim=1)
        index = torch.floor(position).long()
        cell = torch.searchsorted(cumulative, index[:, None], right=True).squeeze(1).clamp_max(self.bins - 1)
        count = self.counts.gather(1, cell[:, None]).squeeze(1)
        inside = position - (cumulative.gather(1, cell[:, None]).squeeze(1) - count).double()
        absolute = self.offset + cell
        low = self._values(absolute << self.level)
        high = self._values((absolute + 1) << self.level)
        # the cell of key 0 holds the zero class first, then positive values from the floor up
        zero_cell = absolute == 0
        in_zeros = zero_cell & (inside < self.zeros.double())
        in_rest = zero_cell & ~in_zeros
        low = torch.where(in_zeros, 0.0, torch.where(in_rest, self._values(torch.ones_like(absolute)), low))
        high = torch.where(in_zeros, 0.0, high)
        inside = torch.where(in_rest, inside - self.zeros.double(), inside)
        count = torch.where(in_zeros, self.zeros, torch.where(in_rest, count - self.zeros, count))
        return low, high, inside, count

    def quantile(self, p: float) -> Tensor:
        """Estimated ``p``-quantile of each unit, ``Tensor[num_units]`` (float32).

        Same convention as :func:`torch.quantile`: the order statistic at position ``(n - 1) * p``. The values of
        a cell are taken as spread evenly over it; ``p = 0`` and ``p = 1`` give the exact minimum and maximum.
        """
        low, high, inside, count = self._bracket(p)
        fraction = ((inside + 0.5) / count.clamp_min(1).double()).clamp(0.0, 1.0)
        estimate = (low.double() + (high.double() - low.double()) * fraction).float()
        if p == 0.0:
            return self.minimum
        if p == 1.0:
            return self.maximum
        return estimate.clamp(self.minimum, self.maximum)

    def rank_error(self, p: float) -> Tensor:
        """Certified bound on the rank error of :meth:`quantile`, as a fraction of the values seen per unit:
        at most this fraction of the values lies between the estimate and the true quantile."""
        _low, _high, _inside, count = self._bracket(p)
        return (count + 1).double() / self.total.double()

    def cell_width(self, p: float) -> Tensor:
        """Width of the cell holding the order statistic ``x_(j)``, ``j = floor((n - 1) p)``: a bound on the
        distance between :meth:`quantile` and ``x_(j)`` (0 for the zero class, whose values all lie within
        ``2 ** floor_exponent`` of zero). Not a bound on the distance to an interpolated quantile whose next order
        statistic lies in another cell (see the module docstring)."""
        low, high, _inside, _count = self._bracket(p)
        return (high - low).abs()

    def __repr__(self) -> str:
        return (
            f"QuantileSketch(num_units={self.num_units}, bins={self.bins}, resolution_bits={self.resolution_bits}, "
            f"floor_exponent={self.floor_exponent})"
        )
