"""Explanation quality on transformers with planted ground truth: a ViT table and a text table.

    python benchmarks/transformer_quality.py              # trains both models (CPU, a few minutes), prints tables
    python benchmarks/transformer_quality.py --quick      # smaller data and fewer epochs (a smoke run)

* **ViT**: :func:`~lightning_xai.models.transformers.vit_tiny` (32x32 images in 4x4 patches, width 48, 3 blocks, 4
  heads) trained on the ground-truth flowers (:class:`~lightning_xai.data.groundtruth.GroundTruthShapes`, 6
  classes: the disc colour decides), explained for the true class on held-out images. Ground truth: the disc's
  pixel mask.
* **Text**: :class:`~lightning_xai.models.transformers.TextTransformer` trained on
  :class:`~lightning_xai.data.tokens.PlantedTokens` (4 classes, 2 planted keys per sequence of 10-16 tokens).
  Ground truth: the key positions.

Columns (mean over the explained samples; ``random`` = uniform random maps, the chance level):

* ``mass``: share of the map's positive mass on the ground truth (Arras, Osman and Samek, "CLEVR-XAI",
  Information Fusion 2022, "relevance mass accuracy");
* ``pointing``: the map's maximum lies on the ground truth (Zhang et al., "Top-down Neural Attention by
  Excitation Backprop", ECCV 2016);
* ``IoU``: intersection over union of the top-k features (k = the ground truth's own size, ties scored by their
  expected value) with the ground truth, by :func:`~lightning_xai.evaluation.mask_iou` (the protocol of Oramas et
  al., ICLR 2019): key tokens for text, disc pixels for the ViT;
* ``deletion``: area under the target-probability curve while the most relevant features are removed first
  (Petsiuk, Das and Saenko, "RISE", BMVC 2018): image patches set to the image mean, tokens replaced by the mask
  token; lower is better;
* ``rand. corr.``: Spearman correlation between the maps of the trained model and of the same architecture with
  freshly initialised weights (the model-randomisation sanity check of Adebayo et al., "Sanity Checks for
  Saliency Maps", NeurIPS 2018); near 0 passes, near 1 fails (the map does not depend on what was learned).

The text table is scored by the library's own metrics (:mod:`lightning_xai.evaluation`, as
:class:`~lightning_xai.callbacks.ExplanationQuality` scores token models), padding left out everywhere: mass and
pointing by :func:`~lightning_xai.evaluation.relevance_mass` / :func:`~lightning_xai.evaluation.pointing_game` with
``valid`` = the non-padding tokens; deletion by :func:`~lightning_xai.evaluation.deletion_auc` over token ids
(``mask_token``, ``pad_token``; the x axis is the fraction of each sequence's own tokens, ``steps`` points); the
randomisation correlation by :func:`~lightning_xai.evaluation.spearman_correlation` over each sequence's tokens
(tied padding zeros would count as agreement). Samples a metric cannot score (a map with no positive relevance
has no mass share) are left out of that mean and counted below the table.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lightning_xai.attribution.attention
import lightning_xai.attribution.lrp.transformer
import lightning_xai.attribution.token_surrogate  # noqa: F401  (these imports register the methods by name)
from lightning_xai.attribution.base import ATTRIBUTORS, build_attributor
from lightning_xai.data.groundtruth import GroundTruthShapes
from lightning_xai.data.tokens import MASK_TOKEN, PAD_TOKEN, PlantedTokens
from lightning_xai.evaluation import deletion_auc as deletion_areas
from lightning_xai.evaluation import mask_iou, pointing_game, relevance_mass, spearman_correlation
from lightning_xai.models.transformers import TextTransformer, vit_tiny

VIT_METHODS = {
    "Saliency": {"name": "saliency"},
    "IntegratedGradients (32)": {"name": "integrated_gradients", "steps": 32, "method": "gauss_legendre"},
    "AttentionRollout": {"name": "attention_rollout"},
    "TransformerAttribution": {"name": "transformer_attribution"},
    "AttnLRP": {"name": "attnlrp"},
    "CP-LRP": {"name": "attnlrp", "attention_rule": "cp"},
    "GradCAM (last block ln_1)": {"name": "gradcam", "layer": "encoder.layers.encoder_layer_2.ln_1"},
}
TEXT_METHODS = {
    "TokenSaliency": {"name": "token_saliency", "skip_tokens": [PAD_TOKEN]},
    "TokenInputXGradient": {"name": "token_input_x_gradient", "skip_tokens": [PAD_TOKEN]},
    "TokenIntegratedGradients (32, mask)": {
        "name": "token_integrated_gradients",
        "baseline": MASK_TOKEN,
        "steps": 32,
        "skip_tokens": [PAD_TOKEN],
    },
    "TokenOcclusion": {"name": "token_occlusion", "mask_token": MASK_TOKEN, "skip_tokens": [PAD_TOKEN]},
    "TokenLIME (128)": {"name": "token_lime", "mask_token": MASK_TOKEN, "num_samples": 128, "skip_tokens": [0]},
    "TokenKernelSHAP (128)": {
        "name": "token_kernel_shap",
        "mask_token": MASK_TOKEN,
        "num_samples": 128,
        "skip_tokens": [0],
    },
    "AttentionRollout": {"name": "attention_rollout"},
    "TransformerAttribution": {"name": "transformer_attribution"},
    "AttnLRP": {"name": "attnlrp", "embedding": "embedding"},
    "CP-LRP": {"name": "attnlrp", "attention_rule": "cp", "embedding": "embedding"},
}


def train(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    start = time.time()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(labels)).split(64):
            loss = F.cross_entropy(model(inputs[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return time.time() - start


def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(inputs).argmax(1) == labels).float().mean())


def mass_and_pointing(scores: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """``scores``, ``masks``: ``[N, F]`` (features flattened)."""
    positive = scores.clamp_min(0)
    mass = ((positive * masks).sum(1) / positive.sum(1).clamp_min(1e-12)).mean()
    pointing = masks.gather(1, scores.argmax(1, keepdim=True)).mean()
    return float(mass), float(pointing)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of ``a`` and ``b`` (``[N, F]``)."""
    ra = a.argsort(1).argsort(1).double()
    rb = b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)).mean())


def deletion_auc(model, inputs, labels, order: torch.Tensor, remove, steps: int) -> float:
    """Mean area under the target probability while features are removed in ``order`` (``[N, F]``, most relevant
    first), ``steps`` equal parts; ``remove(inputs, removed_mask [N, F]) -> inputs``."""
    n, features = order.shape
    probs = []
    with torch.no_grad():
        for k in range(steps + 1):
            count = round(k * features / steps)
            removed = torch.zeros(n, features, dtype=torch.bool)
            removed.scatter_(1, order[:, :count], True)
            out = model(remove(inputs, removed)).softmax(1)
            probs.append(out.gather(1, labels[:, None])[:, 0])
    curve = torch.stack(probs, 1)
    return float(((curve[:, 1:] + curve[:, :-1]) / 2).mean())


def table(title: str, rows: list[tuple[str, float, float, float, float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"| {'method':36s} | {'mass':>5s} | {'pointing':>8s} | {'IoU':>5s} | {'deletion':>8s} | {'rand. corr.':>11s} "
          f"| {'s':>5s} |")
    print(f"|{'-' * 38}|{'-' * 7}|{'-' * 10}|{'-' * 7}|{'-' * 10}|{'-' * 13}|{'-' * 7}|")
    for label, mass, pointing, iou, deletion, corr, seconds in rows:
        print(f"| {label:36s} | {mass:5.2f} | {pointing:8.2f} | {iou:5.2f} | {deletion:8.3f} | {corr:11.2f} "
              f"| {seconds:5.1f} |")


def vit_table(args: argparse.Namespace) -> None:
    size, patch = 32, 4
    train_set = GroundTruthShapes(6, args.vit_train, size, seed=0)
    test = GroundTruthShapes(6, args.explain, size, seed=1)
    torch.manual_seed(0)
    make = lambda: vit_tiny(size, patch, 6, dim=48, depth=3, heads=4, mlp_dim=96)  # noqa: E731
    model = make()
    seconds = train(model, train_set.images, train_set.labels, args.vit_epochs, 2e-3)
    acc = accuracy(model, test.images, test.labels)
    torch.manual_seed(1)
    random_model = make().eval()
    with torch.no_grad():
        random_model.heads.head.weight.normal_(std=0.1)  # torchvision zero-inits the head: a random head
    grid = size // patch
    patch_gt = F.avg_pool2d(test.masks, patch).flatten(1)  # fraction of each patch on the disc
    pixel_gt = test.masks.flatten(1)
    x, y = test.images, test.labels
    means = x.mean(dim=(2, 3), keepdim=True)

    def remove(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        gone = removed.view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        return torch.where(gone, means, images)

    rows = []
    for label, spec in VIT_METHODS.items():
        if spec["name"] not in ATTRIBUTORS:
            continue
        try:
            method = build_attributor(spec)
            start = time.time()
            maps = method(model, x, y)
        except (ValueError, TypeError) as err:
            print(f"{label}: n/a ({str(err)[:100]})")
            continue
        took = time.time() - start
        maps = maps.sum(1) if maps.shape[1] > 1 else maps[:, 0]  # [N, H, W]: channels summed (signed)
        mass, pointing = mass_and_pointing(maps.flatten(1), pixel_gt)
        iou = float(mask_iou(maps[:, None], test.masks).nanmean())
        per_patch = F.avg_pool2d(maps[:, None], patch).flatten(1)
        deletion = deletion_auc(model, x, y, per_patch.argsort(1, descending=True), remove, args.steps)
        random_maps = method(random_model, x, y)
        random_maps = random_maps.sum(1) if random_maps.shape[1] > 1 else random_maps[:, 0]
        corr = spearman(maps.flatten(1), random_maps.flatten(1))
        rows.append((label, mass, pointing, iou, deletion, corr, took))
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(x.shape[0], grid * grid, generator=g)
    noise_maps = noise.view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, 0]
    mass, pointing = mass_and_pointing(noise_maps.flatten(1), pixel_gt)
    rows.append(
        (
            "random (per patch)",
            mass,
            pointing,
            float(mask_iou(noise_maps[:, None], test.masks).nanmean()),
            deletion_auc(model, x, y, noise.argsort(1), remove, args.steps),
            0.0,
            0.0,
        )
    )
    table(
        f"ViT: vit_tiny 32x32 / 4x4 patches (64 + 1 tokens), width 48, 3 blocks; {args.vit_train} flowers x "
        f"{args.vit_epochs} epochs ({seconds:.0f} s), test accuracy {acc:.3f}; {args.explain} images explained "
        f"(true class); ground truth: disc pixels ({float(pixel_gt.mean()):.3f} of the image, "
        f"{float((patch_gt > 0).float().mean()):.3f} of the patches touched)",
        rows,
    )


def text_table(args: argparse.Namespace) -> None:
    train_set = PlantedTokens(size=args.text_train, min_length=10, seed=0)
    test = PlantedTokens(size=args.explain, min_length=10, seed=100)
    torch.manual_seed(0)
    make = lambda: TextTransformer(train_set.vocab_size, 4, max_len=train_set.seq_len)  # noqa: E731
    model = make()
    seconds = train(model, train_set.tokens, train_set.labels, args.text_epochs, 3e-3)
    acc = accuracy(model, test.tokens, test.labels)
    torch.manual_seed(1)
    random_model = make().eval()
    ids, y, gt = test.tokens, test.labels, test.masks
    valid = ids != PAD_TOKEN
    excluded: dict[str, list[int]] = {}

    def mean(label: str, values: torch.Tensor) -> float:
        excluded.setdefault(label, []).append(int(torch.isnan(values).sum()))
        return float(values.nanmean())

    def scores_of(label: str, maps: torch.Tensor) -> tuple[float, float, float, float]:
        mass = mean(label, relevance_mass(maps, gt, valid=valid))
        pointing = mean(label, pointing_game(maps, gt, valid=valid))
        iou = mean(label, mask_iou(maps, gt, valid=valid))
        areas = deletion_areas(maps, ids, model, y, steps=args.steps, mask_token=MASK_TOKEN, pad_token=PAD_TOKEN)
        return mass, pointing, iou, mean(label, areas)

    def token_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
        """Mean over sequences of the Spearman correlation over the sequence's tokens (padding left out)."""
        return float(torch.stack([spearman_correlation(a[i][valid[i]][None], b[i][valid[i]][None])[0]
                                  for i in range(a.shape[0])]).nanmean())

    rows = []
    for label, spec in TEXT_METHODS.items():
        method = build_attributor(spec)
        start = time.time()
        scores = method(model, ids, y)
        took = time.time() - start
        mass, pointing, iou, deletion = scores_of(label, scores)
        corr = token_spearman(scores, method(random_model, ids, y))
        rows.append((label, mass, pointing, iou, deletion, corr, took))
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(ids.shape, generator=g) * valid
    rows.append(("random", *scores_of("random", noise), 0.0, 0.0))
    table(
        f"Text: TextTransformer (width 32, 2 blocks) on PlantedTokens (4 classes, 2 keys in 10-16 tokens); "
        f"{args.text_train} sequences x {args.text_epochs} epochs ({seconds:.0f} s), test accuracy {acc:.3f}; "
        f"{args.explain} sequences explained (true class); ground truth: the key positions",
        rows,
    )
    left_out = {k: v for k, v in excluded.items() if any(v)}
    if left_out:
        counts = "; ".join(f"{k} {v}" for k, v in left_out.items())
        print(f"left out of the means (mass, pointing, IoU, deletion): {counts}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--explain", type=int, default=128)
    parser.add_argument("--vit-train", type=int, default=3000)
    parser.add_argument("--vit-epochs", type=int, default=15)
    parser.add_argument("--text-train", type=int, default=2000)
    parser.add_argument("--text-epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="deletion curve steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["vit", "text"], default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.explain, args.vit_train, args.vit_epochs, args.text_train, args.text_epochs = 16, 256, 1, 400, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "text"):
        text_table(args)
    if args.only in (None, "vit"):
        vit_table(args)


if __name__ == "__main__":
    main()
