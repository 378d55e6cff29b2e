"""Shared fixtures (the classes live in ``tests/helpers.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import GapCNN, LinearModel
from torch import nn

# The test models are tiny: one intra-op thread is faster than two, and far faster on a busy machine.
torch.set_num_threads(1)


def pytest_report_header(config: pytest.Config) -> str:
    import lightning_xai.namespace as namespace

    return f"lightning_xai builds on {namespace.NAME} (set LIGHTNING_XAI_NAMESPACE to run under the other one)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``lightning`` every test of a module that builds Trainers through ``lightning_xai.namespace``: CI runs
    those a second time with ``LIGHTNING_XAI_NAMESPACE=pytorch_lightning`` (the README's test command), so that
    every callback and model is tested under both Lightning namespaces without a copy of any test."""
    sources: dict[str, bool] = {}
    for item in items:
        path = str(item.fspath)
        if path not in sources:
            try:
                with open(path, encoding="utf-8") as f:
                    sources[path] = "from lightning_xai.namespace import" in f.read()
            except OSError:
                sources[path] = False
        if sources[path]:
            item.add_marker(pytest.mark.lightning)


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
