"""Backbones, the XAIModule optimiser configuration and the ImageClassifier (steps, metrics, CLI, training)."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.attribution.layers import capture_layer, default_layer
from lightning_xai.data import GroundTruthDataModule
from lightning_xai.models import BACKBONES, ImageClassifier, SmallCNN, VGGSmall, XAIModule, build_backbone
from lightning_xai.namespace import pl


def _trainer(**kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def _tiny_loader(n: int = 24, num_classes: int = 3, size: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# --------------------------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize("size", [32, 64])
def test_small_cnn_is_a_cam_network(size: int) -> None:
    """logits = head(mean over positions of `features`): the class-activation-map identity of Zhou et al."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=5, width=8).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad(), capture_layer(model, "features") as cap:
        logits = model(x)
    fmap = cap.activation
    assert fmap.shape == (2, 16, size // 4, size // 4)
    cam = torch.einsum("kc,bchw->bkhw", model.head.weight, fmap)  # class activation maps
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + model.head.bias, logits)
    assert default_layer(model, x) == "features"
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.features.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_build_backbone_names(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_backbone_specifics() -> None:
    resnet = build_backbone("resnet18", num_classes=3, in_channels=1)
    assert resnet.conv1.in_channels == 1 and resnet.conv1.kernel_size == (7, 7)
    small = build_backbone("resnet18", num_classes=3, small_input=True).eval()
    with torch.no_grad(), capture_layer(small, "layer4") as cap:
        small(torch.rand(1, 3, 32, 32))
    assert cap.activation.shape[-2:] == (4, 4)  # 32 / 8 instead of 32 / 32
    assert isinstance(small.maxpool, nn.Identity)
    vgg = build_backbone("vgg_small", num_classes=3)
    assert isinstance(vgg, VGGSmall)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in vgg.modules())
    assert {"features", "classifier"} <= {n for n, _ in vgg.named_children()}


def test_backbone_errors_name_the_valid_values() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'.*small_cnn.*resnet18.*vgg_small"):
        build_backbone("resnet50", num_classes=3)
    with pytest.raises(ValueError, match="small_input only applies to 'resnet18'"):
        build_backbone("small_cnn", num_classes=3, small_input=True)
    with pytest.raises(ValueError, match="build_backbone: num_classes must be an integer >= 1, got 0"):
        build_backbone("small_cnn", num_classes=0)
    with pytest.raises(ValueError, match="SmallCNN: width must be an integer >= 1, got 0"):
        SmallCNN(width=0)


# --------------------------------------------------------------------------------------------------------------
# XAIModule: optimiser configuration


@pytest.mark.parametrize(
    ("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_optimizer_configuration(name: str, cls: type) -> None:
    module = ImageClassifier("small_cnn", num_classes=3, optimizer=name, lr=0.05, weight_decay=0.01, momentum=0.5)
    opt = module.configure_optimizers()
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.01
    if name == "sgd":
        assert group["momentum"] == 0.5
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in module.parameters())


def test_frozen_parameters_are_not_optimised() -> None:
    module = ImageClassifier("small_cnn", num_classes=3)
    module.backbone.blocks.requires_grad_(False)
    params = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert params == {id(p) for n, p in module.named_parameters() if not n.startswith("backbone.blocks")}
    module.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        module.configure_optimizers()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, r"unknown optimizer 'rmsprop'; valid optimizers: \['adam', 'adamw', 'sgd'\]"),
        ({"scheduler": "step"}, r"unknown scheduler 'step'; valid schedulers: \[None, 'cosine'\]"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": "0.1"}, "lr must be a finite number"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"num_classes": 1}, "ImageClassifier: num_classes must be an integer >= 2, got 1"),
        ({"backbone": "resnet"}, "valid names"),
    ],
)
def test_configuration_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


def test_backbone_type_error() -> None:
    with pytest.raises(TypeError, match="backbone must be a backbone name"):
        ImageClassifier(backbone=3)


def test_cosine_schedule_follows_the_closed_form() -> None:
    """lr_t = lr (1 + cos(pi t / T)) / 2 at optimiser step t, T = all training steps."""
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3, lr=0.1, scheduler="cosine")
    loader = _tiny_loader(n=24, batch_size=8)  # 3 steps per epoch
    _trainer(max_epochs=2, callbacks=[Record()], limit_val_batches=0).fit(module, loader)
    total = 6
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)])


# --------------------------------------------------------------------------------------------------------------
# ImageClassifier


def test_hyperparameters_are_saved_and_modules_left_out() -> None:
    module = ImageClassifier("small_cnn", num_classes=4, in_channels=1, lr=0.01, scheduler="cosine")
    assert dict(module.hparams) == {
        "backbone": "small_cnn",
        "num_classes": 4,
        "in_channels": 1,
        "optimizer": "adam",
        "lr": 0.01,
        "weight_decay": 0.0,
        "scheduler": "cosine",
        "momentum": 0.9,
        "on_nonfinite_loss": "raise",
        "input_key": None,
        "label_key": None,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning warns when a module is saved as a hyper-parameter
        module = ImageClassifier(SmallCNN(3, 4, width=4), num_classes=4)
    assert "backbone" not in module.hparams and module.hparams["num_classes"] == 4


def test_steps_log_accuracy_and_loss_that_match_an_independent_computation(tmp_path) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3, lr=0.01)
    train, val = _tiny_loader(seed=0), _tiny_loader(n=20, batch_size=8, seed=1)  # uneven last batch
    trainer = _trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(module, train, val)
    assert {"train_loss_step", "train_loss_epoch", "train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    (result,) = trainer.validate(module, val, verbose=False)
    x, y = val.dataset.tensors
    module.eval()
    with torch.no_grad():
        logits = module(x)
    assert result["val_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert result["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    (test_result,) = trainer.test(module, val, verbose=False)
    assert test_result["test_acc"] == pytest.approx(result["val_acc"], abs=1e-6)
    # predict: logits, for bare image batches and for (x, y) tuples alike
    predicted = trainer.predict(module, DataLoader(x, batch_size=8))
    torch.testing.assert_close(torch.cat(predicted), logits)
    predicted = trainer.predict(module, val)
    torch.testing.assert_close(torch.cat(predicted), logits)


def test_project_batches_with_masks_are_accepted() -> None:
    dm = GroundTruthDataModule(image_size=16, n_train=8, n_val=8, n_test=8, batch_size=4)
    module = ImageClassifier(SmallCNN(3, 6, width=4), num_classes=6)
    _trainer(fast_dev_run=True).fit(module, dm)


def test_wrong_logit_shape_raises() -> None:
    module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)), num_classes=3)
    with pytest.raises(ValueError, match=r"expected logits \[B, 3\]"):
        module.training_step(next(iter(_tiny_loader())), 0)


def test_checkpoint_round_trip(tmp_path) -> None:
    module = ImageClassifier("small_cnn", num_classes=3, lr=0.02)
    trainer = _trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, _tiny_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams == module.hparams
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), module.eval()(x))


def test_lightning_cli_builds_model_and_data_from_yaml(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-xai"])  # pytest's own arguments are not for the CLI
    pytest.importorskip("jsonargparse")
    from lightning_xai.namespace import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
model:
  class_path: lightning_xai.models.ImageClassifier
  init_args:
    backbone:
      class_path: lightning_xai.models.SmallCNN
      init_args: {in_channels: 3, num_classes: 6, width: 4}
    num_classes: 6
    optimizer: adamw
    lr: 0.02
    scheduler: cosine
data:
  class_path: lightning_xai.data.GroundTruthDataModule
  init_args: {num_classes: 6, image_size: 16, n_train: 8, n_val: 8, n_test: 8, batch_size: 4}
trainer:
  accelerator: cpu
  fast_dev_run: true
  logger: false
  enable_progress_bar: false
"""
    )
    cli = LightningCLI(args=["fit", "--config", str(config)], save_config_callback=None)
    assert isinstance(cli.model, ImageClassifier) and isinstance(cli.model.backbone, SmallCNN)
    assert cli.model.backbone.head.in_features == 8
    assert cli.model.optimizer_name == "adamw" and cli.model.lr == 0.02
    assert isinstance(cli.datamodule, GroundTruthDataModule) and cli.datamodule.image_size == 16
    assert cli.trainer.state.finished
    # a backbone named by string, overridden from the command line
    cli = LightningCLI(
        args=["--config", str(config), "--model.backbone=vgg_small", "--model.lr=0.5"],
        run=False,
    )
    assert isinstance(cli.model.backbone, VGGSmall) and cli.model.lr == 0.5
    assert cli.model.hparams["backbone"] == "vgg_small"


_DDP_SCRIPT = """
import json, os, sys
from lightning_xai.namespace import pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from lightning_xai.models import ImageClassifier, SmallCNN

out = sys.argv[1]
torch.set_num_threads(1)
torch.manual_seed(0)
model = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3)
g = torch.Generator().manual_seed(1)
x, y = torch.rand(20, 3, 16, 16, generator=g), torch.randint(0, 3, (20,), generator=g)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)
(result,) = trainer.validate(model, DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)
with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump(result, f)
if trainer.global_rank == 0:
    torch.save({"state": model.state_dict(), "x": x, "y": y}, os.path.join(out, "model.pt"))
"""


@pytest.mark.slow
def test_metrics_are_global_under_ddp(tmp_path) -> None:
    """Two CPU processes (gloo), 10 validation samples each: every rank logs the accuracy and the loss of all 20."""
    script = tmp_path / "ddp_classifier.py"
    script.write_text(_DDP_SCRIPT)
    proc = run_processes([sys.executable, str(script), str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "model.pt")
    module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3)
    module.load_state_dict(saved["state"])
    with torch.no_grad():
        logits = module.eval()(saved["x"])
    accuracy = (logits.argmax(1) == saved["y"]).float().mean().item()
    loss = F.cross_entropy(logits, saved["y"]).item()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["val_acc"] == pytest.approx(accuracy, abs=1e-6)
        assert result["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_xai_module_is_the_shared_base() -> None:
    class Probe(XAIModule):
        def __init__(self, hidden: int = 4, lr: float = 0.3) -> None:
            super().__init__(optimizer="sgd", lr=lr)
            self.layer = nn.Linear(2, hidden)

    probe = Probe(hidden=5)
    assert probe.hparams["hidden"] == 5 and probe.hparams["lr"] == 0.3 and probe.hparams["optimizer"] == "sgd"
    assert isinstance(probe.configure_optimizers(), torch.optim.SGD)


# --------------------------------------------------------------------------------------------------------------
# Training: the demo's model on the ground-truth flowers


@pytest.mark.slow
def test_small_cnn_learns_the_ground_truth_flowers() -> None:
    pl.seed_everything(0, verbose=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    dm = GroundTruthDataModule(num_classes=6, image_size=32, n_train=1200, n_val=300, n_test=8, batch_size=32)
    module = ImageClassifier(SmallCNN(3, 6, width=16), num_classes=6, lr=1e-2, scheduler="cosine")
    trainer = _trainer(max_epochs=20, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"SmallCNN on 6-class flowers 32x32: val_acc={accuracy:.3f} in {elapsed:.1f}s wall, {cpu:.1f}s CPU")
    assert accuracy >= 0.9


# --------------------------------------------------------------------------------------------------------------
# The model base: divergence guard, dict batches, per-split metric collections


def _loader_with_a_nan_pixel(batch_with_nan: int = 1) -> DataLoader:
    loader = _tiny_loader(n=24, batch_size=8)
    x, y = loader.dataset.tensors
    x = x.clone()
    x[8 * batch_with_nan, 0, 3, 3] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_a_nan_pixel_stops_training_with_an_error_naming_the_step() -> None:
    from lightning_xai.models.base import NonFiniteLossError

    torch.manual_seed(0)
    module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3)
    with pytest.raises(NonFiniteLossError, match=r"ImageClassifier: the loss is nan at train batch 1 \(global step 1"):
        _trainer(max_epochs=1, limit_val_batches=0).fit(module, _loader_with_a_nan_pixel(1))
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the bad batch never reached the optimiser


def test_a_nan_pixel_is_skipped_with_a_warning_when_asked() -> None:
    torch.manual_seed(0)
    module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3, on_nonfinite_loss="skip")
    changed: list[bool] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters())))

    with pytest.warns(UserWarning, match="skipped train batch 1"):
        _trainer(max_epochs=1, limit_val_batches=0, callbacks=[Watch()]).fit(module, _loader_with_a_nan_pixel(1))
    assert changed == [True, False, True]  # the batch with the NaN pixel updated nothing
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_policy_is_validated() -> None:
    with pytest.raises(ValueError, match=r"ImageClassifier: unknown on_nonfinite_loss 'ignore'; valid values"):
        ImageClassifier(on_nonfinite_loss="ignore")


def test_dict_batches_are_read_with_configured_keys() -> None:
    torch.manual_seed(0)
    module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3, input_key="pixels", label_key="target")
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = module.training_step({"pixels": x, "target": y}, 0)
    torch.testing.assert_close(loss, F.cross_entropy(module(x), y))
    with pytest.raises(ValueError, match=r"ImageClassifier: input_key='pixels' is not in the batch"):
        module.training_step({"image": x, "label": y}, 0)
    assert module.hparams["input_key"] == "pixels"


def test_metrics_are_one_collection_per_split() -> None:
    module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3)
    for split in ("train", "val", "test"):
        metrics = module.metrics_of(split)
        assert list(metrics.keys(keep_base=False)) == [f"{split}_acc"]
    assert module.metrics_of("train") is not module.metrics_of("val")


def test_skipping_a_nonfinite_batch_is_agreed_by_every_rank():
    """Under DDP a rank that skipped its backward alone would leave the others waiting in the gradient all-reduce:
    with on_nonfinite_loss='skip' the ranks vote, so all skip when one loss is NaN (simulated ranks)."""
    from lightning_xai.distributed import ThreadGroup
    from lightning_xai.models.base import StepOutput

    def step(reducer):
        module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3, on_nonfinite_loss="skip")
        module.reducer = reducer
        loss = torch.tensor(float("nan")) if reducer.rank == 0 else torch.tensor(0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return module.loss_is_usable(StepOutput(loss, {}), "train", 7)

    assert ThreadGroup(2).run(step) == [False, False]

    def finite(reducer):
        module = ImageClassifier(SmallCNN(3, 3, width=4), num_classes=3, on_nonfinite_loss="skip")
        module.reducer = reducer
        return module.loss_is_usable(StepOutput(torch.tensor(0.5), {}), "train", 7)

    assert ThreadGroup(2).run(finite) == [True, True]
