"""ActivationSource, ActivationCache and ActivationDataModule (lightning_xai/models/activations.py)."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.models.activations import (
    ActivationBatch,
    ActivationCache,
    ActivationDataModule,
    ActivationSource,
    CachedActivationBatches,
    as_activation_batch,
    load_weights,
    model_fingerprint,
)
from lightning_xai.namespace import pl


def _images(n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _features(model: GapCNN, x: torch.Tensor) -> torch.Tensor:
    """The 'features' output computed directly (no hooks)."""
    with torch.no_grad():
        return model.eval().features(x.clone())


class TensorImages(pl.LightningDataModule):
    """(images, labels) splits from tensors; batches of 4."""

    def __init__(self, n: int = 12, size: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.data = {
            split: TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))
            for split in ("train", "val", "test")
        }
        self.batch_size = batch_size
        self.save_hyperparameters()

    def train_dataloader(self):
        return DataLoader(self.data["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data["val"], batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.data["test"], batch_size=self.batch_size)


# ----------------------------------------------------------------------------------------------------- source
@pytest.mark.parametrize("spatial", ["positions", "flatten", "pool", "maps"])
def test_spatial_modes_match_direct_computation(gap_cnn, spatial):
    x = _images()
    source = ActivationSource(gap_cnn, "features", spatial=spatial)
    out = source(x)
    act = _features(gap_cnn, x)  # [4, 8, 8, 8]
    expected = {
        "positions": act.permute(0, 2, 3, 1).reshape(-1, 8),  # image-major, then row-major positions
        "flatten": act.reshape(4, -1),
        "pool": act.sum(dim=(2, 3)) / 64.0,
        "maps": act,
    }[spatial]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not out.requires_grad
    if spatial == "pool":
        with pytest.raises(ValueError, match="not invertible"):
            source.from_vectors(out, act.shape)
    else:
        torch.testing.assert_close(source.from_vectors(out, act.shape), act)


def test_source_has_no_side_effects_also_on_error_and_in_inference_mode(gap_cnn):
    put_in_train_mode_with_grads(gap_cnn)
    before = snapshot(gap_cnn)
    source = ActivationSource(gap_cnn, "features.3")  # BatchNorm, followed by an in-place ReLU
    x = _images()
    first = source(x)
    with torch.inference_mode():
        second = source(x)
    with torch.no_grad():
        third = source(x)
    assert_unchanged(gap_cnn, before)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, third)
    # the recorded BN output was not overwritten by the in-place ReLU after it: it has negative values
    assert bool((first < 0).any())
    with pytest.raises(RuntimeError):
        source(torch.rand(2, 5, 8, 8))  # wrong channel count: the conv raises inside the forward pass
    assert_unchanged(gap_cnn, before)
    with pytest.raises(TypeError, match="floating-point"):
        source(torch.zeros(2, 3, 8, 8, dtype=torch.long))


def test_stop_at_layer_skips_the_rest_and_gives_the_same_result(gap_cnn):
    calls = []
    handle = gap_cnn.head.register_forward_hook(lambda *_: calls.append(1))
    try:
        early = ActivationSource(gap_cnn, "features")
        full = ActivationSource(gap_cnn, "features", stop_at_layer=False)
        x = _images()
        a = early(x)  # first batch: a full pass (learns how often the layer runs)
        b = early(x)
        assert len(calls) == 1, "the head must not run once the number of calls is known"
        c = full(x)
        assert len(calls) == 2
    finally:
        handle.remove()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


class ReusedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y) - 0.1)
        return self.head(y.mean(dim=(2, 3)))


def test_module_called_twice_uses_its_last_call_and_splices_only_that_call():
    model = ReusedReLU().eval()
    x = _images(2)
    source = ActivationSource(model, "relu", spatial="maps")
    with torch.no_grad():
        expected = torch.relu(model.conv2(torch.relu(model.conv1(x))) - 0.1)
    torch.testing.assert_close(source(x), expected)
    torch.testing.assert_close(source(x), expected)  # the early-stopping pass waits for the second call
    # zero-ablating the last call only: the output is the head's bias
    out = source.model_output(x, replace="zero")
    torch.testing.assert_close(out, model.head.bias.detach().expand(2, -1))


def test_normalisation_gives_mean_norm_sqrt_d(gap_cnn):
    x = _images(6)
    source = ActivationSource(gap_cnn, "features", normalize=True)
    assert float(source.scale) == 1.0
    scale = source.estimate_scale([x[:3], (x[3:], torch.zeros(3))])
    vectors = source(x)
    assert vectors.shape[1] == 8
    assert math.isclose(float(vectors.norm(dim=1).mean()), math.sqrt(8), rel_tol=1e-5)
    raw = _features(gap_cnn, x).permute(0, 2, 3, 1).reshape(-1, 8)
    assert math.isclose(scale, math.sqrt(8) / float(raw.norm(dim=1).mean()), rel_tol=1e-5)
    assert bool(source.scale_estimated)
    # the round trip undoes the scale
    torch.testing.assert_close(source.from_vectors(vectors, (6, 8, 8, 8)), _features(gap_cnn, x))


def test_splice_identity_and_zero_ablation_match_direct_computation(gap_cnn):
    x = _images()
    source = ActivationSource(gap_cnn, "features", normalize=True)
    source.estimate_scale([x])
    with torch.no_grad():
        plain = gap_cnn(x)
    torch.testing.assert_close(source.model_output(x, replace=lambda v: v), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(source.model_output(x, replace="zero"), gap_cnn.head.bias.detach().expand(4, -1))
    # a transform on the (scaled) vectors acts on the layer: doubling the features doubles head(...) - bias
    doubled = source.model_output(x, replace=lambda v: 2 * v)
    bias = gap_cnn.head.bias.detach()
    torch.testing.assert_close(doubled - bias, 2 * (plain - bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep the shape"):
        source.model_output(x, replace=lambda v: v[:1])
    assert not gap_cnn.features._forward_hooks, "the splice hook was left on the layer"


def test_bad_arguments_raise_clear_errors(gap_cnn):
    with pytest.raises(ValueError, match=r"layer 'featurs' not found.*close matches"):
        ActivationSource(gap_cnn, "featurs")
    with pytest.raises(ValueError, match="unknown spatial mode"):
        ActivationSource(gap_cnn, "features", spatial="grid")
    with pytest.raises(ValueError, match="ActivationSource: normalize must be True or False, got 1"):
        ActivationSource(gap_cnn, "features", normalize=1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ActivationSource("resnet", "features")
    with pytest.raises(ValueError, match="spatial='maps' needs"):
        ActivationSource(gap_cnn, "head", spatial="maps")(_images())
    with pytest.raises(ValueError, match="does not exist"):
        ActivationSource(gap_cnn, "features", weights="/nonexistent/weights.pt")


def test_fingerprint_and_weight_loading(tmp_path):
    a, b = GapCNN(seed=0), GapCNN(seed=1)
    assert model_fingerprint(a) == model_fingerprint(copy.deepcopy(a))
    assert model_fingerprint(a) != model_fingerprint(b)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in a.state_dict().items()}}, path)
    load_weights(b, path)  # Lightning-checkpoint layout with the ImageClassifier prefix
    assert model_fingerprint(a) == model_fingerprint(b)


# ----------------------------------------------------------------------------------------------------- cache
def test_cache_write_reuse_and_rewrite(tmp_path):
    cache = ActivationCache(tmp_path / "cache")
    rows = [torch.randn(5, 3), torch.randn(7, 3)]
    meta = {"model": "abc", "layer": "features"}
    assert cache.open(meta, 0, 2) is None
    array = cache.write(meta, 0, 2, 12, iter(rows))
    np.testing.assert_allclose(array, torch.cat(rows).numpy())
    assert cache.open(meta, 0, 2) is not None
    assert cache.open({**meta, "model": "xyz"}, 0, 2) is None  # another model: not reused
    assert cache.open(meta, 1, 2) is None  # another rank's shard
    stored = json.loads((tmp_path / "cache" / "shard0of2.json").read_text())
    assert stored["rows"] == 12 and stored["dim"] == 3 and stored["world_size"] == 2
    with pytest.raises(ValueError, match="expected 13"):
        cache.write(meta, 1, 2, 13, iter(rows))
    assert not (tmp_path / "cache" / "shard1of2.json").exists(), "a failed write must not look complete"
    with pytest.raises(ValueError, match="unknown cache dtype"):
        ActivationCache(tmp_path, "int8")


def test_cached_batches_reshuffle_every_epoch_and_cover_every_row(tmp_path):
    cache = ActivationCache(tmp_path)
    data = torch.arange(30, dtype=torch.float32).view(10, 3)
    cache.write({}, 0, 1, 10, [data])
    dataset = CachedActivationBatches(cache.paths(0, 1)[0], rows_per_epoch=10, batch_size=4, shuffle=True, seed=3)
    assert len(dataset) == 3
    epochs = [torch.cat([b["cached_activations"] for b in dataset]) for _ in range(2)]
    for rows in epochs:
        assert sorted(rows[:, 0].tolist()) == data[:, 0].tolist()  # every row exactly once
    assert not torch.equal(epochs[0], epochs[1]), "a new permutation every epoch"
    again = CachedActivationBatches(cache.paths(0, 1)[0], rows_per_epoch=10, batch_size=4, shuffle=True, seed=3)
    torch.testing.assert_close(torch.cat([b["cached_activations"] for b in again]), epochs[0])  # seeded
    limited = CachedActivationBatches(cache.paths(0, 1)[0], rows_per_epoch=6, batch_size=4, shuffle=False)
    assert [b["cached_activations"].shape[0] for b in limited] == [4, 2]


# ----------------------------------------------------------------------------------------------------- datamodule
def test_datamodule_on_the_fly_batches(gap_cnn):
    dm = ActivationDataModule(TensorImages(), gap_cnn, "features", normalize=True, scale_batches=2)
    dm.setup("fit")
    assert bool(dm.source.scale_estimated)
    images, labels = next(iter(dm.val_dataloader()))
    batch = dm.on_after_batch_transfer((images, labels), 0)
    assert isinstance(batch, ActivationBatch)
    torch.testing.assert_close(batch.activations, dm.source(images))
    assert batch.images is images and batch.labels is labels and len(batch) == 4 * 64
    # the scale is part of the datamodule state
    state = dm.state_dict()
    other = ActivationDataModule(TensorImages(), gap_cnn, "features", normalize=True)
    other.load_state_dict(state)
    assert float(other.source.scale) == pytest.approx(float(dm.source.scale))


def test_datamodule_cache_rows_equal_on_the_fly_vectors_and_are_reused(tmp_path, gap_cnn):
    data = TensorImages()
    dm = ActivationDataModule(data, gap_cnn, "features", cache_dir=str(tmp_path), batch_size=100, shuffle=False)
    dm.setup("fit")
    assert dm.cache_status == "written"
    cached = torch.cat([b["cached_activations"] for b in dm.train_dataloader()])
    expected = dm.source(data.data["train"].tensors[0])  # rank 0 of 1: all images, in order
    torch.testing.assert_close(cached, expected)
    batch = dm.on_after_batch_transfer({"cached_activations": cached[:5]}, 0)
    assert batch.images is None and batch.extras == ()
    mtime = os.path.getmtime(tmp_path / "shard0of1.npy")
    again = ActivationDataModule(TensorImages(), gap_cnn, "features", cache_dir=str(tmp_path), batch_size=100)
    again.setup("fit")
    assert again.cache_status == "reused" and os.path.getmtime(tmp_path / "shard0of1.npy") == mtime
    changed = copy.deepcopy(gap_cnn)
    with torch.no_grad():
        changed.head.bias.add_(1.0)  # a weight after the layer: the fingerprint (whole model) changes
    third = ActivationDataModule(TensorImages(), changed, "features", cache_dir=str(tmp_path), batch_size=100)
    with pytest.warns(UserWarning, match="rewriting"):
        third.setup("fit")
    assert third.cache_status == "written"
    with pytest.raises(ValueError, match="cannot be cached"):
        ActivationDataModule(TensorImages(), gap_cnn, "features", spatial="maps", cache_dir=str(tmp_path)).setup("fit")


def test_as_activation_batch_accepts_plain_tensors():
    x = torch.randn(3, 2)
    assert as_activation_batch(x).activations is x
    b = as_activation_batch([x, torch.ones(3)])
    assert b.activations is x and len(b.extras) == 1
    with pytest.raises(TypeError, match="ActivationBatch"):
        as_activation_batch("x")
