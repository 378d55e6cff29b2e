"""Cost of the perturbation metrics relative to plain forward passes.

For DeletionAUC (64 steps), InsertionAUC (64 steps) and AOPC (64 regions, MoRF, uniform noise) on a small CNN
(32x32) and on torchvision's resnet18 (64x64, batch 8), prints the time per explained image and two ratios
(target: <= 1.1, i.e. building the perturbed images costs at most 10% on top of the unavoidable model
evaluations):

* to the same number of plain forward passes over the input images, in the same chunk size;
* to the very same forward passes replayed on the pre-built perturbed batches (captured with a pre-hook). On
  CPU, convolution speed depends on the data (a chunk of partly zeroed images is not timed like a chunk of
  natural ones), so this second ratio isolates the metric's own overhead. If ``quantus`` is importable,
Quantus's PixelFlipping / RegionPerturbation are timed on the same model and data (skipped cleanly otherwise).

Usage: ``.venv/bin/python benchmarks/metrics.py [--quick] [--device cpu|cuda] [--threads N]`` (on a shared CPU
machine use ``--threads 1``: times are then CPU times of one core).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_xai.evaluation import aopc, deletion_auc, insertion_auc


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return _time_interleaved([fn], device, repeats)[0]


def _time_interleaved(fns: list[Callable[[], object]], device: torch.device, repeats: int) -> list[float]:
    """Median time of each function, the runs interleaved so that load changes hit all of them alike.

    On CPU the clock is the process's CPU time (robust to other jobs on a shared machine; with ``--threads 1``
    it equals the compute time), on CUDA the synchronised wall time."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    for fn in fns:
        fn()  # warm-up (allocator, cuDNN autotuning)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            bucket.append(clock() - start)
    return [statistics.median(t) for t in times]


def _plain_forwards(model: nn.Module, inputs: torch.Tensor, total: int, batch_size: int) -> Callable[[], None]:
    """``total`` forward passes in chunks of ``batch_size`` over the input images (cycled), built beforehand: the
    unavoidable cost. (Real, varied images: on CPU a chunk of one repeated image runs ~15% faster.)"""
    order = torch.arange(total, device=inputs.device) % inputs.shape[0]
    chunks = [inputs[order[s : s + batch_size]] for s in range(0, total, batch_size)]

    def run() -> None:
        with torch.no_grad():
            for chunk in chunks:
                model(chunk)

    return run


def _captured_forwards(model: nn.Module, fn: Callable[[], object]) -> Callable[[], None]:
    """Run ``fn`` once, recording every input batch the model receives; return a function that replays exactly
    those forward passes on the pre-built batches (the metric's cost without building the perturbed images)."""
    chunks: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _m, args: chunks.append(args[0].detach().clone()))
    try:
        fn()
    finally:
        handle.remove()

    def run() -> None:
        with torch.no_grad():
            for chunk in chunks:
                model(chunk)

    return run


def _quantus_rows(model, inputs, attributions, target, steps, region_size, device, repeats) -> list[tuple]:
    try:
        import quantus
    except ImportError:
        return []
    import numpy as np

    x = inputs.cpu().numpy()
    a = attributions.sum(1, keepdim=True).cpu().numpy()
    y = np.asarray(target.cpu())
    rows = []
    pixels = inputs.shape[-1] * inputs.shape[-2]
    candidates = [
        (
            "quantus PixelFlipping",
            lambda: quantus.PixelFlipping(features_in_step=pixels // steps, disable_warnings=True),
        ),
        (
            "quantus RegionPerturbation",
            lambda: quantus.RegionPerturbation(patch_size=region_size, regions_evaluation=steps, disable_warnings=True),
        ),
    ]
    for name, make in candidates:
        try:
            metric = make()
            seconds = _time(
                lambda m=metric: m(model=model, x_batch=x, y_batch=y, a_batch=a, device=str(device)), device, repeats
            )
            rows.append((name, seconds))
        except Exception as err:  # an optional comparison must not break the benchmark
            print(f"  ({name} skipped: {type(err).__name__}: {err})")
    return rows


def benchmark(name: str, model: nn.Module, size: int, batch: int, device: torch.device, args) -> None:
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand(batch, 3, size, size, generator=gen).to(device)
    attributions = torch.randn(batch, 1, size, size, generator=gen).to(device)
    with torch.no_grad():
        target = model(inputs).argmax(1)
    steps, region = 64, size // 8  # 8x8 grid of regions = 64 AOPC steps
    bs = args.batch_size
    cases = [
        ("DeletionAUC", lambda: deletion_auc(attributions, inputs, model, target, steps=steps, batch_size=bs), steps),
        ("InsertionAUC", lambda: insertion_auc(attributions, inputs, model, target, steps=steps, batch_size=bs), steps),
        ("AOPC (MoRF)", lambda: aopc(attributions, inputs, model, target, region_size=region, batch_size=bs), steps),
    ]
    print(f"\n{name}: {batch} images {size}x{size}, chunks of {bs} images per forward, device {device}")
    print(
        f"  {'method':16s} {'forwards':>8s} {'ms/image':>9s} | {'plain ms/image':>14s} {'ratio':>6s} | "
        f"{'same-input ms/image':>19s} {'ratio':>6s}"
    )
    for label, fn, points in cases:
        total = batch * (points + 1)
        plain_fn, same_fn = _plain_forwards(model, inputs, total, bs), _captured_forwards(model, fn)
        plain, same, seconds = _time_interleaved([plain_fn, same_fn, fn], device, args.repeats)
        print(
            f"  {label:16s} {total:8d} {1e3 * seconds / batch:9.2f} | {1e3 * plain / batch:14.2f} "
            f"{seconds / plain:6.2f} | {1e3 * same / batch:19.2f} {seconds / same:6.2f}"
        )
    for label, seconds in _quantus_rows(model, inputs, attributions, target, steps, region, device, args.repeats):
        print(f"  {label:28s} {'':8s} {1e3 * seconds / batch:11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, small CNN + resnet18 batch 2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--batch-size", type=int, default=64, help="perturbed images per forward pass")
    args = parser.parse_args()
    args.repeats = 3 if args.quick else 7
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    benchmark("small CNN", SmallCNN(), 32, 2 if args.quick else 8, device, args)
    try:
        import torchvision
    except ImportError:
        print("\nresnet18 skipped: torchvision is not installed")
        return
    resnet = torchvision.models.resnet18(weights=None, num_classes=10)
    benchmark("resnet18", resnet, 64, 2 if args.quick else 8, device, args)


if __name__ == "__main__":
    main()
