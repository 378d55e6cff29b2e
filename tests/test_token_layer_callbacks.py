"""DissectionScores and RelevantUnits on a vision transformer's token layer, inside Trainer runs: the configured
method objects read the layer's D channels on the patch grid, and a grid that does not fit fails at setup."""

from __future__ import annotations

import pytest
import torch
from lightning_helpers import quiet_trainer

from lightning_xai.callbacks.base import ConfigurationError
from lightning_xai.callbacks.dissection import DissectionScores
from lightning_xai.callbacks.relevant_units import RelevantUnits
from lightning_xai.data import GroundTruthDataModule
from lightning_xai.data.concepts import ConceptDataModule
from lightning_xai.interpretation.dissection import NetworkDissection
from lightning_xai.interpretation.relevant_units import RelevantUnitAnalysis
from lightning_xai.models.transformers import ViTClassifier
from lightning_xai.namespace import pl

LAYER = "backbone.encoder.layers.encoder_layer_1"


def _concept_data() -> ConceptDataModule:
    return ConceptDataModule(image_size=32, n_train=32, n_val=24, n_test=8, batch_size=16, class_rule="shape")


def test_dissection_scores_on_a_vit_token_layer(tmp_path):
    data = _concept_data()
    callback = DissectionScores(NetworkDissection(LAYER), num_samples=16, batch_size=8, output_dir="",
                                num_rendered_units=2, render="every_run")
    pl.seed_everything(0)
    model = ViTClassifier(num_classes=data.num_classes, image_size=32, patch_size=8)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    assert not callback.errors and len(callback.history) == 1
    result = callback.last_result
    assert result.num_units == 32, "the units of the token layer are its 32 channels"
    # the same probe dissected directly, with the grid given explicitly, gives the same counts
    ds = trainer.datamodule.dataset("val")
    idx = torch.tensor(callback.probe.indices)
    direct = NetworkDissection(LAYER, reshape=(4, 4))(model, [(ds.images[idx], ds.concept_masks_for(idx), idx)],
                                                      ds.concept_names)
    assert torch.equal(direct.intersection, result.intersection)
    assert torch.equal(direct.unit_area, result.unit_area)
    strips = callback.render_strips(model, result, ds, [0])
    assert strips[0].ndim == 3 and strips[0].dtype.name == "uint8"


def test_dissection_scores_with_a_grid_that_does_not_fit_fails_at_setup(tmp_path):
    data = _concept_data()
    callback = DissectionScores(LAYER, reshape=(5, 5), num_samples=8, on_error="warn")
    model = ViTClassifier(num_classes=data.num_classes, image_size=32, patch_size=8)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"DissectionScores: .*reshape=\(5, 5\).*grid \(4, 4\).*Valid reshape"):
        trainer.fit(model, data)
    with pytest.raises(ValueError, match=r"DissectionScores: NetworkDissection: reshape must be None.*got 'grid'"):
        DissectionScores(LAYER, reshape="grid")


def test_relevant_units_on_a_vit_token_layer(tmp_path):
    data = GroundTruthDataModule(image_size=32, n_train=48, n_val=16, n_test=16, batch_size=16)
    analysis = RelevantUnitAnalysis(LAYER, mu=2.0)
    callback = RelevantUnits(analysis, num_samples=48, top_k=2, units_per_class=1, num_random=1,
                             output_dir=str(tmp_path / "out"))
    pl.seed_everything(0)
    model = ViTClassifier(num_classes=6, image_size=32, patch_size=8)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    assert not callback.errors and len(callback.history) == 1
    result = callback.last_result
    assert result.units == [(LAYER, d) for d in range(32)], "one unit per channel of the token layer"
    assert callback.last_ablation is not None and int(callback.last_ablation.totals.sum()) == 48
    units = [u for rows in callback.history[0]["units"].values() for u in rows]
    assert units and all(u[0] == LAYER and 0 <= u[1] < 32 for u in units)


def test_relevant_units_with_a_grid_that_does_not_fit_fails_at_setup(tmp_path):
    data = GroundTruthDataModule(image_size=32, n_train=32, n_val=16, n_test=16, batch_size=16)
    callback = RelevantUnits(RelevantUnitAnalysis(LAYER, reshape=(5, 5)), num_samples=16)
    model = ViTClassifier(num_classes=6, image_size=32, patch_size=8)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"RelevantUnits: .*RelevantUnitAnalysis: .*reshape=\(5, 5\)"):
        trainer.fit(model, data)


# ------------------------------------------------------------------------------------------------ text models
def _text_run(callback, tmp_path):
    from lightning_xai.data.tokens import PlantedTokensDataModule
    from lightning_xai.models.transformers import TextClassifier

    data = PlantedTokensDataModule(n_train=32, n_val=16, n_test=8, batch_size=16, min_length=8, seed=3)
    model = TextClassifier(max_len=data.seq_len)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    return trainer, model, data, before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # relevant units work in image space: reading a text layer's tokens as units would be a wrong number
        (lambda: RelevantUnits(RelevantUnitAnalysis("backbone.blocks.1"), num_samples=8),
         r"RelevantUnits: .*RelevantUnitAnalysis: layer 'backbone.blocks.1' emits token activations \[\d+, 17, 32\] "
         r"of a model fed token ids .* not text token layers"),
        # the randomisation test compares image maps: said as such, also when every method takes token ids
        (lambda: __import__("lightning_xai.callbacks", fromlist=["SanityCheck"]).SanityCheck(
            [{"name": "token_saliency", "embedding": "backbone.embedding"}], num_samples=4),
         r"SanityCheck: the inputs are token ids .* does not score token maps yet"),
    ],
)
def test_image_space_callbacks_refuse_text_models_at_setup(tmp_path, make, message):
    trainer, model, data, before = _text_run(make(), tmp_path)
    with pytest.raises(ConfigurationError, match=message):
        trainer.fit(model, datamodule=data)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # before the first training step


def test_unit_ablation_refuses_a_text_token_layer():
    from lightning_xai.data.tokens import PlantedTokens
    from lightning_xai.interpretation.relevant_units import RelevantUnitsResult
    from lightning_xai.interpretation.unit_ablation import unit_ablation
    from lightning_xai.models.transformers import TextTransformer

    data = PlantedTokens(size=8, seed=0)
    model = TextTransformer(data.vocab_size, data.num_classes, max_len=data.seq_len)
    units = [("blocks.0", d) for d in range(4)]
    weights = torch.eye(4)[:, : data.num_classes]  # unit d relevant to class d (a hand-made result)
    result = RelevantUnitsResult(units, weights, torch.ones(4), mu=1.0, layers=["blocks.0"])
    with pytest.raises(ValueError, match=r"unit_ablation: layer 'blocks.0' emits token activations .* not text token"):
        unit_ablation(model, result, (data.tokens, data.labels), num_random=1)
