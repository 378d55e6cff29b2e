"""Sparse autoencoders on a token model's residual stream: ActivationSource(spatial="tokens") and the SAE module.

A small TextTransformer is trained (plain torch loop, ~1 s) on PlantedTokens with variable lengths, so that about a
quarter of the positions are padding. The checks: rows are exactly the real tokens (closed form on the embedding
layer), padding is left out of the scale, splicing the identity gives the clean logits and splicing zeros the
zero-ablated ones (loss recovered exactly 1 and 0), a short fit explains most of the variance, the per-rank cache
under two simulated ranks holds exactly each rank's real tokens, and a layer without [B, T, D] output is a clear
error.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import quiet_trainer

from lightning_xai.data.tokens import PAD_TOKEN, PlantedTokens, PlantedTokensDataModule
from lightning_xai.distributed import ThreadGroup
from lightning_xai.evaluation.sae_metrics import DownstreamScore
from lightning_xai.models.activations import ActivationDataModule, ActivationSource
from lightning_xai.models.sae import SparseAutoencoder, TopKSAEConfig
from lightning_xai.models.transformers import TextTransformer
from lightning_xai.namespace import pl

SEQ_LEN, MIN_LENGTH, DIM = 16, 8, 32
DATA = dict(seq_len=SEQ_LEN, min_length=MIN_LENGTH)


@pytest.fixture(scope="module")
def text_model() -> TextTransformer:
    """A TextTransformer that classifies PlantedTokens (accuracy checked below), trained in about a second."""
    torch.manual_seed(0)
    data = PlantedTokens(size=1024, seed=1, **DATA)
    model = TextTransformer(data.vocab_size, data.num_classes, max_len=SEQ_LEN, dim=DIM)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(6):
        order = torch.randperm(len(data))
        for start in range(0, len(data), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(model(data.tokens[index]), data.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    val = PlantedTokens(size=256, seed=2, **DATA)
    with torch.no_grad():
        assert float((model(val.tokens).argmax(1) == val.labels).float().mean()) > 0.95
    return model


@pytest.fixture(scope="module")
def val_data() -> PlantedTokens:
    data = PlantedTokens(size=64, seed=3, **DATA)
    assert 0 < int((data.tokens == PAD_TOKEN).sum()) < data.tokens.numel()  # some, not all, positions are padding
    return data


def _captured(model: torch.nn.Module, layer: str, tokens: torch.Tensor) -> torch.Tensor:
    """The layer's output, captured by an independent forward hook."""
    out = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.append(o.detach()))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return out[-1]


def test_rows_are_the_real_tokens_only(text_model, val_data):
    tokens = val_data.tokens
    real = tokens != PAD_TOKEN
    # the embedding layer: one position per input token, rows = embedding vectors of the real tokens, in order
    source = ActivationSource(text_model, "embedding", spatial="tokens")
    assert source.pad_token == PAD_TOKEN  # read from the model
    rows = source(tokens)
    assert tokens.dtype == torch.int64 and rows.shape == (int(real.sum()), DIM)
    assert torch.equal(rows, text_model.embedding.weight.detach()[tokens[real]])
    assert source.count_rows(tokens) == int(real.sum())
    # a block: the class token the model prepends is one extra, leading, real position per sequence
    block = ActivationSource(text_model, "blocks.1", spatial="tokens")
    rows = block(tokens)
    captured = _captured(text_model, "blocks.1", tokens)
    keep = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)
    assert rows.shape[0] == int(real.sum()) + tokens.shape[0] == block.count_rows(tokens)
    assert torch.equal(rows, captured[keep])
    # an attention mask (1 = real) of a dict batch is combined with the pad id
    attention = real.clone()
    attention[:, 0] = False
    assert torch.equal(block.token_mask(tokens, attention), real & attention)
    assert block(tokens, attention).shape[0] == int((real & attention).sum()) + tokens.shape[0]
    # explicit pad_token=None on a model without one: every position is a row
    plain = torch.nn.Sequential(torch.nn.Embedding(40, 4))
    assert ActivationSource(plain, "0", spatial="tokens")(tokens).shape == (tokens.numel(), 4)


def test_scale_estimate_ignores_padding(text_model, val_data):
    tokens = val_data.tokens
    source = ActivationSource(text_model, "embedding", spatial="tokens", normalize=True)
    scale = source.estimate_scale([(tokens[:32], None), (tokens[32:], None)])
    vectors = text_model.embedding.weight.detach().double()[tokens[tokens != PAD_TOKEN]]
    assert scale == pytest.approx(math.sqrt(DIM) / float(vectors.norm(dim=1).mean()), rel=1e-6)
    with_padding = text_model.embedding.weight.detach().double()[tokens.flatten()]
    assert scale != pytest.approx(math.sqrt(DIM) / float(with_padding.norm(dim=1).mean()), rel=1e-3)
    # the scaled rows have mean norm sqrt(d) over the real tokens
    assert float(source(tokens).norm(dim=1).mean()) == pytest.approx(math.sqrt(DIM), rel=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_splicing_identity_and_zeros_gives_loss_recovered_one_and_zero(text_model, val_data, normalize):
    tokens, labels = val_data.tokens, val_data.labels
    source = ActivationSource(text_model, "blocks.0", spatial="tokens", normalize=normalize)
    if normalize:
        source.estimate_scale([tokens])
    clean = source.model_output(tokens)
    with torch.no_grad():
        assert torch.equal(clean, text_model(tokens))
    identity = source.model_output(tokens, replace=lambda v: v)
    zero = source.model_output(tokens, replace="zero")
    spliced_zero = source.model_output(tokens, replace=torch.zeros_like)
    if normalize:
        torch.testing.assert_close(identity, clean, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(identity, clean)
    assert torch.equal(spliced_zero, zero)
    # zero-ablation zeroes the real positions (the class token included) and leaves padding as it was
    out = []
    handle = text_model.blocks[1].register_forward_pre_hook(lambda m, args: out.append(args[0].detach()))
    try:
        source.model_output(tokens, replace="zero")
    finally:
        handle.remove()
    original = _captured(text_model, "blocks.0", tokens)
    real = torch.cat([torch.ones_like(tokens[:, :1], dtype=torch.bool), tokens != PAD_TOKEN], dim=1)
    assert torch.equal(out[0][real], torch.zeros_like(original[real]))
    assert torch.equal(out[0][~real], original[~real])
    # loss recovered: 1 for the identity, 0 for zeros
    score = DownstreamScore()
    score.update(clean, identity, zero, labels)
    values = score.compute()
    assert float(values["ce_zero"]) > float(values["ce_orig"]) + 0.5  # zero-ablating the layer really hurts
    assert float(values["downstream_score"]) == pytest.approx(1.0, abs=1e-6 if normalize else 0.0)
    score = DownstreamScore()
    score.update(clean, spliced_zero, zero, labels)
    assert float(score.compute()["downstream_score"]) == 0.0


def test_from_vectors_puts_rows_back_at_the_real_positions_only(text_model, val_data):
    tokens = val_data.tokens[:4]
    source = ActivationSource(text_model, "embedding", spatial="tokens")
    output = source.layer_output(tokens)
    mask = source.token_mask(tokens)
    rows = source.to_vectors(output, mask=mask)
    back = source.from_vectors(rows + 1.0, output.shape, mask=mask, fill=output)
    assert torch.equal(back[mask], output[mask] + 1.0)
    assert torch.equal(back[~mask], output[~mask])
    with pytest.raises(ValueError, match="fill="):
        source.from_vectors(rows, output.shape, mask=mask)


def _tokens_data(**kwargs) -> PlantedTokensDataModule:
    return PlantedTokensDataModule(n_train=512, n_val=128, n_test=64, batch_size=64, seed=0, **DATA, **kwargs)


def test_short_fit_explains_the_residual_stream_and_recovers_the_loss(text_model):
    pl.seed_everything(0)
    data = ActivationDataModule(_tokens_data(), text_model, "blocks.1", spatial="tokens", normalize=True,
                                batch_size=256)
    module = SparseAutoencoder(TopKSAEConfig(d_in=DIM, d_sae=256, k=4), lr=3e-3)
    untrained = copy.deepcopy(module.sae)
    trainer = quiet_trainer(max_epochs=5)
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # measured: explained variance 0.95, loss recovered 1.000 (zero-ablation: CE 0.004 -> 1.39)
    assert metrics["val_explained_variance"] > 0.85
    assert metrics["val_explained_variance"] == pytest.approx(1.0 - metrics["val_fvu"], abs=1e-6)
    assert metrics["val_l0"] <= 4.0 and 0.0 <= metrics["val_dead_fraction"] < 0.5
    assert metrics["val_ce_zero"] > metrics["val_ce_orig"] + 0.5
    assert metrics["val_downstream_score"] > 0.95
    # the untrained SAE (b_dec = 0) explains far less: the figure measures the training
    val = PlantedTokens(size=128, seed=data.datamodule.split_seeds["val"], **DATA)
    x = data.source(val.tokens)
    assert x.shape[0] == int((val.tokens != PAD_TOKEN).sum()) + len(val)  # the metrics saw the real tokens only
    with torch.no_grad():
        fvu = float((untrained(x) - x).square().sum() / (x - x.mean(0)).square().sum())
    assert 1.0 - fvu < metrics["val_explained_variance"] - 0.3


def test_cache_under_two_simulated_ranks_holds_each_ranks_real_tokens(text_model, tmp_path):
    dataset = _tokens_data().make_dataset("train")
    single = ActivationSource(text_model, "blocks.0", spatial="tokens")
    expected_rows = [single(dataset.tokens[r::2]) for r in range(2)]

    def run(reducer):
        data = ActivationDataModule(_tokens_data(), copy.deepcopy(text_model), "blocks.0", spatial="tokens",
                                    normalize=True, cache_dir=str(tmp_path), batch_size=100, scale_batches=1000)
        data.reducer = reducer
        data.setup("fit")
        cached = data._cached_train
        batches = list(data.train_dataloader())
        statuses = [data.cache_status]
        again = ActivationDataModule(_tokens_data(), copy.deepcopy(text_model), "blocks.0", spatial="tokens",
                                     normalize=True, cache_dir=str(tmp_path), batch_size=100, scale_batches=1000)
        again.reducer = reducer
        again.setup("fit")
        statuses.append(again.cache_status)
        array = torch.from_numpy(np.asarray(np.load(cached.path, mmap_mode="r")))
        return array, cached.rows_per_epoch, len(batches), float(data.source.scale), statuses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = ThreadGroup(2).run(run)
    for rank, (array, rows_per_epoch, num_batches, _, statuses) in enumerate(results):
        assert statuses == ["written", "reused"]
        assert array.shape[0] == expected_rows[rank].shape[0]  # the real tokens (+ class token) of rank::2
        torch.testing.assert_close(array, expected_rows[rank], rtol=0, atol=0)
        smallest = min(r.shape[0] for r in expected_rows)
        assert rows_per_epoch == smallest and num_batches == math.ceil(smallest / 100)
    assert expected_rows[0].shape[0] != expected_rows[1].shape[0]  # the shards really differ in size
    # every rank uses one scale: that of all real rows of both shards
    everything = torch.cat(expected_rows).double()
    assert results[0][3] == results[1][3] == pytest.approx(math.sqrt(DIM) / float(everything.norm(dim=1).mean()))


def test_tokens_mode_errors_name_the_class_the_value_and_the_choices(text_model, val_data):
    tokens = val_data.tokens[:2]
    source = ActivationSource(text_model, "head", spatial="tokens")
    with pytest.raises(ValueError, match=r"ActivationSource: spatial='tokens' needs a layer that outputs \[B, T, D\]; "
                                         r"layer 'head' \(Linear\) outputs \[2, 4\]") as error:
        source.layer_output(tokens)
    message = str(error.value)
    assert "'blocks.0'" in message and "'embedding'" in message and "'positions'" in message
    with pytest.raises(TypeError, match="spatial='tokens' reads integer token ids"):
        ActivationSource(text_model, "blocks.0", spatial="tokens").layer_output(tokens.float())
    with pytest.raises(TypeError, match="token ids need spatial='tokens'"):
        ActivationSource(text_model, "blocks.0", spatial="positions").layer_output(tokens)
    with pytest.raises(ValueError, match="pad_token=0 is used by spatial='tokens' only"):
        ActivationSource(text_model, "blocks.0", spatial="positions", pad_token=0)
    with pytest.raises(ValueError, match="unknown spatial mode 'token'.*did you mean 'tokens'"):
        ActivationSource(text_model, "blocks.0", spatial="token")
    data = ActivationDataModule(_tokens_data(), text_model, "blocks.0", spatial="tokens")
    with pytest.raises(ValueError, match="SparseAutoencoder: log_top_latents=2 .* spatial='tokens'"):
        module = SparseAutoencoder(TopKSAEConfig(d_in=DIM, d_sae=64, k=4), log_top_latents=2)
        quiet_trainer(fast_dev_run=True).fit(module, data)


class _DictBatches(pl.LightningDataModule):
    """The planted-token data as dict batches with custom keys: ``{"ids", "answer", "key_mask"}``."""

    def __init__(self, inner: PlantedTokensDataModule) -> None:
        super().__init__()
        self.inner = inner

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    @staticmethod
    def _dicts(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        def collate(items):
            tokens, labels, masks = loader.collate_fn(items)
            return {"ids": tokens, "answer": labels, "key_mask": masks}

        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=collate)

    def train_dataloader(self):
        return self._dicts(self.inner.train_dataloader())

    def val_dataloader(self):
        return self._dicts(self.inner.val_dataloader())


def _validate(datamodule: ActivationDataModule) -> tuple[dict[str, float], list[str]]:
    pl.seed_everything(0)
    module = SparseAutoencoder(TopKSAEConfig(d_in=DIM, d_sae=64, k=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer().validate(module, datamodule)
    said = [str(w.message) for w in caught if "downstream=True" in str(w.message)]
    return {k: float(v) for k, v in module.trainer.callback_metrics.items()}, said


def test_dict_batches_with_custom_keys_give_the_tuple_figures_and_missing_labels_are_said_once(text_model):
    tuples, said = _validate(ActivationDataModule(_tokens_data(), text_model, "blocks.1", spatial="tokens"))
    assert not said and tuples["val_ce_zero"] > tuples["val_ce_orig"]
    dicts, said = _validate(ActivationDataModule(_DictBatches(_tokens_data()), text_model, "blocks.1",
                                                 spatial="tokens", input_key="ids", label_key="answer"))
    assert not said
    for name in ("val_fvu", "val_l0", "val_ce_orig", "val_ce_sae", "val_ce_zero", "val_downstream_score"):
        assert dicts[name] == pytest.approx(tuples[name], rel=1e-5, abs=1e-6), name
    # "answer" is not a default label key: without label_key= the figures cannot be computed, which is said once
    unlabeled, said = _validate(ActivationDataModule(_DictBatches(_tokens_data()), text_model, "blocks.1",
                                                     spatial="tokens", input_key="ids"))
    assert "val_ce_orig" not in unlabeled and unlabeled["val_fvu"] == pytest.approx(tuples["val_fvu"], rel=1e-5)
    assert len(said) == 1 and "SparseAutoencoder" in said[0] and "label_key=" in said[0]
