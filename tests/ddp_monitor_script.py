"""Run ExplanationMonitor under `trainer.validate` on 1 or N CPU processes (DDP, gloo) and write, per rank, the
probe indices and a checksum of each method's gathered maps. Used by test_explanation_monitor.py.

    python tests/ddp_monitor_script.py DEVICES OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch

from lightning_xai.namespace import pl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning_helpers import BlobData, TinyClassifier

from lightning_xai.callbacks import ExplanationMonitor, ExplanationQuality, SanityCheck


def main() -> None:
    devices, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = TinyClassifier()
    monitor = ExplanationMonitor(
        ["saliency", {"name": "integrated_gradients", "steps": 8}, {"name": "gradcam", "layer": "features"}],
        num_samples=7,  # not divisible by 2: exercises the padding of the last shard
        target="label",
        png_dir=os.path.join(out, "png"),
        on_error="raise",
    )
    quality = ExplanationQuality(
        ["saliency", {"name": "gradcam", "layer": "features"}],
        metrics=["deletion_auc", "mask_iou", "relevance_mass"],
        metric_kwargs={"deletion_auc": {"steps": 8}},
        num_samples=7,
        on_error="raise",
    )
    sanity = SanityCheck(["saliency"], num_samples=5, every_n_epochs=1, on_error="raise")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, quality, sanity],
    )
    trainer.validate(model, datamodule=BlobData(), verbose=False)
    maps = monitor._previous_maps
    result = {
        "rank": trainer.global_rank,
        "probe_indices": monitor.probe.indices,
        "checksums": {
            k: float((v.abs() * torch.arange(1, v.shape[0] + 1).view(-1, 1, 1, 1)).sum()) for k, v in maps.items()
        },
        "shapes": {k: list(v.shape) for k, v in maps.items()},
        "quality": quality.history[-1][1],
        "sanity_curve": sanity.results["saliency"]["curve"],
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
