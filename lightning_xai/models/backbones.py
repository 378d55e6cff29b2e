"""Image-classification backbones, built by name so that a YAML config can pick one.

* ``"small_cnn"`` - :class:`SmallCNN`: conv/BN/ReLU blocks, a last conv block ``features``, global average
  pooling and a linear ``head``: the CAM architecture (B. Zhou et al., "Learning Deep Features for
  Discriminative Localization", CVPR 2016), so CAM applies and Grad-CAM's layer is ``"features"``.
* ``"resnet18"`` - torchvision's ResNet-18 (K. He et al., "Deep Residual Learning for Image Recognition", CVPR
  2016), randomly initialised (``weights=None``, nothing is downloaded).
* ``"vgg_small"`` - :class:`VGGSmall`: a VGG-style stack of 3x3 convolutions and ReLUs without BatchNorm
  (K. Simonyan and A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR
  2015), the plain conv/ReLU/pool/linear network LRP rules were designed for.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_xai.checks import check_int

__all__ = ["BACKBONES", "SmallCNN", "VGGSmall", "build_backbone", "resolve_backbone"]

BACKBONES = ("small_cnn", "resnet18", "vgg_small")


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """A small, fast CNN for 32x32..64x64 inputs, with the CAM layout.

    ``blocks`` (two conv/BN/ReLU/max-pool blocks of ``width`` and ``2 * width`` channels, each halving the
    resolution) -> ``features`` (conv/BN/ReLU with ``2 * width`` channels, at 1/4 of the input resolution) ->
    ``pool`` (global average) -> ``head`` (linear). The ReLUs are in place. Returns logits ``[B, num_classes]``.

    Tuned for speed: ``SmallCNN(width=16)`` with ``lr=1e-2`` (Adam), ``scheduler="cosine"``, batch 32 and 20
    epochs learns the 6-class ground-truth flowers at 32x32 from 1200 images to about 94% validation accuracy
    in under 20 s of CPU time (``tests/test_models.py``); ``width=32`` costs about 2.5x more per epoch and
    learns no faster per epoch.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 6, width: int = 32) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            check_int(name, value, minimum=1, owner="SmallCNN")
        self.blocks = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(*_conv_bn_relu(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(self.blocks(x))).flatten(1))


class VGGSmall(nn.Module):
    """A VGG-style network without BatchNorm, laid out like torchvision's VGG.

    ``features``: two stages of two 3x3 conv + ReLU (``width`` then ``2 * width`` channels) each followed by
    2x2 max-pooling; ``pool``: adaptive average pooling to 2x2 (any input size >= 4); ``classifier``: linear ->
    ReLU -> linear. The ReLUs are in place. Returns logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 6, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width),
                            ("hidden", hidden)):
            check_int(name, value, minimum=1, owner="VGGSmall")
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w1, w1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w2, w2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(4 * w2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _resnet18(num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if small_input or in_channels != 3:
        if small_input:
            # CIFAR-style stem: a 3x3 stride-1 first conv and no max-pool, so 32x32 inputs keep a 4x4 `layer4` map.
            conv = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        else:
            conv = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
        model.conv1 = conv
    return model


def build_backbone(name: str, num_classes: int, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """Build the backbone called ``name`` (one of :data:`BACKBONES`), randomly initialised.

    ``small_input`` (ResNet-18 only) replaces the 7x7 stride-2 stem and its max-pool by a 3x3 stride-1 conv, for
    inputs of 32x32..64x64; with ``in_channels != 3`` the first conv is replaced to accept that many channels.
    """
    check_int("num_classes", num_classes, minimum=1, owner="build_backbone")
    check_int("in_channels", in_channels, minimum=1, owner="build_backbone")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {list(BACKBONES)}")
    if small_input and name != "resnet18":
        raise ValueError(f"small_input only applies to 'resnet18', not {name!r} (which already suits small inputs)")
    if name == "small_cnn":
        model: nn.Module = SmallCNN(in_channels=in_channels, num_classes=num_classes)
    elif name == "resnet18":
        model = _resnet18(num_classes, in_channels, small_input)
    else:
        model = VGGSmall(in_channels=in_channels, num_classes=num_classes)
    return model


def resolve_backbone(backbone: str | nn.Module, num_classes: int, in_channels: int = 3, *, owner: str) -> nn.Module:
    """The backbone a model was given: built by :func:`build_backbone` from a name (with ``num_classes`` outputs),
    or the ``nn.Module`` itself; anything else is a ``TypeError`` naming ``owner``."""
    if isinstance(backbone, str):
        return build_backbone(backbone, num_classes=num_classes, in_channels=in_channels)
    if isinstance(backbone, nn.Module):
        return backbone
    raise TypeError(
        f"{owner}: backbone must be a backbone name (str) or an nn.Module, got {type(backbone).__name__}"
    )
