"""Model-level visualisation: activation maximisation, top/bottom-K examples, layer features and embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.attribution.filters import gaussian_blur
from lightning_xai.interpretation.embedding import (
    embed_layer,
    iterate_batches,
    layer_features,
    project_features,
    reduce_activation,
)
from lightning_xai.interpretation.visualization import (
    ActivationMaximization,
    TopKBuffer,
    rank_examples,
    total_variation,
)

SHAPE = (3, 12, 12)


def _quick(**kwargs) -> ActivationMaximization:
    defaults = dict(steps=25, lr=0.1, l2=1e-3, tv=1e-3, jitter=1, batch_size=4)
    defaults.update(kwargs)
    return ActivationMaximization(**defaults)


# --------------------------------------------------------------------------------------------- activation maximisation
def test_class_objective_increases_the_logit_and_leaves_the_model_unchanged(gap_cnn):
    put_in_train_mode_with_grads(gap_cnn)
    before = snapshot(gap_cnn)
    targets = torch.tensor([0, 1, 2, 3])
    result = _quick(steps=40)(gap_cnn, target=targets, image_shape=SHAPE)
    assert_unchanged(gap_cnn, before)
    assert result.images.shape == (4, *SHAPE)
    # the reported scores are the plain logits of the start and end images (checked independently, eval mode)
    gap_cnn.eval()
    with torch.no_grad():
        final = gap_cnn(result.images).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(result.final_scores, final, atol=1e-5)
    assert (result.final_scores > result.initial_scores).all(), (result.initial_scores, result.final_scores)
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0, "clamp=(0, 1) must hold"


def test_linear_logit_converges_to_the_box_constrained_maximiser(linear_model):
    """For ``z = w . x + b`` on the box [0, 1] the maximiser is ``x = 1[w > 0]`` (closed form)."""
    result = ActivationMaximization(steps=150, lr=0.1, l2=0.0, tv=0.0, jitter=0)(
        linear_model, target=1, num_images=2, image_shape=(3, 8, 8)
    )
    w = linear_model.weight_map(1)
    best = (w > 0).float()
    assert ((result.images > 0.5).float() == best).float().mean() > 0.98
    optimum = float((w * best).sum() + linear_model.fc.bias[1].detach())
    assert (result.final_scores > optimum - 0.02 * w.abs().sum()).all()
    assert (result.initial_scores < optimum - 0.3 * w.abs().sum()).all()


def test_unit_objective_increases_the_unit_mean_activation(gap_cnn):
    before = snapshot(gap_cnn)
    result = _quick(steps=30)(gap_cnn, layer="features.3", unit=torch.tensor([1, 5]), image_shape=SHAPE)
    assert_unchanged(gap_cnn, before)
    acts = {}
    handle = gap_cnn.features[3].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach().clone()))
    try:
        with torch.no_grad():
            gap_cnn(result.images)
    finally:
        handle.remove()
    expected = torch.stack([acts["a"][0, 1].mean(), acts["a"][1, 5].mean()])
    assert torch.allclose(result.final_scores, expected, atol=1e-5)
    assert (result.final_scores > result.initial_scores).all()


def test_seeded_and_independent_of_batch_size(gap_cnn):
    a = _quick(batch_size=1, blur_every=5)(gap_cnn, target=2, num_images=3, image_shape=SHAPE)
    b = _quick(batch_size=3, blur_every=5)(gap_cnn, target=2, num_images=3, image_shape=SHAPE)
    c = _quick(batch_size=2, blur_every=5, seed=1)(gap_cnn, target=2, num_images=3, image_shape=SHAPE)
    assert torch.allclose(a.images, b.images, atol=1e-5), "chunking must not change the result"
    assert not torch.allclose(a.images, c.images), "another seed gives other images"
    # a shard that starts at image 1 reproduces images 1.. of the whole run
    shard = _quick(batch_size=2, blur_every=5)(gap_cnn, target=2, num_images=2, image_shape=SHAPE, first_index=1)
    assert torch.allclose(shard.images, a.images[1:], atol=1e-5)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_runs_inside_lightning_contexts(gap_cnn, context):
    expected = _quick()(gap_cnn, target=1, num_images=2, image_shape=SHAPE).images
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        got = _quick()(gap_cnn, target=1, num_images=2, image_shape=SHAPE).images
    assert torch.allclose(got, expected, atol=1e-6)


def test_starts_from_given_images_without_modifying_them(gap_cnn):
    init = torch.rand(2, *SHAPE)
    copy = init.clone()
    result = _quick(steps=1, lr=1e-4, jitter=0)(gap_cnn, target=0, init=init)
    assert torch.equal(init, copy)
    assert (result.images - init).abs().max() < 1e-3, "one tiny step stays next to the start image"


def test_regularisers_pull_towards_smooth_grey():
    """With a constant objective, L2 + TV alone must smooth a noisy image towards the grey level."""

    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :1] * 0.0

    noisy = torch.rand(1, *SHAPE)
    out = ActivationMaximization(steps=60, lr=0.05, l2=1.0, tv=1.0, jitter=0, clamp=None)(
        Flat(), target=0, init=noisy
    ).images
    assert total_variation(out) < 0.5 * total_variation(noisy)
    assert (out - 0.5).abs().mean() < (noisy - 0.5).abs().mean()


def test_total_variation_and_blur_closed_forms():
    ramp = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 4, 5)
    # horizontal differences are all 1 (4 per row), vertical ones 0
    assert torch.allclose(total_variation(ramp), torch.tensor([1.0]))
    constant = torch.full((2, 3, 7, 7), 0.3)
    assert torch.allclose(gaussian_blur(constant, 1.0), constant, atol=1e-6)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    assert torch.isclose(blurred.sum(), torch.tensor(1.0), atol=1e-5), "an interior impulse keeps its mass"
    assert blurred[0, 0, 4, 4] == blurred.max() and torch.allclose(blurred, blurred.flip(-1).flip(-2))
    assert torch.equal(gaussian_blur(impulse, 0.0), impulse)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"tv": -1.0}, "tv"),
        ({"jitter": -1}, "jitter"),
        ({"clamp": (1.0, 0.0)}, "clamp"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationMaximization(**kwargs)


def test_bad_calls(gap_cnn):
    am = _quick(steps=1)
    with pytest.raises(ValueError, match="either target"):
        am(gap_cnn, image_shape=SHAPE)
    with pytest.raises(ValueError, match="unit="):
        am(gap_cnn, layer="features.0", image_shape=SHAPE)
    with pytest.raises(ValueError, match="image_shape"):
        am(gap_cnn, target=0)
    with pytest.raises(ValueError, match="out of range"):
        am(gap_cnn, layer="features.0", unit=99, image_shape=SHAPE)
    with pytest.raises(ValueError, match="not found"):
        am(gap_cnn, layer="featurez", unit=0, image_shape=SHAPE)
    with pytest.raises(ValueError, match="inconsistently"):
        am(gap_cnn, target=torch.tensor([0, 1]), num_images=3, image_shape=SHAPE)
    before = snapshot(gap_cnn)
    with pytest.raises(ValueError):
        am(gap_cnn, target=9, image_shape=SHAPE)  # a class the model does not have: raised inside the loop
    assert_unchanged(gap_cnn, before)


# --------------------------------------------------------------------------------------------------------- rankings
def test_rank_examples_matches_a_full_sort(gap_cnn):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(37, *SHAPE, generator=g)
    before = snapshot(gap_cnn)
    ranking = rank_examples(gap_cnn, DataLoader(TensorDataset(x), batch_size=5), target=2, k=4)
    assert_unchanged(gap_cnn, before)
    with torch.no_grad():
        logits = gap_cnn(x)[:, 2]
    order = torch.argsort(logits, descending=True)
    assert ranking.top_indices.tolist() == order[:4].tolist()
    assert ranking.bottom_indices.tolist() == order.flip(0)[:4].tolist()
    assert torch.allclose(ranking.top_scores, logits[order[:4]], atol=1e-5)
    assert torch.equal(ranking.top_inputs, x[order[:4]])


def test_rank_examples_for_a_unit(gap_cnn):
    x = torch.rand(20, *SHAPE, generator=torch.Generator().manual_seed(1))
    ranking = rank_examples(gap_cnn, x, layer="features.1", unit=3, k=3, reduce="max", batch_size=6)
    with torch.no_grad():
        conv = gap_cnn.features[0](x)  # features.1 is the in-place ReLU after it
    scores = conv.clamp_min(0)[:, 3].amax(dim=(1, 2))
    assert ranking.top_indices.tolist() == torch.argsort(scores, descending=True)[:3].tolist()
    with pytest.raises(ValueError, match="out of range"):
        rank_examples(gap_cnn, x, layer="features.1", unit=8)


def test_top_k_buffer_with_columns_and_payloads():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(50, 3, generator=g)
    rows = torch.arange(50.0)[:, None] * 10  # row payload identifies the sample
    cells = scores * 100  # cell payload identifies (sample, column)
    buf = TopKBuffer(5, largest=True)
    for start in range(0, 50, 7):
        sl = slice(start, start + 7)
        buf.update(scores[sl], torch.arange(50)[sl], rows={"r": rows[sl]}, cells={"c": cells[sl]})
    expected_scores, expected_idx = scores.topk(5, dim=0)
    assert torch.equal(buf.indices, expected_idx)
    assert torch.equal(buf.scores, expected_scores)
    assert torch.equal(buf.payload["r"][..., 0], expected_idx.float() * 10)
    assert torch.allclose(buf.payload["c"], expected_scores * 100)


# --------------------------------------------------------------------------------------------- features, embeddings
def test_iterate_batches_forms():
    x, y = torch.randn(7, 2), torch.arange(7)
    forms = [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=3)]
    for form in forms:
        xs, ys = zip(*iterate_batches(form, batch_size=3))
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    assert all(b[1] is None for b in iterate_batches(x, 4))
    dict_batches = [{"image": x[:4], "label": y[:4]}, {"image": x[4:], "label": y[4:]}]
    assert torch.equal(torch.cat([b[1] for b in iterate_batches(dict_batches)]), y)
    with pytest.raises(TypeError, match="cannot read data"):
        next(iterate_batches(3))


def test_layer_features_match_a_hook_and_survive_inplace_relu(gap_cnn):
    x = torch.rand(9, *SHAPE, generator=torch.Generator().manual_seed(3))
    before = snapshot(gap_cnn)
    feats, labels = layer_features(gap_cnn, "features.2", x, reduce="mean", batch_size=4)
    assert_unchanged(gap_cnn, before)
    assert labels is None
    with torch.no_grad():
        pre_relu = gap_cnn.features[:3](x.clone())  # BatchNorm output, before the in-place ReLU
    assert torch.allclose(feats, pre_relu.mean(dim=(2, 3)), atol=1e-5), "the in-place ReLU must not leak in"
    energy, _ = layer_features(gap_cnn, "features.2", x, reduce="mean_square", max_samples=5)
    assert energy.shape == (5, 8)
    assert torch.allclose(energy, pre_relu[:5].square().mean(dim=(2, 3)), atol=1e-5)
    with pytest.raises(ValueError, match="unknown reduce"):
        reduce_activation(pre_relu, "median")


def test_pca_matches_numpy_svd():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(60, 6, generator=g) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]))
    coords, ratio = project_features(feats, "pca", dim=2)
    x = feats.double().numpy()
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    expected = x @ vt[:2].T
    for j in range(2):  # same axes up to sign, and the sign rule: largest loading positive
        sign = np.sign(vt[j][np.argmax(np.abs(vt[j]))])
        assert np.allclose(coords[:, j].numpy(), sign * expected[:, j], atol=1e-4)
    assert np.allclose(ratio.numpy(), s[:2] ** 2 / (s**2).sum(), atol=1e-5)
    again, _ = project_features(feats, "pca", dim=2)
    assert torch.equal(coords, again), "PCA is seeded"


def test_tsne_separates_clusters_and_embed_layer_keeps_labels(gap_cnn):
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(5)
    centres = torch.tensor([[6.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 6.0, 0]])
    labels = torch.arange(45) % 3
    feats = centres[labels] + 0.3 * torch.randn(45, 4, generator=g)
    coords, ratio = project_features(feats, "tsne", perplexity=10.0)
    assert ratio is None and coords.shape == (45, 2)
    dist = torch.cdist(coords, coords) + torch.eye(45) * 1e9
    assert (labels[dist.argmin(dim=1)] == labels).all(), "nearest neighbours in 2-D share the cluster"

    x = torch.rand(12, *SHAPE, generator=g)
    y = torch.arange(12) % 4
    emb = embed_layer(gap_cnn, "features.3", (x, y), method="pca", batch_size=5)
    assert emb.layer == "features.3" and emb.coordinates.shape == (12, 2) and torch.equal(emb.labels, y)
    assert len(emb.rows()) == 12 and emb.rows()[0][2] == int(y[0])
    with pytest.raises(ValueError, match="unknown projection"):
        project_features(feats, "umap")


def test_features_of_a_model_that_is_not_gap_cnn():
    model = GapCNN(num_classes=2, channels=4, in_channels=1).eval()
    feats, labels = layer_features(model, "features.0", (torch.rand(3, 1, 5, 5), torch.tensor([0, 1, 0])))
    assert feats.shape == (3, 4) and labels.tolist() == [0, 1, 0]


def test_top_k_buffer_and_rank_examples_refuse_nan_scores(gap_cnn):
    buf = TopKBuffer(2)
    with pytest.raises(ValueError, match=r"NaN or inf scores for samples \[11\]"):
        buf.update(torch.tensor([0.5, float("nan"), 0.1]), torch.tensor([10, 11, 12]))

    class NaNForSecond(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = gap_cnn(x)
            return torch.where(x.flatten(1)[:, :1] > 0.5, torch.full_like(out, float("nan")), out)

    x = torch.zeros(4, 3, 8, 8)
    x[1] = 1.0
    with pytest.raises(ValueError, match=r"samples \[1\]"):
        rank_examples(NaNForSecond(), x, target=0, k=2)
