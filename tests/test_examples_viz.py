"""The examples draw their heatmaps with the labelled grid renderer (lightning_xai.viz.grid)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contrastive_example_writes_a_labelled_grid(tmp_path, capsys):
    path = tmp_path / "contrastive.png"
    _load("contrastive").main(["--steps", "40", "--save", str(path)])
    assert "heatmaps written to" in capsys.readouterr().out
    with Image.open(path) as im:
        assert im.mode == "RGB"
        png = np.asarray(im)
    # 8 rows of 96-px tiles (16 px images x 6) and 7 columns (input + 2 methods x 3 questions), plus labels
    assert png.shape[0] > 8 * 96 and png.shape[1] > 7 * 96
    # the header strip (above the first tile row) carries text: dark pixels right of the row-label panel
    header = png[30:60, 150:]
    assert (header.astype(int).sum(axis=-1) < 300).sum() > 100
