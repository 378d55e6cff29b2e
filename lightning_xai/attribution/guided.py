"""Modified-backward-pass attributors: Deconvnet, Guided Backpropagation and Guided Grad-CAM.

These methods compute the gradient of the target score with respect to the input, but with the backward pass
through every ReLU replaced by a rule (``x`` is the ReLU's input, ``g`` the gradient arriving from above):

============== ================================ =================================================
method         backward through ReLU             paper
============== ================================ =================================================
gradient       ``g * (x > 0)``                    (for comparison; :mod:`~.gradient`)
Deconvnet      ``relu(g)``                        Zeiler & Fergus, ECCV 2014
GuidedBackprop ``g * (x > 0) * (g > 0)``          Springenberg et al., ICLR workshop 2015
============== ================================ =================================================

**Which ReLUs are modified.** Only ``torch.nn.ReLU`` modules (and subclasses). While the attributor runs,
each such module's ``forward`` is temporarily replaced (an instance attribute, deleted again afterwards, also
on error) by a custom :class:`torch.autograd.Function` that computes the same forward value and applies the
rule in backward. This works for

* in-place ReLUs (``nn.ReLU(inplace=True)``): the replacement still modifies its input in place (marked dirty
  for autograd), so models that rely on the in-place side effect keep working - unlike full backward hooks,
  which torch refuses on in-place modules;
* modules called several times (torchvision's ``BasicBlock`` reuses one ``relu``): every call is modified;
* forward hooks that others registered on the ReLU modules: they still run.

Functional calls (``F.relu``, ``torch.relu``, ``x.clamp(min=0)``) and other activations (``ReLU6``,
``LeakyReLU``, ...) are **not** modified and back-propagate the plain gradient. A model without any
``nn.ReLU`` module, or whose ``nn.ReLU`` modules are never called, is rejected with a ``ValueError`` rather
than silently returning the plain gradient.

All three return per-channel attributions with the input's shape (``[B, C, H, W]`` for images), signed, raw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import Attributor, Target, input_gradient, select_scores

__all__ = ["RELU_RULES", "Deconvnet", "GuidedBackprop", "GuidedGradCAM", "modified_relu_backward"]

#: The backward rules :func:`modified_relu_backward` knows.
RELU_RULES = ("guided", "deconvnet")


class _GuidedReLU(torch.autograd.Function):
    """``relu(x)`` forward; ``relu(g) * (x > 0)`` backward (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool) -> Tensor:
        positive = x > 0
        if inplace:
            out = x.clamp_(min=0)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(min=0)
        ctx.save_for_backward(positive)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (positive,) = ctx.saved_tensors
        return grad.clamp(min=0) * positive, None


class _DeconvReLU(torch.autograd.Function):
    """``relu(x)`` forward; ``relu(g)`` backward (Zeiler & Fergus 2014): the forward mask is ignored."""

    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            out = x.clamp_(min=0)
            ctx.mark_dirty(x)
            return out
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.clamp(min=0), None


_FUNCTIONS = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}
_MISSING = object()


class ReLUCallCounter:
    """How often the modified ``nn.ReLU`` modules were called inside :func:`modified_relu_backward`."""

    def __init__(self, modules: int) -> None:
        self.modules = modules
        self.calls = 0


@contextlib.contextmanager
def modified_relu_backward(model: nn.Module, rule: str) -> Iterator[ReLUCallCounter]:
    """Replace the backward pass of every ``nn.ReLU`` module of ``model`` by ``rule`` for the duration.

    ``rule`` is ``"guided"`` (``relu(g) * (x > 0)``) or ``"deconvnet"`` (``relu(g)``). The forward values are
    unchanged. Each module's ``forward`` is shadowed by an instance attribute that is removed on exit (also on
    error), restoring a previously present instance attribute if there was one. Yields a counter of the
    modified modules' calls, so that callers can reject models whose ReLUs are all functional.
    """
    if rule not in _FUNCTIONS:
        raise ValueError(f"unknown ReLU backward rule {rule!r}; valid rules: {list(RELU_RULES)}")
    function = _FUNCTIONS[rule]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(
            f"{type(model).__name__} has no torch.nn.ReLU module: guided backprop and deconvnet modify the backward "
            "pass of nn.ReLU modules only (functional F.relu calls and other activations are not modified), so the "
            "result would be the plain gradient; use nn.ReLU modules or a gradient attributor"
        )
    counter = ReLUCallCounter(len(relus))
    saved: list[tuple[nn.ReLU, object]] = []

    def make_forward(module: nn.ReLU):
        def forward(input: Tensor) -> Tensor:
            counter.calls += 1
            return function.apply(input, bool(module.inplace))

        return forward

    try:
        for module in relus:
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = make_forward(module)
        yield counter
    finally:
        for module, previous in saved:
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


class _ModifiedReLUGradient(Attributor):
    """Gradient of the target score with the ReLU backward rule ``_rule`` (shared by the two methods below)."""

    _rule: str = ""

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        with modified_relu_backward(model, self._rule) as counter:
            scores = select_scores(model(inputs), target)
            if counter.calls == 0:
                raise ValueError(
                    f"none of the {counter.modules} nn.ReLU modules of {type(model).__name__} was called in the "
                    f"forward pass (functional F.relu calls are not modified), so {type(self).__name__} would return "
                    "the plain gradient; use nn.ReLU modules in forward or a gradient attributor"
                )
            return input_gradient(scores, inputs)


class Deconvnet(_ModifiedReLUGradient):
    """Deconvnet (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014).

    Back-propagates the target score with ``relu(g)`` through every ``nn.ReLU`` module: only positive signals
    pass, regardless of whether the unit was active in the forward pass. Returns ``Tensor`` of the input's shape
    (per channel, signed). See the module docstring for which ReLUs are modified.
    """

    name = "deconvnet"
    _rule = "deconvnet"


class GuidedBackprop(_ModifiedReLUGradient):
    """Guided backpropagation (Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for Simplicity: The All
    Convolutional Net", ICLR workshop 2015).

    Back-propagates the target score with ``g * (x > 0) * (g > 0)`` through every ``nn.ReLU`` module: the plain
    gradient's forward mask combined with the deconvnet's backward mask. Returns ``Tensor`` of the input's
    shape (per channel, signed). See the module docstring for which ReLUs are modified.
    """

    name = "guided_backprop"
    _rule = "guided"


class GuidedGradCAM(Attributor):
    """Guided Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017): the element-wise product of guided backpropagation (fine, per channel) and the
    Grad-CAM map of ``layer`` upsampled to the input (coarse, class-discriminative).

    Args:
        layer: the Grad-CAM layer, dotted name or module; ``None`` = Grad-CAM's default (the last 4-D feature
            map, e.g. ``"layer4"`` of a ResNet).

    Returns ``Tensor[B, C, H, W]``: ``guided_backprop[b, c, i, j] * gradcam[b, 0, i, j]``.
    """

    name = "guided_gradcam"
    requires_image = True

    def __init__(self, layer: str | nn.Module | None = None) -> None:
        if layer is not None and not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"layer must be a dotted module name, an nn.Module or None, got {type(layer).__name__}")
        self.layer = layer

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        from lightning_xai.attribution.cam import GradCAM

        cam = GradCAM(layer=self.layer)(model, inputs, target)  # plain gradients: before the ReLUs are modified
        guided = GuidedBackprop().attribute(model, inputs, target)
        return guided * cam.to(guided.dtype)
