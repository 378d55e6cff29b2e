"""The Attributor contract, generated from the registry: every registered attributor is checked the same way.

For every name in :data:`lightning_xai.attribution.ATTRIBUTORS` (with small constructor arguments from
:data:`CASES`):

* no side effects (train/eval modes, ``requires_grad``, parameter ``.grad``, parameters, hooks), also when the
  model raises in the middle of its forward pass - at the first forward call and at a later one;
* the same result under ``torch.no_grad()`` and ``torch.inference_mode()``;
* no forward call sees more than ``batch_size`` inputs (for methods that take a ``batch_size``);
* the output shape ``[B, 1 or C, H, W]``, finite;
* models returning a dict, a tuple or an object with ``.logits`` give the same result as returning the logits;
* one vocabulary, through signature introspection: ``num_samples`` and ``baseline``, never the names they
  replaced (``samples``, ``n_samples``, ``n_masks``, ``fill``), whose deprecation aliases still work.

A newly registered attributor needs an entry in :data:`CASES` (the coverage test names the missing ones).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import GapCNN, assert_unchanged, put_in_train_mode_with_grads, snapshot
from torch import nn

import lightning_xai.attribution  # noqa: F401  (registers every attributor the package exports)
from lightning_xai.attribution.arguments import DEPRECATED_NAMES
from lightning_xai.attribution.base import ATTRIBUTORS, Attributor, build_attributor
from lightning_xai.attribution.pattern import fit_patterns

SIZE = 12
BATCH = 4  # larger than every configured batch_size, so chunking is exercised
CHUNK = 3


class ContractModel(GapCNN):
    """GapCNN (in-place ReLUs, BatchNorm, dropout) whose output format is configurable and that can raise in the
    middle of its forward pass (after ``features`` ran, so hooks on it have fired) at a chosen call."""

    def __init__(self) -> None:
        super().__init__(num_classes=4, channels=6)
        self.output_format = "tensor"
        self.fail_on_call: int | None = None
        self.calls = 0
        with torch.no_grad():  # non-trivial running statistics: BatchNorm folding matters
            bn = self.features[3]
            bn.running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(1))
            bn.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))

    def forward(self, x: torch.Tensor):
        self.calls += 1
        h = self.features(x)
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("injected failure in the middle of forward")
        logits = self.head(self.dropout(self.pool(h).flatten(1)))
        if self.output_format == "dict":
            return {"logits": logits, "features": h}
        if self.output_format == "tuple":
            return logits, h
        if self.output_format == "object":
            return _Output(logits)
        return logits


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


@dataclass
class Case:
    """How to build an attributor for the contract model: ``make(model)`` (the model, for methods fitted to it)."""

    make: Callable[[nn.Module], Attributor]


def _inputs(batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _patterns(model: nn.Module):
    data = [_inputs(8, seed) for seed in (10, 11, 12)]
    return fit_patterns(model, data)


def _named(name: str, **kwargs) -> Case:
    return Case(lambda _model, n=name, k=kwargs: build_attributor({"name": n, **k}))


REFERENCE = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))

CASES: dict[str, Case] = {
    "saliency": _named("saliency"),
    "input_x_gradient": _named("input_x_gradient"),
    "integrated_gradients": _named("integrated_gradients", steps=5, batch_size=CHUNK),
    "smoothgrad": _named("smoothgrad", num_samples=4, batch_size=CHUNK),
    "cam": _named("cam", layer="features"),
    "gradcam": _named("gradcam", layer="features"),
    "gradcam_plus_plus": _named("gradcam_plus_plus", layer="features"),
    "layercam": _named("layercam", layer="features"),
    "scorecam": _named("scorecam", layer="features", batch_size=CHUNK),
    "guided_backprop": _named("guided_backprop"),
    "deconvnet": _named("deconvnet"),
    "guided_gradcam": _named("guided_gradcam", layer="features"),
    "lrp": _named("lrp"),
    "lrp_epsilon": _named("lrp_epsilon"),
    "lrp_epsilon_plus": _named("lrp_epsilon_plus"),
    "lrp_epsilon_plus_flat": _named("lrp_epsilon_plus_flat"),
    "lrp_epsilon_gamma_box": _named("lrp_epsilon_gamma_box"),
    "lrp_epsilon_alpha2_beta1": _named("lrp_epsilon_alpha2_beta1"),
    "patternnet": Case(lambda model: ATTRIBUTORS["patternnet"](_patterns(model))),
    "pattern_attribution": Case(lambda model: ATTRIBUTORS["pattern_attribution"](_patterns(model), "two_component")),
    "occlusion": _named("occlusion", window=4, stride=4, batch_size=CHUNK),
    "rise": _named("rise", num_samples=6, grid=3, batch_size=CHUNK),
    "lime": _named("lime", num_samples=8, grid=3, batch_size=CHUNK),
    "kernel_shap": _named("kernel_shap", num_samples=8, grid=3, batch_size=CHUNK),
    "meaningful_perturbation": _named("meaningful_perturbation", mask_size=4, iterations=3, batch_size=CHUNK),
    "prediction_difference": _named(
        "prediction_difference", window=4, stride=4, padding=1, num_samples=2, reference=REFERENCE, batch_size=CHUNK
    ),
    "cem_pp": _named("cem_pp", c_steps=1, max_iterations=3, batch_size=CHUNK),
    "cem_pn": _named("cem_pn", c_steps=1, max_iterations=3, batch_size=CHUNK),
}

NAMES = sorted(ATTRIBUTORS)
COVERED = [name for name in NAMES if name in CASES]
#: Methods that need attention modules or token-id inputs, which the image model above has not: the same contract
#: is tested on transformer and token models in tests/test_transformers.py and tests/test_tokens.py.
TRANSFORMER_METHODS = {
    "attention_rollout",
    "transformer_attribution",
    "attnlrp",
    "token_saliency",
    "token_input_x_gradient",
    "token_integrated_gradients",
    "token_occlusion",
    "token_lime",
    "token_kernel_shap",
}


def _build(name: str, model: nn.Module) -> Attributor:
    return CASES[name].make(model)


def _run(attributor: Attributor, model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # e.g. CEM: "no pertinent negative found" is fine here
        return attributor(model, x, target)


@pytest.fixture
def model() -> ContractModel:
    torch.manual_seed(0)
    return ContractModel().eval()


def test_every_registered_attributor_has_a_contract_case():
    missing = [name for name in NAMES if name not in CASES and name not in TRANSFORMER_METHODS]
    assert not missing, f"add a Case for these registered attributors to tests/test_attributor_contract.py: {missing}"


@pytest.mark.parametrize("name", COVERED)
def test_no_side_effects_also_when_the_model_raises_mid_forward(name, model):
    attributor = _build(name, model)
    put_in_train_mode_with_grads(model)
    before = snapshot(model)
    x = _inputs()
    model.calls = 0
    result = _run(attributor, model, x, torch.tensor([0, 1, 2, 3]))
    calls = model.calls
    assert_unchanged(model, before)
    assert result.shape[0] == BATCH and tuple(result.shape[2:]) == (SIZE, SIZE), list(result.shape)
    assert result.shape[1] in (1, 3), list(result.shape)
    assert torch.isfinite(result).all()
    assert not result.requires_grad
    for call in sorted({1, max(1, calls // 2), calls}):  # the first, a middle and the last forward call
        model.calls, model.fail_on_call = 0, call
        try:
            with pytest.raises(RuntimeError, match="injected failure"):
                _run(attributor, model, x, 1)
        finally:
            model.fail_on_call = None
        assert_unchanged(model, before)


@pytest.mark.parametrize("name", COVERED)
def test_same_result_under_no_grad_and_inference_mode(name, model):
    attributor = _build(name, model)
    x = _inputs()
    plain = _run(attributor, model, x, 2)
    with torch.no_grad():
        torch.testing.assert_close(_run(attributor, model, x, 2), plain)
    with torch.inference_mode():
        inference_x = x.clone()
        result = _run(attributor, model, inference_x, torch.full((BATCH,), 2))
    torch.testing.assert_close(result, plain)


@pytest.mark.parametrize("name", [n for n in COVERED if "batch_size" in inspect.signature(ATTRIBUTORS[n]).parameters])
def test_no_forward_call_sees_more_than_batch_size_inputs(name, model):
    attributor = _build(name, model)
    assert attributor.batch_size == CHUNK < BATCH
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        _run(attributor, model, _inputs(), 1)
    finally:
        handle.remove()
    assert sizes and max(sizes) <= CHUNK, sizes


@pytest.mark.parametrize("output_format", ["dict", "tuple", "object"])
@pytest.mark.parametrize("name", COVERED)
def test_models_returning_dicts_tuples_or_logits_objects(name, output_format, model):
    attributor = _build(name, model)
    x = _inputs()
    expected = _run(attributor, model, x, torch.tensor([3, 2, 1, 0]))
    model.output_format = output_format
    torch.testing.assert_close(_run(attributor, model, x, torch.tensor([3, 2, 1, 0])), expected)


@pytest.mark.parametrize("name", NAMES)
def test_one_vocabulary_with_deprecation_aliases(name):
    """``num_samples`` / ``baseline``, never the names they replaced; the old names still work and warn."""
    cls = ATTRIBUTORS[name]
    parameters = inspect.signature(cls).parameters
    old = sorted(set(parameters) & set(DEPRECATED_NAMES))
    assert not old, f"{cls.__name__} uses {old}; the library's names are {[DEPRECATED_NAMES[o] for o in old]}"
    renamed = getattr(cls.__init__, "__renamed_arguments__", {})
    for old_name, new_name in renamed.items():
        assert DEPRECATED_NAMES.get(old_name) == new_name and new_name in parameters
        case = CASES.get(name)
        value = {"num_samples": 5, "baseline": 0.25}[new_name]
        kwargs = dict(case.make.__defaults__[1]) if case and case.make.__defaults__ else {}
        kwargs.pop(new_name, None)
        with pytest.warns(DeprecationWarning, match=f"'{old_name}' is deprecated, use '{new_name}'"):
            built = cls(**kwargs, **{old_name: value})
        assert getattr(built, new_name) == value
