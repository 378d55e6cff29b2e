"""RISE: saliency as the expected score under random smooth masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.arguments import renamed
from lightning_xai.attribution.base import Attributor, Target
from lightning_xai.attribution.perturbing import check_fits, check_pair, check_seed, chunked_scores, generator
from lightning_xai.checks import check_float, check_int

__all__ = ["RISE"]


@renamed(n_masks="num_samples")
class RISE(Attributor):
    """RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

    ``num_samples`` random binary grids of ``grid x grid`` cells, each cell kept with probability ``p``, are
    upsampled bilinearly to ``(grid + 1) * cell`` pixels (``cell = ceil(H / grid)``), shifted by a random offset
    in ``[0, cell)`` and cropped to ``H x W`` - smooth masks in ``[0, 1]``. The saliency is the paper's Monte
    Carlo estimate

        ``S(u) = 1 / (N * p) * sum_i f(x * M_i) * M_i(u)``,

    i.e. the expected score given that pixel ``u`` is kept, normalised by ``E[M(u)] = p`` (so a constant score
    ``c`` gives ``S ~ c``). Masked-out pixels are zero (the paper's ``I * M``). The masks are the same for
    every image of the batch; the small binary grids and shifts are drawn up front, the full-resolution masks
    are rendered per chunk.

    Args:
        num_samples: number of masks ``N`` (the paper uses 4000-8000 for ImageNet). Formerly ``n_masks``
            (deprecated alias).
        grid: cells per side ``s`` (``int`` or ``(rows, cols)``); must not exceed the image size.
        p: probability of keeping a cell, in ``(0, 1]``.
        batch_size: maximal number of masked inputs per forward pass.
        seed: seed of the private generator (``None``: non-deterministic).

    Cost: ``B * num_samples`` model evaluations, in chunks of ``batch_size``.
    """

    name = "rise"
    requires_image = True

    def __init__(
        self,
        num_samples: int = 2000,
        grid: int | tuple[int, int] = 7,
        p: float = 0.5,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        owner = type(self).__name__
        self.num_samples = check_int("num_samples", num_samples, minimum=1, owner=owner)
        self.grid = check_pair("grid", grid, owner=owner)
        p = check_float("p", p, owner=owner)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"{owner}: p (probability of keeping a cell) must be in (0, 1], got {p!r}")
        self.p = p
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.seed = check_seed(seed, owner=owner)

    def _draw(self, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """Binary grids ``[N, s, s]`` and shifts ``[N]``, ``[N]`` (small; drawn once per call)."""
        check_fits("RISE", "grid", self.grid, height, width)
        g = generator(self.seed)
        cell = (math.ceil(height / self.grid[0]), math.ceil(width / self.grid[1]))
        grids = torch.rand(self.num_samples, *self.grid, generator=g) < self.p
        dy = torch.randint(0, cell[0], (self.num_samples,), generator=g)
        dx = torch.randint(0, cell[1], (self.num_samples,), generator=g)
        return grids, dy, dx, cell

    def _render(
        self, grids: Tensor, dy: Tensor, dx: Tensor, cell: tuple[int, int], height: int, width: int, like: Tensor
    ) -> Tensor:
        """Full-resolution masks ``[n, H, W]`` in ``[0, 1]`` for the given grids and shifts."""
        size = ((self.grid[0] + 1) * cell[0], (self.grid[1] + 1) * cell[1])
        up = F.interpolate(
            grids[:, None].to(device=like.device, dtype=like.dtype), size=size, mode="bilinear", align_corners=False
        )[:, 0]
        rows = dy.to(like.device)[:, None] + torch.arange(height, device=like.device)
        cols = dx.to(like.device)[:, None] + torch.arange(width, device=like.device)
        index = torch.arange(up.shape[0], device=like.device)[:, None, None]
        return up[index, rows[:, :, None], cols[:, None, :]]

    def masks(self, height: int, width: int, start: int = 0, stop: int | None = None) -> Tensor:
        """The masks ``[stop - start, H, W]`` that a call on ``H x W`` images uses (for inspection and tests)."""
        grids, dy, dx, cell = self._draw(height, width)
        part = slice(start, self.num_samples if stop is None else stop)
        return self._render(grids[part], dy[part], dx[part], cell, height, width, torch.empty(0))

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        grids, dy, dx, cell = self._draw(height, width)
        total = self.num_samples * batch
        owners = torch.arange(total, device=x.device) % batch
        mask_of = torch.arange(total) // batch

        def make_batch(part: slice) -> tuple[Tensor, Tensor]:
            first, last = int(mask_of[part.start]), int(mask_of[part.stop - 1]) + 1
            rendered = self._render(grids[first:last], dy[first:last], dx[first:last], cell, height, width, x)
            m = rendered[(mask_of[part] - first).to(x.device)]
            return x[owners[part]] * m[:, None], m

        saliency = torch.zeros(batch, height, width, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for part, scores, m in chunked_scores(model, total, make_batch, owners, target, self.batch_size):
                saliency.index_add_(0, owners[part], scores.double()[:, None, None] * m.double())
        return (saliency / (self.num_samples * self.p))[:, None].to(x.dtype)
