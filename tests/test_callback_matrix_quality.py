"""ExplanationQuality, SanityCheck and DissectionScores under the Trainer configurations users run (issue 19):
generated cells of callback x configuration, each asserting that the callback produced its output (history /
results non-empty) or warned once, naming itself - never silently nothing - and that no cell crashes the run."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
from lightning_helpers import BlobData, TinyClassifier, quiet_trainer
from torch.utils.data import DataLoader

from lightning_xai.callbacks import DissectionScores, ExplanationQuality, SanityCheck
from lightning_xai.data.concepts import ConceptScenes
from lightning_xai.namespace import pl

_CONCEPTS = ConceptScenes(size=24, image_size=24, seed=1)

#: name -> (factory of a small instance, its output). Every callback is scheduled every epoch, so that the
#: configurations without a validation epoch end exercise the fallback.
CALLBACKS: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
    "ExplanationQuality": (
        lambda: ExplanationQuality(["saliency"], metrics=["deletion_auc", "mask_iou"],
                                   metric_kwargs={"deletion_auc": {"steps": 4}}, num_samples=4),
        lambda cb: cb.history,
    ),
    "SanityCheck": (lambda: SanityCheck(["saliency"], num_samples=3, every_n_epochs=1), lambda cb: cb.results),
    "SanityCheckAtEnd": (lambda: SanityCheck(["saliency"], num_samples=3), lambda cb: cb.results),
    "DissectionScores": (
        lambda: DissectionScores("features", probe_dataset=_CONCEPTS, num_samples=12, num_rendered_units=1),
        lambda cb: cb.history,
    ),
}


class TwoValLoaders(BlobData):
    def val_dataloader(self):
        return [DataLoader(self.val_set, batch_size=8), DataLoader(self.val_set, batch_size=8)]


class NoValLoader(BlobData):
    val_dataloader = None  # type: ignore[assignment]


class MultiLoaderClassifier(TinyClassifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return super().validation_step(batch, batch_idx)


CONFIGS: dict[str, dict[str, Any]] = {
    "max_steps_mid_epoch": {"max_steps": 2},  # 3 training batches per epoch: stops before the first validation
    "limit_val_batches_0": {"limit_val_batches": 0},
    "no_val_loader": {},
    "two_val_loaders": {},
    "val_check_interval_half": {"val_check_interval": 0.5},
    "validate_after_fit": {},
    "fast_dev_run": {"fast_dev_run": True, "max_epochs": 1},
    "logger_false": {"logger": False},
}


def _run(cfg: str, callback: Any, tmp_path) -> pl.Trainer:
    pl.seed_everything(0)
    model: Any = TinyClassifier()
    data: Any = BlobData()
    if cfg == "no_val_loader":
        data = NoValLoader()
    elif cfg == "two_val_loaders":
        data, model = TwoValLoaders(), MultiLoaderClassifier()
    kwargs = {"max_epochs": 2, "default_root_dir": str(tmp_path), **CONFIGS[cfg]}
    trainer = quiet_trainer(callbacks=[callback], **kwargs)
    trainer.fit(model, datamodule=data)
    if cfg == "validate_after_fit":
        trainer.validate(model, datamodule=data, verbose=False)
    return trainer


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback_produces_output_or_says_why_once(name, cfg, tmp_path):
    factory, output = CALLBACKS[name]
    callback = factory()
    own = type(callback).__name__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _run(cfg, callback, tmp_path)
    mine = [str(w.message) for w in caught if str(w.message).startswith(own)]
    assert not callback.errors, [str(e) for e in callback.errors]
    assert output(callback) or mine, f"{name} under {cfg}: no output and no warning naming it"
    assert len(mine) == len(set(mine)), f"{name} repeated a warning: {mine}"
    # these callbacks find their data in every configuration: they must produce output, not only explain why
    assert output(callback), f"{name} under {cfg} produced nothing: {mine}"
    if cfg in ("max_steps_mid_epoch", "limit_val_batches_0") and callback.every_n_epochs is not None:
        assert any("end of fit" in m for m in mine), mine
    if cfg == "two_val_loaders" and name != "DissectionScores":  # DissectionScores has its own probe dataset
        assert any("loader" in m for m in mine), mine
    records = getattr(callback, "records", None) or getattr(callback, "history", None)
    if records and isinstance(records[0], dict):
        keys = [(r["stage"], r["step"]) for r in records]
        assert len(keys) == len(set(keys)), f"{name} records repeat a (stage, step): {keys}"
        if cfg == "validate_after_fit" and callback.every_n_epochs is not None:
            assert records[-1]["stage"] == "validate" and records[-2]["stage"] == "fit"
        if cfg == "val_check_interval_half" and callback.every_n_epochs is not None:
            assert [r["epoch"] for r in records] == [0, 1], "runs at epoch ends, not at every validation"
    assert trainer.state.finished
