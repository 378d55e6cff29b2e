"""The DissectionScores callback inside real Trainer runs (the pure dissection is tested in test_dissection.py)."""

from __future__ import annotations

import csv
import glob
import os
import warnings

import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, quiet_trainer

from lightning_xai.callbacks.base import ConfigurationError
from lightning_xai.callbacks.dissection import DissectionScores
from lightning_xai.data.concepts import ConceptDataModule, ConceptScenes
from lightning_xai.interpretation.dissection import TABLE_COLUMNS, NetworkDissection
from lightning_xai.namespace import pl


def _concept_data() -> ConceptDataModule:
    return ConceptDataModule(image_size=32, n_train=32, n_val=24, n_test=8, batch_size=16, class_rule="shape")


def test_callback_fit_logs_tables_metrics_and_history(tmp_path):
    callback = DissectionScores(
        "features.3", num_samples=16, batch_size=8, output_dir=str(tmp_path / "out"), num_rendered_units=2
    )
    pl.seed_everything(0)
    model = TinyClassifier(num_classes=4)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(model, _concept_data())
    assert [h["epoch"] for h in callback.history] == [0, 1] and not callback.errors
    result = callback.last_result
    assert trainer.callback_metrics["xai/dissection/detectors"] == result.num_detectors
    assert "xai/dissection/unique_detectors/colour" in trainer.callback_metrics
    assert callback.history[-1]["unique_detectors"] == result.unique_detectors_per_category()
    # the table written for the last epoch is the result's rows
    path = tmp_path / "out" / f"xai_dissection_units_step{trainer.global_step}.csv"
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(TABLE_COLUMNS) and len(rows) == 1 + result.num_units
    assert [int(r[0]) for r in rows[1:]] == [r[0] for r in result.rows()]
    assert glob.glob(str(tmp_path / "out" / "xai_dissection_top_units_*_c3.png"))
    # the same probe dissected directly gives the same result (the trained weights are those of the last epoch)
    ds = trainer.datamodule.dataset("val")
    idx = torch.tensor(callback.probe.indices)
    direct = NetworkDissection("features.3")(
        model, [(ds.images[idx], ds.concept_masks_for(idx), idx)], ds.concept_names
    )
    assert torch.equal(direct.intersection, result.intersection)
    assert torch.equal(direct.thresholds, result.thresholds)


def test_callback_validate_fit_end_and_compositional(tmp_path):
    callback = DissectionScores(
        "features.4", num_samples=12, when="fit_end", compositional_units=2, max_length=2, output_dir=""
    )
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(num_classes=4), _concept_data())
    assert len(callback.history) == 1 and callback.last_outputs == []
    assert len(callback.last_explanations) == min(2, callback.last_result.num_detectors)

    monitor = DissectionScores("features.4", num_samples=12, output_dir="", probe_dataset=ConceptScenes(20, 32))
    quiet_trainer(callbacks=[monitor], inference_mode=True).validate(TinyClassifier(num_classes=4), _concept_data())
    assert len(monitor.history) == 1 and not monitor.errors


def test_callback_state_resumes_history(tmp_path):
    ModelCheckpoint = pl.callbacks.ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = DissectionScores("features.3", num_samples=8, output_dir="", num_rendered_units=0)
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[first, ckpt], enable_checkpointing=True, default_root_dir=str(tmp_path)
    )
    trainer.fit(TinyClassifier(num_classes=4), _concept_data())
    resumed = DissectionScores("features.3", num_samples=8, output_dir="", num_rendered_units=0, seed=99)
    trainer = quiet_trainer(max_epochs=2, callbacks=[resumed], default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(num_classes=4), _concept_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[0] == first.history[0]
    assert resumed.probe.indices == first.probe.indices  # restored, not redrawn with the new seed


def test_callback_wandb_offline_logs_tables(tmp_path):
    wandb = pytest.importorskip("wandb")
    WandbLogger = pl.loggers.WandbLogger

    logger = WandbLogger(project="xai-test", save_dir=str(tmp_path), offline=True)
    callback = DissectionScores("features.3", num_samples=8, num_rendered_units=1)
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger, default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(num_classes=4), _concept_data())
    run_dir = logger.experiment.dir
    wandb.finish()
    tables = glob.glob(os.path.join(run_dir, "media", "table", "**", "*.json"), recursive=True)
    names = {os.path.basename(p).split("_step")[0].split("_0_")[0] for p in tables}
    assert any("units" in n for n in names) and any("detectors_per_category" in n for n in names), tables
    assert set(callback.last_outputs) >= {"wandb:xai/dissection/units", "wandb:xai/dissection/top_units"}


def test_data_without_concept_masks_raises_at_setup_whatever_on_error(tmp_path):
    """Issue 19.1: a configuration mistake raises before the first training step (it used to warn every epoch)."""
    for on_error in ("warn", "raise"):
        callback = DissectionScores("features.3", num_samples=4, output_dir="", on_error=on_error)
        trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
        with pytest.raises(ConfigurationError, match="DissectionScores needs a concept dataset"):
            trainer.fit(TinyClassifier(), BlobData())  # no concept masks in this data
        assert trainer.global_step == 0 and not callback.history


def test_wrong_layer_raises_at_setup_with_close_names(tmp_path):
    callback = DissectionScores("features.9", num_samples=4, output_dir="")
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"features\.9.*did you mean.*'features\.[0-4]'"):
        trainer.fit(TinyClassifier(num_classes=4), _concept_data())
    assert trainer.global_step == 0
    flat = DissectionScores("head", num_samples=4, output_dir="")  # a linear layer: no feature maps
    trainer = quiet_trainer(max_epochs=1, callbacks=[flat], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match="cannot be dissected"):
        trainer.fit(TinyClassifier(num_classes=4), _concept_data())


class _BreaksLater(ConceptScenes):
    """A concept dataset whose masks fail once the run is under way (a runtime fault, not a configuration one)."""

    def concept_masks_for(self, indices):
        if getattr(self, "broken", False):
            raise RuntimeError("mask store unavailable")
        return super().concept_masks_for(indices)


def test_runtime_fault_warns_or_raises(tmp_path):
    data = _BreaksLater(12, image_size=32)
    data.broken = True
    callback = DissectionScores("features.3", num_samples=4, output_dir="", probe_dataset=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=2, callbacks=[callback], default_root_dir=str(tmp_path))
        trainer.fit(TinyClassifier(num_classes=4), _concept_data())
    assert trainer.current_epoch == 2 and "mask store unavailable" in callback.errors[0]
    assert any("DissectionScores" in str(w.message) and "mask store" in str(w.message) for w in caught)
    strict = DissectionScores("features.3", num_samples=4, output_dir="", on_error="raise", probe_dataset=data)
    with pytest.raises(RuntimeError, match="DissectionScores failed.*mask store unavailable"):
        quiet_trainer(max_epochs=1, callbacks=[strict]).fit(TinyClassifier(num_classes=4), _concept_data())


def test_configured_network_dissection_equals_keyword_arguments(tmp_path):
    """Issue 15.1: the callback takes the configured method object; the old keywords build the same object."""
    configured = NetworkDissection("features.3", quantile=0.02, top_k=2)
    by_object = DissectionScores(configured, num_samples=8, output_dir="", num_rendered_units=0)
    by_name = DissectionScores(dissection=configured, num_samples=8, output_dir="", num_rendered_units=0)
    by_keywords = DissectionScores("features.3", quantile=0.02, top_k=2, num_samples=8, output_dir="",
                                   num_rendered_units=0, log_key="xai/dissection2")
    assert by_object.dissection is configured and by_name.dissection is configured
    pl.seed_everything(0)
    model = TinyClassifier(num_classes=4)
    trainer = quiet_trainer(max_epochs=1, callbacks=[by_object, by_keywords], default_root_dir=str(tmp_path))
    trainer.fit(model, _concept_data())
    assert torch.equal(by_object.last_result.intersection, by_keywords.last_result.intersection)
    assert by_object.last_result.top_indices.shape[1] == 2
    assert configured.reduce is None, "the configured object is left as the user made it"
    with pytest.raises(ValueError, match="quantile.*NetworkDissection"):
        DissectionScores(configured, quantile=0.1)


def test_when_is_a_deprecated_alias_of_every_n_epochs_none():
    with pytest.warns(DeprecationWarning, match="when="):
        callback = DissectionScores("features", when="fit_end")
    assert callback.every_n_epochs is None and callback.when == "fit_end"


def test_rendering_is_off_the_per_epoch_path(tmp_path):
    """Issue 21.3: the top-unit images are rendered once at the end of fit (from the last result, on the final
    weights), not at every epoch."""
    callback = DissectionScores("features.3", num_samples=12, output_dir=str(tmp_path / "out"), num_rendered_units=2)
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(num_classes=4), _concept_data())
    assert len(callback.history) == 3
    tables = glob.glob(str(tmp_path / "out" / "xai_dissection_units_step*.csv"))
    pictures = {os.path.basename(p).split("_r")[0] for p in glob.glob(str(tmp_path / "out" / "*top_units*.png"))}
    assert len(tables) == 3 and pictures == {f"xai_dissection_top_units_step{trainer.global_step}"}
    every = DissectionScores("features.3", num_samples=12, output_dir=str(tmp_path / "every"), num_rendered_units=2,
                             render="every_run")
    quiet_trainer(max_epochs=2, callbacks=[every], default_root_dir=str(tmp_path)).fit(
        TinyClassifier(num_classes=4), _concept_data()
    )
    steps = {os.path.basename(p).split("_r")[0] for p in glob.glob(str(tmp_path / "every" / "*top_units*.png"))}
    assert len(steps) == 2


def test_render_strips_equal_render_top_images():
    """The batched rendering draws exactly what NetworkDissection.render_top_images draws unit by unit."""
    ds = ConceptScenes(24, image_size=32, seed=0)
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=4).eval()
    dissection = NetworkDissection("features.3", quantile=0.05, top_k=3)
    idx = torch.arange(24)
    result = dissection(model, [(ds.images[idx], ds.concept_masks_for(idx), idx)], ds.concept_names)
    callback = DissectionScores(dissection, num_samples=4)
    units = [0, 3, 5]
    batched = callback.render_strips(model, result, ds, units)
    reference = dissection.render_top_images(model, result, ds.images, units)
    assert set(batched) == set(reference)
    for unit in units:
        assert (batched[unit] == reference[unit]).all(), unit


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantile": 1.5}, "quantile"),
        ({"iou_threshold": -1}, "iou_threshold"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"num_samples": 0}, "num_samples"),
        ({"split": "validation"}, "split"),
        ({"when": "epoch_end"}, "when"),
        ({"on_error": "ignore"}, "on_error"),
        ({"layer": ""}, "layer"),
        ({"probe_dataset": [1, 2]}, "concept dataset"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DissectionScores(**{"layer": "features", **kwargs})




def test_dataset_is_the_common_name_of_probe_dataset():
    data = ConceptScenes(12, image_size=24)
    assert DissectionScores("features", dataset=data).probe_dataset is data
    with pytest.raises(ValueError, match="not both"):
        DissectionScores("features", dataset=data, probe_dataset=data)
    with pytest.raises(ValueError, match="concept dataset"):
        DissectionScores("features", dataset=[1, 2])


def test_validate_after_fit_writes_beside_not_over_the_fit_tables(tmp_path):
    """Issue 19.6: trainer.validate after fit (same global step) keeps the fit's files and appends to history."""
    callback = DissectionScores("features.3", num_samples=8, output_dir=str(tmp_path / "out"), num_rendered_units=0)
    pl.seed_everything(0)
    model = TinyClassifier(num_classes=4)
    data = _concept_data()
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    fit_table = tmp_path / "out" / f"xai_dissection_units_step{trainer.global_step}.csv"
    before = fit_table.read_text()
    trainer.validate(model, datamodule=data, verbose=False)
    assert fit_table.read_text() == before
    assert (tmp_path / "out" / "validate" / fit_table.name).exists()
    assert [h["stage"] for h in callback.history] == ["fit", "validate"]
