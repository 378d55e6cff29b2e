"""Ground-truth flowers and the digits DataModule: determinism, layout, exact masks, class independence, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_xai.data import DigitsDataModule, GroundTruthDataModule, GroundTruthShapes, derive_seeds
from lightning_xai.data import groundtruth as gt

sklearn = pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def flowers6() -> GroundTruthShapes:
    return GroundTruthShapes(num_classes=6, size=1200, image_size=32, seed=0)


@pytest.fixture(scope="module")
def flowers12() -> GroundTruthShapes:
    return GroundTruthShapes(num_classes=12, size=1200, image_size=32, seed=0)


# --------------------------------------------------------------------------------------------------------------
# GroundTruthShapes


@pytest.mark.parametrize("num_classes", [6, 12])
def test_same_seed_same_tensors_other_seed_other_tensors(num_classes: int) -> None:
    a = GroundTruthShapes(num_classes, size=300, image_size=32, seed=7)
    b = GroundTruthShapes(num_classes, size=300, image_size=32, seed=7)
    c = GroundTruthShapes(num_classes, size=300, image_size=32, seed=8)
    for name in ("images", "labels", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.labels, c.labels)
    # every image differs, not just some
    assert ((a.images - c.images).abs().flatten(1).amax(1) > 0).all()
    assert not torch.equal(a.masks, c.masks)


@pytest.mark.parametrize("num_classes", [6, 12])
@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_layout_dtypes_and_ranges(num_classes: int, image_size: int) -> None:
    n = 50
    ds = GroundTruthShapes(num_classes, size=n, image_size=image_size, seed=1)
    assert len(ds) == n
    assert ds.images.shape == (n, 3, image_size, image_size) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.masks.shape == (n, 1, image_size, image_size) and ds.masks.dtype == torch.float32
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert ds.labels.min() >= 0 and ds.labels.max() < num_classes
    assert set(ds.masks.unique().tolist()) <= {0.0, 1.0}
    assert len(ds.class_names) == num_classes == len(set(ds.class_names))
    image, label, mask = ds[3]
    assert torch.equal(image, ds.images[3]) and torch.equal(mask, ds.masks[3]) and label.ndim == 0
    assert int(label) == int(ds.labels[3])


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_masks_are_never_empty_and_never_the_whole_image(image_size: int) -> None:
    for num_classes in (6, 12):
        ds = GroundTruthShapes(num_classes, size=400, image_size=image_size, seed=2)
        area = ds.masks.sum(dim=(1, 2, 3))
        assert (area > 0).all()
        assert (area < 0.25 * image_size**2).all()


def test_mask_pixels_have_the_class_colour_6(flowers6: GroundTruthShapes) -> None:
    colour = gt.PALETTE[flowers6.labels].view(-1, 3, 1, 1)
    inside = flowers6.masks.bool().expand(-1, 3, -1, -1)
    assert torch.equal(flowers6.images[inside], colour.expand_as(flowers6.images)[inside])


def test_mask_pixels_have_the_class_colours_12(flowers12: GroundTruthShapes) -> None:
    # class k: disc colour DISC_COLORS_12[k // 3], stem colour STEM_COLORS_12[k % 3]; both parts are visible
    disc = gt.PALETTE[torch.tensor(gt.DISC_COLORS_12)[flowers12.labels // 3]]
    stem = gt.PALETTE[torch.tensor(gt.STEM_COLORS_12)[flowers12.labels % 3]]
    pixels = flowers12.images.permute(0, 2, 3, 1)  # [N, H, W, 3]
    is_disc = (pixels == disc[:, None, None]).all(-1)
    is_stem = (pixels == stem[:, None, None]).all(-1)
    mask = flowers12.masks[:, 0].bool()
    assert not (mask & ~(is_disc | is_stem)).any(), "a mask pixel has neither class colour"
    assert ((mask & is_disc).flatten(1).any(1) & (mask & is_stem).flatten(1).any(1)).all()


def test_disc_mask_is_the_disc_computed_independently(flowers6: GroundTruthShapes) -> None:
    """The 6-class mask is the disc of radius DISC_RADIUS * scale around the centre, pixel centres at +0.5."""
    scenes = flowers6.scenes
    size = flowers6.image_size
    ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    cx = scenes.centers[:, 0].double().numpy()[:, None, None]
    cy = scenes.centers[:, 1].double().numpy()[:, None, None]
    radius = gt.DISC_RADIUS * scenes.scales.double().numpy()[:, None, None]
    expected = np.hypot(xs - cx, ys - cy) <= radius
    got = flowers6.masks[:, 0].bool().numpy()
    # identical up to float32-vs-float64 ties on the boundary
    assert (expected != got).sum() <= 1e-4 * got.size
    assert (expected == got).reshape(len(got), -1).mean(1).min() > 0.995


def test_mask_is_exactly_where_the_discriminative_part_is_visible() -> None:
    """Repaint the same scenes with one unique colour per part on a blank background: the pixels of the
    discriminative parts' colours are exactly the mask, occlusion by other parts included."""
    for num_classes in (6, 12):
        ds = GroundTruthShapes(num_classes, size=200, image_size=32, seed=3)
        n_parts = gt.NUM_PETALS + 2
        unique = torch.stack(
            [torch.linspace(0.05, 0.95, n_parts), torch.full((n_parts,), 0.5), torch.zeros(n_parts)], 1
        )
        scenes = gt.FlowerScenes(
            ds.scenes.centers, ds.scenes.scales, ds.scenes.angles, torch.arange(n_parts).expand(len(ds), -1)
        )
        images, _ = gt.render_flowers(scenes, torch.ones(len(ds), 3, 32, 32), palette=unique)
        pixels = images.permute(0, 2, 3, 1)
        disc = (pixels == unique[gt.DISC_ID - 1]).all(-1)
        stem = (pixels == unique[gt.STEM_ID - 1]).all(-1)
        expected = disc | stem if num_classes == 12 else disc
        assert torch.equal(ds.masks[:, 0].bool(), expected)
        if num_classes == 12:
            assert stem.flatten(1).any(1).all(), "the stem must stay visible"


@pytest.mark.parametrize("image_size", [16, 32])
def test_the_flower_lies_inside_the_image(image_size: int) -> None:
    ds = GroundTruthShapes(12, size=300, image_size=image_size, seed=4)
    scenes = ds.scenes
    reach = np.hypot(gt.STEM_LENGTH, gt.STEM_HALF_WIDTH) * scenes.scales[:, None]
    assert (scenes.centers - reach > 0.5).all() and (scenes.centers + reach < image_size - 0.5).all()
    border = torch.cat([ds.part_map[:, 0], ds.part_map[:, -1], ds.part_map[:, :, 0], ds.part_map[:, :, -1]], 1)
    assert (border == 0).all()


@pytest.mark.parametrize(("num_classes", "size"), [(6, 100), (12, 100), (6, 6)])
def test_classes_are_balanced(num_classes: int, size: int) -> None:
    counts = torch.bincount(
        GroundTruthShapes(num_classes, size=size, image_size=16, seed=5).labels, minlength=num_classes
    )
    assert counts.max() - counts.min() <= 1 and counts.sum() == size


def _colour_features(images: torch.Tensor, keep: torch.Tensor, bins: int = 4) -> np.ndarray:
    """Colour composition of the pixels where ``keep`` is true: the fraction of pixels of each exact ``PALETTE``
    colour, and a joint RGB histogram (``bins**3``) of all other colours."""
    is_palette = (images.permute(0, 2, 3, 1)[:, :, :, None, :] == gt.PALETTE).all(-1) & keep[..., None]
    counts = is_palette.flatten(1, 2).sum(1).float()  # [N, len(PALETTE)]
    other = keep & ~is_palette.any(-1)
    q = (images.clamp(0, 1 - 1e-6) * bins).long()
    code = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]  # [N, H, W]
    hist = torch.zeros(len(images), bins**3).scatter_add_(1, code.flatten(1), other.flatten(1).float())
    return (torch.cat([counts, hist], 1) / keep.flatten(1).sum(1, keepdim=True)).numpy()


def _cv_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import cross_val_score

    probe = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    return float(cross_val_score(probe, features, labels, cv=4).mean())


@pytest.mark.parametrize("variant", ["flowers6", "flowers12"])
def test_the_class_is_not_decodable_outside_the_mask(variant: str, request: pytest.FixtureRequest) -> None:
    """A linear probe on the colour composition reads the class from the whole image, not from the rest of it."""
    ds: GroundTruthShapes = request.getfixturevalue(variant)
    labels = ds.labels.numpy()
    chance = 1 / ds.num_classes
    outside = _cv_accuracy(_colour_features(ds.images, ~ds.masks[:, 0].bool()), labels)
    everywhere = _cv_accuracy(_colour_features(ds.images, torch.ones_like(ds.masks[:, 0]).bool()), labels)
    # positive control: the probe is strong enough to find the class colour when the mask is included
    assert everywhere > chance + 0.3
    # chance without it (1200 samples: the standard deviation of the accuracy is about 0.011)
    assert outside < chance + 0.05


def test_part_colours_are_independent_of_the_class(flowers6: GroundTruthShapes, flowers12) -> None:
    from scipy.stats import chi2_contingency

    for ds, free_parts in ((flowers6, range(gt.DISC_ID - 1)), (flowers12, range(gt.STEM_ID, gt.DISC_ID - 1))):
        colours = ds.scenes.part_colors[:, list(free_parts)]  # every non-discriminative part
        labels = ds.labels[:, None].expand_as(colours)
        table = np.zeros((ds.num_classes, len(gt.PALETTE)))
        np.add.at(table, (labels.flatten().numpy(), colours.flatten().numpy()), 1)
        assert (table > 0).all(), "every class must show every palette colour on its free parts"
        assert chi2_contingency(table).pvalue > 1e-3


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"num_classes must be 6 .* or 12"):
        GroundTruthShapes(num_classes=7)
    with pytest.raises(ValueError, match="image_size must be an int >= 16"):
        GroundTruthShapes(image_size=8)
    with pytest.raises(ValueError, match="size"):
        GroundTruthShapes(size=0)
    with pytest.raises(TypeError, match="seed"):
        GroundTruthShapes(seed=1.5)


# --------------------------------------------------------------------------------------------------------------
# GroundTruthDataModule


def test_datamodule_splits_batches_and_determinism() -> None:
    dm = GroundTruthDataModule(num_classes=12, image_size=16, n_train=40, n_val=20, n_test=10, batch_size=8, seed=3)
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"}
    dm.setup("test")
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (40, 20, 10)
    assert len({train.seed, val.seed, test.seed}) == 3
    assert not torch.equal(train.images[:10], test.images)
    x, y, m = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,) and m.shape == (8, 1, 16, 16)
    assert torch.equal(x, val.images[:8]) and torch.equal(y, val.labels[:8])
    again = GroundTruthDataModule(num_classes=12, image_size=16, n_train=40, n_val=20, n_test=10, batch_size=8, seed=3)
    assert torch.equal(again.dataset("train").images, train.images)
    other = GroundTruthDataModule(num_classes=12, image_size=16, n_train=40, n_val=20, n_test=10, batch_size=8, seed=4)
    assert not torch.equal(other.dataset("train").images, train.images)
    assert dm.hparams["num_classes"] == 12 and dm.class_names == train.class_names


def test_derived_seeds_do_not_overlap_between_seeds() -> None:
    a, b = derive_seeds(0, 3), derive_seeds(1, 3)
    assert len(set(a) | set(b)) == 6
    assert derive_seeds(0, 3) == a
    assert all(0 <= s < 2**63 for s in a + b)


def test_datamodule_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="n_train"):
        GroundTruthDataModule(n_train=0)
    with pytest.raises(ValueError, match="batch_size"):
        GroundTruthDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        GroundTruthDataModule(num_workers=-1)
    with pytest.raises(ValueError, match="num_classes"):
        GroundTruthDataModule(num_classes=10)
    dm = GroundTruthDataModule(n_train=4, n_val=4, n_test=4, image_size=16)
    with pytest.raises(ValueError, match="valid splits"):
        dm.dataset("training")
    with pytest.raises(ValueError, match="valid stages"):
        dm.setup("train")


# --------------------------------------------------------------------------------------------------------------
# DigitsDataModule


def _bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resampling with edge clamping, written with ``np.interp``, rows then columns."""
    n = image.shape[0]
    src = (np.arange(size) + 0.5) * n / size - 0.5
    rows = np.stack([np.interp(src, np.arange(n), row) for row in image])  # [n, size]
    return np.stack([np.interp(src, np.arange(n), col) for col in rows.T]).T  # [size, size]


def test_digits_pixels_and_upsampling() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for channels in (1, 3):
        dm = DigitsDataModule(image_size=32, channels=channels, seed=0)
        images, labels = (torch.cat(t) for t in zip(*(dm.dataset(s).tensors for s in ("train", "val", "test"))))
        assert images.shape == (1797, channels, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and images.min() >= 0 and images.max() <= 1
        index = torch.cat([dm.split_indices()[s] for s in ("train", "val", "test")])
        assert torch.equal(labels, torch.as_tensor(digits.target)[index])
        for k in (0, 100, 1000):
            reference = _bilinear_reference(digits.images[int(index[k])] / 16.0, 32)
            for c in range(channels):
                np.testing.assert_allclose(images[k, c].numpy(), reference, atol=1e-5)
    native = DigitsDataModule(image_size=8).dataset("test")
    idx = DigitsDataModule(image_size=8).split_indices()["test"]
    np.testing.assert_allclose(native.tensors[0][:, 0].numpy(), digits.images[idx.numpy()] / 16.0, atol=1e-7)


def test_digits_split_is_stratified_disjoint_and_seeded() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(val_fraction=0.15, test_fraction=0.2, seed=1)
    split = dm.split_indices()
    sizes = {s: len(i) for s, i in split.items()}
    assert sizes == {"train": 1797 - 270 - 359, "val": 270, "test": 359}
    assert len(torch.cat(list(split.values())).unique()) == 1797
    overall = torch.bincount(torch.as_tensor(load_digits().target), minlength=10).double()
    for s in ("train", "val", "test"):
        counts = torch.bincount(dm.dataset(s).tensors[1], minlength=10)
        expected = overall * sizes[s] / 1797
        # stratified: each class within rounding of its share (the val split is drawn from the rest: +0.2)
        assert ((counts - expected).abs() <= 1.2).all(), (s, counts, expected)
    same = DigitsDataModule(val_fraction=0.15, test_fraction=0.2, seed=1).split_indices()
    other = DigitsDataModule(val_fraction=0.15, test_fraction=0.2, seed=2).split_indices()
    assert all(torch.equal(split[s], same[s]) for s in split)
    assert not torch.equal(split["test"], other["test"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,)


def test_digits_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="channels must be 1"):
        DigitsDataModule(channels=2)
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataModule(image_size=4)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.0)
    with pytest.raises(ValueError, match="at least 10%"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.45)
