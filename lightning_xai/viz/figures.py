"""Curves as pictures: a line plot rendered to ``uint8`` RGB with matplotlib's object-oriented API.

For loggers that show images but have no native chart of an arbitrary curve (TensorBoard's scalars need integer
steps; a deletion curve's x axis is the fraction of pixels removed, a sanity cascade's the randomised layer), and
for PNG files. matplotlib's Agg canvas is used directly (no ``pyplot``, no global figure state, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lightning_xai.viz.style import matplotlib

__all__ = ["render_curves"]


def render_curves(
    xs: Sequence[float] | np.ndarray,
    series: Mapping[str, Sequence[float] | np.ndarray],
    *,
    title: str = "",
    x_label: str = "x",
    y_label: str = "y",
    x_ticklabels: Sequence[str] | None = None,
    size: tuple[float, float] = (5.0, 3.4),
    dpi: int = 100,
) -> np.ndarray:
    """Plot every series against ``xs`` (one line each, named in a legend) and return ``uint8 [H, W, 3]``.

    ``x_ticklabels`` names the x positions (e.g. the randomised layers of a sanity cascade). Non-finite points
    are left out of the line (a gap), never drawn as a value.
    """
    mpl = matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(xs, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"render_curves: xs must be a non-empty 1-D sequence, got shape {list(x.shape)}")
    if not series:
        raise ValueError("render_curves: series must name at least one curve")
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = mpl.colormaps["tab10"].colors
    for k, (name, ys) in enumerate(series.items()):
        y = np.asarray(ys, dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"render_curves: series {name!r} has {y.size} points but xs has {x.size}")
        ax.plot(x, np.where(np.isfinite(y), y, np.nan), marker="o", markersize=3, label=str(name),
                color=colours[k % len(colours)])
    if x_ticklabels is not None:
        if len(x_ticklabels) != x.size:
            raise ValueError(f"render_curves: {len(x_ticklabels)} x_ticklabels for {x.size} points")
        ax.set_xticks(x, [str(t) for t in x_ticklabels], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3]).astype(np.uint8)
