"""``ExplanationMonitor``: explain a fixed probe set at validation epoch ends and log the heatmaps."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks.probe import ProbeBatch, ProbeSet
from lightning_xai.evaluation.similarity import spearman_correlation
from lightning_xai.viz.logging import log_image, log_table
from lightning_xai.viz.render import explanation_grid, overlay, save_png, to_uint8_images

__all__ = ["ExplanationMonitor"]

DEFAULT_ATTRIBUTORS = ("saliency", "integrated_gradients", "gradcam", "gradcam_plus_plus")


class ExplanationMonitor(Callback):
    """Explain the same probe samples at the end of validation epochs and log them, so that a W&B slider shows
    each explanation evolving over training.

    At each monitored validation epoch end (skipping Lightning's sanity check; also during ``trainer.validate``)
    the monitor computes every attributor on the probe set, logs one grid image per epoch (rows: samples;
    columns: input, then one overlay per method) with the true label and the prediction in the caption, a
    per-sample table, and, from the second epoch on, the **explanation drift** of each method: the mean
    Spearman rank correlation between this epoch's and the previous epoch's maps (``xai/drift/<method>``; 1 =
    unchanged ranking, 0 = unrelated). Samples whose map is constant have no rank correlation and are left out
    of the mean.

    Cost is bounded: ``num_samples`` probe images every ``every_n_epochs`` epochs; under DDP each rank explains
    ``num_samples / world_size`` of them and the maps are gathered, so every rank holds the same state and rank
    zero logs.

    Args:
        attributors: attributors, registered names (``"gradcam"``) or dicts ``{"name": ..., **kwargs}``.
        num_samples: number of probe samples, drawn once from the validation dataset with ``seed``.
        every_n_epochs: explain every n-th validation epoch.
        target: ``"prediction"`` (explain the predicted class), ``"label"`` (the true class) or a class index.
        seed: seed of the probe selection.
        probe_batch: a user-given batch (tensor, ``(x, y)`` tuple or dict) to explain instead of drawing one.
        on_error: ``"warn"`` (default: a failing method is skipped with a warning; training goes on) or
            ``"raise"``.
        log_key: prefix of everything logged.
        png_dir: where the grids are also written as PNG files; ``None`` means
            ``<trainer.default_root_dir>/explanations``; ``""`` disables PNG files.
        mean, std: per-channel normalisation of the inputs, undone for display (``None``: inputs are shown as
            they are, min-max scaled when outside [0, 1]).
        alpha: heatmap opacity of the overlays.
        percentile: robust scaling of each heatmap by this percentile of its absolute values.
        class_names: names used in captions instead of class indices.
    """

    def __init__(
        self,
        attributors: Sequence[str | dict | Attributor] = DEFAULT_ATTRIBUTORS,
        num_samples: int = 8,
        every_n_epochs: int = 1,
        target: Literal["prediction", "label"] | int = "prediction",
        seed: int = 0,
        probe_batch: Any = None,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai",
        png_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        alpha: float = 0.5,
        percentile: float = 99.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(attributors, (str, dict, Attributor)):
            attributors = [attributors]
        if not attributors:
            raise ValueError("ExplanationMonitor needs at least one attributor")
        self.attributors: dict[str, Attributor] = {}
        for spec in attributors:
            attributor = build_attributor(spec)
            key = attributor.name or type(attributor).__name__.lower()
            base, i = key, 2
            while key in self.attributors:
                key, i = f"{base}_{i}", i + 1
            self.attributors[key] = attributor
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if not (target in ("prediction", "label") or (isinstance(target, int) and not isinstance(target, bool))):
            raise ValueError(f"target must be 'prediction', 'label' or a class index, got {target!r}")
        if isinstance(target, int) and target < 0:
            raise ValueError(f"a class-index target must be >= 0, got {target}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.every_n_epochs = every_n_epochs
        self.target = target
        self.on_error = on_error
        self.log_key = log_key.rstrip("/")
        self.png_dir = png_dir
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)
        self.alpha = alpha
        self.percentile = percentile
        self.class_names = None if class_names is None else list(class_names)
        self.probe = ProbeSet(num_samples, seed)
        if probe_batch is not None:
            self.probe.set_batch(probe_batch)
        #: method -> list of (epoch, mean drift) - resumable through ``state_dict``.
        self.drift_history: dict[str, list[tuple[int, float]]] = {k: [] for k in self.attributors}
        self._previous_maps: dict[str, Tensor] = {}
        #: method -> last error message (for inspection and tests).
        self.errors: dict[str, str] = {}
        #: Files written on rank zero in the last logged epoch (for messages and tests).
        self.last_outputs: list[str] = []
        #: method -> drift of the last explained epoch (logged as ``<log_key>/drift/<method>``).
        self.last_drift: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(attributors=sorted(self.attributors), log_key=self.log_key)

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_indices": self.probe.indices,
            "drift_history": {k: [list(p) for p in v] for k, v in self.drift_history.items()},
            "previous_maps": {k: v.clone() for k, v in self._previous_maps.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.probe._fixed is None and state_dict.get("probe_indices") is not None:
            self.probe.indices = list(state_dict["probe_indices"])
        for k, v in state_dict.get("drift_history", {}).items():
            self.drift_history[k] = [(int(e), float(d)) for e, d in v]
        self._previous_maps = dict(state_dict.get("previous_maps", {}))

    # ------------------------------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        try:
            self.explain(trainer, pl_module)
            for name, value in self.last_drift.items():
                pl_module.log(f"{self.log_key}/drift/{name}", value, on_epoch=True, sync_dist=False)
        except Exception as err:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"ExplanationMonitor skipped epoch {trainer.current_epoch}: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------------------------------ work
    def _probe_dataset(self, trainer: pl.Trainer) -> Any:
        if self.probe._fixed is not None:
            return None
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None or not hasattr(loaders, "dataset"):
            raise ValueError("ExplanationMonitor found no validation dataloader; pass `probe_batch=`")
        return loaders.dataset

    def _targets(self, probe: ProbeBatch, logits: Tensor) -> Tensor:
        if self.target == "prediction":
            return logits.argmax(dim=1)
        if self.target == "label":
            if probe.labels is None:
                raise ValueError("target='label' needs labels in the validation data; use target='prediction'")
            return probe.labels.long()
        if self.target >= logits.shape[1]:
            raise ValueError(f"target class {self.target} is out of range for a model with {logits.shape[1]} outputs")
        return torch.full((logits.shape[0],), int(self.target), dtype=torch.long, device=logits.device)

    def explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Explain the probe set now and log the grid (rank zero); returns the gathered maps per method (identical
        on every rank). Usable outside the Trainer loop; the drift metric is logged by the epoch-end hook."""
        # Lightning's `trainer.validate` runs under inference_mode: tensors made there cannot enter autograd.
        with torch.inference_mode(False):
            return self._explain(trainer, pl_module)

    def _explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        dataset = self._probe_dataset(trainer)
        if dataset is not None:
            self.probe.select(dataset)
        world, rank = trainer.world_size, trainer.global_rank
        total = len(self.probe.indices or [])
        probe = self.probe.load_shard(dataset, world, rank).to(pl_module.device)
        inputs = probe.inputs
        with torch.no_grad():
            was_training = pl_module.training
            pl_module.eval()
            try:
                logits = pl_module(inputs)
            finally:
                pl_module.train(was_training)
        targets = self._targets(probe, logits)

        gather = trainer.strategy.all_gather
        maps: dict[str, Tensor] = {}
        for name, attributor in self.attributors.items():
            local, ok = None, 1.0
            try:
                local = attributor(pl_module, inputs, targets).float()
                if not torch.isfinite(local).all():
                    raise FloatingPointError("the attribution contains NaN or Inf")
            except Exception as err:
                ok = 0.0
                self.errors[name] = f"{type(err).__name__}: {err}"
                if self.on_error == "raise":
                    raise
                rank_zero_warn(f"ExplanationMonitor: {name} failed and is skipped: {self.errors[name]}")
            # every rank must agree before a collective, or a rank that failed would leave the others waiting
            flags = gather(torch.tensor([ok], device=pl_module.device)) if world > 1 else torch.tensor([ok])
            if float(flags.min()) < 1.0 or local is None:
                continue
            maps[name] = ProbeSet.gather(local, total, gather, world).detach().cpu()

        images = ProbeSet.gather(inputs, total, gather, world).detach().cpu()
        preds = ProbeSet.gather(logits.argmax(1), total, gather, world).cpu()
        labels = None if probe.labels is None else ProbeSet.gather(probe.labels, total, gather, world).cpu()

        epoch = trainer.current_epoch
        self.last_drift = self._update_drift(maps, epoch)
        if trainer.is_global_zero and maps:
            self._log(trainer, images, maps, labels, preds, epoch)
        return maps

    def _update_drift(self, maps: dict[str, Tensor], epoch: int) -> dict[str, float]:
        drifts: dict[str, float] = {}
        for name, current in maps.items():
            previous = self._previous_maps.get(name)
            if previous is not None and previous.shape == current.shape:
                corr = spearman_correlation(previous, current)
                valid = corr[~torch.isnan(corr)]
                if valid.numel():
                    drifts[name] = float(valid.mean())
                    self.drift_history.setdefault(name, []).append((epoch, drifts[name]))
            self._previous_maps[name] = current.clone()
        return drifts

    def _caption(self, labels: Tensor | None, preds: Tensor, epoch: int) -> str:
        def cname(i: int) -> str:
            return self.class_names[i] if self.class_names and 0 <= i < len(self.class_names) else str(i)

        rows = []
        for i in range(preds.shape[0]):
            true = f"true {cname(int(labels[i]))}, " if labels is not None else ""
            rows.append(f"#{i}: {true}pred {cname(int(preds[i]))}")
        methods = ", ".join(["input", *self.attributors])
        return f"epoch {epoch} | columns: {methods} | " + "; ".join(rows)

    def _log(
        self,
        trainer: pl.Trainer,
        images: Tensor,
        maps: dict[str, Tensor],
        labels: Tensor | None,
        preds: Tensor,
        epoch: int,
    ) -> None:
        grid = explanation_grid(
            images, maps, mean=self.mean, std=self.std, alpha=self.alpha, percentile=self.percentile
        )
        step = trainer.global_step
        caption = self._caption(labels, preds, epoch)
        outputs = list(log_image(trainer.loggers, f"{self.log_key}/explanations", grid, step=step, caption=caption))
        png_dir = self.png_dir
        if png_dir is None:
            png_dir = os.path.join(trainer.default_root_dir, "explanations")
        if png_dir:
            os.makedirs(png_dir, exist_ok=True)
            path = os.path.join(png_dir, f"{self.log_key.replace('/', '_')}_epoch{epoch:03d}_step{step:06d}.png")
            save_png(grid, path)
            outputs.append(path)
        inputs_u8 = to_uint8_images(images, mean=self.mean, std=self.std)
        overlays = {
            name: overlay(images, m, alpha=self.alpha, percentile=self.percentile, mean=self.mean, std=self.std)
            for name, m in maps.items()
        }
        rows = []
        for i in range(images.shape[0]):
            label = int(labels[i]) if labels is not None else -1
            rows.append(
                [self.probe.indices[i], label, int(preds[i]), np.asarray(inputs_u8[i])]
                + [np.asarray(overlays[name][i]) for name in maps]
            )
        columns = ["probe_index", "label", "prediction", "input", *maps]
        try:
            outputs += list(log_table(trainer.loggers, f"{self.log_key}/samples", columns, rows, step=step) or [])
        except Exception as err:  # a table is a convenience; never lose the grid because of it
            warnings.warn(f"ExplanationMonitor could not log the sample table: {err}", stacklevel=2)
        self.last_outputs = outputs
