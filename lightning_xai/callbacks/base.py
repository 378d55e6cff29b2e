"""The one base of every lightning_xai callback: when to run, what data, what target, errors, ranks, state, files.

Every callback of the library (:class:`~lightning_xai.callbacks.ExplanationMonitor`, ``ExplanationQuality``,
``SanityCheck``, ``DissectionScores``, ``TCAVScores``, ``RelevantUnits``, ``ClassPrototypes``,
``EmbeddingProjector``) is an :class:`XAICallback`; a subclass supplies only :meth:`XAICallback.compute` (what it
measures and logs) and, where it has more to check, :meth:`XAICallback.validate`. The base owns:

**Schedule.** ``every_n_epochs=n`` runs at the end of every n-th training epoch's validation (skipping Lightning's
sanity check; with ``val_check_interval < 1`` only the validation at the epoch end counts, unless
``every_validation=True``) and at every ``trainer.validate``. ``every_n_epochs=None`` runs once, at the end of fit.
When no validation epoch ends during fit (``max_steps`` ending mid-epoch, ``limit_val_batches=0``, no val loader)
a scheduled callback runs once at the end of fit instead and says so once.

**Fail early.** Configuration is validated before the first training step (``on_fit_start``, after the model is
on its device; ``on_validation_start`` of ``trainer.validate``) by a dry pass over one probe sample: the data can
be read, the model output can be read, the target is in range, the layers exist, the inputs are floating point
(for gradients). A mistake raises :class:`ConfigurationError` naming the callback, the value and the valid
choices - whatever ``on_error`` says: ``on_error`` (``"warn"`` | ``"raise"``) governs runtime faults only, which
never crash the run with ``"warn"`` and are recorded as :class:`ErrorRecord`.

**Data.** One lookup (:meth:`XAICallback.dataset`): a ``dataset=`` given to the callback, the datamodule's
``dataset(split)``, the ``dataloader_idx``-th loader of the split (loaded through the datamodule or the model even
when Lightning did not load it), else the train split (said once).

**Never a wrong number.** Non-finite model outputs are reported (which samples) and left out; a method whose
map is non-finite is reported by name and its scores are not logged; one method's failure never loses another's.

**Ranks.** Every collective runs on every rank through :mod:`lightning_xai.distributed`; metrics are identical on
every rank and are logged with ``sync_dist=True`` inside the loop (no Lightning warning) or by rank zero to the
loggers at the end of fit.

**State.** ``state_dict`` holds the fields a subclass declares in ``state_fields`` (resumable). Histories are
lists of records keyed by ``(stage, step)``; loading a checkpoint merges them with what is in memory, so a
``trainer.validate(ckpt_path=...)`` after ``fit`` appends and never rolls history back.

**Files.** :meth:`XAICallback.output_path` names files by callback, stage, epoch and step under ``output_dir``
(default ``<default_root_dir>/xai``), never overwriting one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.batch import BatchReader, Key, OutputReader
from lightning_xai.callbacks.files import RunFiles
from lightning_xai.callbacks.methods import MethodRunner, eager_forward, method_names
from lightning_xai.callbacks.probe import ProbeBatch, ProbeSet
from lightning_xai.callbacks.records import (
    ConfigurationError,
    ErrorLog,
    ErrorRecord,
    ResumableState,
    ValidationContext,
)
from lightning_xai.callbacks.sources import DataSources
from lightning_xai.callbacks.targets import ResolvedTargets, TargetSpec
from lightning_xai.checks import check_bool, check_choice, check_int, check_optional_int
from lightning_xai.distributed import RankFailed, Reducer, agree, default_reducer, gather_rows, run_agreed
from lightning_xai.namespace import Callback, rank_zero_warn
from lightning_xai.viz.dashboard import log_config

__all__ = [
    "ConfigurationError",
    "ErrorLog",
    "ErrorRecord",
    "ValidationContext",
    "XAICallback",
    "eager_forward",
    "method_names",
]

OnError = Literal["warn", "raise"]
SPLITS = ("train", "val", "test")


def _unwrap(model: Any) -> Any:
    """The module behind a ``torch.compile`` wrapper (its ``_orig_mod``), else the module itself."""
    return getattr(model, "_orig_mod", model)


class XAICallback(ResumableState, DataSources, MethodRunner, RunFiles, Callback):
    """Base of every lightning_xai callback (see the module docstring for what it owns).

    Args:
        every_n_epochs: run every n-th epoch (``None``: once at the end of fit).
        on_error: ``"warn"`` (a runtime fault is recorded and warned once per epoch; training goes on) or
            ``"raise"`` (re-raised, chained with the callback's and the method's name).
        log_key: prefix of everything logged.
        seed: seed of the probe selection (and of any randomness of the callback).
        num_samples: size of the probe set (``0`` for callbacks without one).
        split: the split the probe set is drawn from (``"train"``, ``"val"``, ``"test"``).
        dataloader_idx: which loader of the split, when it has several.
        dataset: a dataset to draw from instead of the trainer's.
        probe_batch: a batch to explain instead of drawing one.
        target: what to explain (:mod:`lightning_xai.callbacks.targets`).
        input_key, label_key, mask_key: how to read batches (:class:`lightning_xai.batch.BatchReader`).
        output_key: how to read logits from the model output (:class:`lightning_xai.batch.OutputReader`).
        output_dir: where files are written (default ``<default_root_dir>/xai``).
        every_validation: with ``val_check_interval < 1``, also run at the validations inside an epoch.
        batch_size: largest batch of model evaluations the callback itself runs.
    """

    #: Attributes saved in ``state_dict`` (besides the probe indices and the error records).
    state_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether the callback differentiates through the model (then integer inputs are a configuration error).
    needs_gradients: ClassVar[bool] = True
    #: Whether the callback draws a probe set (and so reads batches and resolves targets).
    uses_probe: ClassVar[bool] = True

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        on_error: OnError = "warn",
        log_key: str = "xai",
        seed: int = 0,
        num_samples: int = 8,
        split: str = "val",
        dataloader_idx: int = 0,
        dataset: Any = None,
        probe_batch: Any = None,
        target: Any = "prediction",
        input_key: Key | None = None,
        label_key: Key | None = None,
        mask_key: Key | None = None,
        output_key: Key | None = None,
        output_dir: str | None = None,
        every_validation: bool = False,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        name = self.name
        self.every_n_epochs = check_optional_int(
            "every_n_epochs", every_n_epochs, minimum=1, owner=name, none_means="once at the end of fit"
        )
        self.on_error = check_choice("on_error", on_error, ("warn", "raise"), owner=name)
        if not isinstance(log_key, str) or not log_key.strip("/"):
            raise ValueError(f"{name}: log_key must be a non-empty string, got {log_key!r}")
        self.log_key = log_key.rstrip("/")
        self.seed = check_int("seed", seed, owner=name)
        self.split = check_choice("split", split, SPLITS, owner=name)
        self.dataloader_idx = check_int("dataloader_idx", dataloader_idx, minimum=0, owner=name)
        self.every_validation = check_bool("every_validation", every_validation, owner=name)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=name)
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ValueError(f"{name}: output_dir must be a path or None, got {output_dir!r}")
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.reader = BatchReader(input_key, label_key, mask_key, owner=name)
        self.output_reader = OutputReader(output_key, owner=name)
        self.target = TargetSpec(target, owner=name)
        self.given_dataset = dataset
        self.probe = ProbeSet(num_samples, seed, self.reader) if self.uses_probe else None
        if probe_batch is not None:
            if self.probe is None:
                raise ValueError(f"{name} does not explain a probe set; probe_batch= does not apply")
            self.probe.set_batch(probe_batch)
        #: Runtime faults, oldest first (resumable).
        self.errors: ErrorLog = ErrorLog()
        #: Metrics of the last run (identical on every rank).
        self.last_metrics: dict[str, float] = {}
        #: Destinations written on rank zero by the last run.
        self.last_outputs: list[str] = []
        #: Seconds the last run took on this rank.
        self.last_seconds: float | None = None
        self._said: set[str] = set()
        self._runs_this_fit = 0
        self._validated_for: set[str] = set()
        self._reducer: Reducer | None = None

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_key=self.log_key, **self._state_key_parts())

    def _state_key_parts(self) -> dict[str, Any]:
        """Extra parts that distinguish two instances of the callback in one Trainer."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The callback's settings, as recorded in the run config (``xai/<callback>/...``)."""
        return {
            "every_n_epochs": self.every_n_epochs,
            "num_samples": None if self.probe is None else self.probe.num_samples,
            "split": self.split,
            "target": repr(self.target.value) if self.target.kind == "callable" else self.target.value,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------------------------------------ messages
    def say_once(self, key: str, message: str) -> None:
        """Warn (on rank zero) once per callback object for ``key``, naming the callback."""
        if key in self._said:
            return
        self._said.add(key)
        rank_zero_warn(f"{self.name}: {message}")

    # ------------------------------------------------------------------------------------------------ state
    # state_dict / load_state_dict / merge_state: ResumableState (callbacks/records.py)
    def history_record(self, trainer: Any, **values: Any) -> dict[str, Any]:
        """A history entry keyed by the Trainer's stage, epoch and step."""
        return {"stage": self.stage(trainer), "epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
                **values}

    # ------------------------------------------------------------------------------------------------ schedule
    @staticmethod
    def logger_step(trainer: Any) -> int:
        """The step Lightning gives the loggers for this moment's metrics (its ``_batches_that_stepped``, one less
        than ``global_step`` at a validation epoch end), so that images and tables land on the same W&B step as the
        epoch's metrics."""
        try:
            return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        except (AttributeError, TypeError, ValueError):
            return int(trainer.global_step)

    @staticmethod
    def stage(trainer: Any) -> str:
        fn = getattr(trainer.state, "fn", None)
        return str(getattr(fn, "value", fn) or "fit")

    def _at_epoch_end(self, trainer: Any) -> bool:
        if self.every_validation:
            return True
        try:
            return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        except AttributeError:
            return True

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.every_n_epochs is None:
            return
        if self.stage(trainer) == "fit":
            if not self._at_epoch_end(trainer) or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
                return
        self.run(trainer, pl_module, in_loop=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_epochs is None:
            self.run(trainer, pl_module, in_loop=False)
        elif self._runs_this_fit == 0:
            self.say_once(
                "fallback",
                f"no validation epoch ended during fit ({self._why_no_validation(trainer)}); running once at the "
                "end of fit instead",
            )
            self.run(trainer, pl_module, in_loop=False)

    @staticmethod
    def _why_no_validation(trainer: Any) -> str:
        if not getattr(trainer, "limit_val_batches", 1):
            return "limit_val_batches=0"
        if getattr(trainer, "num_val_batches", None) in ([], None) and trainer.val_dataloaders is None:
            return "no validation dataloader"
        return "training stopped before the first validation, e.g. max_steps ended mid-epoch"

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._runs_this_fit = 0 if stage == "fit" else self._runs_this_fit
        launcher = getattr(trainer.strategy, "launcher", None)
        if getattr(launcher, "_start_method", None) == "spawn" and trainer.world_size > 1:
            self.say_once(
                "spawn",
                "under ddp_spawn the results (history, errors) live in the worker processes and this object stays "
                f"empty after fit; they are also written by rank zero to {self._dir(trainer)} "
                "(load them with load_results())",
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_configuration(trainer, pl_module)
        self.record_settings(trainer)

    def record_settings(self, trainer: Any) -> None:
        """Record :meth:`settings` in the run config as ``xai/<callback>/...`` (rank zero; never fails the run)."""
        if not trainer.is_global_zero or not trainer.loggers:
            return
        try:
            log_config(trainer.loggers, f"xai/{self.name}", self.settings())
        except Exception as err:  # the config is a convenience
            self.say_once("config", f"could not record its settings in the run config: {err}")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.stage(trainer) != "fit":
            self._check_configuration(trainer, pl_module)

    def _check_configuration(self, trainer: Any, pl_module: Any) -> None:
        stage = self.stage(trainer)
        if stage in self._validated_for:
            return
        self._validated_for.add(stage)
        try:
            with torch.inference_mode(False), torch.enable_grad(), eager_forward(pl_module):
                context = self._dry_pass(trainer, pl_module)
                self.validate(trainer, pl_module, context)
        except ConfigurationError:
            raise
        except Exception as err:
            raise ConfigurationError(f"{self.name}: {type(err).__name__}: {err}") from err

    def _dry_pass(self, trainer: Any, pl_module: Any) -> ValidationContext:
        if self.probe is None:
            return ValidationContext(None, None, None)
        dataset = None if self.probe.fixed else self.dataset(trainer, self.split)
        if dataset is not None:
            self.probe.select(dataset)
            if self.probe.shortfall:
                self.say_once(
                    "shortfall",
                    f"the {self.split} set has {len(self.probe.indices or [])} samples; explaining all of them "
                    f"instead of num_samples={self.probe.num_samples}",
                )
        probe = self.probe.load(dataset, [0]).to(pl_module.device)
        if not isinstance(probe.inputs, Tensor):
            raise ConfigurationError(
                f"{self.name}: the model input read from the batch is a {type(probe.inputs).__name__}, not a tensor; "
                "pass input_key= to pick the tensor"
            )
        if self.needs_gradients and not probe.inputs.is_floating_point() and not self.accepts_token_ids():
            raise ConfigurationError(
                f"{self.name}: the inputs are {probe.inputs.dtype} but gradient-based explanations need floating "
                "point inputs; convert images in the dataset (e.g. torchvision's ToDtype(torch.float32, "
                "scale=True)); for token ids use token methods (token_*, attention_rollout, attnlrp, ...)"
            )
        logits = self.eval_logits(pl_module, probe.inputs)
        if not torch.isfinite(logits).all():
            self.say_once("nonfinite-setup", "the model's output on the first probe sample is not finite")
        self.target.check(logits, probe.labels)
        return ValidationContext(probe, logits, dataset)

    def accepts_token_ids(self) -> bool:
        """Whether integer inputs (token ids) are fine: every method of the callback says it takes token ids."""
        return False

    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        """Subclass checks at setup (layers exist, classes in range, data has what is needed); raise
        :class:`ConfigurationError` naming the callback, the value and the valid choices."""

    # ------------------------------------------------------------------------------------------------ running
    def run(self, trainer: Any, pl_module: Any, *, in_loop: bool = False) -> bool:
        """Compute and log now (usable outside the hooks); returns whether it succeeded."""
        self.last_outputs = []
        self._runs_this_fit += 1
        start = time.perf_counter()
        try:
            # Lightning's `trainer.validate` runs under inference_mode: tensors made there cannot enter autograd.
            with torch.inference_mode(False), eager_forward(pl_module):
                metrics = dict(self.compute(trainer, pl_module))
        except ConfigurationError:
            raise
        except Exception as err:
            self.fault(trainer, None, err)
            return False
        finally:
            self.last_seconds = time.perf_counter() - start
        metrics[f"{self.log_key}/{self._cost_key}/seconds"] = float(self.last_seconds)
        self.last_metrics = metrics
        self.log_metrics(trainer, pl_module, metrics, in_loop=in_loop)
        if trainer.is_global_zero and self._spawned(trainer):
            self._save_results(trainer)
        return True

    @property
    def _cost_key(self) -> str:
        return self.name.lower()

    def compute(self, trainer: Any, pl_module: Any) -> Mapping[str, float]:
        """Compute, log what is not a scalar (on rank zero), and return the scalar metrics (same on every rank)."""
        raise NotImplementedError

    def fault(self, trainer: Any, method: str | None, err: BaseException) -> None:
        """Record a runtime fault; re-raise it chained with the callback's (and method's) name when
        ``on_error="raise"``, else warn (once per stage, epoch and method)."""
        what = f"{self.name}" + (f" ({method})" if method else "")
        message = f"{type(err).__name__}: {err}"
        record = ErrorRecord(self.stage(trainer), int(trainer.current_epoch), int(trainer.global_step), method, message)
        self.errors.append(record)
        if self.on_error == "raise" and not isinstance(err, RankFailed):
            raise RuntimeError(f"{what} failed at epoch {record.epoch}, step {record.step}: {message}") from err
        rank_zero_warn(f"{what} skipped at epoch {record.epoch} (step {record.step}): {message}")

    def probe_shard(self, trainer: Any, pl_module: Any) -> ProbeBatch:
        """This rank's shard of the probe set, on the module's device."""
        assert self.probe is not None
        dataset = None if self.probe.fixed else self.dataset(trainer, self.split)
        if dataset is not None:
            self.probe.select(dataset)
        return self.probe.load_shard(dataset, trainer.world_size, trainer.global_rank).to(pl_module.device)

    # ------------------------------------------------------------------------------------------------ model
    def eval_logits(self, pl_module: Any, inputs: Tensor) -> Tensor:
        """Logits in eval mode under ``no_grad``, in chunks of ``batch_size``, every mode restored."""
        with model_state_guard(pl_module), torch.no_grad():
            parts = [
                self.output_reader(pl_module(inputs[i : i + self.batch_size]))
                for i in range(0, max(int(inputs.shape[0]), 1), self.batch_size)
            ]
        return torch.cat(parts) if parts else inputs.new_zeros((0,))

    def finite_rows(self, logits: Tensor, ids: Tensor | None = None) -> Tensor:
        """A boolean mask of samples whose model output is finite; warns naming the others."""
        flat = logits.reshape(logits.shape[0], -1)
        finite = torch.isfinite(flat).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().reshape(-1)
            names = bad.tolist() if ids is None else ids[bad].tolist()
            self.say_once(
                f"nonfinite-{names}",
                f"the model's output is NaN or inf for probe sample(s) {names}; they are reported, not scored",
            )
        return finite

    def resolve_targets(self, probe: ProbeBatch, logits: Tensor) -> ResolvedTargets:
        return self.target.resolve(logits, probe.labels, self.class_name)

    def scored_targets(self, probe: ProbeBatch, logits: Tensor) -> ResolvedTargets:
        """The rows of this rank's probe shard that can be explained and scored, with their targets: real samples
        (not the padding of an uneven shard) whose model output is finite. Samples with NaN / inf outputs are
        reported (naming their dataset indices) and never scored."""
        num_real = probe.num_real
        real = torch.arange(num_real, device=logits.device)
        ids = None if probe.sample_ids is None else probe.sample_ids[real]
        finite = self.finite_rows(logits[real], ids) if num_real else torch.zeros(0, dtype=torch.bool)
        resolved = self.resolve_targets(probe, logits)
        if num_real == 0:
            keep = torch.zeros_like(resolved.rows, dtype=torch.bool)
        else:
            keep = (resolved.rows < num_real) & finite.to(logits.device)[resolved.rows.clamp(max=num_real - 1)]
        resolved.rows = resolved.rows[keep]
        if isinstance(resolved.target, Tensor):
            resolved.target = resolved.target[keep]
        resolved.names = [n for n, k in zip(resolved.names, keep.tolist()) if k]
        return resolved

    def class_name(self, index: int) -> str:
        names = getattr(self, "class_names", None)
        return names[index] if names and 0 <= index < len(names) else str(index)

    def layer_module(self, pl_module: Any) -> Any:
        """The module layer names are resolved against (the original module of a ``torch.compile`` wrapper)."""
        return _unwrap(pl_module)

    # ------------------------------------------------------------------------------------------------ ranks
    @property
    def reducer(self) -> Reducer:
        return self._reducer if self._reducer is not None else default_reducer()

    def agree(self, ok: bool) -> bool:
        return agree(ok, self.reducer)

    def run_agreed(self, fn: Callable[[], Any]) -> Any:
        return run_agreed(fn, self.reducer)

    def gather(self, local: Tensor, total: int) -> Tensor:
        """Equal-sized probe shards of every rank, concatenated in probe order, first ``total`` items, on CPU."""
        return ProbeSet.gather(local.detach(), total, reducer=self.reducer).cpu()

    def gather_rows(self, rows: Tensor) -> Tensor:
        return gather_rows(rows.detach(), self.reducer).cpu()

    def sum_over_ranks(self, value: Tensor) -> Tensor:
        return self.reducer(value, "sum")

    # ------------------------------------------------------------------------------------------------ logging
    def log_metrics(self, trainer: Any, pl_module: Any, metrics: Mapping[str, float], *, in_loop: bool) -> None:
        """Scalars: through ``pl_module.log`` inside the validation loop (``sync_dist=True``: the values are the
        same on every rank, and Lightning then has them in ``callback_metrics``), else by rank zero to the
        loggers. Non-finite values are never logged as numbers: they are reported."""
        finite = {k: float(v) for k, v in metrics.items() if _finite(v)}
        bad = sorted(k for k in metrics if k not in finite)
        if bad:
            self.say_once(f"nonfinite-metrics-{bad}", f"not logged because they are NaN or inf: {bad}")
        if not finite:
            return
        if in_loop:
            for key, value in finite.items():
                pl_module.log(key, value, on_epoch=True, on_step=False, sync_dist=True, batch_size=1)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(finite, step=self.logger_step(trainer))

def _finite(value: Any) -> bool:
    try:
        return bool(torch.isfinite(torch.as_tensor(float(value))))
    except (TypeError, ValueError):
        return False


