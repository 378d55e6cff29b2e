"""Callbacks that interpret what the model has learned, during training: TCAV scores, relevant units, class
prototypes (activation maximisation) and a 2-D embedding of a layer's features.

Each callback is a thin adapter over :mod:`lightning_xai.interpretation`: it picks its data, runs the method, makes
every rank agree, and logs on rank zero through :mod:`lightning_xai.viz.logging` (W&B tables and images, CSV / PNG
files for other loggers).

When they run. ``every_n_epochs=n`` runs at the end of every n-th validation epoch of ``trainer.fit`` (skipping
Lightning's sanity check) and at the end of every ``trainer.validate``; ``every_n_epochs=None`` runs once, at the
end of training (``on_train_end``). Their cost is bounded by the fixed-size probe sets and documented per class.

DDP. Every collective is run by every rank, and every rank takes part in an "everyone succeeded?" vote before each
collective, so a failure on one rank never leaves the others waiting. Per callback:

* :class:`TCAVScores` - the class inputs are sharded over ranks and the counts of positive sensitivities summed;
  the CAVs are trained on every rank from the same examples and rank zero's are broadcast, so all ranks score with
  identical CAVs. The result is identical on every rank (and equal to the single-process one).
* :class:`RelevantUnits` - unit features of the probe set are computed on each rank's shard and gathered; the lasso
  (cheap, deterministic, on the CPU) runs on every rank; the ablation counts are computed per shard and summed.
  The visuals (top images and receptive-field crops) are computed on rank zero only: one extra forward pass over
  the probe set, no collective.
* :class:`ClassPrototypes` - the classes are sharded over ranks (each image is seeded by its class position, so
  the images do not depend on the number of ranks) and gathered.
* :class:`EmbeddingProjector` - features are computed per shard and gathered; the projection (PCA / t-SNE, no
  collective) runs on rank zero only, and so do its metrics.

A failing computation never stops training with ``on_error="warn"`` (the default): the epoch is skipped with a
warning and the error is kept in ``errors``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.callbacks.probe import ProbeBatch, ProbeSet, split_sample
from lightning_xai.interpretation.embedding import LayerReduction, layer_features, project_features
from lightning_xai.interpretation.relevant_units import (
    AblationReport,
    RelevantUnitAnalysis,
    RelevantUnitsResult,
    unit_ablation,
    unit_visuals,
)
from lightning_xai.interpretation.tcav import TCAV, CAVBank, TCAVResult
from lightning_xai.interpretation.visualization import ActivationMaximization
from lightning_xai.viz.logging import log_image, log_table, logger_kind
from lightning_xai.viz.render import to_uint8_images

__all__ = ["ClassPrototypes", "EmbeddingProjector", "RelevantUnits", "TCAVScores", "log_scatter"]

Split = Literal["train", "val"]


# ---------------------------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------------------------


def log_scatter(
    loggers: Sequence[object] | None,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    x: str,
    y: str,
    step: int,
    title: str = "",
    fallback_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log a table of points and, for W&B, a ``wandb.plot.scatter`` of column ``y`` against column ``x`` built from
    it (key ``<key>_scatter``); other loggers get the table as CSV (:func:`~lightning_xai.viz.logging.log_table`).
    ``fallback_dir`` is used as by :func:`~lightning_xai.viz.logging.log_table`. Call on rank zero only. Returns
    the destinations written."""
    if x not in columns or y not in columns:
        raise ValueError(f"the scatter columns {x!r} and {y!r} must be among the table columns {list(columns)}")
    destinations = list(log_table(loggers, key, columns, rows, step=step, fallback_dir=fallback_dir))
    for logger in loggers or []:
        if logger_kind(logger) == "wandb":
            import wandb

            table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            chart = wandb.plot.scatter(table, x, y, title=title)
            logger.log_metrics({f"{key}_scatter": chart}, step=step)  # type: ignore[attr-defined]
            destinations.append(f"wandb:{key}_scatter")
    return destinations


def _tile(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``uint8 [n, H, W, 3]`` images into one ``uint8 [H', W', 3]`` image (white gaps), row by row."""
    n, h, w, _ = images.shape
    columns = n if columns is None else max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    return grid


def _upscale(image: np.ndarray, minimum: int = 32) -> np.ndarray:
    """Nearest-neighbour upscaling of a small ``[H, W, 3]`` image so that it is visible in a table."""
    factor = max(1, -(-minimum // max(1, min(image.shape[:2]))))
    return np.ascontiguousarray(image.repeat(factor, axis=0).repeat(factor, axis=1))


def _fallback_dir(trainer: pl.Trainer) -> str:
    """Where files go when the run has no logger with a directory of its own."""
    return os.path.join(trainer.default_root_dir, "interpretation")


class _StageFailed(RuntimeError):
    """Raised on every rank when some rank failed a stage (the failing rank raises its own error)."""


class _InterpretationCallback(Callback):
    """When to run, the error policy, data lookup, the cross-rank helpers and metric logging."""

    def __init__(
        self,
        *,
        every_n_epochs: int | None,
        on_error: Literal["warn", "raise"],
        log_key: str,
        seed: int,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and (
            isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1
        ):
            raise ValueError(
                f"every_n_epochs must be an integer >= 1 or None (at the end of fit), got {every_n_epochs!r}"
            )
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if not isinstance(log_key, str) or not log_key.strip("/"):
            raise ValueError(f"log_key must be a non-empty string, got {log_key!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.every_n_epochs = every_n_epochs
        self.on_error = on_error
        self.log_key = log_key.rstrip("/")
        self.seed = seed
        #: (epoch, message) of every failed run.
        self.errors: list[tuple[int, str]] = []
        #: Metrics of the last run (identical on every rank unless documented otherwise).
        self.last_metrics: dict[str, float] = {}
        #: Destinations written on rank zero by the last run.
        self.last_outputs: list[str] = []

    # ------------------------------------------------------------------------------------------------ when
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.run(trainer, pl_module, in_loop=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None:
            self.run(trainer, pl_module, in_loop=False)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, in_loop: bool = False) -> bool:
        """Compute and log now (usable outside the hooks); returns whether it succeeded."""
        self.last_outputs = []
        try:
            # Lightning's `trainer.validate` runs under inference_mode: tensors made there cannot enter autograd.
            with torch.inference_mode(False):
                metrics = self.compute(trainer, pl_module)
        except Exception as err:
            if self.on_error == "raise":
                raise
            message = f"{type(err).__name__}: {err}"
            self.errors.append((int(trainer.current_epoch), message))
            rank_zero_warn(f"{type(self).__name__} skipped epoch {trainer.current_epoch}: {message}")
            return False
        self.last_metrics = dict(metrics)
        self._log_metrics(trainer, pl_module, metrics, in_loop)
        return True

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def _log_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: Mapping[str, float], in_loop: bool
    ) -> None:
        if not metrics:
            return
        if in_loop and self._metrics_on_every_rank:
            for key, value in metrics.items():
                pl_module.log(key, float(value), on_epoch=True, sync_dist=False)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)

    #: Whether ``compute`` returns the same metrics on every rank (then they go through ``pl_module.log``).
    _metrics_on_every_rank = True

    # ------------------------------------------------------------------------------------------------ data
    def _dataset(self, trainer: pl.Trainer, split: str, given: Any = None) -> Any:
        if given is not None:
            return given
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "dataset", None)):
            try:
                return datamodule.dataset(split)
            except Exception:  # not this project's DataModule signature: fall back on the loaders
                pass
        loaders = trainer.val_dataloaders if split == "val" else trainer.train_dataloader
        if loaders is None and datamodule is not None:  # e.g. the train split during `trainer.validate`
            try:
                loaders = getattr(datamodule, f"{split}_dataloader")()
            except Exception:
                loaders = None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()), None)
        if loaders is None or not hasattr(loaders, "dataset"):
            raise ValueError(
                f"{type(self).__name__} found no {split} dataloader with a dataset; pass `dataset=` explicitly"
            )
        return loaders.dataset

    # ------------------------------------------------------------------------------------------------ ranks
    @staticmethod
    def _stage(trainer: pl.Trainer, device: torch.device, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on this rank; then every rank learns whether all succeeded, and all raise if one failed."""
        result, error = None, None
        try:
            result = fn()
        except Exception as err:
            error = err
        if trainer.world_size > 1:
            flags = trainer.strategy.all_gather(torch.tensor([0.0 if error else 1.0], device=device))
            if error is None and float(flags.min()) < 1.0:
                error = _StageFailed("another rank failed; see its warning")
        if error is not None:
            raise error
        return result

    @staticmethod
    def _sum_over_ranks(trainer: pl.Trainer, device: torch.device, value: Tensor) -> Tensor:
        if trainer.world_size == 1:
            return value
        gathered = trainer.strategy.all_gather(value.to(device))
        return gathered.sum(dim=0).to(value.device)

    @staticmethod
    def _gather_probe(trainer: pl.Trainer, device: torch.device, local: Tensor, total: int) -> Tensor:
        gather = trainer.strategy.all_gather
        if trainer.world_size == 1:
            return local[:total]
        return ProbeSet.gather(local.to(device), total, gather, trainer.world_size).cpu()


def _eval_forward(pl_module: pl.LightningModule, inputs: Tensor, batch_size: int = 64) -> Tensor:
    """Model outputs in eval mode under ``no_grad``, the module's modes restored (no BatchNorm statistics update)."""
    device = pl_module.device
    with model_state_guard(pl_module), torch.no_grad():
        return torch.cat(
            [pl_module(inputs[i : i + batch_size].to(device)).cpu() for i in range(0, inputs.shape[0], batch_size)]
        )


def _check_split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return split


def _probe_labels(probe: ProbeBatch, who: str) -> Tensor:
    if probe.labels is None:
        raise ValueError(f"{who} needs labelled data: the dataset items must be (input, label, ...)")
    return probe.labels.long().reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# TCAV
# ---------------------------------------------------------------------------------------------------------------


class TCAVScores(_InterpretationCallback):
    """TCAV scores (Kim et al., ICML 2018) of every (class, concept) pair at one layer, with their significance.

    Concepts are given as example tensors ``{name: Tensor[n, C, H, W]}`` together with ``random_examples`` (a pool
    the random sets are drawn from), or as concept names of a concept dataset - any object with
    ``concept_examples(name, n, seed)`` and ``random_examples(n, seed)``, such as
    :class:`lightning_xai.data.concepts.ConceptScenes` - passed as ``concept_data`` or found as the ``split``
    dataset itself. The class inputs are ``num_samples`` probe images of ``split`` (drawn once, seeded), each
    explained for its own label.

    Logged: a table ``<log_key>/scores`` (class, concept, score, std, random score, p-value, significant, CAV
    accuracy), the metric ``<log_key>/<class>/<concept>`` (the TCAV score) and ``<log_key>/num_significant``.
    ``history`` keeps every run's rows (resumable). Cost per run: forward passes over the concept and random
    examples (every rank), ``(num_concepts + 1) * num_random`` small logistic regressions (every rank), and one
    forward + backward pass over the rank's share of the probe set.
    """

    def __init__(
        self,
        layer: str,
        concepts: Mapping[str, Tensor] | Sequence[str],
        *,
        random_examples: Tensor | None = None,
        concept_data: Any = None,
        num_concept_examples: int = 30,
        num_random_examples: int = 100,
        num_random: int = 10,
        num_samples: int = 64,
        classes: Sequence[int] | None = None,
        split: Split = "val",
        dataset: Any = None,
        alpha: float = 0.05,
        l2: float = 1e-2,
        batch_size: int = 32,
        every_n_epochs: int | None = 1,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai/tcav",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, on_error=on_error, log_key=log_key, seed=seed)
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a dotted module name, got {layer!r}")
        if isinstance(concepts, Mapping):
            if not concepts:
                raise ValueError("concepts must not be empty")
            for name, value in concepts.items():
                if not isinstance(value, Tensor) or not value.is_floating_point() or value.ndim < 2:
                    raise ValueError(f"concept {name!r} must be a float example tensor [n, ...], got {type(value)}")
            if not isinstance(random_examples, Tensor):
                raise ValueError("concepts given as example tensors need random_examples= (a tensor of random inputs)")
        else:
            if isinstance(concepts, str) or not concepts or not all(isinstance(c, str) for c in concepts):
                raise ValueError(f"concepts must be a mapping name -> examples or a list of names, got {concepts!r}")
            if random_examples is not None and not isinstance(random_examples, Tensor):
                raise ValueError("random_examples must be a tensor of random inputs")
        for name, value in (
            ("num_concept_examples", num_concept_examples),
            ("num_random_examples", num_random_examples),
            ("num_samples", num_samples),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        self.tcav = TCAV(layer, num_random=num_random, l2=l2, alpha=alpha, batch_size=batch_size, seed=seed)
        self.layer = layer
        self.concepts = dict(concepts) if isinstance(concepts, Mapping) else list(concepts)
        self.random_examples = random_examples
        self.concept_data = concept_data
        self.num_concept_examples = num_concept_examples
        self.num_random_examples = num_random_examples
        self.classes = None if classes is None else [int(c) for c in classes]
        self.split = _check_split(split)
        self.dataset = dataset
        self.probe = ProbeSet(num_samples, seed)
        #: ``(epoch, rows)`` of every run; rows as in :data:`TCAVResult.COLUMNS`.
        self.history: list[tuple[int, list[list[Any]]]] = []
        self.last_result: TCAVResult | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, log_key=self.log_key)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_indices": self.probe.indices, "history": [[e, rows] for e, rows in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe_indices") is not None:
            self.probe.indices = list(state_dict["probe_indices"])
        self.history = [(int(e), [list(r) for r in rows]) for e, rows in state_dict.get("history", [])]

    def _examples(self, dataset: Any) -> tuple[dict[str, Tensor], Tensor]:
        if isinstance(self.concepts, dict):
            return self.concepts, self.random_examples  # type: ignore[return-value]
        source = self.concept_data if self.concept_data is not None else dataset
        if not callable(getattr(source, "concept_examples", None)) or (
            self.random_examples is None and not callable(getattr(source, "random_examples", None))
        ):
            raise ValueError(
                "concepts given by name need a concept dataset with concept_examples(name, n, seed) and "
                "random_examples(n, seed) (e.g. ConceptScenes): pass concept_data= or use such a dataset"
            )
        examples = {
            name: source.concept_examples(name, self.num_concept_examples, seed=self.seed + i)
            for i, name in enumerate(self.concepts)
        }
        pool = self.random_examples
        if pool is None:
            pool = source.random_examples(self.num_random_examples, seed=self.seed + 7919)
        return examples, pool

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        device = pl_module.device
        dataset = self._dataset(trainer, self.split, self.dataset)

        def fit() -> tuple[CAVBank, ProbeBatch]:
            concepts, pool = self._examples(dataset)
            bank = self.tcav.fit_cavs(pl_module, concepts, pool)
            self.probe.select(dataset)
            return bank, self.probe.load_shard(dataset, trainer.world_size, trainer.global_rank)

        bank, probe = self._stage(trainer, device, fit)
        if trainer.world_size > 1:  # score with rank zero's CAVs everywhere
            bank.vectors = trainer.strategy.broadcast(bank.vectors, src=0)
            bank.accuracies = trainer.strategy.broadcast(bank.accuracies, src=0)

        def count() -> tuple[Tensor, Tensor]:
            inputs = probe.inputs[: probe.num_real]
            labels = _probe_labels(probe, "TCAVScores")[: probe.num_real]
            num_outputs = int(_eval_forward(pl_module, probe.inputs[:1]).shape[1])
            classes = self.classes if self.classes is not None else list(range(num_outputs))
            if inputs.shape[0] == 0:
                return (
                    torch.zeros(len(classes), bank.vectors.shape[0], dtype=torch.long),
                    torch.zeros(len(classes), dtype=torch.long),
                )
            return self.tcav.counts(pl_module, inputs, labels, bank, classes)

        positive, totals = self._stage(trainer, device, count)
        positive = self._sum_over_ranks(trainer, device, positive)
        totals = self._sum_over_ranks(trainer, device, totals)
        classes = self.classes if self.classes is not None else list(range(positive.shape[0]))
        result = TCAVResult.from_counts(bank, classes, positive.cpu(), totals.cpu(), self.tcav.alpha)
        self.last_result = result
        epoch = int(trainer.current_epoch)
        self.history.append((epoch, result.rows()))
        if trainer.is_global_zero:
            self.last_outputs = list(
                log_table(
                    trainer.loggers,
                    f"{self.log_key}/scores",
                    list(TCAVResult.COLUMNS),
                    result.rows(),
                    step=trainer.global_step,
                    fallback_dir=_fallback_dir(trainer),
                )
            )
        metrics = {f"{self.log_key}/{e.target}/{e.concept}": e.score for e in result.entries}
        metrics[f"{self.log_key}/num_significant"] = float(sum(e.significant for e in result.entries))
        return metrics


# ---------------------------------------------------------------------------------------------------------------
# relevant units
# ---------------------------------------------------------------------------------------------------------------


class RelevantUnits(_InterpretationCallback):
    """The relevant units of each class (Oramas et al., ICLR 2019) over a probe set of the training data, their
    visuals and an ablation check.

    Logged: ``<log_key>/units`` - a table with one row per shown relevant unit (class, rank, layer, unit, weight,
    the average receptive-field crop of its top images, the strip of those crops); ``<log_key>/ablation`` - per
    class accuracy with the class's relevant units zeroed vs as many random units (when ``ablation``); metrics
    ``<log_key>/num_units`` (relevant units, all classes), ``<log_key>/stability`` (mean Jaccard overlap of each
    class's relevant set with the previous run's, from the second run on), ``<log_key>/relevant_drop`` and
    ``<log_key>/random_drop`` (accuracy drops averaged over classes). ``history`` keeps every run's relevant units
    and drops (resumable).

    Cost per run: one forward pass over the rank's share of ``num_samples`` probe images, a lasso of
    ``num_samples x units`` on the CPU, ``2 + num_random`` forward passes over the share for the ablation, and, on
    rank zero, one more pass over the probe set for the visuals.
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        mu: float = 2.0,
        num_samples: int = 256,
        split: Split = "train",
        dataset: Any = None,
        top_k: int = 6,
        units_per_class: int = 3,
        ablation: bool = True,
        num_random: int = 3,
        center: bool = True,
        batch_size: int = 64,
        every_n_epochs: int | None = 1,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai/relevant_units",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, on_error=on_error, log_key=log_key, seed=seed)
        if isinstance(layers, str):
            layers = [layers]
        if not layers or not all(isinstance(layer, str) and layer for layer in layers):
            raise ValueError(f"layers must be one or more dotted module names, got {layers!r}")
        self.analysis = RelevantUnitAnalysis(list(layers), mu=mu, batch_size=batch_size, center=center)
        for name, value, minimum in (
            ("num_samples", num_samples, 2),
            ("top_k", top_k, 1),
            ("units_per_class", units_per_class, 1),
            ("num_random", num_random, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        self.layers = list(layers)
        self.split = _check_split(split)
        self.dataset = dataset
        self.top_k = top_k
        self.units_per_class = units_per_class
        self.ablation = bool(ablation)
        self.num_random = num_random
        self.probe = ProbeSet(num_samples, seed)
        #: One dict per run: ``epoch``, ``units`` (class -> [[layer, unit, weight], ...]) and the drops.
        self.history: list[dict[str, Any]] = []
        self.last_result: RelevantUnitsResult | None = None
        self.last_ablation: AblationReport | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, log_key=self.log_key)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_indices": self.probe.indices, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe_indices") is not None:
            self.probe.indices = list(state_dict["probe_indices"])
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        device = pl_module.device
        dataset = self._dataset(trainer, self.split, self.dataset)

        def features() -> tuple[ProbeBatch, Tensor, Tensor, list[tuple[str, int]]]:
            self.probe.select(dataset)
            probe = self.probe.load_shard(dataset, trainer.world_size, trainer.global_rank)
            labels = _probe_labels(probe, "RelevantUnits")
            feats, _, units = self.analysis.features(pl_module, probe.inputs)
            return probe, feats, labels, units

        probe, feats, labels, units = self._stage(trainer, device, features)
        total = len(self.probe.indices or [])
        all_feats = self._gather_probe(trainer, device, feats, total).cpu()
        all_labels = self._gather_probe(trainer, device, labels, total).cpu()
        num_classes = int(_eval_forward(pl_module, probe.inputs[:1]).shape[1])
        result = self.analysis.fit_features(all_feats, all_labels, units, num_classes)
        self.last_result = result
        metrics: dict[str, float] = {f"{self.log_key}/num_units": float(result.mask.sum())}
        record: dict[str, Any] = {
            "epoch": int(trainer.current_epoch),
            "units": {c: [list(u) for u in result.relevant(c)] for c in range(num_classes)},
        }
        if self.history:
            metrics[f"{self.log_key}/stability"] = self._stability(self.history[-1]["units"], record["units"])

        report = None
        if self.ablation:

            def ablate() -> Tensor:
                n = probe.num_real
                if n == 0:
                    return torch.zeros(num_classes, 3 + self.num_random, dtype=torch.long)
                rep = unit_ablation(
                    pl_module,
                    result,
                    (probe.inputs[:n], labels[:n]),
                    num_random=self.num_random,
                    seed=self.seed,
                    batch_size=self.analysis.batch_size,
                )
                parts = [rep.totals[:, None], rep.base_correct[:, None], rep.relevant_correct[:, None]]
                return torch.cat([*parts, rep.random_correct], dim=1)

            counts = self._stage(trainer, device, ablate)
            counts = self._sum_over_ranks(trainer, device, counts).cpu()
            per_class = torch.tensor(
                [sum(len(v) for v in result.units_by_layer(c).values()) for c in range(num_classes)]
            )
            report = AblationReport(counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3:], per_class)
            self.last_ablation = report
            seen = report.totals > 0
            if seen.any():
                metrics[f"{self.log_key}/relevant_drop"] = float(report.relevant_drop[seen].mean())
                metrics[f"{self.log_key}/random_drop"] = float(report.random_drop[seen].mean())
                record["relevant_drop"] = report.relevant_drop.tolist()
                record["random_drop"] = report.random_drop.tolist()
        self.history.append(record)

        if trainer.is_global_zero:
            self._log(trainer, pl_module, dataset, result, report)
        return metrics

    @staticmethod
    def _stability(previous: Mapping[Any, list], current: Mapping[Any, list]) -> float:
        scores = []
        for c, units in current.items():
            before = {(u[0], int(u[1])) for u in previous.get(c, previous.get(str(c), []))}
            now = {(u[0], int(u[1])) for u in units}
            if before or now:
                scores.append(len(before & now) / len(before | now))
        return float(np.mean(scores)) if scores else 1.0

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataset: Any,
        result: RelevantUnitsResult,
        report: AblationReport | None,
    ) -> None:
        step = trainer.global_step
        outputs: list[str] = []
        shown: list[tuple[int, int, str, int, float]] = []
        for c in range(result.num_classes):
            for rank, (layer, unit, weight) in enumerate(
                result.relevant(c, positive_only=True)[: self.units_per_class]
            ):
                shown.append((c, rank, layer, unit, weight))
        rows = []
        if shown:
            images = torch.stack([torch.as_tensor(_split_first(dataset[i])) for i in self.probe.indices or []])
            if images.ndim == 4:
                units = list(dict.fromkeys((layer, unit) for _, _, layer, unit, _ in shown))
                visuals = unit_visuals(pl_module, units, TensorDataset(images), k=self.top_k)
                by_unit = {(v.layer, v.unit): v for v in visuals}
                for c, rank, layer, unit, weight in shown:
                    visual = by_unit[(layer, unit)]
                    average = _upscale(to_uint8_images(visual.average[None])[0])
                    strip = _upscale(_tile(to_uint8_images(visual.crops)))
                    rows.append([c, rank, layer, unit, weight, average, strip])
                columns = ["class", "rank", "layer", "unit", "weight", "average_crop", "top_crops"]
            else:
                rows = [[c, rank, layer, unit, weight] for c, rank, layer, unit, weight in shown]
                columns = ["class", "rank", "layer", "unit", "weight"]
            outputs += log_table(
                trainer.loggers, f"{self.log_key}/units", columns, rows, step=step, fallback_dir=_fallback_dir(trainer)
            )
        if report is not None and report.rows():
            columns = [
                "class",
                "samples",
                "units",
                "accuracy",
                "relevant_ablated",
                "random_ablated",
                "relevant_drop",
                "random_drop",
            ]
            outputs += log_table(
                trainer.loggers,
                f"{self.log_key}/ablation",
                columns,
                report.rows(),
                step=step,
                fallback_dir=_fallback_dir(trainer),
            )
        self.last_outputs = outputs


def _split_first(item: Any) -> Tensor:
    return torch.as_tensor(split_sample(item)[0])


# ---------------------------------------------------------------------------------------------------------------
# class prototypes
# ---------------------------------------------------------------------------------------------------------------


class ClassPrototypes(_InterpretationCallback):
    """One activation-maximisation image per class (Simonyan et al. 2013; Erhan et al. 2009), logged as a grid,
    so that a W&B slider shows what the model "thinks" each class looks like as training goes on.

    The images are optimised by :class:`~lightning_xai.interpretation.visualization.ActivationMaximization` (its
    arguments are passed through) from the same seeded noise at every run. The image shape is ``image_shape`` or
    that of the first sample of the ``split`` dataset. Logged: the grid ``<log_key>/grid`` (classes in order), a
    table ``<log_key>/classes`` (class, name, start logit, final logit, image) and the metric
    ``<log_key>/mean_logit`` (mean final logit). ``history`` keeps the final logits of every run (resumable).

    Cost per run: ``steps`` forward + backward passes over ``ceil(classes / world_size)`` images per rank.
    """

    def __init__(
        self,
        classes: Sequence[int] | None = None,
        *,
        image_shape: Sequence[int] | None = None,
        steps: int = 128,
        lr: float = 0.05,
        l2: float = 1e-2,
        tv: float = 1e-1,
        jitter: int = 2,
        blur_every: int = 4,
        blur_sigma: float = 0.5,
        init_mean: float = 0.5,
        init_std: float = 0.1,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        batch_size: int = 16,
        class_names: Sequence[str] | None = None,
        split: Split = "val",
        dataset: Any = None,
        every_n_epochs: int | None = 1,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai/prototypes",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, on_error=on_error, log_key=log_key, seed=seed)
        self.maximizer = ActivationMaximization(
            steps=steps,
            lr=lr,
            l2=l2,
            tv=tv,
            jitter=jitter,
            blur_every=blur_every,
            blur_sigma=blur_sigma,
            init_mean=init_mean,
            init_std=init_std,
            clamp=clamp,
            batch_size=batch_size,
            seed=seed,
        )
        if classes is not None:
            classes = [int(c) for c in classes]
            if not classes or min(classes) < 0:
                raise ValueError(f"classes must be a non-empty list of class indices >= 0, got {classes!r}")
        if image_shape is not None:
            image_shape = tuple(int(s) for s in image_shape)
            if len(image_shape) != 3 or min(image_shape) < 1:
                raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        self.classes = classes
        self.image_shape = image_shape
        self.class_names = None if class_names is None else list(class_names)
        self.split = _check_split(split)
        self.dataset = dataset
        #: ``(epoch, [final logit per class])`` of every run.
        self.history: list[tuple[int, list[float]]] = []
        self.last_images: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_key=self.log_key)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[e, v] for e, v in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(e), [float(x) for x in v]) for e, v in state_dict.get("history", [])]

    def _shape(self, trainer: pl.Trainer) -> tuple[int, int, int]:
        if self.image_shape is not None:
            return self.image_shape  # type: ignore[return-value]
        dataset = self._dataset(trainer, self.split, self.dataset)
        return tuple(_split_first(dataset[0]).shape)  # type: ignore[return-value]

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        device = pl_module.device
        world, rank = trainer.world_size, trainer.global_rank

        def optimise() -> tuple[Tensor, Tensor, Tensor, list[int]]:
            shape = self._shape(trainer)
            if self.classes is not None:
                classes = self.classes
            else:
                classes = list(range(int(_eval_forward(pl_module, torch.zeros(1, *shape)).shape[1])))
            start, stop, per_rank = ProbeSet.shard_bounds(len(classes), world, rank)
            local = classes[start:stop]
            local = local + [classes[0]] * (per_rank - len(local))
            result = self.maximizer(pl_module, target=torch.tensor(local), image_shape=shape, first_index=start)
            return result.images, result.initial_scores, result.final_scores, classes

        images, initial, final, classes = self._stage(trainer, device, optimise)
        total = len(classes)
        images = self._gather_probe(trainer, device, images, total).cpu()
        initial = self._gather_probe(trainer, device, initial, total).cpu()
        final = self._gather_probe(trainer, device, final, total).cpu()
        self.last_images = images
        self.history.append((int(trainer.current_epoch), final.tolist()))
        if trainer.is_global_zero:
            step = trainer.global_step
            pictures = to_uint8_images(images)
            names = [self._name(c) for c in classes]
            caption = f"epoch {trainer.current_epoch} | " + ", ".join(names)
            outputs = list(
                log_image(
                    trainer.loggers,
                    f"{self.log_key}/grid",
                    _upscale(_tile(pictures), 64),
                    step=step,
                    caption=caption,
                    fallback_dir=_fallback_dir(trainer),
                )
            )
            rows = [
                [c, names[i], float(initial[i]), float(final[i]), _upscale(pictures[i])] for i, c in enumerate(classes)
            ]
            outputs += log_table(
                trainer.loggers,
                f"{self.log_key}/classes",
                ["class", "name", "start_logit", "final_logit", "image"],
                rows,
                step=step,
                fallback_dir=_fallback_dir(trainer),
            )
            self.last_outputs = outputs
        return {f"{self.log_key}/mean_logit": float(final.mean())}

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else str(c)


# ---------------------------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------------------------


class EmbeddingProjector(_InterpretationCallback):
    """A 2-D map of a layer's features for a fixed probe set (PCA or t-SNE), logged as a table and a W&B scatter
    plot (x, y, label, prediction), so that the class structure of the representation can be followed over
    training.

    Features are the layer's activation reduced per sample by ``reduce`` (default: each channel's spatial mean).
    PCA is seeded and sign-fixed, so consecutive epochs are comparable; t-SNE needs scikit-learn. Logged:
    ``<log_key>/points`` (table, and ``<log_key>/points_scatter`` on W&B) and, for PCA, the metric
    ``<log_key>/explained_variance`` (share of the variance the two axes keep; rank zero only, through the
    loggers). ``history`` keeps the explained variance of every run (resumable).

    Cost per run: one forward pass over the rank's share of ``num_samples`` probe images; the projection runs on
    rank zero.
    """

    _metrics_on_every_rank = False

    def __init__(
        self,
        layer: str,
        *,
        method: Literal["pca", "tsne"] = "pca",
        reduce: LayerReduction = "mean",
        num_samples: int = 256,
        split: Split = "val",
        dataset: Any = None,
        perplexity: float = 30.0,
        batch_size: int = 64,
        class_names: Sequence[str] | None = None,
        every_n_epochs: int | None = 1,
        on_error: Literal["warn", "raise"] = "warn",
        log_key: str = "xai/embedding",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, on_error=on_error, log_key=log_key, seed=seed)
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a dotted module name, got {layer!r}")
        if method not in ("pca", "tsne"):
            raise ValueError(f"unknown projection method {method!r}; valid values: ['pca', 'tsne']")
        if not callable(reduce) and reduce not in ("flatten", "mean", "max", "mean_square"):
            raise ValueError(f"unknown reduce {reduce!r}; valid values: ['flatten', 'mean', 'max', 'mean_square']")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 4:
            raise ValueError(f"num_samples must be an integer >= 4, got {num_samples!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if method == "tsne":
            try:
                import sklearn  # noqa: F401
            except ImportError as err:  # pragma: no cover
                raise ImportError("method='tsne' needs scikit-learn: pip install 'lightning-xai[extras]'") from err
        self.layer = layer
        self.method = method
        self.reduce = reduce
        self.split = _check_split(split)
        self.dataset = dataset
        self.perplexity = perplexity
        self.batch_size = batch_size
        self.class_names = None if class_names is None else list(class_names)
        self.probe = ProbeSet(num_samples, seed)
        #: ``(epoch, explained variance ratio of the two axes or None)`` of every run.
        self.history: list[tuple[int, float | None]] = []
        self.last_coordinates: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, method=self.method, log_key=self.log_key)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_indices": self.probe.indices, "history": [[e, v] for e, v in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe_indices") is not None:
            self.probe.indices = list(state_dict["probe_indices"])
        self.history = [(int(e), None if v is None else float(v)) for e, v in state_dict.get("history", [])]

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        device = pl_module.device
        dataset = self._dataset(trainer, self.split, self.dataset)

        def features() -> tuple[Tensor, Tensor, Tensor]:
            self.probe.select(dataset)
            probe = self.probe.load_shard(dataset, trainer.world_size, trainer.global_rank)
            feats, _ = layer_features(
                pl_module, self.layer, probe.inputs, reduce=self.reduce, batch_size=self.batch_size
            )
            preds = _eval_forward(pl_module, probe.inputs, self.batch_size).argmax(dim=1)
            labels = probe.labels.long().reshape(-1) if probe.labels is not None else torch.full_like(preds, -1)
            return feats, labels, preds

        feats, labels, preds = self._stage(trainer, device, features)
        total = len(self.probe.indices or [])
        feats = self._gather_probe(trainer, device, feats, total).cpu()
        labels = self._gather_probe(trainer, device, labels, total).cpu()
        preds = self._gather_probe(trainer, device, preds, total).cpu()
        if not trainer.is_global_zero:
            return {}
        coords, ratio = project_features(feats, self.method, dim=2, seed=self.seed, perplexity=self.perplexity)
        self.last_coordinates = coords
        explained = None if ratio is None else float(ratio.sum())
        self.history.append((int(trainer.current_epoch), explained))
        rows = [
            [
                float(coords[i, 0]),
                float(coords[i, 1]),
                int(labels[i]),
                self._name(int(labels[i])),
                int(preds[i]),
                int(self.probe.indices[i]),
            ]  # type: ignore[index]
            for i in range(coords.shape[0])
        ]
        self.last_outputs = log_scatter(
            trainer.loggers,
            f"{self.log_key}/points",
            ["x", "y", "label", "class", "prediction", "probe_index"],
            rows,
            x="x",
            y="y",
            step=trainer.global_step,
            title=f"{self.layer} ({self.method})",
            fallback_dir=_fallback_dir(trainer),
        )
        return {} if explained is None else {f"{self.log_key}/explained_variance": explained}

    def _name(self, c: int) -> str:
        if c < 0:
            return ""
        return self.class_names[c] if self.class_names and c < len(self.class_names) else str(c)
