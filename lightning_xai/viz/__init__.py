"""Heatmap rendering (uint8 RGB overlays, the labelled explanation grid, curves) and the logger adapter.

No Lightning import: usable from a notebook on any model's attributions.
"""

from lightning_xai.viz.dashboard import (
    flatten_config,
    log_config,
    log_curves,
    log_explanations,
    log_samples_table,
    log_scatter,
    log_text,
)
from lightning_xai.viz.figures import render_curves
from lightning_xai.viz.grid import ExplanationGrid, render_explanations, render_method_images
from lightning_xai.viz.logging import log_image, log_line_plot, log_table, logger_kind, markdown_table
from lightning_xai.viz.render import (
    colorize,
    explanation_grid,
    is_signed,
    normalize_attributions,
    overlay,
    save_png,
    tile_images,
    to_uint8_images,
    upscale_nearest,
)
from lightning_xai.viz.text import batch_to_html, decode_tokens, tokens_to_html, tokens_to_text
from lightning_xai.viz.tiles import MARK_CONSTANT, MARK_FAILED, MARK_NONFINITE, MARK_ZERO, ScaleTracker

__all__ = [
    "MARK_CONSTANT",
    "MARK_FAILED",
    "MARK_NONFINITE",
    "MARK_ZERO",
    "ExplanationGrid",
    "ScaleTracker",
    "batch_to_html",
    "colorize",
    "decode_tokens",
    "explanation_grid",
    "flatten_config",
    "is_signed",
    "log_config",
    "log_curves",
    "log_explanations",
    "log_image",
    "log_line_plot",
    "log_samples_table",
    "log_scatter",
    "log_table",
    "log_text",
    "logger_kind",
    "markdown_table",
    "normalize_attributions",
    "overlay",
    "render_curves",
    "render_explanations",
    "render_method_images",
    "save_png",
    "tile_images",
    "to_uint8_images",
    "tokens_to_html",
    "tokens_to_text",
    "upscale_nearest",
]
