"""Occlusion sensitivity: slide a window over the image, replace it by a baseline and watch the score drop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_xai.attribution.arguments import renamed
from lightning_xai.attribution.base import Attributor, Target
from lightning_xai.attribution.perturbing import (
    all_scores,
    average_over_windows,
    baseline_images,
    check_baseline,
    check_fits,
    check_pair,
    check_stride,
    scores_of,
    window_masks,
    windows,
)
from lightning_xai.checks import check_float, check_int

__all__ = ["Occlusion"]


@renamed(fill="baseline")
class Occlusion(Attributor):
    """Occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
    ECCV 2014): slide a window over the image, replace it by ``baseline`` and record the drop of the score.

    Attribution of a pixel = mean over the windows ``w`` covering it of ``f(x) - f(x with w occluded)``:
    positive where hiding the pixel lowers the score (evidence for the target). Windows span all channels.

    Args:
        window: window size, ``int`` or ``(height, width)``; must fit the image (checked per call).
        stride: step between windows, ``int`` or pair; ``None`` = half the window (at least 1).
        baseline: what replaces the window: a number (constant, default 0), ``"mean"`` (per-image, per-channel
            mean) or ``"blur"`` (the Gaussian-blurred image, ``blur_sigma`` pixels). Formerly ``fill``
            (deprecated alias).
        blur_sigma: standard deviation of the blur for ``baseline="blur"``.
        batch_size: maximal number of inputs per forward pass.

    Cost: ``B * (1 + number of windows)`` model evaluations, in chunks of ``batch_size``.
    """

    name = "occlusion"
    requires_image = True

    def __init__(
        self,
        window: int | tuple[int, int] = 16,
        stride: int | tuple[int, int] | None = None,
        baseline: float | str = 0.0,
        blur_sigma: float = 5.0,
        batch_size: int = 64,
    ) -> None:
        owner = type(self).__name__
        self.window = check_pair("window", window, owner=owner)
        self.stride = check_stride(stride, self.window, owner=owner)
        self.baseline = check_baseline(baseline, owner=owner)
        self.blur_sigma = check_float("blur_sigma", blur_sigma, minimum=0.0, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        check_fits("Occlusion", "window", self.window, height, width)
        corners = windows(height, width, self.window, self.stride)
        n_win = corners.shape[0]
        fill = baseline_images(x, self.baseline, self.blur_sigma)
        total = batch * n_win
        owners = torch.arange(total, device=x.device) // n_win
        which = torch.arange(total) % n_win

        def make_batch(part: slice) -> tuple[Tensor, None]:
            masks = window_masks(corners[which[part]], self.window, height, width, x.device)[:, None]
            own = owners[part]
            return torch.where(masks, fill[own], x[own]), None

        with torch.no_grad():
            base = scores_of(model, x, target, self.batch_size)
            occluded = all_scores(model, total, make_batch, owners, target, self.batch_size)
        drops = base[:, None] - occluded.view(batch, n_win)
        return average_over_windows(drops, corners, self.window, height, width).to(x.dtype)
