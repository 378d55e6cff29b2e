"""The CAM family (CAM, Grad-CAM, Grad-CAM++, LayerCAM, Score-CAM) against closed forms and independent code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.base import ATTRIBUTORS, build_attributor
from lightning_xai.attribution.cam import CAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM

ALL = {
    "cam": lambda layer=None: CAM(layer=layer),
    "gradcam": lambda layer=None: GradCAM(layer=layer),
    "gradcam_plus_plus": lambda layer=None: GradCAMPlusPlus(layer=layer),
    "layercam": lambda layer=None: LayerCAM(layer=layer),
    "scorecam": lambda layer=None: ScoreCAM(layer=layer, batch_size=7),
}


# --------------------------------------------------------------------------------------------- test models


class ToyScore(nn.Module):
    """``x -> feat (identity) -> logit_0 = sum_ij C_ij a_ij, logit_1 = 0``: the gradient at the layer is ``C``."""

    def __init__(self, coef: list[list[float]]) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.register_buffer("coef", torch.tensor(coef).view(1, 1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.feat(x)
        logit = (a * self.coef).sum(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


class RegionModel(nn.Module):
    """16x16 one-channel input. ``features``: the 4x4-average-pooled input spread over 16 position-coded channels
    (channel k is non-zero only at cell k). Class 0's logit is 4 * the mean input over cell (1, 2), i.e. it
    depends only on the input region rows 4:8, cols 8:12; class 1's logit is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.features = nn.Identity()
        self.register_buffer("onehot", torch.eye(16).view(16, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(self.pool(x) * self.onehot)
        logit = 4 * f[:, 6].sum(dim=(1, 2))  # cell (1, 2) is channel 1 * 4 + 2 = 6
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


class ConvReLU(nn.Module):
    """conv -> ReLU(inplace or not) -> conv -> GAP -> linear."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.act(self.conv(x))).mean(dim=(2, 3)))


class Mismatch(nn.Module):
    """conv(3->4) -> conv(4->6) -> GAP -> Linear(6, 3), plus a module that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.unused = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _x(b: int = 2, c: int = 3, s: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(seed))


def _gap_reference(model: GapCNN, x: torch.Tensor, target: int, layer: str):
    """Activation and gradient of GapCNN at ``features`` / ``features.0``, by a hand-written float64 forward
    (no hooks, no in-place ReLU)."""
    m = copy.deepcopy(model).double().eval()
    x = x.double()
    f = m.features
    a0 = f[0](x)
    if layer == "features.0":
        a = a0.detach().requires_grad_(True)
        h = F.relu(f[3](f[2](F.relu(a))))
    else:
        a = F.relu(f[3](f[2](F.relu(a0)))).detach().requires_grad_(True)
        h = a
    logits = m.head(h.mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(logits[:, target].sum(), a)
    return a.detach(), g


def _paper_alpha(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Eq. 19 of Grad-CAM++ written literally: g^2 / (2 g^2 + sum_ab A_ab g^3), denominator 0 -> 1."""
    den = 2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3
    return g**2 / torch.where(den == 0, torch.ones_like(den), den)


# --------------------------------------------------------------------------------------------- CAM / Grad-CAM


def test_cam_matches_independent_computation_and_the_logit_identity(gap_cnn):
    x = _x()
    cam = CAM(layer="features")(gap_cnn, x, 2)
    assert cam.shape == (2, 1, 8, 8)
    with torch.no_grad():
        feats = F.relu(gap_cnn.features[3](gap_cnn.features[2](F.relu(gap_cnn.features[0](x)))))
        maps = F.conv2d(feats, gap_cnn.head.weight[:, :, None, None])  # every class's map, [B, 4, 8, 8]
        logits = gap_cnn(x)
    torch.testing.assert_close(cam[:, 0], maps[:, 2], rtol=1e-5, atol=1e-6)
    # CAM's defining identity: y_c = b_c + mean_ij M_c (the head sees the global average of the features)
    torch.testing.assert_close(cam.mean(dim=(1, 2, 3)) + gap_cnn.head.bias[2], logits[:, 2], rtol=1e-5, atol=1e-5)
    assert (cam < 0).any(), "the paper's CAM is signed by default (relu=False)"
    assert (CAM(layer="features", relu=True)(gap_cnn, x, 2) >= 0).all()


def test_cam_upsamples_bilinearly_on_resnet18(resnet18):
    x = _x(1, 3, 64)
    cam = CAM(layer="layer4")(resnet18, x, torch.tensor([4]))
    r = resnet18
    with torch.no_grad():
        h = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        feats = r.layer4(r.layer3(r.layer2(r.layer1(h))))  # [1, 512, 2, 2]
        coarse = torch.einsum("k,bkhw->bhw", r.fc.weight[4], feats)
        expected = F.interpolate(coarse[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    assert cam.shape == (1, 1, 64, 64)
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-5)


def test_gradcam_is_cam_over_hw_on_gap_linear(gap_cnn):
    x = _x()
    for target in (0, torch.tensor([3, 1])):
        cam = CAM(layer="features")(gap_cnn, x, target)
        grad_signed = GradCAM(layer="features", relu=False)(gap_cnn, x, target)
        torch.testing.assert_close(grad_signed, cam / 64, rtol=1e-4, atol=1e-6)
        grad_relu = GradCAM(layer="features")(gap_cnn, x, target)
        torch.testing.assert_close(grad_relu, cam.clamp_min(0) / 64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", ["features", "features.0"])
def test_gradient_methods_match_a_hand_written_float64_reference(gap_cnn, layer):
    x = _x(seed=5)
    a, g = _gap_reference(gap_cnn, x, 1, layer)
    expected = {
        "gradcam": (g.mean(dim=(2, 3), keepdim=True) * a).sum(1),
        "layercam": (g.clamp_min(0) * a).sum(1),
    }
    alpha = _paper_alpha(g, a)
    positive = g > 0
    expected["gradcam_plus_plus_raw"] = ((alpha * g.clamp_min(0)).sum(dim=(2, 3), keepdim=True) * a).sum(1)
    norm = (alpha * positive).sum(dim=(2, 3), keepdim=True)
    alpha_n = alpha / torch.where(norm == 0, torch.ones_like(norm), norm)
    expected["gradcam_plus_plus"] = ((alpha_n * g.clamp_min(0)).sum(dim=(2, 3), keepdim=True) * a).sum(1)
    methods = {
        "gradcam": GradCAM(layer=layer, relu=False),
        "layercam": LayerCAM(layer=layer, relu=False),
        "gradcam_plus_plus_raw": GradCAMPlusPlus(layer=layer, relu=False, normalize_alpha=False),
        "gradcam_plus_plus": GradCAMPlusPlus(layer=layer, relu=False, alpha_normalization="positive"),
    }
    for key, method in methods.items():
        got = method(gap_cnn, x, 1)
        torch.testing.assert_close(got[:, 0].double(), expected[key], rtol=1e-4, atol=1e-6, msg=key)
    # the reference is non-trivial: the spatially varying gradient makes the methods differ
    assert not torch.allclose(expected["gradcam"], expected["layercam"], atol=1e-4)
    assert not torch.allclose(expected["gradcam_plus_plus"], expected["gradcam_plus_plus_raw"], atol=1e-4)


# --------------------------------------------------------------------------------------------- Grad-CAM++


def test_gradcam_plus_plus_hand_computed_alpha():
    # A = [[1, 2], [3, 4]] (sum 10), g = [[0.5, -1], [0.25, 0.1]]
    # alpha = g^2 / (2 g^2 + 10 g^3): 0.25/1.75 = 1/7, (irrelevant: g < 0), 0.0625/0.28125 = 2/9, 0.01/0.03 = 1/3
    # un-normalised w = 1/7 * 0.5 + 2/9 * 0.25 + 1/3 * 0.1 = 101/630
    # normalised over the positive-gradient positions: alpha sum = 1/7 + 2/9 + 1/3 = 44/63 -> w = 101/440
    model = ToyScore([[0.5, -1.0], [0.25, 0.1]])
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    got = GradCAMPlusPlus(layer="feat", alpha_normalization="positive")(model, a, 0)
    torch.testing.assert_close(got, a * 101 / 440)
    got_raw = GradCAMPlusPlus(layer="feat", normalize_alpha=False)(model, a, 0)
    torch.testing.assert_close(got_raw, a * 101 / 630)
    # Grad-CAM on the same case: mean gradient (0.5 - 1 + 0.25 + 0.1) / 4 = -0.0375 -> all negative -> relu 0
    assert torch.equal(GradCAM(layer="feat")(model, a, 0), torch.zeros_like(a))
    # LayerCAM: relu(relu(g) * A) = [[0.5, 0], [0.75, 0.4]]
    torch.testing.assert_close(
        LayerCAM(layer="feat")(model, a, 0), torch.tensor([[0.5, 0.0], [0.75, 0.4]]).view(a.shape)
    )


def _authors_gradcam_plus_plus(conv_output: np.ndarray, first_grad: np.ndarray, score: float) -> np.ndarray:
    """Grad-CAM++ as the authors' released code computes it (github.com/adityac94/Grad_CAM_plus_plus,
    ``misc/utils.py``), transcribed independently in numpy for one sample, channels-last ``[h, w, K]`` as there:
    the exponential score's derivatives are ``exp(S) g``, ``exp(S) g^2``, ``exp(S) g^3``; alpha is divided by its
    sum over **all** positions; the map before the final ReLU and max-normalisation is returned."""
    exp_s = np.exp(score)
    first = exp_s * first_grad
    second = exp_s * first_grad**2
    third = exp_s * first_grad**3
    global_sum = np.sum(conv_output.reshape((-1, first_grad.shape[2])), axis=0)
    alpha_num = second
    alpha_denom = second * 2.0 + third * global_sum.reshape((1, 1, first_grad.shape[2]))
    alpha_denom = np.where(alpha_denom != 0.0, alpha_denom, np.ones(alpha_denom.shape))
    alphas = alpha_num / alpha_denom
    weights = np.maximum(first, 0.0)
    alpha_normalization_constant = np.sum(np.sum(alphas, axis=0), axis=0)
    alpha_normalization_constant_processed = np.where(
        alpha_normalization_constant != 0.0, alpha_normalization_constant, np.ones(alpha_normalization_constant.shape)
    )
    alphas /= alpha_normalization_constant_processed.reshape((1, 1, first_grad.shape[2]))
    deep_linearization_weights = np.sum((weights * alphas).reshape((-1, first_grad.shape[2])), axis=0)
    return np.sum(deep_linearization_weights * conv_output, axis=2)


def test_gradcam_plus_plus_default_follows_the_authors_code_on_an_intermediate_layer(gap_cnn):
    """Issue 12.2: the default alpha normalisation is the authors' (sum over all positions). On an intermediate
    layer the gradient changes sign over the map, so it differs from the positive-only normalisation."""
    x = _x(seed=3)
    a, g = _gap_reference(gap_cnn, x, 2, "features.0")
    with torch.no_grad():
        scores = copy.deepcopy(gap_cnn).double().eval()(x.double())[:, 2]
    got = GradCAMPlusPlus(layer="features.0", relu=False)(gap_cnn, x, 2)[:, 0].double()
    for b in range(x.shape[0]):
        # the authors' map carries the positive per-sample factor exp(S), which the library drops
        expected = _authors_gradcam_plus_plus(
            a[b].permute(1, 2, 0).numpy(), g[b].permute(1, 2, 0).numpy(), float(scores[b])
        ) / np.exp(float(scores[b]))
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-4, atol=1e-6)
    positive = GradCAMPlusPlus(layer="features.0", relu=False, alpha_normalization="positive")(gap_cnn, x, 2)
    assert (g < 0).any() and (g > 0).any()
    assert not torch.allclose(positive[:, 0].double(), got, rtol=1e-2, atol=1e-4)


def test_gradcam_plus_plus_hand_computed_authors_normalisation():
    # as test_gradcam_plus_plus_hand_computed_alpha; alpha at g = -1 is 1 / (2 - 10) = -1/8 and is counted too:
    # sum over all positions 1/7 - 1/8 + 2/9 + 1/3 = 289/504 -> w = (101/630) / (289/504) = 404/1445
    model = ToyScore([[0.5, -1.0], [0.25, 0.1]])
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(GradCAMPlusPlus(layer="feat")(model, a, 0), a * 404 / 1445)
    torch.testing.assert_close(GradCAMPlusPlus(layer="feat", alpha_normalization="all")(model, a, 0), a * 404 / 1445)
    with pytest.raises(ValueError, match=r"GradCAMPlusPlus: unknown alpha_normalization 'pos'.*'positive'"):
        GradCAMPlusPlus(alpha_normalization="pos")


def test_gradcam_plus_plus_zero_denominator_guard():
    # A = [[-1, -2], [-2, -3]] (sum -8), g = [[0.25, 0.5], [0, 0]]
    # g = 0.25: 2 g^2 + (-8) g^3 = 0.125 - 0.125 = 0 -> denominator 1 -> alpha = g^2 = 0.0625
    # g = 0.5: 0.25 / (0.5 - 1) = -0.5
    # un-normalised w = 0.0625 * 0.25 - 0.5 * 0.5 = -0.234375 ; normalised: / (0.0625 - 0.5) -> 15/28
    model = ToyScore([[0.25, 0.5], [0.0, 0.0]])
    a = torch.tensor([[-1.0, -2.0], [-2.0, -3.0]]).view(1, 1, 2, 2)
    got_raw = GradCAMPlusPlus(layer="feat", relu=False, normalize_alpha=False)(model, a, 0)
    torch.testing.assert_close(got_raw, a * -0.234375)
    got = GradCAMPlusPlus(layer="feat", relu=False, alpha_normalization="positive")(model, a, 0)
    torch.testing.assert_close(got, a * 15 / 28)
    assert torch.isfinite(got).all()


def test_gradcam_plus_plus_and_layercam_reduce_to_gradcam_on_gap_with_positive_weights(gap_cnn):
    with torch.no_grad():
        gap_cnn.head.weight.abs_()
    x = _x(seed=7)
    grad = GradCAM(layer="features")(gap_cnn, x, 3)
    layer = LayerCAM(layer="features")(gap_cnn, x, 3)
    plus = GradCAMPlusPlus(layer="features")(gap_cnn, x, 3)
    cam = CAM(layer="features", relu=True)(gap_cnn, x, 3)
    torch.testing.assert_close(grad, cam / 64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer, grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plus, grad, rtol=1e-4, atol=1e-6)
    # without the normalisation: alpha = 1 / (2 + (W/Z) S_k), w_k = W / (2 + W S_k / Z)  (Z = 64)
    raw = GradCAMPlusPlus(layer="features", normalize_alpha=False)(gap_cnn, x, 3)
    a, _ = _gap_reference(gap_cnn, x, 3, "features")
    w = gap_cnn.head.weight[3].double().view(1, -1, 1, 1)
    expected = ((w / (2 + w * a.sum(dim=(2, 3), keepdim=True) / 64)) * a).sum(1).clamp_min(0)
    torch.testing.assert_close(raw[:, 0].double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(raw, plus, rtol=1e-2)


# --------------------------------------------------------------------------------------------- Score-CAM


def _scorecam_reference(model, x, target, layer, weighting="softmax", baseline=False, max_channels=None):
    """One sample, one channel, one forward at a time (float64)."""
    m = copy.deepcopy(model).double().eval()
    x = x.double()
    store = {}
    handle = dict(m.named_modules())[layer].register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    with torch.no_grad():
        out = m(x)
        handle.remove()
        acts = store["a"]
        result = []
        for b in range(x.shape[0]):
            t = target if isinstance(target, int) or callable(target) else int(target[b])
            channels = range(acts.shape[1])
            if max_channels is not None:
                channels = acts[b].mean(dim=(1, 2)).topk(max_channels).indices.tolist()

            def score(inp, t=t):
                o = m(inp)
                return float(t(o)[0]) if callable(t) else float(o.softmax(1)[0, t])

            s, maps = [], []
            for k in channels:
                up = F.interpolate(acts[b : b + 1, k : k + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
                lo, hi = up.min(), up.max()
                mask = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
                s.append(score(x[b : b + 1] * mask))
                maps.append(acts[b, k])
            s = torch.tensor(s, dtype=torch.float64)
            if baseline:
                s = s - score(torch.zeros_like(x[b : b + 1]))
            w = s.softmax(0) if weighting == "softmax" else s
            cam = sum(wk * mk for wk, mk in zip(w, maps)).clamp_min(0)
            result.append(F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False))
    assert out.shape[0] == x.shape[0]
    return torch.cat(result)


@pytest.mark.parametrize(
    ("kwargs", "target"),
    [
        ({}, 1),
        ({}, torch.tensor([2, 0])),
        ({"weighting": "score"}, 1),
        ({"weighting": "score", "baseline_subtract": True}, 3),
        ({"max_channels": 3}, 1),
        ({}, lambda y: y[:, 1] - y[:, 0]),
    ],
)
def test_scorecam_matches_a_one_at_a_time_reference(gap_cnn, kwargs, target):
    x = _x(seed=2)
    got = ScoreCAM(layer="features.2", batch_size=5, **kwargs)(gap_cnn, x, target)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "baseline_subtract"}
    ref = _scorecam_reference(
        gap_cnn, x, target, "features.2", baseline=kwargs.get("baseline_subtract", False), **ref_kwargs
    )
    assert got.shape == (2, 1, 8, 8)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0


def test_scorecam_chunking_invariance_and_forward_size_bound(gap_cnn):
    x = _x(seed=3)
    seen: list[int] = []
    handle = gap_cnn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        results = {}
        for bs in (1, 5, 1000):
            seen.clear()
            results[bs] = ScoreCAM(layer="features.2", batch_size=bs)(gap_cnn, x, 1)
            assert max(seen) <= bs, (bs, seen)
            # 2 samples for the activation + 2 x 8 masked inputs, nothing evaluated twice
            assert sum(seen) == 2 + 2 * 8
            if bs == 5:
                assert seen == [2, 5, 5, 5, 1]
    finally:
        handle.remove()
    torch.testing.assert_close(results[1], results[5], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[1], results[1000], rtol=1e-5, atol=1e-7)


def test_scorecam_max_channels_bounds_cost(gap_cnn):
    seen: list[int] = []
    handle = gap_cnn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        ScoreCAM(layer="features", batch_size=64, max_channels=3)(gap_cnn, _x(), 0)
    finally:
        handle.remove()
    assert seen == [2, 2 * 3]


@pytest.mark.parametrize(
    "method",
    [
        GradCAM(layer="features"),
        GradCAMPlusPlus(layer="features"),
        LayerCAM(layer="features"),
        ScoreCAM(layer="features", batch_size=6),
        ScoreCAM(layer="features", batch_size=6, weighting="score", baseline_subtract=True),
    ],
    ids=lambda m: repr(m)[:40],
)
def test_map_peaks_in_the_only_region_the_score_depends_on(method):
    model = RegionModel().eval()
    x = 1 + 0.1 * torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cam = method(model, x, 0)
    assert cam.shape == (2, 1, 16, 16)
    for b in range(2):
        row, col = divmod(int(cam[b, 0].argmax()), 16)
        assert 4 <= row < 8 and 8 <= col < 12, (b, row, col)
        assert cam[b, 0, 4:8, 8:12].mean() > cam[b, 0].mean()


# --------------------------------------------------------------------------------------------- traps


def test_inplace_relu_after_the_layer_does_not_corrupt_the_activation():
    x = _x(seed=4)
    inplace, plain = ConvReLU(inplace=True).eval(), ConvReLU(inplace=False).eval()
    with torch.no_grad():
        assert (plain.conv(x) < 0).any(), "the trap needs negative pre-ReLU activations to bite"
    for method in (GradCAM(layer="conv", relu=False), LayerCAM(layer="conv", relu=False), ScoreCAM(layer="conv")):
        torch.testing.assert_close(method(inplace, x, 2), method(plain, x, 2), msg=repr(method))
    # the signed map really contains negative values, which an in-place ReLU on the captured tensor would erase
    assert (GradCAM(layer="conv", relu=False)(inplace, x, 2) < 0).any()


@pytest.mark.parametrize("name", list(ALL))
def test_resnet18_named_reused_and_default_layers(resnet18, name):
    x = _x(1, 3, 64, seed=6)
    maps = {}
    for layer in ("layer4", "layer4.1.relu", None):
        method = ALL[name](layer)
        if name == "scorecam":
            method = ScoreCAM(layer=layer, batch_size=8, max_channels=4)
        maps[layer] = method(resnet18, x, 1)
        assert maps[layer].shape == (1, 1, 64, 64)
        assert torch.isfinite(maps[layer]).all()
    # the shared relu's last call is the block output, i.e. layer4's output; the default layer is layer4
    torch.testing.assert_close(maps["layer4"], maps["layer4.1.relu"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["layer4"], maps[None], rtol=1e-5, atol=1e-6)


def test_gradcam_layer_given_as_module_and_per_sample_and_callable_targets(gap_cnn):
    x = _x()
    by_name = GradCAM(layer="features", relu=False)(gap_cnn, x, torch.tensor([1, 3]))
    by_module = GradCAM(layer=gap_cnn.features, relu=False)(gap_cnn, x, torch.tensor([1, 3]))
    torch.testing.assert_close(by_name, by_module)
    one = GradCAM(layer="features", relu=False)(gap_cnn, x[:1], 1)
    two = GradCAM(layer="features", relu=False)(gap_cnn, x[1:], 3)
    torch.testing.assert_close(by_name, torch.cat([one, two]), rtol=1e-5, atol=1e-7)
    # gradients are linear in the score: Grad-CAM(y1 - y0) = Grad-CAM(y1) - Grad-CAM(y0) without the ReLU
    diff = GradCAM(layer="features", relu=False)(gap_cnn, x, lambda y: y[:, 1] - y[:, 0])
    a = GradCAM(layer="features", relu=False)(gap_cnn, x, 1)
    b = GradCAM(layer="features", relu=False)(gap_cnn, x, 0)
    torch.testing.assert_close(diff, a - b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", list(ALL))
def test_no_side_effects_also_when_raising(name):
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x = _x()
    method = ALL[name]("features")
    out = method(model, x, 1)
    assert out.shape == (2, 1, 8, 8) and not out.requires_grad
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"):
        method(model, x, 9)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"feature map \[B, K, h, w\]"):
        ALL[name]("head")(model, x, 1)
    assert_unchanged(model, before)
    if name != "cam":
        with pytest.raises(ValueError, match="callable target must return"):
            method(model, x, lambda y: y)
        assert_unchanged(model, before)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed (BatchNorm ran in train mode?)"


@pytest.mark.parametrize("name", list(ALL))
def test_same_result_under_no_grad_and_inference_mode(gap_cnn, name):
    x = _x()
    method = ALL[name]("features")
    plain = method(gap_cnn, x, 2)
    with torch.no_grad():
        under_no_grad = method(gap_cnn, x, 2)
    with torch.inference_mode():
        under_inference = method(gap_cnn, x, 2)
    assert torch.equal(plain, under_no_grad)
    assert torch.equal(plain, under_inference)
    assert plain.abs().sum() > 0


def test_registry_names():
    expected = {
        "cam": CAM,
        "gradcam": GradCAM,
        "gradcam_plus_plus": GradCAMPlusPlus,
        "layercam": LayerCAM,
        "scorecam": ScoreCAM,
    }
    for key, cls in expected.items():
        assert ATTRIBUTORS[key] is cls
        assert type(build_attributor(key)) is cls
    built = build_attributor({"name": "scorecam", "layer": "layer4", "batch_size": 4, "max_channels": 16})
    assert (built.layer, built.batch_size, built.max_channels) == ("layer4", 4, 16)
    assert build_attributor("gradcam-plus-plus").normalize_alpha is True


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(ALL))
def test_bad_inputs_raise_clear_errors(gap_cnn, name):
    x = _x()
    with pytest.raises(ValueError, match=r"'featurs' not found.*close matches.*'features'"):
        ALL[name]("featurs")(gap_cnn, x, 0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ALL[name]("features")(gap_cnn, torch.randn(2, 3, 8), 0)
    with pytest.raises(ValueError, match="out of range"):
        ALL[name]("features")(gap_cnn, x, 4)
    with pytest.raises(ValueError, match="out of range"):
        ALL[name]("features")(gap_cnn, x, torch.tensor([0, 5]))
    mismatch = Mismatch().eval()
    with pytest.raises(ValueError, match="'unused' was not called"):
        ALL[name]("unused")(mismatch, x, 0)
    with pytest.raises(ValueError, match=r"feature map \[B, K, h, w\].*'head' returns shape \[2, 4\]"):
        ALL[name]("head")(gap_cnn, x, 0)


def test_cam_specific_errors(gap_cnn):
    x = _x()
    mismatch = Mismatch().eval()
    with pytest.raises(ValueError, match=r"in_features=6 but layer 'conv1' has 4 channels"):
        CAM(layer="conv1")(mismatch, x, 0)
    CAM(layer="conv2")(mismatch, x, 0)  # the matching layer works
    with pytest.raises(TypeError, match="callable target"):
        CAM(layer="features")(gap_cnn, x, lambda y: y[:, 0])
    with pytest.raises(ValueError, match="must be an nn.Linear"):
        CAM(layer="features", head="features")(gap_cnn, x, 0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        CAM(layer="conv")(NoLinear().eval(), x, 0)
    with pytest.raises(ValueError, match="'hed' not found"):
        CAM(layer="features", head="hed")(gap_cnn, x, 0)


def test_gradient_methods_reject_a_layer_the_score_does_not_depend_on():
    model = Mismatch().eval()

    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            self.inner.unused(self.inner.conv2(torch.relu(self.inner.conv1(x))))  # computed, not used
            return self.inner(x)

    wrapped = Detached().eval()
    for method in (
        GradCAM(layer="inner.unused"),
        GradCAMPlusPlus(layer="inner.unused"),
        LayerCAM(layer="inner.unused"),
    ):
        with pytest.raises(ValueError, match="does not depend on layer 'inner.unused'"):
            method(wrapped, _x(), 0)


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: GradCAM(relu=1), TypeError, "relu must be a bool"),
        (lambda: CAM(relu="yes"), TypeError, "relu must be a bool"),
        (lambda: ScoreCAM(relu=None), TypeError, "relu must be a bool"),
        (lambda: GradCAMPlusPlus(normalize_alpha=0), TypeError, "normalize_alpha must be a bool"),
        (lambda: LayerCAM(layer=3), TypeError, "layer must be a dotted module name"),
        (lambda: GradCAM(layer=""), ValueError, "non-empty"),
        (lambda: CAM(head=1.5), TypeError, "head must be"),
        (lambda: ScoreCAM(batch_size=0), ValueError, "batch_size must be an integer >= 1, got 0"),
        (lambda: ScoreCAM(batch_size=2.5), ValueError, "batch_size"),
        (lambda: ScoreCAM(max_channels=0), ValueError, "max_channels must be an integer >= 1"),
        (lambda: ScoreCAM(weighting="max"), ValueError, r"unknown weighting 'max'; valid values: .*'score'"),
        (lambda: ScoreCAM(baseline_subtract=True), ValueError, "shift invariant"),
        (lambda: ScoreCAM(weighting="score", baseline_subtract=1), TypeError, "baseline_subtract must be a bool"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(factory, error, match):
    with pytest.raises(error, match=match):
        factory()
