"""Heatmap rendering: attribution tensors to uint8 RGB overlays and grids.

Attributors return raw, signed values at input resolution (see ``docs/architecture.md``); turning them into
pictures is the job of :mod:`lightning_xai.viz` only. Everything here returns ``numpy.uint8`` RGB arrays shaped
``[H, W, 3]`` or ``[B, H, W, 3]``: loggers get exact pixel values and never have to guess a value range (W&B
0.31 casts float images to uint8 *without* rescaling, so a float heatmap in [0, 1] arrives black).

Conventions

* **Signed vs unsigned maps.** A signed map (both positive and negative evidence, e.g. gradient x input,
  Integrated Gradients, LRP) is reduced over channels by a plain sum and shown on matplotlib's diverging ``bwr``
  colormap: red = evidence *for* the target, blue = evidence *against*, white = zero. An unsigned map (e.g.
  Grad-CAM after its ReLU, gradient magnitude) is reduced by the sum of absolute values and shown on the
  sequential ``inferno`` colormap, black = zero (:mod:`lightning_xai.viz.style`).
* **Robust scaling.** Each sample is divided by a high percentile (default 99th) of its absolute values and
  clipped, so that a handful of extreme pixels does not wash the rest of the map out; this is the usual
  practice since SmoothGrad (Smilkov et al., "SmoothGrad: removing noise by adding noise", ICML workshop 2017)
  and Integrated Gradients visualisations (Sundararajan et al., "Axiomatic Attribution for Deep Networks",
  ICML 2017). Scales are per sample: colours are comparable within one map, not across samples.
* The functions here draw bare pixels (tiles, overlays, the unlabelled :func:`explanation_grid`). The labelled
  grid that callbacks and examples log - column headers, row labels, colour bars, marks on zero / failed maps,
  a fixed scale across epochs - is :func:`lightning_xai.viz.grid.render_explanations`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.checks import check_float, check_int
from lightning_xai.viz.style import colormap_table

__all__ = [
    "DIVERGING_COLORMAP",  # noqa: F822 - module __getattr__
    "SEQUENTIAL_COLORMAP",  # noqa: F822 - module __getattr__
    "colorize",
    "explanation_grid",
    "is_signed",
    "normalize_attributions",
    "overlay",
    "save_png",
    "tile_images",
    "to_uint8_images",
    "upscale_nearest",
]


def __getattr__(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``DIVERGING_COLORMAP`` / ``SEQUENTIAL_COLORMAP``: ``(positions, RGB colours 0..255)`` tables of the
    matplotlib colormaps (:func:`lightning_xai.viz.style.colormap_table`), loaded on first access so that
    importing this module does not import matplotlib."""
    if name == "DIVERGING_COLORMAP":
        return colormap_table(True)
    if name == "SEQUENTIAL_COLORMAP":
        return colormap_table(False)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Values this far outside [0, 1] (float error after undoing a normalisation) still count as a [0, 1] image.
_RANGE_TOLERANCE = 1e-3

ArrayLike = Tensor | np.ndarray


def _as_tensor(value: ArrayLike, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _check_finite(x: Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; cannot render it")


def _check_signed_arg(signed: bool | None) -> None:
    if signed is not None and not isinstance(signed, bool):
        raise TypeError(f"signed must be True, False or None (auto), got {signed!r}")


def _check_percentile(percentile: float) -> None:
    if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")


def is_signed(attributions: ArrayLike) -> bool:
    """Whether ``attributions`` hold both strictly positive and strictly negative values.

    This is the ``signed=None`` (auto) rule of :func:`normalize_attributions` and :func:`overlay`, decided on the
    raw values of the whole batch so that every sample of a batch is rendered with the same colormap.
    """
    a = _as_tensor(attributions, "attributions")
    return bool((a < 0).any()) and bool((a > 0).any())


def _row_percentile(values: Tensor, percentile: float) -> Tensor:
    """Per-row ``percentile`` of ``values [B, N]`` with linear interpolation between order statistics."""
    n = values.shape[1]
    ordered = values.sort(dim=1).values
    pos = percentile / 100.0 * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return ordered[:, lo] + (ordered[:, hi] - ordered[:, lo]) * frac


def normalize_attributions(attributions: ArrayLike, *, signed: bool | None = None, percentile: float = 99.0) -> Tensor:
    """Reduce attributions to one map per sample and scale it robustly to [-1, 1] (signed) or [0, 1] (unsigned).

    Args:
        attributions: ``[B, C, H, W]`` or ``[B, H, W]`` raw attributions (as returned by an attributor).
        signed: ``True`` keeps signs: channels are summed and the result lies in [-1, 1]. ``False`` shows
            magnitude: channels are reduced by the sum of absolute values and the result lies in [0, 1].
            ``None`` (default) decides automatically: signed iff the batch has both signs (:func:`is_signed`).
        percentile: per-sample percentile of the absolute reduced map that is mapped to 1; larger values are
            clipped. ``100`` scales by the maximum. If that percentile is zero (a map that is zero on more than
            ``100 - percentile`` percent of its pixels), the maximum is used instead, so a sparse map still
            shows; an all-zero map stays all zero (no NaN).

    Returns:
        ``Tensor[B, H, W]``, floating point (float64 stays float64, everything else becomes float32), on the input's
        device, detached.
    """
    _check_signed_arg(signed)
    _check_percentile(percentile)
    a = _as_tensor(attributions, "attributions")
    if a.ndim not in (3, 4):
        raise ValueError(
            f"attributions must be shaped [B, C, H, W] or [B, H, W], got shape {list(a.shape)} ({a.ndim}-D)"
        )
    if a.numel() == 0:
        raise ValueError(f"attributions are empty (shape {list(a.shape)})")
    a = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)
    _check_finite(a, "attributions")
    if signed is None:
        signed = is_signed(a)
    if a.ndim == 4:
        a = a.sum(dim=1) if signed else a.abs().sum(dim=1)
    elif not signed:
        a = a.abs()
    flat = a.flatten(1).abs()
    scale = _row_percentile(flat, float(percentile))
    scale = torch.where(scale > 0, scale, flat.amax(dim=1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = a / scale.view(-1, 1, 1)
    return out.clamp(-1.0 if signed else 0.0, 1.0)


def colorize(maps: ArrayLike, signed: bool) -> np.ndarray:
    """Map normalised values to RGB with matplotlib's ``bwr`` (signed) or ``inferno`` (unsigned) colormap.

    Args:
        maps: ``[B, H, W]`` (or a single ``[H, W]``) in [-1, 1] if ``signed`` else [0, 1], e.g. the output of
            :func:`normalize_attributions`. Values outside the range are clipped to it.
        signed: which colormap to use: diverging (0 is white, -1 blue, +1 red) or sequential (0 black, 1 yellow);
            the tables are :data:`DIVERGING_COLORMAP` and :data:`SEQUENTIAL_COLORMAP`.

    Returns:
        ``numpy.uint8`` array ``[B, H, W, 3]`` (or ``[H, W, 3]``).
    """
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be True or False, got {signed!r}")
    m = _as_tensor(maps, "maps")
    if m.ndim not in (2, 3):
        raise ValueError(f"maps must be shaped [B, H, W] or [H, W], got shape {list(m.shape)}")
    m = m.to("cpu", torch.float64)
    _check_finite(m, "maps")
    values = np.clip(m.numpy(), -1.0 if signed else 0.0, 1.0)
    positions, colours = colormap_table(signed)
    rgb = np.stack([np.interp(values, positions, colours[:, k]) for k in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def _channel_stats(value: float | Sequence[float] | Tensor | None, channels: int, name: str, default: float) -> Tensor:
    if value is None:
        return torch.full((channels,), default, dtype=torch.float64)
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} must be one number or {channels} numbers (one per channel), got {t.numel()}")
    return t


def to_uint8_images(
    images: ArrayLike,
    mean: float | Sequence[float] | Tensor | None = None,
    std: float | Sequence[float] | Tensor | None = None,
) -> np.ndarray:
    """Convert an image batch to displayable ``uint8`` RGB.

    Args:
        images: ``[B, C, H, W]`` with ``C`` 1 (grayscale, replicated to RGB) or 3. A ``uint8`` tensor is taken as
            already in [0, 255].
        mean, std: the per-channel normalisation the images went through (``x = (img - mean) / std``), undone
            here as ``img = x * std + mean``. Either may be given alone (the other defaults to 0 / 1).

    Returns:
        ``numpy.uint8`` array ``[B, H, W, 3]``. Each image whose values (after undoing the normalisation) lie in
        [0, 1] is scaled by 255; an image outside [0, 1] is min-max scaled on its own (a constant one becomes
        black), so un-normalised data of any range still renders.
    """
    x = _as_tensor(images, "images")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be shaped [B, C, H, W] with C in (1, 3), got shape {list(x.shape)}")
    channels = x.shape[1]
    if x.dtype == torch.uint8:
        if mean is not None or std is not None:
            raise ValueError("mean/std cannot be undone on uint8 images; pass the normalised float images instead")
        out = x.cpu()
    else:
        x = x.to("cpu", torch.float64)
        _check_finite(x, "images")
        if mean is not None or std is not None:
            m = _channel_stats(mean, channels, "mean", 0.0)
            s = _channel_stats(std, channels, "std", 1.0)
            if bool((s == 0).any()):
                raise ValueError(f"std must be non-zero, got {s.tolist()}")
            x = x * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        in_unit_range = (lo >= -_RANGE_TOLERANCE) & (hi <= 1.0 + _RANGE_TOLERANCE)
        span = hi - lo
        stretched = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
        unit = torch.where(in_unit_range, x.clamp(0.0, 1.0), stretched)
        out = torch.round(unit * 255.0).to(torch.uint8)
    if channels == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def _gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of ``[..., 3]`` uint8 RGB, replicated to three channels (float64)."""
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat(np.rint(luma)[..., None], 3, axis=-1)


def _heatmaps(
    attributions: ArrayLike, batch: int, size: tuple[int, int], signed: bool | None, percentile: float, name: str
) -> np.ndarray:
    """Normalise, resize to ``size`` (bilinear) and colourise: ``uint8 [B, H, W, 3]``."""
    a = _as_tensor(attributions, name)
    if a.ndim not in (3, 4):
        raise ValueError(f"{name} must be shaped [B, C, H, W] or [B, H, W], got shape {list(a.shape)}")
    if a.shape[0] != batch:
        raise ValueError(f"{name} has batch size {a.shape[0]} but the images have batch size {batch}")
    if signed is None:
        signed = is_signed(a)
    maps = normalize_attributions(a, signed=signed, percentile=percentile)
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        maps = maps[:, 0].clamp(-1.0 if signed else 0.0, 1.0)
    return colorize(maps, signed)


def _blend(base: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    out = (1.0 - alpha) * _gray(base) + alpha * heat.astype(np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay(
    images: ArrayLike,
    attributions: ArrayLike,
    *,
    alpha: float = 0.5,
    signed: bool | None = None,
    percentile: float = 99.0,
    mean: float | Sequence[float] | Tensor | None = None,
    std: float | Sequence[float] | Tensor | None = None,
) -> np.ndarray:
    """Blend each sample's heatmap over its input, shown in grayscale so that the heatmap's colours stand out.

    Args:
        images: ``[B, C, H, W]`` inputs (see :func:`to_uint8_images` for ``mean``/``std``).
        attributions: ``[B, C', h, w]`` or ``[B, h, w]``; maps of another spatial size (e.g. a Grad-CAM map that
            was not upsampled) are resized bilinearly to ``H x W`` after normalisation.
        alpha: heatmap weight: ``out = (1 - alpha) * gray(image) + alpha * heatmap``.
        signed, percentile: see :func:`normalize_attributions` (``None`` = auto, per call).

    Returns:
        ``numpy.uint8`` array ``[B, H, W, 3]``.
    """
    check_float("alpha", alpha, minimum=0.0, maximum=1.0)
    _check_signed_arg(signed)
    _check_percentile(percentile)
    base = to_uint8_images(images, mean, std)
    heat = _heatmaps(attributions, base.shape[0], base.shape[1:3], signed, percentile, "attributions")
    return _blend(base, heat, alpha)


def explanation_grid(
    images: ArrayLike,
    maps: Mapping[str, ArrayLike],
    *,
    overlay: bool = True,
    pad: int = 2,
    alpha: float = 0.5,
    signed: bool | None = None,
    percentile: float = 99.0,
    mean: float | Sequence[float] | Tensor | None = None,
    std: float | Sequence[float] | Tensor | None = None,
) -> np.ndarray:
    """One picture comparing methods: a row per sample, the input first, then one column per method.

    Args:
        images: ``[B, C, H, W]`` inputs.
        maps: method name -> attributions (``[B, C', h, w]`` or ``[B, h, w]``), in column order. Names are not
            drawn: this is the bare layout; :func:`lightning_xai.viz.grid.render_explanations` draws the labelled
            grid (headers, row labels, colour bars) that people read.
        overlay: blend heatmaps over the grayscale input (:func:`overlay`); ``False`` shows the bare heatmaps.
        pad: white pixels between tiles and around the border.
        alpha, signed, percentile, mean, std: as in :func:`overlay`; ``signed=None`` decides per method.

    Returns:
        ``numpy.uint8`` array of shape ``(B * (H + pad) + pad, (1 + M) * (W + pad) + pad, 3)`` with ``M`` methods;
        the tile of sample ``i``, column ``j`` starts at row ``pad + i * (H + pad)``, column ``pad + j * (W + pad)``.
    """
    if not isinstance(maps, Mapping):
        raise TypeError(f"maps must be a mapping of method name -> attributions, got {type(maps).__name__}")
    check_int("pad", pad, minimum=0, owner="explanation_grid")
    check_float("alpha", alpha, minimum=0.0, maximum=1.0)
    _check_signed_arg(signed)
    _check_percentile(percentile)
    base = to_uint8_images(images, mean, std)
    batch, height, width = base.shape[:3]
    columns = [base]
    for name, attributions in maps.items():
        heat = _heatmaps(attributions, batch, (height, width), signed, percentile, f"maps[{name!r}]")
        columns.append(_blend(base, heat, alpha) if overlay else heat)
    grid = np.full((batch * (height + pad) + pad, len(columns) * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for j, column in enumerate(columns):
        x0 = pad + j * (width + pad)
        for i in range(batch):
            y0 = pad + i * (height + pad)
            grid[y0 : y0 + height, x0 : x0 + width] = column[i]
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike, *, caption: str | None = None) -> Path:
    """Write a ``uint8`` ``[H, W, 3]`` (RGB) or ``[H, W]`` (gray) array losslessly as PNG; parents are created.

    ``caption``, if given, is stored in the PNG's ``Description`` text chunk. Returns the path written.
    """
    from PIL import Image, PngImagePlugin

    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        dtype = getattr(array, "dtype", type(array).__name__)
        raise TypeError(f"save_png expects a numpy uint8 array (render it first), got {dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"save_png expects shape [H, W, 3] or [H, W], got {list(array.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if caption is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("Description", caption)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", pnginfo=info)
    return path


def tile_images(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``uint8 [n, H, W, 3]`` images row by row into one ``uint8 [H', W', 3]`` image with white gaps of
    ``pad`` pixels; ``columns=None`` puts them all in one row."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"tile_images expects a uint8 [n, H, W, 3] array, got {getattr(images, 'shape', images)!r}")
    check_int("pad", pad, minimum=0, owner="tile_images")
    n, h, w, _ = images.shape
    columns = max(1, n) if columns is None else max(1, min(int(columns), max(1, n)))
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def upscale_nearest(image: np.ndarray, minimum: int = 32) -> np.ndarray:
    """Enlarge ``[H, W, 3]`` (or ``[H, W]``) by the smallest integer factor that makes its shorter side at least
    ``minimum`` pixels, repeating pixels (nearest neighbour: no invented detail); larger images are unchanged."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        got = getattr(image, "shape", image)
        raise ValueError(f"upscale_nearest expects an [H, W, 3] or [H, W] array, got {got!r}")
    check_int("minimum", minimum, minimum=1, owner="upscale_nearest")
    factor = max(1, -(-minimum // max(1, min(image.shape[:2]))))
    return np.ascontiguousarray(image.repeat(factor, axis=0).repeat(factor, axis=1))
