"""PGD attacks and adversarial training: closed forms on linear models, the threat-model invariants, the
no-side-effect contract, Tsipras et al.'s robust-vs-non-robust-features toy, the Lightning/DDP plumbing."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from lightning_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.models.adversarial import AdversarialClassifier, AdversarialTrainingMixin, PGDAttack

HERE = os.path.dirname(os.path.abspath(__file__))


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


def linear_model(dim: int = 12, classes: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dim, classes).double()


# --------------------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_step_equals_the_closed_form_on_a_linear_model(norm):
    model = linear_model()
    x = torch.randn(5, 12, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    eps = 0.3
    attack = PGDAttack(eps, norm=norm, steps=1, step_size=eps, random_start=False, input_range=None)
    x_adv = attack(model, x, y)
    # d CE / dx = W^T (softmax(Wx + b) - onehot(y)), written out by hand
    p = torch.softmax(x @ model.weight.T + model.bias, dim=1)
    g = (p - F.one_hot(y, 3).double()) @ model.weight.detach()
    step = g.sign() if norm == "linf" else g / g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(x_adv, x + eps * step)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reaches_the_optimal_margin_of_a_binary_linear_model(norm):
    """For logits Wx + b with two classes, the worst case in the eps-ball lowers the margin (z_y - z_other) by
    exactly eps * ||w_y - w_other||_dual (L1 for the L_inf ball, L2 for the L2 ball)."""
    model = linear_model(dim=10, classes=2, seed=3)
    x = torch.randn(6, 10, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    eps = 0.05
    attack = PGDAttack(eps, norm=norm, steps=20, step_size=eps / 4, random_start=False, input_range=None)
    x_adv = attack(model, x, y)

    def margin(inputs):
        z = model(inputs).detach()
        return z.gather(1, y.view(-1, 1)).squeeze(1) - z.gather(1, (1 - y).view(-1, 1)).squeeze(1)

    dw = (model.weight[0] - model.weight[1]).detach()
    dual = dw.abs().sum() if norm == "linf" else dw.norm()
    torch.testing.assert_close(margin(x) - margin(x_adv), torch.full((6,), float(eps * dual), dtype=torch.float64))


def test_targeted_attack_moves_towards_the_target_and_untargeted_away_from_the_label():
    model = linear_model(seed=1)
    x = torch.randn(8, 12, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    target = torch.full((8,), 2)
    targeted = PGDAttack(5.0, norm="l2", steps=30, targeted=True, random_start=False, input_range=None)
    x_t = targeted(model, x, target)
    assert (model(x_t).argmax(1) == 2).all()
    untargeted = PGDAttack(5.0, norm="l2", steps=30, random_start=False, input_range=None)
    x_u = untargeted(model, x, y)
    assert (model(x_u).argmax(1) != 0).all()
    ce = lambda inputs, labels: F.cross_entropy(model(inputs), labels, reduction="none")  # noqa: E731
    assert (ce(x_t, target) < ce(x, target)).all()
    assert (ce(x_u, y) > ce(x, y)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [True, False])
def test_iterates_stay_in_the_ball_and_in_the_valid_range(gap_cnn, norm, random_start):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    eps = 0.1 if norm == "linf" else 0.5
    x_adv = PGDAttack(eps, norm=norm, steps=4, random_start=random_start)(gap_cnn, x, torch.tensor([0, 1, 2]))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert (size > 0).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad


def test_random_start_is_uniform_in_the_linf_cube_and_inside_the_l2_ball():
    torch.manual_seed(0)
    x0 = torch.full((2000, 4), 0.5)
    cube = PGDAttack(0.2, "linf", input_range=None).random_point(x0) - x0
    assert cube.abs().max() <= 0.2 + 1e-7
    assert abs(float(cube.mean())) < 0.01 and abs(float(cube.var()) - 0.2**2 / 3) < 0.002  # U(-eps, eps)
    ball = PGDAttack(0.2, "l2", input_range=None).random_point(x0) - x0
    radius = ball.norm(dim=1)
    assert radius.max() <= 0.2 + 1e-6
    # uniform in the 4-ball: P(r <= t * eps) = t^4
    assert abs(float((radius <= 0.1).float().mean()) - 0.5**4) < 0.02


# ------------------------------------------------------------------------------------- no side effects
@pytest.mark.parametrize("attack_mode", ["eval", "train"])
def test_no_side_effects_also_in_train_attack_mode(attack_mode):
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    attack = PGDAttack(0.1, steps=3, attack_mode=attack_mode)
    attack(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert_unchanged(model, before)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"buffer {name} changed (BatchNorm statistics polluted)"


class ModeSpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.fc(x)


@pytest.mark.parametrize("attack_mode", ["eval", "train"])
def test_the_model_runs_in_the_configured_mode_during_the_attack(attack_mode):
    model = ModeSpy()
    model.train(attack_mode == "eval")  # start in the other mode
    PGDAttack(0.1, steps=2, attack_mode=attack_mode, input_range=None)(model, torch.randn(2, 4), torch.tensor([0, 1]))
    assert model.modes == [attack_mode == "train"] * 2
    assert model.training == (attack_mode == "eval")


def test_state_is_restored_when_the_model_raises():
    class Broken(GapCNN):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    model = Broken()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        PGDAttack(0.1, steps=2, attack_mode="train")(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_under_no_grad_and_inference_mode(gap_cnn, context):
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 3])
    attack = PGDAttack(0.1, steps=3, random_start=False)
    expected = attack(gap_cnn, x, y)
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        x_ctx = x.clone()  # an inference tensor under inference_mode
        got = attack(gap_cnn, x_ctx, y.clone())
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, x)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": 0.0}, "eps must be a finite number > 0, got 0.0"),
        ({"eps": -1}, "eps must be"),
        ({"eps": float("nan")}, "eps must be"),
        ({"eps": 0.1, "steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"eps": 0.1, "steps": 2.5}, "steps must be an integer"),
        ({"eps": 0.1, "norm": "l1"}, r"PGDAttack: unknown norm 'l1'; valid values: \['linf', 'l2'\]"),
        ({"eps": 0.1, "step_size": 0}, "step_size must be"),
        ({"eps": 0.1, "attack_mode": "test"}, "unknown attack_mode 'test'"),
        ({"eps": 0.1, "input_range": (1.0, 0.0)}, "low < high"),
    ],
)
def test_bad_hyper_parameters_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGDAttack(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"eps": 0}, "eps must be"), ({"steps": 0}, "steps must be"), ({"norm": "l0"}, "unknown norm 'l0'")],
)
def test_adversarial_classifier_validates_its_attack(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialClassifier(**kwargs)


def test_norm_aliases():
    assert PGDAttack(0.1, norm="Linf").norm == "linf"
    assert PGDAttack(0.1, norm="inf").norm == "linf"
    assert PGDAttack(0.1, norm="L2").norm == "l2"


def test_bad_labels_and_outputs(gap_cnn):
    attack = PGDAttack(0.1, steps=1)
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\] = \[2\]"):
        attack(gap_cnn, x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer tensor of class indices"):
        attack(gap_cnn, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="label 9 is out of range for 4 classes"):
        attack(gap_cnn, x, 9)
    with pytest.raises(ValueError, match="needs logits of shape"):
        attack(gap_cnn, x, 0, forward=lambda inp: gap_cnn(inp)[:, 0])


# ------------------------------------------------------------------------------------- Lightning module
def test_training_step_trains_on_the_pgd_examples_of_the_batch(monkeypatch):
    model = AdversarialClassifier(eps=0.1, steps=2)
    seen = {}

    def fake_attack(attacked, x, y, forward):
        seen["attacked"], seen["y"] = attacked, y
        return torch.zeros_like(x)

    def fake_step(self, batch, batch_idx):
        seen["batch"] = batch
        return torch.tensor(0.0)

    monkeypatch.setattr(model, "attack", fake_attack)
    monkeypatch.setattr("lightning_xai.models.classifier.ImageClassifier.training_step", fake_step)
    x, y, mask = torch.rand(2, 3, 32, 32), torch.tensor([1, 2]), torch.ones(2, 1, 32, 32)
    model.training_step((x, y, mask), 0)
    assert seen["attacked"] is model and torch.equal(seen["y"], y)
    assert isinstance(seen["batch"], tuple) and len(seen["batch"]) == 3
    assert torch.equal(seen["batch"][0], torch.zeros_like(x)) and seen["batch"][2] is mask


def tsipras_data(n: int, dim: int, seed: int) -> TensorDataset:
    """Tsipras et al. (ICLR 2019, Sec. 2.1): y = +-1; x_0 = y with probability 0.9 (robust, not perfect);
    x_1..x_dim ~ N(eta * y, 1), eta = 0.2 (each weakly correlated, together highly predictive, but non-robust)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float()
    robust = torch.where(torch.rand(n, generator=g) < 0.9, sign, -sign)
    weak = torch.randn(n, dim, generator=g) + 0.2 * sign[:, None]
    return TensorDataset(torch.cat([robust[:, None], weak], dim=1), y)


def robust_accuracy(model, data: TensorDataset, attack: PGDAttack) -> tuple[float, float]:
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    x_adv = attack(model, x, y)
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y).float().mean())
    return clean, robust


def test_robust_training_relies_on_the_robust_feature_tsipras_toy():
    """Standard training uses the many weak features (accurate, not robust); adversarial training with
    eps = 2 eta makes them useless under attack, so the model leans on the robust feature x_0 (Tsipras et al.)."""
    from lightning_xai.models import ImageClassifier

    dim = 100
    train = DataLoader(tsipras_data(1024, dim, 0), batch_size=128, shuffle=True)
    val_set = tsipras_data(512, dim, 1)
    val = DataLoader(val_set, batch_size=256)
    models, logged = {}, {}
    for kind in ("standard", "robust"):
        torch.manual_seed(0)
        kwargs = dict(backbone=nn.Linear(dim + 1, 2), num_classes=2, optimizer="adam", lr=0.05)
        if kind == "standard":
            models[kind] = ImageClassifier(**kwargs)
        else:
            models[kind] = AdversarialClassifier(**kwargs, eps=0.4, steps=5, input_range=None)
        trainer = quiet_trainer(max_epochs=10)
        trainer.fit(models[kind], train, val)
        logged[kind] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    attack = models["robust"].eval_attack
    clean_std, robust_std = robust_accuracy(models["standard"], val_set, attack)
    clean_rob, robust_rob = robust_accuracy(models["robust"], val_set, attack)
    m = logged["robust"]
    assert {"val_clean_acc", "val_robust_acc", "val_acc", "train_loss"} <= set(m)
    assert m["val_clean_acc"] == pytest.approx(clean_rob, abs=1e-6)
    assert m["val_robust_acc"] == pytest.approx(robust_rob, abs=1e-6)
    assert m["val_acc"] == pytest.approx(clean_rob, abs=1e-6)
    assert clean_std > 0.95  # the weak features together are very predictive ...
    assert robust_std < 0.2  # ... and useless under attack
    assert robust_rob > 0.85  # ~0.9 is reachable from x_0 alone

    def robust_share(model) -> float:
        dw = (model.backbone.weight[1] - model.backbone.weight[0]).detach().abs()
        return float(dw[0] / dw.sum())

    assert robust_share(models["robust"]) > 0.5
    assert robust_share(models["standard"]) < 0.1


def test_mixin_on_another_module_with_dict_batches_and_non_logit_outputs():
    """The documented recipe: mixin first, configure_adversarial, and the layout hooks for other batches."""
    from lightning_xai.namespace import pl

    class DictModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 3)
            self.seen = []

        def forward(self, x):
            return {"logits": self.net(x)}

        def training_step(self, batch, idx):
            self.seen.append(batch["x"])
            return F.cross_entropy(self(batch["x"])["logits"], batch["y"])

        def validation_step(self, batch, idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class AdversarialDictModel(AdversarialTrainingMixin, DictModel):
        def __init__(self):
            super().__init__()
            self.configure_adversarial(PGDAttack(0.5, "l2", steps=2, input_range=None), num_classes=3)

        def adversarial_inputs(self, batch):
            return batch["x"]

        def adversarial_labels(self, batch):
            return batch["y"]

        def replace_inputs(self, batch, inputs):
            return {**batch, "x": inputs}

        def adversarial_logits(self, x):
            return self(x)["logits"]

    model = AdversarialDictModel()
    batch = {"x": torch.randn(5, 4), "y": torch.tensor([0, 1, 2, 0, 1])}
    loss = model.training_step(batch, 0)
    assert loss.requires_grad
    delta = model.seen[0] - batch["x"]
    assert 0 < float(delta.norm(dim=1).max()) <= 0.5 + 1e-6


def test_adversarial_classifier_fits_and_tests_with_a_small_cnn():
    from lightning_xai.data import GroundTruthDataModule

    data = GroundTruthDataModule(image_size=32, n_train=32, n_val=16, n_test=16, batch_size=16)
    model = AdversarialClassifier(backbone="small_cnn", eps=4 / 255, steps=2)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    assert {"test_clean_acc", "test_robust_acc", "test_acc"} <= set(results)
    assert results["test_robust_acc"] <= results["test_clean_acc"]
    assert not model.training or trainer.state.finished


def test_example_config_runs_with_the_cli(tmp_path):
    from lightning_xai.cli import main

    root = os.path.dirname(HERE)
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(root, "examples", "configs", "adversarial.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.n_train=16",
            "--data.init_args.n_val=16",
            "--data.init_args.n_test=16",
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=16",
        ]
    )
    model = cli.model
    assert isinstance(model, AdversarialClassifier)
    assert model.attack.norm == "linf" and model.attack.eps == pytest.approx(8 / 255, abs=1e-6)
    assert "val_robust_acc" in cli.trainer.callback_metrics


# ------------------------------------------------------------------------------------------------ DDP
def test_ddp_metrics_equal_the_single_process_metrics_over_the_whole_validation_set(tmp_path):
    """One subprocess run with 2 CPU ranks (gloo) for both AdversarialClassifier and InterpretableFilterClassifier."""
    sys.path.insert(0, HERE)
    import ddp_adversarial_script as script

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "ddp"
    proc = run_processes(
        [sys.executable, os.path.join(HERE, "ddp_adversarial_script.py"), "2", str(out)], env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)  # replicas in sync
    model = script.make_model()
    model.load_state_dict(torch.load(out / "weights.pt"))
    model.eval()
    val = script.make_data().val_set
    x, y = val.tensors[0], val.tensors[1]
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    x_adv = model.eval_attack(model, x, y)
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y).float().mean())
    for result in ranks:
        assert result["metrics"]["val_clean_acc"] == pytest.approx(clean, abs=1e-6)
        assert result["metrics"]["val_robust_acc"] == pytest.approx(robust, abs=1e-6)
        assert result["metrics"]["val_acc"] == pytest.approx(clean, abs=1e-6)
    # the interpretable-filter module trains under DDP too: replicas in sync, the logged filter loss reduced
    assert ranks[0]["filter_param_checksum"] == pytest.approx(ranks[1]["filter_param_checksum"], rel=1e-6)
    for key in ("val_filter_loss", "train_filter_loss", "val_acc"):
        values = [r["filter_metrics"][key] for r in ranks]
        assert values[0] == pytest.approx(values[1]) and values[0] == values[0]  # equal on both ranks, not NaN
