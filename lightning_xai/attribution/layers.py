"""Naming layers and capturing their activations without side effects.

Layers are named by dotted path as in ``model.named_modules()`` (``"layer4.1.conv2"``) or passed as modules.
Every hook is installed by a context manager and removed in ``finally``.

Two traps are handled here once for every layer-based method:

* **In-place operations after the layer** (``ReLU(inplace=True)``, ``out += identity`` in torchvision's
  ``BasicBlock``) would overwrite the captured activation. The forward hook stores the layer's output and hands
  a *clone* downstream, so the stored tensor stays the exact, unmodified node that the gradient is taken at.
* **Compiled models** (``torch.compile``) are seen through to their original module (``_orig_mod``), so
  ``GradCAM(layer="features")`` works on ``torch.compile(model)`` as on ``model``.
* **Modules called more than once** (torchvision ResNet blocks reuse one ``relu``): every call is recorded;
  methods use the **last** call by default, the one closest to the output, which for a block's shared ``relu``
  is the block output.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import model_state_guard, unwrap_compiled

__all__ = [
    "LayerCapture",
    "StopForward",
    "capture_layer",
    "default_layer",
    "forward_until_stopped",
    "module_calls",
    "resolve_layer",
    "stop_after_calls",
]


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for ``layer`` given by name or as a submodule of ``model``.

    Raises ``ValueError`` naming the closest valid names when the name does not exist, and when a module is
    passed that is not part of ``model``. A ``torch.compile``'d model is seen through: names are those of the
    original module (``"features"``, as in ``model._orig_mod.named_modules()``), and the ``"_orig_mod."``
    prefix of the wrapper's own names is accepted too.
    """
    original = unwrap_compiled(model)
    if original is not model:
        if isinstance(layer, str):
            while layer.startswith("_orig_mod."):
                layer = layer[len("_orig_mod.") :]
        model = original
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise ValueError(f"the given {type(layer).__name__} module is not a submodule of {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted module name or an nn.Module, got {type(layer).__name__}")
    if layer in modules:
        return layer, modules[layer]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    hint = f"close matches: {close}" if close else f"valid names include: {names[:12]}"
    raise ValueError(f"layer {layer!r} not found in {type(model).__name__}; {hint}")


@dataclass
class LayerCapture:
    """Activations recorded by :func:`capture_layer`, one entry per call of the module in the forward pass."""

    name: str
    module: nn.Module
    outputs: list[Tensor] = field(default_factory=list)

    @property
    def activation(self) -> Tensor:
        """The output of the module's last call (see the module docstring)."""
        if not self.outputs:
            raise ValueError(f"layer {self.name!r} was not called in the forward pass; pick a layer the model uses")
        return self.outputs[-1]

    def clear(self) -> None:
        self.outputs.clear()


@contextlib.contextmanager
def capture_layer(model: nn.Module, layer: str | nn.Module, *, clone_output: bool = True) -> Iterator[LayerCapture]:
    """Record the output of ``layer`` on every forward call while the context is open.

    With ``clone_output`` (the default), downstream modules receive a clone, so in-place operations after the
    layer cannot change the recorded tensor. The hook is removed on exit, also on error.
    """
    name, module = resolve_layer(model, layer)
    capture = LayerCapture(name, module)

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer {name!r} returns {type(output).__name__}, not a Tensor; choose a layer with a tensor output"
            )
        capture.outputs.append(output)
        return output.clone() if clone_output else None

    handle = module.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


class StopForward(BaseException):
    """Raised to end a forward pass early once the part of the network that is needed has run. A
    ``BaseException`` so that a model's own ``except Exception`` cannot swallow it; :func:`forward_until_stopped`
    catches it."""


@contextlib.contextmanager
def stop_after_calls(module: nn.Module, calls: int) -> Iterator[None]:
    """Within the block, a forward pass stops (:class:`StopForward`) right after ``module``'s ``calls``-th call
    counted from the block's start; the hook is removed on exit, also on error."""
    count = 0

    def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        nonlocal count
        count += 1
        if count >= calls:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def forward_until_stopped(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)``, or ``None`` when a hook ended the pass early with :class:`StopForward`."""
    try:
        return model(*args, **kwargs)
    except StopForward:
        return None


def module_calls(
    model: nn.Module, inputs: Tensor, modules: Iterable[tuple[str, nn.Module]]
) -> list[tuple[str, tuple[int, ...] | None]]:
    """Every call of ``modules`` (``(name, module)`` pairs) in one forward pass of the first sample, in execution
    order: ``(name, output shape)``, the shape ``None`` for an output that is not a tensor.

    The pass runs under ``torch.no_grad()`` in eval mode (:func:`model_state_guard`); hooks are removed afterwards,
    also when the model raises.
    """
    calls: list[tuple[str, tuple[int, ...] | None]] = []

    def make_hook(name: str):
        def hook(_m: nn.Module, _i: tuple, output: object) -> None:
            calls.append((name, tuple(output.shape) if isinstance(output, Tensor) else None))

        return hook

    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        with model_state_guard(model), torch.no_grad():
            model(inputs[:1])
    finally:
        for h in handles:
            h.remove()
    return calls


def default_layer(model: nn.Module, inputs: Tensor) -> str:
    """The conventional CAM layer: the last module (in execution order) whose output is a 4-D feature map
    with more than one spatial position - e.g. ``"layer4"`` of a torchvision ResNet.

    Found with one forward pass of a single sample under ``torch.no_grad()`` (:func:`module_calls`).
    """
    model = unwrap_compiled(model)
    calls = module_calls(model, inputs, ((name, m) for name, m in model.named_modules() if name))
    order = [(name, shape) for name, shape in calls if shape is not None and len(shape) == 4]
    spatial = [name for name, shape in order if shape[2] * shape[3] > 1]
    candidates = spatial or [name for name, _ in order]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no submodule with a 4-D output [B, C, H, W]; pass `layer=` explicitly"
        )
    return candidates[-1]
