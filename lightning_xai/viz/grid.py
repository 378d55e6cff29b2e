"""The labelled explanation grid: the one picture every callback and example logs.

A grid has a row per sample and a column per method, after the input column. Everything a reader needs is drawn
into the picture itself, so that it reads without a caption (a PNG on disk, a W&B media panel, TensorBoard):

* a **title** with the run's title, epoch and step;
* a **header** over each column (``input``, then the method names; with a fixed scale also the scale value);
* a **label** beside each row: the true class name, the predicted class name with its probability, and a red
  ``✗ wrong`` (with a red stripe) when the prediction is wrong;
* one **colour bar per colour scheme** in use, saying what it encodes: signed maps on the diverging ``bwr``
  colormap centred on 0 (red = evidence for the explained class, blue = against, white = 0), unsigned maps on
  the sequential ``inferno`` colormap (black = 0, yellow = high); see :mod:`lightning_xai.viz.style`;
* tiles at least ``tile_size`` (96) pixels: the image enlarged by repeating pixels (nearest neighbour, no
  invented detail), the heatmap upsampled bilinearly (it is a smooth field of evidence);
* an explicit **mark** on a tile whose map is all zero, constant (no ranking, nothing to show), non-finite
  (NaN/inf: never drawn as if it were a value) or missing (the method failed: ``None``).

Scaling. By default every map is divided by its own 99th percentile of ``|value|`` (robust scaling as in
SmoothGrad, Smilkov et al. 2017), so colours compare within a map, not across maps or epochs. A
:class:`ScaleTracker` instead freezes, per method, the percentile over the whole probe batch at the first epoch it
sees; later epochs use that frozen scale, so a map that grows or fades over training shows as brighter or dimmer
(values beyond the scale saturate). Its state is a plain dict, for a callback's ``state_dict``.

No Lightning import; matplotlib (colormaps, font) and Pillow (text) are loaded when a grid is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_xai.checks import check_float, check_int
from lightning_xai.viz.render import (
    ArrayLike,
    _as_tensor,
    _check_percentile,
    _gray,
    colorize,
    to_uint8_images,
)
from lightning_xai.viz.style import font
from lightning_xai.viz.tiles import (
    MARK_CONSTANT,
    MARK_FAILED,
    MARK_NONFINITE,
    MARK_ZERO,
    ScaleTracker,
    method_tiles,
)

__all__ = [
    "MARK_CONSTANT",
    "MARK_FAILED",
    "MARK_NONFINITE",
    "MARK_ZERO",
    "ExplanationGrid",
    "ScaleTracker",
    "render_explanations",
    "render_method_images",
]

#: ``(x0, y0, x1, y1)`` pixel box, end-exclusive.
Box = tuple[int, int, int, int]

_WRONG = (200, 30, 30)
_RIGHT = (20, 120, 40)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)


@dataclass
class ExplanationGrid:
    """A rendered grid and where things are in it (for tests, cropping and captions)."""

    #: ``uint8 [H, W, 3]`` RGB.
    image: np.ndarray
    #: ``"input"`` then the method names, left to right.
    columns: list[str]
    #: column -> header box.
    headers: dict[str, Box]
    #: (row, column) -> tile box.
    tiles: dict[tuple[int, str], Box]
    #: row -> label box.
    row_labels: list[Box]
    #: ``"signed"`` / ``"unsigned"`` -> the colour bar's gradient box.
    colorbars: dict[str, Box]
    #: title box (``None`` when there is no title).
    title: Box | None
    #: (row, method) -> mark drawn on that tile (:data:`MARK_ZERO`, ...).
    marks: dict[tuple[int, str], str] = field(default_factory=dict)
    #: method -> drawn signed (True) or unsigned.
    signed: dict[str, bool] = field(default_factory=dict)
    #: method -> fixed scale used, or ``None`` (per-map scaling).
    scales: dict[str, float | None] = field(default_factory=dict)

    def crop(self, box: Box) -> np.ndarray:
        x0, y0, x1, y1 = box
        return self.image[y0:y1, x0:x1]


# ------------------------------------------------------------------------------------------------------- text


def _text_width(draw: Any, text: str, fnt: Any) -> float:
    return float(draw.textlength(text, font=fnt))


def _line_height(fnt: Any) -> int:
    return math.ceil(fnt.size * 1.3)


def _fit(draw: Any, text: str, fnt: Any, width: float) -> str:
    """``text``, cut with an ellipsis so that it fits in ``width`` pixels."""
    if _text_width(draw, text, fnt) <= width:
        return text
    while text and _text_width(draw, text + "…", fnt) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: Any, text: str, fnt: Any, width: float, max_lines: int = 2) -> list[str]:
    """Greedy wrap after ``_``, ``-``, ``.`` or a space (method names), at most ``max_lines`` lines."""
    pieces, current = [], ""
    for ch in text:
        current += ch
        if ch in "_-. ":
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    split: list[str] = []
    for piece in pieces:  # a piece wider than a line (one long word) is broken between characters
        while _text_width(draw, piece, fnt) > width and len(piece) > 1:
            cut = len(piece) - 1
            while cut > 1 and _text_width(draw, piece[:cut], fnt) > width:
                cut -= 1
            split.append(piece[:cut])
            piece = piece[cut:]
        split.append(piece)
    lines, line = [], ""
    for piece in split:
        if line and _text_width(draw, line + piece, fnt) > width:
            lines.append(line)
            line = piece
        else:
            line += piece
    lines.append(line)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], "".join(lines[max_lines - 1 :])]
    return [_fit(draw, s.rstrip(), fnt, width) for s in lines]


def _format_scale(value: float) -> str:
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


# ------------------------------------------------------------------------------------------------- rows / labels


def _class_name(index: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def _row_texts(
    batch: int,
    labels: ArrayLike | Sequence[int] | None,
    logits: ArrayLike | None,
    predictions: ArrayLike | Sequence[int] | None,
    probabilities: ArrayLike | Sequence[float] | None,
    class_names: Sequence[str] | None,
    row_names: Sequence[str] | None,
) -> list[list[tuple[str, tuple[int, int, int]]]]:
    """Per row, the label lines with their colours."""

    def as_list(value: Any, name: str) -> list | None:
        if value is None:
            return None
        t = torch.as_tensor(value).detach().cpu().flatten() if not isinstance(value, list | tuple) else value
        out = t.tolist() if isinstance(t, Tensor) else list(t)
        if len(out) != batch:
            raise ValueError(f"{name} has {len(out)} entries but there are {batch} images")
        return out

    finite_logits: list[bool] = [True] * batch
    if logits is not None:
        lg = _as_tensor(logits, "logits").detach().cpu().float()
        if lg.ndim != 2 or lg.shape[0] != batch:
            raise ValueError(f"logits must be shaped [{batch}, num_classes], got {list(lg.shape)}")
        finite_logits = torch.isfinite(lg).all(dim=1).tolist()
        probs = torch.softmax(torch.nan_to_num(lg), dim=1)
        if predictions is None:
            predictions = probs.argmax(dim=1)
        if probabilities is None:
            probabilities = probs.gather(1, torch.as_tensor(predictions).long().view(-1, 1).cpu())[:, 0]
    label_list = as_list(labels, "labels")
    pred_list = as_list(predictions, "predictions")
    prob_list = as_list(probabilities, "probabilities")
    names = list(row_names) if row_names is not None else None
    if names is not None and len(names) != batch:
        raise ValueError(f"row_names has {len(names)} entries but there are {batch} images")
    rows = []
    for i in range(batch):
        lines: list[tuple[str, tuple[int, int, int]]] = [(names[i] if names else f"#{i}", _MUTED)]
        if label_list is not None:
            lines.append((f"true: {_class_name(int(label_list[i]), class_names)}", _TEXT))
        if not finite_logits[i]:
            lines.append(("pred: non-finite output", _WRONG))
        elif pred_list is not None:
            text = f"pred: {_class_name(int(pred_list[i]), class_names)}"
            if prob_list is not None:
                text += f" ({float(prob_list[i]):.2f})"
            lines.append((text, _TEXT))
            if label_list is not None:
                wrong = int(pred_list[i]) != int(label_list[i])
                lines.append(("✗ wrong" if wrong else "✓ right", _WRONG if wrong else _RIGHT))
        rows.append(lines)
    return rows


# -------------------------------------------------------------------------------------------------- drawing


def _draw_mark(canvas: Any, draw: Any, box: Box, text: str) -> None:
    """Diagonal hatching over the tile (clipped to it) and ``text`` in a framed white box at its centre."""
    from PIL import ImageDraw

    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    tile = canvas.crop(box)
    hatch = ImageDraw.Draw(tile)
    for offset in range(-h, w, 10):
        hatch.line([(offset, h - 1), (offset + h, 0)], fill=(150, 150, 150), width=1)
    canvas.paste(tile, (x0, y0))
    fnt = font(12, bold=True)
    label = _fit(draw, text, fnt, x1 - x0 - 10)
    tw, th = _text_width(draw, label, fnt), _line_height(fnt)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.rectangle([cx - tw / 2 - 4, cy - th / 2 - 2, cx + tw / 2 + 4, cy + th / 2 + 2], fill=(255, 255, 255),
                   outline=(0, 0, 0))
    colour = _WRONG if text in (MARK_FAILED, MARK_NONFINITE) else _TEXT
    draw.text((cx - tw / 2, cy - th / 2), label, fill=colour, font=fnt)


def _colorbar_pixels(signed: bool, width: int, height: int) -> np.ndarray:
    ramp = np.linspace(-1.0 if signed else 0.0, 1.0, width)
    row = colorize(np.broadcast_to(ramp, (height, width)).copy(), signed)
    return row


def render_explanations(
    images: ArrayLike,
    maps: Mapping[str, ArrayLike | None],
    *,
    labels: ArrayLike | Sequence[int] | None = None,
    logits: ArrayLike | None = None,
    predictions: ArrayLike | Sequence[int] | None = None,
    probabilities: ArrayLike | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    row_names: Sequence[str] | None = None,
    title: str | None = None,
    epoch: int | None = None,
    step: int | None = None,
    mean: float | Sequence[float] | Tensor | None = None,
    std: float | Sequence[float] | Tensor | None = None,
    overlay: bool = True,
    alpha: float = 0.5,
    signed: bool | Mapping[str, bool] | None = None,
    percentile: float = 99.0,
    scale: ScaleTracker | None = None,
    tile_size: int = 96,
) -> ExplanationGrid:
    """Draw the labelled grid (see the module docstring): rows = samples, columns = input then each method.

    Args:
        images: ``[B, C, H, W]`` inputs (``mean``/``std`` undo a normalisation, see
            :func:`~lightning_xai.viz.render.to_uint8_images`).
        maps: method name -> raw attributions ``[B, C', h, w]`` / ``[B, h, w]`` in column order; ``None`` for a
            method that failed (its column is drawn, every tile marked ``failed``).
        labels: true classes ``[B]`` (row label ``true: <name>`` and the right/wrong mark).
        logits: ``[B, K]`` model outputs: the prediction and its softmax probability; a non-finite row is labelled
            ``pred: non-finite output``. Or give ``predictions`` / ``probabilities`` directly.
        class_names: names for class indices (indices are shown when missing or out of range).
        row_names: first line of each row label (default ``#<row>``), e.g. the probe index.
        title, epoch, step: the title line, e.g. ``"ExplanationMonitor  ·  epoch 3  ·  step 120"``.
        overlay, alpha: blend the heatmap over the grayscale input with weight ``alpha`` (``False``: bare heatmap).
        signed: ``None`` decides per method (signed iff its batch has both signs; a :class:`ScaleTracker` keeps the
            first decision), a bool for every method, or a mapping method -> bool.
        percentile: per-map robust scale when ``scale`` is ``None``.
        scale: a :class:`ScaleTracker` to use (and update) for fixed per-method scales across calls.
        tile_size: minimum tile side in pixels; images are enlarged by the smallest integer factor reaching it.

    Returns:
        :class:`ExplanationGrid` with the ``uint8 [H, W, 3]`` image and the boxes of everything drawn.
    """
    from PIL import Image, ImageDraw

    if not isinstance(maps, Mapping):
        raise TypeError(f"maps must be a mapping of method name -> attributions, got {type(maps).__name__}")
    for name in maps:
        if not isinstance(name, str) or not name or name == "input":
            raise ValueError(f"method names must be non-empty strings other than 'input', got {name!r}")
    check_float("alpha", alpha, minimum=0.0, maximum=1.0)
    _check_percentile(percentile)
    check_int("tile_size", tile_size, minimum=8, maximum=1024)
    if scale is not None and not isinstance(scale, ScaleTracker):
        raise TypeError(f"scale must be a ScaleTracker or None, got {type(scale).__name__}")

    base = to_uint8_images(images, mean, std)
    batch, height, width = base.shape[:3]
    factor = max(1, -(-tile_size // max(1, min(height, width))))
    th, tw = height * factor, width * factor
    image_tiles = base.repeat(factor, axis=1).repeat(factor, axis=2)
    gray = _gray(image_tiles)

    columns = ["input", *maps]
    tiles_by_column: dict[str, np.ndarray] = {"input": image_tiles}
    marks: dict[tuple[int, str], str] = {}
    schemes: dict[str, bool] = {}
    scales: dict[str, float | None] = {}
    for method, raw in maps.items():
        tiles, method_marks, is_signed_map, fixed = method_tiles(
            method, raw, gray, (th, tw), overlay=overlay, alpha=alpha, signed=signed, percentile=percentile,
            tracker=scale, epoch=epoch,
        )
        tiles_by_column[method] = tiles
        marks.update({(i, method): m for i, m in method_marks.items()})
        if raw is not None:
            schemes[method] = is_signed_map
        scales[method] = fixed
    row_texts = _row_texts(batch, labels, logits, predictions, probabilities, class_names, row_names)

    # ---- layout
    margin, gap, pad = 10, 4, 6
    f_title, f_head, f_label, f_small = font(15, bold=True), font(13, bold=True), font(12), font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(math.ceil(_text_width(probe, t, f_label)) for r in row_texts for t, _ in r)
    label_w = min(230, max(90, widest + 2 * pad + 5))
    header_lines = {c: _wrap(probe, c, f_head, tw, max_lines=3) for c in columns}
    for method, fixed in scales.items():
        if fixed is not None:
            header_lines[method].append(f"s = {_format_scale(fixed)}")
    header_h = max(len(v) for v in header_lines.values()) * _line_height(f_head) + pad
    title_parts = [title, None if epoch is None else f"epoch {epoch}", None if step is None else f"step {step}"]
    title_text = "  ·  ".join(str(p) for p in title_parts if p)
    title_h = _line_height(f_title) + pad if title_text else 0
    body_w = label_w + len(columns) * (tw + gap) - gap
    used_schemes = [s for s in (True, False) if s in schemes.values()]
    bar_w = min(256, max(160, body_w - 2 * pad))
    if any(v is not None for v in scales.values()):
        frozen = sorted({e for e in (scale.frozen_at.values() if scale else []) if e is not None})
        since = f" (frozen at epoch {frozen[0]})" if frozen else ""
        scale_note = f"s = fixed per method, in the column header{since}: brightness compares across epochs"
    else:
        scale_note = f"s = each map's {percentile:g}th percentile of |value|: colours compare within a map only"
    bar_block_h = 2 * _line_height(f_small) + 14 + _line_height(f_small) + pad
    canvas_w = max(body_w, bar_w, int(_text_width(probe, title_text, f_title))) + 2 * margin
    canvas_w = max(canvas_w, min(int(_text_width(probe, scale_note, f_small)) + 2 * margin, 2 * body_w))
    canvas_h = margin + title_h + header_h + batch * (th + gap) - gap + pad + len(used_schemes) * bar_block_h + margin

    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = margin
    title_box = None
    if title_text:
        draw.text((margin, y), _fit(draw, title_text, f_title, canvas_w - 2 * margin), fill=_TEXT, font=f_title)
        title_box = (margin, y, canvas_w - margin, y + title_h - pad)
        y += title_h
    x_cols = {c: margin + label_w + j * (tw + gap) for j, c in enumerate(columns)}
    headers: dict[str, Box] = {}
    for c in columns:
        x0 = x_cols[c]
        for k, line in enumerate(header_lines[c]):
            fnt = f_head if k < len(_wrap(probe, c, f_head, tw, max_lines=3)) else f_small
            lw = _text_width(draw, line, fnt)
            draw.text((x0 + (tw - lw) / 2, y + k * _line_height(f_head)), line, fill=_TEXT, font=fnt)
        headers[c] = (x0, y, x0 + tw, y + header_h - pad)
    y += header_h
    tiles: dict[tuple[int, str], Box] = {}
    row_boxes: list[Box] = []
    for i in range(batch):
        y0 = y + i * (th + gap)
        wrong = any(colour == _WRONG for _, colour in row_texts[i])
        if wrong:
            draw.rectangle([margin, y0, margin + 3, y0 + th - 1], fill=_WRONG)
        for k, (text, colour) in enumerate(row_texts[i]):
            line = _fit(draw, text, f_label, label_w - 2 * pad - 4)
            draw.text((margin + pad + 2, y0 + 2 + k * _line_height(f_label)), line, fill=colour, font=f_label)
        row_boxes.append((margin, y0, margin + label_w - pad, y0 + th))
        for c in columns:
            x0 = x_cols[c]
            canvas.paste(Image.fromarray(np.ascontiguousarray(tiles_by_column[c][i])), (x0, y0))
            tiles[(i, c)] = (x0, y0, x0 + tw, y0 + th)
            if (i, c) in marks:
                _draw_mark(canvas, draw, tiles[(i, c)], marks[(i, c)])
    y += batch * (th + gap) - gap + pad

    colorbars: dict[str, Box] = {}
    for is_signed_scheme in used_schemes:
        if is_signed_scheme:
            caption = "signed, diverging at 0 (bwr): red = evidence for the class, blue = against, white = 0"
            ticks = ("-s", "0", "+s")
        else:
            caption = "unsigned, sequential (inferno): black = 0, yellow = high"
            ticks = ("0", "s/2", "s")
        names = ", ".join(m for m, s in schemes.items() if s == is_signed_scheme)
        draw.text((margin, y), _fit(draw, f"{caption} - {names}", f_small, canvas_w - 2 * margin), fill=_TEXT,
                  font=f_small)
        y += _line_height(f_small)
        bar = _colorbar_pixels(is_signed_scheme, bar_w, 14)
        canvas.paste(Image.fromarray(bar), (margin, y))
        draw.rectangle([margin - 1, y - 1, margin + bar_w, y + 14], outline=(0, 0, 0))
        colorbars["signed" if is_signed_scheme else "unsigned"] = (margin, y, margin + bar_w, y + 14)
        y += 16
        for frac, tick in zip((0.0, 0.5, 1.0), ticks):
            lw = _text_width(draw, tick, f_small)
            x = margin + frac * (bar_w - 1) - frac * lw
            draw.text((x, y), tick, fill=_TEXT, font=f_small)
        y += _line_height(f_small)
        draw.text((margin, y), _fit(draw, scale_note, f_small, canvas_w - 2 * margin), fill=_MUTED, font=f_small)
        y += _line_height(f_small) + pad
    return ExplanationGrid(
        image=np.asarray(canvas, dtype=np.uint8).copy(),
        columns=columns,
        headers=headers,
        tiles=tiles,
        row_labels=row_boxes,
        colorbars=colorbars,
        title=title_box,
        marks=marks,
        signed=schemes,
        scales=scales,
    )


def render_method_images(
    images: ArrayLike, maps: Mapping[str, ArrayLike | None], **kwargs: Any
) -> dict[str, ExplanationGrid]:
    """One labelled grid per method (input column, that method's column, row labels, its colour bar), for a
    logger key per method that a reader can follow with a step slider. ``kwargs`` as for
    :func:`render_explanations`; a shared :class:`ScaleTracker` keeps each method's scale the same as in the
    full grid."""
    if not isinstance(maps, Mapping):
        raise TypeError(f"maps must be a mapping of method name -> attributions, got {type(maps).__name__}")
    return {name: render_explanations(images, {name: value}, **kwargs) for name, value in maps.items()}

