"""Interpretable CNN filters (Zhang, Wu & Zhu, CVPR 2018): templates and mask in closed form, the mutual-
information loss against a brute-force computation, the LightningModule's wiring and errors, the evaluation
helpers on known answers."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.models.interpretable_filters import (
    InterpretableFilterClassifier,
    filter_loss,
    filter_mutual_information,
    filter_peak_positions,
    location_instability,
    mask_feature_map,
    part_templates,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_trainer(**kwargs):
    from lightning_xai.namespace import pl

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


# ---------------------------------------------------------------------------------------- templates and mask
def test_templates_decay_with_the_l1_distance_and_saturate_at_minus_one():
    t = part_templates(4, 4, beta=4.0, dtype=torch.float64)  # n = 4: each pixel step costs beta / n = 1
    assert t.shape == (16, 4, 4)
    mu = 1 * 4 + 2  # position (1, 2)
    for i, j in itertools.product(range(4), range(4)):
        d = abs(i - 1) + abs(j - 2)
        assert float(t[mu, i, j]) == max(1 - d, -1)
    t2 = part_templates(8, 8, beta=2.0, dtype=torch.float64)  # step cost 2 / 8
    assert float(t2[0, 0, 3]) == pytest.approx(1 - 2 * 3 / 8)
    assert float(t2[0, 7, 7]) == -1.0


def test_mask_keeps_the_peak_and_zeroes_everything_beyond_n_over_beta():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    x[0, 1, 5, 2] = 5.0  # a known peak
    masked = mask_feature_map(x, beta=4.0)
    assert float(masked[0, 1, 5, 2]) == 5.0
    for i, j in itertools.product(range(8), range(8)):
        d = abs(i - 5) + abs(j - 2)
        expected = max(float(x[0, 1, i, j]) * max(1 - 4 * d / 8, -1), 0.0)
        assert float(masked[0, 1, i, j]) == pytest.approx(expected)
    # every filter's map is zero at L1 distance >= n / beta = 2 from its own arg-max
    peak = x.flatten(2).argmax(2)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    dist = (rows - (peak // 8)[..., None, None]).abs() + (cols - (peak % 8)[..., None, None]).abs()
    assert (masked[dist >= 2] == 0).all() and (masked[dist < 2] > 0).all()
    # differentiable in x, with the template as the (constant) local derivative
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mask_feature_map(xg).sum(), xg)
    assert float(grad[0, 1, 5, 2]) == 1.0 and float(grad[0, 1, 5, 3]) == 0.5 and float(grad[0, 1, 0, 0]) == 0.0


# -------------------------------------------------------------------------------------- mutual information
def brute_force_mi(x: torch.Tensor, beta: float, alpha: float | None) -> list[float]:
    """MI(X; T) of each filter with explicit loops over templates and images (math.exp, float64)."""
    b, c, h, w = x.shape
    n2 = h * w
    tau = 0.5 / n2
    alpha = n2 / (1 + n2) if alpha is None else alpha
    n = max(h, w)
    out = []
    for f in range(c):
        templates, priors = [], []
        for mr, mc in itertools.product(range(h), range(w)):
            templates.append(
                [[tau * max(1 - beta * (abs(i - mr) + abs(j - mc)) / n, -1) for j in range(w)] for i in range(h)]
            )
            priors.append(alpha / n2)
        templates.append([[-tau] * w for _ in range(h)])
        priors.append(1 - alpha)
        likelihood = []  # p(x_k | T) for each template
        for t in templates:
            e = [math.exp(sum(float(x[k, f, i, j]) * t[i][j] for i in range(h) for j in range(w))) for k in range(b)]
            z = sum(e)
            likelihood.append([v / z for v in e])
        marginal = [sum(p * lik[k] for p, lik in zip(priors, likelihood, strict=True)) for k in range(b)]
        mi = sum(
            p * lik[k] * math.log(lik[k] / marginal[k])
            for p, lik in zip(priors, likelihood, strict=True)
            for k in range(b)
        )
        out.append(mi)
    return out


@pytest.mark.parametrize("shape, alpha", [((4, 2, 3, 3), None), ((3, 1, 2, 4), 0.7)])
def test_mutual_information_matches_a_brute_force_computation(shape, alpha):
    torch.manual_seed(0)
    x = 40 * torch.rand(*shape, dtype=torch.float64)  # large enough for a clearly non-zero MI
    got = filter_mutual_information(x, beta=4.0, alpha=alpha)
    expected = torch.tensor(brute_force_mi(x, 4.0, alpha), dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert (expected > 1e-4).all()
    torch.testing.assert_close(filter_loss(x, alpha=alpha), -expected.mean())


def test_mutual_information_bounds_and_known_values():
    # identical maps for every image: p(x|T) is uniform over the batch for every T, so MI = 0
    same = torch.rand(1, 2, 4, 4, dtype=torch.float64).expand(5, -1, -1, -1) * 30
    torch.testing.assert_close(filter_mutual_information(same), torch.zeros(2, dtype=torch.float64))
    # one sharp part per image, in its own corner of a 4x4 map (beta / n = 1: templates are -1 beyond L1
    # distance 2). A template within distance 1 of a corner (3 per corner) singles out that image: log(4) nats;
    # the 4 central templates and T- see four identical scores: 0. With the uniform prior (1/17 each):
    # MI = 12/17 * log(4) ...
    b = 4
    parts = torch.zeros(b, 1, 4, 4, dtype=torch.float64)
    for k, (i, j) in enumerate([(0, 0), (0, 3), (3, 0), (3, 3)]):
        parts[k, 0, i, j] = 4000.0
    mi_parts = float(filter_mutual_information(parts)[0])
    assert mi_parts == pytest.approx(12 / 17 * math.log(4), abs=1e-9)
    # ... and it vanishes as the activations shrink (p(x|T) -> uniform), and never exceeds log(B)
    assert float(filter_mutual_information(parts * 1e-6)[0]) < 1e-6
    torch.manual_seed(0)
    random_maps = 1000 * torch.rand(b, 3, 4, 4, dtype=torch.float64)
    assert (filter_mutual_information(random_maps) <= math.log(b) + 1e-9).all()
    # the images' order does not matter
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(filter_mutual_information(random_maps[perm]), filter_mutual_information(random_maps))


def test_loss_errors():
    with pytest.raises(ValueError, match="at least 2 images"):
        filter_loss(torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"must be 4-D \[B, C, H, W\]"):
        filter_loss(torch.rand(3, 4))
    with pytest.raises(ValueError, match="alpha"):
        filter_loss(torch.rand(2, 2, 4, 4), alpha=1.5)
    with pytest.raises(ValueError, match="beta must be"):
        mask_feature_map(torch.rand(2, 2, 4, 4), beta=0)


# -------------------------------------------------------------------------------------------- the module
def test_default_wiring_on_small_cnn_masks_after_the_bn_relu():
    model = InterpretableFilterClassifier(backbone="small_cnn")
    assert model.filter_layer == "backbone.features.0"
    assert model.activation_name == "backbone.features.2" and not model.apply_relu
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.backbone.features(model.backbone.blocks(x))  # output of the masked ReLU
    peak = feats.flatten(2).argmax(2)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    dist = (rows - (peak // 8)[..., None, None]).abs() + (cols - (peak % 8)[..., None, None]).abs()
    assert (feats[dist >= 2] == 0).all()  # n / beta = 8 / 4
    assert (feats.flatten(2).amax(2) > 0).float().mean() > 0.5  # the peaks survive


def test_vgg_conv_and_a_conv_outside_a_sequential():
    vgg = InterpretableFilterClassifier(backbone="vgg_small", filter_layer="backbone.features.7")
    assert vgg.activation_name == "backbone.features.8" and not vgg.apply_relu

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 6)

        def forward(self, x):
            return self.head(self.conv(x).mean(dim=(2, 3)))

    bare = InterpretableFilterClassifier(backbone=Bare(), filter_layer="backbone.conv")
    assert bare.activation_name == "backbone.conv" and bare.apply_relu
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        conv = bare.backbone.conv
        raw = F.conv2d(x, conv.weight, conv.bias, padding=1)  # the conv without its (masking) hook
        expected = bare.backbone.head(mask_feature_map(F.relu(raw)).mean(dim=(2, 3)))
    torch.testing.assert_close(bare(x), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"filter_layer": "backbone.features.2"}, ValueError, "is a ReLU, not an nn.Conv2d"),
        ({"filter_layer": "backbone.head"}, ValueError, r"Conv2d layers: \['backbone.blocks.0'"),
        ({"filter_layer": "backbone.featurs.0"}, ValueError, "not found"),
        ({"filter_loss_weight": -1.0}, ValueError, "filter_loss_weight must be"),
        ({"beta": 0.0}, ValueError, "beta must be"),
        ({"alpha": 1.0}, ValueError, "alpha"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        InterpretableFilterClassifier(**kwargs)


def test_an_activation_layer_without_a_4d_output_is_a_clear_error():
    model = InterpretableFilterClassifier(activation_layer="backbone.head")
    with pytest.raises(ValueError, match=r"must be 4-D \[B, 64, H, W\]; got \[2, 6\]"):
        model(torch.rand(2, 3, 32, 32))


def test_training_loss_is_cross_entropy_plus_weighted_filter_loss():
    torch.manual_seed(0)
    model = InterpretableFilterClassifier(filter_loss_weight=2.5)
    model.train()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    total = model.training_step((x, y, None), 0)
    # the same computation written out: record the masked map with a hook of our own
    maps = []
    handle = model.backbone.features.register_forward_hook(lambda m, i, o: maps.append(o))
    try:
        torch.manual_seed(1)
        logits = model(x)
    finally:
        handle.remove()
    expected = F.cross_entropy(logits, y) + 2.5 * filter_loss(maps[0])
    torch.testing.assert_close(total, expected)
    assert not model._masked  # the recorded maps are released after the step
    (grad,) = torch.autograd.grad(total, model.backbone.features[0].weight)
    assert grad.abs().sum() > 0


def test_example_config_runs_with_the_cli(tmp_path):
    from lightning_xai.cli import main

    cli = main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "examples", "configs", "interpretable_filters.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.n_train=16",
            "--data.init_args.n_val=16",
            "--data.init_args.n_test=16",
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=16",
        ]
    )
    assert isinstance(cli.model, InterpretableFilterClassifier)
    assert "val_filter_loss" in cli.trainer.callback_metrics


# ---------------------------------------------------------------------------------------------- evaluation
def test_peak_positions_on_a_known_map_and_no_side_effects():
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.AvgPool2d(2), nn.Flatten())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    images = torch.zeros(3, 1, 8, 8)
    spots = [(1, 6), (4, 4), (7, 0)]  # (row, col)
    for k, (r, c) in enumerate(spots):
        images[k, 0, r, c] = 1.0
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    positions, peaks = filter_peak_positions(model, "1", [images[:2], (images[2:], None)])
    assert_unchanged(model, before)
    expected = torch.tensor([[(c // 2 + 0.5) * 2, (r // 2 + 0.5) * 2] for r, c in spots])
    torch.testing.assert_close(positions[:, 0], expected)
    torch.testing.assert_close(peaks[:, 0], torch.full((3,), 0.25))


def test_location_instability_closed_forms():
    landmarks = torch.tensor([[10.0, 10.0], [20.0, 5.0], [0.0, 0.0]])
    # filter 0: always 3 px to the right of the landmark (perfectly stable); filter 1: distances 0, 4, 8
    positions = torch.stack(
        [landmarks + torch.tensor([3.0, 0.0]), landmarks + torch.tensor([[0.0, 0.0], [0.0, 4.0], [8.0, 0.0]])], dim=1
    )
    got = location_instability(positions, landmarks, (30, 40))
    torch.testing.assert_close(got, torch.tensor([0.0, 4.0 / 50.0]))  # std(0, 4, 8) = 4; diagonal 50
    peaks = torch.tensor([[1.0, 1.0], [2.0, 0.0], [3.0, 2.0]])
    top = location_instability(positions, landmarks, (30, 40), peaks=peaks, top_k=2)
    torch.testing.assert_close(top, torch.tensor([0.0, (8 / math.sqrt(2)) / 50.0]))  # images 0 and 2 for filter 1
    with pytest.raises(ValueError, match="top_k must be"):
        location_instability(positions, landmarks, (30, 40), peaks=peaks, top_k=5)
