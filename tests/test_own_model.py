"""A user's own LightningModule (torchvision resnet18 as ``self.net``, dict batches, ``lightning.pytorch``) with
ExplanationMonitor, ExplanationQuality, SanityCheck and DissectionScores attached and nothing changed in the model,
logged to W&B (offline), TensorBoard and CSV at once: what each logger received is read back."""

from __future__ import annotations

import csv
import glob
import importlib.util
import os
import sys

import numpy as np
import pytest
import wandb_records
from PIL import Image

from lightning_xai.namespace import NAME

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "own_model.py")

pytestmark = pytest.mark.skipif(NAME != "lightning.pytorch", reason="the example is written with lightning.pytorch")


def _example():
    spec = importlib.util.spec_from_file_location("own_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["own_model_example"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("own_model")
    os.environ["WANDB_DIR"] = str(out)
    result = _example().main(["--epochs", "2", "--n-train", "64", "--out", str(out)])
    return result


def test_model_is_untouched_and_callbacks_ran(run):
    monitor, _quality, sanity, dissection = run["callbacks"]
    for callback in run["callbacks"]:
        assert not callback.errors, (callback.name, [str(e) for e in callback.errors])
    assert [e for e, _ in monitor.drift_history["saliency"]] == [1]
    assert {"xai/saliency/mask_iou", "xai/gradcam/deletion_auc"} <= set(run["metrics"])
    assert set(sanity.results) == {"saliency", "gradcam"}
    assert len(dissection.history) == 1, "dissection runs once, at the end of fit"
    model = run["trainer"].lightning_module
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules()), "no hook left behind"
    assert all(p.grad is None or p.grad.abs().sum() >= 0 for p in model.parameters())


def test_wandb_received_grids_per_method_images_metrics_and_config(run):
    path = wandb_records.run_file(run["out"])
    rows = wandb_records.history(path)
    keys = set().union(*rows)
    for key in ("xai/explanations", "xai/explanations/saliency", "xai/explanations/gradcam"):
        assert f"{key}/_type" in keys, sorted(k for k in keys if k.startswith("xai/explanations"))
    assert {"xai/saliency/mask_iou", "xai/drift/saliency", "xai/dissection/detectors"} <= keys
    config = wandb_records.config(path)
    assert config["xai/ExplanationMonitor/num_samples"] == 6
    grid = [r for r in rows if "xai/explanations/_type" in r][-1]
    assert grid["xai/explanations/_type"] == "image-file" and grid["xai/explanations/width"] >= 96 * 4, grid
    assert grid["trainer/global_step"] == max(r["trainer/global_step"] for r in rows if "xai/drift/saliency" in r)


def test_tensorboard_received_images_scalars_and_tables_as_text(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {os.path.dirname(p) for p in glob.glob(os.path.join(run["out"], "tb", "**", "events.*"),
                                                           recursive=True)}
    acc = EventAccumulator(events_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "xai/explanations" in tags["images"] and "xai/explanations/gradcam" in tags["images"]
    assert "xai/saliency/relevance_mass" in tags["scalars"]
    assert any(t.startswith("xai/samples") for t in tags["tensors"]), tags["tensors"]
    stray = [p for p in glob.glob(os.path.join(run["out"], "tb", "**", "*"), recursive=True)
             if os.path.isfile(p) and not os.path.basename(p).startswith("events.") and not p.endswith(".yaml")]
    assert not stray, f"TensorBoard users never see these files: {stray}"


def test_csv_received_metrics_and_tidy_tables(run):
    (metrics,) = glob.glob(os.path.join(run["out"], "csv", "**", "metrics.csv"), recursive=True)
    with open(metrics) as f:
        header = next(csv.reader(f))
    assert "xai/saliency/mask_iou" in header and "xai/drift/gradcam" in header
    tables = glob.glob(os.path.join(run["out"], "csv", "**", "*samples*.csv"), recursive=True)
    assert tables, "the samples table as CSV"
    pngs = glob.glob(os.path.join(run["out"], "**", "*.png"), recursive=True)
    grid = np.asarray(Image.open(sorted(p for p in pngs if "explanations" in p)[-1]).convert("RGB"))
    assert grid.std() > 5
