"""Explanation quality on token models (issue 14, item 2): localisation, deletion / insertion and the
ExplanationQuality callback on token ids ``[B, T]`` with token maps ``[B, T]``, padding excluded.

Every number is checked against something that could prove it wrong: closed forms (maps on / off the evidence),
an independent loop over a hand-built model whose logit is the number of key tokens, the functional metrics on
the callback's own probe samples, and one process against two simulated ranks.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning_helpers import BlobData, TinyClassifier, quiet_trainer
from test_metric_contracts import _thread_sync
from torch import Tensor, nn

from lightning_xai.attribution import build_attributor
from lightning_xai.callbacks import ExplanationQuality
from lightning_xai.callbacks.base import ConfigurationError
from lightning_xai.data.tokens import MASK_TOKEN, PAD_TOKEN, PlantedTokensDataModule
from lightning_xai.distributed import Reducer, ThreadGroup
from lightning_xai.evaluation import (
    DeletionAUC,
    InsertionAUC,
    MaskIoU,
    PointingGame,
    RelevanceMass,
    RelevanceRank,
    Sparseness,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    mask_iou,
    pointing_game,
    relevance_mass,
    relevance_rank,
    sparseness,
)
from lightning_xai.models.transformers import TextClassifier
from lightning_xai.namespace import pl

KEYS = (2, 3)  # the key token ids of the hand-built model
MASK = 1


class KeyCount(nn.Module):
    """Logits ``[number of key tokens, 0]``: the class-0 logit counts the key tokens (ids 2 and 3)."""

    def forward(self, ids: Tensor) -> Tensor:
        count = sum((ids == k) for k in KEYS).sum(dim=1).float()
        return torch.stack([count, torch.zeros_like(count)], dim=1)


class Recording(KeyCount):
    """KeyCount that keeps every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, ids: Tensor) -> Tensor:
        self.seen.append(ids.clone())
        return super().forward(ids)


# two sequences, right-padded with 0: keys at positions 0, 2 (sample 0) and 2 (sample 1)
IDS = torch.tensor([[2, 5, 3, 6, 0, 0], [5, 5, 2, 7, 8, 0]])
MASKS = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32)
VALID = IDS != 0


# ---------------------------------------------------------------------------------------------- localisation
def test_a_map_on_the_keys_scores_one_and_a_map_off_them_scores_zero():
    on_keys = MASKS.clone()
    off_keys = (1 - MASKS) * VALID
    for fn in (relevance_mass, pointing_game, mask_iou, relevance_rank):
        assert fn(on_keys, MASKS, valid=VALID).tolist() == [1.0, 1.0], fn.__name__
        assert fn(off_keys, MASKS, valid=VALID).tolist() == [0.0, 0.0], fn.__name__
    for cls in (RelevanceMass, PointingGame, MaskIoU, RelevanceRank):
        metric = cls()
        metric.update(on_keys, MASKS, valid=VALID)
        assert metric.compute().item() == 1.0, cls.__name__


def test_padding_takes_no_part():
    # the largest value sits on the padding: with padding scored, the maximum points there and the mass leaks
    heat = MASKS + 10.0 * (~VALID)
    everything = torch.ones_like(VALID)
    assert pointing_game(heat, MASKS, valid=everything).tolist() == [0.0, 0.0]
    assert pointing_game(heat, MASKS, valid=VALID).tolist() == [1.0, 1.0]
    # sample 0: mass 2 on the keys, 20 on two pad positions; sample 1: 1 on the key, 10 on one pad position
    assert relevance_mass(heat, MASKS, valid=everything).tolist() == pytest.approx([2 / 22, 1 / 11])
    assert relevance_mass(heat, MASKS, valid=VALID).tolist() == [1.0, 1.0]
    assert relevance_rank(heat, MASKS, valid=everything).tolist() == [0.0, 0.0]
    assert relevance_rank(heat, MASKS, valid=VALID).tolist() == [1.0, 1.0]
    # a top-fraction binarisation counts the sequence's own tokens: half of 4 tokens = 2 = the two keys
    assert mask_iou(heat, MASKS, fraction=0.5, valid=VALID)[0].item() == 1.0
    # padding is never evidence, even where a mask marks it
    marked = MASKS.clone()
    marked[0, 5] = 1.0
    assert relevance_mass(heat, marked, valid=VALID)[0].item() == 1.0
    # the pointing game's tolerance counts tokens: a maximum one token from the key hits with tolerance 1
    near = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert pointing_game(near, MASKS[:1], valid=VALID[:1]).item() == 0.0
    assert pointing_game(near, MASKS[:1], valid=VALID[:1], tolerance=1).item() == 1.0


def test_token_maps_need_valid_to_be_told_from_an_unbatched_image():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, H, W\].*valid="):
        relevance_mass(MASKS, MASKS)
    with pytest.raises(ValueError, match="valid of shape"):
        pointing_game(MASKS, MASKS, valid=VALID[:, :4])


def test_sparseness_of_a_padded_token_map_is_the_gini_index_of_its_real_tokens():
    # sample 0: real tokens [1, 0, 0, 0] (one-hot of 4: G = 1 - 1/4), padding carrying relevance 9 and 9;
    # sample 1: real tokens [2, 2, 2, 2, 2] (constant: G = 0), relevance 7 on the padding
    heat = torch.tensor([[1.0, 0.0, 0.0, 0.0, 9.0, 9.0], [2.0, 2.0, -2.0, 2.0, 2.0, 7.0]])
    assert sparseness(heat, valid=VALID).tolist() == pytest.approx([0.75, 0.0])
    # the closed form over all six positions (padding scored): sorted |a| = [0, 0, 0, 1, 9, 9], ||a|| = 19
    everything = torch.ones_like(VALID)
    weights = [(6 - k + 0.5) / 6 for k in range(1, 7)]
    expected_0 = 1 - 2 * sum(a / 19 * w for a, w in zip([0, 0, 0, 1, 9, 9], weights))
    assert sparseness(heat, valid=everything)[0].item() == pytest.approx(expected_0, abs=1e-6)
    assert abs(expected_0 - 0.75) > 0.1  # padding would change the score
    # a random padded map equals the index of its real tokens on their own, sample by sample
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 9, generator=g)
    valid = torch.rand(6, 9, generator=g) > 0.4
    valid[:, 0] = True
    got = sparseness(maps, valid=valid)
    for i in range(6):
        alone = sparseness(maps[i][valid[i]][None], valid=torch.ones(1, int(valid[i].sum()), dtype=torch.bool))
        assert got[i].item() == pytest.approx(alone.item(), abs=1e-6)
    metric = Sparseness(return_per_sample=True)
    metric.update(heat, valid=VALID)
    assert metric.compute().tolist() == pytest.approx([0.75, 0.0])
    # all relevance on the padding: no relevance among the tokens, excluded (NaN), never a number
    assert math.isnan(sparseness(torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 5.0]]), valid=VALID[:1]).item())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, H, W\].*valid="):
        sparseness(heat)


# ---------------------------------------------------------------------------------------------- deletion
def _hand_curve(ids: Tensor, heat: Tensor, steps: int, insertion: bool) -> tuple[list[float], list[list[float]]]:
    """The token deletion / insertion curve of KeyCount written out: for point k, the round(k * L / steps) most
    relevant non-padding tokens are masked (deletion) or kept (insertion, all others masked)."""
    xs = [k / steps for k in range(steps + 1)]
    curves = []
    for row, scores in zip(ids.tolist(), heat.tolist()):
        tokens = [i for i, t in enumerate(row) if t != 0]
        order = sorted(tokens, key=lambda i: -scores[i])  # maps below have no ties among tokens
        curve = []
        for k in range(steps + 1):
            count = math.floor(k * len(tokens) / steps + 0.5)
            chosen = set(order[:count])
            if insertion:
                changed = [t if (i in chosen or t == 0) else MASK for i, t in enumerate(row)]
            else:
                changed = [MASK if i in chosen else t for i, t in enumerate(row)]
            curve.append(float(sum(t in KEYS for t in changed)))
        curves.append(curve)
    return xs, curves


def _trapezoid(xs: list[float], ys: list[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


HEAT = torch.tensor([[1.0, 0.1, 0.9, 0.2, 5.0, 5.0], [0.0, 0.1, 1.0, 0.3, 0.2, 9.0]])


@pytest.mark.parametrize("steps", [4, 6, 16])
def test_token_deletion_and_insertion_equal_the_hand_computation(steps):
    for insertion, curve_fn, auc_fn, cls in (
        (False, deletion_curve, deletion_auc, DeletionAUC),
        (True, insertion_curve, insertion_auc, InsertionAUC),
    ):
        xs, curves = _hand_curve(IDS, HEAT, steps, insertion)
        kwargs = dict(steps=steps, mask_token=MASK, pad_token=0, softmax=False)
        fractions, scores = curve_fn(HEAT, IDS, KeyCount(), 0, **kwargs)
        assert fractions.tolist() == pytest.approx(xs)
        assert scores.tolist() == curves
        expected = [_trapezoid(xs, c) for c in curves]
        assert auc_fn(HEAT, IDS, KeyCount(), 0, **kwargs).tolist() == pytest.approx(expected)
        metric = cls(return_per_sample=True, batch_size=5, **kwargs)
        metric.update(HEAT, IDS, KeyCount(), torch.tensor([0, 0]))
        assert metric.compute().tolist() == pytest.approx(expected)
    # the closed forms for steps = 4: sample 0 has 4 tokens (one per step), its keys go first -> 2, 1, 0, 0, 0
    if steps == 4:
        kwargs = dict(steps=4, mask_token=MASK, pad_token=0, softmax=False)
        assert deletion_auc(HEAT, IDS, KeyCount(), 0, **kwargs).tolist() == [0.5, 0.125]


def test_token_ids_stay_integer_and_padding_is_never_touched():
    model = Recording()
    for fn in (deletion_curve, insertion_curve):
        model.seen.clear()
        fn(HEAT, IDS, model, 0, steps=8, mask_token=MASK, pad_token=0, batch_size=3)
        assert model.seen
        assert all(batch.dtype == torch.long for batch in model.seen)
        seen = torch.cat(model.seen)
        # every perturbed sequence: each position holds its own id or the mask id; padding keeps the pad id
        rows = IDS.repeat_interleave(9, dim=0)  # pair j = (sample j // 9, point j % 9), in that order
        assert bool(((seen == rows) | (seen == MASK)).all())
        assert bool((seen[rows == 0] == 0).all())
    assert IDS.dtype == torch.long


def test_token_curves_without_padding_id_remove_every_position():
    _, scores = deletion_curve(HEAT, IDS, KeyCount(), 0, steps=6, mask_token=MASK, softmax=False)
    # sample 0 (no pad_token): the two pad positions rank first (5.0) and are masked first, keys after
    assert scores[0].tolist() == [2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0]


def test_a_map_constant_over_the_tokens_has_no_area():
    flat = torch.where(VALID, torch.tensor(0.5), torch.tensor(-3.0))  # constant on the tokens, not on padding
    got = deletion_auc(flat, IDS, KeyCount(), 0, steps=4, mask_token=MASK, pad_token=0)
    assert torch.isnan(got).all()
    metric = DeletionAUC(steps=4, mask_token=MASK, pad_token=0)
    metric.update(torch.cat([flat[:1], HEAT[1:]]), IDS, KeyCount(), 0)
    assert metric.num_excluded == 1


def test_token_curve_bad_input():
    with pytest.raises(ValueError, match="mask_token="):
        deletion_curve(HEAT, IDS, KeyCount(), 0)
    with pytest.raises(ValueError, match="step= .*does not apply to token inputs"):
        deletion_curve(HEAT, IDS, KeyCount(), 0, step=2, mask_token=MASK)
    with pytest.raises(ValueError, match=r"token attributions of shape \[2, 5\]"):
        insertion_curve(HEAT[:, :5], IDS, KeyCount(), 0, mask_token=MASK)
    with pytest.raises(ValueError, match="mask_token / pad_token apply to token ids"):
        deletion_curve(torch.rand(2, 1, 4, 4), torch.rand(2, 3, 4, 4), nn.Sequential(nn.Flatten(), nn.Linear(48, 2)),
                       0, mask_token=MASK)
    with pytest.raises(ValueError, match="DeletionAUC: mask_token must be an integer >= 0"):
        DeletionAUC(mask_token=-1)


# ---------------------------------------------------------------------------------------------- two ranks
def _token_cases() -> list[tuple[type, dict, str]]:
    curve = {"steps": 5, "mask_token": MASK, "pad_token": 0, "softmax": False, "batch_size": 4}
    return [
        (DeletionAUC, curve, "model"),
        (InsertionAUC, curve, "model"),
        (PointingGame, {}, "mask"),
        (MaskIoU, {}, "mask"),
        (RelevanceMass, {}, "mask"),
        (RelevanceRank, {}, "mask"),
    ]


def _token_data() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 12, (5, 8), generator=gen)
    masks = torch.zeros(5, 8)
    for i, length in enumerate([8, 6, 5, 7, 8]):
        ids[i, length:] = 0
        ids[i, i % length] = KEYS[i % 2]
        masks[i, i % length] = 1.0
    maps = torch.randn(5, 8, generator=gen)
    return ids, masks, maps


@pytest.mark.parametrize("case", _token_cases(), ids=lambda c: c[0].__name__)
@pytest.mark.parametrize("shards", [[[0, 1, 2], [3, 4]], [[0, 1, 2, 3, 4], []]], ids=["split", "one_empty"])
def test_token_metrics_under_two_ranks_equal_one_process(case, shards):
    cls, kwargs, needs = case
    ids, masks, maps = _token_data()
    model = KeyCount()

    def update(metric, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long)
        if needs == "model":
            metric.update(maps[index], ids[index], model, torch.zeros(len(rows), dtype=torch.long))
        else:
            metric.update(maps[index], masks[index], valid=ids[index] != 0)

    def run(reducer: Reducer):
        metric = cls(**kwargs, dist_sync_fn=_thread_sync(reducer), distributed_available_fn=lambda: True)
        if shards[reducer.rank]:
            update(metric, shards[reducer.rank])
        return metric.compute()

    results = ThreadGroup(2).run(run)
    single = cls(**kwargs)
    update(single, [0, 1, 2, 3, 4])
    expected = single.compute()
    assert torch.isfinite(expected)
    for got in results:
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------- the callback
TOKEN_METHODS = [{"name": "token_occlusion", "mask_token": MASK_TOKEN, "skip_tokens": [PAD_TOKEN]},
                 "attention_rollout"]
TOKEN_METRICS = ["deletion_auc", "insertion_auc", "pointing_game", "mask_iou", "relevance_mass", "relevance_rank"]


def _token_data_module() -> PlantedTokensDataModule:
    return PlantedTokensDataModule(n_train=256, n_val=32, n_test=8, batch_size=32, min_length=10, seed=3)


def test_quality_on_a_text_transformer_under_fit_and_validate(tmp_path):
    quality = ExplanationQuality(
        TOKEN_METHODS,
        metrics=TOKEN_METRICS,
        metric_kwargs={"deletion_auc": {"steps": 8}, "insertion_auc": {"steps": 8}},
        num_samples=8,
        mask_token=MASK_TOKEN,
    )
    pl.seed_everything(0)
    model = TextClassifier(max_len=16)
    data = _token_data_module()
    trainer = quiet_trainer(max_epochs=2, callbacks=[quality], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert not quality.errors, [str(e) for e in quality.errors]
    assert quality.tokens is True and quality.padding == PAD_TOKEN  # the model's pad token, said once
    logged = trainer.callback_metrics
    for method in ("token_occlusion", "attention_rollout"):
        for metric in TOKEN_METRICS:
            value = logged[f"xai/{method}/{metric}"]
            assert math.isfinite(float(value)), (method, metric)
    trainer.validate(model, datamodule=data)  # runs under inference_mode
    assert [r["stage"] for r in quality.records][-1] == "validate"
    assert quality.records[-1]["scored"]["token_occlusion/deletion_auc"] == 8

    # the callback's numbers are the functional metrics on its probe samples
    model.eval()
    val = data.dataset("val")
    ids = torch.stack([val[i][0] for i in quality.probe.indices])
    labels = torch.stack([val[i][1] for i in quality.probe.indices])
    masks = torch.stack([val[i][2] for i in quality.probe.indices])
    assert bool((ids == PAD_TOKEN).any())  # the probe set has padding to exclude
    values = quality.evaluate(trainer, model)
    valid = ids != PAD_TOKEN
    maps = build_attributor(TOKEN_METHODS[0])(model, ids, labels)
    assert values["token_occlusion/relevance_mass"] == pytest.approx(
        float(relevance_mass(maps, masks, valid=valid).nanmean()), abs=1e-6)
    assert values["token_occlusion/pointing_game"] == pytest.approx(
        float(pointing_game(maps, masks, valid=valid).nanmean()), abs=1e-6)
    direct = deletion_auc(maps, ids, model, labels, steps=8, mask_token=MASK_TOKEN, pad_token=PAD_TOKEN)
    assert values["token_occlusion/deletion_auc"] == pytest.approx(float(direct.nanmean()), abs=1e-5)
    # the trained model's occlusion map finds the planted keys far above chance (2 keys in 10-16 tokens)
    assert values["token_occlusion/relevance_rank"] > 0.6


def test_quality_scores_sparseness_on_token_data_without_the_padding(tmp_path):
    method = TOKEN_METHODS[0]
    quality = ExplanationQuality([method], metrics=["sparseness", "relevance_mass"], num_samples=8,
                                 pad_token=PAD_TOKEN, every_n_epochs=1)
    pl.seed_everything(0)
    model = TextClassifier(max_len=16)
    data = _token_data_module()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[quality], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert not quality.errors, [str(e) for e in quality.errors]
    assert math.isfinite(float(trainer.callback_metrics["xai/token_occlusion/sparseness"]))
    model.eval()
    val = data.dataset("val")
    ids = torch.stack([val[i][0] for i in quality.probe.indices])
    labels = torch.stack([val[i][1] for i in quality.probe.indices])
    assert bool((ids == PAD_TOKEN).any())  # the probe set has padding to exclude
    values = quality.evaluate(trainer, model)
    maps = build_attributor(method)(model, ids, labels)
    real = sparseness(maps, valid=ids != PAD_TOKEN)
    assert values["token_occlusion/sparseness"] == pytest.approx(float(real.nanmean()), abs=1e-6)
    with_padding = sparseness(maps, valid=torch.ones_like(ids, dtype=torch.bool))
    assert abs(float(with_padding.nanmean()) - float(real.nanmean())) > 1e-3  # the padding is really left out


def test_token_configuration_mistakes_raise_at_construction():
    with pytest.raises(ValueError, match=r"\['aopc'\] cannot score token inputs"):
        ExplanationQuality(TOKEN_METHODS, metrics=["aopc", "pointing_game"], input_kind="tokens", mask_token=1)
    with pytest.raises(ValueError, match="pass mask_token="):
        ExplanationQuality(TOKEN_METHODS, metrics=["deletion_auc"], input_kind="tokens")
    with pytest.raises(ValueError, match=r"unknown input_kind 'text'; valid values: \['auto', 'images', 'tokens'\]"):
        ExplanationQuality(TOKEN_METHODS, input_kind="text")
    with pytest.raises(ValueError, match="apply to token inputs"):
        ExplanationQuality(["saliency"], input_kind="images", pad_token=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ["deletion_auc"]}, "pass mask_token="),  # token mode found from the batch, no mask id
        ({"metrics": ["infidelity"], "mask_token": 1}, r"\['infidelity'\] cannot score token inputs"),
        ({"metrics": ["pointing_game"], "input_kind": "images"}, "input_kind='images' but the probe inputs are token"),
    ],
)
def test_token_configuration_mistakes_raise_before_training(tmp_path, kwargs, message):
    quality = ExplanationQuality(TOKEN_METHODS, num_samples=2, **kwargs)
    trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
    model = TextClassifier(max_len=16)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigurationError, match=message):
        trainer.fit(model, datamodule=_token_data_module())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no training step ran


def test_tokens_asked_for_on_images_is_a_configuration_error(tmp_path):
    quality = ExplanationQuality(["saliency"], metrics=["pointing_game"], input_kind="tokens", num_samples=2)
    trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match="input_kind='tokens' but the probe inputs are torch.float32"):
        trainer.fit(TinyClassifier(), BlobData())


def test_token_data_without_masks_names_token_masks(tmp_path):
    class NoMasks(PlantedTokensDataModule):
        def make_dataset(self, split):
            data = super().make_dataset(split)
            return torch.utils.data.TensorDataset(data.tokens, data.labels)

    quality = ExplanationQuality(TOKEN_METHODS, metrics=["pointing_game"], num_samples=2)
    trainer = quiet_trainer(max_epochs=1, callbacks=[quality], default_root_dir=str(tmp_path))
    no_masks_needed = r"\['deletion_auc', 'insertion_auc', 'sparseness'\]"
    with pytest.raises(ConfigurationError, match=r"all need token masks.*" + no_masks_needed):
        trainer.fit(TextClassifier(max_len=16), datamodule=NoMasks(n_train=64, n_val=8, n_test=8, min_length=10))
