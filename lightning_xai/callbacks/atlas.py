"""``ActivationAtlas`` callback: draw the activation atlas of a layer (Carter et al., Distill 2019) during or after
training and log it as one image plus a cell table."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.attribution.token_grid import Reshape
from lightning_xai.batch import outputs_as_logits
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback
from lightning_xai.checks import check_int, check_optional_int
from lightning_xai.interpretation.atlas import ActivationAtlas as AtlasMethod
from lightning_xai.interpretation.atlas import AtlasResult
from lightning_xai.interpretation.embedding import iterate_batches
from lightning_xai.viz.logging import log_image, log_table
from lightning_xai.viz.render import save_png

__all__ = ["ActivationAtlas"]


class ActivationAtlas(XAICallback):
    """Log the activation atlas of one layer over ``num_samples`` images of a split (Carter et al., Distill 2019;
    the method is :class:`lightning_xai.interpretation.ActivationAtlas`).

    At the end of fit (``every_n_epochs=None``, the default: the atlas costs one forward pass over the images, the
    2-D layout and a feature visualisation per cell) or every n epochs, the callback collects spatial activation
    vectors of ``layer`` from the images (each rank its share, gathered), lays them out in 2-D, averages them per
    grid cell, renders each cell's direction by activation maximisation and logs

    * ``<log_key>/activation_atlas``: the atlas image (icons sized by cell count; with ``target_class``, cells
      faded by their attribution toward that class), also written as PNG under ``output_dir``;
    * ``<log_key>/atlas_cells``: one row per cell (position, count, most common label, icon objective vs random
      inputs, class attribution, the icon);
    * scalars ``<log_key>/atlas/cells`` (non-empty cells) and ``<log_key>/atlas/icon_gain`` (mean icon objective
      minus that of random inputs: positive when the visualisation works).

    Cost (``benchmarks/cem_atlas.py``, CPU, 200 images of 24x24, 1200 vectors): collecting ~1.3 forward passes
    over the images, rendering 28 cells with 32 ascent steps ~25 forward passes; the layout dominates with t-SNE
    (~330 forward passes, ~30 s), PCA is instant - use ``method="pca"`` for an atlas every epoch.

    Args:
        layer: dotted name of the layer (validated at setup, with close matches); or give ``atlas``.
        atlas: a configured :class:`lightning_xai.interpretation.ActivationAtlas` (then ``layer`` and the layout
            arguments below are taken from it).
        num_samples: images read from the split (``None``: all).
        grid_size, positions_per_image, method: see :class:`lightning_xai.interpretation.ActivationAtlas`.
        target_class: draw the class-filtered atlas for this class (validated against the model's outputs).
        tile: pixels per grid cell in the logged image.
        reshape: how a vision transformer's token layer ``[B, T, D]`` is laid out on its patch grid (see
            :class:`lightning_xai.interpretation.ActivationAtlas`; with ``atlas=``, configure the atlas). The
            layer's output is checked at setup: a grid that does not fit its tokens is a configuration error.
        **kwargs: the common callback arguments (``every_n_epochs``, ``split``, ``dataset``, ``on_error``,
            ``log_key``, ``seed``, ``output_dir``, ``batch_size``, ...).
    """

    state_fields = ("history",)
    uses_probe = False

    def __init__(
        self,
        layer: str | None = None,
        atlas: AtlasMethod | None = None,
        num_samples: int | None = 256,
        grid_size: int = 8,
        positions_per_image: int = 8,
        method: str = "auto",
        target_class: int | None = None,
        tile: int = 48,
        every_n_epochs: int | None = None,
        reshape: Reshape = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, num_samples=0, **kwargs)
        name = self.name
        self.num_samples = check_optional_int("num_samples", num_samples, minimum=1, owner=name, none_means="all")
        if atlas is None:
            if not isinstance(layer, str) or not layer:
                raise ValueError(f"{name}: give layer= (a dotted module name) or atlas=, got layer={layer!r}")
            atlas = AtlasMethod(layer, grid_size=grid_size, positions_per_image=positions_per_image, method=method,
                                max_samples=self.num_samples, batch_size=self.batch_size, seed=self.seed,
                                reshape=reshape)
        elif not isinstance(atlas, AtlasMethod):
            raise ValueError(f"{name}: atlas must be a lightning_xai.interpretation.ActivationAtlas, got {atlas!r}")
        elif reshape is not None:
            raise ValueError(f"{name}: give reshape= to the configured atlas, not the callback (got {reshape!r})")
        self.atlas = atlas
        self.target_class = check_optional_int("target_class", target_class, minimum=0, owner=name)
        self.tile = check_int("tile", tile, minimum=8, owner=name)
        #: One record per run: stage, epoch, step, cells, icon_gain, method.
        self.history: list[dict[str, Any]] = []
        #: The atlas of the last run (identical on every rank).
        self.last_result: AtlasResult | None = None

    def _state_key_parts(self) -> dict[str, Any]:
        return {"layer": str(self.atlas.layer), "target_class": self.target_class}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_samples": self.num_samples, "layer": str(self.atlas.layer),
                "grid_size": self.atlas.grid_size, "method": self.atlas.method, "target_class": self.target_class}

    # ------------------------------------------------------------------------------------------ setup
    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        model = self.layer_module(pl_module)
        try:
            resolve_layer(model, self.atlas.layer)
        except (ValueError, TypeError) as err:
            raise ConfigurationError(f"{self.name}: {err}") from err
        dataset = self.dataset(trainer, self.split)
        x, _ = next(iterate_batches(dataset, 1))
        if not x.is_floating_point():
            raise ConfigurationError(f"{self.name}: the inputs are {x.dtype}; the atlas icons are optimised in "
                                     "input space and need floating point inputs")
        if x.ndim != 4:
            raise ConfigurationError(f"{self.name}: the atlas renders image inputs [B, C, H, W]; got shape "
                                     f"{list(x.shape)}")
        try:  # a token layer's grid that fits no patch grid fails here, not after training
            self.atlas.check_layer(model, x)
        except ValueError as err:
            raise ConfigurationError(f"{self.name}: the layer's activation vectors cannot be read: {err}") from err
        logits = self.eval_logits(pl_module, x.to(pl_module.device))
        if self.target_class is not None and (logits.ndim != 2 or self.target_class >= logits.shape[1]):
            valid = f"0..{logits.shape[1] - 1}" if logits.ndim == 2 else "none (the output is not [B, classes])"
            raise ConfigurationError(f"{self.name}: target_class={self.target_class} is out of range; valid: {valid}")

    # ------------------------------------------------------------------------------------------ work
    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        dataset = self.dataset(trainer, self.split)
        model = self.layer_module(pl_module)

        def draw() -> AtlasResult:
            with outputs_as_logits(model, self.output_reader):
                return self.atlas(model, dataset, target_class=self.target_class, reducer=self.reducer)

        result = self.run_agreed(draw)
        self.last_result = result
        gain = float("nan")
        if result.icon_scores is not None and result.random_scores is not None:
            gain = float((result.icon_scores - result.random_scores).mean())
        cells = int(result.counts.numel())
        self.history.append(self.history_record(trainer, cells=cells, icon_gain=gain, method=result.method))
        if trainer.is_global_zero and result.icons is not None:
            self._log(trainer, result)
        return {f"{self.log_key}/atlas/cells": float(cells), f"{self.log_key}/atlas/icon_gain": gain}

    def _log(self, trainer: Any, result: AtlasResult) -> None:
        image = result.render(tile=self.tile)
        step = trainer.global_step
        what = f"class {self.class_name(self.target_class)} " if self.target_class is not None else ""
        caption = (f"{what}activation atlas of {self.atlas.layer} ({result.method}, {result.vectors.shape[0]} "
                   f"vectors, {result.counts.numel()} cells) at {self.stage(trainer)} epoch {trainer.current_epoch}")
        outputs = list(log_image(trainer.loggers, f"{self.log_key}/activation_atlas", image, step=step,
                                 caption=caption))
        path = self.output_path(trainer, f"{self.log_key}_activation_atlas")
        save_png(image, path, caption=caption)
        outputs.append(path)
        columns, rows = result.table()
        icons = result.icons
        assert icons is not None
        low = icons.amin(dim=(1, 2, 3), keepdim=True)
        high = icons.amax(dim=(1, 2, 3), keepdim=True)
        scaled = ((icons - low) / (high - low).clamp(min=1e-12))[:, :3]
        if scaled.shape[1] == 1:
            scaled = scaled.expand(-1, 3, -1, -1)
        u8 = (scaled.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        rows = [[*row, np.ascontiguousarray(u8[k])] for k, row in enumerate(rows)]
        try:
            outputs += list(log_table(trainer.loggers, f"{self.log_key}/atlas_cells", [*columns, "icon"], rows,
                                      step=step) or [])
        except Exception as err:  # a table is a convenience; never lose the image because of it
            self.say_once("table", f"could not log the cell table: {err}")
        self.last_outputs = outputs
