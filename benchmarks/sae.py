"""Sparse-autoencoder training throughput, activation-extraction overhead and the synthetic recovery check (CPU).

    python benchmarks/sae.py                    # d_in 512, 8x expansion, batch 4096, 20 timed steps
    python benchmarks/sae.py --quick            # batch 1024, 6 timed steps, smaller recovery run
    python benchmarks/sae.py --output sae.md    # also write the markdown tables to a file
    python benchmarks/sae.py --tokens           # only the token-model rows (below)

**Throughput.** Activation vectors per second of a full ``Trainer.fit`` training step (data loading from an
activation cache memory map, forward, loss, backward, the decoder's parallel-gradient removal, Adam, the unit-norm
renormalisation, dead-latent tracking, logging), for the TopK (``k = 32``) and the ReLU-L1 variant, both
``d_in = 512`` and ``d_sae = 8 * 512``. The *ceiling* is the time of the dense matrix multiplications such a step
cannot avoid: the encoder ``[B, d_in] x [d_in, d_sae]`` and decoder ``[B, d_sae] x [d_sae, d_in]`` products of the
forward pass and the three of the backward pass (gradients of ``W_dec``, of the latents and of ``W_enc``; the
input needs none), five products of ``2 B d_in d_sae`` FLOPs each, timed alone with ``torch.mm`` on the same
threads. ``ratio = ceiling time / step time`` (target >= 0.6). ``loop`` is the same step written as a bare PyTorch
loop (no Lightning, no data loader), to separate the framework's overhead from the SAE's own.

**Extraction overhead.** :class:`~lightning_xai.models.activations.ActivationSource` (stopping the forward pass
after the layer, and without stopping) against a plain ``model(x)`` under ``no_grad``, as a ratio.

**Recovery.** 64 (quick: 64) / 256 known unit directions in 32 / 64 dimensions, each active with probability
0.03 (sae_lens.synthetic style): mean and minimum over the true directions of the best cosine similarity with a
decoder column (target: mean >= 0.9).

**Token models.** A :class:`~lightning_xai.models.transformers.TextTransformer` (width 32 / 64, 2 blocks) is
trained on :class:`~lightning_xai.data.tokens.PlantedTokens` with variable lengths (a quarter of the positions
are padding), then a TopK SAE (8x expansion) is trained with ``Trainer.fit`` on its residual stream after the last
block (``spatial="tokens"``: one row per real token, cached on disk, normalised). Reported on the test split: rows
(real tokens) against all positions, explained variance (``1 - fvu``), L0, dead fraction, the classifier's
cross-entropy clean / with the reconstruction spliced in / with the layer zero-ablated and the loss recovered
``(ce_zero - ce_sae) / (ce_zero - ce_orig)``; the time ratios are the token extraction (with its padding mask)
against a plain forward pass, and the SAE's whole fit (caching included) against the frozen model's training.

Machines are noisy (a shared CPU changes every number); quote ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.data.tokens import PAD_TOKEN, PlantedTokens, PlantedTokensDataModule
from lightning_xai.models.activations import (
    ActivationCache,
    ActivationDataModule,
    ActivationSource,
    CachedActivationBatches,
)
from lightning_xai.models.backbones import SmallCNN, build_backbone
from lightning_xai.models.sae import ReLUSAEConfig, SAEConfig, SparseAutoencoder, TopKSAEConfig, build_sae
from lightning_xai.models.transformers import TextTransformer
from lightning_xai.namespace import pl

warnings.filterwarnings("ignore")


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------- throughput
def matmul_ceiling(batch: int, d_in: int, d_sae: int, repeats: int) -> float:
    """Seconds of the five dense products of one training step (module docstring)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g)
    f = torch.randn(batch, d_sae, generator=g)
    w_enc = torch.randn(d_in, d_sae, generator=g)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    grad_out = torch.randn(batch, d_in, generator=g)

    def products() -> None:
        torch.mm(x, w_enc)  # encoder
        torch.mm(f, w_dec)  # decoder
        torch.mm(f.t(), grad_out)  # dL/dW_dec
        torch.mm(grad_out, w_dec.t())  # dL/df
        torch.mm(x.t(), f)  # dL/dW_enc

    return median_time(products, repeats)


class StepTimer(pl.Callback):
    """Wall time from one training batch's start to the next one's (data loading included)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def lightning_step_time(config: SAEConfig, batch: int, steps: int, warmup: int) -> float:
    d_in = config.d_in
    with tempfile.TemporaryDirectory() as directory:
        cache = ActivationCache(directory)
        rows = batch * 4
        data = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(1))
        cache.write({}, 0, 1, rows, data.split(batch))
        batches = CachedActivationBatches(cache.paths(0, 1)[0], rows, batch, shuffle=True)
        timer = StepTimer()
        pl.seed_everything(0)
        module = SparseAutoencoder(config, lr=1e-4, downstream=False)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=warmup + steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            log_every_n_steps=1,
        )
        trainer.fit(module, DataLoader(batches, batch_size=None))
    cycles = [b - a for a, b in zip(timer.starts[warmup:], timer.starts[warmup + 1 :])]
    return statistics.median(cycles)


def loop_step_time(config: SAEConfig, batch: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    sae = build_sae(config)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # as SparseAutoencoder
    x = torch.randn(batch, config.d_in)
    dead = torch.zeros(config.d_sae, dtype=torch.bool)

    def step() -> None:
        out = sae.training_forward(x, step=1, dead=dead)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_gradient()
        optimizer.step()
        sae.normalize_decoder()

    return median_time(step, steps, warmup)


# ---------------------------------------------------------------------------------------------------------- extraction
def extraction_rows(repeats: int, batch: int) -> list[tuple[str, float, float, float]]:
    rows = []
    x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    cases = [
        ("SmallCNN 64x64, features", SmallCNN(num_classes=8).eval(), "features"),
        ("ResNet-18 64x64, layer2", build_backbone("resnet18", 8).eval(), "layer2"),
        ("ResNet-18 64x64, layer4", build_backbone("resnet18", 8).eval(), "layer4"),
    ]
    for label, model, layer in cases:
        early = ActivationSource(model, layer)
        full = ActivationSource(model, layer, stop_at_layer=False)

        def plain(m=model) -> None:
            with torch.no_grad():
                m(x)

        fns = (plain, lambda s=early: s(x), lambda s=full: s(x))
        for fn in fns:
            fn()  # warm-up (and the sources learn the layer's number of calls)
        times: list[list[float]] = [[], [], []]
        for _ in range(repeats):  # interleaved, so that a load change on a shared machine hits all three alike
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
        t_plain, t_early, t_full = (statistics.median(t) for t in times)
        rows.append((label, t_plain, t_early / t_plain, t_full / t_plain))
    return rows


# ---------------------------------------------------------------------------------------------------------- recovery
def superposition(n: int, num_features: int, d: int, p: float = 0.03, seed: int = 100):
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(num_features, d, generator=g), dim=1)
    active = torch.rand(n, num_features, generator=g) < p
    return (active * (0.5 + torch.rand(n, num_features, generator=g))) @ features, features


def recovery(config: SAEConfig, num_features: int, n: int, epochs: int, lr: float) -> tuple[float, float, float]:
    x, features = superposition(n, num_features, config.d_in)
    pl.seed_everything(0)
    module = SparseAutoencoder(config, lr=lr, downstream=False)
    start = time.perf_counter()
    pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, DataLoader(TensorDataset(x), batch_size=128, shuffle=True))
    best = (features @ module.sae.decoder_weight.detach().t()).max(dim=1).values
    return float(best.mean()), float(best.min()), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------- tokens
TOKEN_DATA = dict(seq_len=32, min_length=16, vocab_size=64, keys_per_class=4)


def train_text_model(dim: int, n_train: int, epochs: int) -> tuple[TextTransformer, float]:
    """A TextTransformer fitted to PlantedTokens with a bare loop; returns it (eval mode) and the seconds."""
    torch.manual_seed(0)
    data = PlantedTokens(size=n_train, seed=1, **TOKEN_DATA)
    model = TextTransformer(data.vocab_size, data.num_classes, max_len=data.seq_len, dim=dim, mlp_dim=2 * dim)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n_train)
        for i in range(0, n_train, 64):
            index = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(data.tokens[index]), data.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), time.perf_counter() - start


def token_row(dim: int, quick: bool) -> str:
    n_train = 1000 if quick else 4000
    model, model_seconds = train_text_model(dim, n_train, 4 if quick else 6)
    layer = f"blocks.{len(model.blocks) - 1}"
    datamodule = PlantedTokensDataModule(n_train=n_train, n_val=256, n_test=512, batch_size=64, **TOKEN_DATA)
    test = datamodule.make_dataset("test")
    # extraction (stopping after the layer, padding mask included) against a plain forward pass
    source = ActivationSource(model, layer, spatial="tokens")
    x = test.tokens[:256]

    def plain() -> None:
        with torch.no_grad():
            model(x)

    extraction = median_time(lambda: source(x), 10) / median_time(plain, 10)
    with tempfile.TemporaryDirectory() as directory:
        pl.seed_everything(0)
        data = ActivationDataModule(
            datamodule, model, layer, spatial="tokens", normalize=True, cache_dir=directory, batch_size=1024
        )
        module = SparseAutoencoder(TopKSAEConfig(d_in=dim, d_sae=8 * dim, k=8), lr=3e-3)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=4 if quick else 8,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(module, data)
        fit_seconds = time.perf_counter() - start
        m = {k: float(v) for k, v in trainer.test(module, data, verbose=False)[0].items()}
    real = int((test.tokens != PAD_TOKEN).sum()) + len(test)  # + the class token of every sequence
    positions = test.tokens.numel() + len(test)
    return (
        f"| dim {dim}, {layer} | {real} / {positions} | {m['test_explained_variance']:.3f} | {m['test_l0']:.1f} | "
        f"{m['test_dead_fraction']:.3f} | {m['test_ce_orig']:.3f} / {m['test_ce_sae']:.3f} / {m['test_ce_zero']:.3f} "
        f"| {m['test_downstream_score']:.3f} | {extraction:.2f} | {fit_seconds:.1f} / {model_seconds:.1f} = "
        f"{fit_seconds / model_seconds:.1f} |"
    )


def token_rows(quick: bool) -> list[str]:
    header = [
        "",
        "| token model, layer | rows / positions (test) | explained variance | L0 (k=8) | dead fraction | "
        "CE clean / SAE / zero | loss recovered | extraction / forward | SAE fit s / model fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    lines = list(header)
    for dim in (32,) if quick else (32, 64):
        row = token_row(dim, quick)
        lines.append(row)
        print(row, flush=True)
    return lines


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1024, fewer steps, small recovery run")
    parser.add_argument("--batch", type=int, default=None, help="activation vectors per step (default 4096)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--output", default=None, help="also write the markdown tables to this file")
    parser.add_argument("--tokens", action="store_true", help="only the token-model rows")
    args = parser.parse_args(argv)
    batch = args.batch or (1024 if args.quick else 4096)
    steps = args.steps or (6 if args.quick else 20)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if args.tokens:
        lines = [f"SAE on token models: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"]
        print(lines[0], flush=True)
        lines += token_rows(args.quick)
        if args.output:
            with open(args.output, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    d_in, d_sae = 512, 8 * 512
    lines = [
        f"SAE benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {batch} vectors, "
        f"d_in {d_in}, d_sae {d_sae}{' (quick)' if args.quick else ''}",
        "",
        "| variant | ceiling ms | step ms (Trainer) | vectors/s | ratio (target >= 0.6) | loop step ms | loop ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for label, config in (
        ("TopK k=32", TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=32)),
        ("ReLU-L1", ReLUSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=5.0)),
    ):
        # the ceiling is timed right before and after the runs it is compared with (a shared machine drifts)
        before = matmul_ceiling(batch, d_in, d_sae, max(3, steps // 4))
        step = lightning_step_time(config, batch, steps, warmup=2)
        loop = loop_step_time(config, batch, max(3, steps // 2), warmup=1)
        ceiling = 0.5 * (before + matmul_ceiling(batch, d_in, d_sae, max(3, steps // 4)))
        ok = "yes" if ceiling / step >= 0.6 else "NO"
        row = (
            f"| {label} | {ceiling * 1e3:.1f} | {step * 1e3:.1f} | {batch / step:,.0f} | {ceiling / step:.2f} ({ok}) "
            f"| {loop * 1e3:.1f} | {ceiling / loop:.2f} |"
        )
        lines.append(row)
        print(row, flush=True)

    header = [
        "",
        "| model, layer | forward ms | extraction / forward | without early stop / forward |",
        "|---|---|---|---|",
    ]
    lines += header
    print("\n".join(header), flush=True)
    for label, plain, early, full in extraction_rows(3 if args.quick else 10, 16 if args.quick else 32):
        row = f"| {label} | {plain * 1e3:.1f} | {early:.2f} | {full:.2f} |"
        lines.append(row)
        print(row, flush=True)

    header = ["", "| recovery run | mean max cosine (target >= 0.9) | min | seconds |", "|---|---|---|---|"]
    lines += header
    print("\n".join(header), flush=True)
    runs = [
        (
            "TopK k=4, 64 features in 32 dims",
            TopKSAEConfig(d_in=32, d_sae=128, k=4, dead_window=2048),
            64,
            8192,
            6,
            1e-2,
        )
    ]
    if not args.quick:
        runs += [
            (
                "ReLU-L1, 64 features in 32 dims",
                ReLUSAEConfig(d_in=32, d_sae=128, l1_coefficient=0.3),
                64,
                16384,
                6,
                1e-2,
            ),
            (
                "TopK k=8, 256 features in 64 dims",
                TopKSAEConfig(d_in=64, d_sae=512, k=8, dead_window=4096),
                256,
                32768,
                6,
                1e-2,
            ),
        ]
    for label, config, num_features, n, epochs, lr in runs:
        mean, minimum, seconds = recovery(config, num_features, n, epochs, lr)
        row = f"| {label} | {mean:.3f} ({'yes' if mean >= 0.9 else 'NO'}) | {minimum:.3f} | {seconds:.1f} |"
        lines.append(row)
        print(row, flush=True)
    lines += token_rows(args.quick)
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
