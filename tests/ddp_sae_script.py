"""Train the post-hoc modules (SparseAutoencoder on cached activations, Net2Vec with probes, ConceptProbes) on 1 or
N CPU processes (DDP, gloo) and write, per rank, the validation metrics and the cache status. Used by
test_net2vec_probes.py.

    python tests/ddp_sae_script.py DEVICES OUT_DIR CACHE_DIR

Every training epoch is one full batch (the per-process batch size is the data size over DEVICES), so that the
averaged DDP gradient equals the single-process one and the runs can be compared number by number. Net2Vec uses
SGD here: its pixel sums cancel so much that some weight gradients are at float32 noise level, which Adam's
normalised step (sign-like for tiny gradients) would turn into visible differences between the two runs.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

from lightning_xai.data.concepts import ConceptDataModule
from lightning_xai.models.activations import ActivationDataModule
from lightning_xai.models.backbones import SmallCNN
from lightning_xai.models.net2vec import ConceptMaskDataModule, Net2Vec
from lightning_xai.models.probes import ConceptProbes
from lightning_xai.models.sae import SparseAutoencoder, TopKSAEConfig
from lightning_xai.namespace import pl

N_TRAIN, N_VAL, IMAGE_SIZE, WIDTH = 32, 16, 24, 4


def _trainer(devices: int, epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _concepts(devices: int) -> ConceptDataModule:
    batch = N_TRAIN // devices
    return ConceptDataModule(image_size=IMAGE_SIZE, n_train=N_TRAIN, n_val=N_VAL, n_test=N_VAL, batch_size=batch)


def _frozen_model() -> torch.nn.Module:
    torch.manual_seed(123)
    return SmallCNN(num_classes=8, width=WIDTH).eval()


def _metrics(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}


def run(devices: int, out: str, cache_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    metrics: dict[str, float] = {}
    statuses = []
    rank, rows = 0, 0
    per_image = (IMAGE_SIZE // 4) ** 2  # SmallCNN's `features` map: 1/4 of the input resolution
    for attempt in range(2):  # the second fit must reuse the cache shards of the first
        pl.seed_everything(0)
        data = ActivationDataModule(
            _concepts(devices),
            _frozen_model(),
            "features",
            normalize=True,
            cache_dir=cache_dir,
            batch_size=N_TRAIN * per_image // devices,
        )
        sae = SparseAutoencoder(TopKSAEConfig(d_in=2 * WIDTH, d_sae=32, k=3, dead_window=4 * N_TRAIN), lr=1e-2)
        trainer = _trainer(devices, epochs=4)
        trainer.fit(sae, data)
        statuses.append(data.cache_status)
        rank = trainer.global_rank
        rows = int(data._cached_train.rows_per_epoch) if data._cached_train is not None else 0
        if attempt == 0:
            metrics.update(_metrics(trainer, "sae"))
            metrics["sae/decoder_checksum"] = float((sae.sae.W_dec.detach() * torch.arange(1, 33).view(-1, 1)).sum())
            metrics["sae/dead"] = float(sae.samples_since_fired.float().sum())

    pl.seed_everything(0)
    data = ActivationDataModule(
        ConceptMaskDataModule(_concepts(devices)), _frozen_model(), "features", spatial="maps", normalize=True
    )
    concept_names = _concepts(devices).concept_names
    net2vec = Net2Vec(2 * WIDTH, len(concept_names), concept_names=concept_names, optimizer="sgd", lr=0.5)
    trainer = _trainer(devices, epochs=3)
    trainer.fit(net2vec, data)
    metrics.update(_metrics(trainer, "net2vec"))
    metrics["net2vec/weight_checksum"] = float(net2vec.weight.detach().abs().sum())
    metrics["net2vec/threshold_sum"] = float(net2vec.thresholds.sum())

    pl.seed_everything(0)
    data = ActivationDataModule(_concepts(devices), _frozen_model(), "features", spatial="pool", normalize=True)
    probes = ConceptProbes(2 * WIDTH, len(concept_names), concept_names=concept_names, lr=0.05)
    trainer = _trainer(devices, epochs=3)
    trainer.fit(probes, data)
    metrics.update(_metrics(trainer, "probes"))
    metrics["probes/weight_checksum"] = float(probes.probes.weight.detach().abs().sum())

    os.makedirs(out, exist_ok=True)
    result = {"rank": rank, "cache_status": statuses, "rows": rows, "metrics": metrics}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    run(int(sys.argv[1]), sys.argv[2], sys.argv[3])
