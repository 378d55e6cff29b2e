"""Every callback under every Trainer configuration users run (generated: callbacks x configurations).

Each cell asserts what a user can rely on: the callback produced its output (a successful run with metrics) in
every configuration - falling back to the end of fit when no validation epoch ended, and then saying so once,
naming itself; no warning repeats; no configuration crashes the run; history records are keyed by (stage, step)
and never repeat one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, blob_dataset, quiet_trainer, run_processes
from torch.utils.data import DataLoader

from lightning_xai.callbacks import (
    ClassPrototypes,
    DissectionScores,
    EmbeddingProjector,
    ExplanationMonitor,
    ExplanationQuality,
    RelevantUnits,
    SanityCheck,
    TCAVScores,
)
from lightning_xai.data.concepts import ConceptScenes
from lightning_xai.namespace import pl


def _concepts() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    data = blob_dataset(60, 16, seed=5)
    images, labels = data.tensors[0], data.tensors[1]
    return {"left": images[labels == 0][:10], "right": images[labels == 2][:10]}, images[:40]


#: name -> factory of a small instance of every callback of the library.
CALLBACKS: dict[str, Callable[[], Any]] = {
    "ExplanationMonitor": lambda: ExplanationMonitor(["saliency", {"name": "gradcam", "layer": "features"}],
                                                     num_samples=4),
    "ExplanationQuality": lambda: ExplanationQuality(["saliency"], metrics=["deletion_auc", "mask_iou"],
                                                     metric_kwargs={"deletion_auc": {"steps": 4}}, num_samples=4),
    "SanityCheck": lambda: SanityCheck(["saliency"], num_samples=3, every_n_epochs=1),
    "SanityCheckAtEnd": lambda: SanityCheck(["saliency"], num_samples=3),
    "DissectionScores": lambda: DissectionScores("features", probe_dataset=ConceptScenes(size=24, image_size=24),
                                                 num_samples=16),
    "TCAVScores": lambda: TCAVScores("features.3", *_concepts()[:1], random_examples=_concepts()[1], num_random=2,
                                     num_samples=6),
    "RelevantUnits": lambda: RelevantUnits("features.3", num_samples=12, ablation=False),
    "ClassPrototypes": lambda: ClassPrototypes(steps=2, batch_size=2),
    "EmbeddingProjector": lambda: EmbeddingProjector("features", num_samples=8),
}


class TwoValLoaders(BlobData):
    def val_dataloader(self):
        return [DataLoader(self.val_set, batch_size=8), DataLoader(self.val_set, batch_size=8)]


class NoValLoader(BlobData):
    val_dataloader = None  # type: ignore[assignment]


class MultiLoaderClassifier(TinyClassifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return super().validation_step(batch, batch_idx)


def _run(cfg: str, callback: Any, tmp_path) -> Any:
    pl.seed_everything(0)
    model: Any = TinyClassifier()
    data: Any = BlobData()
    kwargs: dict[str, Any] = {"max_epochs": 2, "default_root_dir": str(tmp_path)}
    if cfg == "max_steps_mid_epoch":
        kwargs.update(max_steps=2)  # 3 training batches per epoch: stops before the first validation
    elif cfg == "limit_val_batches_0":
        kwargs.update(limit_val_batches=0)
    elif cfg == "no_val_loader":
        data = NoValLoader()
    elif cfg == "two_val_loaders":
        data, model = TwoValLoaders(), MultiLoaderClassifier()
    elif cfg == "val_check_interval_half":
        kwargs.update(val_check_interval=0.5)
    elif cfg == "fast_dev_run":
        kwargs.update(fast_dev_run=True, max_epochs=1)
    elif cfg == "logger_false":
        kwargs.update(logger=False)
    elif cfg == "compiled":
        model = torch.compile(model, backend="eager")  # Lightning unwraps it; forward runs the compiled code
    trainer = quiet_trainer(callbacks=[callback], **kwargs)
    trainer.fit(model, datamodule=data)
    if cfg == "validate_after_fit":
        trainer.validate(model, datamodule=data, verbose=False)
    return trainer


CONFIGS = [
    "default",
    "max_steps_mid_epoch",
    "limit_val_batches_0",
    "no_val_loader",
    "two_val_loaders",
    "val_check_interval_half",
    "validate_after_fit",
    "fast_dev_run",
    "logger_false",
    "compiled",
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback_produces_output_or_says_why(name, cfg, tmp_path):
    callback = CALLBACKS[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(cfg, callback, tmp_path)
    mine = [str(w.message) for w in caught if str(w.message).startswith(callback.name)]
    assert not callback.errors, [str(e) for e in callback.errors]
    assert callback.last_metrics, f"{name} under {cfg}: no output (warnings naming it: {mine})"
    assert len(mine) == len(set(mine)), f"{name} repeated a warning: {mine}"
    if cfg in ("max_steps_mid_epoch", "limit_val_batches_0") and callback.every_n_epochs is not None:
        assert any("end of fit" in m for m in mine), mine
    reads_val_loaders = callback.split == "val" and callback.given_dataset is None and callback.probe is not None
    if cfg == "two_val_loaders" and reads_val_loaders and getattr(callback, "probe_dataset", None) is None:
        assert any("loader" in m for m in mine), mine
    history = getattr(callback, "history", None)
    if isinstance(history, list) and history and isinstance(history[0], dict) and "step" in history[0]:
        keys = [(h["stage"], h["step"]) for h in history]
        assert len(keys) == len(set(keys)), f"{name} history repeats a (stage, step): {keys}"
        if cfg == "validate_after_fit":
            assert [h["stage"] for h in history][-1] == "validate"


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_state_round_trips_and_loading_never_rolls_history_back(name, tmp_path):
    """state_dict -> load_state_dict into a fresh instance restores the state; loading an older state into an
    instance that has more history keeps the newer records (a validate after fit must not roll back)."""
    callback = CALLBACKS[name]()
    _run("default", callback, tmp_path)
    state = callback.state_dict()
    fresh = CALLBACKS[name]()
    fresh.load_state_dict(state)
    assert torch.save(fresh.state_dict(), tmp_path / "a.pt") is None  # picklable, as a checkpoint needs
    for field in type(callback).state_fields:
        assert repr(getattr(fresh, field)) == repr(getattr(callback, field)), field
    records = [f for f in type(callback).state_fields
               if isinstance(state.get(f), list) and len(state[f]) > 1 and isinstance(state[f][0], dict)]
    for field in records:
        older = dict(state, **{field: state[field][:1]})
        callback.load_state_dict(older)
        assert len(getattr(callback, field)) == len(state[field]), f"loading an older {field} rolled it back"


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_runtime_faults_with_on_error_warn_never_stop_training(name, tmp_path, monkeypatch):
    """A fault while the callback runs (here: every attributor / metric / method call raising at the second
    epoch) is recorded and warned, and training completes."""
    callback = CALLBACKS[name]()
    original = type(callback).compute

    def failing(self, trainer, pl_module):
        if trainer.current_epoch >= 1:
            raise RuntimeError("injected fault")
        return original(self, trainer, pl_module)

    monkeypatch.setattr(type(callback), "compute", failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _run("default", callback, tmp_path)
    assert trainer.current_epoch == 2 and trainer.state.finished
    assert any("injected fault" in str(e) for e in callback.errors)
    assert any(str(w.message).startswith(callback.name) and "injected fault" in str(w.message) for w in caught)


def test_ddp_spawn_results_come_back_through_load_results(tmp_path):
    """Under ddp_spawn the launching process's callback stays empty (Lightning runs the hooks in the workers):
    rank zero says so once and writes the state, and load_results restores it."""
    import json
    import os
    import sys

    script = os.path.join(os.path.dirname(__file__), "ddp_spawn_script.py")
    proc = run_processes([sys.executable, script, str(tmp_path / "out")], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["history_in_launching_process"] == 0
    assert result["history_after_load"] == 2 and result["drift_epochs"] == [1]
    assert proc.stderr.count("ExplanationMonitor: under ddp_spawn") == 1, proc.stderr[-3000:]
