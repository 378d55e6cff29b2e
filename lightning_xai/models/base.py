"""``XAIModule``: the shared base of this project's LightningModules.

One copy of what every model needs:

* **optimiser and scheduler** - validated settings and one factory (:meth:`XAIModule.build_optimizer`,
  :meth:`XAIModule.cosine_scheduler`) that ImageClassifier, ProtoPNet, the concept bottleneck, concept whitening
  and the sparse autoencoder share (each used to build its own);
* **per-split metrics** - one torchmetrics ``MetricCollection`` cloned per split with the prefix ``"<split>_"``
  (:meth:`XAIModule.set_metrics`, :meth:`XAIModule.metrics_of`), so that DDP reduction and epoch logging are
  torchmetrics' and Lightning's, not hand-written per model;
* **losses with named parts** - a model implements :meth:`XAIModule.compute_losses` returning a
  :class:`StepOutput` (total loss, named parts, logits); :meth:`XAIModule.shared_step` logs ``<split>_loss`` and
  ``<split>_<part>``, updates the split's metrics and guards against divergence (the shape SAELens gives its
  training forward pass);
* **divergence is never silent** - a non-finite loss raises :class:`NonFiniteLossError` naming the split, the
  step and the non-finite parts, or (``on_nonfinite_loss="skip"``) skips the batch with a warning;
* **batches** are read with :class:`lightning_xai.batch.BatchReader` (``input_key`` / ``label_key``);
* **hyper-parameters** are the arguments the outermost constructor was called with, bound to its signature
  (defaults applied) and saved when it returns; the base no longer walks the caller's stack frames.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_xai.batch import BatchReader, Key
from lightning_xai.checks import check_choice, check_float
from lightning_xai.distributed import Reducer, agree
from lightning_xai.namespace import pl, rank_zero_warn

__all__ = [
    "NONFINITE_POLICIES",
    "OPTIMIZERS",
    "SCHEDULERS",
    "SPLITS",
    "NonFiniteLossError",
    "StepOutput",
    "XAIModule",
    "config_dataclass",
    "module_valued",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine",)
NONFINITE_POLICIES = ("raise", "skip")
SPLITS = ("train", "val", "test")


class NonFiniteLossError(FloatingPointError):
    """A training, validation or test loss is NaN or infinite (the run diverged, or the data holds NaN / inf)."""


@dataclass
class StepOutput:
    """What one step computes: the loss to optimise, its named parts (logged as ``<split>_<name>``) and the
    logits the split's metrics are updated with (``None``: no metric update)."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


def module_valued(**arguments: Any) -> list[str]:
    """The names among ``arguments`` whose value is an ``nn.Module``: the ``ignore=`` list of
    ``save_hyperparameters`` (modules are saved in the state dict and passed again to ``load_from_checkpoint``)."""
    return [name for name, value in arguments.items() if isinstance(value, nn.Module)]


def config_dataclass(cls: type, name: str, exclude: tuple[str, ...] = ()) -> type:
    """A frozen dataclass ``name`` whose fields are ``cls.__init__``'s keyword arguments (with their defaults and
    annotations) except ``exclude`` (typically modules such as ``backbone``): one place for a model's 15+ settings,
    written once - the constructor's signature - so that the two never drift apart. Build a model from it with
    ``cls.from_config(config, **modules)`` and read a model's back with ``model.to_config()`` (see :class:`XAIModule`);
    plain keyword construction (and YAML ``init_args``) keeps working unchanged."""
    init = inspect.unwrap(cls.__init__)
    fields = []
    for parameter in list(inspect.signature(init).parameters.values())[1:]:
        if parameter.name in exclude or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        if isinstance(default, list | dict | set):
            fields.append((parameter.name, parameter.annotation, field(default_factory=lambda d=default: type(d)(d))))
        elif default is inspect.Parameter.empty:
            fields.append((parameter.name, parameter.annotation))
        else:
            fields.append((parameter.name, parameter.annotation, field(default=default)))
    fields.sort(key=lambda f: len(f) > 2)  # fields without defaults first
    config = dataclasses.make_dataclass(name, fields, frozen=True, kw_only=True)
    config.__module__ = cls.__module__
    config.__doc__ = (f"The settings of :class:`{cls.__module__}.{cls.__name__}` (its constructor's keyword arguments "
                      f"except {list(exclude)}); see its docstring for each field.")
    return config


def _nonfinite(value: Tensor) -> bool:
    return not bool(torch.isfinite(value.detach()).all())


class XAIModule(pl.LightningModule):
    """Base LightningModule: optimiser factory, per-split metrics, losses with named parts, divergence guard.

    Args:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        lr: learning rate, > 0.
        weight_decay: L2 penalty (``adam``, ``sgd``) or decoupled weight decay (``adamw``), >= 0.
        scheduler: ``None`` (constant learning rate) or ``"cosine"``: cosine annealing from ``lr`` to 0 over all
            training steps (``trainer.estimated_stepping_batches``), stepped every optimiser step.
        momentum: SGD momentum in [0, 1); ignored by the Adam variants.
        on_nonfinite_loss: ``"raise"`` (default): a NaN / inf loss raises :class:`NonFiniteLossError` naming the
            split, the batch index, the global step and the non-finite loss parts; ``"skip"``: the batch is
            skipped (no optimiser step, no metric update) with a warning. Under DDP the skip is agreed by all ranks
            (one small all-reduce per step) so that no rank waits in a gradient all-reduce the others skip.
        input_key, label_key: where the inputs and the labels are in a batch (see
            :class:`~lightning_xai.batch.BatchReader`; default: ``batch[0]`` / ``batch[1]`` of tuples, the usual
            keys of dicts).

    The arguments of the outermost constructor (bound to its signature, defaults applied) and the base's settings
    are saved with ``save_hyperparameters`` when construction ends (checkpoints restore the configuration,
    loggers record it; modules passed as arguments are left out - they are in the state dict). Subclasses choose
    what is optimised by overriding :meth:`optimizer_parameters` (by default every parameter with
    ``requires_grad``, so frozen submodules stay frozen).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap each subclass's own ``__init__`` so that, when the outermost constructor returns, the arguments it
        was called with (bound to its signature, defaults applied) are saved as hyper-parameters - explicitly,
        without reading stack frames."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_xai_wrapped", False):
            return

        @functools.wraps(init)
        def __init__(self: XAIModule, *args: Any, **kw: Any) -> None:
            outermost = not getattr(self, "_xai_constructing", False)
            if outermost:
                object.__setattr__(self, "_xai_constructing", True)
            try:
                init(self, *args, **kw)
            finally:
                if outermost:
                    object.__setattr__(self, "_xai_constructing", False)
            if outermost:
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                self._save_constructor_arguments(dict(list(bound.arguments.items())[1:]), init)

        __init__._xai_wrapped = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    def _save_constructor_arguments(self, arguments: dict[str, Any], init: Any) -> None:
        """``save_hyperparameters`` with the base's settings and the constructor's bound ``arguments`` (these win);
        ``**kwargs`` are flattened, ``nn.Module`` values left out (they are in the state dict)."""
        parameters = inspect.signature(init).parameters
        hparams: dict[str, Any] = {
            "optimizer": self.optimizer_name, "lr": self.lr, "weight_decay": self.weight_decay,
            "scheduler": self.scheduler_name, "momentum": self.momentum,
        }
        # the newer settings only where the constructor takes them (load_from_checkpoint passes every hparam)
        newer = {"on_nonfinite_loss": self.on_nonfinite_loss, "input_key": self.batch_reader.input_key,
                 "label_key": self.batch_reader.label_key}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        hparams.update({k: v for k, v in newer.items() if takes_any or k in parameters})
        for name, value in arguments.items():
            if parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                hparams.update(value)
            elif parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                hparams[name] = value
        hparams.update(self.hparams_overrides)
        self.save_hyperparameters({k: v for k, v in hparams.items() if not isinstance(v, nn.Module)})

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{owner}: unknown optimizer {optimizer!r}; valid optimizers: {list(OPTIMIZERS)}")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"{owner}: unknown scheduler {scheduler!r}; valid schedulers: {[None, *SCHEDULERS]}")
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            check_float(name, value, owner=owner)  # "<name> must be a finite number, got ..."
        if lr <= 0:
            raise ValueError(f"{owner}: lr must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"{owner}: weight_decay must be >= 0, got {weight_decay!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"{owner}: momentum must be in [0, 1), got {momentum!r}")
        self.on_nonfinite_loss = check_choice("on_nonfinite_loss", on_nonfinite_loss, NONFINITE_POLICIES, owner=owner)
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.scheduler_name = scheduler
        self.momentum = float(momentum)
        self.batch_reader = BatchReader(input_key, label_key, owner=owner)
        self.split_metrics = nn.ModuleDict()
        #: hyper-parameters saved instead of the constructor's arguments (e.g. a config dataclass as a plain dict,
        #: so that checkpoints load with ``weights_only=True``)
        self.hparams_overrides: dict[str, Any] = {}
        #: the collectives of the divergence vote (``None``: ``torch.distributed`` when initialised; tests set a
        #: :class:`~lightning_xai.distributed.ThreadGroup` reducer)
        self.reducer: Reducer | None = None

    # ------------------------------------------------------------------------------------------------- config
    #: The config dataclass of the model's settings (see :func:`config_dataclass`), where it has one.
    config_class: type | None = None

    @classmethod
    def from_config(cls, config: Any, **modules: Any) -> XAIModule:
        """Build the model from its :attr:`config_class` instance (``modules``: the excluded arguments, e.g.
        ``backbone=``)."""
        if cls.config_class is None or not isinstance(config, cls.config_class):
            expected = cls.config_class.__name__ if cls.config_class is not None else "no config class"
            raise TypeError(f"{cls.__name__}.from_config expects a {expected}, got {type(config).__name__}")
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, **modules)

    def to_config(self) -> Any:
        """The model's settings as its :attr:`config_class` (from the saved hyper-parameters)."""
        if self.config_class is None:
            raise AttributeError(f"{type(self).__name__} has no config dataclass")
        names = {f.name for f in dataclasses.fields(self.config_class)}
        return self.config_class(**{k: v for k, v in self.hparams.items() if k in names})

    # ------------------------------------------------------------------------------------------------ metrics
    def set_metrics(self, metrics: MetricCollection | dict[str, Metric] | None, *, name: str = "") -> None:
        """Clone ``metrics`` for each split with the prefix ``"<split>_"`` (``"<split>_<name>_"`` when ``name``
        is given, for a second collection of the same model). Read them back with :meth:`metrics_of`."""
        if metrics is None:
            return
        collection = metrics if isinstance(metrics, MetricCollection) else MetricCollection(dict(metrics))
        infix = f"{name}_" if name else ""
        for split in SPLITS:
            self.split_metrics[self._metric_key(split, name)] = collection.clone(prefix=f"{split}_{infix}")

    @staticmethod
    def _metric_key(split: str, name: str = "") -> str:
        # nn.ModuleDict refuses keys that are attributes of nn.Module ("train"), hence the suffix
        return f"{split}_{name}_metrics" if name else f"{split}_metrics"

    def metrics_of(self, split: str, name: str = "") -> MetricCollection:
        """The metric collection of ``split`` (``"train"``, ``"val"``, ``"test"``) set by :meth:`set_metrics`."""
        key = self._metric_key(split, name)
        if key not in self.split_metrics:
            raise KeyError(f"{type(self).__name__} has no metrics {name!r} for split {split!r}")
        return self.split_metrics[key]

    # ------------------------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        """Check the data against the model before the first step (see :meth:`check_data_classes`)."""
        self.check_data_classes()

    def check_data_classes(self) -> None:
        """A model with ``num_classes`` fed by a datamodule with more classes (its ``num_classes``) would crash
        mid-step ("Target 4 is out of bounds"): raise at setup instead, naming both numbers (issue 18.10)."""
        model_classes = getattr(self, "num_classes", None)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(model_classes, int) and isinstance(data_classes, int) and data_classes > model_classes:
            raise ValueError(
                f"{type(self).__name__}: the datamodule {type(datamodule).__name__} has {data_classes} classes but "
                f"the model has num_classes={model_classes}: set num_classes={data_classes}"
            )

    def check_class_labels(self, labels: Tensor | None) -> None:
        """Class labels must be in ``[0, num_classes)``: checked on the first batch of each split (a clear error
        instead of an IndexError / device assert inside the loss)."""
        num_classes = getattr(self, "num_classes", None)
        checked = self.__dict__.setdefault("_checked_label_splits", set())
        split = "train" if self.training else "eval"
        if split in checked or labels is None or not isinstance(num_classes, int):
            return
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() == 0:
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ValueError(
                f"{type(self).__name__}: class label {bad} is out of range for num_classes={num_classes} (labels "
                f"must be in [0, {num_classes}); this batch holds labels in [{low}, {high}])"
            )
        checked.add(split)

    # ------------------------------------------------------------------------------------------------- losses
    def compute_losses(self, batch: Any, split: str) -> StepOutput:
        """The loss of ``batch`` with its named parts and the logits for the metrics (models implement it)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement compute_losses(batch, split)")

    def metric_targets(self, batch: Any) -> Tensor | None:
        """What the split's metrics compare the logits with: the batch's labels (``label_key``)."""
        return self.batch_reader.labels(batch)

    def loss_is_usable(self, out: StepOutput, split: str, batch_idx: int) -> bool:
        """Whether ``out.loss`` is finite. If not: raise :class:`NonFiniteLossError` (``on_nonfinite_loss=
        "raise"``) or warn and return ``False`` (``"skip"``). Under DDP with ``"skip"`` every rank votes, so all
        skip together."""
        bad = _nonfinite(out.loss)
        if self.on_nonfinite_loss == "skip" and split == "train" and self._distributed():
            bad = not agree(not bad, self.reducer)
        if not bad:
            return True
        parts = [name for name, value in out.parts.items() if isinstance(value, Tensor) and _nonfinite(value)]
        where = f"{split} batch {batch_idx} (global step {self._global_step()})"
        what = (f"non-finite parts: {parts}" if parts else
                f"the parts {sorted(out.parts)} are finite" if out.parts else "the loss has no named parts")
        if not _nonfinite(out.loss):
            what = "another rank's loss is non-finite"
        if self.on_nonfinite_loss == "raise":
            raise NonFiniteLossError(
                f"{type(self).__name__}: the loss is {out.loss.detach().flatten()[:1].item()} at {where}; {what}. "
                "The inputs or labels may hold NaN/inf, or training diverged (learning rate too high). Pass "
                "on_nonfinite_loss='skip' to skip such batches instead."
            )
        rank_zero_warn(f"{type(self).__name__}: skipped {where}: non-finite loss ({what})")
        return False

    def _distributed(self) -> bool:
        if self.reducer is not None:
            return self.reducer.world_size > 1
        return torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1

    def _global_step(self) -> int:
        return int(self.trainer.global_step) if self._trainer is not None else 0

    def shared_step(self, batch: Any, batch_idx: int, split: str) -> Tensor | None:
        """``compute_losses``, the divergence guard, logging of ``<split>_loss`` (per step too in training) and
        ``<split>_<part>`` (per epoch), and the update and logging of the split's metrics."""
        out = self.compute_losses(batch, split)
        if not self.loss_is_usable(out, split, batch_idx):
            return None
        targets = self.metric_targets(batch)
        n = self._batch_size(batch, out, targets)
        train = split == "train"
        self.log(f"{split}_loss", out.loss, on_step=train, on_epoch=True, sync_dist=True, batch_size=n,
                 prog_bar=split != "test")
        for name, part in out.parts.items():
            if part is not None:
                self.log(f"{split}_{name}", part, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        key = self._metric_key(split)
        if out.logits is not None and targets is not None and key in self.split_metrics:
            metrics = self.split_metrics[key]
            metrics.update(out.logits.detach(), targets)
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=n, prog_bar=split == "val")
        return out.loss

    @staticmethod
    def _batch_size(batch: Any, out: StepOutput, targets: Tensor | None) -> int:
        if targets is not None and targets.ndim > 0:
            return int(targets.shape[0])
        if out.logits is not None and out.logits.ndim > 0:
            return int(out.logits.shape[0])
        return 1

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self.shared_step(batch, batch_idx, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self.shared_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self.shared_step(batch, batch_idx, "test")

    # -------------------------------------------------------------------------------------------- optimisation
    def optimizer_parameters(self) -> Iterable[nn.Parameter] | Iterable[dict[str, Any]]:
        """The parameters the optimiser updates (or parameter groups): by default all with ``requires_grad``."""
        return [p for p in self.parameters() if p.requires_grad]

    def build_optimizer(self, params: Iterable[Any], *, fused: bool = False) -> torch.optim.Optimizer:
        """The configured optimiser over ``params`` (parameters or parameter groups). Groups keep their own
        ``lr`` / ``weight_decay`` where they state one (AdamW's default decay is 0.01, so the configured value is
        always passed). ``fused=True`` asks Adam / AdamW for the fused kernel (one pass over each parameter)."""
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters (all have requires_grad=False)")
        common: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, momentum=self.momentum, **common)
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        if fused:
            common["fused"] = True
        return cls(params, **common)

    def total_steps(self) -> int:
        """The number of optimiser steps of the whole fit (a scheduler needs a finite one)."""
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                f"{type(self).__name__}: scheduler={self.scheduler_name!r} needs a finite training length: set "
                "max_epochs or max_steps"
            )
        return max(1, int(total))

    @staticmethod
    def cosine_scheduler(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine annealing from each group's rate to 0 over ``steps`` optimiser steps."""
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(steps)))

    def configure_optimizers(self) -> Any:
        opt = self.build_optimizer(self.optimizer_parameters())
        if self.scheduler_name is None:
            return opt
        scheduler = self.cosine_scheduler(opt, self.total_steps())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
