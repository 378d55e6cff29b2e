"""Contrastive explanations: "why class a and not class b?" with any attributor.

    python examples/contrastive.py                   # trains a tiny CNN for a few seconds, prints the numbers
    python examples/contrastive.py --save contrastive.png   # the labelled heatmap grid to another file

A tiny CNN learns three synthetic classes on 16x16 noise images:

* class 0 "square": a bright square in the top-left corner;
* class 1 "square + bar": the square and a bright bar along the bottom;
* class 2 "bar": the bar alone.

For an image of class 1, the plain explanation of class 1 highlights both shapes. The contrastive target
``contrastive_target(1, 0)`` explains the logit difference ``y1 - y0``: the evidence that separates "square +
bar" from "square" is the bar, so the attribution shifts towards the bar, while ``contrastive_target(1, 2)``
shifts it towards the square (shared evidence cancels only as far as the model treats it alike in both
classes). The script prints the
share of positive attribution that falls on each shape for Integrated Gradients and Grad-CAM, and checks the
linearity of Integrated Gradients: ``IG(y1 - y0) = IG(y1) - IG(y0)``. The heatmaps are written as a labelled
grid (:func:`lightning_xai.viz.grid.render_explanations`): one row per image, one column per method and question.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lightning_xai.attribution.cam import GradCAM
from lightning_xai.attribution.gradient import IntegratedGradients
from lightning_xai.attribution.targets import contrastive_target
from lightning_xai.viz.grid import render_explanations
from lightning_xai.viz.render import save_png

SIZE = 16
CLASSES = ("square", "square + bar", "bar")


def shape_masks() -> tuple[torch.Tensor, torch.Tensor]:
    square = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    square[2:7, 2:7] = True
    bar = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    bar[12:14, 3:13] = True
    return square, bar


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with the shapes of their class drawn in."""
    square, bar = shape_masks()
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    has_square = (labels == 0) | (labels == 1)
    has_bar = (labels == 1) | (labels == 2)
    images[has_square] += square.float()
    images[has_bar] += bar.float()
    return images, labels


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def train(steps: int, seed: int) -> TinyCNN:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = make_data(64, g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x, y = make_data(512, g)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean()
    print(f"trained {steps} steps: accuracy {accuracy:.1%} on 512 fresh images")
    return model.eval()


def shares(heatmap: torch.Tensor) -> tuple[float, float]:
    """Share of the positive attribution (summed over the batch) on the square and on the bar."""
    square, bar = shape_masks()
    positive = heatmap.clamp(min=0).sum(dim=(0, 1))
    total = float(positive.sum()) or 1.0
    return float(positive[square].sum()) / total, float(positive[bar].sum()) / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the tiny CNN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default="runs/contrastive_example/contrastive.png",
                        help="where the labelled heatmap grid is written ('' for none)")
    args = parser.parse_args(argv)

    model = train(args.steps, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    x, y = make_data(64, g)
    x = x[y == 1][:8]  # images of class 1, "square + bar"

    methods = {
        "Integrated Gradients": IntegratedGradients(steps=32),
        "Grad-CAM": GradCAM(layer="features"),
    }
    targets = {
        "why 'square + bar'": 1,
        "why 'square + bar' and not 'square'": contrastive_target(1, 0),
        "why 'square + bar' and not 'bar'": contrastive_target(1, 2),
    }
    maps = {}
    print(f"\nshare of positive attribution on each shape ({x.shape[0]} images of class 1)")
    print(f"{'method':22s} {'question':38s} {'square':>7s} {'bar':>7s}")
    for method_name, method in methods.items():
        for question, target in targets.items():
            heatmap = method(model, x, target)
            if heatmap.shape[1] > 1:
                heatmap = heatmap.sum(dim=1, keepdim=True)
            maps[method_name, question] = heatmap
            on_square, on_bar = shares(heatmap)
            print(f"{method_name:22s} {question:38s} {on_square:7.1%} {on_bar:7.1%}")

    ig = methods["Integrated Gradients"]
    gap = ig(model, x, contrastive_target(1, 0)) - (ig(model, x, 1) - ig(model, x, 0))
    print(
        f"\nIntegrated Gradients is linear in the score: max |IG(y1 - y0) - (IG(y1) - IG(y0))| = {gap.abs().max():.2e}"
    )

    if args.save:
        short = {"Integrated Gradients": "IG", "Grad-CAM": "Grad-CAM"}
        question_short = dict(zip(targets, ("y1", "y1 - y0 (not square)", "y1 - y2 (not bar)")))
        columns = {f"{short[m]}: {question_short[q]}": maps[m, q] for m, q in maps}
        with torch.no_grad():
            logits = model(x)
        grid = render_explanations(
            x, columns, labels=torch.ones(x.shape[0], dtype=torch.long), logits=logits, class_names=CLASSES,
            title="why 'square + bar' (y1), and why not 'square' (y1 - y0) or 'bar' (y1 - y2)?",
        )
        path = save_png(grid.image, args.save)
        print(f"heatmaps written to {path}")

if __name__ == "__main__":
    main()
