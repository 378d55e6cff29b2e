"""Explanation metrics: hand-computed values, independent re-computations, invariants, chunking, no side
effects, bad input and DDP equivalence."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GapCNN, LinearModel, assert_unchanged, put_in_train_mode_with_grads, snapshot
from lightning_helpers import run_processes
from torch import Tensor, nn

from lightning_xai.attribution.base import Attributor, input_gradient, select_scores
from lightning_xai.evaluation import (
    AOPC,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    MaskIoU,
    MaxSensitivity,
    PointingGame,
    RelevanceMass,
    RelevanceRank,
    Sparseness,
    aopc,
    deletion_auc,
    deletion_curve,
    gaussian_blur,
    gini_index,
    hog_features,
    hog_pearson,
    infidelity,
    insertion_auc,
    insertion_curve,
    mask_iou,
    max_sensitivity,
    otsu_threshold,
    pointing_game,
    region_perturbation_curve,
    relevance_mass,
    relevance_rank,
    sparseness,
    ssim,
)

# ----------------------------------------------------------------------------------------------------------------
# Test models and attributors
# ----------------------------------------------------------------------------------------------------------------


class Gradient(Attributor):
    """Plain input gradient, channels kept (a test-local attributor: not registered)."""

    def attribute(self, model: nn.Module, inputs: Tensor, target) -> Tensor:
        return input_gradient(select_scores(model(inputs), target), inputs)


class ConstantModel(nn.Module):
    """Ignores its input: the same logits for every image."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.3, -1.0, 2.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class CountingModel(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.inner(x)


def four_pixel_model(weights=(4.0, 3.0, 2.0, 1.0)) -> LinearModel:
    """Logit 0 = w . x on a 1x2x2 image, logit 1 = 0."""
    model = LinearModel((1, 2, 2), 2).eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([list(weights), [0.0] * 4]))
        model.fc.bias.zero_()
    return model


def trapezoid(xs: list[float], ys: list[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ----------------------------------------------------------------------------------------------------------------
# Deletion / insertion
# ----------------------------------------------------------------------------------------------------------------


def test_deletion_curve_and_auc_by_hand():
    model, x = four_pixel_model(), torch.ones(1, 1, 2, 2)
    attr = torch.tensor([4.0, 3.0, 2.0, 1.0]).view(1, 1, 2, 2)
    fractions, scores = deletion_curve(attr, x, model, 0, steps=4, softmax=False)
    assert fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert scores.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]  # 4, then 3, then 2, then 1 removed
    assert deletion_auc(attr, x, model, 0, step=1, softmax=False).item() == pytest.approx(3.75)
    # reversed relevance removes the smallest weight first: curve 10, 9, 7, 4, 0
    auc = deletion_auc(attr.flip(-1).flip(-2), x, model, 0, steps=4, softmax=False)
    assert auc.item() == pytest.approx(trapezoid([0, 0.25, 0.5, 0.75, 1], [10, 9, 7, 4, 0]))
    # baseline other than zero: deleted pixels become 0.5
    _, half = deletion_curve(attr, x, model, 0, steps=4, softmax=False, baseline=0.5)
    assert half.tolist() == [[10.0, 8.0, 6.5, 5.5, 5.0]]


def test_deletion_auc_softmax_probability_by_hand():
    model, x = four_pixel_model(), torch.ones(1, 1, 2, 2)
    attr = torch.tensor([4.0, 3.0, 2.0, 1.0]).view(1, 1, 2, 2)
    metric = DeletionAUC(steps=4)
    metric.update(attr, x, model, 0)
    probs = [sigmoid(v) for v in (10, 6, 3, 1, 0)]  # softmax of [s, 0] = sigmoid(s)
    assert metric.compute().item() == pytest.approx(trapezoid([0, 0.25, 0.5, 0.75, 1], probs), abs=1e-6)
    xs, mean_curve = metric.curve()
    assert xs.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert mean_curve.tolist() == pytest.approx(probs, abs=1e-6)


def test_insertion_curve_by_hand_and_blur_start():
    model, x = four_pixel_model(), torch.ones(1, 1, 2, 2)
    attr = torch.tensor([4.0, 3.0, 2.0, 1.0]).view(1, 1, 2, 2)
    _, scores = insertion_curve(attr, x, model, 0, step=1, softmax=False, baseline=0.0)
    assert scores.tolist() == [[0.0, 4.0, 7.0, 9.0, 10.0]]
    assert insertion_auc(attr, x, model, 0, steps=4, softmax=False, baseline=0.0).item() == pytest.approx(6.25)
    # default start: the blurred image; the end: the original image
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=gen)
    cnn = GapCNN().eval()
    _, curve = insertion_curve(torch.rand(2, 1, 8, 8, generator=gen), images, cnn, 1, steps=4)
    with torch.no_grad():
        start = cnn(gaussian_blur(images, 5.0, 11)).softmax(1)[:, 1]
        end = cnn(images).softmax(1)[:, 1]
    torch.testing.assert_close(curve[:, 0], start)
    torch.testing.assert_close(curve[:, -1], end)


def test_step_grids():
    model, x = four_pixel_model(), torch.ones(1, 1, 2, 2)
    attr = torch.rand(1, 1, 2, 2)
    fractions, _ = deletion_curve(attr, x, model, 0, steps=3)
    assert fractions.tolist() == [0.0, 0.25, 0.75, 1.0]  # round(k * 4 / 3) = 0, 1, 3, 4
    fractions, _ = deletion_curve(attr, x, model, 0, step=3)
    assert fractions.tolist() == [0.0, 0.75, 1.0]  # 3 pixels per step, last step partial


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    images = torch.rand(2, 3, 9, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = gaussian_blur(images, sigma=2.0, kernel_size=7)
    ref = ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, 2.0, 2.0), mode="nearest", truncate=1.5)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 5, 5), 3.0)), torch.full((1, 1, 5, 5), 3.0))


def test_model_that_ignores_its_input_gives_flat_curves_and_zero_aopc():
    model, gen = ConstantModel(), torch.Generator().manual_seed(2)
    x, attr = torch.rand(3, 3, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    p = torch.softmax(model.logits.detach(), 0)[2].item()
    for fn in (deletion_curve, insertion_curve):
        _, scores = fn(attr, x, model, 2, steps=8)
        torch.testing.assert_close(scores, torch.full_like(scores, p))
    torch.testing.assert_close(deletion_auc(attr, x, model, 2), torch.full((3,), p))
    torch.testing.assert_close(insertion_auc(attr, x, model, 2), torch.full((3,), p))
    for order in ("morf", "lerf"):
        assert aopc(attr, x, model, 2, region_size=2, order=order).abs().max().item() < 1e-7
    assert infidelity(attr, x, model, 2, num_samples=8).abs().max().item() < 1e-10


def test_chunking_is_invariant_and_bounded():
    gen = torch.Generator().manual_seed(3)
    x, attr = torch.rand(3, 3, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    target = torch.tensor([0, 1, 3])
    for fn, kwargs, points in (
        (deletion_curve, {"steps": 8}, 9),
        (insertion_curve, {"steps": 8}, 9),
        (region_perturbation_curve, {"region_size": 4}, 5),
    ):
        small, large = CountingModel(GapCNN().eval()), CountingModel(GapCNN().eval())
        out_small = fn(attr, x, small, target, batch_size=5, **kwargs)
        out_large = fn(attr, x, large, target, batch_size=1000, **kwargs)
        out_small = out_small[1] if isinstance(out_small, tuple) else out_small
        out_large = out_large[1] if isinstance(out_large, tuple) else out_large
        torch.testing.assert_close(out_small, out_large, atol=1e-6, rtol=1e-5)
        assert max(small.sizes) <= 5 and sum(small.sizes) == 3 * points
        assert len(small.sizes) == math.ceil(3 * points / 5)  # chunks mix images and steps
        assert large.sizes == [3 * points]
    small, large = CountingModel(GapCNN().eval()), CountingModel(GapCNN().eval())
    inf_small = infidelity(attr, x, small, target, num_samples=6, batch_size=4)
    inf_large = infidelity(attr, x, large, target, num_samples=6, batch_size=64)
    torch.testing.assert_close(inf_small, inf_large, atol=1e-6, rtol=1e-4)
    assert max(small.sizes) <= 4 and sum(small.sizes) == 3 * 7


def test_aopc_by_hand_morf_and_lerf():
    # 1x4x4 linear model, 2x2 regions, replaced by 0: each region removes its weight sum from the score.
    model = LinearModel((1, 4, 4), 2).eval()
    w = torch.tensor([[3.0, -1.0, 0.5, 2.0], [1.0, 4.0, -2.0, 0.0], [-3.0, 1.0, 1.0, 1.0], [0.0, -1.0, 2.0, 6.0]])
    with torch.no_grad():
        model.fc.weight.copy_(torch.stack([w.flatten(), torch.zeros(16)]))
        model.fc.bias.zero_()
    x = torch.ones(1, 1, 4, 4)
    region_w = [w[i : i + 2, j : j + 2].sum().item() for i in (0, 2) for j in (0, 2)]
    assert region_w == [7.0, 0.5, -3.0, 10.0]  # distinct, so MoRF and LeRF orders differ
    attr = w.view(1, 1, 4, 4)  # relevance = weight, so region relevance = region weight sum
    for order, reverse in (("morf", True), ("lerf", False)):
        ranked = sorted(region_w, reverse=reverse)
        drops = [0.0, *np.cumsum(ranked).tolist()]  # f(x0) - f(xk) = removed weight
        expected = sum(drops) / len(drops)
        got = aopc(attr, x, model, 0, region_size=2, order=order, perturbation=0.0, softmax=False)
        assert got.item() == pytest.approx(expected)
    # fewer steps: L = 2
    got = aopc(attr, x, model, 0, region_size=2, steps=2, perturbation=0.0, softmax=False)
    top = sorted(region_w, reverse=True)
    assert got.item() == pytest.approx((0 + top[0] + top[0] + top[1]) / 3)


def test_aopc_uniform_noise_is_seeded_and_in_range():
    recorded: list[Tensor] = []
    model = LinearModel((3, 6, 6), 4).eval()
    handle = model.register_forward_pre_hook(lambda _m, args: recorded.append(args[0].clone()))
    gen = torch.Generator().manual_seed(4)
    x, attr = torch.rand(2, 3, 6, 6, generator=gen) * 2 - 0.5, torch.randn(2, 1, 6, 6, generator=gen)
    try:
        a1 = aopc(attr, x, model, 1, region_size=3, batch_size=100)
        batch = recorded[-1].view(2, 5, 3, 6, 6)
        a2 = aopc(attr, x, model, 1, region_size=3, batch_size=100)
        a3 = aopc(attr, x, model, 1, region_size=3, batch_size=100, seed=1)
        aopc(attr, x, model, 1, region_size=3, batch_size=100, noise_range=(5.0, 6.0))
        ranged = recorded[-1].view(2, 5, 3, 6, 6)
    finally:
        handle.remove()
    torch.testing.assert_close(a1, a2)
    assert not torch.allclose(a1, a3)
    torch.testing.assert_close(batch[:, 0], x)  # step 0 is the input
    full = batch[:, -1]  # every region replaced
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    assert bool(((full >= lo) & (full <= hi)).all()) and not torch.allclose(full, x)
    assert bool((ranged[:, -1] >= 5).all() and (ranged[:, -1] <= 6).all())
    # cumulative: a region changed at step k stays changed (same noise) at step k + 1
    changed = batch != x.unsqueeze(1)
    assert bool((changed[:, 1:-1] <= changed[:, 2:]).all())


def test_infidelity_closed_forms_on_a_linear_model():
    model = LinearModel((3, 4, 4), 3).eval()
    w = model.fc.weight.detach()[1].view(3, 4, 4).sum(0)  # per-pixel effect of a pixel-wise perturbation
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    exact = w.expand(2, 1, 4, 4)
    for scale in (True, False):
        assert infidelity(exact, x, model, 1, scale=scale, num_samples=16).abs().max().item() < 1e-8
    assert infidelity(3 * exact, x, model, 1, scale=True, num_samples=16).abs().max().item() < 1e-8
    sigma, n = 0.2, 4000
    unscaled = infidelity(3 * exact, x, model, 1, scale=False, num_samples=n, noise_std=sigma, batch_size=1024)
    expected = 4 * sigma**2 * w.double().pow(2).sum().item()  # E[(2 I.w)^2]
    torch.testing.assert_close(unscaled.double(), torch.full((2,), expected, dtype=torch.float64), rtol=0.1, atol=0)
    noisy = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    assert bool((infidelity(noisy, x, model, 1) <= infidelity(noisy, x, model, 1, scale=False) + 1e-6).all())
    assert bool((infidelity(noisy, x, model, 1) > 1e-3).all())


def test_max_sensitivity_closed_forms():
    model = LinearModel((3, 4, 4), 3).eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)) + 0.5
    # the gradient of a linear model does not depend on x: sensitivity 0
    assert max_sensitivity(None, x, model, 1, Gradient(), num_samples=4).abs().max().item() < 1e-6

    def channel_sum(_model, inputs, _target):
        return inputs.sum(1, keepdim=True)

    r1 = max_sensitivity(None, x, model, 1, channel_sum, radius=0.01, num_samples=6, normalize=False)
    r2 = max_sensitivity(None, x, model, 1, channel_sum, radius=0.02, num_samples=6, normalize=False)
    torch.testing.assert_close(r2, 2 * r1)  # linear attributor: the same draws scaled by the radius
    bound = 0.01 * 3 * math.sqrt(16)  # |sum_c d_c| <= 3 r per pixel
    assert bool((r1 > 0).all() and (r1 <= bound + 1e-6).all())
    rel = max_sensitivity(None, x, model, 1, channel_sum, radius=0.01, num_samples=6)
    torch.testing.assert_close(rel, r1 / x.sum(1).flatten(1).norm(dim=1))
    # chunking: identical draws whatever the batch size, and bounded attributor calls
    calls: list[int] = []

    def counting(_model, inputs, _target):
        calls.append(inputs.shape[0])
        return inputs.sum(1, keepdim=True)

    r_small = max_sensitivity(x.sum(1, keepdim=True), x, model, 1, counting, radius=0.01, num_samples=6, batch_size=5)
    assert max(calls) <= 5 and sum(calls) == 12
    torch.testing.assert_close(r_small, rel)
    # an all-zero map is excluded and counted by the metric
    metric = MaxSensitivity(channel_sum, radius=0.01, num_samples=6)
    metric.update(torch.cat([torch.zeros(1, 1, 4, 4), x[1:].sum(1, keepdim=True)]), x, model, 1)
    assert metric.num_excluded == 1
    torch.testing.assert_close(metric.compute(), rel[1])


def test_metrics_accumulate_like_one_batch_and_return_per_sample():
    gen = torch.Generator().manual_seed(8)
    x, attr = torch.rand(4, 3, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    model, target = GapCNN().eval(), torch.tensor([0, 1, 2, 3])
    for cls, kwargs in (
        (DeletionAUC, {"steps": 4}),
        (InsertionAUC, {"steps": 4}),
        (AOPC, {"region_size": 4}),
        (Infidelity, {"num_samples": 4}),
    ):
        split, whole, per = cls(**kwargs), cls(**kwargs), cls(return_per_sample=True, **kwargs)
        split.update(attr[:1], x[:1], model, target[:1])
        batch_value = split(attr[1:], x[1:], model, target[1:])  # Metric.forward: batch value, accumulates
        whole.update(attr, x, model, target)
        per.update(attr, x, model, target)
        torch.testing.assert_close(split.compute(), whole.compute())
        torch.testing.assert_close(per.compute().mean(), whole.compute())
        torch.testing.assert_close(batch_value, per.compute()[1:].mean())
        assert per.compute().shape == (4,)


def test_metric_curve_for_aopc_and_reset():
    metric = AOPC(region_size=4, perturbation=0.0)
    x, attr = torch.rand(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    metric.update(attr, x, GapCNN().eval(), 0)
    steps, mean = metric.curve()
    assert steps.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and mean.shape == (5,)
    metric.reset()
    with pytest.raises(RuntimeError, match="before update"):
        metric.curve()


def test_resnet18_deletion_runs_in_chunks(resnet18):
    model = CountingModel(resnet18)
    x, attr = torch.rand(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    metric = DeletionAUC(steps=8, batch_size=6)
    metric.update(attr, x, model, torch.tensor([1, 4]))
    value = metric.compute().item()
    assert 0.0 <= value <= 1.0 and max(model.sizes) <= 6 and sum(model.sizes) == 18


# ----------------------------------------------------------------------------------------------------------------
# No side effects, contexts, bad input
# ----------------------------------------------------------------------------------------------------------------


def _all_faithfulness_updates():
    return [
        (DeletionAUC(steps=4, batch_size=3), False),
        (InsertionAUC(steps=4, batch_size=3), False),
        (AOPC(region_size=4, batch_size=3), False),
        (Infidelity(num_samples=3, batch_size=3), False),
        (MaxSensitivity(Gradient(), num_samples=2, batch_size=3), True),
    ]


@pytest.mark.parametrize("context", ["plain", "no_grad", "inference_mode"])
def test_no_side_effects_and_contexts(gap_cnn, context):
    put_in_train_mode_with_grads(gap_cnn)
    before = snapshot(gap_cnn)
    gen = torch.Generator().manual_seed(9)
    x, attr = torch.rand(2, 3, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, generator=gen)
    ctx = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    results = []
    for metric, _ in _all_faithfulness_updates():
        with ctx():
            metric.update(attr, x, gap_cnn, 1)
        results.append(metric.compute().item())
        assert_unchanged(gap_cnn, before)
    reference = []
    for metric, _ in _all_faithfulness_updates():
        metric.update(attr, x, gap_cnn, 1)
        reference.append(metric.compute().item())
    assert results == pytest.approx(reference, rel=1e-5, abs=1e-7)
    assert all(math.isfinite(v) for v in results)


def test_no_side_effects_when_raising(gap_cnn):
    put_in_train_mode_with_grads(gap_cnn)
    before = snapshot(gap_cnn)
    x, attr = torch.rand(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    for metric, _ in _all_faithfulness_updates():
        with pytest.raises(ValueError, match="out of range"):
            metric.update(attr, x, gap_cnn, 7)  # GapCNN has 4 classes
        assert_unchanged(gap_cnn, before)


def test_bad_input_raises_clear_errors():
    model = GapCNN().eval()
    x, attr = torch.rand(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\[2, 1, 4, 4\].*\[2, 3, 8, 8\]"):
        deletion_auc(torch.randn(2, 1, 4, 4), x, model, 0)
    with pytest.raises(ValueError, match=r"\[3, 1, 8, 8\].*\[2, 3, 8, 8\]"):
        DeletionAUC().update(torch.randn(3, 1, 8, 8), x, model, 0)
    nan_attr = attr.clone()
    nan_attr[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*samples \[1\]"):
        InsertionAUC(steps=4).update(nan_attr, x, model, 0)
    with pytest.raises(ValueError, match="steps=100 exceeds the 64 pixels"):
        deletion_auc(attr, x, model, 0, steps=100)
    with pytest.raises(ValueError, match="steps=5 exceeds the 4 regions"):
        aopc(attr, x, model, 0, region_size=4, steps=5)
    with pytest.raises(ValueError, match="target tensor must have shape"):
        deletion_auc(attr, x, model, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="target is required"):
        deletion_auc(attr, x, model, None)
    with pytest.raises(ValueError, match="does not broadcast"):
        deletion_auc(attr, x, model, 0, baseline=torch.zeros(2, 8))
    with pytest.raises(TypeError, match="floating-point"):
        deletion_auc(attr.long(), x, model, 0)
    bad_constructors = [
        (lambda: DeletionAUC(steps=0), "steps must be an integer >= 1, got 0"),
        (lambda: DeletionAUC(steps=4, step=2), "not both"),
        (lambda: DeletionAUC(baseline="blur"), "unknown baseline 'blur'"),
        (lambda: InsertionAUC(baseline="mean"), r"unknown baseline 'mean'.*\['blur'\]"),
        (lambda: InsertionAUC(blur_kernel_size=4), "odd"),
        (lambda: AOPC(order="random"), r"unknown order 'random'.*\['morf', 'lerf'\]"),
        (lambda: AOPC(perturbation="gauss"), "unknown perturbation 'gauss'"),
        (lambda: AOPC(noise_range=(1.0, 0.0)), "low < high"),
        (lambda: AOPC(region_size=0), "region_size"),
        (lambda: Infidelity(noise_std=-1.0), "noise_std must be a positive"),
        (lambda: Infidelity(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (lambda: MaxSensitivity(Gradient(), radius=0.0), "radius must be a positive"),
        (lambda: MaxSensitivity(42), "attributor must be"),
        (lambda: MaskIoU(binarization="mean"), r"unknown binarization 'mean'.*\['topk', 'otsu'\]"),
        (lambda: MaskIoU(fraction=1.5), r"fraction must be a float in \(0, 1\]"),
        (lambda: PointingGame(tolerance=-1), "tolerance must be an integer >= 0"),
    ]
    for make, message in bad_constructors:
        with pytest.raises((ValueError, TypeError), match=message):
            make()


# ----------------------------------------------------------------------------------------------------------------
# Localisation
# ----------------------------------------------------------------------------------------------------------------


def _masks() -> Tensor:
    masks = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 1:4, 2:6] = True
    masks[1, 0, 5:8, 0:2] = True
    masks[2, 0, 3, 3] = True
    return masks


def test_localisation_perfect_and_disjoint_maps():
    masks = _masks()
    perfect = masks.float()
    disjoint = (~masks).float()  # all relevance outside the mask
    for fn in (pointing_game, relevance_mass, relevance_rank):
        assert fn(perfect, masks).tolist() == [1.0, 1.0, 1.0]
        assert fn(disjoint, masks).tolist() == [0.0, 0.0, 0.0]
    for binarization in ("topk", "otsu"):
        assert mask_iou(perfect, masks, binarization=binarization).tolist() == [1.0, 1.0, 1.0]
        assert mask_iou(disjoint, masks, binarization=binarization).tolist() == [0.0, 0.0, 0.0]
    for cls in (PointingGame, MaskIoU, RelevanceMass, RelevanceRank):
        metric = cls()
        metric.update(perfect[:2], masks[:2])
        metric.update(perfect[2:], masks[2:])
        assert metric.compute().item() == 1.0


def test_empty_masks_are_excluded_and_counted():
    masks = _masks()
    masks[1] = False
    heat = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    for cls, fn in (
        (PointingGame, pointing_game),
        (MaskIoU, mask_iou),
        (RelevanceMass, relevance_mass),
        (RelevanceRank, relevance_rank),
    ):
        values = fn(heat, masks)
        assert math.isnan(values[1].item()) and not torch.isnan(values[[0, 2]]).any()
        metric, per = cls(), cls(return_per_sample=True)
        metric.update(heat, masks)
        per.update(heat, masks)
        assert metric.num_excluded == 1
        torch.testing.assert_close(metric.compute(), values[[0, 2]].mean())
        torch.testing.assert_close(per.compute(), values, equal_nan=True)
    all_empty = PointingGame()
    all_empty.update(heat[:1], torch.zeros(1, 1, 8, 8))
    assert math.isnan(all_empty.compute().item()) and all_empty.num_excluded == 1


def test_pointing_game_tolerance_matches_distance_transform():
    ndimage = pytest.importorskip("scipy.ndimage")
    gen = torch.Generator().manual_seed(11)
    heat = torch.rand(40, 1, 12, 12, generator=gen)
    masks = torch.zeros(40, 1, 12, 12, dtype=torch.bool)
    for i in range(40):
        r, c = torch.randint(0, 10, (2,), generator=gen).tolist()
        masks[i, 0, r : r + 3, c : c + 2] = True
    for tol in (0, 1, 2, 4):
        ours = pointing_game(heat, masks, tolerance=tol)
        expected = []
        for i in range(40):
            dist = ndimage.distance_transform_edt(~masks[i, 0].numpy())
            r, c = divmod(int(heat[i, 0].argmax()), 12)
            expected.append(float(dist[r, c] <= tol))
        assert ours.tolist() == expected
    # ties: a constant map only hits when every pixel is inside the (dilated) mask
    assert pointing_game(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4)).item() == 1.0
    half = torch.zeros(1, 1, 4, 4)
    half[..., :2, :] = 1
    assert pointing_game(torch.ones(1, 1, 4, 4), half).item() == 0.0
    assert pointing_game(torch.ones(1, 1, 4, 4), half, tolerance=2).item() == 1.0


def test_otsu_matches_skimage_and_iou_by_hand():
    filters = pytest.importorskip("skimage.filters")
    gen = torch.Generator().manual_seed(12)
    maps = torch.cat([torch.randn(3, 200, generator=gen), torch.randn(3, 100, generator=gen) * 0.5 + 4], 1)
    maps = maps.double().view(3, 15, 20)
    ours = otsu_threshold(maps)
    for i in range(3):
        assert ours[i].item() == pytest.approx(filters.threshold_otsu(maps[i].numpy()), rel=1e-12)
    # top-k IoU by hand: heat ranks pixels 0..15 of a 4x4 map; mask = 4 pixels, of which the top-4 hit 2
    heat = torch.arange(16.0).flip(0).view(1, 1, 4, 4)  # pixel 0 most relevant
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask.view(-1)[[0, 1, 8, 9]] = True
    assert mask_iou(heat, mask).item() == pytest.approx(2 / 6)  # top-4 {0,1,2,3} vs {0,1,8,9}
    assert mask_iou(heat, mask, fraction=0.5).item() == pytest.approx(2 / 10)  # top-8 {0..7}: 2 shared, 10 in union
    assert relevance_rank(heat, mask).item() == pytest.approx(0.5)


def test_relevance_mass_by_hand_and_mask_formats():
    heat = torch.tensor([[3.0, -2.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    mask = torch.tensor([[1, 1], [0, 0]])
    assert relevance_mass(heat, mask.view(1, 1, 2, 2)).item() == pytest.approx(3 / 4)  # negatives ignored
    assert relevance_mass(heat, mask.view(1, 2, 2).float() * 0.9).item() == pytest.approx(3 / 4)
    assert relevance_mass(-torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).isnan().item()  # no positive relevance
    # channels are summed before scoring
    rgb = torch.stack([heat[:, 0], heat[:, 0], -heat[:, 0] * 0.5], dim=1)
    assert relevance_mass(rgb, mask.view(1, 1, 2, 2)).item() == pytest.approx(3 / 4)


def test_localisation_bad_input():
    heat = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"masks of shape \[2, 1, 4, 4\].*\[2, 8, 8\]"):
        MaskIoU().update(heat, torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"masks of shape \[3, 1, 8, 8\]"):
        pointing_game(heat, torch.ones(3, 1, 8, 8))
    bad = heat.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        RelevanceRank().update(bad, torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \[B, C, H, W\] or \[B, H, W\]"):
        relevance_mass(torch.rand(8, 8), torch.ones(8, 8))


# ----------------------------------------------------------------------------------------------------------------
# Complexity and similarity
# ----------------------------------------------------------------------------------------------------------------


def test_gini_closed_forms_and_independent_formula():
    n = 64
    one_hot = torch.zeros(1, 1, 8, 8)
    one_hot[0, 0, 3, 5] = -2.5  # sign does not matter: |R|
    assert sparseness(one_hot).item() == pytest.approx(1 - 1 / n)
    assert sparseness(torch.full((1, 1, 8, 8), 0.7)).item() == pytest.approx(0.0, abs=1e-7)
    values = torch.rand(5, 30, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    # independent form: mean absolute difference / (2 * mean)
    mad = (values.unsqueeze(2) - values.unsqueeze(1)).abs().sum(dim=(1, 2))
    expected = mad / (2 * values.shape[1] * values.sum(dim=1))
    torch.testing.assert_close(gini_index(values), expected)
    metric = Sparseness()
    metric.update(torch.cat([one_hot, torch.zeros(1, 1, 8, 8)]))
    assert metric.num_excluded == 1 and metric.compute().item() == pytest.approx(1 - 1 / n)
    rgb = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(sparseness(rgb), sparseness(rgb.sum(1, keepdim=True)))


def test_ssim_identity_reference_and_errors():
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(14)
    a = torch.rand(2, 16, 20, generator=gen, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(2, 16, 20, generator=gen, dtype=torch.float64)).clamp(0, 1)
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))
    for i in range(2):
        ref = metrics.structural_similarity(
            a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert ssim(a[i : i + 1], b[i : i + 1], data_range=1.0).item() == pytest.approx(ref, abs=1e-12)
    assert ssim(a, 1 - a, data_range=1.0).max().item() < 0.0  # inverted structure
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(torch.rand(1, 8, 8), torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="different shapes"):
        ssim(torch.rand(1, 16, 16), torch.rand(1, 16, 15))


def test_hog_by_hand_and_against_skimage():
    feature = pytest.importorskip("skimage.feature")
    vertical_edge = torch.zeros(1, 8, 8)
    vertical_edge[:, :, 4:] = 1.0  # intensity changes along the width: orientation 0 -> bin 0
    hist = hog_features(vertical_edge)[0, 0, 0]
    assert hist[0].item() == pytest.approx(2 * 8 / 64) and hist[1:].abs().sum().item() == 0
    horizontal_edge = vertical_edge.transpose(1, 2)  # orientation 90 deg -> bin 4 of 9
    hist = hog_features(horizontal_edge)[0, 0, 0]
    assert hist[4].item() == pytest.approx(2 * 8 / 64) and hist.sum().item() == pytest.approx(hist[4].item())
    image = torch.rand(1, 19, 24, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    ours = hog_features(image)[0].numpy()
    ref = feature.hog(
        image[0].numpy(),
        orientations=9,
        pixels_per_cell=(8, 8),
        cells_per_block=(1, 1),
        block_norm="L1",
        feature_vector=False,
    )[:, :, 0, 0, :]
    np.testing.assert_allclose(ours / (ours.sum(-1, keepdims=True) + 1e-5), ref, atol=1e-9)
    torch.testing.assert_close(hog_pearson(image, 2 * image + 1), torch.ones(1, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------------------------


def test_ddp_two_processes_match_single_process():
    import ddp_metric_script

    script = Path(__file__).with_name("ddp_metric_script.py")
    proc = run_processes([sys.executable, str(script)], timeout=240, cwd=script.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    ddp = json.loads(lines[0][len("RESULT ") :])
    single = ddp_metric_script.compute_metrics(range(ddp_metric_script.NUM_SAMPLES))
    assert ddp["world_size"] == 2
    for key in ("mask_iou", "pointing_game", "deletion_auc", "excluded"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
    assert sorted(ddp["per_sample_iou"]) == pytest.approx(sorted(single["per_sample_iou"]), abs=1e-6)
    assert ddp["deletion_curve"] == pytest.approx(single["deletion_curve"], abs=1e-6)
