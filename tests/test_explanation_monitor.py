"""ExplanationMonitor inside real Trainer runs: fit (no_grad), validate (inference_mode), W&B offline, resume,
failures, and DDP over two CPU processes."""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, quiet_trainer, run_processes
from PIL import Image

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.namespace import pl

ModelCheckpoint = pl.callbacks.ModelCheckpoint

METHODS = ["saliency", {"name": "integrated_gradients", "steps": 8}, {"name": "gradcam", "layer": "features"}]


class Exploding(Attributor):
    """An attributor that always fails (not registered)."""

    def attribute(self, model, inputs, target):
        raise RuntimeError("exploded on purpose")


def _fit(tmp_path, monitor, epochs=2, **trainer_kwargs):
    pl.seed_everything(0)
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[monitor], default_root_dir=str(tmp_path), **trainer_kwargs)
    trainer.fit(model, BlobData())
    return trainer, model


def test_fit_logs_grids_pngs_and_drift(tmp_path):
    monitor = ExplanationMonitor(METHODS, num_samples=4, target="label", png_dir=str(tmp_path / "png"))
    trainer, _model = _fit(tmp_path, monitor, epochs=3)
    pngs = sorted(glob.glob(str(tmp_path / "png" / "*.png")))
    assert len(pngs) == 3, "one grid per validation epoch"
    grid = np.asarray(Image.open(pngs[-1]))
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
    assert set(monitor.drift_history) == {"saliency", "integrated_gradients", "gradcam"}
    assert [e for e, _ in monitor.drift_history["saliency"]] == [1, 2]
    for _, value in monitor.drift_history["integrated_gradients"]:
        assert -1.0 <= value <= 1.0
    assert "xai/drift/gradcam" in trainer.callback_metrics
    assert not monitor.errors


def test_monitor_does_not_change_training(tmp_path):
    """Same seed, with and without the monitor: bit-identical weights (no RNG, mode or gradient side effects)."""
    _, with_monitor = _fit(tmp_path / "a", ExplanationMonitor([*METHODS, "smoothgrad"], num_samples=4))
    pl.seed_everything(0)
    plain = TinyClassifier()
    quiet_trainer(max_epochs=2, default_root_dir=str(tmp_path / "b")).fit(plain, BlobData())
    for (name, p), q in zip(with_monitor.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs when the monitor is attached"


def test_validate_under_inference_mode_matches_direct_call(tmp_path):
    pl.seed_everything(0)
    model = TinyClassifier().eval()
    data = BlobData()
    monitor = ExplanationMonitor(METHODS, num_samples=5, target="label", png_dir="")
    trainer = quiet_trainer(callbacks=[monitor], inference_mode=True)
    trainer.validate(model, datamodule=data, verbose=False)
    assert not monitor.errors
    maps = monitor.explain(trainer, model)  # same probe again, outside Lightning's loop
    x = torch.stack([data.val_set[i][0] for i in monitor.probe.indices])
    y = torch.stack([data.val_set[i][1] for i in monitor.probe.indices])
    for spec in METHODS:
        attributor = build_attributor(spec)
        assert torch.allclose(maps[attributor.name], attributor(model, x, y), atol=1e-6)


def test_wandb_offline_run_has_nonblank_uint8_images(tmp_path):
    wandb = pytest.importorskip("wandb")
    WandbLogger = pl.loggers.WandbLogger

    logger = WandbLogger(project="xai-test", save_dir=str(tmp_path), offline=True)
    monitor = ExplanationMonitor(METHODS[:2], num_samples=3, png_dir="")
    _fit(tmp_path, monitor, epochs=2, logger=logger)
    run_dir = logger.experiment.dir
    wandb.finish()
    images = sorted(glob.glob(os.path.join(run_dir, "media", "images", "**", "*.png"), recursive=True))
    grids = [p for p in images if "explanations" in os.path.basename(p)]
    assert len(grids) == 2, images
    for path in grids:
        arr = np.asarray(Image.open(path).convert("RGB"))
        assert arr.dtype == np.uint8 and arr.std() > 5, "a logged heatmap grid is blank"


def test_resume_continues_drift_history(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = ExplanationMonitor(METHODS[:1], num_samples=4)
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[first, ckpt], enable_checkpointing=True, default_root_dir=str(tmp_path)
    )
    trainer.fit(TinyClassifier(), BlobData())
    assert [e for e, _ in first.drift_history["saliency"]] == [1]

    resumed = ExplanationMonitor(METHODS[:1], num_samples=4)
    trainer = quiet_trainer(max_epochs=4, callbacks=[resumed], default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(), BlobData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    history = resumed.drift_history["saliency"]
    assert [e for e, _ in history] == [1, 2, 3], "the resumed run must continue, not restart, the history"
    assert history[0] == first.drift_history["saliency"][0]
    assert resumed.probe.indices == first.probe.indices


def test_failing_attributor_warns_and_training_goes_on(tmp_path):
    monitor = ExplanationMonitor([Exploding(), "saliency"], num_samples=3, png_dir="")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, monitor, epochs=2)
    assert trainer.current_epoch == 2
    assert "exploded on purpose" in monitor.errors["exploding"]
    assert any("exploded on purpose" in str(w.message) for w in caught)
    assert [e for e, _ in monitor.drift_history["saliency"]] == [1]


def test_on_error_raise(tmp_path):
    monitor = ExplanationMonitor([Exploding()], num_samples=2, on_error="raise", png_dir="")
    with pytest.raises(RuntimeError, match="exploded on purpose"):
        _fit(tmp_path, monitor, epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attributors": ["gradcamm"]}, "unknown attributor 'gradcamm'"),
        ({"attributors": []}, "at least one attributor"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"target": "truth"}, "target must be"),
        ({"on_error": "ignore"}, "on_error"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExplanationMonitor(**kwargs)


def test_ddp_two_processes_match_single_process(tmp_path):
    """ExplanationMonitor, ExplanationQuality and SanityCheck over 2 CPU processes equal one process."""
    script = os.path.join(os.path.dirname(__file__), "ddp_monitor_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        proc = run_processes([sys.executable, script, str(devices), str(out)], env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    single = results[1][0]
    for rank_result in results[2]:
        assert rank_result["probe_indices"] == single["probe_indices"]
        for method, value in single["checksums"].items():
            assert abs(rank_result["checksums"][method] - value) <= 1e-4 * max(1.0, abs(value)), method
        for key, value in single["quality"].items():
            assert rank_result["quality"][key] == pytest.approx(value, abs=1e-5), key
        assert rank_result["sanity_curve"] == pytest.approx(single["sanity_curve"], abs=1e-6, nan_ok=True)
    assert len(single["quality"]) == 6
    pngs = glob.glob(str(tmp_path / "out2" / "png" / "*.png"))
    assert len(pngs) == 1, "rank zero logs once per epoch"
