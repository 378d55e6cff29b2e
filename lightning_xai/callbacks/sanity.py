"""``SanityCheck``: the model-parameter randomisation test of Adebayo et al. (NeurIPS 2018) inside a training run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_xai.attribution import Attributor, build_attributor
from lightning_xai.attribution.base import model_state_guard
from lightning_xai.batch import outputs_as_logits
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback
from lightning_xai.checks import check_choice, check_float, check_int, suggest
from lightning_xai.evaluation import SIMILARITY_MEASURES, ModelRandomization, parametrised_layers
from lightning_xai.evaluation.base import is_token_batch
from lightning_xai.viz.logging import log_line_plot, log_table

__all__ = ["SanityCheck"]


class SanityCheck(XAICallback):
    """The model-parameter randomisation test of Adebayo et al. ("Sanity Checks for Saliency Maps", NeurIPS
    2018), once at the end of fit by default (or every n epochs): for each attributor, re-initialise the layers
    from the top down on a deep copy of the model, recompute the probe set's explanations after each step, and log
    the similarity to the original explanations per layer (a line plot and a table per method), plus a pass/fail
    flag (``<log_key>/sanity/<method>/passes``: 1 when the mean similarity after randomising the top
    ``top_layers`` layers is below ``threshold``). The trained model is never touched.

    The results are also written as JSON under ``output_dir`` (``<default_root_dir>/xai/sanitycheck/``), so a
    run without a logger keeps them. A method that fails (or whose maps are NaN / inf) is reported by name and the
    others go on; samples whose model output is NaN / inf are reported and left out.

    **Configuration objects.** The methods are given as attributors (objects, registered names or dicts), as for
    :class:`~lightning_xai.callbacks.ExplanationMonitor`; the randomisation protocol (``mode``, ``layers``,
    ``similarity``, ``seed``) is one setting shared by all of them. A configured
    :class:`~lightning_xai.evaluation.ModelRandomization` may also be given in ``attributors``: its own attributor,
    mode, layers and seed are then used for that method.

    DDP: each rank checks its own shard of the probe set; the per-sample similarities are gathered, so every
    rank holds (and rank zero logs) the curves over the whole probe set.

    Args:
        attributors: attributors, registered names, dicts or configured ``ModelRandomization`` objects.
        mode: ``"cascading"`` or ``"independent"`` randomisation.
        similarity: the measure that decides pass/fail and is plotted (``"spearman"``, ``"spearman_abs"``,
            ``"ssim"``, ``"hog_pearson"``).
        threshold, top_layers: the pass criterion.
        layers: layers to randomise, top to bottom (default: every parametrised layer); checked at setup.
        num_samples: probe samples.
        **kwargs: the common callback arguments of :class:`~lightning_xai.callbacks.base.XAICallback`;
            ``every_n_epochs`` defaults to ``None`` (once at the end of fit).
    """

    state_fields = ("results", "records")

    def __init__(
        self,
        attributors: Sequence[str | dict | Attributor | ModelRandomization] | str | dict | Attributor = (
            "saliency",
            "gradcam",
        ),
        mode: Literal["cascading", "independent"] = "cascading",
        similarity: str = "spearman_abs",
        threshold: float = 0.5,
        top_layers: int = 1,
        layers: Sequence[str] | None = None,
        num_samples: int = 8,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("every_n_epochs", None)
        kwargs.setdefault("target", "prediction")
        super().__init__(num_samples=num_samples, **kwargs)
        if isinstance(attributors, (str, dict, Attributor, ModelRandomization)):
            attributors = [attributors]
        if not attributors:
            raise ValueError(f"{self.name} needs at least one attributor")
        self.mode = check_choice("mode", mode, ("cascading", "independent"), owner=self.name)
        self.similarity = check_choice("similarity", similarity, tuple(SIMILARITY_MEASURES), owner=self.name)
        self.threshold = check_float("threshold", threshold, owner=self.name)
        self.top_layers = check_int("top_layers", top_layers, minimum=1, owner=self.name)
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and not layers:
            raise ValueError(f"{self.name}: layers must be None (every parametrised layer) or a non-empty list")
        self.layers = None if layers is None else list(layers)
        self.checkers: dict[str, ModelRandomization] = {}
        for spec in attributors:
            checker = self._checker(spec)
            attributor = checker.attributor
            key = getattr(attributor, "name", None) or type(attributor).__name__.lower()
            base, i = key, 2
            while key in self.checkers:
                key, i = f"{base}_{i}", i + 1
            self.checkers[key] = checker
        #: method -> {"layers": [...], "curve": [...], "mean_excluding_original": float, "passes": bool} of the
        #: last check (identical on every rank).
        self.results: dict[str, dict[str, Any]] = {}
        #: One record per check: stage, epoch, step, ``results`` - resumable.
        self.records: list[dict[str, Any]] = []

    def _checker(self, spec: Any) -> ModelRandomization:
        if isinstance(spec, ModelRandomization):
            checker = ModelRandomization(
                spec.attributor, mode=spec.mode, layers=spec.layers, similarity=self.similarity, seed=spec.seed
            )
        else:
            checker = ModelRandomization(
                build_attributor(spec), mode=self.mode, layers=self.layers, similarity=self.similarity, seed=self.seed
            )
        return checker

    @property
    def attributors(self) -> dict[str, Any]:
        return {name: checker.attributor for name, checker in self.checkers.items()}

    @property
    def checker_kwargs(self) -> dict[str, Any]:  # the name older code read
        return {"mode": self.mode, "layers": self.layers, "seed": self.seed}

    def _state_key_parts(self) -> dict[str, Any]:
        return {"attributors": sorted(self.checkers), "mode": self.mode}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "methods": list(self.checkers), "mode": self.mode,
                "similarity": self.similarity, "threshold": self.threshold, "top_layers": self.top_layers}

    # ------------------------------------------------------------------------------------------ setup
    def accepts_token_ids(self) -> bool:
        """Token ids pass the base's input check when every method takes them, so that :meth:`validate` can say
        what is really missing (the randomisation test on token maps)."""
        return all(bool(getattr(a, "accepts_token_ids", False)) for a in self.attributors.values())

    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        if context.probe is not None and is_token_batch(context.probe.inputs):
            raise ConfigurationError(
                f"{self.name}: the inputs are token ids {list(context.probe.inputs.shape)}; the model-randomisation "
                "test compares image maps (Spearman over pixels, SSIM, HOG) and does not score token maps yet. "
                "Use it on image models; for token models, ExplanationMonitor's drift and ExplanationQuality "
                "score token explanations with the padding left out"
            )
        model = self.layer_module(pl_module)
        names = [n for n, _ in model.named_modules() if n]
        for name, checker in self.checkers.items():
            for layer in checker.layers or []:
                if isinstance(layer, str) and layer not in dict(model.named_modules()):
                    raise ConfigurationError(
                        f"{self.name}: layer {layer!r} (method {name!r}) is not a module of "
                        f"{type(model).__name__}; {suggest(layer, names)}"
                    )
                module = layer if not isinstance(layer, str) else dict(model.named_modules())[layer]
                if not any(True for _ in module.parameters()):
                    raise ConfigurationError(
                        f"{self.name}: layer {layer!r} (method {name!r}) has no parameters to re-initialise; "
                        f"layers with parameters: {_with_parameters(model)[:12]}"
                    )
        if context.probe is not None and any(c.layers is None for c in self.checkers.values()):
            with model_state_guard(model), torch.no_grad():
                found = parametrised_layers(model, context.probe.inputs[:1])
            if not found:
                raise ConfigurationError(
                    f"{self.name}: {type(model).__name__} has no re-initialisable layer with parameters in its "
                    "forward pass; pass layers= naming the layers to randomise"
                )
        self.dry_run_methods(pl_module, context, self.attributors)

    # ------------------------------------------------------------------------------------------ work
    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        self.check(trainer, pl_module)
        return {f"{self.log_key}/sanity/{m}/passes": float(r["passes"]) for m, r in self.results.items()}

    def check(self, trainer: Any, pl_module: Any) -> dict[str, dict[str, Any]]:
        """Run the randomisation test now; returns (and stores) the per-method results, the same on every rank.
        Usable outside the Trainer loop (the model is never modified)."""
        with torch.inference_mode(False):
            return self._check(trainer, pl_module)

    def _check(self, trainer: Any, pl_module: Any) -> dict[str, dict[str, Any]]:
        probe = self.probe_shard(trainer, pl_module)
        logits = self.eval_logits(pl_module, probe.inputs)
        resolved = self.scored_targets(probe, logits)
        rows = resolved.rows
        n = int(rows.numel())
        # a rank with nothing to check still runs one padding sample, so that every rank gathers curves of the
        # same length; its rows are dropped
        run_rows = rows if n else torch.zeros(1, dtype=torch.long, device=rows.device)
        target = resolved.target
        if isinstance(target, Tensor) and not n:
            target = (logits[:1].argmax(dim=1) if logits.ndim == 2 and logits.shape[0]
                      else torch.zeros(1, dtype=torch.long, device=rows.device))
        inputs = probe.inputs[run_rows]
        model = self.layer_module(pl_module)
        results: dict[str, dict[str, Any]] = {}
        for method, checker in self.checkers.items():
            result, ok = None, True
            try:
                with outputs_as_logits(model, self.output_reader):
                    result = checker(model, inputs, target)
                per_sample = result.similarities[self.similarity].t().contiguous()[:n]  # [n, steps]
            except Exception as err:  # isolated per method, reported by name
                ok = False
                self.fault(trainer, method, err)
            if not self.agree(ok) or result is None:
                continue
            gathered = self.gather_rows(per_sample.float())  # [total, steps], every rank
            if gathered.shape[0] == 0:
                self.say_once(f"unchecked-{method}", f"{method}: no probe sample could be checked; no result")
                continue
            result.similarities = {self.similarity: gathered.t().double()}
            curve = result.curve(self.similarity)
            top = min(self.top_layers, len(result.layers))
            results[method] = {
                "layers": ["original", *result.layers],
                "curve": [float(v) for v in curve],
                "mean_excluding_original": result.mean(self.similarity),
                "passes": bool(result.passes(self.threshold, self.similarity, top)),
                "num_samples": int(gathered.shape[0]),
            }
        self.results = results
        self.records.append(self.history_record(trainer, results=dict(results)))
        if trainer.is_global_zero and results:
            self._log(trainer)
        return self.results

    def _log(self, trainer: Any) -> None:
        step = trainer.global_step
        folder = os.path.join(self._dir(trainer), self.name.lower())
        if self.stage(trainer) != "fit":  # never over the files of the fit's last step
            folder = os.path.join(folder, self.stage(trainer))
        outputs: list[str] = []
        rows = []
        for method, res in self.results.items():
            outputs += list(log_line_plot(
                trainer.loggers,
                f"{self.log_key}/sanity/{method}",
                list(range(len(res["curve"]))),
                res["curve"],
                step=step,
                title=f"{method}: {self.similarity} similarity after randomising layers top-down",
                x_label="layers randomised",
                y_label=self.similarity,
                fallback_dir=folder,
            ) or [])
            rows += [[method, i, layer, value] for i, (layer, value) in enumerate(zip(res["layers"], res["curve"]))]
        if rows:
            outputs += list(log_table(
                trainer.loggers,
                f"{self.log_key}/sanity/table",
                ["method", "step", "layer", "similarity"],
                rows,
                step=step,
                fallback_dir=folder,
            ) or [])
        path = self.output_path(trainer, "sanity", "json")
        with open(path, "w") as f:
            json.dump({"similarity": self.similarity, "threshold": self.threshold, "mode": self.mode,
                       "results": self.results}, f, indent=1, default=float)
        outputs.append(path)
        self.last_outputs = outputs


def _with_parameters(model: Any) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
