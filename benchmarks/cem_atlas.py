"""Cost and ground-truth quality of the Contrastive Explanation Method and cost of the activation atlas (CPU).

    python benchmarks/cem_atlas.py                 # 32 test images, 24x24 flowers, the example's settings
    python benchmarks/cem_atlas.py --quick         # 8 images, fewer iterations
    python benchmarks/cem_atlas.py --output cem_atlas.md   # also write the markdown tables to a file

**CEM cost** (:class:`lightning_xai.attribution.ContrastiveExplanation`): wall time of ``explain`` on a batch as a
multiple of one forward+backward pass of the same batch (the unit a gradient explanation costs). The method's own
count is ``c_steps * max_iterations`` forward+backward passes plus as many forward passes (the margin check), so
the multiple is about ``1.3 * c_steps * max_iterations``.

**CEM quality on ground truth** (:class:`lightning_xai.data.GroundTruthShapes`, 6 classes: the class is the disc
colour and the disc mask is the evidence): for each image, explained as its predicted class, ``found`` (a PP / PN
with the full margin), ``class ok`` (PP keeps the class / PN changes it), ``mass on disc`` (share of ``sum_c
|delta|`` on the disc), ``IoU`` (support ``sum_c |delta| > 0`` against the disc mask), against the disc's area
(the chance level of mass on the disc). Saliency's mass on the disc is given for reference.

**Atlas cost** (:class:`lightning_xai.interpretation.ActivationAtlas`): wall time of collecting, of the 2-D layout
and of rendering the icons, each as a multiple of one forward pass over the collected images.

Machines are noisy (a shared CPU changes every number); quote ratios from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from types import ModuleType

import torch
from torch import nn

from lightning_xai.attribution import CEMPertinentNegative, CEMPertinentPositive, Saliency
from lightning_xai.data.groundtruth import GroundTruthShapes
from lightning_xai.interpretation import ActivationAtlas
from lightning_xai.interpretation.atlas import layout_2d
from lightning_xai.interpretation.visualization import ActivationMaximization


def _example() -> ModuleType:
    """``examples/cem_and_atlas.py``, whose model, training loop and image size this benchmark measures (loaded
    from its file: the examples are scripts, not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cem_and_atlas.py")
    spec = importlib.util.spec_from_file_location("cem_and_atlas_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()
SIZE = EXAMPLE.SIZE
flower_cnn = EXAMPLE.flower_cnn
EPOCHS = 6


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    inputs = x.clone().requires_grad_(True)
    torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)


def quality(delta: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    mass = delta.abs().sum(1, keepdim=True)
    on = ((mass * masks).flatten(1).sum(1) / mass.flatten(1).sum(1).clamp(min=1e-12)).mean()
    support = mass > 0
    truth = masks > 0.5
    iou = ((support & truth).flatten(1).sum(1).float() / (support | truth).flatten(1).sum(1).clamp(min=1)).mean()
    return float(on), float(iou)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images, 20 iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--output", default=None, help="also write the markdown tables to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = 8 if args.quick else 32
    iterations = 20 if args.quick else 40
    model = flower_cnn()
    EXAMPLE.train(model, GroundTruthShapes(6, 1200, SIZE, seed=1), EPOCHS)
    test = GroundTruthShapes(6, 200, SIZE, seed=2)
    with torch.no_grad():
        accuracy = float((model(test.images).argmax(1) == test.labels).float().mean())
    x, masks = test.images[:n], test.masks[:n]
    with torch.no_grad():
        pred = model(x).argmax(1)
    lines = [f"Model: small CNN on {SIZE}x{SIZE} ground-truth flowers, test accuracy {accuracy:.2f}; {n} images.", ""]

    unit = timed(lambda: forward_backward(model, x))
    methods = {
        "cem_pn": CEMPertinentNegative(feature_range=(0.0, 1.0), lr=0.1, max_iterations=iterations, c_steps=3,
                                       batch_size=n),
        "cem_pp": CEMPertinentPositive(feature_range=(0.0, 1.0), baseline=0.5, kappa=2.0, beta=1.0, lr=0.1,
                                       max_iterations=iterations, c_steps=3, batch_size=n),
    }
    area = float(masks.mean())
    lines += ["| method | settings | cost (x fwd+bwd) | found | class ok | mass on disc | IoU with disc | disc area |",
              "|---|---|---|---|---|---|---|---|"]
    for name, method in methods.items():
        start = time.perf_counter()
        result = method.explain(model, x, pred)
        seconds = time.perf_counter() - start
        ok = (result.predicted != pred) if method.mode == "pn" else (result.predicted == pred)
        on, iou = quality(result.delta, masks)
        settings = f"c_steps 3 x {iterations} it., kappa {method.kappa}, beta {method.beta}"
        lines.append(f"| {name} | {settings} | {seconds / unit:.0f} | {float(result.found.float().mean()):.2f} | "
                     f"{float(ok.float().mean()):.2f} | {on:.2f} | {iou:.2f} | {area:.3f} |")
    sal = Saliency()(model, x, pred)
    on, _ = quality(sal, masks)
    lines.append(f"| saliency (reference) | - | 1 | - | - | {on:.2f} | - | {area:.3f} |")
    lines.append("")

    images = test.images
    forward = timed(lambda: _forward(model, images))
    atlas = ActivationAtlas("5", grid_size=6, positions_per_image=6, method="pca", render_icons=False,
                            visualization=ActivationMaximization(steps=32, lr=0.1, jitter=1, batch_size=36))
    collect = timed(lambda: atlas.collect(model, images), repeats=1)
    vectors = atlas.collect(model, images)[0]
    rows = ["| stage | seconds | x one forward pass over the images |", "|---|---|---|"]
    what = f"collect ({len(images)} images, {vectors.shape[0]} vectors)"
    rows.append(f"| {what} | {collect:.2f} | {collect / forward:.1f} |")
    for method in ("pca", "tsne"):
        seconds = timed(lambda m=method: layout_2d(vectors, m), repeats=1)
        rows.append(f"| layout {method} | {seconds:.2f} | {seconds / forward:.1f} |")
    atlas.render_icons = True
    result = atlas(model, images)
    start = time.perf_counter()
    atlas.render_cells(model, result.directions, tuple(images.shape[1:]))
    seconds = time.perf_counter() - start
    rows.append(f"| icons ({len(result.counts)} cells x 32 steps) | {seconds:.2f} | {seconds / forward:.1f} |")
    gain = float((result.icon_scores - result.random_scores).mean())
    positive = bool((result.icon_scores > result.random_scores).all())
    lines += [*rows, "", f"Atlas icons raise their direction objective by {gain:.2f} over random inputs (mean over "
                         f"{len(result.counts)} cells; all positive: {positive})."]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


def _forward(model: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        for i in range(0, len(images), 64):
            model(images[i : i + 64])


if __name__ == "__main__":
    main()
