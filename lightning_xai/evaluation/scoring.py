"""The engine of the faithfulness metrics: score a model on many perturbed copies of a batch, in bounded chunks.

Every perturbed image of a batch (images x steps, or images x noise draws) is one *pair* ``j`` = (image
``j // points``, point ``j % points``); :func:`score_pairs` evaluates the pairs in chunks of ``batch_size``
images per forward pass, each chunk built on the inputs' device by a ``build(slice, images, points)`` callback,
with the model in eval mode under :func:`~lightning_xai.attribution.base.model_state_guard` (every submodule's
mode, ``requires_grad`` and ``.grad`` restored afterwards, also on error). Random perturbations are seeded per
(sample identity, draw) by :func:`seeded_noise`, so that results depend neither on ``batch_size`` nor on how
the data is split into batches or over processes (see :func:`lightning_xai.evaluation.base.sample_keys`).

A non-finite model score is an error naming the samples, never a plausible number or an "excluded" sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import (
    Attributor,
    Target,
    build_attributor,
    chunk_slices,
    model_state_guard,
    validate_target,
)
from lightning_xai.checks import check_float, check_int, prefix
from lightning_xai.evaluation.base import check_image_batch, heatmap_batch

__all__ = [
    "DEFAULT_STEPS",
    "AttributorSpec",
    "baseline_images",
    "check_baseline",
    "check_model",
    "check_steps",
    "heat_for",
    "mix_seed",
    "prepare_target",
    "resolve_attributor",
    "score_pairs",
    "seeded_noise",
    "settings_of",
]

#: The attributor MaxSensitivity and the sanity checks re-run: an Attributor, a registered name / dict, or any
#: callable ``(model, inputs, target) -> Tensor[B, 1|C, H, W]``.
AttributorSpec = Attributor | str | dict | Callable[[nn.Module, Tensor, Target], Tensor]

DEFAULT_STEPS = 64


def heat_for(attributions: Tensor, inputs: Tensor) -> Tensor:
    """Validated ``[B, H, W]`` relevance for finite ``inputs [B, C, H, W]`` (on the inputs' device)."""
    check_image_batch(inputs)
    heat = heatmap_batch(attributions)
    b, _, h, w = inputs.shape
    if heat.shape != (b, h, w):
        raise ValueError(
            f"attributions of shape {list(attributions.shape)} do not match inputs of shape {list(inputs.shape)}: "
            f"expected [B, 1|C, H, W] with B={b}, H={h}, W={w}"
        )
    return heat.to(inputs.device)


def positive_float(name: str, value: float, owner: str | None = None) -> float:
    """``value`` as a float if it is a positive finite number (bool rejected)."""
    try:
        return check_float(name, value, minimum=0.0, strict=True, owner=owner)
    except ValueError:
        raise ValueError(f"{prefix(owner)}{name} must be a positive finite number, got {value!r}") from None


def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def prepare_target(target: Target, batch: int, device: torch.device) -> Target:
    if target is None:
        raise TypeError("target is required: an int, a LongTensor[B] of class indices or a callable")
    validate_target(target, batch, None)
    if isinstance(target, Tensor):
        return int(target) if target.ndim == 0 else target.to(device=device, dtype=torch.long)
    return target


def check_steps(steps: int | None, step: int | None, owner: str | None = None) -> tuple[int | None, int | None]:
    if steps is not None and step is not None:
        raise ValueError(
            f"{prefix(owner)}give either steps (number of steps) or step (pixels per step), not both: {steps=}, {step=}"
        )
    if step is not None:
        return None, check_int("step", step, minimum=1, owner=owner)
    return check_int("steps", DEFAULT_STEPS if steps is None else steps, minimum=1, owner=owner), None


def check_baseline(
    baseline: float | Tensor | str, allowed: tuple[str, ...] = (), owner: str | None = None
) -> float | Tensor | str:
    """A perturbation baseline: a finite number, a floating-point tensor or one of the ``allowed`` names."""
    if isinstance(baseline, str):
        if baseline in allowed:
            return baseline
        raise ValueError(
            f"{prefix(owner)}unknown baseline {baseline!r}; valid values: a number, a Tensor or one of {list(allowed)}"
        )
    if isinstance(baseline, Tensor):
        if not baseline.is_floating_point():
            raise TypeError(f"{prefix(owner)}a baseline tensor must be floating point, got dtype {baseline.dtype}")
        if not bool(torch.isfinite(baseline).all()):
            raise ValueError(f"{prefix(owner)}the baseline tensor contains NaN or inf values")
        return baseline.detach()
    valid = f"a finite number, a Tensor or one of {list(allowed)}" if allowed else "a finite number or a Tensor"
    try:
        return check_float("baseline", baseline, owner=owner)
    except ValueError:
        raise ValueError(f"{prefix(owner)}baseline must be {valid}, got {baseline!r}") from None


def baseline_images(baseline: float | Tensor, inputs: Tensor) -> Tensor:
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


def rows_of(images_or_scalar: Tensor, images: Tensor) -> Tensor:
    """``t[images]`` for a per-image tensor; a 0-dim tensor (a constant) is returned as is."""
    return images_or_scalar if images_or_scalar.ndim == 0 else images_or_scalar.index_select(0, images)


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


def score_pairs(
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
    the input batch of one chunk of at most ``batch_size`` pairs. A ``NaN``/``inf`` score raises a
    ``ValueError`` naming the images (of the batch) it came from.
    """
    check_model(model)
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
    bad = (~torch.isfinite(out.view(num_images, num_points))).any(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"the model gave NaN or inf scores for samples {bad.nonzero().flatten().tolist()} of the batch (on the "
            "input or on perturbed copies of it); a non-finite score cannot be evaluated"
        )
    return out.view(num_images, num_points)


def mix_seed(seed: int, sample: int, draw: int) -> int:
    """The generator seed of draw ``draw`` of the sample whose identity is ``sample``."""
    return ((seed * 1_000_003 + sample) * 1_000_033 + draw) % (2**63 - 1)


def seeded_noise(
    sl: slice,
    shape: tuple[int, ...],
    *,
    seed: int,
    points: int,
    keys: Tensor,
    device: torch.device,
    dtype: torch.dtype,
    kind: str,
) -> Tensor:
    """One noise tensor of ``shape`` per pair ``j`` in ``sl``, seeded by (``seed``, the identity
    ``keys[j // points]`` of its sample, draw ``j % points``): independent of the chunking, of the batching and
    (with dataset indices as keys) of the sharding."""
    gen = torch.Generator(device=device)
    out = torch.empty((sl.stop - sl.start, *shape), device=device, dtype=dtype)
    key_list = keys.tolist()
    for row, j in enumerate(range(sl.start, sl.stop)):
        gen.manual_seed(mix_seed(seed, key_list[j // points], j % points))
        if kind == "normal":
            out[row].normal_(generator=gen)
        else:
            out[row].uniform_(-1.0, 1.0, generator=gen)
    return out


def resolve_attributor(attributor: AttributorSpec) -> Callable[[nn.Module, Tensor, Target], Tensor]:
    """A callable ``(model, inputs, target) -> maps`` from an attributor, a registered name or a dict."""
    if isinstance(attributor, (str, dict)):
        return build_attributor(attributor)
    if not callable(attributor):
        raise TypeError(
            f"attributor must be an Attributor, a registered name, a dict or a callable (model, inputs, target) "
            f"-> Tensor, got {type(attributor).__name__}"
        )
    return attributor


def sample_keys_for(num: int, sample_ids: Tensor | None, sample_offset: int) -> Tensor:
    """The functional forms' sample identities: ``sample_ids`` if given, else ``sample_offset + i``."""
    from lightning_xai.evaluation.base import sample_keys

    return sample_keys(num, sample_ids, sample_offset, 0, 1)


def settings_of(metric: object, names: Sequence[str]) -> dict[str, Any]:
    """A metric's settings ``names`` (its attributes) as keyword arguments for its functional form, read at each
    ``update`` so that the class and the function can never disagree on what a setting is called."""
    return {name: getattr(metric, name) for name in names}
