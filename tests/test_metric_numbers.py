"""Bad numbers never become plausible scores, ties are never resolved by position, HOG is scikit-image's, and
the sanity checks run callables in eval mode (issue 18 items 3-6 and 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import GapCNN, LinearModel
from torch import Tensor, nn

from lightning_xai.evaluation import (
    AOPC,
    DataRandomization,
    DeletionAUC,
    Infidelity,
    MaskIoU,
    ModelRandomization,
    RelevanceRank,
    aopc,
    compare_maps,
    deletion_auc,
    deletion_curve,
    hog_pearson,
    infidelity,
    insertion_auc,
    mask_iou,
    max_sensitivity,
    pearson_correlation,
    relevance_rank,
    spearman_correlation,
    ssim,
)
from lightning_xai.evaluation.similarity import hog_descriptor


def _images(n: int = 2, size: int = 8, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Item 4: similarity measures refuse NaN / inf
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_similarities_refuse_non_finite_maps_and_name_the_samples(bad):
    a = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[1, 5, 7] = bad
    for fn in (spearman_correlation, pearson_correlation, ssim, hog_pearson):
        with pytest.raises(ValueError, match=r"NaN or inf.*samples \[1\]"):
            fn(a, b)
    for measure in ("spearman", "spearman_abs", "ssim", "hog_pearson"):
        with pytest.raises(ValueError, match=r"samples \[1\]"):
            compare_maps(b, a, measure)


# ----------------------------------------------------------------------------------------------------------------
# Item 5: non-finite inputs or model scores are errors, not exclusions
# ----------------------------------------------------------------------------------------------------------------


class NaNForBrightImages(nn.Module):
    """Logits of a linear model, NaN for images whose mean exceeds 0.9 (a model that diverged on some inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LinearModel((3, 8, 8), 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        bright = x.flatten(1).mean(1, keepdim=True) > 0.9
        return torch.where(bright, torch.full_like(out, float("nan")), out)


def test_a_nan_input_pixel_raises_naming_the_sample():
    x, maps = _images(3), torch.randn(3, 1, 8, 8)
    x[2, 1, 3, 3] = float("nan")
    model = LinearModel((3, 8, 8), 3)
    for fn in (deletion_auc, insertion_auc, aopc, infidelity):
        with pytest.raises(ValueError, match=r"inputs contain NaN or inf.*samples \[2\]"):
            fn(maps, x, model, 0)
    with pytest.raises(ValueError, match=r"samples \[2\]"):
        max_sensitivity(maps, x, model, 0, lambda m, i, t: i.sum(1, keepdim=True))
    metric = DeletionAUC(steps=4)
    with pytest.raises(ValueError, match=r"samples \[2\]"):
        metric.update(maps, x, model, 0)
    assert metric.num_excluded == 0


def test_a_nan_model_score_raises_and_is_never_counted_as_excluded():
    x, maps = _images(3), torch.randn(3, 1, 8, 8)
    x[1] = 1.0  # the model gives NaN for this image
    model = NaNForBrightImages()
    for fn in (deletion_auc, aopc, infidelity):
        with pytest.raises(ValueError, match=r"NaN or inf scores for samples \[1\]"):
            fn(maps, x, model, 0)
    for metric in (DeletionAUC(steps=4), AOPC(region_size=4), Infidelity(num_samples=2)):
        with pytest.raises(ValueError, match=r"NaN or inf scores"):
            metric.update(maps, x, model, 0)
        assert metric.num_excluded == 0 and int(metric.count) == 0


# ----------------------------------------------------------------------------------------------------------------
# Item 6: ties are never resolved by position
# ----------------------------------------------------------------------------------------------------------------


def _row_masks(size: int = 8) -> tuple[Tensor, Tensor]:
    top = torch.zeros(1, 1, size, size, dtype=torch.bool)
    top[..., :2, :] = True
    return top, top.flip(-2)  # the same area in the top rows and in the bottom rows


@pytest.mark.parametrize("constant", [0.0, 1.5])
def test_constant_maps_score_the_same_wherever_the_mask_is(constant):
    top, bottom = _row_masks()
    flat = torch.full((1, 1, 8, 8), constant)
    share = 16 / 64  # the mask's share of the image: the expected top-k precision of a random pick
    for mask in (top, bottom):
        assert relevance_rank(flat, mask).item() == pytest.approx(share)
        # expected IoU of a random pick of 16 pixels with a 16-pixel mask, by the hypergeometric law
        expected = sum(
            math.comb(16, i) * math.comb(48, 16 - i) / math.comb(64, 16) * i / (32 - i) for i in range(17)
        )
        assert mask_iou(flat, mask).item() == pytest.approx(expected, rel=1e-6)
        assert mask_iou(flat, mask, fraction=0.5).item() == mask_iou(flat, top, fraction=0.5).item()


def test_partial_ties_count_by_expected_value():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, :] = True  # 4 mask pixels in the top row
    heat = torch.zeros(1, 1, 4, 4)
    heat[..., 0, 0] = 2.0  # one sure hit, then 15 tied pixels for 3 places, 3 of them in the mask
    assert relevance_rank(heat, mask).item() == pytest.approx((1 + 3 * 3 / 15) / 4)
    metric = RelevanceRank()
    metric.update(heat, mask)
    metric.update(heat.flip(-2), mask.flip(-2))
    assert metric.compute().item() == pytest.approx((1 + 3 * 3 / 15) / 4)
    iou = MaskIoU()
    iou.update(heat, mask)
    iou.update(heat.flip(-2), mask.flip(-2))
    assert iou.compute().item() == pytest.approx(mask_iou(heat, mask).item())


class TopHalfSum(nn.Module):
    """Logit 0 = sum of the top half of the image, logit 1 = 0."""

    def forward(self, x: Tensor) -> Tensor:
        top = x[:, :, : x.shape[2] // 2].flatten(1).sum(1)
        return torch.stack([top, torch.zeros_like(top)], dim=1)


def test_deletion_does_not_delete_tied_pixels_row_by_row():
    x = torch.ones(1, 1, 16, 16)
    heat = torch.ones(1, 1, 16, 16)
    heat[..., -1, -1] = 2.0  # not constant, but 255 tied pixels
    _, scores = deletion_curve(heat, x, TopHalfSum(), 0, steps=4, softmax=False)
    # row-major tie-breaking would delete the whole top half first (score 0 at half the pixels deleted)
    assert 0.3 < scores[0, 2].item() / scores[0, 0].item() < 0.7


def test_constant_maps_are_excluded_from_curve_metrics_and_counted():
    x, model = _images(2), LinearModel((3, 8, 8), 3)
    maps = torch.randn(2, 1, 8, 8)
    maps[1] = 0.25
    assert torch.isnan(deletion_auc(maps, x, model, 0, steps=4)).tolist() == [False, True]
    assert torch.isnan(aopc(maps, x, model, 0, region_size=4)).tolist() == [False, True]
    for metric in (DeletionAUC(steps=4), AOPC(region_size=4)):
        metric.update(maps, x, model, 0)
        assert metric.num_excluded == 1
        single = type(metric)(steps=4) if isinstance(metric, DeletionAUC) else AOPC(region_size=4)
        single.update(maps[:1], x[:1], model, 0)
        torch.testing.assert_close(metric.compute(), single.compute())
        torch.testing.assert_close(metric.curve()[1], single.curve()[1])


# ----------------------------------------------------------------------------------------------------------------
# Item 9: HOG as scikit-image computes it
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (41, 53)])
@pytest.mark.parametrize("norm", ["L2-Hys", "L2", "L1", "L1-sqrt"])
def test_hog_descriptor_matches_scikit_image(shape, norm):
    feature = pytest.importorskip("skimage.feature")
    image = torch.rand(1, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = hog_descriptor(image, block_norm=norm)[0].numpy().ravel()
    ref = feature.hog(image[0].numpy(), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3), block_norm=norm)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_hog_pearson_is_the_correlation_of_scikit_image_features():
    feature = pytest.importorskip("skimage.feature")
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(3, 40, 40, generator=gen, dtype=torch.float64)
    b = (a + 0.5 * torch.rand(3, 40, 40, generator=gen, dtype=torch.float64)) * torch.linspace(0.2, 1, 40)
    ours = hog_pearson(a, b)
    for i in range(3):
        fa, fb = (feature.hog(m[i].numpy(), cells_per_block=(3, 3), block_norm="L2-Hys") for m in (a, b))
        assert ours[i].item() == pytest.approx(np.corrcoef(fa, fb)[0, 1], abs=1e-6)
    # block normalisation is local: it changes the correlation of the features (1x1 blocks differ from 3x3)
    assert not torch.allclose(hog_pearson(a, b, block_size=1), ours, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Item 3: sanity checks call the attributor in eval mode, without side effects
# ----------------------------------------------------------------------------------------------------------------


def _gradient(model: nn.Module, inputs: Tensor, target) -> Tensor:
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        t = target if isinstance(target, Tensor) else torch.full((x.shape[0],), int(target))
        (grad,) = torch.autograd.grad(out.gather(1, t.view(-1, 1)).sum(), x)
    return grad


def test_model_randomization_is_reproducible_with_a_train_mode_model():
    model, x = GapCNN(seed=0).train(), _images(3, 12)
    check = ModelRandomization(_gradient, similarity=("spearman",))
    rng = torch.get_rng_state()
    first = check.check(model, x, 1).similarities["spearman"]
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was consumed"
    second = check.check(model, x, 1).similarities["spearman"]
    torch.testing.assert_close(first, second)
    assert model.training and first[0].min().item() == pytest.approx(1.0)  # self-comparison: no dropout noise


def test_data_randomization_leaves_the_users_model_alone():
    model, x = GapCNN(seed=0).train(), _images(4, 12)
    bn = model.features[3]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    result = DataRandomization(_gradient, similarity=("spearman",)).check(
        lambda labels: GapCNN(seed=1).train(), torch.arange(6) % 4, x, 1, model=model
    )
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2] and model.training
    again = DataRandomization(_gradient, similarity=("spearman",)).check(
        lambda labels: GapCNN(seed=1).train(), torch.arange(6) % 4, x, 1, model=model
    )
    torch.testing.assert_close(result.similarities["spearman"], again.similarities["spearman"])


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary (issue 15 item 5): num_samples, with the old name as a deprecated alias
# ----------------------------------------------------------------------------------------------------------------


def test_samples_is_a_deprecated_alias_of_num_samples():
    from lightning_xai.evaluation import MaxSensitivity

    x, maps, model = _images(2), torch.randn(2, 1, 8, 8), LinearModel((3, 8, 8), 3)
    with pytest.warns(DeprecationWarning, match="'samples' is deprecated; use 'num_samples'"):
        metric = Infidelity(samples=3)
    assert metric.num_samples == 3
    with pytest.warns(DeprecationWarning, match="use num_samples"):
        assert metric.samples == 3
    with pytest.warns(DeprecationWarning, match="num_samples"):
        assert MaxSensitivity(_gradient, samples=2).num_samples == 2
    with pytest.warns(DeprecationWarning, match="num_samples"):
        old = infidelity(maps, x, model, 0, samples=4)
    torch.testing.assert_close(old, infidelity(maps, x, model, 0, num_samples=4))
    with pytest.warns(DeprecationWarning, match="num_samples"):
        max_sensitivity(maps, x, model, 0, _gradient, samples=2)
