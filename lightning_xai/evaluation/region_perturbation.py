"""Region perturbation and its area over the perturbation curve, AOPC (Samek, Binder, Montavon, Lapuschkin &
Müller, "Evaluating the Visualization of What a Deep Neural Network Has Learned", IEEE TNNLS 2017). See
:mod:`lightning_xai.evaluation.faithfulness` for the conventions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.base import Target
from lightning_xai.checks import check_choice, check_int, check_range
from lightning_xai.evaluation.base import CurveMetric, constant_maps, descending_ranks, heatmap_batch
from lightning_xai.evaluation.scoring import (
    baseline_images,
    check_baseline,
    heat_for,
    mix_seed,
    prepare_target,
    rows_of,
    sample_keys_for,
    score_pairs,
    settings_of,
)

__all__ = ["AOPC", "aopc", "region_perturbation_curve"]


_ORDERS = ("morf", "lerf")
#: The settings of :class:`AOPC` that are keyword arguments of :func:`region_perturbation_curve`.
_CURVE_SETTINGS = (
    "region_size", "steps", "order", "perturbation", "noise_range", "seed", "batch_size", "softmax"
)


def _check_region_args(
    order: str, perturbation: float | str, noise_range: tuple[float, float] | None, owner: str = "AOPC"
) -> None:
    check_choice("order", order, _ORDERS, owner=owner)
    if isinstance(perturbation, str) and perturbation != "uniform":
        raise ValueError(f"{owner}: unknown perturbation {perturbation!r}; valid values: 'uniform' or a number")
    if not isinstance(perturbation, str):
        check_baseline(perturbation, owner=owner)
    check_range("noise_range", noise_range, owner=owner, allow_none=True)


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
    sample_ids: Tensor | None = None,
    sample_offset: int = 0,
) -> Tensor:
    """Region-perturbation curve of Samek, Binder, Montavon, Lapuschkin & Müller, "Evaluating the Visualization
    of What a Deep Neural Network Has Learned", IEEE TNNLS 2017.

    The image is tiled into non-overlapping ``region_size`` x ``region_size`` squares (smaller at the right and
    bottom edges when the size does not divide the image), ranked by their summed relevance - most relevant
    first (``"morf"``) or least relevant first (``"lerf"``), ties in a fixed pseudo-random order (never by
    position; see :func:`~lightning_xai.evaluation.base.descending_ranks`). At step ``k`` the first
    ``k`` regions are perturbed (cumulatively), for ``k = 0..L`` with ``L = steps`` (default: all regions).
    ``perturbation="uniform"`` replaces them by uniform noise drawn once per image, in ``noise_range`` or, by
    default, in the image's own ``[min, max]``; a number replaces them by that value. The noise of image ``i`` is
    seeded by ``(seed, sample_ids[i])`` - its dataset index, so that the result depends neither on batching nor
    on how the data is sharded over processes - or, without ``sample_ids``, by ``(seed, sample_offset + i)``.

    Returns the target scores ``Tensor[B, L + 1]``; column 0 is the unperturbed input.
    """
    region_size = check_int("region_size", region_size, minimum=1, owner="region_perturbation_curve")
    check_int("batch_size", batch_size, minimum=1, owner="region_perturbation_curve")
    _check_region_args(order, perturbation, noise_range)
    heat = heat_for(attributions, inputs)
    b, _, h, w = inputs.shape
    target = prepare_target(target, b, inputs.device)
    rows, cols = math.ceil(h / region_size), math.ceil(w / region_size)
    padded = F.pad(heat.double(), (0, cols * region_size - w, 0, rows * region_size - h))
    region_sums = padded.view(b, rows, region_size, cols, region_size).sum(dim=(2, 4))
    region_rank = descending_ranks(region_sums if order == "morf" else -region_sums, tie_break="random").view(b, -1)
    num_regions = rows * cols
    if steps is None:
        steps = num_regions
    check_int("steps", steps, minimum=1, owner="region_perturbation_curve")
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
        keys = sample_keys_for(b, sample_ids, sample_offset).tolist()
        for i in range(b):
            gen.manual_seed(mix_seed(seed, keys[i], 0))
            unit[i].uniform_(0.0, 1.0, generator=gen)
        replacement = low + (high - low) * unit
    else:
        replacement = baseline_images(float(perturbation), x)

    def build(_sl: slice, images: Tensor, points: Tensor) -> Tensor:
        changed = pixel_rank.index_select(0, images) < points.view(-1, 1, 1, 1)
        return torch.where(changed, rows_of(replacement, images), x.index_select(0, images))

    return score_pairs(model, build, b, steps + 1, target, batch_size=batch_size, softmax=softmax, device=x.device)


def aopc(attributions: Tensor, inputs: Tensor, model: nn.Module, target: Target, **kwargs: object) -> Tensor:
    """Area over the perturbation curve (Samek et al., IEEE TNNLS 2017), ``Tensor[B]``; ``NaN`` (excluded by
    :class:`AOPC`) for a constant map, which ranks no region above another::

        AOPC = 1 / (L + 1) * sum_{k=0..L} (f(x_0) - f(x_k))

    with ``x_k`` the input after ``k`` region perturbations of :func:`region_perturbation_curve` (same keyword
    arguments). For ``order="morf"`` higher is better (the score drops fast), for ``"lerf"`` lower is better.
    """
    scores = region_perturbation_curve(attributions, inputs, model, target, **kwargs)
    return _area_over(scores, heatmap_batch(attributions))


def _area_over(scores: Tensor, heat: Tensor) -> Tensor:
    value = (scores[:, :1] - scores).mean(dim=1)
    return torch.where(constant_maps(heat).to(value.device), torch.full_like(value, float("nan")), value)


class AOPC(CurveMetric):
    """Mean area over the MoRF / LeRF perturbation curve (Samek et al., IEEE TNNLS 2017); see :func:`aopc`.

    ``update(attributions, inputs, model, target, sample_ids=None)``; :meth:`curve` gives ``(step k, mean
    score)``. Pass ``sample_ids`` (the images' dataset indices, ``LongTensor[B]``) so that the uniform noise of
    each image is the same however the data is batched or sharded over processes; without them each image is
    seeded by its position in this process's stream, mixed with the process rank (see
    :func:`~lightning_xai.evaluation.base.sample_keys`). Constant maps are excluded and counted.

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
        self.region_size = check_int("region_size", region_size, minimum=1, owner=type(self).__name__)
        self.steps = None if steps is None else check_int("steps", steps, minimum=1, owner=type(self).__name__)
        _check_region_args(order, perturbation, noise_range)
        self.order = order
        self.perturbation = perturbation
        self.noise_range = None if noise_range is None else (float(noise_range[0]), float(noise_range[1]))
        self.seed = int(seed)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=type(self).__name__)
        self.softmax = bool(softmax)

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """MoRF: a fast drop (large AOPC) is good; LeRF: a slow drop (small AOPC) is good."""
        return self.order == "morf"

    def update(
        self,
        attributions: Tensor,
        inputs: Tensor,
        model: nn.Module,
        target: Target,
        sample_ids: Tensor | None = None,
    ) -> None:
        heat = heatmap_batch(attributions)
        settings = settings_of(self, _CURVE_SETTINGS)
        keys = self._sample_keys(heat.shape[0], sample_ids)
        scores = region_perturbation_curve(attributions, inputs, model, target, **settings, sample_ids=keys)
        axis = torch.arange(scores.shape[1], dtype=torch.float32)
        self._record(axis, scores, _area_over(scores, heat))
