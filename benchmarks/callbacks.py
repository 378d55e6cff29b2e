"""What each callback costs a training run, in training steps of the user's model.

    python benchmarks/callbacks.py                 # resnet18, 64 px, batch 32, one thread (~10 minutes)
    python benchmarks/callbacks.py --quick         # smaller and fewer repetitions (a smoke run)
    python benchmarks/callbacks.py --scaling       # also: how the cost grows with probe size and image size

One training step (forward + backward + SGD step on a batch of 32) is the unit, because it is what a user pays
for anyway: a callback costing 6 steps per invocation, run once per epoch, adds 6 / 1563 = 0.4 % to a CIFAR-10
epoch (50 000 images / 32). Each callback is measured at its defaults, in one process, with its invocation and a
training step interleaved ``--repeats`` times (CPU time of this process, so other processes on the machine
matter less); the table gives the median ratio with its min-max spread, the peak extra resident memory of one
invocation (sampled), and the share of a CIFAR-10-sized (1563 steps) and an ImageNet-sized (40 037 steps) epoch.
Callbacks that run once at the end of fit by default (``every_n_epochs=None``) are marked "once": their cost is
paid once per run, not per epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import PeakMemory, cpu_seconds, spread
from lightning_xai.callbacks import (
    ClassPrototypes,
    DissectionScores,
    EmbeddingProjector,
    ExplanationMonitor,
    ExplanationQuality,
    RelevantUnits,
    SanityCheck,
    TCAVScores,
)
from lightning_xai.data import GroundTruthDataModule
from lightning_xai.data.concepts import ConceptScenes
from lightning_xai.namespace import pl

CIFAR10_STEPS = 50_000 // 32 + 1
IMAGENET_STEPS = 1_281_167 // 32 + 1


class UserModel(pl.LightningModule):
    """A user's plain classifier: torchvision resnet18 as ``self.net``."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def factories(concepts: ConceptScenes) -> dict[str, Callable[..., Any]]:
    """Every callback at its defaults (plus the arguments it cannot do without)."""
    return {
        "ExplanationMonitor": lambda **kw: ExplanationMonitor(**kw),
        "ExplanationQuality": lambda **kw: ExplanationQuality(**kw),
        "SanityCheck": lambda **kw: SanityCheck(**kw),
        "DissectionScores (layer4)": lambda **kw: DissectionScores("net.layer4", probe_dataset=concepts, **kw),
        "TCAVScores (layer4, 2 concepts)": lambda **kw: TCAVScores(
            "net.layer4", ["shape:circle", "colour:red"], concept_data=concepts, **kw
        ),
        "RelevantUnits (layer4)": lambda **kw: RelevantUnits("net.layer4", **kw),
        "ClassPrototypes": lambda **kw: ClassPrototypes(**kw),
        "EmbeddingProjector (avgpool)": lambda **kw: EmbeddingProjector("net.avgpool", **kw),
    }


def prepared_trainer(model: UserModel, data: Any, root: str) -> Any:
    """A Trainer that has run one training step with ``data``, so callbacks find loaders and state as they would
    at an epoch end."""
    trainer = pl.Trainer(
        max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def measure(make: Callable[..., Any], model: UserModel, trainer: Any, batch: Any, repeats: int,
            **kwargs: Any) -> dict[str, Any]:
    callback = make(**kwargs)
    callback.setup(trainer, model, "fit")
    callback._check_configuration(trainer, model)  # the one-off setup dry pass, not timed
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        optimizer.step()

    def invoke() -> None:
        if not callback.run(trainer, model, in_loop=False):
            raise RuntimeError(f"{callback.name} failed: {callback.errors[-1]}")

    step()  # warm-up of both
    invoke()
    ratios, memory = [], 0.0
    for _ in range(repeats):
        t_step = cpu_seconds(step)
        with PeakMemory() as peak:
            t_call = cpu_seconds(invoke)
        memory = max(memory, peak.extra_mb)
        ratios.append(t_call / t_step)
    return {"ratio": spread(ratios), "memory_mb": memory, "once": callback.every_n_epochs is None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="32 px, one repetition")
    parser.add_argument("--scaling", action="store_true", help="also fit the growth with probe and image size")
    parser.add_argument("--only", default="", help="comma-separated callback names (prefixes) to measure")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.repeats = 32, 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)

    data = GroundTruthDataModule(num_classes=6, image_size=args.image_size, n_train=64, n_val=64, n_test=8,
                                 batch_size=32)
    concepts = ConceptScenes(size=400, image_size=args.image_size, seed=3)
    model = UserModel(num_classes=6)
    with tempfile.TemporaryDirectory() as root:
        trainer = prepared_trainer(model, data, root)
        batch = next(iter(data.train_dataloader()))
        rows = []
        for name, make in factories(concepts).items():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            result = measure(make, model, trainer, batch, args.repeats)
            rows.append((name, result))
            print(f"measured {name}: {result['ratio']} steps", file=sys.stderr, flush=True)

        print(f"\nCost of one invocation at defaults, in training steps of resnet18 ({args.image_size} px, batch 32, "
              f"{args.threads} thread(s)); median [min-max] over {args.repeats} interleaved repetitions\n")
        print("| callback (defaults) | steps per invocation | peak extra memory | CIFAR-10 epoch | ImageNet epoch |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, r in rows:
            cifar = 100 * r["ratio"].median / CIFAR10_STEPS
            imagenet = 100 * r["ratio"].median / IMAGENET_STEPS
            when = " (once, at fit end)" if r["once"] else ""
            print(f"| {name}{when} | {r['ratio']} | {r['memory_mb']:.0f} MB | {cifar:.2f} % | {imagenet:.3f} % |")

        if args.scaling:
            print("\nGrowth with the probe size (steps per invocation; slope = steps per extra probe sample):\n")
            for name in ("ExplanationMonitor", "ExplanationQuality"):
                make = factories(concepts)[name]
                sizes = [4, 8, 16]
                costs = [measure(make, model, trainer, batch, 1, num_samples=n)["ratio"].median for n in sizes]
                slope = (costs[-1] - costs[0]) / (sizes[-1] - sizes[0])
                print(f"  {name}: " + ", ".join(f"{n}: {c:.2f}" for n, c in zip(sizes, costs))
                      + f"  -> {slope:.3f} steps per sample")


if __name__ == "__main__":
    main()
