"""Network dissection cost: time as a ratio to one plain forward pass over the same probe set, and peak memory
against the probe-set size.

    python benchmarks/dissection.py            # resnet18 (random weights), ConceptScenes 64x64, CPU, 1 thread
    python benchmarks/dissection.py --quick    # fewer images and repeats
    python benchmarks/dissection.py --device cuda

Time table: ``forward`` is one plain forward pass of the whole model over the probe set (eval, no_grad, same
batches); ``dissect`` is :class:`~lightning_xai.interpretation.dissection.NetworkDissection` with its defaults
(forward stopped after the layer, activations cached for the second pass); ``no cache`` recomputes them
(``cache_bytes=0``: two forward passes up to the layer). Target from the issue: ``ratio <= 1.5``.

Memory table: peak resident memory (CPU) or peak allocated CUDA memory *added* by the dissection over a process
that has built the model and run one forward pass, one fresh subprocess per probe-set size, with batches
generated on the fly so that the data itself does not grow. The constant part is the chunked second pass
(bounded by ``chunk_elements``) and the sketch; with the cache the growth is the cached layer activations, capped
by ``cache_bytes``; without it memory is flat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from lightning_xai.data.concepts import ConceptScenes
from lightning_xai.interpretation.dissection import NetworkDissection

IMAGE_SIZE = 64
BATCH = 32


class LazyProbe:
    """Re-iterable ConceptScenes batches generated from a per-batch seed (same batches on every pass)."""

    def __init__(self, n: int, batch: int = BATCH, seed: int = 0) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.concept_names = ConceptScenes(1, IMAGE_SIZE, seed=0).concept_names

    def __iter__(self):
        for b, start in enumerate(range(0, self.n, self.batch)):
            size = min(self.batch, self.n - start)
            ds = ConceptScenes(size, IMAGE_SIZE, seed=self.seed + b)
            yield ds.images, ds.concept_masks_for(slice(None)), torch.arange(start, start + size)


class SyntheticProbe:
    """Re-iterable batches of random images with one random rectangle per concept, generated per batch from a
    seed with fixed-size allocations (for the memory table: ConceptScenes' own generation fragments the heap)."""

    def __init__(self, n: int, batch: int = BATCH, concepts: int = 18, seed: int = 0) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.concept_names = [f"concept:{i}" for i in range(concepts)]

    def __iter__(self):
        grid = torch.arange(IMAGE_SIZE)
        for b, start in enumerate(range(0, self.n, self.batch)):
            size = min(self.batch, self.n - start)
            g = torch.Generator().manual_seed(self.seed + b)
            images = torch.rand(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
            corners = torch.randint(0, IMAGE_SIZE, (4, size, len(self.concept_names), 1), generator=g)
            y0, y1 = corners[0].minimum(corners[1]), corners[0].maximum(corners[1])
            x0, x1 = corners[2].minimum(corners[3]), corners[2].maximum(corners[3])
            rows = (grid >= y0) & (grid <= y1)  # [B, C, H]
            cols = (grid >= x0) & (grid <= x1)  # [B, C, W]
            yield images, rows[..., :, None] & cols[..., None, :], torch.arange(start, start + size)


def make_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval().to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_table(n: int, repeats: int, device: torch.device, layers: list[str]) -> list[dict]:
    model = make_model(device)
    data = [(x.to(device), m.to(device), i) for x, m, i in LazyProbe(n)]  # in memory: time compute, not generation
    names = LazyProbe(1).concept_names

    def forward() -> None:
        with torch.no_grad():
            for x, _m, _i in data:
                model(x)
        _sync(device)

    rows = []
    for layer in layers:
        cached = NetworkDissection(layer)
        uncached = NetworkDissection(layer, cache_bytes=0)
        runs = {
            "forward": forward,
            "dissect": lambda d=cached: (d(model, data, names), _sync(device)),
            "no_cache": lambda d=uncached: (d(model, data, names), _sync(device)),
        }
        for fn in runs.values():
            fn()  # warm-up
        # interleaved repeats: a ratio is taken between runs made moments apart (shared machines are noisy)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ratio = [d / f for d, f in zip(times["dissect"], times["forward"])]
        ratio_no_cache = [d / f for d, f in zip(times["no_cache"], times["forward"])]
        rows.append(
            {
                "layer": layer,
                "forward_s": statistics.median(times["forward"]),
                "dissect_s": statistics.median(times["dissect"]),
                "ratio": statistics.median(ratio),
                "no_cache_s": statistics.median(times["no_cache"]),
                "no_cache_ratio": statistics.median(ratio_no_cache),
            }
        )
    return rows


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_rss() -> int:
    """This process's peak resident memory. ``/proc`` (Linux): ``ru_maxrss`` would also count the parent's peak,
    which a child started with fork + exec inherits."""
    try:
        return _status_bytes("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> int:
    """Reset the peak to the current resident memory (Linux ``clear_refs``) and return it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except (OSError, KeyError):
        return _peak_rss()


def memory_child(n: int, layer: str, cache: bool, device_name: str) -> None:
    """Run in a subprocess: print the peak memory added by one dissection of ``n`` lazily generated images."""
    torch.set_num_threads(1)
    device = torch.device(device_name)
    model = make_model(device)
    probe = SyntheticProbe(n)
    warm = next(iter(SyntheticProbe(BATCH)))
    with torch.no_grad():
        model(warm[0].to(device))  # allocator and kernels warmed up before the baseline
    dissection = NetworkDissection(layer, cache_bytes=256 * 2**20 if cache else 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak_rss()
    dissection(model, probe, probe.concept_names)
    if device.type == "cuda":
        added = torch.cuda.max_memory_allocated() - before
    else:
        added = _peak_rss() - before
    print(json.dumps({"n": n, "added_bytes": int(added)}))


def memory_table(sizes: list[int], layer: str, device: str) -> list[dict]:
    rows = []
    for cache in (True, False):
        for n in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), layer, str(int(cache)), device],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            result = json.loads(out.splitlines()[-1])
            rows.append({"layer": layer, "cache": cache, "n": n, "added_mib": result["added_bytes"] / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", help="probe-set sizes of the memory table")
    parser.add_argument("--memory-child", nargs=4, metavar=("N", "LAYER", "CACHE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        n, layer, cache, device = args.memory_child
        memory_child(int(n), layer, bool(int(cache)), device)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, repeats = (128, 3) if args.quick else (256, 5)
    layers = ["layer2", "layer3", "layer4"]
    print(
        f"resnet18 (random weights), ConceptScenes {IMAGE_SIZE}x{IMAGE_SIZE}, {n} images, batch {BATCH}, "
        f"{device}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'layer':8} {'forward s':>10} {'dissect s':>10} {'ratio':>7} {'no-cache s':>11} {'ratio':>7}  target")
    for row in time_table(n, repeats, device, layers):
        print(
            f"{row['layer']:8} {row['forward_s']:10.3f} {row['dissect_s']:10.3f} {row['ratio']:7.2f} "
            f"{row['no_cache_s']:11.3f} {row['no_cache_ratio']:7.2f}  <= 1.5"
        )
    sizes = args.sizes or ([128, 512] if args.quick else [128, 512, 2048])
    print()
    print("peak memory added by one dissection (layer3), data generated on the fly")
    print(f"{'cache':6} {'images':>7} {'added MiB':>10}")
    for row in memory_table(sizes, "layer3", args.device):
        print(f"{'on' if row['cache'] else 'off':6} {row['n']:7d} {row['added_mib']:10.1f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
