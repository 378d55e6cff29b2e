"""From token sequences ``[B, T, D]`` to image grids ``[B, D, h, w]``: how image methods read a vision transformer.

A vision transformer's layers emit one vector per token: ``p`` *prefix* tokens (the class token, distillation or
register tokens) followed by the ``h * w`` patch tokens in row-major order (Dosovitskiy et al., "An Image is Worth
16x16 Words", ICLR 2021). Layer methods written for feature maps ``[B, K, h, w]`` (the CAM family, dissection)
apply to such a layer once the prefix is dropped and the patch tokens are laid out on their grid - what
pytorch-grad-cam asks its users to write by hand as a ``reshape_transform``. Here it is done once:

* :func:`infer_grid` finds ``(p, (h, w))`` from the token count and the input's aspect ratio: the smallest
  ``p`` (up to :data:`MAX_PREFIX_TOKENS`) for which ``T - p`` patch tokens tile a grid with the image's aspect ratio
  (``h / w = H / W``; square when the image size is unknown). ``T = 65`` on a square image: one class token and
  an 8x8 grid.
* :func:`token_grid` applies it: ``[B, T, D] -> [B, D, h, w]``; a ``reshape`` option gives the grid ``(h, w)``
  explicitly (prefix ``T - h*w``, at most :data:`MAX_PREFIX_TOKENS` unless ``prefix_tokens`` says so: a larger one
  is almost always a mistyped grid), or a callable that does the whole transform.
* :func:`grid_to_image` upsamples a patch-level map ``[B, h, w]`` to ``[B, 1, H, W]``.

Pure torch; no hooks, no state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["MAX_PREFIX_TOKENS", "Reshape", "check_reshape", "grid_to_image", "infer_grid", "token_grid"]

#: The most prefix (non-patch) tokens :func:`infer_grid` considers (class + distillation + registers).
MAX_PREFIX_TOKENS = 16
#: How a ``[B, T, D]`` layer output becomes ``[B, D, h, w]``: ``None`` (inferred), a grid ``(h, w)`` (prefix =
#: ``T - h * w``), or a callable ``Tensor[B, T, D] -> Tensor[B, D, h, w]``.
Reshape = tuple[int, int] | Callable[[Tensor], Tensor] | None
UPSAMPLE_MODES = ("bilinear", "nearest")


def check_reshape(reshape: object, owner: str | None = None) -> Reshape:
    """Validate a ``reshape`` option at construction time (see :data:`Reshape`)."""
    who = f"{owner}: " if owner else ""
    if reshape is None or callable(reshape):
        return reshape  # type: ignore[return-value]
    if (
        isinstance(reshape, (tuple, list))
        and len(reshape) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in reshape)
    ):
        return (int(reshape[0]), int(reshape[1]))
    raise ValueError(
        f"{who}reshape must be None (infer the patch grid), a grid (h, w) of positive ints, or a callable "
        f"Tensor[B, T, D] -> Tensor[B, D, h, w]; got {reshape!r}"
    )


def infer_grid(
    num_tokens: int, image_size: tuple[int, int] | None = None, prefix_tokens: int | None = None
) -> tuple[int, tuple[int, int]]:
    """``(prefix, (h, w))`` for ``num_tokens`` tokens of an image of ``image_size = (H, W)`` (see module docstring).

    ``prefix_tokens`` fixes ``p``; otherwise the smallest ``p`` whose remaining tokens tile a grid of the image's
    aspect ratio is taken. Raises ``ValueError`` when no grid fits.
    """
    if image_size is None:
        image_size = (1, 1)
    height, width = image_size
    candidates = range(min(MAX_PREFIX_TOKENS, num_tokens - 1) + 1) if prefix_tokens is None else [prefix_tokens]
    for prefix in candidates:
        n = num_tokens - prefix
        if n < 1:
            continue
        # h / w = H / W and h * w = n  =>  h = sqrt(n * H / W)
        h = round(math.sqrt(n * height / width))
        if h >= 1 and n % h == 0 and h * width == (n // h) * height:
            return prefix, (h, n // h)
    fixed = f" with prefix_tokens={prefix_tokens}" if prefix_tokens is not None else ""
    raise ValueError(
        f"cannot lay {num_tokens} tokens out on a patch grid of the image's aspect ratio {height}:{width}{fixed}; "
        "pass reshape=(h, w) (the patch grid) or a callable [B, T, D] -> [B, D, h, w]"
    )


def token_grid(
    activation: Tensor,
    image_size: tuple[int, int] | None = None,
    reshape: Reshape = None,
    prefix_tokens: int | None = None,
) -> Tensor:
    """``[B, T, D]`` token activations -> ``[B, D, h, w]`` patch-grid feature map (prefix tokens dropped).

    A 4-D input is returned unchanged, so a layer method can call this on whatever its layer emits. Differentiable
    (a slice, a transpose and a view), so it can be applied to an activation and to its gradient alike.
    """
    if activation.ndim == 4:
        return activation
    if activation.ndim != 3:
        raise ValueError(
            f"expected a feature map [B, K, h, w] or token activations [B, T, D], got shape {list(activation.shape)}"
        )
    if callable(reshape):
        out = reshape(activation)
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != activation.shape[0]:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the reshape callable must return [B, D, h, w] with B = {activation.shape[0]}, got {shape}"
            )
        return out
    batch, tokens, dim = activation.shape
    if reshape is not None:
        h, w = reshape
        prefix = tokens - h * w
        if prefix < 0 or (prefix_tokens is not None and prefix != prefix_tokens):
            raise ValueError(
                f"reshape={reshape} needs {h * w} patch tokens (plus prefix_tokens={prefix_tokens}), but the layer "
                f"emits {tokens} tokens"
            )
        if prefix_tokens is None and prefix > MAX_PREFIX_TOKENS:  # most likely a mistyped grid, not 17+ prefixes
            raise ValueError(
                f"reshape={reshape} lays out {h * w} of the layer's {tokens} tokens and would drop the first {prefix} "
                f"as prefix tokens (more than the {MAX_PREFIX_TOKENS} a ViT prepends: class, distillation and "
                "register tokens); give the patch grid of all patch tokens, or prefix_tokens= if the model really "
                "prepends that many"
            )
    else:
        prefix, (h, w) = infer_grid(tokens, image_size, prefix_tokens)
    return activation[:, prefix:].transpose(1, 2).reshape(batch, dim, h, w)


def grid_to_image(grid: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """``[B, h, w]`` -> ``[B, 1, H, W]`` (``align_corners=False`` for bilinear, as the CAM family upsamples)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {mode!r}; valid values: {list(UPSAMPLE_MODES)}")
    grid = grid.unsqueeze(1)
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    if mode == "nearest":
        return F.interpolate(grid, size=size, mode="nearest")
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
