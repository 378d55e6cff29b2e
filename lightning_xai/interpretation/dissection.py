"""Network dissection: which units of a layer detect which human concepts (Bau et al., CVPR 2017).

Bau, Zhou, Khosla, Oliva and Torralba, "Network Dissection: Quantifying Interpretability of Deep Visual
Representations", CVPR 2017. For every unit ``k`` of a convolutional layer (or a vision transformer's token
layer, see below) and every concept ``c`` of a probe set with pixel-level concept masks:

1. **Threshold.** ``T_k`` is the top-``quantile`` value (default 0.005: the 99.5th percentile) of the unit's
   activations over all spatial positions of all probe images, at the layer's own resolution. It is estimated in
   one streaming pass with a :class:`~lightning_xai.interpretation.quantiles.QuantileSketch` (fixed memory, a
   certified rank-error bound reported per unit, exact merging across processes).
2. **Masks.** In a second pass each activation map is upsampled bilinearly (``align_corners=False``, see
   :func:`upsample_bilinear`) to the concept masks' size and binarised: ``M_k(x) = upsample(A_k(x)) > T_k``
   (strictly greater). Maps whose maximum stays below ``T_k`` have empty masks and are not upsampled at all.
3. **IoU.** ``IoU(k, c) = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|``, both sums over **all** probe
   images ``x``. Images where the concept is absent count: there the union is ``|M_k(x)|``, so a unit that also
   fires elsewhere is penalised (Bau et al. restrict the sums to images where the concept's *category* is
   annotated; the concept datasets here annotate every concept in every image). A pair with an empty union has
   IoU 0.
4. **Labels.** Each unit's label is its best concept overall (and per category); the unit is a **detector** if
   that IoU exceeds ``iou_threshold`` (default 0.04, as in the paper). The number of *unique detectors* of a
   category is the number of distinct concepts of that category that label at least one detector.

The activations are captured with :func:`~lightning_xai.attribution.layers.capture_layer` in eval mode under
``no_grad``; the model's modes, parameters, gradients and hooks are restored afterwards (also on error). By
default the forward pass stops right after the layer, and the layer's activations are kept for the second pass
while they fit in ``cache_bytes`` (else the second pass recomputes them), so dissection costs about one forward
pass up to the layer, plus the upsampling and counting.

**Data.** ``data`` is any re-iterable of batches (a ``DataLoader`` without shuffling, a list): ``(images,
concept_masks)``, ``(images, concept_masks, indices)`` or a dict with keys ``"image"``, ``"concept_masks"`` and
optionally ``"index"``. ``concept_masks`` is ``[B, C, H, W]`` (bool, or any dtype with nonzero = present), at the
images' aspect ratio (a different aspect raises a ``ValueError``; another resolution is fine);
``indices`` are the images' dataset indices, reported for each unit's top-activating images (default: the
running position in ``data``; required under ``torch.distributed``).

**Token layers.** A layer that emits ``[B, T, D]`` (a ViT encoder block) is dissected unit by channel: the class
token (and any other prefix token) is dropped and the patch tokens are laid out on their grid ``[B, D, h, w]`` by
:func:`~lightning_xai.interpretation.layer_maps.unit_maps`, with the ``reshape`` option of the CAM family
(``None``: grid inferred; ``(h, w)``: that grid; or a callable).

**Distributed.** Shard the probe set over processes and call the dissection on every process: sketches and
counts are reduced with a :class:`~lightning_xai.distributed.Reducer` (``torch.distributed`` when
initialised), and every process gets the result of the whole probe set, equal to a single-process run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.attribution.token_grid import Reshape, check_reshape
from lightning_xai.distributed import Reducer, agree, default_reducer
from lightning_xai.interpretation.compositional import CompositionalExplanation, compositional_search
from lightning_xai.interpretation.dissection_result import (
    TABLE_COLUMNS,
    DissectionResult,
    categories_from_names,
    concept_categories,
)
from lightning_xai.interpretation.layer_maps import LayerReader, check_reiterable, read_concept_batch, upsample_bilinear
from lightning_xai.interpretation.quantiles import QuantileSketch
from lightning_xai.interpretation.unit_masks import count_overlaps, mask_overlay, threshold_maps

__all__ = [
    "TABLE_COLUMNS",
    "DissectionResult",
    "NetworkDissection",
    "categories_from_names",
    "dissect",
    "mask_overlay",
    "upsample_bilinear",
]


def _select_top(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` per row by score, ties to the smaller index (independent of the candidates' order)."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _agree(reducer: Reducer, error: BaseException | None, stage: str) -> None:
    """Collective check that every process finished ``stage`` (:func:`lightning_xai.distributed.agree`);
    re-raise the local error or report a remote one, so that no process waits forever in a collective that a
    failed process never reaches."""
    everyone = agree(error is None, reducer)
    if error is not None:
        raise error
    if not everyone:
        raise RuntimeError(f"network dissection failed on another process during {stage}")


class NetworkDissection:
    """Network dissection of one layer (see the module docstring); a configured, model-independent callable.

    Args:
        layer: dotted module name (``"layer4"``) or the module itself.
        quantile: top fraction of activations above the threshold, in (0, 1); default 0.005.
        iou_threshold: a unit is a detector if its best IoU exceeds this, in [0, 1); default 0.04.
        top_k: top-activating images remembered per unit.
        bins, resolution_bits: size and resolution of the quantile sketch
            (:class:`~lightning_xai.interpretation.quantiles.QuantileSketch`).
        cache_bytes: keep the layer's activations for the second pass while they fit in this many bytes (on the
            model's device); beyond it, the second pass recomputes them. 0 disables the cache.
        chunk_elements: upsampled activation values processed at once (bounds the memory of the second pass).
        stop_at_layer: end each forward pass right after the layer (its last call, for modules called more than
            once), skipping the rest of the network.
        reshape: how a token layer's output ``[B, T, D]`` becomes unit maps ``[B, D, h, w]`` (as for the CAM
            family): ``None`` (prefix tokens dropped, patch grid inferred from the token count and the images'
            aspect ratio), a grid ``(h, w)`` (prefix ``T - h * w``), or a callable. Ignored for feature maps.
        reduce: how counts are combined over processes (default: ``torch.distributed`` when initialised).
    """

    def __init__(
        self,
        layer: str | nn.Module,
        *,
        quantile: float = 0.005,
        iou_threshold: float = 0.04,
        top_k: int = 4,
        bins: int = 2048,
        resolution_bits: int = 7,
        cache_bytes: int = 256 * 2**20,
        chunk_elements: int = 2**22,
        stop_at_layer: bool = True,
        reduce: Reducer | None = None,
        reshape: Reshape = None,
    ) -> None:
        if not isinstance(layer, str | nn.Module):
            raise TypeError(f"layer must be a dotted module name or an nn.Module, got {type(layer).__name__}")
        if isinstance(quantile, bool) or not isinstance(quantile, int | float) or not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be a number in (0, 1) (e.g. 0.005 for the top 0.5%), got {quantile!r}")
        if (
            isinstance(iou_threshold, bool)
            or not isinstance(iou_threshold, int | float)
            or not 0.0 <= iou_threshold < 1.0
        ):
            raise ValueError(f"iou_threshold must be a number in [0, 1), got {iou_threshold!r}")
        for name, value, low in (
            ("top_k", top_k, 1),
            ("cache_bytes", cache_bytes, 0),
            ("chunk_elements", chunk_elements, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be a Reducer, got {type(reduce).__name__}")
        QuantileSketch(1, bins=bins, resolution_bits=resolution_bits)  # validates the sketch arguments now
        self.layer = layer
        self.quantile = float(quantile)
        self.iou_threshold = float(iou_threshold)
        self.top_k = top_k
        self.bins = bins
        self.resolution_bits = resolution_bits
        self.cache_bytes = cache_bytes
        self.chunk_elements = chunk_elements
        self.stop_at_layer = bool(stop_at_layer)
        self.reduce = reduce
        self.reshape = check_reshape(reshape, type(self).__name__)

    def __repr__(self) -> str:
        layer = self.layer if isinstance(self.layer, str) else type(self.layer).__name__
        return (
            f"NetworkDissection(layer={layer!r}, quantile={self.quantile}, iou_threshold={self.iou_threshold}, "
            f"top_k={self.top_k}" + ("" if self.reshape is None else f", reshape={self.reshape!r}") + ")"
        )

    def _reducer(self) -> Reducer:
        return default_reducer() if self.reduce is None else self.reduce

    def _reader(self, model: nn.Module, layer_name: str) -> LayerReader:
        return LayerReader(model, layer_name, self.stop_at_layer, self.reshape, type(self).__name__)

    # -------------------------------------------------------------------------------------------- passes
    def __call__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        concept_names: Sequence[str],
        categories: Mapping[str, Sequence[int]] | None = None,
    ) -> DissectionResult:
        """Dissect ``model`` on ``data`` (see the module docstring for the batch format).

        Args:
            model: any ``nn.Module``; it is run in eval mode and restored afterwards.
            data: re-iterable of batches, read twice, in the same order both times.
            concept_names: the ``C`` concepts of the masks, e.g. ``"color:red"``.
            categories: category -> concept indices; default: from ``"category:value"`` names.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layer_name, _module = resolve_layer(model, self.layer)
        check_reiterable(data)
        names = [str(n) for n in concept_names]
        if not names:
            raise ValueError("concept_names is empty: there is nothing to dissect against")
        category_of = concept_categories(names, categories)
        reducer = self._reducer()
        with torch.inference_mode(False), torch.no_grad(), model_state_guard(model):
            reader = self._reader(model, layer_name)
            sketch, top_scores, top_indices, cache = self._first_pass(reader, data, reducer)
            thresholds = sketch.quantile(1.0 - self.quantile)
            rank_error = sketch.rank_error(1.0 - self.quantile)
            counts = self._second_pass(reader, data, reducer, thresholds, cache, len(names))
        intersection, unit_area, concept_area, num_images = counts
        return DissectionResult(
            layer=layer_name,
            concept_names=names,
            concept_categories=category_of,
            quantile=self.quantile,
            iou_threshold=self.iou_threshold,
            thresholds=thresholds.cpu(),
            threshold_rank_error=rank_error.cpu(),
            intersection=intersection.cpu(),
            unit_area=unit_area.cpu(),
            concept_area=concept_area.cpu(),
            num_images=num_images,
            top_indices=top_indices.cpu(),
            top_scores=top_scores.cpu(),
        )

    def _first_pass(
        self, reader: LayerReader, data: Iterable[Any], reducer: Reducer
    ) -> tuple[QuantileSketch, Tensor, Tensor, list[tuple[Tensor, float]] | None]:
        """Stream the activations once: quantile sketch, top images, and the cache for the second pass."""
        sketch: QuantileSketch | None = None
        top_scores = top_indices = None
        cache: list[tuple[Tensor, float]] | None = [] if self.cache_bytes > 0 else None
        cached_bytes = 0
        position = 0
        error: BaseException | None = None
        try:
            for item in data:
                images, _masks, indices = read_concept_batch(item)
                if indices is None:
                    if reducer.world_size > 1:
                        raise ValueError(
                            "under torch.distributed every batch must carry its images' dataset indices "
                            "((images, masks, indices) or an 'index' key), to name the top images across processes"
                        )
                    indices = torch.arange(position, position + images.shape[0])
                position += images.shape[0]
                acts = reader(images)
                if sketch is None:
                    sketch = QuantileSketch(
                        acts.shape[1], bins=self.bins, resolution_bits=self.resolution_bits, device=acts.device
                    )
                    top_scores = torch.full((acts.shape[1], self.top_k), -math.inf, device=acts.device)
                    top_indices = torch.full((acts.shape[1], self.top_k), -1, dtype=torch.long, device=acts.device)
                elif acts.shape[1:2] != (sketch.num_units,):
                    raise ValueError(f"layer output changed from {sketch.num_units} to {acts.shape[1]} units")
                sketch.update(acts, dim=1)
                maxima = acts.amax(dim=(2, 3)).float().T  # [U, B]
                batch_indices = indices.to(acts.device)[None, :].expand_as(maxima)
                top_scores, top_indices = _select_top(
                    torch.cat([top_scores, maxima], dim=1), torch.cat([top_indices, batch_indices], dim=1), self.top_k
                )
                if cache is not None:
                    cached_bytes += acts.numel() * acts.element_size()
                    if cached_bytes <= self.cache_bytes:
                        cache.append((acts, float(images.double().sum())))
                    else:
                        cache = None  # too large: the second pass recomputes
            if sketch is None:
                raise ValueError("data yielded no batches on this process: there is nothing to dissect")
        except Exception as err:
            error = err
        _agree(reducer, error, "the first pass")
        assert sketch is not None and top_scores is not None and top_indices is not None
        sketch.all_reduce(reducer)
        world = reducer.world_size
        if world > 1:
            units = top_scores.shape[0]
            gathered_scores = reducer(top_scores, "gather").permute(1, 0, 2).reshape(units, -1)
            gathered_indices = reducer(top_indices, "gather").permute(1, 0, 2).reshape(units, -1)
            top_scores, top_indices = _select_top(gathered_scores, gathered_indices, self.top_k)
        return sketch, top_scores, top_indices, cache

    def _second_pass(
        self,
        reader: LayerReader,
        data: Iterable[Any],
        reducer: Reducer,
        thresholds: Tensor,
        cache: list[tuple[Tensor, float]] | None,
        num_concepts: int,
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        units = thresholds.shape[0]
        device = thresholds.device
        intersection = torch.zeros(units, num_concepts, dtype=torch.int64, device=device)
        unit_area = torch.zeros(units, dtype=torch.int64, device=device)
        concept_area = torch.zeros(num_concepts, dtype=torch.int64, device=device)
        num_images = 0
        error: BaseException | None = None
        try:
            batches = 0
            for item in data:
                images, masks, _indices = read_concept_batch(item)
                if masks.shape[1] != num_concepts:
                    raise ValueError(
                        f"concept masks have {masks.shape[1]} concepts but {num_concepts} concept names were given"
                    )
                if cache is not None:
                    if batches >= len(cache) or cache[batches][1] != float(images.double().sum()):
                        raise ValueError(
                            "data yielded different batches in the second pass (a shuffling loader? random "
                            "augmentation?); dissection reads the data twice in the same order. Fix the order, or pass "
                            "cache_bytes=0 to recompute the activations"
                        )
                    acts = cache[batches][0]
                else:
                    acts = reader(images)
                batches += 1
                inter, area, present = count_overlaps(acts, masks, thresholds, self.chunk_elements)
                intersection += inter.to(device)
                unit_area += area.to(device)
                concept_area += present.to(device)
                num_images += images.shape[0]
            if cache is not None and batches != len(cache):
                raise ValueError(f"data yielded {batches} batches in the second pass, {len(cache)} in the first")
        except Exception as err:
            error = err
        _agree(reducer, error, "the second pass")
        intersection = reducer(intersection, "sum")
        unit_area = reducer(unit_area, "sum")
        concept_area = reducer(concept_area, "sum")
        total = int(reducer(torch.tensor([num_images], dtype=torch.int64, device=device), "sum").item())
        return intersection, unit_area, concept_area, total

    # -------------------------------------------------------------------------------------------- masks & images
    def unit_masks(
        self, model: nn.Module, images: Tensor, units: Sequence[int], thresholds: Tensor, size: tuple[int, int]
    ) -> Tensor:
        """Binarised, upsampled masks ``M_k`` of ``units`` on ``images``: ``BoolTensor[B, len(units), *size]``;
        ``thresholds`` holds one threshold per entry of ``units`` (e.g. ``result.thresholds[units]``)."""
        layer_name, _ = resolve_layer(model, self.layer)
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        if thresholds.shape[0] != len(units):
            raise ValueError(f"got {thresholds.shape[0]} thresholds for {len(units)} units")
        with torch.inference_mode(False), torch.no_grad(), model_state_guard(model):
            acts = self._reader(model, layer_name)(images)
        bad = [u for u in units if not 0 <= int(u) < acts.shape[1]]
        if bad:
            raise ValueError(f"unit(s) {bad} out of range; layer {layer_name!r} has units 0..{acts.shape[1] - 1}")
        index = torch.as_tensor([int(u) for u in units], dtype=torch.long, device=acts.device)
        return threshold_maps(acts[:, index], thresholds, size)

    def render_unit(
        self,
        model: nn.Module,
        images: Tensor,
        unit: int,
        threshold: float | Tensor,
        *,
        alpha: float = 0.5,
        pad: int = 2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> np.ndarray:
        """A strip of ``images`` side by side, each with the unit's thresholded mask ``M_k`` overlaid (the warm end
        of the colour map, :func:`lightning_xai.viz.render.overlay`, inside the mask; the plain grayscale image
        outside it): ``uint8 [H, n * (W + pad) + pad, 3]``."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a tensor [n, C, H, W], got {getattr(images, 'shape', images)!r}")
        masks = self.unit_masks(model, images, [int(unit)], torch.tensor([float(threshold)]), tuple(images.shape[-2:]))
        tiles = mask_overlay(images, masks, alpha=alpha, mean=mean, std=std)
        n, height, width = tiles.shape[:3]
        strip = np.full((height + 2 * pad, n * (width + pad) + pad, 3), 255, dtype=np.uint8)
        for i in range(n):
            x0 = pad + i * (width + pad)
            strip[pad : pad + height, x0 : x0 + width] = tiles[i]
        return strip

    def render_top_images(
        self,
        model: nn.Module,
        result: DissectionResult,
        images: Tensor | Callable[[list[int]], Tensor],
        units: Sequence[int],
        **kwargs: Any,
    ) -> dict[int, np.ndarray]:
        """:meth:`render_unit` of each unit's top-activating images; ``images`` is the probe dataset's image
        tensor (indexed by dataset index) or a callable ``indices -> Tensor[n, C, H, W]``."""
        strips = {}
        for unit in units:
            chosen = [int(i) for i in result.top_indices[int(unit)].tolist() if i >= 0]
            if not chosen:
                continue
            batch = images(chosen) if callable(images) else images[torch.tensor(chosen)]
            strips[int(unit)] = self.render_unit(model, batch, int(unit), result.thresholds[int(unit)], **kwargs)
        return strips

    # -------------------------------------------------------------------------------------------- compositional
    def explain_compositional(
        self,
        model: nn.Module,
        data: Iterable[Any],
        result: DissectionResult,
        units: Sequence[int] | None = None,
        *,
        beam_size: int = 5,
        max_length: int = 3,
    ) -> list[CompositionalExplanation]:
        """Compositional explanations (Mu & Andreas, NeurIPS 2020) of ``units`` (default: the detector units),
        with the masks and thresholds of ``result``: ``max_length - 1`` more passes over ``data``.

        See :func:`~lightning_xai.interpretation.compositional.compositional_search`.
        """
        layer_name, _ = resolve_layer(model, self.layer)
        check_reiterable(data)
        if units is None:
            units = torch.nonzero(result.detectors).flatten().tolist()
        units = [int(u) for u in units]
        bad = [u for u in units if not 0 <= u < result.num_units]
        if bad:
            raise ValueError(f"unit(s) {bad} out of range; the layer has units 0..{result.num_units - 1}")
        if not units:
            return []
        index = torch.tensor(units)
        thresholds = result.thresholds[index]

        with torch.inference_mode(False), torch.no_grad(), model_state_guard(model):
            reader = self._reader(model, layer_name)

            def batches() -> Iterator[tuple[Tensor, Tensor]]:
                for item in data:
                    images, masks, _ = read_concept_batch(item)
                    acts = reader(images)[:, index.to(reader.device)]
                    yield threshold_maps(acts, thresholds, tuple(masks.shape[-2:])), masks != 0

            return compositional_search(
                batches,
                result.concept_names,
                units=units,
                beam_size=beam_size,
                max_length=max_length,
                single_counts=(result.intersection[index], result.unit_area[index], result.concept_area),
                reduce=self._reducer(),
            )


def dissect(
    model: nn.Module,
    layer: str | nn.Module,
    data: Iterable[Any],
    concept_names: Sequence[str],
    categories: Mapping[str, Sequence[int]] | None = None,
    **kwargs: Any,
) -> DissectionResult:
    """One-call form: ``NetworkDissection(layer, **kwargs)(model, data, concept_names, categories)``."""
    return NetworkDissection(layer, **kwargs)(model, data, concept_names, categories)
