"""Receptive fields: which input pixels a position of a layer (or of a model's output) can see.

One module for every user of receptive fields (relevant-unit crops, ProtoPNet's prototype boxes):

* :func:`receptive_field` computes the field **exactly from the layer geometry** - kernel, stride, padding and
  dilation of every ``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d`` on the path, pointwise layers passing it through,
  residual sums and channel concatenations taking the union of their inputs' fields - by walking the
  ``torch.fx`` graph of the model up to the layer: the analysis of Araujo, Norris & Sim, "Computing Receptive
  Fields of Convolutional Neural Networks", Distill 2019. Position ``i`` of an axis sees input pixels
  ``lo + i * jump .. hi + i * jump`` (inclusive; they may lie outside the image, in the padding). Unlike
  "input size / layer size" this holds for unpadded and strided stacks whose sizes do not divide (a LeNet-like
  conv5-pool2-conv5-pool2 stack on 32 px has jump 4 and ``lo`` 0, not 6.4 and -4.8).
* When the model cannot be traced, or a layer on the path is one the analysis does not know, it falls back -
  with a warning - to :func:`measure_receptive_field`: the input-gradient support of two neighbouring central
  positions over several seeded random inputs (``exact=False``). A gradient support can be smaller than the
  true field (dead ReLUs, max-pooling), which is why it is only the fallback and the check.

Pure torch, no Lightning import; eval mode, every hook removed and the model's state restored.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.base import gradient_context, model_device, model_state_guard
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.checks import check_choice, check_int

__all__ = ["ReceptiveField", "crop_receptive_fields", "measure_receptive_field", "receptive_field"]

#: Side of the random probe images of the gradient estimate when no input shape is given.
PROBE_SIZE = 64


@dataclass(frozen=True)
class ReceptiveField:
    """Where a position of a layer looks in the input.

    Position ``(row, col)`` sees input rows ``lo[0] + row * jump[0] .. hi[0] + row * jump[0]`` and columns
    likewise (inclusive; may reach outside the image, into the padding).

    Attributes:
        lo, hi: ``(rows, cols)`` offsets of the first and last pixel seen by position ``(0, 0)``.
        jump: input pixels between neighbouring positions, ``(rows, cols)``.
        exact: ``True`` when computed from the layer geometry, ``False`` when estimated from gradients.
        layer: the layer's dotted name (``""`` = the model's output).
        input_size, layer_size: ``(H, W)`` of the input and of the layer's map, when an input shape was given.
        spatial: ``False`` for a layer without a spatial map (e.g. a linear layer): every unit sees the whole
            image.
    """

    lo: tuple[int, int]
    hi: tuple[int, int]
    jump: tuple[int, int]
    exact: bool = True
    layer: str = ""
    input_size: tuple[int, int] | None = None
    layer_size: tuple[int, int] | None = None
    spatial: bool = True

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the (unclipped) field in pixels."""
        return (self.hi[0] - self.lo[0] + 1, self.hi[1] - self.lo[1] + 1)

    @property
    def stride(self) -> tuple[float, float]:
        """``jump`` as floats (the name used by relevant units)."""
        return (float(self.jump[0]), float(self.jump[1]))

    @property
    def origin(self) -> tuple[float, float]:
        """Top-left input pixel seen by position ``(0, 0)`` (``lo`` as floats; negative = padding)."""
        return (float(self.lo[0]), float(self.lo[1]))

    @property
    def clipped(self) -> bool:
        """Whether the field is larger than the input along an axis (no crop can show all of it: crops then
        show the whole image). Always ``True`` for a non-spatial layer; ``False`` when the input size is
        unknown."""
        if not self.spatial:
            return True
        if self.input_size is None:
            return False
        return self.size[0] > self.input_size[0] or self.size[1] > self.input_size[1]

    def box(self, row: int, col: int, image_size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of position ``(row, col)``, bottom / right exclusive. Without
        ``image_size`` the box may leave the image; with it, it is clipped to the image, so that the crop is
        ``image[:, top:bottom, left:right]``."""
        top, left = self.lo[0] + row * self.jump[0], self.lo[1] + col * self.jump[1]
        bottom, right = self.hi[0] + row * self.jump[0] + 1, self.hi[1] + col * self.jump[1] + 1
        if image_size is None:
            return top, left, bottom, right
        height, width = image_size
        return max(0, top), max(0, left), min(height, bottom), min(width, right)


# ------------------------------------------------------------------------------------------------ exact analysis

# (lo, hi, jump) per spatial axis
_Field = tuple[tuple[int, int, int], tuple[int, int, int]]
_IDENTITY: _Field = ((0, 0, 1), (0, 0, 1))

_POINTWISE_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
_POINTWISE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.cat,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.sigmoid,
    F.dropout,
}
_POINTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _sliding(field: _Field, kernel: Any, stride: Any, padding: Any, dilation: Any) -> _Field:
    """Compose ``field`` with a sliding window: output unit ``i`` reads input units ``i*s - p .. i*s - p + k' - 1``."""
    kernel, dilation = _pair(kernel), _pair(dilation)
    stride = _pair(kernel if stride is None else stride)
    if isinstance(padding, str):  # Conv2d: "valid" or "same" (left padding = total // 2)
        padding = (0, 0) if padding == "valid" else tuple(((k - 1) * d) // 2 for k, d in zip(kernel, dilation))
    padding = _pair(padding)
    out = []
    for (lo, hi, jump), k, s, p, d in zip(field, kernel, stride, padding, dilation):
        span = (k - 1) * d  # extent of the dilated window minus one
        out.append((lo - p * jump, hi + (span - p) * jump, jump * s))
    return (out[0], out[1])


def _compose(outer: _Field, inner: _Field) -> _Field:
    """The field of a module with own field ``inner`` (relative to its input) applied after ``outer``."""
    out = []
    for (lo, hi, jump), (ilo, ihi, ijump) in zip(outer, inner):
        out.append((lo + ilo * jump, hi + ihi * jump, jump * ijump))
    return (out[0], out[1])


def _union(fields: list[_Field]) -> _Field:
    """Receptive field of a pointwise combination (residual add, channel concat): the union of the inputs'."""
    out = []
    for axis in range(2):
        jumps = {f[axis][2] for f in fields}
        if len(jumps) != 1:
            raise NotImplementedError(f"combining feature maps with different strides {sorted(jumps)}")
        out.append((min(f[axis][0] for f in fields), max(f[axis][1] for f in fields), jumps.pop()))
    return (out[0], out[1])


def _module_field(module: nn.Module, found: list[_Field], name: str) -> _Field:
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        return _sliding(found[0], module.kernel_size, module.stride, module.padding, module.dilation)
    if isinstance(module, nn.AvgPool2d):
        return _sliding(found[0], module.kernel_size, module.stride, module.padding, 1)
    if isinstance(module, _POINTWISE_MODULES):
        return _union(found)
    raise NotImplementedError(f"module {name!r} of type {type(module).__name__}")


def _traced_field(model: nn.Module, layer: str) -> _Field:
    """The field of ``layer``'s output (``""``: the model's output), walking the ``torch.fx`` graph; raises
    ``NotImplementedError`` (or a tracing error) for what it cannot follow on the path to the layer."""
    import torch.fx

    target = dict(model.named_modules())[layer] if layer else None

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return m is target or super().is_leaf_module(m, qualname)

    graph = (Tracer() if target is not None else torch.fx.Tracer()).trace(model)
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    if target is None:
        end = next(n for n in nodes if n.op == "output")
    else:
        calls = [n for n in nodes if n.op == "call_module" and n.target == layer]
        if not calls:
            raise NotImplementedError(f"layer {layer!r} is not called in the traced forward pass")
        if len(calls) > 1:
            raise NotImplementedError(f"layer {layer!r} is called {len(calls)} times; its field is ambiguous")
        end = calls[0]
    needed = _ancestors(end)
    first_input = next((n for n in nodes if n.op == "placeholder"), None)
    fields: dict[Any, _Field | None] = {}

    def inputs(node: Any) -> list[_Field]:
        found = []
        for arg in [*node.args, *node.kwargs.values()]:
            for item in arg if isinstance(arg, list | tuple) else (arg,):
                if isinstance(item, torch.fx.Node) and fields.get(item) is not None:
                    found.append(fields[item])  # type: ignore[arg-type]
        return found

    for node in nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            fields[node] = _IDENTITY if node is first_input else None
            continue
        found = inputs(node)
        if node.op in ("get_attr",) or not found:
            fields[node] = None
        elif node.op == "output":
            if len(found) != 1:
                raise NotImplementedError("the model must return one feature map")
            fields[node] = found[0]
        elif node.op == "call_module":
            sub = modules[node.target]
            if sub is target and list(sub.children()):  # a block: its own field, from its own graph
                fields[node] = _compose(found[0], _traced_field(sub, ""))
            else:
                fields[node] = _module_field(sub, found, node.target)
        elif node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS:
            fields[node] = _union(found)
        elif node.op == "call_function" and node.target is getattr:
            fields[node] = None
        elif node.op == "call_method" and node.target in _POINTWISE_METHODS:
            fields[node] = _union(found)
        elif node.op == "call_method" and node.target in ("size", "dim"):
            fields[node] = None
        else:
            raise NotImplementedError(f"operation {node.op} {node.target!r}")
    result = fields.get(end)
    if result is None:
        raise NotImplementedError(f"the output of {layer or 'the model'!r} does not depend on the input")
    return result


def _ancestors(node: Any) -> set:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return seen


# ---------------------------------------------------------------------------------------------- measured fields


def measure_receptive_field(
    model: nn.Module,
    layer: str | nn.Module | None,
    input_shape: tuple[int, int, int],
    *,
    num_samples: int = 8,
    seed: int = 0,
) -> ReceptiveField:
    """Estimate the field of ``layer`` (``None``: the model's output) from input-gradient supports.

    For ``num_samples`` seeded noise inputs of shape ``(C, H, W)``, the channel sum of the layer's map at a
    central position and at its lower-right neighbour is differentiated with respect to the input; the bounding
    box of the pixels with a non-zero gradient (in any sample or channel) is that position's field, and the
    offset between the two boxes is the jump. Several inputs make paths closed by one input's ReLUs or max-pool
    choices count; the support can still be smaller than the exact field. ``exact=False``.
    """
    num_samples = check_int("num_samples", num_samples, minimum=1, owner="measure_receptive_field")
    c, h, w = _input_shape(input_shape)
    name = "" if layer is None else resolve_layer(model, layer)[0]
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    with model_state_guard(model), gradient_context():
        x = torch.randn(num_samples, c, h, w, generator=g).to(device).requires_grad_(True)
        act = _output_at(model, name, x)
        if not isinstance(act, Tensor) or act.ndim != 4:
            shape = list(act.shape) if isinstance(act, Tensor) else type(act).__name__
            where = name or "the output"
            raise ValueError(f"the receptive field needs a feature map [B, C, h, w] at {where}, got {shape}")
        lh, lw = (int(s) for s in act.shape[-2:])
        centre = (lh // 2, lw // 2)
        neighbour = (centre[0] + (lh > 1), centre[1] + (lw > 1))
        boxes = []
        for r, q in (centre, neighbour):
            (grad,) = torch.autograd.grad(act[:, :, r, q].sum(), x, retain_graph=True, allow_unused=True)
            if grad is None or not bool((grad != 0).any()):
                raise ValueError(f"{name or 'the output'!r} does not depend on the input through a gradient path")
            support = (grad != 0).any(dim=0).any(dim=0)
            ys = torch.nonzero(support.any(dim=1)).flatten()
            xs = torch.nonzero(support.any(dim=0)).flatten()
            boxes.append((r, q, int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())))
    r, q, top, bottom, left, right = boxes[0]
    jump = (
        max(1, boxes[1][2] - top) if lh > 1 else max(1, round(h / lh)),
        max(1, boxes[1][4] - left) if lw > 1 else max(1, round(w / lw)),
    )
    lo = (top - r * jump[0], left - q * jump[1])
    hi = (bottom - r * jump[0], right - q * jump[1])
    return ReceptiveField(lo, hi, jump, exact=False, layer=name, input_size=(h, w), layer_size=(lh, lw))


# ------------------------------------------------------------------------------------------------- entry points


def receptive_field(
    model: nn.Module,
    layer: str | nn.Module | None = None,
    input_shape: tuple[int, int, int] | None = None,
    *,
    in_channels: int | None = None,
    method: str = "auto",
    num_samples: int = 8,
    seed: int = 0,
) -> ReceptiveField:
    """The receptive field of the positions of ``layer`` (a dotted name or a module; ``None``: the model's
    output, e.g. a convolutional trunk).

    ``method="exact"`` computes it from the layer geometry (see the module docstring) and raises
    ``NotImplementedError`` where it cannot; ``"gradient"`` measures it (:func:`measure_receptive_field`);
    ``"auto"`` (default) is exact where possible and otherwise measures it with a ``UserWarning``.
    ``input_shape`` ``(C, H, W)`` fills ``input_size`` / ``layer_size`` (one forward pass) and is the shape of the
    gradient probes; without it the probes are ``(in_channels or 3, 64, 64)``.
    """
    method = check_choice("method", method, ("auto", "exact", "gradient"), owner="receptive_field")
    name = "" if layer is None else resolve_layer(model, layer)[0]
    if input_shape is not None:
        input_shape = _input_shape(input_shape)
    probe = input_shape or (3 if in_channels is None else int(in_channels), PROBE_SIZE, PROBE_SIZE)
    layer_size = _layer_size(model, name, input_shape) if input_shape is not None else None
    if input_shape is not None and layer_size is None:  # no spatial map: every unit sees the whole image
        h, w = input_shape[1], input_shape[2]
        return ReceptiveField((0, 0), (h - 1, w - 1), (h, w), exact=True, layer=name, input_size=(h, w),
                              layer_size=(1, 1), spatial=False)
    if method == "gradient":
        return measure_receptive_field(model, name or None, probe, num_samples=num_samples, seed=seed)
    try:
        field = _traced_field(model, name)
    except Exception as err:
        if method == "exact":
            raise NotImplementedError(f"receptive_field: cannot compute the field of {name or 'the output'!r} "
                                      f"exactly: {type(err).__name__}: {err}") from err
        warnings.warn(
            f"could not compute the receptive field of {name or 'the output'!r} exactly ({type(err).__name__}: "
            f"{err}); estimating it from gradients, so boxes and crops are approximate",
            stacklevel=2,
        )
        return measure_receptive_field(model, name or None, probe, num_samples=num_samples, seed=seed)
    (lo_h, hi_h, j_h), (lo_w, hi_w, j_w) = field
    return ReceptiveField(
        (lo_h, lo_w),
        (hi_h, hi_w),
        (j_h, j_w),
        exact=True,
        layer=name,
        input_size=None if input_shape is None else (input_shape[1], input_shape[2]),
        layer_size=layer_size,
    )


def crop_receptive_fields(images: Tensor, positions: Tensor, field: ReceptiveField) -> Tensor:
    """Crop each image ``[n, C, H, W]`` at the receptive field of its layer position ``positions [n, 2]``
    (``(row, col)``); parts outside the image are zero. Returns ``[n, C, field height, field width]``, or the
    whole images when the field is ``clipped`` (larger than the image)."""
    if field.clipped:
        return images.clone()
    n, c, h, w = images.shape
    fh, fw = field.size
    out = images.new_zeros(n, c, fh, fw)
    for i in range(n):
        top, left, bottom, right = field.box(int(positions[i, 0]), int(positions[i, 1]))
        t0, l0, b0, r0 = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
        if t0 < b0 and l0 < r0:
            out[i, :, t0 - top : b0 - top, l0 - left : r0 - left] = images[i, :, t0:b0, l0:r0]
    return out


def _input_shape(input_shape: Any) -> tuple[int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"receptive_field: input_shape must be (C, H, W) of positive integers, got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _output_at(model: nn.Module, name: str, x: Tensor) -> Any:
    """The output of layer ``name`` (its last call) on ``x``, or the model's output for ``name=""``."""
    if not name:
        return model(x)
    with capture_layer(model, name) as capture:
        model(x)
    return capture.activation


def _layer_size(model: nn.Module, name: str, input_shape: tuple[int, int, int]) -> tuple[int, int] | None:
    with model_state_guard(model), torch.no_grad():
        act = _output_at(model, name, torch.zeros(1, *input_shape, device=model_device(model)))
    return (int(act.shape[-2]), int(act.shape[-1])) if isinstance(act, Tensor) and act.ndim == 4 else None
