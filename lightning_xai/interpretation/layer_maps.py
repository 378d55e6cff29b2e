"""A layer's feature maps over a probe set, as network dissection reads them: concept batches, the forward pass
stopped right after the layer, token layers laid out on their patch grid, and a batch-independent bilinear
upsampling of the maps to the masks' size.

**Token layers.** A vision transformer's layer emits ``[B, T, D]``: a class token (and possibly other prefix
tokens) followed by the patch tokens in row-major order (Dosovitskiy et al., ICLR 2021). Its *units* are the
``D`` channels, and unit ``d``'s map is channel ``d`` of the patch tokens on the patch grid: :func:`unit_maps`
turns the output into ``[B, D, h, w]`` with :func:`~lightning_xai.attribution.token_grid.token_grid`, the
transform the CAM family uses, under the same ``reshape`` option (``None``: prefix dropped and grid inferred
from the token count and the image's aspect ratio; ``(h, w)``: that grid, prefix ``T - h * w``; a callable
``[B, T, D] -> [B, D, h, w]``).

**Units over positions.** Methods that pool or sample a unit over its positions (activation maximisation's unit
objective, the activation atlas, pooled layer features) read a layer with :func:`unit_positions`: ``[B, units,
positions]`` and which positions are real. A feature map gives its channels over its pixels; a token layer of an
image model its ``D`` channels over the patch tokens (the rule above); a token layer ``[B, T', D]`` of a text model
fed ids ``[B, T]`` (:func:`is_text_token_output`: ``T <= T' <= T + MAX_PREFIX_TOKENS``) its ``D`` channels over
the last ``T`` positions - one per input token, the ``T' - T`` prefix (class) tokens dropped - with the padding
(``pad_token``) marked as not real. Never are the tokens read as the units.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import model_device
from lightning_xai.attribution.layers import capture_layer, forward_until_stopped, stop_after_calls
from lightning_xai.attribution.token_grid import MAX_PREFIX_TOKENS, Reshape, infer_grid, token_grid
from lightning_xai.batch import BatchReader

__all__ = [
    "CONCEPT_MASK_KEYS",
    "INDEX_KEYS",
    "LayerReader",
    "check_reiterable",
    "is_text_token_output",
    "is_token_output",
    "read_concept_batch",
    "reject_text_tokens",
    "unit_maps",
    "unit_positions",
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


#: What ``reshape`` accepts, for error messages (the vocabulary of the CAM family's option).
RESHAPE_CHOICES = (
    "None (drop the prefix tokens, infer the patch grid)",
    "(h, w) (the patch grid; prefix = T - h * w)",
    "a callable Tensor[B, T, D] -> Tensor[B, D, h, w]",
)


def is_token_output(activation: Tensor, inputs: Tensor) -> bool:
    """Whether a layer output is read as vision-transformer tokens ``[B, T, D]`` (units = the ``D`` channels): a
    3-D output of a model fed image batches ``[B, C, H, W]`` - the rule of the CAM family's
    :func:`~lightning_xai.attribution.token_grid.token_grid`."""
    return isinstance(activation, Tensor) and activation.ndim == 3 and inputs.ndim == 4


def unit_maps(
    activation: Tensor,
    image_size: tuple[int, int] | None = None,
    reshape: Reshape = None,
    *,
    owner: str = "NetworkDissection",
    layer: str = "",
) -> Tensor:
    """A layer output as unit maps ``[B, units, h, w]``: a feature map is returned as it is, token activations
    ``[B, T, D]`` are laid out on their patch grid (see the module docstring) with ``reshape``.

    A grid that does not fit the layer's tokens raises a ``ValueError`` naming ``owner``, the layer, the value
    and the valid choices (with the grid that would be inferred, when there is one).
    """
    if activation.ndim != 3:
        return activation
    tokens = int(activation.shape[1])
    try:
        return token_grid(activation, image_size, reshape)
    except ValueError as err:
        try:
            prefix, (h, w) = infer_grid(tokens, image_size)
            hint = f"; reshape=None infers {prefix} prefix token(s) and the grid ({h}, {w})"
        except ValueError:
            hint = f"; no grid of the image's aspect ratio fits {tokens} tokens minus 0..{MAX_PREFIX_TOKENS} prefix"
        where = f"layer {layer!r}" if layer else "the layer"
        raise ValueError(
            f"{owner}: {where} emits token activations {list(activation.shape)} that reshape={reshape!r} cannot "
            f"lay out on a patch grid ({err}){hint}. Valid reshape values: {list(RESHAPE_CHOICES)}"
        ) from err


def is_text_token_output(activation: Tensor, inputs: Tensor) -> bool:
    """Whether a layer output is read as text tokens: a 3-D output ``[B, T', D]`` of a model fed token ids (an
    integer, not bool, tensor ``[B, T]``) with ``T <= T' <= T + MAX_PREFIX_TOKENS`` (the input tokens, possibly
    after prefix tokens such as a class token). A 3-D output of another length (a 1-D convolution's ``[B, C, L]``)
    is read channel first."""
    return (
        isinstance(activation, Tensor)
        and activation.ndim == 3
        and isinstance(inputs, Tensor)
        and inputs.ndim == 2
        and not inputs.is_floating_point()
        and not inputs.is_complex()
        and inputs.dtype != torch.bool
        and 0 <= int(activation.shape[1]) - int(inputs.shape[1]) <= MAX_PREFIX_TOKENS
    )


def reject_text_tokens(activation: Tensor, inputs: Tensor, *, owner: str, layer: str = "") -> None:
    """Raise a ``ValueError`` naming ``owner``, the layer and the shapes when ``activation`` is a text token layer
    (:func:`is_text_token_output`), for methods that work in image space (their units' maps, receptive fields and
    ablations are defined over images); reading its tokens as units would give a wrong number, silently."""
    if is_text_token_output(activation, inputs):
        raise ValueError(
            f"{owner}: layer {layer!r} emits token activations {list(activation.shape)} of a model fed token ids "
            f"{list(inputs.shape)}; {owner} supports image inputs [B, C, H, W] (feature maps [B, C, h, w] or "
            "vision-transformer tokens [B, T, D], units = the D channels), not text token layers"
        )


def unit_positions(
    activation: Tensor,
    inputs: Tensor,
    reshape: Reshape = None,
    *,
    pad_token: int | None = None,
    text: bool = True,
    owner: str,
    layer: str = "",
) -> tuple[Tensor, Tensor | None]:
    """``(values [B, units, P], real [B, P] bool or None)``: each unit's value at each position of a layer output
    for ``inputs`` (see the module docstring), and which positions are real (``None``: all of them).

    * ``[B, C]``: ``C`` units, one position; ``[B, C, *spatial]`` (feature maps, a 1-D convolution's ``[B, C, L]``):
      ``C`` units over the flattened positions.
    * token layer ``[B, T, D]`` of images ``[B, C, H, W]``: ``D`` units over the patch tokens (:func:`unit_maps`
      with ``reshape``; a grid that does not fit raises naming ``owner``, the layer, the value and the choices).
    * token layer ``[B, T', D]`` of token ids ``[B, T]`` (:func:`is_text_token_output`): ``D`` units over the last
      ``T`` positions; ``real`` is ``ids != pad_token`` (``None`` without a ``pad_token``: every token is real).
      ``text=False`` (a method that needs image inputs) raises a ``ValueError`` naming ``owner``, the layer and the
      shapes instead.
    """
    if activation.ndim < 2:
        raise ValueError(
            f"{owner}: layer {layer!r} outputs shape {list(activation.shape)}; units need [B, C, ...] or tokens "
            "[B, T, D]"
        )
    if is_token_output(activation, inputs):
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        return unit_maps(activation, size, reshape, owner=owner, layer=layer).flatten(2), None
    if is_text_token_output(activation, inputs):
        if not text:
            reject_text_tokens(activation, inputs, owner=owner, layer=layer)
        prefix = int(activation.shape[1]) - int(inputs.shape[1])
        values = activation[:, prefix:].transpose(1, 2)
        real = None if pad_token is None else (inputs != pad_token).to(activation.device)
        return values, real
    return (activation.flatten(2) if activation.ndim > 2 else activation.unsqueeze(2)), None


class LayerReader:
    """Runs the model up to the layer and returns its output (its last call in the forward pass).

    With ``stop_at_layer`` the forward pass ends right after that call: how often the layer runs per forward
    pass is learned once, from a complete forward pass of a single image. Token activations ``[B, T, D]`` are
    returned as unit maps ``[B, D, h, w]`` (:func:`unit_maps` with ``reshape``).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        stop_at_layer: bool,
        reshape: Reshape = None,
        owner: str = "NetworkDissection",
    ) -> None:
        self.model = model
        self.layer = layer
        self.stop_at_layer = stop_at_layer
        self.reshape = reshape
        self.owner = owner
        self.calls: int | None = None
        self.device = model_device(model)

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
        if is_token_output(activation, images):
            size = (int(images.shape[-2]), int(images.shape[-1]))
            activation = unit_maps(activation.detach(), size, self.reshape, owner=self.owner, layer=self.layer)
        if activation.ndim != 4 or activation.shape[0] != images.shape[0]:
            raise ValueError(
                f"layer {self.layer!r} outputs shape {list(activation.shape)}; dissection needs feature maps "
                f"[B, units, h, w] or vision-transformer tokens [B, T, D] with B = {images.shape[0]}"
            )
        return activation.detach()
