"""Sparse autoencoders (lightning_xai/models/sae.py): architectures, constraints, dead latents, metrics, splicing,
interpretation and the synthetic superposition check."""

from __future__ import annotations

import csv
import glob
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import GapCNN
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.models.activations import ActivationBatch, ActivationDataModule, ActivationSource
from lightning_xai.models.sae import (
    ReLUSAE,
    ReLUSAEConfig,
    SAEReconstructionMetrics,
    SparseAutoencoder,
    TiedSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    build_sae,
    config_from_dict,
    config_to_dict,
)
from lightning_xai.namespace import pl

CSVLogger = pl.loggers.CSVLogger
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _vectors(n: int, d: int, seed: int = 0, nonneg: bool = False) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x.abs() if nonneg else x


def _identity_sae(d: int) -> SparseAutoencoder:
    """A ReLU SAE with 2d latents that reconstructs every vector exactly: relu(x) - relu(-x) = x."""
    module = SparseAutoencoder(ReLUSAEConfig(d_in=d, d_sae=2 * d, init_b_dec="zeros"))
    eye = torch.eye(d)
    with torch.no_grad():
        module.sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        module.sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        module.sae.b_enc.zero_()
        module.sae.b_dec.zero_()
    return module


def superposition(n: int, num_features: int = 64, d: int = 32, p: float = 0.03, seed: int = 0):
    """sae_lens.synthetic-style data: sparse non-negative combinations of known unit directions in superposition."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_features, d, generator=g)
    features = features / features.norm(dim=1, keepdim=True)
    active = torch.rand(n, num_features, generator=g) < p
    magnitude = 0.5 + torch.rand(n, num_features, generator=g)
    return (active * magnitude) @ features, features


# ----------------------------------------------------------------------------------------------------- configs
def test_configs_validate_and_round_trip():
    with pytest.raises(ValueError, match=r"k = 9 active latents is more than the d_sae = 8"):
        TopKSAEConfig(d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="d_sae must be an integer >= 1"):
        ReLUSAEConfig(d_in=4, d_sae=0)
    with pytest.raises(ValueError, match="l1_coefficient"):
        TiedSAEConfig(d_in=4, d_sae=8, l1_coefficient=-1.0)
    with pytest.raises(ValueError, match="unknown init_b_dec"):
        ReLUSAEConfig(d_in=4, d_sae=8, init_b_dec="median")
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        config_from_dict({"architecture": "gated", "d_in": 4, "d_sae": 8})
    with pytest.raises(TypeError, match="SAE config"):
        SparseAutoencoder(sae=[4, 8])
    for config in (ReLUSAEConfig(4, 8, l1_warmup_steps=3), TiedSAEConfig(4, 8), TopKSAEConfig(4, 8, k=2)):
        assert config_from_dict(config_to_dict(config)) == config
        assert type(build_sae(config_to_dict(config))).__name__.lower().startswith(config.architecture)


# ----------------------------------------------------------------------------------------------------- forward
def test_relu_loss_parts_match_a_direct_computation():
    torch.manual_seed(0)
    sae = ReLUSAE(ReLUSAEConfig(d_in=5, d_sae=7, l1_coefficient=3.0, l1_warmup_steps=10))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(5))
        sae.b_enc.copy_(torch.randn(7))
    x = _vectors(6, 5)
    out = sae.training_forward(x, step=4)
    we, be, wd, bd = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    xn = x.double().numpy()
    f = np.maximum((xn - bd) @ we + be, 0.0)
    x_hat = f @ wd + bd
    mse = np.mean(np.sum((xn - x_hat) ** 2, axis=1))
    l1 = np.mean(np.abs(f).sum(axis=1))
    lam = 3.0 * 4 / 10
    assert out.losses["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out.losses["l1"].item() == pytest.approx(lam * l1, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.losses.values()), rel=1e-6)
    assert [sae.l1_coefficient_at(s) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 1.5, 3.0, 3.0])


def test_tied_sae_uses_one_matrix_for_both_directions():
    sae = build_sae(TiedSAEConfig(d_in=5, d_sae=7))
    assert [n for n, _ in sae.named_parameters()] == ["b_enc", "b_dec", "W"]
    x = _vectors(4, 5)
    expected = torch.relu((x - sae.b_dec) @ sae.W.t() + sae.b_enc) @ sae.W + sae.b_dec
    torch.testing.assert_close(sae(x), expected)


def test_topk_l0_is_exactly_k():
    x = _vectors(64, 16)
    signed = TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=5, post_relu=False))
    assert ((signed.encode(x) != 0).sum(dim=1) == 5).all()
    sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=5))
    f = sae.encode(x)
    pre = sae.pre_activations(x)
    kth_positive = (pre.sort(dim=1, descending=True).values[:, :5] > 0).sum(dim=1)
    assert torch.equal((f != 0).sum(dim=1), kth_positive)  # the kept values that survive the ReLU
    assert ((f != 0).sum(dim=1) <= 5).all() and (f >= 0).all()
    # the kept latents are the k largest pre-activations
    top = pre.topk(5, dim=1).indices
    assert torch.equal(torch.gather(f, 1, top), torch.relu(torch.gather(pre, 1, top)))


def test_auxk_loss_matches_a_direct_computation_and_reaches_only_dead_latents():
    torch.manual_seed(1)
    config = TopKSAEConfig(d_in=6, d_sae=12, k=2, aux_k=3)
    sae = TopKSAE(config)
    x = _vectors(5, 6)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 4, 7, 8, 10]] = True
    out = sae.training_forward(x, dead=dead)
    pre = sae.pre_activations(x).detach()
    x_hat = sae(x).detach()
    expected = 0.0
    for i in range(5):
        order = sorted(torch.nonzero(dead).flatten().tolist(), key=lambda j: -float(pre[i, j]))[:3]
        e_hat = sum(max(float(pre[i, j]), 0.0) * sae.W_dec[j].detach() for j in order)
        expected += float(((x[i] - x_hat[i]) - e_hat).square().sum())
    assert out.losses["aux"].item() == pytest.approx(expected / 5 / 32, rel=1e-5)
    grad = torch.autograd.grad(out.losses["aux"], sae.W_dec)[0]
    assert grad[~dead].abs().max() == 0, "the auxiliary loss must only train dead latents"
    assert grad[dead].abs().max() > 0
    no_dead = sae.training_forward(x, dead=torch.zeros(12, dtype=torch.bool))
    assert no_dead.losses["aux"].item() == 0.0


def test_parallel_gradient_removal_and_renormalisation():
    sae = ReLUSAE(ReLUSAEConfig(d_in=4, d_sae=6))
    g = torch.randn(6, 4)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_gradient()
    for i in range(6):  # projection onto the tangent space, written as a matrix
        w = sae.W_dec[i].detach()
        projector = torch.eye(4) - torch.outer(w, w)
        torch.testing.assert_close(sae.W_dec.grad[i], projector @ g[i], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 7).float()[:, None])
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize(
    "config",
    [
        ReLUSAEConfig(d_in=8, d_sae=32, l1_coefficient=1.0),
        TiedSAEConfig(d_in=8, d_sae=32, l1_coefficient=1.0),
        TopKSAEConfig(d_in=8, d_sae=32, k=3, dead_window=64),
    ],
    ids=["relu", "tied", "topk"],
)
def test_decoder_columns_stay_unit_norm_during_training(config):
    pl.seed_everything(0)
    module = SparseAutoencoder(config, lr=0.05)  # a large step: without the constraint norms would drift
    x = _vectors(256, 8)
    _trainer(max_steps=12).fit(module, DataLoader(TensorDataset(x), batch_size=32, shuffle=True))
    norms = module.sae.decoder_weight.detach().norm(dim=1)
    assert (norms - 1).abs().max() < 1e-5
    # the pre-encoder bias was initialised to the data mean (and then trained)
    assert bool(module.b_dec_initialized)


# ----------------------------------------------------------------------------------------------------- dead latents
def _relu_with_dead_latents(resample_every: int | None) -> tuple[SparseAutoencoder, pl.Trainer, torch.Tensor]:
    pl.seed_everything(0)
    config = ReLUSAEConfig(
        d_in=8, d_sae=16, l1_coefficient=0.1, dead_window=64, resample_every=resample_every, resample_pool=256
    )
    module = SparseAutoencoder(config, lr=1e-3)
    with torch.no_grad():  # latents 0..3 can never fire: large negative bias, no gradient through a dead ReLU
        module.sae.b_enc[:4] = -100.0
    x = _vectors(512, 8, nonneg=True)
    trainer = _trainer(max_steps=4)
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=32, shuffle=True))
    return module, trainer, x


def test_dead_latents_are_tracked_over_a_window_of_samples():
    module, _, _ = _relu_with_dead_latents(None)
    assert module.samples_since_fired[:4].tolist() == [4 * 32] * 4
    assert module.dead_latents()[:4].all()
    alive = module.samples_since_fired[4:] < 64
    assert alive.any()


def test_resampling_revives_dead_latents_and_resets_their_adam_state():
    control, _, x = _relu_with_dead_latents(None)
    assert (control.sae.encode(x)[:, :4] == 0).all(), "without resampling they stay dead"
    module, trainer, x = _relu_with_dead_latents(4)
    assert int(module.resamplings) == 1
    sae = module.sae
    f = sae.encode(x)
    assert (f[:, :4] > 0).any(dim=0).all(), "every resampled latent fires again"
    assert (sae.b_enc[:4] == 0).all()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    # the new decoder columns are normalised (x - b_dec) of pool vectors (= training vectors)
    candidates = x - sae.b_dec.detach()
    candidates = candidates / candidates.norm(dim=1, keepdim=True)
    assert ((sae.W_dec[:4].detach() @ candidates.t()).max(dim=1).values > 1 - 1e-5).all()
    # their encoder columns point the same way, scaled to 0.2 x the mean norm of the alive encoder columns
    cos = torch.nn.functional.cosine_similarity(sae.W_enc[:, :4].t(), sae.W_dec[:4], dim=1)
    assert (cos > 1 - 1e-5).all()
    norms = sae.W_enc[:, :4].detach().norm(dim=0)
    assert torch.allclose(norms, norms[0].expand(4)) and float(norms[0]) > 0
    optimizer = trainer.optimizers[0]
    for param, dim in ((sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)):
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key].index_select(dim, torch.arange(4)) == 0).all(), f"{key} of resampled latents"
        assert state["exp_avg_sq"].abs().sum() > 0, "the other latents keep their optimiser state"


# ----------------------------------------------------------------------------------------------------- metrics
def test_reconstruction_metrics_match_numpy_and_merge_exactly():
    torch.manual_seed(0)
    x, x_hat = torch.randn(20, 4) + 3.0, torch.randn(20, 4)
    latents = torch.relu(torch.randn(20, 6))
    latents[:, 2] = 0.0
    metric = SAEReconstructionMetrics(4, 6)
    metric.update(x[:7], x_hat[:7], latents[:7])
    metric.update(x[7:], x_hat[7:], latents[7:])
    out = metric.compute()
    xn, xh = x.double().numpy(), x_hat.double().numpy()
    sse = ((xn - xh) ** 2).sum()
    assert out["fvu"].item() == pytest.approx(sse / ((xn - xn.mean(axis=0)) ** 2).sum(), rel=1e-10)
    assert out["nmse"].item() == pytest.approx(sse / (xn**2).sum(), rel=1e-10)
    assert out["l0"].item() == pytest.approx(float((latents != 0).sum()) / 20)
    assert out["dead_fraction"].item() == pytest.approx(1 / 6)


def test_identity_sae_spliced_in_reproduces_the_model_and_scores_one(gap_cnn):
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 4, (6,))
    # "features.3" is BatchNorm before an in-place ReLU: signed activations, and the splice must survive the ReLU
    source = ActivationSource(gap_cnn, "features.3", normalize=True)
    source.estimate_scale([images])
    module = _identity_sae(8)
    module.attach_source(source)
    with torch.no_grad():
        plain = gap_cnn(images)
    torch.testing.assert_close(source.model_output(images, replace=module.reconstruct), plain, rtol=1e-5, atol=1e-5)
    batch = ActivationBatch(source(images), images, (labels,))
    with torch.no_grad():
        module.validation_step(batch, 0)
    recon = module.val_metrics.compute()
    down = module.val_downstream.compute()
    assert recon["fvu"].item() < 1e-10 and recon["nmse"].item() < 1e-10
    assert down["ce_sae"].item() == pytest.approx(down["ce_orig"].item(), abs=1e-6)
    assert down["acc_sae"].item() == down["acc_orig"].item()
    assert down["downstream_score"].item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():  # zero-ablating BN's output: the in-place ReLU of 0 is 0, GAP 0, logits = head bias
        zero_logits = gap_cnn.head.bias.expand(6, -1)
        ce_zero = torch.nn.functional.cross_entropy(zero_logits, labels).item()
        ce_orig = torch.nn.functional.cross_entropy(plain, labels).item()
    assert down["ce_zero"].item() == pytest.approx(ce_zero, rel=1e-6)
    assert down["ce_orig"].item() == pytest.approx(ce_orig, rel=1e-6)


def test_bad_inputs_raise_clear_errors(gap_cnn):
    source = ActivationSource(gap_cnn, "features")
    source(torch.rand(1, 3, 8, 8))
    module = SparseAutoencoder(TopKSAEConfig(d_in=5, d_sae=10, k=2))
    with pytest.raises(ValueError, match=r"d_in = 5.*gives vectors of size 8.*set d_in = 8"):
        module.attach_source(source)
    with pytest.raises(ValueError, match=r"d_in = 5 but got activations of shape \[3, 8\]"):
        module.training_step(torch.randn(3, 8), 0)
    with pytest.raises(ValueError, match="not found"):
        ActivationDataModule(pl.LightningDataModule(), gap_cnn, "layer4")
    # with a datamodule the mismatch is found in setup, before any training step
    data = ActivationDataModule(_ImageData(), gap_cnn, "features")
    with pytest.raises(ValueError, match="set d_in = 8"):
        _trainer(max_steps=1).fit(SparseAutoencoder(TopKSAEConfig(d_in=5, d_sae=10, k=2)), data)
    with pytest.raises(ValueError, match="no activation source"):
        module.latent_maps(torch.rand(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------------- interpretation
def test_top_activating_latent_table_and_concept_iou_match_brute_force(gap_cnn, tmp_path):
    torch.manual_seed(0)
    images = torch.rand(10, 3, 8, 8)
    source = ActivationSource(gap_cnn, "features")
    module = SparseAutoencoder(ReLUSAEConfig(d_in=8, d_sae=12))
    with torch.no_grad():
        module.sae.b_enc.fill_(-0.02)
    module.attach_source(source)
    maps = module.latent_maps(images)
    vectors = source(images)  # [10 * 64, 8], image-major, row-major positions
    brute = module.sae.encode(vectors).detach().view(10, 8, 8, 12).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps, brute)
    scores, indices = module.top_activating(images, latents=[0, 5], n_top=3, batch_size=4)
    peak = brute.amax(dim=(2, 3))
    for row, latent in enumerate([0, 5]):
        expected = torch.argsort(peak[:, latent], descending=True, stable=True)[:3]
        assert indices[row].tolist() == expected.tolist()
        torch.testing.assert_close(scores[row], peak[expected, latent])
    written = module.log_latent_table([], images, step=3, latents=[0, 5], fallback_dir=str(tmp_path))
    with open(written[0]) as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["latent", "fire_rate", "max_activation"] and len(rows) == 3
    assert len(glob.glob(str(tmp_path / "*.png"))) == 2 * module.top_images
    # dissection of the latents against concept masks: IoU from the reported thresholds, recomputed by hand
    masks = torch.rand(10, 2, 8, 8) > 0.6
    data = [(images[:5], masks[:5]), (images[5:], masks[5:])]
    result = module.latent_concept_iou(data, ["a:x", "b:y"], quantile=0.05)
    fires = brute > result.thresholds.view(1, -1, 1, 1)
    inter = torch.einsum("bkhw,bchw->kc", fires.float(), masks.float())
    union = fires.sum(dim=(0, 2, 3)).float()[:, None] + masks.sum(dim=(0, 2, 3)).float()[None, :] - inter
    torch.testing.assert_close(result.iou.float(), torch.where(union > 0, inter / union.clamp_min(1), 0.0))


# ----------------------------------------------------------------------------------------------------- end to end
class _ImageData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(24, 3, 8, 8, generator=g), torch.randint(0, 4, (24,), generator=g)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:16], self.y[:16]), batch_size=8)


def test_fit_on_images_logs_metrics_table_and_checkpoint_round_trip(tmp_path):
    pl.seed_everything(0)
    model = GapCNN().eval()
    dm = ActivationDataModule(_ImageData(), model, "features", normalize=True)
    module = SparseAutoencoder(TopKSAEConfig(d_in=8, d_sae=16, k=2), log_top_latents=2, top_images=2)
    logger = CSVLogger(str(tmp_path), name="sae")
    trainer = _trainer(max_epochs=2, logger=logger, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    for key in ("val_l0", "val_fvu", "val_nmse", "val_dead_fraction", "val_downstream_score", "val_acc_sae"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert float(metrics["val_l0"]) <= 2.0
    assert float(module.activation_scale) == pytest.approx(float(dm.source.scale))
    assert glob.glob(str(tmp_path / "sae" / "**" / "sae_top_latents_step*.csv"), recursive=True)
    # evaluating later with a fresh datamodule uses the scale the SAE was trained with: the same numbers
    fresh = ActivationDataModule(_ImageData(), model, "features", normalize=True, scale_batches=1)
    validated = _trainer().validate(module, datamodule=fresh, verbose=False)[0]
    assert float(fresh.source.scale) == pytest.approx(float(module.activation_scale))
    assert validated["val_fvu"] == pytest.approx(float(metrics["val_fvu"]), rel=1e-5)
    path = tmp_path / "sae.ckpt"
    trainer.save_checkpoint(path)
    loaded = SparseAutoencoder.load_from_checkpoint(path)
    assert loaded.config == module.config
    for name, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


def test_synthetic_superposition_features_are_recovered():
    """64 known directions in 32 dims, each active with probability 0.03: the trained TopK SAE's decoder columns
    find every one of them (mean max cosine similarity >= 0.9)."""
    x, features = superposition(8192, seed=100)  # not the seed of the SAE's initialisation: no free match
    pl.seed_everything(0)
    module = SparseAutoencoder(TopKSAEConfig(d_in=32, d_sae=128, k=4, dead_window=2048), lr=1e-2, downstream=False)
    untrained = (features @ module.sae.decoder_weight.detach().t()).max(dim=1).values
    assert untrained.mean() < 0.7, "the check must be able to fail: random directions do not match"
    _trainer(max_epochs=6).fit(module, DataLoader(TensorDataset(x), batch_size=128, shuffle=True))
    cosine = features @ module.sae.decoder_weight.detach().t()
    best = cosine.max(dim=1).values
    assert best.mean() >= 0.9, f"mean max cosine {best.mean():.3f}"
    assert best.min() >= 0.8, "every true feature has a matching decoder column"


def test_example_config_runs_with_the_cli(tmp_path):
    import os

    from lightning_xai.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inner = "--data.init_args.datamodule.init_args"
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(root, "examples", "configs", "sae.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            f"{inner}.n_train=16",
            f"{inner}.n_val=8",
            f"{inner}.n_test=8",
            f"{inner}.image_size=24",
            f"{inner}.batch_size=8",
        ]
    )
    assert isinstance(cli.model, SparseAutoencoder) and isinstance(cli.model.config, TopKSAEConfig)
    assert cli.model.config.d_sae == 8 * cli.model.config.d_in
    assert isinstance(cli.datamodule, ActivationDataModule) and cli.datamodule.cache_status == "written"
    assert "val_downstream_score" in cli.trainer.callback_metrics


# ------------------------------------------------------------------------------------------ issue 18: 11, 12
def test_nonfinite_activations_are_rejected_when_the_decoder_bias_is_initialised():
    x = _vectors(32, 8)
    x[3, 2] = float("nan")
    x[7, 1] = float("inf")
    module = SparseAutoencoder(ReLUSAEConfig(d_in=8, d_sae=16))
    with pytest.raises(ValueError, match=r"SparseAutoencoder: the first training batch's activations hold 2 non-"):
        _trainer(max_steps=2).fit(module, DataLoader(TensorDataset(x), batch_size=32))
    assert not bool(module.b_dec_initialized) and torch.isfinite(module.sae.b_dec).all()


def test_a_later_nonfinite_loss_is_a_clear_error():
    from lightning_xai.models.base import NonFiniteLossError

    x = _vectors(64, 8)
    x[40, 0] = float("nan")  # second batch: the bias is already initialised from the first
    module = SparseAutoencoder(ReLUSAEConfig(d_in=8, d_sae=16))
    with pytest.raises(NonFiniteLossError, match=r"train batch 1 .*non-finite parts: \[.*'mse'"):
        _trainer(max_steps=4).fit(module, DataLoader(TensorDataset(x), batch_size=32))


def test_downstream_score_is_nan_with_a_warning_when_zero_ablation_does_not_hurt():
    from lightning_xai.models.sae import DownstreamScore

    labels = torch.tensor([0, 1, 0, 1])
    confident = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]])
    wrong = -confident
    metric = DownstreamScore()
    metric.update(wrong, confident, confident, labels)  # the zero-ablated model beats the original
    with pytest.warns(UserWarning, match=r"DownstreamScore: zero-ablating .* downstream_score is NaN"):
        score = metric.compute()["downstream_score"]
    assert math.isnan(score.item())
    metric = DownstreamScore()
    metric.update(confident, confident, wrong, labels)
    assert metric.compute()["downstream_score"].item() == pytest.approx(1.0)
