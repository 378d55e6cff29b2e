"""The Attributor contract pieces: target selection, validation, state guard, layer lookup and capture."""

from __future__ import annotations

import pytest
import torch
from helpers import GapCNN, LinearModel, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

from lightning_xai.attribution.base import (
    ATTRIBUTORS,
    Attributor,
    build_attributor,
    chunk_slices,
    input_gradient,
    model_state_guard,
    select_scores,
)
from lightning_xai.attribution.layers import capture_layer, default_layer, resolve_layer


class _InputGrad(Attributor):
    """A minimal attributor used to test the base class (not registered)."""

    def attribute(self, model, inputs, target):
        return input_gradient(select_scores(model(inputs), target), inputs)


def test_select_scores_int_tensor_callable():
    out = torch.arange(12.0).view(3, 4)
    assert torch.equal(select_scores(out, 2), out[:, 2])
    assert torch.equal(select_scores(out, torch.tensor([0, 3, 1])), torch.tensor([0.0, 7.0, 9.0]))
    assert torch.equal(select_scores(out, lambda y: y[:, 1] - y[:, 0]), torch.ones(3))


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (4, ValueError, r"target class 4 is out of range.*valid targets 0\.\.3"),
        (-1, ValueError, "out of range"),
        (torch.tensor([0, 9, 1]), ValueError, "target class 9"),
        (torch.tensor([0, 1]), ValueError, r"shape \[B\] = \[3\]"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer class indices"),
        ("cat", TypeError, "must be an int"),
        (True, TypeError, "bool"),
        (lambda y: y, ValueError, "callable target must return Tensor"),
    ],
)
def test_select_scores_rejects_bad_targets(target, error, match):
    with pytest.raises(error, match=match):
        select_scores(torch.zeros(3, 4), target)


def test_attributor_base_call_restores_state_and_works_under_inference_mode():
    model = LinearModel()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    plain = _InputGrad()(model, x, 1)
    assert_unchanged(model, before)
    assert torch.allclose(plain, model.weight_map(1).expand(2, -1, -1, -1))
    with torch.inference_mode():
        xi = x.clone()
        under_inference = _InputGrad()(model, xi, torch.tensor([1, 1]))
    with torch.no_grad():
        under_no_grad = _InputGrad()(model, x, 1)
    assert torch.equal(plain, under_inference)
    assert torch.equal(plain, under_no_grad)
    assert_unchanged(model, before)


def test_attributor_base_restores_state_when_method_raises():
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        _InputGrad()(model, torch.randn(2, 3, 8, 8), 17)
    assert_unchanged(model, before)


def test_no_gradient_path_is_a_clear_error():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.detach())

    with pytest.raises(ValueError, match="no gradient path"):
        _InputGrad()(Detached(), torch.randn(3, 4), 0)


def test_bad_model_and_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        _InputGrad()(lambda x: x, torch.randn(2, 4), 0)
    with pytest.raises(TypeError, match="floating-point"):
        _InputGrad()(LinearModel(), torch.ones(2, 3, 8, 8, dtype=torch.long), 0)


def test_model_state_guard_restores_everything_on_error():
    model = GapCNN()
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError), model_state_guard(model):
        assert not model.training
        next(model.parameters()).requires_grad_(False)
        next(model.parameters()).grad = None
        raise RuntimeError("boom")
    assert_unchanged(model, before)


def test_registry_builds_by_name_and_rejects_unknown():
    class _Registered(Attributor):
        name = "_test_registered_identity"

        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def attribute(self, model, inputs, target):
            return inputs * self.scale

    try:
        assert isinstance(build_attributor("_test_registered_identity"), _Registered)
        built = build_attributor({"name": "_test_registered_identity", "scale": 3.0})
        assert built.scale == 3.0
        instance = _Registered()
        assert build_attributor(instance) is instance
        with pytest.raises(ValueError, match="unknown attributor 'grad_cam_typo'"):
            build_attributor("grad_cam_typo")
        with pytest.raises(ValueError, match="'name' key"):
            build_attributor({"scale": 2.0})
    finally:
        ATTRIBUTORS.pop("_test_registered_identity", None)


def test_chunk_slices():
    assert [(s.start, s.stop) for s in chunk_slices(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="batch_size"):
        list(chunk_slices(3, 0))


def test_resolve_layer_by_name_module_and_close_matches(resnet18):
    name, module = resolve_layer(resnet18, "layer4.1.conv2")
    assert module is resnet18.layer4[1].conv2 and name == "layer4.1.conv2"
    assert resolve_layer(resnet18, resnet18.layer3)[0] == "layer3"
    with pytest.raises(ValueError, match=r"close matches: \['layer4.1.conv2'"):
        resolve_layer(resnet18, "layer4.1.conv3")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(resnet18, nn.Conv2d(1, 1, 1))


def test_capture_layer_survives_inplace_ops_and_removes_hook():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(inplace=True))
    x = torch.randn(1, 1, 5, 5)
    expected = conv(x).detach()
    assert (expected < 0).any()
    with capture_layer(model, "0") as cap:
        model(x)
    assert torch.equal(cap.activation.detach(), expected), "the in-place ReLU overwrote the captured activation"
    assert not conv._forward_hooks


def test_capture_layer_reused_module_records_every_call(resnet18):
    x = torch.randn(1, 3, 32, 32)
    with capture_layer(resnet18, "layer4.1.relu") as cap_relu, capture_layer(resnet18, "layer4") as cap_block:
        resnet18(x)
    assert len(cap_relu.outputs) == 2
    assert torch.equal(cap_relu.activation, cap_block.activation)


def test_capture_layer_hook_removed_on_error():
    model = GapCNN()
    with pytest.raises(RuntimeError), capture_layer(model, "features"):
        raise RuntimeError("boom")
    assert not model.features._forward_hooks


def test_default_layer(resnet18):
    assert default_layer(resnet18, torch.randn(2, 3, 64, 64)) == "layer4"
    assert default_layer(GapCNN(), torch.randn(2, 3, 8, 8)) == "features"
    with pytest.raises(ValueError, match="no submodule with a 4-D output"):
        default_layer(LinearModel(), torch.randn(2, 3, 8, 8))


# ------------------------------------------------------------------------------------ any output format
class _DictOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.inner(x), "features": x.flatten(1)}


class _TupleOutput(_DictOutput):
    def forward(self, x: torch.Tensor) -> tuple:
        return self.inner(x), x.flatten(1)


class _HFOutput(_DictOutput):
    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits
            self.hidden_states = None

    def forward(self, x: torch.Tensor) -> Output:
        return self.Output(self.inner(x))


def test_select_scores_reads_logits_from_dict_tuple_and_objects():
    logits = torch.arange(12.0).view(3, 4)
    expected = select_scores(logits, 2)
    for output in ({"logits": logits, "loss": torch.tensor(0.0)}, (logits, None), _HFOutput.Output(logits)):
        torch.testing.assert_close(select_scores(output, 2), expected)
        torch.testing.assert_close(select_scores(output, lambda y: y[:, 1] - y[:, 0]), logits[:, 1] - logits[:, 0])
    with pytest.raises(TypeError, match="cannot read logits"):
        select_scores({"a": 1, "b": 2}, 0)


@pytest.mark.parametrize("wrapper", [_DictOutput, _TupleOutput, _HFOutput])
@pytest.mark.parametrize("name", ["saliency", "integrated_gradients", "gradcam", "scorecam", "occlusion", "lrp"])
def test_attributors_explain_models_returning_dicts_tuples_and_logits_objects(wrapper, name):
    """Any output format: the same explanation as for the bare model (a tensor of logits)."""
    from lightning_xai.attribution.lrp import LRP

    bare = GapCNN().eval()
    wrapped = wrapper(bare).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"gradcam": {"layer": "features"}, "scorecam": {"layer": "features"}, "occlusion": {"window": 4}}
    method = LRP("epsilon") if name == "lrp" else build_attributor({"name": name, **kwargs.get(name, {})})
    if name in ("gradcam", "scorecam"):  # the layer's dotted name inside the wrapper
        method.layer = "inner.features"
    expected = (LRP("epsilon") if name == "lrp" else build_attributor({"name": name, **kwargs.get(name, {})}))(
        bare, x, torch.tensor([1, 3])
    )
    torch.testing.assert_close(method(wrapped, x, torch.tensor([1, 3])), expected)


# ------------------------------------------------------------------------------------------ torch.compile
class _FakeOptimizedModule(nn.Module):
    """Mimics torch._dynamo's OptimizedModule: the original module under ``_orig_mod``."""

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self._orig_mod = mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


def test_layer_names_resolve_through_a_compiled_wrapper():
    model = GapCNN().eval()
    wrapped = _FakeOptimizedModule(model)
    name, module = resolve_layer(wrapped, "features")
    assert (name, module) == ("features", model.features)
    assert resolve_layer(wrapped, "_orig_mod.features.0")[1] is model.features[0]
    assert resolve_layer(wrapped, model.features)[0] == "features"
    assert default_layer(wrapped, torch.rand(1, 3, 8, 8)) == default_layer(model, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="close matches"):
        resolve_layer(wrapped, "featurez")
    from lightning_xai.attribution import GradCAM

    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(GradCAM(layer="features")(wrapped, x, 1), GradCAM(layer="features")(model, x, 1))


def test_gradcam_by_layer_name_on_a_torch_compiled_model():
    """Issue 19.12: GradCAM(layer="features") on torch.compile(model) (the "eager" backend: a real
    OptimizedModule without a C++ toolchain; inductor takes about a minute on CPU)."""
    from lightning_xai.attribution import GradCAM, IntegratedGradients

    model = GapCNN().eval()
    try:
        compiled = torch.compile(model, backend="eager")
    except Exception as err:  # pragma: no cover - torch.compile unavailable on this platform
        pytest.skip(f"torch.compile is not available here: {type(err).__name__}: {err}")
    assert hasattr(compiled, "_orig_mod") and compiled is not model
    x = torch.rand(2, 3, 8, 8)
    before = snapshot(model)
    torch.testing.assert_close(GradCAM(layer="features")(compiled, x, 1), GradCAM(layer="features")(model, x, 1))
    torch.testing.assert_close(IntegratedGradients(steps=4)(compiled, x, 1), IntegratedGradients(steps=4)(model, x, 1))
    assert_unchanged(model, before)
