"""Sanity checks for explanations (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for
Saliency Maps", NeurIPS 2018).

An explanation that is faithful to the model must change when the model changes. Two tests:

* **Model parameter randomisation** (:class:`ModelRandomization`): re-initialise layers from the output towards
  the input - cumulatively (``"cascading"``) or one at a time (``"independent"``) - and compare each new
  explanation with the original one. A method whose maps stay similar after the top layers are randomised
  (e.g. one that mostly reproduces the input's edges) fails.
* **Data randomisation** (:class:`DataRandomization`): train the same architecture on randomly permuted labels;
  explanations of that model should not resemble those of the model trained on the true labels.

Maps are compared per image by the measures of the paper: Spearman rank correlation of the signed maps
(``"spearman"``) and of their absolute values (``"spearman_abs"``), SSIM (``"ssim"``) and the Pearson correlation
of HOG features (``"hog_pearson"``). SSIM and HOG are computed on ``|map| / max|map|`` per image (in [0, 1]).
Channels are summed first. Undefined similarities (a constant map) are ``NaN`` and left out of every average.

The trained model is never modified: all work happens on a ``copy.deepcopy`` of it, and re-initialisation draws
from a forked RNG seeded by ``seed + layer index`` (the global RNG state is unchanged, and a layer gets the same
random weights in both modes).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import Target, model_state_guard, validate_target
from lightning_xai.attribution.layers import module_calls, resolve_layer
from lightning_xai.checks import check_choice
from lightning_xai.evaluation.base import check_image_batch, heatmap_batch
from lightning_xai.evaluation.scoring import AttributorSpec
from lightning_xai.evaluation.scoring import resolve_attributor as _resolve_attributor
from lightning_xai.evaluation.similarity import check_finite_maps, hog_pearson, spearman_correlation, ssim

__all__ = [
    "SIMILARITY_MEASURES",
    "DataRandomization",
    "DataRandomizationResult",
    "ModelRandomization",
    "RandomizationResult",
    "compare_maps",
    "parametrised_layers",
]

#: The similarity measures of Adebayo et al. 2018, by name.
SIMILARITY_MEASURES: tuple[str, ...] = ("spearman", "spearman_abs", "ssim", "hog_pearson")


def _unit_abs(maps: Tensor) -> Tensor:
    """``|m| / max|m|`` per map (an all-zero map stays zero)."""
    mag = maps.abs().double()
    peak = mag.flatten(1).max(dim=1).values.view(-1, *([1] * (maps.ndim - 1)))
    return mag / torch.where(peak > 0, peak, torch.ones_like(peak))


def compare_maps(a: Tensor, b: Tensor, measure: str) -> Tensor:
    """Similarity of two batches of maps ``[B, H, W]`` under one of :data:`SIMILARITY_MEASURES`,
    ``Tensor[B]`` (float64, ``NaN`` where undefined).

    SSIM uses the paper's 11x11 window, shrunk to the largest odd size that fits smaller maps. HOG is
    scikit-image's descriptor as the paper used it (8x8-pixel cells, 3x3-cell blocks, L2-Hys); on maps smaller
    than 24 pixels the cells shrink to ``side // 3`` pixels (and the blocks to the cells that fit). ``NaN`` or
    ``inf`` in a map raises a ``ValueError`` naming the samples.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of different shapes {list(a.shape)} and {list(b.shape)}")
    check_finite_maps(a, b)
    if measure == "spearman":
        return spearman_correlation(a, b)
    if measure == "spearman_abs":
        return spearman_correlation(a, b, absolute=True)
    side = min(a.shape[-2:])
    if measure == "ssim":
        window = min(11, side if side % 2 == 1 else side - 1)
        return ssim(_unit_abs(a), _unit_abs(b), data_range=1.0, window_size=window)
    if measure == "hog_pearson":
        cell = max(1, min(8, side // 3))
        return hog_pearson(_unit_abs(a), _unit_abs(b), cell_size=cell, block_size=min(3, side // cell))
    raise ValueError(f"unknown similarity measure {measure!r}; valid: {list(SIMILARITY_MEASURES)}")


def _check_measures(similarity: str | Sequence[str]) -> tuple[str, ...]:
    measures = (similarity,) if isinstance(similarity, str) else tuple(similarity)
    if not measures:
        raise ValueError(f"give at least one similarity measure of {list(SIMILARITY_MEASURES)}")
    for m in measures:
        check_choice("similarity measure", m, SIMILARITY_MEASURES, owner="sanity check")
    return measures


def _resettable(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None))


def parametrised_layers(model: nn.Module, inputs: Tensor) -> list[str]:
    """Names of the layers that own parameters and can be re-initialised (``reset_parameters()``), **top to
    bottom**: in reverse order of their first call in a forward pass of one sample (hooks removed after).

    Modules that own parameters but have no ``reset_parameters`` are skipped with a warning; modules that are
    not called in the forward pass are skipped.
    """
    layers, skipped = [], []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if _resettable(module):
            layers.append((name, module))
        else:
            skipped.append(name or type(module).__name__)
    order = list(dict.fromkeys(name for name, _ in module_calls(model, inputs, layers)))
    if skipped:
        warnings.warn(
            f"layers {skipped} own parameters but have no reset_parameters(); they are not randomised",
            stacklevel=3,
        )
    if not order:
        raise ValueError(f"{type(model).__name__} has no layer with parameters and reset_parameters() to randomise")
    return order[::-1]


def _reinitialise(module: nn.Module, seed: int) -> None:
    """``reset_parameters()`` on ``module`` and every submodule that has it, from a forked RNG seeded by
    ``seed`` (the global RNG state is restored afterwards)."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for sub in module.modules():
            if _resettable(sub):
                sub.reset_parameters()


def _predicted(model: nn.Module, inputs: Tensor) -> Tensor:
    with model_state_guard(model), torch.no_grad():
        output = model(inputs)
    if not isinstance(output, Tensor) or output.ndim != 2:
        raise ValueError("target=None explains the predicted class, which needs a model output [B, num_classes]")
    return output.argmax(dim=1)


def _explain(attributor: Callable, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
    """The channel-summed maps of ``attributor`` on ``model``, called as every evaluation entry point calls a
    callable: in eval mode under :func:`model_state_guard` (modes, ``requires_grad`` and ``.grad`` restored, so
    that dropout cannot change the maps between two identical runs and BatchNorm's running statistics stay as
    they are) and with the global RNG state restored afterwards."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), model_state_guard(model):
        maps = attributor(model, inputs, target)
    return heatmap_batch(maps, "attributions").detach()


def _check_target(target: Target | None, batch: int) -> None:
    if target is not None and not callable(target):
        validate_target(target, batch, None)


@dataclass
class RandomizationResult:
    """Outcome of :class:`ModelRandomization`.

    Step 0 is the unrandomised model compared with itself; step ``i >= 1`` is after randomising ``layers[i-1]``
    (cumulatively with all layers before it in ``"cascading"`` mode, alone in ``"independent"`` mode).

    Attributes:
        mode: ``"cascading"`` or ``"independent"``.
        layers: layer names in randomisation order (top to bottom).
        similarities: per measure, ``Tensor[len(layers) + 1, B]`` (float64, ``NaN`` where undefined).
        explanations: channel-summed maps ``Tensor[len(layers) + 1, B, H, W]`` if requested, else ``None``.
    """

    mode: str
    layers: list[str]
    similarities: dict[str, Tensor]
    explanations: Tensor | None = None

    def _measure(self, measure: str | None) -> str:
        if measure is None:
            return next(iter(self.similarities))
        if measure not in self.similarities:
            raise ValueError(f"measure {measure!r} was not computed; available: {list(self.similarities)}")
        return measure

    def curve(self, measure: str | None = None) -> Tensor:
        """Mean similarity over images (``NaN`` ignored) per step, ``Tensor[len(layers) + 1]``; entry 0 is the
        self-comparison. ``measure`` defaults to the first one computed."""
        return self.similarities[self._measure(measure)].nanmean(dim=1)

    def mean(self, measure: str | None = None) -> float:
        """Average similarity over all randomisation steps and images, **excluding** the self-comparison of
        step 0 (``NaN`` ignored)."""
        return float(self.similarities[self._measure(measure)][1:].nanmean())

    def passes(self, threshold: float = 0.5, measure: str | None = None, top_layers: int = 1) -> bool:
        """Whether the explanation method passes: its mean similarity after randomising the top ``top_layers``
        layers is below ``threshold``. Cascading mode looks at step ``top_layers`` (those layers randomised
        together); independent mode requires every one of steps ``1..top_layers`` to be below. An undefined
        (``NaN``) similarity does not pass."""
        if isinstance(top_layers, bool) or not isinstance(top_layers, int) or not 1 <= top_layers <= len(self.layers):
            raise ValueError(
                f"RandomizationResult.passes: top_layers must be an integer in 1..{len(self.layers)} (the number of "
                f"randomised layers), got {top_layers!r}"
            )
        curve = self.curve(measure)
        value = curve[top_layers] if self.mode == "cascading" else curve[1 : top_layers + 1].max()
        return bool(value < threshold)

    def as_table(self) -> list[dict[str, float | str | int]]:
        """One row per step - ``{"step", "layer", <measure>: mean similarity, ...}`` - for logging."""
        curves = {m: self.curve(m).tolist() for m in self.similarities}
        names = ["original", *self.layers]
        return [{"step": i, "layer": names[i], **{m: curves[m][i] for m in curves}} for i in range(len(names))]


class ModelRandomization:
    """Model parameter randomisation test (Adebayo et al., NeurIPS 2018).

    Args:
        attributor: an Attributor, a registered name / dict, or a callable ``(model, inputs, target) -> maps``.
        mode: ``"cascading"`` (randomise from the top layer down, cumulatively; default) or ``"independent"``
            (one layer at a time, the others trained).
        layers: layer names (dotted paths) or modules, in the order to randomise; a name may be a block
            (every submodule with ``reset_parameters`` in it is re-initialised). Default: every parametrised
            layer, top to bottom (:func:`parametrised_layers`).
        similarity: one or several of :data:`SIMILARITY_MEASURES` (default: all four).
        seed: re-initialisation seed (layer ``i`` uses ``seed + i``).
        return_explanations: keep every step's maps in the result (for plotting).

    ``check(model, inputs, target=None)`` (or calling the object) returns a :class:`RandomizationResult`.
    ``target=None`` explains the class the trained model predicts, for every step. The model itself is never
    modified (a deep copy is randomised); works inside ``torch.no_grad()`` / ``torch.inference_mode()``.
    """

    def __init__(
        self,
        attributor: AttributorSpec,
        mode: Literal["cascading", "independent"] = "cascading",
        layers: Sequence[str | nn.Module] | None = None,
        similarity: str | Sequence[str] = SIMILARITY_MEASURES,
        seed: int = 0,
        return_explanations: bool = False,
    ) -> None:
        self.attributor = _resolve_attributor(attributor)
        check_choice("mode", mode, ("cascading", "independent"), owner="ModelRandomization")
        self.mode = mode
        if layers is not None:
            if isinstance(layers, (str, nn.Module)):
                layers = [layers]
            layers = list(layers)
            if not layers:
                raise ValueError("layers must be None (all parametrised layers) or a non-empty list")
        self.layers = layers
        self.similarity = _check_measures(similarity)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.return_explanations = bool(return_explanations)

    def _layer_names(self, model: nn.Module, work: nn.Module, inputs: Tensor) -> list[str]:
        if self.layers is None:
            return parametrised_layers(work, inputs)  # a forward pass: on the copy, not the trained model
        names = []
        for layer in self.layers:
            name, module = resolve_layer(model, layer)
            if not any(_resettable(m) and any(True for _ in m.parameters(recurse=False)) for m in module.modules()):
                raise ValueError(f"layer {name!r} ({type(module).__name__}) has no parameters to re-initialise")
            names.append(name)
        return names

    def __call__(self, model: nn.Module, inputs: Tensor, target: Target | None = None) -> RandomizationResult:
        return self.check(model, inputs, target)

    def check(self, model: nn.Module, inputs: Tensor, target: Target | None = None) -> RandomizationResult:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_image_batch(inputs)
        _check_target(target, inputs.shape[0])
        # Parameters copied inside inference mode would become inference tensors that autograd cannot use.
        with torch.inference_mode(False):
            work = copy.deepcopy(model)
            names = self._layer_names(model, work, inputs)
            modules = dict(work.named_modules())
            x = inputs.detach().clone()
            if target is None:
                target = _predicted(work, x)
            reference = _explain(self.attributor, work, x, target)
            sims = {m: [compare_maps(reference, reference, m)] for m in self.similarity}
            maps = [reference] if self.return_explanations else []
            for i, name in enumerate(names):
                module = modules[name]
                saved = copy.deepcopy(module.state_dict()) if self.mode == "independent" else None
                _reinitialise(module, self.seed + i)
                explanation = _explain(self.attributor, work, x, target)
                for m in self.similarity:
                    sims[m].append(compare_maps(reference, explanation, m))
                if self.return_explanations:
                    maps.append(explanation)
                if saved is not None:
                    module.load_state_dict(saved)
        return RandomizationResult(
            mode=self.mode,
            layers=names,
            similarities={m: torch.stack(v) for m, v in sims.items()},
            explanations=torch.stack(maps) if maps else None,
        )


@dataclass
class DataRandomizationResult:
    """Outcome of :class:`DataRandomization`: per measure, the similarity ``Tensor[B]`` between the
    explanations of the model trained on true labels and of the one trained on permuted labels."""

    similarities: dict[str, Tensor]
    permutation: Tensor
    explanations: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def mean(self, measure: str | None = None) -> float:
        """Mean similarity over images (``NaN`` ignored); ``measure`` defaults to the first computed."""
        key = next(iter(self.similarities)) if measure is None else measure
        if key not in self.similarities:
            raise ValueError(f"measure {key!r} was not computed; available: {list(self.similarities)}")
        return float(self.similarities[key].nanmean())

    def passes(self, threshold: float = 0.5, measure: str | None = None) -> bool:
        """Whether the mean similarity is below ``threshold`` (``NaN`` does not pass)."""
        return bool(self.mean(measure) < threshold)


class DataRandomization:
    """Data randomisation test (Adebayo et al., NeurIPS 2018): explanations of a model trained on permuted
    labels should differ from those of the model trained on the true labels.

    Args:
        attributor: as for :class:`ModelRandomization`.
        similarity: one or several of :data:`SIMILARITY_MEASURES`.
        seed: seed of the label permutation.
        return_explanations: keep both models' maps in the result.

    ``check(train_fn, labels, inputs, target=None, model=None)``: ``train_fn(labels) -> nn.Module`` trains the
    architecture on the training set with the given labels (same order as the data). It is called with a
    permutation of ``labels`` (along dim 0), and with ``labels`` themselves unless the trained ``model`` is
    passed. ``target=None`` explains the class the true-label model predicts, for both models.
    """

    def __init__(
        self,
        attributor: AttributorSpec,
        similarity: str | Sequence[str] = SIMILARITY_MEASURES,
        seed: int = 0,
        return_explanations: bool = False,
    ) -> None:
        self.attributor = _resolve_attributor(attributor)
        self.similarity = _check_measures(similarity)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.return_explanations = bool(return_explanations)

    def check(
        self,
        train_fn: Callable[[Tensor], nn.Module],
        labels: Tensor,
        inputs: Tensor,
        target: Target | None = None,
        model: nn.Module | None = None,
    ) -> DataRandomizationResult:
        if not callable(train_fn):
            raise TypeError(f"train_fn must be a callable labels -> nn.Module, got {type(train_fn).__name__}")
        if not isinstance(labels, Tensor) or labels.ndim == 0 or labels.shape[0] < 2:
            raise ValueError("labels must be a Tensor with at least two entries along dim 0")
        check_image_batch(inputs)
        _check_target(target, inputs.shape[0])
        gen = torch.Generator().manual_seed(self.seed)
        permutation = torch.randperm(labels.shape[0], generator=gen)
        trained = train_fn(labels) if model is None else model
        randomised = train_fn(labels[permutation.to(labels.device)])
        for name, m in (("the true-label model", trained), ("train_fn(permuted labels)", randomised)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        x = inputs.detach()
        if target is None:
            target = _predicted(trained, x)
        a = _explain(self.attributor, trained, x, target)
        b = _explain(self.attributor, randomised, x, target)
        return DataRandomizationResult(
            similarities={m: compare_maps(a, b, m) for m in self.similarity},
            permutation=permutation,
            explanations=(a, b) if self.return_explanations else None,
        )

    __call__ = check
