"""Contrastive explanations (pertinent positives and negatives) and an activation atlas on the ground-truth flowers.

    python examples/cem_and_atlas.py                      # about a minute on 2 CPU cores; prints what it shows
    python examples/cem_and_atlas.py --out-dir cem_atlas  # where the two PNGs go (default: current directory)

A small CNN learns the 6-class ground-truth flowers (:class:`lightning_xai.data.GroundTruthShapes`: the class is the
colour of the centre disc; every image carries the pixel mask of that disc). Then:

* **CEM** (Dhurandhar et al., NeurIPS 2018): for 8 test images, the *pertinent negative* - the smallest sparse
  addition that changes the class - and the *pertinent positive* - the smallest sparse part of the image that alone
  keeps it. Printed: the share of each one's mass that falls on the disc (the true evidence) against the disc's
  share of the image, and what the PN turns each image into. ``cem.png``: rows = images; columns = input, PP (on
  grey), input + PN, PN alone (amplified).
* **Activation atlas** (Carter et al., Distill 2019) of the last convolutional block over 200 test images:
  ``atlas.png``, each grid cell drawn as the feature visualisation of the cell's mean activation vector, sized by
  how many activation vectors it holds. Printed: the number of cells, how much the icons raise their objective over
  random inputs, and how concentrated the vectors are.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from lightning_xai.attribution import CEMPertinentNegative, CEMPertinentPositive
from lightning_xai.data.groundtruth import GroundTruthShapes
from lightning_xai.interpretation import ActivationAtlas
from lightning_xai.interpretation.visualization import ActivationMaximization
from lightning_xai.viz.render import save_png, tile_images

SIZE = 24


def flower_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 6),
    )


def train(model: nn.Module, data: GroundTruthShapes, epochs: int, seed: int = 0) -> None:
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(data), 40):
            idx = perm[i : i + 40]
            loss = nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def mass_on_mask(delta: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    mass = delta.abs().sum(1, keepdim=True)
    return (mass * masks).flatten(1).sum(1) / mass.flatten(1).sum(1).clamp(min=1e-12)


def to_u8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    train_set = GroundTruthShapes(6, 1200, SIZE, seed=1)
    test_set = GroundTruthShapes(6, 200, SIZE, seed=2)
    model = flower_cnn()
    train(model, train_set, args.epochs)
    with torch.no_grad():
        accuracy = float((model(test_set.images).argmax(1) == test_set.labels).float().mean())
    print(f"trained a small CNN in {time.perf_counter() - start:.0f} s: test accuracy {accuracy:.2f} "
          f"(the class is the disc colour; chance 0.17)")

    # ---------------------------------------------------------------------------------------------- CEM
    x, masks = test_set.images[:8], test_set.masks[:8]
    with torch.no_grad():
        pred = model(x).argmax(1)
    t0 = time.perf_counter()
    pn = CEMPertinentNegative(feature_range=(0.0, 1.0), lr=0.1, max_iterations=40, c_steps=3).explain(model, x, pred)
    pp = CEMPertinentPositive(feature_range=(0.0, 1.0), baseline=0.5, kappa=2.0, beta=1.0, lr=0.1, max_iterations=40,
                              c_steps=3).explain(model, x, pred)
    area = float(masks.mean())
    names = test_set.class_names
    print(f"CEM on 8 images in {time.perf_counter() - t0:.0f} s; the disc covers {area:.1%} of an image")
    print(f"  pertinent negative: {float(mass_on_mask(pn.delta, masks).mean()):.0%} of its mass on the disc, found "
          f"for {int(pn.found.sum())}/8 -> the smallest change of class recolours the disc (the true evidence)")
    for i in range(3):
        print(f"    image {i}: {names[int(pred[i])]} + PN -> {names[int(pn.predicted[i])]}")
    print(f"  pertinent positive: {float(mass_on_mask(pp.delta, masks).mean()):.0%} of its mass on the disc, found "
          f"for {int(pp.found.sum())}/8 -> what must stay to keep the class is concentrated on the disc")
    pn_alone = (pn.delta / pn.delta.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12))
    columns = torch.stack([x, pp.explained_input, pn.explained_input, pn_alone], dim=1).flatten(0, 1)
    os.makedirs(args.out_dir, exist_ok=True)
    cem_path = os.path.join(args.out_dir, "cem.png")
    save_png(tile_images(np.repeat(np.repeat(to_u8(columns), 3, 1), 3, 2), columns=4), cem_path)
    print(f"  wrote {cem_path} (columns: input, PP on grey, input + PN, PN alone)")

    # ---------------------------------------------------------------------------------------------- atlas
    t0 = time.perf_counter()
    atlas = ActivationAtlas("5", grid_size=6, positions_per_image=6, method="auto",
                            visualization=ActivationMaximization(steps=32, lr=0.1, jitter=1, batch_size=36, seed=0))
    result = atlas(model, (test_set.images, test_set.labels))
    gain = result.icon_scores - result.random_scores
    print(f"activation atlas of layer '5' ({result.vectors.shape[0]} vectors, {result.method} layout) in "
          f"{time.perf_counter() - t0:.0f} s: {len(result.counts)} cells")
    print(f"  icons raise their direction's objective by {float(gain.mean()):.2f} over random inputs (all "
          f"{int((gain > 0).sum())}/{len(gain)} cells) -> each icon shows what its cell's activations respond to")
    top = result.counts.argsort(descending=True)[:3].tolist()
    print(f"  the 3 largest cells hold {float(result.counts[top].sum() / result.counts.sum()):.0%} of the vectors "
          "-> the layer's spatial activations spread over many directions, each cell one kind of local pattern")
    atlas_path = os.path.join(args.out_dir, "atlas.png")
    save_png(result.render(tile=48), atlas_path)
    print(f"  wrote {atlas_path}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
