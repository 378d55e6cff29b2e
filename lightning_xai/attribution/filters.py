"""Image filters shared by the attribution, evaluation and interpretation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_blur"]


def gaussian_blur(images: Tensor, sigma: float, radius: int | None = None) -> Tensor:
    """Gaussian blur of ``images [B, C, H, W]`` per channel, with standard deviation ``sigma`` pixels.

    Separable (a row pass and a column pass of a depthwise 1-D convolution) with a kernel normalised to sum 1 and
    truncated at ``radius`` pixels (default ``int(3 * sigma + 0.5)``), borders extended by replicating the edge
    pixels: the filter of ``scipy.ndimage.gaussian_filter(..., mode="nearest", truncate=3)``. Kernels wider than
    the image are fine. ``sigma <= 0`` (or a zero radius) returns a copy.
    """
    if images.ndim != 4:
        raise ValueError(f"gaussian_blur expects images [B, C, H, W], got shape {list(images.shape)}")
    radius = int(3.0 * sigma + 0.5) if radius is None else int(radius)
    if sigma <= 0 or radius <= 0:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
