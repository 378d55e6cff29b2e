"""``DissectionScores``: network dissection of one layer at validation epoch ends (or at the end of fit)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_xai.callbacks.probe import ProbeSet, split_sample
from lightning_xai.interpretation.compositional import CompositionalExplanation
from lightning_xai.interpretation.dissection import TABLE_COLUMNS, DissectionResult, NetworkDissection
from lightning_xai.interpretation.quantiles import DistributedReducer, Reducer
from lightning_xai.viz.logging import log_table

__all__ = ["DissectionScores"]

_SPLITS = ("train", "val", "test")


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


class DissectionScores(Callback):
    """Dissect a layer of the trained model on a fixed concept probe set and log which units detect which concepts.

    Runs :class:`~lightning_xai.interpretation.dissection.NetworkDissection` (Bau et al., CVPR 2017: unit masks at
    the top ``quantile`` of each unit's activations, IoU with every concept's pixel masks, a unit is a detector
    if its best IoU exceeds ``iou_threshold``) at the end of every ``every_n_epochs``-th validation epoch (also
    during ``trainer.validate``; skipping the sanity check), or once at the end of fit. Logged on rank zero:

    * ``<log_key>/detectors`` and ``<log_key>/unique_detectors`` (metrics through ``pl_module.log``; at fit end
      through the loggers), and ``<log_key>/unique_detectors/<category>``;
    * table ``<log_key>/units``: one row per unit (unit, concept, category, IoU, detector), best first, plus the
      compositional formula when ``compositional_units > 0``;
    * table ``<log_key>/detectors_per_category`` (category, unique detectors, detector units: the bar chart of
      Bau et al.) and table ``<log_key>/units_per_concept`` (the histogram of detector labels);
    * table ``<log_key>/top_units``: the ``num_rendered_units`` best units, each with its top-activating probe
      images and the unit's thresholded mask overlaid.

    The probe set (``num_samples`` items, drawn once with ``seed``) comes from ``probe_dataset`` or from the
    datamodule's ``split``; it must be a concept dataset such as
    :class:`~lightning_xai.data.concepts.ConceptScenes`: ``concept_names``, ``concept_masks_for(indices) ->
    bool [n, C, H, W]``, optionally ``categories`` and an ``images`` tensor. Under DDP each rank dissects its
    shard of the probe set and the counts are all-reduced, so every rank holds the single-process result.

    Cost: about one forward pass up to ``layer`` over ``num_samples`` images every ``every_n_epochs`` epochs
    (plus ``max_length - 1`` passes when ``compositional_units > 0``, and one small forward pass on rank zero for
    the rendered units).

    Args:
        layer: dotted name of the layer to dissect.
        every_n_epochs: dissect every n-th validation epoch (``when="validation_epoch_end"``).
        num_samples: probe images (at least the number of DDP ranks).
        probe_dataset: the concept dataset to draw from; ``None``: the datamodule's ``split``.
        split: ``"val"`` (default), ``"train"`` or ``"test"``.
        iou_threshold, quantile, top_k: see :class:`~lightning_xai.interpretation.dissection.NetworkDissection`.
        batch_size: probe images per forward pass.
        seed: seed of the probe selection.
        when: ``"validation_epoch_end"`` or ``"fit_end"``.
        num_rendered_units: units shown with their top images (0: none).
        compositional_units: the best this many detector units also get a compositional explanation
            (Mu & Andreas, NeurIPS 2020) with ``beam_size`` and ``max_length``.
        on_error: ``"warn"`` (skip the epoch with a warning; training goes on) or ``"raise"``.
        log_key: prefix of everything logged.
        output_dir: where tables go for loggers without a directory and when there is no logger; ``None``:
            ``<trainer.default_root_dir>/dissection``; ``""``: nowhere.
        mean, std: input normalisation, undone for display.
    """

    def __init__(
        self,
        layer: str,
        every_n_epochs: int = 1,
        num_samples: int = 256,
        probe_dataset: Any = None,
        split: Literal["train", "val", "test"] = "val",
        iou_threshold: float = 0.04,
        quantile: float = 0.005,
        top_k: int = 4,
        batch_size: int = 32,
        seed: int = 0,
        when: Literal["validation_epoch_end", "fit_end"] = "validation_epoch_end",
        num_rendered_units: int = 8,
        compositional_units: int = 0,
        beam_size: int = 5,
        max_length: int = 3,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai/dissection",
        output_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a non-empty dotted module name, got {layer!r}")
        for name, value, low in (
            ("every_n_epochs", every_n_epochs, 1),
            ("batch_size", batch_size, 1),
            ("num_rendered_units", num_rendered_units, 0),
            ("compositional_units", compositional_units, 0),
            ("beam_size", beam_size, 1),
            ("max_length", max_length, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if when not in ("validation_epoch_end", "fit_end"):
            raise ValueError(f"when must be 'validation_epoch_end' or 'fit_end', got {when!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if probe_dataset is not None:
            _check_concept_dataset(probe_dataset)
        # validates layer type, quantile, iou_threshold and top_k now, not at the first epoch end
        self.dissection = NetworkDissection(layer, quantile=quantile, iou_threshold=iou_threshold, top_k=top_k)
        self.layer = layer
        self.every_n_epochs = every_n_epochs
        self.probe = ProbeSet(num_samples, seed)
        self.probe_dataset = probe_dataset
        self.split = split
        self.batch_size = batch_size
        self.when = when
        self.num_rendered_units = num_rendered_units
        self.compositional_units = compositional_units
        self.beam_size = beam_size
        self.max_length = max_length
        self.on_error = on_error
        self.log_key = log_key.rstrip("/")
        self.output_dir = output_dir
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)
        #: One entry per dissection: epoch, step, detector counts - resumable through ``state_dict``.
        self.history: list[dict[str, Any]] = []
        #: The last result (identical on every rank) and compositional explanations, for inspection.
        self.last_result: DissectionResult | None = None
        self.last_explanations: list[CompositionalExplanation] = []
        #: Destinations written by rank zero in the last dissection.
        self.last_outputs: list[str] = []
        #: Error messages of skipped dissections.
        self.errors: list[str] = []

    # ------------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, log_key=self.log_key)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_indices": self.probe.indices, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe_indices") is not None:
            self.probe.indices = [int(i) for i in state_dict["probe_indices"]]
        self.history = [dict(h) for h in state_dict.get("history", [])]

    # ------------------------------------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "validation_epoch_end" or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        metrics = self._run(trainer, pl_module)
        for key, value in metrics.items():
            # identical on every rank; sync_dist (a mean of equal values) only spares Lightning's DDP warning
            pl_module.log(key, value, on_epoch=True, sync_dist=trainer.world_size > 1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_end":
            return
        metrics = self._run(trainer, pl_module)
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        try:
            result = self.dissect(trainer, pl_module)
        except Exception as err:
            if self.on_error == "raise":
                raise
            message = f"{type(err).__name__}: {err}"
            self.errors.append(message)
            rank_zero_warn(f"DissectionScores skipped epoch {trainer.current_epoch}: {message}")
            return {}
        metrics = {
            f"{self.log_key}/detectors": float(result.num_detectors),
            f"{self.log_key}/unique_detectors": float(sum(result.unique_detectors_per_category().values())),
        }
        for category, count in result.unique_detectors_per_category().items():
            metrics[f"{self.log_key}/unique_detectors/{category}"] = float(count)
        return metrics

    # ------------------------------------------------------------------------------------------------ work
    def _dataset(self, trainer: pl.Trainer) -> Any:
        if self.probe_dataset is not None:
            return self.probe_dataset
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "dataset", None)):
            dataset = datamodule.dataset(self.split)
        else:
            loaders = {
                "train": lambda: trainer.train_dataloader,
                "val": lambda: trainer.val_dataloaders,
                "test": lambda: trainer.test_dataloaders,
            }[self.split]()
            if isinstance(loaders, list | tuple):
                loaders = loaders[0] if loaders else None
            dataset = getattr(loaders, "dataset", None)
            if dataset is None:
                raise ValueError(
                    f"DissectionScores found no {self.split} dataset; pass `probe_dataset=` (a concept dataset)"
                )
        _check_concept_dataset(dataset)
        return dataset

    def dissect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> DissectionResult:
        """Dissect now (every rank must call it), record the counts and log on rank zero; returns the result."""
        # trainer.validate runs under inference_mode; the dissection's own tensors stay ordinary tensors
        with torch.inference_mode(False):
            dataset = self._dataset(trainer)
            indices = self.probe.select(dataset)
            world, rank = trainer.world_size, trainer.global_rank
            if len(indices) < world:
                raise ValueError(f"num_samples ({len(indices)}) must be at least the number of processes ({world})")
            start, stop, _ = ProbeSet.shard_bounds(len(indices), world, rank)
            data = _ConceptBatches(dataset, indices[start:stop], self.batch_size)
            self.dissection.reduce = DistributedReducer(device=pl_module.device) if world > 1 else Reducer()
            names = list(dataset.concept_names)
            categories = getattr(dataset, "categories", None)
            result = self.dissection(pl_module, data, names, categories)
            explanations: list[CompositionalExplanation] = []
            if self.compositional_units > 0:
                units = [row[0] for row in result.rows(only_detectors=True)[: self.compositional_units]]
                explanations = self.dissection.explain_compositional(
                    pl_module, data, result, units, beam_size=self.beam_size, max_length=self.max_length
                )
        self.last_result = result
        self.last_explanations = explanations
        self.history.append(
            {
                "epoch": int(trainer.current_epoch),
                "step": int(trainer.global_step),
                "detectors": result.num_detectors,
                "unique_detectors": result.unique_detectors_per_category(),
                "detector_units": result.detector_units_per_category(),
            }
        )
        if trainer.is_global_zero:
            try:
                self._log(trainer, pl_module, dataset, result, explanations)
            except Exception as err:  # rank zero only: must not change what the other ranks do next
                if self.on_error == "raise":
                    raise
                self.errors.append(f"logging: {type(err).__name__}: {err}")
                rank_zero_warn(f"DissectionScores could not log its tables: {type(err).__name__}: {err}")
        return result

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataset: Any,
        result: DissectionResult,
        explanations: list[CompositionalExplanation],
    ) -> None:
        step = trainer.global_step
        fallback = self.output_dir
        if fallback is None:
            fallback = os.path.join(trainer.default_root_dir, "dissection")
        fallback = fallback or None
        outputs: list[str] = []

        def table(name: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
            outputs.extend(
                log_table(trainer.loggers, f"{self.log_key}/{name}", columns, rows, step=step, fallback_dir=fallback)
            )

        formulas = {e.unit: e for e in explanations}
        columns = list(TABLE_COLUMNS)
        rows = result.rows()
        if formulas:
            columns += ["formula", "formula_iou"]
            rows = [
                [*row, formulas[row[0]].label, formulas[row[0]].iou] if row[0] in formulas else [*row, "", 0.0]
                for row in rows
            ]
        table("units", columns, rows)
        unique = result.unique_detectors_per_category()
        units = result.detector_units_per_category()
        table(
            "detectors_per_category",
            ["category", "unique_detectors", "detector_units"],
            [[c, unique[c], units[c]] for c in unique],
        )
        histogram = result.units_per_concept()
        if histogram:
            category = dict(zip(result.concept_names, result.concept_categories))
            table(
                "units_per_concept",
                ["concept", "category", "units"],
                [[c, category[c], n] for c, n in histogram.items()],
            )
        if self.num_rendered_units > 0:
            try:
                best = result.rows()[: self.num_rendered_units]
                strips = self.dissection.render_top_images(
                    pl_module,
                    result,
                    lambda idx: _images(dataset, torch.tensor(idx, dtype=torch.long)),
                    [row[0] for row in best],
                    mean=self.mean,
                    std=self.std,
                )
                table(
                    "top_units",
                    ["unit", "concept", "iou", "top_images"],
                    [[row[0], row[1], row[3], strips[row[0]]] for row in best if row[0] in strips],
                )
            except Exception as err:  # pictures are a convenience; never lose the tables because of them
                warnings.warn(f"DissectionScores could not render the top images: {err}", stacklevel=2)
        self.last_outputs = outputs


def _check_concept_dataset(dataset: Any) -> None:
    missing = [a for a in ("concept_names", "concept_masks_for", "__len__", "__getitem__") if not hasattr(dataset, a)]
    if missing:
        raise ValueError(
            f"DissectionScores needs a concept dataset with pixel masks (e.g. lightning_xai.data.concepts."
            f"ConceptScenes); {type(dataset).__name__} lacks {missing}"
        )
