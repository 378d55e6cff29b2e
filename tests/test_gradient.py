"""Tests of the gradient family: closed forms on linear and polynomial models, completeness of IG against an
independent quadrature, chunking, the no-side-effect contract, autograd contexts and input validation."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import GapCNN, LinearModel, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.base import build_attributor
from lightning_xai.attribution.gradient import InputXGradient, IntegratedGradients, Saliency, SmoothGrad

# ---------------------------------------------------------------------------------------------------------------
# small models
# ---------------------------------------------------------------------------------------------------------------


class SmoothCNN(nn.Module):
    """conv -> Softplus -> strided conv -> Tanh -> linear: smooth, so IG converges fast."""

    def __init__(self, num_classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.Softplus()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.act2 = nn.Tanh()
        self.head = nn.Linear(6 * 4 * 4, num_classes)
        with torch.no_grad():  # steeper layers: the path integrand of IG is far from linear
            self.conv1.weight.mul_(3.0)
            self.conv2.weight.mul_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(h.flatten(1))


class PolyModel(nn.Module):
    """``y = [sum(x**2), sum(x**3), sum(x**2) / 2]`` over all features: IG and gradients in closed form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)
        return torch.stack([f.square().sum(1), f.pow(3).sum(1), f.square().sum(1) / 2], dim=1)


class DetachedModel(nn.Module):
    """Output depends on parameters only: there is no gradient path to the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.detach().flatten(1))


class InplaceNormModel(LinearModel):
    """Normalises its input in place before a linear layer (a pattern found in the wild)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5).mul_(2.0)
        return self.fc(x.flatten(1))


def _inputs(batch: int = 2, shape: tuple[int, ...] = (3, 8, 8), seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


#: every method of the family, configured small; ids for parametrize
METHODS = {
    "saliency_abs": lambda: Saliency(),
    "saliency_squared": lambda: Saliency(mode="squared"),
    "saliency_signed": lambda: Saliency(mode="signed"),
    "input_x_gradient": lambda: InputXGradient(),
    "ig_trapezoid": lambda: IntegratedGradients(steps=5, batch_size=4),
    "ig_gauss_blur": lambda: IntegratedGradients(baseline="blur", blur_sigma=1.0, steps=3, method="gauss_legendre"),
    "smoothgrad": lambda: SmoothGrad(samples=3, batch_size=4),
    "smoothgrad_sq_ig": lambda: SmoothGrad(base=IntegratedGradients(steps=3), samples=2, squared=True),
}


# ---------------------------------------------------------------------------------------------------------------
# closed forms on a linear model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("abs", torch.abs), ("signed", lambda w: w), ("squared", torch.square)])
def test_saliency_linear_is_weight_exactly(linear_model, mode, expected):
    x = _inputs()
    result = Saliency(mode=mode)(linear_model, x, 2)
    want = expected(linear_model.weight_map(2)).expand_as(x)
    assert result.shape == x.shape
    assert torch.equal(result, want)


def test_saliency_default_is_abs_and_differs_from_signed(linear_model):
    x = _inputs()
    assert torch.equal(Saliency()(linear_model, x, 0), Saliency(mode="abs")(linear_model, x, 0))
    assert (Saliency(mode="signed")(linear_model, x, 0) < 0).any()


def test_input_x_gradient_linear_per_sample_targets(linear_model):
    x = _inputs(3)
    target = torch.tensor([0, 3, 1])
    result = InputXGradient()(linear_model, x, target)
    want = torch.stack([x[i] * linear_model.weight_map(int(t)) for i, t in enumerate(target)])
    torch.testing.assert_close(result, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gauss_legendre"])
@pytest.mark.parametrize("baseline", ["zeros", 0.3, "tensor_chw", "tensor_bchw"])
def test_ig_linear_is_delta_times_weight(linear_model, method, baseline):
    x = _inputs(2)
    g = torch.Generator().manual_seed(5)
    if baseline == "tensor_chw":
        baseline = torch.randn(3, 8, 8, generator=g)
        x0 = baseline.expand_as(x)
    elif baseline == "tensor_bchw":
        baseline = torch.randn(2, 3, 8, 8, generator=g)
        x0 = baseline
    elif baseline == "zeros":
        x0 = torch.zeros_like(x)
    else:
        x0 = torch.full_like(x, baseline)
    target = torch.tensor([1, 3])  # different classes per sample
    result = IntegratedGradients(baseline=baseline, steps=7, method=method, batch_size=5)(linear_model, x, target)
    want = torch.stack([(x[i] - x0[i]) * linear_model.weight_map(int(t)) for i, t in enumerate(target)])
    torch.testing.assert_close(result, want, rtol=1e-5, atol=1e-5)


def test_ig_blur_baseline_matches_scipy(linear_model):
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _inputs(2)
    for sigma in (0.8, 4.0):  # 4.0: the kernel radius (12) exceeds the 8x8 image
        result = IntegratedGradients(baseline="blur", blur_sigma=sigma, steps=3)(linear_model, x, 1)
        blurred = torch.from_numpy(
            ndimage.gaussian_filter(x.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
        ).float()
        want = (x - blurred) * linear_model.weight_map(1)
        torch.testing.assert_close(result, want, rtol=1e-4, atol=1e-5)


def test_make_baseline_shapes():
    x = _inputs(2)
    assert torch.equal(IntegratedGradients(baseline=-1.5).make_baseline(x), torch.full_like(x, -1.5))
    blurred = IntegratedGradients(baseline="blur", blur_sigma=100.0).make_baseline(x)
    # an enormous blur flattens each channel towards a constant
    assert blurred.shape == x.shape and blurred.flatten(2).std(2).max() < 0.1 * x.flatten(2).std(2).min()


def test_smoothgrad_linear_is_gradient(linear_model):
    x = _inputs(2)
    sg = SmoothGrad(samples=5, noise=0.5, batch_size=3)(linear_model, x, torch.tensor([2, 0]))
    want = torch.stack([linear_model.weight_map(2), linear_model.weight_map(0)])
    torch.testing.assert_close(sg, want, rtol=1e-5, atol=1e-6)
    sq = SmoothGrad(samples=5, noise=0.5, squared=True)(linear_model, x, 3)
    torch.testing.assert_close(sq, linear_model.weight_map(3).square().expand_as(x), rtol=1e-5, atol=1e-6)


def test_tabular_inputs():
    model = LinearModel(in_shape=(5,), num_classes=3).eval()
    x = _inputs(4, (5,))
    w = model.weight_map(1)
    torch.testing.assert_close(Saliency(mode="signed")(model, x, 1), w.expand_as(x), rtol=0, atol=0)
    torch.testing.assert_close(InputXGradient()(model, x, 1), x * w)
    torch.testing.assert_close(IntegratedGradients(baseline=1.0, steps=4)(model, x, 1), (x - 1.0) * w)
    torch.testing.assert_close(SmoothGrad(samples=3)(model, x, 1), w.expand_as(x))
    with pytest.raises(ValueError, match=r"'blur' baseline needs image batches \[B, C, H, W\], got shape \[4, 5\]"):
        IntegratedGradients(baseline="blur")(model, x, 1)


def test_inplace_input_normalisation_in_forward():
    model = InplaceNormModel().eval()
    x = _inputs(2)
    x_before = x.clone()
    torch.testing.assert_close(Saliency(mode="signed")(model, x, 1), 2.0 * model.weight_map(1).expand_as(x))
    ig = IntegratedGradients(steps=4)(model, x, 1)  # F(x) = 2 w.(x - 0.5) + b, baseline 0: IG = 2 w x
    torch.testing.assert_close(ig, 2.0 * x * model.weight_map(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before)


# ---------------------------------------------------------------------------------------------------------------
# closed forms of the quadrature on polynomial models
# ---------------------------------------------------------------------------------------------------------------


def test_ig_quadratic_exact_for_every_rule():
    x = _inputs(2).double()
    for method in ("riemann_trapezoid", "gauss_legendre"):
        for steps in (1, 2, 5):
            result = IntegratedGradients(steps=steps, method=method)(PolyModel(), x, 0)
            torch.testing.assert_close(result, x.square(), rtol=1e-12, atol=1e-12)


def test_ig_cubic_quadrature_errors_in_closed_form():
    """For s = sum x**3 and a zero baseline, d s / d x_i on the path is 3 a**2 x_i**2, so IG_i = x_i**3 * Q
    where Q is the rule applied to 3 a**2 on [0, 1]: Gauss-Legendre with >= 2 nodes is exact, the trapezoid rule
    with spacing h gives 1 + h**2 / 2 (Euler-Maclaurin), the midpoint rule (steps=1) gives 3/4."""
    x = _inputs(2).double()
    model = PolyModel()
    gl = IntegratedGradients(steps=2, method="gauss_legendre")(model, x, 1)
    torch.testing.assert_close(gl, x.pow(3), rtol=1e-12, atol=1e-12)
    trap = IntegratedGradients(steps=5, method="riemann_trapezoid")(model, x, 1)
    torch.testing.assert_close(trap, x.pow(3) * (1 + 0.25**2 / 2), rtol=1e-12, atol=1e-12)
    mid = IntegratedGradients(steps=1)(model, x, 1)
    torch.testing.assert_close(mid, x.pow(3) * 0.75, rtol=1e-12, atol=1e-12)
    gl1 = IntegratedGradients(steps=1, method="gauss_legendre")(model, x, 1)  # one node: the midpoint
    torch.testing.assert_close(gl1, x.pow(3) * 0.75, rtol=1e-12, atol=1e-12)


def test_quadrature_nodes_and_weights():
    for method in ("riemann_trapezoid", "gauss_legendre"):
        for steps in (1, 2, 9):
            alphas, weights = IntegratedGradients(steps=steps, method=method).quadrature()
            assert alphas.shape == weights.shape == (steps,)
            assert float(alphas.min()) >= 0 and float(alphas.max()) <= 1
            torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    alphas, weights = IntegratedGradients(steps=3).quadrature()
    torch.testing.assert_close(alphas, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# completeness on a smooth CNN
# ---------------------------------------------------------------------------------------------------------------


def _reference_ig(model: nn.Module, x: torch.Tensor, x0: torch.Tensor, target: int, intervals: int = 64):
    """IG by composite Simpson's rule in float64, one path point at a time (independent of the implementation)."""
    model = copy.deepcopy(model).double().eval()
    x, x0 = x.double(), x0.double()
    h = 1.0 / intervals
    total = torch.zeros_like(x)
    for i in range(intervals + 1):
        coeff = 1 if i in (0, intervals) else (4 if i % 2 else 2)
        point = (x0 + (i * h) * (x - x0)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(point)[:, target].sum(), point)
        total += coeff * grad
    return ((x - x0) * total * h / 3).float()


def test_ig_completeness_and_gap_smooth_cnn():
    model = SmoothCNN().eval()
    x = 3.0 * _inputs(3)
    with torch.no_grad():
        delta_f = model(x)[:, 2] - model(torch.zeros_like(x))[:, 2]
    assert delta_f.abs().min() > 0.05  # the test is meaningful only if F(x) and F(x') differ
    reference = _reference_ig(model, x, torch.zeros_like(x), 2)

    for method, steps in (("riemann_trapezoid", 64), ("gauss_legendre", 8)):
        ig = IntegratedGradients(steps=steps, method=method, batch_size=50)
        attributions, gap = ig.attribute_with_gap(model, x, 2)
        assert gap.shape == (3,)
        # the gap as defined, computed independently
        independent_gap = attributions.flatten(1).sum(1) - delta_f
        torch.testing.assert_close(gap, independent_gap, rtol=1e-4, atol=1e-5)
        assert (gap.abs() <= 0.01 * delta_f.abs()).all(), (method, gap, delta_f)
        # the plain call returns the same attributions, and both agree with the Simpson reference
        torch.testing.assert_close(ig(model, x, 2), attributions)
        torch.testing.assert_close(attributions, reference, rtol=0, atol=3e-3 * float(reference.abs().max()))

    # the bound is not vacuous: too few points miss it on this model
    for method, steps in (("riemann_trapezoid", 8), ("gauss_legendre", 4)):
        _, coarse_gap = IntegratedGradients(steps=steps, method=method).attribute_with_gap(model, x, 2)
        assert (coarse_gap.abs() > 0.01 * delta_f.abs()).any(), (method, steps)


def test_ig_callable_target_is_linear():
    model = SmoothCNN().eval()
    x = _inputs(2)
    ig = IntegratedGradients(steps=6, batch_size=5)
    contrast = ig(model, x, lambda y: y[:, 1] - y[:, 2])
    torch.testing.assert_close(contrast, ig(model, x, 1) - ig(model, x, 2), rtol=1e-5, atol=1e-6)
    assert contrast.abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------------------------------


class _BatchCounter:
    """Forward pre-hook recording the batch size of every model call; removed by the test."""

    def __init__(self, model: nn.Module) -> None:
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda _m, args: self.sizes.append(args[0].shape[0]))

    def close(self) -> None:
        self.handle.remove()


def test_ig_chunking_is_exact_and_bounded():
    model = SmoothCNN().eval()
    x = _inputs(3)
    target = torch.tensor([0, 2, 1])
    results = {}
    for batch_size in (1, 7, 1000):
        counter = _BatchCounter(model)
        try:
            results[batch_size] = IntegratedGradients(steps=5, batch_size=batch_size)(model, x, target)
        finally:
            counter.close()
        assert max(counter.sizes) <= batch_size
        assert sum(counter.sizes) == 3 * 5  # every path point evaluated once
        assert len(counter.sizes) == -(-15 // batch_size)
    torch.testing.assert_close(results[1], results[7])
    torch.testing.assert_close(results[1], results[1000])

    counter = _BatchCounter(model)
    try:
        IntegratedGradients(steps=5, batch_size=4).attribute_with_gap(model, x, target)
    finally:
        counter.close()
    assert max(counter.sizes) <= 4 and sum(counter.sizes) == 15 + 2 * 3


def test_smoothgrad_chunking_is_exact_and_bounded():
    model = SmoothCNN().eval()
    x = _inputs(3)
    target = torch.tensor([3, 0, 1])
    results = {}
    for batch_size in (1, 5, 1000):
        counter = _BatchCounter(model)
        try:
            results[batch_size] = SmoothGrad(samples=4, batch_size=batch_size)(model, x, target)
        finally:
            counter.close()
        assert max(counter.sizes) <= batch_size
        assert sum(counter.sizes) == 3 * 4
    torch.testing.assert_close(results[1], results[5])
    torch.testing.assert_close(results[1], results[1000])


# ---------------------------------------------------------------------------------------------------------------
# SmoothGrad specifics
# ---------------------------------------------------------------------------------------------------------------


def test_smoothgrad_without_noise_is_base():
    model = SmoothCNN().eval()
    x = _inputs(2)
    torch.testing.assert_close(
        SmoothGrad(noise=0.0, samples=3)(model, x, 1), Saliency(mode="signed")(model, x, 1), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        SmoothGrad(base="input_x_gradient", noise=0.0, samples=2, squared=True)(model, x, 1),
        InputXGradient()(model, x, 1).square(),
    )


def test_smoothgrad_seed_reproducible_and_global_rng_untouched():
    model = SmoothCNN().eval()
    x = _inputs(2)
    rng = torch.random.get_rng_state()
    a = SmoothGrad(samples=3, seed=7)(model, x, 1)
    b = SmoothGrad(samples=3, seed=7)(model, x, 1)
    c = SmoothGrad(samples=3, seed=8)(model, x, 1)
    d = SmoothGrad(samples=3, seed=None)(model, x, 1)
    e = SmoothGrad(samples=3, seed=None)(model, x, 1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(d, e)
    assert not torch.allclose(a, Saliency(mode="signed")(model, x, 1))  # the noise does change the gradient


def test_smoothgrad_noise_scale_is_fraction_of_each_range():
    """For s = sum(x**2) / 2 the gradient is the input itself, so SG(x) - x is the mean of the noise: per sample
    N(0, sigma_b**2 / n) with sigma_b = noise * (max(x_b) - min(x_b))."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    x[1] = 10 * x[1] - 4  # range about 10 instead of 1
    samples, noise = 16, 0.2
    mean_noise = SmoothGrad(samples=samples, noise=noise)(PolyModel(), x, 2) - x
    ranges = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    expected_std = noise * ranges / samples**0.5
    measured_std = mean_noise.flatten(1).std(1)
    torch.testing.assert_close(measured_std, expected_std, rtol=0.1, atol=0)
    assert (mean_noise.flatten(1).mean(1).abs() < 4 * expected_std / 768**0.5).all()


def test_smoothgrad_base_by_name_and_dict(linear_model):
    x = _inputs(2)
    by_name = SmoothGrad(base="saliency", samples=2)
    assert isinstance(by_name.base, Saliency) and by_name.base.mode == "abs"
    by_dict = SmoothGrad(base={"name": "integrated_gradients", "steps": 3}, samples=2, noise=0.0)
    assert isinstance(by_dict.base, IntegratedGradients) and by_dict.base.steps == 3
    torch.testing.assert_close(by_dict(linear_model, x, 1), x * linear_model.weight_map(1), rtol=1e-5, atol=1e-5)


def test_registry_builds_every_method():
    assert isinstance(build_attributor("saliency"), Saliency)
    assert isinstance(build_attributor("input_x_gradient"), InputXGradient)
    ig = build_attributor({"name": "integrated_gradients", "steps": 9, "method": "gauss_legendre"})
    assert isinstance(ig, IntegratedGradients) and ig.steps == 9 and ig.method == "gauss_legendre"
    sg = build_attributor({"name": "smoothgrad", "samples": 4, "squared": True})
    assert isinstance(sg, SmoothGrad) and sg.samples == 4 and sg.squared
    assert isinstance(sg.base, Saliency) and sg.base.mode == "signed"


# ---------------------------------------------------------------------------------------------------------------
# no side effects, real architectures, autograd contexts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", METHODS.values(), ids=METHODS.keys())
def test_no_side_effects_gap_cnn(make):
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    eval_copy = copy.deepcopy(model).eval()
    x = _inputs(2)
    before = snapshot(model)
    result = make()(model, x, torch.tensor([1, 2]))
    assert_unchanged(model, before)
    assert result.shape == x.shape and torch.isfinite(result).all()
    # explained in eval mode: same as on an eval-mode copy (dropout / batch statistics would differ)
    torch.testing.assert_close(result, make()(eval_copy, x, torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="out of range"):
        make()(model, x, 9)
    assert_unchanged(model, before)


def test_no_side_effects_attribute_with_gap():
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    attributions, gap = IntegratedGradients(steps=4).attribute_with_gap(model, _inputs(2), 0)
    assert_unchanged(model, before)
    assert attributions.shape == (2, 3, 8, 8) and gap.shape == (2,) and not gap.requires_grad
    with pytest.raises(ValueError, match="out of range"):
        IntegratedGradients(steps=4).attribute_with_gap(model, _inputs(2), 4)
    assert_unchanged(model, before)


@pytest.mark.parametrize("make", METHODS.values(), ids=METHODS.keys())
def test_resnet18_runs(resnet18, make):
    put_in_train_mode_with_grads(resnet18)
    before = snapshot(resnet18)
    x = _inputs(2, (3, 32, 32))
    result = make()(resnet18, x, 5)
    assert_unchanged(resnet18, before)
    assert result.shape == x.shape and torch.isfinite(result).all() and result.abs().sum() > 0
    assert not result.requires_grad


@pytest.mark.parametrize("make", METHODS.values(), ids=METHODS.keys())
def test_no_grad_and_inference_mode(make):
    model = SmoothCNN().eval()
    x = _inputs(2)
    target = torch.tensor([0, 3])
    plain = make()(model, x, target)
    with torch.no_grad():
        under_no_grad = make()(model, x, target)
    with torch.inference_mode():
        x_inf, target_inf = x.clone(), target.clone()
        assert x_inf.is_inference()
        under_inference = make()(model, x_inf, target_inf)
    torch.testing.assert_close(under_no_grad, plain, rtol=0, atol=0)
    torch.testing.assert_close(under_inference, plain, rtol=0, atol=0)


def test_attribute_with_gap_under_inference_mode():
    model = SmoothCNN().eval()
    x = _inputs(2)
    ig = IntegratedGradients(steps=4, baseline=torch.full((3, 8, 8), 0.1))
    plain = ig.attribute_with_gap(model, x, 1)
    with torch.inference_mode():
        result = ig.attribute_with_gap(model, x.clone(), 1)
    torch.testing.assert_close(result, plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: IntegratedGradients(steps=0), r"steps must be an integer >= 1, got 0"),
        (lambda: IntegratedGradients(steps=2.5), r"steps must be an integer >= 1, got 2.5"),
        (lambda: IntegratedGradients(baseline="black"), r"unknown baseline 'black'; valid values: \['zeros', 'blur'\]"),
        (lambda: IntegratedGradients(baseline=float("nan")), r"unknown baseline nan"),
        (lambda: IntegratedGradients(method="simpson"), r"unknown method 'simpson'.*riemann_trapezoid.*gauss_legendre"),
        (lambda: IntegratedGradients(batch_size=0), r"batch_size must be an integer >= 1"),
        (lambda: IntegratedGradients(baseline="blur", blur_sigma=0), r"blur_sigma must be .*> 0.0, got 0"),
        (lambda: Saliency(mode="max"), r"unknown mode 'max'; valid values: \['abs', 'squared', 'signed'\]"),
        (lambda: SmoothGrad(noise=-0.1), r"noise must be .*>= 0.0, got -0.1"),
        (lambda: SmoothGrad(samples=0), r"samples must be an integer >= 1, got 0"),
        (lambda: SmoothGrad(seed=-1), r"seed must be .*integer.* or None"),
        (lambda: SmoothGrad(base="saliancy"), r"unknown attributor 'saliancy'.*saliency"),
    ],
)
def test_bad_hyper_parameters_raise_in_constructor(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="baseline tensor must be floating point"):
        IntegratedGradients(baseline=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="squared must be a bool"):
        SmoothGrad(squared="yes")


def test_baseline_tensor_of_wrong_shape(linear_model):
    ig = IntegratedGradients(baseline=torch.zeros(2, 8, 8))
    with pytest.raises(
        ValueError, match=r"baseline tensor of shape \[2, 8, 8\] does not broadcast to .*\[2, 3, 8, 8\]"
    ):
        ig(linear_model, _inputs(2), 0)


@pytest.mark.parametrize("make", METHODS.values(), ids=METHODS.keys())
def test_target_out_of_range_and_no_gradient_path(linear_model, make):
    x = _inputs(2)
    with pytest.raises(ValueError, match=r"target class 4 is out of range.*valid targets 0..3"):
        make()(linear_model, x, 4)
    with pytest.raises(ValueError, match=r"target class -1 is out of range"):
        make()(linear_model, x, torch.tensor([0, -1]))
    model = DetachedModel()
    before = snapshot(model)
    with pytest.raises(ValueError, match="gradient path"):
        make()(model, x, 0)
    assert_unchanged(model, before)


def test_no_gradient_path_attribute_with_gap():
    with pytest.raises(ValueError, match="gradient path"):
        IntegratedGradients(steps=2).attribute_with_gap(DetachedModel(), _inputs(2), 0)
