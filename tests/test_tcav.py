"""TCAV: CAV training, conceptual sensitivities, the t-test, scores on built models, and the spurious-cue sanity
experiment of Kim et al. (ICML 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.interpretation.tcav import (
    TCAV,
    CAVBank,
    TCAVResult,
    directional_derivatives,
    train_cav,
    welch_t_test,
)

# ------------------------------------------------------------------------------------------------------- statistics


def test_welch_t_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for na, nb, shift, scale in [(3, 5, 0.5, 1.0), (10, 10, 1.0, 2.0), (2, 2, 0.0, 1.0), (30, 7, -0.3, 0.2)]:
        a, b = rng.normal(0, 1, na), rng.normal(shift, scale, nb)
        t, p = welch_t_test(a, b)
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert t == pytest.approx(ref.statistic, rel=1e-9)
        assert p == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-12)


def test_welch_t_test_degenerate_cases():
    assert welch_t_test([1.0, 1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
    t, p = welch_t_test([1.0, 1.0], [0.0, 0.0])
    assert p == 0.0 and t > 0
    with pytest.raises(ValueError, match="at least 2"):
        welch_t_test([1.0], [0.0, 1.0])


# ------------------------------------------------------------------------------------------------------------ CAVs


def test_cav_recovers_the_separating_direction():
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(40)
    direction[3], direction[17] = 3.0, -4.0
    unit = direction / direction.norm()
    negative = torch.randn(60, 40, generator=g)
    positive = torch.randn(60, 40, generator=g) + direction
    vector, accuracy = train_cav(positive, negative, l2=1e-3)
    assert torch.isclose(vector.norm(), torch.tensor(1.0))
    assert float(vector @ unit) > 0.8, "the CAV points from the random examples towards the concept"
    assert accuracy > 0.95
    flipped, _ = train_cav(negative, positive, l2=1e-3)
    assert float(flipped @ unit) < -0.8
    again, accuracy_again = train_cav(positive, negative, l2=1e-3)
    assert torch.equal(vector, again) and accuracy == accuracy_again, "CAV training is deterministic"


def test_cav_errors():
    with pytest.raises(ValueError, match="same D"):
        train_cav(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        train_cav(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="did not learn"):
        train_cav(torch.ones(4, 3), torch.ones(4, 3), test_fraction=0.0)


# --------------------------------------------------------------------------------------------- sensitivities


class TwoLayer(nn.Module):
    """``a = W1 x`` ("features"), logits ``= W2 relu(a)``: d z_k / d a = W2[k] * 1[a > 0] (closed form)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Linear(6, 5)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.features(x)))


def test_directional_derivatives_match_the_closed_form():
    model = TwoLayer().eval()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    directions = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    got = directional_derivatives(model, "features", x, targets, directions, batch_size=3)
    assert_unchanged(model, before)
    with torch.no_grad():
        a = x @ model.features.weight.T + model.features.bias
        grad = model.head.weight[targets] * (a > 0).float()
    assert torch.allclose(got, grad @ directions.T, atol=1e-5)
    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            assert torch.allclose(directional_derivatives(model, "features", x, targets, directions), got, atol=1e-6)


# ----------------------------------------------------------------------------------- TCAV on a model built for it

BAR = torch.zeros(3, 8, 8)
BAR[0, :, 3:5] = 1.0


class ConceptModel(nn.Module):
    """Logit 0 grows with the "bar" pattern in the (ReLU-gated) activations of ``features``; logit 1 with an
    unrelated pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.features.bias.zero_()
        self.register_buffer("bar", BAR.clone())
        self.register_buffer("other", BAR.flip(-1).roll(1, 0).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.features(x))
        return torch.stack([(a * self.bar).flatten(1).sum(1), (a * self.other).flatten(1).sum(1)], dim=1)


def _noise(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=g)


@pytest.fixture(scope="module")
def concept_result() -> tuple[TCAVResult, nn.Module]:
    g = torch.Generator().manual_seed(1)
    concepts = {"bar": _noise(30, g) + 2 * BAR, "noise": _noise(30, g)}
    inputs, targets = _noise(40, g), torch.tensor([0] * 20 + [1] * 20)
    pool = _noise(200, g)
    model = ConceptModel().eval()
    return TCAV("features", num_random=10)(model, inputs, targets, concepts, pool), model


def test_concept_the_model_depends_on_scores_one_and_is_significant(concept_result):
    result, _ = concept_result
    bar = result.get(0, "bar")
    assert bar.score > 0.97 and bar.significant and bar.p_value < 1e-3
    assert bar.cav_accuracy > 0.95 and len(bar.scores) == 10 and len(bar.random_scores) == 10
    assert 0.0 < bar.random_score < 1.0


def test_random_concept_is_not_significant(concept_result):
    result, _ = concept_result
    for k in (0, 1):
        noise = result.get(k, "noise")
        assert not noise.significant, noise
        assert noise.cav_accuracy < 0.7, "random examples cannot be told apart from random examples"
    assert not result.get(1, "bar").significant, "logit 1 does not use the bar"


def test_result_table_and_bonferroni(concept_result):
    result, _ = concept_result
    assert result.threshold == pytest.approx(0.05 / 2)
    rows = result.rows()
    assert len(rows) == 4 and len(rows[0]) == len(TCAVResult.COLUMNS)
    for entry in result.entries:
        assert entry.significant == (entry.p_value < 0.05 / 2)
    with pytest.raises(KeyError):
        result.get(3, "bar")


def test_from_counts_scores_and_bonferroni_threshold():
    """Scores are counts / totals; a p-value between alpha / K and alpha is not significant with K = 2 concepts."""
    stats = pytest.importorskip("scipy.stats")
    bank = CAVBank("layer", ["a", "b"], 3, torch.zeros(9, 4), torch.tensor([0.9] * 3 + [0.8] * 3 + [0.5] * 3))
    # runs: concept a 7/7/8 of 10 positive, concept b 10/10/10, null 5/6/4
    positive = torch.tensor([[7, 7, 8, 10, 10, 10, 5, 6, 4]])
    result = TCAVResult.from_counts(bank, [3], positive, torch.tensor([10]), alpha=0.05)
    a, b = result.get(3, "a"), result.get(3, "b")
    assert a.scores == pytest.approx([0.7, 0.7, 0.8]) and a.score == pytest.approx(2.2 / 3)
    assert a.random_scores == pytest.approx([0.5, 0.6, 0.4]) and a.random_score == pytest.approx(0.5)
    assert a.std == pytest.approx(float(np.std([0.7, 0.7, 0.8], ddof=1)))
    p = stats.ttest_ind([0.7, 0.7, 0.8], [0.5, 0.6, 0.4], equal_var=False).pvalue
    assert 0.025 < p < 0.05 and a.p_value == pytest.approx(p)
    assert not a.significant, "p < alpha but not < alpha / 2 (Bonferroni over two concepts)"
    assert b.significant and b.score == 1.0
    assert a.cav_accuracy == pytest.approx(0.9) and b.cav_accuracy == pytest.approx(0.8) and a.num_inputs == 10


def test_sharded_counts_add_up_to_the_whole(concept_result):
    """The callback's DDP path: counts of two shards summed equal one call on everything."""
    _, model = concept_result
    g = torch.Generator().manual_seed(3)
    tcav = TCAV("features", num_random=3, seed=4)
    bank = tcav.fit_cavs(model, {"bar": _noise(12, g) + 2 * BAR}, _noise(40, g))
    inputs, targets = _noise(10, g), torch.tensor([0, 1] * 5)
    whole = tcav.counts(model, inputs, targets, bank, [0, 1])
    part_a = tcav.counts(model, inputs[:4], targets[:4], bank, [0, 1])
    part_b = tcav.counts(model, inputs[4:], targets[4:], bank, [0, 1])
    assert torch.equal(whole[0], part_a[0] + part_b[0]) and torch.equal(whole[1], part_a[1] + part_b[1])
    direct = TCAVResult.from_counts(bank, [0, 1], *whole, alpha=0.05)
    assert direct.get(0, "bar").score == pytest.approx(float(whole[0][0, :3].double().mean() / whole[1][0]))


def test_tcav_leaves_the_model_unchanged_and_runs_in_inference_mode(gap_cnn):
    put_in_train_mode_with_grads(gap_cnn)
    before = snapshot(gap_cnn)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 8, 8, generator=g)
    tcav = TCAV("features.2", num_random=2, max_iter=20)
    args = (x, torch.tensor([0, 1, 0, 1, 0, 1]), {"c": torch.rand(6, 3, 8, 8, generator=g)}, torch.rand(12, 3, 8, 8))
    result = tcav(gap_cnn, *args)
    assert_unchanged(gap_cnn, before)
    with torch.inference_mode():
        again = tcav(gap_cnn, *args)
    assert again.rows() == result.rows()
    with pytest.raises(ValueError, match="not found"):
        TCAV("featurez", num_random=2)(gap_cnn, *args)
    assert_unchanged(gap_cnn, before)


def test_tcav_on_resnet18(resnet18):
    """Residual blocks with in-place additions and a reused ReLU module: TCAV runs and leaves the model as it was."""
    put_in_train_mode_with_grads(resnet18)
    before = snapshot(resnet18)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 32, 32, generator=g)
    result = TCAV("layer3", num_random=2, max_iter=10)(
        resnet18, x, torch.tensor([1, 4]), {"c": torch.rand(4, 3, 32, 32, generator=g)}, torch.rand(8, 3, 32, 32)
    )
    assert_unchanged(resnet18, before)
    assert {e.target for e in result.entries} == {1, 4} and all(e.num_inputs == 1 for e in result.entries)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_random": 1}, "num_random"),
        ({"alpha": 0.0}, "alpha"),
        ({"test_fraction": 0.95}, "test_fraction"),
        ({"l2": -1.0}, "l2"),
        ({"concept_fraction": 0.0}, "concept_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TCAV("features", **kwargs)


def test_bad_calls():
    model = ConceptModel().eval()
    tcav = TCAV("features", num_random=2)
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match="non-empty mapping"):
        tcav(model, x, 0, {}, torch.randn(10, 3, 8, 8))
    with pytest.raises(ValueError, match="expected 2 random sets"):
        tcav(model, x, 0, {"c": x}, [torch.randn(4, 3, 8, 8)])
    gap = GapCNN().eval()
    bank = TCAV("features.3", num_random=2).fit_cavs(gap, {"c": torch.randn(6, 3, 8, 8)}, torch.randn(10, 3, 8, 8))
    with pytest.raises(ValueError, match="values per sample"):
        TCAV("features.3", num_random=2).counts(gap, torch.randn(2, 3, 6, 6), 0, bank, [0])
    with pytest.raises(ValueError, match="one class per input"):
        tcav.counts(model, x, torch.tensor([0, 1]), bank, [0])


def test_concept_fraction_resamples_the_concept_set(concept_result):
    _, model = concept_result
    g = torch.Generator().manual_seed(6)
    concepts, pool = {"bar": _noise(20, g) + 2 * BAR}, _noise(60, g)
    full = TCAV("features", num_random=3).fit_cavs(model, concepts, pool)
    half = TCAV("features", num_random=3, concept_fraction=0.5).fit_cavs(model, concepts, pool)
    rows = full.rows_of("bar")
    assert not torch.allclose(full.vectors[rows], half.vectors[rows])
    assert torch.equal(full.vectors[full.rows_of(None)], half.vectors[half.rows_of(None)]), "the null is unchanged"
    assert (half.vectors[rows] @ BAR.flatten() / BAR.norm() > 0.5).all()


# --------------------------------------------------------------------------------- the spurious-cue sanity experiment

SIZE = 32
TAG = 6


def _scenes(n: int, g: torch.Generator, tag_prob: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 / 1 = a blue / green disc (with colour noise, so colour alone is ~85 % accurate) on dim noise; a
    white tag with a black border in the bottom-right corner with probability ``tag_prob[class]``."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.25 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    cy = torch.randint(6, SIZE - 12, (n, 1, 1), generator=g)
    cx = torch.randint(6, SIZE - 12, (n, 1, 1), generator=g)
    radius = torch.randint(3, 6, (n, 1, 1), generator=g)
    disc = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
    colour = torch.where(y[:, None] == 0, torch.tensor([0.2, 0.3, 0.9]), torch.tensor([0.2, 0.9, 0.3]))
    colour = colour + 0.4 * torch.randn(n, 3, generator=g)
    x = torch.where(disc[:, None], colour[:, :, None, None], x)
    tagged = torch.rand(n, generator=g) < torch.tensor(tag_prob)[y]
    return _add_tag(x, tagged), y


def _add_tag(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    patch = torch.zeros(3, TAG, TAG)
    patch[:, 1:-1, 1:-1] = 1.0
    x[which, :, SIZE - TAG - 1 : SIZE - 1, SIZE - TAG - 1 : SIZE - 1] = patch
    return x


def _train(tag_prob: tuple[float, float], seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    x, y = _scenes(600, g, tag_prob)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),  # "4": the layer tested
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.2)
    for _ in range(6):
        perm = torch.randperm(600)
        for start in range(0, 600, 32):
            idx = perm[start : start + 32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_spurious_cue_is_significant_only_for_the_model_that_uses_it():
    """Kim et al.'s controlled experiment: class 0 carries a tag in 90 % of its training images and class 1 in 10 %
    (noise level 0.1), against a model trained with the tag at random (50 % in both classes). Both models see the
    same images at test time; TCAV of class 0 for the concept "tag" (tagged scenes vs untagged ones) must be
    significant for the first model and not for the second. The models' actual use of the tag is checked
    directly: adding the tag moves the first model's logit 0 a lot and the second's hardly at all."""
    probe_g = torch.Generator().manual_seed(99)
    test_x, test_y = _scenes(300, probe_g, (0.0, 0.0))
    concept = _add_tag(_scenes(30, probe_g, (0.0, 0.0))[0], torch.ones(30, dtype=torch.bool))
    pool = _scenes(200, probe_g, (0.0, 0.0))[0]
    class0 = test_x[test_y == 0][:50]
    outcomes = {}
    for name, tag_prob in (("cue", (0.9, 0.1)), ("random", (0.5, 0.5))):
        model = _train(tag_prob, seed=1)
        with torch.no_grad():
            shift = (model(_add_tag(test_x, torch.ones(300, dtype=torch.bool))) - model(test_x))[:, 0].mean()
            accuracy = (model(test_x).argmax(1) == test_y).float().mean()
        assert accuracy > 0.7, f"the {name} model must learn the colour too"
        entry = TCAV("4", num_random=10)(model, class0, 0, {"tag": concept}, pool).get(0, "tag")
        outcomes[name] = (float(shift), entry)
    cue_shift, cue = outcomes["cue"]
    random_shift, random = outcomes["random"]
    assert cue_shift > 1.0 and abs(random_shift) < 0.3, "the data set-up: only the cue model uses the tag"
    assert cue.significant and cue.score > 0.9, cue
    assert not random.significant, random
    assert cue.cav_accuracy > 0.95
