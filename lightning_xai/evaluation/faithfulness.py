"""Faithfulness metrics: does the explanation reflect what the model actually uses?

All metrics perturb the input guided by the attribution map and watch the model's score for the explained
class. Conventions shared by every function and metric here:

* **Inputs** are image batches ``[B, C, H, W]``; **attributions** ``[B, 1|C, H, W]`` (or ``[B, H, W]``) at the
  same spatial size, reduced to one signed relevance per pixel by summing channels. A pixel is perturbed in all
  channels at once. Maps with ``NaN``/``inf`` raise ``ValueError``.
* **Score** ``f(x)``: the model output for ``target`` (an int, a ``LongTensor[B]``, or a callable applied
  row-wise to the output, ``output -> Tensor[n]``), after a softmax over dim 1 when ``softmax=True``.
* **Model evaluation**: under ``torch.no_grad()`` in eval mode, every submodule's mode, ``requires_grad`` and
  ``.grad`` restored afterwards (:func:`~lightning_xai.attribution.base.model_state_guard`), also on error.
* **Bounded memory, no host round-trips**: all perturbed images of a batch (images x steps) are enumerated as
  one flat list of (image, step) pairs and evaluated in chunks of ``batch_size`` images per forward pass, each
  chunk mixing steps and images; the perturbed images are built on the inputs' device from a precomputed rank
  map (one comparison and one ``torch.where`` per chunk). Random perturbations are seeded per (image, sample)
  pair, so results depend neither on ``batch_size`` nor (for the metrics, which count the images they have
  seen) on how the data is split into ``update`` calls.

Metrics are :class:`torchmetrics.Metric` subclasses whose state is a sum and a count (``dist_reduce_fx="sum"``)
plus, for curve metrics, the per-sample curves (``"cat"``), so ``compute()`` is exact under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from lightning_xai.attribution.base import (
    Attributor,
    Target,
    build_attributor,
    check_positive_int,
    chunk_slices,
    model_state_guard,
    validate_target,
)
from lightning_xai.attribution.filters import gaussian_blur as shared_gaussian_blur
from lightning_xai.evaluation.localization import PerSampleMeanMetric, descending_ranks, heatmap_batch

__all__ = [
    "AOPC",
    "DeletionAUC",
    "Infidelity",
    "InsertionAUC",
    "MaxSensitivity",
    "aopc",
    "deletion_auc",
    "deletion_curve",
    "gaussian_blur",
    "infidelity",
    "insertion_auc",
    "insertion_curve",
    "max_sensitivity",
    "region_perturbation_curve",
]

#: The attributor MaxSensitivity re-runs: an Attributor, a registered name / dict, or any callable
#: ``(model, inputs, target) -> Tensor[B, 1|C, H, W]``.
AttributorSpec = Attributor | str | dict | Callable[[nn.Module, Tensor, Target], Tensor]

DEFAULT_STEPS = 64


# --------------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(inputs: Tensor) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got dtype {inputs.dtype}")
    if inputs.ndim != 4 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty image batch [B, C, H, W], got shape {list(inputs.shape)}")


def _heat_for(attributions: Tensor, inputs: Tensor) -> Tensor:
    """Validated ``[B, H, W]`` relevance for ``inputs [B, C, H, W]`` (on the inputs' device)."""
    _check_inputs(inputs)
    heat = heatmap_batch(attributions)
    b, _, h, w = inputs.shape
    if heat.shape != (b, h, w):
        raise ValueError(
            f"attributions of shape {list(attributions.shape)} do not match inputs of shape {list(inputs.shape)}: "
            f"expected [B, 1|C, H, W] with B={b}, H={h}, W={w}"
        )
    return heat.to(inputs.device)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _prepare_target(target: Target, batch: int, device: torch.device) -> Target:
    if target is None:
        raise TypeError("target is required: an int, a LongTensor[B] of class indices or a callable")
    validate_target(target, batch, None)
    if isinstance(target, Tensor):
        return int(target) if target.ndim == 0 else target.to(device=device, dtype=torch.long)
    return target


def _check_positive_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_steps(steps: int | None, step: int | None) -> tuple[int | None, int | None]:
    if steps is not None and step is not None:
        raise ValueError(f"give either steps (number of steps) or step (pixels per step), not both: {steps=}, {step=}")
    if step is not None:
        return None, check_positive_int("step", step)
    return check_positive_int("steps", DEFAULT_STEPS if steps is None else steps), None


def _check_baseline(baseline: float | Tensor, allowed: tuple[str, ...] = ()) -> float | Tensor | str:
    if isinstance(baseline, str):
        if baseline in allowed:
            return baseline
        raise ValueError(f"unknown baseline {baseline!r}; valid: a number, a Tensor or one of {list(allowed)}")
    if isinstance(baseline, Tensor):
        if not baseline.is_floating_point():
            raise TypeError(f"a baseline tensor must be floating point, got dtype {baseline.dtype}")
        return baseline.detach()
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
        valid = f"a finite number, a Tensor or one of {list(allowed)}" if allowed else "a finite number or a Tensor"
        raise ValueError(f"baseline must be {valid}, got {baseline!r}")
    return float(baseline)


def _baseline_images(baseline: float | Tensor, inputs: Tensor) -> Tensor:
    """The replacement images: ``[B, C, H, W]`` (an expanded view) for a tensor, a 0-dim tensor for a number."""
    if isinstance(baseline, Tensor):
        try:
            shape = torch.broadcast_shapes(baseline.shape, inputs.shape)
        except RuntimeError:
            shape = None
        if shape != inputs.shape:
            raise ValueError(
                f"a baseline of shape {list(baseline.shape)} does not broadcast to inputs of shape {list(inputs.shape)}"
            )
        return baseline.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
    return torch.tensor(baseline, device=inputs.device, dtype=inputs.dtype)


def _rows(images_or_scalar: Tensor, images: Tensor) -> Tensor:
    """``t[images]`` for a per-image tensor; a 0-dim tensor (a constant) is returned as is."""
    return images_or_scalar if images_or_scalar.ndim == 0 else images_or_scalar.index_select(0, images)


# --------------------------------------------------------------------------------------------------------------
# The chunked evaluation engine
# --------------------------------------------------------------------------------------------------------------


def _pick(output: Tensor, target: Target, images: Tensor) -> Tensor:
    if callable(target):
        scores = target(output)
        if not isinstance(scores, Tensor) or scores.shape != (output.shape[0],):
            got = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"a callable target must return Tensor[n] = [{output.shape[0]}] per chunk, got {got}")
        return scores
    if isinstance(target, Tensor):
        return output.gather(1, target[images].view(-1, 1)).squeeze(1)
    return output[:, target]


def _score_pairs(
    model: nn.Module,
    build: Callable[[slice, Tensor, Tensor], Tensor],
    num_images: int,
    num_points: int,
    target: Target,
    *,
    batch_size: int,
    softmax: bool,
    device: torch.device,
) -> Tensor:
    """Evaluate the score of ``num_images * num_points`` perturbed images, ``Tensor[num_images, num_points]``.

    Pair ``j`` is image ``j // num_points`` at point ``j % num_points``; ``build(slice, images, points)`` makes
    the input batch of one chunk of at most ``batch_size`` pairs.
    """
    _check_model(model)
    total = num_images * num_points
    out = torch.empty(total, device=device, dtype=torch.float32)
    checked = False
    with model_state_guard(model), torch.no_grad():
        for sl in chunk_slices(total, batch_size):
            pair = torch.arange(sl.start, sl.stop, device=device)
            images, points = pair // num_points, pair % num_points
            output = model(build(sl, images, points))
            if not isinstance(output, Tensor):
                raise TypeError(f"the model must return a Tensor, got {type(output).__name__}")
            if not checked:
                if not callable(target):
                    if output.ndim != 2:
                        raise ValueError(
                            f"an int or tensor target needs a model output [B, num_classes], got "
                            f"{list(output.shape)}; use a callable target for other outputs"
                        )
                    validate_target(target, num_images, output.shape[1])
                checked = True
            if softmax:
                output = output.softmax(dim=1)
            out[sl] = _pick(output, target, images).float()
    return out.view(num_images, num_points)


def _mix_seed(seed: int, image: int, draw: int) -> int:
    return ((seed * 1_000_003 + image) * 1_000_033 + draw) % (2**63 - 1)


def _seeded_noise(
    sl: slice,
    shape: tuple[int, ...],
    *,
    seed: int,
    points: int,
    offset: int,
    device: torch.device,
    dtype: torch.dtype,
    kind: str,
) -> Tensor:
    """One noise tensor of ``shape`` per pair ``j`` in ``sl``, seeded by (``seed``, image ``offset + j // points``,
    draw ``j % points``): independent of the chunking and of how the images are batched."""
    gen = torch.Generator(device=device)
    out = torch.empty((sl.stop - sl.start, *shape), device=device, dtype=dtype)
    for row, j in enumerate(range(sl.start, sl.stop)):
        gen.manual_seed(_mix_seed(seed, offset + j // points, j % points))
        if kind == "normal":
            out[row].normal_(generator=gen)
        else:
            out[row].uniform_(-1.0, 1.0, generator=gen)
    return out


# --------------------------------------------------------------------------------------------------------------
# Deletion and insertion (RISE)
# --------------------------------------------------------------------------------------------------------------


def gaussian_blur(images: Tensor, sigma: float = 5.0, kernel_size: int = 11) -> Tensor:
    """Blur ``images [B, C, H, W]`` with a normalised, separable Gaussian of ``sigma`` over a ``kernel_size``
    window (odd), replicating border pixels. The defaults are those of the RISE insertion baseline (Petsiuk
    et al., BMVC 2018). The filter is :func:`lightning_xai.attribution.filters.gaussian_blur`."""
    sigma = _check_positive_float("blur_sigma", sigma)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur_kernel_size must be a positive odd integer, got {kernel_size!r}")
    _check_inputs(images)
    return shared_gaussian_blur(images, sigma, radius=kernel_size // 2)


def _pixel_counts(num_pixels: int, steps: int | None, step: int | None) -> list[int]:
    if step is not None:
        return [min(k * step, num_pixels) for k in range(math.ceil(num_pixels / step) + 1)]
    assert steps is not None
    if steps > num_pixels:
        raise ValueError(f"steps={steps} exceeds the {num_pixels} pixels of the image; use steps <= {num_pixels}")
    return [(2 * k * num_pixels + steps) // (2 * steps) for k in range(steps + 1)]


def _pixel_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    insertion: bool,
    steps: int | None,
    step: int | None,
    baseline: float | Tensor | str,
    batch_size: int,
    softmax: bool,
    blur_sigma: float = 5.0,
    blur_kernel_size: int = 11,
) -> tuple[Tensor, Tensor]:
    steps, step = _check_steps(steps, step)
    check_positive_int("batch_size", batch_size)
    heat = _heat_for(attributions, inputs)
    b, _, h, w = inputs.shape
    target = _prepare_target(target, b, inputs.device)
    counts = _pixel_counts(h * w, steps, step)
    n = torch.tensor(counts, device=inputs.device, dtype=torch.int32)
    ranks = descending_ranks(heat).to(torch.int32).unsqueeze(1)
    if isinstance(baseline, str):
        other = gaussian_blur(inputs.detach(), blur_sigma, blur_kernel_size)
    else:
        other = _baseline_images(_check_baseline(baseline), inputs)
    x = inputs.detach()

    def build(_sl: slice, images: Tensor, points: Tensor) -> Tensor:
        changed = ranks.index_select(0, images) < n.index_select(0, points).view(-1, 1, 1, 1)
        if insertion:
            return torch.where(changed, x.index_select(0, images), _rows(other, images))
        return torch.where(changed, _rows(other, images), x.index_select(0, images))

    scores = _score_pairs(
        model, build, b, len(counts), target, batch_size=batch_size, softmax=softmax, device=inputs.device
    )
    fractions = n.to(torch.float32) / (h * w)
    return fractions, scores


def deletion_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    steps: int | None = None,
    step: int | None = None,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    softmax: bool = True,
) -> tuple[Tensor, Tensor]:
    """The deletion curve of RISE (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018).

    Pixels are replaced by ``baseline`` (a number, or a tensor broadcastable to the inputs) in order of
    decreasing relevance (ties in row-major order), all channels of a pixel together: after ``steps`` equal
    steps (default 64; point ``k`` has ``round(k * H * W / steps)`` pixels deleted) or ``step`` pixels per step.

    Returns ``(fractions, scores)``: ``fractions [P]`` in [0, 1] (fraction of pixels deleted, from 0 to 1) and
    ``scores [B, P]`` (score of the target at each point; ``scores[:, 0]`` is the unperturbed input).
    """
    return _pixel_curve(
        attributions,
        inputs,
        model,
        target,
        insertion=False,
        steps=steps,
        step=step,
        baseline=_check_baseline(baseline),
        batch_size=batch_size,
        softmax=softmax,
    )


def insertion_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    steps: int | None = None,
    step: int | None = None,
    baseline: float | Tensor | Literal["blur"] = "blur",
    blur_sigma: float = 5.0,
    blur_kernel_size: int = 11,
    batch_size: int = 64,
    softmax: bool = True,
) -> tuple[Tensor, Tensor]:
    """The insertion curve of RISE (Petsiuk et al., BMVC 2018).

    Starts from ``baseline`` - by default the input blurred by :func:`gaussian_blur` (``blur_sigma``,
    ``blur_kernel_size``), or a number / tensor - and inserts the original pixels in order of decreasing
    relevance (all channels together), with the step grid of :func:`deletion_curve`. Returns
    ``(fractions [P], scores [B, P])``; ``fractions`` is the fraction of pixels inserted, ``scores[:, -1]`` is
    the unperturbed input.
    """
    return _pixel_curve(
        attributions,
        inputs,
        model,
        target,
        insertion=True,
        steps=steps,
        step=step,
        baseline=_check_baseline(baseline, ("blur",)),
        batch_size=batch_size,
        softmax=softmax,
        blur_sigma=blur_sigma,
        blur_kernel_size=blur_kernel_size,
    )


def deletion_auc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area under :func:`deletion_curve` (trapezoid rule over the fraction of pixels), ``Tensor[B]``.

    With ``softmax=True`` the score is a probability and the AUC lies in [0, 1]; **lower is better** (the
    score should collapse when the most relevant pixels go first). Keyword arguments as for the curve.
    """
    fractions, scores = deletion_curve(attributions, inputs, model, target, **kwargs)
    return torch.trapezoid(scores, x=fractions, dim=1)


def insertion_auc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area under :func:`insertion_curve` (trapezoid rule over the fraction of pixels), ``Tensor[B]``.

    In [0, 1] with ``softmax=True``; **higher is better**. Keyword arguments as for the curve.
    """
    fractions, scores = insertion_curve(attributions, inputs, model, target, **kwargs)
    return torch.trapezoid(scores, x=fractions, dim=1)


# --------------------------------------------------------------------------------------------------------------
# AOPC (region perturbation)
# --------------------------------------------------------------------------------------------------------------

_ORDERS = ("morf", "lerf")


def _check_region_args(order: str, perturbation: float | str, noise_range: tuple[float, float] | None) -> None:
    if order not in _ORDERS:
        raise ValueError(f"unknown order {order!r}; valid: {list(_ORDERS)} (most / least relevant first)")
    if isinstance(perturbation, str) and perturbation != "uniform":
        raise ValueError(f"unknown perturbation {perturbation!r}; valid: 'uniform' or a baseline number")
    if not isinstance(perturbation, str):
        _check_baseline(perturbation)
    if noise_range is not None:
        ok = isinstance(noise_range, (tuple, list)) and len(noise_range) == 2
        if not ok or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in noise_range):
            raise ValueError(f"noise_range must be None or (low, high), got {noise_range!r}")
        if not noise_range[0] < noise_range[1]:
            raise ValueError(f"noise_range must have low < high, got {noise_range!r}")


def region_perturbation_curve(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    region_size: int = 8,
    steps: int | None = None,
    order: Literal["morf", "lerf"] = "morf",
    perturbation: float | Literal["uniform"] = "uniform",
    noise_range: tuple[float, float] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    softmax: bool = True,
    sample_offset: int = 0,
) -> Tensor:
    """Region-perturbation curve of Samek, Binder, Montavon, Lapuschkin & Müller, "Evaluating the Visualization
    of What a Deep Neural Network Has Learned", IEEE TNNLS 2017.

    The image is tiled into non-overlapping ``region_size`` x ``region_size`` squares (smaller at the right and
    bottom edges when the size does not divide the image), ranked by their summed relevance - most relevant
    first (``"morf"``) or least relevant first (``"lerf"``), ties in row-major order. At step ``k`` the first
    ``k`` regions are perturbed (cumulatively), for ``k = 0..L`` with ``L = steps`` (default: all regions).
    ``perturbation="uniform"`` replaces them by uniform noise drawn once per image, in ``noise_range`` or, by
    default, in the image's own ``[min, max]``; a number replaces them by that value. The noise of image ``i`` is
    seeded by ``(seed, sample_offset + i)`` (the metric passes the number of images it has already seen, so
    the result does not depend on how the data is batched).

    Returns the target scores ``Tensor[B, L + 1]``; column 0 is the unperturbed input.
    """
    region_size = check_positive_int("region_size", region_size)
    check_positive_int("batch_size", batch_size)
    _check_region_args(order, perturbation, noise_range)
    heat = _heat_for(attributions, inputs)
    b, _, h, w = inputs.shape
    target = _prepare_target(target, b, inputs.device)
    rows, cols = math.ceil(h / region_size), math.ceil(w / region_size)
    padded = F.pad(heat.double(), (0, cols * region_size - w, 0, rows * region_size - h))
    region_sums = padded.view(b, rows, region_size, cols, region_size).sum(dim=(2, 4))
    region_rank = descending_ranks(region_sums if order == "morf" else -region_sums).view(b, -1)
    num_regions = rows * cols
    if steps is None:
        steps = num_regions
    check_positive_int("steps", steps)
    if steps > num_regions:
        raise ValueError(
            f"steps={steps} exceeds the {num_regions} regions of size {region_size} in a {h}x{w} image; "
            f"use steps <= {num_regions}"
        )
    ii = torch.arange(h, device=inputs.device) // region_size
    jj = torch.arange(w, device=inputs.device) // region_size
    region_id = (ii.view(-1, 1) * cols + jj.view(1, -1)).flatten()
    pixel_rank = region_rank[:, region_id].view(b, 1, h, w).to(torch.int32)
    x = inputs.detach()
    if perturbation == "uniform":
        gen = torch.Generator(device=inputs.device)
        if noise_range is None:
            flat = x.reshape(b, -1)
            low = flat.min(dim=1).values.view(-1, 1, 1, 1)
            high = flat.max(dim=1).values.view(-1, 1, 1, 1)
        else:
            low, high = float(noise_range[0]), float(noise_range[1])
        unit = torch.empty_like(x)
        for i in range(b):
            gen.manual_seed(_mix_seed(seed, sample_offset + i, 0))
            unit[i].uniform_(0.0, 1.0, generator=gen)
        replacement = low + (high - low) * unit
    else:
        replacement = _baseline_images(float(perturbation), x)

    def build(_sl: slice, images: Tensor, points: Tensor) -> Tensor:
        changed = pixel_rank.index_select(0, images) < points.view(-1, 1, 1, 1)
        return torch.where(changed, _rows(replacement, images), x.index_select(0, images))

    return _score_pairs(model, build, b, steps + 1, target, batch_size=batch_size, softmax=softmax, device=x.device)


def aopc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area over the perturbation curve (Samek et al., IEEE TNNLS 2017), ``Tensor[B]``::

        AOPC = 1 / (L + 1) * sum_{k=0..L} (f(x_0) - f(x_k))

    with ``x_k`` the input after ``k`` region perturbations of :func:`region_perturbation_curve` (same keyword
    arguments). For ``order="morf"`` higher is better (the score drops fast), for ``"lerf"`` lower is better.
    """
    scores = region_perturbation_curve(attributions, inputs, model, target, **kwargs)
    return (scores[:, :1] - scores).mean(dim=1)


# --------------------------------------------------------------------------------------------------------------
# Infidelity and max-sensitivity (Yeh et al. 2019)
# --------------------------------------------------------------------------------------------------------------


def infidelity(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    noise_std: float = 0.1,
    samples: int = 32,
    scale: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    softmax: bool = False,
    sample_offset: int = 0,
) -> Tensor:
    """Infidelity (Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and Sensitivity of
    Explanations", NeurIPS 2019), Monte-Carlo estimate per sample, ``Tensor[B]``; lower is better::

        INFD = E_I[(I . phi - (f(x) - f(x - I)))^2]

    ``phi`` is the channel-summed relevance per pixel, so the perturbation ``I`` is per pixel too: Gaussian
    ``N(0, noise_std^2)``, the same value subtracted from every channel of the pixel (``I . phi`` is then the
    first-order prediction of the score change). ``samples`` perturbations per image, seeded by ``(seed,
    sample_offset + image index, sample index)``. With ``scale=True`` (default) the attribution is first
    multiplied by the optimal ``beta = E[(I . phi) d] / E[(I . phi)^2]`` (Yeh et al., Sec. 3), which makes the
    value invariant to the scale of ``phi``: it equals ``E[d^2] - E[(I . phi) d]^2 / E[(I . phi)^2]``.
    ``softmax`` defaults to False: gradient-type attributions explain the logit.
    """
    noise_std = _check_positive_float("noise_std", noise_std)
    samples = check_positive_int("samples", samples)
    check_positive_int("batch_size", batch_size)
    heat = _heat_for(attributions, inputs).double()
    b, _, h, w = inputs.shape
    target = _prepare_target(target, b, inputs.device)
    x = inputs.detach()
    points = samples + 1
    dot = torch.zeros(b * points, device=x.device, dtype=torch.float64)

    def build(sl: slice, images: Tensor, pts: Tensor) -> Tensor:
        noise = _seeded_noise(
            sl, (h, w), seed=seed, points=points, offset=sample_offset, device=x.device, dtype=x.dtype, kind="normal"
        )
        noise = noise * noise_std
        noise = noise * (pts > 0).view(-1, 1, 1).to(noise.dtype)  # point 0 is the unperturbed input
        dot[sl] = (noise.double() * heat[images]).flatten(1).sum(dim=1)
        return x[images] - noise.unsqueeze(1)

    scores = _score_pairs(model, build, b, points, target, batch_size=batch_size, softmax=softmax, device=x.device)
    diff = (scores[:, :1] - scores[:, 1:]).double()  # f(x) - f(x - I)
    a = dot.view(b, points)[:, 1:]
    if scale:
        aa, ad, dd = (a * a).mean(dim=1), (a * diff).mean(dim=1), (diff * diff).mean(dim=1)
        value = torch.where(aa > 0, dd - ad**2 / torch.where(aa > 0, aa, torch.ones_like(aa)), dd).clamp_min(0)
    else:
        value = ((a - diff) ** 2).mean(dim=1)
    return value.float()


def _resolve_attributor(attributor: AttributorSpec) -> Callable[[nn.Module, Tensor, Target], Tensor]:
    if isinstance(attributor, (str, dict)):
        return build_attributor(attributor)
    if not callable(attributor):
        raise TypeError(
            f"attributor must be an Attributor, a registered name, a dict or a callable (model, inputs, target) "
            f"-> Tensor, got {type(attributor).__name__}"
        )
    return attributor


def max_sensitivity(
    attributions: Tensor | None,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    attributor: AttributorSpec,
    *,
    radius: float = 0.02,
    samples: int = 10,
    normalize: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    sample_offset: int = 0,
) -> Tensor:
    """Max-sensitivity (Yeh et al., NeurIPS 2019), Monte-Carlo estimate per sample, ``Tensor[B]``; lower is
    better::

        SENS = max_{d} ||phi(x + d) - phi(x)||_2 / ||phi(x)||_2

    over ``samples`` perturbations ``d`` drawn uniformly from the L-infinity ball of ``radius`` (seeded by
    ``(seed, sample_offset + image index, sample index)``); ``phi`` is the channel-summed map of ``attributor``.
    ``attributions`` is ``phi(x)`` if already computed, else ``None`` (computed here). ``normalize=False``
    drops the division by ``||phi(x)||``; with it, samples whose ``phi(x)`` is all zero give ``NaN`` (excluded
    by the metric). The attributor is called on chunks of at most ``batch_size`` perturbed images.
    """
    explain = _resolve_attributor(attributor)
    radius = _check_positive_float("radius", radius)
    samples = check_positive_int("samples", samples)
    check_positive_int("batch_size", batch_size)
    _check_inputs(inputs)
    _check_model(model)
    x = inputs.detach()
    b = x.shape[0]
    target = _prepare_target(target, b, x.device)
    diffs = torch.empty(b * samples, device=x.device, dtype=torch.float64)
    with model_state_guard(model):  # eval mode for any callable; every mode / grad flag restored afterwards
        if attributions is None:
            attributions = explain(model, x, target)
        reference = _heat_for(attributions, x).double()
        for sl in chunk_slices(b * samples, batch_size):
            images = torch.arange(sl.start, sl.stop, device=x.device) // samples
            noise = _seeded_noise(
                sl,
                tuple(x.shape[1:]),
                seed=seed,
                points=samples,
                offset=sample_offset,
                device=x.device,
                dtype=x.dtype,
                kind="uniform",
            )
            noise = noise * radius
            chunk_target = target[images] if isinstance(target, Tensor) else target
            perturbed = heatmap_batch(explain(model, x[images] + noise, chunk_target), "perturbed attributions")
            if perturbed.shape[1:] != reference.shape[1:]:
                raise ValueError(
                    f"the attributor returned maps of shape {list(perturbed.shape)} for perturbed inputs, but "
                    f"{list(reference.shape)} for the inputs"
                )
            diffs[sl] = (perturbed.double() - reference[images]).flatten(1).norm(dim=1)
    worst = diffs.view(b, samples).max(dim=1).values
    if normalize:
        norm = reference.flatten(1).norm(dim=1)
        worst = torch.where(norm > 0, worst / torch.where(norm > 0, norm, torch.ones_like(norm)), float("nan"))
    return worst.float()


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


class _CurveMetric(PerSampleMeanMetric):
    """A per-sample mean metric that also keeps each sample's curve (``"cat"`` state) for :meth:`curve`."""

    def __init__(self, return_per_sample: bool = False, **kwargs: object) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.add_state("curves", [], dist_reduce_fx="cat")
        self._axis: Tensor | None = None

    def _record(self, axis: Tensor, scores: Tensor, values: Tensor) -> None:
        if self._axis is not None and self._axis.numel() != axis.numel():
            raise ValueError(
                f"this batch gives curves of {axis.numel()} points but earlier batches gave {self._axis.numel()} "
                "(images of different sizes with `step`/region-based steps); use one image size per metric"
            )
        self._axis = axis.detach().cpu()
        self.curves.append(scores.detach().float().to(self.total.device))
        self._accumulate(values)

    def reset(self) -> None:
        super().reset()
        self._axis = None

    def curve(self) -> tuple[Tensor, Tensor]:
        """``(x, mean_scores)`` for plotting: the curve's x axis and the mean score over all samples seen
        (synchronised across DDP ranks: call it on every rank). Raises ``RuntimeError`` before the first
        update."""
        if self._axis is None:
            raise RuntimeError(f"{type(self).__name__}.curve() called before update()")
        with self.sync_context():
            curves = dim_zero_cat(self.curves)
            mean = curves.mean(dim=0)
        return self._axis.to(mean.device), mean


class _PixelCurveMetric(_CurveMetric):
    def __init__(
        self,
        steps: int | None,
        step: int | None,
        baseline: float | Tensor | str,
        batch_size: int,
        softmax: bool,
        return_per_sample: bool,
        allowed_baselines: tuple[str, ...] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.steps, self.step = _check_steps(steps, step)
        self.baseline = _check_baseline(baseline, allowed_baselines)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.softmax = bool(softmax)


class DeletionAUC(_PixelCurveMetric):
    """Mean area under the deletion curve (Petsiuk et al., "RISE", BMVC 2018); **lower is better**.

    See :func:`deletion_curve` for the protocol. ``update(attributions, inputs, model, target)``;
    :meth:`curve` gives ``(fraction of pixels deleted, mean score)``.

    Args:
        steps: number of deletion steps (default 64); or ``step``: pixels deleted per step (not both).
        baseline: value (or tensor broadcastable to the inputs) written into deleted pixels; default 0.
        batch_size: perturbed images per forward pass.
        softmax: score = softmax probability of the target (default) or the raw output.
        return_per_sample: :meth:`compute` returns per-sample AUCs instead of the mean.
    """

    higher_is_better = False

    def __init__(
        self,
        steps: int | None = None,
        step: int | None = None,
        baseline: float | Tensor = 0.0,
        batch_size: int = 64,
        softmax: bool = True,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(steps, step, baseline, batch_size, softmax, return_per_sample, **kwargs)

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        fractions, scores = deletion_curve(
            attributions,
            inputs,
            model,
            target,
            steps=self.steps,
            step=self.step,
            baseline=self.baseline,
            batch_size=self.batch_size,
            softmax=self.softmax,
        )
        self._record(fractions, scores, torch.trapezoid(scores, x=fractions, dim=1))


class InsertionAUC(_PixelCurveMetric):
    """Mean area under the insertion curve (Petsiuk et al., "RISE", BMVC 2018); **higher is better**.

    See :func:`insertion_curve`. ``update(attributions, inputs, model, target)``; :meth:`curve` gives
    ``(fraction of pixels inserted, mean score)``.

    Args:
        steps / step: as for :class:`DeletionAUC`.
        baseline: ``"blur"`` (default: the Gaussian-blurred input) or a value / tensor to start from.
        blur_sigma, blur_kernel_size: the blur (RISE: sigma 5, 11x11 window).
        batch_size, softmax, return_per_sample: as for :class:`DeletionAUC`.
    """

    higher_is_better = True

    def __init__(
        self,
        steps: int | None = None,
        step: int | None = None,
        baseline: float | Tensor | Literal["blur"] = "blur",
        blur_sigma: float = 5.0,
        blur_kernel_size: int = 11,
        batch_size: int = 64,
        softmax: bool = True,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(steps, step, baseline, batch_size, softmax, return_per_sample, ("blur",), **kwargs)
        self.blur_sigma = _check_positive_float("blur_sigma", blur_sigma)
        if isinstance(blur_kernel_size, bool) or not isinstance(blur_kernel_size, int) or blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be a positive odd integer, got {blur_kernel_size!r}")
        self.blur_kernel_size = blur_kernel_size

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        fractions, scores = insertion_curve(
            attributions,
            inputs,
            model,
            target,
            steps=self.steps,
            step=self.step,
            baseline=self.baseline,
            blur_sigma=self.blur_sigma,
            blur_kernel_size=self.blur_kernel_size,
            batch_size=self.batch_size,
            softmax=self.softmax,
        )
        self._record(fractions, scores, torch.trapezoid(scores, x=fractions, dim=1))


class AOPC(_CurveMetric):
    """Mean area over the MoRF / LeRF perturbation curve (Samek et al., IEEE TNNLS 2017); see :func:`aopc`.

    ``update(attributions, inputs, model, target)``; :meth:`curve` gives ``(step k, mean score)``.

    Args:
        region_size: side of the square regions (default 8 pixels; Samek et al. use 9 at 224x224).
        steps: number of regions perturbed, ``L`` (default: all regions of the image).
        order: ``"morf"`` (most relevant first, higher AOPC is better) or ``"lerf"`` (lower is better).
        perturbation: ``"uniform"`` noise (default) or a baseline value.
        noise_range: ``(low, high)`` of the uniform noise; default: each image's own ``[min, max]``.
        seed: seed of the noise (one noise image per image of a batch, the same for every step).
        batch_size, softmax, return_per_sample: as for :class:`DeletionAUC`.
    """

    def __init__(
        self,
        region_size: int = 8,
        steps: int | None = None,
        order: Literal["morf", "lerf"] = "morf",
        perturbation: float | Literal["uniform"] = "uniform",
        noise_range: tuple[float, float] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        softmax: bool = True,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.region_size = check_positive_int("region_size", region_size)
        self.steps = None if steps is None else check_positive_int("steps", steps)
        _check_region_args(order, perturbation, noise_range)
        self.order = order
        self.perturbation = perturbation
        self.noise_range = None if noise_range is None else (float(noise_range[0]), float(noise_range[1]))
        self.seed = int(seed)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.softmax = bool(softmax)

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """MoRF: a fast drop (large AOPC) is good; LeRF: a slow drop (small AOPC) is good."""
        return self.order == "morf"

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        scores = region_perturbation_curve(
            attributions,
            inputs,
            model,
            target,
            region_size=self.region_size,
            steps=self.steps,
            order=self.order,
            perturbation=self.perturbation,
            noise_range=self.noise_range,
            seed=self.seed,
            batch_size=self.batch_size,
            softmax=self.softmax,
            sample_offset=self._seen,
        )
        axis = torch.arange(scores.shape[1], dtype=torch.float32)
        self._record(axis, scores, (scores[:, :1] - scores).mean(dim=1))


class Infidelity(PerSampleMeanMetric):
    """Mean infidelity (Yeh et al., NeurIPS 2019) under Gaussian pixel perturbations; **lower is better**.

    See :func:`infidelity`. ``update(attributions, inputs, model, target)``.

    Args:
        noise_std: standard deviation of the perturbation (in input units); default 0.1.
        samples: perturbations per image; default 32.
        scale: multiply the attribution by its optimal scale first (default True).
        seed, batch_size, return_per_sample: as for the other metrics; ``softmax`` defaults to False.
    """

    higher_is_better = False

    def __init__(
        self,
        noise_std: float = 0.1,
        samples: int = 32,
        scale: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        softmax: bool = False,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.noise_std = _check_positive_float("noise_std", noise_std)
        self.samples = check_positive_int("samples", samples)
        self.scale = bool(scale)
        self.seed = int(seed)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.softmax = bool(softmax)

    def update(self, attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target) -> None:
        self._accumulate(
            infidelity(
                attributions,
                inputs,
                model,
                target,
                noise_std=self.noise_std,
                samples=self.samples,
                scale=self.scale,
                seed=self.seed,
                batch_size=self.batch_size,
                softmax=self.softmax,
                sample_offset=self._seen,
            )
        )


class MaxSensitivity(PerSampleMeanMetric):
    """Mean max-sensitivity (Yeh et al., NeurIPS 2019) of an attributor; **lower is better**.

    See :func:`max_sensitivity`. ``update(attributions_or_None, inputs, model, target)``: pass the maps
    already computed for ``inputs`` (or ``None`` to compute them). Samples whose map is all zero are excluded
    and counted (their relative sensitivity is undefined).

    Args:
        attributor: an Attributor, a registered name / dict, or a callable ``(model, inputs, target) -> maps``.
        radius: half-width of the L-infinity ball of perturbations (input units); default 0.02.
        samples: perturbations per image; default 10.
        normalize: divide by ``||phi(x)||`` (default True).
        seed, batch_size (perturbed images per attributor call), return_per_sample.
    """

    higher_is_better = False

    def __init__(
        self,
        attributor: AttributorSpec,
        radius: float = 0.02,
        samples: int = 10,
        normalize: bool = True,
        seed: int = 0,
        batch_size: int = 32,
        return_per_sample: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.attributor = _resolve_attributor(attributor)
        self.radius = _check_positive_float("radius", radius)
        self.samples = check_positive_int("samples", samples)
        self.normalize = bool(normalize)
        self.seed = int(seed)
        self.batch_size = check_positive_int("batch_size", batch_size)

    def update(self, attributions: Tensor | None, inputs: Tensor, model: nn.Module, target: Target) -> None:
        self._accumulate(
            max_sensitivity(
                attributions,
                inputs,
                model,
                target,
                self.attributor,
                radius=self.radius,
                samples=self.samples,
                normalize=self.normalize,
                seed=self.seed,
                batch_size=self.batch_size,
                sample_offset=self._seen,
            )
        )
