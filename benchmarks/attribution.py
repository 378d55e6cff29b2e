"""Attribution cost, as CPU-time ratios to one forward + input-gradient pass measured right next to each method.

    python benchmarks/attribution.py                 # resnet18 (random weights), batch 8 of 3x64x64, CPU
    python benchmarks/attribution.py --quick         # smoke run: batch 2 of 3x64x64, 2 repetitions
    python benchmarks/attribution.py --memory        # also the peak extra memory per method (a subprocess each)
    python benchmarks/attribution.py --peers         # also Captum / Zennit / pytorch-grad-cam if installed

**Interleaved measurement.** Each repetition runs the reference passes (a forward + input-gradient pass and a
plain forward of the same batch) immediately before the method, and the method's ratio is taken against that
repetition's own reference. The cost is CPU time of the process (``time.process_time``, all threads), which a busy
shared machine disturbs much less than wall time; each row reports the median ratio over the repetitions and its
spread (min - max), so a noisy row is visible as such.

Columns: median CPU time of the method; ``ratio`` = method / (forward + input-gradient) CPU time, median and
``min-max``; ``per unit`` = ratio divided by the method's number of model evaluations (IG steps, SmoothGrad
samples, Score-CAM channels, occlusion windows, RISE masks), where the unit is a forward + backward (gradient
methods) or a forward pass (perturbation methods, against the plain forward); ``target`` is the goal from the
issues (on the median per-unit ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import PeakMemory, cpu_seconds
from lightning_xai.attribution import ATTRIBUTORS, build_attributor
from lightning_xai.attribution.pattern import fit_patterns


@dataclass
class Case:
    label: str
    spec: dict
    #: "fwd_bwd" or "fwd": the cost of one unit of the method
    unit: str = "fwd_bwd"
    #: number of units the method runs (1 for single-pass methods)
    units: float = 1.0
    #: target on the per-unit ratio (None: no target)
    target: float | None = None


def cases(channels: int, windows: int, pd_windows: int, patterns: str) -> list[Case]:
    """The benchmarked configurations; ``patterns`` is the path of a PatternSet fitted to the benchmark model."""
    return [
        Case("Saliency", {"name": "saliency"}, target=1.1),
        Case("InputXGradient", {"name": "input_x_gradient"}, target=1.1),
        Case(
            "IntegratedGradients (32 steps)",
            {"name": "integrated_gradients", "steps": 32, "batch_size": 64},
            units=32,
            target=1.05,
        ),
        Case(
            "SmoothGrad (16 samples)",
            {"name": "smoothgrad", "num_samples": 16, "batch_size": 64},
            units=16,
            target=1.05,
        ),
        Case("CAM", {"name": "cam"}, unit="fwd", target=None),
        Case("GradCAM", {"name": "gradcam", "layer": "layer4"}, target=0.7),
        Case("GradCAM++", {"name": "gradcam_plus_plus", "layer": "layer4"}, target=0.7),
        Case("LayerCAM", {"name": "layercam", "layer": "layer4"}, target=0.7),
        Case(
            f"ScoreCAM ({channels} channels)",
            {"name": "scorecam", "layer": "layer4", "batch_size": 64},
            unit="fwd",
            units=channels,
            target=1.05,
        ),
        Case("Deconvnet", {"name": "deconvnet"}, target=1.1),
        Case("GuidedBackprop", {"name": "guided_backprop"}, target=1.1),
        Case("GuidedGradCAM", {"name": "guided_gradcam", "layer": "layer4"}, target=None),
        Case("LRP epsilon", {"name": "lrp", "composite": "epsilon"}, target=2.0),
        Case("LRP epsilon-plus", {"name": "lrp", "composite": "epsilon_plus"}, target=2.0),
        Case("LRP epsilon-gamma-box", {"name": "lrp", "composite": "epsilon_gamma_box"}, target=2.0),
        Case("PatternNet", {"name": "patternnet", "patterns": patterns}, target=None),
        Case("PatternAttribution", {"name": "pattern_attribution", "patterns": patterns}, target=None),
        Case(
            f"Occlusion ({windows} windows)",
            {"name": "occlusion", "window": 16, "stride": 8, "batch_size": 64},
            unit="fwd",
            units=windows,
            target=1.05,
        ),
        Case(
            "RISE (256 masks)",
            {"name": "rise", "num_samples": 256, "batch_size": 64},
            unit="fwd",
            units=256,
            target=1.05,
        ),
        Case("LIME (256 samples)", {"name": "lime", "num_samples": 256, "batch_size": 64}, unit="fwd", units=256),
        Case(
            "KernelSHAP (256 samples)",
            {"name": "kernel_shap", "num_samples": 256, "batch_size": 64},
            unit="fwd",
            units=256,
        ),
        Case(
            "MeaningfulPerturbation (50 iters)",
            {"name": "meaningful_perturbation", "iterations": 50},
            units=50,
        ),
        Case(
            f"PredDifference cond. ({pd_windows} win x 4 smp)",
            {"name": "prediction_difference", "window": 8, "num_samples": 4, "batch_size": 64, "reference": 32},
            unit="fwd",
            units=1 + pd_windows * 4,
        ),
        Case(
            f"PredDifference marg. ({pd_windows} win x 4 smp)",
            {"name": "prediction_difference", "window": 8, "num_samples": 4, "batch_size": 64, "sampling": "marginal"},
            unit="fwd",
            units=1 + pd_windows * 4,
        ),
    ]


def make_attributor(spec: dict, size: int):
    """The attributor of a benchmark case; ``"reference": N`` stands for N random reference images (JSON-able)."""
    spec = dict(spec)
    if isinstance(spec.get("reference"), int):
        spec["reference"] = torch.rand(spec["reference"], 3, size, size, generator=torch.Generator().manual_seed(1))
    return build_attributor(spec)


def interleaved(
    method: Callable[[], object], fwd_bwd: Callable[[], object], fwd: Callable[[], object], repeats: int
) -> dict[str, list[float]]:
    """CPU times of ``repeats`` repetitions of (reference forward + backward, reference forward, method), after one
    warm-up of each; the method's ratios are taken against the references of its own repetition."""
    fwd_bwd(), fwd(), method()
    out: dict[str, list[float]] = {"method": [], "fwd_bwd": [], "fwd": []}
    for _ in range(repeats):
        out["fwd_bwd"].append(cpu_seconds(fwd_bwd))
        out["fwd"].append(cpu_seconds(fwd))
        out["method"].append(cpu_seconds(method))
    return out


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def build_setup(batch: int, size: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(batch, 3, size, size)
    target = torch.arange(batch) % 10
    return model, x, target


def reference_passes(model, x, target) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two reference computations: forward + input-gradient, and a plain forward (no autograd)."""

    def fwd_bwd() -> None:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), xi)

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    return fwd_bwd, fwd


def measure_extra_memory(spec_json: str, batch: int, size: int, threads: int) -> None:
    """Child process of :func:`peak_extra_mb`: prints the peak resident memory (MB) *added* while the method (or,
    for ``"null"``, the reference pass) runs once, over the resident memory just before the call. Sampled every
    millisecond from ``/proc/self/statm`` (torch's large CPU tensors are ``mmap``-ed and returned on free, so the
    resident set follows the live tensors). Linux only."""
    torch.set_num_threads(threads)
    model, x, target = build_setup(batch, size)
    spec = json.loads(spec_json)
    if spec is None:
        run = reference_passes(model, x, target)[0]
    else:
        attributor = make_attributor(spec, size)
        run = lambda: attributor(model, x, target)  # noqa: E731
    with PeakMemory(interval=0.001) as memory:
        run()
    print(memory.extra_mb)


def peak_extra_mb(spec: dict | None, batch: int, size: int, threads: int) -> float:
    """Peak extra resident memory (MB) of one run of the method in a fresh process (see
    :func:`measure_extra_memory`); ``spec=None`` measures the reference forward + input-gradient pass."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); from benchmarks.attribution import measure_extra_memory;"
        f"measure_extra_memory({json.dumps(spec)!r}, {batch}, {size}, {threads})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2 of 3x64x64, 2 repetitions")
    parser.add_argument("--memory", action="store_true", help="peak extra memory per method (a subprocess each)")
    parser.add_argument("--peers", action="store_true", help="time Captum / Zennit / pytorch-grad-cam if installed")
    parser.add_argument("--only", nargs="*", default=None, help="registry names to run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats = 2, 64, 2
    repeats = args.repeats
    threads = args.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    model, x, target = build_setup(args.batch, args.size)
    channels = model.fc.in_features
    feature = args.size // 32
    windows = ((args.size - 16) // 8 + 1) ** 2
    pd_windows = (args.size // 8) ** 2
    patterns_dir = tempfile.TemporaryDirectory(prefix="lxai-patterns-")  # removed at exit, also after an error
    patterns = os.path.join(patterns_dir.name, "resnet18.pt")
    fit_patterns(model, [x]).save(patterns)  # the patterns of the benchmark batch itself (a cost-only set-up)
    fwd_bwd, fwd = reference_passes(model, x, target)
    reference = interleaved(fwd, fwd_bwd, fwd, repeats)
    t_fb, t_f = statistics.median(reference["fwd_bwd"]), statistics.median(reference["fwd"])
    print(
        f"resnet18 (random weights), batch {args.batch} of 3x{args.size}x{args.size}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}; layer4 is {channels}x{feature}x{feature}; {repeats} repetitions"
    )
    print(
        f"reference (CPU time): forward + input-gradient {t_fb * 1e3:.1f} ms, forward {t_f * 1e3:.1f} ms "
        f"(forward/fwd+bwd = {t_f / t_fb:.2f})"
    )
    if args.memory:
        reference_mb = peak_extra_mb(None, args.batch, args.size, threads)
        print(f"peak extra memory of the reference pass: {reference_mb:.0f} MB (mem x = method / reference)")
    print()
    header = (
        f"| {'method':40s} | {'cpu ms':>9s} | {'ratio':>7s} | {'min-max':>13s} | {'per unit':>8s} | "
        f"{'min-max':>11s} | {'target':>6s} | {'ok':3s} |"
    )
    if args.memory:
        header += " extra MB | mem x |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for case in cases(channels, windows, pd_windows, patterns):
        if case.spec["name"] not in ATTRIBUTORS or (args.only and case.spec["name"] not in args.only):
            continue
        attributor = make_attributor(case.spec, args.size)
        times = interleaved(lambda a=attributor: a(model, x, target), fwd_bwd, fwd, repeats)
        ratios = [m / r for m, r in zip(times["method"], times["fwd_bwd"])]
        unit_refs = times["fwd_bwd"] if case.unit == "fwd_bwd" else times["fwd"]
        per_unit = [m / (r * case.units) for m, r in zip(times["method"], unit_refs)]
        t = statistics.median(times["method"])
        median_unit = statistics.median(per_unit)
        ok = "" if case.target is None else ("yes" if median_unit <= case.target else "NO")
        tgt = "" if case.target is None else f"{case.target:.2f}"
        row = (
            f"| {case.label:40s} | {t * 1e3:9.1f} | {statistics.median(ratios):7.2f} | {spread(ratios):>13s} | "
            f"{median_unit:8.3f} | {spread(per_unit):>11s} | {tgt:>6s} | {ok:3s} |"
        )
        if args.memory:
            extra = peak_extra_mb(case.spec, args.batch, args.size, threads)
            row += f" {extra:8.0f} | {extra / reference_mb:5.1f} |"
        print(row, flush=True)
    patterns_dir.cleanup()
    if args.peers:
        from benchmarks.peers import run_peers

        run_peers(model, x, target, t_fb, repeats)


if __name__ == "__main__":
    main()
