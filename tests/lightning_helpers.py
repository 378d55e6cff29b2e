"""A tiny LightningModule and dataset for callback tests (independent of the project's own models and data,
so that callback tests fail only for callback bugs). Also imported by the DDP subprocess scripts."""

from __future__ import annotations

import subprocess

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.namespace import pl


def blob_dataset(n: int = 64, size: int = 16, seed: int = 0) -> TensorDataset:
    """Class 0/1/2 = a bright square in the left / middle / right third; returns (image, label, mask)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.2 * torch.rand(n, 3, size, size, generator=g)
    masks = torch.zeros(n, 1, size, size)
    third = size // 3
    for i, c in enumerate(labels.tolist()):
        top = int(torch.randint(0, size - 4, (1,), generator=g))
        left = c * third + int(torch.randint(0, third - 3, (1,), generator=g))
        images[i, :, top : top + 4, left : left + 4] = 1.0
        masks[i, :, top : top + 4, left : left + 4] = 1.0
    return TensorDataset(images, labels, masks)


class TinyClassifier(pl.LightningModule):
    """conv-BN-ReLU(inplace)-conv-ReLU(inplace) ("features") -> GAP -> linear ("head")."""

    def __init__(self, num_classes: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class BlobData(pl.LightningDataModule):
    def __init__(self, n_train: int = 48, n_val: int = 24, size: int = 16, batch_size: int = 16) -> None:
        super().__init__()
        self.train_set = blob_dataset(n_train, size, seed=1)
        self.val_set = blob_dataset(n_val, size, seed=2)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def quiet_trainer(**kwargs) -> pl.Trainer:
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


#: Failures of the machinery around a multi-process run, not of the code under test: the port probed as free was
#: taken before the rendezvous bound it, or a worker aborted in torch's C++ teardown after its work was done
#: (seen rarely with gloo under ``ddp_spawn`` on a loaded machine). A run failing with one of these is run again
#: once; any other failure fails at once.
INFRASTRUCTURE_FAILURES = ("address already in use", "terminate called without an active exception")


def run_processes(args: list[str], *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a multi-process test script (``[sys.executable, script, ...]``) in a subprocess and return the finished
    process, retried once only after an :data:`INFRASTRUCTURE_FAILURES` failure. The caller asserts on it."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0 and any(text in proc.stderr.lower() for text in INFRASTRUCTURE_FAILURES):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    return proc
