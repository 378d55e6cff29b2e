"""``XAIModule``: the shared base of this project's LightningModules (optimiser configuration, hyper-parameters)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
from torch import nn

from lightning_xai.namespace import pl

__all__ = ["OPTIMIZERS", "SCHEDULERS", "XAIModule"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine",)


def _module_valued_init_args(frame: FrameType | None, obj: object) -> list[str]:
    """Names of ``__init__`` arguments of ``obj`` (in this and the calling constructors) whose value is a module."""
    names: list[str] = []
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj:
        arg_names, _, _, values = inspect.getargvalues(frame)
        names += [n for n in arg_names if isinstance(values.get(n), nn.Module)]
        frame = frame.f_back
    return names


class XAIModule(pl.LightningModule):
    """Base LightningModule: validated optimiser/scheduler settings and automatic ``save_hyperparameters``.

    Args:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        lr: learning rate, > 0.
        weight_decay: L2 penalty (``adam``, ``sgd``) or decoupled weight decay (``adamw``), >= 0.
        scheduler: ``None`` (constant learning rate) or ``"cosine"``: cosine annealing from ``lr`` to 0 over all
            training steps (``trainer.estimated_stepping_batches``), stepped every optimiser step.
        momentum: SGD momentum in [0, 1); ignored by the Adam variants.

    The constructor arguments of the subclass and of this class are saved with ``save_hyperparameters`` (so
    checkpoints restore the configuration and loggers record it); arguments passed as ``nn.Module`` objects are
    left out - they are saved in the state dict and must be passed again to ``load_from_checkpoint``.

    Subclasses choose what is optimised by overriding :meth:`optimizer_parameters` (by default every parameter
    with ``requires_grad``, so frozen submodules stay frozen).
    """

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers: {list(OPTIMIZERS)}")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid schedulers: {[None, *SCHEDULERS]}")
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.scheduler_name = scheduler
        self.momentum = float(momentum)
        frame = inspect.currentframe()
        try:
            self.save_hyperparameters(ignore=_module_valued_init_args(frame, self), frame=frame)
        finally:
            del frame

    def optimizer_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters the optimiser updates: by default all with ``requires_grad``."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        params = list(self.optimizer_parameters())
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters (all have requires_grad=False)")
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum)
        if self.scheduler_name is None:
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("scheduler='cosine' needs a finite training length: set max_epochs or max_steps")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
