"""A procedurally generated concept dataset: every concept of every scene is known per image and per pixel.

This is the project's stand-in for **Broden** (D. Bau, B. Zhou, A. Khosla, A. Oliva and A. Torralba, "Network
Dissection: Quantifying Interpretability of Deep Visual Representations", CVPR 2017): a densely labelled set of
concepts to dissect units against (pixel masks), to learn concept activation vectors from (B. Kim et al., "Testing
with Concept Activation Vectors (TCAV)", ICML 2018: example images of a concept and random counter-examples), and
to supervise concept bottleneck models (P. W. Koh et al., "Concept Bottleneck Models", ICML 2020: image-level
concept labels from which the class follows exactly). Nothing is downloaded: scenes are drawn from a seed.

**Scenes.** Every ``image_size x image_size`` RGB image (values in [0, 1], no normalisation) shows 1 to
``max_objects`` non-overlapping objects (at least one pixel of background between any two) on a background. Each
object has one value in each object category of :data:`CONCEPT_CATEGORIES`:

* ``shape``: circle, square, triangle, cross (randomly rotated, all inscribed in the object's radius ``r``);
* ``colour``: red, green, blue, yellow (:data:`COLOURS`; flat, saturated);
* ``texture``: plain (flat colour), stripes (dark stripes of random orientation), dots (a lattice of dark dots
  centred on the object); dark pixels have the object's colour times :data:`DARK_SHADE`, so an object's pixels
  carry its hue and nothing else;
* ``size``: small (``r`` in ``SIZE_RANGES["small"]`` times ``image_size``) or large;
* ``position``: left or right - whether the object's centre lies in the left half (``x < image_size / 2``) or
  the right half of the image.

and the image has exactly one ``background``: plain (a flat, muted grey-ish colour), noise (that colour plus
per-pixel uniform noise) or grid (that colour crossed by a lighter or darker grid of lines). Backgrounds are never
saturated, so no background pixel looks like an object colour.

**Concepts.** The flattened order of :data:`CONCEPT_CATEGORIES` gives the concept indices; names are
``"category:value"`` (:data:`CONCEPT_NAMES`, e.g. ``"shape:circle"``). With ``spurious_tag`` set, the concept
``"tag:present"`` (:data:`TAG_CONCEPT`) is appended as the last one. Pixel masks: an object concept covers the
pixels of the objects with that value, a background concept all background pixels when the image has that
background, ``"tag:present"`` the tag's pixels (border included). Tag pixels are neither object nor background.
Image-level concept labels are ``mask.any()`` of these masks exactly (every placed object covers at least one
pixel, every image has background pixels).

**Classes** (``class_rule``), always a deterministic function of the image-level concept labels
(:func:`class_from_concepts`), because *every object of an image carries the class-relevant concepts* (the
"distractor" objects copy them) while all other concepts are drawn independently of the class:

* ``"shape_colour"`` (default, 8 classes): ``class = 2 * shape + temperature`` with shape indices in the order
  circle, square, triangle, cross and temperature 0 = warm (red, yellow), 1 = cold (green, blue). All objects of
  an image have the same shape and colours of the same temperature (the exact colour is drawn per object within
  the temperature), so exactly one shape concept is present and the colours present are all warm or all cold.
  Names ``"circle-warm", "circle-cold", "square-warm", ...``.
* ``"shape"`` (4 classes): ``class = shape`` (all objects share the shape; colours are free). Names
  ``"circle", "square", "triangle", "cross"``.

Labels are exactly balanced (``size // num_classes`` or one more per class) in a random order.

**Spurious tag** (the TCAV sanity experiment of Kim et al. 2018): with ``spurious_tag = p`` (a probability), a
small white square with a one-pixel black border (side :func:`tag_side`, 6 pixels at 64x64) is printed in the
bottom-right corner, one pixel from the edges, with probability ``p`` in class-0 images and ``(1 - p) /
num_classes`` in the images of every other class (independent draws per image). ``p = 1`` makes the tag a perfect
cue for class 0, ``p = 1 / (num_classes + 1)`` makes it independent of the class. Whenever ``spurious_tag`` is not
``None`` objects are kept away from the tag's corner in *all* images, so the tag never hides an object and its
absence says nothing about the objects.

Generation is seeded (:class:`torch.Generator`), deterministic (same arguments, same tensors) and vectorised in
chunks of :func:`chunk_size` images, each object rasterised in a window around it (2000 64x64 scenes in about a
second on one core). Concept masks are not stored (2000 images x 19 concepts x 64x64 booleans would be ~150 MB): the
dataset keeps a per-pixel object-index map (``object_map [N, H, W] int8``) and the per-object concept values, and
:meth:`ConceptScenes.concept_mask` / :meth:`ConceptScenes.concept_masks_for` compute exact masks on demand.
Textures need room to show: at the minimum ``image_size`` (24) a small object is only a few pixels across.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_xai.data.base import InMemoryDataModule, derive_seeds

__all__ = [
    "CLASS_RULES",
    "COLOURS",
    "CONCEPT_CATEGORIES",
    "CONCEPT_NAMES",
    "OBJECT_CATEGORIES",
    "TAG_CONCEPT",
    "ConceptDataModule",
    "ConceptScenes",
    "chunk_size",
    "class_from_concepts",
    "class_names",
    "concept_names",
    "tag_side",
]

#: Concept categories and their values; the flattened order is the concept index.
CONCEPT_CATEGORIES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "cross"],
    "colour": ["red", "green", "blue", "yellow"],
    "texture": ["plain", "stripes", "dots"],
    "size": ["small", "large"],
    "position": ["left", "right"],
    "background": ["plain", "noise", "grid"],
}
#: ``"category:value"`` for every concept, in concept-index order (without the optional tag concept).
CONCEPT_NAMES: list[str] = [f"{cat}:{value}" for cat, values in CONCEPT_CATEGORIES.items() for value in values]
#: The concept appended (last) when the dataset prints a spurious tag.
TAG_CONCEPT = "tag:present"
#: Categories whose value belongs to an object (in the column order of ``ConceptScenes.object_concepts``).
OBJECT_CATEGORIES = ("shape", "colour", "texture", "size", "position")
#: Object colours, RGB in [0, 1], in the order of ``CONCEPT_CATEGORIES["colour"]``.
COLOURS = torch.tensor(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.15],  # green
        [0.15, 0.30, 0.95],  # blue
        [0.95, 0.85, 0.10],  # yellow
    ]
)
#: Colour indices of the two temperatures of the ``"shape_colour"`` rule: 0 = warm, 1 = cold.
TEMPERATURES = ((0, 3), (1, 2))
TEMPERATURE_NAMES = ("warm", "cold")
CLASS_RULES = ("shape_colour", "shape")
#: Texture pixels ("stripes", "dots") are the object's colour times this factor.
DARK_SHADE = 0.4
#: Object radius ``r`` (the radius of the circle every shape is inscribed in) as a fraction of the image size.
SIZE_RANGES = {"small": (0.08, 0.10), "large": (0.15, 0.18)}
MIN_IMAGE_SIZE = 24
MAX_OBJECTS = 6
#: Pixels (images x H x W) rendered per vectorised step: bounds the memory of generation (~50 MB per float32 RGB
#: chunk) while keeping the number of tensor operations low. Part of the seed -> data mapping.
CHUNK_PIXELS = 2**22
#: Candidate positions tried per object; an object (other than the first) that finds no free spot is dropped.
PLACEMENT_TRIES = 32
#: ``object_map`` value of the tag's pixels (0 = background, ``k + 1`` = object ``k``).
TAG_ID = -1

_NUM_BASE = len(CONCEPT_NAMES)
#: Index of the first concept of each category.
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


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE} (pixels), got {image_size!r}")
    return image_size


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


def _check_size(size: int, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} (number of images) must be a positive int, got {size!r}")
    return size


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

    def __init__(self, dataset: ConceptScenes) -> None:
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


class ConceptScenes(Dataset):
    """``size`` scenes of objects with known concepts (see the module docstring for the exact generative rules).

    Items are ``(image, label, concept_labels)``: ``image`` float32 ``[3, H, W]`` in [0, 1], ``label`` a scalar
    ``LongTensor``, ``concept_labels`` float32 ``[K]`` 0/1 (image-level presence of every concept).

    Whole-dataset tensors: ``.images [N, 3, H, W]``, ``.labels [N]``, ``.concept_labels [N, K]``,
    ``.object_map [N, H, W] int8`` (0 background, ``k + 1`` object ``k``, ``-1`` the tag), ``.object_concepts
    [N, max_objects, 5] long`` (value index in each of :data:`OBJECT_CATEGORIES` per object slot, -1 for an empty
    slot), ``.object_centres [N, max_objects, 2]`` (x, y pixels; pixel ``(i, j)`` has centre ``(j + 0.5, i + 0.5)``),
    ``.object_radii [N, max_objects]`` (pixels), ``.object_angles [N, max_objects]`` (radians; the shape's frame is
    rotated by it: a triangle vertex and a square/cross axis point along it; 0 for empty slots), ``.num_objects
    [N]``, ``.background [N]`` (background value index), ``.has_tag [N] bool``. ``.concept_masks`` is a lazy
    ``[N, K, H, W]`` bool view (index it, e.g. ``ds.concept_masks[:8]``); :meth:`concept_mask` and
    :meth:`concept_masks_for` compute the masks of chosen images.

    Metadata: ``.concept_names``, ``.num_concepts``, ``.categories`` (category -> concept indices),
    ``.class_names``, ``.num_classes``, ``.class_rule``. Same arguments give identical tensors.

    The number of objects is drawn uniformly in ``1 .. max_objects`` per image; an extra object that finds no free
    spot after :data:`PLACEMENT_TRIES` tries is dropped (``.num_objects`` counts the objects actually drawn: on
    average 1.5 for ``max_objects=2``, 1.96 instead of 2 for 3, 3.3 instead of 3.5 for 6, at 64x64). The first
    object is never dropped.
    """

    def __init__(
        self,
        size: int = 1000,
        image_size: int = 64,
        max_objects: int = 2,
        class_rule: str = "shape_colour",
        spurious_tag: float | None = None,
        seed: int = 0,
    ) -> None:
        size = _check_size(size)
        self.image_size = _check_image_size(image_size)
        self.max_objects = _check_max_objects(max_objects)
        self.class_rule = _check_class_rule(class_rule)
        self.spurious_tag = _check_spurious_tag(spurious_tag)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.class_names = class_names(class_rule)
        self.num_classes = len(self.class_names)
        self.concept_names = concept_names(with_tag=self.spurious_tag is not None)
        self.num_concepts = len(self.concept_names)
        self.categories: dict[str, list[int]] = {}
        for index, name in enumerate(self.concept_names):
            self.categories.setdefault(name.split(":")[0], []).append(index)

        generator = torch.Generator().manual_seed(seed)
        labels = (torch.arange(size) % self.num_classes)[torch.randperm(size, generator=generator)]
        if self.spurious_tag is None:
            has_tag = torch.zeros(size, dtype=torch.bool)
        else:
            p = self.spurious_tag
            prob = torch.where(labels == 0, p, (1 - p) / self.num_classes)
            has_tag = torch.rand(size, generator=generator) < prob

        fields = ("object_map", "images", "object_concepts", "object_centres", "object_radii", "object_angles")
        fields = (*fields, "background")
        parts: dict[str, list[Tensor]] = {name: [] for name in fields}
        step = chunk_size(self.image_size)
        for start in range(0, size, step):
            out = self._generate(labels[start : start + step], has_tag[start : start + step], generator)
            for name, value in zip(fields, out):
                parts[name].append(value)
        self.labels = labels
        self.has_tag = has_tag
        whole = {name: torch.cat(parts[name]) for name in fields}
        self.images: Tensor = whole["images"]
        self.object_map: Tensor = whole["object_map"]
        self.object_concepts: Tensor = whole["object_concepts"]
        self.object_centres: Tensor = whole["object_centres"]
        self.object_radii: Tensor = whole["object_radii"]
        self.object_angles: Tensor = whole["object_angles"]
        self.background: Tensor = whole["background"]
        self.num_objects = (self.object_concepts[:, :, 0] >= 0).sum(dim=1)
        self.concept_labels = self._image_labels()
        self.concept_masks = _LazyConceptMasks(self)

    def _generate(self, labels: Tensor, has_tag: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
        n, m, size = labels.shape[0], self.max_objects, self.image_size
        attributes = _sample_attributes(labels, self.class_rule, m, generator)
        count = torch.randint(1, m + 1, (n,), generator=generator)
        low, high = (torch.tensor(SIZE_RANGES[s]) for s in CONCEPT_CATEGORIES["size"])
        frac = torch.rand(n, m, generator=generator)
        size_range = torch.stack([low, high])[attributes[:, :, 3]]  # [n, M, 2] (low, high) per object
        radii = size * (size_range[..., 0] + (size_range[..., 1] - size_range[..., 0]) * frac)
        centres, placed = _place_objects(radii, count, size, self.spurious_tag is not None, generator)
        background = torch.randint(0, len(CONCEPT_CATEGORIES["background"]), (n,), generator=generator)
        backgrounds = _render_backgrounds(background, size, generator)
        angles = 2 * math.pi * torch.rand(n, m, generator=generator)
        images, object_map = _render_objects(attributes, centres, radii, angles, placed, backgrounds, generator)
        # an object without a single pixel centre inside its shape would break label == mask.any(): drop it (by
        # geometry this does not happen at image_size >= MIN_IMAGE_SIZE; the tests check every object's pixels)
        visible = torch.stack([(object_map == k + 1).flatten(1).any(dim=1) for k in range(m)], dim=1)
        placed &= visible
        position = (centres[:, :, 0] >= size / 2).long()
        attributes = torch.cat([attributes, position[..., None]], dim=-1)
        attributes = torch.where(placed[..., None], attributes, torch.full_like(attributes, -1))
        if has_tag.any():
            lo, hi = _tag_box(size)
            tag = torch.zeros(3, hi - lo, hi - lo)
            tag[:, 1:-1, 1:-1] = 1.0  # white inside a one-pixel black border
            images[has_tag, :, lo:hi, lo:hi] = tag
            object_map[has_tag, lo:hi, lo:hi] = TAG_ID
        radii = torch.where(placed, radii, torch.zeros_like(radii))
        angles = torch.where(placed, angles, torch.zeros_like(angles))
        return object_map, images, attributes, centres, radii, angles, background

    # ----------------------------------------------------------------------------------------------- concepts
    def concept_index(self, concept: str | int) -> int:
        """The index of ``concept`` (a name such as ``"shape:circle"`` or an index), validated."""
        if isinstance(concept, bool):
            raise TypeError(f"concept must be a name or an int index, got {concept!r}")
        if not isinstance(concept, (str, int)) and hasattr(concept, "__index__"):
            concept = operator.index(concept)  # NumPy integers, 0-d integer tensors
        if isinstance(concept, int):
            if not 0 <= concept < self.num_concepts:
                raise ValueError(f"concept index {concept} out of range [0, {self.num_concepts})")
            return concept
        if isinstance(concept, str):
            if concept in self.concept_names:
                return self.concept_names.index(concept)
            close = difflib.get_close_matches(concept, self.concept_names, n=3)
            hint = f" (did you mean {close}?)" if close else ""
            raise ValueError(f"unknown concept {concept!r}{hint}; valid concepts: {self.concept_names}")
        raise TypeError(f"concept must be a name or an int index, got {type(concept).__name__}")

    def _indices(self, index: int | slice | Sequence[int] | Tensor) -> Tensor:
        """Any index into the dataset (int, slice, sequence, LongTensor or bool mask) as a 1-D LongTensor."""
        if isinstance(index, Tensor):
            index = index.cpu()
        return torch.arange(len(self))[index].reshape(-1)

    def _lookup(self, indices: Tensor) -> Tensor:
        """``[n, K, max_objects + 2]``: does ``object_map`` id ``j - 1`` (tag, background, objects) carry concept k."""
        n, m = indices.shape[0], self.max_objects
        table = torch.zeros(n, self.num_concepts, m + 2, dtype=torch.bool)
        objects = self.object_concepts[indices]  # [n, M, 5]
        for col, cat in enumerate(OBJECT_CATEGORIES):
            for value in range(len(CONCEPT_CATEGORIES[cat])):
                table[:, _OFFSETS[cat] + value, 2:] = objects[:, :, col] == value
        background = self.background[indices]
        for value in range(len(CONCEPT_CATEGORIES["background"])):
            table[:, _OFFSETS["background"] + value, 1] = background == value
        if self.spurious_tag is not None:
            table[:, _NUM_BASE, 0] = self.has_tag[indices]
        return table

    def _image_labels(self) -> Tensor:
        ids = self.object_map.flatten(1)
        present = torch.stack([(ids == j).any(dim=1) for j in range(TAG_ID, self.max_objects + 1)], dim=1)
        table = torch.cat([self._lookup(idx) for idx in torch.arange(len(self)).split(chunk_size(self.image_size))])
        return (table & present[:, None, :]).any(dim=-1).float()

    def concept_mask(self, index_or_indices: int | slice | Sequence[int] | Tensor, concept: str | int) -> Tensor:
        """Pixel mask ``bool [n, 1, H, W]`` of ``concept`` in the chosen images (``n = 1`` for an int index)."""
        c = self.concept_index(concept)
        indices = self._indices(index_or_indices)
        table = self._lookup(indices)[:, c]  # [n, M + 2]
        ids = self.object_map[indices].long().flatten(1) - TAG_ID
        n, size = indices.shape[0], self.image_size
        return torch.gather(table, 1, ids).view(n, 1, size, size)

    def concept_masks_for(self, indices: int | slice | Sequence[int] | Tensor) -> Tensor:
        """Pixel masks ``bool [n, K, H, W]`` of all concepts in the chosen images (``n = 1`` for an int index)."""
        indices = self._indices(indices)
        table = self._lookup(indices)  # [n, K, M + 2]
        n, size = indices.shape[0], self.image_size
        ids = (self.object_map[indices].long().flatten(1) - TAG_ID)[:, None, :].expand(-1, self.num_concepts, -1)
        return torch.gather(table, 2, ids).view(n, self.num_concepts, size, size)

    def concept_indices(self, concept: str | int, present: bool = True) -> Tensor:
        """Indices of the images that show (``present=True``) or do not show ``concept``."""
        c = self.concept_index(concept)
        return torch.nonzero(self.concept_labels[:, c] == float(present)).flatten()

    def concept_examples(self, concept: str | int, n: int, seed: int = 0, return_indices: bool = False) -> Tensor:
        """``n`` distinct images ``[n, 3, H, W]`` that show ``concept``, drawn at random (seeded) - TCAV's concept set.

        Raises ``ValueError`` when fewer than ``n`` images show the concept. With ``return_indices`` the dataset
        indices are returned instead of the images (e.g. to fetch their masks).
        """
        return self._draw(self.concept_indices(concept), n, seed, return_indices, f"showing {concept!r}")

    def random_examples(
        self, n: int, seed: int = 0, exclude: str | int | None = None, return_indices: bool = False
    ) -> Tensor:
        """``n`` distinct random images ``[n, 3, H, W]`` (seeded), optionally none showing ``exclude``.

        TCAV's random counter-examples. Raises ``ValueError`` when fewer than ``n`` images qualify.
        """
        if exclude is None:
            pool, what = torch.arange(len(self)), "in the dataset"
        else:
            pool, what = self.concept_indices(exclude, present=False), f"without {exclude!r}"
        return self._draw(pool, n, seed, return_indices, what)

    def _draw(self, pool: Tensor, n: int, seed: int, return_indices: bool, what: str) -> Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if pool.numel() < n:
            raise ValueError(f"asked for {n} images {what}, but only {pool.numel()} of {len(self)} exist")
        generator = torch.Generator().manual_seed(seed)
        chosen = pool[torch.randperm(pool.numel(), generator=generator)[:n]]
        return chosen if return_indices else self.images[chosen]

    # ------------------------------------------------------------------------------------------------ dataset
    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.images[index], self.labels[index], self.concept_labels[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={len(self)}, image_size={self.image_size}, max_objects={self.max_objects}, "
            f"class_rule={self.class_rule!r}, spurious_tag={self.spurious_tag}, seed={self.seed})"
        )


class ConceptDataModule(InMemoryDataModule):
    """Train/val/test splits of :class:`ConceptScenes`, each generated from its own seed derived from ``seed``.

    Batches are ``(images [B, 3, H, W], labels [B], concept_labels [B, K])``. Every rank of a distributed run
    generates the same data from the seed, so ``prepare_data`` has nothing to do. Pixel masks are available from
    the datasets (``dm.dataset("val").concept_masks_for(indices)``).
    """

    def __init__(
        self,
        image_size: int = 64,
        n_train: int = 2000,
        n_val: int = 500,
        n_test: int = 500,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        max_objects: int = 2,
        class_rule: str = "shape_colour",
        spurious_tag: float | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.image_size = _check_image_size(image_size)
        self.sizes = {
            name: _check_size(value, f"n_{name}")
            for name, value in (("train", n_train), ("val", n_val), ("test", n_test))
        }
        self.max_objects = _check_max_objects(max_objects)
        self.class_rule = _check_class_rule(class_rule)
        self.spurious_tag = _check_spurious_tag(spurious_tag)
        self.seed = seed
        self.split_seeds = dict(zip(("train", "val", "test"), derive_seeds(seed, 3)))
        self.class_names = class_names(class_rule)
        self.num_classes = len(self.class_names)
        self.concept_names = concept_names(with_tag=self.spurious_tag is not None)
        self.num_concepts = len(self.concept_names)
        self.categories = {
            cat: list(range(_OFFSETS[cat], _OFFSETS[cat] + len(v))) for cat, v in CONCEPT_CATEGORIES.items()
        }
        if self.spurious_tag is not None:
            self.categories["tag"] = [_NUM_BASE]
        self.in_channels = 3
        self.save_hyperparameters()

    def make_dataset(self, split: str) -> ConceptScenes:
        return ConceptScenes(
            size=self.sizes[split],
            image_size=self.image_size,
            max_objects=self.max_objects,
            class_rule=self.class_rule,
            spurious_tag=self.spurious_tag,
            seed=self.split_seeds[split],
        )
