"""Relevant units: the few internal units a model relies on for each class, found without extra annotation.

After Oramas, Wang & Tuytelaars, "Visual Explanation by Interpretation: Improving Visual Feedback Capabilities
of Deep Neural Networks", ICLR 2019:

1. **Unit features.** Each image ``i`` is described by one number per unit ``j`` (a channel of a chosen layer):
   the *normalised sum of squared activations* ``x_ij = mean_{h,w} a_ij(h, w)^2`` (the sum divided by the number
   of spatial positions, so layers of different resolution are comparable), then divided by the unit's maximum
   over the data (``scale``), so every feature lies in ``[0, 1]`` and one l1 budget applies to all units.
2. **Constrained lasso.** With ``X [N, m]`` the features of ``N`` training images and ``Y [N, C]`` their one-hot
   labels, ``W* = argmin_W ||X W - Y||_F^2  s.t.  ||w_c||_1 <= mu`` for every class column ``w_c`` (the paper
   writes it transposed, ``||X^T W - L^T||``). By default both sides are centred first (an unpenalised
   intercept; see ``center`` in :class:`RelevantUnitAnalysis`). Solved by accelerated projected gradient
   (FISTA, Beck & Teboulle, SIAM J. Imaging Sciences 2009) with step ``1 / (2 sigma_max(X)^2)`` and the exact
   Euclidean projection onto the l1 ball of Duchi, Shalev-Shwartz, Singer & Chandra, "Efficient Projections
   onto the l1-Ball for Learning in High Dimensions", ICML 2008 (:func:`project_l1_ball`). The iterates are
   projections, so the solution is exactly sparse.
3. **Relevant units of class c** are the non-zero entries of ``w_c`` (sorted by weight; a positive weight means
   the unit's response supports the class, a negative one that it counts against it).
4. **Interpretation visuals** (:func:`unit_visuals`): for each relevant unit its top-k training images, the
   crops of its receptive field around its strongest response, and their average image. The receptive field is
   computed exactly from the layer geometry (:func:`~lightning_xai.interpretation.receptive_field.receptive_field`;
   measured by gradient support, with a warning, where the model cannot be traced).
5. **Explanation** (:meth:`RelevantUnitsResult.explain`): a heatmap of an input from the responses of its
   class's relevant units, each unit's squared activation map upsampled to the input and weighted by its
   contribution ``w_jc * x_ij``.
6. **Ablation** (:func:`unit_ablation`): per-class accuracy when a class's relevant units are zeroed (forward
   hooks, removed afterwards) against zeroing as many randomly chosen other units of the same layers.

**Token layers.** For a vision transformer's layer ``[B, T, D]`` the units are the ``D`` channels and a unit's
map is its channel over the patch tokens on the patch grid (class token dropped; ``reshape`` as in the CAM
family, see :func:`~lightning_xai.interpretation.layer_maps.unit_maps`); ablating a unit zeroes its channel in
every token. A token layer's units see the whole image (attention), so their visuals show whole images.

Everything runs in eval mode with the model's state restored and every hook removed afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.attribution.token_grid import Reshape, check_reshape
from lightning_xai.checks import check_int
from lightning_xai.interpretation.embedding import Data, iterate_batches, model_device, reduce_activation
from lightning_xai.interpretation.lasso import constrained_lasso, project_l1_ball
from lightning_xai.interpretation.layer_maps import is_token_output, reject_text_tokens, unit_maps
from lightning_xai.interpretation.receptive_field import ReceptiveField, crop_receptive_fields, receptive_field
from lightning_xai.interpretation.visualization import TopKBuffer

__all__ = [
    "AblationReport",
    "ReceptiveField",
    "RelevantUnitAnalysis",
    "RelevantUnitsResult",
    "UnitExplanation",
    "UnitVisual",
    "ablate_units",
    "constrained_lasso",
    "crop_receptive_fields",
    "project_l1_ball",
    "receptive_field",
    "unit_ablation",
    "unit_visuals",
]

Unit = tuple[str, int]


def _maps(activation: Tensor, inputs: Tensor, reshape: Reshape, owner: str, layer: str) -> Tensor:
    """A layer's output with its units on dim 1: token activations become unit maps ``[B, D, h, w]``; a text token
    layer raises (the analysis works in image space)."""
    reject_text_tokens(activation, inputs, owner=owner, layer=layer)
    if not is_token_output(activation, inputs):
        return activation
    return unit_maps(activation, (int(inputs.shape[-2]), int(inputs.shape[-1])), reshape, owner=owner, layer=layer)


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class UnitExplanation:
    """An input explained by its class's relevant units."""

    #: ``[B, 1, H, W]`` non-negative heatmap at input resolution.
    heatmap: Tensor
    #: The class explained for each sample.
    classes: Tensor
    #: Per sample, the units used (best first) and their contributions ``w_jc * x_ij``.
    units: list[list[Unit]]
    contributions: list[list[float]]


@dataclass
class RelevantUnitsResult:
    """The lasso weights and the relevant units per class (see the module docstring)."""

    #: ``(layer, channel)`` of each feature row of ``weights``.
    units: list[Unit]
    #: ``[m, C]`` lasso weights.
    weights: Tensor
    #: ``[m]`` per-unit scale (the maximum feature over the fitting data) applied before the lasso.
    scale: Tensor
    mu: float
    #: Entries with ``|w| <= tolerance * mu`` count as zero (numerical noise of the projection).
    tolerance: float = 1e-6
    iterations: int = 0
    #: Training fit of the lasso, ``1 - ||XW - Y||^2 / ||Y - mean Y||^2``.
    r2: float = float("nan")
    layers: list[str] = field(default_factory=list)
    #: How token layers were laid out on their patch grid (see :class:`RelevantUnitAnalysis`).
    reshape: Reshape = None

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[1])

    @property
    def mask(self) -> Tensor:
        """``[m, C]`` bool: the relevant (non-zero) entries."""
        return self.weights.abs() > self.tolerance * self.mu

    def relevant(self, cls: int, *, positive_only: bool = False) -> list[tuple[str, int, float]]:
        """``(layer, channel, weight)`` of the relevant units of class ``cls``, by decreasing weight."""
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < self.num_classes:
            raise ValueError(f"class {cls!r} is out of range (valid 0..{self.num_classes - 1})")
        col = self.weights[:, cls]
        keep = self.mask[:, cls] & ((col > 0) if positive_only else True)
        order = torch.argsort(col, descending=True)
        return [(*self.units[j], float(col[j])) for j in order.tolist() if bool(keep[j])]

    def units_by_layer(self, cls: int, *, positive_only: bool = True) -> dict[str, list[int]]:
        """The relevant channels of class ``cls`` grouped by layer (for :func:`ablate_units`)."""
        grouped: dict[str, list[int]] = {}
        for layer, channel, _ in self.relevant(cls, positive_only=positive_only):
            grouped.setdefault(layer, []).append(channel)
        return grouped

    def rows(self) -> list[list[object]]:
        """Table rows ``[class, rank, layer, unit, weight]`` of every relevant unit."""
        out: list[list[object]] = []
        for c in range(self.num_classes):
            for rank, (layer, channel, weight) in enumerate(self.relevant(c)):
                out.append([c, rank, layer, channel, weight])
        return out

    def normalised_features(self, raw: Tensor) -> Tensor:
        return raw / self.scale.to(raw.device)

    def explain(
        self,
        model: nn.Module,
        inputs: Tensor,
        target: int | Tensor | None = None,
        *,
        top_k: int = 5,
    ) -> UnitExplanation:
        """Explain ``inputs [B, C, H, W]`` by the relevant units of class ``target`` (default: the prediction).

        For each sample, the units with the largest positive contributions ``w_jc * x_ij`` (at most ``top_k``)
        are kept, each unit's squared activation map is upsampled (bilinear) to the input, divided by its maximum
        and weighted by its contribution; the heatmap is their sum. Units of layers without spatial maps add a
        constant (their contribution) everywhere.
        """
        check_int("top_k", top_k, minimum=1, owner="RelevantUnitsResult")
        if not isinstance(inputs, Tensor) or inputs.ndim != 4:
            raise ValueError(f"inputs must be an image batch [B, C, H, W], got {getattr(inputs, 'shape', inputs)}")
        device = model_device(model)
        x = inputs.detach().to(device)
        layers = sorted({layer for layer, _ in self.units})
        with contextlib.ExitStack() as stack:
            stack.enter_context(model_state_guard(model))
            stack.enter_context(torch.no_grad())
            captures = {layer: stack.enter_context(capture_layer(model, layer)) for layer in layers}
            logits = model(x)
        if target is None:
            classes = logits.argmax(dim=1).cpu()
        else:
            classes = torch.as_tensor(target).long().reshape(-1).cpu()
            if classes.numel() == 1:
                classes = classes.expand(x.shape[0]).clone()
            if classes.numel() != x.shape[0]:
                raise ValueError(f"target must be one class or one per sample ({x.shape[0]}), got {classes.tolist()}")
        if int(classes.min()) < 0 or int(classes.max()) >= self.num_classes:
            raise ValueError(f"target classes must be in 0..{self.num_classes - 1}, got {classes.tolist()}")
        owner = "RelevantUnitsResult"
        acts = {layer: _maps(cap.activation, x, self.reshape, owner, layer) for layer, cap in captures.items()}
        raw = torch.stack(
            [reduce_activation(acts[layer], "mean_square")[:, ch].float().cpu() for layer, ch in self.units], dim=1
        )
        feats = self.normalised_features(raw)
        heat = torch.zeros(x.shape[0], 1, *x.shape[-2:])
        all_units: list[list[Unit]] = []
        all_contrib: list[list[float]] = []
        for b in range(x.shape[0]):
            c = int(classes[b])
            contrib = self.weights[:, c] * feats[b]
            contrib = torch.where(self.mask[:, c], contrib, torch.zeros_like(contrib))
            order = [j for j in torch.argsort(contrib, descending=True).tolist() if contrib[j] > 0][:top_k]
            all_units.append([self.units[j] for j in order])
            all_contrib.append([float(contrib[j]) for j in order])
            for j in order:
                layer, ch = self.units[j]
                amap = acts[layer][b, ch].float().cpu()
                if amap.ndim == 2:
                    up = F.interpolate(
                        amap.square()[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False
                    )
                    up = up[0] / up.max().clamp_min(1e-12)
                else:
                    up = torch.ones(1, *x.shape[-2:])
                heat[b] += float(contrib[j]) * up
        return UnitExplanation(heat.to(inputs.device), classes, all_units, all_contrib)


class RelevantUnitAnalysis:
    """Find the relevant units of one or more layers for every class (Oramas et al., ICLR 2019).

    Args:
        layers: dotted layer name(s) (or modules) whose channels are the candidate units.
        mu: the l1 budget per class of the constrained lasso; smaller = fewer relevant units. The features lie
            in [0, 1] and the targets are one-hot, so ``mu`` of the order of the number of units one expects a
            class to need (1 to a few) is the useful range.
        max_iter, tol: FISTA iterations and the relative-change stopping tolerance.
        batch_size: samples per forward pass when collecting features.
        center: fit an unpenalised intercept (centre the features and the one-hot targets) - a deviation from the
            paper's formulation, which has none: without it, a unit that responds to every image (brightness,
            say) is picked for every class as a stand-in for the bias. ``False`` solves the paper's problem as
            written.
        reshape: how a token layer's output ``[B, T, D]`` becomes unit maps ``[B, D, h, w]`` (as for the CAM family):
            ``None`` (class token dropped, patch grid inferred), a grid ``(h, w)``, or a callable.
    """

    def __init__(
        self,
        layers: str | nn.Module | Sequence[str | nn.Module],
        *,
        mu: float = 2.0,
        max_iter: int = 2000,
        tol: float = 1e-7,
        batch_size: int = 64,
        center: bool = True,
        reshape: Reshape = None,
    ) -> None:
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("RelevantUnitAnalysis needs at least one layer")
        for layer in layers:
            if not isinstance(layer, (str, nn.Module)):
                raise TypeError(f"layers must be dotted names or modules, got {type(layer).__name__}")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
            raise ValueError(f"mu (the l1 budget per class) must be a finite number > 0, got {mu!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        self.layers = layers
        self.mu = float(mu)
        self.max_iter = check_int("max_iter", max_iter, minimum=1, owner="RelevantUnitAnalysis")
        self.tol = float(tol)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner="RelevantUnitAnalysis")
        self.center = bool(center)
        self.reshape = check_reshape(reshape, "RelevantUnitAnalysis")

    def __repr__(self) -> str:
        return (
            f"RelevantUnitAnalysis(layers={self.layers!r}, mu={self.mu}, max_iter={self.max_iter}, tol={self.tol}, "
            f"batch_size={self.batch_size}, center={self.center}"
            + ("" if self.reshape is None else f", reshape={self.reshape!r}")
            + ")"
        )

    def layer_names(self, model: nn.Module) -> list[str]:
        names = [resolve_layer(model, layer)[0] for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layers are listed twice: {names}")
        return names

    def check_layers(self, model: nn.Module, inputs: Tensor) -> None:
        """Raise the ``ValueError`` of a layer whose output cannot be read as units - a token layer whose tokens
        ``reshape`` cannot lay out on a patch grid - from one forward pass of ``inputs`` (a setup check)."""
        names = self.layer_names(model)
        x = inputs.detach().to(model_device(model))
        with contextlib.ExitStack() as stack:
            stack.enter_context(model_state_guard(model))
            stack.enter_context(torch.no_grad())
            captures = [stack.enter_context(capture_layer(model, name)) for name in names]
            model(x)
        for name, capture in zip(names, captures):
            _maps(capture.activation, x, self.reshape, "RelevantUnitAnalysis", name)

    def features(
        self, model: nn.Module, data: Data, *, max_samples: int | None = None
    ) -> tuple[Tensor, Tensor | None, list[Unit]]:
        """Raw unit features ``[N, m]`` (mean squared activation per channel, not yet scaled), the labels and the
        ``(layer, channel)`` of each column; one pass over ``data`` in eval mode under ``no_grad``."""
        names = self.layer_names(model)
        if max_samples is not None:
            check_int("max_samples", max_samples, minimum=1, owner="RelevantUnitAnalysis")
        device = model_device(model)
        feats: list[Tensor] = []
        labels: list[Tensor] = []
        has_labels, seen = True, 0
        units: list[Unit] | None = None
        with contextlib.ExitStack() as stack:
            stack.enter_context(model_state_guard(model))
            stack.enter_context(torch.no_grad())
            captures = [stack.enter_context(capture_layer(model, name)) for name in names]
            for x, y in iterate_batches(data, self.batch_size):
                if max_samples is not None:
                    if seen >= max_samples:
                        break
                    x = x[: max_samples - seen]
                    y = None if y is None else y[: max_samples - seen]
                for cap in captures:
                    cap.clear()
                model(x.to(device))
                owner = "RelevantUnitAnalysis"
                maps = [_maps(c.activation, x, self.reshape, owner, n) for n, c in zip(names, captures)]
                parts = [reduce_activation(m, "mean_square").float().cpu() for m in maps]
                if units is None:
                    units = [(name, ch) for name, part in zip(names, parts) for ch in range(part.shape[1])]
                feats.append(torch.cat(parts, dim=1))
                if y is None:
                    has_labels = False
                else:
                    labels.append(y.reshape(-1).long().cpu())
                seen += x.shape[0]
        if not feats or units is None:
            raise ValueError("the data is empty: there are no samples to find relevant units on")
        return torch.cat(feats), torch.cat(labels) if has_labels else None, units

    def fit_features(
        self, features: Tensor, labels: Tensor, units: Sequence[Unit], num_classes: int | None = None
    ) -> RelevantUnitsResult:
        """Scale the raw features and solve the constrained lasso against the one-hot labels."""
        if labels is None:
            raise ValueError("relevant units need class labels: pass data that yields (inputs, labels)")
        labels = labels.long().reshape(-1)
        if features.ndim != 2 or features.shape[0] != labels.shape[0] or features.shape[1] != len(units):
            raise ValueError(f"features must be [N, m] = [{labels.shape[0]}, {len(units)}], got {list(features.shape)}")
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        check_int("num_classes", num_classes, minimum=1, owner="RelevantUnitAnalysis")
        if int(labels.max()) >= num_classes:
            raise ValueError(f"label {int(labels.max())} is out of range for num_classes={num_classes}")
        present = torch.unique(labels).tolist()
        if len(present) < 2:
            raise ValueError(
                f"RelevantUnitAnalysis: the data holds only class {present} ({labels.shape[0]} samples); relevant "
                "units separate classes, so the fit needs samples of at least two classes (with one class the "
                "centred one-hot target is zero and every weight would be zero)"
            )
        if not bool(torch.isfinite(features).all()):
            bad = (~torch.isfinite(features).all(dim=1)).nonzero().flatten().tolist()[:10]
            raise ValueError(f"RelevantUnitAnalysis: unit features contain NaN or inf values (samples {bad})")
        scale = features.amax(dim=0).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = features.float() / scale
        y = F.one_hot(labels, num_classes).float()
        if self.center:  # an unpenalised intercept, fitted by centring both sides
            x = x - x.mean(dim=0, keepdim=True)
            y = y - y.mean(dim=0, keepdim=True)
        weights, iterations = constrained_lasso(x, y, self.mu, max_iter=self.max_iter, tol=self.tol)
        resid = (x.double() @ weights.double() - y.double()).square().sum()
        total = (y.double() - y.double().mean(0)).square().sum()
        r2 = float(1.0 - resid / total) if total > 0 else float("nan")
        layers = list(dict.fromkeys(layer for layer, _ in units))
        return RelevantUnitsResult(
            list(units), weights, scale, self.mu, iterations=iterations, r2=r2, layers=layers, reshape=self.reshape
        )

    def fit(
        self, model: nn.Module, data: Data, *, num_classes: int | None = None, max_samples: int | None = None
    ) -> RelevantUnitsResult:
        """Collect the unit features of ``data`` (which must yield labels) and find the relevant units."""
        feats, labels, units = self.features(model, data, max_samples=max_samples)
        if labels is None:
            raise ValueError("relevant units need class labels: pass data that yields (inputs, labels)")
        return self.fit_features(feats, labels, units, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# visuals
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class UnitVisual:
    """A unit's top-k images, the crops of its receptive field around its strongest response, and their mean."""

    layer: str
    unit: int
    #: ``[k]`` positions of the top images in the data, and their unit feature (mean squared activation).
    indices: Tensor
    scores: Tensor
    images: Tensor
    #: ``[k, 2]`` layer position ``(h, w)`` of the unit's maximum in each image.
    positions: Tensor
    crops: Tensor
    average: Tensor


def unit_visuals(
    model: nn.Module,
    units: Sequence[Unit],
    data: Data,
    *,
    k: int = 8,
    batch_size: int = 64,
    fields: Mapping[str, ReceptiveField] | None = None,
    reshape: Reshape = None,
) -> list[UnitVisual]:
    """The interpretation visuals of ``units`` (``(layer, channel)`` pairs) on ``data``: one streaming pass keeps
    each unit's top-k images (:class:`~lightning_xai.interpretation.visualization.TopKBuffer`), then the crops of
    the receptive field (measured with :func:`receptive_field` unless given in ``fields``) around each image's
    strongest response, and the average crop. ``reshape``: how token layers become unit maps (see
    :class:`RelevantUnitAnalysis`); their units see the whole image, so their crops are the whole images."""
    check_int("k", k, minimum=1, owner="unit_visuals")
    units = [(resolve_layer(model, layer)[0], int(ch)) for layer, ch in units]
    if not units:
        return []
    layers = list(dict.fromkeys(layer for layer, _ in units))
    device = model_device(model)
    buffer = TopKBuffer(k, largest=True)
    seen = 0
    input_shape: tuple[int, int, int] | None = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(model_state_guard(model))
        stack.enter_context(torch.no_grad())
        captures = {layer: stack.enter_context(capture_layer(model, layer)) for layer in layers}
        for x, _ in iterate_batches(data, batch_size):
            if x.ndim != 4:
                raise ValueError(f"unit visuals need image batches [B, C, H, W], got {list(x.shape)}")
            input_shape = tuple(x.shape[1:])  # type: ignore[assignment]
            for cap in captures.values():
                cap.clear()
            model(x.to(device))
            scores, positions = [], []
            for layer, ch in units:
                act = _maps(captures[layer].activation, x, reshape, "unit_visuals", layer)
                if ch >= act.shape[1]:
                    raise ValueError(f"unit {ch} is out of range for layer {layer!r} with {act.shape[1]} units")
                amap = act[:, ch].float().cpu()
                if amap.ndim == 3:
                    flat = amap.flatten(1)
                    arg = flat.argmax(dim=1)
                    positions.append(torch.stack([arg // amap.shape[2], arg % amap.shape[2]], dim=1))
                    scores.append(flat.square().mean(1))
                else:
                    positions.append(torch.zeros(amap.shape[0], 2, dtype=torch.long))
                    scores.append(amap.reshape(amap.shape[0], -1).square().mean(1))
            buffer.update(
                torch.stack(scores, dim=1),
                torch.arange(seen, seen + x.shape[0]),
                rows={"images": x.cpu()},
                cells={"positions": torch.stack(positions, dim=1)},
            )
            seen += x.shape[0]
    if buffer.scores is None or input_shape is None:
        raise ValueError("the data is empty: there are no images to pick the units' top examples from")
    fields = dict(fields or {})
    for layer in layers:
        if layer not in fields:
            fields[layer] = receptive_field(model, layer, input_shape)
    visuals = []
    for u, (layer, ch) in enumerate(units):
        images = buffer.payload["images"][:, u]
        positions = buffer.payload["positions"][:, u]
        crops = crop_receptive_fields(images, positions, fields[layer])
        visuals.append(
            UnitVisual(layer, ch, buffer.indices[:, u], buffer.scores[:, u], images, positions, crops, crops.mean(0))
        )
    return visuals


# The constrained lasso and unit ablation live in their own modules; re-exported here, their historical path.
from lightning_xai.interpretation.unit_ablation import AblationReport, ablate_units, unit_ablation  # noqa: E402
