"""Shared fixtures (the classes live in ``tests/helpers.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import GapCNN, LinearModel
from torch import nn

# The test models are tiny: one intra-op thread is faster than two, and far faster on a busy machine.
torch.set_num_threads(1)


@pytest.fixture
def linear_model() -> LinearModel:
    return LinearModel().eval()


@pytest.fixture
def gap_cnn() -> GapCNN:
    return GapCNN().eval()


@pytest.fixture
def resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=6).eval()


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    """No test talks to the network or writes W&B files outside its temporary folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
