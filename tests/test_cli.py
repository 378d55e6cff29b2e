"""The `lightning-xai` CLI runs the shipped YAML configs end to end (fast_dev_run, tiny data)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fit_tiny(config: str, tmp_path):
    """``lightning-xai fit`` of a shipped config under ``fast_dev_run`` on tiny generated data, without a logger."""
    return main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "examples", "configs", config),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.n_train=32",
            "--data.init_args.n_val=16",
            "--data.init_args.n_test=16",
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=16",
        ]
    )


def test_quickstart_config_fast_dev_run(tmp_path):
    cli = fit_tiny("quickstart.yaml", tmp_path)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert list(monitor.attributors) == ["saliency", "integrated_gradients", "gradcam", "gradcam_plus_plus"]
    assert monitor.attributors["integrated_gradients"].steps == 32
    assert not monitor.errors, monitor.errors
    pngs = glob.glob(str(tmp_path / "explanations" / "*.png"))
    assert len(pngs) == 1


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "lightning-xai")
    if not os.path.exists(exe):
        pytest.skip("the console script is not installed in this environment")
    out = subprocess.run([exe, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "--config" in out.stdout


def test_bad_attributor_name_in_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown attributor 'gradcamm'; did you mean \['gradcam'"):
        main(
            [
                "fit",
                "--config",
                os.path.join(ROOT, "examples", "configs", "quickstart.yaml"),
                "--trainer.callbacks=[{class_path: lightning_xai.callbacks.ExplanationMonitor, "
                "init_args: {attributors: [gradcamm]}}]",
                "--trainer.fast_dev_run=true",
                "--trainer.logger=false",
            ]
        )


def test_explanation_quality_config_fast_dev_run(tmp_path):
    """The ground-truth config trains, scores every configured method and metric, and runs the sanity check."""
    from lightning_xai.callbacks import ExplanationQuality, SanityCheck

    cli = fit_tiny("explanation_quality.yaml", tmp_path)
    (quality,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationQuality)]
    (sanity,) = [c for c in cli.trainer.callbacks if isinstance(c, SanityCheck)]
    assert len(quality.history) == 1
    values = quality.history[0][1]
    for method in ("saliency", "integrated_gradients", "gradcam", "lrp"):
        for metric in ("mask_iou", "pointing_game", "relevance_mass", "deletion_auc", "insertion_auc"):
            key = next(k for k in values if method in k and k.endswith(metric))
            assert 0.0 <= values[key] <= 1.0, (key, values[key])
    assert set(sanity.results) == {"saliency", "gradcam"}
    assert all(isinstance(r["passes"], bool) for r in sanity.results.values())
