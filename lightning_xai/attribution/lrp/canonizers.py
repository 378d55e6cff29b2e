"""Canonizers: reversible rewrites that put a model into a form LRP rules can explain.

LRP rules are defined for layers ``z = W x + b`` followed by element-wise activations. Two common structures
are not of that form, and explaining them as they are gives silently wrong relevance (e.g. Captum's LRP on
torchvision ResNets, which neither folds BatchNorm nor treats the residual sum):

* **BatchNorm** after a Linear/Conv layer is an affine map with its own scale and shift. Folding it into the
  layer before (``W' = W gamma / sqrt(var + eps)``, ``b' = (b - mean) gamma / sqrt(var + eps) + beta``, running
  statistics, hence eval mode only) gives one layer with the same output (Montavon et al., "Layer-Wise
  Relevance Propagation: An Overview", 2019; Guillemot et al., "Breaking Batch Normalization for better
  explainability of Deep Neural Networks through Layer-wise Relevance Propagation", 2020).
* **Residual sums** (``out += identity`` in torchvision's ``BasicBlock`` / ``Bottleneck``) are made explicit as
  a :class:`~.modules.ResidualAdd` module, whose rule splits the relevance of the sum between the branches in
  proportion to their contributions instead of giving each branch all of it.

A canonizer is configured without a model; ``handle = canonizer.apply(model)`` rewrites the model and
``handle.remove()`` restores it exactly (or use ``with canonizer.applied(model):`` / :func:`canonize`). The
rewrites never write to a parameter or buffer: a folded layer gets an instance-level ``forward`` that computes
with folded *copies* of its weight and bias, a folded BatchNorm an identity ``forward``, a block an explicit
``forward`` and a ``residual_add`` submodule; removing the handle deletes exactly these, so parameters,
``state_dict``, submodules and forward methods are as before. ``apply`` validates everything before it changes
anything and raises a ``ValueError`` naming the module for a model it cannot canonize (a BatchNorm that does
not directly follow a Linear/Conv layer, a BatchNorm in training mode, an unknown block type).
"""

from __future__ import annotations

import abc
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.attribution.lrp.modules import (
    EXPLAINED_LAYERS,
    FoldedAway,
    FoldedLayer,
    ResidualAdd,
    check_explainable,
)

__all__ = [
    "CANONIZERS",
    "BatchNormFolding",
    "Canonizer",
    "CanonizerHandle",
    "ResNetCanonizer",
    "auto_canonizers",
    "canonize",
    "is_folded",
]

_RESIDUAL_NAME = "residual_add"


class CanonizerHandle:
    """Undoes one :meth:`Canonizer.apply`; :meth:`remove` is idempotent."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


class _Edit(abc.ABC):
    @abc.abstractmethod
    def do(self) -> Callable[[], None]:
        """Make the change and return the function that undoes it."""


class _SetForward(_Edit):
    def __init__(self, module: nn.Module, forward: Callable[..., Tensor]) -> None:
        self.module, self.forward = module, forward

    def do(self) -> Callable[[], None]:
        module, missing = self.module, object()
        previous = module.__dict__.get("forward", missing)
        module.__dict__["forward"] = self.forward

        def undo() -> None:
            if previous is missing:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous

        return undo


class _AddModule(_Edit):
    def __init__(self, parent: nn.Module, name: str, child: nn.Module) -> None:
        self.parent, self.name, self.child = parent, name, child

    def do(self) -> Callable[[], None]:
        parent, name = self.parent, self.name
        parent.add_module(name, self.child)
        return lambda: parent._modules.pop(name, None)


class Canonizer(abc.ABC):
    """A reversible model rewrite, configured without a model (so a config file can name it)."""

    @abc.abstractmethod
    def plan(self, model: nn.Module) -> list[_Edit]:
        """Validate ``model`` and list the edits, changing nothing; raise ``ValueError`` if it cannot be done."""

    def apply(self, model: nn.Module) -> CanonizerHandle:
        """Rewrite ``model`` in place; the returned handle's ``remove()`` restores it exactly."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}")
        edits = self.plan(model)
        handle = CanonizerHandle()
        try:
            for edit in edits:
                handle._undo.append(edit.do())
        except BaseException:
            handle.remove()
            raise
        return handle

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with canonizer.applied(model): ...``: the model is canonized inside and restored on exit."""
        handle = self.apply(model)
        try:
            yield model
        finally:
            handle.remove()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


@contextlib.contextmanager
def canonize(model: nn.Module, canonizers: Sequence[Canonizer]) -> Iterator[nn.Module]:
    """Apply ``canonizers`` in order and undo them in reverse order on exit, also on error."""
    handles: list[CanonizerHandle] = []
    try:
        for canonizer in canonizers:
            handles.append(canonizer.apply(model))
        yield model
    finally:
        for handle in reversed(handles):
            handle.remove()


def is_folded(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm currently folded into the layer before it."""
    return isinstance(module.__dict__.get("forward"), FoldedAway)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------------------------

_Pair = tuple[str, nn.Module, str, nn.Module]


def _folded_parameters(layer: nn.Module, bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(layer(x))`` as one layer. The per-channel scale and bias are computed in float64
    (small vectors, on the CPU); the weight is scaled once in its own dtype, on its own device."""
    weight = layer.weight.detach()

    def vector(t: Tensor | None, fill: float) -> Tensor:
        return torch.full((bn.num_features,), fill, dtype=torch.float64) if t is None else t.detach().cpu().double()

    scale = vector(bn.weight, 1.0) / torch.sqrt(vector(bn.running_var, 1.0) + bn.eps)
    bias = (vector(layer.bias, 0.0) - vector(bn.running_mean, 0.0)) * scale + vector(bn.bias, 0.0)
    scale = scale.to(weight.device, weight.dtype).view(-1, *([1] * (weight.ndim - 1)))
    return weight * scale, bias.to(weight.device, weight.dtype)


def _fold_edits(pairs: Sequence[_Pair]) -> list[_Edit]:
    """Validate (layer, BatchNorm) pairs and return the edits that fold each BatchNorm into its layer."""
    edits: list[_Edit] = []
    seen_layers: dict[int, str] = {}
    seen_norms: dict[int, str] = {}
    for layer_name, layer, bn_name, bn in pairs:
        if not isinstance(bn, _BatchNorm):
            raise ValueError(
                f"cannot fold {bn_name!r}: it is a {type(bn).__name__}, not a BatchNorm; LRP has no rule for it"
            )
        if not isinstance(layer, EXPLAINED_LAYERS):
            raise ValueError(
                f"cannot fold BatchNorm {bn_name!r} into {layer_name!r}: that is a {type(layer).__name__}, not one "
                f"of {[t.__name__ for t in EXPLAINED_LAYERS]}"
            )
        if bn.training:
            raise ValueError(
                f"cannot fold BatchNorm {bn_name!r}: it is in training mode, where it normalises with batch "
                "statistics; folding uses the running statistics of eval mode (call model.eval())"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot fold BatchNorm {bn_name!r}: it has no running statistics (track_running_stats=False), so "
                "it normalises with batch statistics even in eval mode"
            )
        if "forward" in bn.__dict__:
            raise ValueError(f"cannot fold BatchNorm {bn_name!r}: it has a patched forward method (already folded?)")
        if "forward" in layer.__dict__:
            raise ValueError(f"cannot fold {bn_name!r} into {layer_name!r}: the layer's forward is already replaced")
        check_explainable(layer_name, layer)
        if layer.weight.shape[0] != bn.num_features:
            raise ValueError(
                f"cannot fold BatchNorm {bn_name!r} ({bn.num_features} features) into {layer_name!r} "
                f"({layer.weight.shape[0]} outputs)"
            )
        if id(layer) in seen_layers or id(bn) in seen_norms:
            raise ValueError(
                f"cannot fold {bn_name!r} into {layer_name!r}: the layer or the BatchNorm is part of another pair "
                f"({seen_layers.get(id(layer)) or seen_norms.get(id(bn))})"
            )
        seen_layers[id(layer)] = seen_norms[id(bn)] = f"{layer_name} -> {bn_name}"
        weight, bias = _folded_parameters(layer, bn)
        edits += [_SetForward(layer, FoldedLayer(layer, weight, bias)), _SetForward(bn, FoldedAway(layer))]
    return edits


def _hook_free_tracer() -> object:
    """A ``torch.fx`` tracer that never runs a module's hooks: non-leaf modules are traced through their
    ``forward`` directly (``Module.__call__`` would run forward hooks with proxies), leaf modules become graph
    nodes as usual (their hooks are not called either). So a model carrying hooks (a user's, ``wandb.watch``, a
    profiler's) is traced like the same model without them, and its hooks are neither run nor touched."""
    from torch import fx

    class HookFreeTracer(fx.Tracer):
        def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> object:
            return super().call_module(m, m.forward, args, kwargs)

    return HookFreeTracer()


def _describe(node: object, modules: dict[str, nn.Module]) -> str:
    from torch import fx

    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        return f"the output of {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"the result of {getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f"the result of .{node.target}()"
    return f"{node.op} {node.target!r}"


def _pairs_from_fx(model: nn.Module, graph: object, unfolded: list[tuple[str, nn.Module]]) -> list[_Pair]:
    """(layer, BatchNorm) pairs read from a torch.fx graph: each BatchNorm must be called once, directly on the
    output of a Linear/Conv layer that is called once and whose output nothing else uses."""
    modules = dict(model.named_modules())
    calls = [node for node in graph.nodes if node.op == "call_module"]
    counts = Counter(node.target for node in calls)
    pairs = []
    for name, bn in unfolded:
        nodes = [node for node in calls if node.target == name]
        if not nodes:
            continue  # never called: nothing to explain
        if len(nodes) > 1:
            raise ValueError(f"cannot fold BatchNorm {name!r}: it is called {len(nodes)} times in the forward pass")
        node = nodes[0]
        source = node.args[0] if node.args else node.kwargs.get("input")
        is_layer = getattr(source, "op", None) == "call_module" and isinstance(modules[source.target], EXPLAINED_LAYERS)
        if not is_layer:
            raise ValueError(
                f"BatchNorm {name!r} is applied to {_describe(source, modules)}, not directly to the output of a "
                "Linear/Conv layer, so it cannot be folded; LRP has no rule for an unfolded BatchNorm"
            )
        if counts[source.target] > 1:
            raise ValueError(
                f"cannot fold BatchNorm {name!r} into {source.target!r}: the layer is called "
                f"{counts[source.target]} times in the forward pass"
            )
        if len(source.users) > 1:
            others = [_describe(user, modules) for user in source.users if user is not node]
            raise ValueError(
                f"cannot fold BatchNorm {name!r} into {source.target!r}: the layer's output is also used by "
                f"{others}, which folding would change"
            )
        pairs.append((source.target, modules[source.target], name, bn))
    return pairs


def _pairs_from_sequential(model: nn.Module, unfolded: list[tuple[str, nn.Module]], reason: str) -> list[_Pair]:
    """(layer, BatchNorm) pairs of adjacent children of ``nn.Sequential`` containers."""
    previous: dict[int, tuple[str, nn.Module] | None] = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for i, (_, child) in enumerate(children):
                if isinstance(child, _BatchNorm):
                    if i == 0:
                        previous[id(child)] = None
                    else:
                        prev_name, prev = children[i - 1]
                        previous[id(child)] = (f"{parent_name}.{prev_name}" if parent_name else prev_name, prev)
    pairs = []
    for name, bn in unfolded:
        entry = previous.get(id(bn))
        if entry is None or not isinstance(entry[1], EXPLAINED_LAYERS):
            where = "" if entry is None else f" (it follows {entry[0]!r}, a {type(entry[1]).__name__})"
            raise ValueError(
                f"cannot fold BatchNorm {name!r}: {reason}, and it does not directly follow a Linear/Conv layer "
                f"inside an nn.Sequential{where}. If it does follow one, name the pair: "
                f"BatchNormFolding(pairs=[('<layer name>', {name!r})])"
            )
        pairs.append((entry[0], entry[1], name, bn))
    return pairs


class BatchNormFolding(Canonizer):
    """Fold every BatchNorm into the Linear/Conv layer right before it (eval mode; see the module docstring).

    Args:
        pairs: ``[(layer_name, batchnorm_name), ...]`` to fold exactly these. By default the pairs are found by
            tracing the model with ``torch.fx`` (a BatchNorm must be applied directly, and only, to the output of
            a Linear/Conv layer called once); the tracer never runs the model's hooks, so models carrying forward
            hooks (``wandb.watch``, profilers, a user's) are traced as well, and their hooks are left as they are.
            When the model cannot be traced (data-dependent control flow), adjacent children of ``nn.Sequential``
            containers are used.
            Any BatchNorm that cannot be folded raises a ``ValueError``. BatchNorms already folded by another
            canonizer are skipped.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]] | None = None) -> None:
        if pairs is not None:
            pairs = [tuple(p) for p in pairs]
            if not all(len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs):
                raise ValueError(f"BatchNormFolding: pairs must be (layer name, batchnorm name) tuples, got {pairs}")
        self.pairs = pairs

    def plan(self, model: nn.Module) -> list[_Edit]:
        if self.pairs is not None:
            resolved = []
            for layer_name, bn_name in self.pairs:
                layer_name, layer = resolve_layer(model, layer_name)
                bn_name, bn = resolve_layer(model, bn_name)
                resolved.append((layer_name, layer, bn_name, bn))
            return _fold_edits(resolved)
        unfolded = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and not is_folded(m)]
        if not unfolded:
            return []
        try:
            graph = _hook_free_tracer().trace(model)
        except Exception as err:  # any tracing failure: fall back to nn.Sequential adjacency
            reason = f"torch.fx cannot trace the model ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            return _fold_edits(_pairs_from_sequential(model, unfolded, reason))
        return _fold_edits(_pairs_from_fx(model, graph, unfolded))


# ---------------------------------------------------------------------------------------------------------------
# torchvision ResNets
# ---------------------------------------------------------------------------------------------------------------


def _resnet_types() -> tuple[type, type, type] | None:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    return BasicBlock, Bottleneck, ResNet


class _ExplicitResidualForward:
    """The forward of a torchvision ``BasicBlock`` / ``Bottleneck`` with the residual sum as a module call."""

    def __init__(self, block: nn.Module, bottleneck: bool) -> None:
        self.block, self.bottleneck = block, bottleneck

    def __call__(self, x: Tensor) -> Tensor:
        b = self.block
        out = b.relu(b.bn1(b.conv1(x)))
        if self.bottleneck:
            out = b.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
        else:
            out = b.bn2(b.conv2(out))
        identity = x if b.downsample is None else b.downsample(x)
        return b.relu(getattr(b, _RESIDUAL_NAME)(out, identity))

    def __repr__(self) -> str:
        return f"ExplicitResidualForward({type(self.block).__name__})"


class ResNetCanonizer(Canonizer):
    """Canonize torchvision ResNets: every ``BasicBlock`` / ``Bottleneck`` gets an explicit forward whose residual
    sum is a :class:`~.modules.ResidualAdd` submodule named ``residual_add`` (so the composite's rule for it splits
    relevance between the branches), and, with ``fold_batchnorm``, the blocks' BatchNorms (``bn1``..``bn3`` and
    the ``downsample`` BatchNorm) and the stem's ``bn1`` of a torchvision ``ResNet`` are folded into their
    convolutions. Blocks whose class overrides ``forward`` raise a ``ValueError`` (their computation is unknown).
    """

    def __init__(self, fold_batchnorm: bool = True) -> None:
        if not isinstance(fold_batchnorm, bool):
            raise TypeError(f"ResNetCanonizer: fold_batchnorm must be a bool, got {fold_batchnorm!r}")
        self.fold_batchnorm = fold_batchnorm

    def plan(self, model: nn.Module) -> list[_Edit]:
        types = _resnet_types()
        if types is None:  # pragma: no cover
            raise ValueError("ResNetCanonizer needs torchvision")
        basic, bottleneck, resnet = types
        blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (basic, bottleneck))]
        if not blocks:
            raise ValueError(
                f"ResNetCanonizer: {type(model).__name__} contains no torchvision BasicBlock or Bottleneck"
            )
        edits: list[_Edit] = []
        pairs: list[_Pair] = []
        for name, block in blocks:
            base = basic if isinstance(block, basic) else bottleneck
            if type(block).forward is not base.forward or "forward" in block.__dict__:
                raise ValueError(
                    f"ResNetCanonizer: block {name!r} ({type(block).__name__}) has its own forward; only the stock "
                    "torchvision BasicBlock/Bottleneck computation can be rewritten"
                )
            if hasattr(block, _RESIDUAL_NAME):
                raise ValueError(f"ResNetCanonizer: block {name!r} already has an attribute {_RESIDUAL_NAME!r}")
            edits += [
                _AddModule(block, _RESIDUAL_NAME, ResidualAdd()),
                _SetForward(block, _ExplicitResidualForward(block, bottleneck=base is bottleneck)),
            ]
            if self.fold_batchnorm:
                convs = ["1", "2", "3"] if base is bottleneck else ["1", "2"]
                pairs += [
                    (f"{name}.conv{i}", getattr(block, f"conv{i}"), f"{name}.bn{i}", getattr(block, f"bn{i}"))
                    for i in convs
                ]
                down = block.downsample
                if down is not None:
                    if not (
                        isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], EXPLAINED_LAYERS)
                    ):
                        raise ValueError(
                            f"ResNetCanonizer: the downsample of block {name!r} is not Sequential(conv, norm): {down}"
                        )
                    pairs.append((f"{name}.downsample.0", down[0], f"{name}.downsample.1", down[1]))
        if self.fold_batchnorm:
            for name, module in model.named_modules():
                if isinstance(module, resnet) and type(module).forward is resnet.forward:
                    prefix = f"{name}." if name else ""
                    pairs.append((f"{prefix}conv1", module.conv1, f"{prefix}bn1", module.bn1))
            # an identity norm layer needs no folding; one that another canonizer folded already is done
            pairs = [p for p in pairs if not isinstance(p[3], nn.Identity) and not is_folded(p[3])]
            edits += _fold_edits(pairs)
        return edits


#: Canonizers by name, for ``LRP(canonizers=["resnet", "batchnorm_folding"])`` in config files.
CANONIZERS: dict[str, type[Canonizer]] = {"batchnorm_folding": BatchNormFolding, "resnet": ResNetCanonizer}


def auto_canonizers(model: nn.Module) -> list[Canonizer]:
    """The canonizers ``model`` needs: a :class:`ResNetCanonizer` when it contains torchvision ResNet blocks,
    then a :class:`BatchNormFolding` for the BatchNorms left."""
    canonizers: list[Canonizer] = []
    types = _resnet_types()
    if types is not None and any(isinstance(m, types[:2]) for m in model.modules()):
        canonizers.append(ResNetCanonizer())
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        canonizers.append(BatchNormFolding())
    return canonizers
