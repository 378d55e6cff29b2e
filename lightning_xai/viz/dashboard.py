"""What a run's dashboard shows of its explanations, for every kind of logger (called by the callbacks).

* :func:`log_explanations` - the labelled grid under ``<prefix>/explanations`` and one image per method under
  ``<prefix>/explanations/<method>`` (a W&B step slider then follows one method over training), plus any scalar
  metrics of the same epoch, all in **one** logger call at an explicit ``step``, so that W&B files the images and
  the metrics under the same step.
* :func:`log_samples_table` - one row per probe sample: class *names*, confidence, a correct column and each
  sample's quality scores (non-finite scores are left empty, never shown as numbers).
* :func:`log_config` - a callback's settings in the run's configuration (``<prefix>/<name>``): W&B
  ``run.config``, TensorBoard text, a CSV file for file loggers.
* :func:`log_curves` - several curves in one chart (deletion / insertion, sanity cascades): a native W&B
  ``wandb.plot.line_series``, a rendered figure for TensorBoard, one tidy CSV (``series, x, y``) for files.
* :func:`log_scatter` - a table of points and, for W&B, a scatter plot of two of its columns.

The loggers are recognised as in :mod:`lightning_xai.viz.logging` (W&B, TensorBoard, files; Lightning's
``DummyLogger`` counts as none and the files then go to ``fallback_dir``, silently). Call on rank zero only.
No Lightning import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_xai.viz.figures import render_curves
from lightning_xai.viz.grid import ExplanationGrid
from lightning_xai.viz.logging import (
    _as_series,
    _check_image,
    _check_key,
    _check_loggers,
    _check_step,
    _file_stem,
    _tensorboard_image,
    _wandb,
    _wandb_image,
    csv_path,
    log_table,
    logger_kind,
    markdown_table,
    route,
    unique_stem,
    wandb_log,
    write_csv,
)
from lightning_xai.viz.render import save_png

__all__ = [
    "flatten_config",
    "log_config",
    "log_curves",
    "log_explanations",
    "log_samples_table",
    "log_scatter",
    "log_text",
]


def _as_image(value: np.ndarray | ExplanationGrid, name: str) -> np.ndarray:
    image = value.image if isinstance(value, ExplanationGrid) else value
    _check_image(image, name)
    return image


def _finite_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        _check_key(key)
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if math.isfinite(value):  # a non-finite metric is not logged as a number (the caller reports it)
            out[key] = value
    return out


def log_explanations(
    loggers: Sequence[object] | None,
    prefix: str,
    grid: np.ndarray | ExplanationGrid,
    method_images: Mapping[str, np.ndarray | ExplanationGrid] | None = None,
    *,
    step: int,
    metrics: Mapping[str, float] | None = None,
    caption: str | None = None,
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log the grid as ``<prefix>/explanations``, each method's image as ``<prefix>/explanations/<method>``, and
    ``metrics`` (finite ones; keys as given), all at trainer step ``step``.

    W&B gets a single ``log_metrics`` call (one W&B step holding the grid, every method and the metrics, with
    ``trainer/global_step = step``); TensorBoard ``add_image`` / ``add_scalar`` at ``step``; file loggers and the
    no-logger case PNG files (``<key>_step<step>.png``) in their directory or ``fallback_dir``. Returns the
    destinations written, as :func:`~lightning_xai.viz.logging.log_image` does.
    """
    logger_list = _check_loggers(loggers)
    _check_key(prefix)
    _check_step(step)
    step = int(step)
    prefix = prefix.rstrip("/")
    images = {f"{prefix}/explanations": _as_image(grid, "grid")}
    for method, value in (method_images or {}).items():
        _check_key(method)
        images[f"{prefix}/explanations/{method}"] = _as_image(value, f"method_images[{method!r}]")
    scalars = _finite_metrics(metrics)
    def to_wandb(logger: object) -> list[str]:
        payload: dict[str, Any] = {k: _wandb_image(v, caption) for k, v in images.items()}
        payload.update(scalars)
        return wandb_log(logger, payload, step)

    def to_tensorboard(writer: Any) -> list[str]:
        destinations = [d for key, image in images.items() for d in _tensorboard_image(writer, key, image, step)]
        if scalars and callable(getattr(writer, "add_scalar", None)):
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
                destinations.append(f"tensorboard:{key}")
        return destinations

    def to_files(directory: Path) -> list[str]:
        return [
            str(save_png(image, directory / f"{unique_stem(directory, f'{_file_stem(key)}_step{step}')}.png",
                         caption=caption))
            for key, image in images.items()
        ]

    return route(
        logger_list, prefix, wandb=to_wandb, tensorboard=to_tensorboard, files=to_files, fallback_dir=fallback_dir
    )


def _class_name(index: int | None, class_names: Sequence[str] | None) -> str:
    if index is None:
        return ""
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def _column(values: Any, n: int, name: str) -> list[Any] | None:
    if values is None:
        return None
    out = values.detach().cpu().flatten().tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(out) != n:
        raise ValueError(f"log_samples_table: {name} has {len(out)} entries for {n} samples")
    return out


def log_samples_table(
    loggers: Sequence[object] | None,
    key: str,
    *,
    predictions: Sequence[int] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor | None = None,
    probabilities: Sequence[float] | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    sample_ids: Sequence[Any] | None = None,
    scores: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
    images: Mapping[str, np.ndarray] | None = None,
    step: int,
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """One row per sample: ``sample``, ``true class``, ``predicted class`` (names), ``confidence`` (the predicted
    class's probability), ``correct`` (True / False; empty without labels), one column per entry of ``scores``
    (e.g. ``gradcam/deletion_auc``; NaN/inf cells are left empty) and, for W&B only, one image column per entry of
    ``images`` (``uint8 [B, H, W, 3]``; other loggers get the images through :func:`log_explanations`).

    W&B: a ``wandb.Table``; TensorBoard: markdown text; files: one tidy CSV without image columns.
    """
    if isinstance(predictions, torch.Tensor):
        preds = [int(p) for p in predictions.detach().cpu().flatten().tolist()]
    else:
        preds = [int(p) for p in predictions]
    n = len(preds)
    label_list = _column(labels, n, "labels")
    prob_list = _column(probabilities, n, "probabilities")
    ids = _column(sample_ids, n, "sample_ids") or list(range(n))
    score_cols = {name: _column(v, n, f"scores[{name!r}]") for name, v in (scores or {}).items()}
    image_cols = dict(images or {})
    for name, batch in image_cols.items():
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 or len(batch) != n:
            raise ValueError(f"log_samples_table: images[{name!r}] must be uint8 [{n}, H, W, 3]")
    columns = ["sample", "true class", "predicted class", "confidence", "correct", *score_cols]
    rows = []
    for i in range(n):
        label = None if label_list is None else int(label_list[i])
        prob = None if prob_list is None else float(prob_list[i])
        row = [
            ids[i],
            _class_name(label, class_names),
            _class_name(preds[i], class_names),
            None if prob is None or not math.isfinite(prob) else round(prob, 4),
            None if label is None else bool(preds[i] == label),
        ]
        for values in score_cols.values():
            value = float(values[i])  # type: ignore[index]
            row.append(value if math.isfinite(value) else None)
        rows.append(row)
    destinations: list[str] = []
    logger_list = _check_loggers(loggers)
    wandb_loggers = [lg for lg in logger_list if logger_kind(lg) == "wandb"]
    others = [lg for lg in logger_list if logger_kind(lg) != "wandb"]
    if wandb_loggers:
        wandb_rows = [row + [image_cols[name][i] for name in image_cols] for i, row in enumerate(rows)]
        destinations += log_table(wandb_loggers, key, [*columns, *image_cols], wandb_rows, step=step)
    if others or not logger_list:
        csv_rows = [["" if cell is None else cell for cell in row] for row in rows]
        destinations += log_table(others, key, columns, csv_rows, step=step, fallback_dir=fallback_dir)
    return destinations


_PLAIN = (bool, int, float, str)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>/a/b": 1}``; values other than numbers, strings, bools and ``None``
    become their ``repr`` (sequences of plain values stay lists)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix.rstrip('/')}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_config(value, name))
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, list | tuple) and all(v is None or isinstance(v, _PLAIN) for v in value):
            out[name] = list(value)
        else:
            out[name] = repr(value)
    return out


def log_config(
    loggers: Sequence[object] | None,
    prefix: str,
    config: Mapping[str, Any],
    *,
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Record settings in the run's configuration under ``<prefix>/...`` (e.g. ``xai/ExplanationMonitor``).

    W&B: ``run.config.update`` (the run's Config panel, filterable across runs); TensorBoard: a markdown table of
    ``key | value`` as text ``<prefix>/config``; file loggers and the no-logger case: ``<prefix>_config.csv`` with
    ``key,value`` rows in their directory or ``fallback_dir``. Returns the destinations written.
    """
    logger_list = _check_loggers(loggers)
    _check_key(prefix)
    if not isinstance(config, Mapping):
        raise TypeError(f"log_config: config must be a mapping of setting -> value, got {type(config).__name__}")
    flat = flatten_config(config, prefix.rstrip("/"))
    name = prefix.rstrip("/")

    def to_wandb(logger: object) -> list[str]:
        logger.experiment.config.update(flat, allow_val_change=True)  # type: ignore[attr-defined]
        return [f"wandb:config:{prefix}"]

    def to_tensorboard(writer: Any) -> list[str]:
        rows = [[k, str(v)] for k, v in flat.items()]
        writer.add_text(f"{name}/config", markdown_table(["setting", "value"], rows), 0)
        return [f"tensorboard:{name}/config"]

    def to_files(directory: Path) -> list[str]:
        path = directory / f"{_file_stem(name)}_config.csv"
        return [write_csv(path, ["key", "value"], ([k, v] for k, v in flat.items()))]

    return route(
        logger_list,
        prefix,
        wandb=to_wandb,
        tensorboard=to_tensorboard,
        files=to_files,
        fallback_dir=fallback_dir,
        text=True,
    )


def log_curves(
    loggers: Sequence[object] | None,
    key: str,
    xs: Sequence[float] | np.ndarray | torch.Tensor,
    series: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor],
    *,
    step: int,
    title: str = "",
    x_label: str = "x",
    y_label: str = "y",
    x_ticklabels: Sequence[str] | None = None,
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log several curves sharing ``xs`` as one chart (e.g. ``{"gradcam deletion": [...], ...}`` against the
    fraction of pixels removed, or a sanity cascade's similarity against the randomised layer).

    W&B: ``wandb.plot.line_series`` (a native line chart, one line per series); TensorBoard: the chart rendered
    as an image (:func:`~lightning_xai.viz.figures.render_curves`); files: one tidy CSV ``<key>_step<step>.csv``
    with columns ``series, <x_label>, <y_label>`` (and ``<x_label> name`` with ``x_ticklabels``). Non-finite
    values are left out of W&B's lines and empty in the CSV.
    """
    logger_list = _check_loggers(loggers)
    _check_key(key)
    _check_step(step)
    step = int(step)
    x = _as_series(xs, "xs")
    if not isinstance(series, Mapping) or not series:
        raise ValueError("log_curves: series must be a non-empty mapping of name -> values")
    ys = {str(name): _as_series(values, f"series[{name!r}]") for name, values in series.items()}
    for name, values in ys.items():
        if len(values) != len(x):
            raise ValueError(f"log_curves: series {name!r} has {len(values)} points but xs has {len(x)}")
    if x_ticklabels is not None and len(x_ticklabels) != len(x):
        raise ValueError(f"log_curves: {len(x_ticklabels)} x_ticklabels for {len(x)} points")
    if x_label == y_label or not x_label or not y_label:
        raise ValueError(f"x_label and y_label must be distinct non-empty strings, got {x_label!r} and {y_label!r}")
    def to_wandb(logger: object) -> list[str]:
        line_xs, line_ys = [], []
        for values in ys.values():
            keep = [i for i, v in enumerate(values) if math.isfinite(v)]
            line_xs.append([x[i] for i in keep])
            line_ys.append([values[i] for i in keep])
        chart = _wandb().plot.line_series(xs=line_xs, ys=line_ys, keys=list(ys), title=title, xname=x_label)
        return wandb_log(logger, {key: chart}, step)

    def to_tensorboard(writer: Any) -> list[str]:
        figure = render_curves(x, ys, title=title, x_label=x_label, y_label=y_label, x_ticklabels=x_ticklabels)
        return _tensorboard_image(writer, key, figure, step)

    def to_files(directory: Path) -> list[str]:
        header = ["series", x_label, y_label] + ([f"{x_label} name"] if x_ticklabels is not None else [])
        rows = [
            [name, xv, yv if math.isfinite(yv) else "", *([x_ticklabels[i]] if x_ticklabels is not None else [])]
            for name, values in ys.items()
            for i, (xv, yv) in enumerate(zip(x, values))
        ]
        return [write_csv(csv_path(directory, key, step), header, rows)]

    return route(
        logger_list, key, wandb=to_wandb, tensorboard=to_tensorboard, files=to_files, fallback_dir=fallback_dir
    )


def log_scatter(
    loggers: Sequence[object] | None,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    x: str,
    y: str,
    step: int,
    title: str = "",
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log a table of points (:func:`~lightning_xai.viz.logging.log_table`) and, for W&B, a
    ``wandb.plot.scatter`` of column ``y`` against column ``x`` under ``<key>_scatter``. Returns the
    destinations written."""
    if x not in columns or y not in columns:
        raise ValueError(f"the scatter columns {x!r} and {y!r} must be among the table columns {list(columns)}")
    destinations = list(log_table(loggers, key, columns, rows, step=step, fallback_dir=fallback_dir))
    for logger in loggers or []:
        if logger_kind(logger) == "wandb":
            wandb = _wandb()
            table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            chart = wandb.plot.scatter(table, x, y, title=title)
            logger.log_metrics({f"{key}_scatter": chart}, step=step)  # type: ignore[attr-defined]
            destinations.append(f"wandb:{key}_scatter")
    return destinations


def log_text(
    loggers: Sequence[object] | None,
    key: str,
    *,
    html: str,
    text: str,
    step: int,
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log one rendered text explanation (e.g. highlighted tokens): W&B gets ``wandb.Html(html)``, TensorBoard
    ``text`` in its Text tab, file loggers and the no-logger case an ``.html`` and a ``.txt`` file in their
    directory or ``fallback_dir``. Call on rank zero only. Returns the destinations written."""
    logger_list = _check_loggers(loggers)
    _check_key(key)
    _check_step(step)
    step = int(step)

    def to_tensorboard(writer: Any) -> list[str]:
        writer.add_text(key, text, step)
        return [f"tensorboard:{key}"]

    def to_files(directory: Path) -> list[str]:
        stem = unique_stem(directory, f"{_file_stem(key)}_step{step}")
        written = []
        for ext, content in (("html", html), ("txt", text)):
            path = directory / f"{stem}.{ext}"
            path.write_text(content, encoding="utf-8")
            written.append(str(path))
        return written

    return route(
        logger_list,
        key,
        wandb=lambda logger: wandb_log(logger, {key: _wandb().Html(html)}, step),
        tensorboard=to_tensorboard,
        files=to_files,
        fallback_dir=fallback_dir,
        text=True,
    )
