"""What each callback costs a training run, in training steps of the user's model.

    python benchmarks/callbacks.py                 # resnet18, 64 px, batch 32, one thread (~10 minutes)
    python benchmarks/callbacks.py --quick         # smaller and fewer repetitions (a smoke run)
    python benchmarks/callbacks.py --scaling       # also: how the cost grows with probe size and image size
    python benchmarks/callbacks.py --text          # the callbacks that apply to a text transformer (~1 minute)

One training step (forward + backward + SGD step on a batch of 32) is the unit, because it is what a user pays
for anyway: a callback costing 6 steps per invocation, run once per epoch, adds 6 / 1563 = 0.4 % to a CIFAR-10
epoch (50 000 images / 32). Each callback is measured at its defaults, in one process, with its invocation and a
training step interleaved ``--repeats`` times (CPU time of this process, so other processes on the machine
matter less); the table gives the median ratio with its min-max spread, the peak extra resident memory of one
invocation (sampled), and the share of a CIFAR-10-sized (1563 steps) and an ImageNet-sized (40 037 steps) epoch.
Callbacks that run once at the end of fit by default (``every_n_epochs=None``) are marked "once": their cost is
paid once per run, not per epoch.

``--text`` measures the same way the callbacks that apply to a text classifier:
:class:`~lightning_xai.models.transformers.TextClassifier` (64 tokens, vocabulary 1000, width 64, 4 blocks of 4
heads, MLP 256; its own AdamW step) on :class:`~lightning_xai.data.tokens.PlantedTokensDataModule` (variable
lengths 16-64, right-padded; batch 32), with ExplanationMonitor and ExplanationQuality on token methods (token
saliency and attention rollout; the quality metrics at their defaults, removed tokens set to the mask id) and the
EmbeddingProjector on the last block (padding left out). The unit is one training step of that model; the epoch
shares are of an SST-2-sized (67 349 sentences / 32 = 2105 steps) and an AG-News-sized (120 000 / 32 = 3750 steps)
epoch. Left out, because they refuse text models at setup: SanityCheck (the randomisation test does not score
token maps yet), ClassPrototypes, DissectionScores, TCAVScores and RelevantUnits (they work in image space: images,
image concepts, receptive fields).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

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
from lightning_xai.data.tokens import MASK_TOKEN, PlantedTokensDataModule
from lightning_xai.models.transformers import TextClassifier
from lightning_xai.namespace import pl

CIFAR10_STEPS = 50_000 // 32 + 1
IMAGENET_STEPS = 1_281_167 // 32 + 1
SST2_STEPS = 67_349 // 32 + 1
AG_NEWS_STEPS = 120_000 // 32
TOKEN_METHODS = [{"name": "token_saliency", "embedding": "backbone.embedding"}, "attention_rollout"]


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


@dataclass
class Epoch:
    """A column of the table: the share of an epoch of ``steps`` training steps, printed with ``digits``."""

    header: str
    steps: int
    digits: int


@dataclass
class Setup:
    """What one mode measures: the user's model, its data, the callbacks that apply to it and how the table is
    titled."""

    model: Any
    data: Any
    factories: dict[str, Callable[..., Any]]
    unit: str  # the training step the costs are counted in, for the title
    epochs: tuple[Epoch, ...]
    optimizer: Callable[[Any], torch.optim.Optimizer]  # the user's optimiser over the model


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


def text_factories(vocabulary: list[str]) -> dict[str, Callable[..., Any]]:
    """The callbacks that apply to a text classifier, at their defaults where those take token ids, else on token
    methods."""
    return {
        "ExplanationMonitor (token_saliency, attention_rollout)": lambda **kw: ExplanationMonitor(
            TOKEN_METHODS, vocabulary=vocabulary, **kw
        ),
        "ExplanationQuality (token_saliency, attention_rollout)": lambda **kw: ExplanationQuality(
            TOKEN_METHODS, mask_token=MASK_TOKEN, **kw
        ),
        "EmbeddingProjector (backbone.blocks.3)": lambda **kw: EmbeddingProjector("backbone.blocks.3", **kw),
    }


def image_setup(args: argparse.Namespace) -> Setup:
    """resnet18 on the ground-truth shapes, every callback."""
    data = GroundTruthDataModule(num_classes=6, image_size=args.image_size, n_train=64, n_val=64, n_test=8,
                                 batch_size=32)
    concepts = ConceptScenes(size=400, image_size=args.image_size, seed=3)
    model = UserModel(num_classes=6)
    return Setup(
        model, data, factories(concepts), f"resnet18 ({args.image_size} px, batch 32",
        (Epoch("CIFAR-10 epoch", CIFAR10_STEPS, 2), Epoch("ImageNet epoch", IMAGENET_STEPS, 3)),
        lambda m: torch.optim.SGD(m.parameters(), lr=1e-4),
    )


def text_setup(args: argparse.Namespace) -> Setup:
    """A 4-block text transformer on planted-key sequences (right-padded), the callbacks that take token ids."""
    data = PlantedTokensDataModule(seq_len=args.seq_len, vocab_size=1000, min_length=args.seq_len // 4, n_train=64,
                                   n_val=64, n_test=8, batch_size=32)
    model = TextClassifier(vocab_size=data.vocab_size, num_classes=data.num_classes, max_len=data.seq_len, dim=64,
                           depth=4, heads=4, mlp_dim=256)
    return Setup(
        model, data, text_factories(data.token_names),
        f"TextClassifier ({args.seq_len} tokens, vocabulary 1000, width 64, 4 blocks, batch 32",
        (Epoch(f"SST-2-sized epoch ({SST2_STEPS} steps)", SST2_STEPS, 2),
         Epoch(f"AG-News-sized epoch ({AG_NEWS_STEPS} steps)", AG_NEWS_STEPS, 2)),
        lambda m: m.build_optimizer(m.optimizer_parameters()),
    )


def prepared_trainer(model: Any, data: Any, root: str) -> Any:
    """A Trainer that has run one training step with ``data``, so callbacks find loaders and state as they would
    at an epoch end."""
    trainer = pl.Trainer(
        max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def measure(make: Callable[..., Any], setup: Setup, trainer: Any, batch: Any, repeats: int,
            **kwargs: Any) -> dict[str, Any]:
    """One callback's invocation and one training step, interleaved ``repeats`` times (after a warm-up of both)."""
    model = setup.model
    callback = make(**kwargs)
    callback.setup(trainer, model, "fit")
    callback._check_configuration(trainer, model)  # the one-off setup dry pass, not timed
    optimizer = setup.optimizer(model)

    def step() -> None:
        optimizer.zero_grad()
        with mock.patch.object(model, "log", lambda *args, **kwargs: None):  # refused outside the fit loop, where
            loss = model.training_step(batch, 0)  # it is a dictionary write (negligible next to the step)
        loss.backward()
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


def print_table(setup: Setup, rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\nCost of one invocation at defaults, in training steps of {setup.unit}, "
          f"{args.threads} thread(s)); median [min-max] over {args.repeats} interleaved repetitions\n")
    print("| callback (defaults) | steps per invocation | peak extra memory | "
          + " | ".join(e.header for e in setup.epochs) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(setup.epochs))
    for name, r in rows:
        shares = " | ".join(f"{100 * r['ratio'].median / e.steps:.{e.digits}f} %" for e in setup.epochs)
        when = " (once, at fit end)" if r["once"] else ""
        print(f"| {name}{when} | {r['ratio']} | {r['memory_mb']:.0f} MB | {shares} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--text", action="store_true", help="a text transformer and the callbacks that take tokens")
    parser.add_argument("--seq-len", type=int, default=64, help="--text: tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="32 px (--text: 32 tokens), one repetition")
    parser.add_argument("--scaling", action="store_true", help="also fit the growth with probe and image size")
    parser.add_argument("--only", default="", help="comma-separated callback names (prefixes) to measure")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.seq_len, args.repeats = 32, 32, 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)

    setup = text_setup(args) if args.text else image_setup(args)
    with tempfile.TemporaryDirectory() as root:
        trainer = prepared_trainer(setup.model, setup.data, root)
        batch = next(iter(setup.data.train_dataloader()))
        rows = []
        for name, make in setup.factories.items():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            result = measure(make, setup, trainer, batch, args.repeats)
            rows.append((name, result))
            print(f"measured {name}: {result['ratio']} steps", file=sys.stderr, flush=True)
        print_table(setup, rows, args)

        if args.scaling:
            print("\nGrowth with the probe size (steps per invocation; slope = steps per extra probe sample):\n")
            for name in [n for n in setup.factories if n.startswith(("ExplanationMonitor", "ExplanationQuality"))]:
                make = setup.factories[name]
                sizes = [4, 8, 16]
                costs = [measure(make, setup, trainer, batch, 1, num_samples=n)["ratio"].median for n in sizes]
                slope = (costs[-1] - costs[0]) / (sizes[-1] - sizes[0])
                print(f"  {name}: " + ", ".join(f"{n}: {c:.2f}" for n, c in zip(sizes, costs))
                      + f"  -> {slope:.3f} steps per sample")


if __name__ == "__main__":
    main()
