"""Human-aligned representations in three steps: adversarial training, PatternNet/PatternAttribution, and
interpretable CNN filters, on the 6-class ground-truth flowers (class = colour of the centre disc).

    python examples/robust_saliency.py                    # a few minutes on a laptop CPU
    python examples/robust_saliency.py --epochs 10 --out runs/robust_example

1. Trains a standard and an adversarially trained SmallCNN (``AdversarialClassifier``: L_inf PGD, Madry et al.
   2018) and compares their plain input-gradient saliency maps against the disc masks (robust models have more
   human-aligned gradients, Tsipras et al. 2019).
2. Learns the signal patterns of the robust model from its training data (``fit_patterns``, Kindermans et al.
   2018) and explains it with PatternNet (the signal) and PatternAttribution (the relevance).
3. Trains an ``InterpretableFilterClassifier`` (Zhang, Wu & Zhu 2018) and measures how consistently its last
   conv layer's filters fire relative to the disc centre (location instability), against the standard model.

Writes ``explanations.png`` (rows: test images, labelled with the true class and the robust model's prediction;
columns: input, saliency of the standard model, saliency of the robust model, PatternNet, PatternAttribution;
one colour bar per colour scheme) to ``--out`` and prints the scores. The full, reproducible
comparison is ``benchmarks/robust_saliency.py`` / ``benchmarks/interpretable_filters.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_xai.attribution import Saliency
from lightning_xai.attribution.pattern import PatternAttribution, PatternNet, fit_patterns
from lightning_xai.data import GroundTruthDataModule
from lightning_xai.evaluation import mask_iou, relevance_mass
from lightning_xai.models import ImageClassifier
from lightning_xai.models.adversarial import AdversarialClassifier
from lightning_xai.models.backbones import SmallCNN
from lightning_xai.models.interpretable_filters import (
    InterpretableFilterClassifier,
    filter_peak_positions,
    location_instability,
)
from lightning_xai.namespace import pl
from lightning_xai.viz.grid import render_explanations
from lightning_xai.viz.render import save_png


def fit(model: pl.LightningModule, data: GroundTruthDataModule, epochs: int) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--out", default="runs/robust_saliency_example")
    args = parser.parse_args(argv)
    out = Path(args.out)

    data = GroundTruthDataModule(image_size=32, n_train=args.n_train, n_val=16, n_test=200, batch_size=64)
    test = data.dataset("test")
    images, labels, masks = test.images, test.labels, test.masks

    # 1. standard vs adversarially trained: same backbone, data and seed
    pl.seed_everything(0, verbose=False)
    standard = fit(ImageClassifier(backbone=SmallCNN(width=16), lr=3e-3), data, args.epochs)
    pl.seed_everything(0, verbose=False)
    robust = AdversarialClassifier(backbone=SmallCNN(width=16), eps=8 / 255, steps=5, robust_eval=False, lr=3e-3)
    robust = fit(robust, data, args.epochs)
    maps = {}
    for name, model in (("standard", standard), ("robust", robust)):
        maps[f"saliency ({name})"] = Saliency()(model, images, labels)

    # 2. PatternNet / PatternAttribution of the robust model: one pass over its training data
    patterns = fit_patterns(robust, data.train_dataloader(), estimator="two_component")
    out.mkdir(parents=True, exist_ok=True)
    patterns.save(out / "patterns.pt")  # PatternNet(patterns="<out>/patterns.pt") in a YAML config
    maps["PatternNet (robust)"] = PatternNet(patterns)(robust, images, labels)
    maps["PatternAttribution (robust)"] = PatternAttribution(patterns)(robust, images, labels)

    print(f"{'method':32s} MaskIoU  RelevanceMass   (disc mask; higher = on the evidence)")
    for name, m in maps.items():
        heat = m.abs() if name.startswith("PatternNet") else m  # the signal estimate is signed in colour space
        iou, mass = mask_iou(heat, masks).nanmean(), relevance_mass(heat, masks).nanmean()
        print(f"{name:32s} {float(iou):.3f}    {float(mass):.3f}")
    with torch.no_grad():
        logits = robust(images[:8])
    grid = render_explanations(
        images[:8],
        {k: v[:8] for k, v in maps.items()},
        labels=labels[:8],
        logits=logits,  # the row labels show the robust model's prediction
        row_names=[f"test #{i} (robust)" for i in range(8)],
        title="saliency: standard vs adversarially trained (robust) SmallCNN; patterns of the robust one",
    )
    path = save_png(grid.image, out / "explanations.png", caption="input | " + " | ".join(maps))
    print(f"wrote {path}")

    # 3. interpretable filters in the last conv layer vs the standard model's filters
    pl.seed_everything(0, verbose=False)
    interpretable = InterpretableFilterClassifier(backbone=SmallCNN(width=16), tau=0.5, lr=3e-3)
    interpretable = fit(interpretable, data, args.epochs)
    for name, model in (("standard", standard), ("interpretable", interpretable)):
        positions, peaks = filter_peak_positions(model, "backbone.features", [images])
        instability = location_instability(positions, test.scenes.centers, (32, 32), peaks=peaks, top_k=100)
        print(f"location instability w.r.t. the disc centre ({name} filters): {float(instability.mean()):.4f}")


if __name__ == "__main__":
    main()
