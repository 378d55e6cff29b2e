"""``ExplanationQuality``: how good the explanations are, measured on a fixed probe set during training.

(``SanityCheck`` lives in :mod:`lightning_xai.callbacks.sanity`; it is still importable from here.)
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback, method_names
from lightning_xai.callbacks.tokens import resolve_pad_token, valid_positions
from lightning_xai.checks import check_bool, check_choice, check_optional_int, suggest
from lightning_xai.evaluation import (
    AOPC,
    DeletionAUC,
    Infidelity,
    InsertionAUC,
    MaskIoU,
    PointingGame,
    RelevanceMass,
    RelevanceRank,
    Sparseness,
)
from lightning_xai.evaluation.base import is_token_batch
from lightning_xai.viz.logging import log_line_plot

__all__ = ["DEFAULT_METRICS", "QUALITY_METRICS", "TOKEN_METRICS", "ExplanationQuality", "all_ranks_agree"]

#: Metric name -> (class, what its ``update`` needs): "model" (attributions, inputs, model, target), "mask"
#: (attributions, masks) or "maps" (attributions only).
QUALITY_METRICS: dict[str, tuple[type[Metric], str]] = {
    "deletion_auc": (DeletionAUC, "model"),
    "insertion_auc": (InsertionAUC, "model"),
    "aopc": (AOPC, "model"),
    "infidelity": (Infidelity, "model"),
    "pointing_game": (PointingGame, "mask"),
    "mask_iou": (MaskIoU, "mask"),
    "relevance_mass": (RelevanceMass, "mask"),
    "relevance_rank": (RelevanceRank, "mask"),
    "sparseness": (Sparseness, "maps"),
}
_CURVE_METRICS = ("deletion_auc", "insertion_auc", "aopc")
#: The metrics scored by default (the localisation ones only where the data has pixel masks).
DEFAULT_METRICS = ("deletion_auc", "insertion_auc", "pointing_game", "mask_iou", "relevance_mass")
#: The metrics that score token models (integer ``[B, T]`` inputs, token maps ``[B, T]``).
TOKEN_METRICS = (
    "deletion_auc", "insertion_auc", "pointing_game", "mask_iou", "relevance_mass", "relevance_rank", "sparseness"
)
INPUT_KINDS = ("auto", "images", "tokens")


def all_ranks_agree(trainer: Any, ok: bool, device: Any = None) -> bool:
    """Deprecated: use :func:`lightning_xai.distributed.agree`. True when ``ok`` holds on every rank."""
    from lightning_xai.distributed import agree, default_reducer

    warnings.warn(
        "lightning_xai.callbacks.quality.all_ranks_agree is deprecated; use lightning_xai.distributed.agree",
        DeprecationWarning,
        stacklevel=2,
    )
    return agree(ok, default_reducer())


def _accepts(method: Any, argument: str) -> bool:
    try:
        return argument in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def mean_and_sem(values: Tensor) -> tuple[float, float, int, int]:
    """``(mean, standard error of the mean, scored, excluded)`` of per-sample values, ``NaN`` = excluded.
    The standard error is ``std / sqrt(n)`` with the unbiased standard deviation (``NaN`` for fewer than two)."""
    values = values.detach().double().reshape(-1).cpu()
    valid = values[~torch.isnan(values)]
    n = int(valid.numel())
    mean = float(valid.mean()) if n else math.nan
    sem = float(valid.std(unbiased=True) / math.sqrt(n)) if n >= 2 else math.nan
    return mean, sem, n, int(values.numel()) - n


class ExplanationQuality(XAICallback):
    """Score the explanations of a fixed probe set with the metrics of :mod:`lightning_xai.evaluation` and log them
    as ``<log_key>/<method>/<metric>``, with their standard error over the probe set as
    ``<log_key>/<method>/<metric>_sem``.

    Faithfulness metrics (deletion / insertion AUC of Petsiuk et al., BMVC 2018; AOPC of Samek et al., IEEE TNNLS
    2017; infidelity of Yeh et al., NeurIPS 2019) perturb the input and query the model; localisation metrics
    (pointing game of Zhang et al., ECCV 2016; mask IoU as in Oramas et al., ICLR 2019; relevance mass / rank of
    Arras et al., Information Fusion 2022) compare the map with the ground-truth pixel masks the data provides;
    sparseness is the Gini index of the map (Chalasani et al., ICML 2020).

    **What the data provides is recognised at setup**: localisation metrics run only when the probe samples carry
    pixel masks of the inputs' spatial size (a concept vector or class-level annotation is not a mask); the
    metrics left out are named once, with the reason. Asking only for metrics the data cannot support is a
    configuration error raised before the first training step.

    **Never a wrong number**: a method that fails or gives a NaN / inf map is reported by name and skipped (the
    other methods' scores are kept); samples whose model output is NaN / inf are reported and not scored; a
    metric with no scorable sample (e.g. every mask empty) is reported, not logged.

    **Cost and precision**: the logged value is the mean over the probe set; ``<metric>_sem`` is its standard
    error, so a user can see what a smaller (cheaper) probe set would cost in precision (the error grows as
    ``1 / sqrt(num_samples)``). The default (16 samples, 2 methods, deletion + insertion curves of 64 steps
    each, the metrics' chunks of 64 perturbed images) costs about 36 training steps of the user's model per run
    (resnet18, 64 px, batch 32, one CPU thread; CPU time, interleaved repetitions) - 2.3 % of a CIFAR-10 epoch of
    1563 steps; 32 samples cost about twice that (4-5 %) for a standard error smaller by ``sqrt(2)``. The curves
    keep their resolution: halving ``steps`` would halve the cost too, but changes the area being estimated.

    **DDP**: every rank draws the same probe indices, explains its own contiguous shard and updates its metric
    objects; ``compute()`` gathers the per-sample values across ranks (torchmetrics), so the logged mean and
    standard error are those of the whole probe set on every rank. Random metrics are seeded by the samples'
    identities (dataset indices, or positions in a given ``probe_batch``) where their ``update`` accepts
    ``sample_ids``, so results do not depend on the sharding.

    **Token models** (integer ``[B, T]`` inputs, e.g. a
    :class:`~lightning_xai.models.transformers.TextTransformer` on
    :class:`~lightning_xai.data.tokens.PlantedTokens`, explained by token methods such as ``token_saliency``,
    ``token_occlusion`` or ``attention_rollout``): the maps are one relevance per token, the localisation metrics
    (:data:`TOKEN_METRICS`) compare them with the batch's token masks ``[B, T]`` (e.g. the planted key
    positions), deletion / insertion replace a token's id by ``mask_token``, most relevant first, and sparseness
    is the Gini index of the real tokens' relevance. Positions holding ``pad_token`` take no part anywhere: never
    removed, no mass, never the maximum, not counted in the curves' fractions nor in the Gini index. Token mode is
    chosen from the probe batch (integer inputs) or by ``input_kind``, and
    checked at setup: a metric that cannot score tokens (AOPC, infidelity) or deletion / insertion
    without ``mask_token`` is a configuration error.

    Args:
        attributors: attributors, registered names or ``{"name": ..., **kwargs}`` dicts.
        metrics: names from :data:`QUALITY_METRICS`.
        metric_kwargs: per-metric constructor arguments, e.g. ``{"deletion_auc": {"steps": 32}}``.
        num_samples: probe samples drawn once (seeded) from the ``split`` (default: validation) set.
        log_curves: also log the mean deletion / insertion / AOPC curve of each method as a line plot.
        input_kind: ``"auto"`` (token mode for integer ``[B, T]`` inputs), ``"images"`` or ``"tokens"``
            (then inputs of the other kind are a configuration error).
        mask_token: token models: the id written into removed tokens by deletion / insertion (a ``[MASK]`` or
            ``[UNK]`` id; :data:`~lightning_xai.data.tokens.MASK_TOKEN` for ``PlantedTokens``).
        pad_token: token models: the padding id, excluded from every metric; ``None``: the model's own
            (:func:`~lightning_xai.callbacks.tokens.model_pad_token`: a submodule's ``pad_token``, as on
            ``TextTransformer``, or ``config.pad_token_id``) if it declares one - said once -, else every
            position is scored.
        **kwargs: the common callback arguments of :class:`~lightning_xai.callbacks.base.XAICallback`
            (``every_n_epochs``, ``target`` - default ``"label"`` -, ``seed``, ``on_error``, ``log_key``, ``split``,
            ``dataloader_idx``, ``probe_batch``, ``input_key`` / ``label_key`` / ``mask_key`` / ``output_key``,
            ``output_dir``, ...).
    """

    state_fields = ("records",)

    def __init__(
        self,
        attributors: Sequence[str | dict | Attributor] | str | dict | Attributor = ("saliency", "gradcam"),
        metrics: Sequence[str] | str = DEFAULT_METRICS,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        num_samples: int = 16,
        *,
        log_curves: bool = False,
        input_kind: str = "auto",
        mask_token: int | None = None,
        pad_token: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("target", "label")
        super().__init__(num_samples=num_samples, **kwargs)
        if isinstance(attributors, (str, dict, Attributor)):
            attributors = [attributors]
        if not attributors:
            raise ValueError(f"{self.name} needs at least one attributor")
        self.attributors: dict[str, Attributor] = method_names(attributors, build_attributor)
        if isinstance(metrics, str):
            metrics = [metrics]
        if not metrics:
            raise ValueError(f"{self.name} needs at least one metric; valid metrics: {sorted(QUALITY_METRICS)}")
        unknown = [m for m in metrics if m not in QUALITY_METRICS]
        if unknown:
            raise ValueError(
                f"{self.name}: unknown metric(s) {unknown}; {suggest(unknown[0], sorted(QUALITY_METRICS))} "
                f"(valid metrics: {sorted(QUALITY_METRICS)})"
            )
        self.metrics = list(dict.fromkeys(metrics))
        self.metric_kwargs = {k: dict(v) for k, v in (metric_kwargs or {}).items()}
        stray = [k for k in self.metric_kwargs if k not in self.metrics]
        if stray:
            raise ValueError(
                f"{self.name}: metric_kwargs given for metric(s) {stray} that are not in metrics={self.metrics}"
            )
        self.input_kind = check_choice("input_kind", input_kind, INPUT_KINDS, owner=self.name)
        self.mask_token = check_optional_int("mask_token", mask_token, minimum=0, owner=self.name)
        self.pad_token = check_optional_int("pad_token", pad_token, minimum=0, owner=self.name)
        if self.input_kind == "images" and (mask_token is not None or pad_token is not None):
            raise ValueError(f"{self.name}: mask_token / pad_token apply to token inputs, not to input_kind='images'")
        #: The padding id in use: ``pad_token``, or the model's (decided at setup in token mode).
        self.padding: int | None = self.pad_token
        #: Whether the probe inputs are token ids (decided at setup; ``None``: not yet known).
        self.tokens: bool | None = None if self.input_kind == "auto" else self.input_kind == "tokens"
        if self.tokens:
            self._check_token_metrics(ValueError)
        for name in self.metrics:  # build once now so that bad kwargs fail at construction
            try:
                self._new_metric(name)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{self.name}: metric {name!r}: {err}") from err
        self.log_curves = check_bool("log_curves", log_curves, owner=self.name)
        #: One record per run: stage, epoch, step, ``values`` ({"<method>/<metric>": mean}), ``sem`` (standard
        #: errors), ``scored`` (samples scored per key) - resumable.
        self.records: list[dict[str, Any]] = []
        #: Which metrics apply to the data (decided at setup from what the data provides; None: not yet known).
        self.active_metrics: list[str] | None = None

    def _new_metric(self, name: str) -> Metric:
        cls, _needs = QUALITY_METRICS[name]
        kwargs = dict(self.metric_kwargs.get(name, {}))
        kwargs["return_per_sample"] = True
        if self.tokens and name in _CURVE_METRICS:
            kwargs.setdefault("mask_token", self.mask_token)
            kwargs.setdefault("pad_token", self.padding)
        return cls(**kwargs)

    def _state_key_parts(self) -> dict[str, Any]:
        return {"attributors": sorted(self.attributors), "metrics": self.metrics}

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(), "methods": list(self.attributors), "metrics": list(self.metrics),
            "input_kind": self.input_kind if self.tokens is None else ("tokens" if self.tokens else "images"),
        }

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        """``[(epoch, {"<method>/<metric>": value}), ...]`` over the runs (derived from :attr:`records`)."""
        return [(int(r["epoch"]), dict(r["values"])) for r in self.records]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" in state_dict and "records" not in state_dict:  # a checkpoint of the version before records
            state_dict = {**state_dict, "records": [
                {"stage": "fit", "epoch": int(e), "step": -1, "values": dict(v), "sem": {}, "scored": {}}
                for e, v in state_dict["history"]
            ]}
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------------------------------ setup
    def accepts_token_ids(self) -> bool:
        """Token ids are fine when every method takes them (``input_kind`` is checked in :meth:`validate`)."""
        return all(bool(getattr(a, "accepts_token_ids", False)) for a in self.attributors.values())

    def _check_token_metrics(self, error: type[Exception]) -> None:
        unsupported = [m for m in self.metrics if m not in TOKEN_METRICS]
        if unsupported:
            raise error(
                f"{self.name}: metric(s) {unsupported} cannot score token inputs (integer [B, T] ids); metrics for "
                f"token models: {list(TOKEN_METRICS)}"
            )
        needs_mask = [m for m in self.metrics if m in _CURVE_METRICS and self._metric_mask_token(m) is None]
        if needs_mask:
            raise error(
                f"{self.name}: {needs_mask} on token inputs replace removed tokens by an id: pass mask_token= (e.g. "
                "the [MASK] or [UNK] id; lightning_xai.data.tokens.MASK_TOKEN for PlantedTokens)"
            )

    def _fits(self, name: str) -> bool:
        """Whether metric ``name`` can score this callback's inputs (any metric on images)."""
        return not self.tokens or name in TOKEN_METRICS

    def _metric_mask_token(self, name: str) -> int | None:
        return self.metric_kwargs.get(name, {}).get("mask_token", self.mask_token)

    def _decide_kind(self, inputs: Any, pl_module: Any) -> None:
        """Token or image mode from the probe inputs, checked against ``input_kind`` (a ConfigurationError)."""
        tokens = bool(self.agree(is_token_batch(inputs)))
        what = f"{inputs.dtype} {list(inputs.shape)}" if isinstance(inputs, Tensor) else type(inputs).__name__
        if self.input_kind == "tokens" and not tokens:
            raise ConfigurationError(
                f"{self.name}: input_kind='tokens' but the probe inputs are {what}, not token ids (an integer tensor "
                "[B, T]); use input_kind='auto' or 'images'"
            )
        if self.input_kind == "images" and tokens:
            raise ConfigurationError(
                f"{self.name}: input_kind='images' but the probe inputs are token ids ({what}); use "
                "input_kind='auto' or 'tokens' (with token methods and mask_token=)"
            )
        self.tokens = tokens
        if not tokens:
            if self.mask_token is not None or self.pad_token is not None:
                self.say_once("not-tokens", f"the inputs are {what}, not token ids: mask_token / pad_token are unused")
            return
        self._check_token_metrics(ConfigurationError)
        self.padding = resolve_pad_token(self, self.pad_token, pl_module)

    def _applicable(self, has_masks: bool) -> list[str]:
        active = [m for m in self.metrics if has_masks or QUALITY_METRICS[m][1] != "mask"]
        left_out = [m for m in self.metrics if m not in active]
        if left_out:
            what = "token masks [B, T] of the token ids" if self.tokens else "pixel masks of the inputs' size"
            self.say_once(
                "no-masks",
                f"the {self.split} data has no masks (no {what}); localisation metrics "
                f"{left_out} are left out, {active} are scored",
            )
        return active

    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        if context.probe is not None:
            self._decide_kind(context.probe.inputs, pl_module)
        self.dry_run_methods(pl_module, context, self.attributors)
        if context.probe is None:
            return
        has_masks = self.agree(context.probe.masks is not None)
        active = self._applicable(has_masks)
        if not active:
            raise ConfigurationError(
                f"{self.name}: metrics={self.metrics} all need {'token' if self.tokens else 'pixel'} masks, but "
                f"the {self.split} data has none (read with mask_key={self.reader.mask_key!r}); add metrics that "
                f"need no masks ({[m for m, (_c, n) in QUALITY_METRICS.items() if n != 'mask' and self._fits(m)]}) "
                "or data with masks"
            )
        self.active_metrics = active

    # ------------------------------------------------------------------------------------------ work
    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        values, sems, scored = self._evaluate(trainer, pl_module)
        self.records.append(self.history_record(trainer, values=dict(values), sem=dict(sems), scored=dict(scored)))
        metrics = {f"{self.log_key}/{k}": v for k, v in values.items()}
        metrics.update({f"{self.log_key}/{k}_sem": v for k, v in sems.items() if math.isfinite(v)})
        return metrics

    def evaluate(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        """Compute every (method, metric) on the probe set now, without recording or logging it; returns
        ``{"<method>/<metric>": mean}``, the same on every rank. Usable outside the Trainer loop."""
        with torch.inference_mode(False):
            return self._evaluate(trainer, pl_module, log=False)[0]

    def _evaluate(
        self, trainer: Any, pl_module: Any, log: bool = True
    ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
        probe = self.probe_shard(trainer, pl_module)
        if self.active_metrics is None:  # called without the setup check (e.g. evaluate() on its own)
            self._decide_kind(probe.inputs, pl_module)
            self.active_metrics = self._applicable(self.agree(probe.masks is not None))
        logits = self.eval_logits(pl_module, probe.inputs)
        resolved = self.scored_targets(probe, logits)
        rows = resolved.rows
        n = int(rows.numel())
        maps = self.explain_rows(trainer, pl_module, self.attributors, probe, resolved)
        inputs = probe.inputs[rows]
        masks = None if probe.masks is None else probe.masks[rows]
        ids = None if probe.sample_ids is None else probe.sample_ids[rows]
        valid = None
        if self.tokens:  # token maps are scored with the positions that take part (all, without padding)
            valid = valid_positions(inputs, self.padding)
            valid = torch.ones_like(inputs, dtype=torch.bool) if valid is None else valid
        curves_ok = log and self.log_curves and self.agree(n > 0)
        values: dict[str, float] = {}
        sems: dict[str, float] = {}
        scored: dict[str, int] = {}
        for method, local in maps.items():
            for name in self.active_metrics:
                key = f"{method}/{name}"
                metric = self._new_metric(name).to(pl_module.device)
                ok = True
                if n > 0:
                    try:
                        self._update(metric, name, local, inputs, masks, pl_module, resolved.target, ids, valid)
                    except Exception as err:  # one metric of one method: the others go on
                        ok = False
                        self.fault(trainer, key, err)
                if not self.agree(ok):
                    continue
                with warnings.catch_warnings():  # a rank with an empty shard warns about compute before update
                    warnings.simplefilter("ignore")
                    per_sample = metric.compute()
                mean, sem, count, excluded = mean_and_sem(per_sample)
                scored[key] = count
                if count == 0:
                    self.say_once(
                        f"unscored-{key}",
                        f"{key}: no probe sample could be scored ({excluded} excluded, e.g. empty masks or constant "
                        "maps); not logged",
                    )
                    continue
                values[key] = mean
                sems[key] = sem
                if curves_ok and name in _CURVE_METRICS:
                    self._log_curve(trainer, metric, method, name)
        return values, sems, scored

    def _update(
        self, metric: Metric, name: str, maps: Tensor, inputs: Tensor, masks: Tensor | None, model: Any, target: Any,
        ids: Tensor | None, valid: Tensor | None = None,
    ) -> None:
        needs = QUALITY_METRICS[name][1]
        if needs == "model":
            extra = {"sample_ids": ids} if ids is not None and _accepts(metric.update, "sample_ids") else {}
            metric.update(maps, inputs, model, target, **extra)
        elif needs == "mask":
            assert masks is not None
            metric.update(maps, masks, **({} if valid is None else {"valid": valid}))
        else:  # sparseness: token maps over their real tokens only
            metric.update(maps, **({} if valid is None else {"valid": valid}))

    def _log_curve(self, trainer: Any, metric: Metric, method: str, name: str) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                xs, ys = metric.curve()  # a collective: every rank calls it
        except RuntimeError:
            return
        if trainer.is_global_zero:
            log_line_plot(
                trainer.loggers,
                f"{self.log_key}/{method}/{name}_curve",
                xs.tolist(),
                ys.tolist(),
                step=trainer.global_step,
                title=f"{name} curve of {method}",
                x_label="fraction perturbed",
                y_label="score",
            )


def __getattr__(name: str) -> Any:
    if name == "SanityCheck":  # its old home; imported lazily (sanity.py imports this module)
        from lightning_xai.callbacks.sanity import SanityCheck

        return SanityCheck
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
