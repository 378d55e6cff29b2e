"""Activation maximisation, example rankings, pooled layer features and the activation atlas on token layers: on a
vision transformer the units are the D channels over the patch tokens (class token dropped), checked against a
plain forward hook; on a text transformer the D channels over the real tokens (padding left out) or a clear error;
grids that do not fit raise naming the class, the value and the choices."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, hooked_output, snapshot
from lightning_helpers import BlobData, quiet_trainer

from lightning_xai.callbacks import ActivationAtlas as AtlasCallback
from lightning_xai.callbacks import EmbeddingProjector
from lightning_xai.callbacks.base import ConfigurationError
from lightning_xai.data.tokens import PAD_TOKEN, PlantedTokensDataModule
from lightning_xai.interpretation.atlas import ActivationAtlas, DirectionObjective
from lightning_xai.interpretation.embedding import layer_features
from lightning_xai.interpretation.visualization import ActivationMaximization, rank_examples
from lightning_xai.models.transformers import TextClassifier, TextTransformer, ViTClassifier, vit_tiny
from lightning_xai.namespace import pl

VIT_LAYER = "encoder.layers.encoder_layer_1"
TEXT_LAYER = "blocks.0"


def _vit(patch: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_tiny(image_size=32, patch_size=patch).eval()


def _patches(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, (32 / patch)^2, 32]``: the patch tokens of the hooked layer output (class token dropped by hand)."""
    tokens = hooked_output(model, VIT_LAYER, x)
    assert tokens.shape[2] == 32 and tokens.shape[1] in (17, 65)
    return tokens[:, 1:]


# ------------------------------------------------------------------------------------------------ activation max
def test_unit_objective_is_the_channel_mean_over_the_patch_tokens():
    vit = _vit()
    before = snapshot(vit)
    x = torch.rand(3, 3, 32, 32)
    units = torch.tensor([0, 7, 31])
    am = ActivationMaximization(steps=3, lr=0.05, jitter=0, batch_size=2)
    result = am(vit, layer=VIT_LAYER, unit=units, init=x)
    assert_unchanged(vit, before)
    patches = _patches(vit, x)
    expected = patches.mean(dim=1)[torch.arange(3), units]
    torch.testing.assert_close(result.initial_scores, expected, atol=1e-5, rtol=1e-5)
    # reading the tokens as units (the old rule) gives another number: the test can tell them apart
    as_tokens = hooked_output(vit, VIT_LAYER, x)[torch.arange(3), units].mean(dim=1)
    assert (as_tokens - expected).abs().max() > 1e-2
    # the final score is the objective of the returned images, and the ascent raises it
    torch.testing.assert_close(
        result.final_scores, _patches(vit, result.images).mean(dim=1)[torch.arange(3), units], atol=1e-5, rtol=1e-5
    )
    assert bool((result.final_scores > result.initial_scores).all())
    # the same with the grid given explicitly
    explicit = ActivationMaximization(steps=1, jitter=0, reshape=(8, 8))(vit, layer=VIT_LAYER, unit=units, init=x)
    torch.testing.assert_close(explicit.initial_scores, expected, atol=1e-5, rtol=1e-5)


def test_a_token_index_is_not_a_unit():
    """65 tokens, 32 channels: unit 40 exists only if tokens were (wrongly) read as units."""
    vit = _vit()
    with pytest.raises(ValueError, match=r"ActivationMaximization: unit 40 is out of range: .* has 32 units"):
        ActivationMaximization(steps=1)(vit, layer=VIT_LAYER, unit=40, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"rank_examples: unit 40 is out of range: .* has 32 units"):
        rank_examples(vit, torch.rand(4, 3, 32, 32), layer=VIT_LAYER, unit=40, k=2)


def test_example_ranking_of_a_vit_unit_uses_the_patch_tokens():
    vit = _vit()
    x = torch.rand(10, 3, 32, 32)
    expected = _patches(vit, x).mean(dim=1)[:, 5]
    ranking = rank_examples(vit, x, layer=VIT_LAYER, unit=5, k=3, batch_size=4)
    torch.testing.assert_close(ranking.top_scores, expected.sort(descending=True).values[:3], atol=1e-5, rtol=1e-5)
    assert ranking.top_indices.tolist() == expected.argsort(descending=True)[:3].tolist()
    assert ranking.bottom_indices.tolist() == expected.argsort()[:3].tolist()


# ------------------------------------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("patch", [4, 8])
def test_vit_layer_features_are_the_hand_pooled_channels(patch):
    vit = _vit(patch)
    x = torch.rand(5, 3, 32, 32)
    tokens = hooked_output(vit, VIT_LAYER, x)
    patches = tokens[:, 1:]
    assert patches.shape[1] == (32 // patch) ** 2
    hand = {"mean": patches.mean(1), "max": patches.amax(1), "mean_square": patches.square().mean(1)}
    for reduce, expected in hand.items():
        feats, _ = layer_features(vit, VIT_LAYER, x, reduce=reduce, batch_size=2)
        assert feats.shape == (5, 32)
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    grid = (32 // patch, 32 // patch)
    explicit, _ = layer_features(vit, VIT_LAYER, x, reshape=grid)
    torch.testing.assert_close(explicit, hand["mean"], atol=1e-5, rtol=1e-5)
    # "flatten" keeps every value of the raw output (what TCAV differentiates)
    flat, _ = layer_features(vit, VIT_LAYER, x, reduce="flatten")
    torch.testing.assert_close(flat, tokens.flatten(1), atol=1e-5, rtol=1e-5)


def _text_model() -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(vocab_size=20, num_classes=2, max_len=8, pad_token=0).eval()


IDS = torch.tensor([[4, 5, 6, 0, 0, 0], [7, 8, 9, 10, 11, 0], [3, 3, 3, 3, 3, 3]])


def test_text_layer_features_pool_the_real_tokens_only():
    model = _text_model()
    tokens = hooked_output(model, TEXT_LAYER, IDS)
    assert tokens.shape == (3, 7, 32)  # a class token, then one position per input token
    real = IDS != 0
    hand_mean = torch.stack([tokens[i, 1:][real[i]].mean(0) for i in range(3)])
    hand_max = torch.stack([tokens[i, 1:][real[i]].amax(0) for i in range(3)])
    feats, _ = layer_features(model, TEXT_LAYER, IDS, pad_token=0)
    torch.testing.assert_close(feats, hand_mean, atol=1e-5, rtol=1e-5)
    feats, _ = layer_features(model, TEXT_LAYER, IDS, reduce="max", pad_token=0)
    torch.testing.assert_close(feats, hand_max, atol=1e-5, rtol=1e-5)
    # without a pad token every input token counts (the class token never does)
    feats, _ = layer_features(model, TEXT_LAYER, IDS)
    torch.testing.assert_close(feats, tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    # a sequence of padding only has no defined mean: NaN, never a number
    feats, _ = layer_features(model, TEXT_LAYER, torch.tensor([[0, 0, 0], [4, 0, 0]]), pad_token=0)
    assert bool(feats[0].isnan().all()) and bool(feats[1].isfinite().all())
    ranking = rank_examples(model, IDS, layer=TEXT_LAYER, unit=3, k=1, pad_token=0)
    assert ranking.top_indices.tolist() == [int(hand_mean[:, 3].argmax())]


def test_text_token_layers_are_refused_where_inputs_must_be_images():
    model = _text_model()
    with pytest.raises(ValueError, match=r"ActivationAtlas: layer 'blocks.0' emits token activations \[3, 7, 32\] "
                                         r"of a model fed token ids \[3, 6\]; ActivationAtlas supports image inputs"):
        ActivationAtlas(TEXT_LAYER, method="pca", render_icons=False)(model, IDS)


# ------------------------------------------------------------------------------------------------ atlas
def test_the_atlas_collects_the_channel_vectors_of_the_patch_tokens():
    vit = _vit(8)  # 16 patch tokens per image
    x = torch.rand(4, 3, 32, 32)
    patches = _patches(vit, x)
    atlas = ActivationAtlas(VIT_LAYER, positions_per_image=100, method="pca", render_icons=False)
    vectors, index, _, _, shape = atlas.collect(vit, x)
    assert vectors.shape == (4 * 16, 32) and shape == (3, 32, 32)
    for i in range(4):  # every patch token's D-vector exactly once, the class token never
        mine = vectors[index == i]
        order = torch.cdist(mine, patches[i]).argmin(dim=1)
        assert sorted(order.tolist()) == list(range(16))
        torch.testing.assert_close(mine, patches[i][order], atol=1e-5, rtol=1e-5)
    sampled, _, _, _, _ = ActivationAtlas(VIT_LAYER, positions_per_image=3).collect(vit, x)
    assert sampled.shape == (12, 32)
    # the direction objective is the patch tokens' mean projection on each unit direction
    directions = torch.randn(2, 32)
    scores = DirectionObjective(vit, VIT_LAYER, directions)(x)
    unit = directions / directions.norm(dim=1, keepdim=True)
    torch.testing.assert_close(scores, torch.einsum("btd,kd->bk", patches, unit) / 16, atol=1e-5, rtol=1e-5)


def test_a_class_filtered_vit_atlas_attributes_per_patch_token():
    vit = _vit(8)
    x = torch.rand(3, 3, 32, 32)
    atlas = ActivationAtlas(VIT_LAYER, positions_per_image=100, method="pca", render_icons=False)
    _, index, _, attr, _ = atlas.collect(vit, x, target_class=1)
    acts = {}
    module = dict(vit.named_modules())[VIT_LAYER]
    handle = module.register_forward_hook(lambda m, i, out: acts.__setitem__("a", out))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(vit(xg)[:, 1].sum(), [acts["a"]])
    handle.remove()
    hand = (acts["a"] * grad)[:, 1:].sum(2).detach()  # [B, 16]: gradient x activation of each patch token
    for i in range(3):
        got = attr[index == i].sort().values
        torch.testing.assert_close(got, hand[i].sort().values, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [(0, 4), (4,), "8x8", (True, 2), 7])
def test_a_bad_reshape_fails_at_construction_naming_the_class_value_and_choices(bad):
    for make, owner in (
        (lambda: ActivationMaximization(reshape=bad), "ActivationMaximization"),
        (lambda: ActivationAtlas(VIT_LAYER, reshape=bad), "ActivationAtlas"),
        (lambda: AtlasCallback(VIT_LAYER, reshape=bad), "ActivationAtlas"),
        (lambda: EmbeddingProjector(VIT_LAYER, reshape=bad), "EmbeddingProjector"),
        (lambda: layer_features(_vit(), VIT_LAYER, torch.rand(1, 3, 32, 32), reshape=bad), "layer_features"),
    ):
        with pytest.raises(ValueError) as info:
            make()
        message = str(info.value)
        assert message.startswith(f"{owner}: reshape must be None"), message
        assert repr(bad) in message and "(h, w)" in message and "callable" in message


def test_a_grid_that_does_not_fit_the_tokens_names_the_class_value_and_choices():
    vit = _vit()
    x = torch.rand(2, 3, 32, 32)
    tail = r"that reshape=\(9, 9\) cannot lay out on a patch grid.*grid \(8, 8\).*Valid reshape values: \['None"
    head = r"ActivationMaximization: layer 'encoder\.layers\.encoder_layer_1' emits token activations \[2, 65, 32\] "
    with pytest.raises(ValueError, match=head + tail):
        ActivationMaximization(steps=1, reshape=(9, 9))(vit, layer=VIT_LAYER, unit=0, init=x)
    with pytest.raises(ValueError, match=r"layer_features: layer .* emits token activations \[2, 65, 32\] " + tail):
        layer_features(vit, VIT_LAYER, x, reshape=(9, 9))
    with pytest.raises(ValueError, match=r"ActivationAtlas: layer .*" + tail):
        ActivationAtlas(VIT_LAYER, reshape=(9, 9), method="pca").collect(vit, x)


# ------------------------------------------------------------------------------------------------ callbacks
def spy_on_features(projector: EmbeddingProjector) -> dict:
    """Record the probe inputs and the features the projector computes from them (filled when it runs)."""
    seen: dict = {}
    original = projector._features

    def spy(pl_module, inputs):
        feats, logits = original(pl_module, inputs)
        seen["inputs"], seen["feats"] = inputs.detach().cpu(), feats
        return feats, logits

    projector._features = spy
    return seen


def test_embedding_projector_on_a_vit_logs_the_hand_pooled_channels(tmp_path):
    pl.seed_everything(0)
    model = ViTClassifier(num_classes=3, image_size=16, patch_size=4)
    projector = EmbeddingProjector(f"backbone.{VIT_LAYER}", num_samples=8, batch_size=4, output_dir="")
    seen = spy_on_features(projector)
    trainer = quiet_trainer(max_epochs=1, callbacks=[projector], default_root_dir=str(tmp_path))
    trainer.fit(model, BlobData(size=16))
    assert not projector.errors and len(projector.records) == 1
    tokens = hooked_output(model.backbone, VIT_LAYER, seen["inputs"])
    assert tokens.shape[1:] == (17, 32)
    torch.testing.assert_close(seen["feats"], tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: EmbeddingProjector(f"backbone.{VIT_LAYER}", reshape=(5, 5), num_samples=4),
    lambda: AtlasCallback(f"backbone.{VIT_LAYER}", reshape=(5, 5), num_samples=4, method="pca"),
])
def test_a_grid_that_does_not_fit_fails_at_setup_before_training(tmp_path, make):
    callback = make()
    model = ViTClassifier(num_classes=3, image_size=16, patch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path))
    name = type(callback).__name__
    with pytest.raises(ConfigurationError, match=name + r": .*reshape=\(5, 5\).*grid \(4, 4\).*Valid reshape"):
        trainer.fit(model, BlobData(size=16))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_embedding_projector_on_a_text_model_pools_the_real_tokens(tmp_path):
    pl.seed_everything(0)
    model = TextClassifier(max_len=16)
    data = PlantedTokensDataModule(n_train=32, n_val=16, n_test=8, batch_size=16, min_length=8, seed=3)
    projector = EmbeddingProjector(f"backbone.{TEXT_LAYER}", num_samples=8, batch_size=4, output_dir="")
    seen = spy_on_features(projector)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[projector],
                            default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert not projector.errors and projector.padding == PAD_TOKEN  # the model's pad token, said once
    ids = seen["inputs"]
    real = ids != PAD_TOKEN
    assert bool((~real).any())  # the probe set has padding to leave out
    tokens = hooked_output(model.backbone, TEXT_LAYER, ids)[:, 1:]
    hand = torch.stack([tokens[i][real[i]].mean(0) for i in range(ids.shape[0])])
    torch.testing.assert_close(seen["feats"], hand, atol=1e-5, rtol=1e-5)
