"""ExplanationQuality and SanityCheck inside real Trainer runs."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks import ExplanationQuality, SanityCheck
from lightning_xai.evaluation import deletion_auc, mask_iou, relevance_mass
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
