"""Small transformers that train in seconds: a text classifier over token ids and a tiny vision transformer.

Both are built from ``nn.MultiheadAttention`` blocks, so the attention methods of
:mod:`lightning_xai.attribution.attention` (rollout, transformer attribution) and the token attributions of
:mod:`lightning_xai.attribution.tokens` apply to them as to any such model:

* :class:`TextTransformer` (``nn.Module``) / :class:`TextClassifier` (LightningModule): token embedding
  (``"embedding"``, the layer to name for embedding attributions) + a learned class token prepended + learned
  position embeddings, ``depth`` pre-LayerNorm blocks, the class token's final state -> linear head. Padding
  tokens are masked out of attention (``key_padding_mask``). Trained on
  :class:`~lightning_xai.data.tokens.PlantedTokens`, where the planted key tokens are the ground truth.
* :func:`vit_tiny` / :class:`ViTClassifier`: torchvision's ``VisionTransformer`` with tiny settings (the layers
  are named as in torchvision: ``conv_proj``, ``encoder.layers.encoder_layer_{i}.self_attention``, ``heads``),
  trained on the ground-truth flower images of :mod:`lightning_xai.data.groundtruth`.

The transformer architecture is that of Vaswani et al., "Attention Is All You Need", NeurIPS 2017, with the class
token and pre-norm blocks of Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_xai.batch import Key
from lightning_xai.checks import check_float, check_int
from lightning_xai.models.classifier import ImageClassifier

__all__ = ["TextClassifier", "TextTransformer", "TransformerBlock", "ViTClassifier", "vit_tiny"]


class TransformerBlock(nn.Module):
    """Pre-LayerNorm encoder block: ``x + attention(norm_1(x))``, then ``x + mlp(norm_2(x))``.

    ``attention`` is an ``nn.MultiheadAttention`` (``batch_first=True``), called with ``need_weights=False`` (the
    fast kernel): attention methods capture its probabilities through hooks, not through its return value.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        h = self.norm_1(x)
        h = self.attention(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.norm_2(x)))


class TextTransformer(nn.Module):
    """Token ids ``LongTensor[B, T]`` -> logits ``[B, num_classes]`` (see the module docstring).

    Args:
        vocab_size: number of token ids.
        num_classes: number of classes.
        max_len: longest sequence (position embeddings for ``max_len + 1`` positions, the class token included).
        dim, depth, heads, mlp_dim: width, number of blocks, attention heads (``dim % heads == 0``), MLP width.
        pad_token: id whose positions are masked out of attention (``None``: nothing is masked).
        dropout: dropout in the blocks (0 by default: the data are small and the explanations deterministic).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int = 64,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_dim: int = 64,
        pad_token: int | None = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("vocab_size", vocab_size, minimum=2, owner=owner)
        check_int("num_classes", num_classes, minimum=2, owner=owner)
        check_int("max_len", max_len, minimum=1, owner=owner)
        check_int("dim", dim, minimum=1, owner=owner)
        check_int("depth", depth, minimum=1, owner=owner)
        check_int("heads", heads, minimum=1, owner=owner)
        check_int("mlp_dim", mlp_dim, minimum=1, owner=owner)
        if dim % heads:
            raise ValueError(f"{owner}: dim must be divisible by heads, got dim={dim}, heads={heads}")
        if pad_token is not None:
            check_int("pad_token", pad_token, minimum=0, maximum=vocab_size - 1, owner=owner)
        check_float("dropout", dropout, minimum=0.0, maximum=1.0, owner=owner)
        self.vocab_size, self.max_len, self.pad_token = vocab_size, max_len, pad_token
        self.embedding = nn.Embedding(vocab_size, dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, max_len + 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects token ids LongTensor[B, T], got {tokens.dtype} {list(tokens.shape)}"
            )
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{type(self).__name__}: sequence length {tokens.shape[1]} > max_len = {self.max_len}")
        x = self.embedding(tokens)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embedding[:, : x.shape[1] + 1]
        mask = None
        if self.pad_token is not None:
            pad = tokens == self.pad_token
            mask = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x[:, 0]))


def vit_tiny(
    image_size: int = 64,
    patch_size: int = 8,
    num_classes: int = 6,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    mlp_dim: int = 64,
) -> nn.Module:
    """torchvision's ``VisionTransformer`` with tiny settings (random weights, nothing downloaded).

    Default: 64x64 images in 8x8 patches (an 8x8 grid + a class token = 65 tokens), 2 blocks of width 32.
    """
    from torchvision.models.vision_transformer import VisionTransformer

    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("dim", dim), ("depth", depth)):
        check_int(name, value, minimum=1, owner="vit_tiny")
    if image_size % patch_size:
        raise ValueError(f"vit_tiny: image_size {image_size} is not divisible by patch_size {patch_size}")
    if dim % heads:
        raise ValueError(f"vit_tiny: dim must be divisible by heads, got dim={dim}, heads={heads}")
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=depth,
        num_heads=heads,
        hidden_dim=dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
    )


class ViTClassifier(ImageClassifier):
    """:class:`~lightning_xai.models.classifier.ImageClassifier` around :func:`vit_tiny` (same steps and logs).

    The training arguments (``optimizer`` ... ``label_key``) are those of
    :class:`~lightning_xai.models.base.XAIModule`. Layer names for attribution are prefixed with ``"backbone."``
    (e.g. the CAM layer ``"backbone.encoder.layers.encoder_layer_1.ln_1"``), or explain ``module.backbone``
    directly.
    """

    def __init__(
        self,
        num_classes: int = 6,
        image_size: int = 64,
        patch_size: int = 8,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_dim: int = 64,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
    ) -> None:
        backbone = vit_tiny(image_size, patch_size, num_classes, dim, depth, heads, mlp_dim)
        super().__init__(
            backbone=backbone,
            num_classes=num_classes,
            in_channels=3,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            momentum=momentum,
            on_nonfinite_loss=on_nonfinite_loss,
            input_key=input_key,
            label_key=label_key,
        )
        self.patch_size = patch_size


class TextClassifier(ImageClassifier):
    """Cross-entropy classifier of token sequences: the steps, metrics and logs of
    :class:`~lightning_xai.models.classifier.ImageClassifier` around a :class:`TextTransformer` (or any token model).

    Args:
        vocab_size, num_classes, max_len, dim, depth, heads, mlp_dim, pad_token, dropout: see
            :class:`TextTransformer` (all but ``num_classes`` ignored when ``backbone`` is given).
        backbone: ``None`` (build a :class:`TextTransformer`) or any ``nn.Module`` mapping token ids ``[B, T]`` to
            logits ``[B, num_classes]``.
        optimizer, lr, weight_decay, scheduler, momentum, on_nonfinite_loss, input_key, label_key: see
            :class:`~lightning_xai.models.base.XAIModule` (dict batches such as ``{"input_ids", "labels"}`` are read
            by the default keys).

    Batches are ``(tokens, labels, ...)`` (:class:`~lightning_xai.data.tokens.PlantedTokensDataModule`). For
    embedding attributions name ``"backbone.embedding"`` (or explain ``module.backbone`` with ``"embedding"``).
    """

    def __init__(
        self,
        vocab_size: int = 32,
        num_classes: int = 4,
        max_len: int = 64,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_dim: int = 64,
        pad_token: int | None = 0,
        dropout: float = 0.0,
        backbone: nn.Module | None = None,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
    ) -> None:
        if backbone is None:
            backbone = TextTransformer(vocab_size, num_classes, max_len, dim, depth, heads, mlp_dim, pad_token, dropout)
        elif not isinstance(backbone, nn.Module):
            raise TypeError(
                f"{type(self).__name__}: backbone must be None or an nn.Module, got {type(backbone).__name__}"
            )
        super().__init__(
            backbone=backbone,
            num_classes=num_classes,
            in_channels=1,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            momentum=momentum,
            on_nonfinite_loss=on_nonfinite_loss,
            input_key=input_key,
            label_key=label_key,
        )
