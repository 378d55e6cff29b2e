"""Heatmap rendering (uint8 RGB overlays and grids) and the logger adapter. No Lightning import."""

from lightning_xai.viz.logging import log_image, log_line_plot, log_table, logger_kind
from lightning_xai.viz.render import (
    colorize,
    explanation_grid,
    is_signed,
    normalize_attributions,
    overlay,
    save_png,
    to_uint8_images,
)

__all__ = [
    "colorize",
    "explanation_grid",
    "is_signed",
    "log_image",
    "log_line_plot",
    "log_table",
    "logger_kind",
    "normalize_attributions",
    "overlay",
    "save_png",
    "to_uint8_images",
]
