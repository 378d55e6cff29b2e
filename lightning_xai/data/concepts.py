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

from lightning_xai.checks import check_int
from lightning_xai.data.base import (
    GeneratedDataset,
    InMemoryDataModule,
    balanced_labels,
    check_generator_seed,
    check_image_size,
)
from lightning_xai.data.concept_rendering import (  # noqa: F401 - the public names are re-exported
    _NUM_BASE,
    _OFFSETS,
    CHUNK_PIXELS,
    CLASS_RULES,
    COLOURS,
    CONCEPT_CATEGORIES,
    CONCEPT_NAMES,
    DARK_SHADE,
    MAX_OBJECTS,
    MIN_IMAGE_SIZE,
    OBJECT_CATEGORIES,
    PLACEMENT_TRIES,
    SIZE_RANGES,
    TAG_CONCEPT,
    TAG_ID,
    TEMPERATURE_NAMES,
    TEMPERATURES,
    _check_class_rule,
    _check_max_objects,
    _check_spurious_tag,
    _LazyConceptMasks,
    _pixel_grid,
    _place_objects,
    _render_backgrounds,
    _render_objects,
    _sample_attributes,
    _shape_masks,
    _tag_box,
    chunk_size,
    class_from_concepts,
    class_names,
    concept_names,
    tag_side,
)

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
#: ``"category:value"`` for every concept, in concept-index order (without the optional tag concept).
#: The concept appended (last) when the dataset prints a spurious tag.
#: Categories whose value belongs to an object (in the column order of ``ConceptScenes.object_concepts``).
#: Object colours, RGB in [0, 1], in the order of ``CONCEPT_CATEGORIES["colour"]``.
#: Colour indices of the two temperatures of the ``"shape_colour"`` rule: 0 = warm, 1 = cold.
#: Texture pixels ("stripes", "dots") are the object's colour times this factor.
#: Object radius ``r`` (the radius of the circle every shape is inscribed in) as a fraction of the image size.
#: Pixels (images x H x W) rendered per vectorised step: bounds the memory of generation (~50 MB per float32 RGB
#: chunk) while keeping the number of tensor operations low. Part of the seed -> data mapping.
#: Candidate positions tried per object; an object (other than the first) that finds no free spot is dropped.
#: ``object_map`` value of the tag's pixels (0 = background, ``k + 1`` = object ``k``).

#: Index of the first concept of each category.


class ConceptScenes(GeneratedDataset):
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

    item_fields = ("images", "labels", "concept_labels")
    repr_fields = ("size", "image_size", "max_objects", "class_rule", "spurious_tag", "seed")

    def __init__(
        self,
        size: int = 1000,
        image_size: int = 64,
        max_objects: int = 2,
        class_rule: str = "shape_colour",
        spurious_tag: float | None = None,
        seed: int = 0,
    ) -> None:
        size = check_int("size", size, minimum=1, owner=type(self).__name__)
        self.image_size = check_image_size(image_size, MIN_IMAGE_SIZE)
        self.max_objects = _check_max_objects(max_objects)
        self.class_rule = _check_class_rule(class_rule)
        self.spurious_tag = _check_spurious_tag(spurious_tag)
        check_generator_seed(seed, type(self).__name__)
        self.seed = seed
        self.class_names = class_names(class_rule)
        self.num_classes = len(self.class_names)
        self.concept_names = concept_names(with_tag=self.spurious_tag is not None)
        self.num_concepts = len(self.concept_names)
        self.categories: dict[str, list[int]] = {}
        for index, name in enumerate(self.concept_names):
            self.categories.setdefault(name.split(":")[0], []).append(index)

        generator = torch.Generator().manual_seed(seed)
        labels = balanced_labels(size, self.num_classes, generator)
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
        self.image_size = check_image_size(image_size, MIN_IMAGE_SIZE)
        self.seeded_splits(n_train, n_val, n_test, seed)
        self.max_objects = _check_max_objects(max_objects)
        self.class_rule = _check_class_rule(class_rule)
        self.spurious_tag = _check_spurious_tag(spurious_tag)
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
