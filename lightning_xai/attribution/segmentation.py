"""Image segments ("interpretable features") for surrogate-model attributors (LIME, KernelSHAP).

LIME (Ribeiro et al., KDD 2016) and KernelSHAP (Lundberg & Lee, NeurIPS 2017) explain an image through a small
number ``M`` of segments that are either kept or replaced by a fill value. This module turns an image batch
``[B, C, H, W]`` into a label map ``LongTensor[B, H, W]`` with labels ``0 .. M_b - 1`` per image (consecutive,
every label present) plus the per-image counts ``M_b``:

* ``"grid"`` (default, no dependency): a regular ``rows x cols`` grid; every image gets the same map. Cell
  boundaries are ``floor(i * rows / H)``, so cells differ in size by at most one pixel.
* ``"slic"``: SLIC superpixels (Achanta et al., IEEE TPAMI 2012) from scikit-image, computed per image on its
  per-image min-max scaled copy (so that ``compactness`` has its usual meaning whatever the input
  normalisation). scikit-image is an optional dependency; asking for ``"slic"`` without it raises an
  ``ImportError`` at construction.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_xai.attribution.perturbing import check_pair
from lightning_xai.checks import check_choice, check_float, check_int

__all__ = ["SEGMENTATIONS", "Segmentation", "grid_segments", "relabel_consecutive"]

#: The valid segmentation method names.
SEGMENTATIONS = ("grid", "slic")


def grid_segments(height: int, width: int, grid: int | tuple[int, int], device: torch.device | None = None) -> Tensor:
    """A regular ``rows x cols`` grid label map ``LongTensor[H, W]`` with labels ``0 .. rows*cols - 1`` (row-major).

    Raises ``ValueError`` when the grid has more rows (cols) than the image has pixel rows (columns).
    """
    rows, cols = check_pair("grid", grid)
    if rows > height or cols > width:
        raise ValueError(
            f"a {rows}x{cols} segment grid does not fit a {height}x{width} image (at most one cell per pixel); "
            f"choose grid <= ({height}, {width})"
        )
    r = torch.arange(height, device=device) * rows // height
    c = torch.arange(width, device=device) * cols // width
    return r[:, None] * cols + c[None, :]


def relabel_consecutive(labels: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer labels to ``0 .. M-1`` preserving their order; returns ``(labels, M)``."""
    uniq, inverse = torch.unique(labels, return_inverse=True)
    return inverse.view_as(labels).long(), int(uniq.numel())


class Segmentation:
    """A configured segmenter: ``Segmentation("grid", grid=4)(images) -> (labels[B, H, W], counts)``.

    Args:
        method: ``"grid"`` (default) or ``"slic"``.
        grid: for ``"grid"``, cells per side (``int``) or ``(rows, cols)``.
        n_segments: for ``"slic"``, the approximate number of superpixels (scikit-image's ``n_segments``).
        compactness: for ``"slic"``, colour vs. space trade-off (higher = squarer superpixels), on images
            min-max scaled to ``[0, 1]``.
        sigma: for ``"slic"``, Gaussian pre-smoothing width in pixels.
    """

    def __init__(
        self,
        method: str = "grid",
        *,
        grid: int | tuple[int, int] = 4,
        n_segments: int = 50,
        compactness: float = 10.0,
        sigma: float = 1.0,
    ) -> None:
        owner = type(self).__name__
        self.method = check_choice("segmentation", method, SEGMENTATIONS, owner=owner)
        self.grid = check_pair("grid", grid, owner=owner)
        self.n_segments = check_int("n_segments", n_segments, minimum=1, owner=owner)
        self.compactness = check_float("compactness", compactness, minimum=0.0, strict=True, owner=owner)
        self.sigma = check_float("sigma", sigma, minimum=0.0, owner=owner)
        if method == "slic":
            self._slic()  # fail early, at construction, when scikit-image is missing

    @staticmethod
    def _slic():
        try:
            return importlib.import_module("skimage.segmentation").slic
        except ImportError as err:
            raise ImportError(
                "segmentation='slic' needs scikit-image (pip install scikit-image, or the 'extras' of "
                "lightning-xai); use segmentation='grid', which has no dependency"
            ) from err

    def __call__(self, images: Tensor) -> tuple[Tensor, list[int]]:
        """Segment ``images [B, C, H, W]``; returns ``(labels LongTensor[B, H, W] on the images' device, counts)``."""
        if images.ndim != 4:
            raise ValueError(f"segmentation expects images [B, C, H, W], got shape {list(images.shape)}")
        batch, _, height, width = images.shape
        if self.method == "grid":
            labels = grid_segments(height, width, self.grid, images.device)
            return labels.expand(batch, height, width).clone(), [self.grid[0] * self.grid[1]] * batch
        slic = self._slic()
        maps, counts = [], []
        for image in images.detach():
            arr = image.double().cpu()
            lo, hi = arr.min(), arr.max()
            arr = ((arr - lo) / (hi - lo) if hi > lo else torch.zeros_like(arr)).permute(1, 2, 0).numpy()
            raw = slic(
                arr,
                n_segments=self.n_segments,
                compactness=self.compactness,
                sigma=self.sigma,
                start_label=0,
                channel_axis=-1,
            )
            labels, count = relabel_consecutive(torch.from_numpy(raw).long())
            maps.append(labels)
            counts.append(count)
        return torch.stack(maps).to(images.device), counts

    def __repr__(self) -> str:
        if self.method == "grid":
            return f"Segmentation('grid', grid={self.grid})"
        return f"Segmentation('slic', n_segments={self.n_segments}, compactness={self.compactness}, sigma={self.sigma})"
