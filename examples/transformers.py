"""Explaining transformers: a text classifier over planted key tokens and a tiny ViT on the ground-truth flowers.

    python examples/transformers.py              # CPU, one to two minutes
    python examples/transformers.py --quick      # seconds (smoke run)

1. Trains :class:`~lightning_xai.models.transformers.TextClassifier` on
   :class:`~lightning_xai.data.tokens.PlantedTokensDataModule` (the label is decided by planted key tokens) with a
   Lightning Trainer, explains a few test sequences with AttnLRP, Integrated Gradients on the embeddings and
   attention rollout, prints them as text with scores and writes an HTML page (``wandb.Html(page)`` logs it).
   :class:`~lightning_xai.callbacks.ExplanationQuality` is attached to the same run and scores the token methods
   against the planted keys (relevance mass, pointing, IoU; deletion AUC with removed tokens set to the mask id;
   padding left out), printed as a table.
2. Trains a :class:`~lightning_xai.models.sae.SparseAutoencoder` on the trained classifier's residual stream
   (``ActivationDataModule(..., spatial="tokens")``: one vector per real token) and prints its explained variance,
   L0, dead fraction and the loss recovered when its reconstruction is spliced back into the classifier.
3. Trains :class:`~lightning_xai.models.transformers.ViTClassifier` briefly on the flowers and writes a PNG grid of
   attention rollout, transformer attribution and AttnLRP maps.
"""

from __future__ import annotations

import argparse
import os

import torch

import lightning_xai.attribution.attention  # noqa: F401  (registers the attention methods by name)
from lightning_xai.attribution.base import build_attributor
from lightning_xai.attribution.lrp.transformer import AttnLRP
from lightning_xai.callbacks import ExplanationQuality
from lightning_xai.data.groundtruth import GroundTruthDataModule
from lightning_xai.data.tokens import MASK_TOKEN, PAD_TOKEN, PlantedTokensDataModule
from lightning_xai.models.activations import ActivationDataModule
from lightning_xai.models.sae import SparseAutoencoder, TopKSAEConfig
from lightning_xai.models.transformers import TextClassifier, ViTClassifier
from lightning_xai.namespace import pl
from lightning_xai.viz import render_explanations, save_png
from lightning_xai.viz.text import batch_to_html, tokens_to_text


def _trainer(epochs: int, root: str, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


#: Token methods scored by ExplanationQuality against the planted keys (padding skipped by the methods themselves).
QUALITY_METHODS = [
    {"name": "token_saliency", "embedding": "backbone.embedding", "skip_tokens": [PAD_TOKEN]},
    {"name": "token_integrated_gradients", "embedding": "backbone.embedding", "baseline": MASK_TOKEN,
     "skip_tokens": [PAD_TOKEN]},
    {"name": "attnlrp", "embedding": "backbone.embedding"},
    "attention_rollout",
]
QUALITY_METRICS = ["relevance_mass", "pointing_game", "mask_iou", "deletion_auc"]


def _print_quality(quality: ExplanationQuality, num_samples: int) -> None:
    epoch, values = quality.history[-1]
    methods = list(quality.attributors)
    print(f"\nexplanation quality against the planted keys (epoch {epoch}, {num_samples} validation sequences)")
    print(f"  {'method':28s}" + "".join(f"{m:>16s}" for m in QUALITY_METRICS))
    for method in methods:
        row = "".join(f"{values.get(f'{method}/{m}', float('nan')):16.3f}" for m in QUALITY_METRICS)
        print(f"  {method:28s}{row}")


def train_text(out_dir: str, quick: bool) -> tuple[TextClassifier, PlantedTokensDataModule]:
    """The text classifier, trained with ExplanationQuality attached (its table is printed)."""
    data = PlantedTokensDataModule(n_train=400 if quick else 2000, n_val=64, n_test=64, min_length=10, batch_size=32)
    model = TextClassifier(vocab_size=data.vocab_size, num_classes=data.num_classes, max_len=data.seq_len)
    num_samples = 8 if quick else 32
    quality = ExplanationQuality(QUALITY_METHODS, metrics=QUALITY_METRICS, num_samples=num_samples,
                                 metric_kwargs={"deletion_auc": {"steps": 8}}, mask_token=MASK_TOKEN,
                                 pad_token=PAD_TOKEN)
    _trainer(1 if quick else 3, out_dir, [quality]).fit(model, datamodule=data)
    _print_quality(quality, num_samples)
    return model, data


def sae_on_tokens(model: TextClassifier, data: PlantedTokensDataModule, out_dir: str, quick: bool) -> dict[str, float]:
    """A TopK SAE on the classifier's residual stream after its first block, one vector per real token."""
    width = model.backbone.embedding.embedding_dim
    activations = ActivationDataModule(data, model.backbone, "blocks.0", spatial="tokens", normalize=True,
                                       batch_size=256)
    sae = SparseAutoencoder(TopKSAEConfig(d_in=width, d_sae=8 * width, k=8), lr=3e-3)
    trainer = _trainer(1 if quick else 5, out_dir)
    trainer.fit(sae, datamodule=activations)
    figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    print("\nsparse autoencoder on the residual stream (blocks.0, one vector per real token; padding left out):")
    print(f"  explained variance {figures['val_explained_variance']:.3f}, L0 {figures['val_l0']:.1f}, dead fraction "
          f"{figures['val_dead_fraction']:.3f}, loss recovered {figures['val_downstream_score']:.3f} (cross-entropy "
          f"clean {figures['val_ce_orig']:.3f}, with the SAE {figures['val_ce_sae']:.3f}, layer zeroed "
          f"{figures['val_ce_zero']:.3f})")
    return figures


def explain_text(model: TextClassifier, data: PlantedTokensDataModule, out_dir: str) -> str:
    test = data.dataset("test")
    tokens, labels = test.tokens[:4], test.labels[:4]
    methods = {
        "AttnLRP": AttnLRP(embedding="backbone.embedding"),
        "IG (mask baseline)": build_attributor(
            {
                "name": "token_integrated_gradients",
                "embedding": "backbone.embedding",
                "baseline": MASK_TOKEN,
                "skip_tokens": [PAD_TOKEN],
            }
        ),
        "rollout": build_attributor("attention_rollout"),
    }
    names = [test.decode(row) for row in tokens]
    sections = []
    for label, method in methods.items():
        scores = method(model, tokens, labels)
        print(f"\n{label}")
        for row, score, y in zip(names, scores, labels.tolist(), strict=True):
            print(f"  class {y}: {tokens_to_text(row, score, top_k=3, skip=['[PAD]'])}")
        captions = [f"{label} - class {y}" for y in labels.tolist()]
        sections.append(batch_to_html(names, scores, captions=captions, skip=["[PAD]"]))
    path = os.path.join(out_dir, "text_explanations.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("<html><body>" + "".join(sections) + "</body></html>")
    return path


def explain_vit(out_dir: str, quick: bool) -> str:
    data = GroundTruthDataModule(image_size=32, n_train=256 if quick else 2000, n_val=64, n_test=64, batch_size=64)
    model = ViTClassifier(num_classes=6, image_size=32, patch_size=4, dim=48, depth=3, heads=4, mlp_dim=96)
    _trainer(1 if quick else 8, out_dir).fit(model, datamodule=data)
    test = data.dataset("test")
    x, y = test.images[:6], test.labels[:6]
    maps = {
        "rollout": build_attributor("attention_rollout")(model, x, y),
        "transformer attr.": build_attributor("transformer_attribution")(model, x, y),
        "AttnLRP": AttnLRP()(model, x, y).sum(1, keepdim=True),
    }
    grid = render_explanations(x, maps, labels=y, class_names=data.class_names)
    path = os.path.join(out_dir, "vit_explanations.png")
    save_png(getattr(grid, "image", grid), path)
    return path


def main(argv: list[str] | None = None) -> tuple[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/transformers")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    pl.seed_everything(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, data = train_text(args.out, args.quick)
    html = explain_text(model, data, args.out)
    sae_on_tokens(model, data, args.out, args.quick)
    png = explain_vit(args.out, args.quick)
    print(f"\nwrote {html} and {png}")
    return html, png


if __name__ == "__main__":
    main()
