"""``DissectionScores``: network dissection of one layer at validation epoch ends (or at the end of fit)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_xai.attribution.token_grid import Reshape
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback
from lightning_xai.callbacks.probe import split_sample
from lightning_xai.checks import check_int, suggest
from lightning_xai.distributed import shard_bounds
from lightning_xai.interpretation.compositional import CompositionalExplanation
from lightning_xai.interpretation.dissection import TABLE_COLUMNS, DissectionResult, NetworkDissection, mask_overlay
from lightning_xai.viz.logging import log_table
from lightning_xai.viz.render import tile_images

__all__ = ["DissectionScores"]

_RENDER = ("end", "every_run", "never")


class _ConceptBatches:
    """Re-iterable ``(images, concept_masks, dataset_indices)`` batches of chosen items of a concept dataset."""

    def __init__(self, dataset: Any, indices: Sequence[int], batch_size: int) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            chosen = torch.tensor(self.indices[start : start + self.batch_size], dtype=torch.long)
            yield _images(self.dataset, chosen), self.dataset.concept_masks_for(chosen), chosen


def _images(dataset: Any, indices: Tensor) -> Tensor:
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor):
        return images[indices]
    return torch.stack([torch.as_tensor(split_sample(dataset[int(i)])[0]) for i in indices.tolist()])


def _concept_dataset_problem(dataset: Any) -> str | None:
    missing = [a for a in ("concept_names", "concept_masks_for", "__len__", "__getitem__") if not hasattr(dataset, a)]
    if not missing:
        return None
    return (
        f"DissectionScores needs a concept dataset with pixel masks (e.g. lightning_xai.data.concepts."
        f"ConceptScenes: concept_names and concept_masks_for(indices) -> bool [n, C, H, W]); "
        f"{type(dataset).__name__} lacks {missing}"
    )


class DissectionScores(XAICallback):
    """Dissect a layer of the trained model on a fixed concept probe set and log which units detect which concepts.

    Runs a configured :class:`~lightning_xai.interpretation.dissection.NetworkDissection` (Bau et al., CVPR 2017:
    unit masks at the top ``quantile`` of each unit's activations, IoU with every concept's pixel masks, a unit is
    a detector if its best IoU exceeds ``iou_threshold``) at the end of every ``every_n_epochs``-th validation
    epoch (also during ``trainer.validate``; skipping the sanity check), or once at the end of fit
    (``every_n_epochs=None``). Logged on rank zero:

    * ``<log_key>/detectors`` and ``<log_key>/unique_detectors`` (metrics), and
      ``<log_key>/unique_detectors/<category>``;
    * table ``<log_key>/units``: one row per unit (unit, concept, category, IoU, detector), best first, plus the
      compositional formula when ``compositional_units > 0``;
    * table ``<log_key>/detectors_per_category`` (category, unique detectors, detector units: the bar chart of
      Bau et al.) and table ``<log_key>/units_per_concept`` (the histogram of detector labels);
    * table ``<log_key>/top_units``: the ``num_rendered_units`` best units, each with its top-activating probe
      images and the unit's thresholded mask overlaid. Rendered once at the end of fit from the last result
      (when it was computed on the final weights) and at every ``trainer.validate`` run - off the per-epoch path
      (``render="every_run"`` renders at every run, ``"never"`` not at all).

    The probe set (``num_samples`` items, drawn once with ``seed``) comes from ``probe_dataset`` or from the
    datamodule's ``split``; it must be a concept dataset such as
    :class:`~lightning_xai.data.concepts.ConceptScenes`: ``concept_names``, ``concept_masks_for(indices) ->
    bool [n, C, H, W]``, optionally ``categories`` and an ``images`` tensor. The layer may be a vision
    transformer's token layer ``[B, T, D]`` (its ``D`` channels are the units, on the patch grid; see ``reshape``).
    Data without concept masks, a layer that does not exist or outputs neither feature maps nor tokens that fit a
    patch grid, and fewer probe samples than processes are configuration errors raised at setup. Under DDP each
    rank dissects its shard of the probe set and the counts are all-reduced, so every rank holds the
    single-process result.

    Cost per run: about one forward pass up to ``layer`` over ``num_samples`` images (plus ``max_length - 1``
    passes when ``compositional_units > 0``); the rendering (one forward pass of at most ``num_rendered_units *
    top_k`` images, batched) happens once at the end of fit.

    Args:
        layer: dotted name of the layer to dissect, or a configured ``NetworkDissection`` (then ``quantile``,
            ``iou_threshold``, ``top_k`` and ``reshape`` come from it and must not be given).
        every_n_epochs: dissect every n-th validation epoch; ``None``: once at the end of fit.
        num_samples: probe images (at least the number of DDP ranks).
        probe_dataset: the concept dataset to draw from (``dataset=`` is the same); ``None``: the datamodule's
            ``split``.
        split: ``"val"`` (default), ``"train"`` or ``"test"``.
        iou_threshold, quantile, top_k, reshape: see
            :class:`~lightning_xai.interpretation.dissection.NetworkDissection` (defaults 0.04, 0.005, 4, None).
        batch_size: probe images per forward pass.
        seed: seed of the probe selection.
        when: deprecated; ``"fit_end"`` is ``every_n_epochs=None``.
        num_rendered_units: units shown with their top images (0: none).
        compositional_units: the best this many detector units also get a compositional explanation
            (Mu & Andreas, NeurIPS 2020) with ``beam_size`` and ``max_length``.
        on_error: ``"warn"`` (a runtime fault skips the run with a warning; training goes on) or ``"raise"``.
        log_key: prefix of everything logged.
        output_dir: where tables go for loggers without a directory and when there is no logger; ``None``:
            ``<default_root_dir>/xai/dissectionscores``; ``""``: nowhere.
        mean, std: input normalisation, undone for display.
        dissection: a configured ``NetworkDissection`` (the same as passing it as ``layer``).
        render: ``"end"`` (default), ``"every_run"`` or ``"never"``.
        **kwargs: the other common callback arguments of :class:`~lightning_xai.callbacks.base.XAICallback`.
    """

    state_fields = ("history",)
    needs_gradients = False

    def __init__(
        self,
        layer: str | NetworkDissection | None = None,
        every_n_epochs: int | None = 1,
        num_samples: int = 256,
        probe_dataset: Any = None,
        split: str = "val",
        iou_threshold: float | None = None,
        quantile: float | None = None,
        top_k: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
        when: str | None = None,
        num_rendered_units: int = 8,
        compositional_units: int = 0,
        beam_size: int = 5,
        max_length: int = 3,
        on_error: str = "warn",
        log_key: str = "xai/dissection",
        output_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        dissection: NetworkDissection | None = None,
        render: str = "end",
        reshape: Reshape = None,
        **kwargs: Any,
    ) -> None:
        if when is not None:
            if when not in ("validation_epoch_end", "fit_end"):
                raise ValueError(f"DissectionScores: when must be 'validation_epoch_end' or 'fit_end', got {when!r}")
            warnings.warn(
                "DissectionScores: when= is deprecated; use every_n_epochs=None for once at the end of fit",
                DeprecationWarning,
                stacklevel=2,
            )
            if when == "fit_end":
                every_n_epochs = None
        if probe_dataset is None:  # the common argument's name (XAICallback's dataset=)
            probe_dataset = kwargs.pop("dataset", None)
        elif kwargs.get("dataset") is not None:
            raise ValueError("DissectionScores: pass probe_dataset= or dataset=, not both")
        kwargs.pop("dataset", None)
        if probe_dataset is not None and _concept_dataset_problem(probe_dataset):
            raise ValueError(_concept_dataset_problem(probe_dataset))
        super().__init__(
            every_n_epochs=every_n_epochs, num_samples=num_samples, split=split, batch_size=batch_size, seed=seed,
            on_error=on_error, log_key=log_key, output_dir=output_dir or None, dataset=probe_dataset, **kwargs,
        )
        if isinstance(layer, NetworkDissection):
            if dissection is not None:
                raise ValueError(f"{self.name}: pass the NetworkDissection as layer= or dissection=, not both")
            layer, dissection = None, layer
        options = (("quantile", quantile), ("iou_threshold", iou_threshold), ("top_k", top_k), ("reshape", reshape))
        given = {k: v for k, v in options if v is not None}
        if dissection is not None:
            if not isinstance(dissection, NetworkDissection):
                raise ValueError(
                    f"{self.name}: dissection must be a NetworkDissection, got {type(dissection).__name__}"
                )
            if given or layer is not None:
                raise ValueError(
                    f"{self.name}: {sorted(given) or ['layer']} given together with a configured NetworkDissection; "
                    "set them on the NetworkDissection"
                )
        else:
            if not isinstance(layer, str) or not layer:
                raise ValueError(
                    f"{self.name}: layer must be a non-empty dotted module name or a NetworkDissection, got {layer!r}"
                )
            # validates layer type, quantile, iou_threshold, top_k and reshape now, not at the first epoch end
            try:
                dissection = NetworkDissection(layer, **given)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{self.name}: {err}") from err
        #: The configured method this callback runs.
        self.dissection = dissection
        self.layer = dissection.layer if isinstance(dissection.layer, str) else type(dissection.layer).__name__
        self.num_rendered_units = check_int("num_rendered_units", num_rendered_units, minimum=0, owner=self.name)
        self.compositional_units = check_int("compositional_units", compositional_units, minimum=0, owner=self.name)
        self.beam_size = check_int("beam_size", beam_size, minimum=1, owner=self.name)
        self.max_length = check_int("max_length", max_length, minimum=1, owner=self.name)
        if render not in _RENDER:
            raise ValueError(f"{self.name}: render must be one of {list(_RENDER)}, got {render!r}")
        self.render = render
        self.tables_dir = output_dir  # "" = nowhere
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)
        #: One entry per dissection: stage, epoch, step, detector counts - resumable through ``state_dict``.
        self.history: list[dict[str, Any]] = []
        #: The last result (identical on every rank) and compositional explanations, for inspection.
        self.last_result: DissectionResult | None = None
        self.last_explanations: list[CompositionalExplanation] = []
        self._last_dataset: Any = None
        self._last_step: int | None = None

    @property
    def probe_dataset(self) -> Any:
        return self.given_dataset

    @property
    def when(self) -> str:  # the name older code read
        return "fit_end" if self.every_n_epochs is None else "validation_epoch_end"

    @property
    def state_key(self) -> str:  # as before the port, so that older checkpoints load
        return self._generate_state_key(layer=self.layer, log_key=self.log_key)

    def settings(self) -> dict[str, Any]:
        d = self.dissection
        return {**super().settings(), "layer": self.layer, "quantile": d.quantile, "iou_threshold": d.iou_threshold}

    # ------------------------------------------------------------------------------------------------ setup
    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        dataset = context.dataset if context.dataset is not None else self.given_dataset
        problem = _concept_dataset_problem(dataset)
        if problem:
            raise ConfigurationError(f"{problem} (the {self.split} data; pass probe_dataset= or use concept data)")
        model = self.layer_module(pl_module)
        modules = dict(model.named_modules())
        layer = self.dissection.layer
        if isinstance(layer, str) and layer not in modules:
            raise ConfigurationError(
                f"{self.name}: layer {layer!r} is not a module of {type(model).__name__}; "
                f"{suggest(layer, [n for n in modules if n])}"
            )
        world = int(getattr(trainer, "world_size", 1))
        if self.probe is not None and self.probe.size < world:
            raise ConfigurationError(
                f"{self.name}: num_samples ({self.probe.size} probe images) must be at least the number of "
                f"processes ({world})"
            )
        if context.probe is not None:
            try:
                self.dissection.unit_masks(model, context.probe.inputs[:1], [0], torch.zeros(1),
                                           tuple(context.probe.inputs.shape[-2:]))
            except ValueError as err:
                raise ConfigurationError(f"{self.name}: layer {self.layer!r} cannot be dissected: {err}") from err

    # ------------------------------------------------------------------------------------------------ work
    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        result = self.dissect(trainer, pl_module)
        metrics = {
            f"{self.log_key}/detectors": float(result.num_detectors),
            f"{self.log_key}/unique_detectors": float(sum(result.unique_detectors_per_category().values())),
        }
        for category, count in result.unique_detectors_per_category().items():
            metrics[f"{self.log_key}/unique_detectors/{category}"] = float(count)
        return metrics

    def dissect(self, trainer: Any, pl_module: Any) -> DissectionResult:
        """Dissect now (every rank must call it), record the counts and log on rank zero; returns the result."""
        # trainer.validate runs under inference_mode; the dissection's own tensors stay ordinary tensors
        with torch.inference_mode(False):
            dataset = self.dataset(trainer, self.split)
            problem = _concept_dataset_problem(dataset)
            if problem:
                raise ValueError(problem)
            assert self.probe is not None
            indices = self.probe.select(dataset)
            world, rank = int(trainer.world_size), int(trainer.global_rank)
            if len(indices) < world:
                raise ValueError(f"num_samples ({len(indices)}) must be at least the number of processes ({world})")
            start, stop, _ = shard_bounds(len(indices), world, rank)
            data = _ConceptBatches(dataset, indices[start:stop], self.batch_size)
            dissection = self.dissection
            if dissection.reduce is None:  # the callback's ranks (a copy: the configured object is left alone)
                dissection = copy.copy(dissection)
                dissection.reduce = self.reducer
            names = list(dataset.concept_names)
            categories = getattr(dataset, "categories", None)
            model = self.layer_module(pl_module)
            result = dissection(model, data, names, categories)
            explanations: list[CompositionalExplanation] = []
            if self.compositional_units > 0:
                units = [row[0] for row in result.rows(only_detectors=True)[: self.compositional_units]]
                explanations = dissection.explain_compositional(
                    model, data, result, units, beam_size=self.beam_size, max_length=self.max_length
                )
        self.last_result = result
        self.last_explanations = explanations
        self._last_dataset = dataset
        self._last_step = int(trainer.global_step)
        self.history.append(
            self.history_record(
                trainer,
                detectors=result.num_detectors,
                unique_detectors=result.unique_detectors_per_category(),
                detector_units=result.detector_units_per_category(),
            )
        )
        if trainer.is_global_zero:
            try:
                render = self.render == "every_run" or (self.render == "end" and self.stage(trainer) != "fit")
                self._log(trainer, model, dataset, result, explanations, render=render)
            except Exception as err:  # rank zero only: must not change what the other ranks do next
                self.fault(trainer, "logging", err)
        return result

    # ------------------------------------------------------------------------------------------------ logging
    def _fallback(self, trainer: Any) -> str | None:
        if self.tables_dir == "":
            return None
        folder = self.tables_dir or f"{self._dir(trainer)}/{self.name.lower()}"
        stage = self.stage(trainer)
        # a validate / test run after fit has the fit's last step: its files go to their own folder, never over
        # the fit's (issue 19.6)
        return folder if stage == "fit" else f"{folder}/{stage}"

    def _table(self, trainer: Any, name: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        self.last_outputs.extend(
            log_table(trainer.loggers, f"{self.log_key}/{name}", columns, rows, step=trainer.global_step,
                      fallback_dir=self._fallback(trainer))
        )

    def _log(
        self,
        trainer: Any,
        model: Any,
        dataset: Any,
        result: DissectionResult,
        explanations: list[CompositionalExplanation],
        *,
        render: bool,
    ) -> None:
        formulas = {e.unit: e for e in explanations}
        columns = list(TABLE_COLUMNS)
        rows = result.rows()
        if formulas:
            columns += ["formula", "formula_iou"]
            rows = [
                [*row, formulas[row[0]].label, formulas[row[0]].iou] if row[0] in formulas else [*row, "", 0.0]
                for row in rows
            ]
        self._table(trainer, "units", columns, rows)
        unique = result.unique_detectors_per_category()
        units = result.detector_units_per_category()
        self._table(
            trainer,
            "detectors_per_category",
            ["category", "unique_detectors", "detector_units"],
            [[c, unique[c], units[c]] for c in unique],
        )
        histogram = result.units_per_concept()
        if histogram:
            category = dict(zip(result.concept_names, result.concept_categories))
            self._table(
                trainer, "units_per_concept", ["concept", "category", "units"],
                [[c, category[c], n] for c, n in histogram.items()],
            )
        if render:
            self._render(trainer, model, dataset, result)

    def _render(self, trainer: Any, model: Any, dataset: Any, result: DissectionResult) -> None:
        if self.num_rendered_units <= 0:
            return
        try:
            best = result.rows()[: self.num_rendered_units]
            strips = self.render_strips(model, result, dataset, [row[0] for row in best])
            self._table(
                trainer,
                "top_units",
                ["unit", "concept", "iou", "top_images"],
                [[row[0], row[1], row[3], strips[row[0]]] for row in best if row[0] in strips],
            )
        except Exception as err:  # pictures are a convenience; never lose the tables because of them
            self.say_once("render", f"could not render the top images: {type(err).__name__}: {err}")

    def render_strips(
        self, model: Any, result: DissectionResult, dataset: Any, units: Sequence[int], pad: int = 2
    ) -> dict[int, np.ndarray]:
        """Each unit's top-activating probe images side by side with the unit's thresholded mask overlaid
        (``uint8 [H, n * (W + pad) + pad, 3]``), from one batched forward pass over all units' images."""
        chosen = {int(u): [int(i) for i in result.top_indices[int(u)].tolist() if i >= 0] for u in units}
        chosen = {u: idx for u, idx in chosen.items() if idx}
        if not chosen:
            return {}
        unique = sorted({i for idx in chosen.values() for i in idx})
        images = _images(dataset, torch.tensor(unique, dtype=torch.long))
        order = list(chosen)
        masks = self.dissection.unit_masks(
            model, images, order, result.thresholds[torch.tensor(order)], tuple(images.shape[-2:])
        ).cpu()  # [N, U, H, W]
        position = {i: p for p, i in enumerate(unique)}
        strips: dict[int, np.ndarray] = {}
        for column, unit in enumerate(order):
            rows = torch.tensor([position[i] for i in chosen[unit]])
            tiles = mask_overlay(
                images[rows], masks[rows, column : column + 1], alpha=0.5, mean=self.mean, std=self.std
            )
            strips[unit] = tile_images(np.asarray(tiles), pad=pad)
        return strips

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if self.render != "end" or self.last_result is None or not trainer.is_global_zero:
            return
        if self._last_step != int(trainer.global_step):
            self.say_once(
                "render-stale",
                f"the top-unit images are not rendered: the last dissection (step {self._last_step}) is older than "
                f"the final weights (step {trainer.global_step}); use an every_n_epochs that divides max_epochs "
                "or render='every_run'",
            )
            return
        try:
            self._render(trainer, self.layer_module(pl_module), self._last_dataset, self.last_result)
        except Exception as err:
            self.fault(trainer, "render", err)
