"""The visual vocabulary of every rendered explanation: which matplotlib colormap encodes what, and the font.

Two colour schemes, one meaning each, used by every renderer of :mod:`lightning_xai.viz`:

* **signed** maps (evidence for *and* against the explained class, e.g. Integrated Gradients, gradient x input,
  LRP) use matplotlib's diverging ``bwr`` colormap centred on zero: blue = negative (against), white = exactly
  zero, red = positive (for). ``bwr`` is white at its centre, so "no evidence" is white and never a tint.
* **unsigned** maps (magnitudes, e.g. Grad-CAM after its ReLU, gradient magnitude) use the sequential,
  perceptually uniform ``inferno`` colormap: black = zero, pale yellow = the largest value.

The colormaps are read from matplotlib (``matplotlib.colormaps``) and the text is drawn by Pillow with
matplotlib's bundled DejaVu Sans, so no palette or glyph is hand-made here. Both are loaded on first use, not at
import: ``import lightning_xai.viz`` stays fast and a notebook that never renders never imports matplotlib.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["SIGNED_COLORMAP", "UNSIGNED_COLORMAP", "colormap_name", "colormap_table", "font", "matplotlib"]

#: matplotlib colormap of signed maps (diverging around 0, white at 0).
SIGNED_COLORMAP = "bwr"
#: matplotlib colormap of unsigned maps (sequential, black at 0).
UNSIGNED_COLORMAP = "inferno"

# Entries of the sampled diverging table: odd, so that 0 is a sample (exactly white for ``bwr``).
_DIVERGING_SAMPLES = 257


def matplotlib() -> Any:
    """The ``matplotlib`` module, or an ImportError that says how to install it."""
    try:
        import matplotlib as mpl
    except ImportError as err:  # pragma: no cover - matplotlib is a core dependency
        raise ImportError(
            "lightning_xai.viz renders heatmaps with matplotlib's colormaps: pip install 'matplotlib>=3.7'"
        ) from err
    return mpl


def colormap_name(signed: bool) -> str:
    """The matplotlib colormap used for ``signed`` (``bwr``) or unsigned (``inferno``) maps."""
    return SIGNED_COLORMAP if signed else UNSIGNED_COLORMAP


@functools.lru_cache(maxsize=4)
def colormap_table(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, colours)`` of the scheme: positions in [-1, 1] (signed) or [0, 1] (unsigned) and the
    matplotlib colours at those positions as RGB in 0..255 (rounded to integers, so a value that lands on a
    position is drawn in exactly the colormap's colour). Linear interpolation between neighbouring entries
    reproduces the colormap (a listed colormap's own entries; a segmented one sampled at 257 points)."""
    mpl = matplotlib()
    cmap = mpl.colormaps[colormap_name(signed)]
    if isinstance(cmap, mpl.colors.ListedColormap):
        colours = np.asarray(cmap.colors, dtype=np.float64)[:, :3]
    else:
        colours = np.asarray(cmap.resampled(_DIVERGING_SAMPLES)(np.linspace(0.0, 1.0, _DIVERGING_SAMPLES)))[:, :3]
    colours = np.rint(colours * 255.0)
    positions = np.linspace(-1.0 if signed else 0.0, 1.0, len(colours))
    positions.setflags(write=False)
    colours.setflags(write=False)
    return positions, colours


@functools.lru_cache(maxsize=16)
def font(size: int, bold: bool = False) -> Any:
    """A Pillow font of ``size`` pixels: matplotlib's bundled DejaVu Sans (the same glyphs on every machine),
    else Pillow's own scalable default font."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        path = font_manager.findfont(
            font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"),
            fallback_to_default=True,
        )
        return ImageFont.truetype(path, size)
    except Exception:  # pragma: no cover - no FreeType or no matplotlib font: Pillow's default
        return ImageFont.load_default(size)
