"""``ExplanationMonitor``: explain a fixed probe set at validation epoch ends and log the heatmaps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.callbacks.base import ValidationContext, XAICallback, method_names
from lightning_xai.callbacks.tokens import resolve_pad_token, valid_positions
from lightning_xai.checks import check_bool, check_float, check_optional_int
from lightning_xai.evaluation.similarity import spearman_correlation
from lightning_xai.viz import (
    ScaleTracker,
    log_explanations,
    log_samples_table,
    log_text,
    overlay,
    render_explanations,
    render_method_images,
    save_png,
    to_uint8_images,
)
from lightning_xai.viz.text import batch_to_html, decode_tokens, tokens_to_text

__all__ = ["DEFAULT_ATTRIBUTORS", "ExplanationMonitor"]

DEFAULT_ATTRIBUTORS = ("saliency", "integrated_gradients", "gradcam", "gradcam_plus_plus")


class ExplanationMonitor(XAICallback):
    """Explain the same probe samples at the end of validation epochs and log them, so that a W&B slider shows
    each explanation evolving over training.

    At each monitored validation epoch end (skipping Lightning's sanity check; also during ``trainer.validate``)
    the monitor computes every attributor on the probe set and logs one grid image (rows: samples; columns:
    input, then one overlay per method), a per-sample table and, from the second run on, the **explanation
    drift** of each method: the mean Spearman rank correlation between this run's and the previous run's maps
    (``<log_key>/drift/<method>``; 1 = unchanged ranking, 0 = unrelated). Samples whose map is constant have no
    rank correlation and are left out of the mean. On token models the correlation runs over each sequence's
    tokens only: padding positions (``pad_token``), which most token methods set to 0 in every run, would
    otherwise count as agreeing ties and pull the drift towards 1.

    Cost is bounded: ``num_samples`` probe samples every ``every_n_epochs`` epochs; under DDP each rank explains
    ``num_samples / world_size`` of them and the maps are gathered, so every rank holds the same state and rank
    zero logs.

    Args:
        attributors: attributors, registered names (``"gradcam"``) or dicts ``{"name": ..., **kwargs}``.
        num_samples: number of probe samples, drawn once from the validation dataset with ``seed``.
        png_dir: where the grids are also written as PNG files; ``None`` means ``<output_dir>/explanationmonitor``;
            ``""`` disables PNG files.
        mean, std: per-channel normalisation of the inputs, undone for display (``None``: inputs are shown as
            they are, min-max scaled when outside [0, 1]).
        alpha: heatmap opacity of the overlays.
        percentile: robust scaling of each heatmap by this percentile of its absolute values.
        class_names: names used in row labels and tables instead of class indices.
        fixed_scale: scale each method's maps by a percentile frozen at the first logged run
            (:class:`~lightning_xai.viz.ScaleTracker`, kept in the checkpoint), so that brightness is comparable
            across epochs and drift shows as brightness; ``False`` scales each map by its own ``percentile``.
        vocabulary: for token models (integer ``[B, T]`` inputs with token methods such as ``token_saliency`` or
            ``attention_rollout``): the token names (a list, or a callable id -> str such as a tokenizer's
            ``convert_ids_to_tokens``) the highlighted text shows; ``None`` shows the ids.
        per_method_images: also log one image per method (``<log_key>/explanations/<method>``), so that one method
            can be followed with the W&B step slider.
        pad_token: token models: the padding id, left out of the drift; ``None``: the model's own
            (:func:`~lightning_xai.callbacks.tokens.model_pad_token`) if it declares one, else none.
        **kwargs: the common callback arguments of :class:`~lightning_xai.callbacks.base.XAICallback`
            (``every_n_epochs``, ``target``, ``seed``, ``probe_batch``, ``on_error``, ``log_key``, ``split``,
            ``dataloader_idx``, ``input_key`` / ``label_key`` / ``output_key``, ``output_dir``, ...).
    """

    state_fields = ("history", "previous_maps")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.scale_tracker is not None:
            state["scale_tracker"] = self.scale_tracker.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.scale_tracker is not None and "scale_tracker" in state_dict:
            self.scale_tracker.load_state_dict(state_dict["scale_tracker"])

    def __init__(
        self,
        attributors: Sequence[str | dict | Attributor] = DEFAULT_ATTRIBUTORS,
        num_samples: int = 8,
        *,
        png_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        alpha: float = 0.5,
        percentile: float = 99.0,
        class_names: Sequence[str] | None = None,
        fixed_scale: bool = False,
        per_method_images: bool = True,
        vocabulary: Sequence[str] | Callable[[int], str] | None = None,
        pad_token: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, **kwargs)
        if isinstance(attributors, (str, dict, Attributor)):
            attributors = [attributors]
        if not attributors:
            raise ValueError("ExplanationMonitor needs at least one attributor")
        self.attributors: dict[str, Attributor] = method_names(attributors, build_attributor)
        self.png_dir = png_dir
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, owner=self.name)
        self.percentile = check_float("percentile", percentile, minimum=0.0, maximum=100.0, owner=self.name)
        if self.percentile == 0.0:
            raise ValueError(f"{self.name}: percentile must be in (0, 100], got {percentile}")
        self.class_names = None if class_names is None else list(class_names)
        self.vocabulary = vocabulary
        self.pad_token = check_optional_int("pad_token", pad_token, minimum=0, owner=self.name)
        #: The padding id in use on token inputs (``pad_token`` or the model's; decided at the first token run).
        self.padding: int | None = self.pad_token
        self._padding_resolved = False
        self.per_method_images = check_bool("per_method_images", per_method_images, owner=self.name)
        self.fixed_scale = check_bool("fixed_scale", fixed_scale, owner=self.name)
        #: The frozen per-method scales (``fixed_scale=True``), resumable.
        self.scale_tracker: ScaleTracker | None = ScaleTracker(self.percentile) if self.fixed_scale else None
        #: One record per run: stage, epoch, step and ``drift`` ({method: mean drift}) - resumable.
        self.history: list[dict[str, Any]] = []
        #: method -> the maps of the last run (the reference of the next drift).
        self.previous_maps: dict[str, Tensor] = {}
        #: method -> drift of the last run (logged as ``<log_key>/drift/<method>``).
        self.last_drift: dict[str, float] = {}

    def _state_key_parts(self) -> dict[str, Any]:
        return {"attributors": sorted(self.attributors)}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "methods": list(self.attributors), "fixed_scale": self.fixed_scale}

    @property
    def drift_history(self) -> dict[str, list[tuple[int, float]]]:
        """method -> ``[(epoch, drift), ...]`` over the runs (derived from :attr:`history`)."""
        out: dict[str, list[tuple[int, float]]] = {k: [] for k in self.attributors}
        for record in self.history:
            for method, value in record.get("drift", {}).items():
                out.setdefault(method, []).append((int(record["epoch"]), float(value)))
        return out

    @property
    def _previous_maps(self) -> dict[str, Tensor]:  # the name older scripts read
        return self.previous_maps

    # ------------------------------------------------------------------------------------------ setup
    def accepts_token_ids(self) -> bool:
        return all(bool(getattr(a, "accepts_token_ids", False)) for a in self.attributors.values())

    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        self.dry_run_methods(pl_module, context, self.attributors)

    # ------------------------------------------------------------------------------------------ work
    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        self.explain(trainer, pl_module)
        return {f"{self.log_key}/drift/{name}": value for name, value in self.last_drift.items()}

    def explain(self, trainer: Any, pl_module: Any) -> dict[str, Tensor]:
        """Explain the probe set now and log the grid (rank zero); returns the gathered maps per method
        (identical on every rank). Usable outside the Trainer loop."""
        with torch.inference_mode(False):
            return self._explain(trainer, pl_module)

    def _explain(self, trainer: Any, pl_module: Any) -> dict[str, Tensor]:
        probe = self.probe_shard(trainer, pl_module)
        logits = self.eval_logits(pl_module, probe.inputs)
        resolved = self.scored_targets(probe, logits)

        local_maps = self.explain_rows(trainer, pl_module, self.attributors, probe, resolved)
        maps = {name: self.gather_rows(m) for name, m in local_maps.items()}
        rows = resolved.rows
        images = self.gather_rows(probe.inputs[rows])
        row_logits = self.gather_rows(logits[rows])
        labels = None
        if probe.labels is not None and probe.labels.ndim == 1:
            labels = self.gather_rows(probe.labels[rows])
        ids = self.gather_rows(probe.sample_ids[rows]) if probe.sample_ids is not None else None

        valid = None
        if not images.is_floating_point() and images.ndim == 2:  # token ids: drift over the tokens, not padding
            if not self._padding_resolved:
                self.padding = resolve_pad_token(self, self.pad_token, pl_module)
                self._padding_resolved = True
            valid = valid_positions(images, self.padding)
        self.last_drift = self._update_drift(maps, valid)
        self.history.append(self.history_record(trainer, drift=dict(self.last_drift)))
        if trainer.is_global_zero and maps:
            if not images.is_floating_point() and images.ndim == 2:
                self._log_tokens(trainer, images, maps, labels, row_logits, ids)
            else:
                self._log(trainer, images, maps, labels, row_logits, ids)
        return maps

    def _update_drift(self, maps: dict[str, Tensor], valid: Tensor | None = None) -> dict[str, float]:
        """Each method's mean Spearman correlation with its previous maps; ``valid`` (``bool [N, T]``, token
        models): only those positions of each sample are ranked."""
        drifts: dict[str, float] = {}
        for name, current in maps.items():
            previous = self.previous_maps.get(name)
            if previous is not None and previous.shape == current.shape:
                corr = _drift_correlation(previous, current, valid)
                scored = corr[~torch.isnan(corr)]
                if scored.numel():
                    drifts[name] = float(scored.mean())
            self.previous_maps[name] = current.clone()
        return drifts

    def _log(
        self,
        trainer: Any,
        images: Tensor,
        maps: dict[str, Tensor],
        labels: Tensor | None,
        logits: Tensor,
        ids: Tensor | None,
    ) -> None:
        step, epoch = self.logger_step(trainer), trainer.current_epoch
        render = {
            "labels": labels,
            "logits": logits if logits.ndim == 2 else None,
            "class_names": self.class_names,
            "row_names": None if ids is None else [f"#{int(i)}" for i in ids],
            "epoch": epoch,
            "step": step,
            "title": f"{self.name} · {self.stage(trainer)}",
            "mean": self.mean,
            "std": self.std,
            "alpha": self.alpha,
            "percentile": self.percentile,
            "scale": self.scale_tracker,
        }
        grid = render_explanations(images, maps, **render)
        per_method = render_method_images(images, maps, **render) if self.per_method_images else {}
        outputs = list(log_explanations(trainer.loggers, self.log_key, grid, per_method, step=step))
        if self.png_dir != "":
            name = f"{self.log_key}_explanations" if self.png_dir is None else self.log_key
            path = self.output_path(trainer, name, folder=self.png_dir)
            save_png(grid.image, path)
            outputs.append(path)
        preds = logits.argmax(1) if logits.ndim == 2 else None
        if preds is not None:
            probs = torch.softmax(logits.float(), 1).amax(1)
            overlays = {
                name: np.asarray(
                    overlay(images, m, alpha=self.alpha, percentile=self.percentile, mean=self.mean, std=self.std)
                )
                for name, m in maps.items()
            }
            try:
                outputs += list(
                    log_samples_table(
                        trainer.loggers,
                        f"{self.log_key}/samples",
                        predictions=preds,
                        labels=labels,
                        probabilities=probs,
                        class_names=self.class_names,
                        sample_ids=None if ids is None else ids.tolist(),
                        images={"input": np.asarray(to_uint8_images(images, mean=self.mean, std=self.std)),
                                **overlays},
                        step=step,
                    )
                )
            except Exception as err:  # a table is a convenience; never lose the grid because of it
                self.say_once("table", f"could not log the sample table: {err}")
        self.last_outputs = outputs

    def _log_tokens(
        self,
        trainer: Any,
        token_ids: Tensor,
        maps: dict[str, Tensor],
        labels: Tensor | None,
        logits: Tensor,
        ids: Tensor | None,
    ) -> None:
        """Token models: one highlighted-text view per method (HTML for W&B, plain text with scores otherwise)."""
        step = self.logger_step(trainer)
        tokens = decode_tokens(token_ids, self.vocabulary)
        preds = logits.argmax(1) if logits.ndim == 2 else None
        captions = []
        for i in range(token_ids.shape[0]):
            parts = [f"#{int(ids[i]) if ids is not None else i}"]
            if labels is not None:
                parts.append(f"true {self.class_name(int(labels[i]))}")
            if preds is not None:
                prob = float(torch.softmax(logits[i].float(), 0).max())
                mark = "" if labels is None or int(labels[i]) == int(preds[i]) else " (wrong)"
                parts.append(f"pred {self.class_name(int(preds[i]))} ({prob:.2f}){mark}")
            captions.append(", ".join(parts))
        outputs: list[str] = []
        for name, scores in maps.items():
            scores = scores.reshape(scores.shape[0], -1)
            html = batch_to_html(tokens, scores, captions=captions)
            text = "\n".join(f"{c}: {tokens_to_text(t, s, top_k=5)}" for c, t, s in zip(captions, tokens, scores))
            outputs += log_text(trainer.loggers, f"{self.log_key}/explanations/{name}", html=html, text=text,
                                step=step, fallback_dir=self._dir(trainer) if not trainer.loggers else None)
        self.last_outputs = outputs


def _drift_correlation(previous: Tensor, current: Tensor, valid: Tensor | None) -> Tensor:
    """Per-sample Spearman correlation of two runs' maps, over the ``valid`` positions of each sample only when
    given (``NaN`` where fewer than two positions are valid or a map is constant there)."""
    if valid is None or valid.shape != current.reshape(current.shape[0], -1).shape:
        return spearman_correlation(previous, current)
    a, b = previous.reshape(previous.shape[0], -1), current.reshape(current.shape[0], -1)
    keep = valid.to(a.device)
    out = torch.full((a.shape[0],), float("nan"), dtype=torch.float64)
    for i in range(a.shape[0]):
        if int(keep[i].sum()) >= 2:
            out[i] = spearman_correlation(a[i][keep[i]].view(1, -1), b[i][keep[i]].view(1, -1))[0].cpu()
    return out
