"""Relevant units (Oramas et al., ICLR 2019): the l1-ball projection, the constrained lasso, planted units in a
hand-built model, receptive fields, visuals, explanations and unit ablation."""

from __future__ import annotations

import pytest
import torch
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.interpretation.relevant_units import (
    RelevantUnitAnalysis,
    ablate_units,
    constrained_lasso,
    crop_receptive_fields,
    project_l1_ball,
    receptive_field,
    unit_ablation,
    unit_visuals,
)

# ------------------------------------------------------------------------------------------------ l1-ball projection


def _bisection_projection(v: torch.Tensor, radius: float) -> torch.Tensor:
    """The projection by another route: bisection on the soft threshold theta with ||soft(v, theta)||_1 = radius."""
    if v.abs().sum() <= radius:
        return v.clone()
    lo, hi = 0.0, float(v.abs().max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if (v.abs() - mid).clamp_min(0).sum() > radius:
            lo = mid
        else:
            hi = mid
    return torch.sign(v) * (v.abs() - hi).clamp_min(0)


@pytest.mark.parametrize("seed", range(6))
def test_l1_projection_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = 3 + seed
    v = torch.randn(n, 4, generator=g, dtype=torch.float64) * 2
    radius = 0.5 + seed * 0.3
    p = project_l1_ball(v, radius)
    for c in range(4):
        col, proj = v[:, c], p[:, c]
        assert torch.allclose(proj, _bisection_projection(col, radius), atol=1e-9)
        assert proj.abs().sum() <= radius + 1e-9
        # optimality certificate over the ball's vertices +-radius e_i: <v - p, q - p> <= 0 for every q in the ball
        residual = col - proj
        assert radius * residual.abs().max() <= residual @ proj + 1e-9
        # and no point of a dense random sample of the ball is closer to v
        q = torch.randn(2000, n, generator=g, dtype=torch.float64)
        q = q / q.abs().sum(1, keepdim=True) * radius * torch.rand(2000, 1, generator=g, dtype=torch.float64)
        assert ((q - col).norm(dim=1) >= (proj - col).norm() - 1e-9).all()


def test_l1_projection_edge_cases():
    inside = torch.tensor([0.1, -0.2, 0.3])
    assert torch.equal(project_l1_ball(inside, 1.0), inside), "a point inside the ball is its own projection"
    assert torch.equal(project_l1_ball(inside, 0.0), torch.zeros(3))
    assert torch.allclose(project_l1_ball(torch.tensor([3.0, 0.0, 0.0]), 1.0), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="radius"):
        project_l1_ball(inside, -1.0)


# ---------------------------------------------------------------------------------------------------- the lasso


def test_lasso_recovers_planted_support():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g)
    w = torch.zeros(30, 3)
    w[[2, 5], 0] = torch.tensor([0.6, 0.4])
    w[7, 1] = 1.0
    w[[11, 12, 20], 2] = torch.tensor([0.5, 0.3, -0.2])
    y = x @ w + 0.05 * torch.randn(200, 3, generator=g)
    estimate, iterations = constrained_lasso(x, y, mu=0.9)
    assert iterations < 2000
    support = estimate.abs() > 1e-6
    assert torch.equal(support, w != 0), support.nonzero().tolist()
    assert (estimate.abs().sum(0) <= 0.9 + 1e-5).all()
    assert (torch.sign(estimate[w != 0]) == torch.sign(w[w != 0])).all()


def test_lasso_equals_the_penalised_solution_of_scikit_learn():
    """Constrained and penalised lasso coincide when mu is the l1 norm of the penalised solution."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 12, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + 0.1 * torch.randn(80, generator=g).double()
    ref = linear_model.Lasso(alpha=0.05, fit_intercept=False, tol=1e-12, max_iter=100000).fit(x.numpy(), y.numpy())
    coef = torch.from_numpy(ref.coef_)
    estimate, _ = constrained_lasso(x, y[:, None], mu=float(coef.abs().sum()), max_iter=20000, tol=1e-12)
    assert torch.allclose(estimate[:, 0].double(), coef, atol=1e-4)


# ----------------------------------------------------------------------------------------- a model with known units

SIZE = 16


class PatchModel(nn.Module):
    """``features`` (3x3 conv, 6 units): unit c < 3 copies input channel c (plus a faint 3x3 surround), unit 3 is
    the brightness (fires for every image), unit 4 mixes channels 0 and 1, unit 5 is dead. Logit c is the energy of
    unit c, so class c is decided by unit c alone."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        weight = torch.zeros(6, 3, 3, 3)
        for c in range(3):
            weight[c, c] = 0.02
            weight[c, c, 1, 1] = 1.0
        weight[3, :, 1, 1] = 1.0 / 3
        weight[4, 0, 1, 1] = weight[4, 1, 1, 1] = 0.5
        with torch.no_grad():
            self.features.weight.copy_(weight)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.features(x))[:, :3].square().mean(dim=(2, 3))


def _patch_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class c: a 4x4 patch of 1 in channel c on faint noise; also returns the patch masks."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        r, c = torch.randint(1, SIZE - 5, (2,), generator=g).tolist()
        x[i, labels[i], r : r + 4, c : c + 4] = 1.0
        masks[i, r : r + 4, c : c + 4] = True
    return x, labels, masks


@pytest.fixture(scope="module")
def fitted():
    model = PatchModel().eval()
    x, y, _ = _patch_data(60, seed=0)
    result = RelevantUnitAnalysis("features", mu=1.0).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return model, result


def test_features_are_normalised_energies():
    model = PatchModel().eval()
    x, y, _ = _patch_data(9, seed=1)
    feats, labels, units = RelevantUnitAnalysis("features", batch_size=4).features(model, (x, y))
    with torch.no_grad():
        conv = nn.functional.conv2d(x, model.features.weight, padding=1)
    assert torch.allclose(feats, conv.square().sum(dim=(2, 3)) / SIZE**2, atol=1e-5)
    assert torch.equal(labels, y) and units == [("features", c) for c in range(6)]


def test_planted_units_are_the_relevant_ones(fitted):
    _, result = fitted
    for c in range(3):
        relevant = result.relevant(c)
        assert relevant and relevant[0][:2] == ("features", c), relevant
        assert relevant[0][2] > 0
        assert result.units_by_layer(c) == {"features": [c]}, "only unit c supports class c"
    assert not result.mask[3].any(), "the brightness unit is relevant to no class"
    assert not result.mask[5].any(), "the dead unit is relevant to no class"
    assert (result.weights.abs().sum(0) <= 1.0 + 1e-5).all()
    assert result.r2 > 0.9
    rows = result.rows()
    assert [row[:4] for row in rows if row[1] == 0] == [[c, 0, "features", c] for c in range(3)]


def test_explanation_points_at_the_patch(fitted):
    model, result = fitted
    x, y, masks = _patch_data(6, seed=2)
    before = snapshot(model)
    explanation = result.explain(model, x, top_k=2)
    assert_unchanged(model, before)
    assert torch.equal(explanation.classes, y), "the model is right, so the prediction is the label"
    heat = explanation.heatmap[:, 0]
    assert heat.shape == (6, SIZE, SIZE) and (heat >= 0).all()
    feats, _, _ = RelevantUnitAnalysis("features").features(model, x)
    for i in range(6):
        peak = divmod(int(heat[i].argmax()), SIZE)
        assert masks[i][peak], f"sample {i}: the heatmap peaks outside the patch"
        c = int(y[i])
        assert explanation.units[i][0] == ("features", c)
        expected = float(result.weights[c, c] * feats[i, c] / result.scale[c])
        assert explanation.contributions[i][0] == pytest.approx(expected, rel=1e-5), "contribution w_jc * x_ij"
    with pytest.raises(ValueError, match="target classes"):
        result.explain(model, x, target=7)


def test_gradient_and_no_grad_paths_run_under_inference_mode(fitted):
    model, result = fitted
    x, y, _ = _patch_data(4, seed=6)
    field = receptive_field(model, "features", (3, SIZE, SIZE))
    heat = result.explain(model, x).heatmap
    report = unit_ablation(model, result, (x, y))
    with torch.inference_mode():
        assert receptive_field(model, "features", (3, SIZE, SIZE)) == field
        assert torch.equal(result.explain(model, x).heatmap, heat)
        assert unit_ablation(model, result, (x, y)).rows() == report.rows()
        assert RelevantUnitAnalysis("features").fit(model, (x, y)).mask.any()


def test_unit_ablation_hits_relevant_units_only(fitted):
    model, result = fitted
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    x, y, _ = _patch_data(30, seed=3)
    report = unit_ablation(model, result, (x, y), num_random=3, batch_size=7)
    assert_unchanged(model, before)
    assert torch.equal(report.totals, torch.tensor([10, 10, 10]))
    assert torch.allclose(report.base_accuracy, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(report.relevant_drop, torch.ones(3, dtype=torch.float64)), "no class survives its unit"
    assert (report.random_drop < 0.2).all(), report.random_accuracy
    assert report.num_ablated.tolist() == [1, 1, 1] and len(report.rows()) == 3


def test_ablate_units_zeroes_channels_and_removes_its_hooks():
    model = GapCNN().eval()
    before = snapshot(model)
    x = torch.rand(2, 3, 8, 8)
    seen = {}
    with ablate_units(model, {"features.3": [1, 4]}):
        handle = model.features[4].register_forward_hook(lambda m, i, o: seen.__setitem__("relu", o.clone()))
        model(x)
        handle.remove()
    assert (seen["relu"][:, [1, 4]] == 0).all() and (seen["relu"][:, [0, 2]] != 0).any()
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"), ablate_units(model, {"features.3": [99]}):
        model(x)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------ receptive fields, visuals


def test_receptive_field_matches_the_layer_geometry():
    torch.manual_seed(0)
    stack = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
    )
    field = receptive_field(stack, "3", (2, 16, 16))
    # geometry: size 1 + 2 + 2 + 1 + 2*2 = 10, jump 2, padding offset 1 + 1 + 2*1 = 4
    assert field.size == (10, 10) and field.stride == (2.0, 2.0) and not field.clipped
    for h, w in [(0, 0), (4, 4), (7, 3)]:
        assert field.box(h, w) == (2 * h - 4, 2 * w - 4, 2 * h - 4 + 10, 2 * w - 4 + 10)
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).view(1, 2, 16, 16)
    crop = crop_receptive_fields(images, torch.tensor([[0, 5]]), field)
    assert crop.shape == (1, 2, 10, 10)
    assert (crop[0, :, :4] == 0).all(), "rows above the image are zero padding"
    assert torch.equal(crop[0, :, 4:, :], images[0, :, 0:6, 6:16])


def test_receptive_field_of_a_resnet_block(resnet18):
    """Residual additions, in-place ReLUs and the reused ReLU module: the field of ``layer1`` is the longest path,
    conv 7x7/2 -> max-pool 3x3/2 -> four 3x3 convolutions: 7 + 2*2 + 4*2*4 = 43 pixels, jump 4."""
    before = snapshot(resnet18)
    field = receptive_field(resnet18, "layer1", (3, 64, 64))
    assert_unchanged(resnet18, before)
    assert field.size == (43, 43) and field.stride == (4.0, 4.0) and not field.clipped
    assert receptive_field(resnet18, "layer4", (3, 32, 32)).clipped, "deeper than the image is wide"


def test_unit_visuals_show_the_units_patches(fitted):
    model, _ = fitted
    x, y, masks = _patch_data(45, seed=4)
    visuals = unit_visuals(model, [("features", 0), ("features", 2)], DataLoader(TensorDataset(x, y), 10), k=5)
    assert [(v.layer, v.unit) for v in visuals] == [("features", 0), ("features", 2)]
    for visual, c in zip(visuals, (0, 2)):
        assert (y[visual.indices] == c).all(), "a unit's top images are its class's"
        assert torch.equal(visual.images, x[visual.indices])
        assert visual.crops.shape == (5, 3, 3, 3), "3x3 convolution: a 3x3 receptive field"
        for i, index in enumerate(visual.indices.tolist()):
            assert masks[index][tuple(visual.positions[i].tolist())], "the strongest response is on the patch"
        assert visual.average[c, 1, 1] == pytest.approx(1.0)
        assert visual.average[c].mean() > 0.5 and visual.average[(c + 1) % 3].mean() < 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mu": 0.0}, "mu"), ({"layers": []}, "at least one layer"), ({"max_iter": 0}, "max_iter")],
)
def test_bad_arguments(kwargs, match):
    args = {"layers": "features", **kwargs}
    with pytest.raises(ValueError, match=match):
        RelevantUnitAnalysis(**args)


def test_bad_data(fitted):
    model, _ = fitted
    x, y, _ = _patch_data(6, seed=5)
    with pytest.raises(ValueError, match="labels"):
        RelevantUnitAnalysis("features").fit(model, x)
    with pytest.raises(ValueError, match="not found"):
        RelevantUnitAnalysis("featurez").fit(model, (x, y))
    with pytest.raises(ValueError, match="listed twice"):
        RelevantUnitAnalysis(["features", "features"]).fit(model, (x, y))
