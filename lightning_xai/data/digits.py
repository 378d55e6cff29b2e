"""scikit-learn's bundled handwritten digits as a small, download-free image-classification DataModule.

``sklearn.datasets.load_digits`` ships 1797 grey-level 8x8 images of the digits 0-9 (the UCI "Optical
Recognition of Handwritten Digits" test set, E. Alpaydin and C. Kaynak, 1998) inside the package. They are scaled
from 0..16 to [0, 1], bilinearly upsampled to ``image_size`` (a convex combination of pixels, so values stay in
[0, 1]), optionally repeated to 3 channels, and split train/val/test with a seeded stratified split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_xai.data.base import InMemoryDataModule

__all__ = ["DigitsDataModule", "load_digits_tensors"]


def load_digits_tensors(image_size: int = 32, channels: int = 1) -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(images float32 [N, channels, S, S] in [0, 1], labels int64 [N])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("DigitsDataModule needs scikit-learn: pip install 'lightning-xai[extras]'") from err
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8), got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (grey repeated as RGB), got {channels!r}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp_(0, 1).expand(-1, channels, -1, -1).contiguous()
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataModule(InMemoryDataModule):
    """The scikit-learn digits, upsampled to ``image_size``, in a seeded stratified train/val/test split.

    Batches are ``(images [B, channels, S, S], labels [B])`` (no masks: there is no pixel ground truth).
    ``val_fraction`` and ``test_fraction`` are fractions of all 1797 images; every split keeps the class
    proportions (scikit-learn's stratified ``train_test_split``).
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8), got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (grey repeated as RGB), got {channels!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must leave at least 10% for training, got {val_fraction + test_fraction}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32 - 1:
            raise ValueError(f"seed must be an int in [0, 2**32 - 2] (scikit-learn random_state), got {seed!r}")
        self.image_size = image_size
        self.channels = channels
        self.in_channels = channels
        self.class_names = [str(d) for d in range(10)]
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.indices: dict[str, Tensor] | None = None
        self.save_hyperparameters()

    def split_indices(self) -> dict[str, Tensor]:
        """Indices into the 1797 digits of each split, stratified by class and fixed by ``seed``."""
        if self.indices is None:
            from sklearn.model_selection import train_test_split

            labels = load_digits_tensors(8, 1)[1].numpy()
            index = torch.arange(len(labels)).numpy()
            n_test = round(self.test_fraction * len(labels))
            n_val = round(self.val_fraction * len(labels))
            rest, test = train_test_split(index, test_size=n_test, stratify=labels, random_state=self.seed)
            train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=self.seed + 1)
            self.indices = {s: torch.as_tensor(i) for s, i in (("train", train), ("val", val), ("test", test))}
        return self.indices

    def make_dataset(self, split: str) -> TensorDataset:
        images, labels = load_digits_tensors(self.image_size, self.channels)
        index = self.split_indices()[split]
        return TensorDataset(images[index], labels[index])
