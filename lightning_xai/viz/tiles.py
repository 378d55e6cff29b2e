"""Per-method tiles of the explanation grid: channel reduction, marks on maps that are not evidence, scaling
(per map, or fixed across epochs by a :class:`ScaleTracker`), upsampling and colouring.

Kept apart from the drawing of the grid (:mod:`lightning_xai.viz.grid`) so that the numbers behind every pixel
are testable on their own. No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.viz.render import (
    ArrayLike,
    _as_tensor,
    _check_percentile,
    colorize,
    is_signed,
    normalize_attributions,
)

__all__ = ["MARK_CONSTANT", "MARK_FAILED", "MARK_NONFINITE", "MARK_ZERO", "ScaleTracker", "method_tiles"]

#: Marks drawn on tiles whose map cannot be read as evidence.
MARK_ZERO = "all zero"
MARK_CONSTANT = "constant"
MARK_NONFINITE = "non-finite"
MARK_FAILED = "failed"


class ScaleTracker:
    """Per-method colour scale frozen at the first epoch it sees, so that brightness compares across epochs.

    For each method, the first batch whose maps are not all zero fixes the scale: the ``percentile`` of
    ``|value|`` over all samples' reduced maps (channels summed for signed maps, absolute values summed for
    unsigned ones; the maximum if that percentile is 0), and whether the method is drawn signed. Later batches are
    divided by the frozen scale and clipped, so drift over training shows as brightness. Non-finite values never
    enter a scale.

    Args:
        percentile: in (0, 100]; 100 freezes the maximum (nothing saturates at the first epoch).
    """

    def __init__(self, percentile: float = 99.0) -> None:
        _check_percentile(percentile)
        self.percentile = float(percentile)
        #: method -> frozen scale (divides the reduced map).
        self.scales: dict[str, float] = {}
        #: method -> frozen colour scheme (True = signed).
        self.signed: dict[str, bool] = {}
        #: method -> epoch at which the scale was frozen (``None`` when not given).
        self.frozen_at: dict[str, int | None] = {}

    def scale(self, method: str, reduced: Tensor, signed: bool, epoch: int | None = None) -> float | None:
        """The frozen scale of ``method``, freezing it from ``reduced`` (``[B, H, W]``) on first use; ``None``
        while every value seen so far is zero or non-finite (the caller falls back to per-map scaling)."""
        if method in self.scales:
            return self.scales[method]
        values = reduced.detach().to("cpu", torch.float64).abs().flatten().numpy()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return None
        value = float(np.percentile(values, self.percentile))
        if not value > 0:
            value = float(values.max())
        if not (value > 0 and math.isfinite(value)):
            return None
        self.scales[method] = value
        self.signed[method] = bool(signed)
        self.frozen_at[method] = None if epoch is None else int(epoch)
        return value

    def state_dict(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "scales": dict(self.scales),
            "signed": dict(self.signed),
            "frozen_at": dict(self.frozen_at),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.percentile = float(state.get("percentile", self.percentile))
        self.scales = {str(k): float(v) for k, v in state.get("scales", {}).items()}
        self.signed = {str(k): bool(v) for k, v in state.get("signed", {}).items()}
        self.frozen_at = {str(k): (None if v is None else int(v)) for k, v in state.get("frozen_at", {}).items()}

    def __repr__(self) -> str:
        return f"ScaleTracker(percentile={self.percentile}, frozen={sorted(self.scales)})"


def _reduce(a: Tensor, signed: bool) -> Tensor:
    """``[B, C, H, W]`` / ``[B, H, W]`` -> ``[B, H, W]``: channel sum (signed) or sum of absolute values."""
    a = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)
    if a.ndim == 4:
        return a.sum(dim=1) if signed else a.abs().sum(dim=1)
    return a if signed else a.abs()


def _decide_signed(method: str, a: Tensor, signed: bool | Mapping[str, bool] | None, tracker: ScaleTracker | None):
    if isinstance(signed, Mapping):
        if method in signed:
            return bool(signed[method])
    elif signed is not None:
        return bool(signed)
    if tracker is not None and method in tracker.signed:
        return tracker.signed[method]
    finite = a[torch.isfinite(a)] if a.is_floating_point() else a
    return is_signed(finite) if finite.numel() else False


def method_tiles(
    method: str,
    raw: ArrayLike | None,
    gray: np.ndarray,
    size: tuple[int, int],
    *,
    overlay: bool,
    alpha: float,
    signed: bool | Mapping[str, bool] | None,
    percentile: float,
    tracker: ScaleTracker | None,
    epoch: int | None,
) -> tuple[np.ndarray, dict[int, str], bool, float | None]:
    """Tiles ``uint8 [B, th, tw, 3]`` of one method over the grayscale, already enlarged inputs ``gray``
    (``[B, th, tw, 3]``), its per-row marks, whether it is drawn signed, and its fixed scale (``None``: per map).
    Marked rows show the plain grayscale input (the mark is drawn on top by the grid)."""
    batch = gray.shape[0]
    if raw is None:
        tiles = np.ascontiguousarray(gray.astype(np.uint8))
        return tiles, dict.fromkeys(range(batch), MARK_FAILED), bool(tracker and tracker.signed.get(method)), None
    a = _as_tensor(raw, f"maps[{method!r}]").detach().cpu()
    if a.ndim not in (3, 4):
        raise ValueError(f"maps[{method!r}] must be shaped [B, C, H, W] or [B, H, W], got shape {list(a.shape)}")
    if a.shape[0] != batch:
        raise ValueError(f"maps[{method!r}] has batch size {a.shape[0]} but the images have batch size {batch}")
    if not a.is_floating_point():
        a = a.float()
    is_signed_map = _decide_signed(method, a, signed, tracker)
    reduced = _reduce(a, is_signed_map)
    marks: dict[int, str] = {}
    finite_rows = torch.isfinite(reduced).flatten(1).all(dim=1)
    for i in range(batch):
        if not bool(finite_rows[i]):
            marks[i] = MARK_NONFINITE
            continue
        lo, hi = float(reduced[i].min()), float(reduced[i].max())
        if lo == 0.0 and hi == 0.0:
            marks[i] = MARK_ZERO
        elif lo == hi:
            marks[i] = MARK_CONSTANT
    clean = torch.where(finite_rows.view(-1, 1, 1), reduced, torch.zeros_like(reduced))
    fixed = None
    if tracker is not None:
        fixed = tracker.scale(method, clean[finite_rows], is_signed_map, epoch) if bool(finite_rows.any()) else None
        if fixed is None and method in tracker.scales:
            fixed = tracker.scales[method]
    if fixed is not None:
        normalised = (clean / fixed).clamp(-1.0 if is_signed_map else 0.0, 1.0)
    else:
        normalised = normalize_attributions(clean, signed=is_signed_map, percentile=percentile)
    if tuple(normalised.shape[-2:]) != size:
        normalised = F.interpolate(
            normalised[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
        )[:, 0]
    heat = colorize(normalised.clamp(-1.0 if is_signed_map else 0.0, 1.0), is_signed_map)
    if overlay:
        tiles = np.clip(np.rint((1.0 - alpha) * gray + alpha * heat.astype(np.float64)), 0, 255).astype(np.uint8)
    else:
        tiles = heat
    for i in marks:  # a map that is not evidence is never drawn as if it were: the plain input, then the mark
        tiles[i] = gray[i].astype(np.uint8)
    return tiles, marks, is_signed_map, fixed
