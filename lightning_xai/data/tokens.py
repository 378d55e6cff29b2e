"""Generated token-classification data whose evidence is known token by token, and patch masks for ViTs.

:class:`PlantedTokens` draws sequences of *filler* tokens and plants the **key tokens** of the sequence's class at
random positions. The label is decided by the key tokens alone: every class ``c`` owns ``keys_per_class`` token
ids, a sequence of class ``c`` contains ``num_planted`` of them (drawn with replacement from class ``c``'s keys) and
no key of any other class; everything else (filler tokens, their order, the sequence length, the key positions) is
drawn independently of the label. So the class is decodable from the key tokens and from nothing else, and the
positions of the planted keys are the ground truth a token attribution should point at - the text counterpart of
the flower images of :mod:`lightning_xai.data.groundtruth` (and of the "planted signal" synthetic benchmarks used
to validate attribution methods, e.g. Arras, Osman and Samek, "CLEVR-XAI", Information Fusion 2022, for images).

Vocabulary layout (``vocab_size`` ids)::

    0 = PAD_TOKEN   1 = MASK_TOKEN   2 .. 2 + C*K - 1 = key tokens (class c: 2 + c*K .. 2 + c*K + K - 1)
    2 + C*K .. vocab_size - 1 = filler tokens

Variable-length sequences (``min_length < seq_len``) are right-padded with ``PAD_TOKEN``; the mask is 0 there.

For vision transformers the image data is the ground-truth flower set itself (:class:`GroundTruthDataModule`);
:func:`patch_masks` turns its pixel masks into the per-patch ground truth of a patch grid.

Everything is seeded (:class:`torch.Generator`), deterministic and generated in memory: nothing is downloaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.checks import check_int
from lightning_xai.data.base import (
    GeneratedDataset,
    InMemoryDataModule,
    balanced_labels,
    check_generator_seed,
)

__all__ = [
    "MASK_TOKEN",
    "PAD_TOKEN",
    "PlantedTokens",
    "PlantedTokensDataModule",
    "key_token_ids",
    "patch_masks",
    "token_names",
]

PAD_TOKEN = 0
MASK_TOKEN = 1
_FIRST_KEY = 2
#: Fewest filler tokens the vocabulary must leave after the special and key tokens.
MIN_FILLERS = 4


def _check_layout(num_classes: int, keys_per_class: int, vocab_size: int, owner: str) -> None:
    check_int("num_classes", num_classes, minimum=2, owner=owner)
    check_int("keys_per_class", keys_per_class, minimum=1, owner=owner)
    needed = _FIRST_KEY + num_classes * keys_per_class + MIN_FILLERS
    check_int("vocab_size", vocab_size, minimum=needed, owner=owner)


def key_token_ids(num_classes: int, keys_per_class: int) -> Tensor:
    """``LongTensor[num_classes, keys_per_class]``: the key token ids of each class (row ``c`` = class ``c``)."""
    return _FIRST_KEY + torch.arange(num_classes * keys_per_class).view(num_classes, keys_per_class)


def token_names(num_classes: int, keys_per_class: int, vocab_size: int) -> list[str]:
    """Readable names of every token id: ``"[PAD]"``, ``"[MASK]"``, ``"key3_1"`` (class 3, key 1), ``"w17"``."""
    _check_layout(num_classes, keys_per_class, vocab_size, "token_names")
    names = ["[PAD]", "[MASK]"]
    names += [f"key{c}_{k}" for c in range(num_classes) for k in range(keys_per_class)]
    names += [f"w{i}" for i in range(len(names), vocab_size)]
    return names


class PlantedTokens(GeneratedDataset):
    """``size`` token sequences whose class is decided by planted key tokens (see the module docstring).

    Args:
        num_classes: number of classes ``C`` (>= 2).
        size: number of sequences.
        seq_len: length ``T`` of every (padded) sequence.
        vocab_size: number of token ids (at least ``2 + C * keys_per_class + 4``).
        keys_per_class: key token ids owned by each class.
        num_planted: key tokens planted per sequence (distinct positions, ``<= min_length``).
        min_length: shortest unpadded length; ``None`` = ``seq_len`` (no padding).
        seed: generator seed; same arguments give identical tensors.

    Items are ``(tokens, label, mask)``: ``tokens`` ``LongTensor[T]``, ``label`` a scalar ``LongTensor``, ``mask``
    float32 ``[T]`` with 1 at the planted key positions. Whole-dataset tensors: ``.tokens [N, T]``, ``.labels [N]``,
    ``.masks [N, T]``, ``.lengths [N]``; ``.key_tokens [C, K]``; ``.token_names`` for rendering. Labels are exactly
    balanced in a random order.
    """

    item_fields = ("tokens", "labels", "masks")
    repr_fields = (
        "num_classes", "size", "seq_len", "vocab_size", "keys_per_class", "num_planted", "min_length", "seed"
    )

    def __init__(
        self,
        num_classes: int = 4,
        size: int = 2000,
        seq_len: int = 16,
        vocab_size: int = 32,
        keys_per_class: int = 2,
        num_planted: int = 2,
        min_length: int | None = None,
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        _check_layout(num_classes, keys_per_class, vocab_size, owner)
        check_int("size", size, minimum=1, owner=owner)
        check_int("seq_len", seq_len, minimum=2, owner=owner)
        min_length = seq_len if min_length is None else check_int("min_length", min_length, minimum=1, owner=owner)
        if min_length > seq_len:
            raise ValueError(f"{owner}: min_length must be <= seq_len = {seq_len}, got {min_length}")
        check_int("num_planted", num_planted, minimum=1, maximum=min_length, owner=owner)
        check_generator_seed(seed, type(self).__name__)
        self.num_classes, self.seq_len, self.vocab_size = num_classes, seq_len, vocab_size
        self.keys_per_class, self.num_planted = keys_per_class, num_planted
        self.min_length, self.seed = min_length, seed
        self.key_tokens = key_token_ids(num_classes, keys_per_class)
        self.token_names = token_names(num_classes, keys_per_class, vocab_size)
        self.class_names = [f"class{c}" for c in range(num_classes)]

        g = torch.Generator().manual_seed(seed)
        labels = balanced_labels(size, num_classes, g)
        first_filler = _FIRST_KEY + num_classes * keys_per_class
        tokens = torch.randint(first_filler, vocab_size, (size, seq_len), generator=g)
        lengths = torch.randint(min_length, seq_len + 1, (size,), generator=g)
        positions = torch.arange(seq_len).expand(size, -1)
        # key positions: the num_planted smallest of random keys among the valid (unpadded) positions
        order = torch.rand(size, seq_len, generator=g).masked_fill(positions >= lengths[:, None], 2.0)
        planted = order.argsort(dim=1)[:, :num_planted]  # [N, P], distinct valid positions
        which = torch.randint(0, keys_per_class, (size, num_planted), generator=g)
        tokens.scatter_(1, planted, self.key_tokens[labels[:, None], which])
        tokens[positions >= lengths[:, None]] = PAD_TOKEN
        masks = torch.zeros(size, seq_len).scatter_(1, planted, 1.0)
        self.tokens, self.labels, self.masks, self.lengths = tokens, labels, masks, lengths

    def decode(self, tokens: Tensor) -> list[str]:
        """The names of a ``[T]`` sequence's tokens (padding included)."""
        return [self.token_names[int(t)] for t in tokens]



class PlantedTokensDataModule(InMemoryDataModule):
    """Train/val/test splits of :class:`PlantedTokens`, each from its own seed derived from ``seed``.

    Batches are ``(tokens [B, T], labels [B], masks [B, T])``. Every rank generates the same data from the seed.
    """

    def __init__(
        self,
        num_classes: int = 4,
        seq_len: int = 16,
        vocab_size: int = 32,
        keys_per_class: int = 2,
        num_planted: int = 2,
        min_length: int | None = None,
        n_train: int = 2000,
        n_val: int = 500,
        n_test: int = 500,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.seeded_splits(n_train, n_val, n_test, seed)
        self.options = dict(
            num_classes=num_classes,
            seq_len=seq_len,
            vocab_size=vocab_size,
            keys_per_class=keys_per_class,
            num_planted=num_planted,
            min_length=min_length,
        )
        PlantedTokens(size=1, **self.options)  # validates the layout now, not at setup
        self.num_classes, self.seq_len, self.vocab_size = num_classes, seq_len, vocab_size
        self.token_names = token_names(num_classes, keys_per_class, vocab_size)
        self.save_hyperparameters()

    def make_dataset(self, split: str) -> PlantedTokens:
        return PlantedTokens(size=self.sizes[split], seed=self.split_seeds[split], **self.options)


def patch_masks(masks: Tensor, patch_size: int | tuple[int, int]) -> Tensor:
    """Per-patch ground truth of a ViT's patch grid: the fraction of each patch covered by a pixel mask.

    ``masks`` is ``[N, 1, H, W]`` (e.g. :class:`~lightning_xai.data.groundtruth.GroundTruthShapes`'s ``.masks``);
    the result is float ``[N, H // p, W // p]`` in ``[0, 1]`` (average pooling with stride ``p``), the ground truth
    at the resolution a patch-token attribution (attention rollout, transformer attribution) really has.
    """
    if not isinstance(masks, Tensor) or masks.ndim != 4 or masks.shape[1] != 1:
        shape = list(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"patch_masks: masks must be a tensor [N, 1, H, W], got {shape}")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    check_int("patch_size", ph, minimum=1, owner="patch_masks")
    check_int("patch_size", pw, minimum=1, owner="patch_masks")
    if masks.shape[2] % ph or masks.shape[3] % pw:
        raise ValueError(
            f"patch_masks: the mask size {tuple(masks.shape[2:])} is not divisible by the patch size {(ph, pw)}"
        )
    return F.avg_pool2d(masks.float(), (ph, pw)).squeeze(1)
