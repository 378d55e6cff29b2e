"""The ``lightning-xai`` command: LightningCLI over this project's models, data modules and callbacks.

    lightning-xai fit --config examples/configs/quickstart.yaml
    lightning-xai validate --config examples/configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt

Models, data modules, loggers and callbacks are chosen by ``class_path`` in the YAML file (any importable
LightningModule / LightningDataModule works, not only this project's; loggers and Lightning's callbacks also by
class name, e.g. ``WandbLogger``, ``ModelCheckpoint``). LightningCLI comes from :mod:`lightning_xai.namespace`,
so the command runs on whichever Lightning (``lightning`` or ``pytorch_lightning``) the library builds on.

Exit status: 0 on success; 2 for a command-line / config error that the argument parser reports; 1 (with the
traceback) for any other failure. Nothing else is printed than what Lightning and the callbacks print.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

# Importing the packages registers every attributor name and makes the classes importable by class_path.
import lightning_xai.attribution
import lightning_xai.callbacks
import lightning_xai.data
import lightning_xai.models  # noqa: F401
from lightning_xai.namespace import LightningCLI, LightningDataModule, LightningModule

__all__ = ["XAICLI", "console_main", "main"]


class XAICLI(LightningCLI):
    """LightningCLI that also reads back checkpoints whose hyperparameters lack LightningCLI's ``_class_path``.

    ``validate`` / ``test`` / ``predict`` with ``--ckpt_path`` apply the checkpoint's hyperparameters to the model
    config. LightningCLI finds the model class in the key ``_class_path``, which it adds only when a model calls
    ``save_hyperparameters()`` without arguments; this project's models (and many others) save an explicit dict,
    and LightningCLI then applies the hyperparameters to the bare ``LightningModule`` and fails. The class named
    in the config is the checkpoint's class, so it is used.
    """

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        model = config.get("model") if config is not None else None
        class_path = getattr(model, "class_path", None)
        if not (ckpt_path and Path(ckpt_path).is_file() and class_path):
            super()._parse_ckpt_path()
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
        if not hparams or "_class_path" in hparams:
            super()._parse_ckpt_path()
            return
        update = {subcommand: {"model": {"class_path": class_path, "dict_kwargs": hparams}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except SystemExit:
            sys.stderr.write(f"the hyperparameters in {ckpt_path} do not fit the model class {class_path}\n")
            raise


def main(args: list[str] | None = None, run: bool = True) -> XAICLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` defaults to ``sys.argv[1:]``. Returns the
    ``LightningCLI`` object (its ``trainer``, ``model``, ``datamodule``), for scripts and tests; the console
    script is :func:`console_main`."""
    cli_kwargs: dict[str, Any] = {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        "args": args,
        "run": run,
    }
    return XAICLI(LightningModule, LightningDataModule, **cli_kwargs)


def console_main(args: list[str] | None = None) -> int:
    """The ``lightning-xai`` console script: run the CLI and return the exit status 0. A failure raises, so the
    interpreter prints the traceback and exits with status 1; an argument error exits with the parser's status
    2. (The console script wraps the return value in ``sys.exit``: returning the CLI object, as ``main`` does,
    would print its repr and exit with status 1 after a successful run.)"""
    main(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(console_main())
