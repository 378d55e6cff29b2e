"""``ExplanationQuality`` and ``SanityCheck``: how good the explanations are, measured during training."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks.probe import ProbeBatch, ProbeSet
from lightning_xai.evaluation import (
    AOPC,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    MaskIoU,
    ModelRandomization,
    PointingGame,
    RelevanceMass,
    RelevanceRank,
    Sparseness,
)
from lightning_xai.viz.logging import log_line_plot, log_table

__all__ = ["QUALITY_METRICS", "ExplanationQuality", "SanityCheck", "all_ranks_agree"]

#: Metric name -> (class, what its ``update`` needs): "model" (attributions, inputs, model, target), "mask"
#: (attributions, masks) or "maps" (attributions only).
QUALITY_METRICS: dict[str, tuple[type[Metric], str]] = {
    "deletion_auc": (DeletionAUC, "model"),
    "insertion_auc": (InsertionAUC, "model"),
    "aopc": (AOPC, "model"),
    "infidelity": (Infidelity, "model"),
    "pointing_game": (PointingGame, "mask"),
    "mask_iou": (MaskIoU, "mask"),
    "relevance_mass": (RelevanceMass, "mask"),
    "relevance_rank": (RelevanceRank, "mask"),
    "sparseness": (Sparseness, "maps"),
}
_CURVE_METRICS = ("deletion_auc", "insertion_auc", "aopc")


def all_ranks_agree(trainer: pl.Trainer, ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank. Call on every rank before a collective that a failure on one rank
    would otherwise leave the others waiting for."""
    if trainer.world_size == 1:
        return ok
    flags = trainer.strategy.all_gather(torch.tensor([1.0 if ok else 0.0], device=device))
    return bool(flags.min() > 0)


def _build_attributors(attributors: Sequence[str | dict | Attributor] | str | dict | Attributor) -> dict:
    if isinstance(attributors, (str, dict, Attributor)):
        attributors = [attributors]
    if not attributors:
        raise ValueError("at least one attributor is needed")
    built: dict[str, Attributor] = {}
    for spec in attributors:
        attributor = build_attributor(spec)
        key = attributor.name or type(attributor).__name__.lower()
        base, i = key, 2
        while key in built:
            key, i = f"{base}_{i}", i + 1
        built[key] = attributor
    return built


def _check_common(every_n_epochs: int, target: Any, on_error: str) -> None:
    if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
        raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
    if not (target in ("prediction", "label") or (isinstance(target, int) and not isinstance(target, bool))):
        raise ValueError(f"target must be 'prediction', 'label' or a class index, got {target!r}")
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")


def _val_dataset(trainer: pl.Trainer) -> Any:
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None or not hasattr(loaders, "dataset"):
        raise ValueError("found no validation dataloader to draw the probe set from")
    return loaders.dataset


def _targets(target: Any, probe: ProbeBatch, logits: Tensor) -> Tensor:
    if target == "prediction":
        return logits.argmax(dim=1)
    if target == "label":
        if probe.labels is None:
            raise ValueError("target='label' needs labels in the validation data; use target='prediction'")
        return probe.labels.long()
    if target >= logits.shape[1]:
        raise ValueError(f"target class {target} is out of range for a model with {logits.shape[1]} outputs")
    return torch.full((logits.shape[0],), int(target), dtype=torch.long, device=logits.device)


def _logits(pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            return pl_module(inputs)
    finally:
        pl_module.train(was_training)


class ExplanationQuality(Callback):
    """Score the explanations of a fixed probe set at validation epoch ends with the metrics of
    :mod:`lightning_xai.evaluation` and log them as ``<log_key>/<method>/<metric>``.

    Faithfulness metrics (deletion / insertion AUC of Petsiuk et al. 2018, AOPC of Samek et al. 2017,
    infidelity of Yeh et al. 2019) perturb the input and query the model; localisation metrics (pointing game,
    mask IoU as in Oramas et al. 2019, relevance mass / rank of Arras et al. 2022) compare the map with the
    ground-truth masks the data provides (``(image, label, mask)`` items; they are skipped with one warning when
    the data has no masks); sparseness is the Gini index of the map.

    DDP: every rank draws the same probe indices, explains its own contiguous shard, and updates its metric
    objects; ``compute()`` reduces the metric states across ranks (torchmetrics), so the logged value is the
    mean over the whole probe set on every rank.

    Args:
        attributors: attributors, registered names or ``{"name": ..., **kwargs}`` dicts.
        metrics: names from :data:`QUALITY_METRICS`.
        metric_kwargs: per-metric constructor arguments, e.g. ``{"deletion_auc": {"steps": 32}}``.
        num_samples: probe samples drawn once (seeded) from the validation set.
        every_n_epochs, target, seed, on_error, log_key: as for :class:`ExplanationMonitor`.
        log_curves: also log the mean deletion / insertion / AOPC curve of each method as a line plot.
    """

    def __init__(
        self,
        attributors: Sequence[str | dict | Attributor] = ("saliency", "gradcam"),
        metrics: Sequence[str] = ("deletion_auc", "insertion_auc", "pointing_game", "mask_iou", "relevance_mass"),
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        num_samples: int = 32,
        every_n_epochs: int = 1,
        target: Literal["prediction", "label"] | int = "label",
        seed: int = 0,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai",
        log_curves: bool = False,
    ) -> None:
        super().__init__()
        self.attributors = _build_attributors(attributors)
        if isinstance(metrics, str):
            metrics = [metrics]
        if not metrics:
            raise ValueError("ExplanationQuality needs at least one metric")
        unknown = [m for m in metrics if m not in QUALITY_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; valid metrics: {sorted(QUALITY_METRICS)}")
        self.metrics = list(dict.fromkeys(metrics))
        self.metric_kwargs = {k: dict(v) for k, v in (metric_kwargs or {}).items()}
        stray = [k for k in self.metric_kwargs if k not in self.metrics]
        if stray:
            raise ValueError(f"metric_kwargs given for metric(s) {stray} that are not in metrics={self.metrics}")
        for name in self.metrics:  # build once now so that bad kwargs fail at construction
            QUALITY_METRICS[name][0](**self.metric_kwargs.get(name, {}))
        _check_common(every_n_epochs, target, on_error)
        self.every_n_epochs = every_n_epochs
        self.target = target
        self.on_error = on_error
        self.log_key = log_key.rstrip("/")
        self.log_curves = log_curves
        self.probe = ProbeSet(num_samples, seed)
        #: (epoch, {"<method>/<metric>": value}) per evaluated epoch; resumable.
        self.history: list[tuple[int, dict[str, float]]] = []
        self.errors: dict[str, str] = {}
        self._warned_masks = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attributors=sorted(self.attributors), metrics=self.metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_indices": self.probe.indices, "history": [[e, dict(v)] for e, v in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe_indices") is not None:
            self.probe.indices = list(state_dict["probe_indices"])
        self.history = [(int(e), dict(v)) for e, v in state_dict.get("history", [])]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        try:
            values = self.evaluate(trainer, pl_module)
        except Exception as err:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"ExplanationQuality skipped epoch {trainer.current_epoch}: {type(err).__name__}: {err}")
            return
        for key, value in values.items():
            pl_module.log(f"{self.log_key}/{key}", value, on_epoch=True, sync_dist=False)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Compute every (method, metric) on the probe set now; returns ``{"<method>/<metric>": value}``, the same
        on every rank."""
        with torch.inference_mode(False):
            return self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        dataset = _val_dataset(trainer)
        self.probe.select(dataset)
        shard = self.probe.load_shard(dataset, trainer.world_size, trainer.global_rank).to(pl_module.device)
        n = shard.num_real
        inputs = shard.inputs
        targets = _targets(self.target, shard, _logits(pl_module, inputs))
        has_masks = all_ranks_agree(trainer, shard.masks is not None, pl_module.device)
        metrics = [m for m in self.metrics if has_masks or QUALITY_METRICS[m][1] != "mask"]
        if len(metrics) < len(self.metrics) and not self._warned_masks:
            self._warned_masks = True
            rank_zero_warn("ExplanationQuality: the validation data has no masks; localisation metrics are skipped")
        # a metric's curve() is a collective that fails on a rank without samples: only when every rank has some
        curves_ok = self.log_curves and all_ranks_agree(trainer, n > 0, pl_module.device)
        values: dict[str, float] = {}
        for method, attributor in self.attributors.items():
            maps, ok = None, True
            try:
                maps = attributor(pl_module, inputs, targets)
            except Exception as err:
                ok = False
                self.errors[method] = f"{type(err).__name__}: {err}"
                if self.on_error == "raise":
                    raise
                rank_zero_warn(f"ExplanationQuality: {method} failed and is skipped: {self.errors[method]}")
            if not all_ranks_agree(trainer, ok, pl_module.device) or maps is None:
                continue
            for name in metrics:
                cls, needs = QUALITY_METRICS[name]
                metric = cls(**self.metric_kwargs.get(name, {})).to(pl_module.device)
                if n > 0:
                    if needs == "model":
                        metric.update(maps[:n], inputs[:n], pl_module, targets[:n])
                    elif needs == "mask":
                        metric.update(maps[:n], shard.masks[:n])
                    else:
                        metric.update(maps[:n])
                with warnings.catch_warnings():  # a rank with an empty shard warns about compute before update
                    warnings.simplefilter("ignore")
                    values[f"{method}/{name}"] = float(metric.compute())
                    curve = metric.curve() if curves_ok and name in _CURVE_METRICS else None
                if curve is not None and trainer.is_global_zero:
                    xs, ys = curve
                    log_line_plot(
                        trainer.loggers,
                        f"{self.log_key}/{method}/{name}_curve",
                        xs.tolist(),
                        ys.tolist(),
                        step=trainer.global_step,
                        title=f"{name} curve of {method}",
                        x_label="fraction perturbed",
                        y_label="score",
                    )
        self.history.append((trainer.current_epoch, dict(values)))
        return values


class SanityCheck(Callback):
    """The model-parameter randomisation test of Adebayo et al. ("Sanity Checks for Saliency Maps", NeurIPS
    2018) at the end of fit (or every n epochs): for each attributor, re-initialise the layers from the top down
    on a deep copy of the model, recompute the probe set's explanations after each step, and log the similarity
    to the original explanations per layer (a line plot and a table per method), plus a pass/fail flag
    (``<log_key>/sanity/<method>/passes``: 1 when the mean similarity after randomising the top
    ``top_layers`` layers is below ``threshold``). The trained model is never touched.

    DDP: each rank checks its own shard of the probe set; the per-sample similarities are gathered, so every
    rank holds (and rank zero logs) the curves over the whole probe set.

    Args:
        attributors: attributors, registered names or dicts.
        mode: ``"cascading"`` or ``"independent"`` randomisation.
        similarity: the measure that decides pass/fail and is plotted (``"spearman"``, ``"spearman_abs"``,
            ``"ssim"``, ``"hog_pearson"``).
        threshold, top_layers: the pass criterion.
        layers: layers to randomise, top to bottom (default: every parametrised layer).
        num_samples, seed, target, on_error, log_key: as for :class:`ExplanationMonitor`.
        every_n_epochs: ``None`` runs once at the end of fit; an integer runs at every n-th validation epoch end.
    """

    def __init__(
        self,
        attributors: Sequence[str | dict | Attributor] = ("saliency", "gradcam"),
        mode: Literal["cascading", "independent"] = "cascading",
        similarity: str = "spearman_abs",
        threshold: float = 0.5,
        top_layers: int = 1,
        layers: Sequence[str] | None = None,
        num_samples: int = 8,
        every_n_epochs: int | None = None,
        target: Literal["prediction", "label"] | int = "prediction",
        seed: int = 0,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai",
    ) -> None:
        super().__init__()
        self.attributors = _build_attributors(attributors)
        _check_common(1 if every_n_epochs is None else every_n_epochs, target, on_error)
        if isinstance(top_layers, bool) or not isinstance(top_layers, int) or top_layers < 1:
            raise ValueError(f"top_layers must be an integer >= 1, got {top_layers!r}")
        self.checker_kwargs = {"mode": mode, "layers": None if layers is None else list(layers), "seed": seed}
        ModelRandomization(next(iter(self.attributors.values())), similarity=similarity, **self.checker_kwargs)
        self.similarity = similarity
        self.threshold = float(threshold)
        self.top_layers = top_layers
        self.every_n_epochs = every_n_epochs
        self.target = target
        self.on_error = on_error
        self.log_key = log_key.rstrip("/")
        self.probe = ProbeSet(num_samples, seed)
        #: method -> {"layers": [...], "curve": [...], "passes": bool} of the last check.
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attributors=sorted(self.attributors), mode=self.checker_kwargs["mode"])

    def state_dict(self) -> dict[str, Any]:
        return {"probe_indices": self.probe.indices, "results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe_indices") is not None:
            self.probe.indices = list(state_dict["probe_indices"])
        self.results = dict(state_dict.get("results", {}))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._run_safely(trainer, pl_module, log=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None:
            self._run_safely(trainer, pl_module, log=False)

    def _run_safely(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        try:
            self.check(trainer, pl_module)
        except Exception as err:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"SanityCheck skipped: {type(err).__name__}: {err}")
            return
        if log:  # inside the loop: also as logged metrics (at fit end they go to the loggers directly)
            for method, result in self.results.items():
                pl_module.log(f"{self.log_key}/sanity/{method}/passes", float(result["passes"]), sync_dist=False)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        """Run the randomisation test now; returns (and stores) the per-method results, the same on every rank."""
        with torch.inference_mode(False):
            return self._check(trainer, pl_module)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        dataset = _val_dataset(trainer)
        self.probe.select(dataset)
        total = len(self.probe.indices)
        world = trainer.world_size
        shard = self.probe.load_shard(dataset, world, trainer.global_rank).to(pl_module.device)
        targets = _targets(self.target, shard, _logits(pl_module, shard.inputs))
        gather = trainer.strategy.all_gather
        for method, attributor in self.attributors.items():
            result, ok = None, True
            try:
                checker = ModelRandomization(attributor, similarity=self.similarity, **self.checker_kwargs)
                result = checker(pl_module, shard.inputs, targets)
            except Exception as err:
                ok = False
                self.errors[method] = f"{type(err).__name__}: {err}"
                if self.on_error == "raise":
                    raise
                rank_zero_warn(f"SanityCheck: {method} failed and is skipped: {self.errors[method]}")
            if not all_ranks_agree(trainer, ok, pl_module.device) or result is None:
                continue
            per_sample = result.similarities[self.similarity].t().contiguous()  # [B_local, steps]
            gathered = ProbeSet.gather(per_sample.to(pl_module.device), total, gather, world).cpu()
            result.similarities = {self.similarity: gathered.t()}
            curve = result.curve(self.similarity)
            top = min(self.top_layers, len(result.layers))
            self.results[method] = {
                "layers": ["original", *result.layers],
                "curve": [float(v) for v in curve],
                "mean_excluding_original": result.mean(self.similarity),
                "passes": bool(result.passes(self.threshold, self.similarity, top)),
            }
        if trainer.is_global_zero:
            self._log(trainer)
        return self.results

    def _log(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        rows = []
        for method, res in self.results.items():
            log_line_plot(
                trainer.loggers,
                f"{self.log_key}/sanity/{method}",
                list(range(len(res["curve"]))),
                res["curve"],
                step=step,
                title=f"{method}: {self.similarity} similarity after randomising layers top-down",
                x_label="layers randomised",
                y_label=self.similarity,
            )
            rows += [[method, i, layer, value] for i, (layer, value) in enumerate(zip(res["layers"], res["curve"]))]
        if rows:
            log_table(
                trainer.loggers,
                f"{self.log_key}/sanity/table",
                ["method", "step", "layer", "similarity"],
                rows,
                step=step,
            )
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{self.log_key}/sanity/{m}/passes": float(r["passes"]) for m, r in self.results.items()}, step=step
            )
