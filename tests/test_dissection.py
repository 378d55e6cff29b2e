"""Network dissection: the quantile sketch, IoU counting against independent computations, compositional
explanations, the no-side-effect contract, the callback, and DDP over two CPU processes."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import GapCNN, assert_unchanged, hooked_output, put_in_train_mode_with_grads, snapshot
from lightning_helpers import run_processes
from torch import nn

from lightning_xai.data.concepts import ConceptScenes
from lightning_xai.interpretation.compositional import Formula, compositional_search
from lightning_xai.interpretation.dissection import (
    TABLE_COLUMNS,
    DissectionResult,
    NetworkDissection,
    categories_from_names,
    dissect,
    upsample_bilinear,
)
from lightning_xai.interpretation.quantiles import QuantileSketch

# ----------------------------------------------------------------------------------------------------- fixtures


def random_concept_masks(n: int, k: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[n, k, size, size]`` bool: each concept is a random rectangle in about half of the images."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, k, size, size, dtype=torch.bool)
    for i in range(n):
        for c in range(k):
            if torch.rand(1, generator=g) < 0.5:
                h, w = (int(v) for v in torch.randint(2, size // 2, (2,), generator=g))
                top, left = (
                    int(torch.randint(0, size - h, (1,), generator=g)),
                    int(torch.randint(0, size - w, (1,), generator=g)),
                )
                masks[i, c, top : top + h, left : left + w] = True
    return masks


class Echo(nn.Module):
    """Fed the stack of concept masks, unit ``k`` of ``units`` outputs exactly the mask of concept ``k``; with
    ``planted``, one extra unit outputs ``concept a AND NOT concept b``."""

    def __init__(self, planted: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.planted = planted
        self.units = nn.Identity()
        self.head = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.planted is not None:
            a, b = self.planted
            x = torch.cat([x, x[:, a : a + 1] * (1 - x[:, b : b + 1])], dim=1)
        return self.head(self.units(x).mean(dim=(1, 2, 3))[:, None])


def batches_of(images: torch.Tensor, masks: torch.Tensor, size: int, with_indices: bool = True) -> list:
    out = []
    for start in range(0, images.shape[0], size):
        sl = slice(start, start + size)
        idx = torch.arange(images.shape[0])[sl]
        out.append((images[sl], masks[sl], idx) if with_indices else (images[sl], masks[sl]))
    return out


NAMES6 = ["shape:a", "shape:b", "colour:c", "colour:d", "colour:e", "texture:f"]


def numpy_iou(unit_masks: np.ndarray, concept_masks: np.ndarray) -> np.ndarray:
    """Reference IoU over the whole set: unit masks ``[N, U, H, W]``, concept masks ``[N, C, H, W]`` (bool)."""
    units, concepts = unit_masks.shape[1], concept_masks.shape[1]
    out = np.zeros((units, concepts))
    for u in range(units):
        for c in range(concepts):
            inter = np.logical_and(unit_masks[:, u], concept_masks[:, c]).sum()
            union = np.logical_or(unit_masks[:, u], concept_masks[:, c]).sum()
            out[u, c] = inter / union if union else 0.0
    return out


# ------------------------------------------------------------------------------------------------ quantile sketch


def _streams(n: int = 60_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, n, generator=g)
    x[1] = torch.relu(x[1])  # half exact zeros
    x[2] = torch.exp(2 * x[2])  # log-normal, heavy right tail
    x[3] = torch.relu(x[3]) * 1e3
    x[3, :5] = 1e7  # a few huge outliers
    x[4] = -torch.rand(n, generator=g) * 1e-3  # small negative values
    return x


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99, 0.995, 1.0])
def test_sketch_quantiles_match_torch_quantile_within_one_percent_rank(p):
    x = _streams()
    sketch = QuantileSketch(5)
    for chunk in x.split(7001, dim=1):
        sketch.update(chunk, dim=0)
    estimate = sketch.quantile(p)
    exact = torch.quantile(x.double(), p, dim=1)
    # rank error: distance from p to the range of ranks the estimate has (ties make it a range)
    below = (x < estimate[:, None]).double().mean(dim=1)
    at_or_below = (x <= estimate[:, None]).double().mean(dim=1)
    rank_error = torch.clamp(below - p, min=0) + torch.clamp(p - at_or_below, min=0)
    assert float(rank_error.max()) <= 0.01
    bound = sketch.rank_error(p)
    assert bool((rank_error <= bound + 1e-12).all()), (rank_error, bound)
    assert bool(((estimate.double() - exact).abs() <= sketch.cell_width(p).double() + 1e-12).all())
    if p in (0.0, 1.0):  # extremes are tracked exactly
        assert torch.equal(estimate, x.amin(1) if p == 0.0 else x.amax(1))


def test_sketch_top_quantile_marks_the_right_fraction():
    """What dissection needs: about ``q`` of the values lie above the top-``q`` threshold."""
    x = _streams(200_000, seed=1)
    sketch = QuantileSketch(5)
    sketch.update(x, dim=0)
    threshold = sketch.quantile(1 - 0.005)
    above = (x > threshold[:, None]).double().mean(dim=1)
    assert torch.allclose(above, torch.full_like(above, 0.005), rtol=0.05), above


def test_sketch_zero_class_is_exact():
    x = torch.zeros(1, 10_000)
    x[0, :30] = torch.linspace(0.5, 3.0, 30)  # 99.7% exact zeros, like a nearly dead ReLU unit
    sketch = QuantileSketch(1)
    sketch.update(x, dim=0)
    assert float(sketch.quantile(0.5)) == 0.0
    assert float(sketch.quantile(0.99)) == 0.0
    assert float(sketch.quantile(1.0)) == 3.0


def test_sketch_memory_does_not_grow_with_the_stream():
    g = torch.Generator().manual_seed(0)
    small, large = QuantileSketch(16), QuantileSketch(16)
    small.update(torch.randn(4, 16, 8, 8, generator=g))
    for _ in range(50):
        large.update(torch.randn(64, 16, 8, 8, generator=g).relu() * 100)
    assert int(large.total[0]) == 50 * 64 * 64
    assert small.nbytes == large.nbytes
    assert large.counts.shape == small.counts.shape == (16, 2048)


def test_sketch_merge_is_exact_and_order_independent():
    x = _streams(30_000, seed=2)
    whole = QuantileSketch(5)
    whole.update(x, dim=0)
    parts = [QuantileSketch(5) for _ in range(3)]
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))
    for i, chunk in enumerate(x[:, perm].split(10_000, dim=1)):
        for piece in chunk.split(999, dim=1):
            parts[i].update(piece, dim=0)
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert torch.equal(merged.counts, whole.counts)
    assert torch.equal(merged.level, whole.level)
    for p in (0.3, 0.995):
        assert torch.equal(merged.quantile(p), whole.quantile(p))


def test_sketch_rejects_bad_input():
    sketch = QuantileSketch(2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sketch.update(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), dim=0)
    with pytest.raises(ValueError, match="2 units along dim 1"):
        sketch.update(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        sketch.update(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="not seen any value"):
        sketch.quantile(0.5)
    sketch.update(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sketch.quantile(1.5)
    with pytest.raises(ValueError, match="bins"):
        QuantileSketch(2, bins=1)
    with pytest.raises(ValueError, match="different"):
        sketch.merge(QuantileSketch(3))


# ------------------------------------------------------------------------------------------------ dissection


def test_unit_that_outputs_a_concept_mask_has_iou_one_with_it():
    masks = random_concept_masks(24, 6, 16, seed=0)
    model = Echo()
    # each concept covers < 30% of all pixels, so the top-30% threshold falls on the zeros: M_k = L_k exactly
    assert float(masks.float().mean(dim=(0, 2, 3)).max()) < 0.3
    result = NetworkDissection("units", quantile=0.3)(model, batches_of(masks.float(), masks, 5), NAMES6)
    iou = result.iou
    assert torch.equal(torch.diagonal(iou), torch.ones(6, dtype=torch.float64))
    expected = numpy_iou(masks.numpy(), masks.numpy())  # off-diagonal: the concepts' own overlap
    assert np.allclose(iou.numpy(), expected, atol=1e-12)
    concept, best = result.best()
    assert torch.equal(concept, torch.arange(6)) and bool((best == 1).all())
    assert bool(result.detectors.all())
    assert result.unique_detectors_per_category() == {"shape": 2, "colour": 3, "texture": 1}
    assert torch.equal(result.unit_area, masks.sum(dim=(0, 2, 3)))
    assert result.num_images == 24


def test_counts_match_an_independent_computation_with_upsampling():
    torch.manual_seed(0)
    model = GapCNN(channels=8)
    images = torch.rand(20, 3, 12, 12)
    masks = random_concept_masks(20, 6, 24, seed=1)  # masks at twice the feature-map resolution
    dissection = NetworkDissection("features.3", quantile=0.02, top_k=3)
    result = dissection(model, batches_of(images, masks, 6), NAMES6)

    acts = hooked_output(model, model.features[3], images)  # BN output, before the in-place ReLU
    # thresholds: within the sketch's certified rank error of the exact quantile
    flat = acts.transpose(0, 1).reshape(8, -1)
    above = (flat > result.thresholds[:, None]).double().mean(dim=1)
    assert bool(((above - 0.02).abs() <= result.threshold_rank_error + 1e-12).all())
    exact = torch.quantile(flat, 0.98, dim=1)
    assert torch.allclose(result.thresholds, exact, rtol=0.01, atol=1e-3)
    # IoU from the thresholds, counted densely (no skipped maps) and independently
    thresholds = result.thresholds.view(1, -1, 1, 1)
    unit_masks = (upsample_bilinear(acts, (24, 24)) > thresholds).numpy()
    assert np.allclose(result.iou.numpy(), numpy_iou(unit_masks, masks.numpy()), atol=1e-12)
    assert np.array_equal(result.unit_area.numpy(), unit_masks.sum(axis=(0, 2, 3)))
    # and against torch's own bilinear resize: equal up to pixels within float rounding of a threshold
    up = F.interpolate(acts, size=(24, 24), mode="bilinear", align_corners=False)
    slack = 1e-5 * up.abs().amax()
    sure, maybe = (up > thresholds + slack).numpy(), (up > thresholds - slack).numpy()
    for k in range(8):
        for c in range(6):
            inter = int(result.intersection[k, c])
            assert (sure[:, k] & masks[:, c].numpy()).sum() <= inter <= (maybe[:, k] & masks[:, c].numpy()).sum()
    # top images: largest per-image maxima, ties to the lower index
    maxima = acts.amax(dim=(2, 3))
    for u in range(8):
        order = sorted(range(20), key=lambda i: (-float(maxima[i, u]), i))[:3]
        assert result.top_indices[u].tolist() == order
        assert torch.allclose(result.top_scores[u], maxima[order, u])


@pytest.mark.parametrize(
    ("source", "target"), [((2, 2), (64, 64)), ((5, 7), (16, 9)), ((8, 8), (8, 8)), ((9, 6), (4, 5))]
)
def test_upsample_bilinear_matches_interpolate_and_ignores_the_batch(source, target):
    maps = torch.randn(6, 5, *source, generator=torch.Generator().manual_seed(0))
    out = upsample_bilinear(maps, target)
    ref = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6)
    if source == target:
        assert torch.equal(out, maps)
    # each map's values do not depend on the other maps it is computed with (DDP shards see other batches)
    assert torch.equal(upsample_bilinear(maps[2:3, 1:4], target), out[2:3, 1:4])
    assert torch.equal(upsample_bilinear(maps.flatten(0, 1)[7:8], target)[0], out[1, 2])


def test_cache_stop_and_chunking_do_not_change_the_result():
    torch.manual_seed(1)
    model = GapCNN(channels=6)
    images = torch.rand(14, 3, 10, 10)
    masks = random_concept_masks(14, 6, 10, seed=2)
    data = batches_of(images, masks, 4)
    base = NetworkDissection("features.4", quantile=0.05)(model, data, NAMES6)
    for kwargs in ({"cache_bytes": 0}, {"stop_at_layer": False}, {"chunk_elements": 150}, {"cache_bytes": 2000}):
        other = NetworkDissection("features.4", quantile=0.05, **kwargs)(model, data, NAMES6)
        for field in ("thresholds", "intersection", "unit_area", "concept_area", "top_indices", "top_scores"):
            assert torch.equal(getattr(base, field), getattr(other, field)), (kwargs, field)


def test_resnet_reused_relu_uses_its_last_call(resnet18):
    """``layer1.0.relu`` runs twice per block; the dissected output is the block output (its last call)."""
    images = torch.rand(2, 3, 32, 32)
    masks = random_concept_masks(2, 6, 32, seed=3)
    data = batches_of(images, masks, 1)
    stopped = NetworkDissection("layer1.0.relu", quantile=0.01)(resnet18, data, NAMES6)
    full = NetworkDissection("layer1.0.relu", quantile=0.01, stop_at_layer=False, cache_bytes=0)(resnet18, data, NAMES6)
    block_output = hooked_output(resnet18, resnet18.layer1[0], images)
    assert torch.equal(stopped.intersection, full.intersection)
    assert torch.allclose(stopped.top_scores[:, 0], block_output.amax(dim=(0, 2, 3)))


def test_no_side_effects_also_when_raising(gap_cnn):
    put_in_train_mode_with_grads(gap_cnn)
    before = snapshot(gap_cnn)
    images = torch.rand(6, 3, 8, 8)
    masks = random_concept_masks(6, 6, 8)
    dissection = NetworkDissection("features.1", quantile=0.05)
    result = dissection(gap_cnn, batches_of(images, masks, 3), NAMES6)
    dissection.explain_compositional(gap_cnn, batches_of(images, masks, 3), result, [0, 1], max_length=2)
    dissection.render_top_images(gap_cnn, result, images, [0])
    assert_unchanged(gap_cnn, before)
    bad = [(images[:3], masks[:3]), (images[3:], masks[3:, :5])]  # fails in the second pass
    with pytest.raises(ValueError, match="5 concepts but 6"):
        dissection(gap_cnn, bad, NAMES6)
    assert_unchanged(gap_cnn, before)


def test_same_result_under_no_grad_and_inference_mode(gap_cnn):
    images = torch.rand(6, 3, 8, 8)
    masks = random_concept_masks(6, 6, 8, seed=4)
    dissection = NetworkDissection("features.3", quantile=0.05)
    plain = dissection(gap_cnn, batches_of(images, masks, 3), NAMES6)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            inside = dissection(gap_cnn, batches_of(images, masks, 3), NAMES6)
        assert torch.equal(inside.intersection, plain.intersection)
        assert torch.equal(inside.thresholds, plain.thresholds)
        inside.thresholds.add_(0)  # ordinary tensors, usable outside the context


def test_changed_data_order_is_detected():
    class Shuffled:
        def __init__(self, data):
            self.data, self.calls = data, 0

        def __iter__(self):
            self.calls += 1
            return iter(self.data if self.calls == 1 else self.data[::-1])

    torch.manual_seed(0)
    model = GapCNN(channels=4)
    data = batches_of(torch.rand(8, 3, 8, 8), random_concept_masks(8, 6, 8), 4)
    with pytest.raises(ValueError, match="different batches in the second pass"):
        NetworkDissection("features.3")(model, Shuffled(data), NAMES6)
    reference = NetworkDissection("features.3", cache_bytes=0)(model, data, NAMES6)
    recomputed = NetworkDissection("features.3", cache_bytes=0)(model, Shuffled(data), NAMES6)
    assert torch.equal(recomputed.intersection, reference.intersection)  # sums do not depend on the order


def test_concept_scenes_colour_units_are_labelled_with_their_colour():
    """A hand-made 1x1-conv layer whose units respond to the four object colours of ConceptScenes."""
    ds = ConceptScenes(48, image_size=32, seed=0)
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -2]]).view(4, 3, 1, 1))
        conv.bias.copy_(torch.tensor([-0.3, -0.2, -0.2, -1.0]))
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data = [
        (ds.images[i : i + 16], ds.concept_masks_for(range(i, i + 16)), torch.arange(i, i + 16)) for i in (0, 16, 32)
    ]
    # flat colours make every firing pixel of a unit equally strong, and no pixel exceeds its maximum: with the
    # top 5% (more than any colour covers) the threshold falls on the zeros and M_k is where unit k fires
    result = dissect(model, "1", data, ds.concept_names, ds.categories, quantile=0.05)
    assert result.thresholds.tolist() == [0.0] * 4
    concept, iou = result.best()
    assert [ds.concept_names[int(c)] for c in concept] == ["colour:red", "colour:green", "colour:blue", "colour:yellow"]
    assert bool((iou > 0.5).all())
    assert result.unique_detectors_per_category()["colour"] == 4
    assert result.detector_units_per_category() == {c: 4 if c == "colour" else 0 for c in ds.categories}
    strips = NetworkDissection("1").render_top_images(model, result, ds.images, [0])
    assert strips[0].dtype == np.uint8 and strips[0].ndim == 3


def test_render_unit_overlays_the_thresholded_mask():
    masks = random_concept_masks(3, 6, 16, seed=5)
    masks[:, 2, 4:8, 4:8] = True
    images = masks[:, :3].float()  # RGB images whose blue channel is concept 2: unit 2 of Echo fires there
    strip = NetworkDissection("units", quantile=0.3).render_unit(Echo(), images, 2, 0.5, pad=2)
    assert strip.dtype == np.uint8 and strip.shape == (16 + 4, 3 * 18 + 2, 3)
    for i in range(3):
        tile = strip[2:18, 2 + 18 * i : 18 + 18 * i].astype(int)
        inside = tile[masks[i, 2].numpy()]
        outside = tile[~masks[i, 2].numpy()]
        assert (inside[:, 0] - inside[:, 2]).min() > 20  # coloured (warm end of the colormap) where it fires
        # plain gray elsewhere (matplotlib's inferno starts at (0, 0, 4): half of it tints blue by 2 at most)
        assert np.abs(outside[:, 0] - outside[:, 2]).max() <= 2 and np.array_equal(outside[:, 0], outside[:, 1])


def test_result_summaries_on_a_hand_made_result():
    names = ["shape:a", "shape:b", "colour:c", "colour:d"]
    # IoU = inter / (unit + concept - inter); unit areas 10, concept areas 10
    inter = torch.tensor([[5, 0, 0, 0], [0, 0, 1, 0], [0, 0, 4, 0], [0, 5, 0, 6], [0, 0, 0, 0]])
    result = DissectionResult(
        layer="x",
        concept_names=names,
        concept_categories=["shape", "shape", "colour", "colour"],
        quantile=0.005,
        iou_threshold=0.1,
        thresholds=torch.zeros(5),
        threshold_rank_error=torch.zeros(5),
        intersection=inter,
        unit_area=torch.full((5,), 10),
        concept_area=torch.full((4,), 10),
        num_images=3,
        top_indices=torch.full((5, 1), -1),
        top_scores=torch.zeros(5, 1),
    )
    # best IoUs: unit0 a 5/15, unit1 c 1/19, unit2 c 4/16, unit3 d 6/14, unit4 none (0, first concept)
    concept, iou = result.best()
    assert concept.tolist() == [0, 2, 2, 3, 0]
    assert torch.allclose(iou, torch.tensor([5 / 15, 1 / 19, 4 / 16, 6 / 14, 0.0], dtype=torch.float64))
    assert result.detectors.tolist() == [True, False, True, True, False]
    assert result.unique_detectors_per_category() == {"shape": 1, "colour": 2}
    assert result.detector_units_per_category() == {"shape": 1, "colour": 2}
    assert result.units_per_concept() == {"shape:a": 1, "colour:c": 1, "colour:d": 1}
    shape_best, shape_iou = result.best("shape")
    assert shape_best.tolist()[3] == 1 and abs(float(shape_iou[3]) - 5 / 15) < 1e-12
    rows = result.rows()
    assert [r[0] for r in rows] == [3, 0, 2, 1, 4] and rows[0] == [3, "colour:d", "colour", 6 / 14, True]
    assert len(rows[0]) == len(TABLE_COLUMNS)
    assert [r[0] for r in result.rows(only_detectors=True)] == [3, 0, 2]
    assert categories_from_names(["a:x", "b:y", "a:z", "plain"]) == {"a": [0, 2], "b": [1], "concept": [3]}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"quantile": 0.0}, ValueError, r"quantile must be a number in \(0, 1\)"),
        ({"quantile": 1.0}, ValueError, "quantile"),
        ({"quantile": -0.1}, ValueError, "quantile"),
        ({"quantile": 2}, ValueError, "quantile"),
        ({"iou_threshold": 1.0}, ValueError, "iou_threshold"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"bins": 1}, ValueError, "bins"),
        ({"resolution_bits": 30}, ValueError, "resolution_bits"),
        ({"layer": 3}, TypeError, "layer must be"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(kwargs, error, match):
    kwargs = {"layer": "features", **kwargs}
    with pytest.raises(error, match=match):
        NetworkDissection(**kwargs)


def test_bad_inputs_fail_with_clear_errors(gap_cnn):
    images, masks = torch.rand(4, 3, 8, 8), random_concept_masks(4, 6, 8)
    data = batches_of(images, masks, 2)
    with pytest.raises(ValueError, match=r"layer 'featurs.3' not found.*features.3"):
        NetworkDissection("featurs.3")(gap_cnn, data, NAMES6)
    with pytest.raises(ValueError, match=r"needs feature maps \[B, units, h, w\]"):
        NetworkDissection("head")(gap_cnn, data, NAMES6)
    with pytest.raises(TypeError, match="one-shot iterator"):
        NetworkDissection("features")(gap_cnn, iter(data), NAMES6)
    with pytest.raises(TypeError, match="re-iterable"):
        NetworkDissection("features")(gap_cnn, images, NAMES6)
    with pytest.raises(ValueError, match="concept masks must be a tensor"):
        NetworkDissection("features")(gap_cnn, [(images, masks[:2])], NAMES6)
    with pytest.raises(ValueError, match="two categories"):
        NetworkDissection("features")(gap_cnn, data, NAMES6, {"x": [0, 1, 2, 3, 4, 5], "y": [0]})
    with pytest.raises(ValueError, match="no batches"):
        NetworkDissection("features")(gap_cnn, [], NAMES6)


# ------------------------------------------------------------------------------------------------ compositional


def numpy_formula(formula: Formula, masks: np.ndarray) -> np.ndarray:
    out = masks[:, formula.atoms[0]]
    for op, atom in zip(formula.ops, formula.atoms[1:]):
        other = masks[:, atom]
        out = {"AND": np.logical_and(out, other), "OR": np.logical_or(out, other)}.get(op, np.logical_and(out, ~other))
    return out


def test_compositional_search_recovers_planted_formulas():
    g = torch.Generator().manual_seed(0)
    concepts = torch.rand(30, 6, 12, 12, generator=g) < 0.35
    planted = [
        concepts[:, 1] & ~concepts[:, 3],  # c1 AND NOT c3
        (concepts[:, 4] | concepts[:, 0]) & ~concepts[:, 2],  # (c0 OR c4) AND NOT c2
        concepts[:, 5],  # a single concept stays single
    ]
    units = torch.stack(planted, dim=1)
    names = [f"c{i}" for i in range(6)]
    batches = [(units[i : i + 7], concepts[i : i + 7]) for i in range(0, 30, 7)]
    results = compositional_search(lambda: batches, names, units=[7, 8, 9], beam_size=5, max_length=3)
    assert [r.unit for r in results] == [7, 8, 9]
    assert [r.label for r in results] == ["c1 AND NOT c3", "(c0 OR c4) AND NOT c2", "c5"]
    assert all(r.iou == 1.0 for r in results)
    # every IoU in the beams agrees with a direct evaluation of its formula
    for u, r in enumerate(results):
        assert len(r.beam) == 5 and r.beam[0] == (r.label, 1.0) and r.beam_formulas[0] == r.formula
        assert [s for _, s in r.beam] == sorted((s for _, s in r.beam), reverse=True)
        for (label, iou), formula in zip(r.beam, r.beam_formulas):
            assert label == formula.to_string(names)
            expected = numpy_iou(numpy_formula(formula, concepts.numpy())[:, None], units[:, u : u + 1].numpy())
            assert abs(iou - expected[0, 0]) < 1e-12, (label, iou, expected)


def test_formula_strings_and_canonical_forms():
    names = ["water", "river", "blue"]
    assert Formula((0, 1, 2), ("OR", "AND NOT")).to_string(names) == "(water OR river) AND NOT blue"
    assert Formula((0,)).extend("OR", 1) == Formula((1,)).extend("OR", 0)
    assert Formula((2,)).extend("AND NOT", 0) != Formula((0,)).extend("AND NOT", 2)
    with pytest.raises(ValueError, match="unknown operator"):
        Formula((0, 1), ("XOR",))


def test_explain_compositional_finds_a_planted_unit():
    masks = random_concept_masks(24, 6, 16, seed=6)
    model = Echo(planted=(1, 3))
    dissection = NetworkDissection("units", quantile=0.3)
    data = batches_of(masks.float(), masks, 6)
    result = dissection(model, data, NAMES6)
    (explanation,) = dissection.explain_compositional(model, data, result, [6])
    assert explanation.label == "shape:b AND NOT colour:d" and explanation.iou == 1.0
    assert float(result.best()[1][6]) < 1.0  # no single concept explains it


# ------------------------------------------------------------------------------------------------ DDP


def test_two_processes_equal_one_process(tmp_path):
    """Probe set sharded over 2 gloo processes (unequal shards): every rank gets exactly the single-process
    result, for the core API, the compositional search and the callback; a failure on one rank raises on all."""
    here = os.path.dirname(__file__)
    script = os.path.join(here, "ddp_dissection_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    proc = run_processes([sys.executable, script, "2", str(tmp_path / "ddp")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, here)
    from ddp_dissection_script import run

    single = run(0, 1, str(tmp_path / "single"))
    assert single["failure"] is None
    for rank in (0, 1):
        result = json.loads((tmp_path / "ddp" / f"rank{rank}.json").read_text())
        for key, value in single.items():
            if key not in ("rank", "failure", "callback_outputs"):
                assert result[key] == json.loads(json.dumps(value)), (rank, key)
        expected = "RuntimeError: network dissection failed on another process" if rank == 0 else "ValueError"
        assert result["failure"].startswith(expected)
    outputs = json.loads((tmp_path / "ddp" / "rank1.json").read_text())["callback_outputs"]
    assert outputs == [], "only rank zero logs"
