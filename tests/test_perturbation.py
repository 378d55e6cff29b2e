"""Tests of the perturbation attributors (Occlusion, RISE, LIME, KernelSHAP, MeaningfulPerturbation,
PredictionDifference), the segments they share and the contrastive target.

Known answers are computed here independently of the implementation: closed forms on linear models, brute-force
Shapley values, the RISE estimator written as a plain loop, scipy's Gaussian filter, scikit-learn's ridge."""

from __future__ import annotations

import contextlib
import itertools
import math
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import GapCNN, LinearModel, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.base import ATTRIBUTORS, build_attributor
from lightning_xai.attribution.perturbation import (
    LIME,
    RISE,
    KernelSHAP,
    MeaningfulPerturbation,
    Occlusion,
    PredictionDifference,
    _lasso_selection,
    _weighted_ridge,
    gaussian_blur,
)
from lightning_xai.attribution.segmentation import Segmentation, grid_segments
from lightning_xai.attribution.targets import ContrastiveTarget, contrastive_target

# ---------------------------------------------------------------------------------------------------------------
# models and helpers
# ---------------------------------------------------------------------------------------------------------------


class PatchModel(nn.Module):
    """Two logits: ``[gain * mean(x over one patch, all channels) + bias, 0]``; nothing else matters."""

    def __init__(self, rows: slice, cols: slice, gain: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.gain = nn.Parameter(torch.tensor(float(gain)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gain * x[:, :, self.rows, self.cols].mean(dim=(1, 2, 3)) + self.bias
        return torch.stack([s, torch.zeros_like(s)], 1)


class LogitModel(nn.Module):
    """Two logits ``[w . x, 0]``: the log-odds of class 0 is exactly ``w . x``."""

    def __init__(self, shape: tuple[int, int, int], scale: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(scale * torch.randn(shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


@contextlib.contextmanager
def forward_sizes(model: nn.Module):
    """Record the batch size of every forward call of ``model``."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


def window_starts(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else [*starts, size - window]


def average_over_windows(per_window, batch, height, width, window, stride) -> torch.Tensor:
    """``per_window(b, r, c) -> float``, averaged per pixel over the windows covering it (test's own loop)."""
    out = torch.zeros(batch, 1, height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for r in window_starts(height, window[0], stride[0]):
        for c in window_starts(width, window[1], stride[1]):
            count[r : r + window[0], c : c + window[1]] += 1
            for b in range(batch):
                out[b, 0, r : r + window[0], c : c + window[1]] += per_window(b, r, c)
    assert (count > 0).all()
    return out / count


def small_methods() -> dict:
    """Cheap configurations of every method, for 16x16 inputs; ``make(batch_size)``."""
    return {
        "occlusion": lambda bs=64: Occlusion(window=6, stride=5, batch_size=bs),
        "rise": lambda bs=64: RISE(n_masks=24, grid=4, batch_size=bs),
        "lime": lambda bs=64: LIME(n_samples=20, batch_size=bs),
        "kernel_shap": lambda bs=64: KernelSHAP(n_samples=20, batch_size=bs),
        "meaningful_perturbation": lambda bs=64: MeaningfulPerturbation(
            mask_size=4, iterations=4, jitter=2, batch_size=bs
        ),
        "prediction_difference": lambda bs=64: PredictionDifference(
            window=6, stride=5, n_samples=3, padding=1, batch_size=bs, reference=REFERENCE16
        ),
    }


METHODS = sorted(small_methods())
#: reference images for the conditional prediction-difference sampler on 16x16 inputs (it needs >= 3 here)
REFERENCE16 = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def x16() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Occlusion
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [0.3, "mean", "blur"])
def test_occlusion_of_a_linear_model_is_the_window_sum_of_w_times_x_minus_fill(linear_model, fill):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1, 3])
    window, stride = (3, 3), (2, 3)  # 8 is not reached by either stride: the last windows are border-aligned
    result = Occlusion(window=window, stride=stride, fill=fill, blur_sigma=1.5)(linear_model, x, target)
    xd = x.double()
    if fill == "mean":
        fill_img = xd.mean(dim=(2, 3), keepdim=True).expand_as(xd)
    elif fill == "blur":
        from scipy.ndimage import gaussian_filter

        fill_img = torch.from_numpy(gaussian_filter(xd.numpy(), sigma=(0, 0, 1.5, 1.5), mode="nearest", truncate=3.0))
    else:
        fill_img = torch.full_like(xd, fill)

    def drop(b: int, r: int, c: int) -> float:
        w = linear_model.weight_map(int(target[b])).double()
        return float((w * (xd[b] - fill_img[b]))[:, r : r + window[0], c : c + window[1]].sum())

    expected = average_over_windows(drop, 2, 8, 8, window, stride)
    assert result.shape == (2, 1, 8, 8)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-4)


def test_occlusion_with_a_window_as_large_as_the_image_is_the_total_drop(linear_model):
    x = torch.randn(1, 3, 8, 8)
    result = Occlusion(window=8, fill=0.0)(linear_model, x, 2)
    expected = linear_model(x)[0, 2] - linear_model(torch.zeros_like(x))[0, 2]
    torch.testing.assert_close(result, expected.detach().expand(1, 1, 8, 8))


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    for sigma in (0.7, 2.0, 6.0):  # 6.0: the kernel is wider than the image
        expected = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
        torch.testing.assert_close(gaussian_blur(x, sigma), torch.from_numpy(expected))
    torch.testing.assert_close(gaussian_blur(x, 0.0), x)


# ---------------------------------------------------------------------------------------------------------------
# RISE
# ---------------------------------------------------------------------------------------------------------------


def test_rise_equals_the_papers_estimator_written_as_a_loop():
    model = GapCNN().eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    rise = RISE(n_masks=30, grid=3, p=0.4, batch_size=7, seed=5)
    result = rise(model, x, torch.tensor([0, 2]))
    masks = rise.masks(12, 12)
    assert masks.shape == (30, 12, 12)
    assert masks.min() >= 0 and masks.max() <= 1
    expected = torch.zeros(2, 1, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        for m in masks:
            scores = model(x * m)
            for b, c in enumerate([0, 2]):
                expected[b, 0] += float(scores[b, c]) * m.double()
    expected /= 30 * 0.4
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-5)


def test_rise_masks_are_smooth_shifted_grids_with_mean_p():
    rise = RISE(n_masks=400, grid=4, p=0.3, seed=0)
    masks = rise.masks(16, 16)
    assert abs(float(masks.mean()) - 0.3) < 0.03
    assert ((masks > 0.01) & (masks < 0.99)).any(), "bilinear upsampling gives intermediate values"
    first = masks[0]
    assert not torch.equal(first, masks[1])
    torch.testing.assert_close(rise.masks(16, 16, 5, 9), masks[5:9])  # reproducible, sliceable
    torch.testing.assert_close(RISE(n_masks=3, p=1.0, grid=4).masks(16, 16), torch.ones(3, 16, 16))


def test_rise_with_p_one_is_the_score_everywhere(gap_cnn, x16):
    result = RISE(n_masks=5, grid=4, p=1.0)(gap_cnn, x16, 1)
    expected = gap_cnn(x16)[:, 1].detach()
    torch.testing.assert_close(result, expected.view(2, 1, 1, 1).expand(2, 1, 16, 16))


def test_rise_normalisation_makes_a_constant_score_constant():
    model = PatchModel(slice(0, 1), slice(0, 1), gain=0.0, bias=2.5)  # class 0 score = 2.5 whatever the input
    result = RISE(n_masks=1500, grid=4, p=0.5)(model, torch.rand(1, 1, 16, 16), 0)
    assert abs(float(result.mean()) - 2.5) < 0.05 * 2.5


def test_rise_highlights_the_informative_patch():
    model = PatchModel(slice(8, 12), slice(2, 6), gain=1.0)
    result = RISE(n_masks=500, grid=4, p=0.5)(model, torch.ones(1, 3, 16, 16), 0)[0, 0]
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[8:12, 2:6] = True
    r, c = divmod(int(result.argmax()), 16)
    assert inside[r, c]
    assert result[inside].mean() > result[~inside].mean() + 0.1


# ---------------------------------------------------------------------------------------------------------------
# segments
# ---------------------------------------------------------------------------------------------------------------


def test_grid_segments_are_a_regular_grid():
    labels = grid_segments(8, 6, (2, 3))
    assert labels.shape == (8, 6)
    assert labels[:4, :2].eq(0).all() and labels[:4, 2:4].eq(1).all() and labels[4:, 4:].eq(5).all()
    assert torch.equal(torch.bincount(labels.flatten()), torch.full((6,), 8))
    with pytest.raises(ValueError, match="does not fit"):
        grid_segments(4, 4, 5)


def test_slic_segments_are_consecutive_superpixels():
    pytest.importorskip("skimage")
    x = torch.zeros(2, 3, 24, 24)
    x[0, :, :, 12:] = 1.0  # two flat halves
    x[1] = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4), size=(24, 24), mode="bilinear")[0]
    labels, counts = Segmentation("slic", n_segments=8, compactness=10.0, sigma=0.0)(x)
    assert labels.shape == (2, 24, 24) and labels.dtype == torch.long
    for b in range(2):
        assert sorted(labels[b].unique().tolist()) == list(range(counts[b]))
        assert 2 <= counts[b] <= 20
    # no superpixel of the first image straddles the vertical edge
    for seg in range(counts[0]):
        cols = (labels[0] == seg).nonzero()[:, 1]
        assert bool((cols < 12).all()) or bool((cols >= 12).all())


def test_slic_without_scikit_image_fails_early_with_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    with pytest.raises(ImportError, match="scikit-image"):
        LIME(segmentation="slic")
    LIME(segmentation="grid")  # no dependency


def test_lime_and_kernel_shap_run_on_slic_superpixels(gap_cnn, x16):
    pytest.importorskip("skimage")
    for method in (
        LIME(n_samples=16, segmentation="slic", n_segments=6),
        KernelSHAP(n_samples=16, segmentation="slic"),
    ):
        explanation = method.explain_segments(gap_cnn, x16, 1)
        for values, seg in zip(explanation.values, explanation.segments):
            assert values.shape == (int(seg.max()) + 1,)
        assert torch.isfinite(method(gap_cnn, x16, 1)).all()


# ---------------------------------------------------------------------------------------------------------------
# KernelSHAP
# ---------------------------------------------------------------------------------------------------------------


def segment_values_of_linear_model(model: LinearModel, x: torch.Tensor, cls: int, labels: torch.Tensor, fill):
    """For a linear model, the Shapley value of a segment is sum over its pixels of w * (x - fill)."""
    contrib = (model.weight_map(cls).double() * (x.double() - fill.double())).sum(0)  # [H, W]
    return torch.zeros(int(labels.max()) + 1, dtype=torch.float64).index_add_(0, labels.flatten(), contrib.flatten())


@pytest.mark.parametrize(("grid", "n_samples"), [(2, 16), (4, 40)], ids=["exact", "sampled"])
def test_kernel_shap_of_a_linear_model_is_exact(linear_model, grid, n_samples):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    shap = KernelSHAP(n_samples=n_samples, grid=grid, fill="mean")
    explanation = shap.explain_segments(linear_model, x, 3)
    fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    labels = grid_segments(8, 8, grid)
    for b in range(2):
        expected = segment_values_of_linear_model(linear_model, x[b], 3, labels, fill[b])
        torch.testing.assert_close(explanation.values[b], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(explanation.intercept, linear_model(fill)[:, 3].detach().double(), rtol=1e-5, atol=1e-5)
    heatmap = shap(linear_model, x, 3)
    torch.testing.assert_close(heatmap, explanation.heatmap())


def brute_force_shapley(model, x, cls, labels, fill) -> torch.Tensor:
    """Shapley values from the definition: weighted marginal contributions over all subsets."""
    m = int(labels.max()) + 1

    def value(subset) -> float:
        keep = torch.zeros(labels.shape, dtype=torch.bool)
        for j in subset:
            keep |= labels == j
        with torch.no_grad():
            return float(model(torch.where(keep, x, fill)[None])[0, cls])

    phi = torch.zeros(m, dtype=torch.float64)
    for j in range(m):
        others = [i for i in range(m) if i != j]
        for size in range(m):
            for subset in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                phi[j] += weight * (value((*subset, j)) - value(subset))
    return phi


def test_kernel_shap_exact_enumeration_gives_the_shapley_values_of_a_nonlinear_model(gap_cnn):
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    explanation = KernelSHAP(n_samples=16, grid=2, fill=0.5).explain_segments(gap_cnn, x, 2)
    expected = brute_force_shapley(gap_cnn, x[0], 2, grid_segments(8, 8, 2), torch.full_like(x[0], 0.5))
    torch.testing.assert_close(explanation.values[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_samples", [64, 30, 2], ids=["exact", "sampled", "no-coalitions"])
def test_kernel_shap_satisfies_efficiency(gap_cnn, x16, n_samples):
    shap = KernelSHAP(n_samples=n_samples, grid=(2, 3), fill="blur", blur_sigma=2.0)
    explanation = shap.explain_segments(gap_cnn, x16, 1)
    with torch.no_grad():
        gain = gap_cnn(x16)[:, 1] - gap_cnn(gaussian_blur(x16, 2.0))[:, 1]
    sums = torch.stack([v.sum() for v in explanation.values])
    torch.testing.assert_close(sums, gain.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explanation.score, gap_cnn(x16)[:, 1].detach().double(), rtol=1e-5, atol=1e-6)


def test_kernel_shap_samples_coalitions_from_the_shapley_kernel_in_complementary_pairs():
    m = 12  # 2^12 > n_samples: sampled
    design = KernelSHAP(n_samples=4002)._design(m, torch.Generator().manual_seed(0))
    z = design.coalitions
    assert z[0].all() and not z[1].any(), "full and empty coalitions come first"
    others = z[2:]
    assert torch.equal(others[0::2], ~others[1::2]), "complementary pairs"
    sizes = others.sum(1)
    assert sizes.min() >= 1 and sizes.max() <= m - 1
    kernel = torch.tensor([(m - 1) / (s * (m - s)) for s in range(1, m)], dtype=torch.float64)
    empirical = torch.bincount(sizes, minlength=m)[1:].double() / others.shape[0]
    torch.testing.assert_close(empirical, kernel / kernel.sum(), rtol=0, atol=0.02)
    assert torch.equal(design.weights[2:], torch.ones(4000, dtype=torch.float64))


def test_kernel_shap_with_one_segment_gives_the_whole_gain(linear_model):
    x = torch.randn(1, 3, 8, 8)
    result = KernelSHAP(n_samples=4, grid=1, fill=0.0)(linear_model, x, 0)
    expected = (linear_model(x) - linear_model(torch.zeros_like(x)))[0, 0].detach()
    torch.testing.assert_close(result, expected.expand(1, 1, 8, 8), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# LIME
# ---------------------------------------------------------------------------------------------------------------


def test_weighted_ridge_matches_scikit_learn():
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(0)
    z = (torch.rand(40, 6, generator=g) > 0.5).double()
    y = torch.randn(40, generator=g, dtype=torch.float64)
    w = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    for alpha in (0.0, 0.7):
        beta, intercept = _weighted_ridge(z, y, w, alpha)
        ref = Ridge(alpha=alpha).fit(z.numpy(), y.numpy(), sample_weight=w.numpy())
        np.testing.assert_allclose(beta.numpy(), ref.coef_, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(float(intercept), ref.intercept_, rtol=1e-6, atol=1e-8)


def test_lime_samples_and_kernel_follow_the_paper():
    lime = LIME(n_samples=50, kernel_width=0.3)
    design = lime._design(9, torch.Generator().manual_seed(0))
    z, w = design.coalitions, design.weights
    assert z.shape == (50, 9) and z[0].all(), "the first sample is the unperturbed image"
    k = z.sum(1).double()
    assert (k >= 1).all()
    cosine = k / (k.sqrt() * 3.0)  # cos(z, 1) = |z| / (sqrt(|z|) sqrt(M))
    torch.testing.assert_close(w, torch.exp(-((1 - cosine) ** 2) / 0.3**2))


def test_lime_without_regularisation_recovers_a_linear_models_segment_values(linear_model):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    explanation = LIME(n_samples=64, grid=2, alpha=0.0, fill=0.0).explain_segments(linear_model, x, 1)
    labels = grid_segments(8, 8, 2)
    zeros = torch.zeros(3, 8, 8)
    for b in range(2):
        expected = segment_values_of_linear_model(linear_model, x[b], 1, labels, zeros)
        torch.testing.assert_close(explanation.values[b], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        explanation.intercept, linear_model.fc.bias[1].detach().double().expand(2), rtol=1e-5, atol=1e-5
    )


def test_lime_ridge_shrinks_towards_zero(linear_model):
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    free = LIME(n_samples=64, grid=2, alpha=0.0).explain_segments(linear_model, x, 1).values[0]
    shrunk = LIME(n_samples=64, grid=2, alpha=50.0).explain_segments(linear_model, x, 1).values[0]
    assert shrunk.norm() < free.norm()


def test_lime_highlights_the_informative_patch():
    model = PatchModel(slice(8, 12), slice(4, 8), gain=3.0)  # exactly the grid cell (2, 1) of a 4x4 grid
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    result = LIME(n_samples=60, grid=4, fill=0.0)(model, x, 0)[0, 0]
    assert result[8:12, 4:8].min() > 0.5
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[8:12, 4:8] = False
    assert result[outside].abs().max() < 0.2 * result[8:12, 4:8].min()


class TwoCellModel(nn.Module):
    """Logit = 4 * mean(cell A) - 3 * mean(cell B) + 0.05 * mean(x): two segments matter, the rest barely."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 4 * x[:, :, 0:4, 0:4].mean((1, 2, 3)) - 3 * x[:, :, 8:12, 12:16].mean((1, 2, 3)) + 0.05 * x.mean((1, 2, 3))
        return (self.scale * s)[:, None]


def test_k_lasso_keeps_the_k_segments_that_matter():
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) + 1.0
    values = LIME(n_samples=120, grid=4, fill=0.0, solver="k_lasso", n_features=2).explain_segments(
        TwoCellModel(), x, 0
    )
    v = values.values[0]
    assert set(torch.nonzero(v).flatten().tolist()) == {0, 2 * 4 + 3}
    assert v[0] > 0 > v[11]


def test_lasso_selection_follows_the_regularisation_path():
    g = torch.Generator().manual_seed(1)
    z = (torch.rand(200, 5, generator=g) > 0.5).double()
    y = 5 * z[:, 3] - 2 * z[:, 1] + 0.5 * z[:, 0] + 0.01 * torch.randn(200, generator=g, dtype=torch.float64)
    w = torch.ones(200, dtype=torch.float64)
    assert _lasso_selection(z, y, w, 1) == [3]
    assert sorted(_lasso_selection(z, y, w, 2)) == [1, 3]
    assert sorted(_lasso_selection(z, y, w, 3)) == [0, 1, 3]


# ---------------------------------------------------------------------------------------------------------------
# Meaningful perturbation
# ---------------------------------------------------------------------------------------------------------------


def test_meaningful_perturbation_deletes_the_evidence():
    model = PatchModel(slice(4, 8), slice(8, 12), gain=8.0, bias=-4.0)
    x = torch.zeros(1, 1, 16, 16)
    x[:, :, 4:8, 8:12] = 1.0  # a bright square; blurring it lowers its mean, and with it the class
    mp = MeaningfulPerturbation(mask_size=8, iterations=80, lr=0.1, blur_sigma=3.0)
    mask = mp(model, x, 0)[0, 0]
    assert mask.shape == (16, 16) and mask.min() >= 0 and mask.max() <= 1
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 8:12] = True
    assert mask[inside].mean() > 0.9
    assert mask[~inside].mean() < 0.25  # the floor is set by the bilinear spread of the 2-pixel mask cells
    with torch.no_grad():  # the learnt deletion really destroys the class probability
        blurred = gaussian_blur(x, 3.0)
        p_before = model(x).softmax(1)[0, 0]
        p_after = model(x * (1 - mask) + blurred * mask).softmax(1)[0, 0]
    assert p_after < 0.5 * p_before


def test_meaningful_perturbation_jitter_translates_with_replicated_borders():
    images = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5)
    shifted = MeaningfulPerturbation._shift(images, torch.tensor([[1, 2], [0, 0]]))
    expected = images[0, 0, [0, 0, 1, 2]][:, [0, 0, 0, 1, 2]]
    assert torch.equal(shifted[0, 0], expected)
    assert torch.equal(shifted[1], images[1])


def test_meaningful_perturbation_only_differentiates_the_mask(gap_cnn, x16):
    """Parameter gradients are never computed: autograd.grad w.r.t. the mask only (checked by .grad = None)."""
    mp = MeaningfulPerturbation(mask_size=4, iterations=3)
    mp(gap_cnn, x16, 0)
    assert all(p.grad is None for p in gap_cnn.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Prediction difference
# ---------------------------------------------------------------------------------------------------------------


def test_prediction_difference_marginal_weight_of_evidence_closed_form():
    model = LogitModel((3, 8, 8))
    g = torch.Generator().manual_seed(0)
    x, reference = torch.randn(2, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    window, stride = (3, 3), (2, 2)
    pd = PredictionDifference(window=window, stride=stride, sampling="marginal", n_samples=2, reference=reference)
    result = pd(model, x, 0)
    w = model.w.detach().double()

    def evidence(b: int, r: int, c: int) -> float:  # log-odds of class 0 is w.x: WE = w.(x - x_ref) / ln 2
        diff = (x[b] - reference[0]).double()[:, r : r + 3, c : c + 3]
        return float((w[:, r : r + 3, c : c + 3] * diff).sum()) / math.log(2)

    expected = average_over_windows(evidence, 2, 8, 8, window, stride)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-5)
    # a callable target is read as a binary logit: w.x - 0 gives the same log-odds
    torch.testing.assert_close(pd(model, x, contrastive_target(0, 1)), result, rtol=1e-4, atol=1e-5)


def test_prediction_difference_conditional_sampling_predicts_the_patch_from_its_frame():
    """Images that are constant per channel: the frame determines the patch, so the conditional sampler
    reproduces it (no evidence), while the marginal sampler replaces it by other images' values."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(40, 3, 1, 1, generator=g).expand(40, 3, 10, 10).contiguous()
    reference = reference + 0.001 * torch.randn(40, 3, 10, 10, generator=g)
    x = torch.tensor([0.8, -0.5, 1.2]).view(1, 3, 1, 1).expand(1, 3, 10, 10).contiguous()
    model = LogitModel((3, 10, 10), scale=1.0)
    common = {"window": 2, "stride": 2, "padding": 2, "n_samples": 4, "reference": reference}
    conditional = PredictionDifference(sampling="conditional", **common)(model, x, 0)
    marginal = PredictionDifference(sampling="marginal", **common)(model, x, 0)
    assert conditional.abs().max() < 0.05
    assert marginal.abs().mean() > 1.0


def test_prediction_difference_is_zero_where_the_model_does_not_look(x16):
    model = PatchModel(slice(0, 4), slice(0, 4), gain=2.0)
    result = PredictionDifference(window=4, stride=4, sampling="marginal", n_samples=3)(model, x16, 0)
    assert result[:, :, 4:, :].eq(0).all() and result[:, :, :, 4:].eq(0).all()
    assert result[:, :, :4, :4].ne(0).all()


def test_prediction_difference_rejects_a_single_logit_for_int_targets(x16):
    model = TwoCellModel()
    with pytest.raises(ValueError, match="K >= 2"):
        PredictionDifference(window=4, stride=4, n_samples=2, reference=REFERENCE16[:, :1])(model, x16[:, :1], 0)
    # a callable target reads the single logit as a binary decision
    result = PredictionDifference(window=4, stride=4, n_samples=2, reference=REFERENCE16[:, :1])(
        model, x16[:, :1], lambda y: y[:, 0]
    )
    assert torch.isfinite(result).all()


# ---------------------------------------------------------------------------------------------------------------
# contracts shared by every method
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_chunking_does_not_change_the_result_and_bounds_every_forward(gap_cnn, x16, method):
    make = small_methods()[method]
    results = {}
    for bs in (1, 5, 1000):
        with forward_sizes(gap_cnn) as sizes:
            results[bs] = make(bs)(gap_cnn, x16, torch.tensor([1, 3]))
        assert max(sizes) <= bs
        if bs == 5:
            assert max(sizes) == (2 if method == "meaningful_perturbation" else 5), "chunks are filled, not 1 by 1"
    torch.testing.assert_close(results[1], results[1000], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[5], results[1000], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_seeded_reproducible_and_global_rng_untouched(gap_cnn, x16, method):
    make = small_methods()[method]
    state = torch.get_rng_state()
    first = make()(gap_cnn, x16, 1)
    second = make()(gap_cnn, x16, 1)
    assert torch.equal(state, torch.get_rng_state()), "the global RNG was used"
    assert torch.equal(first, second)
    if method != "occlusion":
        other = make()
        other.seed = 123
        assert not torch.equal(other(gap_cnn, x16, 1), first), "the seed has no effect"


@pytest.mark.parametrize("method", METHODS)
def test_no_side_effects_also_when_raising(method, x16):
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    attributor = small_methods()[method]()
    result = attributor(model, x16, 2)
    assert result.shape == (2, 1, 16, 16) and torch.isfinite(result).all()
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"):
        attributor(model, x16, 7)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_no_grad_and_inference_mode_give_the_plain_result(gap_cnn, x16, method):
    attributor = small_methods()[method]()
    plain = attributor(gap_cnn, x16, 1)
    with torch.no_grad():
        torch.testing.assert_close(attributor(gap_cnn, x16, 1), plain)
    with torch.inference_mode():
        inputs = x16.clone()
        torch.testing.assert_close(attributor(gap_cnn, inputs, 1), plain)


def test_explain_segments_has_no_side_effects_and_works_in_inference_mode(x16):
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    lime = LIME(n_samples=16)
    plain = lime.explain_segments(model, x16, 1)
    assert_unchanged(model, before)
    with torch.inference_mode():
        again = lime.explain_segments(model, x16.clone(), 1)
    for a, b in zip(plain.values, again.values):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="out of range"):
        lime.explain_segments(model, x16, 9)
    assert_unchanged(model, before)


@pytest.mark.parametrize("batch", [1, 2])
def test_every_method_runs_on_resnet18(resnet18, batch):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    methods = [
        Occlusion(window=16, stride=16, fill="blur"),
        RISE(n_masks=8, grid=4),
        LIME(n_samples=8),
        KernelSHAP(n_samples=8, grid=2),
        MeaningfulPerturbation(mask_size=4, iterations=2),
        PredictionDifference(window=8, stride=8, n_samples=2, padding=1, reference=torch.randn(2, 3, 32, 32)),
    ]
    before = snapshot(resnet18)
    for method in methods:
        result = method(resnet18, x, torch.tensor([1, 4][:batch]))
        assert result.shape == (batch, 1, 32, 32), type(method).__name__
        assert torch.isfinite(result).all(), type(method).__name__
    assert_unchanged(resnet18, before)


def test_registered_names_build_each_method():
    expected = {
        "occlusion": Occlusion,
        "rise": RISE,
        "lime": LIME,
        "kernel_shap": KernelSHAP,
        "meaningful_perturbation": MeaningfulPerturbation,
        "prediction_difference": PredictionDifference,
    }
    for name, cls in expected.items():
        assert ATTRIBUTORS[name] is cls
        assert isinstance(build_attributor(name), cls)
    built = build_attributor({"name": "rise", "n_masks": 10, "p": 0.25})
    assert (built.n_masks, built.p) == (10, 0.25)


# ---------------------------------------------------------------------------------------------------------------
# contrastive targets
# ---------------------------------------------------------------------------------------------------------------


def test_contrastive_target_is_the_logit_difference_and_linear_attributions_subtract(linear_model):
    x = torch.randn(2, 3, 8, 8)
    target = contrastive_target(2, 0)
    out = linear_model(x)
    torch.testing.assert_close(target(out), out[:, 2] - out[:, 0])
    occlusion = Occlusion(window=4, stride=2)
    torch.testing.assert_close(
        occlusion(linear_model, x, target),
        occlusion(linear_model, x, 2) - occlusion(linear_model, x, 0),
        rtol=1e-4,
        atol=1e-4,
    )
    assert target == ContrastiveTarget(2, 0) and target != contrastive_target(0, 2)
    assert repr(target) == "contrastive_target(2, 0)"
    assert pickle.loads(pickle.dumps(target)) == target


def test_contrastive_target_rejects_bad_classes(linear_model):
    with pytest.raises(ValueError, match="must differ"):
        contrastive_target(1, 1)
    with pytest.raises(ValueError, match="non-negative int"):
        contrastive_target(-1, 2)
    with pytest.raises(ValueError, match="non-negative int"):
        contrastive_target(1.0, 2)
    with pytest.raises(ValueError, match="out of range"):
        Occlusion(window=4)(linear_model, torch.randn(1, 3, 8, 8), contrastive_target(0, 9))


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Occlusion(window=0), "window must be a positive int"),
        (lambda: Occlusion(window=(2, 2, 2)), "window must be"),
        (lambda: Occlusion(stride=-1), "stride must be"),
        (lambda: Occlusion(window=3, stride=4), r"stride \(4, 4\) must not exceed the window \(3, 3\)"),
        (lambda: PredictionDifference(window=(2, 4), stride=(3, 1)), "must not exceed the window"),
        (lambda: Occlusion(fill="zeros"), r"unknown fill 'zeros'.*'mean', 'blur'"),
        (lambda: Occlusion(batch_size=0), "batch_size must be an integer >= 1"),
        (lambda: RISE(p=0.0), r"p .* must be in \(0, 1\], got 0.0"),
        (lambda: RISE(p=1.5), r"must be in \(0, 1\]"),
        (lambda: RISE(n_masks=0), "n_masks must be"),
        (lambda: RISE(seed="a"), "seed must be an int or None"),
        (lambda: LIME(n_samples=1), "n_samples must be an integer >= 2"),
        (lambda: KernelSHAP(n_samples=1), "n_samples must be an integer >= 2"),
        (lambda: LIME(segmentation="watershed"), r"unknown segmentation 'watershed'.*'grid', 'slic'"),
        (lambda: KernelSHAP(segmentation="quickshift"), "unknown segmentation"),
        (lambda: LIME(kernel_width=0), "kernel_width must be .*> 0"),
        (lambda: LIME(solver="lars"), r"unknown solver 'lars'.*'ridge', 'k_lasso'"),
        (lambda: LIME(alpha=-1), "alpha must be .*>= 0"),
        (lambda: LIME(grid=0), "grid must be"),
        (lambda: MeaningfulPerturbation(iterations=0), "iterations must be"),
        (lambda: MeaningfulPerturbation(lr=0), "lr must be .*> 0"),
        (lambda: MeaningfulPerturbation(tv_beta=0.5), "tv_beta must be .*>= 1"),
        (lambda: MeaningfulPerturbation(jitter=-1), "jitter must be"),
        (lambda: PredictionDifference(sampling="gibbs"), r"unknown sampling 'gibbs'.*'marginal', 'conditional'"),
        (lambda: PredictionDifference(n_samples=0), "n_samples must be"),
        (lambda: PredictionDifference(reference=torch.zeros(3, 8, 8)), r"reference must be .*\[N, C, H, W\]"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_inputs_fail_with_clear_errors(linear_model, x16, gap_cnn):
    x8 = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"window 9x9 is larger than the 8x8 image"):
        Occlusion(window=9)(linear_model, x8, 0)
    with pytest.raises(ValueError, match="grid 9x9 is larger"):
        RISE(grid=9)(linear_model, x8, 0)
    with pytest.raises(ValueError, match="does not fit"):
        LIME(grid=(9, 2))(linear_model, x8, 0)
    with pytest.raises(ValueError, match="mask_size 12x12 is larger"):
        MeaningfulPerturbation(mask_size=12)(linear_model, x8, 0)
    with pytest.raises(ValueError, match=r"window \+ 2 \* padding 8x10"):
        PredictionDifference(window=(4, 6), padding=2)(linear_model, torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="needs a batch of >= 2 images"):
        PredictionDifference(window=4, sampling="marginal")(gap_cnn, x16[:1], 0)
    with pytest.raises(ValueError, match="reference images have shape"):
        PredictionDifference(window=4, reference=torch.zeros(2, 1, 16, 16))(gap_cnn, x16, 0)
    with pytest.raises(ValueError, match=r"image batches of shape \[B, C, H, W\]"):
        RISE()(linear_model, torch.randn(2, 192), 0)
    with pytest.raises(TypeError, match="floating-point"):
        Occlusion(window=2)(linear_model, torch.ones(1, 3, 8, 8, dtype=torch.long), 0)


# ---------------------------------------------------------------------------------------------------------------
# issue 12: PredictionDifference reference sets, donors and memory; exact K-Lasso; documented costs
# ---------------------------------------------------------------------------------------------------------------


def test_prediction_difference_conditional_without_reference_names_the_minimum(gap_cnn, x16):
    """Issue 12.3: fitted on the explained batch the conditional Gaussian degenerates; it must not run silently."""
    pd = PredictionDifference(window=6, stride=5, padding=1, num_samples=2)
    assert pd.minimum_reference((3, 16, 16)) == 3  # D = 3 * 8 * 8 = 192 dimensions, 9 * 9 = 81 positions
    with pytest.raises(ValueError, match=r"needs reference images.*N >= 3 images"):
        pd(gap_cnn, x16, 1)
    few = PredictionDifference(window=6, stride=5, padding=1, num_samples=2, reference=REFERENCE16[:2])
    with pytest.raises(ValueError, match=r"reference holds 2 images, fewer than the 3 needed"):
        few(gap_cnn, x16, 1)
    ok = PredictionDifference(window=6, stride=5, padding=1, num_samples=2, reference=REFERENCE16[:3])
    assert torch.isfinite(ok(gap_cnn, x16, 1)).all()
    # the marginal sampler needs no reference set
    assert PredictionDifference(sampling="marginal").minimum_reference((3, 16, 16)) == 1


def test_prediction_difference_marginal_never_uses_the_explained_image_as_donor():
    """Issue 12.4: with reference=None and a batch of two, every donor is the other image, so the weight of
    evidence is exactly w . (x_b - x_other) / ln 2 over each window (half of it when the image could donate)."""
    model = LogitModel((3, 8, 8))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    window, stride = (3, 3), (2, 2)
    result = PredictionDifference(window=window, stride=stride, sampling="marginal", num_samples=4)(model, x, 0)
    w = model.w.detach().double()

    def evidence(b: int, r: int, c: int) -> float:
        diff = (x[b] - x[1 - b]).double()[:, r : r + 3, c : c + 3]
        return float((w[:, r : r + 3, c : c + 3] * diff).sum()) / math.log(2)

    expected = average_over_windows(evidence, 2, 8, 8, window, stride)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampling", ["conditional", "marginal"])
def test_prediction_difference_draws_replacement_patches_per_chunk(gap_cnn, x16, sampling, monkeypatch):
    """Issue 12.6: patches are drawn window by window as the chunks need them (not all windows x samples up
    front), so at most ~batch_size / num_samples + 2 windows of samples exist at a time."""
    events: list[tuple[str, int]] = []
    name = f"_{sampling}_sampler"
    original = getattr(PredictionDifference, name)

    def recording(self, *args, **kwargs):
        sample = original(self, *args, **kwargs)

        def wrapped(k: int):
            events.append(("draw", k))
            return sample(k)

        return wrapped

    monkeypatch.setattr(PredictionDifference, name, recording)
    num_samples, batch_size = 3, 4
    pd = PredictionDifference(
        window=4, stride=2, padding=1, sampling=sampling, num_samples=num_samples, batch_size=batch_size,
        reference=REFERENCE16,
    )
    evaluated = [0]

    def count(_module, args):
        evaluated[0] += args[0].shape[0]
        events.append(("forward", evaluated[0]))

    handle = gap_cnn.register_forward_pre_hook(count)
    try:
        pd(gap_cnn, x16[:1], 1)
    finally:
        handle.remove()
    draws = [k for kind, k in events if kind == "draw"]
    assert draws == list(range(len(draws))) and len(draws) == 49  # 7 x 7 windows, each drawn once, in order
    done = 0
    for kind, value in events:
        if kind == "forward":
            done = value - 1  # the unperturbed image is evaluated first
        else:  # window k's samples are drawn only when the evaluations before it are (nearly) done
            assert value * num_samples - done <= batch_size + num_samples, (value, done)


def test_k_lasso_returns_exactly_k_features_whenever_k_exist():
    """Issue 12.5: the selection follows the exact lasso path, so K features come back whenever the path holds
    K (a fixed lambda grid skipped over K in about a third of such cases)."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, p = int(rng.integers(20, 60)), int(rng.integers(4, 20))
        k = int(rng.integers(1, min(p, 8) + 1))
        z = torch.from_numpy((rng.random((n, p)) > 0.5).astype(float))
        y = z @ torch.from_numpy(rng.normal(size=p)) + 0.1 * torch.from_numpy(rng.normal(size=n))
        w = torch.from_numpy(np.exp(-rng.random(n)))
        assert len(_lasso_selection(z, y, w, k)) == k


def test_k_lasso_selection_matches_scikit_learns_lars_path():
    """An independent reference: scikit-learn's lars_path(method="lasso") on the same weighted, centred data;
    the last breakpoint with the most (at most K) non-zero coefficients, as the lime package reads it."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    for _ in range(30):
        n, p = int(rng.integers(20, 60)), int(rng.integers(4, 16))
        k = int(rng.integers(1, min(p, 6) + 1))
        z = (rng.random((n, p)) > 0.5).astype(float)
        y = z @ rng.normal(size=p) + 0.1 * rng.normal(size=n)
        w = np.exp(-rng.random(n))
        wn = w / w.sum()
        xw = (z - wn @ z) * np.sqrt(wn)[:, None]
        yw = (y - wn @ y) * np.sqrt(wn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, coefs = linear_model.lars_path(xw, yw, method="lasso")
        counts = [int((c != 0).sum()) for c in coefs.T]
        best = max(c for c in counts if c <= k)
        column = [i for i, c in enumerate(counts) if c == best][-1]
        expected = sorted(np.flatnonzero(coefs[:, column]).tolist())
        assert _lasso_selection(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w), k) == expected


def test_lime_k_lasso_on_a_network_keeps_exactly_k_segments(gap_cnn, x16):
    for k in (1, 3, 6):
        values = LIME(num_samples=60, grid=4, solver="k_lasso", n_features=k).explain_segments(gap_cnn, x16, 1)
        assert [int(torch.count_nonzero(v)) for v in values.values] == [k, k]


@pytest.mark.parametrize(
    ("method", "per_image"),
    [
        (lambda: LIME(num_samples=20, grid=4), 20),
        (lambda: KernelSHAP(num_samples=20, grid=4), 20),  # 2^16 coalitions > 20: 20 sampled (full, empty incl.)
        (lambda: KernelSHAP(num_samples=256, grid=2), 16),  # every one of the 2^4 coalitions
    ],
)
def test_lime_and_kernel_shap_cost_what_their_docstrings_say(gap_cnn, x16, method, per_image):
    """The cost docstrings state B * num_samples (LIME) and B * min(num_samples, 2^M) (KernelSHAP)."""
    attributor = method()
    with forward_sizes(gap_cnn) as sizes:
        attributor(gap_cnn, x16, 1)
    assert sum(sizes) == x16.shape[0] * per_image
    doc = " ".join(type(attributor).__doc__.split())
    expected = "``B * num_samples``" if isinstance(attributor, LIME) else "``B * min(num_samples, 2^M)``"
    assert f"Cost: {expected} model evaluations" in doc


# ---------------------------------------------------------------------------------------------------------------
# vocabulary: old argument names still work, with a DeprecationWarning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "old", "new", "value"),
    [
        (RISE, "n_masks", "num_samples", 12),
        (LIME, "n_samples", "num_samples", 12),
        (KernelSHAP, "n_samples", "num_samples", 12),
        (PredictionDifference, "n_samples", "num_samples", 12),
        (Occlusion, "fill", "baseline", "blur"),
        (LIME, "fill", "baseline", 0.5),
        (KernelSHAP, "fill", "baseline", "mean"),
    ],
)
def test_renamed_arguments_are_deprecated_aliases(cls, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old!r} is deprecated, use {new!r}"):
        built = cls(**{old: value})
    assert getattr(built, new) == value
    with pytest.warns(DeprecationWarning):
        assert getattr(built, old) == value
    assert cls(**{new: value}).__dict__ == built.__dict__ or repr(cls(**{new: value})) == repr(built)
    with pytest.raises(TypeError, match=f"got both {old!r}"):
        cls(**{old: value, new: value})
