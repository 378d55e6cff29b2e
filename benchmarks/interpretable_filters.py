"""Interpretable CNN filters (Zhang, Wu & Zhu, CVPR 2018) against the same network trained without the loss.

    python benchmarks/interpretable_filters.py            # 2000 training images, 32x32, CPU
    python benchmarks/interpretable_filters.py --quick    # a few minutes
    python benchmarks/interpretable_filters.py --tau 0.5 --weight 0.1 --out runs/interpretable_filters

Trains three :class:`~lightning_xai.models.backbones.SmallCNN` classifiers on the 6-class ground-truth flowers
(same data, seed, epochs): ``plain`` (:class:`~lightning_xai.models.ImageClassifier`), ``mask only``
(:class:`~lightning_xai.models.interpretable_filters.InterpretableFilterClassifier` with ``filter_loss_weight=0``:
the paper's mask in the forward pass, no filter loss) and ``interpretable`` (mask + filter loss). The filters of
the last conv layer (``backbone.features.0``, read after its BN + ReLU + mask, i.e. the output of
``backbone.features``) are evaluated on the test split:

* **Dissection** (:class:`~lightning_xai.interpretation.dissection.NetworkDissection`, Bau et al., CVPR 2017)
  against the flowers' part masks (``part:disc``, ``part:stem``, ``part:petals``, ``part:background``): number
  of detector filters (best IoU > 0.04), mean best IoU, filters whose best concept is the disc and their mean
  disc IoU.
* **Location instability** (the paper's measure): per filter, the standard deviation over images of the
  distance between the filter's peak (centre of its arg-max cell, in pixels) and the disc centre, divided by the
  image diagonal; each filter on its top half of images by peak activation. Reported as the mean over all
  filters and over the more stable half (the paper averages the best filters). Lower = more consistent parts.
* **Filter mutual information** ``MI(X; T)`` of the masked maps (mean over filters and test batches, with the
  benchmark's ``tau``): what the loss maximises.

Writes ``interpretable_filters.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_xai.attribution.layers import capture_layer
from lightning_xai.data import GroundTruthDataModule
from lightning_xai.data.groundtruth import DISC_ID, STEM_ID
from lightning_xai.interpretation.dissection import NetworkDissection
from lightning_xai.models import ImageClassifier
from lightning_xai.models.backbones import SmallCNN
from lightning_xai.models.interpretable_filters import (
    InterpretableFilterClassifier,
    filter_mutual_information,
    filter_peak_positions,
    location_instability,
    mask_feature_map,
)
from lightning_xai.namespace import pl

NUM_CLASSES = 6
LAYER = "backbone.features"
CONCEPTS = ["part:disc", "part:stem", "part:petals", "part:background"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer epochs")
    parser.add_argument("--out", default="runs/interpretable_filters")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=None, help="default 2000, quick 800")
    parser.add_argument("--n-test", type=int, default=None, help="default 300, quick 200")
    parser.add_argument("--epochs", type=int, default=None, help="default 12, quick 6")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--weight", type=float, default=0.1, help="filter_loss_weight of the interpretable model")
    parser.add_argument(
        "--tau",
        type=float,
        default=0.5,
        help="template scale tau of the loss (the paper's 0.5/n^2 is too small behind a BatchNorm)",
    )
    parser.add_argument("--beta", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for name, (quick, full) in {"n_train": (800, 2000), "n_test": (200, 300), "epochs": (6, 12)}.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def part_masks(part_map: torch.Tensor) -> torch.Tensor:
    """``[N, 4, H, W]`` bool masks of :data:`CONCEPTS` from the dataset's part ids."""
    petals = (part_map > STEM_ID) & (part_map < DISC_ID)
    return torch.stack([part_map == DISC_ID, part_map == STEM_ID, petals, part_map == 0], dim=1)


def train(model: pl.LightningModule, data: GroundTruthDataModule, epochs: int, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    model.eval()
    return time.perf_counter() - start


def evaluate(model: torch.nn.Module, test, args: argparse.Namespace) -> dict[str, float]:
    images, labels = test.images, test.labels
    chunks = [slice(s, min(s + 100, len(labels))) for s in range(0, len(labels), 100)]
    masks = part_masks(test.part_map)
    with torch.no_grad():
        accuracy = sum(int((model(images[c]).argmax(1) == labels[c]).sum()) for c in chunks) / len(labels)
    result = NetworkDissection(LAYER)(model, [(images[c], masks[c]) for c in chunks], CONCEPTS)
    concept, best_iou = result.best()
    disc_units = concept == 0
    positions, peaks = filter_peak_positions(model, LAYER, [images[c] for c in chunks])
    instability = location_instability(
        positions, test.scenes.centers, (args.image_size, args.image_size), peaks=peaks, top_k=len(labels) // 2
    )
    stable_half = instability.sort().values[: max(1, len(instability) // 2)]
    # MI of the (masked) maps, as the loss sees them; the plain model's maps are masked here for comparability
    mi = []
    with torch.no_grad(), capture_layer(model, LAYER) as capture:
        for c in chunks:
            capture.clear()
            model(images[c])
            maps = capture.activation
            if not isinstance(model, InterpretableFilterClassifier):
                maps = mask_feature_map(maps, args.beta)
            mi.append(float(filter_mutual_information(maps, args.beta, tau=args.tau).mean()))
    return {
        "accuracy": accuracy,
        "detectors": result.num_detectors,
        "units": result.num_units,
        "mean_best_iou": float(best_iou.mean()),
        "disc_units": int(disc_units.sum()),
        "disc_iou": float(best_iou[disc_units].mean()) if bool(disc_units.any()) else float("nan"),
        "instability": float(instability.mean()),
        "instability_best_half": float(stable_half.mean()),
        "mutual_information": sum(mi) / len(mi),
        "dead_filters": int((peaks.amax(dim=0) <= 0).sum()),
    }


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = GroundTruthDataModule(
        num_classes=NUM_CLASSES,
        image_size=args.image_size,
        n_train=args.n_train,
        n_val=16,
        n_test=args.n_test,
        batch_size=64,
        seed=args.seed,
    )
    test = data.dataset("test")
    kw = dict(num_classes=NUM_CLASSES, lr=args.lr)
    common = dict(filter_layer="backbone.features.0", beta=args.beta, tau=args.tau)
    builders = {
        "plain": lambda: ImageClassifier(backbone=SmallCNN(3, NUM_CLASSES, args.width), **kw),
        "mask only": lambda: InterpretableFilterClassifier(
            backbone=SmallCNN(3, NUM_CLASSES, args.width), filter_loss_weight=0.0, **common, **kw
        ),
        "interpretable": lambda: InterpretableFilterClassifier(
            backbone=SmallCNN(3, NUM_CLASSES, args.width), filter_loss_weight=args.weight, **common, **kw
        ),
    }
    rows, seconds = {}, {}
    for name, build in builders.items():
        pl.seed_everything(args.seed, verbose=False)
        model = build()
        seconds[name] = train(model, data, args.epochs, args.seed)
        rows[name] = evaluate(model, test, args)
        print(f"{name}: trained in {seconds[name]:.0f} s; {rows[name]}", flush=True)

    lines = [
        "# Interpretable filters vs plain filters (last conv layer of SmallCNN) on the ground-truth flowers",
        "",
        f"Setup: {args.n_train} training / {args.n_test} test images at {args.image_size}x{args.image_size}, "
        f"SmallCNN(width={args.width}), {args.epochs} epochs, Adam lr={args.lr}, seed {args.seed}; filter loss "
        f"weight {args.weight}, beta {args.beta}, tau {args.tau}. Training time: "
        + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
        + ".",
        "",
        "| model | test acc | filter MI (nats) | detectors (IoU > 0.04) | mean best IoU | disc filters | their disc "
        "IoU | location instability (all) | (stable half) | dead filters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['mutual_information']:.3f} | {r['detectors']}/{r['units']} | "
            f"{r['mean_best_iou']:.3f} | {r['disc_units']} | {r['disc_iou']:.3f} | {r['instability']:.4f} | "
            f"{r['instability_best_half']:.4f} | {r['dead_filters']} |"
        )
    lines += [
        "",
        "Location instability: std over a filter's top-half images of ||peak - disc centre|| / image diagonal "
        "(lower = more stable). The plain model's MI is computed on its maps after applying the same mask.",
    ]
    report = "\n".join(lines)
    (out / "interpretable_filters.md").write_text(report + "\n")
    print(report)
    return report


if __name__ == "__main__":
    main()
