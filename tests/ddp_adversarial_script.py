"""Adversarial training and interpretable filters under DDP (CPU, gloo): fit a few steps and validate at the end
of the epoch; each rank writes its synchronised metrics and a checksum of its parameters, rank 0 also the trained
weights of the adversarial model. Used by test_adversarial.py.

    python tests/ddp_adversarial_script.py DEVICES OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from lightning_xai.namespace import pl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning_helpers import BlobData

from lightning_xai.models.adversarial import AdversarialClassifier
from lightning_xai.models.interpretable_filters import InterpretableFilterClassifier


def make_model() -> AdversarialClassifier:
    """A tiny conv-BN classifier for the 3-class 16x16 blob images (class = where the blob is, so no global
    pooling), trained with L_inf PGD."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    return AdversarialClassifier(backbone=backbone, num_classes=3, eps=0.1, steps=3, optimizer="sgd", lr=0.05)


def make_filter_model() -> InterpretableFilterClassifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    return InterpretableFilterClassifier(backbone=backbone, num_classes=3, filter_layer="backbone.0.0", tau=0.5)


def checksum(model: nn.Module) -> float:
    return float(sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


def make_data() -> BlobData:
    return BlobData(n_train=32, n_val=24, size=16, batch_size=8)


def main() -> None:
    devices, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = make_model()
    kwargs = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = pl.Trainer(max_epochs=1, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, datamodule=make_data())  # validation runs after the last training step
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    rank = trainer.global_rank
    filter_model = make_filter_model()
    filter_trainer = pl.Trainer(max_epochs=1, num_sanity_val_steps=0, **kwargs)
    filter_trainer.fit(filter_model, datamodule=make_data())
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "param_checksum": checksum(model),
        "filter_metrics": {k: float(v) for k, v in filter_trainer.callback_metrics.items()},
        "filter_param_checksum": checksum(filter_model),
    }
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out, "weights.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
