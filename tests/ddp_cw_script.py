"""Train a ConceptWhiteningClassifier for a few steps on 1 process or on N CPU processes (DDP, gloo) and write, per
rank, the CW layer's statistics, its rotation and a few parameters. Used by test_concept_whitening.py.

    python tests/ddp_cw_script.py DEVICES OUT_DIR

The global batch is the same in both runs (``GLOBAL_BATCH`` images: one batch on 1 process, ``GLOBAL_BATCH /
DEVICES`` per rank under DDP with an unshuffled loader, whose DistributedSampler interleaves the ranks), the
only normalisation layer is the CW layer (so no unsynchronised BatchNorm), and the optimiser is plain SGD: when
the CW batch statistics and the concept gradients are all-reduced correctly, every number written equals the
single-process run's up to float rounding.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_xai.data.concepts import ConceptScenes
from lightning_xai.models.concept_whitening import ConceptWhiteningClassifier
from lightning_xai.namespace import pl

GLOBAL_BATCH = 16
CONCEPTS = ["shape:circle", "colour:red", "texture:stripes"]


class SceneData(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.scenes = ConceptScenes(32, image_size=24, seed=5)
        self.batch_size = batch_size

    def dataset(self, split: str) -> ConceptScenes:
        return self.scenes

    def train_dataloader(self) -> DataLoader:
        # An explicit unshuffled sampler (Lightning's own DistributedSampler would shuffle the training data):
        # rank r gets images r, r + W, r + 2W, ..., so each global batch is the single-process batch.
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = DistributedSampler(self.scenes, shuffle=False)
        return DataLoader(self.scenes, batch_size=self.batch_size, sampler=sampler, shuffle=False)


def build_model() -> ConceptWhiteningClassifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),  # "1": replaced by the CW layer
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 8),
    )
    return ConceptWhiteningClassifier(
        CONCEPTS,
        backbone=backbone,
        layer="1",
        update_every=2,
        concept_batch_size=6,
        optimizer="sgd",
        lr=0.1,
        momentum=0.0,
    )


class BeforeRecalibration(pl.Callback):
    """Callbacks' on_fit_end runs before the module's: the running averages as training left them."""

    def on_fit_end(self, trainer, module) -> None:
        self.running_mean = module.cw.running_mean.tolist()
        self.running_whitening = module.cw.running_whitening.flatten().tolist()


def run(devices: int, out: str) -> dict:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = build_model()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[before := BeforeRecalibration()],
    )
    trainer.fit(model, SceneData(GLOBAL_BATCH // devices))
    cw = model.cw
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "averaged_mean": before.running_mean,
        "averaged_whitening": before.running_whitening,
        "running_mean": cw.running_mean.tolist(),
        "running_whitening": cw.running_whitening.flatten().tolist(),
        "rotation": cw.rotation.flatten().tolist(),
        "num_rotation_updates": int(cw.num_rotation_updates),
        "first_conv": model.backbone[0].weight.flatten().tolist(),
        "head": model.backbone[7].weight.flatten().tolist(),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    run(int(sys.argv[1]), sys.argv[2])
    # The results are on disk. Tear the process group down and leave without running C++ static destructors: a
    # gloo worker thread still alive at interpreter exit aborts the process ("terminate called without an active
    # exception", seen once under load), which would fail the test after a successful run.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
