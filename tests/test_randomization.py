"""Sanity checks (Adebayo et al. 2018): model and data randomisation on a small trained CNN."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GapCNN, LinearModel, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import Tensor, nn

from lightning_xai.attribution.base import Attributor, input_gradient, select_scores
from lightning_xai.evaluation import (
    SIMILARITY_MEASURES,
    DataRandomization,
    ModelRandomization,
    compare_maps,
    parametrised_layers,
)


class Gradient(Attributor):
    """Plain input gradient (test-local, not registered)."""

    def attribute(self, model: nn.Module, inputs: Tensor, target) -> Tensor:
        return input_gradient(select_scores(model(inputs), target), inputs)


class InputEcho(Attributor):
    """A 'method' that ignores the model and returns the image: the failure case of the sanity check."""

    def attribute(self, model: nn.Module, inputs: Tensor, target) -> Tensor:
        return inputs


class ParameterRecorder(Gradient):
    """Records a copy of the model's parameters at every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Tensor]] = []

    def attribute(self, model: nn.Module, inputs: Tensor, target) -> Tensor:
        self.calls.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return super().attribute(model, inputs, target)


def patch_data(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """16x16 images with a bright 4x4 patch in the left (class 0) or right (class 1) half."""
    x = torch.rand(n, 1, 16, 16, generator=gen) * 0.2
    y = torch.randint(0, 2, (n,), generator=gen)
    r = torch.randint(2, 10, (n,), generator=gen).view(-1, 1, 1)
    c = (torch.randint(0, 4, (n,), generator=gen) + torch.where(y == 1, 9, 1)).view(-1, 1, 1)
    rows, cols = torch.arange(16).view(1, -1, 1), torch.arange(16).view(1, 1, -1)
    patch = (rows >= r) & (rows < r + 4) & (cols >= c) & (cols < c + 4)
    return x + patch.unsqueeze(1).float(), y


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 2),
    )


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int = 120, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = patch_data(512, gen)
    model = train(small_cnn(), x, y)
    probe_x, probe_y = patch_data(8, gen)
    with torch.no_grad():
        accuracy = (model(probe_x).argmax(1) == probe_y).float().mean().item()
    assert accuracy >= 0.9, f"the test CNN did not learn the task (accuracy {accuracy})"
    return model, probe_x, probe_y


def test_gradient_similarity_drops_and_trained_model_is_untouched(trained):
    model, x, y = trained
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    rng_before = torch.get_rng_state()
    try:
        result = ModelRandomization(Gradient(), mode="cascading")(model, x, y)
    finally:
        assert_unchanged(model, before)
        model.eval()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(True)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG state changed"
    assert result.layers == ["7", "3", "0"]  # Linear, conv2, conv1: top to bottom
    for measure in SIMILARITY_MEASURES:
        curve = result.curve(measure)
        assert curve.shape == (4,) and curve[0].item() == pytest.approx(1.0)
        assert curve[1].item() < 0.6, (measure, curve)  # randomising the top layer changes the gradient
        assert curve[-1].item() < 0.6, (measure, curve)
    assert result.passes(threshold=0.6, measure="spearman_abs")
    assert result.passes(threshold=0.6, measure="spearman", top_layers=3)
    # the reported average leaves out the self-comparison of step 0
    sims = result.similarities["spearman"]
    assert result.mean("spearman") == pytest.approx(sims[1:].mean().item())
    assert result.mean("spearman") < sims.mean().item()


def test_a_model_independent_method_fails(trained):
    model, x, y = trained
    result = ModelRandomization(InputEcho(), similarity=("spearman", "ssim"))(model, x, y)
    for measure in ("spearman", "ssim"):
        torch.testing.assert_close(result.curve(measure), torch.ones(4, dtype=torch.float64))
        assert result.mean(measure) == pytest.approx(1.0)
        assert not result.passes(threshold=0.9, measure=measure)


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_which_layers_are_randomised_at_each_step(trained, mode):
    model, x, y = trained
    recorder = ParameterRecorder()
    result = ModelRandomization(recorder, mode=mode, seed=3)(model, x, y)
    original = {n: p.detach() for n, p in model.named_parameters()}
    assert len(recorder.calls) == 1 + len(result.layers)
    assert all(torch.equal(recorder.calls[0][n], p) for n, p in original.items())
    for step in range(1, len(result.layers) + 1):
        randomised = result.layers[:step] if mode == "cascading" else [result.layers[step - 1]]
        for name, param in original.items():
            changed = not torch.equal(recorder.calls[step][name], param)
            assert changed == (name.split(".")[0] in randomised), (mode, step, name)
    # a layer gets the same random weights in both modes (seed + layer index)
    other = ParameterRecorder()
    ModelRandomization(other, mode="independent" if mode == "cascading" else "cascading", seed=3)(model, x, y)
    torch.testing.assert_close(other.calls[1]["7.weight"], recorder.calls[1]["7.weight"])


def test_seeding_and_result_helpers(trained):
    model, x, y = trained
    kwargs = {"similarity": "spearman", "return_explanations": True}
    a = ModelRandomization(Gradient(), seed=1, **kwargs)(model, x, y)
    b = ModelRandomization(Gradient(), seed=1, **kwargs)(model, x, y)
    c = ModelRandomization(Gradient(), seed=2, **kwargs)(model, x, y)
    torch.testing.assert_close(a.similarities["spearman"], b.similarities["spearman"])
    assert not torch.allclose(a.similarities["spearman"], c.similarities["spearman"])
    assert a.explanations.shape == (4, 8, 16, 16)
    # step 0 is the trained model's gradient, computed independently here
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).gather(1, y.view(-1, 1)).sum(), xg)
    torch.testing.assert_close(a.explanations[0], grad.sum(1))
    by_hand = compare_maps(a.explanations[0], a.explanations[2], "spearman")
    torch.testing.assert_close(a.similarities["spearman"][2], by_hand)
    table = a.as_table()
    assert [row["layer"] for row in table] == ["original", "7", "3", "0"]
    assert table[1]["spearman"] == pytest.approx(a.curve()[1].item())
    # target=None explains the predicted class (the model is accurate: the same as the labels here)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    d = ModelRandomization(Gradient(), seed=1, **kwargs)(model, x)
    e = ModelRandomization(Gradient(), seed=1, **kwargs)(model, x, predicted)
    torch.testing.assert_close(d.explanations, e.explanations)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_no_grad_and_inference_mode(gap_cnn, context):
    x = torch.rand(2, 3, 12, 12)
    reference = ModelRandomization(Gradient(), layers=["head", "features.0"])(gap_cnn, x, 1)
    before = snapshot(gap_cnn)
    with {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]():
        result = ModelRandomization(Gradient(), layers=["head", "features.0"])(gap_cnn, x, 1)
    assert_unchanged(gap_cnn, before)
    for m in SIMILARITY_MEASURES:
        torch.testing.assert_close(result.similarities[m], reference.similarities[m], equal_nan=True)


def test_default_layers_in_execution_order_and_blocks(gap_cnn, resnet18):
    assert parametrised_layers(gap_cnn, torch.rand(1, 3, 8, 8)) == ["head", "features.3", "features.2", "features.0"]
    names = parametrised_layers(resnet18, torch.rand(1, 3, 32, 32))
    assert names[0] == "fc" and names[-1] == "conv1" and names.index("layer4.1.bn2") < names.index("layer1.0.conv1")
    # whole blocks, named by path or given as modules
    before = snapshot(resnet18)
    result = ModelRandomization(Gradient(), layers=["fc", resnet18.layer4], similarity="spearman_abs")(
        resnet18, torch.rand(1, 3, 32, 32), 2
    )
    assert result.layers == ["fc", "layer4"]
    assert_unchanged(resnet18, before)
    assert all(math.isfinite(v) for v in result.curve().tolist())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown mode 'random'.*'cascading', 'independent'"):
        ModelRandomization(Gradient(), mode="random")
    with pytest.raises(ValueError, match=r"unknown similarity measure 'pearson'.*spearman_abs"):
        ModelRandomization(Gradient(), similarity=("spearman", "pearson"))
    with pytest.raises(TypeError, match="attributor must be"):
        ModelRandomization(3.5)
    model = GapCNN()
    with pytest.raises(ValueError, match=r"layer 'haed' not found.*'head'"):
        ModelRandomization(Gradient(), layers=["haed"])(model, torch.rand(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"layer 'features.1' \(ReLU\) has no parameters"):
        ModelRandomization(Gradient(), layers=["features.1"])(model, torch.rand(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"image batch \[B, C, H, W\]"):
        ModelRandomization(Gradient())(model, torch.rand(3, 8, 8), 0)
    result = ModelRandomization(Gradient(), layers=["head"], similarity="spearman")(model, torch.rand(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="top_layers must be an integer in 1..1"):
        result.passes(top_layers=2)
    with pytest.raises(ValueError, match="'ssim' was not computed"):
        result.curve("ssim")


def test_data_randomization_with_a_closed_form_learner():
    """A least-squares linear classifier: trained on the true labels its gradient is the evidence pixels, trained
    on permuted labels it is noise."""
    gen = torch.Generator().manual_seed(5)
    x, y = patch_data(256, gen)
    calls: list[Tensor] = []

    def train_fn(labels: Tensor) -> nn.Module:
        calls.append(labels.clone())
        targets = nn.functional.one_hot(labels, 2).float()
        design = torch.cat([x.flatten(1), torch.ones(len(x), 1)], dim=1)
        solution = torch.linalg.lstsq(design, targets, driver="gelsd").solution
        model = LinearModel((1, 16, 16), 2)
        with torch.no_grad():
            model.fc.weight.copy_(solution[:-1].T)
            model.fc.bias.copy_(solution[-1])
        return model.eval()

    probe = x[:6]
    result = DataRandomization(Gradient(), similarity=("spearman_abs", "ssim"), seed=7)(train_fn, y, probe)
    assert len(calls) == 2 and torch.equal(calls[0], y)
    assert torch.equal(calls[1], y[result.permutation]) and not torch.equal(calls[1], y)
    assert torch.equal(calls[1].sort().values, y.sort().values)
    assert result.similarities["spearman_abs"].shape == (6,)
    assert result.mean("spearman_abs") < 0.5 and result.passes(threshold=0.5, measure="spearman_abs")
    # an already-trained model is used as is; an echo of the input never passes
    trained = train_fn(y)
    calls.clear()
    echo = DataRandomization(InputEcho(), similarity="spearman")(train_fn, y, probe, target=0, model=trained)
    assert len(calls) == 1 and echo.mean() == pytest.approx(1.0) and not echo.passes(threshold=0.9)
    with pytest.raises(TypeError, match="train_fn"):
        DataRandomization(Gradient())(None, y, probe)
