"""ExplanationMonitor on a token model: integer [B, T] inputs with token methods, rendered as highlighted text."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from lightning_xai.callbacks import ConfigurationError, ExplanationMonitor
from lightning_xai.data.tokens import PlantedTokensDataModule, token_names
from lightning_xai.models.transformers import TextClassifier
from lightning_xai.namespace import pl


def _fit(tmp_path, monitor):
    pl.seed_everything(0)
    data = PlantedTokensDataModule(n_train=128, n_val=32, n_test=8, batch_size=32)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[monitor],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(TextClassifier(), datamodule=data)
    return trainer


def test_token_model_explained_as_highlighted_text(tmp_path):
    names = token_names(4, 2, 32)
    monitor = ExplanationMonitor(
        [{"name": "token_saliency", "embedding": "backbone.embedding"}, "attention_rollout"],
        num_samples=4, target="label", vocabulary=names,
    )
    _fit(tmp_path, monitor)
    assert not monitor.errors, [str(e) for e in monitor.errors]
    assert [e for e, _ in monitor.drift_history["token_saliency"]] == [1]
    assert monitor.padding == 0  # the model's pad token: the drift ranks the tokens, not the padding
    texts = sorted(glob.glob(os.path.join(str(tmp_path), "**", "*token_saliency*.txt"), recursive=True))
    htmls = sorted(glob.glob(os.path.join(str(tmp_path), "**", "*attention_rollout*.html"), recursive=True))
    assert texts and htmls, sorted(glob.glob(os.path.join(str(tmp_path), "**", "*"), recursive=True))
    text = open(texts[-1], encoding="utf-8").read()
    assert "true" in text and "pred" in text and any(n in text for n in names[1:])
    assert "<span" in open(htmls[-1], encoding="utf-8").read()


def test_image_methods_on_token_ids_are_a_configuration_error(tmp_path):
    monitor = ExplanationMonitor(["saliency"], num_samples=2)
    with pytest.raises(ConfigurationError, match="token methods"):
        _fit(tmp_path, monitor)


def test_drift_ranks_the_tokens_not_the_padding():
    # a reversed ranking of the 4 tokens is drift -1; the 4 padding zeros, equal in both runs, must not count
    first = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    second = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 4 + [False] * 4])
    monitor = ExplanationMonitor(["attention_rollout"], pad_token=0)
    monitor._update_drift({"m": first}, valid)
    assert monitor._update_drift({"m": second}, valid)["m"] == pytest.approx(-1.0)
    # with the padding ranked, the tied zeros agree: Spearman 27 / 37 (ranks 4..7 vs 7..4, ties at 1.5)
    unpadded = ExplanationMonitor(["attention_rollout"])
    unpadded._update_drift({"m": first})
    assert unpadded._update_drift({"m": second})["m"] == pytest.approx(27 / 37)
    # fewer than two tokens: no ranking, no drift
    monitor._update_drift({"m": first}, valid)
    assert monitor._update_drift({"m": second}, valid & (torch.arange(8) < 1)) == {}
