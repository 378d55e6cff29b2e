"""PatternNet and PatternAttribution: explanations that separate the signal from the distractor.

Kindermans, Schütt, Alber, Müller, Erhan, Kim and Dähne, "Learning how to explain neural networks: PatternNet
and PatternAttribution", ICLR 2018.

**Why.** For a linear model ``y = w^T x`` on data ``x = s + d`` (signal ``s = a_s y``, distractor ``d``), the
weight vector ``w`` must *cancel* the distractor (``w^T d = 0``), so it generally points away from the signal
direction ``a_s``: the gradient (``w``) shows what the model filters *with*, not what it detects. The signal
direction is learned from data instead: the **pattern**.

**Estimators** (per output unit ``j`` of every Linear / Conv2d layer, with ``x`` the layer input - a patch for a
convolution - and ``y = w_j^T x + b_j``):

* ``"linear"`` (the paper's ``S_a``): ``a_j = cov(x, y) / (w_j^T cov(x, y))``, so that ``w_j^T a_j = 1``.
* ``"two_component"`` (the paper's ``S_a+-``, for ReLU networks): the same formula with the statistics taken
  separately over the samples where ``y > 0`` (``a_j+``) and where ``y <= 0`` (``a_j-``); a unit's signal is
  ``a_j+ y`` or ``a_j- y`` depending on the sign of its output. Behind a ReLU only ``a_j+`` ever matters (the
  ReLU passes nothing back where ``y <= 0``).

A unit whose statistics are degenerate (fewer than two samples in a regime, or ``w^T cov = 0``) gets the
pattern 0 in that regime.

**Fitting** (:func:`fit_patterns`) is one streaming pass over a data loader: per layer and regime the running
sums ``n``, ``sum x``, ``sum y`` and ``sum x*y`` per output unit (float64). For convolutions the sums over
patches are computed with the weight-gradient operator of the convolution (``torch.nn.grad.conv2d_weight``),
i.e. without unfolding the patches, so memory stays at one batch of layer inputs. The sums live in a
:class:`PatternSet` (``state_dict`` / ``save`` / ``load``; sums also merge across processes), from which either
estimator can be computed.

**Explaining** (a backward pass from the explained score ``y``, seeded with ``y`` itself):

* :class:`PatternNet` (``"patternnet"``): at each Linear/Conv2d layer the weights are replaced by the patterns
  (``s_x = A^T s_y``); ReLUs gate as in the forward pass, max-pooling routes to the arg-max, average pooling
  averages. The result is the estimated *signal* in input space, ``[B, C, H, W]`` (for a linear model:
  ``a * y``).
* :class:`PatternAttribution` (``"pattern_attribution"``): the weights are replaced by ``w * a``
  (element-wise), an LRP-like relevance backward whose root point is given by the learned signal; the result is
  a per-input-element relevance ``[B, C, H, W]`` (for a linear model ``w * a * y``, which sums to ``y``).

BatchNorm layers are folded into the Linear/Conv layer before them (as for LRP, see
:class:`~lightning_xai.attribution.lrp.canonizers.BatchNormFolding`) both when fitting and when explaining, so
the ReLU regimes are those of the layer that feeds the ReLU. Models with other parametrised layers (LayerNorm,
Conv1d, ...) are refused with a ``ValueError``: their backward pass would not be a pattern backward pass.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_xai.attribution.base import Attributor, Target, model_logits, model_state_guard, select_scores
from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.attribution.lrp.canonizers import BatchNormFolding
from lightning_xai.attribution.lrp.modules import layer_parameters
from lightning_xai.batch import BatchReader, Key
from lightning_xai.checks import check_optional_int, close_matches
from lightning_xai.distributed import Reducer, default_reducer, sum_over_ranks

__all__ = ["ESTIMATORS", "PatternAttribution", "PatternNet", "PatternSet", "fit_patterns"]

#: Signal estimators: ``"linear"`` (S_a) and ``"two_component"`` (S_a+-).
ESTIMATORS = ("linear", "two_component")
PATTERN_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_REGIMES = ("pos", "neg")
_SUMS = ("count", "sum_x", "sum_y", "sum_xy")
_FORMAT_VERSION = 1


def _check_estimator(estimator: str) -> str:
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        close = close_matches(estimator, ESTIMATORS)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {list(ESTIMATORS)}{hint}")
    return estimator


def _check_supported(model: nn.Module, fold_batchnorm: bool) -> None:
    """Refuse models whose parametrised layers a pattern backward pass cannot handle."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, PATTERN_LAYERS):
            continue
        if isinstance(module, _BatchNorm):
            if not fold_batchnorm:
                bad.append(f"{name} ({type(module).__name__}: fit with fold_batchnorm=True)")
            continue
        if any(True for _ in module.parameters(recurse=False)):
            bad.append(f"{name} ({type(module).__name__})")
    if bad:
        raise ValueError(
            "PatternNet/PatternAttribution support models built from Linear and Conv2d layers (BatchNorm folded "
            f"into them), element-wise activations and pooling; these layers are not supported: {bad[:8]}"
        )


def _pattern_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PATTERN_LAYERS)}


@contextlib.contextmanager
def _folded(model: nn.Module, fold_batchnorm: bool) -> Iterator[None]:
    if fold_batchnorm and any(isinstance(m, _BatchNorm) for m in model.modules()):
        with BatchNormFolding().applied(model):
            yield
    else:
        yield


def _conv_input_and_padding(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, Any]:
    """The (explicitly padded, if needed) input and the padding argument for ``conv2d_weight``."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, module.padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0


def _regime_sums(module: nn.Module, weight_shape: torch.Size, x: Tensor, y: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``n``, ``sum x``, ``sum y``, ``sum x*y`` per output unit over the positions where ``mask`` is set."""
    m = mask.to(y.dtype)
    ym = y * m
    if isinstance(module, nn.Conv2d):
        xp, padding = _conv_input_and_padding(module, x)

        def patch_sum(g: Tensor) -> Tensor:  # sum over samples and positions of g[b, j, p] * patch[b, :, p]
            return torch.nn.grad.conv2d_weight(
                xp, weight_shape, g, module.stride, padding, module.dilation, module.groups
            )

        return {
            "count": m.sum(dim=(0, 2, 3)),
            "sum_x": patch_sum(m),
            "sum_y": ym.sum(dim=(0, 2, 3)),
            "sum_xy": patch_sum(ym),
        }
    x2 = x.reshape(-1, x.shape[-1])
    return {
        "count": m.reshape(-1, m.shape[-1]).sum(0),
        "sum_x": m.reshape(-1, m.shape[-1]).T @ x2,
        "sum_y": ym.reshape(-1, ym.shape[-1]).sum(0),
        "sum_xy": ym.reshape(-1, ym.shape[-1]).T @ x2,
    }


def _estimate(weight: Tensor, sums: Mapping[str, Tensor]) -> Tensor:
    """``a = cov(x, y) / (w^T cov(x, y))`` per output unit (0 where undefined), in float64."""
    w = weight.double()
    shape = (-1,) + (1,) * (w.ndim - 1)
    count = sums["count"].view(shape)
    n = count.clamp_min(1)
    cov = sums["sum_xy"] / n - (sums["sum_x"] / n) * (sums["sum_y"].view(shape) / n)
    dims = tuple(range(1, w.ndim))
    denom = (w * cov).sum(dim=dims, keepdim=True)
    scale = (w.abs() * cov.abs()).sum(dim=dims, keepdim=True)
    valid = (count >= 2) & (denom.abs() > 1e-10 * scale) & (scale > 0)
    return torch.where(valid, cov / torch.where(valid, denom, torch.ones_like(denom)), torch.zeros_like(cov))


class PatternSet:
    """Fitted signal statistics of a model's Linear/Conv2d layers (see the module docstring).

    Holds, per layer: the (BatchNorm-folded) weight the statistics were collected with, and per regime
    (``y > 0`` / ``y <= 0``) the float64 running sums ``count [J]``, ``sum_x``, ``sum_xy`` (weight-shaped) and
    ``sum_y [J]``. Patterns are computed from the sums on demand (:meth:`patterns`), with either estimator.
    A plain container (not an ``nn.Module``, so it can never be mistaken for model parameters): use
    :meth:`state_dict` / :meth:`load_state_dict`, :meth:`save` / :meth:`load` and :meth:`to`.

    Args:
        estimator: the default estimator of :meth:`patterns`: ``"linear"`` or ``"two_component"``.
        fold_batchnorm: whether BatchNorms were folded into the layers when fitting (the explainers do the same).
    """

    def __init__(self, estimator: str = "linear", fold_batchnorm: bool = True) -> None:
        self.estimator = _check_estimator(estimator)
        if not isinstance(fold_batchnorm, bool):
            raise TypeError(f"fold_batchnorm must be a bool, got {fold_batchnorm!r}")
        self.fold_batchnorm = fold_batchnorm
        self.layers: dict[str, dict[str, Tensor]] = {}

    def __repr__(self) -> str:
        samples = {n: int(s["pos_count"].sum() + s["neg_count"].sum()) for n, s in self.layers.items()}
        return (
            f"PatternSet(estimator={self.estimator!r}, fold_batchnorm={self.fold_batchnorm}, "
            f"layers={list(self.layers)}, samples_per_layer={samples})"
        )

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    # --------------------------------------------------------------------------------------- statistics
    @torch.no_grad()
    def update(self, name: str, module: nn.Module, x: Tensor, y: Tensor) -> None:
        """Add one batch of a layer's inputs ``x`` and outputs ``y`` to the sums of layer ``name``."""
        weight = layer_parameters(module)[0]
        stats = self.layers.get(name)
        if stats is None:
            stats = {"weight": weight.detach().clone()}
            for regime in _REGIMES:
                stats[f"{regime}_count"] = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
                stats[f"{regime}_sum_y"] = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
                stats[f"{regime}_sum_x"] = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
                stats[f"{regime}_sum_xy"] = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
            self.layers[name] = stats
        elif stats["weight"].shape != weight.shape:
            raise ValueError(f"layer {name!r}: weight shape {list(weight.shape)} changed during fitting")
        positive = y > 0
        for regime, mask in (("pos", positive), ("neg", ~positive)):
            for key, value in _regime_sums(module, weight.shape, x, y, mask).items():
                stats[f"{regime}_{key}"] += value.double()

    def sums(self, name: str, regime: str) -> dict[str, Tensor]:
        """The running sums of layer ``name`` for ``regime`` ``"pos"``, ``"neg"`` or ``"all"`` (their total)."""
        stats = self._stats(name)
        if regime == "all":
            return {k: stats[f"pos_{k}"] + stats[f"neg_{k}"] for k in _SUMS}
        if regime not in _REGIMES:
            raise ValueError(f"unknown regime {regime!r}; valid: 'pos', 'neg', 'all'")
        return {k: stats[f"{regime}_{k}"] for k in _SUMS}

    def weight(self, name: str) -> Tensor:
        """The (folded) weight the statistics of layer ``name`` were collected with."""
        return self._stats(name)["weight"]

    def patterns(self, name: str, estimator: str | None = None) -> tuple[Tensor, Tensor]:
        """``(a_pos, a_neg)`` of layer ``name``, weight-shaped, in the weight's dtype: the patterns used where the
        unit's output is ``> 0`` and ``<= 0``. Both are the linear-estimator pattern for ``"linear"``."""
        estimator = self.estimator if estimator is None else _check_estimator(estimator)
        weight = self.weight(name)
        if estimator == "linear":
            a = _estimate(weight, self.sums(name, "all")).to(weight.dtype)
            return a, a
        return (
            _estimate(weight, self.sums(name, "pos")).to(weight.dtype),
            _estimate(weight, self.sums(name, "neg")).to(weight.dtype),
        )

    def _stats(self, name: str) -> dict[str, Tensor]:
        if name not in self.layers:
            raise ValueError(f"no fitted patterns for layer {name!r}; fitted layers: {self.layer_names}")
        return self.layers[name]

    def all_reduce(self, reducer: Reducer | None = None) -> None:
        """Sum the statistics over the ranks (:func:`lightning_xai.distributed.sum_over_ranks`; a no-op in a
        single process). Every rank must call it, with the same layers fitted."""
        reducer = default_reducer() if reducer is None else reducer
        if reducer.world_size <= 1:
            return
        for name in sorted(self.layers):
            for key, value in sorted(self.layers[name].items()):
                if key != "weight":
                    value.copy_(sum_over_ranks(value, reducer))

    # ------------------------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _FORMAT_VERSION,
            "estimator": self.estimator,
            "fold_batchnorm": self.fold_batchnorm,
            "layers": {name: dict(stats) for name, stats in self.layers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _FORMAT_VERSION or "layers" not in state:
            raise ValueError("not a PatternSet state dict (missing version/layers, or another format version)")
        expected = {"weight", *(f"{r}_{k}" for r in _REGIMES for k in _SUMS)}
        layers = {}
        for name, stats in state["layers"].items():
            if set(stats) != expected:
                raise ValueError(f"layer {name!r}: state has keys {sorted(stats)}, expected {sorted(expected)}")
            layers[name] = {k: v.clone() for k, v in stats.items()}
        self.estimator = _check_estimator(state["estimator"])
        self.fold_batchnorm = bool(state["fold_batchnorm"])
        self.layers = layers

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> PatternSet:
        out = cls()
        out.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
        return out

    def to(self, device: str | torch.device) -> PatternSet:
        """Move every tensor to ``device`` (in place); returns ``self``."""
        self.layers = {n: {k: v.to(device) for k, v in s.items()} for n, s in self.layers.items()}
        return self


def fit_patterns(
    model: nn.Module,
    data: Iterable[Any],
    estimator: str = "linear",
    *,
    layers: Sequence[str] | None = None,
    fold_batchnorm: bool = True,
    max_batches: int | None = None,
    reduce: bool = True,
    input_key: Key | None = None,
) -> PatternSet:
    """Learn the signal patterns of ``model``'s Linear/Conv2d layers in one pass over ``data``.

    Args:
        model: the trained model (run in eval mode, under ``no_grad``; its state is restored afterwards).
        data: iterable of batches in any format :class:`lightning_xai.batch.BatchReader` reads (input tensors,
            ``(inputs, ...)`` sequences, dicts with an ``"image"`` / ``"x"`` / ... key, objects with attributes).
            Inputs are moved to the model's device.
        estimator: default estimator of the returned :class:`PatternSet` (both can be computed from it).
        layers: restrict to these Linear/Conv2d layers (dotted names); default all of them.
        fold_batchnorm: fold BatchNorms into the layers before them (needed for correct ReLU regimes).
        max_batches: stop after this many batches.
        reduce: under ``torch.distributed``, sum the statistics over all processes (every process must call).
        input_key: where the input is in a batch (see :class:`~lightning_xai.batch.BatchReader`); ``None`` finds it.
    """
    _check_estimator(estimator)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_optional_int("max_batches", max_batches, minimum=1, owner="fit_patterns", none_means="every batch")
    _check_supported(model, fold_batchnorm)
    if layers is None:
        targets = _pattern_layers(model)
        if not targets:
            raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to fit patterns for")
    else:
        targets = {}
        for layer in layers:
            name, module = resolve_layer(model, layer)
            if not isinstance(module, PATTERN_LAYERS):
                raise ValueError(f"layer {name!r} is a {type(module).__name__}; patterns are fitted for Linear/Conv2d")
            targets[name] = module
    reader = BatchReader(input_key, owner="fit_patterns")
    pattern_set = PatternSet(estimator, fold_batchnorm)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            pattern_set.update(name, module, inputs[0], output)

        return hook

    handles = []
    num_batches = 0
    # inference_mode(False): the sums must be normal tensors, usable in autograd when explaining later
    with model_state_guard(model), torch.inference_mode(False), torch.no_grad(), _folded(model, fold_batchnorm):
        try:
            for name, module in targets.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            for batch in data:
                inputs = reader.inputs(batch)
                if not isinstance(inputs, Tensor):
                    raise TypeError(f"fit_patterns: batch inputs must be a tensor, got {type(inputs).__name__}")
                inputs = inputs.to(device)
                model(inputs.clone() if inputs.is_inference() else inputs)
                num_batches += 1
                if max_batches is not None and num_batches >= max_batches:
                    break
        finally:
            for handle in handles:
                handle.remove()
    if num_batches == 0:
        raise ValueError("data yielded no batches: there is nothing to fit the patterns on")
    missing = [n for n in targets if n not in pattern_set]
    if missing:
        raise ValueError(f"these layers were never called in the forward pass, so have no statistics: {missing}")
    if reduce:
        pattern_set.all_reduce()
    return pattern_set


class _PatternBackward(Attributor):
    """A backward pass in which every Linear/Conv2d layer propagates through replacement weights."""

    requires_image = False

    def __init__(self, patterns: PatternSet | str | os.PathLike, estimator: str | None = None) -> None:
        if isinstance(patterns, (str, os.PathLike)):
            patterns = PatternSet.load(patterns)
        if not isinstance(patterns, PatternSet):
            raise TypeError(f"patterns must be a PatternSet or the path of a saved one, got {type(patterns).__name__}")
        if not patterns.layers:
            raise ValueError("the PatternSet is empty: fit it with fit_patterns(model, loader) first")
        self.patterns = patterns
        self.estimator = patterns.estimator if estimator is None else _check_estimator(estimator)

    def backward_weights(self, weight: Tensor, a_pos: Tensor, a_neg: Tensor) -> tuple[Tensor, Tensor]:
        """The weights the backward pass uses for outputs ``> 0`` and ``<= 0``."""
        raise NotImplementedError

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        fold = self.patterns.fold_batchnorm
        _check_supported(model, fold)
        layers = _pattern_layers(model)
        missing = sorted(set(layers) - set(self.patterns.layers))
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the model has Linear/Conv2d layers without fitted patterns: {missing}; "
                f"fitted: {self.patterns.layer_names} (fit them with fit_patterns(model, loader))"
            )
        handles = []
        with _folded(model, fold):
            replacement: dict[str, tuple[Tensor, Tensor]] = {}
            for name, module in layers.items():
                weight = layer_parameters(module)[0]
                fitted = self.patterns.weight(name)
                if fitted.shape != weight.shape or not torch.allclose(
                    fitted.to(weight.device, weight.dtype), weight, rtol=1e-4, atol=1e-6
                ):
                    raise ValueError(
                        f"{type(self).__name__}: layer {name!r} has other weights than the patterns were fitted with "
                        "(the model changed since fit_patterns, or the PatternSet belongs to another model); refit"
                    )
                a_pos, a_neg = (a.to(weight.device, weight.dtype) for a in self.patterns.patterns(name, self.estimator))
                replacement[name] = self.backward_weights(weight, a_pos, a_neg)
            single = self.estimator == "linear"  # one pattern per unit: no regime split needed
            try:
                for name, module in layers.items():
                    handles.append(module.register_forward_hook(self._make_hook(module, *replacement[name], single)))
                output = model_logits(model(inputs))
                scores = select_scores(output, target)
                if not scores.requires_grad:
                    raise ValueError("the explained score does not depend differentiably on the input")
                # The backward pass starts at every output unit with that unit's own value times the score's
                # derivative: y_c e_c for a class target, and y_a e_a - y_b e_b for y_a - y_b (not (y_a - y_b)
                # (e_a - e_b)), so that the explanation of a linear score is the same combination of the
                # per-class explanations, as for every other linear method of the library.
                (direction,) = torch.autograd.grad(scores.sum(), output, retain_graph=True)
                (signal,) = torch.autograd.grad(output, inputs, grad_outputs=output.detach() * direction)
            finally:
                for handle in handles:
                    handle.remove()
        return signal

    @staticmethod
    def _make_hook(module: nn.Module, p_pos: Tensor, p_neg: Tensor, same: bool):

        def hook(_module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = args[0]
            # The forward value is unchanged; the gradient w.r.t. x flows through the replacement weights only:
            # d out / d x = P^T (per output regime).
            if same:
                surrogate = _linear_op(module, x, p_pos)
            else:
                positive = (output > 0).to(output.dtype).detach()
                surrogate = _linear_op(module, x, p_pos) * positive + _linear_op(module, x, p_neg) * (1 - positive)
            return output.detach() + (surrogate - surrogate.detach())

        return hook


def _linear_op(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


class PatternNet(_PatternBackward):
    """PatternNet (Kindermans et al., ICLR 2018): back-projects the explained score's *signal* to the input.

    Args:
        patterns: a fitted :class:`PatternSet` (see :func:`fit_patterns`) or the path of one saved with
            :meth:`PatternSet.save` (so a YAML config can name it).
        estimator: ``"linear"`` or ``"two_component"``; default the PatternSet's own.

    ``PatternNet(patterns)(model, inputs, target) -> Tensor[B, C, H, W]`` (same shape as ``inputs``): the signal
    estimate, in input units (for a linear model, ``a * y``: the part of the input the score detects). Signed.
    Raises ``ValueError`` if the model has Linear/Conv2d layers without fitted patterns, or whose weights
    changed since fitting.
    """

    name = "patternnet"

    def backward_weights(self, weight: Tensor, a_pos: Tensor, a_neg: Tensor) -> tuple[Tensor, Tensor]:
        return a_pos, a_neg


class PatternAttribution(_PatternBackward):
    """PatternAttribution (Kindermans et al., ICLR 2018): relevance propagated through ``w * a``.

    Args:
        patterns, estimator: as in :class:`PatternNet`.

    ``PatternAttribution(patterns)(model, inputs, target) -> Tensor[B, C, H, W]``: signed relevance of every
    input element (sum the channels for a heatmap). For a linear model it is ``w * a * y`` and sums to the score
    ``y`` (``w^T a = 1``). Same errors as :class:`PatternNet`.
    """

    name = "pattern_attribution"

    def backward_weights(self, weight: Tensor, a_pos: Tensor, a_neg: Tensor) -> tuple[Tensor, Tensor]:
        return weight * a_pos, weight * a_neg
