"""Dissection and relevant units on token layers ``[B, T, D]`` (vision transformers): the unit maps are the patch
tokens laid out on their grid (class token dropped), checked against hand reshapes of hooked activations, a planted
token layer whose units are the concept masks, and clear errors for grids that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_unchanged, hooked_output, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.interpretation.dissection import NetworkDissection
from lightning_xai.interpretation.layer_maps import LayerReader, unit_maps
from lightning_xai.interpretation.relevant_units import RelevantUnitAnalysis, ablate_units, unit_ablation
from lightning_xai.models.transformers import vit_tiny

VIT_LAYER = "encoder.layers.encoder_layer_1"
NAMES = ["shape:a", "shape:b", "colour:c", "colour:d"]


def by_hand(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, 1 + h*w, D]`` -> ``[B, D, h, w]``: drop the class token, row-major patches, one loop per position."""
    out = torch.empty(tokens.shape[0], tokens.shape[2], h, w)
    for r in range(h):
        for c in range(w):
            out[:, :, r, c] = tokens[:, 1 + r * w + c]
    return out


class PatchTokens(nn.Module):
    """A linear token layer: each ``patch x patch`` patch of the image becomes a token whose channel ``k`` is the
    mean of image channel ``k`` over the patch; a class token of value 5 (larger than any patch token) is
    prepended. ``units`` emits ``[B, 1 + h*w, C]``. Fed concept masks as images, unit ``k`` is concept ``k``'s
    mask on the patch grid."""

    def __init__(self, channels: int, patch: int = 8, extra_tokens: int = 0) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, channels, patch, stride=patch, bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            for k in range(channels):
                self.embed.weight[k, k] = 1.0 / patch**2
        self.cls = nn.Parameter(torch.full((1, 1 + extra_tokens, channels), 5.0))
        self.units = nn.Identity()
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)  # [B, h*w, C], row-major
        tokens = self.units(torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1))
        return self.head(tokens[:, 0])


def grid_masks(n: int, k: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """``[n, k, h, w]`` bool: each concept is a random rectangle of patches in about half of the images."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, k, h, w, dtype=torch.bool)
    for i in range(n):
        for c in range(k):
            if torch.rand(1, generator=g) < 0.5:
                rh, rw = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
                top = int(torch.randint(0, h - rh + 1, (1,), generator=g))
                left = int(torch.randint(0, w - rw + 1, (1,), generator=g))
                masks[i, c, top : top + rh, left : left + rw] = True
    return masks


def planted_data(n: int = 24, h: int = 4, w: int = 6, patch: int = 8) -> tuple[list, torch.Tensor]:
    """Images = the concept masks blown up to patches (``[n, 4, h*patch, w*patch]``), masks at the grid's size."""
    masks = grid_masks(n, len(NAMES), h, w)
    images = masks.float().repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    data = [(images[i : i + 8], masks[i : i + 8], torch.arange(i, min(i + 8, n))) for i in range(0, n, 8)]
    return data, masks


# ------------------------------------------------------------------------------------------------ unit maps


def test_vit_unit_maps_are_the_patch_tokens_on_their_grid():
    torch.manual_seed(0)
    vit = vit_tiny(image_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = hooked_output(vit, VIT_LAYER, x)
    assert tokens.shape == (3, 17, 32)
    expected = by_hand(tokens, 4, 4)
    for stop in (True, False):
        assert torch.allclose(LayerReader(vit, VIT_LAYER, stop)(x), expected, atol=1e-5, rtol=0)
    assert torch.allclose(LayerReader(vit, VIT_LAYER, True, reshape=(4, 4))(x), expected, atol=1e-5, rtol=0)
    # the thresholded masks of the dissection are those of the hand-made maps
    thresholds = expected.flatten(2).median(dim=2).values.median(dim=0).values[[0, 5, 31]]
    masks = NetworkDissection(VIT_LAYER).unit_masks(vit, x, [0, 5, 31], thresholds, (4, 4))
    assert torch.equal(masks, expected[:, [0, 5, 31]] > thresholds.view(1, -1, 1, 1))
    assert 0 < int(masks.sum()) < masks.numel()


def test_vit_dissection_counts_equal_an_independent_computation():
    torch.manual_seed(1)
    vit = vit_tiny(image_size=32, patch_size=8).eval()
    put_in_train_mode_with_grads(vit)
    before = snapshot(vit)
    images = torch.randn(20, 3, 32, 32)
    masks = grid_masks(20, len(NAMES), 4, 4, seed=3)
    data = [(images[i : i + 6], masks[i : i + 6], torch.arange(i, min(i + 6, 20))) for i in range(0, 20, 6)]
    result = NetworkDissection(VIT_LAYER, quantile=0.05)(vit, data, NAMES)
    assert_unchanged(vit, before)
    assert result.num_units == 32, "the units of a token layer are its channels"
    maps = by_hand(hooked_output(vit, VIT_LAYER, images), 4, 4)
    fires = (maps > result.thresholds.view(1, -1, 1, 1)).numpy()  # [N, U, 4, 4]
    expected = np.einsum("nuhw,nchw->uc", fires.astype(np.int64), masks.numpy().astype(np.int64))
    assert np.array_equal(result.intersection.numpy(), expected)
    assert np.array_equal(result.unit_area.numpy(), fires.sum(axis=(0, 2, 3)))
    # the threshold is the top 5% of each unit's patch-token values (the class token is not a position)
    share = fires.mean(axis=(0, 2, 3))
    assert np.all(np.abs(share - 0.05) <= 0.02), share
    # the top images are those of the largest patch-token value
    best = maps.flatten(2).amax(dim=2).argmax(dim=0)
    assert torch.equal(result.top_indices[:, 0], best)


# ------------------------------------------------------------------------------------------------ planted units


@pytest.mark.parametrize("reshape", [None, (4, 6), "callable"])
def test_planted_token_units_have_iou_one_with_their_concepts(reshape):
    data, masks = planted_data()
    model = PatchTokens(len(NAMES))
    assert float(masks.float().mean(dim=(0, 2, 3)).max()) < 0.3
    if reshape == "callable":
        def reshape(t: torch.Tensor) -> torch.Tensor:
            return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 6)
    result = NetworkDissection("units", quantile=0.3, reshape=reshape)(model, data, NAMES)
    assert result.num_units == len(NAMES)
    assert torch.equal(torch.diagonal(result.iou), torch.ones(len(NAMES), dtype=torch.float64))
    concept, best = result.best()
    assert torch.equal(concept, torch.arange(len(NAMES))) and bool((best == 1).all())
    assert torch.equal(result.unit_area, masks.sum(dim=(0, 2, 3)))


def test_the_grid_matters_a_transposed_grid_loses_the_concepts():
    data, _ = planted_data()
    model = PatchTokens(len(NAMES))
    right = NetworkDissection("units", quantile=0.3)(model, data, NAMES)
    wrong = NetworkDissection("units", quantile=0.3, reshape=(6, 4))(model, data, NAMES)  # 24 tokens either way
    assert float(torch.diagonal(right.iou).mean()) == 1.0
    assert float(torch.diagonal(wrong.iou).mean()) < 0.6, torch.diagonal(wrong.iou)


def test_register_tokens_are_dropped_with_their_grid():
    """Three prefix tokens (class + two registers): inferred from 27 tokens on 32x48 images, or given by (4, 6)."""
    data, _ = planted_data()
    model = PatchTokens(len(NAMES), extra_tokens=2)
    for reshape in (None, (4, 6)):
        result = NetworkDissection("units", quantile=0.3, reshape=reshape)(model, data, NAMES)
        assert torch.equal(torch.diagonal(result.iou), torch.ones(len(NAMES), dtype=torch.float64))


def test_compositional_and_unit_masks_read_token_layers():
    data, masks = planted_data()
    model = PatchTokens(len(NAMES))
    dissection = NetworkDissection("units", quantile=0.3)
    result = dissection(model, data, NAMES)
    explanations = dissection.explain_compositional(model, data, result, [0, 1], max_length=2)
    assert [e.iou for e in explanations] == [1.0, 1.0]
    images = data[0][0]
    unit_masks = dissection.unit_masks(model, images, [2], result.thresholds[[2]], (4, 6))
    assert torch.equal(unit_masks[:, 0], masks[:8, 2])


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [(0, 4), (4,), (4, 6, 1), "4x6", (True, 2), 7, (4.0, 6.0)])
def test_bad_reshape_fails_at_construction_naming_the_class_value_and_choices(bad):
    for make, owner in (
        (lambda: NetworkDissection("units", reshape=bad), "NetworkDissection"),
        (lambda: RelevantUnitAnalysis("units", reshape=bad), "RelevantUnitAnalysis"),
    ):
        with pytest.raises(ValueError) as info:
            make()
        message = str(info.value)
        assert message.startswith(f"{owner}: reshape must be None"), message
        assert repr(bad) in message and "(h, w)" in message and "callable" in message


class First23(nn.Module):
    """A token layer of 23 tokens (the first 23 patch tokens of a 4x6 grid, no class token)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = PatchTokens(len(NAMES)).embed
        self.units = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.units(self.embed(x).flatten(2).transpose(1, 2)[:, :23])
        return tokens.mean(dim=(1, 2))[:, None]


def test_a_grid_that_does_not_fit_the_tokens_is_a_clear_error():
    data, _ = planted_data()
    model = PatchTokens(len(NAMES))
    pattern = (
        r"NetworkDissection: layer 'units' emits token activations \[8, 25, 4\] that reshape=\(7, 7\) cannot lay "
        r"out on a patch grid.*reshape=None infers 1 prefix token\(s\) and the grid \(4, 6\).*Valid reshape "
        r"values: \['None .*', '\(h, w\) .*', 'a callable .*'\]"
    )
    with pytest.raises(ValueError, match=pattern):
        NetworkDissection("units", reshape=(7, 7))(model, data, NAMES)
    # no grid of the images' 2:3 aspect ratio fits 23 tokens minus 0..16 prefix tokens
    with pytest.raises(ValueError, match=r"NetworkDissection: layer 'units' emits .*\[8, 23, 4\].*no grid"):
        NetworkDissection("units")(First23(), data, NAMES)
    # a callable that returns the wrong shape is named too
    with pytest.raises(ValueError, match=r"NetworkDissection: .*reshape callable must return \[B, D, h, w\]"):
        NetworkDissection("units", reshape=lambda t: t)(model, data, NAMES)


def test_unit_maps_leave_feature_maps_alone():
    maps = torch.randn(2, 5, 3, 4)
    assert unit_maps(maps, (12, 16)) is maps


# ------------------------------------------------------------------------------------------------ relevant units


def test_relevant_unit_features_of_a_token_layer_are_patch_channel_energies():
    torch.manual_seed(2)
    vit = vit_tiny(image_size=32, patch_size=8).eval()
    x = torch.randn(5, 3, 32, 32)
    feats, _, units = RelevantUnitAnalysis(VIT_LAYER).features(vit, x)
    expected = by_hand(hooked_output(vit, VIT_LAYER, x), 4, 4).square().mean(dim=(2, 3))
    assert units == [(VIT_LAYER, d) for d in range(32)]
    assert torch.allclose(feats, expected, rtol=1e-5, atol=1e-6)


def test_planted_token_units_are_relevant_and_their_ablation_hits_their_class():
    """Class c's images show concept c; unit c of the planted token layer is concept c: the lasso picks unit c for
    class c, and zeroing it (in every token) makes a head that reads unit energies lose exactly that class."""
    g = torch.Generator().manual_seed(0)
    n, h, w, patch = 60, 4, 6, 8
    labels = torch.arange(n) % 3
    masks = torch.zeros(n, 4, h, w)
    for i in range(n):
        top, left = int(torch.randint(0, h - 1, (1,), generator=g)), int(torch.randint(0, w - 1, (1,), generator=g))
        masks[i, int(labels[i]), top : top + 2, left : left + 2] = 1.0
    images = masks.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)

    class EnergyHead(PatchTokens):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patches = self.embed(x).flatten(2).transpose(1, 2)
            tokens = self.units(torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1))
            energy = tokens[:, 1:, :3].square().mean(dim=1)  # class c = energy of unit c
            return torch.cat([energy, torch.full_like(energy[:, :1], 1e-3)], dim=1)  # "nothing seen" = class 3

    model = EnergyHead(4).eval()
    result = RelevantUnitAnalysis("units", mu=1.0).fit(model, (images, labels))
    for c in range(3):
        assert result.units_by_layer(c) == {"units": [c]}, result.relevant(c)
    report = unit_ablation(model, result, (images, labels), num_random=2)
    assert torch.allclose(report.base_accuracy, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(report.relevant_drop, torch.ones(3, dtype=torch.float64))
    explanation = result.explain(model, images[:6], top_k=1)
    for i in range(6):
        peak = divmod(int(explanation.heatmap[i, 0].argmax()), w * patch)
        assert images[i, int(labels[i]), peak[0], peak[1]] == 1, "the heatmap peaks on the concept's patches"


def test_ablate_units_zeroes_a_token_channel_in_every_token():
    torch.manual_seed(3)
    vit = vit_tiny(image_size=32, patch_size=8).eval()
    before = snapshot(vit)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    with ablate_units(vit, {VIT_LAYER: [1, 4]}, token_layers={VIT_LAYER}):
        handle = vit.encoder.ln.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()))
        vit(x)
        handle.remove()
    assert seen["in"].shape == (2, 17, 32)
    assert (seen["in"][:, :, [1, 4]] == 0).all() and (seen["in"][:, :, [0, 2]] != 0).all()
    assert_unchanged(vit, before)
    with pytest.raises(ValueError, match="out of range"):
        with ablate_units(vit, {VIT_LAYER: [32]}, token_layers=[VIT_LAYER]):
            vit(x)
    assert_unchanged(vit, before)
