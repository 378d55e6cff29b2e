"""Tests of Deconvnet, Guided Backpropagation and Guided Grad-CAM: hand-computed backward passes on small ReLU
nets, in-place and reused ReLU modules, restoration of the patched modules, the no-side-effect contract,
autograd contexts and input validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.base import ATTRIBUTORS, build_attributor
from lightning_xai.attribution.guided import Deconvnet, GuidedBackprop, GuidedGradCAM, modified_relu_backward
from lightning_xai.attribution.targets import contrastive_target

# ---------------------------------------------------------------------------------------------------------------
# small models
# ---------------------------------------------------------------------------------------------------------------


class OneHidden(nn.Module):
    """``W2 relu(W1 x + b1) + b2`` with 6 inputs, 5 hidden units, 3 classes."""

    def __init__(self, inplace: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(6, 5)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class TwoHidden(nn.Module):
    """``W3 relu(W2 relu(W1 x))``; with ``shared`` the same ``nn.ReLU`` module is called twice."""

    def __init__(self, shared: bool, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 7), nn.Linear(7, 5), nn.Linear(5, 3)
        self.relu1 = nn.ReLU()
        self.relu2 = self.relu1 if shared else nn.ReLU()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class InPlaceSideEffect(OneHidden):
    """Relies on the in-place side effect: the ReLU's return value is ignored."""

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.relu(h)
        return self.fc2(h)


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)
        self.unused = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def hand_one_hidden(model: OneHidden, x: torch.Tensor, target: torch.Tensor, rule: str) -> torch.Tensor:
    """The backward pass written out: d score / d x = W1^T (rule applied to W2[c] at the hidden ReLU)."""
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    rows = []
    for xb, c in zip(x, target.tolist()):
        active = (w1 @ xb + b1 > 0).float()
        g = w2[c]
        if rule == "gradient":
            back = g * active
        elif rule == "guided":
            back = g.clamp(min=0) * active
        else:
            back = g.clamp(min=0)
        rows.append(w1.T @ back)
    return torch.stack(rows)


def hand_two_hidden(model: TwoHidden, x: torch.Tensor, c: int, rule: str) -> torch.Tensor:
    w1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
    w2, b2 = model.fc2.weight.detach(), model.fc2.bias.detach()
    w3 = model.fc3.weight.detach()
    rows = []
    for xb in x:
        h1 = w1 @ xb + b1
        h2 = w2 @ h1.clamp(min=0) + b2
        g = w3[c]
        for h, w in ((h2, w2), (h1, w1)):
            g = g.clamp(min=0) * (h > 0).float() if rule == "guided" else g.clamp(min=0)
            g = w.T @ g
        rows.append(g)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# known answers
# ---------------------------------------------------------------------------------------------------------------


def test_guided_backprop_and_deconvnet_of_one_hidden_layer_by_hand():
    model = OneHidden().eval()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 1, 2, 1])
    guided = GuidedBackprop()(model, x, target)
    deconv = Deconvnet()(model, x, target)
    torch.testing.assert_close(guided, hand_one_hidden(model, x, target, "guided"))
    torch.testing.assert_close(deconv, hand_one_hidden(model, x, target, "deconvnet"))
    # the test can tell the rules apart: all three differ on this model
    plain = hand_one_hidden(model, x, target, "gradient")
    assert not torch.allclose(guided, plain) and not torch.allclose(deconv, plain)
    assert not torch.allclose(guided, deconv)


@pytest.mark.parametrize("shared", [False, True], ids=["two-relus", "one-relu-called-twice"])
@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_two_hidden_layers_by_hand_also_with_a_reused_relu_module(shared, rule):
    model = TwoHidden(shared=shared).eval()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    method = GuidedBackprop() if rule == "guided" else Deconvnet()
    torch.testing.assert_close(method(model, x, 2), hand_two_hidden(model, x, 2, rule), rtol=1e-5, atol=1e-6)


def test_in_place_relu_gives_the_same_result_as_out_of_place():
    model = GapCNN().eval()
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for method in (GuidedBackprop(), Deconvnet()):
        a = method(model, x, torch.tensor([1, 2]))
        b = method(out_of_place, x, torch.tensor([1, 2]))
        torch.testing.assert_close(a, b)
        assert a.shape == x.shape and a.abs().sum() > 0


def test_in_place_side_effect_is_kept():
    """A forward that ignores the ReLU's return value still sees the rectified tensor."""
    model = InPlaceSideEffect().eval()
    reference = OneHidden(inplace=False).eval()  # same seed, same weights, normal forward
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([2, 0, 1])
    torch.testing.assert_close(GuidedBackprop()(model, x, target), GuidedBackprop()(reference, x, target))
    torch.testing.assert_close(GuidedBackprop()(model, x, target), hand_one_hidden(reference, x, target, "guided"))


def test_callable_targets_are_explained():
    model = OneHidden().eval()
    x = torch.randn(2, 6)
    target = contrastive_target(0, 2)
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    expected = torch.stack([w1.T @ ((w2[0] - w2[2]).clamp(min=0) * (w1 @ xb + b1 > 0).float()) for xb in x])
    torch.testing.assert_close(GuidedBackprop()(model, x, target), expected)


# ---------------------------------------------------------------------------------------------------------------
# patching is undone
# ---------------------------------------------------------------------------------------------------------------


def test_relu_modules_are_restored_after_use_and_after_errors():
    model = TwoHidden(shared=False).eval()
    x = torch.randn(2, 6)
    before = model(x).detach()
    GuidedBackprop()(model, x, 0)
    with pytest.raises(ValueError, match="out of range"):
        Deconvnet()(model, x, 5)  # raises inside the patched forward
    for relu in (model.relu1, model.relu2):
        assert "forward" not in relu.__dict__
    torch.testing.assert_close(model(x), before)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)  # plain gradient again
    w1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
    w2, b2, w3 = model.fc2.weight.detach(), model.fc2.bias.detach(), model.fc3.weight.detach()
    h1 = x @ w1.T + b1
    h2 = h1.clamp(min=0) @ w2.T + b2
    expected = (((w3[0] * (h2 > 0)) @ w2) * (h1 > 0)) @ w1
    torch.testing.assert_close(grad, expected)


def test_a_previous_instance_forward_is_restored():
    model = OneHidden().eval()
    custom = model.relu.forward  # a bound method stored on the instance, as a user patch would be
    model.relu.forward = custom
    with modified_relu_backward(model, "guided") as counter:
        assert model.relu.forward is not custom
        model(torch.randn(1, 6))
        assert counter.calls == 1 and counter.modules == 1
    assert model.relu.__dict__["forward"] is custom


def test_models_without_called_relu_modules_are_rejected():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="has no torch.nn.ReLU module"):
        GuidedBackprop()(nn.Sequential(nn.Linear(6, 3)), x, 0)
    model = FunctionalReLU()
    with pytest.raises(ValueError, match="none of the 1 nn.ReLU modules .* was called"):
        Deconvnet()(model, x, 0)
    assert "forward" not in model.unused.__dict__
    with pytest.raises(ValueError, match="unknown ReLU backward rule 'lrp'"):
        with modified_relu_backward(model, "lrp"):
            pass


# ---------------------------------------------------------------------------------------------------------------
# Guided Grad-CAM
# ---------------------------------------------------------------------------------------------------------------


def test_guided_gradcam_is_guided_backprop_times_an_independent_gradcam():
    pytest.importorskip("lightning_xai.attribution.cam")
    model = GapCNN().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 3])
    result = GuidedGradCAM(layer="features")(model, x, target)
    # Grad-CAM of a GAP + linear head: the weights are w_k / (H W), the map relu(sum_k w_k / HW A_k)
    with torch.no_grad():
        features = model.features(x.clone())
        weights = model.head.weight[target] / (8 * 8)
        cam = torch.relu(torch.einsum("bk,bkhw->bhw", weights, features))[:, None]
    guided = GuidedBackprop()(model, x, target)
    assert result.shape == (2, 3, 8, 8)
    torch.testing.assert_close(result, guided * cam, rtol=1e-4, atol=1e-7)
    assert result.abs().sum() > 0


def test_guided_gradcam_on_resnet18_with_the_default_layer(resnet18):
    pytest.importorskip("lightning_xai.attribution.cam")
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(resnet18)
    result = GuidedGradCAM()(resnet18, x, torch.tensor([1, 5]))
    assert result.shape == (2, 3, 32, 32) and torch.isfinite(result).all()
    assert_unchanged(resnet18, before)


def test_guided_gradcam_validates_its_layer():
    pytest.importorskip("lightning_xai.attribution.cam")
    with pytest.raises(TypeError, match="layer must be"):
        GuidedGradCAM(layer=3)
    with pytest.raises(ValueError, match="not found"):
        GuidedGradCAM(layer="featurs")(GapCNN().eval(), torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"image batches of shape \[B, C, H, W\]"):
        GuidedGradCAM()(OneHidden(), torch.randn(2, 6), 0)


# ---------------------------------------------------------------------------------------------------------------
# contracts
# ---------------------------------------------------------------------------------------------------------------

ALL = [GuidedBackprop, Deconvnet, GuidedGradCAM]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_no_side_effects_also_when_raising(cls):
    if cls is GuidedGradCAM:
        pytest.importorskip("lightning_xai.attribution.cam")
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    result = cls()(model, x, 1)
    assert result.shape == x.shape and torch.isfinite(result).all()
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"):
        cls()(model, x, 4)
    assert_unchanged(model, before)
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_no_grad_and_inference_mode_give_the_plain_result(cls, gap_cnn):
    if cls is GuidedGradCAM:
        pytest.importorskip("lightning_xai.attribution.cam")
    x = torch.randn(2, 3, 8, 8)
    plain = cls()(gap_cnn, x, 2)
    with torch.no_grad():
        torch.testing.assert_close(cls()(gap_cnn, x, 2), plain)
    with torch.inference_mode():
        inputs = x.clone()
        torch.testing.assert_close(cls()(gap_cnn, inputs, 2), plain)


@pytest.mark.parametrize("batch", [1, 2])
def test_resnet18_runs(resnet18, batch):
    """torchvision's BasicBlock calls one in-place ReLU module twice, after ``out += identity``."""
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = snapshot(resnet18)
    for method in (GuidedBackprop(), Deconvnet()):
        result = method(resnet18, x, torch.tensor([0, 3][:batch]))
        assert result.shape == (batch, 3, 32, 32) and torch.isfinite(result).all() and result.abs().sum() > 0
    assert_unchanged(resnet18, before)


def test_batched_equals_one_by_one(gap_cnn):
    x = torch.randn(3, 3, 8, 8)
    target = torch.tensor([0, 1, 2])
    batched = GuidedBackprop()(gap_cnn, x, target)
    single = torch.cat([GuidedBackprop()(gap_cnn, x[i : i + 1], int(target[i])) for i in range(3)])
    torch.testing.assert_close(batched, single)


def test_registered_names():
    assert ATTRIBUTORS["guided_backprop"] is GuidedBackprop
    assert ATTRIBUTORS["deconvnet"] is Deconvnet
    assert ATTRIBUTORS["guided_gradcam"] is GuidedGradCAM
    assert build_attributor({"name": "guided_gradcam", "layer": "features"}).layer == "features"
