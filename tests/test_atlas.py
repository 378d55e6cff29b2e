"""Activation atlas: planted clusters land apart, cell directions are member means, icons beat random inputs,
sharded collection equals the single-process one, class filtering, the callback and its setup validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lightning_xai.distributed import ThreadGroup
from lightning_xai.interpretation.atlas import ActivationAtlas, DirectionObjective, bin_cells, cell_means, layout_2d
from lightning_xai.interpretation.visualization import ActivationMaximization


class Planted(nn.Module):
    """``features`` is a 1x1 convolution whose output at each pixel is one of two far-apart activation vectors:
    ``+v`` where the red channel is bright, ``-v`` elsewhere (plus a small ramp so that no two are identical)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[:, 0, 0, 0] = torch.tensor([4.0, -4.0, 2.0, 0.0])
            self.features.weight[3, 1, 0, 0] = 0.1
            self.features.bias.copy_(torch.tensor([-2.0, 2.0, -1.0, 0.0]))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def planted_images(n: int = 12, size: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g) * 0.05
    x[:, 0] = (torch.rand(n, size, size, generator=g) > 0.5).float()  # red bright (1) or dark (0)
    x[:, 1] = torch.rand(n, size, size, generator=g)  # the small ramp
    return x


FAST_AM = dict(steps=24, lr=0.1, jitter=0, tv=0.0, l2=0.0, batch_size=8)


def test_planted_clusters_land_in_separate_cells_and_directions_are_member_means():
    model = Planted()
    atlas = ActivationAtlas("features", grid_size=4, positions_per_image=6, method="pca", render_icons=False)
    result = atlas(model, planted_images())
    side = (result.vectors[:, 0] > 0)  # which planted cluster each vector belongs to
    assert 0 < int(side.sum()) < len(side)
    cells_a = set(result.cell_of[side].tolist())
    cells_b = set(result.cell_of[~side].tolist())
    assert cells_a and cells_b and not cells_a & cells_b  # no cell mixes the clusters
    for k in range(len(result.counts)):
        members = result.vectors[result.cell_of == k]
        assert members.shape[0] == int(result.counts[k])
        torch.testing.assert_close(result.directions[k], members.mean(0), atol=1e-5, rtol=1e-5)
    assert int(result.counts.sum()) == result.vectors.shape[0] == 12 * 6


def test_bin_cells_and_cell_means_by_hand():
    coords = torch.tensor([[0.0, 0.0], [0.1, 0.1], [1.0, 1.0], [0.9, 0.95], [0.0, 1.0]])
    cell_of, cells, counts = bin_cells(coords, 2)
    # rows count from the top (largest y): (0,0) is top-left
    assert cells.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert counts.tolist() == [1, 2, 2]
    assert cell_of.tolist() == [2, 2, 1, 1, 0]
    values = torch.arange(10.0).view(5, 2)
    torch.testing.assert_close(cell_means(values, cell_of, 3), torch.tensor([[8.0, 9.0], [5.0, 6.0], [1.0, 2.0]]))
    dropped, kept, _ = bin_cells(coords, 2, min_count=2)
    assert dropped.tolist() == [1, 1, 0, 0, -1] and kept.tolist() == [[0, 1], [1, 0]]


def test_cell_icons_raise_their_objective_above_random_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    am = ActivationMaximization(**FAST_AM)
    atlas = ActivationAtlas("2", grid_size=3, positions_per_image=4, method="pca", visualization=am)
    result = atlas(model, torch.rand(10, 3, 8, 8))
    assert result.icons is not None and result.icons.shape == (len(result.counts), 3, 8, 8)
    assert bool((result.icon_scores > result.random_scores).all()), (result.icon_scores, result.random_scores)
    # the score really is the direction objective of the icon
    objective = DirectionObjective(model, "2", result.directions)
    with torch.no_grad():
        own = objective(result.icons).diagonal()
    torch.testing.assert_close(own, result.icon_scores, atol=1e-4, rtol=1e-4)
    image = result.render(tile=16)
    assert image.dtype == np.uint8 and image.shape == (3 * 17 + 1, 3 * 17 + 1, 3)
    columns, rows = result.table()
    assert columns[3] == "count" and sum(r[3] for r in rows) == result.vectors.shape[0]


def test_sharded_collection_over_two_ranks_equals_one_process():
    model = Planted()
    data = planted_images(7)
    atlas = ActivationAtlas("features", grid_size=4, positions_per_image=3, method="pca", render_icons=False)
    single = atlas(model, data)
    # each simulated rank holds its own replica, as each DDP process does (forward hooks are per module: two threads
    # capturing on one shared model would record each other's activations)
    results = ThreadGroup(2).run(lambda reducer: atlas(copy.deepcopy(model), data, reducer=reducer))
    for r in results:
        torch.testing.assert_close(r.vectors, single.vectors)
        assert r.image_index.tolist() == single.image_index.tolist()
        torch.testing.assert_close(r.directions, single.directions)
    # max_samples takes the same first images whatever the number of ranks
    limited = ActivationAtlas("features", grid_size=4, positions_per_image=3, method="pca", render_icons=False,
                              max_samples=5)
    one = limited(model, data)
    two = ThreadGroup(2).run(lambda reducer: limited(copy.deepcopy(model), data, reducer=reducer))
    assert sorted(set(one.image_index.tolist())) == [0, 1, 2, 3, 4]
    assert two[0].image_index.tolist() == one.image_index.tolist()


def test_class_filtered_atlas_weights_cells_by_attribution():
    model = Planted()
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    atlas = ActivationAtlas("features", grid_size=4, positions_per_image=6, method="pca", render_icons=False)
    result = atlas(model, planted_images(), target_class=0)
    # attribution toward class 0 = activation x gradient = a_0 / (h w) per position: positive for the +v cluster
    side = result.directions[:, 0] > 0
    assert bool((result.class_attribution[side] > 0).all()) and bool((result.class_attribution[~side] < 0).all())


def test_model_left_unchanged_and_bad_arguments():
    model = Planted().train()
    model.head.weight.requires_grad_(False)
    ActivationAtlas("features", grid_size=2, method="pca", visualization=ActivationMaximization(**FAST_AM))(
        model, planted_images(4), target_class=1
    )
    assert model.training and not model.head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert not model.features._forward_hooks
    with pytest.raises(ValueError, match=r"ActivationAtlas: unknown method 'umapp'.*'umap'"):
        ActivationAtlas("features", method="umapp")
    with pytest.raises(ValueError, match="grid_size must be an integer >= 1, got 0"):
        ActivationAtlas("features", grid_size=0)
    with pytest.raises(ValueError, match="close matches: \\['features'\\]"):
        ActivationAtlas("featurs", method="pca")(model, planted_images(4))


def test_layout_auto_falls_back_to_tsne_without_umap():
    pytest.importorskip("sklearn")
    vectors = torch.cat([torch.randn(10, 3) + 5, torch.randn(10, 3) - 5])
    coords, method = layout_2d(vectors, "auto", seed=0)
    assert coords.shape == (20, 2)
    assert method in ("umap", "tsne")
    # the two blobs stay apart in the layout
    a, b = coords[:10].mean(0), coords[10:].mean(0)
    spread = max(coords[:10].std(0).max(), coords[10:].std(0).max())
    assert float((a - b).norm()) > 2 * float(spread)


# ----------------------------------------------------------------------------------------------- callback
def test_callback_logs_the_atlas_every_epoch(tmp_path):
    from lightning_helpers import BlobData, TinyClassifier, quiet_trainer

    from lightning_xai.callbacks import ActivationAtlas as AtlasCallback

    torch.manual_seed(0)
    method = ActivationAtlas("features", grid_size=3, positions_per_image=4, method="pca",
                             visualization=ActivationMaximization(**FAST_AM), max_samples=12)
    callback = AtlasCallback(atlas=method, output_dir=str(tmp_path), target_class=1, every_n_epochs=1)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(TinyClassifier(), datamodule=BlobData())
    assert not callback.errors, callback.errors
    assert [r["epoch"] for r in callback.history] == [0, 1] and callback.history[0]["cells"] >= 2
    assert trainer.callback_metrics["xai/atlas/cells"] == callback.history[-1]["cells"]  # logged in the loop
    result = callback.last_result
    assert result is not None and result.vectors.shape[0] == 12 * 4 and result.class_attribution is not None
    assert callback.last_metrics["xai/atlas/icon_gain"] > 0
    pngs = list((tmp_path / "activationatlas").glob("*.png"))
    assert len(pngs) == 2
    state = callback.state_dict()
    assert state["history"][0]["cells"] == callback.history[0]["cells"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layer="featurs"), r"ActivationAtlas: layer 'featurs' not found .*close matches: \['features'"),
        (dict(layer="features", target_class=5), r"target_class=5 is out of range; valid: 0..2"),
    ],
)
def test_callback_validates_its_configuration_before_training(kwargs, message):
    from lightning_helpers import BlobData, TinyClassifier, quiet_trainer

    from lightning_xai.callbacks import ActivationAtlas as AtlasCallback
    from lightning_xai.callbacks.base import ConfigurationError

    model = TinyClassifier()
    before = model.head.weight.detach().clone()
    trainer = quiet_trainer(max_epochs=1, callbacks=[AtlasCallback(method="pca", **kwargs)])
    with pytest.raises(ConfigurationError, match=message):
        trainer.fit(model, datamodule=BlobData())
    torch.testing.assert_close(model.head.weight.detach(), before)  # no training step ran


def test_callback_needs_a_layer_or_an_atlas():
    from lightning_xai.callbacks import ActivationAtlas as AtlasCallback

    with pytest.raises(ValueError, match="ActivationAtlas: give layer="):
        AtlasCallback()
    with pytest.raises(ValueError, match="unknown method 'tnse'"):
        AtlasCallback(layer="features", method="tnse")


def test_shipped_config_fast_dev_run(tmp_path):
    """examples/configs/activation_atlas.yaml trains (fast_dev_run, tiny data) and draws both atlases."""
    import os

    from lightning_xai.callbacks import ActivationAtlas as AtlasCallback
    from lightning_xai.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cli = main([
        "fit", "--config", os.path.join(root, "examples", "configs", "activation_atlas.yaml"),
        "--trainer.fast_dev_run=true", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.n_train=32", "--data.init_args.n_val=6", "--data.init_args.n_test=8",
        "--data.init_args.image_size=32", "--data.init_args.batch_size=16",
    ])
    atlases = [c for c in cli.trainer.callbacks if isinstance(c, AtlasCallback)]
    assert len(atlases) == 2
    for callback in atlases:
        assert not callback.errors, callback.errors
        assert len(callback.history) == 1 and callback.last_result is not None
    assert atlases[1].last_result.class_attribution is not None
    assert len(list(tmp_path.rglob("*activation_atlas*.png"))) == 2
