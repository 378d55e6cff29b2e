"""The labelled explanation grid, read back from its PNG: headers, row labels, title, colour bars, marks, tile
sizes and interpolation, and the fixed scale across epochs (ScaleTracker)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_xai.viz.grid import ExplanationGrid, render_explanations, render_method_images
from lightning_xai.viz.render import save_png, to_uint8_images
from lightning_xai.viz.tiles import MARK_CONSTANT, MARK_FAILED, MARK_NONFINITE, MARK_ZERO, ScaleTracker

CLASSES = ["circle", "square", "triangle", "star", "ring", "cross"]
WRONG_RED = (200, 30, 30)


def _data(seed: int = 0, b: int = 4, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g)
    maps = {
        "saliency": torch.rand(b, 3, size, size, generator=g),  # unsigned
        "integrated_gradients": torch.randn(b, 3, size, size, generator=g),  # signed
        "gradcam": torch.rand(b, 1, size // 4, size // 4, generator=g),  # unsigned, low resolution
    }
    return images, maps


def _read_back(grid: ExplanationGrid, tmp_path, name: str = "grid.png") -> np.ndarray:
    """Write the grid as PNG and read it back: every assertion below is on what a reader of the file sees."""
    path = save_png(grid.image, tmp_path / name)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def _crop(png: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return png[y0:y1, x0:x1]


def _ink(region: np.ndarray) -> int:
    """Number of dark (text) pixels."""
    return int((region.astype(int).sum(axis=-1) < 300).sum())


def _has_colour(region: np.ndarray, colour, tol: int = 12) -> bool:
    return bool((np.abs(region.astype(int) - np.array(colour)).max(axis=-1) <= tol).any())


def test_headers_exist_and_differ_per_method(tmp_path):
    images, maps = _data()
    grid = render_explanations(images, maps, labels=[0, 1, 2, 3], logits=torch.randn(4, 6), class_names=CLASSES)
    png = _read_back(grid, tmp_path)
    assert png.dtype == np.uint8 and png.ndim == 3 and png.shape[2] == 3
    assert grid.columns == ["input", "saliency", "integrated_gradients", "gradcam"]
    crops = {c: _crop(png, grid.headers[c]) for c in grid.columns}
    for column, crop in crops.items():
        assert _ink(crop) > 20, f"header of {column!r} has no text"
        # the header sits above its column
        assert grid.headers[column][3] <= grid.tiles[(0, column)][1]
        assert grid.headers[column][0] == grid.tiles[(0, column)][0]
    names = list(crops)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not np.array_equal(crops[names[i]], crops[names[j]]), (names[i], names[j])


def test_row_labels_differ_and_wrong_predictions_are_marked(tmp_path):
    images, maps = _data(1)
    logits = torch.full((4, 6), -5.0)
    predicted = [0, 1, 4, 3]  # row 2 is wrong (true class 2)
    for i, c in enumerate(predicted):
        logits[i, c] = 5.0
    grid = render_explanations(images, maps, labels=[0, 1, 2, 3], logits=logits, class_names=CLASSES)
    png = _read_back(grid, tmp_path)
    labels = [_crop(png, box) for box in grid.row_labels]
    for i in range(4):
        assert _ink(labels[i]) > 50, f"row {i} has no label"
        for j in range(i + 1, 4):
            assert not np.array_equal(labels[i], labels[j]), (i, j)
        # each label sits beside its row's tiles
        assert grid.row_labels[i][1] == grid.tiles[(i, "input")][1]
    assert _has_colour(labels[2], WRONG_RED), "the wrong prediction must be marked in red"
    for i in (0, 1, 3):
        assert not _has_colour(labels[i], WRONG_RED), f"row {i} is right and must not carry the wrong mark"
    # the same rows with another predicted class name read differently (the name is drawn, not an index)
    upper = [c.upper() for c in CLASSES]
    other = render_explanations(images, maps, labels=[0, 1, 2, 3], logits=logits, class_names=upper)
    assert not np.array_equal(_crop(other.image, other.row_labels[0]), labels[0])


def test_non_finite_logits_are_said_not_drawn_as_a_prediction(tmp_path):
    images, maps = _data(2)
    logits = torch.randn(4, 6)
    logits[1, 3] = float("nan")
    grid = render_explanations(images, maps, logits=logits)  # no labels: no right/wrong mark anywhere
    png = _read_back(grid, tmp_path)
    assert _has_colour(_crop(png, grid.row_labels[1]), WRONG_RED)
    for i in (0, 2, 3):
        assert not _has_colour(_crop(png, grid.row_labels[i]), WRONG_RED)


def test_title_shows_epoch_and_step(tmp_path):
    images, maps = _data(3)
    first = render_explanations(images, maps, title="ExplanationMonitor", epoch=1, step=10)
    second = render_explanations(images, maps, title="ExplanationMonitor", epoch=2, step=20)
    a, b = _read_back(first, tmp_path, "a.png"), _read_back(second, tmp_path, "b.png")
    assert first.title is not None and _ink(_crop(a, first.title)) > 50
    assert not np.array_equal(_crop(a, first.title), _crop(b, second.title))
    assert render_explanations(images, maps).title is None


@pytest.mark.parametrize("scheme, cmap_name", [("signed", "bwr"), ("unsigned", "inferno")])
def test_colour_bar_ends_are_the_colormap_ends(tmp_path, scheme, cmap_name):
    images, maps = _data(4)
    grid = render_explanations(images, maps)
    png = _read_back(grid, tmp_path)
    assert set(grid.colorbars) == {"signed", "unsigned"}, "one colour bar per colour scheme in use"
    bar = _crop(png, grid.colorbars[scheme])
    cmap = matplotlib.colormaps[cmap_name]
    low = np.rint(np.array(cmap(0.0)[:3]) * 255).astype(np.uint8)
    high = np.rint(np.array(cmap(1.0)[:3]) * 255).astype(np.uint8)
    middle_row = bar.shape[0] // 2
    np.testing.assert_array_equal(bar[middle_row, 0], low)
    np.testing.assert_array_equal(bar[middle_row, -1], high)
    if scheme == "signed":  # diverging around 0: white in the middle
        centre = bar[middle_row, bar.shape[1] // 2].astype(int)
        assert centre.min() >= 250, centre
    # a caption and tick labels under / over the bar
    x0, y0, x1, y1 = grid.colorbars[scheme]
    assert _ink(png[y0 - 16 : y0, x0:x1]) > 30 and _ink(png[y1 : y1 + 16, x0:x1]) > 5


def test_only_the_schemes_in_use_get_a_colour_bar():
    images, maps = _data(5)
    unsigned_only = {"saliency": maps["saliency"], "gradcam": maps["gradcam"]}
    assert set(render_explanations(images, unsigned_only).colorbars) == {"unsigned"}
    assert set(render_explanations(images, unsigned_only, signed=True).colorbars) == {"signed"}


def test_zero_constant_non_finite_and_failed_maps_carry_their_mark(tmp_path):
    images, maps = _data(6)
    maps["saliency"][1] = 0.0
    maps["gradcam"][2] = 0.7
    maps["integrated_gradients"][3, 0, 5, 5] = float("nan")
    maps["lrp"] = None
    grid = render_explanations(images, maps)
    png = _read_back(grid, tmp_path)
    assert grid.marks[(1, "saliency")] == MARK_ZERO
    assert grid.marks[(2, "gradcam")] == MARK_CONSTANT
    assert grid.marks[(3, "integrated_gradients")] == MARK_NONFINITE
    assert all(grid.marks[(i, "lrp")] == MARK_FAILED for i in range(4))
    assert len(grid.marks) == 3 + 4, grid.marks
    for (row, method), _mark in grid.marks.items():
        tile = _crop(png, grid.tiles[(row, method)])
        h, w = tile.shape[:2]
        centre = tile[h // 2 - 8 : h // 2 + 8, w // 4 : 3 * w // 4]
        assert _ink(centre) > 10 and (centre == 255).all(axis=-1).sum() > 20, "a framed white label with text"
        assert _has_colour(tile, (150, 150, 150), tol=0), "hatching"
    # the unmarked tiles of the same methods carry no label box
    tile = _crop(png, grid.tiles[(0, "saliency")])
    assert not _has_colour(tile, (150, 150, 150), tol=0) or (tile == 255).all(axis=-1).sum() < 20
    # a non-finite sample does not change how the other samples are drawn
    clean = dict(maps)
    clean["integrated_gradients"] = maps["integrated_gradients"].clone()
    clean["integrated_gradients"][3] = 1.0
    other = render_explanations(images, clean)
    key = (0, "integrated_gradients")
    np.testing.assert_array_equal(_crop(other.image, other.tiles[key]), _crop(png, grid.tiles[key]))


def test_tiles_are_large_image_nearest_heatmap_smooth(tmp_path):
    images, maps = _data(7, size=20)
    grid = render_explanations(images, {"gradcam": maps["gradcam"]}, overlay=False, tile_size=96)
    png = _read_back(grid, tmp_path)
    x0, y0, x1, y1 = grid.tiles[(0, "input")]
    assert (x1 - x0, y1 - y0) == (100, 100), "smallest integer factor reaching 96 px: 5 x 20"
    expected = to_uint8_images(images)[0].repeat(5, axis=0).repeat(5, axis=1)
    np.testing.assert_array_equal(_crop(png, grid.tiles[(0, "input")]), expected)
    heat = _crop(png, grid.tiles[(0, "gradcam")])
    # a 5x5 map upsampled bilinearly to 100 px: many more distinct colours along a row than source cells
    assert len({tuple(p) for p in heat[50]}) > 20


def test_fixed_scale_shows_drift_as_brightness(tmp_path):
    images, maps = _data(8)
    unsigned = {"saliency": maps["saliency"]}
    tracker = ScaleTracker(percentile=99.0)
    first = render_explanations(images, unsigned, scale=tracker, epoch=0, overlay=False)
    frozen = tracker.scales["saliency"]
    assert first.scales["saliency"] == pytest.approx(frozen) and tracker.frozen_at["saliency"] == 0
    faded = render_explanations(images, {"saliency": maps["saliency"] * 0.25}, scale=tracker, epoch=1, overlay=False)
    assert tracker.scales["saliency"] == frozen, "the scale stays frozen"

    def luma(g):
        tile = _crop(g.image, g.tiles[(0, "saliency")]).astype(float)
        return (tile @ np.array([0.299, 0.587, 0.114])).mean()

    assert luma(faded) < 0.6 * luma(first), "a map that shrinks 4x must look darker at a fixed scale"
    # per-map scaling hides the drift: the tile is the same
    a = render_explanations(images, unsigned, overlay=False)
    b = render_explanations(images, {"saliency": maps["saliency"] * 0.25}, overlay=False)
    np.testing.assert_array_equal(_crop(a.image, a.tiles[(0, "saliency")]), _crop(b.image, b.tiles[(0, "saliency")]))
    # the header carries the scale value; the state survives a round trip (resumable callbacks)
    assert not np.array_equal(_crop(first.image, first.headers["saliency"]), _crop(a.image, a.headers["saliency"]))
    restored = ScaleTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.scales == tracker.scales and restored.signed == tracker.signed
    assert restored.frozen_at == {"saliency": 0}


def test_tracker_keeps_the_colour_scheme_and_waits_for_a_non_zero_map():
    tracker = ScaleTracker()
    images = torch.rand(2, 3, 8, 8)
    grid = render_explanations(images, {"m": torch.zeros(2, 1, 8, 8)}, scale=tracker)
    assert "m" not in tracker.scales and grid.marks == {(0, "m"): MARK_ZERO, (1, "m"): MARK_ZERO}
    render_explanations(images, {"m": torch.randn(2, 1, 8, 8)}, scale=tracker, epoch=3)
    assert tracker.signed["m"] is True and tracker.frozen_at["m"] == 3
    later = render_explanations(images, {"m": torch.rand(2, 1, 8, 8)}, scale=tracker)  # all positive now
    assert later.signed["m"] is True, "the first epoch's scheme is kept, so colours keep their meaning"


def test_method_images_one_per_method():
    images, maps = _data(9)
    tracker = ScaleTracker()
    full = render_explanations(images, maps, scale=tracker)
    per_method = render_method_images(images, maps, scale=tracker)
    assert list(per_method) == list(maps)
    for name, grid in per_method.items():
        assert grid.columns == ["input", name]
        assert grid.scales[name] == full.scales[name]
        np.testing.assert_array_equal(grid.crop(grid.tiles[(1, name)]), full.crop(full.tiles[(1, name)]))


def test_render_rejects_bad_input():
    images, maps = _data(10)
    with pytest.raises(TypeError, match="mapping"):
        render_explanations(images, [maps["saliency"]])
    with pytest.raises(ValueError, match="'input'"):
        render_explanations(images, {"input": maps["saliency"]})
    with pytest.raises(ValueError, match="tile_size"):
        render_explanations(images, maps, tile_size=4)
    with pytest.raises(ValueError, match="batch size 3"):
        render_explanations(images, {"x": torch.rand(3, 1, 8, 8)})
    with pytest.raises(ValueError, match="logits"):
        render_explanations(images, maps, logits=torch.rand(4))
    with pytest.raises(ValueError, match="labels has 2 entries"):
        render_explanations(images, maps, labels=[0, 1])
    with pytest.raises(TypeError, match="ScaleTracker"):
        render_explanations(images, maps, scale=0.5)
    with pytest.raises(ValueError, match="percentile"):
        ScaleTracker(percentile=0)


def test_tile_images_and_upscale_nearest():
    from lightning_xai.viz.render import tile_images, upscale_nearest

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    grid = tile_images(images, columns=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
    np.testing.assert_array_equal(grid[1:5, 1:7], images[0])
    np.testing.assert_array_equal(grid[11:15, 1:7], images[4])  # row 2, column 0
    assert (grid[11:15, 8:14] == 255).all(), "the empty slot stays white"
    assert tile_images(images).shape == (4 + 4, 5 * 8 + 2, 3)  # one row by default
    big = upscale_nearest(images[0], minimum=12)
    assert big.shape == (12, 18, 3)  # factor 3 = ceil(12 / 4)
    np.testing.assert_array_equal(big[::3, ::3], images[0])
    assert upscale_nearest(images[0], minimum=2).shape == images[0].shape
    with pytest.raises(ValueError, match="uint8"):
        tile_images(images.astype(np.float32))
    with pytest.raises(ValueError, match="minimum"):
        upscale_nearest(images[0], minimum=0)
