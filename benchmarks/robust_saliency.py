"""Robustness as a feature prior: do adversarially trained models have human-aligned gradients?

    python benchmarks/robust_saliency.py            # 2000 training images, 32x32, CPU
    python benchmarks/robust_saliency.py --quick    # a few minutes: fewer images and epochs
    python benchmarks/robust_saliency.py --out runs/robust_saliency --image-size 64

Trains two :class:`~lightning_xai.models.backbones.SmallCNN` classifiers on the 6-class ground-truth flowers
(:class:`~lightning_xai.data.GroundTruthDataModule`: the class is the colour of the flower's centre disc; the
mask is the disc), one with plain cross-entropy (:class:`~lightning_xai.models.ImageClassifier`) and one with
``L_inf`` PGD adversarial training (:class:`~lightning_xai.models.adversarial.AdversarialClassifier`, Madry et
al., ICLR 2018), same architecture, data, seed and epochs. On the test split it reports:

* clean and robust accuracy (robust: PGD with the training ``eps`` and ``--eval-steps`` steps, no random start);
* plain input-gradient saliency (``|d logit_y / d x|``, :class:`~lightning_xai.attribution.Saliency`) scored
  against the disc mask with :class:`~lightning_xai.evaluation.MaskIoU` (top-k pixels, k = the disc's area) and
  :class:`~lightning_xai.evaluation.RelevanceMass` (share of the saliency inside the disc). Tsipras et al. (ICLR
  2019) predict higher values for the robust model;
* large-``eps`` *targeted* ``L_2`` PGD examples towards a random other class: how often the disc of the
  adversarial image *looks like* the target class - its mean colour inside the disc mask is nearest (Euclidean,
  RGB) to the target's class colour in :data:`~lightning_xai.data.groundtruth.PALETTE` - and how often the model
  predicts the target. For a robust model, Engstrom et al. (2019, "Adversarial Robustness as a Prior for Learned
  Representations") predict that such attacks paint the target's features (here: the disc colour) into the image.

Writes ``robust_saliency.md`` (the tables) and PNG grids (inputs with saliency overlays of both models; clean
and adversarial images) to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_xai.attribution import Saliency
from lightning_xai.data import GroundTruthDataModule
from lightning_xai.data.groundtruth import PALETTE, PALETTE_NAMES
from lightning_xai.evaluation import MaskIoU, RelevanceMass
from lightning_xai.models import ImageClassifier
from lightning_xai.models.adversarial import AdversarialClassifier, PGDAttack
from lightning_xai.models.backbones import SmallCNN
from lightning_xai.namespace import pl
from lightning_xai.viz.render import explanation_grid, save_png, to_uint8_images

NUM_CLASSES = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer epochs and attack steps")
    parser.add_argument("--out", default="runs/robust_saliency", help="output folder (markdown table, PNG grids)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=None, help="training images (default 2000, quick 800)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default 300, quick 150)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 12, quick 6)")
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width")
    parser.add_argument("--eps", type=float, default=8 / 255, help="L_inf radius of adversarial training")
    parser.add_argument("--steps", type=int, default=None, help="PGD steps in training (default 3, quick 2)")
    parser.add_argument("--eval-steps", type=int, default=None, help="PGD steps for robust accuracy (default 20)")
    parser.add_argument("--target-eps", type=float, default=8.0, help="L_2 radius of the targeted attack")
    parser.add_argument("--target-steps", type=int, default=None, help="targeted PGD steps (default 60, quick 30)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    defaults = {
        "n_train": (800, 2000),
        "n_test": (150, 300),
        "epochs": (6, 12),
        "steps": (2, 3),
        "eval_steps": (10, 20),
        "target_steps": (30, 60),
    }
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


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


def batches(n: int, size: int = 100):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def accuracies(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: PGDAttack) -> tuple:
    clean = robust = 0
    for sl in batches(len(labels)):
        x, y = images[sl], labels[sl]
        with torch.no_grad():
            clean += int((model(x).argmax(1) == y).sum())
        x_adv = attack(model, x, y)
        with torch.no_grad():
            robust += int((model(x_adv).argmax(1) == y).sum())
    return clean / len(labels), robust / len(labels)


def saliency_scores(model: torch.nn.Module, images, labels, masks) -> tuple[float, float, torch.Tensor]:
    saliency = Saliency("abs")
    iou, mass = MaskIoU(), RelevanceMass()
    maps = []
    for sl in batches(len(labels)):
        m = saliency(model, images[sl], labels[sl])
        iou.update(m, masks[sl])
        mass.update(m, masks[sl])
        maps.append(m.sum(1, keepdim=True))
    return float(iou.compute()), float(mass.compute()), torch.cat(maps)


def disc_colour_classes(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Index of the class colour (``PALETTE[:6]``) nearest to each image's mean colour inside its disc mask."""
    m = masks.float()
    mean = (images * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1)  # [N, 3]
    return torch.cdist(mean, PALETTE[:NUM_CLASSES].to(mean)).argmin(dim=1)


def targeted_study(model, images, labels, masks, targets, attack: PGDAttack) -> tuple[dict[str, float], torch.Tensor]:
    adversarial = torch.cat([attack(model, images[sl], targets[sl]) for sl in batches(len(labels))])
    with torch.no_grad():
        predicted = torch.cat([model(adversarial[sl]).argmax(1) for sl in batches(len(labels))])
    colour = disc_colour_classes(adversarial, masks)
    delta = adversarial - images
    inside = (delta.abs() * masks).sum() / masks.sum().clamp_min(1) / 3
    outside = (delta.abs() * (1 - masks)).sum() / (1 - masks).sum().clamp_min(1) / 3
    return {
        "target_predicted": float((predicted == targets).float().mean()),
        "disc_colour_is_target": float((colour == targets).float().mean()),
        "disc_colour_is_original": float((colour == labels).float().mean()),
        "perturbation_in_disc_vs_outside": float(inside / outside.clamp_min(1e-12)),
    }, adversarial


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
    images, labels, masks = test.images, test.labels, test.masks
    # sanity check of the colour read-out: on clean images it must recover the class
    assert bool((disc_colour_classes(images, masks) == labels).all()), "disc colour read-out is broken"

    models, seconds = {}, {}
    kw = dict(num_classes=NUM_CLASSES, lr=args.lr)
    pl.seed_everything(args.seed, verbose=False)
    models["standard"] = ImageClassifier(backbone=SmallCNN(3, NUM_CLASSES, args.width), **kw)
    pl.seed_everything(args.seed, verbose=False)
    models["robust"] = AdversarialClassifier(
        backbone=SmallCNN(3, NUM_CLASSES, args.width), eps=args.eps, steps=args.steps, robust_eval=False, **kw
    )
    for name, model in models.items():
        seconds[name] = train(model, data, args.epochs, args.seed)
        print(f"trained {name} in {seconds[name]:.0f} s", flush=True)

    eval_attack = PGDAttack(args.eps, "linf", steps=args.eval_steps, random_start=False)
    g = torch.Generator().manual_seed(args.seed + 1)
    targets = (labels + torch.randint(1, NUM_CLASSES, labels.shape, generator=g)) % NUM_CLASSES
    target_attack = PGDAttack(args.target_eps, "l2", steps=args.target_steps, random_start=False, targeted=True)
    rows, maps, adversarial = {}, {}, {}
    for name, model in models.items():
        clean, robust = accuracies(model, images, labels, eval_attack)
        iou, mass, maps[name] = saliency_scores(model, images, labels, masks)
        study, adversarial[name] = targeted_study(model, images, labels, masks, targets, target_attack)
        rows[name] = {"clean_acc": clean, "robust_acc": robust, "mask_iou": iou, "relevance_mass": mass, **study}

    # pictures: 8 test images; saliency overlays; clean vs adversarial (targeted) images
    k = min(8, len(labels))
    grid = explanation_grid(images[:k], {f"saliency {n}": maps[n][:k] for n in models})
    save_png(grid, out / "saliency.png", caption="input | saliency standard | saliency robust")
    columns = [to_uint8_images(images[:k])] + [to_uint8_images(adversarial[n][:k]) for n in models]
    pad = 2
    size = args.image_size
    canvas = torch.full((k * (size + pad) + pad, len(columns) * (size + pad) + pad, 3), 255, dtype=torch.uint8).numpy()
    for j, column in enumerate(columns):
        for i in range(k):
            y0, x0 = pad + i * (size + pad), pad + j * (size + pad)
            canvas[y0 : y0 + size, x0 : x0 + size] = column[i]
    caption = "clean | targeted L2 PGD on standard | on robust; targets: " + ", ".join(
        f"{PALETTE_NAMES[int(labels[i])]}->{PALETTE_NAMES[int(targets[i])]}" for i in range(k)
    )
    save_png(canvas, out / "targeted_adversarial.png", caption=caption)

    lines = [
        "# Robust vs standard SmallCNN on the ground-truth flowers",
        "",
        f"Setup: {args.n_train} training / {args.n_test} test images at {args.image_size}x{args.image_size}, "
        f"SmallCNN(width={args.width}), {args.epochs} epochs, Adam lr={args.lr}, seed {args.seed}. Robust model: "
        f"L_inf PGD eps={args.eps:.4f} ({args.eps * 255:.1f}/255), {args.steps} steps. Robust accuracy: L_inf PGD "
        f"eps={args.eps:.4f}, {args.eval_steps} steps. Targeted attack: L_2 PGD eps={args.target_eps}, "
        f"{args.target_steps} steps, towards a random other class. Training time: "
        + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
        + ".",
        "",
        "| model | clean acc | robust acc | saliency MaskIoU | saliency RelevanceMass | targeted: model predicts "
        "target | targeted: disc colour = target colour | disc colour unchanged | mean abs perturbation in disc "
        "/ outside |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['clean_acc']:.3f} | {r['robust_acc']:.3f} | {r['mask_iou']:.3f} | "
            f"{r['relevance_mass']:.3f} | {r['target_predicted']:.3f} | {r['disc_colour_is_target']:.3f} | "
            f"{r['disc_colour_is_original']:.3f} | {r['perturbation_in_disc_vs_outside']:.2f} |"
        )
    disc_share = float(masks.mean())
    lines += [
        "",
        f"Chance levels: accuracy {1 / NUM_CLASSES:.3f}; the disc covers {disc_share:.3f} of the pixels (the "
        "RelevanceMass of a uniform map); a random disc colour matches the target with probability "
        f"{1 / NUM_CLASSES:.3f}.",
        f"Images: {out / 'saliency.png'}, {out / 'targeted_adversarial.png'}.",
    ]
    report = "\n".join(lines)
    (out / "robust_saliency.md").write_text(report + "\n")
    print(report)
    return report


if __name__ == "__main__":
    main()
