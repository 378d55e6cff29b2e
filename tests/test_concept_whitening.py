"""Tests of concept whitening: whitened covariance, the stable ZCA gradient, orthogonality and convergence of the
Cayley updates on a problem with a known answer, BatchNorm replacement, AUC-based purity against scikit-learn, and
DDP statistics against a single process that sees the union of the data."""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_unchanged, snapshot
from lightning_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.data.concepts import ConceptDataModule
from lightning_xai.models.backbones import SmallCNN
from lightning_xai.models.concept_whitening import (
    ConceptWhitening,
    ConceptWhiteningClassifier,
    auc_matrix,
    best_filter_auc,
    cayley_step,
    concept_purity,
    newton_inverse_sqrt,
    orthogonality_error,
    pooled_activations,
    replace_batchnorm,
    zca_inverse_sqrt,
)
from lightning_xai.namespace import pl

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def correlated_batch(channels: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=g) + 3 * torch.eye(channels)
    z = torch.randn(10, channels, 5, 5, generator=g)
    return torch.einsum("oc,bchw->bohw", mixing, z) + torch.linspace(-2, 5, channels).view(1, -1, 1, 1)


def pixel_covariance(y: torch.Tensor) -> torch.Tensor:
    flat = y.transpose(0, 1).reshape(y.shape[1], -1).double()
    centred = flat - flat.mean(dim=1, keepdim=True)
    return centred @ centred.T / flat.shape[1]


def random_rotation(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.to(dtype)


# ------------------------------------------------------------------------------------------------- whitening
@pytest.mark.parametrize(("whitening", "iterations"), [("zca", 1), ("newton", 40)])
def test_whitened_output_has_identity_covariance_in_train_mode(whitening, iterations):
    cw = ConceptWhitening(12, 3, whitening=whitening, newton_iterations=iterations, eps=1e-8).train()
    cw.rotation.copy_(random_rotation(12))  # any rotation of white data is white
    y = cw(correlated_batch())
    assert (pixel_covariance(y) - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-3
    assert y.flatten(2).mean(dim=(0, 2)).abs().max() < 1e-4


def test_eval_mode_uses_the_running_statistics():
    x = correlated_batch()
    cw = ConceptWhitening(12, 3, momentum=1.0).train()  # momentum 1: the running statistics are the batch's
    y_train = cw(x)
    y_eval = cw.eval()(x)
    assert torch.allclose(y_train, y_eval, atol=1e-4)
    cw2 = ConceptWhitening(12, 3, momentum=0.25).train()
    cw2(x)
    flat = x.transpose(0, 1).reshape(12, -1)
    assert torch.allclose(cw2.running_mean, 0.25 * flat.mean(dim=1), atol=1e-5)  # lerp from 0
    assert torch.equal(cw2.eval()(x), cw2(x))  # eval never updates the statistics


def test_zca_backward_is_the_exact_gradient():
    x = torch.randn(5, 14, dtype=torch.float64, requires_grad=True)

    def whiten(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        return zca_inverse_sqrt(centred @ centred.T / 14 + 0.1 * torch.eye(5, dtype=torch.float64)) @ centred

    assert torch.autograd.gradcheck(whiten, (x,))
    # equal eigenvalues: plain autograd through eigh would divide by zero, the Daleckii-Krein form is finite
    sigma = (2.0 * torch.eye(4, dtype=torch.float64)).requires_grad_()
    (zca_inverse_sqrt(sigma) * torch.arange(16.0, dtype=torch.float64).view(4, 4)).sum().backward()
    assert torch.isfinite(sigma.grad).all()
    expected = -0.5 * 2.0**-1.5 * (torch.arange(16.0).view(4, 4) + torch.arange(16.0).view(4, 4).T) / 2
    assert torch.allclose(sigma.grad, expected.double())


def test_newton_iterations_converge_to_the_inverse_square_root():
    a = torch.randn(6, 6, dtype=torch.float64)
    sigma = a @ a.T + torch.eye(6, dtype=torch.float64)
    assert torch.allclose(newton_inverse_sqrt(sigma, 60), zca_inverse_sqrt(sigma), atol=1e-8)


def test_statistics_are_computed_in_float32_for_low_precision_inputs():
    x = correlated_batch()
    cw = ConceptWhitening(12, 3).train()
    y = cw(x.bfloat16())
    assert y.dtype == torch.bfloat16
    reference = ConceptWhitening(12, 3).train()(x.bfloat16().float())
    assert torch.allclose(y.float(), reference, atol=0.05)  # bf16 rounding of the output only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = ConceptWhitening(12, 3).train()(x)
    assert (pixel_covariance(y2.float()) - torch.eye(12, dtype=torch.float64)).abs().max() < 0.05


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"unknown whitening 'pca'.*'zca', 'newton'"):
        ConceptWhitening(8, 2, whitening="pca")
    with pytest.raises(ValueError, match=r"unknown pool 'sum'"):
        ConceptWhitening(8, 2, pool="sum")
    with pytest.raises(ValueError, match=r"num_concepts=9 .* num_features=8"):
        ConceptWhitening(8, 9)
    with pytest.raises(ValueError, match=r"expects \[B, 8, H, W\] inputs, got shape \(2, 4, 3, 3\)"):
        ConceptWhitening(8, 2)(torch.randn(2, 4, 3, 3))


# ---------------------------------------------------------------------------------------------- rotation
def test_cayley_step_decreases_the_objective_and_keeps_orthogonality():
    torch.manual_seed(0)
    target = torch.randn(10, 10, dtype=torch.float64)
    # the maximiser of <target, Q> over orthogonal Q is the polar factor u @ vh of target (orthogonal Procrustes);
    # Cayley steps are rotations, so start in the polar factor's connected component (same determinant)
    u, s, vh = torch.linalg.svd(target)
    q = random_rotation(10, dtype=torch.float64)
    if torch.linalg.det(q) * torch.linalg.det(u @ vh) < 0:
        q[:, -1] = -q[:, -1]

    def objective(m: torch.Tensor) -> float:
        return -float((m * target).sum())

    values = [objective(q)]
    for _ in range(60):
        q, info = cayley_step(q, -target, objective, initial_step=2.0)
        assert info["objective_after"] <= info["objective_before"]
        values.append(objective(q))
        assert orthogonality_error(q) < 1e-10
    assert values[-1] < values[0]
    assert values[-1] == pytest.approx(-float(s.sum()), rel=1e-4)
    assert torch.allclose(q, u @ vh, atol=1e-3)


def test_rotation_aligns_axes_with_concepts_that_are_coordinate_directions():
    channels, k = 6, 3
    cw = ConceptWhitening(channels, k, rotation_step=0.5).eval()  # identity running whitening: already white
    cw.rotation.copy_(random_rotation(channels, seed=3))
    g = torch.Generator().manual_seed(0)
    losses, errors = [], []
    for _ in range(40):
        for j in range(k):
            x = 0.3 * torch.randn(8, channels, 4, 4, generator=g)
            x[:, j] += 2.0  # concept j's examples light up coordinate j
            with cw.accumulate_concept(j):
                cw(x)
        info = cw.update_rotation()
        losses.append((info["objective_before"], info["objective_after"]))
        errors.append(orthogonality_error(cw.rotation))
    assert all(after <= before for before, after in losses)
    assert losses[-1][1] < losses[0][0]
    assert max(errors) < 1e-5
    alignment = cw.rotation[:k, :k].diagonal()  # q_j . e_j
    assert (alignment > 0.99).all(), alignment
    assert int(cw.num_rotation_updates) == 40
    # the aligned axis j is what the layer outputs as channel j for concept j's examples
    x = torch.zeros(1, channels, 2, 2)
    x[:, 1] = 1.0
    assert cw(x)[0, :k].mean(dim=(1, 2)).argmax() == 1


def test_max_pooling_accumulates_the_feature_vector_at_the_argmax():
    cw = ConceptWhitening(4, 2, pool="max").eval()
    cw.rotation.copy_(random_rotation(4, seed=1))
    x = torch.randn(3, 4, 5, 5)
    with cw.accumulate_concept(1):
        cw(x)
    sums, counts = cw.concept_directions()
    activation = torch.einsum("c,bchw->bhw", cw.rotation[:, 1], x).flatten(1)
    best = activation.argmax(dim=1)
    expected = torch.stack([x[b].flatten(1)[:, best[b]] for b in range(3)]).sum(dim=0)
    assert torch.allclose(sums[:, 1].float(), expected, atol=1e-5)
    assert counts.tolist() == [0.0, 3.0] and torch.equal(sums[:, 0], torch.zeros(4, dtype=torch.float64))


def test_accumulating_concepts_stops_the_forward_pass_and_changes_no_statistics():
    calls = []
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Identity())
    model[2].register_forward_hook(lambda *_: calls.append(1))
    cw = replace_batchnorm(model, "1", 2)
    model.train()
    before = {k: v.clone() for k, v in cw.state_dict().items()}
    with cw.accumulate_concept(0):
        assert model(torch.randn(2, 3, 4, 4)) is None or True
    assert calls == []  # the layers after the CW layer never ran
    assert all(torch.equal(v, cw.state_dict()[k]) for k, v in before.items())
    assert cw.concept_directions()[1].tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match=r"axis index in \[0, 2\)"):
        with cw.accumulate_concept(2):
            pass


# ------------------------------------------------------------------------------------- BatchNorm replacement
def test_replace_batchnorm_keeps_the_batchnorm_eval_transform():
    model = SmallCNN(num_classes=3, width=4).eval()
    bn = model.features[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-1, 1, 8))
        bn.running_var.copy_(torch.linspace(0.5, 2, 8))
    x = torch.randn(2, 8, 5, 5)
    expected = bn(x)  # weight 1, bias 0: the plain normalisation
    cw = replace_batchnorm(model, "features.1", num_concepts=3)
    assert model.features[1] is cw and isinstance(cw, ConceptWhitening)
    assert torch.allclose(cw.eval()(x), expected, atol=1e-5)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_replace_batchnorm_rejects_other_layers():
    model = SmallCNN(num_classes=3, width=4)
    with pytest.raises(ValueError, match=r"'features.0' is a Conv2d, not a BatchNorm2d"):
        replace_batchnorm(model, "features.0", 2)
    with pytest.raises(ValueError, match=r"'features.7' not found.*close matches"):
        replace_batchnorm(model, "features.7", 2)
    with pytest.raises(ValueError, match=r"num_concepts=9 .* num_features=8"):
        replace_batchnorm(model, "features.1", 9)


# ---------------------------------------------------------------------------------------------- evaluation
def test_auc_matrix_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60, 4), generator=g).float()  # many ties
    labels = (torch.rand(60, 3, generator=g) < 0.4).float()
    aucs = auc_matrix(scores, labels)
    for c in range(4):
        for j in range(3):
            assert aucs[c, j] == pytest.approx(metrics.roc_auc_score(labels[:, j], scores[:, c]), abs=1e-6)
    assert torch.isnan(auc_matrix(scores, torch.ones(60, 1))).all()  # undefined without negatives


def test_concept_purity_and_best_filter_match_sklearn_on_hooked_activations():
    metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    cw = replace_batchnorm(model, "1", 3)
    cw.rotation.copy_(random_rotation(5))
    model.train()
    before = snapshot(model)
    images = torch.rand(40, 3, 6, 6)
    concepts = (torch.rand(40, 4) < 0.5).float()
    loader = DataLoader(TensorDataset(images, torch.zeros(40, dtype=torch.long), concepts), batch_size=16)
    purity = concept_purity(model, "1", loader, concepts=[2, 0, 3], pool="max")
    with torch.inference_mode():
        best, channel = best_filter_auc(model, "1", loader, concepts=[2, 0, 3], pool="mean")
    assert_unchanged(model, before)
    with torch.no_grad():
        out = cw.eval()(model[0](images))
    maxed, meaned = out.amax(dim=(2, 3)), out.mean(dim=(2, 3))
    for j, c in enumerate([2, 0, 3]):
        assert purity[j] == pytest.approx(metrics.roc_auc_score(concepts[:, c], maxed[:, j]), abs=1e-6)
        per_channel = [metrics.roc_auc_score(concepts[:, c], meaned[:, ch]) for ch in range(5)]
        assert best[j] == pytest.approx(max(per_channel), abs=1e-6)
        assert int(channel[j]) == int(np.argmax(per_channel))
    activations, labels = pooled_activations(model, "1", loader, pool="mean")
    assert torch.allclose(activations, meaned, atol=1e-6) and torch.equal(labels, concepts)


# ----------------------------------------------------------------------------------------- LightningModule
@pytest.fixture(scope="module")
def datamodule() -> ConceptDataModule:
    return ConceptDataModule(image_size=24, n_train=48, n_val=32, n_test=32, batch_size=16, seed=2)


def tiny_classifier(**kwargs) -> ConceptWhiteningClassifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 8),
    )
    defaults = dict(backbone=backbone, layer="4", update_every=1, concept_batch_size=4)
    defaults.update(kwargs)
    return ConceptWhiteningClassifier(["shape:circle", "colour:red", "size:large"], **defaults)


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def test_classifier_trains_and_updates_the_rotation_every_n_steps(datamodule):
    pl.seed_everything(0)
    model = tiny_classifier(update_every=2)
    trainer = quiet_trainer(max_steps=6, limit_val_batches=1)
    trainer.fit(model, datamodule)
    assert int(model.cw.num_rotation_updates) == 3
    assert orthogonality_error(model.cw.rotation) < 1e-5
    assert not torch.allclose(model.cw.rotation, torch.eye(6))
    results = quiet_trainer().test(model, datamodule, verbose=False)[0]
    # the logged purity is the concept_purity of the aligned axes (mean pooling) on the same data
    purity = concept_purity(model, model.cw, datamodule, concepts=[0, 4, 12], pool="mean", split="test")
    assert results["test_concept_purity"] == pytest.approx(float(purity.nanmean()), abs=1e-5)
    assert results["test_concept_purity/colour:red"] == pytest.approx(float(purity[1]), abs=1e-5)


def test_concept_update_runs_in_eval_mode_and_touches_only_the_rotation(datamodule):
    model = tiny_classifier()
    model.set_concept_dataset(datamodule.dataset("train"))
    model.train()
    before = snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    info = model.update_concept_alignment()
    assert_unchanged(model, before)  # modes restored, no gradients, no hooks left
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert sorted(changed) == ["backbone.4.num_rotation_updates", "backbone.4.rotation"]
    assert info["objective_after"] < info["objective_before"]


def _eval_whiteness(model: ConceptWhiteningClassifier, loader) -> float:
    """max |cov - I| of the CW layer's eval-mode output pixels over ``loader``."""
    outputs: list[torch.Tensor] = []
    handle = model.cw.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().double()))
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                model(batch[0])
    finally:
        handle.remove()
    flat = torch.cat([o.transpose(0, 1).reshape(o.shape[1], -1) for o in outputs], dim=1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    covariance = centred @ centred.T / flat.shape[1]
    return float((covariance - torch.eye(flat.shape[0], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("recalibrate", [True, False])
def test_fit_ends_with_a_recalibration_that_makes_eval_mode_white(datamodule, recalibrate):
    """Issue 18.14: after fit, the running statistics are recomputed with the final weights over the training
    data, so the eval-mode output on the training data is white (without it: the lagging running average)."""
    pl.seed_everything(0)
    model = tiny_classifier(update_every=2, lr=0.05, recalibrate=recalibrate)
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(model, datamodule)
    whiteness = _eval_whiteness(model, datamodule.train_dataloader())
    print(f"recalibrate={recalibrate}: eval-mode max |cov - I| on the training data = {whiteness:.4g}")
    if recalibrate:
        assert whiteness < 1e-2  # eps = 1e-5 on the covariance diagonal leaves eps / variance
    else:
        assert whiteness > 0.05  # what the running average leaves


def test_recalibration_restores_modes_and_changes_only_the_running_statistics(datamodule):
    model = tiny_classifier()
    model.train()
    before = snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    info = model.recalibrate_whitening(datamodule.train_dataloader(), max_batches=2)
    assert_unchanged(model, before)
    assert info == {"pixels": 2 * 16 * 12 * 12, "batches": 2.0}
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, state[k]))
    assert changed == ["backbone.4.running_mean", "backbone.4.running_whitening"]
    with pytest.raises(ValueError, match="got no batches"):
        model.recalibrate_whitening([], max_batches=2)


def test_classifier_bad_input_raises(datamodule):
    with pytest.raises(ValueError, match=r"'0' is a Conv2d, not a BatchNorm2d"):
        tiny_classifier(layer="0")
    with pytest.raises(ValueError, match=r"num_concepts=3 .* num_features=2"):
        ConceptWhiteningClassifier(
            ["a", "b", "c"], backbone=nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), layer="1"
        )
    with pytest.raises(ValueError, match="distinct concept names"):
        ConceptWhiteningClassifier(["shape:circle", "shape:circle"])
    model = ConceptWhiteningClassifier(["shape:circel"], backbone=tiny_classifier().backbone, layer="1")
    with pytest.raises(ValueError, match=r"unknown concept 'shape:circel'.*did you mean"):
        quiet_trainer(max_steps=1).fit(model, datamodule)
    with pytest.raises(TypeError, match=r"must have a concept_index\(\) method"):
        model.set_concept_dataset(TensorDataset(torch.zeros(2)))


def test_ddp_statistics_equal_single_process_statistics_over_the_union_of_the_data(tmp_path):
    here = os.path.dirname(__file__)
    sys.path.insert(0, here)
    import ddp_cw_script

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    proc = run_processes(
        [sys.executable, os.path.join(here, "ddp_cw_script.py"), "2", str(tmp_path / "ddp")], env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    single = ddp_cw_script.run(1, str(tmp_path / "single"))
    assert ranks[0]["world_size"] == 2 and single["world_size"] == 1
    assert single["num_rotation_updates"] == 2
    assert not np.allclose(single["rotation"], np.eye(6).flatten())  # the rotation did move
    for result in ranks:
        assert result["num_rotation_updates"] == 2
        for key in ("averaged_mean", "averaged_whitening", "running_mean", "running_whitening", "rotation",
                    "first_conv", "head"):
            np.testing.assert_allclose(result[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_example_config_runs_with_the_cli(tmp_path):
    from lightning_xai.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(root, "examples", "configs", "concept_whitening.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.update_every=1",
            "--model.init_args.concept_batch_size=4",
            "--data.init_args.n_train=32",
            "--data.init_args.n_val=16",
            "--data.init_args.n_test=16",
            "--data.init_args.image_size=24",
            "--data.init_args.batch_size=16",
        ]
    )
    model = cli.model
    assert isinstance(model, ConceptWhiteningClassifier) and len(model.concepts) == 8
    assert int(model.cw.num_rotation_updates) == 1  # fast_dev_run: one training step, one update
