"""A layer's feature maps over a probe set, as network dissection reads them: concept batches, the forward pass
stopped right after the layer, and a batch-independent bilinear upsampling of the maps to the masks' size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.layers import capture_layer, forward_until_stopped, stop_after_calls
from lightning_xai.batch import BatchReader

__all__ = [
    "CONCEPT_MASK_KEYS",
    "INDEX_KEYS",
    "LayerReader",
    "check_reiterable",
    "read_concept_batch",
    "upsample_bilinear",
]


#: Where a dict batch keeps the concept masks and the images' dataset indices (the images are found by
#: :class:`~lightning_xai.batch.BatchReader`: a tuple's first element, a dict's ``"image"``, ``"images"``, ...).
CONCEPT_MASK_KEYS = ("concept_masks", "concept_mask", "masks", "mask")
INDEX_KEYS = ("index", "indices", "idx")


def read_concept_batch(item: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(images, concept_masks, indices or None)`` of one batch: ``(images, concept_masks)``, ``(images,
    concept_masks, indices)`` or a dict with an image key, a concept-mask key (:data:`CONCEPT_MASK_KEYS`) and
    optionally an index key (:data:`INDEX_KEYS`). Concept masks must be ``[B, C, H, W]`` with the images'
    aspect ratio (they may have another resolution: unit maps are upsampled to the masks' size)."""
    if isinstance(item, Mapping):
        mask_key = next((k for k in CONCEPT_MASK_KEYS if k in item), None)
        index_key = next((k for k in INDEX_KEYS if k in item), None)
        if mask_key is None:
            raise ValueError(
                f"NetworkDissection: a batch dict needs a concept-mask key {CONCEPT_MASK_KEYS}; got {sorted(item)}"
            )
        reader = BatchReader(label_key=index_key, mask_key=mask_key, owner="NetworkDissection")
        images = reader.inputs(item)
        masks, indices = item[mask_key], (item[index_key] if index_key is not None else None)
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3):
        images = BatchReader(input_key=0, owner="NetworkDissection").inputs(item)
        masks, indices = item[1], (item[2] if len(item) == 3 else None)
    else:
        raise TypeError(
            "each batch must be (images, concept_masks), (images, concept_masks, indices) or a dict with 'image' "
            f"and 'concept_masks'; got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, Sequence) else "")
        )
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim < 2:
        raise TypeError(f"images must be a floating-point tensor [B, ...], got {getattr(images, 'dtype', images)!r}")
    if not isinstance(masks, Tensor) or masks.ndim != 4 or masks.shape[0] != images.shape[0]:
        raise ValueError(
            f"concept masks must be a tensor [B, C, H, W] with B = {images.shape[0]}, "
            f"got {list(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}"
        )
    if images.ndim == 4:
        (ih, iw), (mh, mw) = images.shape[-2:], masks.shape[-2:]
        if ih * mw != iw * mh:
            raise ValueError(
                f"NetworkDissection: concept masks of size {mh}x{mw} do not have the aspect ratio of the {ih}x{iw} "
                "images; unit maps would be stretched onto them. Resize or crop masks and images alike"
            )
    if indices is not None:
        indices = torch.as_tensor(indices).reshape(-1).long()
        if indices.shape[0] != images.shape[0]:
            raise ValueError(f"got {indices.shape[0]} indices for a batch of {images.shape[0]} images")
    return images, masks, indices


def check_reiterable(data: Any) -> None:
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a re-iterable of batches (a DataLoader without shuffling, a list of (images, masks)); "
            f"got {type(data).__name__}"
        )
    if isinstance(data, Iterator):  # a generator or iterator: it would be empty the second time
        raise TypeError("data is a one-shot iterator, but dissection reads it twice; pass a DataLoader or a list")


#: Relative rounding slack of :func:`upsample_bilinear` (a few float32 ulps of the map's largest magnitude).
ROUNDING_MARGIN = 1e-6


def upsample_bilinear(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``maps [..., h, w]`` to ``size`` with ``align_corners=False`` semantics (the
    convention of :func:`torch.nn.functional.interpolate`), computed with elementwise operations only.

    Unlike ``F.interpolate``, whose CPU kernels round differently depending on the layout and the number of
    channels, every output value here depends only on its own map: a unit's mask does not change with the batch
    it is computed in, which keeps distributed results identical to single-process ones. Agrees with
    ``F.interpolate`` to float32 rounding.
    """
    height, width = maps.shape[-2:]
    rows = _linear_weights(height, size[0], maps.device)
    cols = _linear_weights(width, size[1], maps.device)
    (x0, x1, wx0, wx1), (y0, y1, wy0, wy1) = cols, rows
    across = maps.index_select(-1, x0).mul_(wx0).add_(maps.index_select(-1, x1).mul_(wx1))  # [..., h, W]
    return across.index_select(-2, y0).mul_(wy0[:, None]).add_(across.index_select(-2, y1).mul_(wy1[:, None]))


def _linear_weights(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights of 1-D linear interpolation, ``align_corners=False``."""
    scale = n_in / n_out
    source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    low = source.floor().long().clamp_max(n_in - 1)
    high = (low + 1).clamp_max(n_in - 1)
    w_high = (source - low.double()).float()
    w_low = 1.0 - w_high
    return low.to(device), high.to(device), w_low.to(device), w_high.to(device)


class LayerReader:
    """Runs the model up to the layer and returns its output (its last call in the forward pass).

    With ``stop_at_layer`` the forward pass ends right after that call: how often the layer runs per forward
    pass is learned once, from a complete forward pass of a single image.
    """

    def __init__(self, model: nn.Module, layer: str, stop_at_layer: bool) -> None:
        self.model = model
        self.layer = layer
        self.stop_at_layer = stop_at_layer
        self.calls: int | None = None
        self.device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))

    def _run(self, images: Tensor, stop_after: int | None) -> tuple[Tensor, int]:
        with capture_layer(self.model, self.layer) as capture:
            with stop_after_calls(capture.module, stop_after) if stop_after is not None else contextlib.nullcontext():
                forward_until_stopped(self.model, images)
            return capture.activation, len(capture.outputs)

    def __call__(self, images: Tensor) -> Tensor:
        images = images.to(self.device)
        if self.stop_at_layer and self.calls is None:
            _activation, self.calls = self._run(images[:1], None)
        activation, _calls = self._run(images, self.calls if self.stop_at_layer else None)
        if activation.ndim != 4 or activation.shape[0] != images.shape[0]:
            raise ValueError(
                f"layer {self.layer!r} outputs shape {list(activation.shape)}; dissection needs feature maps "
                f"[B, units, h, w] with B = {images.shape[0]}"
            )
        return activation.detach()
