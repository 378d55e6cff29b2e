"""Cost of the transformer attributions, as ratios to one forward + backward pass measured in the same run.

    python benchmarks/transformers.py                # tiny ViT (64x64, 8x8 patches) and text transformer, CPU
    python benchmarks/transformers.py --quick        # smaller batches, fewer repeats
    python benchmarks/transformers.py --peers        # also Captum's LayerIntegratedGradients on the embedding

Two random-weight models (the cost does not depend on training):

* ViT: torchvision ``VisionTransformer`` via :func:`~lightning_xai.models.transformers.vit_tiny` (64x64 images,
  8x8 patches = 65 tokens, width 64, 4 blocks, 4 heads), batch 8. Reference unit: forward + gradient with
  respect to the input images.
* Text: :class:`~lightning_xai.models.transformers.TextTransformer` (vocabulary 1000, 64 tokens, width 64,
  4 blocks, 4 heads), batch 16. Reference unit: forward + gradient with respect to the embedding output (token
  ids have no gradient).

Columns: median CPU time of the method; ``ratio`` = method / reference unit of the same repetition; ``per unit``
= ratio / number of model evaluations the method runs (IG steps; occlusion windows, against a plain forward);
``extra MB`` = peak resident memory added while the method runs once, sampled every millisecond in this process,
``mem x`` = that over the reference unit's. With ``--memory`` the script re-executes itself with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 4 KiB, so that every buffer of a page or more is ``mmap``-ed and returned on
free and the resident set follows the live tensors (glibc's default threshold adapts upwards and then keeps freed
buffers, which hides them); the system calls slow that run down, so quote times from a run without ``--memory``.
Machines are noisy: quote ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning_xai.attribution.attention  # these imports register the methods by name
import lightning_xai.attribution.lrp.transformer
import lightning_xai.attribution.token_surrogate  # noqa: F401
from benchmarks.measure import PeakMemory, cpu_seconds
from lightning_xai.attribution.base import build_attributor
from lightning_xai.attribution.tokens import embedding_swap
from lightning_xai.models.transformers import TextTransformer, vit_tiny


@dataclass
class Case:
    label: str
    spec: dict
    unit: str = "fwd_bwd"  # or "fwd"
    units: float = 1.0


def vit_cases() -> list[Case]:
    return [
        Case("Saliency", {"name": "saliency"}),
        Case(
            "IntegratedGradients (32 steps)", {"name": "integrated_gradients", "steps": 32, "batch_size": 64}, units=32
        ),
        Case("AttentionRollout", {"name": "attention_rollout"}, unit="fwd"),
        Case("TransformerAttribution", {"name": "transformer_attribution"}),
        Case("AttnLRP", {"name": "attnlrp"}),
        Case("CP-LRP", {"name": "attnlrp", "attention_rule": "cp"}),
        Case("GradCAM (token layer, reshape)", {"name": "gradcam", "layer": "encoder.layers.encoder_layer_3.ln_1"}),
    ]


def text_cases(length: int) -> list[Case]:
    skip = {"skip_tokens": [0]}
    return [
        Case("TokenSaliency", {"name": "token_saliency", **skip}),
        Case("TokenInputXGradient", {"name": "token_input_x_gradient", **skip}),
        Case(
            "TokenIntegratedGradients (32 steps)",
            {"name": "token_integrated_gradients", "baseline": 1, "steps": 32, "batch_size": 64, **skip},
            units=32,
        ),
        Case(
            f"TokenOcclusion ({length} windows)",
            {"name": "token_occlusion", "mask_token": 1, "batch_size": 64, **skip},
            unit="fwd",
            units=length,
        ),
        Case("AttentionRollout", {"name": "attention_rollout"}, unit="fwd"),
        Case("TransformerAttribution", {"name": "transformer_attribution"}),
        Case("AttnLRP", {"name": "attnlrp", "embedding": "embedding"}),
        Case("CP-LRP", {"name": "attnlrp", "attention_rule": "cp", "embedding": "embedding"}),
        Case("TokenLIME (256 samples)", {"name": "token_lime", "num_samples": 256, **skip}, unit="fwd", units=256),
        Case(
            "TokenKernelSHAP (256 samples)",
            {"name": "token_kernel_shap", "num_samples": 256, **skip},
            unit="fwd",
            units=256,
        ),
    ]


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory added while ``fn()`` runs (MB), sampled every millisecond (Linux only)."""
    with PeakMemory(interval=0.001) as memory:
        fn()
    return memory.extra_mb


def vit_setup(batch: int):
    torch.manual_seed(0)
    model = vit_tiny(image_size=64, patch_size=8, num_classes=10, dim=64, depth=4, heads=4, mlp_dim=128).eval()
    x = torch.rand(batch, 3, 64, 64)
    target = torch.arange(batch) % 10

    def fwd_bwd() -> None:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).gather(1, target.view(-1, 1)).sum(), xi)

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    return model, x, target, fwd_bwd, fwd


def text_setup(batch: int, length: int):
    torch.manual_seed(0)
    model = TextTransformer(1000, 10, max_len=length, dim=64, depth=4, heads=4, mlp_dim=128).eval()
    ids = torch.randint(2, 1000, (batch, length))
    ids[: batch // 2, 3 * length // 4 :] = 0  # half the batch padded
    target = torch.arange(batch) % 10

    def fwd_bwd() -> None:
        with embedding_swap(model, "embedding") as swap:
            out = swap.run(model, ids, lambda e: e.detach().requires_grad_(True))
            assert swap.output is not None
            torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), swap.output)

    def fwd() -> None:
        with torch.no_grad():
            model(ids)

    return model, ids, target, fwd_bwd, fwd


def run_table(title: str, setup, cases: list[Case], repeats: int, memory: bool) -> float:
    model, x, target, fwd_bwd, fwd = setup
    fwd_bwd(), fwd()
    ref_fb = [cpu_seconds(fwd_bwd) for _ in range(repeats)]
    ref_f = [cpu_seconds(fwd) for _ in range(repeats)]
    t_fb, t_f = statistics.median(ref_fb), statistics.median(ref_f)
    print(f"\n{title}")
    print(f"reference (CPU time): forward + backward {t_fb * 1e3:.1f} ms, forward {t_f * 1e3:.1f} ms")
    ref_mb = peak_extra_mb(fwd_bwd) if memory else float("nan")
    if memory:
        print(f"peak extra memory of the reference unit: {ref_mb:.1f} MB")
    header = f"| {'method':38s} | {'cpu ms':>8s} | {'ratio':>7s} | {'per unit':>8s} |"
    if memory:
        header += " extra MB | mem x |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for case in cases:
        try:
            attributor = build_attributor(case.spec)
            attributor(model, x, target)  # warm-up (and: does it run at all?)
        except (ValueError, TypeError) as err:
            print(f"| {case.label:38s} | n/a: {str(err)[:90]}")
            continue
        ratios, per_unit, times = [], [], []
        for _ in range(repeats):
            r_fb, r_f = cpu_seconds(fwd_bwd), cpu_seconds(fwd)
            t = cpu_seconds(lambda a=attributor: a(model, x, target))
            times.append(t)
            ratios.append(t / r_fb)
            per_unit.append(t / ((r_fb if case.unit == "fwd_bwd" else r_f) * case.units))
        row = (
            f"| {case.label:38s} | {statistics.median(times) * 1e3:8.1f} | {statistics.median(ratios):7.2f} | "
            f"{statistics.median(per_unit):8.3f} |"
        )
        if memory:
            extra = peak_extra_mb(lambda a=attributor: a(model, x, target))
            row += f" {extra:8.1f} | {extra / max(ref_mb, 1e-9):5.1f} |"
        print(row, flush=True)
    return t_fb


def run_captum_peer(setup, steps: int, repeats: int) -> None:
    """Our TokenIntegratedGradients next to Captum's LayerIntegratedGradients on the same embedding layer."""
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError:
        print("\nCaptum is not installed: peer comparison skipped")
        return
    import copy

    model, ids, target, _, _ = setup
    peer_model = copy.deepcopy(model)
    ours = build_attributor(
        {"name": "token_integrated_gradients", "baseline": 1, "steps": steps, "batch_size": 64, "skip_tokens": [0]}
    )
    lig = LayerIntegratedGradients(peer_model, peer_model.embedding)
    baseline_ids = torch.where(ids == 0, ids, torch.ones_like(ids))

    def peer() -> torch.Tensor:
        out = lig.attribute(
            ids, baselines=baseline_ids, target=target, n_steps=steps, method="gausslegendre", internal_batch_size=64
        )
        return out.sum(-1)

    a, b = ours(model, ids, target), peer()
    t_ours, t_peer = [], []
    for _ in range(repeats):
        t_ours.append(cpu_seconds(lambda: ours(model, ids, target)))
        t_peer.append(cpu_seconds(peer))
    scale = torch.maximum(a.abs().amax(1), b.abs().amax(1)).clamp_min(1e-12)
    rel = float(((a - b).abs().amax(1) / scale).max())
    print(
        f"\npeer: TokenIntegratedGradients ({steps} steps, Gauss-Legendre, mask baseline) "
        f"{statistics.median(t_ours) * 1e3:.1f} ms | Captum LayerIntegratedGradients "
        f"{statistics.median(t_peer) * 1e3:.1f} ms | ours/peer "
        f"{statistics.median(t_ours) / statistics.median(t_peer):.2f} | rel diff {rel:.2e}"
    )


def run_gradcam_peer(setup, layer: str, repeats: int) -> None:
    """Our GradCAM on a ViT token layer (patch grid inferred) next to pytorch-grad-cam's GradCAM with the
    ``reshape_transform`` its documentation asks ViT users to write (drop the class token, lay out the grid)."""
    try:
        from pytorch_grad_cam import GradCAM as LibraryGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("\npytorch-grad-cam is not installed: peer comparison skipped")
        return
    import copy

    model, x, target, _, _ = setup
    peer_model = copy.deepcopy(model)
    module = dict(peer_model.named_modules())[layer]
    side = round((module_tokens(peer_model, x, layer) - 1) ** 0.5)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    try:
        ours = build_attributor({"name": "gradcam", "layer": layer})
        a = ours(model, x, target)
    except (ValueError, TypeError) as err:
        print(f"\npeer: GradCAM on a ViT token layer: n/a ({str(err)[:100]})")
        return
    targets = [ClassifierOutputTarget(int(c)) for c in target]

    def peer() -> torch.Tensor:
        with LibraryGradCAM(model=peer_model, target_layers=[module], reshape_transform=reshape) as cam:
            return torch.from_numpy(cam(input_tensor=x.clone(), targets=targets)).unsqueeze(1)

    b = peer()
    t_ours = [cpu_seconds(lambda: ours(model, x, target)) for _ in range(repeats)]
    t_peer = [cpu_seconds(peer) for _ in range(repeats)]
    flat = a.flatten(1)
    low, span = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True)
    a01 = ((flat - low) / torch.where(span > 0, span, torch.ones_like(span))).view_as(a)  # the peer's min-max
    rel = float((a01 - b.to(a01.dtype)).abs().amax())
    print(
        f"\npeer: GradCAM on {layer} (ours: grid inferred) {statistics.median(t_ours) * 1e3:.1f} ms | "
        f"pytorch-grad-cam with reshape_transform {statistics.median(t_peer) * 1e3:.1f} ms | ours/peer "
        f"{statistics.median(t_ours) / statistics.median(t_peer):.2f} | max diff after min-max {rel:.2e}"
    )


def module_tokens(model: torch.nn.Module, x: torch.Tensor, layer: str) -> int:
    """The token count of ``layer``'s output for ``x``."""
    shapes: list[int] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda _m, _i, o: shapes.append(o.shape[1]))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    return shapes[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: small batches, 2 repetitions")
    parser.add_argument("--memory", action="store_true", help="peak extra resident memory per method")
    parser.add_argument("--peers", action="store_true", help="Captum LayerIntegratedGradients if installed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.memory and "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(args.threads)
    vit_batch, text_batch, length, repeats = (2, 4, 32, 2) if args.quick else (8, 16, 64, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repetitions")
    vit = vit_setup(vit_batch)
    run_table(
        f"ViT (vit_tiny 64x64 / 8x8 patches, width 64, 4 blocks, 4 heads), batch {vit_batch}",
        vit,
        vit_cases(),
        repeats,
        args.memory,
    )
    text = text_setup(text_batch, length)
    run_table(
        f"Text (TextTransformer, {length} tokens, vocabulary 1000, width 64, 4 blocks, 4 heads), batch {text_batch}",
        text,
        text_cases(length),
        repeats,
        args.memory,
    )
    if args.peers:
        run_gradcam_peer(vit, "encoder.layers.encoder_layer_3.ln_1", repeats)
        run_captum_peer(text, 32, repeats)


if __name__ == "__main__":
    main()
