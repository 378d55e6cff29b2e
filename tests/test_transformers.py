"""Transformers: exact attention capture, rollout and transformer attribution against hand computations, the
token-grid reshape, the contract on a ViT, and the small transformer LightningModules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.attention import (
    AttentionRollout,
    TransformerAttribution,
    attention_forward,
    capture_attention,
    rollout,
    transformer_relevance,
)
from lightning_xai.attribution.token_grid import grid_to_image, infer_grid, token_grid
from lightning_xai.data.groundtruth import GroundTruthDataModule
from lightning_xai.data.tokens import PlantedTokensDataModule
from lightning_xai.models.transformers import TextClassifier, TextTransformer, ViTClassifier, vit_tiny
from lightning_xai.namespace import pl

# ---------------------------------------------------------------------------------------------------------------
# attention capture reproduces nn.MultiheadAttention exactly
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["batch_first", "seq_first", "unbatched", "kdim_vdim", "padding", "float_masks", "causal", "mask_3d"]
)
def test_attention_forward_matches_multihead_attention(case):
    torch.manual_seed(0)
    kwargs = {"kdim": 6, "vdim": 7} if case == "kdim_vdim" else {}
    mha = nn.MultiheadAttention(8, 2, batch_first=case != "seq_first", **kwargs).eval()
    q = torch.randn(3, 5, 8)
    k = torch.randn(3, 5, kwargs.get("kdim", 8))
    v = torch.randn(3, 5, kwargs.get("vdim", 8))
    call: dict = {}
    if case == "seq_first":
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    if case == "unbatched":
        q, k, v = q[0], k[0], v[0]
    if case == "padding":
        call["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    if case == "float_masks":
        call["key_padding_mask"] = torch.randn(3, 5)
        call["attn_mask"] = torch.randn(5, 5)
    if case == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5)
        call["is_causal"] = True
    if case == "mask_3d":
        call["attn_mask"] = torch.rand(3 * 2, 5, 5) < 0.3
        call["attn_mask"][..., 0] = False  # no fully masked row
    out, weights = mha(q, k, v, need_weights=True, average_attn_weights=False, **call)
    mine, probs = attention_forward(
        mha, q, k, v, call.get("key_padding_mask"), call.get("attn_mask"), call.get("is_causal", False)
    )
    assert torch.allclose(mine, out, atol=1e-6)
    assert torch.allclose(probs.squeeze(0) if case == "unbatched" else probs, weights, atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "text", "torch_encoder"])
def test_capture_attention_leaves_the_output_unchanged_and_records_every_call(kind):
    torch.manual_seed(0)
    if kind == "vit":
        model, x, calls = vit_tiny(image_size=32, patch_size=8).eval(), torch.randn(2, 3, 32, 32), 2
    elif kind == "text":
        model, x, calls = TextTransformer(20, 3, max_len=7, depth=3).eval(), torch.randint(0, 20, (2, 7)), 3
    else:
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model, x, calls = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), torch.randn(2, 5, 8), 2
    before = snapshot(model)
    with torch.no_grad():
        reference = model(x)
    with capture_attention(model) as records:
        out = model(x)
    assert torch.allclose(out, reference, atol=1e-5)
    assert len(records) == calls and all(r.probs.requires_grad for r in records)
    tokens = records[0].probs.shape[-1]
    assert torch.allclose(records[0].probs.sum(-1), torch.ones(2, records[0].probs.shape[1], tokens), atol=1e-6)
    assert_unchanged(model, before)
    other = next(n for n, m in model.named_modules() if n and not isinstance(m, nn.MultiheadAttention))
    with pytest.raises(ValueError, match="not an nn.MultiheadAttention"), capture_attention(model, [other]):
        pass
    assert_unchanged(model, before)


def test_capture_attention_returns_weights_when_the_caller_asks():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 4, 8)
    expected = mha(x, x, x, need_weights=True)[1]
    with capture_attention(mha) as records:
        _, weights = mha(x, x, x, need_weights=True)
        _, none = mha(x, x, x, need_weights=False)
    assert torch.allclose(weights, expected, atol=1e-6) and none is None and len(records) == 2


# ---------------------------------------------------------------------------------------------------------------
# rollout and transformer attribution against hand computations
# ---------------------------------------------------------------------------------------------------------------


def test_rollout_of_a_hand_constructed_stack():
    p1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]])
    p2 = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # A_l = (P_l + I) / 2, rollout = A_2 A_1, by hand:
    a1 = torch.tensor([[0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
    a2 = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    by_hand = torch.tensor(
        [
            [0.5 * 0.75 + 0.5 * 0.1, 0.5 * 0.25 + 0.5 * 0.1, 0.5 * 0.8],
            [0.5 * 0.75, 0.5 * 0.25 + 0.5 * 1.0, 0.0],
            [0.5 * 0.1, 0.5 * 1.0 + 0.5 * 0.1, 0.5 * 0.8],
        ]
    )
    assert torch.allclose(a2 @ a1, by_hand)
    heads = lambda p: torch.stack([p, p])[None]  # noqa: E731 - two identical heads, batch of one
    assert torch.allclose(rollout([heads(p1), heads(p2)])[0], by_hand)
    # residual 0: the plain product of the attention matrices; max fusion renormalises rows
    assert torch.allclose(rollout([heads(p1), heads(p2)], residual=0.0)[0], p2 @ p1)
    two = torch.stack([p1, p2])[None]
    fused = torch.maximum(p1, p2) / torch.maximum(p1, p2).sum(1, keepdim=True)
    assert torch.allclose(rollout([two], head_fusion="max", residual=0.0)[0], fused)


def test_transformer_relevance_update_by_hand():
    p = torch.tensor([[[[0.6, 0.4], [0.3, 0.7]]]])
    g = torch.tensor([[[[1.0, -2.0], [0.5, 1.0]]]])
    a = torch.tensor([[0.6, 0.0], [0.15, 0.7]])  # relu(g * p)
    r1 = torch.eye(2) + a
    assert torch.allclose(transformer_relevance([p], [g])[0], r1)
    assert torch.allclose(transformer_relevance([p, p], [g, g])[0], r1 + a @ r1)


class _OneLayerAttention(nn.Module):
    """score = w . (attention output at token 0): ``dS/dP[0, j] = w . W_o (W_v x_j + b_v)`` in closed form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0][:, 0])

    def values(self, x: torch.Tensor, cls: int) -> torch.Tensor:
        mha = self.attention
        v = F.linear(x, mha.in_proj_weight.chunk(3)[2], mha.in_proj_bias.chunk(3)[2])
        return F.linear(v, mha.out_proj.weight) @ self.head.weight[cls]  # [B, T]


def test_transformer_attribution_closed_form_on_one_linear_attention_layer():
    model = _OneLayerAttention().eval()
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        probs = model.attention(x, x, x, need_weights=True)[1]  # torch's own probabilities, [B, T, T]
        values = model.values(x, 1)
    expected = (values * probs[:, 0]).clamp_min(0)
    expected[:, 0] += 1  # the identity of R = I + A
    result = TransformerAttribution()(model, x, 1)
    assert result.shape == (3, 5)
    assert torch.allclose(result, expected, atol=1e-5)
    roll = AttentionRollout()(model, x, 1)
    assert torch.allclose(roll, 0.5 * probs[:, 0] + 0.5 * torch.eye(5)[0], atol=1e-6)
    mean_row = AttentionRollout(query="mean")(model, x, 1)
    assert torch.allclose(mean_row, (0.5 * probs + 0.5 * torch.eye(5)).mean(dim=1), atol=1e-6)


def test_attention_rollout_on_a_vit_equals_the_product_of_torchs_own_attention():
    torch.manual_seed(0)
    vit = vit_tiny(image_size=32, patch_size=8, depth=3).eval()
    x = torch.rand(2, 3, 32, 32)
    # independent path: each block's ln_1 output fed to its attention with need_weights=True
    normed: list[torch.Tensor] = []
    handles = [blk.ln_1.register_forward_hook(lambda _m, _i, o: normed.append(o)) for blk in vit.encoder.layers]
    with torch.no_grad():
        vit(x)
    for h in handles:
        h.remove()
    product = torch.eye(17).expand(2, 17, 17)
    with torch.no_grad():
        for blk, h in zip(vit.encoder.layers, normed, strict=True):
            weights = blk.self_attention(h, h, h, need_weights=True)[1]  # head-averaged [B, T, T]
            product = (0.5 * weights + 0.5 * torch.eye(17)) @ product
    expected = product[:, 0, 1:].reshape(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    result = AttentionRollout(upsample="nearest")(vit, x, 0)
    assert result.shape == (2, 1, 32, 32)
    assert torch.allclose(result, expected, atol=1e-6)
    bilinear = AttentionRollout(reshape=(4, 4))(vit, x, 0)
    assert torch.allclose(bilinear, grid_to_image(product[:, 0, 1:].reshape(2, 4, 4), (32, 32)), atol=1e-6)


@pytest.mark.parametrize("method", [AttentionRollout(), TransformerAttribution()], ids=lambda m: type(m).__name__)
def test_attention_methods_keep_the_contract_on_a_vit(method):
    torch.manual_seed(0)
    vit = vit_tiny(image_size=32, patch_size=8)
    put_in_train_mode_with_grads(vit)
    before = snapshot(vit)
    x = torch.rand(2, 3, 32, 32)
    plain = method(vit, x, torch.tensor([1, 2]))
    with torch.no_grad():
        under_no_grad = method(vit, x, torch.tensor([1, 2]))
    with torch.inference_mode():
        under_inference = method(vit, x.clone(), torch.tensor([1, 2]))
    assert plain.shape == (2, 1, 32, 32) and (plain >= 0).all() and not plain.requires_grad
    assert torch.equal(plain, under_no_grad) and torch.equal(plain, under_inference)
    assert_unchanged(vit, before)
    with pytest.raises(ValueError, match="out of range"):
        method(vit, x, 99)
    assert_unchanged(vit, before)


def test_attention_methods_reject_bad_configuration():
    with pytest.raises(ValueError, match="AttentionRollout: unknown head_fusion"):
        AttentionRollout(head_fusion="median")
    with pytest.raises(ValueError, match="residual must be a finite number in \\[0.0, 1.0\\]"):
        AttentionRollout(residual=2.0)
    with pytest.raises(ValueError, match="reshape must be None"):
        TransformerAttribution(reshape=(0, 4))
    with pytest.raises(ValueError, match="query must be a token index >= 0 \\(0 = the class token\\) or 'mean'"):
        AttentionRollout(query=None)
    with pytest.raises(ValueError, match="has no nn.MultiheadAttention"):
        AttentionRollout()(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.rand(1, 3, 2, 2), 0)
    model = TextTransformer(10, 2, max_len=4).eval()
    with pytest.raises(ValueError, match="set prefix_tokens"):
        AttentionRollout(prefix_tokens=0)(model, torch.randint(0, 10, (1, 4)), 0)


# ---------------------------------------------------------------------------------------------------------------
# the token grid
# ---------------------------------------------------------------------------------------------------------------


def test_infer_grid_finds_prefix_and_grid():
    assert infer_grid(65, (64, 64)) == (1, (8, 8))
    assert infer_grid(16, (64, 64)) == (0, (4, 4))
    assert infer_grid(9, (32, 64)) == (1, (2, 4))
    assert infer_grid(21, (16, 16)) == (5, (4, 4))  # class + 4 register tokens
    assert infer_grid(65, (64, 64), prefix_tokens=1) == (1, (8, 8))
    with pytest.raises(ValueError, match="pass reshape=\\(h, w\\)"):
        infer_grid(7, (64, 64), prefix_tokens=0)


def test_token_grid_lays_patch_tokens_out_row_major():
    act = torch.randn(2, 1 + 2 * 3, 5)
    grid = token_grid(act, (20, 30))
    assert grid.shape == (2, 5, 2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(grid[:, :, i, j], act[:, 1 + i * 3 + j])
    assert torch.equal(token_grid(act, reshape=(2, 3)), grid)
    assert torch.equal(token_grid(grid), grid)  # a feature map passes through
    assert token_grid(act, reshape=lambda a: a[:, 1:].transpose(1, 2).reshape(2, 5, 3, 2)).shape == (2, 5, 3, 2)
    with pytest.raises(ValueError, match="needs 16 patch tokens"):
        token_grid(act, reshape=(4, 4))
    # a grid far smaller than the patch tokens (a typo for (8, 8)) would drop 48 tokens as "prefix": refused,
    # unless prefix_tokens says the model really prepends them
    vit_tokens = torch.randn(2, 1 + 8 * 8, 5)
    typo = r"reshape=\(4, 4\) .* would drop the first 49 as prefix tokens .* prefix_tokens="
    with pytest.raises(ValueError, match=typo):
        token_grid(vit_tokens, reshape=(4, 4))
    assert torch.equal(token_grid(vit_tokens, reshape=(4, 4), prefix_tokens=49), vit_tokens[:, 49:].transpose(1, 2)
                       .reshape(2, 5, 4, 4))
    assert token_grid(torch.randn(1, 16 + 3 * 3, 5), reshape=(3, 3)).shape == (1, 5, 3, 3)  # 16 prefixes: allowed


# ---------------------------------------------------------------------------------------------------------------
# the LightningModules
# ---------------------------------------------------------------------------------------------------------------


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        default_root_dir=kwargs.pop("default_root_dir", None),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_text_classifier_learns_the_planted_keys(tmp_path):
    pl.seed_everything(0)
    data = PlantedTokensDataModule(n_train=512, n_val=128, n_test=64, batch_size=32, min_length=10)
    model = TextClassifier(vocab_size=data.vocab_size, num_classes=data.num_classes, max_len=data.seq_len)
    trainer = _trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.callback_metrics["val_acc"] > 0.9
    # the embedding layer is named for the token attributions
    assert isinstance(dict(model.named_modules())["backbone.embedding"], nn.Embedding)
    # the checkpoint restores the configuration and the weights
    trainer.save_checkpoint(tmp_path / "text.ckpt")
    restored = TextClassifier.load_from_checkpoint(tmp_path / "text.ckpt")
    ids = data.dataset("val").tokens[:4]
    assert torch.equal(restored.eval()(ids), model.eval()(ids))


def test_vit_classifier_trains_on_the_ground_truth_images():
    pl.seed_everything(0)
    data = GroundTruthDataModule(image_size=32, n_train=64, n_val=32, n_test=32, batch_size=32)
    model = ViTClassifier(num_classes=6, image_size=32, patch_size=8)
    trainer = _trainer(fast_dev_run=2)
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train_loss_step"])
    x = data.dataset("val").images[:2]
    assert TransformerAttribution()(model, x, 0).shape == (2, 1, 32, 32)


class _EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (whose layers take a fused fast path without autograd) + a head on token 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[:, 0])


def test_attention_methods_see_every_layer_of_a_torch_encoder_also_frozen():
    model = _EncoderClassifier().eval()
    x = torch.randn(2, 5, 8)
    with capture_attention(model) as records:
        model(x.requires_grad_(True))
    assert len(records) == 2
    expected = rollout([r.probs.detach() for r in records])[:, 0]
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen model: still no fast path inside the attributor
    before = snapshot(model)
    with torch.inference_mode():
        result = AttentionRollout()(model, x.detach().clone(), 1)
    assert torch.allclose(result, expected, atol=1e-6)
    assert_unchanged(model, before)
    model.unused = nn.MultiheadAttention(8, 2)  # a module the forward never calls: named, never ignored
    with pytest.raises(ValueError, match=r"attention modules \['unused'\] were not called"):
        AttentionRollout()(model, x, 1)
    assert AttentionRollout(attention=["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"])(
        model, x, 1
    ).shape == (2, 5)


class _FusedWhenNoGrad(nn.Module):
    """Calls its nn.MultiheadAttention only when autograd needs it; otherwise a fused equivalent bypasses the
    module (as fast paths do): the attention methods must still see the module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.attention.in_proj_weight.requires_grad)
        if needs_grad:
            out = self.attention(x, x, x, need_weights=False)[0]
        else:
            out = attention_forward(self.attention, x, x, x)[0]  # the same numbers, the module never called
        return self.head(out[:, 0])


def test_attention_methods_rerun_with_autograd_when_a_fused_path_skipped_the_modules():
    model = _FusedWhenNoGrad().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        probs = model.attention(x, x, x, need_weights=True)[1]
    with torch.inference_mode():
        result = AttentionRollout()(model, x.clone(), 0)
    assert torch.allclose(result, 0.5 * probs[:, 0] + 0.5 * torch.eye(4)[0], atol=1e-6)
    assert TransformerAttribution()(model, x, 0).shape == (2, 4)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------------------
# AttnLRP / CP-LRP
# ---------------------------------------------------------------------------------------------------------------


def _bias_free_vit(depth: int = 3) -> nn.Module:
    """A small ViT whose additive parameters (biases, LayerNorm shifts, position embedding, class token) are 0, so
    that a conservative LRP must give the pixels exactly the logit (torchvision zero-inits the head: randomise)."""
    from lightning_xai.attribution.lrp.transformer import AttnLRP  # noqa: F401  (registers "attnlrp")

    torch.manual_seed(0)
    vit = vit_tiny(image_size=32, patch_size=8, depth=depth).eval()
    with torch.no_grad():
        vit.heads.head.weight.normal_()
        for name, p in vit.named_parameters():
            if name.endswith("bias") or name.endswith("pos_embedding") or name == "class_token":
                p.zero_()
    return vit


def test_cp_lrp_conserves_the_logit_exactly_on_a_bias_free_vit():
    from lightning_xai.attribution.lrp.transformer import AttnLRP

    vit = _bias_free_vit()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = vit(x)[:, 2]
    relevance = AttnLRP(attention_rule="cp")(vit, x, 2)
    assert relevance.shape == x.shape
    assert torch.allclose(relevance.flatten(1).sum(1), logits, rtol=1e-4, atol=1e-5)
    # the plain gradient x input does not conserve (LayerNorm is scale invariant, GELU is not homogeneous)
    xi = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(vit(xi)[:, 2].sum(), xi)
    assert ((xi * grad).flatten(1).sum(1) - logits).abs().max() > 1e-2 * logits.abs().max()


def test_attnlrp_rules_one_by_one():
    from lightning_xai.attribution.lrp.transformer import AttnLRP

    torch.manual_seed(0)
    # LayerNorm (std constant) and GELU (identity rule) conserve on a bias-free stack; plain gradient x input not
    mlp = nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.LayerNorm(8, bias=False), nn.GELU(), nn.Linear(8, 3, bias=False)
    )
    x = torch.randn(4, 6)
    with torch.no_grad():
        logits = mlp(x)[:, 1]
    assert torch.allclose(AttnLRP()(mlp, x, 1).sum(1), logits, atol=1e-5)
    # one attention layer (no residual) with Q = K = 0: the scores are 0, so the softmax rule passes nothing and
    # the uniform rule gives the values half the relevance: AttnLRP = CP-LRP / 2, and CP-LRP conserves
    layer = _OneLayerAttention().eval()
    with torch.no_grad():
        layer.attention.in_proj_weight[:8].zero_()
        layer.attention.in_proj_bias.zero_()
        layer.attention.out_proj.bias.zero_()
        layer.head.bias.zero_()
    z = torch.randn(2, 5, 4)
    cp = AttnLRP(attention_rule="cp")(layer, z, 0)
    with torch.no_grad():
        assert torch.allclose(cp.flatten(1).sum(1), layer(z)[:, 0], atol=1e-5)
    assert torch.allclose(AttnLRP()(layer, z, 0), cp / 2, atol=1e-6)
    # the softmax rule R_in = x * (R_out - s * sum(R_out)) is gradient x input through the softmax
    scores = torch.randn(3, 5, requires_grad=True)
    s = scores.softmax(-1)
    r_out = torch.randn(3, 5)
    (grad,) = torch.autograd.grad(s, scores, r_out / s.detach())
    expected = scores.detach() * (r_out - s.detach() * r_out.sum(-1, keepdim=True))
    assert torch.allclose(scores.detach() * grad, expected, atol=1e-6)


def test_attnlrp_keeps_the_contract_and_explains_tokens():
    from lightning_xai.attribution.base import build_attributor
    from lightning_xai.attribution.lrp.transformer import AttnLRP

    vit = vit_tiny(image_size=32, patch_size=8)
    put_in_train_mode_with_grads(vit)
    before = snapshot(vit)
    x = torch.rand(2, 3, 32, 32)
    plain = build_attributor({"name": "attnlrp"})(vit, x, 1)
    with torch.inference_mode():
        under_inference = AttnLRP()(vit, x.clone(), 1)
    assert torch.equal(plain, under_inference)
    assert_unchanged(vit, before)
    text = TextTransformer(20, 3, max_len=6).eval()
    ids = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        relevance = AttnLRP(attention_rule="cp", embedding="embedding")(text, ids, 0)
    assert relevance.shape == (2, 6)
    with pytest.raises(ValueError, match="pass embedding="):
        AttnLRP()(text, ids, 0)
    with pytest.raises(ValueError, match="no rule for \\['BatchNorm1d'\\]"):
        AttnLRP()(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="AttnLRP: unknown attention_rule"):
        AttnLRP(attention_rule="gamma")


def test_transformers_example_runs(tmp_path, capsys):
    import importlib.util
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "transformers.py")
    spec = importlib.util.spec_from_file_location("transformers_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    html, png = example.main(["--quick", "--out", str(tmp_path)])
    page = open(html, encoding="utf-8").read()
    assert page.count('<div style="font-family:monospace') == 3 * 4  # 3 methods x 4 sequences
    assert "key" in page and "[PAD]" not in page
    assert os.path.getsize(png) > 1000
    printed = capsys.readouterr().out
    # the quality table: one row per token method, four scores in [0, 1] each
    table = printed.split("explanation quality against the planted keys", 1)[1]
    for method in ("token_saliency", "token_integrated_gradients", "attnlrp", "attention_rollout"):
        row = re.search(rf"^  {method}\s+(.*)$", table, re.M)
        assert row is not None, table[:800]
        scores = [float(v) for v in row.group(1).split()]
        assert len(scores) == 4 and all(0.0 <= v <= 1.0 for v in scores), row.group(0)
    # the token SAE (measured in quick mode: explained variance 0.64, loss recovered 0.95)
    figures = r"explained variance ([\d.]+), L0 ([\d.]+), dead fraction ([\d.]+), loss recovered ([-\d.]+)"
    sae = re.search(figures, printed)
    assert sae is not None, printed[-1500:]
    explained, l0, dead, recovered = (float(v) for v in sae.groups())
    assert explained > 0.3 and l0 <= 8.0 and 0.0 <= dead < 0.5 and 0.5 < recovered <= 1.05


# ---------------------------------------------------------------------------------------------------------------
# the CAM family on token layers
# ---------------------------------------------------------------------------------------------------------------


def test_gradcam_on_a_vit_token_layer_equals_the_hand_computation():
    from lightning_xai.attribution.cam import GradCAM, ScoreCAM

    torch.manual_seed(0)
    vit = vit_tiny(image_size=32, patch_size=8).eval()
    with torch.no_grad():
        vit.heads.head.weight.normal_()
    x = torch.rand(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    captured: list[torch.Tensor] = []
    handle = dict(vit.named_modules())[layer].register_forward_hook(lambda _m, _i, o: captured.append(o))
    try:
        scores = vit(x)[:, 3]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(scores.sum(), captured[0])
    act, grad = captured[0].detach()[:, 1:], grad[:, 1:]  # patch tokens [B, 16, D], class token dropped
    weights = grad.mean(dim=1)  # spatial mean of the gradient per channel
    grid = torch.einsum("bd,btd->bt", weights, act).clamp_min(0).view(2, 1, 4, 4)  # row-major patches
    expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    result = GradCAM(layer=layer)(vit, x, 3)
    assert result.shape == (2, 1, 32, 32)
    assert torch.allclose(result, expected, atol=1e-6)
    assert torch.allclose(GradCAM(layer=layer, reshape=(4, 4))(vit, x, 3), expected, atol=1e-6)
    assert ScoreCAM(layer=layer, max_channels=4)(vit, x, 3).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="reshape must be None"):
        GradCAM(layer=layer, reshape=(4,))


def test_text_classifier_reads_dict_batches_with_custom_keys_as_tuples():
    """The training arguments of the model base reach TextClassifier: a dict batch with custom keys gives the tuple
    batch's loss exactly, and a missing key is a clear error."""
    from lightning_xai.data.tokens import PlantedTokens
    from lightning_xai.models.transformers import TextClassifier

    data = PlantedTokens(size=16, seed=0)
    torch.manual_seed(0)
    plain = TextClassifier(data.vocab_size, data.num_classes, max_len=data.seq_len)
    keyed = TextClassifier(data.vocab_size, data.num_classes, max_len=data.seq_len, input_key="ids",
                           label_key="answer")
    keyed.load_state_dict(plain.state_dict())
    tuple_loss = plain.compute_losses((data.tokens, data.labels), "train").loss
    dict_loss = keyed.compute_losses({"ids": data.tokens, "answer": data.labels}, "train").loss
    assert torch.equal(tuple_loss, dict_loss)
    with pytest.raises(ValueError, match="label_key='answer'"):
        keyed.compute_losses({"ids": data.tokens, "y": data.labels}, "train")
