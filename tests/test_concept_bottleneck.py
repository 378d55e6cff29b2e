"""Tests of the concept bottleneck model: interventions against heads that are known functions, the curve's averaging
over orders, which parameters each training mode moves, the losses and metrics against independent computations."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.data.concepts import ConceptDataModule, ConceptScenes
from lightning_xai.models.concept_bottleneck import (
    ConceptBottleneckModel,
    column_quantiles,
    log_intervention_curve,
)
from lightning_xai.namespace import pl

warnings.filterwarnings("ignore", ".*does not have many workers.*")
K = 18  # ConceptScenes concepts (no tag)


def tiny_backbone(k: int = K) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, k),
    )


def trainer(**kwargs) -> pl.Trainer:
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


@pytest.fixture(scope="module")
def scenes() -> ConceptScenes:
    return ConceptScenes(64, image_size=24, seed=3)


@pytest.fixture(scope="module")
def datamodule() -> ConceptDataModule:
    return ConceptDataModule(image_size=24, n_train=48, n_val=32, n_test=32, batch_size=16, seed=1)


def shape_colour_head(model: ConceptBottleneckModel, scale: float = 1.0) -> None:
    """Make the (linear) head the known function score(s, t) = 2 * b[shape s] + sum of b[colours of temperature t].

    On true concepts (one shape; colours of one temperature) the correct class wins for 0/1 values and for
    symmetric -v/+v logit values alike (see the module's shape_colour rule)."""
    weight = torch.zeros(8, K)
    for s in range(4):
        for t, colours in enumerate(((0, 3), (1, 2))):  # warm = red, yellow; cold = green, blue
            weight[2 * s + t, s] = 2.0
            for c in colours:
                weight[2 * s + t, 4 + c] = 1.0
    with torch.no_grad():
        model.head.weight.copy_(scale * weight)
        model.head.bias.zero_()


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "jointly"}, r"unknown mode 'jointly'.*'independent', 'sequential', 'joint', 'standard'"),
        ({"bottleneck": "softmax"}, r"unknown bottleneck 'softmax'.*'sigmoid', 'logit'"),
        ({"mode": "sequential"}, "set concept_epochs"),
        ({"mode": "joint", "concept_epochs": 2}, "concept_epochs only applies"),
        ({"concept_pos_weight": [1.0, 2.0]}, "2 weights for num_concepts=18"),
        ({"concept_pos_weight": [0.0] * K}, "must be finite and > 0"),
        ({"concept_names": ["a", "b"]}, "2 names but num_concepts is 18"),
        ({"concept_loss_weight": -1.0}, "concept_loss_weight"),
        ({"num_concepts": 0}, "num_concepts"),
    ],
)
def test_bad_hyper_parameters_raise_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConceptBottleneckModel(backbone=tiny_backbone(), **kwargs)


def test_head_learning_rate_is_its_own_parameter_group():
    model = ConceptBottleneckModel(backbone=tiny_backbone(), lr=1e-3, head_lr=5e-2)
    optimizer = model.configure_optimizers()
    (backbone_group, head_group) = optimizer.param_groups
    assert backbone_group["lr"] == 1e-3 and head_group["lr"] == 5e-2
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in backbone_group["params"]} == {id(p) for p in model.backbone.parameters()}
    with pytest.raises(ValueError, match="ConceptBottleneckModel: head_lr must be a finite number > 0, got 0.0"):
        ConceptBottleneckModel(backbone=tiny_backbone(), head_lr=0.0)


def test_concept_count_mismatch_raises_at_setup_naming_both_numbers(datamodule):
    model = ConceptBottleneckModel(backbone=tiny_backbone(5), num_concepts=5)
    with pytest.raises(ValueError, match=r"datamodule has 18 concepts but the model has num_concepts=5"):
        trainer(max_epochs=1).fit(model, datamodule)
    batch = (torch.rand(2, 3, 24, 24), torch.tensor([0, 1]), torch.ones(2, K))
    with pytest.raises(ValueError, match=r"18 concepts, but the model has num_concepts=5"):
        model.compute_losses(batch)


def test_too_few_epochs_for_two_stages_raises(datamodule):
    model = ConceptBottleneckModel(backbone=tiny_backbone(), mode="independent", concept_epochs=2)
    with pytest.raises(ValueError, match=r"concept_epochs=2 .* max_epochs=2"):
        trainer(max_epochs=2).fit(model, datamodule)


# --------------------------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("bottleneck", ["sigmoid", "logit"])
def test_intervening_on_all_concepts_with_a_known_head_gives_the_exact_class(scenes, bottleneck):
    model = ConceptBottleneckModel(backbone=tiny_backbone(), bottleneck=bottleneck).eval()  # random concept model
    shape_colour_head(model)
    if bottleneck == "logit":
        model.concept_low.fill_(-3.0)
        model.concept_high.fill_(2.5)
        model.intervention_calibrated.fill_(True)
    x, y, c = scenes.images, scenes.labels, scenes.concept_labels
    with torch.no_grad():
        logits = model.concept_logits(x)
        predicted = model.intervene(logits, c, torch.ones(K, dtype=torch.bool)).argmax(dim=1)
        untouched = model.intervene(logits, c, torch.zeros(K, dtype=torch.bool))
    assert torch.equal(predicted, y)
    assert torch.allclose(untouched, model(x), atol=1e-6)  # an empty mask is the plain model
    loader = DataLoader(scenes, batch_size=20)  # 64 = 3 * 20 + 4: a ragged last batch
    curve = model.intervention_curve(loader, n_orders=4)  # groups from the dataset's categories
    assert curve.group_names == list(scenes.categories)
    assert curve.accuracy[-1] == 1.0
    expected0 = (model(x).argmax(dim=1) == y).float().mean()
    assert torch.allclose(curve.accuracy[0], expected0)


def test_logit_interventions_use_the_recorded_percentiles(scenes):
    model = ConceptBottleneckModel(backbone=tiny_backbone(), bottleneck="logit")
    with pytest.raises(RuntimeError, match="percentiles"):
        model.true_concept_values(scenes.concept_labels)
    model.train()
    before = snapshot(model)
    percentiles = model.calibrate_interventions(DataLoader(scenes, batch_size=16))
    assert_unchanged(model, before)  # eval pass, modes restored, BN statistics untouched
    with torch.no_grad():
        logits = model.eval().concept_logits(scenes.images).numpy()
    np.testing.assert_allclose(percentiles[0].numpy(), np.percentile(logits, 5, axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(percentiles[1].numpy(), np.percentile(logits, 95, axis=0), rtol=1e-5, atol=1e-5)
    values = model.true_concept_values(scenes.concept_labels)
    expected = np.where(
        scenes.concept_labels.numpy() > 0, np.percentile(logits, 95, axis=0), np.percentile(logits, 5, axis=0)
    )
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_column_quantiles_match_numpy():
    values = torch.randn(101, 3).double()
    values[:10, 0] = 0.0  # ties
    for q in (0.0, 0.05, 0.5, 0.95, 1.0):
        got = column_quantiles(values, [q])[0].numpy()
        np.testing.assert_allclose(got, np.quantile(values.numpy(), q, axis=0), rtol=1e-6, atol=1e-6)


def _two_concept_model() -> ConceptBottleneckModel:
    """The 'images' are the concept logits themselves (identity concept model); the class is concept 0."""
    model = ConceptBottleneckModel(backbone=nn.Identity(), num_concepts=2, num_classes=2)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))  # class 1 iff sigmoid(logit 0) > 0.5
        model.head.bias.copy_(torch.tensor([5.0, -5.0]))
    return model


def test_intervention_curve_is_the_mean_over_random_orders_not_the_max():
    model = _two_concept_model()
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    concepts = torch.stack([labels.float(), 1 - labels.float()], dim=1)
    logits = torch.where(concepts > 0, -4.0, 4.0)  # every predicted concept is wrong -> every class is wrong
    loader = DataLoader(TensorDataset(logits, labels, concepts), batch_size=4)
    curve = model.intervention_curve(loader, groups={"decisive": [0], "irrelevant": [1]}, n_orders=20, seed=0)
    # fixing concept 0 fixes every image, fixing concept 1 fixes none: after one group the accuracy of an order
    # is 1 if it starts with group 0 and 0 otherwise
    starts_decisive = (curve.orders[:, 0] == 0).float()
    assert 0 < starts_decisive.mean() < 1, "the seed must give both kinds of orders"
    assert torch.equal(curve.per_order[:, 1], starts_decisive)
    assert torch.allclose(curve.accuracy, torch.tensor([0.0, float(starts_decisive.mean()), 1.0]))
    assert curve.accuracy[1] < curve.per_order[:, 1].max()  # the mean, not the best order
    assert curve.per_order.shape == (20, 3) and torch.equal(curve.num_groups, torch.arange(3))


def test_uncertainty_order_intervenes_on_the_most_uncertain_group_first():
    model = _two_concept_model()
    labels = torch.tensor([1, 0])
    concepts = torch.stack([labels.float(), labels.float()], dim=1)
    # concept 0 is wrong but uncertain (|logit| = 0.2), concept 1 is wrong and confident (|logit| = 6)
    logits = torch.tensor([[-0.2, -6.0], [0.2, 6.0]])
    loader = DataLoader(TensorDataset(logits, labels, concepts), batch_size=2)
    curve = model.intervention_curve(loader, groups=[[0], [1]], order="uncertainty")
    assert curve.orders is None and curve.per_order.shape == (1, 3)
    assert torch.equal(curve.accuracy, torch.tensor([0.0, 1.0, 1.0]))
    flipped = model.intervention_curve(
        DataLoader(TensorDataset(logits.flip(1), labels, concepts), batch_size=2),
        groups=[[0], [1]],
        order="uncertainty",
    )
    assert torch.equal(flipped.accuracy, torch.tensor([0.0, 0.0, 1.0]))  # now the decisive concept is the confident one


def test_intervention_curve_has_no_side_effects_and_works_under_inference_mode(scenes):
    model = ConceptBottleneckModel(backbone=tiny_backbone())
    put_in_train_mode_with_grads(model)
    model.backbone[1].eval()  # a mixed-mode model
    before = snapshot(model)
    loader = DataLoader(scenes, batch_size=32)
    with torch.inference_mode():
        curve = model.intervention_curve(loader, n_orders=2)
    assert_unchanged(model, before)
    assert torch.equal(model.backbone[1].running_mean, model.backbone[1].running_mean)
    with torch.no_grad():
        again = model.intervention_curve(loader, n_orders=2)
    assert torch.equal(curve.accuracy, again.accuracy)


@pytest.mark.parametrize(
    ("groups", "match"),
    [({"a": [0], "b": []}, "group 'b' is empty"), ([[0, 99]], r"holds 99, not a concept index in \[0, 18\)")],
)
def test_bad_groups_raise(scenes, groups, match):
    model = ConceptBottleneckModel(backbone=tiny_backbone())
    with pytest.raises(ValueError, match=match):
        model.intervention_curve(DataLoader(scenes, batch_size=32), groups=groups)
    with pytest.raises(ValueError, match="unknown order 'best'"):
        model.intervention_curve(DataLoader(scenes, batch_size=32), order="best")


def test_log_intervention_curve_writes_the_mean_curve(tmp_path):
    model = _two_concept_model()
    labels = torch.tensor([0, 1])
    concepts = torch.stack([labels.float(), 1 - labels.float()], dim=1)
    loader = DataLoader(TensorDataset(torch.where(concepts > 0, -4.0, 4.0), labels, concepts), batch_size=2)
    curve = model.intervention_curve(loader, groups=[[0], [1]], n_orders=8)
    (path,) = log_intervention_curve(None, curve, step=3, fallback_dir=tmp_path)
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["intervened groups", "task accuracy"]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(curve.accuracy.tolist())
    assert [float(r[0]) for r in rows[1:]] == [0.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------- training
def test_joint_and_standard_losses_match_an_independent_computation(scenes):
    batch = (scenes.images[:8], scenes.labels[:8], scenes.concept_labels[:8])
    pos_weight = [float(w) for w in torch.linspace(0.5, 2.0, K)]
    joint = ConceptBottleneckModel(backbone=tiny_backbone(), concept_loss_weight=0.3, concept_pos_weight=pos_weight)
    standard = ConceptBottleneckModel(backbone=tiny_backbone(), mode="standard", concept_loss_weight=0.3)
    for model, weight in ((joint, 0.3), (standard, 0.0)):
        model.eval()
        out = model.compute_losses(batch)
        with torch.no_grad():
            logits = model.backbone(batch[0])
            task = F.cross_entropy(model.head(torch.sigmoid(logits)), batch[1])
        p = torch.sigmoid(logits)
        w = torch.tensor(pos_weight) if model is joint else torch.ones(K)
        bce = -(w * batch[2] * p.log() + (1 - batch[2]) * (1 - p).log()).mean()
        assert torch.allclose(out.task_loss, task, atol=1e-5)
        assert torch.allclose(out.concept_loss, bce, atol=1e-5)
        assert torch.allclose(out.loss, task + weight * bce, atol=1e-5)
    # the standard model does not need concept labels at all
    assert standard.compute_losses(batch[:2]).concept_loss is None


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_task_stage_head_input_is_true_or_frozen_predicted_concepts(scenes, mode):
    model = ConceptBottleneckModel(backbone=tiny_backbone(), mode=mode, concept_epochs=1).train()
    batch = (scenes.images[:8], scenes.labels[:8], scenes.concept_labels[:8])
    seen = []
    handle = model.head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    bn = model.backbone[1]
    stats = bn.running_mean.clone()
    out = model.compute_losses(batch, stage="task")
    handle.remove()
    assert torch.equal(bn.running_mean, stats) and model.backbone.training and bn.training
    with torch.no_grad():
        expected = batch[2] if mode == "independent" else torch.sigmoid(model.backbone.eval()(batch[0]))
    assert torch.allclose(seen[0], expected, atol=1e-6)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters()], allow_unused=True)
    named = [n for n, _ in model.named_parameters()]
    assert all(g is None for n, g in zip(named, grads) if n.startswith("backbone"))
    assert all(g is not None for n, g in zip(named, grads) if n.startswith("head"))
    concept_out = model.compute_losses(batch, stage="concepts")
    assert concept_out.task_logits is None and torch.equal(concept_out.loss, concept_out.concept_loss)


class EpochSnapshots(pl.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _changed(a: dict, b: dict, prefix: str) -> list[str]:
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k]) and "num_batches" not in k]


@pytest.mark.parametrize("mode", ["independent", "sequential", "joint", "standard"])
def test_training_modes_move_the_right_parameters(datamodule, mode):
    pl.seed_everything(0)
    staged = mode in ("independent", "sequential")
    model = ConceptBottleneckModel(
        backbone=tiny_backbone(), mode=mode, concept_epochs=1 if staged else None, bottleneck="logit", lr=0.01
    )
    snapshots = EpochSnapshots()
    trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[snapshots]).fit(model, datamodule)
    start, epoch1, epoch2 = snapshots.states
    backbone_keys = [k for k in start if k.startswith("backbone") and "num_batches" not in k]
    head_keys = [k for k in start if k.startswith("head")]
    if staged:
        assert _changed(start, epoch1, "head") == [], "the head must not move in the concept stage"
        assert set(_changed(start, epoch1, "backbone")) == set(backbone_keys)
        assert _changed(epoch1, epoch2, "backbone") == [], "the concept model (and its BN statistics) is frozen"
        assert set(_changed(epoch1, epoch2, "head")) == set(head_keys)
    else:
        assert set(_changed(start, epoch1, "head")) == set(head_keys)
        assert set(_changed(start, epoch1, "backbone")) == set(backbone_keys)
    assert bool(model.intervention_calibrated)  # logit percentiles recorded from the training logits
    assert (model.concept_high >= model.concept_low).all()


def test_logged_concept_auc_matches_sklearn(datamodule):
    metrics = pytest.importorskip("sklearn.metrics")
    pl.seed_everything(0)
    model = ConceptBottleneckModel(backbone=tiny_backbone())
    trainer_ = trainer(max_epochs=1, limit_train_batches=2)
    trainer_.fit(model, datamodule)
    results = trainer_.test(model, datamodule, verbose=False)[0]
    test_set = datamodule.dataset("test")
    model.eval()
    with torch.no_grad():
        concept_logits, task_logits = model.forward_with_concepts(test_set.images)
    labels = test_set.concept_labels.numpy()
    for j, name in enumerate(test_set.concept_names):
        expected = metrics.roc_auc_score(labels[:, j], concept_logits[:, j].numpy())
        assert results[f"test_concept_auc/{name}"] == pytest.approx(expected, abs=1e-4)
    assert results["test_acc"] == pytest.approx(float((task_logits.argmax(1) == test_set.labels).float().mean()))
    concept_acc = ((concept_logits > 0).float() == test_set.concept_labels).float().mean()
    assert results["test_concept_acc"] == pytest.approx(float(concept_acc), abs=1e-6)


def test_example_config_runs_with_the_cli(tmp_path):
    import os

    from lightning_xai.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(root, "examples", "configs", "concept_bottleneck.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.n_train=32",
            "--data.init_args.n_val=16",
            "--data.init_args.n_test=16",
            "--data.init_args.image_size=24",
            "--data.init_args.batch_size=16",
        ]
    )
    assert isinstance(cli.model, ConceptBottleneckModel) and cli.model.mode == "joint"
    assert cli.model.concept_names[0] == "shape:circle"  # taken from the datamodule


def test_staged_modes_under_plain_ddp_ask_for_find_unused_parameters():
    from types import SimpleNamespace

    DDPStrategy = pl.strategies.DDPStrategy

    model = ConceptBottleneckModel(backbone=tiny_backbone(), mode="sequential", concept_epochs=1)
    model._trainer = SimpleNamespace(max_epochs=3, strategy=DDPStrategy())
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        model.on_fit_start()
    model._trainer = SimpleNamespace(max_epochs=3, strategy=DDPStrategy(find_unused_parameters=True))
    model.on_fit_start()  # accepted


class LearningRates(pl.Callback):
    """The learning rate of every parameter group before each optimiser step."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.rates.append([group["lr"] for group in optimizer.param_groups])


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_cosine_schedule_gives_each_stage_its_own_cycle(datamodule, mode):
    """With one cosine over the whole fit the head stage (the last epochs) would train at a rate close to zero."""
    model = ConceptBottleneckModel(
        backbone=tiny_backbone(), mode=mode, concept_epochs=2, lr=0.01, head_lr=0.1, scheduler="cosine"
    )
    rates = LearningRates()
    trainer(max_epochs=4, limit_train_batches=3, limit_val_batches=1, callbacks=[rates]).fit(model, datamodule)
    steps = np.array(rates.rates)  # [12 steps, 2 groups]: concept model, head
    assert steps.shape == (12, 2)
    concept, head = steps[:6], steps[6:]
    np.testing.assert_allclose(concept[0], [0.01, 0.1])  # both at their full rates at the start
    np.testing.assert_allclose(head[0], [0.0, 0.1], atol=1e-12)  # the concept model's cycle has ended
    assert (np.diff(concept[:, 0]) < 0).all() and (concept[:, 1] == 0.1).all()
    # the head's own 6-step cycle (one cosine over all 12 steps would start the head stage at 0.05)
    np.testing.assert_allclose(head[:, 1], 0.1 * 0.5 * (1 + np.cos(np.pi * np.arange(6) / 6)), rtol=1e-6)


def test_cosine_schedule_spans_the_whole_fit_in_joint_mode(datamodule):
    model = ConceptBottleneckModel(backbone=tiny_backbone(), mode="joint", lr=0.01, scheduler="cosine")
    rates = LearningRates()
    trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[rates]).fit(model, datamodule)
    concept = np.array(rates.rates)[:, 0]
    np.testing.assert_allclose(concept[0], 0.01)
    assert (np.diff(concept) < 0).all()


# ------------------------------------------------------------------------------------- issue 18: 10, 11, 13
@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_logit_intervention_values_are_frozen_when_the_concept_stage_ends(datamodule, mode):
    """Koh et al. take the 5th/95th percentiles on the trained concept model: the head stage must not move them."""
    seen: list[tuple[int, torch.Tensor]] = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append((trainer.current_epoch, torch.stack([module.concept_low, module.concept_high]).clone()))

    model = ConceptBottleneckModel(backbone=tiny_backbone(), mode=mode, bottleneck="logit", concept_epochs=1, lr=0.05)
    trainer(max_epochs=3, limit_val_batches=0, callbacks=[Record()]).fit(model, datamodule)
    assert bool(model.intervention_calibrated)
    # callbacks run before the module's own epoch-end hook: epoch 1's record holds the values set at epoch 0's end
    after_concept_stage = seen[1][1]
    torch.testing.assert_close(torch.stack([model.concept_low, model.concept_high]), after_concept_stage, rtol=0,
                               atol=0)


def test_more_classes_in_the_data_than_in_the_model_is_an_error_at_setup(datamodule):
    model = ConceptBottleneckModel(backbone=tiny_backbone(), num_classes=4)
    with pytest.raises(ValueError, match=r"has 8 classes but the model has num_classes=4"):
        trainer(max_epochs=1).fit(model, datamodule)
    loader = DataLoader(TensorDataset(torch.rand(4, 3, 24, 24), torch.tensor([0, 1, 5, 2]), torch.ones(4, K)),
                        batch_size=4)
    with pytest.raises(ValueError, match=r"class label 5 is out of range for num_classes=4"):
        trainer(max_epochs=1).fit(ConceptBottleneckModel(backbone=tiny_backbone(), num_classes=4), loader)


def test_a_nan_pixel_is_a_clear_error_naming_the_loss_parts():
    from lightning_xai.models.base import NonFiniteLossError

    x = torch.rand(8, 3, 24, 24)
    x[5, 1, 2, 2] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.arange(8) % 8, (torch.rand(8, K) > 0.5).float()), batch_size=4)
    model = ConceptBottleneckModel(backbone=tiny_backbone())
    with pytest.raises(NonFiniteLossError, match=r"train batch 1 .*non-finite parts: \['task_loss', 'concept_loss'\]"):
        trainer(max_epochs=1).fit(model, loader)


def test_config_dataclass_builds_the_same_model_and_round_trips():
    from lightning_xai.models.concept_bottleneck import CBMConfig

    config = CBMConfig(num_concepts=K, mode="sequential", concept_epochs=2, bottleneck="logit", head_hidden=5)
    model = ConceptBottleneckModel.from_config(config, backbone=tiny_backbone())
    assert model.to_config() == config
    plain = ConceptBottleneckModel(backbone=tiny_backbone(), mode="sequential", concept_epochs=2, bottleneck="logit",
                                   head_hidden=5)
    assert dict(plain.hparams) == dict(model.hparams)
    with pytest.raises(TypeError, match="expects a CBMConfig"):
        ConceptBottleneckModel.from_config({"mode": "joint"}, backbone=tiny_backbone())
