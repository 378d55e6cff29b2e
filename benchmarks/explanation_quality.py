"""Ground-truth benchmark of explanation methods, in the form of Table 1 of Oramas, Wang & Tuytelaars, "Visual
Explanation by Interpretation: Improving Visual Feedback Capabilities of Deep Neural Networks", ICLR 2019.

    python benchmarks/explanation_quality.py                  # 6 and 12 classes, 3 seeds, every method (CPU)
    python benchmarks/explanation_quality.py --quick          # 1 seed, fewer images, methods and epochs
    python benchmarks/explanation_quality.py --write-readme   # also replace the README section between
                                                              # <!-- explanation-quality:start/end -->

**Protocol.** For each dataset (:class:`~lightning_xai.data.GroundTruthDataModule` with 6 classes - the colour
of the flower's disc decides the class - or 12 classes - disc and stem colours together) and each seed, the
seed fixes the training data and the training run (``pl.seed_everything``): an
:class:`~lightning_xai.models.ImageClassifier` with the ``small_cnn`` backbone is trained on the CPU (Adam,
cosine schedule, no logger). Every trained model is then explained on the **same fixed evaluation images** (a
:class:`~lightning_xai.data.GroundTruthShapes` set generated from :data:`EVAL_SEED`, independent of the training
seeds), for the ground-truth class of each image, by every attributor (the plain ``backbone`` is explained; the
CAM methods use its last conv block ``features``). Each map is scored with the metrics of
:mod:`lightning_xai.evaluation`, all of them on the signed map summed over channels:

* **IoU** (:class:`~lightning_xai.evaluation.MaskIoU`, the measure of Oramas et al.): the top-``k`` pixels of the
  map, ``k`` = the mask's own area, against the mask of the discriminative part(s); higher is better.
* **pointing** (:class:`~lightning_xai.evaluation.PointingGame`, Zhang et al., ECCV 2016): the maximum lies in
  the mask (all tied maxima must); higher is better.
* **mass** (:class:`~lightning_xai.evaluation.RelevanceMass`, Arras et al., Information Fusion 2022): share of the
  positive relevance inside the mask; higher is better. Maps without positive relevance are excluded (counted).
* **deletion** / **insertion** (:class:`~lightning_xai.evaluation.DeletionAUC` / ``InsertionAUC``, Petsiuk et
  al., BMVC 2018): area under the softmax probability of the class as pixels are set to 0 (deletion, lower is
  better) or restored into the blurred image (insertion, higher is better), most relevant first.
* **rand. sim.** (:class:`~lightning_xai.evaluation.ModelRandomization`, Adebayo et al., NeurIPS 2018): cascading
  re-initialisation of the layers from the head down; mean Spearman correlation of absolute values between the
  map and the map of the randomised model over every step, the self-comparison excluded, on the first
  ``--sanity-images`` images. Lower is better (the explanation depends on what the model learned).

Cells are the mean over seeds of the per-seed mean over images, ± the standard deviation over seeds
(sample standard deviation, ``n - 1``; with one seed only the mean is shown). ``ms/img`` is the attribution time
per image (the map only, not the metrics) on this machine. Two model-independent reference rows calibrate the
localisation columns: **mask (oracle)** returns the ground-truth mask itself (IoU, pointing and mass are 1 by
construction - the run checks it) and **random** returns uniform noise (its IoU, pointing and mass are close
to the mask's share of the image); neither depends on the model, so they have no randomisation score. LRP
uses the ``epsilon_plus`` composite (zB rule with the box [0, 1] at the first layer) because the images are
unnormalised in [0, 1]; if they were not, ``epsilon_plus_flat``. Every method explains the class logit except
RISE, which explains the softmax probability as in its paper (its map is the expected score given that a pixel
is kept, so a logit would shift it by an arbitrary constant).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_xai.attribution import build_attributor
from lightning_xai.data import GroundTruthDataModule, GroundTruthShapes
from lightning_xai.evaluation import (
    DeletionAUC,
    InsertionAUC,
    MaskIoU,
    ModelRandomization,
    PointingGame,
    RelevanceMass,
)
from lightning_xai.models import ImageClassifier
from lightning_xai.namespace import pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
START_MARKER = "<!-- explanation-quality:start -->"
END_MARKER = "<!-- explanation-quality:end -->"
#: Seed of the fixed evaluation images (the same for every training seed and method).
EVAL_SEED = 20190506
#: The CAM layer of ``small_cnn`` when the backbone itself is explained.
CAM_LAYER = "features"
#: Table columns: (key, header). Arrows say which direction is better.
COLUMNS = (
    ("iou", "IoU ↑"),
    ("pointing", "pointing ↑"),
    ("mass", "mass ↑"),
    ("deletion", "deletion ↓"),
    ("insertion", "insertion ↑"),
    ("randomization", "rand. sim. ↓"),
    ("ms_per_image", "ms/img"),
)
DATASETS = {6: "6 classes (disc colour)", 12: "12 classes (disc and stem colours)"}

AttributorFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """One table row: a label, what computes the maps, whether ``--quick`` keeps it."""

    label: str
    spec: dict | None  # an attributor spec for build_attributor; None for the reference rows
    quick: bool = False
    reference: str | None = None  # "oracle" or "random" for the model-independent reference rows
    probability: bool = False  # explain the softmax probability of the class instead of its logit


def lrp_spec(images: Tensor) -> dict:
    """LRP epsilon-plus (zB box at the first layer) when the inputs lie in the box [0, 1], else epsilon-plus-flat
    (the flat rule needs no input bounds)."""
    if float(images.min()) >= 0.0 and float(images.max()) <= 1.0:
        return {"name": "lrp", "composite": "epsilon_plus", "low": 0.0, "high": 1.0}
    return {"name": "lrp", "composite": "epsilon_plus_flat"}


def methods(image_size: int, images: Tensor, args: argparse.Namespace) -> list[Method]:
    """Every benchmarked method with its hyper-parameters (multi-evaluation methods run in chunks of
    ``args.batch_size`` model evaluations)."""
    bs = args.batch_size
    window = max(2, round(image_size / 6))  # occlusion: about the disc's diameter, overlapping windows
    stride = window - window // 2
    lrp = lrp_spec(images)
    rows = [
        Method("Saliency", {"name": "saliency"}, quick=True),
        Method("Input x Gradient", {"name": "input_x_gradient"}),
        Method(
            "Integrated Gradients (32 steps)",
            {"name": "integrated_gradients", "steps": 32, "batch_size": bs},
            quick=True,
        ),
        Method("SmoothGrad (16 samples)", {"name": "smoothgrad", "num_samples": 16, "batch_size": bs}),
        Method("Grad-CAM", {"name": "gradcam", "layer": CAM_LAYER}, quick=True),
        Method("Grad-CAM++", {"name": "gradcam_plus_plus", "layer": CAM_LAYER}),
        Method("LayerCAM", {"name": "layercam", "layer": CAM_LAYER}),
        Method("Score-CAM", {"name": "scorecam", "layer": CAM_LAYER, "batch_size": bs}),
        Method("Guided Backprop", {"name": "guided_backprop"}, quick=True),
        Method("Guided Grad-CAM", {"name": "guided_gradcam", "layer": CAM_LAYER}),
        Method(f"LRP ({lrp['composite']})", lrp, quick=True),
        Method(
            f"Occlusion ({window}x{window}, stride {stride})",
            {"name": "occlusion", "window": window, "stride": stride, "batch_size": bs},
            quick=True,
        ),
        Method(
            f"RISE ({args.rise_masks} masks, probability)",
            {"name": "rise", "num_samples": args.rise_masks, "batch_size": bs},
            quick=True,
            probability=True,
        ),
    ]
    if not args.no_surrogates:
        rows += [
            Method(
                f"LIME ({args.surrogate_samples} samples, SLIC)",
                {
                    "name": "lime",
                    "num_samples": args.surrogate_samples,
                    "segmentation": "slic",
                    "n_segments": 30,
                    "batch_size": bs,
                },
            ),
            Method(
                f"KernelSHAP ({args.surrogate_samples} samples, SLIC)",
                {
                    "name": "kernel_shap",
                    "num_samples": args.surrogate_samples,
                    "segmentation": "slic",
                    "n_segments": 30,
                    "batch_size": bs,
                },
            ),
        ]
    rows += [
        Method("*mask (oracle)*", None, quick=True, reference="oracle"),
        Method("*random*", None, quick=True, reference="random"),
    ]
    if args.quick:
        rows = [m for m in rows if m.quick]
    if args.methods:
        wanted = {w.lower() for w in args.methods}
        known = {m.spec["name"] if m.spec else m.reference for m in rows}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"unknown --methods {unknown}; valid here: {sorted(known)}")
        rows = [m for m in rows if (m.spec["name"] if m.spec else m.reference) in wanted]
    return rows


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def train(num_classes: int, seed: int, args: argparse.Namespace) -> tuple[ImageClassifier, float, float]:
    """Train ``small_cnn`` on the ``seed``'s data; returns ``(model, test accuracy, training seconds)``."""
    pl.seed_everything(seed, verbose=False)
    data = GroundTruthDataModule(
        num_classes=num_classes,
        image_size=args.image_size,
        n_train=args.n_train,
        n_val=args.n_test,
        n_test=args.n_test,
        batch_size=args.train_batch_size,
        seed=seed,
    )
    model = ImageClassifier(backbone="small_cnn", num_classes=num_classes, lr=args.lr, scheduler="cosine")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    (result,) = trainer.test(model, data, verbose=False)
    return model, float(result["test_acc"]), seconds


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def reference_maps(kind: str, masks: Tensor, offset: int) -> Tensor:
    """Maps of a model-independent reference row for one chunk of images: the mask itself, or uniform noise
    seeded by each image's index (so the maps do not depend on the chunking)."""
    if kind == "oracle":
        return masks.float().clone()
    out = torch.empty(masks.shape, dtype=torch.float32)
    gen = torch.Generator()
    for i in range(masks.shape[0]):
        gen.manual_seed(EVAL_SEED + offset + i)
        out[i].uniform_(generator=gen)
    return out


@dataclass
class Scores:
    values: dict[str, float] = field(default_factory=dict)
    excluded_mass: int = 0
    error: str | None = None


def evaluate_method(
    method: Method, net: nn.Module, images: Tensor, labels: Tensor, masks: Tensor, seed: int, args: argparse.Namespace
) -> Scores:
    """Explain ``images`` for ``labels`` with ``method`` and score the maps (see the module docstring)."""
    iou, pointing, mass = MaskIoU(), PointingGame(), RelevanceMass()
    deletion = DeletionAUC(steps=args.curve_steps, batch_size=args.batch_size)
    insertion = InsertionAUC(steps=args.curve_steps, batch_size=args.batch_size)
    attributor = None if method.spec is None else build_attributor(method.spec)
    # RISE is defined on the class probability (Petsiuk et al.); on logits its map is shifted by an arbitrary
    # constant, which changes the relevance mass. The metrics always see the plain network.
    explained = nn.Sequential(net, nn.Softmax(dim=1)).eval() if method.probability else net
    seconds = 0.0
    scores = Scores()
    try:
        for start in range(0, images.shape[0], args.eval_batch):
            x = images[start : start + args.eval_batch]
            y = labels[start : start + args.eval_batch]
            m = masks[start : start + args.eval_batch]
            tic = time.perf_counter()
            if attributor is None:
                maps = reference_maps(method.reference, m, start)
            else:
                maps = attributor(explained, x, y)
            seconds += time.perf_counter() - tic
            if maps.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"{method.label} returned maps of shape {list(maps.shape)} for {list(x.shape)}")
            iou.update(maps, m)
            pointing.update(maps, m)
            mass.update(maps, m)
            deletion.update(maps, x, net, y)
            insertion.update(maps, x, net, y)
        scores.values = {
            "iou": float(iou.compute()),
            "pointing": float(pointing.compute()),
            "mass": float(mass.compute()),
            "deletion": float(deletion.compute()),
            "insertion": float(insertion.compute()),
            "ms_per_image": 1000.0 * seconds / images.shape[0],
        }
        scores.excluded_mass = mass.num_excluded
        if attributor is not None and args.sanity_images > 0:
            n = min(args.sanity_images, images.shape[0])
            checker = ModelRandomization(attributor, mode="cascading", similarity="spearman_abs", seed=seed)
            scores.values["randomization"] = checker.check(explained, images[:n], labels[:n]).mean("spearman_abs")
    except Exception as err:  # one failing method must not lose the whole table
        scores.error = f"{type(err).__name__}: {err}"
    return scores


def self_checks(method: Method, scores: Scores) -> list[str]:
    """What the reference rows must score by construction; returns the violations."""
    if method.reference != "oracle" or scores.error:
        return []
    return [
        f"oracle {key} = {scores.values[key]:.6f}, expected 1"
        for key in ("iou", "pointing", "mass")
        if abs(scores.values[key] - 1.0) > 1e-6
    ]


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def cell(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(rows: list[Method], results: dict[str, list[Scores]]) -> str:
    header = ["method", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * len(COLUMNS)) + "|"]
    for method in rows:
        runs = results[method.label]
        failed = [s.error for s in runs if s.error]
        if failed:
            lines.append(f"| {method.label} | failed: {failed[0][:80]} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for key, _ in COLUMNS:
            values = [s.values.get(key, float("nan")) for s in runs]
            cells.append(cell(values, 0 if key == "ms_per_image" else 2))
        lines.append(f"| {method.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_readme_section(text: str, section: str) -> str | None:
    """``text`` with everything between the markers replaced by ``section``; ``None`` without both markers."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        return None
    return text[: start + len(START_MARKER)] + "\n" + section.strip("\n") + "\n" + text[end:]


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, fewer images, methods and epochs (a smoke run)")
    p.add_argument("--write-readme", action="store_true", help="replace the README section between the markers")
    p.add_argument("--classes", type=int, nargs="+", default=[6, 12], choices=sorted(DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; quick: 0)")
    p.add_argument("--methods", nargs="+", default=None, help="registered names to keep (and 'oracle', 'random')")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=None, help="training images (default 2000; quick: 1000)")
    p.add_argument("--n-test", type=int, default=500, help="test-split images for the accuracy")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 15; quick: 5)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam rate (SmallCNN is tuned for 1e-2)")
    p.add_argument("--train-batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=None, help="fixed evaluation images (default 32; quick: 12)")
    p.add_argument("--sanity-images", type=int, default=None, help="randomisation-test images (default 4; quick: 2)")
    p.add_argument("--curve-steps", type=int, default=None, help="deletion/insertion steps (default 16; quick: 8)")
    p.add_argument("--rise-masks", type=int, default=None, help="RISE masks (default 200; quick: 100)")
    p.add_argument("--surrogate-samples", type=int, default=64, help="LIME / KernelSHAP samples")
    p.add_argument("--no-surrogates", action="store_true", help="leave out LIME and KernelSHAP")
    p.add_argument("--batch-size", type=int, default=64, help="model evaluations per chunk")
    p.add_argument("--eval-batch", type=int, default=16, help="images explained per call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "seeds": [0] if quick else [0, 1, 2],
        "n_train": 1000 if quick else 2000,
        "epochs": 5 if quick else 15,
        "images": 12 if quick else 32,
        "sanity_images": 2 if quick else 4,
        "curve_steps": 8 if quick else 16,
        "rise_masks": 100 if quick else 200,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("n_train", "n_test", "epochs", "images", "curve_steps", "rise_masks", "batch_size", "eval_batch"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.sanity_images < 0:
        raise SystemExit(f"--sanity-images must be >= 0, got {args.sanity_images}")
    if quick:
        args.no_surrogates = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/explanation_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    start = time.perf_counter()
    sections: list[str] = []
    problems: list[str] = []
    for num_classes in args.classes:
        evalset = GroundTruthShapes(num_classes, args.images, args.image_size, seed=EVAL_SEED)
        images, labels, masks = evalset.images, evalset.labels, evalset.masks
        rows = methods(args.image_size, images, args)
        results: dict[str, list[Scores]] = {m.label: [] for m in rows}
        accuracies, eval_accuracies, train_seconds = [], [], []
        for seed in args.seeds:
            model, accuracy, seconds = train(num_classes, seed, args)
            net = model.backbone.eval()
            with torch.no_grad():
                eval_accuracy = float((net(images).argmax(1) == labels).float().mean())
            accuracies.append(accuracy)
            eval_accuracies.append(eval_accuracy)
            train_seconds.append(seconds)
            print(
                f"[{num_classes} classes, seed {seed}] test accuracy {accuracy:.3f}, on the evaluation images "
                f"{eval_accuracy:.3f}, trained in {seconds:.0f} s",
                flush=True,
            )
            for method in rows:
                tic = time.perf_counter()
                scores = evaluate_method(method, net, images, labels, masks, seed, args)
                results[method.label].append(scores)
                problems += [f"{num_classes} classes, seed {seed}: {p}" for p in self_checks(method, scores)]
                if scores.error:
                    problems.append(f"{num_classes} classes, seed {seed}: {method.label} failed: {scores.error}")
                if scores.excluded_mass:
                    problems.append(
                        f"{num_classes} classes, seed {seed}: {method.label}: {scores.excluded_mass} image(s) "
                        "without positive relevance left out of the relevance mass"
                    )
                summary = ", ".join(f"{k} {v:.3f}" for k, v in scores.values.items())
                print(f"    {method.label}: {scores.error or summary} ({time.perf_counter() - tic:.0f} s)", flush=True)
        title = (
            f"**{DATASETS[num_classes]}** - `small_cnn` test accuracy {cell(accuracies, 3)} "
            f"({cell(eval_accuracies, 3)} on the {args.images} evaluation images), {len(args.seeds)} seed(s), "
            f"{args.image_size}x{args.image_size} images, {args.n_train} training images, {args.epochs} epochs "
            f"({cell(train_seconds, 0)} s each)"
        )
        sections.append(title + "\n\n" + markdown_table(rows, results))

    minutes = (time.perf_counter() - start) / 60
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    intro = (
        "Explanation quality on the ground-truth flowers (the protocol and the metrics are described in "
        "`benchmarks/explanation_quality.py`): localisation against the mask of the discriminative part(s) "
        "(IoU as in Oramas et al., ICLR 2019, pointing game, relevance mass), deletion / insertion AUC (RISE) "
        "and the cascading model-randomisation similarity (Adebayo et al., NeurIPS 2018), mean ± std over seeds. "
        "The explained class is the true label."
    )
    footer = f"Command: `{command.strip()}` ({minutes:.1f} min on {machine})."
    section = "\n\n".join([intro, *sections, footer])
    print("\n" + section + "\n")
    if problems:
        print("Notes:\n" + "\n".join(f"- {p}" for p in problems))
    if args.write_readme:
        with open(README, encoding="utf-8") as fh:
            text = fh.read()
        new = replace_readme_section(text, section)
        if new is None:
            print(f"README.md has no {START_MARKER} ... {END_MARKER} section: nothing written (table printed above)")
        else:
            with open(README, "w", encoding="utf-8") as fh:
                fh.write(new)
            print(f"README.md: section between {START_MARKER} and {END_MARKER} replaced")
    failures = [p for p in problems if "expected 1" in p]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
