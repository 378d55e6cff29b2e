"""``ClassPrototypes``: activation-maximisation images of the classes, during training."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_xai.batch import outputs_as_logits
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback
from lightning_xai.callbacks.logits import check_class_logits
from lightning_xai.checks import check_int, check_optional_int
from lightning_xai.distributed import shard_bounds
from lightning_xai.interpretation.visualization import ActivationMaximization
from lightning_xai.viz.logging import log_image, log_table
from lightning_xai.viz.render import tile_images, to_uint8_images, upscale_nearest

__all__ = ["ClassPrototypes"]

_UNSET: Any = object()

#: The callback's defaults of the old keyword arguments (``blur_every=4`` differs from the method's default).
LEGACY_DEFAULTS: dict[str, Any] = {
    "steps": 128,
    "lr": 0.05,
    "l2": 1e-2,
    "tv": 1e-1,
    "jitter": 2,
    "blur_every": 4,
    "blur_sigma": 0.5,
    "init_mean": 0.5,
    "init_std": 0.1,
    "clamp": (0.0, 1.0),
}


def _segments(positions: Sequence[int]) -> list[list[int]]:
    """``positions`` cut into runs of consecutive integers (``[4, 5, 0, 1] -> [[4, 5], [0, 1]]``)."""
    out: list[list[int]] = []
    for p in positions:
        if out and p == out[-1][-1] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


class ClassPrototypes(XAICallback):
    """Activation-maximisation images of the classes (Erhan, Bengio, Courville & Vincent 2009; Simonyan, Vedaldi
    & Zisserman, "Deep Inside Convolutional Networks", 2013), logged as a grid, so that a W&B slider shows what
    the model "thinks" each class looks like as training goes on.

    The images are optimised by a configured
    :class:`~lightning_xai.interpretation.visualization.ActivationMaximization` (``maximizer=``); for
    compatibility its keyword arguments (``steps``, ``lr``, ``l2``, ``tv``, ``jitter``, ``blur_every``,
    ``blur_sigma``, ``init_mean``, ``init_std``, ``clamp``) are still accepted instead. Image ``i`` of
    ``classes`` always starts from the same seeded noise (seeded by its position in ``classes``), so runs and
    ranks are comparable. The image shape is ``image_shape`` or that of the first probe sample.

    Bounded cost: at most ``classes_per_run`` classes are optimised per run (default 8: about 4.6 training steps
    per class on resnet18 at 64 px with the default 128 steps, so about 37 steps or 2.3 % of a CIFAR-10-sized
    epoch per run, measured with ``benchmarks/callbacks.py``); with more classes the runs rotate
    through them (a window of consecutive classes that moves on by ``classes_per_run`` every run, starting at a
    position drawn from ``seed``), so that every class is visited every ``ceil(classes / classes_per_run)`` runs.

    Checked at setup: ``classes`` are in the model's range. Never a wrong number: a class whose final logit is NaN
    / inf is reported (once, by class), kept out of the grid, the table and the metric, and recorded as ``None``.

    Logged: the grid ``<log_key>/grid`` (this run's classes, in order), a table ``<log_key>/classes`` (class,
    name, start logit, final logit, image) and the metric ``<log_key>/mean_logit`` (mean final logit).
    ``history`` keeps the final logits of every run (resumable; ``records`` also names the classes of each run).

    Cost per run: ``steps`` forward + backward passes over ``ceil(min(classes, classes_per_run) / world_size)``
    images per rank.

    Args:
        classes: the classes (default: every class of the model).
        maximizer: the configured method.
        classes_per_run: most classes optimised per run (``None``: all of them).
        image_shape: ``(C, H, W)`` (default: the shape of a probe sample).
        class_names: names used in captions and tables.
        batch_size: images optimised together (used to build the method from the old keywords).
        **kwargs: the common arguments of :class:`~lightning_xai.callbacks.base.XAICallback`.
    """

    state_fields = ("records",)
    needs_gradients = False

    def __init__(
        self,
        classes: Sequence[int] | None = None,
        *,
        maximizer: ActivationMaximization | None = None,
        classes_per_run: int | None = 8,
        image_shape: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        num_samples: int = 1,
        batch_size: int = 16,
        log_key: str = "xai/prototypes",
        steps: int = _UNSET,
        lr: float = _UNSET,
        l2: float = _UNSET,
        tv: float = _UNSET,
        jitter: int = _UNSET,
        blur_every: int = _UNSET,
        blur_sigma: float = _UNSET,
        init_mean: float = _UNSET,
        init_std: float = _UNSET,
        clamp: tuple[float, float] | None = _UNSET,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, batch_size=batch_size, log_key=log_key, **kwargs)
        name = self.name
        legacy = {
            "steps": steps, "lr": lr, "l2": l2, "tv": tv, "jitter": jitter, "blur_every": blur_every,
            "blur_sigma": blur_sigma, "init_mean": init_mean, "init_std": init_std, "clamp": clamp,
        }
        given = {k: v for k, v in legacy.items() if v is not _UNSET}
        if maximizer is not None:
            if not isinstance(maximizer, ActivationMaximization):
                raise ValueError(
                    f"{name}: maximizer must be an ActivationMaximization, got {type(maximizer).__name__}"
                )
            if given:
                raise ValueError(
                    f"{name}: configure the given ActivationMaximization, not the callback: also got {sorted(given)}"
                )
            self.maximizer = maximizer
        else:
            try:
                self.maximizer = ActivationMaximization(
                    **{**LEGACY_DEFAULTS, **given}, batch_size=self.batch_size, seed=self.seed
                )
            except (ValueError, TypeError) as err:
                raise ValueError(f"{name}: {err}") from err
        if classes is not None:
            classes = [check_int("classes[]", c, minimum=0, owner=name) for c in classes]
            if not classes:
                raise ValueError(f"{name}: classes must be None (every class) or a non-empty list, got []")
        self.classes = classes
        self.classes_per_run = check_optional_int(
            "classes_per_run", classes_per_run, minimum=1, owner=name, none_means="every class at every run"
        )
        if image_shape is not None:
            shape = tuple(image_shape)
            if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
                raise ValueError(f"{name}: image_shape must be (C, H, W) with positive ints, got {image_shape!r}")
            image_shape = shape
        self.image_shape = image_shape
        self.class_names = None if class_names is None else list(class_names)
        #: One record per run: stage, epoch, step, ``classes`` (optimised this run), ``initial`` and ``final``
        #: logits (``None`` where not finite) - resumable.
        self.records: list[dict[str, Any]] = []
        #: The images of the last run, one per class of ``records[-1]["classes"]``.
        self.last_images: Tensor | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "classes_per_run": self.classes_per_run, "steps": self.maximizer.steps}

    @property
    def history(self) -> list[tuple[int, list[float | None]]]:
        """``[(epoch, [final logit per class of that run]), ...]`` (derived from :attr:`records`)."""
        return [(int(r["epoch"]), list(r["final"])) for r in self.records]

    @history.setter
    def history(self, value: Sequence[tuple[int, Sequence[float | None]]]) -> None:
        self.records = [
            {"stage": "fit", "epoch": int(e), "step": None, "classes": list(range(len(v))), "initial": None,
             "final": [None if x is None else float(x) for x in v]}
            for e, v in value
        ]

    # ------------------------------------------------------------------------------------------ setup
    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        if context.logits is None:
            return
        check_class_logits(self.name, context.logits, self.classes, "class prototypes maximise")
        if self.image_shape is not None and context.probe is not None:
            got = tuple(context.probe.inputs.shape[1:])
            if len(got) == 3 and got[0] != self.image_shape[0]:
                raise ConfigurationError(
                    f"{self.name}: image_shape={self.image_shape} has {self.image_shape[0]} channels but the "
                    f"model's inputs have shape {got}"
                )

    # ------------------------------------------------------------------------------------------ work
    def _shape(self, trainer: Any) -> tuple[int, int, int]:
        if self.image_shape is not None:
            return self.image_shape  # type: ignore[return-value]
        dataset = None if self.probe.fixed else self.dataset(trainer, self.split)
        if dataset is not None:
            self.probe.select(dataset)
        shape = tuple(self.probe.load(dataset, [0]).inputs.shape[1:])
        if len(shape) != 3:
            raise ConfigurationError(f"{self.name}: the inputs are not images (C, H, W): {shape}; pass image_shape=")
        return shape  # type: ignore[return-value]

    def positions(self, num_classes: int, run: int | None = None) -> list[int]:
        """The positions in the class list optimised at run ``run`` (default: the next run)."""
        run = len(self.records) if run is None else run
        k = self.classes_per_run
        if k is None or k >= num_classes:
            return list(range(num_classes))
        offset = int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(self.seed)))
        start = (offset + run * k) % num_classes
        return [(start + j) % num_classes for j in range(k)]

    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        model = self.layer_module(pl_module)
        shape = self.run_agreed(lambda: self._shape(trainer))
        classes = self.classes
        if classes is None:
            zeros = torch.zeros(1, *shape, device=pl_module.device)
            classes = list(range(int(self.eval_logits(pl_module, zeros).shape[1])))
        positions = self.positions(len(classes))
        start, stop, per_rank = shard_bounds(len(positions), trainer.world_size, trainer.global_rank)
        local = positions[start:stop]

        def optimise() -> tuple[Tensor, Tensor, Tensor]:
            images, initial, final = [], [], []
            for segment in _segments(local):
                target = torch.tensor([classes[p] for p in segment], dtype=torch.long)
                with outputs_as_logits(model, self.output_reader):
                    result = self.maximizer(model, target=target, image_shape=shape, first_index=segment[0])
                images.append(result.images.detach().float())
                initial.append(result.initial_scores.detach().float())
                final.append(result.final_scores.detach().float())
            pad = per_rank - len(local)  # equal shards for the collective; the padding is dropped after it
            device = pl_module.device
            images.append(torch.zeros(pad, *shape, device=device))
            initial.append(torch.zeros(pad, device=device))
            final.append(torch.zeros(pad, device=device))
            return (torch.cat([x.to(device) for x in images]), torch.cat([x.to(device) for x in initial]),
                    torch.cat([x.to(device) for x in final]))

        images, initial, final = self.run_agreed(optimise)
        total = len(positions)
        images, initial, final = self.gather(images, total), self.gather(initial, total), self.gather(final, total)
        run_classes = [int(classes[p]) for p in positions]
        finite = torch.isfinite(final) & torch.isfinite(initial) & torch.isfinite(images.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            bad = [c for c, ok in zip(run_classes, finite.tolist()) if not ok]
            self.say_once(
                f"nonfinite-{bad}",
                f"the logits of classes {bad} are NaN or inf during activation maximisation; they are reported, "
                "not drawn or scored",
            )
        self.last_images = images
        self.records.append(
            self.history_record(
                trainer,
                classes=run_classes,
                initial=[float(v) if ok else None for v, ok in zip(initial.tolist(), finite.tolist())],
                final=[float(v) if ok else None for v, ok in zip(final.tolist(), finite.tolist())],
            )
        )
        if trainer.is_global_zero and bool(finite.any()):
            self._log(trainer, images[finite], initial[finite], final[finite],
                      [c for c, ok in zip(run_classes, finite.tolist()) if ok])
        good = final[finite]
        return {f"{self.log_key}/mean_logit": float(good.mean())} if good.numel() else {}

    def _log(self, trainer: Any, images: Tensor, initial: Tensor, final: Tensor, classes: list[int]) -> None:
        step = self.logger_step(trainer)
        folder = os.path.dirname(self.output_path(trainer, "grid"))  # <output_dir>/classprototypes
        pictures = to_uint8_images(images)
        names = [self.class_name(c) for c in classes]
        caption = f"{self.stage(trainer)} epoch {trainer.current_epoch} | " + ", ".join(names)
        columns = max(1, math.ceil(math.sqrt(len(classes)))) if len(classes) > 10 else None
        outputs = list(
            log_image(trainer.loggers, f"{self.log_key}/grid", upscale_nearest(tile_images(pictures, columns), 64),
                      step=step, caption=caption, fallback_dir=folder)
        )
        rows = [[c, names[i], float(initial[i]), float(final[i]), upscale_nearest(pictures[i])]
                for i, c in enumerate(classes)]
        outputs += log_table(trainer.loggers, f"{self.log_key}/classes",
                             ["class", "name", "start_logit", "final_logit", "image"], rows, step=step,
                             fallback_dir=folder)
        self.last_outputs = outputs
