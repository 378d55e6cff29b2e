"""The ``lightning-xai`` command: LightningCLI over this project's models, data modules and callbacks.

    lightning-xai fit --config examples/configs/quickstart.yaml
    lightning-xai validate --config examples/configs/quickstart.yaml --ckpt_path runs/.../last.ckpt

Models, data modules, loggers and callbacks are chosen by ``class_path`` in the YAML file (any importable
LightningModule / LightningDataModule works, not only this project's).
"""

from __future__ import annotations

from typing import Any

# Importing the packages registers every attributor name and makes the classes importable by class_path.
import lightning_xai.attribution
import lightning_xai.callbacks
import lightning_xai.data
import lightning_xai.models  # noqa: F401
from lightning_xai.namespace import LightningCLI, pl

__all__ = ["main"]


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``args`` defaults to ``sys.argv[1:]``); returns the ``LightningCLI`` object."""
    cli_kwargs: dict[str, Any] = {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        "args": args,
        "run": run,
    }
    return LightningCLI(pl.LightningModule, pl.LightningDataModule, **cli_kwargs)


if __name__ == "__main__":  # pragma: no cover
    main()
