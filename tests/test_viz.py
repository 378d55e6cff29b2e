"""Heatmap rendering (exact values on constructed maps) and the logger adapter (real W&B offline run, CSV/PNG
fallback, TensorBoard)."""

from __future__ import annotations

import csv
import glob
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_xai.viz.logging import log_image, log_line_plot, log_table, logger_kind
from lightning_xai.viz.render import (
    DIVERGING_COLORMAP,
    SEQUENTIAL_COLORMAP,
    colorize,
    explanation_grid,
    is_signed,
    normalize_attributions,
    overlay,
    save_png,
    to_uint8_images,
)

TOP_DIVERGING = DIVERGING_COLORMAP[1][-1].astype(np.uint8)
BOTTOM_DIVERGING = DIVERGING_COLORMAP[1][0].astype(np.uint8)
TOP_SEQUENTIAL = SEQUENTIAL_COLORMAP[1][-1].astype(np.uint8)
BOTTOM_SEQUENTIAL = SEQUENTIAL_COLORMAP[1][0].astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB", im.mode
        return np.asarray(im).copy()


def _random_image(seed: int, h: int = 8, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- normalise


def test_signed_percentile_clipping_exact():
    # |a| = 1..100 with alternating signs: the 99th percentile (linear interpolation) is 99 + 0.01 * (100 - 99).
    mags = torch.arange(1.0, 101.0)
    signs = torch.tensor([1.0, -1.0]).repeat(50)
    a = (mags * signs).view(1, 10, 10)
    out = normalize_attributions(a)
    scale = 99.01
    assert out.shape == (1, 10, 10)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(torch.sign(out), torch.sign(a)), "signs must be preserved"
    flat = out.flatten()
    assert flat[99].item() == pytest.approx(-1.0)  # -100 is clipped to -1
    assert flat[98].item() == pytest.approx(99 / scale, rel=1e-6)  # +99 lies just below the percentile
    assert flat[49].item() == pytest.approx(-50 / scale, rel=1e-6)
    assert flat[0].item() == pytest.approx(1 / scale, rel=1e-6)
    # percentile=100 scales by the maximum: nothing is clipped
    assert torch.allclose(normalize_attributions(a, percentile=100.0), a / 100.0)


def test_percentile_matches_numpy_per_sample_and_channels_summed():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 9, 7, generator=g)
    a[1] *= 1000.0  # per-sample scaling: a sample's scale does not affect another one
    out = normalize_attributions(a, signed=True, percentile=90.0)
    reduced = a.sum(dim=1).numpy()
    for i in range(3):
        q = np.percentile(np.abs(reduced[i]), 90.0)
        expected = np.clip(reduced[i] / q, -1, 1)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-5, atol=1e-6)
    # unsigned reduction is the sum of absolute values over channels
    out_abs = normalize_attributions(a, signed=False, percentile=90.0)
    reduced_abs = a.abs().sum(dim=1).numpy()
    for i in range(3):
        expected = np.clip(reduced_abs[i] / np.percentile(reduced_abs[i], 90.0), 0, 1)
        np.testing.assert_allclose(out_abs[i].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_channel_cancellation_signed_vs_unsigned():
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, 0, 0], a[0, 1, 0, 0] = 3.0, -3.0  # cancels when summed with signs
    a[0, 0, 1, 1] = 1.0
    signed = normalize_attributions(a, signed=True, percentile=100.0)
    unsigned = normalize_attributions(a, signed=False, percentile=100.0)
    assert signed[0, 0, 0] == 0 and signed[0, 1, 1] == 1
    assert unsigned[0, 0, 0] == 1 and unsigned[0, 1, 1] == pytest.approx(1 / 6)


def test_all_zero_map_stays_zero():
    for signed in (None, True, False):
        out = normalize_attributions(torch.zeros(2, 3, 5, 5), signed=signed)
        assert torch.equal(out, torch.zeros(2, 5, 5)), signed
    # one zero sample next to a non-zero one
    a = torch.zeros(2, 4, 4)
    a[1, 2, 2] = -5.0
    out = normalize_attributions(a, signed=True)
    assert torch.isfinite(out).all() and out[0].abs().sum() == 0 and out[1, 2, 2] == -1


def test_sparse_map_falls_back_to_max():
    a = torch.zeros(1, 20, 20)
    a[0, 3, 4] = 0.25  # one non-zero pixel: the 99th percentile of |a| is zero
    out = normalize_attributions(a)
    assert out[0, 3, 4] == 1.0 and out.sum() == 1.0


def test_unsigned_auto_detection():
    pos = torch.rand(2, 1, 6, 6)
    assert not is_signed(pos)
    out = normalize_attributions(pos, percentile=100.0)
    assert out.min() >= 0 and out.max() == pytest.approx(1.0)
    # all-negative: unsigned, rendered as magnitude in [0, 1]
    out_neg = normalize_attributions(-pos, percentile=100.0)
    assert torch.allclose(out_neg, out)
    # both signs (even only across channels): signed, channel-summed
    mixed = torch.cat([pos, -2 * pos], dim=1)
    assert is_signed(mixed)
    out_mixed = normalize_attributions(mixed, percentile=100.0)
    assert torch.allclose(out_mixed, -out), "auto must pick the signed (channel-sum) reduction"


def test_normalize_rejects_bad_input():
    a = torch.randn(1, 4, 4)
    for bad in (0, 0.0, 101, -5, True):
        with pytest.raises(ValueError, match="percentile"):
            normalize_attributions(a, percentile=bad)
    with pytest.raises(TypeError, match="signed"):
        normalize_attributions(a, signed="yes")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        normalize_attributions(torch.randn(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        normalize_attributions(torch.tensor([[[float("nan"), 1.0]]]))
    with pytest.raises(TypeError, match="Tensor"):
        normalize_attributions([[[1.0]]])


# ----------------------------------------------------------------------------------------------------- colorize


def test_colorize_signed_endpoints_and_white_zero():
    maps = torch.tensor([[[-1.0, 0.0, 1.0, 5.0]]])
    rgb = colorize(maps, signed=True)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 1, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0, 0], BOTTOM_DIVERGING)
    np.testing.assert_array_equal(rgb[0, 0, 1], [255, 255, 255])
    np.testing.assert_array_equal(rgb[0, 0, 2], TOP_DIVERGING)
    np.testing.assert_array_equal(rgb[0, 0, 3], TOP_DIVERGING)  # clipped
    top, bottom = TOP_DIVERGING.astype(int), BOTTOM_DIVERGING.astype(int)
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100, "positive must be red, negative blue"
    # small values stay white-ish, and lightness falls monotonically away from zero on both sides
    ramp = colorize(torch.linspace(0, 1, 41).view(1, 1, -1), signed=True)[0, 0].astype(float)
    assert np.all(np.diff(_luma(ramp)) <= 1e-9) and ramp[1].min() > 240
    ramp_neg = colorize(torch.linspace(0, -1, 41).view(1, 1, -1), signed=True)[0, 0].astype(float)
    assert np.all(np.diff(_luma(ramp_neg)) <= 1e-9)


def test_colorize_unsigned_ramp_and_interpolation():
    values = torch.linspace(0, 1, 101).view(1, 1, -1)
    rgb = colorize(values, signed=False)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 1, 101, 3)
    np.testing.assert_array_equal(rgb[0, 0, 0], BOTTOM_SEQUENTIAL)
    np.testing.assert_array_equal(rgb[0, 0, -1], TOP_SEQUENTIAL)
    assert np.all(np.diff(_luma(rgb[0, 0].astype(float))) > 0), "a sequential map must get brighter with value"
    # piecewise linear: halfway between the first two stops is the rounded mean of their colours
    p, c = SEQUENTIAL_COLORMAP
    mid = colorize(np.array([[(p[0] + p[1]) / 2]]), signed=False)
    np.testing.assert_array_equal(mid[0, 0], np.rint((c[0] + c[1]) / 2).astype(np.uint8))
    # negative values in an unsigned map are clipped to 0; a 2-D map gives [H, W, 3]
    assert colorize(np.array([[-3.0]]), signed=False).shape == (1, 1, 3)
    np.testing.assert_array_equal(colorize(np.array([[-3.0]]), signed=False)[0, 0], BOTTOM_SEQUENTIAL)


def test_colorize_rejects_bad_input():
    with pytest.raises(TypeError, match="signed"):
        colorize(torch.zeros(1, 2, 2), signed=None)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        colorize(torch.zeros(1, 1, 2, 2), signed=True)
    with pytest.raises(ValueError, match="NaN"):
        colorize(torch.full((1, 2, 2), float("inf")), signed=True)


# ------------------------------------------------------------------------------------------------------- images


def test_to_uint8_unit_range_and_mean_std_round_trip():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 5, 6, generator=g)
    out = to_uint8_images(img)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 6, 3)
    np.testing.assert_array_equal(out, np.rint(img.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normed = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    np.testing.assert_array_equal(to_uint8_images(normed, mean=mean, std=std), out)
    # uint8 input passes through
    np.testing.assert_array_equal(to_uint8_images(torch.from_numpy(out).permute(0, 3, 1, 2)), out)


def test_to_uint8_min_max_per_image_and_gray():
    img = torch.zeros(2, 1, 2, 2)
    img[0] = torch.tensor([[-2.0, 0.0], [2.0, 6.0]])  # outside [0, 1]: stretched on its own
    img[1] = torch.tensor([[0.0, 0.5], [0.5, 1.0]])  # inside [0, 1]: x 255
    out = to_uint8_images(img)
    assert out.shape == (2, 2, 2, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all(), "gray must be R=G=B"
    np.testing.assert_array_equal(out[0, ..., 0], [[0, 64], [128, 255]])
    np.testing.assert_array_equal(out[1, ..., 0], [[0, 128], [128, 255]])
    # a constant image outside [0, 1] is black, not NaN
    np.testing.assert_array_equal(to_uint8_images(torch.full((1, 3, 2, 2), -4.0)), 0)


def test_to_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match="C in"):
        to_uint8_images(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="std"):
        to_uint8_images(torch.zeros(1, 3, 4, 4), mean=0.5, std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="mean"):
        to_uint8_images(torch.zeros(1, 3, 4, 4), mean=[0.5, 0.5])


def test_overlay_blend_endpoints_and_upsampling():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 16, 16, generator=g)
    attr = torch.randn(2, 1, 16, 16, generator=g)
    gray = np.rint(_luma(to_uint8_images(img).astype(float)))
    only_image = overlay(img, attr, alpha=0.0)
    assert only_image.dtype == np.uint8 and only_image.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(only_image, np.repeat(gray[..., None], 3, -1).astype(np.uint8))
    only_heat = overlay(img, attr, alpha=1.0)
    np.testing.assert_array_equal(only_heat, colorize(normalize_attributions(attr), signed=True))
    half = overlay(img, attr, alpha=0.5).astype(int)
    expected = (only_image.astype(int) + only_heat.astype(int)) / 2
    assert np.abs(half - expected).max() <= 1  # rounding
    # a 2x2 unsigned map (left column hot, right cold) upsampled to 16x16: edge pixels keep the source values
    small = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 1, 2, 2)
    up = overlay(img, small, alpha=1.0, percentile=100.0)
    assert up.shape == (2, 16, 16, 3)
    assert (up[:, :, 0] == TOP_SEQUENTIAL).all() and (up[:, :, -1] == BOTTOM_SEQUENTIAL).all()
    assert _luma(up[0, 0].astype(float))[7] > _luma(up[0, 0].astype(float))[8], "hot to cold from left to right"


def test_overlay_rejects_bad_input():
    img = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="batch size 3"):
        overlay(img, torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, torch.rand(2, 1, 8, 8), alpha=1.5)


def test_explanation_grid_layout_exact():
    g = torch.Generator().manual_seed(3)
    b, h, w, pad = 2, 8, 12, 3
    img = torch.rand(b, 3, h, w, generator=g)
    maps = {"saliency": torch.rand(b, 3, h, w, generator=g), "gradcam": torch.randn(b, 1, 4, 6, generator=g)}
    grid = explanation_grid(img, maps, pad=pad)
    assert grid.dtype == np.uint8 and grid.shape == (b * (h + pad) + pad, 3 * (w + pad) + pad, 3)
    columns = [to_uint8_images(img), overlay(img, maps["saliency"]), overlay(img, maps["gradcam"])]
    covered = np.zeros(grid.shape[:2], dtype=bool)
    for j, col in enumerate(columns):
        for i in range(b):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            np.testing.assert_array_equal(grid[y : y + h, x : x + w], col[i], err_msg=f"tile {i},{j}")
            covered[y : y + h, x : x + w] = True
    assert (grid[~covered] == 255).all(), "padding must be white"
    # bare heatmaps without overlay; no padding; no methods
    bare = explanation_grid(img, maps, overlay=False, pad=0)
    assert bare.shape == (b * h, 3 * w, 3)
    np.testing.assert_array_equal(bare[:h, w : 2 * w], colorize(normalize_attributions(maps["saliency"]), False)[0])
    assert explanation_grid(img, {}, pad=1).shape == (b * (h + 1) + 1, w + 2, 3)


def test_explanation_grid_rejects_bad_input():
    img = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="pad"):
        explanation_grid(img, {}, pad=-1)
    with pytest.raises(TypeError, match="mapping"):
        explanation_grid(img, [torch.rand(2, 1, 8, 8)])
    with pytest.raises(ValueError, match="gradcam"):
        explanation_grid(img, {"gradcam": torch.rand(1, 1, 8, 8)})


def test_save_png_round_trip(tmp_path):
    arr = _random_image(0)
    path = save_png(arr, tmp_path / "sub" / "x.png", caption="hello")
    np.testing.assert_array_equal(_read_png(path), arr)
    with Image.open(path) as im:
        assert im.text["Description"] == "hello"
    with pytest.raises(TypeError, match="uint8"):
        save_png(arr.astype(np.float32) / 255, tmp_path / "y.png")
    with pytest.raises(ValueError, match="shape"):
        save_png(arr[..., :2], tmp_path / "y.png")


def test_viz_imports_neither_lightning_nor_wandb():
    code = (
        "import sys, lightning_xai.viz.render, lightning_xai.viz.logging\n"
        "bad = [m for m in sys.modules if m in ('lightning', 'pytorch_lightning', 'wandb', 'matplotlib')"
        " or m.startswith(('lightning.', 'pytorch_lightning.', 'wandb.', 'matplotlib.'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------ logging


def _run_files(save_dir) -> str:
    runs = glob.glob(os.path.join(str(save_dir), "**", "offline-run-*", "files"), recursive=True)
    assert len(runs) == 1, runs
    return runs[0]


def test_wandb_offline_images_round_trip(tmp_path):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project="viz-test", save_dir=str(tmp_path), offline=True)
    assert logger_kind(logger) == "wandb"
    first, second = _random_image(1), _random_image(2)
    try:
        assert log_image([logger], "xai/heatmaps", first, step=3, caption="epoch 0") == ["wandb:xai/heatmaps"]
        assert log_image([logger], "xai/heatmaps", second, step=7, fallback_dir=tmp_path / "unused") == [
            "wandb:xai/heatmaps"
        ]
    finally:
        wandb.finish()
    files = _run_files(tmp_path)
    pngs = glob.glob(os.path.join(files, "media", "images", "**", "*.png"), recursive=True)
    assert len(pngs) == 2, pngs
    # W&B names media <key>_<its own step>_<hash>.png; its step counts log calls, so it orders our two images
    order = sorted(pngs, key=lambda p: int(re.search(r"heatmaps_(\d+)_", os.path.basename(p)).group(1)))
    for path, logged in zip(order, (first, second)):
        arr = _read_png(path)
        assert arr.dtype == np.uint8 and arr.std() > 0
        np.testing.assert_array_equal(arr, logged)
    assert not (tmp_path / "unused").exists(), "a known logger must not trigger the PNG fallback"


def test_wandb_offline_table_and_line_plot(tmp_path):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project="viz-test", save_dir=str(tmp_path), offline=True)
    rows = [[0, "cat", np.float32(0.5), _random_image(3)], [1, "dog", 0.25, _random_image(4)]]
    try:
        assert log_table([logger], "xai/samples", ["idx", "label", "score", "overlay"], rows, step=2) == [
            "wandb:xai/samples"
        ]
        log_line_plot(
            [logger],
            "xai/deletion",
            [0.0, 0.5, 1.0],
            torch.tensor([0.9, 0.4, 0.1]),
            step=2,
            title="deletion",
            x_label="fraction",
            y_label="probability",
        )
    finally:
        wandb.finish()
    files = _run_files(tmp_path)
    tables = {
        os.path.basename(p).split("_")[0]: json.loads(open(p).read())
        for p in glob.glob(os.path.join(files, "media", "table", "**", "*.table.json"), recursive=True)
    }
    assert set(tables) == {"samples", "deletion"}, tables
    assert tables["samples"]["columns"] == ["idx", "label", "score", "overlay"]
    # W&B's run-level copy of a table shows media cells by type: the array cells did become wandb.Image
    assert tables["samples"]["data"] == [[0, "cat", 0.5, "Image"], [1, "dog", 0.25, "Image"]]
    assert tables["deletion"]["columns"] == ["fraction", "probability"]
    np.testing.assert_allclose(np.array(tables["deletion"]["data"]), [[0.0, 0.9], [0.5, 0.4], [1.0, 0.1]], atol=1e-7)


class WandbLogger:
    """Duck-typed stand-in (same class name) that records what Lightning's WandbLogger.log_metrics receives."""

    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((metrics, step))


def test_wandb_gets_uint8_media_and_trainer_step():
    wandb = pytest.importorskip("wandb")
    logger = WandbLogger()
    image = _random_image(5)
    log_image([logger], "k", image, step=11, caption="cap")
    ((metrics, step),) = logger.calls
    assert step == 11 and isinstance(metrics["k"], wandb.Image)
    assert metrics["k"]._caption == "cap"
    with Image.open(metrics["k"]._path) as im:
        np.testing.assert_array_equal(np.asarray(im), image)
    with pytest.raises(TypeError, match="uint8"):
        log_image([logger], "k", image.astype(np.float32) / 255, step=12)
    assert len(logger.calls) == 1, "a refused image must not be logged"


class _Recorder:
    def __init__(self):
        self.calls = []

    def add_image(self, *args, **kwargs):
        self.calls.append((args, kwargs))


class TensorBoardLogger:
    """Duck-typed stand-in: its ``experiment`` is a SummaryWriter-like recorder."""

    def __init__(self, log_dir):
        self.experiment = _Recorder()
        self.log_dir = str(log_dir)


def test_tensorboard_duck_typed(tmp_path):
    image = _random_image(6)
    logger, writer = TensorBoardLogger(tmp_path), _Recorder()
    assert logger_kind(logger) == "tensorboard" and logger_kind(writer) == "tensorboard"
    assert log_image([logger, writer], "xai/g", image, step=4) == ["tensorboard:xai/g", "tensorboard:xai/g"]
    for rec in (logger.experiment, writer):
        ((args, kwargs),) = rec.calls
        assert args[0] == "xai/g" and args[1] is image and args[2] == 4 and kwargs == {"dataformats": "HWC"}
    assert not list(tmp_path.iterdir()), "no PNG fallback for a TensorBoard logger"
    # tables have no TensorBoard form: CSV in the logger's log_dir
    (path,) = log_table([logger], "t", ["a"], [[1]], step=4)
    assert path == str(tmp_path / "t_step4.csv")


def test_tensorboard_real_event_file(tmp_path):
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("neither tensorboard nor tensorboardX is installed")
    from pytorch_lightning.loggers import TensorBoardLogger as RealTensorBoardLogger

    logger = RealTensorBoardLogger(save_dir=str(tmp_path))
    image = _random_image(7)
    assert log_image([logger], "xai/heatmaps", image, step=5) == ["tensorboard:xai/heatmaps"]
    logger.finalize("success")  # closes the writer: its flush() is asynchronous
    events = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents*"))
    assert len(events) == 1
    content = open(events[0], "rb").read()
    assert b"xai/heatmaps" in content
    start = content.index(b"\x89PNG")  # image summaries are PNG-encoded: decode it and compare
    end = content.index(b"IEND", start) + 8
    with Image.open(io.BytesIO(content[start:end])) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), image)


def test_csv_logger_fallback_png_table_and_curve(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(tmp_path / "logs"))
    assert logger_kind(logger) == "file"
    image = _random_image(8)
    (dest,) = log_image([logger], "xai/heat maps", image, step=9, caption="c", fallback_dir=tmp_path / "fb")
    assert dest == os.path.join(logger.log_dir, "xai_heat_maps_step9.png")
    np.testing.assert_array_equal(_read_png(dest), image)
    assert not (tmp_path / "fb").exists(), "a logger with its own log_dir wins over fallback_dir"

    img_a, img_b = _random_image(9), _random_image(10)
    rows = [[0, np.float64(0.5), img_a], [1, torch.tensor(2.5), img_b]]
    (table,) = log_table([logger], "xai/samples", ["idx", "score", "overlay"], rows, step=9)
    assert table == os.path.join(logger.log_dir, "xai_samples_step9.csv")
    with open(table, newline="") as f:
        content = list(csv.reader(f))
    assert content[0] == ["idx", "score", "overlay"]
    assert content[1][:2] == ["0", "0.5"] and content[2][:2] == ["1", "2.5"]
    for row, logged in zip(content[1:], (img_a, img_b)):
        np.testing.assert_array_equal(_read_png(os.path.join(logger.log_dir, row[2])), logged)

    xs, ys = [0.0, 0.1, 0.3], np.array([1.0, 1 / 3, 0.0])
    (curve,) = log_line_plot([logger], "xai/curve", xs, ys, step=9, x_label="frac", y_label="p")
    with open(curve, newline="") as f:
        content = list(csv.reader(f))
    assert content[0] == ["frac", "p"]
    assert [[float(v) for v in row] for row in content[1:]] == [[x, y] for x, y in zip(xs, ys.tolist())]


def test_no_logger_and_unknown_loggers(tmp_path):
    image = _random_image(11)
    (dest,) = log_image([], "a/b", image, step=0, fallback_dir=tmp_path)
    assert dest == str(tmp_path / "a_b_step0.png")
    np.testing.assert_array_equal(_read_png(dest), image)
    assert log_image(None, "a/b", image, step=0) == []  # nothing asked to be kept

    class NoDir:
        pass

    class BrokenDir:
        @property
        def log_dir(self):
            raise RuntimeError("not set up")

    class SameDir:
        log_dir = str(tmp_path / "same")

    # unknown loggers never raise: their own dir, else fallback_dir; one file per distinct directory
    dests = log_image([NoDir(), BrokenDir(), SameDir(), SameDir()], "k", image, step=1, fallback_dir=tmp_path / "fb")
    assert dests == [str(tmp_path / "fb" / "k_step1.png"), str(tmp_path / "same" / "k_step1.png")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert log_image([NoDir()], "k", image, step=1) == []
    assert any("NoDir" in str(w.message) and "fallback_dir" in str(w.message) for w in caught)


def test_logging_rejects_bad_input(tmp_path):
    image = _random_image(12)
    with pytest.raises(TypeError, match="trainer.loggers"):
        log_image(WandbLogger(), "k", image, step=0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        log_image([], "k", image[..., 0], step=0)
    with pytest.raises(ValueError, match="step"):
        log_image([], "k", image, step=-1)
    with pytest.raises(ValueError, match="key"):
        log_image([], "", image, step=0)
    with pytest.raises(ValueError, match="row 1"):
        log_table([], "t", ["a", "b"], [[1, 2], [3]], step=0)
    with pytest.raises(TypeError, match="row 0, column 'b'"):
        log_table([], "t", ["a", "b"], [[1, np.zeros((4, 4, 3))]], step=0)
    with pytest.raises(ValueError, match="distinct"):
        log_table([], "t", ["a", "a"], [], step=0)
    with pytest.raises(ValueError, match="same length"):
        log_line_plot([], "c", [1, 2], [1], step=0)
    with pytest.raises(ValueError, match="distinct"):
        log_line_plot([], "c", [1], [1], step=0, x_label="v", y_label="v")
    assert not list(tmp_path.iterdir())
