"""Probe-set selection, sharding and gathering (the DDP logic, checked without processes)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_xai.callbacks.probe import ProbeSet, split_sample


def _dataset(n: int = 20) -> TensorDataset:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return TensorDataset(x, torch.arange(n) % 3, torch.ones(n, 1, 2, 2))


def test_selection_is_seeded_and_stable():
    ds = _dataset()
    a, b, c = ProbeSet(5, seed=1), ProbeSet(5, seed=1), ProbeSet(5, seed=2)
    assert a.select(ds) == b.select(ds)
    assert a.select(ds) != c.select(ds)
    assert len(set(a.indices)) == 5
    assert a.select(_dataset(100)) == b.indices, "a second select must keep the first choice"


@pytest.mark.parametrize(("total", "world"), [(8, 2), (7, 2), (5, 3), (2, 3), (1, 1)])
def test_shards_gather_back_in_probe_order(total, world):
    ds = _dataset()
    probe = ProbeSet(total, seed=0)
    probe.select(ds)
    shards = [probe.load_shard(ds, world, r) for r in range(world)]
    assert len({s.inputs.shape[0] for s in shards}) == 1, "shards must be padded to equal size"
    assert sum(s.num_real for s in shards) == total

    def fake_all_gather(local):  # what the DDP strategy returns: [world, ...]
        return torch.stack([s.inputs for s in shards])

    gathered = ProbeSet.gather(shards[0].inputs, total, fake_all_gather, world)
    expected = torch.stack([ds[i][0] for i in probe.indices])
    assert torch.equal(gathered, expected)


def test_split_sample_forms():
    _, y, m = split_sample((torch.zeros(3), 2, torch.ones(1)))
    assert y.item() == 2 and m is not None
    _, y, m = split_sample({"image": torch.zeros(3), "label": torch.tensor(1)})
    assert y.item() == 1 and m is None
    with pytest.raises(ValueError, match="cannot find the input"):
        split_sample({"pixels": torch.zeros(3)})
    with pytest.raises(TypeError, match="cannot read an input"):
        split_sample(3)


def test_fixed_batch_and_bad_arguments():
    probe = ProbeSet(3)
    probe.set_batch((torch.randn(5, 1, 2, 2), torch.arange(5)))
    shard = probe.load_shard(None)
    assert shard.inputs.shape[0] == 3 and torch.equal(shard.labels, torch.arange(3))
    with pytest.raises(ValueError, match="num_samples"):
        ProbeSet(0)
    with pytest.raises(ValueError, match="empty"):
        ProbeSet(2).select(TensorDataset(torch.zeros(0, 1)))


def test_a_given_batch_names_its_samples_by_position_whatever_the_sharding():
    """Sample ids name samples in messages and tables and seed per-sample noise: for a given batch they are the
    positions in it (not a placeholder shared by every sample), the same on one rank or two."""
    probe = ProbeSet(5)
    probe.set_batch((torch.randn(5, 1, 2, 2), torch.arange(5)))
    assert probe.load_shard(None).sample_ids.tolist() == [0, 1, 2, 3, 4]
    shards = [probe.load_shard(None, 2, r) for r in range(2)]
    assert [s.sample_ids[: s.num_real].tolist() for s in shards] == [[0, 1, 2], [3, 4]]
