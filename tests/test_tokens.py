"""Token data with planted ground truth and token attributions: closed forms, the contract, the planted evidence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.attention import AttentionRollout, TransformerAttribution
from lightning_xai.attribution.base import ATTRIBUTORS, build_attributor
from lightning_xai.attribution.lrp.transformer import AttnLRP
from lightning_xai.attribution.token_surrogate import TokenKernelSHAP, TokenLIME
from lightning_xai.attribution.tokens import (
    TokenInputXGradient,
    TokenIntegratedGradients,
    TokenOcclusion,
    TokenSaliency,
)
from lightning_xai.data.tokens import (
    MASK_TOKEN,
    PAD_TOKEN,
    PlantedTokens,
    key_token_ids,
    patch_masks,
    token_names,
)
from lightning_xai.models.transformers import TextTransformer

# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def test_planted_tokens_label_is_decided_by_the_planted_keys_only():
    ds = PlantedTokens(
        num_classes=4, size=400, seq_len=12, vocab_size=24, keys_per_class=2, num_planted=2, min_length=6, seed=3
    )
    keys = key_token_ids(4, 2)
    assert ds.tokens.shape == (400, 12) and ds.masks.shape == (400, 12)
    assert torch.bincount(ds.labels).tolist() == [100] * 4
    is_key = (ds.tokens[..., None, None] == keys).any(-1)  # [N, T, C]: token t is a key of class c
    # every planted position holds a key of the sequence's own class, and no other position holds any key
    own = is_key.gather(2, ds.labels.view(-1, 1, 1).expand(-1, 12, 1)).squeeze(2)
    assert torch.equal(own, ds.masks.bool())
    assert torch.equal(is_key.any(2), ds.masks.bool())
    assert (ds.masks.sum(1) == 2).all()
    # padding after the length, never on a planted key; lengths within bounds
    positions = torch.arange(12)
    assert torch.equal(ds.tokens == PAD_TOKEN, positions >= ds.lengths[:, None])
    assert ds.lengths.min() >= 6 and ds.lengths.max() <= 12
    # deterministic, and the seed matters
    again = PlantedTokens(
        num_classes=4, size=400, seq_len=12, vocab_size=24, keys_per_class=2, num_planted=2, min_length=6, seed=3
    )
    assert torch.equal(again.tokens, ds.tokens) and torch.equal(again.masks, ds.masks)
    assert not torch.equal(PlantedTokens(4, 400, 12, 24, 2, 2, 6, seed=4).tokens, ds.tokens)
    assert ds.decode(ds.tokens[0])[0] == token_names(4, 2, 24)[int(ds.tokens[0, 0])]
    tokens, label, mask = ds[5]
    assert tokens.dtype == torch.long and label.ndim == 0 and mask.dtype == torch.float32


def test_planted_tokens_filler_is_independent_of_the_label():
    """Filler tokens are drawn from one distribution for every class: their class-conditional histograms agree."""
    ds = PlantedTokens(num_classes=2, size=4000, seq_len=16, vocab_size=20, seed=0)
    filler = ds.masks == 0
    hists = [torch.bincount(ds.tokens[(ds.labels == c)[:, None] & filler], minlength=20).float() for c in range(2)]
    hists = [h / h.sum() for h in hists]
    assert (hists[0] - hists[1]).abs().max() < 0.01


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 8}, "PlantedTokens: vocab_size must be an integer >= 14, got 8"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_planted": 20}, "num_planted"),
        ({"min_length": 40}, "min_length must be <= seq_len"),
    ],
)
def test_planted_tokens_rejects_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlantedTokens(**{"size": 10, **kwargs})


def test_patch_masks_average_pixels_per_patch():
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, :4, :2] = 1  # half of the top-left 4x4 patch
    out = patch_masks(masks, 4)
    assert torch.equal(out, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))
    with pytest.raises(ValueError, match="not divisible"):
        patch_masks(masks, 3)


# ---------------------------------------------------------------------------------------------------------------
# closed forms on a model linear in the embeddings
# ---------------------------------------------------------------------------------------------------------------


class LinearTokenModel(nn.Module):
    """``logits = W mean_t(E[x_t]) + b``: every embedding attribution has a closed form in ``E`` and ``W``."""

    def __init__(self, vocab: int = 12, dim: int = 5, classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.head.weight.copy_(torch.randn(classes, dim, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(dim=1))


@pytest.fixture
def linear_tokens():
    model = LinearTokenModel().eval()
    ids = torch.tensor([[3, 4, 5, 6, 0], [7, 2, 9, 0, 0]])
    return model, ids


def test_embedding_gradient_methods_closed_forms(linear_tokens):
    model, ids = linear_tokens
    emb, w = model.embedding.weight.detach(), model.head.weight.detach()
    target = torch.tensor([1, 2])
    length = ids.shape[1]
    wt = w[target][:, None, :]  # [B, 1, D]
    # IG on the embeddings of a linear model: (e - e') . w / T, exactly, whatever the steps
    for steps in (1, 4):
        ig = TokenIntegratedGradients(baseline=MASK_TOKEN, steps=steps)(model, ids, target)
        assert torch.allclose(ig, ((emb[ids] - emb[MASK_TOKEN]) * wt).sum(-1) / length, atol=1e-6)
    ig0 = TokenIntegratedGradients(baseline="zeros", steps=3, method="riemann_trapezoid")(model, ids, target)
    assert torch.allclose(ig0, (emb[ids] * wt).sum(-1) / length, atol=1e-6)
    ixg = TokenInputXGradient()(model, ids, target)
    assert torch.allclose(ixg, ig0, atol=1e-6)
    sal = TokenSaliency()(model, ids, target)
    assert torch.allclose(sal, (w[target].norm(dim=1) / length)[:, None].expand(-1, length), atol=1e-6)
    sal1 = TokenSaliency(norm="l1")(model, ids, target)
    assert torch.allclose(sal1, (w[target].abs().sum(1) / length)[:, None].expand(-1, length), atol=1e-6)
    # skipped tokens (padding) get exactly 0 and keep their embedding on the IG path
    skip = TokenIntegratedGradients(baseline=MASK_TOKEN, steps=2, skip_tokens=[0])(model, ids, target)
    assert torch.equal(skip[ids == 0], torch.zeros(int((ids == 0).sum())))
    assert torch.allclose(skip[ids != 0], ig[ids != 0], atol=1e-6)


def test_token_occlusion_closed_form_and_windows(linear_tokens):
    model, ids = linear_tokens
    emb, w = model.embedding.weight.detach(), model.head.weight.detach()
    length = ids.shape[1]
    occ = TokenOcclusion(mask_token=MASK_TOKEN, batch_size=3)(model, ids, 0)
    expected = ((emb[ids] - emb[MASK_TOKEN]) * w[0]).sum(-1) / length
    assert torch.allclose(occ, expected, atol=1e-6)
    # window 2 on a linear model: each window's drop is the sum of its two tokens' drops; a token's score is
    # the mean over the (one or two) windows covering it
    occ2 = TokenOcclusion(mask_token=MASK_TOKEN, window=2)(model, ids, 0)
    pair = expected[:, :-1] + expected[:, 1:]
    manual = torch.zeros_like(expected)
    manual[:, 0] = pair[:, 0]
    manual[:, -1] = pair[:, -1]
    manual[:, 1:-1] = (pair[:, :-1] + pair[:, 1:]) / 2
    assert torch.allclose(occ2, manual, atol=1e-6)
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        skipped = TokenOcclusion(mask_token=MASK_TOKEN, skip_tokens=[0])(model, ids, 0)
    finally:
        handle.remove()
    assert (skipped[ids == 0] == 0).all() and torch.allclose(skipped[ids != 0], expected[ids != 0], atol=1e-6)
    # padding windows are not evaluated: the unoccluded batch plus one sequence per non-padding token
    assert sum(rows) == ids.shape[0] + int((ids != 0).sum())


def test_token_surrogates_recover_the_token_effects_of_an_additive_model(linear_tokens):
    model, ids = linear_tokens
    emb, w = model.embedding.weight.detach(), model.head.weight.detach()
    target = torch.tensor([2, 0])
    effects = ((emb[ids] - emb[MASK_TOKEN]) * w[target][:, None, :]).sum(-1) / ids.shape[1]
    effects = effects.masked_fill(ids == 0, 0.0)
    # exact Shapley values (2^M <= num_samples: every coalition evaluated) of an additive game = the effects
    exact = TokenKernelSHAP(mask_token=MASK_TOKEN, num_samples=64, skip_tokens=[0], batch_size=7)(model, ids, target)
    assert torch.allclose(exact, effects, atol=1e-5)
    # sampled coalitions on a longer sequence: still exact for an additive model
    long_ids = torch.randint(2, 12, (2, 10), generator=torch.Generator().manual_seed(0))
    long_effects = ((emb[long_ids] - emb[MASK_TOKEN]) * w[target][:, None, :]).sum(-1) / 10
    sampled = TokenKernelSHAP(mask_token=MASK_TOKEN, num_samples=40)(model, long_ids, target)
    assert torch.allclose(sampled, long_effects, atol=1e-5)
    # LIME's weighted least squares (alpha=0) fits an additive model exactly
    lime = TokenLIME(mask_token=MASK_TOKEN, num_samples=64, alpha=0.0, skip_tokens=[0])(model, ids, target)
    assert torch.allclose(lime, effects, atol=1e-4)


def test_token_ig_completeness_on_a_nonlinear_model():
    torch.manual_seed(0)
    model = TextTransformer(20, 3, max_len=8).eval()
    ids = torch.randint(2, 20, (4, 8))
    attributions, gap = TokenIntegratedGradients("embedding", baseline=MASK_TOKEN, steps=32).attribute_with_gap(
        model, ids, 1
    )
    assert attributions.shape == (4, 8)
    with torch.no_grad():
        spread = (model(ids)[:, 1] - model(torch.full_like(ids, MASK_TOKEN))[:, 1]).abs()
    assert (gap.abs() <= 1e-3 * spread.clamp_min(1.0)).all(), (gap, spread)


def test_token_methods_are_registered_and_validate_arguments():
    for name in (
        "token_saliency",
        "token_input_x_gradient",
        "token_integrated_gradients",
        "token_occlusion",
        "attention_rollout",
        "transformer_attribution",
    ):
        assert name in ATTRIBUTORS
    for name in ("token_saliency", "token_occlusion", "token_kernel_shap", "attention_rollout"):
        assert build_attributor(name).accepts_token_ids
    assert AttnLRP(embedding="embedding").accepts_token_ids and not AttnLRP().accepts_token_ids
    assert not getattr(build_attributor("saliency"), "accepts_token_ids", False)
    built = build_attributor({"name": "token_integrated_gradients", "embedding": "emb", "steps": 4})
    assert isinstance(built, TokenIntegratedGradients) and built.steps == 4
    with pytest.raises(ValueError, match="baseline must be 'zeros' or a token id"):
        TokenIntegratedGradients(baseline="pad")
    with pytest.raises(ValueError, match="TokenSaliency: unknown norm"):
        TokenSaliency(norm="l3")
    with pytest.raises(ValueError, match="TokenOcclusion: window must be an integer >= 1"):
        TokenOcclusion(window=0)
    with pytest.raises(ValueError, match="skip_tokens must be a list"):
        TokenOcclusion(skip_tokens=0)


def test_token_methods_reject_bad_inputs_and_layers(linear_tokens):
    model, ids = linear_tokens
    with pytest.raises(TypeError, match="explains token ids"):
        TokenSaliency()(model, ids.float(), 0)
    with pytest.raises(ValueError, match="shape \\[B, T\\]"):
        TokenSaliency()(model, ids[0], 0)
    with pytest.raises(ValueError, match="close matches: \\['embedding'\\]"):
        TokenSaliency(embedding="embeding")(model, ids, 0)
    with pytest.raises(ValueError, match="out of range"):
        TokenOcclusion()(model, ids, 7)
    with pytest.raises(ValueError, match="longer than the sequences"):
        TokenOcclusion(window=9)(model, ids, 0)


# ---------------------------------------------------------------------------------------------------------------
# the attributor contract
# ---------------------------------------------------------------------------------------------------------------


def _methods() -> list:
    return [
        TokenSaliency(batch_size=2),
        TokenInputXGradient(batch_size=2),
        TokenIntegratedGradients(baseline=PAD_TOKEN, steps=3, batch_size=5, skip_tokens=[PAD_TOKEN]),
        TokenOcclusion(batch_size=4, skip_tokens=[PAD_TOKEN]),
        TokenLIME(num_samples=16, batch_size=5, skip_tokens=[PAD_TOKEN]),
        TokenKernelSHAP(num_samples=16, batch_size=5, skip_tokens=[PAD_TOKEN]),
        AttentionRollout(),
        TransformerAttribution(),
        AttnLRP(embedding="embedding"),
    ]


@pytest.mark.parametrize("method", _methods(), ids=lambda m: type(m).__name__)
def test_token_methods_keep_the_contract(method):
    torch.manual_seed(0)
    model = TextTransformer(16, 3, max_len=6, dropout=0.1)
    ids = torch.randint(2, 16, (3, 6))
    ids[0, 4:] = PAD_TOKEN
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        plain = method(model, ids, torch.tensor([0, 1, 2]))
        with torch.no_grad():
            under_no_grad = method(model, ids, torch.tensor([0, 1, 2]))
        with torch.inference_mode():
            under_inference = method(model, ids.clone(), torch.tensor([0, 1, 2]))
    finally:
        handle.remove()
    assert plain.shape == ids.shape and torch.isfinite(plain).all()
    assert not plain.requires_grad
    assert torch.allclose(plain, under_no_grad, atol=1e-6) and torch.allclose(plain, under_inference, atol=1e-6)
    assert_unchanged(model, before)
    if hasattr(method, "batch_size"):
        assert max(calls) <= method.batch_size
    # the model raises half-way: state restored, hooks removed
    with pytest.raises(ValueError, match="out of range"):
        method(model, ids, 5)
    assert_unchanged(model, before)
    # samples are independent: one sample alone gets the same scores as in the batch
    alone = method(model, ids[1:2], torch.tensor([1]))
    assert torch.allclose(alone, plain[1:2], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# planted ground truth: a trained model's attributions point at the key tokens
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_text_model():
    torch.manual_seed(0)
    data = PlantedTokens(size=600, min_length=10, seed=0)
    model = TextTransformer(data.vocab_size, data.num_classes, max_len=data.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(2):
        for idx in torch.randperm(len(data)).split(32):
            loss = F.cross_entropy(model(data.tokens[idx]), data.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test = PlantedTokens(size=64, min_length=10, seed=100)
    with torch.no_grad():
        accuracy = (model(test.tokens).argmax(1) == test.labels).float().mean()
    assert accuracy > 0.95
    return model, test


def _mass_and_pointing(scores: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """Share of the positive attribution on the key tokens, and the fraction of argmax tokens that are keys."""
    positive = scores.clamp_min(0)
    mass = ((positive * masks).sum(1) / positive.sum(1).clamp_min(1e-12)).mean()
    pointing = masks.gather(1, scores.argmax(1, keepdim=True)).mean()
    return float(mass), float(pointing)


@pytest.mark.parametrize(
    ("method", "min_mass", "min_pointing"),
    [
        (TokenIntegratedGradients(baseline=MASK_TOKEN, steps=8, skip_tokens=[PAD_TOKEN]), 0.5, 0.8),
        (TokenSaliency(skip_tokens=[PAD_TOKEN]), 0.3, 0.6),
        (TokenOcclusion(mask_token=MASK_TOKEN, skip_tokens=[PAD_TOKEN]), 0.4, 0.5),
        (TokenKernelSHAP(mask_token=MASK_TOKEN, num_samples=64, skip_tokens=[PAD_TOKEN]), 0.4, 0.6),
        (TokenLIME(mask_token=MASK_TOKEN, num_samples=64, skip_tokens=[PAD_TOKEN]), 0.4, 0.6),
        (AttnLRP(embedding="embedding"), 0.6, 0.8),
        (AttnLRP(attention_rule="cp", embedding="embedding"), 0.6, 0.8),
        (AttentionRollout(), 0.25, 0.7),
        (TransformerAttribution(), 0.3, 0.5),
    ],
    ids=lambda v: str(v) if isinstance(v, float) else getattr(v, "attention_rule", type(v).__name__),
)
def test_token_attributions_point_at_the_planted_keys(trained_text_model, method, min_mass, min_pointing):
    model, test = trained_text_model
    scores = method(model, test.tokens, test.labels)
    mass, pointing = _mass_and_pointing(scores, test.masks)
    assert mass >= min_mass and pointing >= min_pointing, (mass, pointing)
    # random maps over the unpadded tokens fail the same thresholds
    generator = torch.Generator().manual_seed(0)
    random = torch.rand(test.tokens.shape, generator=generator) * (test.tokens != PAD_TOKEN)
    random_mass, random_pointing = _mass_and_pointing(random, test.masks)
    assert random_mass < min_mass and random_pointing < min_pointing, (random_mass, random_pointing)


# ---------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------


def test_tokens_render_as_html_and_text():
    from lightning_xai.viz.text import batch_to_html, decode_tokens, tokens_to_html, tokens_to_text

    assert decode_tokens(torch.tensor([[0, 2], [5, 1]]), ["[PAD]", "[MASK]", "a"]) == [
        ["[PAD]", "a"],
        ["<5>", "[MASK]"],
    ]
    assert decode_tokens([3, 4]) == ["3", "4"] and decode_tokens([3], lambda i: f"t{i}") == ["t3"]

    tokens = ["the", "<b>", "key", "[PAD]"]
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0])
    page = tokens_to_html(tokens, scores, skip=["[PAD]"])
    assert "&lt;b&gt;" in page and "<b>" not in page and "[PAD]" not in page
    assert "rgba(214,39,40,1.000)" in page  # the largest positive score fully opaque red
    assert "rgba(31,119,180,0.500)" in page  # -1 at half the scale, blue
    assert 'title="+2.000"' in page
    assert tokens_to_text(tokens, scores) == "the(+0.500) <b>(-1.000) key(+2.000) [PAD](+0.000)"
    assert tokens_to_text(tokens, scores, top_k=1, skip=["[PAD]"]) == "the <b> key(+2.000)"
    # non-finite scores are shown as such, never as a colour or a plausible number
    bad = torch.tensor([float("nan"), 1.0, float("inf"), 0.0])
    assert "line-through" in tokens_to_html(tokens, bad) and 'title="nan"' in tokens_to_html(tokens, bad)
    assert tokens_to_text(tokens, bad, top_k=1) == "the(nan) <b>(+1.000) key(+inf) [PAD]"
    shared = batch_to_html([tokens, tokens], torch.stack([scores, scores / 2]), captions=["a", "b"], shared_scale=True)
    assert shared.count("<span") == 8 and "rgba(214,39,40,0.500)" in shared
    with pytest.raises(ValueError, match="one score per token"):
        tokens_to_text(tokens, scores[:3])


def test_token_maps_are_scored_by_the_localization_metrics_as_one_row_images():
    """A token map [B, T] and its key mask [B, T] viewed as [B, 1, T] images: the library's metrics apply as is."""
    from lightning_xai.evaluation.localization import pointing_game, relevance_mass

    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 12, generator=generator)
    masks = (torch.rand(6, 12, generator=generator) < 0.3).float()
    masks[:, 0] = 1
    mass = relevance_mass(scores[:, None], masks[:, None])
    assert torch.allclose(mass, (scores * masks).sum(1) / scores.sum(1))
    hits = pointing_game(scores[:, None], masks[:, None])
    assert torch.equal(hits, masks.gather(1, scores.argmax(1, keepdim=True))[:, 0])
