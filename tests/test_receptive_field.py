"""Receptive fields computed from the layer geometry, checked against fields measured with gradients on unpadded,
strided, dilated and pooled stacks (issue 18 item 8)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

from lightning_xai.interpretation import relevant_units
from lightning_xai.interpretation.receptive_field import (
    ReceptiveField,
    crop_receptive_fields,
    measure_receptive_field,
    receptive_field,
)


def lenet() -> nn.Sequential:
    """conv5 - pool2 - conv5 - pool2 on 32 px, no padding: 32 -> 28 -> 14 -> 10 -> 5."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
    )


def _linearised(model: nn.Module) -> nn.Module:
    """A copy whose gradient support is the whole geometric field: max-pools become average pools of the same
    window, ReLUs identities (the geometry is unchanged)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.MaxPool2d):
            assert module.dilation in (1, (1, 1))
            setattr(parent, leaf, nn.AvgPool2d(module.kernel_size, module.stride, module.padding))
        elif isinstance(module, nn.ReLU):
            setattr(parent, leaf, nn.Identity())
    return model


def measured_boxes(model: nn.Module, shape: tuple[int, int, int]) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """``(top, left, bottom, right)`` (exclusive) of the gradient support of every output position, clipped to the
    image, measured on the linearised model with a random input."""
    linear = _linearised(model).double()
    x = torch.randn(1, *shape, dtype=torch.float64, requires_grad=True)
    z = linear(x)
    boxes = {}
    for row in range(z.shape[2]):
        for col in range(z.shape[3]):
            (grad,) = torch.autograd.grad(z[0, :, row, col].sum(), x, retain_graph=True)
            support = grad[0].abs().sum(0) > 0
            rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
            boxes[(row, col)] = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return boxes


STACKS = {
    "lenet_unpadded": (lenet, (3, 32, 32)),
    "strided_odd": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.ReLU(), nn.Conv2d(3, 3, 4, stride=3, padding=1)),
        (2, 29, 31),
    ),
    "dilated": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, dilation=2, padding=1), nn.Conv2d(3, 2, 3, stride=2, dilation=3)),
        (2, 30, 30),
    ),
    "pooled_padded": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1), nn.AvgPool2d(2), nn.Conv2d(4, 2, 5)
        ),
        (1, 37, 33),
    ),
    "same_padding": (lambda: nn.Sequential(nn.Conv2d(1, 2, 4, padding="same"), nn.Conv2d(2, 2, 3, 2)), (1, 20, 20)),
}


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
@pytest.mark.parametrize("name", list(STACKS))
def test_exact_field_equals_the_measured_field_at_every_position(name):
    make, shape = STACKS[name]
    torch.manual_seed(1)
    model = make()
    field = receptive_field(model, input_shape=shape)
    assert field.exact
    inside = 0
    for (row, col), box in measured_boxes(model, shape).items():
        full, clipped = field.box(row, col), field.box(row, col, shape[1:])
        if full == clipped:  # wholly inside the image: the measured support spans the whole field
            assert box == full, (row, col)
            inside += 1
        else:  # reaching into the padding: the support is inside the clipped box (dilation leaves holes)
            assert clipped[:2] <= box[:2] and box[2:] <= clipped[2:], (row, col)
            assert box[0] - clipped[0] < max(field.jump) * 3 and box[1] - clipped[1] < max(field.jump) * 3
    assert inside > 0


def test_lenet_field_closed_form_and_the_old_inference_error():
    model = lenet()
    field = relevant_units.receptive_field(model, "5", (3, 32, 32))  # the old import path
    # conv5 -> pool2 -> conv5 -> pool2: size 5 + 1 + 4*2 + 1*4 = 16 (hand: 5, 6, 14, 16), jump 4, no padding
    assert (field.lo, field.hi, field.jump) == ((0, 0), (15, 15), (4, 4))
    assert field.size == (16, 16) and field.stride == (4.0, 4.0) and field.origin == (0.0, 0.0)
    assert field.layer_size == (5, 5) and field.input_size == (32, 32) and not field.clipped
    images = torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32)
    crop = crop_receptive_fields(images, torch.tensor([[4, 2]]), field)
    assert torch.equal(crop[0], images[0, :, 16:32, 8:24])


def test_a_layer_inside_a_model_and_a_block(resnet18):
    before = snapshot(resnet18)
    conv = receptive_field(resnet18, "layer1.0.conv1", (3, 64, 64))
    assert conv.size == (7 + 2 * 2 + 2 * 4, 19) and conv.jump == (4, 4)
    block = receptive_field(resnet18, "layer1", (3, 64, 64))
    assert block.size == (43, 43) and block.jump == (4, 4) and block.lo == (-3 - 2 - 4 * 4, -21)
    trunk = nn.Sequential(*list(resnet18.children())[:-2])
    assert receptive_field(trunk).size == (435, 435) and receptive_field(trunk).jump == (32, 32)
    assert receptive_field(resnet18, "layer4", (3, 32, 32)).clipped
    assert_unchanged(resnet18, before)


def test_measured_field_of_a_linear_stack_is_exact():
    make, shape = STACKS["strided_odd"]
    model = make()
    exact = receptive_field(model, input_shape=shape)
    measured = measure_receptive_field(_linearised(model), None, shape)
    assert not measured.exact
    assert (measured.lo, measured.hi, measured.jump) == (exact.lo, exact.hi, exact.jump)
    assert receptive_field(model, input_shape=shape, method="gradient").jump == exact.jump


def test_untraceable_models_fall_back_to_a_measured_field_with_a_warning():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) if x.sum() > -1e9 else x  # data-dependent control flow: fx cannot trace it

    with pytest.warns(UserWarning, match="receptive field"):
        field = receptive_field(Dynamic(), in_channels=3)
    assert not field.exact and field.jump == (1, 1) and field.size == (3, 3)
    with pytest.raises(NotImplementedError, match="exactly"):
        receptive_field(Dynamic(), method="exact")
    with pytest.raises(ValueError, match="method"):
        receptive_field(Dynamic(), method="guess")


def test_non_spatial_layers_see_the_whole_image():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    field = receptive_field(model, "2", (1, 8, 8))
    assert not field.spatial and field.clipped
    images = torch.rand(2, 1, 8, 8)
    assert torch.equal(crop_receptive_fields(images, torch.zeros(2, 2, dtype=torch.long), field), images)


def test_the_field_is_a_value():
    field = ReceptiveField((-1, 0), (3, 4), (2, 2))
    assert field.box(1, 1) == (1, 2, 6, 7) and field.box(0, 0, (4, 4)) == (0, 0, 4, 4)
    assert field == ReceptiveField((-1, 0), (3, 4), (2, 2)) and hash(field)
