"""``ExplanationMonitor``: explain a fixed probe set at validation epoch ends and log the heatmaps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks.base import ValidationContext, XAICallback, method_names
from lightning_xai.checks import check_float
from lightning_xai.evaluation.similarity import spearman_correlation
from lightning_xai.viz.logging import log_image, log_table
from lightning_xai.viz.render import explanation_grid, overlay, save_png, to_uint8_images

__all__ = ["DEFAULT_ATTRIBUTORS", "ExplanationMonitor"]

DEFAULT_ATTRIBUTORS = ("saliency", "integrated_gradients", "gradcam", "gradcam_plus_plus")


class ExplanationMonitor(XAICallback):
    """Explain the same probe samples at the end of validation epochs and log them, so that a W&B slider shows
    each explanation evolving over training.

    At each monitored validation epoch end (skipping Lightning's sanity check; also during ``trainer.validate``)
    the monitor computes every attributor on the probe set and logs one grid image (rows: samples; columns:
    input, then one overlay per method), a per-sample table and, from the second run on, the **explanation
    drift** of each method: the mean Spearman rank correlation between this run's and the previous run's maps
    (``<log_key>/drift/<method>``; 1 = unchanged ranking, 0 = unrelated). Samples whose map is constant have no
    rank correlation and are left out of the mean.

    Cost is bounded: ``num_samples`` probe samples every ``every_n_epochs`` epochs; under DDP each rank explains
    ``num_samples / world_size`` of them and the maps are gathered, so every rank holds the same state and rank
    zero logs.

    Args:
        attributors: attributors, registered names (``"gradcam"``) or dicts ``{"name": ..., **kwargs}``.
        num_samples: number of probe samples, drawn once from the validation dataset with ``seed``.
        png_dir: where the grids are also written as PNG files; ``None`` means ``<output_dir>/explanationmonitor``;
            ``""`` disables PNG files.
        mean, std: per-channel normalisation of the inputs, undone for display (``None``: inputs are shown as
            they are, min-max scaled when outside [0, 1]).
        alpha: heatmap opacity of the overlays.
        percentile: robust scaling of each heatmap by this percentile of its absolute values.
        class_names: names used in captions instead of class indices.
        **kwargs: the common callback arguments of :class:`~lightning_xai.callbacks.base.XAICallback`
            (``every_n_epochs``, ``target``, ``seed``, ``probe_batch``, ``on_error``, ``log_key``, ``split``,
            ``dataloader_idx``, ``input_key`` / ``label_key`` / ``output_key``, ``output_dir``, ...).
    """

    state_fields = ("history", "previous_maps")

    def __init__(
        self,
        attributors: Sequence[str | dict | Attributor] = DEFAULT_ATTRIBUTORS,
        num_samples: int = 8,
        *,
        png_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        alpha: float = 0.5,
        percentile: float = 99.0,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, **kwargs)
        if isinstance(attributors, (str, dict, Attributor)):
            attributors = [attributors]
        if not attributors:
            raise ValueError("ExplanationMonitor needs at least one attributor")
        self.attributors: dict[str, Attributor] = method_names(attributors, build_attributor)
        self.png_dir = png_dir
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, owner=self.name)
        self.percentile = check_float("percentile", percentile, minimum=0.0, maximum=100.0, owner=self.name)
        if self.percentile == 0.0:
            raise ValueError(f"{self.name}: percentile must be in (0, 100], got {percentile}")
        self.class_names = None if class_names is None else list(class_names)
        #: One record per run: stage, epoch, step and ``drift`` ({method: mean drift}) - resumable.
        self.history: list[dict[str, Any]] = []
        #: method -> the maps of the last run (the reference of the next drift).
        self.previous_maps: dict[str, Tensor] = {}
        #: method -> drift of the last run (logged as ``<log_key>/drift/<method>``).
        self.last_drift: dict[str, float] = {}

    def _state_key_parts(self) -> dict[str, Any]:
        return {"attributors": sorted(self.attributors)}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "methods": list(self.attributors)}

    @property
    def drift_history(self) -> dict[str, list[tuple[int, float]]]:
        """method -> ``[(epoch, drift), ...]`` over the runs (derived from :attr:`history`)."""
        out: dict[str, list[tuple[int, float]]] = {k: [] for k in self.attributors}
        for record in self.history:
            for method, value in record.get("drift", {}).items():
                out.setdefault(method, []).append((int(record["epoch"]), float(value)))
        return out

    @property
    def _previous_maps(self) -> dict[str, Tensor]:  # the name older scripts read
        return self.previous_maps

    # ------------------------------------------------------------------------------------------ setup
    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        self.dry_run_methods(pl_module, context, self.attributors)

    # ------------------------------------------------------------------------------------------ work
    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        self.explain(trainer, pl_module)
        return {f"{self.log_key}/drift/{name}": value for name, value in self.last_drift.items()}

    def explain(self, trainer: Any, pl_module: Any) -> dict[str, Tensor]:
        """Explain the probe set now and log the grid (rank zero); returns the gathered maps per method
        (identical on every rank). Usable outside the Trainer loop."""
        with torch.inference_mode(False):
            return self._explain(trainer, pl_module)

    def _explain(self, trainer: Any, pl_module: Any) -> dict[str, Tensor]:
        probe = self.probe_shard(trainer, pl_module)
        logits = self.eval_logits(pl_module, probe.inputs)
        real = torch.arange(probe.num_real, device=logits.device)
        finite = self.finite_rows(logits[real], None if probe.sample_ids is None else probe.sample_ids[real])
        resolved = self.resolve_targets(probe, logits)
        keep = (resolved.rows < probe.num_real) & finite[resolved.rows.clamp(max=max(probe.num_real - 1, 0))]
        if probe.num_real == 0:
            keep = torch.zeros_like(resolved.rows, dtype=torch.bool)
        resolved.rows = resolved.rows[keep]
        if isinstance(resolved.target, Tensor):
            resolved.target = resolved.target[keep]
        resolved.names = [n for n, k in zip(resolved.names, keep.tolist()) if k]

        local_maps = self.explain_rows(trainer, pl_module, self.attributors, probe, resolved)
        maps = {name: self.gather_rows(m) for name, m in local_maps.items()}
        rows = resolved.rows
        images = self.gather_rows(probe.inputs[rows])
        preds = self.gather_rows(logits[rows].argmax(1) if logits.ndim == 2 else torch.zeros_like(rows))
        probs = self.gather_rows(torch.softmax(logits[rows].float(), 1).amax(1) if logits.ndim == 2
                                 else torch.ones(rows.shape, device=rows.device))
        labels = None
        if probe.labels is not None and probe.labels.ndim == 1:
            labels = self.gather_rows(probe.labels[rows])
        ids = self.gather_rows(probe.sample_ids[rows]) if probe.sample_ids is not None else None

        self.last_drift = self._update_drift(maps)
        self.history.append(self.history_record(trainer, drift=dict(self.last_drift)))
        if trainer.is_global_zero and maps:
            self._log(trainer, images, maps, labels, preds, probs, ids)
        return maps

    def _update_drift(self, maps: dict[str, Tensor]) -> dict[str, float]:
        drifts: dict[str, float] = {}
        for name, current in maps.items():
            previous = self.previous_maps.get(name)
            if previous is not None and previous.shape == current.shape:
                corr = spearman_correlation(previous, current)
                valid = corr[~torch.isnan(corr)]
                if valid.numel():
                    drifts[name] = float(valid.mean())
            self.previous_maps[name] = current.clone()
        return drifts

    def _caption(self, labels: Tensor | None, preds: Tensor, trainer: Any) -> str:
        rows = []
        for i in range(preds.shape[0]):
            true = f"true {self.class_name(int(labels[i]))}, " if labels is not None else ""
            rows.append(f"#{i}: {true}pred {self.class_name(int(preds[i]))}")
        methods = ", ".join(["input", *self.attributors])
        return f"{self.stage(trainer)} epoch {trainer.current_epoch} | columns: {methods} | " + "; ".join(rows)

    def _log(
        self,
        trainer: Any,
        images: Tensor,
        maps: dict[str, Tensor],
        labels: Tensor | None,
        preds: Tensor,
        probs: Tensor,
        ids: Tensor | None,
    ) -> None:
        grid = explanation_grid(
            images, maps, mean=self.mean, std=self.std, alpha=self.alpha, percentile=self.percentile
        )
        step = trainer.global_step
        caption = self._caption(labels, preds, trainer)
        outputs = list(log_image(trainer.loggers, f"{self.log_key}/explanations", grid, step=step, caption=caption))
        if self.png_dir != "":
            path = self.output_path(trainer, f"{self.log_key}_explanations") if self.png_dir is None else None
            if path is None:
                os.makedirs(self.png_dir, exist_ok=True)
                path = os.path.join(
                    self.png_dir,
                    f"{self.log_key.replace('/', '_')}_{self.stage(trainer)}_epoch{trainer.current_epoch:03d}"
                    f"_step{step:06d}.png",
                )
            save_png(grid, path)
            outputs.append(path)
        inputs_u8 = to_uint8_images(images, mean=self.mean, std=self.std)
        overlays = {
            name: overlay(images, m, alpha=self.alpha, percentile=self.percentile, mean=self.mean, std=self.std)
            for name, m in maps.items()
        }
        rows = []
        for i in range(images.shape[0]):
            label = self.class_name(int(labels[i])) if labels is not None else ""
            pred = self.class_name(int(preds[i]))
            correct = bool(labels is not None and int(labels[i]) == int(preds[i]))
            rows.append(
                [int(ids[i]) if ids is not None else i, label, pred, float(probs[i]), correct,
                 np.asarray(inputs_u8[i])]
                + [np.asarray(overlays[name][i]) for name in maps]
            )
        columns = ["probe_index", "label", "prediction", "confidence", "correct", "input", *maps]
        try:
            outputs += list(log_table(trainer.loggers, f"{self.log_key}/samples", columns, rows, step=step) or [])
        except Exception as err:  # a table is a convenience; never lose the grid because of it
            self.say_once("table", f"could not log the sample table: {err}")
        self.last_outputs = outputs
