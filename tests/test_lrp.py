"""Layer-wise Relevance Propagation: rules against closed forms and hand-computed examples, conservation on a
VGG-style net and on torchvision ResNets, canonizers (BatchNorm folding, explicit residual sums) undone exactly,
the no-side-effect contract and clear errors for what LRP cannot explain."""

from __future__ import annotations

import pytest
import torch
from helpers import GapCNN, LinearModel, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.base import ATTRIBUTORS, build_attributor
from lightning_xai.attribution.lrp import (
    COMPOSITES,
    LRP,
    AlphaBeta,
    BatchNormFolding,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    LRPEpsilon,
    LRPEpsilonGammaBox,
    ResidualAdd,
    ResNetCanonizer,
    WSquare,
    ZBox,
    ZPlus,
    canonize,
)
from lightning_xai.attribution.targets import contrastive_target

torchvision = pytest.importorskip("torchvision")


# ---------------------------------------------------------------------------------------------------------------
# models and independent reference computations
# ---------------------------------------------------------------------------------------------------------------


class VGGish(nn.Module):
    """conv-ReLU-pool x2, then a dense ReLU head; 16x16 inputs."""

    def __init__(self, pool: str = "max", bias: bool = True, num_classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        pool_type = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            pool_type(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            pool_type(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(inplace=True), nn.Linear(16, num_classes)
        )
        if not bias:
            zero_biases(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ReusedConv(nn.Module):
    """The same convolution applied twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.head = nn.Linear(3, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.conv(x))))
        return self.head(h.mean((2, 3)))


def zero_biases(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.zero_()


def randomize_batchnorm(model: nn.Module, *, zero_shift: bool, seed: int = 0) -> None:
    """Random BN scales and variances; with ``zero_shift`` beta = 0 and running_mean = 0 (folded bias = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                if zero_shift:
                    m.bias.zero_()
                    m.running_mean.zero_()
                else:
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
                    m.running_mean.copy_(0.1 * torch.randn(n, generator=g))


def zero_bias_resnet(model: nn.Module) -> nn.Module:
    randomize_batchnorm(model, zero_shift=True)
    with torch.no_grad():
        model.fc.bias.zero_()
    return model.eval()


def gradient_x_input(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Reference computed independently of the library: plain autograd on the unmodified model."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return (x * grad).detach()


def relative_error(relevance: torch.Tensor, scores: torch.Tensor) -> float:
    totals = relevance.flatten(1).sum(1).double()
    return float(((totals - scores.double()).abs() / scores.double().abs()).max())


def structure(model: nn.Module) -> list[tuple[str, int, tuple[str, ...], tuple[str, ...]]]:
    """Module names, identities, instance attributes (a patched forward among them) and submodule names."""
    return [(n, id(m), tuple(sorted(m.__dict__)), tuple(m._modules)) for n, m in model.named_modules()]


def assert_same_state_dict(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def clone_state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------------------------
# rules against closed forms
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_epsilon_on_linear_model_is_input_times_weight(linear_model: LinearModel, dtype: torch.dtype) -> None:
    model = linear_model.to(dtype)
    x = torch.randn(3, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    relevance = LRP("epsilon", canonizers=None, epsilon=1e-9)(model, x, 2)
    assert relevance.shape == x.shape and relevance.dtype == dtype
    torch.testing.assert_close(relevance, x * model.weight_map(2), rtol=1e-5, atol=1e-6)


def test_epsilon_closed_form_with_large_epsilon(linear_model: LinearModel) -> None:
    """R_j = x_j w_j * z / (z + eps sign z): the stabiliser absorbs relevance exactly as the formula says."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = 5.0
    z = linear_model(x)[:, 1].detach()
    expected = x * linear_model.weight_map(1) * (z / (z + eps * torch.where(z >= 0, 1.0, -1.0))).view(-1, 1, 1, 1)
    relevance = LRP("epsilon", canonizers=None, epsilon=eps)(linear_model, x, 1)
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-6)


def mlp(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10, bias=bias), nn.ReLU(), nn.Linear(10, 3, bias=bias))
    return model.eval()


def _gap_cnn_with_stats() -> nn.Module:
    model = GapCNN().eval()
    randomize_batchnorm(model, zero_shift=False)
    return model


@pytest.mark.parametrize(
    "make",
    [mlp, lambda: VGGish("max").eval(), lambda: VGGish("avg").eval(), _gap_cnn_with_stats, lambda: ReusedConv()],
    ids=["mlp", "vgg-maxpool", "vgg-avgpool", "gapcnn-batchnorm-inplace", "reused-conv"],
)
def test_epsilon_to_zero_is_gradient_times_input(make) -> None:
    """On ReLU networks LRP-epsilon with epsilon -> 0 (biases included) equals gradient x input."""
    model = make()
    x = torch.rand(2, 6) if isinstance(model, nn.Sequential) else torch.rand(2, 3, 16, 16)
    expected = gradient_x_input(model, x, 1)
    relevance = LRP("epsilon", epsilon=1e-12)(model, x, 1)
    torch.testing.assert_close(relevance, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def two_layer_net() -> nn.Module:
    """x = (1, 2) -> W1 = [[1, .5], [-1, 2]] -> h = (2, 3) (both ReLUs active) -> W2 = [[1, -.5]] -> y = 0.5."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 2.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, -0.5]]))
    return net.eval()


# Hand computation for two_layer_net, x = (1, 2), y = 0.5:
# z+    layer 2: positive contributions h1*1 = 2 (h2*(-.5) < 0)       -> R(h) = (0.5, 0)
#       layer 1: unit 1 contributions x1*1 = 1, x2*.5 = 1 (sum 2)      -> R(x) = (0.25, 0.25)
# gamma layer 2: w + .5 w+ = (1.5, -.5), contributions (3, -1.5), z' = 1.5 -> R(h) = (1.0, -0.5)
#   .5  layer 1: unit 1: w' = (1.5, .75), contributions (1.5, 1.5), z' = 3 -> (0.5, 0.5) * 1.0
#              unit 2: w' = (-1, 3), contributions (-1, 6), z' = 5       -> (-1/5, 6/5) * -0.5 = (0.1, -0.6)
#                                                                       -> R(x) = (0.6, -0.1)
# a2b1  layer 2: z+ = 2, z- = -1.5 -> R(h1) = 2 * 2/2 * .5 = 1.0, R(h2) = -1 * (-1.5/-1.5) * .5 = -0.5
#       layer 1: unit 1: contributions (1, 1), no negative part           -> 2 * (0.5, 0.5) * 1.0 = (1, 1)
#              unit 2: contributions (-1, 4): z+ = 4, z- = -1 -> 2*(0, 1)*(-.5) - 1*(1, 0)*(-.5) = (0.5, -1)
#                                                                       -> R(x) = (1.5, 0.0)
# (alpha-beta is not conservative where one of the two parts is empty - a property of the rule)
@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (ZPlus(), [0.25, 0.25]),
        (AlphaBeta(1.0, 0.0), [0.25, 0.25]),
        (Gamma(0.5), [0.6, -0.1]),
        (AlphaBeta(2.0, 1.0), [1.5, 0.0]),
        (Epsilon(1e-9), [1.5, -1.0]),  # gradient x input: y = 1.5 x1 - 0.5 x2
    ],
    ids=["zplus", "alpha1beta0", "gamma", "alpha2beta1", "epsilon"],
)
def test_hand_computed_two_layer_example(rule, expected) -> None:
    net = two_layer_net()
    relevance = LRP({nn.Linear: rule}, canonizers=None)(net, torch.tensor([[1.0, 2.0]]), 0)
    torch.testing.assert_close(relevance, torch.tensor([expected]), rtol=1e-6, atol=1e-6)


# One dense layer, x = (0.5, 0.25), w = (2, -1), b = 0.25 -> z = 1.0, box [0, 1]:
# zB:  x w - l w+ - h w- = (1 - 0, -0.25 + 1) = (1, 0.75), sum 1.75 -> R = (1/1.75, 0.75/1.75)
# box [-1, 2]: (1 + 1 * 2, -0.25 + 2 * 1) = (3, 1.75); per-feature box low (-1, 0), high (2, 1): (3, 0.75)
# flat: equal shares (0.5, 0.5); w-square: w^2 = (4, 1) -> (0.8, 0.2). The bias is no contribution: sum R = z.
@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (ZBox(0.0, 1.0), [1 / 1.75, 0.75 / 1.75]),
        (ZBox(-1.0, 2.0), [3 / 4.75, 1.75 / 4.75]),
        (ZBox([-1.0, 0.0], [2.0, 1.0]), [3 / 3.75, 0.75 / 3.75]),
        (Flat(), [0.5, 0.5]),
        (WSquare(), [0.8, 0.2]),
    ],
    ids=["zbox", "zbox-wide", "zbox-per-feature", "flat", "wsquare"],
)
def test_hand_computed_first_layer_rules(rule, expected) -> None:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
        layer.bias.fill_(0.25)
    net = nn.Sequential(layer).eval()
    relevance = LRP(Composite(first_layer=rule), canonizers=None)(net, torch.tensor([[0.5, 0.25]]), 0)
    torch.testing.assert_close(relevance, torch.tensor([expected]), rtol=1e-6, atol=1e-7)


def test_signed_rules_match_formulas_for_mixed_sign_inputs() -> None:
    """z+ and gamma with negative inputs, against the formulas written out over the contributions c = x * w."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 1)
    net = nn.Sequential(layer).eval()
    x = torch.randn(4, 7)
    c = x * layer.weight.detach()  # [4, 7]
    b = layer.bias.item()
    z = c.sum(1, keepdim=True) + b
    zplus = c.clamp(min=0) / (c.clamp(min=0).sum(1, keepdim=True) + max(b, 0.0)) * z
    relevance = LRP({nn.Linear: ZPlus()}, canonizers=None)(net, x, 0)
    torch.testing.assert_close(relevance, zplus, rtol=1e-5, atol=1e-6)

    gamma = 0.7
    same_sign = torch.where(z > 0, c.clamp(min=0), c.clamp(max=0))
    same_bias = torch.where(z > 0, torch.tensor(max(b, 0.0)), torch.tensor(min(b, 0.0)))
    expected = (c + gamma * same_sign) / (z + gamma * (same_sign.sum(1, keepdim=True) + same_bias)) * z
    relevance = LRP({nn.Linear: Gamma(gamma)}, canonizers=None)(net, x, 0)
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-6)


def test_gamma_limits(images: torch.Tensor) -> None:
    """gamma = 0 is the z-rule (gradient x input on ReLU nets); gamma -> infinity tends to z+."""
    model = VGGish("max", bias=False).eval()
    at_zero = LRP({nn.Conv2d: Gamma(0.0), nn.Linear: Epsilon(1e-12)}, canonizers=None)(model, images, 0)
    reference = gradient_x_input(model, images, 0)
    torch.testing.assert_close(at_zero, reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))
    large = LRP({nn.Conv2d: Gamma(1e6), nn.Linear: Epsilon(1e-9)}, canonizers=None)(model, images, 0)
    zplus = LRP({nn.Conv2d: ZPlus(), nn.Linear: Epsilon(1e-9)}, canonizers=None)(model, images, 0)
    torch.testing.assert_close(large, zplus, rtol=1e-3, atol=1e-5 * float(zplus.abs().max()))
    assert not torch.allclose(zplus, reference, atol=1e-3 * float(reference.abs().max()))


def test_zplus_relevance_is_non_negative_for_non_negative_inputs(images: torch.Tensor) -> None:
    model = VGGish("max", bias=True, seed=2).eval()
    with torch.no_grad():
        model.classifier[3].bias[:2] = torch.tensor([1.0, -1.0])
    logits = model(images).detach()
    assert bool((logits[:, 0] > 0).all()) and bool((logits[:, 1] < 0).all())
    lrp = LRP({nn.Conv2d: ZPlus(), nn.Linear: ZPlus()}, canonizers=None)
    positive = lrp(model, images, 0)
    negative = lrp(model, images, 1)
    assert float(positive.min()) >= 0.0 and float(positive.sum()) > 0
    assert float(negative.max()) <= 0.0 and float(negative.sum()) < 0
    # and it is not gradient x input, which has both signs
    assert float(gradient_x_input(model, images, 0).min()) < 0


def test_pass_rule_conserves_through_non_relu_activations() -> None:
    """tanh and an in-place ReLU6: relevance passes through unchanged, where gradient x input would not conserve."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.ReLU6(inplace=True), nn.Linear(8, 3)
    ).eval()
    zero_biases(model)
    x = 2 * torch.randn(4, 6)
    logits = model(x)[:, 0].detach()
    relevance = LRP("epsilon", epsilon=1e-9, canonizers=None)(model, x, 0)
    assert relative_error(relevance, logits) < 1e-4
    assert relative_error(gradient_x_input(model, x, 0), logits) > 1e-3  # the check can fail


def test_residual_sum_is_split_in_proportion_not_copied() -> None:
    """a = 2 x1 = 2 and b = 3 x2 = 3 meet in a ResidualAdd (out = 5): the z-rule gives R = (2, 3), not (5, 5);
    with epsilon = 5 on the sum, R = (2, 3) * 5 / (5 + 5)."""

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.add = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False), ResidualAdd()
            with torch.no_grad():
                self.a.weight.fill_(2.0)
                self.b.weight.fill_(3.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.add(self.a(x[:, :1]), self.b(x[:, 1:]))

    model, x = TwoBranches().eval(), torch.ones(1, 2)
    torch.testing.assert_close(LRP("epsilon", epsilon=1e-9)(model, x, 0), torch.tensor([[2.0, 3.0]]))
    absorbing = LRP({ResidualAdd: Epsilon(5.0), nn.Linear: Epsilon(1e-9)})(model, x, 0)
    torch.testing.assert_close(absorbing, torch.tensor([[1.0, 1.5]]))


# ---------------------------------------------------------------------------------------------------------------
# conservation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_conservation_on_vgg_style_net(composite: str, pool: str, images: torch.Tensor) -> None:
    model = VGGish(pool, bias=False).eval()
    logits = model(images).detach()
    relevance = LRP(composite, epsilon=1e-9)(model, images, 1)
    assert relevance.shape == images.shape
    assert relative_error(relevance, logits[:, 1]) < 1e-4


def test_conservation_with_per_channel_box_on_normalised_inputs(images: torch.Tensor) -> None:
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    normalised = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    low, high = (-mean / std).tolist(), ((1 - mean) / std).tolist()
    model = VGGish("max", bias=False).eval()
    logits = model(normalised).detach()
    relevance = LRP("epsilon_gamma_box", epsilon=1e-9, low=low, high=high)(model, normalised, 2)
    assert relative_error(relevance, logits[:, 2]) < 1e-4
    with pytest.raises(ValueError, match="outside the box"):
        LRP("epsilon_gamma_box")(model, normalised, 2)  # default box [0, 1] does not hold these inputs


def test_conservation_on_reused_module() -> None:
    model = ReusedConv().eval()
    x = torch.rand(2, 3, 8, 8)
    logits = model(x).detach()
    for composite in ("epsilon_plus", "epsilon_gamma_box"):
        relevance = LRP(composite, epsilon=1e-9)(model, x, 3)
        assert relative_error(relevance, logits[:, 3]) < 1e-4, composite


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_gamma_box"])
def test_conservation_on_resnet18(resnet18: nn.Module, composite: str) -> None:
    """The relevance of a torchvision ResNet-18 sums to the explained logit (Captum's LRP gives 6.4e8 for 0.07):
    BatchNorms are folded (zero beta and running mean: zero folded bias) and residual sums split, not copied."""
    model = zero_bias_resnet(resnet18)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = model(x).detach()
    relevance = LRP(composite, epsilon=1e-9)(model, x, 4)
    error = relative_error(relevance, logits[:, 4])
    print(f"resnet18 {composite}: relevance {relevance.flatten(1).sum(1).tolist()} logits {logits[:, 4].tolist()}")
    assert error < 1e-4


def test_resnet_epsilon_is_gradient_times_input_with_either_canonization(resnet18: nn.Module) -> None:
    """With BatchNorm statistics and shifts that are not zero: LRP-0 equals gradient x input, whether the residual
    sums are explicit ResidualAdd modules (ResNetCanonizer) or plain additions with fx-found BatchNorm folding."""
    randomize_batchnorm(resnet18, zero_shift=False)
    x = torch.rand(1, 3, 32, 32)
    reference = gradient_x_input(resnet18, x, 2)
    scale = float(reference.abs().max())
    explicit = LRP("epsilon", epsilon=1e-12)(resnet18, x, 2)
    folded_only = LRP("epsilon", epsilon=1e-12, canonizers=["batchnorm_folding"])(resnet18, x, 2)
    torch.testing.assert_close(explicit, reference, rtol=1e-3, atol=1e-5 * scale)
    torch.testing.assert_close(folded_only, reference, rtol=1e-3, atol=1e-5 * scale)


def test_bottleneck_resnet() -> None:
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = zero_bias_resnet(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3, width_per_group=16))
    x = torch.rand(1, 3, 32, 32)
    before, logits = clone_state(model), model(x).detach()
    with ResNetCanonizer().applied(model):
        assert sum(isinstance(m, ResidualAdd) for m in model.modules()) == 4
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-5)
    assert_same_state_dict(model.state_dict(), before)
    # (z+ / alpha-beta lose the relevance of units whose positive / negative part is empty; in a Bottleneck the
    # 1x1 conv3 feeds the residual sum without a ReLU in between, so that happens: 2.6e-3 relative here)
    for composite in ("epsilon", "epsilon_gamma_box"):
        relevance = LRP(composite, epsilon=1e-9)(model, x, 0)
        assert relative_error(relevance, logits[:, 0]) < 1e-4, composite


# ---------------------------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------------------------


def test_callable_targets_start_from_the_callables_score(images: torch.Tensor) -> None:
    model = VGGish("avg", bias=False).eval()
    logits = model(images).detach()
    lrp = LRP("epsilon_plus", epsilon=1e-9)
    r1, r3 = lrp(model, images, 1), lrp(model, images, 3)
    contrast = lrp(model, images, lambda y: y[:, 1] - y[:, 3])
    torch.testing.assert_close(contrast, r1 - r3, rtol=1e-4, atol=1e-6 * float(r1.abs().max()))
    assert relative_error(contrast, logits[:, 1] - logits[:, 3]) < 1e-4
    affine = lrp(model, images, lambda y: 2 * y[:, 1] + 3.0)  # starts from 2 y1 + 3, not from 2 y1
    assert relative_error(affine, 2 * logits[:, 1] + 3.0) < 1e-4
    factor = ((2 * logits[:, 1] + 3.0) / logits[:, 1]).view(-1, 1, 1, 1)
    torch.testing.assert_close(affine, r1 * factor, rtol=1e-4, atol=1e-6 * float(affine.abs().max()))


def test_tensor_target_matches_per_sample_int_targets(images: torch.Tensor) -> None:
    model = VGGish("max").eval()
    lrp = LRP("epsilon_plus_flat")
    both = lrp(model, images, torch.tensor([4, 0]))
    torch.testing.assert_close(both[:1], lrp(model, images[:1], 4))
    torch.testing.assert_close(both[1:], lrp(model, images[1:], 0))


# ---------------------------------------------------------------------------------------------------------------
# canonizers
# ---------------------------------------------------------------------------------------------------------------


def test_batchnorm_folding_keeps_outputs_and_is_undone() -> None:
    model = _gap_cnn_with_stats()
    x = torch.randn(2, 3, 16, 16)
    before_out, before_state, before_structure = model(x).detach(), clone_state(model), structure(model)
    features_before = model.features(x).detach()
    with BatchNormFolding().applied(model):
        assert "forward" in model.features[2].__dict__ and "forward" in model.features[3].__dict__
        torch.testing.assert_close(model.features(x), features_before, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), before_out, rtol=0, atol=1e-5)
        h = model.features[:2](x)
        assert not torch.allclose(model.features[2](h), nn.Conv2d.forward(model.features[2], h)), "nothing folded"
    assert structure(model) == before_structure
    assert_same_state_dict(model.state_dict(), before_state)
    assert torch.equal(model(x), before_out)


def test_batchnorm_folding_with_explicit_pairs_and_sequential_fallback() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv = nn.Conv2d(4, 4, 1)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            if float(h.sum()) > -1e9:  # data-dependent control flow: torch.fx cannot trace this
                h = self.norm(self.conv(h))
            return h.mean((1, 2, 3))

    model = Untraceable().eval()
    randomize_batchnorm(model, zero_shift=False)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x).detach()
    with pytest.raises(ValueError, match=r"cannot fold BatchNorm 'norm'.*pairs=\[") as info:
        BatchNormFolding().apply(model)
    assert "torch.fx cannot trace" in str(info.value)
    assert not any("forward" in m.__dict__ for m in model.modules()), "a failed apply changed the model"
    with BatchNormFolding(pairs=[("body.0", "body.1"), ("conv", "norm")]).applied(model):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    assert torch.equal(model(x), expected)


def test_resnet_canonizer_is_exact_and_undone(resnet18: nn.Module) -> None:
    randomize_batchnorm(resnet18, zero_shift=False)
    x = torch.randn(2, 3, 32, 32)
    before_out, before_state, before_structure = resnet18(x).detach(), clone_state(resnet18), structure(resnet18)
    with ResNetCanonizer().applied(resnet18):
        names = [n for n, m in resnet18.named_modules() if isinstance(m, ResidualAdd)]
        assert names == [f"layer{i}.{j}.residual_add" for i in range(1, 5) for j in range(2)]
        folded = [n for n, m in resnet18.named_modules() if isinstance(m, nn.BatchNorm2d) and "forward" in m.__dict__]
        assert len(folded) == sum(isinstance(m, nn.BatchNorm2d) for m in resnet18.modules()) == 20
        torch.testing.assert_close(resnet18(x), before_out, rtol=1e-4, atol=1e-5)
    assert structure(resnet18) == before_structure
    assert_same_state_dict(resnet18.state_dict(), before_state)
    assert torch.equal(resnet18(x), before_out)


def test_canonize_restores_in_reverse_order_on_error(resnet18: nn.Module) -> None:
    before = structure(resnet18)
    with pytest.raises(RuntimeError, match="boom"), canonize(resnet18, [ResNetCanonizer(), BatchNormFolding()]):
        assert structure(resnet18) != before
        raise RuntimeError("boom")
    assert structure(resnet18) == before


def test_batchnorm_folding_rejects_training_mode_and_shared_outputs() -> None:
    model = GapCNN().train()
    with pytest.raises(ValueError, match="training mode"):
        BatchNormFolding().apply(model)

    class SharedOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return (self.bn(h) + h).mean((1, 2, 3))

    with pytest.raises(ValueError, match="also used by"):
        BatchNormFolding().apply(SharedOutput().eval())


def test_resnet_canonizer_rejects_unknown_blocks() -> None:
    from torchvision.models.resnet import BasicBlock

    class ScaledBlock(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match=r"block '0' \(ScaledBlock\) has its own forward"):
        ResNetCanonizer().apply(nn.Sequential(ScaledBlock(4, 4)).eval())
    with pytest.raises(ValueError, match="contains no torchvision BasicBlock"):
        ResNetCanonizer().apply(GapCNN().eval())


# ---------------------------------------------------------------------------------------------------------------
# no side effects
# ---------------------------------------------------------------------------------------------------------------


def test_no_side_effects_on_a_model_in_training(images: torch.Tensor) -> None:
    model = GapCNN()
    randomize_batchnorm(model, zero_shift=False)
    put_in_train_mode_with_grads(model)
    before, state, struct = snapshot(model), clone_state(model), structure(model)
    relevance = LRP()(model, images, 1)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert_unchanged(model, before)
    assert_same_state_dict(model.state_dict(), state)  # running statistics too: it ran in eval mode
    assert structure(model) == struct


def test_no_side_effects_on_resnet_in_training_also_on_error(resnet18: nn.Module) -> None:
    put_in_train_mode_with_grads(resnet18)
    before, state, struct = snapshot(resnet18), clone_state(resnet18), structure(resnet18)
    x = torch.rand(1, 3, 32, 32)
    LRP("epsilon_gamma_box")(resnet18, x, 0)
    with pytest.raises(ValueError, match="outside the box"):  # raised mid-forward, with everything installed
        LRP()(resnet18, x - 2.0, 0)
    assert_unchanged(resnet18, before)
    assert_same_state_dict(resnet18.state_dict(), state)
    assert structure(resnet18) == struct


def test_user_hooks_are_kept_and_fx_is_not_run_through_them(images: torch.Tensor) -> None:
    """With a forward hook on the model, BatchNorm folding pairs Sequential neighbours instead of tracing (tracing
    would call the hook with proxies); the result is the same and the hook stays."""
    model = _gap_cnn_with_stats()
    expected = LRP()(model, images, 0)
    calls = []
    handle = model.features.register_forward_hook(lambda m, i, o: calls.append(type(o).__name__))
    try:
        before = snapshot(model)
        torch.testing.assert_close(LRP()(model, images, 0), expected)
        assert_unchanged(model, before)
        assert calls == ["Tensor"]
    finally:
        handle.remove()


def test_softmax_output_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)).eval()
    with pytest.raises(ValueError, match=r"no rule for '1' \(Softmax\).*logits"):
        LRP("epsilon")(model, torch.rand(2, 4), 0)


def test_works_under_no_grad_and_inference_mode(images: torch.Tensor) -> None:
    model = GapCNN().eval()
    lrp = LRP("epsilon_gamma_box")
    expected = lrp(model, images, 2)
    with torch.no_grad():
        torch.testing.assert_close(lrp(model, images, 2), expected)
    with torch.inference_mode():
        inference_images = images.clone()
        result = lrp(model, inference_images, torch.tensor([2, 2]))
    torch.testing.assert_close(result, expected)
    assert not result.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_batchnorm_not_after_a_conv_is_an_error_and_changes_nothing() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    ).eval()
    put_in_train_mode_with_grads(model)
    before, struct = snapshot(model), structure(model)
    with pytest.raises(ValueError, match=r"BatchNorm '2' is applied to the output of '1' \(ReLU\)"):
        LRP()(model, torch.rand(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="LRP cannot explain BatchNorm '2'.*canonizers='auto'"):
        LRP(canonizers=None)(model, torch.rand(1, 3, 8, 8), 0)
    assert_unchanged(model, before)
    assert structure(model) == struct


def test_unknown_module_with_parameters_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(144, 2)).eval()
    with pytest.raises(ValueError, match=r"LRP has no rule for '2' \(GroupNorm\)"):
        LRP("epsilon")(model, torch.rand(1, 3, 8, 8), 0)
    upsample = nn.Sequential(nn.ConvTranspose2d(3, 2, 2), nn.Flatten(), nn.Linear(2 * 9 * 9, 2)).eval()
    with pytest.raises(ValueError, match=r"no rule for '0' \(ConvTranspose2d\)"):
        LRP("epsilon")(upsample, torch.rand(1, 3, 8, 8), 0)

    class StandardisedConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight - self.weight.mean()
            return self._conv_forward(x, w, self.bias)

    custom = nn.Sequential(StandardisedConv(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).eval()
    with pytest.raises(ValueError, match="subclass of a Linear/Conv layer with its own forward"):
        LRP("epsilon")(custom, torch.rand(1, 3, 8, 8), 0)


def test_unknown_composite_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown LRP composite 'epsilon_pluss'.*epsilon_plus.*valid names"):
        LRP("epsilon_pluss")
    with pytest.raises(TypeError, match="composite"):
        LRP(42)


def test_rules_for_unsupported_layers_are_errors(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"Gamma\(.*cannot be applied to layers of type ReLU.*supports"):
        Composite({nn.ReLU: Gamma(0.25)})
    with pytest.raises(ValueError, match="BatchNorm2d"):
        LRP({nn.BatchNorm2d: Epsilon()})
    with pytest.raises(ValueError, match="only be the rule of the first layer"):
        Composite({nn.Conv2d: Flat()})
    with pytest.raises(TypeError, match="Rule instance"):
        Composite({nn.Conv2d: "gamma"})
    model = VGGish().eval()
    with pytest.raises(ValueError, match=r"cannot be applied to layer 'features.1' \(ReLU\)"):
        LRP({"features.1": Epsilon()})(model, images, 0)
    with pytest.raises(ValueError, match=r"'features.9' not found.*close matches"):
        LRP({"features.9": Epsilon()})(model, images, 0)
    with pytest.raises(ValueError, match="not the first Linear/Conv layer"):
        LRP({"features.3": ZBox(0.0, 1.0)})(model, images, 0)


@pytest.mark.parametrize("bad", [0, 0.0, -1e-3, float("nan"), float("inf"), True, "1e-6"])
def test_epsilon_must_be_positive(bad) -> None:
    with pytest.raises(ValueError, match="epsilon must be"):
        LRP(epsilon=bad)
    with pytest.raises(ValueError, match="epsilon must be"):
        Epsilon(bad)


def test_bad_hyper_parameters() -> None:
    with pytest.raises(ValueError, match="gamma must be .*>= 0"):
        LRP(gamma=-0.1)
    with pytest.raises(ValueError, match="alpha - beta must be 1"):
        AlphaBeta(2.0, 0.5)
    with pytest.raises(ValueError, match="low must be < high"):
        LRP(low=1.0, high=0.0)
    with pytest.raises(ValueError, match="channels"):
        ZBox([0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown canonizer 'resnett'.*batchnorm_folding"):
        LRP(canonizers=["resnett"])
    with pytest.raises(ValueError, match="pairs must be"):
        BatchNormFolding(pairs=[("conv",)])


def test_bad_inputs_and_targets(linear_model: LinearModel) -> None:
    lrp = LRP("epsilon")
    with pytest.raises(TypeError, match="floating-point"):
        lrp(linear_model, torch.ones(1, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="out of range"):
        lrp(linear_model, torch.rand(1, 3, 8, 8), 7)
    with pytest.raises(ValueError, match="Tensor"):
        lrp(linear_model, torch.rand(2, 3, 8, 8), lambda y: y)


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------


def test_registered_names(images: torch.Tensor) -> None:
    for name in ("lrp", "lrp_epsilon", "lrp_epsilon_plus", "lrp_epsilon_plus_flat", "lrp_epsilon_gamma_box"):
        assert name in ATTRIBUTORS
    assert isinstance(build_attributor("lrp"), LRP) and build_attributor("lrp").composite == "epsilon_plus"
    built = build_attributor({"name": "lrp_epsilon_gamma_box", "gamma": 0.5})
    assert isinstance(built, LRPEpsilonGammaBox) and built.gamma == 0.5
    model = VGGish().eval()
    torch.testing.assert_close(
        build_attributor("lrp_epsilon")(model, images, 1), LRP("epsilon", epsilon=1e-6)(model, images, 1)
    )
    assert isinstance(build_attributor("lrp_epsilon"), LRPEpsilon)
    assert "composite='epsilon_plus'" in repr(LRP())


# ---------------------------------------------------------------------------------------------------------------
# issue 12: callable targets near ties, BatchNorm folding with hooks on non-Sequential models
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [1e-5, 1e-6, 1e-7, 0.0])
def test_contrastive_target_conserves_exactly_near_ties(gap: float) -> None:
    """Issue 12.7: relevance of ``y_a - y_b`` sums to ``y_a - y_b`` also when the two logits (about 3) differ by
    1e-5 .. 1e-7 - the seed is not divided by a stabilised gap (that lost 10-90 % of the relevance)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(6, 3, bias=False).double().eval()
    x = torch.rand(1, 6, generator=g, dtype=torch.float64) + 0.5
    with torch.no_grad():
        model.weight.copy_(torch.rand(3, 6, generator=g, dtype=torch.float64))
        y = model(x)[0]
        model.weight[0] *= 3.0 / float(y[0])
        model.weight[1] *= (3.0 - gap) / float(y[1])
        y = model(x)[0]
    target = contrastive_target(0, 1)
    relevance = LRP("epsilon")(model, x, target)
    expected = float(y[0] - y[1])
    assert abs(expected - gap) <= 1e-12
    assert abs(float(relevance.sum()) - expected) <= 1e-6 * max(abs(expected), 1e-12) + 1e-15
    # the same for an exactly linear weighted difference
    weighted = LRP("epsilon")(model, x, lambda out: 2.0 * out[:, 0] - 2.0 * out[:, 1])
    assert abs(float(weighted.sum()) - 2 * expected) <= 1e-6 * max(abs(expected), 1e-12) + 1e-15


class ConvBNNet(nn.Module):
    """A BatchNorm network that is not an ``nn.Sequential`` (layers as attributes, a custom forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def test_batchnorm_folding_works_with_hooks_on_a_non_sequential_model(images: torch.Tensor) -> None:
    """Issue 12.8: forward hooks (a user's, wandb.watch's on the root, a profiler's on a layer) no longer prevent
    tracing, so BatchNorms outside nn.Sequential are folded; the hooks are neither called with proxies nor
    removed, and the result equals the one without hooks."""
    model = ConvBNNet().eval()
    randomize_batchnorm(model, zero_shift=False)
    expected = LRP("epsilon")(model, images, 1)
    calls: list[str] = []
    handles = [
        model.register_forward_hook(lambda m, i, o: calls.append(f"root:{type(o).__name__}")),
        model.bn1.register_forward_hook(lambda m, i, o: calls.append(f"bn1:{type(o).__name__}")),
        model.conv2.register_forward_pre_hook(lambda m, i: calls.append(f"conv2:{type(i[0]).__name__}")),
    ]
    try:
        hooks_before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
        before = snapshot(model)
        torch.testing.assert_close(LRP("epsilon")(model, images, 1), expected)
        assert_unchanged(model, before)
        assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == (
            hooks_before
        )
        # one real forward pass: each hook ran once, on tensors (never on tracing proxies)
        assert sorted(calls) == ["bn1:Tensor", "conv2:Tensor", "root:Tensor"]
    finally:
        for handle in handles:
            handle.remove()
