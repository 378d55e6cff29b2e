"""The logger adapter: send rendered explanations to whichever loggers a run has.

Three destinations, recognised by duck typing so that this module never imports Lightning (``viz/`` is usable
from a notebook):

* **Weights & Biases** - an object whose class (or a base class) is named ``WandbLogger`` and that has
  ``log_metrics``, i.e. Lightning's :class:`~pytorch_lightning.loggers.WandbLogger`. Media are logged through
  ``logger.log_metrics({key: media}, step=step)``, exactly like Lightning's own ``WandbLogger.log_image``: the
  trainer step goes into the ``trainer/global_step`` field that Lightning makes the x-axis of every chart, and
  W&B's internal step keeps counting by itself. (Passing ``step=`` to ``run.log`` directly would be dropped
  with a warning whenever W&B's internal step is already ahead of the trainer step, which it usually is.)
  ``wandb`` is imported lazily: it is an optional extra.
* **TensorBoard** - a logger whose class is named ``TensorBoardLogger`` (images go to ``logger.experiment``,
  a ``SummaryWriter``), or a ``SummaryWriter``-like object with ``add_image`` passed directly.
* **Files** - any other logger, or no logger at all: PNG / CSV files in the logger's ``log_dir`` (else its
  ``save_dir``), else in ``fallback_dir``. A logger this module does not know never makes it raise.
* **Nothing** - Lightning's ``DummyLogger`` (what ``fast_dev_run`` puts in place of the configured loggers) counts
  as no logger: files go to ``fallback_dir`` when one is given, silently (no "could not log" warning).

Tables go to TensorBoard as markdown text (its Text tab renders it; no per-cell files) and curves as rendered
figures (its Images tab); see also :mod:`lightning_xai.viz.dashboard` for the per-method images, the samples
table, the run configuration and multi-series curves.

Images must be ``numpy.uint8`` ``[H, W, 3]`` arrays (see :mod:`lightning_xai.viz.render`): W&B 0.31 casts float
images to uint8 without rescaling, so a float heatmap in [0, 1] would arrive black.

All functions here log from the calling process only. Callers (the callbacks) call them **on rank zero only**,
after any cross-rank gathering; calling them on every rank would write duplicate files.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lightning_xai.viz.figures import render_curves
from lightning_xai.viz.render import save_png

__all__ = ["log_image", "log_line_plot", "log_table", "logger_kind", "markdown_table"]

LoggerKind = Literal["wandb", "tensorboard", "file", "none"]


def logger_kind(logger: object) -> LoggerKind:
    """How :func:`log_image` treats ``logger``: ``"wandb"``, ``"tensorboard"``, ``"none"`` (Lightning's
    ``DummyLogger``, which stands in for the loggers under ``fast_dev_run``) or ``"file"`` (everything else).

    Recognition is by class name along the MRO (so subclasses count) and never touches ``logger.experiment``,
    which for some loggers would start a run.
    """
    names = {cls.__name__ for cls in type(logger).__mro__}
    if "DummyLogger" in names:
        return "none"
    if "WandbLogger" in names and callable(getattr(logger, "log_metrics", None)):
        return "wandb"
    if "TensorBoardLogger" in names or callable(getattr(logger, "add_image", None)):
        return "tensorboard"
    return "file"


def _check_loggers(loggers: Sequence[object] | None) -> list[object]:
    if loggers is None:
        return []
    if not isinstance(loggers, list | tuple):
        raise TypeError(
            f"loggers must be a list or tuple of loggers (e.g. trainer.loggers), got {type(loggers).__name__}"
        )
    return list(loggers)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def _is_image(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3 and value.shape[2] == 3


def unique_stem(directory: str | os.PathLike, stem: str) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... when a file of that stem (``stem.*`` or ``stem_r*`` table cells)
    is already in ``directory``: a file is never overwritten (e.g. by a ``trainer.validate`` after ``fit`` at the
    same step)."""
    folder = Path(directory)
    if not folder.is_dir():
        return stem

    def taken(candidate: str) -> bool:
        return any(folder.glob(f"{glob.escape(candidate)}.*")) or any(folder.glob(f"{glob.escape(candidate)}_r*"))

    result, i = stem, 2
    while taken(result):
        result, i = f"{stem}_{i}", i + 1
    return result


def _check_image(image: object, name: str) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy uint8 [H, W, 3] array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"{name} must have dtype uint8, got {image.dtype}: render it with lightning_xai.viz.render first "
            "(W&B casts float images to uint8 without rescaling)"
        )
    if not _is_image(image):
        raise ValueError(f"{name} must be shaped [H, W, 3], got {list(image.shape)}")


def _file_stem(key: str) -> str:
    """A file-name-safe version of a metric key: ``/`` and every other unsafe character become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - a WandbLogger cannot exist without wandb
        raise ImportError(
            "logging to a WandbLogger needs the wandb package: pip install 'lightning-xai[wandb]'"
        ) from err
    return wandb


def _wandb_image(image: np.ndarray, caption: str | None = None) -> Any:
    from PIL import Image

    # A PIL image, not the array: wandb squeezes arrays, which would break a 1-pixel-high image.
    return _wandb().Image(Image.fromarray(image), caption=caption)


def _logger_dir(logger: object) -> str | None:
    """The logger's own directory (``log_dir``, else ``save_dir``), or ``None``; never raises."""
    for attr in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, attr, None)
        except Exception:
            value = None
        if isinstance(value, str | os.PathLike) and str(value):
            return str(value)
    return None


def _has_real_logger(loggers: list[object]) -> bool:
    """Whether ``loggers`` hold anything but ``DummyLogger``s (which count as no logger)."""
    return any(logger_kind(logger) != "none" for logger in loggers)


def _file_dirs(
    file_loggers: list[object], had_loggers: bool, fallback_dir: str | os.PathLike | None, key: str
) -> list[Path]:
    """Directories to write files to: one per file logger (its own, else ``fallback_dir``), de-duplicated.
    ``had_loggers`` is False when the run has no logger (or only ``DummyLogger``s): then ``fallback_dir``."""
    candidates: list[str | os.PathLike | None] = []
    for logger in file_loggers:
        directory = _logger_dir(logger) or fallback_dir
        if directory is None:
            warnings.warn(
                f"could not log {key!r} for {type(logger).__name__}: it has no log_dir/save_dir and no "
                "fallback_dir was given",
                stacklevel=3,
            )
        candidates.append(directory)
    if not had_loggers:  # no loggers and no fallback_dir: the caller asked for nothing to be kept
        candidates.append(fallback_dir)
    dirs: list[Path] = []
    for directory in candidates:
        if directory is not None and Path(directory).resolve() not in {d.resolve() for d in dirs}:
            dirs.append(Path(directory))
    return dirs


def _tensorboard_writer(logger: object) -> Any:
    if callable(getattr(logger, "add_image", None)):
        return logger
    return logger.experiment  # type: ignore[attr-defined]


def _tensorboard_text(logger: object) -> Any:
    """The logger's writer when it can take text (``add_text``), else ``None``."""
    writer = _tensorboard_writer(logger)
    return writer if callable(getattr(writer, "add_text", None)) else None


def _writer_for(logger: object, text: bool) -> Any:
    """A TensorBoard logger's writer; with ``text``, ``None`` when that writer cannot take text."""
    return _tensorboard_text(logger) if text else _tensorboard_writer(logger)


def _tensorboard_image(writer: Any, key: str, image: np.ndarray, step: int) -> list[str]:
    writer.add_image(key, image, step, dataformats="HWC")
    return [f"tensorboard:{key}"]


def wandb_log(logger: object, payload: dict[str, Any], step: int) -> list[str]:
    """Log ``payload`` through a W&B logger's ``log_metrics`` at trainer step ``step``; its destinations."""
    logger.log_metrics(payload, step=step)  # type: ignore[attr-defined]
    return [f"wandb:{key}" for key in payload]


def route(
    logger_list: list[object],
    key: str,
    *,
    wandb: Callable[[object], list[str]],
    tensorboard: Callable[[Any], list[str]],
    files: Callable[[Path], list[str]],
    fallback_dir: str | os.PathLike | None,
    text: bool = False,
) -> list[str]:
    """Send one record to every logger by its kind (:func:`logger_kind`); the destinations written.

    ``wandb(logger)`` handles each W&B logger; ``tensorboard(writer)`` each TensorBoard writer (with ``text``, only
    a writer that can take text - one without ``add_text`` gets files instead); ``files(directory)`` writes into
    each directory of the file loggers (their own, else ``fallback_dir``; ``fallback_dir`` alone when the run has
    no logger), created first. ``DummyLogger`` counts as no logger. ``key`` names the record in the warning for a
    file logger that has nowhere to write.
    """
    destinations: list[str] = []
    file_loggers: list[object] = []
    for logger in logger_list:
        kind = logger_kind(logger)
        if kind == "wandb":
            destinations += wandb(logger)
        elif kind == "tensorboard" and (writer := _writer_for(logger, text)) is not None:
            destinations += tensorboard(writer)
        elif kind in ("file", "tensorboard"):
            file_loggers.append(logger)
    for directory in _file_dirs(file_loggers, _has_real_logger(logger_list), fallback_dir, key):
        directory.mkdir(parents=True, exist_ok=True)
        destinations += files(directory)
    return destinations


def log_image(
    loggers: Sequence[object] | None,
    key: str,
    image: np.ndarray,
    *,
    step: int,
    caption: str | None = None,
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log one rendered image to every logger; call on rank zero only.

    Args:
        loggers: e.g. ``trainer.loggers`` (a list; ``None`` or ``[]`` means no logger).
        key: metric key, e.g. ``"xai/gradcam"``.
        image: ``numpy.uint8`` ``[H, W, 3]`` RGB (float arrays are refused, see the module docstring).
        step: trainer global step.
        caption: shown under the image in W&B; stored as the PNG ``Description`` for file output; TensorBoard
            has no captions.
        fallback_dir: where the PNG goes for a logger without ``log_dir``/``save_dir``, and when there are no
            loggers at all. Files are named ``<key with "/" -> "_">_step<step>.png``.

    Returns:
        The destinations written: ``"wandb:<key>"``, ``"tensorboard:<key>"`` and PNG file paths. Empty when there
        are no loggers and no ``fallback_dir`` (nothing asked to be kept); a logger with no directory of its own
        and no ``fallback_dir`` is skipped with a warning.
    """
    logger_list = _check_loggers(loggers)
    _check_key(key)
    _check_image(image, "image")
    _check_step(step)
    step = int(step)

    def to_files(directory: Path) -> list[str]:
        stem = unique_stem(directory, f"{_file_stem(key)}_step{step}")
        return [str(save_png(image, directory / f"{stem}.png", caption=caption))]

    return route(
        logger_list,
        key,
        wandb=lambda logger: wandb_log(logger, {key: _wandb_image(image, caption)}, step),
        tensorboard=lambda writer: _tensorboard_image(writer, key, image, step),
        files=to_files,
        fallback_dir=fallback_dir,
    )


def _clean_cell(value: Any, where: str) -> Any:
    if _is_image(value):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{where}: tensor cells must hold one number, got shape {list(value.shape)}")
        return value.item()
    if isinstance(value, np.ndarray):
        raise TypeError(
            f"{where}: array cells must be uint8 [H, W, 3] images, got dtype {value.dtype} shape {list(value.shape)}"
        )
    return value


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (what TensorBoard's Text tab renders). Image cells are left out with
    their columns (named in a note under the table); ``|`` in cells is escaped; floats get 4 significant digits."""
    image_cols = {j for j in range(len(columns)) if any(_is_image(row[j]) for row in rows)}
    keep = [j for j in range(len(columns)) if j not in image_cols]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(columns[j]) for j in keep) + " |",
        "|" + "|".join("---" for _ in keep) + "|",
        *("| " + " | ".join(cell(row[j]) for j in keep) + " |" for row in rows),
    ]
    if image_cols:
        lines.append("")
        lines.append("image columns left out: " + ", ".join(str(columns[j]) for j in sorted(image_cols)))
    return "\n".join(lines)


def log_table(
    loggers: Sequence[object] | None,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    step: int,
    fallback_dir: str | os.PathLike | None = None,
    image_files: bool = True,
) -> list[str]:
    """Log a table whose cells are numbers, strings or ``uint8 [H, W, 3]`` images; call on rank zero only.

    * W&B: a ``wandb.Table`` (image cells become ``wandb.Image``).
    * TensorBoard: the table as markdown text (:func:`markdown_table`, shown in the Text tab), image columns
      left out; no files. (A writer without ``add_text`` gets the CSV below instead.)
    * every other logger and the no-logger case: one CSV ``<key>_step<step>.csv`` in the logger's directory or
      ``fallback_dir``. With ``image_files=True`` each image cell is saved as ``<key>_step<step>_r<row>_c<col>.png``
      next to it and the cell holds that file name; with ``image_files=False`` image columns are left out of the
      CSV (use it when the images are logged elsewhere, e.g. as the explanation grid).

    Returns the destinations written, as :func:`log_image` does.
    """
    logger_list = _check_loggers(loggers)
    _check_key(key)
    _check_step(step)
    step = int(step)
    if isinstance(columns, str) or not isinstance(columns, Sequence) or not columns:
        raise ValueError(f"columns must be a non-empty list of strings, got {columns!r}")
    if not all(isinstance(c, str) for c in columns) or len(set(columns)) != len(columns):
        raise ValueError(f"columns must be distinct strings, got {list(columns)!r}")
    if isinstance(rows, str) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a list of rows (lists), got {type(rows).__name__}")
    clean_rows: list[list[Any]] = []
    for i, row in enumerate(rows):
        if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != len(columns):
            raise ValueError(f"row {i} must be a list of {len(columns)} cells (one per column), got {row!r}")
        clean_rows.append([_clean_cell(cell, f"row {i}, column {columns[j]!r}") for j, cell in enumerate(row)])

    image_cols = {j for j in range(len(columns)) if any(_is_image(row[j]) for row in clean_rows)}
    keep = [j for j in range(len(columns)) if image_files or j not in image_cols]

    def to_wandb(logger: object) -> list[str]:
        data = [[_wandb_image(c) if _is_image(c) else c for c in row] for row in clean_rows]
        return wandb_log(logger, {key: _wandb().Table(columns=list(columns), data=data)}, step)

    def to_tensorboard(writer: Any) -> list[str]:
        writer.add_text(key, markdown_table(columns, clean_rows), step)
        return [f"tensorboard:{key}"]

    def to_files(directory: Path) -> list[str]:
        stem = unique_stem(directory, f"{_file_stem(key)}_step{step}")
        csv_rows = []
        for i, row in enumerate(clean_rows):
            out_row = []
            for j in keep:
                cell = row[j]
                if _is_image(cell):
                    name = f"{stem}_r{i}_c{j}.png"
                    save_png(cell, directory / name)
                    cell = name
                out_row.append(cell)
            csv_rows.append(out_row)
        return [write_csv(directory / f"{stem}.csv", [columns[j] for j in keep], csv_rows)]

    return route(
        logger_list,
        key,
        wandb=to_wandb,
        tensorboard=to_tensorboard,
        files=to_files,
        fallback_dir=fallback_dir,
        text=True,
    )


def csv_path(directory: Path, key: str, step: int) -> Path:
    """``<directory>/<key>_step<step>.csv``, never overwriting a file (see :func:`unique_stem`)."""
    return directory / f"{unique_stem(directory, f'{_file_stem(key)}_step{step}')}.csv"


def write_csv(path: str | os.PathLike, header: Sequence[Any], rows: Any) -> str:
    """Write one CSV file (header, then rows) and return its path: the one CSV writer of the file loggers."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(header))
        writer.writerows(rows)
    return str(path)


def _as_series(values: Any, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {list(arr.shape)}")
    return arr.tolist()


def log_line_plot(
    loggers: Sequence[object] | None,
    key: str,
    xs: Sequence[float] | np.ndarray | torch.Tensor,
    ys: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    step: int,
    title: str = "",
    x_label: str = "x",
    y_label: str = "y",
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log one curve ``ys`` against ``xs`` (e.g. a deletion curve); call on rank zero only.

    W&B gets a native line plot (``wandb.plot.line`` over a two-column table ``x_label``, ``y_label``);
    TensorBoard the curve drawn as a figure (:func:`~lightning_xai.viz.figures.render_curves`, Images tab; no
    files); every other logger and the no-logger case get ``<key>_step<step>.csv`` with those two columns.
    Several curves in one chart: :func:`lightning_xai.viz.dashboard.log_curves`. Returns the destinations
    written, as :func:`log_image` does.
    """
    logger_list = _check_loggers(loggers)
    _check_key(key)
    _check_step(step)
    step = int(step)
    x = _as_series(xs, "xs")
    y = _as_series(ys, "ys")
    if len(x) != len(y):
        raise ValueError(f"xs and ys must have the same length, got {len(x)} and {len(y)}")
    for name, label in (("x_label", x_label), ("y_label", y_label), ("title", title)):
        if not isinstance(label, str):
            raise TypeError(f"{name} must be a string, got {label!r}")
    if x_label == y_label or not x_label or not y_label:
        raise ValueError(f"x_label and y_label must be distinct non-empty strings, got {x_label!r} and {y_label!r}")
    rows = [[a, b] for a, b in zip(x, y)]

    def to_wandb(logger: object) -> list[str]:
        wandb = _wandb()
        table = wandb.Table(columns=[x_label, y_label], data=rows)
        return wandb_log(logger, {key: wandb.plot.line(table, x_label, y_label, title=title)}, step)

    def to_tensorboard(writer: Any) -> list[str]:
        figure = render_curves(x, {y_label: y}, title=title, x_label=x_label, y_label=y_label)
        return _tensorboard_image(writer, key, figure, step)

    return route(
        logger_list,
        key,
        wandb=to_wandb,
        tensorboard=to_tensorboard,
        files=lambda directory: [write_csv(csv_path(directory, key, step), [x_label, y_label], rows)],
        fallback_dir=fallback_dir,
    )
