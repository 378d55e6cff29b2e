"""ProtoPNet: distances, similarity, last-layer init, loss terms, push (exact, nearest, DDP), stages, explanations."""

from __future__ import annotations

import glob
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot
from lightning_helpers import BlobData, blob_dataset, quiet_trainer, run_processes
from torch import nn

from lightning_xai.models.protopnet import (
    STAGES,
    ProtoPNet,
    l2_distances,
    log_similarity,
    receptive_field,
)
from lightning_xai.namespace import pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyTrunk(nn.Module):
    """conv-BN-ReLU(inplace)-maxpool-conv-ReLU: 16x16 -> 8x8 latent positions, exercises BatchNorm and in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_model(**kwargs) -> ProtoPNet:
    torch.manual_seed(0)
    defaults = dict(num_classes=3, prototypes_per_class=2, prototype_dim=5, explain_samples=0)
    defaults.update(kwargs)
    backbone = defaults.pop("backbone", None) or TinyTrunk()
    return ProtoPNet(backbone, **defaults)


def brute_distances(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """[B, P, h, w] squared distances by explicit differences, in float64."""
    diff = z.double()[:, None] - prototypes.double().flatten(1)[None, :, :, None, None]
    return (diff**2).sum(dim=2)


# ---------------------------------------------------------------------------------------------- formulas


def test_distance_as_convolution_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(3, 5, 4, 6, generator=g)
    prototypes = torch.rand(7, 5, 1, 1, generator=g)
    prototypes[2] = z[1, :, 2, 3, None, None]  # one prototype equals a patch: distance 0 there
    d = l2_distances(z, prototypes)
    assert d.shape == (3, 7, 4, 6)
    torch.testing.assert_close(d.double(), brute_distances(z, prototypes), atol=1e-5, rtol=1e-5)
    assert bool((d >= 0).all()), "clamped at 0"
    assert float(d[1, 2, 2, 3]) <= 1e-6
    with pytest.raises(ValueError, match="same D"):
        l2_distances(z, torch.rand(2, 4, 1, 1))


def test_similarity_formula():
    eps = 1e-4
    d = torch.tensor([0.0, 0.5, 1.0, 10.0, 1e6], dtype=torch.float64)
    s = log_similarity(d, eps)
    expected = torch.tensor([math.log((v + 1) / (v + eps)) for v in d.tolist()], dtype=torch.float64)
    torch.testing.assert_close(s, expected)
    assert float(s[0]) == pytest.approx(-math.log(eps))
    assert bool((s[1:] < s[:-1]).all()), "similarity decreases with distance"
    assert float(s[-1]) == pytest.approx(0.0, abs=1e-5)


def test_last_layer_initialisation():
    model = tiny_model(num_classes=3, prototypes_per_class=2, incorrect_class_connection=-0.3)
    assert model.last_layer.bias is None
    w = model.last_layer.weight.detach()
    assert w.shape == (3, 6)
    for c in range(3):
        for j in range(6):
            assert w[c, j].item() == pytest.approx(1.0 if j // 2 == c else -0.3)
    assert model.prototype_classes.tolist() == [0, 0, 1, 1, 2, 2]
    assert tiny_model().last_layer.weight.min().item() == pytest.approx(-0.5), "default connection -0.5"
    assert model.prototypes.shape == (6, 5, 1, 1)
    assert 0 <= float(model.prototypes.min()) and float(model.prototypes.max()) <= 1


def test_loss_terms_match_a_hand_computation():
    model = tiny_model(num_classes=3, prototypes_per_class=2, lambda_clst=0.7, lambda_sep=0.2, lambda_l1=0.01)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.last_layer.weight.copy_(torch.randn(3, 6, generator=g))
    w = model.last_layer.weight.tolist()
    min_d = torch.tensor([[0.5, 0.2, 3.0, 0.1, 4.0, 5.0], [1.0, 2.0, 0.3, 0.9, 0.6, 0.4]])
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    terms = model.loss_terms(logits, min_d, labels)
    # by hand: image 0 (class 0) own prototypes 0, 1; image 1 (class 2) own prototypes 4, 5
    cluster = (min(0.5, 0.2) + min(0.6, 0.4)) / 2
    separation = (min(3.0, 0.1, 4.0, 5.0) + min(1.0, 2.0, 0.3, 0.9)) / 2
    ce = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        ce += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    ce /= 2
    l1 = sum(abs(w[c][j]) for c in range(3) for j in range(6) if j // 2 != c)
    assert float(terms["cluster"]) == pytest.approx(cluster)
    assert float(terms["separation"]) == pytest.approx(separation)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["l1"]) == pytest.approx(l1, rel=1e-6)
    expected = ce + 0.7 * cluster - 0.2 * separation + 0.01 * l1
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-6)


def test_forward_is_min_pooled_similarity_through_the_last_layer():
    model = tiny_model().eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.outputs(x)
        z = model.add_on(model.features(x))
    assert bool(((z >= 0) & (z <= 1)).all()), "sigmoid latent space"
    brute_min = brute_distances(z, model.prototypes.detach()).amin(dim=(2, 3))
    torch.testing.assert_close(out.min_distances.double(), brute_min, atol=1e-5, rtol=1e-5)
    expected = log_similarity(brute_min, model.epsilon) @ model.last_layer.weight.detach().double().t()
    torch.testing.assert_close(out.logits.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(x), out.logits)


# ---------------------------------------------------------------------------------------------- receptive field


def test_receptive_field_closed_forms():
    small = ProtoPNet("small_cnn", num_classes=3, prototypes_per_class=1, prototype_dim=4)
    # conv3 -> pool2 -> conv3 -> pool2 -> conv3, all padding 1: position i sees pixels 4i-7 .. 4i+10
    assert (small.rf.lo, small.rf.hi, small.rf.jump, small.rf.exact) == ((-7, -7), (10, 10), (4, 4), True)
    assert small.rf.box(0, 0, (32, 32)) == (0, 0, 11, 11)
    assert small.rf.box(3, 5, (32, 32)) == (5, 13, 23, 31)
    resnet = ProtoPNet("resnet18", num_classes=3, prototypes_per_class=1, prototype_dim=4)
    assert resnet.rf.size == (435, 435) and resnet.rf.jump == (32, 32), "ResNet-18's well-known field: 435, stride 32"


def test_receptive_field_equals_gradient_support_of_a_linear_trunk():
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(3, 3, 5, stride=2, padding=1, dilation=2)
    )
    rf = receptive_field(trunk, in_channels=2)
    x = torch.randn(1, 2, 40, 40, requires_grad=True)
    z = trunk(x)
    for row, col in [(2, 3), (4, 4)]:
        (grad,) = torch.autograd.grad(z[0, :, row, col].sum(), x, retain_graph=True)
        support = grad[0].abs().sum(0) > 0
        rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
        assert rf.box(row, col, (40, 40)) == (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def test_untraceable_trunk_falls_back_to_an_estimated_field():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) if x.sum() > -1e9 else x  # data-dependent control flow: fx cannot trace it

    with pytest.warns(UserWarning, match="receptive field"):
        rf = receptive_field(Dynamic())
    assert not rf.exact and rf.jump == (1, 1) and rf.size == (3, 3)


# ---------------------------------------------------------------------------------------------- push


def _push_setup(n=30, batch_size=7):
    model = tiny_model()
    data = blob_dataset(n, size=16, seed=3)
    return model, data


def test_push_projects_each_prototype_onto_its_nearest_own_class_patch_exactly():
    model, data = _push_setup()
    model.train()  # push must use eval mode and restore this
    before_prototypes = model.prototypes.detach().clone()
    before = snapshot(model.features)
    summary = model.push(data, batch_size=7)
    assert_unchanged(model.features, before)  # BN statistics untouched, modes restored
    assert model.training and model.features.body[1].training
    images, labels = data.tensors[0], data.tensors[1]
    with torch.no_grad():
        model.eval()
        z = model.latent(images)
        model.train()
    brute = brute_distances(z, before_prototypes)  # [N, P, h, w] float64
    h, w = z.shape[2:]
    for j in range(model.num_prototypes):
        cls = j // model.prototypes_per_class
        idx, (row, col) = int(model.push_index[j]), model.push_position[j].tolist()
        assert int(labels[idx]) == cls, "pushed onto an image of the prototype's own class"
        with torch.no_grad():
            model.eval()
            alone = model.latent(images[idx : idx + 1])  # the canonical latent map: the image on its own
            model.train()
        assert torch.equal(model.prototypes[j, :, 0, 0].detach(), alone[0, :, row, col]), "prototype IS the patch"
        assert float(l2_distances(alone, model.prototypes.detach())[0, j, row, col]) <= 1e-5
        torch.testing.assert_close(z[idx, :, row, col], alone[0, :, row, col], atol=1e-6, rtol=0)  # batched
        # nearest among all own-class patches (brute force, independent of the implementation's search)
        own = brute[:, j].clone()
        own[labels != cls] = float("inf")
        flat = int(own.flatten().argmin())
        assert (flat // (h * w), (flat % (h * w)) // w, flat % w) == (idx, row, col)
        assert float(model.push_distance[j]) == pytest.approx(float(own.min()), rel=1e-4, abs=1e-5)
        # the record: receptive-field box and the crop of the source image
        top, left, bottom, right = model.push_box[j].tolist()
        assert (top, left, bottom, right) == model.rf.box(row, col, (16, 16))
        crop, crop_map = model.source_crop(j)
        assert torch.equal(crop, images[idx, :, top:bottom, left:right])
        assert crop_map.shape == (1, bottom - top, right - left)
    assert summary["max_distance"] == pytest.approx(float(model.push_distance.max()))
    assert int(model.push_count) == 1 and int(model.prototypes_pushed) == 1


def test_push_is_independent_of_batching_and_works_under_inference_mode():
    model, data = _push_setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.push(data, batch_size=30)
    reference = (model.push_index.clone(), model.push_position.clone(), model.prototypes.detach().clone())
    for batch_size in (1, 4):
        model.load_state_dict(state)
        with torch.inference_mode():
            model.push(torch.utils.data.DataLoader(data, batch_size=5, shuffle=True), batch_size=batch_size)
        assert torch.equal(model.push_index, reference[0]) and torch.equal(model.push_position, reference[1])
        torch.testing.assert_close(model.prototypes.detach(), reference[2], atol=1e-6, rtol=0)
    assert not model.prototypes.is_inference()


def test_push_ties_go_to_the_smallest_dataset_index():
    model, data = _push_setup(n=12)
    images, labels = data.tensors[0], data.tensors[1]
    doubled = torch.utils.data.TensorDataset(torch.cat([images, images]), torch.cat([labels, labels]))
    # every patch exists twice, at indices i and i + 12; one image per batch makes the two copies' distances equal
    # bit for bit (batched convolutions may round differently with the batch composition)
    model.push(doubled, batch_size=1)
    assert bool((model.push_index < 12).all()), model.push_index.tolist()
    single = tiny_model()
    single.push(data, batch_size=1)
    assert torch.equal(model.push_index, single.push_index) and torch.equal(model.push_position, single.push_position)


def test_push_without_images_of_a_class_is_a_clear_error():
    model, data = _push_setup()
    keep = data.tensors[1] != 2
    subset = torch.utils.data.TensorDataset(data.tensors[0][keep], data.tensors[1][keep])
    with pytest.raises(ValueError, match=r"no images of class\(es\) \[2\]"):
        model.push(subset)
    with pytest.raises(TypeError, match="Dataset"):
        model.push([1, 2, 3])


def test_push_record_survives_a_state_dict_round_trip():
    model, data = _push_setup()
    model.push(data)
    fresh = tiny_model()
    assert fresh.push_crops.shape != model.push_crops.shape
    fresh.load_state_dict(model.state_dict())
    for name in ("push_index", "push_position", "push_box", "push_crops", "push_crop_maps", "prototypes"):
        assert torch.equal(getattr(fresh, name), getattr(model, name)), name
    for j in range(model.num_prototypes):
        assert torch.equal(fresh.source_crop(j)[0], model.source_crop(j)[0])


# ---------------------------------------------------------------------------------------------- explanations


def test_explain_ranks_prototypes_by_contribution_without_side_effects():
    model, data = _push_setup()
    model.push(data)
    x = data.tensors[0][:4]
    before = snapshot(model)
    with torch.inference_mode():
        exp = model.explain(x, top_k=3, target=torch.tensor([0, 1, 2, 0]))
    assert_unchanged(model, before)
    with torch.no_grad():
        model.eval()
        out = model.outputs(x)
        model.train()
    for b, target in enumerate([0, 1, 2, 0]):
        contributions = out.similarities[b] * model.last_layer.weight[target].detach()
        assert exp.prototype_indices[b].tolist() == contributions.topk(3).indices.tolist()
        torch.testing.assert_close(exp.contributions[b], exp.similarities[b] * exp.weights[b])
        assert bool((exp.contributions[b, :-1] >= exp.contributions[b, 1:]).all())
        torch.testing.assert_close(exp.similarities[b], out.similarities[b, exp.prototype_indices[b]])
    assert exp.similarity_maps.shape == (4, 3, 16, 16)
    # bilinear upsampling never exceeds the latent map's maximum, which is the (max-pooled) similarity
    assert bool((exp.similarity_maps.amax(dim=(2, 3)) <= exp.similarities + 1e-4).all())
    assert torch.equal(exp.source_indices, model.push_index[exp.prototype_indices])
    default = model.explain(x)  # target = prediction, top_k = explain_top_k
    assert torch.equal(default.target, out.logits.argmax(1)) and default.prototype_indices.shape == (4, 3)
    with pytest.raises(ValueError, match="target"):
        model.explain(x, target=7)
    with pytest.raises(ValueError, match="top_k"):
        model.explain(x, top_k=7)


def test_explanation_table_and_gallery_are_logged_as_files(tmp_path):
    model, data = _push_setup()
    with pytest.raises(ValueError, match="not been pushed"):
        model.prototype_gallery()
    model.push(data)
    x, y = data.tensors[0][:2], data.tensors[1][:2]
    columns, rows = model.explanation_table(x, labels=y, top_k=2)
    assert len(rows) == 4 and columns[-2:] == ["this", "looks_like_that"]
    this, that = rows[0][-2], rows[0][-1]
    assert this.dtype == np.uint8 and this.shape == (16, 16, 3)
    j = rows[0][columns.index("prototype")]
    assert that.shape[:2] == tuple(model.source_crop(j)[0].shape[1:])
    written = model.log_explanations(None, x, step=3, labels=y, top_k=2, fallback_dir=str(tmp_path))
    assert written == [str(tmp_path / "protopnet_explanations_step3.csv")]
    assert len(glob.glob(str(tmp_path / "protopnet_explanations_step3_r*_c*.png"))) == 8
    gallery = model.prototype_gallery(tile=8, pad=1)
    assert gallery.shape == (1 + 3 * 9, 1 + 2 * 9, 3) and gallery.dtype == np.uint8
    tile = F.interpolate(model.source_crop(3)[0][None], size=(8, 8), mode="nearest")[0]  # class 1: row 1, col 1
    expected = np.round(tile.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(gallery[10:18, 10:18], expected)


def test_wandb_offline_gets_the_explanation_table(tmp_path):
    wandb = pytest.importorskip("wandb")
    WandbLogger = pl.loggers.WandbLogger

    model, data = _push_setup()
    model.push(data)
    logger = WandbLogger(project="xai-test", save_dir=str(tmp_path), offline=True)
    written = model.log_explanations([logger], data.tensors[0][:2], step=0, top_k=1)
    run_dir = logger.experiment.dir
    wandb.finish()
    assert written == ["wandb:protopnet/explanations"]
    tables = glob.glob(os.path.join(run_dir, "media", "table", "**", "*.json"), recursive=True)
    assert tables, "no W&B table was written"


# ---------------------------------------------------------------------------------------------- stages and training


def test_stage_schedule():
    model = tiny_model(warm_epochs=1, joint_epochs=2, last_layer_epochs=1, push_cycles=2)
    assert model.schedule_length == 7
    assert [model.stage_of_epoch(e) for e in range(9)] == [
        "warm", "joint", "joint", "last_layer", "joint", "joint", "last_layer", "last_layer", "last_layer"
    ]  # fmt: skip
    assert model.push_epochs == [2, 5]
    no_warm = tiny_model(warm_epochs=0, joint_epochs=1, last_layer_epochs=0)
    assert [no_warm.stage_of_epoch(e) for e in range(2)] == ["joint", "last_layer"] and no_warm.push_epochs == [0]
    params = {stage: {id(p) for p in model.stage_parameters(stage)} for stage in STAGES}
    ids = lambda module: {id(p) for p in module.parameters()}  # noqa: E731
    assert params["warm"] == ids(model.add_on) | {id(model.prototypes)}
    assert params["joint"] == ids(model.features) | ids(model.add_on) | {id(model.prototypes)}
    assert params["last_layer"] == {id(model.last_layer.weight)}
    assert set().union(*params.values()) == ids(model), "every parameter is trained in some stage"


class ParameterSnapshots(pl.Callback):
    """Parameters at the start and end of each training epoch (this hook runs before the module's push)."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}
        self.requires_grad: list[bool] = []

    def _grab(self, module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_epoch_start(self, trainer, module):
        self.start[trainer.current_epoch] = self._grab(module)

    def on_train_epoch_end(self, trainer, module):
        self.end[trainer.current_epoch] = self._grab(module)
        self.requires_grad += [p.requires_grad for p in module.parameters()]
        assert all(p.grad is None for p in module.parameters()), "gradients are cleared after each step"


def test_fit_runs_the_stages_on_the_right_parameters_and_pushes(tmp_path):
    pl.seed_everything(0)
    model = tiny_model(warm_epochs=1, joint_epochs=1, last_layer_epochs=1, lr=0.01, explain_samples=2)
    snaps = ParameterSnapshots()
    CSVLogger = pl.loggers.CSVLogger

    trainer = quiet_trainer(max_epochs=3, callbacks=[snaps], logger=CSVLogger(str(tmp_path)), log_every_n_steps=1)
    trainer.fit(model, BlobData(n_train=24, n_val=8, size=16, batch_size=8))
    assert len(trainer.optimizers) == 3
    for opt, stage in zip(trainer.optimizers, STAGES):
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.stage_parameters(stage)}

    def changed(epoch: int) -> set[str]:
        parts = set()
        for name, value in snaps.end[epoch].items():
            if not torch.equal(value, snaps.start[epoch][name]):
                parts.add(name.split(".")[0])
        return parts

    assert changed(0) == {"add_on", "prototypes"}, "warm: add-on layers and prototypes only"
    assert changed(1) == {"features", "add_on", "prototypes"}, "joint: everything but the last layer"
    assert changed(2) == {"last_layer"}, "last layer only"
    assert all(snaps.requires_grad), "nothing is frozen through requires_grad"
    # the push ran at the end of epoch 1 and the last-layer stage left the pushed prototypes (and BN stats) alone
    assert int(model.push_count) == 1 and int(model.prototypes_pushed) == 1
    train = trainer.train_dataloader.dataset
    images = torch.stack([train[int(i)][0] for i in model.push_index])
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.latent(image[None]) for image in images])  # each image on its own
    patches = z[torch.arange(len(z)), :, model.push_position[:, 0], model.push_position[:, 1]]
    assert torch.equal(patches, model.prototypes.detach().flatten(1))
    # the gallery after the push, the explanation table after the last validation (prototypes pushed)
    log_dir = trainer.logger.log_dir
    assert len(glob.glob(os.path.join(log_dir, "protopnet_prototypes_step*.png"))) == 1
    assert len(glob.glob(os.path.join(log_dir, "protopnet_explanations_step*.csv"))) == 1
    metrics = open(os.path.join(log_dir, "metrics.csv")).readline()
    for key in ("train_cluster", "train_separation", "train_l1", "push_mean_distance", "val_acc"):
        assert key in metrics

    # checkpoint: the push record (crops included) survives
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    loaded = ProtoPNet.load_from_checkpoint(path, backbone=TinyTrunk())
    assert torch.equal(loaded.push_crops, model.push_crops) and torch.equal(loaded.push_index, model.push_index)


def test_cosine_scheduler_steps_each_stage():
    pl.seed_everything(0)
    model = tiny_model(warm_epochs=1, joint_epochs=1, last_layer_epochs=0, scheduler="cosine", lr=0.01)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(model, BlobData(n_train=16, n_val=8, size=16, batch_size=8))
    warm, joint, last = trainer.lr_scheduler_configs
    assert warm.scheduler.T_max == 2 and joint.scheduler.T_max == 2 and last.scheduler.T_max == 1
    assert warm.scheduler.last_epoch == 2 and joint.scheduler.last_epoch == 2 and last.scheduler.last_epoch == 0


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prototypes_per_class": 0}, "ProtoPNet: prototypes_per_class must be an integer >= 1, got 0"),
        ({"backbone": "resnet19"}, r"unknown backbone 'resnet19'; valid names: \['small_cnn', 'resnet18'"),
        ({"joint_epochs": 0}, "ProtoPNet: joint_epochs must be an integer >= 1, got 0"),
        ({"warm_epochs": -1}, "ProtoPNet: warm_epochs must be an integer >= 0, got -1"),
        ({"push_cycles": 0}, "ProtoPNet: push_cycles must be an integer >= 1, got 0"),
        ({"epsilon": 0.0}, "ProtoPNet: epsilon must be a finite number > 0, got 0.0"),
        ({"lambda_sep": -0.1}, "ProtoPNet: lambda_sep must be a finite number >= 0, got -0.1"),
        ({"num_classes": 1}, "ProtoPNet: num_classes must be an integer >= 2, got 1"),
        ({"backbone": nn.Linear(3, 3)}, "feature maps"),
    ],
)
def test_bad_hyper_parameters_raise_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)


def test_backbone_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="backbone must be"):
        ProtoPNet(backbone=3)


def test_too_few_epochs_for_the_schedule_is_refused():
    model = tiny_model(warm_epochs=1, joint_epochs=2, last_layer_epochs=2)
    trainer = quiet_trainer(max_epochs=3)
    with pytest.raises(ValueError, match=r"needs 5 epochs .* max_epochs=3: the push at epoch\(s\) \[2\]"):
        trainer.fit(model, BlobData(n_train=8, n_val=8))


# ---------------------------------------------------------------------------------------------- DDP and CLI


def test_ddp_push_selects_the_same_patches_as_a_single_process(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "ddp_protopnet_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "ddp"
    proc = run_processes([sys.executable, script, "2", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    tensors = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["push_count"] == 1
    for result in ranks:
        assert result["pushed_equals_patch_exactly"], "every rank: prototype == its source patch's latent vector"
        assert result["source_labels"] == result["prototype_classes"]
        assert max(result["min_distance_at_source"]) <= 1e-5
        assert result["prototypes_unchanged_by_last_layer_stage"]
    for key in ("push_index", "push_position", "push_box"):
        assert ranks[0][key] == ranks[1][key]
    assert torch.equal(tensors[0]["pushed"], tensors[1]["pushed"]), "the same bytes on every rank"
    assert torch.equal(tensors[0]["final_last_layer"], tensors[1]["final_last_layer"])
    for a, b in zip(tensors[0]["final_features"], tensors[1]["final_features"]):
        assert torch.equal(a, b)

    # A single process, same model state as rank 0 just before the push, whole training set.
    single = ProtoPNet(
        "small_cnn", num_classes=3, prototypes_per_class=2, prototype_dim=8, warm_epochs=1, joint_epochs=1,
        last_layer_epochs=1, explain_samples=0,
    )  # fmt: skip
    single.load_state_dict(torch.load(out / "pre_push.pt"))
    single.push(BlobData(n_train=40, n_val=16, size=16, batch_size=8).train_set, batch_size=40)
    assert single.push_index.tolist() == ranks[0]["push_index"]
    assert single.push_position.tolist() == ranks[0]["push_position"]
    assert torch.equal(single.prototypes.detach(), tensors[0]["pushed"])


def test_example_config_runs_with_the_cli(tmp_path):
    from lightning_xai.cli import main

    cli = main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "examples", "configs", "protopnet.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.n_train=16",
            "--data.init_args.n_val=8",
            "--data.init_args.n_test=8",
            "--data.init_args.batch_size=8",
        ]
    )
    assert isinstance(cli.model, ProtoPNet)
    assert cli.model.prototypes_per_class == 5 and cli.model.scheduler_name == "cosine"
    assert cli.model.schedule_length == cli.config["fit"]["trainer"]["max_epochs"], "the schedule fills the run"


# ------------------------------------------------------------------------------------------ issue 18: 10, 11
def test_labels_beyond_num_classes_are_a_clear_error_before_the_loss():
    model = tiny_model(num_classes=2)  # the blobs have 3 classes
    with pytest.raises(ValueError, match=r"ProtoPNet: class label 2 is out of range for num_classes=2"):
        quiet_trainer(fast_dev_run=True).fit(model, BlobData())


def test_a_datamodule_with_more_classes_is_an_error_at_setup():
    class Described(BlobData):
        num_classes = 3

    with pytest.raises(ValueError, match=r"Described has 3 classes but the model has num_classes=2"):
        quiet_trainer(fast_dev_run=True).fit(tiny_model(num_classes=2), Described())


def test_a_nan_pixel_is_a_clear_error_naming_the_loss_parts():
    from lightning_xai.models.base import NonFiniteLossError

    data = blob_dataset(8, 16, seed=1)
    images = data.tensors[0].clone()
    images[0, 0, 0, 0] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, data.tensors[1]), batch_size=8)
    with pytest.raises(NonFiniteLossError, match=r"ProtoPNet: the loss is nan at train batch 0 .*'ce'"):
        quiet_trainer(fast_dev_run=True).fit(tiny_model(), loader)


def test_config_dataclass_builds_the_same_model_and_round_trips():
    from lightning_xai.models.protopnet import ProtoPNetConfig

    config = ProtoPNetConfig(num_classes=3, prototypes_per_class=2, prototype_dim=5, explain_samples=0, lambda_sep=0.2)
    torch.manual_seed(0)
    model = ProtoPNet.from_config(config, backbone=TinyTrunk())
    assert model.to_config() == config and model.lambda_sep == 0.2
    assert dict(model.hparams) == dict(tiny_model(lambda_sep=0.2).hparams)


def test_dict_batches_are_read_with_configured_keys():
    data = blob_dataset(16, 16, seed=1)
    items = [{"pixels": x, "target": y} for x, y, _ in data]
    model = tiny_model(input_key="pixels", label_key="target")
    quiet_trainer(fast_dev_run=True).fit(model, torch.utils.data.DataLoader(items, batch_size=8))
    assert model.hparams["input_key"] == "pixels" and model.to_config().label_key == "target"
    logits = model.predict_step({"pixels": data.tensors[0][:4]}, 0)
    assert logits.shape == (4, 3)
