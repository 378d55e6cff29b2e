"""Net2Vec concept filters and linear concept probes (lightning_xai/models/net2vec.py, probes.py), and the DDP run
of all post-hoc modules (tests/ddp_sae_script.py)."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import pytest
import torch
from lightning_helpers import run_processes
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.data.concepts import ConceptDataModule
from lightning_xai.models.activations import ActivationBatch
from lightning_xai.models.net2vec import ConceptMaskDataModule, Net2Vec, SetIoU, set_iou_counts
from lightning_xai.models.probes import ConceptProbes, balanced_bce
from lightning_xai.namespace import pl

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def filter_data(n: int, size: int = 16, seed: int = 0):
    """Feature maps with a known code: concept a lies in the left half, b in the right half of each image;
    filter 0 = a OR b, filter 1 = b (slightly noisy magnitudes), filter 2 = noise. Concept a = filter 0 - filter 1:
    a combination finds it, no single filter does."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 2, size, size, dtype=torch.bool)
    half = size // 2
    for i in range(n):
        for c, offset in ((0, 0), (1, half)):
            h, w = (int(v) for v in torch.randint(2, half - 1, (2,), generator=g))
            top = int(torch.randint(0, size - h + 1, (1,), generator=g))
            left = offset + int(torch.randint(0, half - w + 1, (1,), generator=g))
            masks[i, c, top : top + h, left : left + w] = True
    m = masks.float()
    maps = torch.stack(
        [
            (m[:, 0] + m[:, 1]) * (1 + 0.1 * torch.rand(n, size, size, generator=g)),
            m[:, 1] * (1 + 0.1 * torch.rand(n, size, size, generator=g)),
            0.5 * torch.rand(n, size, size, generator=g),
        ],
        dim=1,
    )
    labels = torch.zeros(n, dtype=torch.long)
    concept_labels = masks.flatten(2).any(dim=2).float()
    return maps, labels, concept_labels, masks


# ----------------------------------------------------------------------------------------------------- losses & IoU
def test_balanced_bce_closed_form():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha = torch.tensor([0.8, 0.3])
    expected = 0.0
    for i in range(2):
        for c in range(2):
            p = 1 / (1 + math.exp(-float(logits[i, c])))
            y, a = float(targets[i, c]), float(alpha[c])
            expected += -(a * y * math.log(p) + (1 - a) * (1 - y) * math.log(1 - p))
    assert balanced_bce(logits, targets, alpha, 4.0).item() == pytest.approx(expected / 4, rel=1e-6)


def test_set_iou_counts_match_brute_force_and_merge():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8)
    maps = torch.rand(4, 5, 4, 4)
    masks = torch.rand(4, 3, 8, 8) > 0.7
    thresholds = torch.rand(5) * 0.5 + 0.3
    metric = SetIoU(5, 3)
    metric.update(set_iou_counts(logits[:3], maps[:3], thresholds, masks[:3]))
    metric.update(set_iou_counts(logits[3:], maps[3:], thresholds, masks[3:]))
    out = metric.compute()
    pred = logits > 0
    for c in range(3):
        inter = (pred[:, c] & masks[:, c]).sum().item()
        union = (pred[:, c] | masks[:, c]).sum().item()
        assert out["net2vec_iou"][c].item() == pytest.approx(inter / union)
    up = torch.nn.functional.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    for k in range(5):
        fires = up[:, k] > thresholds[k]
        for c in range(3):
            inter = (fires & masks[:, c]).sum().item()
            union = (fires | masks[:, c]).sum().item()
            assert out["single_iou"][k, c].item() == pytest.approx(inter / max(union, 1))
    assert torch.equal(out["best_filter"], out["single_iou"].argmax(dim=0))


# ----------------------------------------------------------------------------------------------------- net2vec
def test_net2vec_learns_the_combination_and_beats_the_best_single_filter():
    pl.seed_everything(0)
    maps, labels, concept_labels, masks = filter_data(96)
    val = filter_data(32, seed=1)
    module = Net2Vec(3, 2, concept_names=["part:a", "part:b"], lr=0.1)
    train = DataLoader(TensorDataset(maps, labels, concept_labels, masks), batch_size=32, shuffle=True)
    _trainer(max_epochs=25).fit(module, train, DataLoader(TensorDataset(*val), batch_size=16))
    rows = {r[0]: r for r in module.result_rows()}
    assert rows["part:a"][1] > 0.9 and rows["part:b"][1] > 0.9, rows
    assert rows["part:a"][1] > rows["part:a"][3] + 0.3, "a needs filter 0 minus filter 1"
    w = module.concept_weights()
    assert w[0, 0] > 0 and w[0, 1] < 0, "concept a: + filter 0, - filter 1"
    # the single-filter thresholds: the 99.5th percentile of each filter over the training maps
    exact = torch.stack([torch.quantile(maps[:, k].flatten(), 0.995) for k in range(3)])
    torch.testing.assert_close(module.thresholds, exact, rtol=2e-2, atol=1e-3)
    # the training concept frequencies that weight the loss: 25 epochs of the same pixels
    fraction = module.pixel_counts[:2] / module.pixel_counts[2]
    torch.testing.assert_close(fraction, masks.float().mean(dim=(0, 2, 3)).double())
    # image-level probes trained in the same loop: both concepts are present in every image (bacc undefined)
    assert math.isnan(rows["part:a"][4])


def test_net2vec_bad_inputs():
    module = Net2Vec(4, 2)
    maps, labels, concept_labels, masks = filter_data(2)
    with pytest.raises(ValueError, match=r"num_filters = 4.*got shape \[2, 3, 16, 16\]"):
        module.training_step([maps, labels, concept_labels, masks], 0)
    with pytest.raises(ValueError, match="concept masks at position 3"):
        Net2Vec(3, 2).training_step([maps, labels], 0)
    with pytest.raises(ValueError, match="quantile"):
        Net2Vec(3, 2, quantile=1.5)
    with pytest.raises(ValueError, match="3 concept names for num_concepts = 2"):
        Net2Vec(3, 2, concept_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="train_probes=False"):
        Net2Vec(3, 2, train_probes=False).cavs()
    with pytest.raises(ValueError, match="no results yet"):
        Net2Vec(3, 2).result_rows()


def test_sizes_are_checked_against_the_layer_before_training():
    from lightning_xai.models.activations import ActivationDataModule
    from lightning_xai.models.backbones import SmallCNN

    def data(spatial):
        cdm = ConceptDataModule(image_size=24, n_train=8, n_val=4, n_test=4, batch_size=4)
        return ActivationDataModule(ConceptMaskDataModule(cdm), SmallCNN(num_classes=8, width=4), "features", spatial)

    with pytest.raises(ValueError, match=r"built for 5 features.*gives 8.*set it to 8"):
        _trainer(max_steps=1).fit(Net2Vec(5, 18), data("maps"))
    with pytest.raises(ValueError, match="needs feature maps"):
        _trainer(max_steps=1).fit(Net2Vec(8, 18), data("pool"))
    with pytest.raises(ValueError, match=r"built for 6 features.*gives 8"):
        _trainer(max_steps=1).fit(ConceptProbes(6, 18), data("pool"))


def test_concept_mask_datamodule_batches_carry_exact_masks():
    cdm = ConceptDataModule(image_size=24, n_train=8, n_val=6, n_test=6, batch_size=4)
    dm = ConceptMaskDataModule(cdm)
    dm.setup("fit")
    images, labels, concept_labels, masks = next(iter(dm.val_dataloader()))
    scenes = cdm.dataset("val")
    assert torch.equal(images, scenes.images[:4]) and torch.equal(labels, scenes.labels[:4])
    assert torch.equal(masks, scenes.concept_masks_for(torch.arange(4)))
    assert torch.equal(masks.flatten(2).any(dim=2).float(), concept_labels)
    assert dm.concept_names == scenes.concept_names


# ----------------------------------------------------------------------------------------------------- probes
def test_probes_recover_linear_concepts_and_their_directions():
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(5)
    directions = torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=1)
    features = torch.randn(600, 6, generator=g)
    offsets = torch.tensor([0.0, 0.3, 1.0])  # concept 2 is rare (~16 % of images): balancing matters
    concept_labels = (features @ directions.t() > offsets).float()
    data = TensorDataset(features, torch.zeros(600, dtype=torch.long), concept_labels)
    module = ConceptProbes(6, 3, concept_names=["c0", "c1", "c2"], lr=0.05)
    _trainer(max_epochs=15).fit(
        module, DataLoader(data, batch_size=100, shuffle=True), DataLoader(data, batch_size=200)
    )
    rows = module.result_rows()
    assert all(r[1] > 0.95 and r[2] > 0.99 for r in rows), rows
    cosine = (module.cavs() * directions).sum(dim=1)
    assert (cosine > 0.95).all(), cosine
    torch.testing.assert_close(module.cav("c1"), module.cavs()[1])
    frequency = module.concept_counts[:3] / module.concept_counts[3]
    torch.testing.assert_close(frequency, concept_labels.mean(dim=0).double())
    with pytest.raises(ValueError, match="unknown concept"):
        module.cav("c9")


def test_probes_need_concept_labels():
    module = ConceptProbes(4, 2)
    with pytest.raises(ValueError, match="has no item 2"):
        module.training_step(ActivationBatch(torch.randn(3, 4)), 0)
    with pytest.raises(ValueError, match=r"concept labels must be \[B, 2\]"):
        module.training_step(ActivationBatch(torch.randn(3, 4), None, (torch.zeros(3), torch.zeros(3, 5))), 0)
    with pytest.raises(ValueError, match="expect 4 features"):
        module(torch.randn(3, 5))


# ----------------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes_match_one_and_shard_the_cache(tmp_path):
    """SAE (cached activations), Net2Vec + probes and ConceptProbes trained with DDP on 2 CPU processes (gloo)
    give the metrics of one process; each process writes its own cache shard, which a second fit reuses."""
    here = os.path.dirname(__file__)
    sys.path.insert(0, here)
    try:
        import ddp_sae_script
    finally:
        sys.path.remove(here)
    cache = tmp_path / "cache"
    ddp_sae_script.run(1, str(tmp_path / "out1"), str(cache))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    proc = run_processes(
        [sys.executable, os.path.join(here, "ddp_sae_script.py"), "2", str(tmp_path / "out2"), str(cache)], env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "out1" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "out2" / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(os.listdir(cache)) == sorted(
        ["shard0of1.json", "shard0of1.npy", "shard0of2.json", "shard0of2.npy", "shard1of2.json", "shard1of2.npy"]
    )
    for result in (single, *ranks):
        assert result["cache_status"] == ["written", "reused"]
    assert ranks[0]["rows"] + ranks[1]["rows"] == single["rows"]
    for rank_result in ranks:
        for key, value in single["metrics"].items():
            other = rank_result["metrics"][key]
            assert other == pytest.approx(value, rel=1e-4, abs=1e-6), key
