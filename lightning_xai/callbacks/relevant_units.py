"""``RelevantUnits``: the relevant units of each class, their visuals and an ablation check, during training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback
from lightning_xai.callbacks.logits import check_class_logits, probe_sample_names, recording_outputs
from lightning_xai.checks import check_bool, check_choice, check_int
from lightning_xai.interpretation.relevant_units import (
    AblationReport,
    RelevantUnitAnalysis,
    RelevantUnitsResult,
    unit_ablation,
    unit_visuals,
)
from lightning_xai.viz.logging import log_table
from lightning_xai.viz.render import tile_images, to_uint8_images, upscale_nearest

__all__ = ["RelevantUnits"]


class RelevantUnits(XAICallback):
    """The relevant units of each class (Oramas, Wang & Tuytelaars, "Visual Explanation by Interpretation:
    Improving Visual Feedback Capabilities of Deep Neural Networks", ICLR 2019) over a probe set of the training
    data, their visuals and an ablation check.

    The method is a configured :class:`~lightning_xai.interpretation.RelevantUnitAnalysis` (layers, l1 budget
    ``mu``, ``center``, ``reshape`` for a vision transformer's token layers); for compatibility a layer name or a
    list of them is accepted instead, with the old keywords ``mu`` and ``center``.

    Checked at setup: the layers exist (close names are suggested) and the batches have labels. Samples whose
    logits or unit features are NaN / inf are reported (once, by probe index) and left out of the lasso and of
    the ablation, so a NaN model never becomes "zero accuracy drop"; a class without finite samples has no drop.

    Logged: ``<log_key>/units`` - a table with one row per shown relevant unit (class, rank, layer, unit, weight,
    the average receptive-field crop of its top images, the strip of those crops); ``<log_key>/ablation`` - per
    class accuracy with the class's relevant units zeroed vs as many random units (when ``ablation``); metrics
    ``<log_key>/num_units`` (relevant units, all classes), ``<log_key>/stability`` (mean Jaccard overlap of each
    class's relevant set with the previous run's, from the second run on), ``<log_key>/relevant_drop`` and
    ``<log_key>/random_drop`` (accuracy drops averaged over classes). ``history`` keeps every run's relevant units
    and drops (resumable).

    Cost per run: one forward pass over the rank's share of ``num_samples`` probe samples (features and logits
    together), a lasso of ``num_samples x units`` on the CPU, ``2 + num_random`` forward passes over the share for
    the ablation, and, on rank zero, one more pass over the probe set for the visuals.

    DDP: unit features are computed per shard and gathered; the lasso (deterministic, on the CPU) runs on every
    rank; the ablation counts are computed per shard and summed; the visuals are made on rank zero.

    Args:
        analysis: the configured method (or, for compatibility, the layer name(s)).
        layers, mu, center: the old keywords, used to build the method when ``analysis`` is not a
            :class:`RelevantUnitAnalysis` (defaults ``mu=2.0``, ``center=True``).
        num_samples: probe samples (at least 2).
        split: ``"train"`` (default: what the model learned from) or ``"val"``.
        top_k: top images per unit in the visuals.
        units_per_class: relevant units shown per class.
        ablation: run the ablation check.
        num_random: random unit sets of the ablation.
        **kwargs: the common arguments of :class:`~lightning_xai.callbacks.base.XAICallback`.
    """

    state_fields = ("history",)
    needs_gradients = False

    def __init__(
        self,
        analysis: RelevantUnitAnalysis | str | Sequence[str] | None = None,
        *,
        layers: str | Sequence[str] | None = None,
        mu: float | None = None,
        center: bool | None = None,
        num_samples: int = 256,
        split: str = "train",
        top_k: int = 6,
        units_per_class: int = 3,
        ablation: bool = True,
        num_random: int = 3,
        batch_size: int = 64,
        log_key: str = "xai/relevant_units",
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        check_int("num_samples", num_samples, minimum=2, owner=name)
        check_choice("split", split, ("train", "val"), owner=name)
        super().__init__(num_samples=num_samples, split=split, batch_size=batch_size, log_key=log_key, **kwargs)
        self.analysis = self._method(analysis, layers, mu=mu, center=center)
        self.top_k = check_int("top_k", top_k, minimum=1, owner=name)
        self.units_per_class = check_int("units_per_class", units_per_class, minimum=1, owner=name)
        self.ablation = check_bool("ablation", ablation, owner=name)
        self.num_random = check_int("num_random", num_random, minimum=1, owner=name)
        #: One record per run: stage, epoch, step, ``units`` (class -> [[layer, unit, weight], ...]), the drops
        #: (``relevant_drop`` / ``random_drop`` per class, ``None`` for a class without finite samples) and
        #: ``nonfinite`` (probe samples left out) - resumable.
        self.history: list[dict[str, Any]] = []
        self.last_result: RelevantUnitsResult | None = None
        self.last_ablation: AblationReport | None = None

    def _method(self, analysis: Any, layers: Any, **legacy: Any) -> RelevantUnitAnalysis:
        given = {k: v for k, v in legacy.items() if v is not None}
        if isinstance(analysis, RelevantUnitAnalysis):
            if layers is not None or given:
                raise ValueError(
                    f"{self.name}: configure the given RelevantUnitAnalysis, not the callback: got it and also "
                    f"{sorted([*given, *(['layers'] if layers is not None else [])])}"
                )
            return analysis
        if analysis is not None and layers is not None:
            raise ValueError(f"{self.name}: the layers are given twice ({analysis!r} and layers={layers!r})")
        layers = analysis if analysis is not None else layers
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, Sequence) or not layers or not all(isinstance(x, str) and x for x in layers):
            raise ValueError(f"{self.name}: layers must be one or more dotted module names, got {layers!r}")
        try:
            return RelevantUnitAnalysis(
                list(layers), mu=given.get("mu", 2.0), batch_size=self.batch_size, center=given.get("center", True)
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.name}: {err}") from err

    @property
    def layers(self) -> list[Any]:
        return list(self.analysis.layers)

    def _state_key_parts(self) -> dict[str, Any]:
        return {"layers": [x if isinstance(x, str) else type(x).__name__ for x in self.layers]}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self._state_key_parts(), "mu": self.analysis.mu}

    # ------------------------------------------------------------------------------------------ setup
    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        model = self.layer_module(pl_module)
        for layer in self.layers:
            try:
                resolve_layer(model, layer)
            except (ValueError, TypeError) as err:
                raise ConfigurationError(f"{self.name}: {err}") from err
        if context.probe is not None and context.probe.labels is None:
            raise ConfigurationError(
                f"{self.name}: relevant units are fitted to class labels, but the {self.split} batches have none "
                "(set label_key=)"
            )
        if context.logits is not None:
            check_class_logits(self.name, context.logits, None, "relevant units are fitted to")
        if context.probe is not None:  # a token layer's reshape that fits no patch grid fails here, not later
            try:
                self.analysis.check_layers(model, context.probe.inputs[:1])
            except ValueError as err:
                raise ConfigurationError(f"{self.name}: the unit features cannot be read: {err}") from err

    # ------------------------------------------------------------------------------------------ work
    def _features(self, pl_module: Any, inputs: Tensor) -> tuple[Tensor, Tensor, list[tuple[str, int]]]:
        """Raw unit features and the logits, from one forward pass."""
        model = self.layer_module(pl_module)
        with recording_outputs(model, self.output_reader) as outputs:
            feats, _, units = self.analysis.features(model, inputs)
        return feats, torch.cat(outputs).float().cpu(), units

    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        model = self.layer_module(pl_module)
        probe = self.run_agreed(lambda: self.probe_shard(trainer, pl_module))
        if probe.labels is None:
            raise ValueError("relevant units need labelled data (set label_key=)")
        labels = probe.labels.long().reshape(-1)
        feats, logits, units = self.run_agreed(lambda: self._features(pl_module, probe.inputs))
        n = probe.num_real
        finite = torch.isfinite(feats).all(dim=1) & torch.isfinite(logits).all(dim=1)
        if n and not bool(finite[:n].all()):
            bad = probe_sample_names(probe, ~finite[:n])
            self.say_once(
                f"nonfinite-{bad}",
                f"NaN or inf logits or unit features for probe sample(s) {bad}; they are left out of the lasso and "
                "the ablation",
            )
        total = self.probe.size
        device = probe.inputs.device
        all_feats = self.gather(feats.to(device), total)
        all_labels = self.gather(labels.to(device), total)
        all_finite = self.gather(finite.to(device, torch.long), total).bool()
        num_classes = int(logits.shape[1])
        if int(all_finite.sum()) < 2:
            raise FloatingPointError(
                f"the model's logits or unit features are NaN or inf for {int((~all_finite).sum())} of {total} probe "
                "samples; too few finite samples to find relevant units"
            )
        result = self.analysis.fit_features(all_feats[all_finite], all_labels[all_finite], units, num_classes)
        self.last_result = result
        metrics: dict[str, float] = {f"{self.log_key}/num_units": float(result.mask.sum())}
        record = self.history_record(
            trainer,
            units={c: [list(u) for u in result.relevant(c)] for c in range(num_classes)},
            nonfinite=int((~all_finite).sum()),
        )
        if self.history:
            metrics[f"{self.log_key}/stability"] = self._stability(self.history[-1]["units"], record["units"])

        report = None
        if self.ablation:
            keep = finite[:n].to(probe.inputs.device)
            counts = self.run_agreed(lambda: self._ablation_counts(model, result, probe.inputs[:n][keep],
                                                                   labels[:n].to(keep.device)[keep], num_classes))
            counts = self.sum_over_ranks(counts.to(device)).cpu()
            per_class = torch.tensor(
                [sum(len(v) for v in result.units_by_layer(c).values()) for c in range(num_classes)]
            )
            report = AblationReport(counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3:], per_class)
            self.last_ablation = report
            seen = report.totals > 0
            if seen.any():
                metrics[f"{self.log_key}/relevant_drop"] = float(report.relevant_drop[seen].mean())
                metrics[f"{self.log_key}/random_drop"] = float(report.random_drop[seen].mean())
                record["relevant_drop"] = [float(v) if s else None for v, s in zip(report.relevant_drop, seen)]
                record["random_drop"] = [float(v) if s else None for v, s in zip(report.random_drop, seen)]
        self.history.append(record)

        if trainer.is_global_zero:
            self._log(trainer, pl_module, result, report)
        return metrics

    def _ablation_counts(
        self, model: Any, result: RelevantUnitsResult, inputs: Tensor, labels: Tensor, num_classes: int
    ) -> Tensor:
        """``[num_classes, 3 + num_random]``: totals, correct, correct with relevant / random units ablated."""
        if inputs.shape[0] == 0:
            return torch.zeros(num_classes, 3 + self.num_random, dtype=torch.long)
        rep = unit_ablation(
            model, result, (inputs, labels), num_random=self.num_random, seed=self.seed,
            batch_size=self.analysis.batch_size,
        )
        parts = [rep.totals[:, None], rep.base_correct[:, None], rep.relevant_correct[:, None]]
        return torch.cat([*parts, rep.random_correct], dim=1)

    @staticmethod
    def _stability(previous: Mapping[Any, list], current: Mapping[Any, list]) -> float:
        scores = []
        for c, units in current.items():
            before = {(u[0], int(u[1])) for u in previous.get(c, previous.get(str(c), []))}
            now = {(u[0], int(u[1])) for u in units}
            if before or now:
                scores.append(len(before & now) / len(before | now))
        return float(np.mean(scores)) if scores else 1.0

    def _probe_images(self, trainer: Any) -> Tensor:
        dataset = None if self.probe.fixed else self.dataset(trainer, self.split)
        return self.probe.load(dataset, list(range(self.probe.size))).inputs

    def _log(
        self, trainer: Any, pl_module: Any, result: RelevantUnitsResult, report: AblationReport | None
    ) -> None:
        step = self.logger_step(trainer)
        folder = os.path.dirname(self.output_path(trainer, "units"))  # <output_dir>/relevantunits
        outputs: list[str] = []
        shown: list[tuple[int, int, str, int, float]] = []
        for c in range(result.num_classes):
            for rank, (layer, unit, weight) in enumerate(
                result.relevant(c, positive_only=True)[: self.units_per_class]
            ):
                shown.append((c, rank, layer, unit, weight))
        if shown:
            images = self._probe_images(trainer)
            if images.ndim == 4:
                units = list(dict.fromkeys((layer, unit) for _, _, layer, unit, _ in shown))
                model = self.layer_module(pl_module)
                visuals = unit_visuals(
                    model, units, TensorDataset(images), k=self.top_k, reshape=self.analysis.reshape
                )
                by_unit = {(v.layer, v.unit): v for v in visuals}
                rows = []
                for c, rank, layer, unit, weight in shown:
                    visual = by_unit[(layer, unit)]
                    average = upscale_nearest(to_uint8_images(visual.average[None])[0])
                    strip = upscale_nearest(tile_images(to_uint8_images(visual.crops)))
                    rows.append([c, rank, layer, unit, weight, average, strip])
                columns = ["class", "rank", "layer", "unit", "weight", "average_crop", "top_crops"]
            else:
                rows = [[c, rank, layer, unit, weight] for c, rank, layer, unit, weight in shown]
                columns = ["class", "rank", "layer", "unit", "weight"]
            outputs += log_table(trainer.loggers, f"{self.log_key}/units", columns, rows, step=step,
                                 fallback_dir=folder)
        if report is not None and report.rows():
            columns = ["class", "samples", "units", "accuracy", "relevant_ablated", "random_ablated", "relevant_drop",
                       "random_drop"]
            outputs += log_table(trainer.loggers, f"{self.log_key}/ablation", columns, report.rows(), step=step,
                                 fallback_dir=folder)
        self.last_outputs = outputs
