"""Where a callback's files go (a mixin of :class:`~lightning_xai.callbacks.base.XAICallback`): one output folder
(``output_dir``, default ``<default_root_dir>/xai``), file names that carry the callback, the Trainer's stage,
epoch and step and never overwrite one another, and the state rank zero writes under ``ddp_spawn`` (whose
launching process never sees the workers' callback objects) with :meth:`RunFiles.load_results` to read it back.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_xai.viz.logging import unique_stem

__all__ = ["RunFiles"]


class RunFiles:
    """Files of a callback; expects ``name``, ``log_key``, ``output_dir``, ``stage``, ``state_dict`` and
    ``load_state_dict`` from the callback."""

    name: str
    log_key: str
    output_dir: str | None

    def _dir(self, trainer: Any) -> str:
        return self.output_dir or os.path.join(trainer.default_root_dir, "xai")

    def output_path(self, trainer: Any, name: str, ext: str = "png", folder: str | None = None) -> str:
        """A new file path ``<folder>/<name>_<stage>_epoch<e>_step<s>.<ext>`` (``folder`` defaults to
        ``<output_dir>/<callback>``; the step is the loggers' step, so files match the dashboard; never an existing
        file: a suffix is added)."""
        folder = folder or os.path.join(self._dir(trainer), self.name.lower())
        os.makedirs(folder, exist_ok=True)
        when = f"{self.stage(trainer)}_epoch{trainer.current_epoch:03d}_step{self.logger_step(trainer):06d}"
        return os.path.join(folder, f"{unique_stem(folder, name.replace('/', '_') + '_' + when)}.{ext}")

    @staticmethod
    def _spawned(trainer: Any) -> bool:
        launcher = getattr(trainer.strategy, "launcher", None)
        return getattr(launcher, "_start_method", None) == "spawn" and trainer.world_size > 1

    def _results_path(self, trainer: Any | None = None, output_dir: str | None = None) -> str:
        folder = output_dir or (self._dir(trainer) if trainer is not None else self.output_dir) or "."
        return os.path.join(folder, f"{self.name.lower()}_{self.log_key.replace('/', '_')}_state.pt")

    def _save_results(self, trainer: Any) -> None:
        path = self._results_path(trainer)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(self.state_dict(), path)

    def load_results(self, output_dir: str | None = None) -> None:
        """Load what rank zero wrote at the end of a ``ddp_spawn`` fit (the launching process's object is empty)."""
        path = self._results_path(output_dir=output_dir)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{self.name}: no results at {path}; was the run a ddp_spawn fit?")
        self.load_state_dict(torch.load(path, weights_only=False))
