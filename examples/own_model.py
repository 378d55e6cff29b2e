"""Attach lightning_xai to a LightningModule you already have - without changing a line of it.

    python examples/own_model.py                 # ~1-2 minutes on 2 CPU cores
    python examples/own_model.py --epochs 1 --out runs/own_model

The model below is what a user writes anyway: ``import lightning.pytorch``, a torchvision ``resnet18`` held as
``self.net``, batches that are dicts (``{"image", "label", "mask"}``), nothing that knows about explanations. The
callbacks attach to the Trainer:

* ``ExplanationMonitor`` - Saliency, Integrated Gradients and Grad-CAM on ``net.layer2`` for 6 fixed validation
  images, as labelled heatmap grids, every epoch;
* ``ExplanationQuality`` - deletion AUC and mask IoU / relevance mass against the ground-truth masks the data has;
* ``SanityCheck`` - the model-randomisation test of Adebayo et al. at the end of fit;
* ``DissectionScores`` - network dissection of ``net.layer2`` on a separate, generated concept probe set.

Everything is logged to three loggers at once (W&B offline, TensorBoard, CSV), so you can compare what each shows.
The data is generated (ground-truth flowers: the class is the colour of the centre disc, whose pixel mask is
known), so the quality numbers mean something: a good explanation puts its mass on the disc.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_xai.callbacks import DissectionScores, ExplanationMonitor, ExplanationQuality, SanityCheck
from lightning_xai.data import GroundTruthShapes
from lightning_xai.data.concepts import ConceptScenes


# ---------------------------------------------------------------------------------------------- the user's code
class DictDataset(Dataset):
    """The user's data: dict items."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label, mask = self.base[index]
        return {"image": image, "label": label, "mask": mask}


class MyClassifier(pl.LightningModule):
    """The user's model: a torchvision resnet18 as ``self.net``, dict batches, plain Lightning."""

    def __init__(self, num_classes: int = 6, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torchvision.models.resnet18(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        self.log("val_loss", nn.functional.cross_entropy(logits, batch["label"]))
        self.log("val_acc", (logits.argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# ----------------------------------------------------------------------------------------- the lightning_xai part
def callbacks(class_names: list[str], concepts: Dataset) -> list[pl.Callback]:
    # At 32 px resnet18's layer4 is a 1x1 map (nothing to localise) and layer3 2x2: Grad-CAM and dissection look
    # at layer2 (4x4). On 224 px images you would name "net.layer4" (or leave the layer out: the default).
    gradcam = {"name": "gradcam", "layer": "net.layer2"}
    return [
        ExplanationMonitor(
            ["saliency", {"name": "integrated_gradients", "steps": 16}, gradcam],
            num_samples=6,
            target="label",
            class_names=class_names,
        ),
        ExplanationQuality(["saliency", gradcam], metrics=["deletion_auc", "mask_iou", "relevance_mass"],
                           num_samples=16),
        SanityCheck(["saliency", gradcam], num_samples=4),
        DissectionScores("net.layer2", probe_dataset=concepts, num_samples=64, every_n_epochs=None),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", default="runs/own_model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    pl.seed_everything(args.seed)
    train = GroundTruthShapes(num_classes=6, size=args.n_train, image_size=args.image_size, seed=args.seed)
    val = GroundTruthShapes(num_classes=6, size=96, image_size=args.image_size, seed=args.seed + 1)
    concepts = ConceptScenes(size=64, image_size=args.image_size, seed=args.seed + 2)
    loaders = (
        DataLoader(DictDataset(train), batch_size=32, shuffle=True),
        DataLoader(DictDataset(val), batch_size=32),
    )
    wandb_logger = WandbLogger(project="lightning-xai-own-model", save_dir=args.out, offline=True)
    loggers = [wandb_logger, TensorBoardLogger(args.out, name="tb"), CSVLogger(args.out, name="csv")]
    attached = callbacks(train.class_names, concepts)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=attached,
        default_root_dir=args.out,
        log_every_n_steps=5,
        enable_model_summary=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    model = MyClassifier(num_classes=6)
    trainer.fit(model, *loaders)
    wandb_dir = os.path.dirname(wandb_logger.experiment.dir)
    import wandb

    wandb.finish()

    _monitor, _quality, sanity, dissection = attached
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("\n=== your own model, explained ===")
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.0f} s; val accuracy {metrics.get('val_acc', 0):.3f}")
    print("explanation quality (mask IoU / relevance mass: share of the map on the disc that decides the class; "
          "deletion AUC: lower = the map finds what the model needs):")
    for key, value in sorted(metrics.items()):
        if key.startswith("xai/") and key.count("/") == 2 and not key.endswith("seconds"):
            print(f"  {key:40s} {value:.3f}")
    for method, result in sanity.results.items():
        verdict = "passes" if result["passes"] else "FAILS"
        print(f"  sanity check {method:10s} {verdict} (similarity after randomising the top layer: "
              f"{result['curve'][1]:.2f})")
    if dissection.history:
        print(f"  network dissection of net.layer2: {dissection.history[-1].get('detectors', 0)} concept detectors "
              "(units whose top activations overlap one concept's pixels, IoU > 0.04)")
    print(f"W&B offline run: {wandb_dir}\nTensorBoard: tensorboard --logdir {args.out}/tb\nCSV: {args.out}/csv")
    return {"trainer": trainer, "callbacks": attached, "wandb_dir": wandb_dir, "out": args.out, "metrics": metrics}


if __name__ == "__main__":
    main()
