"""A procedurally generated image-classification dataset whose discriminative evidence is known pixel by pixel.

In the spirit of **an8Flower** (J. Oramas, K. Wang and T. Tuytelaars, "Visual Explanation by Interpretation:
Improving Visual Feedback Capabilities of Deep Neural Networks", ICLR 2019): every image shows one synthetic
flower made of parts - a *stem*, ``NUM_PETALS`` *petals* and a centre *disc* - at a random position, scale and
rotation on a random textured background. Every part is painted in one flat colour (no noise, no anti-aliasing,
so a part's pixels carry exactly its colour and nothing leaks across part boundaries). The class is decided by
the colour of the **discriminative part(s)** alone:

* ``num_classes=6``: the disc; its colour is one of the six class colours ``PALETTE[0:6]``.
* ``num_classes=12``: the disc *and* the stem; class ``k`` has disc colour ``PALETTE[DISC_COLORS_12[k // 3]]``
  and stem colour ``PALETTE[STEM_COLORS_12[k % 3]]`` - neither part alone decides the class.

Everything else is drawn independently of the class: the geometry, the background texture and its colours
(continuous random RGB), and the colour of every non-discriminative part, drawn uniformly from the *whole*
``PALETTE`` - class colours included, so "there is red somewhere" says nothing about the class. Hence the class is
decodable from the discriminative part and from nothing else, and the pixel mask of the (visible pixels of the)
discriminative part(s) is the ground truth an explanation should point at.

Generation is seeded (:class:`torch.Generator`), deterministic (same arguments, same tensors) and vectorised:
images are rendered in chunks of :data:`CHUNK` with tensor ops, thousands of 64x64 images in about a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.checks import check_int
from lightning_xai.data.base import (
    GeneratedDataset,
    InMemoryDataModule,
    balanced_labels,
    check_generator_seed,
    check_image_size,
)

__all__ = [
    "DISC_COLORS_12",
    "NUM_PETALS",
    "PALETTE",
    "PALETTE_NAMES",
    "PART_NAMES",
    "STEM_COLORS_12",
    "FlowerScenes",
    "GroundTruthDataModule",
    "GroundTruthShapes",
    "class_names",
    "discriminative_mask",
    "render_backgrounds",
    "render_flowers",
    "sample_scenes",
]

#: Colours of the parts, RGB in [0, 1]. The first six are the class colours of the 6-class variant.
PALETTE = torch.tensor(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.15],  # green
        [0.15, 0.30, 0.95],  # blue
        [0.95, 0.85, 0.10],  # yellow
        [0.85, 0.15, 0.85],  # magenta
        [0.10, 0.85, 0.85],  # cyan
        [1.00, 0.55, 0.00],  # orange
        [0.50, 0.25, 0.70],  # purple
        [0.95, 0.95, 0.95],  # white
        [0.55, 0.35, 0.15],  # brown
    ]
)
PALETTE_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple", "white", "brown")
#: 12-class variant: palette indices of the disc colours (class // 3) and of the stem colours (class % 3).
DISC_COLORS_12 = (0, 1, 2, 3)
STEM_COLORS_12 = (4, 5, 6)

NUM_PETALS = 6
#: Names of the part ids used in ``part_map``: 0 is the background, then stem, petals, disc (drawing order).
PART_NAMES = ("background", "stem", *(f"petal_{k}" for k in range(NUM_PETALS)), "disc")
STEM_ID = 1
DISC_ID = NUM_PETALS + 2

# Geometry in units of the flower's scale ``s`` (pixels): disc radius, petal centre distance and semi-axes
# (radial, tangential), stem length and half-width. The stem points between two petals.
DISC_RADIUS = 0.45
PETAL_DISTANCE = 0.8
PETAL_AXES = (0.38, 0.2)
STEM_LENGTH = 1.5
STEM_HALF_WIDTH = 0.13
#: The flower scale is drawn uniformly in this range, as a fraction of the image size; the whole flower (stem
#: included) always lies inside the image.
SCALE_RANGE = (0.2, 0.3)
MIN_IMAGE_SIZE = 16
#: Images rendered per vectorised step (bounds the memory of generation; part of the seed -> data mapping).
CHUNK = 256
#: Background textures: flat colour with per-pixel noise, stripes, rotated checkerboard, linear gradient, blobs.
BACKGROUNDS = ("noise", "stripes", "checkerboard", "gradient", "blobs")


@dataclass(frozen=True)
class FlowerScenes:
    """Everything that defines the flowers of ``N`` images (the background excepted).

    ``centers [N, 2]`` (x, y) and ``scales [N]`` are in pixels (pixel ``(i, j)`` has centre ``(j + 0.5, i + 0.5)``),
    ``angles [N]`` in radians, ``part_colors [N, NUM_PETALS + 2]`` the palette index of part ids
    ``1 .. NUM_PETALS + 2`` (stem, petals, disc; column ``j`` is part id ``j + 1``).
    """

    centers: Tensor
    scales: Tensor
    angles: Tensor
    part_colors: Tensor

    def __len__(self) -> int:
        return self.scales.shape[0]

    def __getitem__(self, index: slice | Tensor) -> FlowerScenes:
        return FlowerScenes(self.centers[index], self.scales[index], self.angles[index], self.part_colors[index])


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or num_classes not in (6, 12):
        raise ValueError(f"num_classes must be 6 (disc colour) or 12 (disc and stem colours), got {num_classes!r}")
    return int(num_classes)


def class_names(num_classes: int) -> list[str]:
    """Human-readable class names, e.g. ``"disc=red"`` or ``"disc=red,stem=magenta"``."""
    if _check_num_classes(num_classes) == 6:
        return [f"disc={PALETTE_NAMES[c]}" for c in range(6)]
    return [f"disc={PALETTE_NAMES[d]},stem={PALETTE_NAMES[s]}" for d in DISC_COLORS_12 for s in STEM_COLORS_12]


def sample_scenes(labels: Tensor, num_classes: int, image_size: int, generator: torch.Generator) -> FlowerScenes:
    """Draw random flowers for the given class labels.

    Position, scale, rotation and the colours of the non-discriminative parts are drawn independently of
    ``labels`` (non-discriminative colours uniformly over the whole ``PALETTE``); the discriminative part(s) get
    the class colour(s).
    """
    num_classes = _check_num_classes(num_classes)
    n = labels.shape[0]
    scales = image_size * (SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * torch.rand(n, generator=generator))
    # the farthest point of the flower (the stem's corners) stays clear of the border pixels' centres
    margin = math.hypot(STEM_LENGTH, STEM_HALF_WIDTH) * scales + 0.51
    centers = margin[:, None] + (image_size - 2 * margin[:, None]) * torch.rand(n, 2, generator=generator)
    angles = 2 * math.pi * torch.rand(n, generator=generator)
    part_colors = torch.randint(0, len(PALETTE), (n, NUM_PETALS + 2), generator=generator)
    if num_classes == 6:
        part_colors[:, DISC_ID - 1] = labels
    else:
        part_colors[:, DISC_ID - 1] = torch.tensor(DISC_COLORS_12)[labels // 3]
        part_colors[:, STEM_ID - 1] = torch.tensor(STEM_COLORS_12)[labels % 3]
    return FlowerScenes(centers, scales, angles, part_colors)


def _pixel_grid(image_size: int) -> tuple[Tensor, Tensor]:
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    return coords.view(1, 1, image_size), coords.view(1, image_size, 1)  # x [1,1,W], y [1,H,1]


def render_backgrounds(n: int, image_size: int, generator: torch.Generator) -> Tensor:
    """``n`` random textured backgrounds ``[n, 3, H, W]`` in [0, 1] (one of :data:`BACKGROUNDS` each)."""
    size = image_size
    kind = torch.randint(0, len(BACKGROUNDS), (n,), generator=generator)
    color_a = torch.rand(n, 3, 1, 1, generator=generator)
    color_b = torch.rand(n, 3, 1, 1, generator=generator)
    theta = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    period = size * (0.08 + 0.17 * torch.rand(n, 1, 1, generator=generator))
    phase = torch.rand(n, 1, 1, generator=generator)
    x, y = _pixel_grid(size)
    u = x * torch.cos(theta) + y * torch.sin(theta)  # [n, H, W]
    v = -x * torch.sin(theta) + y * torch.cos(theta)
    out = torch.empty(n, 3, size, size)
    for k, name in enumerate(BACKGROUNDS):
        idx = (kind == k).nonzero().flatten()
        m = idx.numel()
        if m == 0:
            continue
        a, b = color_a[idx], color_b[idx]
        if name == "noise":
            tex = a + 0.3 * (torch.rand(m, 3, size, size, generator=generator) - 0.5)
        elif name == "stripes":
            on = torch.frac(u[idx] / period[idx] + phase[idx]) < 0.5
            tex = torch.where(on[:, None], a, b)
        elif name == "checkerboard":
            cells = torch.floor(u[idx] / period[idx] + phase[idx]) + torch.floor(v[idx] / period[idx])
            tex = torch.where((cells.remainder(2) < 1)[:, None], a, b)
        elif name == "gradient":
            t = ((u[idx] - u[idx].amin(dim=(1, 2), keepdim=True)) / (math.sqrt(2) * size)).clamp(0, 1)
            tex = a + (b - a) * t[:, None] + 0.1 * (torch.rand(m, 1, size, size, generator=generator) - 0.5)
        else:  # blobs: a coarse random colour field, bilinearly upsampled
            coarse = torch.rand(m, 3, 4, 4, generator=generator)
            tex = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        out[idx] = tex
    return out.clamp_(0, 1)


def render_flowers(scenes: FlowerScenes, backgrounds: Tensor, palette: Tensor = PALETTE) -> tuple[Tensor, Tensor]:
    """Paint ``scenes`` over ``backgrounds [N, 3, H, W]``; return ``(images [N, 3, H, W], part_map [N, H, W])``.

    Parts are painted in the order stem, petals, disc (later parts occlude earlier ones); ``part_map`` holds the
    id of the part visible at each pixel (0 = background, see :data:`PART_NAMES`), as ``uint8``. Every pixel of a
    part has exactly its palette colour.
    """
    n, _, height, width = backgrounds.shape
    if height != width:
        raise ValueError(f"backgrounds must be square, got {height}x{width}")
    x, y = _pixel_grid(height)
    s = scenes.scales.view(n, 1, 1)
    dx = x - scenes.centers[:, 0].view(n, 1, 1)
    dy = y - scenes.centers[:, 1].view(n, 1, 1)
    part_map = torch.zeros(n, height, width, dtype=torch.uint8)

    def along(angle: Tensor) -> tuple[Tensor, Tensor]:
        # coordinates in a frame rotated by ``angle`` (per image): (radial, tangential)
        c, si = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
        return dx * c + dy * si, -dx * si + dy * c

    r, t = along(scenes.angles + math.pi / NUM_PETALS)
    stem = (r >= 0) & (r <= STEM_LENGTH * s) & (t.abs() <= STEM_HALF_WIDTH * s)
    part_map[stem] = STEM_ID
    for k in range(NUM_PETALS):
        r, t = along(scenes.angles + 2 * math.pi * k / NUM_PETALS)
        petal = ((r - PETAL_DISTANCE * s) / (PETAL_AXES[0] * s)) ** 2 + (t / (PETAL_AXES[1] * s)) ** 2 <= 1
        part_map[petal] = 2 + k
    disc = dx**2 + dy**2 <= (DISC_RADIUS * s) ** 2
    part_map[disc] = DISC_ID

    colors = palette.to(backgrounds.dtype)[scenes.part_colors]  # [N, P, 3]
    ids = part_map.long()
    painted = torch.gather(colors, 1, (ids - 1).clamp(min=0).view(n, -1, 1).expand(-1, -1, 3))  # [N, H*W, 3]
    painted = painted.transpose(1, 2).reshape(n, 3, height, width)
    images = torch.where((ids > 0)[:, None], painted, backgrounds)
    return images, part_map


def discriminative_mask(part_map: Tensor, num_classes: int) -> Tensor:
    """The pixels of the discriminative part(s) as ``bool [N, 1, H, W]``: disc (6 classes), disc and stem (12)."""
    mask = part_map == DISC_ID
    if _check_num_classes(num_classes) == 12:
        mask |= part_map == STEM_ID
    return mask[:, None]


class GroundTruthShapes(GeneratedDataset):
    """``size`` flower images whose class is the colour of the discriminative part(s) (see the module docstring).

    Items are ``(image, label, mask)``: ``image`` float32 ``[3, H, W]`` in [0, 1] (no normalisation), ``label`` a
    scalar ``LongTensor``, ``mask`` float32 ``[1, H, W]`` with 1 on the visible pixels of the discriminative
    part(s). Whole-dataset tensors: ``.images [N, 3, H, W]``, ``.labels [N]``, ``.masks [N, 1, H, W]``, plus the
    scene description ``.scenes`` (:class:`FlowerScenes`) and ``.part_map [N, H, W]`` (uint8 part ids, see
    :data:`PART_NAMES`) for concept-level ground truth. Labels are exactly balanced (``size // num_classes`` or one
    more per class) in a random order. Same arguments give identical tensors.
    """

    item_fields = ("images", "labels", "masks")
    repr_fields = ("num_classes", "size", "image_size", "seed")

    def __init__(self, num_classes: int = 6, size: int = 1000, image_size: int = 64, seed: int = 0) -> None:
        self.num_classes = _check_num_classes(num_classes)
        check_int("size", size, minimum=1, owner=type(self).__name__)
        self.image_size = check_image_size(image_size, MIN_IMAGE_SIZE)
        check_generator_seed(seed, type(self).__name__)
        self.seed = seed
        self.class_names = class_names(self.num_classes)

        generator = torch.Generator().manual_seed(seed)
        labels = balanced_labels(size, self.num_classes, generator)
        images, part_maps, scenes = [], [], []
        for start in range(0, size, CHUNK):
            chunk_labels = labels[start : start + CHUNK]
            scene = sample_scenes(chunk_labels, self.num_classes, image_size, generator)
            backgrounds = render_backgrounds(len(chunk_labels), image_size, generator)
            image, part_map = render_flowers(scene, backgrounds)
            images.append(image)
            part_maps.append(part_map)
            scenes.append(scene)
        self.images = torch.cat(images)
        self.labels = labels
        self.part_map = torch.cat(part_maps)
        self.masks = discriminative_mask(self.part_map, self.num_classes).float()
        self.scenes = FlowerScenes(
            *(torch.cat([getattr(s, f) for s in scenes]) for f in (field.name for field in fields(FlowerScenes)))
        )



class GroundTruthDataModule(InMemoryDataModule):
    """Train/val/test splits of :class:`GroundTruthShapes`, each generated from its own seed derived from ``seed``.

    Batches are ``(images [B, 3, H, W], labels [B], masks [B, 1, H, W])``. Every rank of a distributed run
    generates the same data from the seed (no download, no files), so ``prepare_data`` has nothing to do.
    """

    def __init__(
        self,
        num_classes: int = 6,
        image_size: int = 64,
        n_train: int = 2000,
        n_val: int = 500,
        n_test: int = 500,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.num_classes = _check_num_classes(num_classes)
        self.image_size = check_image_size(image_size, MIN_IMAGE_SIZE)
        self.seeded_splits(n_train, n_val, n_test, seed)
        self.class_names = class_names(self.num_classes)
        self.in_channels = 3
        self.save_hyperparameters()

    def make_dataset(self, split: str) -> GroundTruthShapes:
        return GroundTruthShapes(self.num_classes, self.sizes[split], self.image_size, self.split_seeds[split])
