"""Tests of the concept dataset: every statement about the generated scenes is checked from the pixels or from the
stored scene parameters, computed here independently of the generator's code paths."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_xai.data.concepts import (
    CLASS_RULES,
    COLOURS,
    CONCEPT_CATEGORIES,
    CONCEPT_NAMES,
    DARK_SHADE,
    OBJECT_CATEGORIES,
    SIZE_RANGES,
    TAG_CONCEPT,
    ConceptDataModule,
    ConceptScenes,
    class_from_concepts,
    tag_side,
)

SHAPES = CONCEPT_CATEGORIES["shape"]
COLOUR_NAMES = CONCEPT_CATEGORIES["colour"]
WARM, COLD = {"red", "yellow"}, {"green", "blue"}


@pytest.fixture(scope="module")
def scenes() -> ConceptScenes:
    """Default rule at 64x64, three objects, a tag in about half the images."""
    return ConceptScenes(size=160, image_size=64, max_objects=3, spurious_tag=0.5, seed=3)


@pytest.fixture(scope="module")
def shape_scenes() -> ConceptScenes:
    """The ``"shape"`` rule at the smallest image size, up to four objects, no tag."""
    return ConceptScenes(size=200, image_size=24, max_objects=4, class_rule="shape", seed=5)


@pytest.fixture(scope="module", params=["scenes", "shape_scenes"])
def any_scenes(request) -> ConceptScenes:
    return request.getfixturevalue(request.param)


def _object_pixels(ds: ConceptScenes, i: int, k: int) -> torch.Tensor:
    """``[P, 2]`` (x, y) centres of the pixels of object ``k`` of image ``i``."""
    ys, xs = torch.nonzero(ds.object_map[i] == k + 1, as_tuple=True)
    return torch.stack([xs.float() + 0.5, ys.float() + 0.5], dim=1)


# ------------------------------------------------------------------------------------------------ basic contract
def test_shapes_types_and_metadata(scenes: ConceptScenes, shape_scenes: ConceptScenes) -> None:
    n, k, s = len(scenes), len(CONCEPT_NAMES) + 1, 64
    assert scenes.images.shape == (n, 3, s, s) and scenes.images.dtype == torch.float32
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert scenes.labels.shape == (n,) and scenes.labels.dtype == torch.long
    assert scenes.concept_labels.shape == (n, k) and scenes.concept_labels.dtype == torch.float32
    assert set(scenes.concept_labels.unique().tolist()) <= {0.0, 1.0}
    assert scenes.object_map.shape == (n, s, s) and scenes.object_map.dtype == torch.int8
    assert scenes.concept_names == [*CONCEPT_NAMES, TAG_CONCEPT] and scenes.num_concepts == k
    assert len(CONCEPT_NAMES) == 18 and CONCEPT_NAMES[0] == "shape:circle" and CONCEPT_NAMES[-1] == "background:grid"
    assert (
        scenes.num_classes == 8
        and len(scenes.class_names) == 8
        and scenes.class_names[:2]
        == [
            "circle-warm",
            "circle-cold",
        ]
    )
    assert shape_scenes.num_classes == 4 and shape_scenes.class_names == SHAPES
    assert shape_scenes.concept_names == CONCEPT_NAMES  # no tag concept without a tag
    # categories partition the concept indices, in order, and match the names
    flat = [c for cat in scenes.categories.values() for c in cat]
    assert flat == list(range(k))
    for cat, indices in scenes.categories.items():
        assert all(scenes.concept_names[c].split(":")[0] == cat for c in indices)
    assert list(scenes.categories) == [*CONCEPT_CATEGORIES, "tag"]
    image, label, concepts = scenes[7]
    assert torch.equal(image, scenes.images[7]) and label == scenes.labels[7]
    assert torch.equal(concepts, scenes.concept_labels[7])
    assert len(scenes) == n and "ConceptScenes(size=160" in repr(scenes)


def test_deterministic_and_seed_dependent() -> None:
    a = ConceptScenes(size=40, image_size=32, max_objects=3, spurious_tag=0.3, seed=11)
    b = ConceptScenes(size=40, image_size=32, max_objects=3, spurious_tag=0.3, seed=11)
    c = ConceptScenes(size=40, image_size=32, max_objects=3, spurious_tag=0.3, seed=12)
    for name in ("images", "labels", "concept_labels", "object_map", "object_concepts", "object_centres", "has_tag"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.object_centres, c.object_centres)


def test_labels_are_balanced(any_scenes: ConceptScenes) -> None:
    counts = torch.bincount(any_scenes.labels, minlength=any_scenes.num_classes)
    assert counts.max() - counts.min() <= 1


# ----------------------------------------------------------------------------------------- masks versus labels
def test_concept_labels_equal_mask_any(any_scenes: ConceptScenes) -> None:
    masks = any_scenes.concept_masks_for(slice(None))
    assert masks.dtype == torch.bool and masks.shape == (
        len(any_scenes),
        any_scenes.num_concepts,
        *([any_scenes.image_size] * 2),
    )
    assert torch.equal(masks.flatten(2).any(dim=2).float(), any_scenes.concept_labels)
    # every image has at least one object and background pixels
    assert (any_scenes.num_objects >= 1).all()
    assert ((any_scenes.object_map == 0).flatten(1).any(dim=1)).all()


def test_category_masks_partition_their_pixels(any_scenes: ConceptScenes) -> None:
    ds = any_scenes
    masks = ds.concept_masks_for(torch.arange(len(ds)))
    objects, background = ds.object_map > 0, ds.object_map == 0
    for cat in OBJECT_CATEGORIES:
        count = masks[:, ds.categories[cat]].sum(dim=1)  # how many concepts of the category claim each pixel
        assert torch.equal(count, objects.long()), cat  # exactly one on object pixels, none elsewhere
    count = masks[:, ds.categories["background"]].sum(dim=1)
    assert torch.equal(count, background.long())
    if "tag" in ds.categories:
        assert torch.equal(masks[:, ds.categories["tag"][0]], ds.object_map == -1)


def test_single_masks_and_lazy_view_agree(scenes: ConceptScenes) -> None:
    all_masks = scenes.concept_masks_for([2, 5, 9])
    for j, c in enumerate(("shape:square", 4, "background:noise", TAG_CONCEPT)):
        single = scenes.concept_mask([2, 5, 9], c)
        index = scenes.concept_index(c)
        assert single.shape == (3, 1, 64, 64) and torch.equal(single[:, 0], all_masks[:, index]), j
    assert scenes.concept_mask(5, "colour:red").shape == (1, 1, 64, 64)
    assert torch.equal(scenes.concept_mask(torch.tensor([5]), 1), scenes.concept_mask(5, "shape:square"))
    assert scenes.concept_masks.shape == (len(scenes), scenes.num_concepts, 64, 64)
    assert torch.equal(scenes.concept_masks[5], all_masks[1])
    assert torch.equal(scenes.concept_masks[[2, 5, 9], 3], all_masks[:, 3])
    assert torch.equal(scenes.concept_masks[:3], scenes.concept_masks_for(torch.tensor([0, 1, 2])))


# ------------------------------------------------------------------------- the pixels show the stated concepts
def test_object_geometry_matches_shape_and_size(any_scenes: ConceptScenes) -> None:
    """Pixel area and extent of each object against the closed-form area of its shape at its radius."""
    ds = any_scenes
    size_col, shape_col = OBJECT_CATEGORIES.index("size"), OBJECT_CATEGORIES.index("shape")
    # area / r^2 and boundary length / r of circle (radius 0.85 r), square (side 1.4 r), equilateral triangle
    # (circumradius r) and cross (two 1.9 r x 0.6 r bars)
    area = {"circle": math.pi * 0.85**2, "square": 1.4**2, "triangle": 3 * math.sqrt(3) / 4, "cross": 2 * 1.14 - 0.36}
    perimeter = {"circle": 2 * math.pi * 0.85, "square": 5.6, "triangle": 3 * math.sqrt(3), "cross": 7.6}
    extent = {"circle": 0.85, "square": 0.7 * math.sqrt(2), "triangle": 1.0, "cross": math.hypot(0.95, 0.3)}
    checked = 0
    for i in range(len(ds)):
        for k in range(ds.max_objects):
            shape_index = int(ds.object_concepts[i, k, shape_col])
            if shape_index < 0:
                assert not (ds.object_map[i] == k + 1).any()
                continue
            shape, r = SHAPES[shape_index], float(ds.object_radii[i, k])
            low, high = SIZE_RANGES[CONCEPT_CATEGORIES["size"][int(ds.object_concepts[i, k, size_col])]]
            assert low * ds.image_size <= r <= high * ds.image_size
            pixels = _object_pixels(ds, i, k)
            assert abs(len(pixels) - area[shape] * r**2) <= 0.5 * perimeter[shape] * r + 2, (i, k, shape)
            dist = (pixels - ds.object_centres[i, k]).norm(dim=1)
            assert dist.max() <= extent[shape] * r + 1e-4, (i, k, shape)
            checked += 1
    assert checked == int(ds.num_objects.sum()) > len(ds)


def _reference_shape(shape: str, centre: torch.Tensor, r: float, angle: float, size: int) -> torch.Tensor:
    """The pixels (by pixel centre) inside a shape, rasterised over the whole image in a different formulation:
    vertices and edge cross products (triangle), rotated unit vectors (square, cross)."""
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    p = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1) - centre.double()  # [H, W, (x, y)]
    e1 = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    e2 = torch.tensor([-math.sin(angle), math.cos(angle)], dtype=torch.float64)
    a, b = p @ e1, p @ e2
    if shape == "circle":
        return p.norm(dim=-1) <= 0.85 * r
    if shape == "square":
        return torch.maximum(a.abs(), b.abs()) <= 0.7 * r
    if shape == "cross":
        long, short = torch.maximum(a.abs(), b.abs()), torch.minimum(a.abs(), b.abs())
        return (long <= 0.95 * r) & (short <= 0.3 * r)
    # triangle: circumradius r, a vertex along the frame's axis
    vertices = [
        r * torch.tensor([math.cos(angle + t), math.sin(angle + t)]) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)
    ]
    inside = torch.ones(size, size, dtype=torch.bool)
    for j in range(3):  # counter-clockwise vertices: the point is left of every edge
        v0, v1 = vertices[j].double(), vertices[(j + 1) % 3].double()
        edge, rel = v1 - v0, p - v0
        inside &= edge[0] * rel[..., 1] - edge[1] * rel[..., 0] >= 0
    return inside


def test_object_pixels_match_an_independent_rasterisation(any_scenes: ConceptScenes) -> None:
    ds = any_scenes
    mismatched = 0
    for i in range(0, len(ds), 2):
        for k in range(ds.max_objects):
            shape_index = int(ds.object_concepts[i, k, 0])
            if shape_index < 0:
                continue
            expected = _reference_shape(
                SHAPES[shape_index],
                ds.object_centres[i, k],
                float(ds.object_radii[i, k]),
                float(ds.object_angles[i, k]),
                ds.image_size,
            )
            diff = int((expected != (ds.object_map[i] == k + 1)).sum())
            assert diff <= 1, (i, k, SHAPES[shape_index], diff)  # a pixel centre on the boundary may round either way
            mismatched += diff
    assert mismatched <= 3


def test_objects_do_not_overlap_or_touch(any_scenes: ConceptScenes) -> None:
    ds = any_scenes
    for i in range(len(ds)):
        placed = torch.nonzero(ds.object_concepts[i, :, 0] >= 0).flatten().tolist()
        for a in placed:
            for b in placed:
                if a < b:
                    gap = (ds.object_centres[i, a] - ds.object_centres[i, b]).norm()
                    assert gap > ds.object_radii[i, a] + ds.object_radii[i, b] + 1
    # no two different objects are 4-neighbours
    m = ds.object_map
    for shifted_a, shifted_b in ((m[:, 1:], m[:, :-1]), (m[:, :, 1:], m[:, :, :-1])):
        both = (shifted_a > 0) & (shifted_b > 0)
        assert torch.equal(shifted_a[both], shifted_b[both])


def test_colours_textures_and_positions_from_pixels(any_scenes: ConceptScenes) -> None:
    ds = any_scenes
    cols = {cat: OBJECT_CATEGORIES.index(cat) for cat in OBJECT_CATEGORIES}
    stripes_seen = dots_seen = 0
    for i in range(len(ds)):
        for k in range(ds.max_objects):
            if ds.object_concepts[i, k, 0] < 0:
                continue
            where = ds.object_map[i] == k + 1
            rgb = ds.images[i][:, where].T  # [P, 3]
            colour = COLOURS[int(ds.object_concepts[i, k, cols["colour"]])]
            light = (rgb - colour).abs().amax(dim=1) < 1e-6
            dark = (rgb - DARK_SHADE * colour).abs().amax(dim=1) < 1e-6
            assert (light | dark).all(), (i, k)  # only the object's colour and its dark shade
            texture = CONCEPT_CATEGORIES["texture"][int(ds.object_concepts[i, k, cols["texture"]])]
            if texture == "plain":
                assert light.all()
            elif texture == "stripes" and len(rgb) >= 40:
                assert 0.15 < dark.float().mean() < 0.85
                stripes_seen += 1
            elif texture == "dots":
                assert dark.any()  # a dot on the centre at least
                assert len(rgb) < 40 or dark.float().mean() < 0.5
                dots_seen += 1
            centroid_x = _object_pixels(ds, i, k)[:, 0].mean()
            side = CONCEPT_CATEGORIES["position"][int(ds.object_concepts[i, k, cols["position"]])]
            if abs(centroid_x - ds.image_size / 2) > 1:
                assert side == ("left" if centroid_x < ds.image_size / 2 else "right"), (i, k)
    assert dots_seen > 0 and (stripes_seen > 0 or ds.image_size < 32)


def test_backgrounds_from_pixels(scenes: ConceptScenes) -> None:
    seen = set()
    for i in range(len(scenes)):
        pixels = scenes.images[i][:, scenes.object_map[i] == 0].T
        distinct = torch.unique(pixels, dim=0).shape[0]
        kind = CONCEPT_CATEGORIES["background"][int(scenes.background[i])]
        expected = {"plain": distinct == 1, "grid": distinct == 2, "noise": distinct > 100}
        assert expected[kind], (i, kind, distinct)
        # muted: no background pixel has an object colour's saturation
        assert (pixels.amax(dim=1) - pixels.amin(dim=1)).max() < 0.6
        seen.add(kind)
    assert seen == set(CONCEPT_CATEGORIES["background"])


def test_tag_pixels_and_reserved_corner(scenes: ConceptScenes) -> None:
    side, s = tag_side(64), 64
    assert side == 6
    box = (slice(s - 1 - side, s - 1),) * 2
    tagged = scenes.has_tag
    assert 0 < tagged.sum() < len(scenes)
    assert (scenes.object_map[tagged][:, box[0], box[1]] == -1).all()
    assert ((scenes.object_map == -1).flatten(1).sum(dim=1) == tagged.long() * side * side).all()
    tag = scenes.images[tagged][:, :, box[0], box[1]]
    assert (tag[:, :, 1:-1, 1:-1] == 1).all()
    border = tag.clone()
    border[:, :, 1:-1, 1:-1] = 0
    assert (border == 0).all()
    # no object comes within a pixel of the tag's corner, tag or not
    near = scenes.object_map[:, s - 2 - side :, s - 2 - side :]
    assert not (near > 0).any()
    assert torch.equal(scenes.concept_labels[:, -1], tagged.float())


# ----------------------------------------------------------------------------------------------- class rules
def _class_from_names(ds: ConceptScenes, i: int) -> int:
    """The class rule, recomputed from the *names* of the concepts present in image ``i``."""
    present = [name for name, on in zip(ds.concept_names, ds.concept_labels[i].tolist()) if on]
    shapes = [n.split(":")[1] for n in present if n.startswith("shape:")]
    colours = {n.split(":")[1] for n in present if n.startswith("colour:")}
    assert len(shapes) == 1, present
    if ds.class_rule == "shape":
        return SHAPES.index(shapes[0])
    assert colours <= WARM or colours <= COLD, present
    return 2 * SHAPES.index(shapes[0]) + (1 if colours <= COLD else 0)


def test_class_rule_holds_for_every_image(any_scenes: ConceptScenes) -> None:
    ds = any_scenes
    recomputed = torch.tensor([_class_from_names(ds, i) for i in range(len(ds))])
    assert torch.equal(recomputed, ds.labels)
    assert torch.equal(class_from_concepts(ds.concept_labels, ds.class_rule), ds.labels)
    # every object of an image carries the class-relevant concepts
    shape = ds.object_concepts[:, :, 0]
    placed = shape >= 0
    assert (shape[placed] == torch.gather(shape, 1, torch.zeros_like(shape[:, :1])).expand_as(shape)[placed]).all()


def test_class_rule_shape_colour_uses_both_temperatures() -> None:
    ds = ConceptScenes(size=64, image_size=24, class_rule="shape_colour", seed=1)
    for label in range(8):
        colours = ds.concept_labels[ds.labels == label][:, ds.categories["colour"]].sum(dim=0)
        names = {COLOUR_NAMES[c] for c in torch.nonzero(colours).flatten().tolist()}
        assert names and names <= (WARM if label % 2 == 0 else COLD), (label, names)


def test_class_from_concepts_validates() -> None:
    with pytest.raises(ValueError, match="valid rules"):
        class_from_concepts(torch.zeros(2, 18), "colour")
    with pytest.raises(ValueError, match=r"\[N, 18\]"):
        class_from_concepts(torch.zeros(2, 17))


# ---------------------------------------------------------------------------------------------- TCAV accessors
def test_concept_examples_show_the_concept(scenes: ConceptScenes) -> None:
    c = scenes.concept_index("texture:stripes")
    have = torch.nonzero(scenes.concept_labels[:, c]).flatten()
    idx = scenes.concept_examples("texture:stripes", 10, seed=1, return_indices=True)
    assert idx.unique().numel() == 10 and torch.isin(idx, have).all()
    images = scenes.concept_examples(c, 10, seed=1)
    assert torch.equal(images, scenes.images[idx])
    assert torch.equal(images, scenes.concept_examples("texture:stripes", 10, seed=1))
    assert not torch.equal(idx, scenes.concept_examples(c, 10, seed=2, return_indices=True))
    assert scenes.concept_examples(c, len(have)).shape == (len(have), 3, 64, 64)
    with pytest.raises(ValueError, match=f"only {len(have)} of 160"):
        scenes.concept_examples(c, len(have) + 1)


def test_random_examples_exclude(scenes: ConceptScenes) -> None:
    c = scenes.concept_index("shape:circle")
    idx = scenes.random_examples(12, seed=4, exclude="shape:circle", return_indices=True)
    assert idx.unique().numel() == 12 and (scenes.concept_labels[idx, c] == 0).all()
    assert not scenes.concept_mask(idx, c).any()
    assert scenes.random_examples(12, seed=4).shape == (12, 3, 64, 64)
    free = int((scenes.concept_labels[:, c] == 0).sum())
    with pytest.raises(ValueError, match=f"only {free} of"):
        scenes.random_examples(free + 1, exclude=c)
    with pytest.raises(ValueError, match="positive int"):
        scenes.random_examples(0)


def test_unknown_concept_is_rejected(scenes: ConceptScenes, shape_scenes: ConceptScenes) -> None:
    with pytest.raises(ValueError, match=r"did you mean \['shape:circle'"):
        scenes.concept_examples("shape:circel", 1)
    with pytest.raises(ValueError, match="out of range"):
        scenes.concept_mask(0, 19)
    with pytest.raises(ValueError, match="unknown concept 'tag:present'"):
        shape_scenes.concept_mask(0, TAG_CONCEPT)
    with pytest.raises(TypeError):
        scenes.concept_mask(0, 1.5)


# ------------------------------------------------------------------------------------------------ spurious tag
@pytest.mark.parametrize("p", [0.0, 0.7, 1.0])
def test_spurious_tag_rates(p: float) -> None:
    ds = ConceptScenes(size=3000, image_size=24, max_objects=1, class_rule="shape", spurious_tag=p, seed=2)
    c = ds.concept_index(TAG_CONCEPT)
    for group, expected in ((ds.labels == 0, p), (ds.labels != 0, (1 - p) / 4)):
        n = int(group.sum())
        rate = float(ds.concept_labels[group, c].mean())
        se = math.sqrt(expected * (1 - expected) / n)
        assert abs(rate - expected) <= 4 * se + 1e-9, (p, rate, expected)


def test_no_tag_concept_without_tag(shape_scenes: ConceptScenes) -> None:
    assert not shape_scenes.has_tag.any() and not (shape_scenes.object_map == -1).any()
    assert shape_scenes.concept_labels.shape[1] == 18


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"class_rule": "colour"}, ValueError, r"valid rules: \['shape_colour', 'shape'\]"),
        ({"max_objects": 0}, ValueError, "max_objects must be an int in"),
        ({"max_objects": 7}, ValueError, "max_objects"),
        ({"spurious_tag": -0.1}, ValueError, r"spurious_tag .* \[0, 1\], got -0.1"),
        ({"spurious_tag": 1.5}, ValueError, "got 1.5"),
        ({"spurious_tag": float("nan")}, ValueError, "got nan"),
        ({"spurious_tag": "0.5"}, TypeError, "spurious_tag"),
        ({"image_size": 16}, ValueError, "image_size must be an int >= 24"),
        ({"size": 0}, ValueError, "size"),
        ({"seed": 1.0}, TypeError, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ConceptScenes(**{"size": 4, "image_size": 24, **kwargs})
    if "size" not in kwargs and "seed" not in kwargs:
        with pytest.raises(error, match=match):
            ConceptDataModule(**{"n_train": 4, "n_val": 4, "n_test": 4, "image_size": 24, **kwargs})


def test_class_rules_constant() -> None:
    assert CLASS_RULES == ("shape_colour", "shape")


# ------------------------------------------------------------------------------------------------- DataModule
def test_datamodule_splits_and_batches() -> None:
    dm = ConceptDataModule(
        image_size=32, n_train=24, n_val=12, n_test=8, batch_size=8, seed=4, max_objects=3, spurious_tag=0.5
    )
    assert dm.num_classes == 8 and dm.num_concepts == 19 and dm.concept_names[-1] == TAG_CONCEPT
    assert dm.categories["tag"] == [18] and dm.categories["shape"] == [0, 1, 2, 3]
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"}
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 24 and len(val) == 12 and len(dm.dataset("test")) == 8
    assert not torch.equal(train.images[:12], val.images)
    images, labels, concepts = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,) and concepts.shape == (8, 19)
    assert torch.equal(images, val.images[:8]) and torch.equal(concepts, val.concept_labels[:8])
    again = ConceptDataModule(
        image_size=32, n_train=24, n_val=12, n_test=8, batch_size=8, seed=4, max_objects=3, spurious_tag=0.5
    )
    assert torch.equal(again.dataset("val").images, val.images)
    assert again.categories == val.categories
    assert dm.hparams["class_rule"] == "shape_colour" and dm.hparams["spurious_tag"] == 0.5
