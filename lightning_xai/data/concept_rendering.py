"""Drawing ConceptScenes: the concept vocabulary, the class rules and the vectorised rendering of objects, textures,
backgrounds and the spurious tag (see :mod:`lightning_xai.data.concepts` for the dataset and what it models; that
module re-exports every public name). Pure torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHUNK_PIXELS",
    "CLASS_RULES",
    "COLOURS",
    "CONCEPT_CATEGORIES",
    "CONCEPT_NAMES",
    "DARK_SHADE",
    "MAX_OBJECTS",
    "MIN_IMAGE_SIZE",
    "OBJECT_CATEGORIES",
    "PLACEMENT_TRIES",
    "SIZE_RANGES",
    "TAG_CONCEPT",
    "TAG_ID",
    "TEMPERATURES",
    "TEMPERATURE_NAMES",
    "chunk_size",
    "class_from_concepts",
    "class_names",
    "concept_names",
    "tag_side",
]


CONCEPT_CATEGORIES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "cross"],
    "colour": ["red", "green", "blue", "yellow"],
    "texture": ["plain", "stripes", "dots"],
    "size": ["small", "large"],
    "position": ["left", "right"],
    "background": ["plain", "noise", "grid"],
}


CONCEPT_NAMES: list[str] = [f"{cat}:{value}" for cat, values in CONCEPT_CATEGORIES.items() for value in values]


TAG_CONCEPT = "tag:present"


OBJECT_CATEGORIES = ("shape", "colour", "texture", "size", "position")


COLOURS = torch.tensor(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.15],  # green
        [0.15, 0.30, 0.95],  # blue
        [0.95, 0.85, 0.10],  # yellow
    ]
)


TEMPERATURES = ((0, 3), (1, 2))


TEMPERATURE_NAMES = ("warm", "cold")


CLASS_RULES = ("shape_colour", "shape")


DARK_SHADE = 0.4


SIZE_RANGES = {"small": (0.08, 0.10), "large": (0.15, 0.18)}


MIN_IMAGE_SIZE = 24


MAX_OBJECTS = 6


CHUNK_PIXELS = 2**22


PLACEMENT_TRIES = 32


TAG_ID = -1


_NUM_BASE = len(CONCEPT_NAMES)


_OFFSETS = {cat: CONCEPT_NAMES.index(f"{cat}:{values[0]}") for cat, values in CONCEPT_CATEGORIES.items()}


def concept_names(with_tag: bool = False) -> list[str]:
    """The concept names of a dataset: :data:`CONCEPT_NAMES`, plus :data:`TAG_CONCEPT` last if ``with_tag``."""
    return [*CONCEPT_NAMES, TAG_CONCEPT] if with_tag else list(CONCEPT_NAMES)


def _check_class_rule(class_rule: str) -> str:
    if class_rule not in CLASS_RULES:
        raise ValueError(f"unknown class_rule {class_rule!r}; valid rules: {list(CLASS_RULES)}")
    return class_rule


def class_names(class_rule: str = "shape_colour") -> list[str]:
    """The class names of ``class_rule``, in class-index order (see the module docstring)."""
    shapes = CONCEPT_CATEGORIES["shape"]
    if _check_class_rule(class_rule) == "shape":
        return list(shapes)
    return [f"{shape}-{temp}" for shape in shapes for temp in TEMPERATURE_NAMES]


def class_from_concepts(concept_labels: Tensor, class_rule: str = "shape_colour") -> Tensor:
    """The class of each image as a function of its image-level concept labels ``[N, K]`` (0/1 or scores).

    ``K`` is :data:`CONCEPT_NAMES`' length, optionally plus the tag concept (ignored). The shape is the arg-max of
    the shape columns; for ``"shape_colour"`` the temperature is cold (1) when the strongest colour column is green
    or blue. On true labels this reproduces ``ConceptScenes.labels`` exactly; on predicted concept scores it is
    the bottleneck's "perfect intervention" classifier.
    """
    _check_class_rule(class_rule)
    if concept_labels.ndim != 2 or concept_labels.shape[1] not in (_NUM_BASE, _NUM_BASE + 1):
        raise ValueError(
            f"concept_labels must be [N, {_NUM_BASE}] or [N, {_NUM_BASE + 1}] (with the tag), "
            f"got {tuple(concept_labels.shape)}"
        )
    shape_cols = slice(_OFFSETS["shape"], _OFFSETS["shape"] + len(CONCEPT_CATEGORIES["shape"]))
    shape = concept_labels[:, shape_cols].argmax(dim=1)
    if class_rule == "shape":
        return shape
    colour = concept_labels[:, _OFFSETS["colour"] : _OFFSETS["colour"] + len(COLOURS)].argmax(dim=1)
    cold = torch.zeros(len(COLOURS), dtype=torch.long, device=colour.device)
    cold[list(TEMPERATURES[1])] = 1
    return 2 * shape + cold[colour]


def tag_side(image_size: int) -> int:
    """Side in pixels of the spurious tag: 6 at 64x64, scaled with the image, at least 4."""
    return max(4, round(6 * image_size / 64))


def _tag_box(image_size: int) -> tuple[int, int]:
    """``(start, stop)`` of the tag's rows and columns: the bottom-right corner, one pixel from the edges."""
    stop = image_size - 1
    return stop - tag_side(image_size), stop


def chunk_size(image_size: int) -> int:
    """Images generated per vectorised step at ``image_size`` (1024 at 64x64)."""
    return max(1, CHUNK_PIXELS // (image_size * image_size))


def _check_max_objects(max_objects: int) -> int:
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be an int in [1, {MAX_OBJECTS}], got {max_objects!r}")
    return max_objects


def _check_spurious_tag(spurious_tag: float | None) -> float | None:
    if spurious_tag is None:
        return None
    if isinstance(spurious_tag, bool) or not isinstance(spurious_tag, (int, float)):
        raise TypeError(f"spurious_tag must be None or a probability in [0, 1], got {type(spurious_tag).__name__}")
    if not 0.0 <= spurious_tag <= 1.0:  # also rejects NaN
        raise ValueError(f"spurious_tag must be None or a probability in [0, 1], got {spurious_tag!r}")
    return float(spurious_tag)


def _pixel_grid(image_size: int) -> tuple[Tensor, Tensor]:
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    return coords.view(1, 1, image_size), coords.view(1, image_size, 1)  # x [1,1,W], y [1,H,1]


def _sample_attributes(labels: Tensor, class_rule: str, max_objects: int, generator: torch.Generator) -> Tensor:
    """Per-object ``(shape, colour, texture, size)`` indices ``[n, max_objects, 4]`` for the given classes."""
    n, m = labels.shape[0], max_objects
    shape = (labels // 2 if class_rule == "shape_colour" else labels)[:, None].expand(n, m)
    if class_rule == "shape_colour":
        temps = torch.tensor(TEMPERATURES)  # [2, 2]
        pick = torch.randint(0, 2, (n, m), generator=generator)
        colour = temps[(labels % 2)[:, None].expand(n, m), pick]
    else:
        colour = torch.randint(0, len(COLOURS), (n, m), generator=generator)
    texture = torch.randint(0, len(CONCEPT_CATEGORIES["texture"]), (n, m), generator=generator)
    size = torch.randint(0, len(CONCEPT_CATEGORIES["size"]), (n, m), generator=generator)
    return torch.stack([shape, colour, texture, size], dim=-1)


def _place_objects(
    radii: Tensor, count: Tensor, image_size: int, keep_tag_free: bool, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Non-overlapping centres ``[n, M, 2]`` (x, y) and the placed-object mask ``[n, M]``.

    Objects are placed in turn; each takes the first of :data:`PLACEMENT_TRIES` uniform candidates whose circle
    (radius ``r``) stays one pixel inside the image, one pixel away from every placed object and from the tag box.
    Object 0 always exists (falls back to the image centre, which is always free). Object ``k`` exists when
    ``k < count`` and a free spot was found.
    """
    n, m = radii.shape
    size = image_size
    centres = torch.zeros(n, m, 2)
    placed = torch.zeros(n, m, dtype=torch.bool)
    box0, box1 = _tag_box(size)
    for k in range(m):
        r = radii[:, k, None]  # [n, 1]
        low = r + 1.0
        cand = low[..., None] + (size - 2 * low)[..., None] * torch.rand(n, PLACEMENT_TRIES, 2, generator=generator)
        free = torch.ones(n, PLACEMENT_TRIES, dtype=torch.bool)
        for j in range(k):
            dist = (cand - centres[:, j, None, :]).norm(dim=-1)
            free &= ~placed[:, j, None] | (dist > r + radii[:, j, None] + 1.0)
        if keep_tag_free:
            gap = (box0 - cand).clamp(min=0) + (cand - box1).clamp(min=0)  # per-axis distance to the box
            free &= gap.norm(dim=-1) > r + 1.0
        found = free.any(dim=1)
        chosen = cand[torch.arange(n), free.int().argmax(dim=1)]
        if k == 0:
            chosen = torch.where(found[:, None], chosen, torch.full_like(chosen, size / 2))
            found = torch.ones_like(found)
        placed[:, k] = found & (k < count)
        centres[:, k] = torch.where(placed[:, k, None], chosen, torch.zeros_like(chosen))
    return centres, placed


def _shape_masks(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    """Inside-masks ``[4, n, H, W]`` of circle, square, triangle, cross in the object frame ``(u, v)``."""
    circle = u**2 + v**2 <= (0.85 * r) ** 2
    square = (u.abs() <= 0.7 * r) & (v.abs() <= 0.7 * r)
    # equilateral triangle with circumradius r, a vertex on the +u axis: inside all three half-planes whose
    # outward normals point away from the vertices (at angles pi/3, pi, 5pi/3), at distance r/2 (the inradius)
    triangle = torch.ones_like(circle)
    for a in (math.pi / 3, math.pi, 5 * math.pi / 3):
        triangle &= u * math.cos(a) + v * math.sin(a) <= 0.5 * r
    arm, half_width = 0.95 * r, 0.3 * r
    cross = ((u.abs() <= arm) & (v.abs() <= half_width)) | ((u.abs() <= half_width) & (v.abs() <= arm))
    return torch.stack([circle, square, triangle, cross])


def _render_objects(
    attributes: Tensor,
    centres: Tensor,
    radii: Tensor,
    angles: Tensor,
    placed: Tensor,
    backgrounds: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Paint the objects over ``backgrounds [n, 3, H, W]``: ``(images [n, 3, H, W], object_map [n, H, W] int8)``.

    Each object is rasterised in a square window around its centre (large enough for the largest object), so the
    cost does not grow with the image area; windows are written back with gather/scatter on flat pixel indices.
    Objects never overlap, so the order of writing does not matter.
    """
    n, m = radii.shape
    size = backgrounds.shape[-1]
    stripe_angles = math.pi * torch.rand(n, m, generator=generator)
    stripe_period = max(4.0, size / 8)
    dot_period = max(4.0, size / 10)
    win = min(size, 2 * math.ceil(SIZE_RANGES["large"][1] * size) + 4)
    offsets = torch.arange(win)
    images = backgrounds.clone().reshape(n, 3, size * size)
    object_map = torch.zeros(n, size * size, dtype=torch.int8)
    colours = COLOURS[attributes[:, :, 1]]  # [n, M, 3]
    batch = torch.arange(n)
    for k in range(m):
        cx, cy = centres[:, k, 0], centres[:, k, 1]
        cols = torch.floor(cx - win / 2).long().clamp(0, size - win)[:, None] + offsets  # [n, win]
        rows = torch.floor(cy - win / 2).long().clamp(0, size - win)[:, None] + offsets
        dx = (cols + 0.5).view(n, 1, win) - cx.view(n, 1, 1)
        dy = (rows + 0.5).view(n, win, 1) - cy.view(n, 1, 1)
        cos, sin = torch.cos(angles[:, k]).view(n, 1, 1), torch.sin(angles[:, k]).view(n, 1, 1)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        inside = _shape_masks(u, v, radii[:, k].view(n, 1, 1))[attributes[:, k, 0], batch]
        inside &= placed[:, k].view(n, 1, 1)
        # stripes: dark half-periods along a random direction, a stripe edge through the centre
        w = dx * torch.cos(stripe_angles[:, k]).view(n, 1, 1) + dy * torch.sin(stripe_angles[:, k]).view(n, 1, 1)
        stripes = torch.remainder(w / stripe_period, 1.0) < 0.5
        # dots: a lattice in the object's frame with a dot on the centre (so even a small object shows one)
        du, dv = u - dot_period * torch.round(u / dot_period), v - dot_period * torch.round(v / dot_period)
        dots = du**2 + dv**2 <= (0.3 * dot_period) ** 2
        texture = attributes[:, k, 2].view(n, 1, 1)
        dark = torch.where(texture == 1, stripes, (texture == 2) & dots).view(n, -1)
        inside = inside.view(n, -1)
        flat = (rows[:, :, None] * size + cols[:, None, :]).view(n, -1)
        object_map.scatter_(1, flat, torch.where(inside, k + 1, object_map.gather(1, flat)))
        paint = colours[:, k, :, None] * torch.where(dark, DARK_SHADE, 1.0)[:, None, :]  # [n, 3, win * win]
        flat3 = flat[:, None, :].expand(-1, 3, -1)
        images.scatter_(2, flat3, torch.where(inside[:, None], paint, images.gather(2, flat3)))
    return images.view(n, 3, size, size), object_map.view(n, size, size)


def _render_backgrounds(kind: Tensor, image_size: int, generator: torch.Generator) -> Tensor:
    """Backgrounds ``[n, 3, H, W]`` in [0, 1] of the given kinds (0 plain, 1 noise, 2 grid).

    A muted base colour (grey level in [0.3, 0.7] plus a tint of at most 0.08 per channel); noise adds uniform
    per-pixel, per-channel noise in [-0.2, 0.2]; grid draws lines (lighter on dark bases, darker on light ones) of
    width ``max(1, size / 32)`` every ``(0.10 .. 0.16) * size`` pixels with a random phase.
    """
    n, size = kind.shape[0], image_size
    base = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    base = base + 0.08 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    out = base.expand(n, 3, size, size).clone()
    noisy = torch.nonzero(kind == 1).flatten()
    out[noisy] += 0.2 * (2 * torch.rand(noisy.numel(), 3, size, size, generator=generator) - 1)
    grid = torch.nonzero(kind == 2).flatten()
    g = grid.numel()
    period = size * (0.1 + 0.06 * torch.rand(g, 1, 1, generator=generator))
    phase = period * torch.rand(g, 2, 1, generator=generator)
    x, y = _pixel_grid(size)
    line_width = max(1.0, size / 32)
    lines = (torch.remainder(x - phase[:, 0:1], period) < line_width) | (
        torch.remainder(y - phase[:, 1:2].transpose(1, 2), period) < line_width
    )
    line_colour = torch.where(base[grid].mean(dim=1, keepdim=True) > 0.5, base[grid] - 0.3, base[grid] + 0.3)
    out[grid] = torch.where(lines[:, None], line_colour.expand(g, 3, size, size), out[grid])
    return out.clamp_(0, 1)


class _LazyConceptMasks:
    """``dataset.concept_masks[i]``: the ``[K, H, W]`` (or ``[n, K, H, W]``) bool masks, computed on access."""

    def __init__(self, dataset: Any) -> None:  # a ConceptScenes
        self._dataset = dataset

    @property
    def shape(self) -> torch.Size:
        d = self._dataset
        return torch.Size((len(d), len(d.concept_names), d.image_size, d.image_size))

    dtype = torch.bool

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key: object) -> Tensor:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        masks = self._dataset.concept_masks_for(first)  # [n, K, H, W]
        if isinstance(first, int) or (isinstance(first, Tensor) and first.ndim == 0):
            return masks[(0, *rest)]
        return masks[(slice(None), *rest)]

