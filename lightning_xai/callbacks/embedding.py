"""``EmbeddingProjector``: a 2-D map of a layer's features for a fixed probe set, during training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.attribution.token_grid import Reshape, check_reshape
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback
from lightning_xai.callbacks.logits import probe_sample_names, recording_outputs
from lightning_xai.callbacks.tokens import resolve_pad_token
from lightning_xai.checks import check_choice, check_float, check_int, check_optional_int
from lightning_xai.distributed import broadcast
from lightning_xai.evaluation.base import is_token_batch
from lightning_xai.interpretation.embedding import (
    LayerReduction,
    check_layer_features,
    layer_features,
    project_features,
)
from lightning_xai.viz.dashboard import log_scatter

__all__ = ["EmbeddingProjector"]

REDUCTIONS = ("flatten", "mean", "max", "mean_square")


class EmbeddingProjector(XAICallback):
    """A 2-D map of a layer's features for a fixed probe set (PCA or t-SNE; van der Maaten & Hinton, JMLR 2008),
    logged as a table and a W&B scatter plot (x, y, label, prediction), so that the class structure of the
    representation can be followed over training.

    Features are the layer's activation reduced per sample by ``reduce`` (default: each channel's spatial mean; on a
    vision transformer's token layer ``[B, T, D]`` each of the ``D`` channels' mean over the patch tokens, class
    token dropped; on a text model's token layer each channel's mean over the real tokens, padding left out - see
    :func:`~lightning_xai.interpretation.embedding.reduce_activation`);
    features and predictions come from **one** forward pass of the full model (a hook records the layer). PCA is
    seeded and sign-fixed, so consecutive runs are comparable; t-SNE needs scikit-learn. Samples whose logits or
    features are NaN / inf are reported (once, by probe index) and left out of the map. Logged:
    ``<log_key>/points`` (table, and ``<log_key>/points_scatter`` on W&B) and, for PCA, the metric
    ``<log_key>/explained_variance`` (share of the variance the two axes keep). ``history`` keeps the explained
    variance of every run (resumable).

    Cost per run: one forward pass over the rank's share of ``num_samples`` probe samples; the projection runs on
    rank zero (its explained variance is broadcast, so every rank logs the same metric).

    Args:
        layer: the dotted name of the layer.
        method: ``"pca"`` or ``"tsne"``.
        reduce: how an activation becomes one vector per sample (``"mean"``, ``"max"``, ``"mean_square"``,
            ``"flatten"`` or a callable ``[B, ...] -> [B, D]``).
        num_samples: probe samples (at least 4).
        perplexity: t-SNE perplexity.
        class_names: names shown instead of class indices.
        reshape: how a vision transformer's token layer is laid out on its patch grid (``None``: class token
            dropped, grid inferred; ``(h, w)``; or a callable ``Tensor[B, T, D] -> Tensor[B, D, h, w]``), as for
            the CAM family; checked at setup against the layer's output.
        pad_token: text models (integer ``[B, T]`` inputs): the padding id, left out of the pooled features;
            ``None``: the model's own (:func:`~lightning_xai.callbacks.tokens.model_pad_token`) if it declares
            one - said once -, else every token is used.
        **kwargs: the common arguments of :class:`~lightning_xai.callbacks.base.XAICallback`.
    """

    state_fields = ("records",)
    needs_gradients = False

    def __init__(
        self,
        layer: str,
        *,
        method: Literal["pca", "tsne"] = "pca",
        reduce: LayerReduction = "mean",
        num_samples: int = 256,
        perplexity: float = 30.0,
        batch_size: int = 64,
        class_names: Sequence[str] | None = None,
        log_key: str = "xai/embedding",
        reshape: Reshape = None,
        pad_token: int | None = None,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        check_int("num_samples", num_samples, minimum=4, owner=name)
        super().__init__(num_samples=num_samples, batch_size=batch_size, log_key=log_key, **kwargs)
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"{name}: layer must be a dotted module name, got {layer!r}")
        self.method = check_choice("method", method, ("pca", "tsne"), owner=name)
        if not callable(reduce):
            check_choice("reduce", reduce, REDUCTIONS, owner=name)
        self.perplexity = check_float("perplexity", perplexity, minimum=0.0, owner=name)
        if method == "tsne":
            try:
                import sklearn  # noqa: F401
            except ImportError as err:  # pragma: no cover
                raise ImportError(f"{name}: method='tsne' needs scikit-learn: pip install 'lightning-xai[extras]'") \
                    from err
        self.layer = layer
        self.reduce = reduce
        self.reshape = check_reshape(reshape, name)
        self.pad_token = check_optional_int("pad_token", pad_token, minimum=0, owner=name)
        #: The padding id in use on token inputs: ``pad_token`` or the model's (decided on the first token batch).
        self.padding: int | None = self.pad_token
        self._padding_known = pad_token is not None
        self.class_names = None if class_names is None else list(class_names)
        #: One record per run: stage, epoch, step and ``explained_variance`` (None for t-SNE) - resumable.
        self.records: list[dict[str, Any]] = []
        #: The 2-D coordinates of the last run (rank zero only; ``None`` elsewhere).
        self.last_coordinates: Tensor | None = None

    def _state_key_parts(self) -> dict[str, Any]:
        return {"layer": self.layer, "method": self.method}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": self.layer, "method": self.method}

    @property
    def history(self) -> list[tuple[int, float | None]]:
        """``[(epoch, explained variance or None), ...]`` over the runs (derived from :attr:`records`)."""
        return [(int(r["epoch"]), r["explained_variance"]) for r in self.records]

    @history.setter
    def history(self, value: Sequence[tuple[int, float | None]]) -> None:
        self.records = [
            {"stage": "fit", "epoch": int(e), "step": None, "explained_variance": None if v is None else float(v)}
            for e, v in value
        ]

    # ------------------------------------------------------------------------------------------ setup
    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        try:
            resolve_layer(self.layer_module(pl_module), self.layer)
        except (ValueError, TypeError) as err:
            raise ConfigurationError(f"{self.name}: {err}") from err
        if context.probe is not None:  # a token layer's grid that fits no patch grid fails here, not later
            model, inputs = self.layer_module(pl_module), context.probe.inputs[:1]
            try:
                check_layer_features(model, self.layer, inputs, reduce=self.reduce, reshape=self.reshape,
                                     pad_token=self._padding(model, inputs), owner=self.name)
            except ValueError as err:
                raise ConfigurationError(f"{self.name}: the layer's features cannot be read: {err}") from err

    def _padding(self, model: Any, inputs: Tensor) -> int | None:
        """The padding id of token inputs (resolved once, said once); ``None`` for other inputs."""
        if not is_token_batch(inputs):
            return None
        if not self._padding_known:
            self.padding = resolve_pad_token(self, self.pad_token, model)
            self._padding_known = True
        return self.padding

    # ------------------------------------------------------------------------------------------ work
    def _features(self, pl_module: Any, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's reduced features and the model's logits, from one forward pass of the full model."""
        model = self.layer_module(pl_module)
        with recording_outputs(model, self.output_reader) as outputs:
            feats, _ = layer_features(model, self.layer, inputs, reduce=self.reduce, batch_size=self.batch_size,
                                      reshape=self.reshape, pad_token=self._padding(model, inputs), owner=self.name)
        return feats, torch.cat(outputs).float().cpu()

    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        probe = self.run_agreed(lambda: self.probe_shard(trainer, pl_module))
        feats, logits = self.run_agreed(lambda: self._features(pl_module, probe.inputs))
        n = probe.num_real
        finite = torch.isfinite(feats).all(dim=1) & torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)
        if n and not bool(finite[:n].all()):
            bad = probe_sample_names(probe, ~finite[:n])
            self.say_once(
                f"nonfinite-{bad}",
                f"NaN or inf logits or features for probe sample(s) {bad}; they are left out of the map",
            )
        preds = logits.argmax(dim=1) if logits.ndim == 2 else torch.full((logits.shape[0],), -1, dtype=torch.long)
        labels = probe.labels
        if labels is None or labels.ndim != 1:
            labels = torch.full_like(preds, -1)
        total = self.probe.size
        device = probe.inputs.device
        feats = self.gather(feats.to(device), total)
        labels = self.gather(labels.long().to(device), total)
        preds = self.gather(preds.to(device), total)
        finite = self.gather(finite.to(device, torch.long), total).bool()
        ids = self.gather(probe.sample_ids.to(device), total) if probe.sample_ids is not None else torch.arange(total)

        def project() -> float:
            if not trainer.is_global_zero:
                return float("nan")
            return self._project_and_log(trainer, feats[finite], labels[finite], preds[finite], ids[finite])

        explained = self.run_agreed(project)
        value = float(broadcast(torch.tensor([explained], dtype=torch.float64, device=device), 0, self.reducer))
        explained_variance = None if value != value else value
        self.records.append(self.history_record(trainer, explained_variance=explained_variance))
        return {} if explained_variance is None else {f"{self.log_key}/explained_variance": explained_variance}

    def _project_and_log(self, trainer: Any, feats: Tensor, labels: Tensor, preds: Tensor, ids: Tensor) -> float:
        """Project on rank zero, log the points; returns the explained variance (NaN for t-SNE)."""
        if feats.shape[0] < 2:
            raise FloatingPointError(f"only {feats.shape[0]} probe sample(s) have finite features; nothing to project")
        coords, ratio = project_features(feats, self.method, dim=2, seed=self.seed, perplexity=self.perplexity)
        self.last_coordinates = coords
        rows = [
            [float(coords[i, 0]), float(coords[i, 1]), int(labels[i]), self._name(int(labels[i])), int(preds[i]),
             int(ids[i])]
            for i in range(coords.shape[0])
        ]
        self.last_outputs = log_scatter(
            trainer.loggers,
            f"{self.log_key}/points",
            ["x", "y", "label", "class", "prediction", "probe_index"],
            rows,
            x="x",
            y="y",
            step=self.logger_step(trainer),
            title=f"{self.layer} ({self.method})",
            fallback_dir=os.path.dirname(self.output_path(trainer, "points")),  # <output_dir>/embeddingprojector
        )
        return float("nan") if ratio is None else float(ratio.sum())

    def _name(self, c: int) -> str:
        return "" if c < 0 else self.class_name(c)
