"""Which Lightning the library builds on: ``lightning.pytorch`` or ``pytorch_lightning`` - decided once, here.

The two packages hold the same code under two names, and a Trainer of one refuses a LightningModule of the other.
The library's callbacks work with either Trainer (Lightning calls callbacks by duck typing), but its
LightningModules and DataModules must derive from the user's namespace. The rule, applied when
``lightning_xai`` is first imported:

1. the environment variable ``LIGHTNING_XAI_NAMESPACE`` (``lightning`` / ``lightning.pytorch`` or
   ``pytorch_lightning``), if set;
2. else the namespace the user's code has already imported (``import lightning as L`` or
   ``import pytorch_lightning as pl`` before ``import lightning_xai``); ``lightning`` if both were;
3. else whichever is installed, ``lightning`` first.

Nothing imports the other namespace: with only ``pytorch_lightning`` installed, ``lightning`` is never imported.
Every Lightning-facing module of the library imports Lightning from here (``from lightning_xai.namespace import
pl``), never directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

__all__ = [
    "NAME",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "is_lightning_module",
    "pl",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
    "resolve",
]

_CHOICES = {"lightning": "lightning.pytorch", "lightning.pytorch": "lightning.pytorch",
            "pytorch_lightning": "pytorch_lightning"}
ENV = "LIGHTNING_XAI_NAMESPACE"


def resolve(environ: dict[str, str] | None = None, modules: dict[str, Any] | None = None) -> str:
    """The module name of the Lightning to use (``"lightning.pytorch"`` or ``"pytorch_lightning"``) by the rule
    above; ``environ`` and ``modules`` default to ``os.environ`` and ``sys.modules`` (parameters for testing)."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    requested = environ.get(ENV, "").strip()
    if requested:
        if requested not in _CHOICES:
            raise ImportError(f"{ENV}={requested!r} is not a Lightning namespace; valid values: {sorted(_CHOICES)}")
        return _CHOICES[requested]
    if "lightning.pytorch" in modules or "lightning" in modules:
        return "lightning.pytorch"
    if "pytorch_lightning" in modules:
        return "pytorch_lightning"
    for name in ("lightning", "pytorch_lightning"):
        if importlib.util.find_spec(name) is not None:
            return _CHOICES[name]
    raise ImportError("lightning_xai needs Lightning: `pip install lightning` (or pytorch-lightning)")


NAME = resolve()
pl: ModuleType = importlib.import_module(NAME)
_utilities = importlib.import_module(f"{NAME}.utilities")

Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
rank_zero_only = _utilities.rank_zero_only
rank_zero_warn = _utilities.rank_zero_warn
rank_zero_info = _utilities.rank_zero_info


def __getattr__(name: str) -> Any:  # LightningCLI imports jsonargparse: only on demand
    if name == "LightningCLI":
        return importlib.import_module(f"{NAME}.cli").LightningCLI
    if name == "loggers":
        return importlib.import_module(f"{NAME}.loggers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_lightning_module(obj: object) -> bool:
    """Whether ``obj`` is a LightningModule of *either* namespace (callbacks accept both)."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        module = sys.modules.get(name)
        if module is not None and isinstance(obj, module.LightningModule):
            return True
    return False
