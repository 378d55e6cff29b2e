"""Train a tiny ProtoPNet through all stages (warm, joint, push, last layer) on 1 or N CPU processes (DDP, gloo)
and write, per rank, the push record, the prototypes and checks computed on that rank. Used by test_protopnet.py.

    python tests/ddp_protopnet_script.py DEVICES OUT_DIR

Files written to OUT_DIR: ``rank<r>.json`` (push record, per-rank checks), ``rank<r>.pt`` (prototypes and
last layer after the push and at the end), and ``pre_push.pt`` (rank 0's full state dict just before the push,
so that the test can repeat the push in a single process on exactly the same model).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from lightning_xai.namespace import pl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning_helpers import BlobData

from lightning_xai.models.protopnet import ProtoPNet, l2_distances


class Recorder(pl.Callback):
    """Saves the state before the push (callbacks' on_train_epoch_end runs before the module's) and after it."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.after_push: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, module: ProtoPNet) -> None:
        if trainer.current_epoch in module.push_epochs and trainer.is_global_zero:
            torch.save({k: v.clone() for k, v in module.state_dict().items()}, os.path.join(self.out, "pre_push.pt"))

    def on_train_epoch_start(self, trainer: pl.Trainer, module: ProtoPNet) -> None:
        if trainer.current_epoch - 1 in module.push_epochs:
            self.after_push = {"prototypes": module.prototypes.detach().clone()}


def main() -> None:
    devices, out = int(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = BlobData(n_train=40, n_val=16, size=16, batch_size=8)
    model = ProtoPNet(
        "small_cnn",
        num_classes=3,
        prototypes_per_class=2,
        prototype_dim=8,
        warm_epochs=1,
        joint_epochs=1,
        last_layer_epochs=1,
        push_batch_size=7,
        explain_samples=0,
        lr=0.01,
    )
    recorder = Recorder(out)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=model.schedule_length,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=data)

    # On this rank: every prototype equals the latent vector of its recorded source patch, exactly.
    images = torch.stack([data.train_set[int(i)][0] for i in model.push_index])
    labels = [int(data.train_set[int(i)][1]) for i in model.push_index]
    pushed = recorder.after_push["prototypes"]
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.latent(image[None]) for image in images])  # each source image on its own
        rows, cols = model.push_position[:, 0], model.push_position[:, 1]
        patches = z[torch.arange(len(z)), :, rows, cols]  # [P, D]
        distances = l2_distances(z, pushed)[torch.arange(len(z)), torch.arange(len(z))]
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "push_index": model.push_index.tolist(),
        "push_position": model.push_position.tolist(),
        "push_box": model.push_box.tolist(),
        "push_count": int(model.push_count),
        "source_labels": labels,
        "prototype_classes": model.prototype_classes.tolist(),
        "pushed_equals_patch_exactly": bool(torch.equal(pushed.flatten(1), patches)),
        "max_patch_difference": float((pushed.flatten(1) - patches).abs().max()),
        "min_distance_at_source": [float(v) for v in distances.amin(dim=(1, 2))],
        "prototypes_unchanged_by_last_layer_stage": bool(torch.equal(pushed, model.prototypes.detach())),
    }
    torch.save(
        {
            "pushed": pushed,
            "final_prototypes": model.prototypes.detach().clone(),
            "final_last_layer": model.last_layer.weight.detach().clone(),
            "final_features": [p.detach().clone() for p in model.features.parameters()],
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
