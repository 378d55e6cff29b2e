"""PatternNet / PatternAttribution: the signal-vs-distractor linear case of Kindermans et al., the estimators
against direct (unfold / masked-covariance) computations, the backward pass against a hand-written one, BatchNorm
folding, save/load, errors and the no-side-effect contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import GapCNN, LinearModel, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.attribution.base import build_attributor
from lightning_xai.attribution.pattern import PatternAttribution, PatternNet, PatternSet, fit_patterns


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def loader(*tensors: torch.Tensor, batch_size: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


# --------------------------------------------------------------------------- signal + distractor (the paper)
def signal_distractor_problem(n: int = 4000, dim: int = 16, seed: int = 0):
    """x = s a_s + d a_d; the filter w cancels the distractor (w . a_d = 0) and reads the signal (w . a_s = 1),
    so y = w . x = s. a_d is strongly aligned with a_s, so w must point away from a_s (cos(w, a_s) = 0.6)."""
    g = torch.Generator().manual_seed(seed)
    a_s = torch.randn(dim, generator=g, dtype=torch.float64)
    u = a_s / a_s.norm()
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    v = (v - (v @ u) * u) / (v - (v @ u) * u).norm()
    a_d = 3.0 * (0.8 * u + 0.6 * v)  # cos(a_s, a_d) = 0.8, so cos(w, a_s) = 0.6
    proj = a_s - (a_s @ a_d) / (a_d @ a_d) * a_d  # a_s with the distractor direction removed
    w = proj / (proj @ a_s)
    s = torch.randn(n, generator=g, dtype=torch.float64)
    d = 2.0 * torch.randn(n, generator=g, dtype=torch.float64)
    x = s[:, None] * a_s + d[:, None] * a_d
    model = nn.Linear(dim, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
        model.bias.zero_()
    return model, x, s, a_s, w


def test_linear_pattern_recovers_the_signal_direction_where_the_gradient_does_not():
    model, x, s, a_s, w = signal_distractor_problem()
    torch.testing.assert_close(model(x)[:, 0], s)  # the model reads exactly the signal
    patterns = fit_patterns(model, loader(x))
    assert patterns.layer_names == [""]  # the model is the layer itself
    a_pos, a_neg = patterns.patterns("")
    a = a_pos[0]
    assert a_pos is a_neg
    assert cosine(a, a_s) >= 0.99
    assert cosine(w, a_s) == pytest.approx(0.6)  # the gradient (= w) is clearly not the signal direction
    assert float(w @ a) == pytest.approx(1.0, abs=1e-9)  # normalisation w^T a = 1
    # the gradient is what the model filters with; PatternNet recovers the signal component s * a_s itself
    signal = PatternNet(patterns)(model, x[:50], 0)
    relative_error = (signal - s[:50, None] * a_s).norm() / (s[:50, None] * a_s).norm()
    assert relative_error < 0.02
    gradient = torch.autograd.functional.jacobian(lambda inp: model(inp).sum(), x[:1])[0]
    assert cosine(gradient, a_s) < 0.75


def test_linear_estimator_equals_the_covariance_formula_on_a_multi_output_model():
    torch.manual_seed(0)
    model = LinearModel(in_shape=(2, 4, 4), num_classes=3).double().eval()
    mixing = torch.randn(32, 32, dtype=torch.float64)
    x = (torch.randn(600, 32, dtype=torch.float64) @ mixing + 0.5).view(600, 2, 4, 4)  # correlated inputs
    patterns = fit_patterns(model, loader(x, batch_size=97))
    xs = x.flatten(1).numpy()
    ys = model(x).detach().numpy()
    weight = model.fc.weight.detach().numpy()
    for k in range(3):
        cov = np.cov(np.concatenate([xs, ys[:, k : k + 1]], axis=1), rowvar=False, bias=True)[:-1, -1]
        expected = cov / (weight[k] @ cov)
        np.testing.assert_allclose(patterns.patterns("fc")[0][k].numpy(), expected, rtol=1e-7, atol=1e-10)
        # PatternNet = a_k * y_k, PatternAttribution = w_k * a_k * y_k, which sums to y_k
        y = torch.from_numpy(ys[:5, k])
        a_k = torch.from_numpy(expected).view(2, 4, 4)
        torch.testing.assert_close(PatternNet(patterns)(model, x[:5], k), y.view(-1, 1, 1, 1) * a_k)
        relevance = PatternAttribution(patterns)(model, x[:5], k)
        torch.testing.assert_close(relevance, y.view(-1, 1, 1, 1) * a_k * model.weight_map(k).double())
        torch.testing.assert_close(relevance.flatten(1).sum(1), y)


# ------------------------------------------------------------------------- two-component estimator, ReLU net
class MLP(nn.Module):
    def __init__(self, dims=(6, 5, 3), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(dims[0], dims[1])
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(dims[1], dims[2])

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def masked_pattern(x: np.ndarray, y: np.ndarray, w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The S_a+- pattern of one unit, written directly: statistics over the masked samples only."""
    xm, ym = x[mask], y[mask]
    cov = (xm * ym[:, None]).mean(0) - xm.mean(0) * ym.mean()
    return cov / (w @ cov)


def test_two_component_estimator_matches_a_direct_computation_on_a_relu_net():
    model = MLP().double().eval()
    x = torch.randn(1500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + 0.3
    patterns = fit_patterns(model, loader(x, batch_size=128), estimator="two_component")
    assert patterns.estimator == "two_component" and set(patterns.layer_names) == {"fc1", "fc2"}
    with torch.no_grad():
        z1 = model.fc1(x)
        h = torch.relu(z1)
        z2 = model.fc2(h)
    for name, inputs, outputs, layer in (("fc1", x, z1, model.fc1), ("fc2", h, z2, model.fc2)):
        a_pos, a_neg = patterns.patterns(name)
        w = layer.weight.detach().numpy()
        for j in range(w.shape[0]):
            yj = outputs[:, j].numpy()
            for got, mask in ((a_pos[j], yj > 0), (a_neg[j], yj <= 0)):
                expected = masked_pattern(inputs.numpy(), yj, w[j], mask)
                np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-9)
    # the linear estimator from the same statistics is the pooled one
    a_lin = patterns.patterns("fc1", "linear")[0]
    expected = masked_pattern(x.numpy(), z1[:, 0].numpy(), model.fc1.weight[0].detach().numpy(), np.ones(1500, bool))
    np.testing.assert_allclose(a_lin[0].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("method", ["patternnet", "pattern_attribution"])
def test_backward_pass_matches_a_hand_written_one(method):
    """PatternNet: s_h = A2[k]^(regime of y_k) * y_k, gated by the ReLU, then s_x = sum_j s_h[j] A1+[j]
    (A1- never contributes: a gated unit passes nothing back). PatternAttribution: the same with W * A."""
    model = MLP().double().eval()
    x = torch.randn(800, 6, dtype=torch.float64) + 0.2
    patterns = fit_patterns(model, loader(x, batch_size=200), estimator="two_component")
    a1_pos, a1_neg = patterns.patterns("fc1")
    a2_pos, a2_neg = patterns.patterns("fc2")
    w1, w2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    if method == "pattern_attribution":
        a1_pos, a1_neg, a2_pos, a2_neg = w1 * a1_pos, w1 * a1_neg, w2 * a2_pos, w2 * a2_neg
    target = torch.tensor([0, 1, 2, 1, 0, 2])
    probe = x[:6]
    explained = build_attributor({"name": method, "patterns": patterns})(model, probe, target)
    for i in range(6):
        k = int(target[i])
        z1 = model.fc1(probe[i]).detach()
        y = float(model(probe[i])[k].detach())
        s_h = (a2_pos[k] if y > 0 else a2_neg[k]) * y
        s_h = s_h * (z1 > 0)
        s_x = sum(s_h[j] * (a1_pos[j] if z1[j] > 0 else a1_neg[j]) for j in range(5))
        torch.testing.assert_close(explained[i], s_x)


# ------------------------------------------------------------------------------------ convolution statistics
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"stride": 2, "padding": 1},
        {"stride": 1, "padding": 1, "padding_mode": "reflect", "dilation": 2},
        {"stride": 1, "padding": "same", "groups": 2},
    ],
)
def test_conv_statistics_equal_sums_over_unfolded_patches(conv_kwargs):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, **conv_kwargs).double()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2).double())
    x = torch.randn(20, 4, 9, 9, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    patterns = fit_patterns(model.eval(), loader(x, batch_size=7), estimator="two_component")
    # direct: unfold the (explicitly padded) input into patches and sum x, y, x*y over patches per regime
    if conv_kwargs.get("padding_mode") == "reflect" or conv_kwargs.get("padding") == "same":
        mode = "reflect" if conv_kwargs.get("padding_mode") == "reflect" else "constant"
        xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    else:
        xp, padding = x, conv.padding
    groups = conv.groups
    y = conv(x).detach()
    cin = 4 // groups
    for regime in ("pos", "neg"):
        sums = patterns.sums("0", regime)
        for j in range(6):
            g = j // (6 // groups)
            patches = F.unfold(
                xp[:, g * cin : (g + 1) * cin], 3, dilation=conv.dilation, padding=padding, stride=conv.stride
            )  # [N, cin*9, L]
            yj = y[:, j].flatten(1)  # [N, L]
            mask = (yj > 0) if regime == "pos" else (yj <= 0)
            m = mask.double()
            torch.testing.assert_close(sums["count"][j], m.sum())
            torch.testing.assert_close(sums["sum_y"][j], (yj * m).sum())
            torch.testing.assert_close(sums["sum_x"][j].flatten(), (patches * m[:, None]).sum((0, 2)))
            torch.testing.assert_close(sums["sum_xy"][j].flatten(), (patches * (yj * m)[:, None]).sum((0, 2)))


def test_statistics_add_up_over_data_splits():
    """What all_reduce relies on: the fitted sums of two halves add up to the sums of the whole."""
    model = GapCNN().double().eval()
    x = torch.rand(24, 3, 8, 8, dtype=torch.float64)
    full, first, second = (fit_patterns(model, loader(t, batch_size=8)) for t in (x, x[:10], x[10:]))
    for name in full.layer_names:
        for regime in ("pos", "neg"):
            for key, value in full.sums(name, regime).items():
                torch.testing.assert_close(value, first.sums(name, regime)[key] + second.sums(name, regime)[key])


# ------------------------------------------------------------------------------------------- BatchNorm folding
def test_batchnorm_is_folded_into_the_conv_for_fitting_and_explaining():
    """Patterns of a conv-BN net equal those of the same net with the BN folded by hand into the conv."""
    torch.manual_seed(0)
    bn_model = GapCNN(channels=4).double()
    bn = bn_model.features[3]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    bn_model.eval()
    conv = bn_model.features[2]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded_conv = nn.Conv2d(4, 4, 3, padding=1).double()
    with torch.no_grad():
        folded_conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded_conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    plain = GapCNN(channels=4).double()
    plain.load_state_dict(bn_model.state_dict())
    plain.features[2] = folded_conv
    plain.features[3] = nn.Identity()
    plain.eval()
    x = torch.rand(40, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(plain(x), bn_model(x))
    p_bn = fit_patterns(bn_model, loader(x), estimator="two_component")
    p_plain = fit_patterns(plain, loader(x), estimator="two_component")
    for name in ("features.0", "features.2", "head"):
        for got, expected in zip(p_bn.patterns(name), p_plain.patterns(name), strict=True):
            torch.testing.assert_close(got, expected)
    for cls in (PatternNet, PatternAttribution):
        torch.testing.assert_close(cls(p_bn)(bn_model, x[:3], 1), cls(p_plain)(plain, x[:3], 1))


# -------------------------------------------------------------------------------------- contract and errors
@pytest.fixture
def fitted_gap_cnn():
    model = GapCNN()
    patterns = fit_patterns(model, loader(torch.rand(32, 3, 8, 8), batch_size=16), estimator="two_component")
    return model, patterns


@pytest.mark.parametrize("cls", [PatternNet, PatternAttribution])
def test_no_side_effects_and_shape(fitted_gap_cnn, cls):
    model, patterns = fitted_gap_cnn
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    out = cls(patterns)(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 3]))
    assert out.shape == (2, 3, 8, 8) and not out.requires_grad and torch.isfinite(out).all()
    assert out.abs().sum() > 0
    assert_unchanged(model, before)


def test_fit_patterns_has_no_side_effects():
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    fit_patterns(model, loader(torch.rand(16, 3, 8, 8)))
    assert_unchanged(model, before)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name])


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_under_no_grad_and_inference_mode(fitted_gap_cnn, context):
    model, patterns = fitted_gap_cnn
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    expected = PatternNet(patterns)(model, x, 1)
    with torch.no_grad() if context == "no_grad" else torch.inference_mode():
        got = PatternNet(patterns)(model, x.clone(), 1)
        refit = fit_patterns(model, [x.clone()])
    torch.testing.assert_close(got, expected)
    assert refit.layer_names == patterns.layer_names
    assert not any(t.is_inference() for stats in refit.layers.values() for t in stats.values())
    torch.testing.assert_close(
        PatternAttribution(refit)(model, x, 1),  # patterns fitted inside inference_mode are usable outside
        PatternAttribution(fit_patterns(model, [x]))(model, x, 1),
    )


def test_resnet18_runs_without_side_effects(resnet18):
    x = torch.rand(2, 3, 32, 32)
    patterns = fit_patterns(resnet18, [x], estimator="two_component")
    assert len(patterns.layer_names) == 21  # 20 convolutions (3 of them downsampling) + fc
    put_in_train_mode_with_grads(resnet18)
    before = snapshot(resnet18)
    out = PatternAttribution(patterns)(resnet18, x, 2)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert_unchanged(resnet18, before)


def test_save_load_round_trip_and_construction_from_a_path(fitted_gap_cnn, tmp_path):
    model, patterns = fitted_gap_cnn
    path = tmp_path / "patterns.pt"
    patterns.save(path)
    loaded = PatternSet.load(path)
    assert loaded.estimator == "two_component" and loaded.layer_names == patterns.layer_names
    for name in patterns.layer_names:
        for a, b in zip(patterns.patterns(name), loaded.patterns(name), strict=True):
            assert torch.equal(a, b)
    x = torch.rand(2, 3, 8, 8)
    from_path = build_attributor({"name": "patternnet", "patterns": str(path)})
    torch.testing.assert_close(from_path(model, x, 0), PatternNet(patterns)(model, x, 0))
    with pytest.raises(ValueError, match="not a PatternSet state dict"):
        PatternSet().load_state_dict({"layers": {}})


def test_missing_layers_changed_weights_and_unsupported_layers_raise(fitted_gap_cnn):
    model, patterns = fitted_gap_cnn
    x = torch.rand(2, 3, 8, 8)
    partial = fit_patterns(model, [x], layers=["features.0", "head"])
    with pytest.raises(ValueError, match=r"without fitted patterns: \['features.2'\]"):
        PatternNet(partial)(model, x, 0)
    with torch.no_grad():
        model.head.weight.add_(0.1)
    with pytest.raises(ValueError, match="layer 'head' has other weights than the patterns were fitted with"):
        PatternAttribution(patterns)(model, x, 0)
    with_layernorm = nn.Sequential(nn.Flatten(), nn.Linear(192, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"not supported: \['2 \(LayerNorm\)'\]"):
        fit_patterns(with_layernorm, [x])
    with pytest.raises(ValueError, match="fit with fold_batchnorm=True"):
        fit_patterns(model, [x], fold_batchnorm=False)
    with pytest.raises(ValueError, match="layer 'features.1' is a ReLU"):
        fit_patterns(model, [x], layers=["features.1"])


def test_bad_arguments_raise_clear_errors(fitted_gap_cnn):
    model, patterns = fitted_gap_cnn
    with pytest.raises(ValueError, match=r"unknown estimator 'quadratic'; valid estimators: \['linear', 'two_comp"):
        fit_patterns(model, [torch.rand(1, 3, 8, 8)], estimator="quadratic")
    with pytest.raises(ValueError, match="unknown estimator"):
        PatternNet(patterns, estimator="nope")
    with pytest.raises(TypeError, match="patterns must be a PatternSet or the path"):
        PatternNet(42)
    with pytest.raises(ValueError, match="the PatternSet is empty"):
        PatternAttribution(PatternSet())
    with pytest.raises(ValueError, match="data yielded no batches"):
        fit_patterns(model, [])
    with pytest.raises(ValueError, match="max_batches must be"):
        fit_patterns(model, [torch.rand(1, 3, 8, 8)], max_batches=0)


def test_max_batches_and_batch_formats():
    model = GapCNN().eval()
    x = torch.rand(12, 3, 8, 8)
    batches = [(x[:4], torch.zeros(4)), {"image": x[4:8]}, x[8:]]
    patterns = fit_patterns(model, batches, max_batches=2)
    assert float(patterns.sums("head", "all")["count"][0]) == 8  # two batches of 4 samples


# ------------------------------------------------------------------------------------------------- issue 12
def test_contrastive_target_is_the_difference_of_the_class_explanations():
    """Issue 12.1: the backward pass of a callable target starts from y_a e_a - y_b e_b, so on a linear model
    PatternAttribution for "why a not b" sums to y_a - y_b and both methods equal attr(a) - attr(b)."""
    from lightning_xai.attribution.targets import contrastive_target

    torch.manual_seed(0)
    model = LinearModel(in_shape=(2, 4, 4), num_classes=3).double().eval()
    mixing = torch.randn(32, 32, dtype=torch.float64)
    x = (torch.randn(400, 32, dtype=torch.float64) @ mixing + 0.5).view(400, 2, 4, 4)
    patterns = fit_patterns(model, loader(x, batch_size=100))
    probe = x[:5]
    y = model(probe).detach()
    for cls in (PatternNet, PatternAttribution):
        method = cls(patterns)
        contrast = method(model, probe, contrastive_target(0, 2))
        torch.testing.assert_close(contrast, method(model, probe, 0) - method(model, probe, 2))
    relevance = PatternAttribution(patterns)(model, probe, contrastive_target(0, 2))
    torch.testing.assert_close(relevance.flatten(1).sum(1), y[:, 0] - y[:, 2])


def test_batchnorm_folding_works_with_hooks_on_a_non_sequential_model():
    """Issue 12.8: a forward hook on a non-Sequential BatchNorm model (as wandb.watch or a user adds) no longer
    makes fitting and explaining refuse the model; the hooks stay and are called only by real forward passes."""

    class ConvBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.bn(self.conv(inputs))).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(16, 3, 6, 6)
    plain = PatternAttribution(fit_patterns(model, loader(x, batch_size=8)))(model, x[:2], 1)
    calls: list[str] = []
    handles = [
        model.register_forward_hook(lambda m, i, o: calls.append(type(o).__name__)),
        model.bn.register_forward_hook(lambda m, i, o: calls.append(type(o).__name__)),
    ]
    try:
        before = snapshot(model)
        patterns = fit_patterns(model, loader(x, batch_size=8))
        torch.testing.assert_close(PatternAttribution(patterns)(model, x[:2], 1), plain)
        assert_unchanged(model, before)
        assert set(calls) == {"Tensor"} and len(calls) == 2 * 3  # 2 fitting batches + 1 explanation, 2 hooks
    finally:
        for handle in handles:
            handle.remove()
