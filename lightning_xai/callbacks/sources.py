"""Where a callback's data comes from - one lookup for every callback (a mixin of
:class:`~lightning_xai.callbacks.base.XAICallback`).

In order: a ``dataset=`` given to the callback; the datamodule's ``dataset(split)`` (this project's DataModules);
the ``dataloader_idx``-th loader of the split - the Trainer's if it loaded them, else asked from what the Trainer
was given (loaders passed to ``fit`` / ``validate``, the datamodule or the model), so that a callback finds its
data even when Lightning did not load it (``limit_val_batches=0``, a run stopped before its first validation);
else the train split, said once. Several loaders: the one at ``dataloader_idx``, said once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_xai.callbacks.records import ConfigurationError

__all__ = ["DataSources", "data_source"]


class DataSources:
    """The data lookup of a callback; expects ``name``, ``split``, ``dataloader_idx``, ``given_dataset`` and
    ``say_once`` from the callback."""

    name: str
    split: str
    dataloader_idx: int
    given_dataset: Any

    def say_once(self, key: str, message: str) -> None:  # provided by the callback
        raise NotImplementedError

    def dataset(self, trainer: Any, split: str | None = None) -> Any:
        """The dataset of ``split`` (default: the callback's), found as the module docstring says."""
        split = split or self.split
        if self.given_dataset is not None:
            return self.given_dataset
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "dataset", None)):
            try:
                return datamodule.dataset(split)
            except (TypeError, KeyError, ValueError, AttributeError):
                pass  # not this project's DataModule signature: fall back on the loaders
        loaders = self._loaders(trainer, split)
        if loaders is None and split != "train":
            loaders = self._loaders(trainer, "train")
            if loaders is not None:
                self.say_once("train-split", f"found no {split} data; drawing the probe set from the train split")
        if loaders is None:
            raise ConfigurationError(
                f"{self.name}: found no {split} data (no {split}_dataloader on the trainer, datamodule or model); "
                "pass dataset= or probe_batch="
            )
        loader = self._pick(loaders, split)
        if not hasattr(loader, "dataset"):
            raise ConfigurationError(f"{self.name}: the {split} loader has no dataset; pass dataset= or probe_batch=")
        return loader.dataset

    def _pick(self, loaders: Any, split: str) -> Any:
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            if not loaders:
                return None
            if self.dataloader_idx >= len(loaders):
                raise ConfigurationError(
                    f"{self.name}: dataloader_idx={self.dataloader_idx} but the {split} split has {len(loaders)} "
                    f"loaders (valid: 0..{len(loaders) - 1})"
                )
            if len(loaders) > 1:
                self.say_once(
                    "loader",
                    f"the {split} split has {len(loaders)} loaders; using loader {self.dataloader_idx} "
                    "(set dataloader_idx= to choose)",
                )
            return loaders[self.dataloader_idx]
        return loaders

    def _loaders(self, trainer: Any, split: str) -> Any:
        """The split's loader(s): the Trainer's if it loaded them, else asked from the source the Trainer was given
        (loaders passed to ``fit``/``validate``, the datamodule or the model) even when Lightning did not load
        them (``limit_val_batches=0``, a run stopped before its first validation)."""
        attr = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders"}[split]
        loaders = getattr(trainer, attr, None)
        if loaders is not None and not (isinstance(loaders, (list, tuple, Mapping)) and not loaders):
            return loaders
        method = f"{split}_dataloader"
        sources = [data_source(trainer, split), getattr(trainer, "datamodule", None),
                   getattr(trainer, "lightning_module", None)]
        for candidate in sources:
            if candidate is None:
                continue
            fn = getattr(candidate, method, None)
            if not callable(fn):
                if hasattr(candidate, "dataset") or isinstance(candidate, (list, tuple, Mapping)):
                    return candidate  # loaders given to trainer.fit / validate directly
                continue
            try:
                loaders = fn()
            except Exception as err:
                if type(err).__name__ in ("MisconfigurationException", "NotImplementedError"):
                    continue  # the hook is not implemented by this source
                raise ConfigurationError(f"{self.name}: {type(candidate).__name__}.{method}() failed: {err}") from err
            if loaders is not None and not (isinstance(loaders, (list, tuple, Mapping)) and not loaders):
                return loaders
        return None


def data_source(trainer: Any, split: str) -> Any:
    """What the Trainer was given for ``split`` (loaders, a datamodule or the model), from its loops."""
    try:
        if split == "train":
            loop = trainer.fit_loop
        elif split == "test":
            loop = trainer.test_loop
        elif getattr(getattr(trainer.state, "fn", None), "value", trainer.state.fn) == "validate":
            loop = trainer.validate_loop
        else:
            loop = trainer.fit_loop.epoch_loop.val_loop
        return loop._data_source.instance
    except AttributeError:
        return None
