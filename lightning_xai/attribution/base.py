"""The Attributor contract shared by every attribution method.

An attributor is a *configured, model-independent* callable: it is built from its hyper-parameters alone (so a
YAML file can name it before any model exists) and applied as ``attributor(model, inputs, target)``. It returns
raw, signed attributions at input resolution, ``Tensor[B, 1, H, W]`` (or ``[B, C, H, W]`` for per-channel
methods), detached, on the inputs' device.

Every attributor keeps these promises (see ``docs/architecture.md``):

* **No side effects.** The model is explained in eval mode; afterwards every submodule's ``training`` flag,
  every parameter's ``requires_grad`` and ``.grad`` are exactly as before, and every hook the method installed
  is removed - also when the method raises. Gradients are taken with :func:`torch.autograd.grad` with respect
  to inputs or activations, never accumulated into parameters.
* **Works anywhere.** Inside Lightning's ``no_grad`` (``trainer.fit`` validation) and ``inference_mode``
  (``trainer.validate``) contexts: inputs are cloned inside ``torch.inference_mode(False)`` and
  ``torch.enable_grad()``.
* **Bounded memory.** Multi-step methods evaluate the model in chunks of ``batch_size`` inputs
  (:func:`chunk_slices`), never all at once and never one at a time.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor, nn

from lightning_xai.batch import read_logits

#: What to explain: a class index for the whole batch, a ``LongTensor[B]`` of class indices, or a callable
#: mapping the model output to one score per sample (``output -> Tensor[B]``), e.g. ``lambda y: y[:, a] - y[:, b]``
#: for "why a and not b".
Target = int | Tensor | Callable[[Tensor], Tensor]

_T = TypeVar("_T")

__all__ = [
    "ATTRIBUTORS",
    "Attributor",
    "Target",
    "build_attributor",
    "chunk_slices",
    "gradient_context",
    "model_device",
    "model_logits",
    "model_state_guard",
    "select_scores",
    "unwrap_compiled",
    "validate_image_batch",
]


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``'d model (``OptimizedModule._orig_mod``, also nested), else
    ``model`` itself.

    Attributors explain the original module, eagerly: its submodules keep their dotted names (``"features"``,
    not ``"_orig_mod.features"``), hooks fire as written, and no recompilation is triggered by the hooks an
    explanation installs. The compiled wrapper shares the original's parameters, so the explanation is that of
    the same function.
    """
    seen = 0
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and seen < 8:
        model = model._orig_mod
        seen += 1
    return model


def validate_target(target: Target, batch_size: int, num_outputs: int | None) -> None:
    """Check ``target`` against the batch size and the number of model outputs; raise a clear error."""
    if isinstance(target, bool):
        raise TypeError(f"target must be an int, a LongTensor[B] or a callable, got bool {target!r}")
    if isinstance(target, int):
        if num_outputs is not None and not 0 <= target < num_outputs:
            raise ValueError(
                f"target class {target} is out of range: the model has {num_outputs} outputs "
                f"(valid targets 0..{num_outputs - 1})"
            )
        return
    if isinstance(target, Tensor):
        if target.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16) or target.is_complex():
            raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
        if target.ndim == 0:
            validate_target(int(target), batch_size, num_outputs)
            return
        if target.ndim != 1 or target.shape[0] != batch_size:
            raise ValueError(
                f"a target tensor must have shape [B] = [{batch_size}] (one class index per sample), "
                f"got shape {list(target.shape)}"
            )
        if num_outputs is not None and target.numel() > 0:
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= num_outputs:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"target class {bad} is out of range: the model has {num_outputs} outputs "
                    f"(valid targets 0..{num_outputs - 1})"
                )
        return
    if callable(target):
        return
    raise TypeError(
        f"target must be an int, a LongTensor[B] of class indices or a callable output -> Tensor[B], "
        f"got {type(target).__name__}"
    )


def model_logits(output: object) -> Tensor:
    """The logits tensor of a model output: a tensor as it is; a dict, tuple or object with ``.logits`` through
    :func:`lightning_xai.batch.read_logits`. For methods that need the whole output, not one score."""
    if isinstance(output, Tensor):
        return output
    try:
        return read_logits(output)
    except ValueError as err:
        raise TypeError(
            f"cannot read logits from the model output ({type(output).__name__}): {err}; return a Tensor, a "
            "dict with a 'logits' key, a tuple (logits, ...) or an object with .logits"
        ) from err


def select_scores(output: object, target: Target) -> Tensor:
    """Reduce the model output to the one score per sample that is explained, ``Tensor[B]``.

    ``output`` is the model's output: a tensor ``[B, C]`` (or any shape, when ``target`` is a callable), or any
    format :func:`lightning_xai.batch.read_logits` reads - a dict with a ``"logits"`` key, a tuple whose first
    element is the logits, an object with ``.logits`` (HuggingFace). The logits are read first, so a callable
    target always receives the logits tensor.
    """
    output = model_logits(output)
    batch = output.shape[0]
    if callable(target):
        scores = target(output)
        if not isinstance(scores, Tensor) or scores.shape != (batch,):
            shape = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"a callable target must return Tensor[B] = [{batch}], got {shape}")
        return scores
    if output.ndim != 2:
        raise ValueError(
            f"an int or tensor target needs a model output of shape [B, num_classes], got {list(output.shape)}; "
            "use a callable target for other outputs"
        )
    validate_target(target, batch, output.shape[1])
    if isinstance(target, Tensor) and target.ndim == 1:
        return output.gather(1, target.to(output.device).long().view(-1, 1)).squeeze(1)
    return output[:, int(target)]


def validate_image_batch(inputs: Tensor, method: str, *, image: bool = True) -> None:
    """Raise a clear error for inputs an attributor cannot explain (not a tensor, not floating, wrong rank)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{method}: inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"{method}: inputs must be a floating-point tensor, got dtype {inputs.dtype}")
    if image and inputs.ndim != 4:
        raise ValueError(f"{method} explains image batches of shape [B, C, H, W]; got shape {list(inputs.shape)}")
    if inputs.ndim < 2:
        raise ValueError(f"{method}: inputs need a batch dimension, got shape {list(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError(f"{method}: got an empty batch")


@contextlib.contextmanager
def gradient_context() -> Iterator[None]:
    """Enable autograd even inside ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without either."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def model_state_guard(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration and restore every side effect afterwards.

    Restored on exit (also on error): each submodule's ``training`` flag, each parameter's ``requires_grad``
    and its ``.grad`` (the very same tensor object, or ``None``).
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, req, grad in params:
            if p.requires_grad != req:
                p.requires_grad_(req)
            if p.grad is not grad:
                p.grad = grad


def chunk_slices(total: int, batch_size: int) -> Iterator[slice]:
    """Yield consecutive slices of at most ``batch_size`` over ``range(total)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, total, batch_size):
        yield slice(start, min(start + batch_size, total))


def input_gradient(scores: Tensor, inputs: Tensor, *, create_graph: bool = False) -> Tensor:
    """``d sum(scores) / d inputs`` with a clear error when the score does not depend on the input."""
    if not scores.requires_grad:
        raise ValueError(
            "the explained score does not depend differentiably on the input (the model has no gradient path "
            "from input to output: is it detached, quantised or computed under torch.no_grad() inside forward?)"
        )
    (grad,) = torch.autograd.grad(scores.sum(), inputs, allow_unused=True, create_graph=create_graph)
    if grad is None:
        raise ValueError("the explained score does not depend on the input: there is no gradient path to it")
    return grad


#: Every attributor class with a ``name``, by that name (filled in as the classes are defined).
ATTRIBUTORS: dict[str, type[Attributor]] = {}


def build_attributor(spec: Attributor | str | dict) -> Attributor:
    """Build an attributor from an instance (returned as is), a registered name (``"gradcam"``, with default
    arguments) or a dict ``{"name": "integrated_gradients", "steps": 32, ...}``."""
    if isinstance(spec, Attributor):
        return spec
    kwargs: dict = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        if "name" not in kwargs:
            raise ValueError(f"an attributor dict needs a 'name' key, got keys {sorted(kwargs)}")
        spec = kwargs.pop("name")
    if not isinstance(spec, str):
        raise TypeError(f"an attributor is given as an Attributor, a name or a dict, got {type(spec).__name__}")
    key = spec.lower().replace("-", "_")
    if key not in ATTRIBUTORS:
        close = difflib.get_close_matches(key, list(ATTRIBUTORS), n=3, cutoff=0.4)
        raise ValueError(f"unknown attributor {spec!r}; did you mean {close}? valid names: {sorted(ATTRIBUTORS)}")
    return ATTRIBUTORS[key](**kwargs)


class Attributor(abc.ABC):
    """Base class of all attribution methods; subclasses implement :meth:`attribute`.

    ``__call__`` validates the input, enters the no-side-effect context (eval mode, state restored, autograd
    enabled even under ``no_grad`` / ``inference_mode``), clones the inputs into a fresh autograd leaf that
    requires grad, and returns the detached result of :meth:`attribute`.
    """

    #: Registry name used by callbacks and YAML configs (``"saliency"``, ``"gradcam"``, ...). A subclass that
    #: sets it is registered in :data:`ATTRIBUTORS` and can be built by name with :func:`build_attributor`.
    name: str = ""
    #: Whether the method needs 4-D image input ``[B, C, H, W]``.
    requires_image: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name", "")
        if name:
            if name in ATTRIBUTORS and ATTRIBUTORS[name] is not cls:
                raise RuntimeError(f"attributor name {name!r} is registered twice ({ATTRIBUTORS[name]} and {cls})")
            ATTRIBUTORS[name] = cls

    def __call__(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        return self.run_in_context(model, inputs, target, self.attribute).detach()

    def run_in_context(
        self, model: nn.Module, inputs: Tensor, target: Target, fn: Callable[[nn.Module, Tensor, Target], _T]
    ) -> _T:
        """Run ``fn(model, inputs_leaf, target)`` with the checks and the no-side-effect context of ``__call__``.

        For public methods that return more than one tensor (e.g. ``IntegratedGradients.attribute_with_gap``);
        such callers detach their results themselves.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}")
        validate_image_batch(inputs, type(self).__name__, image=self.requires_image)
        if not callable(target):
            validate_target(target, inputs.shape[0], None)
        model = unwrap_compiled(model)
        with model_state_guard(model), gradient_context():
            x = inputs.detach().clone().requires_grad_(True)
            if isinstance(target, Tensor):  # an inference-mode tensor cannot be saved for backward: copy it
                target = target.detach().clone()
            return fn(model, x, target)

    @abc.abstractmethod
    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        """Compute the attribution. Called in eval mode with autograd enabled and ``inputs`` a fresh leaf
        that requires grad. Must remove its own hooks (use the context managers of
        :mod:`lightning_xai.attribution.layers`) and must not write parameter gradients."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
