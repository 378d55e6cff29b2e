"""ExplanationQuality and SanityCheck inside real Trainer runs."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks import ExplanationQuality, SanityCheck
from lightning_xai.callbacks.base import ConfigurationError
from lightning_xai.evaluation import ModelRandomization, deletion_auc, infidelity, mask_iou, relevance_mass
from lightning_xai.namespace import pl


class InputCopy(Attributor):
    """An 'explanation' that ignores the model: it returns the input (an edge-detector-like failure case)."""

    def attribute(self, model, inputs, target):
        return inputs.detach().clone()


def test_quality_values_equal_direct_metric_computation(tmp_path):
    quality = ExplanationQuality(
        ["saliency", {"name": "gradcam", "layer": "features"}],
        metrics=["deletion_auc", "mask_iou", "relevance_mass", "sparseness"],
        metric_kwargs={"deletion_auc": {"steps": 16}},
        num_samples=6,
        log_curves=True,
    )
    pl.seed_everything(0)
    model = TinyClassifier()
    data = BlobData()
    trainer = quiet_trainer(max_epochs=2, callbacks=[quality], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    assert not quality.errors
    assert [e for e, _ in quality.history] == [0, 1]
    logged = trainer.callback_metrics
    for key in ("saliency/mask_iou", "gradcam/deletion_auc", "gradcam/relevance_mass", "saliency/sparseness"):
        assert f"xai/{key}" in logged

    # independent recomputation on the same probe samples with the functional metrics
    model.eval()
    x = torch.stack([data.val_set[i][0] for i in quality.probe.indices])
    y = torch.stack([data.val_set[i][1] for i in quality.probe.indices])
    m = torch.stack([data.val_set[i][2] for i in quality.probe.indices])
    values = quality.evaluate(trainer, model)
    maps = build_attributor({"name": "gradcam", "layer": "features"})(model, x, y)
    assert values["gradcam/mask_iou"] == pytest.approx(float(mask_iou(maps, m).nanmean()), abs=1e-6)
    assert values["gradcam/relevance_mass"] == pytest.approx(float(relevance_mass(maps, m).nanmean()), abs=1e-6)
    direct = deletion_auc(maps, x, model, y, steps=16)
    assert values["gradcam/deletion_auc"] == pytest.approx(float(direct.mean()), abs=1e-5)


def test_quality_without_masks_skips_localisation(tmp_path):
    class NoMaskData(BlobData):
        def val_dataloader(self):
            x, y, _ = self.val_set.tensors
            return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    quality = ExplanationQuality(["saliency"], metrics=["mask_iou", "sparseness"], num_samples=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
        trainer.fit(TinyClassifier(), NoMaskData())
    assert any("no masks" in str(w.message) for w in caught)
    assert "xai/saliency/sparseness" in trainer.callback_metrics
    assert "xai/saliency/mask_iou" not in trainer.callback_metrics


def test_sanity_check_flags_a_model_independent_method_and_leaves_model_alone(tmp_path):
    check = SanityCheck(["saliency", InputCopy()], similarity="spearman_abs", num_samples=4, threshold=0.5)
    pl.seed_everything(0)
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=3, callbacks=[check], default_root_dir=str(tmp_path))
    trainer.fit(model, BlobData())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = check.check(trainer, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the sanity check changed {k}"
    copy = results["inputcopy"]
    assert copy["curve"][0] == pytest.approx(1.0)
    assert min(copy["curve"]) == pytest.approx(1.0), "an input copy cannot change when the model is randomised"
    assert copy["passes"] is False
    saliency = results["saliency"]
    assert saliency["layers"][0] == "original" and len(saliency["layers"]) == len(saliency["curve"])
    assert saliency["curve"][0] == pytest.approx(1.0)
    assert saliency["curve"][-1] < 0.9, "gradients must change once every layer is randomised"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metrics": ["mask_iuo"]}, "unknown metric"),
        ({"metrics": []}, "at least one metric"),
        ({"metric_kwargs": {"aopc": {}}}, "not in metrics"),
        ({"metric_kwargs": {"deletion_auc": {"steps": 0}}}, "steps"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
    ],
)
def test_quality_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExplanationQuality(**kwargs)


def test_sanity_check_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        SanityCheck(mode="sideways")
    with pytest.raises(ValueError, match="top_layers"):
        SanityCheck(top_layers=0)


# ------------------------------------------------------------------------------------- issue 19 / 21 / 15 items


class NaNMap(Attributor):
    """A broken method: its maps are NaN."""

    def attribute(self, model, inputs, target):
        return torch.full_like(inputs[:, :1], float("nan"))


class NaNOnMarked(TinyClassifier):
    """The model's output is NaN for images whose top-left pixel is marked (> 5)."""

    def forward(self, x):
        out = super().forward(x)
        marked = (x[:, 0, 0, 0] > 5).view(-1, 1)
        return torch.where(marked, torch.full_like(out, float("nan")), out)


class MarkedData(BlobData):
    """Validation sample 0 and 1 carry the marker."""

    def __init__(self) -> None:
        super().__init__()
        self.val_set.tensors[0][:2, 0, 0, 0] = 10.0


def _concept_data():
    from lightning_xai.data.concepts import ConceptDataModule

    return ConceptDataModule(image_size=24, n_train=32, n_val=16, n_test=8, batch_size=16, class_rule="shape")


def test_quality_on_concept_data_scores_what_applies_and_says_once(tmp_path):
    """Issue 19.2: the [B, K] concept vector of ConceptDataModule is not a mask; deletion/insertion still run."""
    quality = ExplanationQuality(["saliency"], metric_kwargs={"deletion_auc": {"steps": 8},
                                                              "insertion_auc": {"steps": 8}}, num_samples=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=2, callbacks=[quality], default_root_dir=str(tmp_path))
        trainer.fit(TinyClassifier(num_classes=4), _concept_data())
    said = [str(w.message) for w in caught if "no masks" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("ExplanationQuality")
    assert "mask_iou" in said[0] and "deletion_auc" in said[0]
    assert quality.active_metrics == ["deletion_auc", "insertion_auc"]
    assert [sorted(v) for _, v in quality.history] == [["saliency/deletion_auc", "saliency/insertion_auc"]] * 2


def test_quality_configuration_mistakes_raise_before_training(tmp_path):
    """Issue 19.1: only mask metrics on data without masks, a class out of range, a wrong layer - all raise at
    setup, whatever on_error says."""
    cases = [
        (ExplanationQuality(["saliency"], metrics=["mask_iou"], num_samples=2), _concept_data(), "need pixel masks"),
        (ExplanationQuality(["saliency"], target=7, num_samples=2), BlobData(), "out of range"),
        (ExplanationQuality([{"name": "gradcam", "layer": "featurs"}], num_samples=2), BlobData(), "features"),
    ]
    for callback, data, match in cases:
        trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
        with pytest.raises(ConfigurationError, match=match):
            trainer.fit(TinyClassifier(num_classes=4), data)
        assert trainer.global_step == 0


def test_quality_nan_map_is_isolated_and_named(tmp_path):
    """Issue 19.9: one method's NaN map never loses the other methods' scores; the method is named."""
    quality = ExplanationQuality([NaNMap(), "saliency"], metrics=["mask_iou", "sparseness"], num_samples=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
        trainer.fit(TinyClassifier(), BlobData())
    assert "nanmap" in quality.errors.methods()
    assert any("nanmap" in str(w.message) and "NaN" in str(w.message) for w in caught)
    assert sorted(quality.history[-1][1]) == ["saliency/mask_iou", "saliency/sparseness"]
    assert "xai/saliency/mask_iou" in trainer.callback_metrics
    assert not any("nanmap" in k for k in trainer.callback_metrics)


def test_quality_nonfinite_logits_are_reported_not_scored(tmp_path):
    """Issue 19.10: samples whose model output is NaN are named and left out; the rest is scored as before."""
    quality = ExplanationQuality(["saliency"], metrics=["mask_iou", "deletion_auc"],
                                 metric_kwargs={"deletion_auc": {"steps": 8}}, num_samples=24)
    data = MarkedData()
    model = NaNOnMarked()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
        trainer.fit(model, data)
    said = [str(w.message) for w in caught if "NaN or inf for probe sample" in str(w.message)]
    assert len(said) == 1 and "[0, 1]" in said[0].replace("[1, 0]", "[0, 1]"), said
    record = quality.records[-1]
    assert record["scored"]["saliency/mask_iou"] == 22
    ok = [i for i in quality.probe.indices if i >= 2]
    x, y, m = (t[ok] for t in data.val_set.tensors)
    maps = build_attributor("saliency")(model, x, y)
    assert record["values"]["saliency/mask_iou"] == pytest.approx(float(mask_iou(maps, m).nanmean()), abs=1e-6)


def test_quality_logs_standard_errors(tmp_path):
    """Issue 21.2: <metric>_sem is the standard error of the mean over the probe set."""
    quality = ExplanationQuality(["saliency"], metrics=["relevance_mass", "deletion_auc"],
                                 metric_kwargs={"deletion_auc": {"steps": 8}}, num_samples=12)
    pl.seed_everything(0)
    model = TinyClassifier()
    data = BlobData()
    trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    x, y, m = (t[quality.probe.indices] for t in data.val_set.tensors)
    maps = build_attributor("saliency")(model.eval(), x, y)
    per_sample = relevance_mass(maps, m)
    sem = float(per_sample.std(unbiased=True) / len(per_sample) ** 0.5)
    assert float(trainer.callback_metrics["xai/saliency/relevance_mass_sem"]) == pytest.approx(sem, rel=1e-4)
    direct = deletion_auc(maps, x, model, y, steps=8)
    logged = float(trainer.callback_metrics["xai/saliency/deletion_auc_sem"])
    assert logged == pytest.approx(float(direct.std() / len(direct) ** 0.5), rel=1e-4)
    assert quality.records[-1]["sem"]["saliency/deletion_auc"] == pytest.approx(logged, rel=1e-6)


def test_quality_passes_sample_ids_to_random_metrics(tmp_path):
    """Issue 18.1: infidelity's noise is seeded by the probe samples' dataset indices (sharding-independent)."""
    quality = ExplanationQuality(["saliency"], metrics=["infidelity"], metric_kwargs={"infidelity": {"num_samples": 4}},
                                 num_samples=6)
    pl.seed_everything(0)
    model = TinyClassifier()
    data = BlobData()
    trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    ids = torch.tensor(quality.probe.indices)
    x, y = data.val_set.tensors[0][ids], data.val_set.tensors[1][ids]
    maps = build_attributor("saliency")(model.eval(), x, y)
    with_ids = infidelity(maps, x, model, y, num_samples=4, sample_ids=ids)
    by_position = infidelity(maps, x, model, y, num_samples=4)
    value = quality.history[-1][1]["saliency/infidelity"]
    assert value == pytest.approx(float(with_ids.mean()), rel=1e-5)
    assert value != pytest.approx(float(by_position.mean()), rel=1e-5)


def test_quality_default_cost_is_bounded():
    """Issue 21.2: the defaults are 16 probe samples (measured cost in the class docstring)."""
    quality = ExplanationQuality()
    assert quality.probe.num_samples == 16 and list(quality.attributors) == ["saliency", "gradcam"]
    deletion = quality._new_metric("deletion_auc")
    assert deletion.steps == 64, "the curve keeps its resolution: only the probe is smaller"


def test_sanity_wrong_layer_raises_at_setup_with_close_names(tmp_path):
    """Issue 19.1: SanityCheck(layers=["nope"]) raises before the first training step, whatever on_error."""
    for on_error in ("warn", "raise"):
        check = SanityCheck(["saliency"], layers=["features.O"], num_samples=2, on_error=on_error)
        trainer = quiet_trainer(max_epochs=1, callbacks=[check], default_root_dir=str(tmp_path))
        with pytest.raises(ConfigurationError, match=r"SanityCheck.*'features\.O'.*did you mean.*'features\.0'"):
            trainer.fit(TinyClassifier(), BlobData())
        assert trainer.global_step == 0
    check = SanityCheck(["saliency"], layers=["features.2"], num_samples=2)  # a ReLU: nothing to randomise
    with pytest.raises(ConfigurationError, match="no parameters"):
        quiet_trainer(max_epochs=1, callbacks=[check]).fit(TinyClassifier(), BlobData())


def test_sanity_without_logger_saves_results(tmp_path):
    """Issue 19.8: logger=False still keeps the results, as files under output_dir."""
    check = SanityCheck(["saliency"], num_samples=3, output_dir=str(tmp_path / "out"))
    trainer = quiet_trainer(max_epochs=1, callbacks=[check], logger=False, default_root_dir=str(tmp_path))
    trainer.fit(TinyClassifier(), BlobData())
    files = sorted(os.listdir(tmp_path / "out" / "sanitycheck"))
    saved = [f for f in files if f.endswith(".json")]
    assert len(saved) == 1 and any(f.endswith(".csv") for f in files), files
    with open(tmp_path / "out" / "sanitycheck" / saved[0]) as f:
        content = json.load(f)
    assert content["results"]["saliency"]["curve"] == pytest.approx(check.results["saliency"]["curve"])
    assert len(check.records) == 1 and check.records[0]["stage"] == "fit"


def test_sanity_nan_map_is_isolated_and_named(tmp_path):
    check = SanityCheck([NaNMap(), "saliency"], num_samples=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=1, callbacks=[check], default_root_dir=str(tmp_path)).fit(TinyClassifier(), BlobData())
    assert set(check.results) == {"saliency"} and "nanmap" in check.errors.methods()
    assert any("SanityCheck (nanmap)" in str(w.message) for w in caught)


def test_sanity_takes_configured_model_randomization(tmp_path):
    """Issue 15.1: a configured ModelRandomization is accepted as a method; its mode and layers are used."""
    configured = ModelRandomization("saliency", mode="independent", layers=["head"], seed=3)
    check = SanityCheck([configured, {"name": "gradcam", "layer": "features"}], num_samples=3)
    assert list(check.checkers) == ["saliency", "gradcam"]
    assert check.checkers["saliency"].mode == "independent" and check.checkers["gradcam"].mode == "cascading"
    quiet_trainer(max_epochs=1, callbacks=[check], default_root_dir=str(tmp_path)).fit(TinyClassifier(), BlobData())
    assert check.results["saliency"]["layers"] == ["original", "head"]
    assert len(check.results["gradcam"]["layers"]) > 2


def test_sanity_nonfinite_logits_are_reported_not_checked(tmp_path):
    """Issue 19.10: samples with NaN outputs are left out; with none left there is no (pass/fail) result."""
    data = MarkedData()
    check = SanityCheck(["saliency"], num_samples=24, every_n_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=1, callbacks=[check], default_root_dir=str(tmp_path)).fit(NaNOnMarked(), data)
    assert check.results["saliency"]["num_samples"] == 22
    assert any("NaN or inf for probe sample" in str(w.message) for w in caught)
    data.val_set.tensors[0][:, 0, 0, 0] = 10.0  # every sample's output is NaN now
    nothing = SanityCheck(["saliency"], num_samples=4, every_n_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=1, callbacks=[nothing], default_root_dir=str(tmp_path)).fit(NaNOnMarked(), data)
    assert nothing.results == {}
    assert any("SanityCheck: saliency: no probe sample could be checked" in str(w.message) for w in caught)
