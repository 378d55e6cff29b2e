"""The dashboard side of the logger adapter, read back from what each logger wrote: the offline W&B run's
``.wandb`` records (per-method image keys at the metrics' step, the samples table, the run config, native line
plots), TensorBoard event files (tables as text, curves as images, no per-cell files), tidy CSV files, and
Lightning's DummyLogger (``fast_dev_run``) writing to the fallback folder without a warning."""

from __future__ import annotations

import csv
import glob
import json
import os
import warnings

import numpy as np
import pytest
import torch
import wandb_records

from lightning_xai.namespace import pl
from lightning_xai.viz.dashboard import (
    flatten_config,
    log_config,
    log_curves,
    log_explanations,
    log_samples_table,
    log_scatter,
    log_text,
)
from lightning_xai.viz.grid import render_explanations, render_method_images
from lightning_xai.viz.logging import log_image, log_line_plot, log_table, logger_kind, markdown_table

CLASSES = ["circle", "square", "triangle"]


def _grids():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g)
    maps = {"saliency": torch.rand(3, 1, 16, 16, generator=g), "gradcam": torch.rand(3, 1, 4, 4, generator=g)}
    grid = render_explanations(images, maps, labels=[0, 1, 2], logits=torch.randn(3, 3, generator=g))
    return grid, render_method_images(images, maps)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (6, 9, 3), dtype=np.uint8)


def _samples_kwargs():
    return dict(
        predictions=torch.tensor([0, 2, 1]),
        labels=[0, 1, 1],
        probabilities=torch.tensor([0.9, 0.6, float("nan")]),
        class_names=CLASSES,
        sample_ids=[11, 12, 13],
        scores={"gradcam/deletion_auc": [0.25, float("inf"), 0.5]},
    )


# ---------------------------------------------------------------------------------------------------------- W&B


@pytest.fixture
def wandb_logger(tmp_path):
    pytest.importorskip("wandb")
    logger = pl.loggers.WandbLogger(project="dashboard-test", save_dir=str(tmp_path), offline=True)
    yield logger
    import wandb

    wandb.finish()


def test_wandb_per_method_images_and_metrics_in_one_step(tmp_path, wandb_logger):
    grid, per_method = _grids()
    dest = log_explanations(
        [wandb_logger], "xai", grid, per_method, step=42, metrics={"xai/drift/saliency": 0.5, "xai/bad": float("nan")}
    )
    assert "wandb:xai/explanations/saliency" in dest and "wandb:xai/explanations/gradcam" in dest
    import wandb

    wandb.finish()
    rows = wandb_records.history(wandb_records.run_file(tmp_path))
    (row,) = [r for r in rows if "xai/explanations/_type" in r]
    assert row["trainer/global_step"] == 42
    for key in ("xai/explanations", "xai/explanations/saliency", "xai/explanations/gradcam"):
        assert row[f"{key}/_type"] == "image-file", key
    assert row["xai/drift/saliency"] == 0.5, "the epoch's metrics share the images' W&B step"
    assert not any("xai/bad" in k for r in rows for k in r), "a non-finite metric is never logged as a number"
    # the logged grid is the rendered uint8 picture, exactly
    from PIL import Image

    path = os.path.join(os.path.dirname(wandb_records.run_file(tmp_path)), "files", row["xai/explanations/path"])
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), grid.image)


def test_wandb_samples_table_config_and_line_series(tmp_path, wandb_logger):
    log_samples_table([wandb_logger], "xai/samples", step=5, images={"saliency": np.zeros((3, 8, 8, 3), np.uint8)},
                      **_samples_kwargs())
    log_config([wandb_logger], "xai/ExplanationMonitor", {"num_samples": 8, "attributors": ["saliency", "gradcam"],
                                                          "scale": {"percentile": 99.0, "fixed": True}})
    xs = [0.0, 0.5, 1.0]
    log_curves([wandb_logger], "xai/deletion", xs, {"saliency": [1.0, 0.4, 0.1], "gradcam": [1.0, float("nan"), 0.2]},
               step=5, title="deletion", x_label="fraction removed", y_label="probability")
    import wandb

    wandb.finish()
    run = wandb_records.run_file(tmp_path)
    config = wandb_records.config(run)
    assert config["xai/ExplanationMonitor/num_samples"] == 8
    assert config["xai/ExplanationMonitor/attributors"] == ["saliency", "gradcam"]
    assert config["xai/ExplanationMonitor/scale/fixed"] is True
    # the line plot is W&B's native line-series chart
    charts = {k: v for k, v in config.items() if k.startswith("_wandb/visualize/")}
    assert "wandb/lineseries/v0" in json.dumps(charts["_wandb/visualize/xai/deletion"]), charts
    rows = wandb_records.history(run)
    assert any(r.get("xai/deletion_table/_type") == "table-file" and r["trainer/global_step"] == 5 for r in rows)
    files = os.path.join(os.path.dirname(run), "files")
    tables = {
        os.path.basename(p).rsplit("_", 2)[0]: json.load(open(p))
        for p in glob.glob(os.path.join(files, "media", "table", "**", "*.table.json"), recursive=True)
    }
    samples = tables["samples"]
    assert samples["columns"] == [
        "sample", "true class", "predicted class", "confidence", "correct", "gradcam/deletion_auc", "saliency"
    ]
    assert [r[:6] for r in samples["data"]] == [
        [11, "circle", "circle", 0.9, True, 0.25],
        [12, "square", "triangle", 0.6, False, None],  # inf score: empty, never a number
        [13, "square", "square", None, True, 0.5],  # NaN confidence: empty
    ]
    curve = tables["deletion_table"]
    points = {(k, x): y for x, k, y in curve["data"]}
    assert points[("saliency", 0.5)] == 0.4 and ("gradcam", 0.5) not in points  # NaN point left out


# -------------------------------------------------------------------------------------------------- TensorBoard


def _tensorboard_events(log_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_tables_as_text_curves_as_images_no_files(tmp_path):
    pytest.importorskip("tensorboard")
    logger = pl.loggers.TensorBoardLogger(save_dir=str(tmp_path))
    assert logger_kind(logger) == "tensorboard"
    grid, per_method = _grids()
    log_explanations([logger], "xai", grid, per_method, step=3, metrics={"xai/drift/saliency": 0.75})
    log_samples_table([logger], "xai/samples", step=3, **_samples_kwargs())
    log_table([logger], "xai/units", ["unit", "score", "crop"], [[1, 0.5, _image(0)], [2, 0.25, _image(1)]], step=3)
    log_curves([logger], "xai/deletion", [0.0, 1.0], {"a": [1.0, 0.0], "b": [0.5, 0.2]}, step=3)
    log_line_plot([logger], "xai/cascade", [0, 1, 2], [1.0, 0.5, 0.1], step=3)
    log_config([logger], "xai/SanityCheck", {"mode": "cascading"})
    logger.finalize("success")
    acc = _tensorboard_events(logger.log_dir)
    images = acc.Tags()["images"]
    for key in ("xai/explanations", "xai/explanations/saliency", "xai/explanations/gradcam", "xai/deletion",
                "xai/cascade"):
        assert key in images, (key, images)
        (event,) = acc.Images(key)
        assert event.step == 3
    assert acc.Scalars("xai/drift/saliency")[0].value == pytest.approx(0.75)
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    samples = texts["xai/samples/text_summary"]
    assert "| sample | true class | predicted class | confidence | correct | gradcam/deletion_auc |" in samples
    assert "| 12 | square | triangle | 0.6 | False |  |" in samples
    assert "crop" in texts["xai/units/text_summary"] and "image columns left out" in texts["xai/units/text_summary"]
    assert "cascading" in texts["xai/SanityCheck/config/text_summary"]
    leftovers = [p for p in os.listdir(logger.log_dir) if not p.startswith("events.out") and p != "hparams.yaml"]
    assert leftovers == [], f"TensorBoard users get no per-cell / per-table files: {leftovers}"


# ---------------------------------------------------------------------------------------------------------- CSV


def test_csv_logger_gets_one_tidy_csv_per_table(tmp_path):
    logger = pl.loggers.CSVLogger(save_dir=str(tmp_path))
    (path,) = log_samples_table([logger], "xai/samples", step=4,
                                images={"saliency": np.zeros((3, 8, 8, 3), np.uint8)}, **_samples_kwargs())
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sample", "true class", "predicted class", "confidence", "correct", "gradcam/deletion_auc"]
    assert rows[2] == ["12", "square", "triangle", "0.6", "False", ""]
    (curve,) = log_curves([logger], "xai/sanity", [0, 1], {"saliency": [1.0, 0.3], "gradcam": [1.0, float("nan")]},
                          step=4, x_label="layer", y_label="similarity", x_ticklabels=["none", "fc"])
    with open(curve, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["series", "layer", "similarity", "layer name"],
        ["saliency", "0.0", "1.0", "none"], ["saliency", "1.0", "0.3", "fc"],
        ["gradcam", "0.0", "1.0", "none"], ["gradcam", "1.0", "", "fc"],
    ]
    (config,) = log_config([logger], "xai/Monitor", {"a": 1, "b": {"c": "x"}})
    with open(config, newline="") as f:
        assert list(csv.reader(f)) == [["key", "value"], ["xai/Monitor/a", "1"], ["xai/Monitor/b/c", "x"]]
    pngs = glob.glob(os.path.join(logger.log_dir, "*.png"))
    assert pngs == [], "no per-cell files"


# ------------------------------------------------------------------------------------- DummyLogger / no logger


@pytest.mark.parametrize("loggers", ["dummy", "none"])
def test_dummy_logger_and_no_logger_write_to_fallback_silently(tmp_path, loggers):
    DummyLogger = pl.loggers.logger.DummyLogger
    logger_list = [DummyLogger()] if loggers == "dummy" else []
    assert logger_kind(DummyLogger()) == "none"
    grid, per_method = _grids()
    fallback = tmp_path / "fallback"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = log_explanations(logger_list, "xai", grid, per_method, step=1, fallback_dir=fallback)
        written += log_samples_table(logger_list, "xai/samples", step=1, fallback_dir=fallback, **_samples_kwargs())
        written += log_curves(logger_list, "xai/c", [0, 1], {"a": [0, 1]}, step=1, fallback_dir=fallback)
        written += log_image(logger_list, "xai/x", _image(2), step=1, fallback_dir=fallback)
        written += log_config(logger_list, "xai/M", {"a": 1}, fallback_dir=fallback)
        written += log_line_plot(logger_list, "xai/l", [0, 1], [1.0, 0.5], step=1, fallback_dir=fallback)
        written += log_text(logger_list, "xai/t", html="<b>a</b>", text="a", step=1, fallback_dir=fallback)
        # without a fallback folder: nothing is written, and nothing is said
        assert log_image(logger_list, "xai/x", _image(2), step=1) == []
        assert log_table(logger_list, "t", ["a"], [[1]], step=1) == []
        assert log_text(logger_list, "xai/t", html="<b>a</b>", text="a", step=1) == []
    names = sorted(os.listdir(fallback))
    assert names == sorted([
        "xai_explanations_step1.png", "xai_explanations_saliency_step1.png", "xai_explanations_gradcam_step1.png",
        "xai_samples_step1.csv", "xai_c_step1.csv", "xai_x_step1.png", "xai_M_config.csv",
        "xai_l_step1.csv", "xai_t_step1.html", "xai_t_step1.txt",
    ])
    assert all(os.path.dirname(p) == str(fallback) for p in written)


# ------------------------------------------------------------------------------------------------------ helpers


def test_markdown_and_flatten_helpers():
    md = markdown_table(["a", "b|c", "img"], [[1, 0.123456, _image(3)], ["x|y", None, _image(4)]])
    assert md.splitlines()[:4] == ["| a | b\\|c |", "|---|---|", "| 1 | 0.1235 |", "| x\\|y | None |"]
    assert md.splitlines()[-1] == "image columns left out: img"
    flat = flatten_config({"a": {"b": 1, "c": [1, "x"]}, "d": object}, "xai/M")
    assert flat["xai/M/a/b"] == 1 and flat["xai/M/a/c"] == [1, "x"] and flat["xai/M/d"].startswith("<class")


def test_scatter_and_bad_input(tmp_path):
    (path,) = log_scatter([], "xai/emb", ["x", "y"], [[0.0, 1.0]], x="x", y="y", step=0, fallback_dir=tmp_path)
    assert path.endswith("xai_emb_step0.csv")
    with pytest.raises(ValueError, match="scatter columns"):
        log_scatter([], "k", ["x"], [[1]], x="x", y="z", step=0)
    with pytest.raises(ValueError, match="has 1 points but xs has 2"):
        log_curves([], "k", [0, 1], {"a": [1]}, step=0)
    with pytest.raises(ValueError, match="labels has 2 entries for 3 samples"):
        log_samples_table([], "k", predictions=[0, 1, 2], labels=[0, 1], step=0)
    with pytest.raises(TypeError, match="uint8"):
        log_explanations([], "xai", np.zeros((4, 4, 3), np.float32), step=0)
    with pytest.raises(TypeError, match="mapping"):
        log_config([], "xai/M", [1, 2])


def test_files_are_never_overwritten_at_the_same_step(tmp_path):
    """A trainer.validate after fit logs at the same step as the last fit epoch: both files are kept."""
    from lightning_xai.viz.logging import unique_stem

    first = log_image(None, "xai/grid", _image(0), step=3, fallback_dir=tmp_path)
    second = log_image(None, "xai/grid", _image(1), step=3, fallback_dir=tmp_path)
    assert first != second and all(os.path.exists(p) for p in first + second)
    log_table(None, "xai/t", ["a"], [[1]], step=3, fallback_dir=tmp_path)
    log_table(None, "xai/t", ["a"], [[2]], step=3, fallback_dir=tmp_path)
    assert len(glob.glob(str(tmp_path / "**" / "xai_t_step3*.csv"), recursive=True)) == 2
    assert unique_stem(tmp_path / "missing", "x") == "x"
