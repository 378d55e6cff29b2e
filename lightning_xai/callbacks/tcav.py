"""``TCAVScores``: TCAV scores of every (class, concept) pair at one layer, during training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.batch import outputs_as_logits
from lightning_xai.callbacks.base import ConfigurationError, ValidationContext, XAICallback
from lightning_xai.callbacks.logits import check_class_logits, recording_outputs
from lightning_xai.checks import check_int
from lightning_xai.distributed import broadcast
from lightning_xai.interpretation.tcav import TCAV, CAVBank, TCAVResult, directional_derivatives
from lightning_xai.viz.logging import log_table

__all__ = ["TCAVScores"]

#: Fewest examples a CAV can be trained on with a held-out part (one to train, one to test).
MIN_EXAMPLES = 2


class TCAVScores(XAICallback):
    """TCAV scores (Kim et al., "Interpretability Beyond Feature Attribution: Quantitative Testing with Concept
    Activation Vectors (TCAV)", ICML 2018) of every (class, concept) pair at one layer, with their significance.

    The method is a configured :class:`~lightning_xai.interpretation.TCAV` (layer, number of random sets, CAV
    regularisation, significance level, seed); for compatibility its keyword arguments (``layer``, ``num_random``,
    ``l2``, ``alpha``) are still accepted instead, and a string first argument is the layer.

    Concepts are given as example tensors ``{name: Tensor[n, C, H, W]}`` together with ``random_examples`` (a pool
    the random sets are drawn from), or as concept names of a concept dataset - any object with
    ``concept_examples(name, n, seed)`` and ``random_examples(n, seed)``, such as
    :class:`lightning_xai.data.concepts.ConceptScenes` - passed as ``concept_data`` or found as the ``split``
    dataset itself. The class inputs are ``num_samples`` probe samples of ``split`` (drawn once, seeded), each
    explained for its own label.

    Checked at setup (before the first training step): the layer exists (close names are suggested), the classes
    are in the model's range, the batches have labels, and every named concept has at least
    ``num_concept_examples`` examples in the data it is drawn from.

    Never a wrong number: a class any of whose inputs has a NaN / inf logit or conceptual sensitivity is reported
    (once, by class) and gets no score - a NaN gradient is not a "negative sensitivity".

    Logged: a table ``<log_key>/scores`` (class, concept, score, std, random score, p-value, significant, CAV
    accuracy), the metric ``<log_key>/<class>/<concept>`` (the TCAV score) and ``<log_key>/num_significant``.
    ``history`` keeps every run's rows (resumable). Cost per run: forward passes over the concept and random
    examples (every rank), ``(num_concepts + 1) * num_random`` small logistic regressions (every rank), and one
    forward + backward pass over the rank's share of the probe set.

    DDP: the class inputs are sharded over ranks and the counts of positive sensitivities summed; the CAVs are
    trained on every rank from the same examples and rank zero's are broadcast, so every rank scores with identical
    CAVs and the result equals the single-process one.

    Args:
        tcav: the configured method (or, for compatibility, the layer name).
        concepts: ``{name: examples}`` or concept names of a concept dataset.
        layer, num_random, l2, alpha: the old keywords, used to build the method when ``tcav`` is not a
            :class:`TCAV` (defaults 10 random sets, ``l2=1e-2``, ``alpha=0.05``).
        random_examples: the random pool (required with example tensors; optional with a concept dataset).
        concept_data: the concept dataset (default: the ``split`` dataset).
        num_concept_examples, num_random_examples: examples drawn from a concept dataset per concept / for the
            random pool.
        num_samples: number of class inputs (the probe set).
        classes: the classes scored (default: every class of the model).
        **kwargs: the common arguments of :class:`~lightning_xai.callbacks.base.XAICallback`.
    """

    state_fields = ("records",)

    def __init__(
        self,
        tcav: TCAV | str | None = None,
        concepts: Mapping[str, Tensor] | Sequence[str] | None = None,
        *,
        layer: str | None = None,
        random_examples: Tensor | None = None,
        concept_data: Any = None,
        num_concept_examples: int = 30,
        num_random_examples: int = 100,
        num_samples: int = 64,
        classes: Sequence[int] | None = None,
        num_random: int | None = None,
        l2: float | None = None,
        alpha: float | None = None,
        log_key: str = "xai/tcav",
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        check_int("num_samples", num_samples, minimum=2, owner=name)
        super().__init__(num_samples=num_samples, log_key=log_key, batch_size=batch_size, **kwargs)
        self.tcav = self._method(tcav, layer, num_random=num_random, l2=l2, alpha=alpha)
        self.concepts = self._check_concepts(concepts, random_examples)
        self.random_examples = random_examples
        self.concept_data = concept_data
        self.num_concept_examples = check_int(
            "num_concept_examples", num_concept_examples, minimum=MIN_EXAMPLES, owner=name
        )
        self.num_random_examples = check_int(
            "num_random_examples", num_random_examples, minimum=MIN_EXAMPLES, owner=name
        )
        if classes is not None:
            classes = [check_int("classes[]", c, minimum=0, owner=name) for c in classes]
            if not classes:
                raise ValueError(f"{name}: classes must be None (every class) or a non-empty list, got []")
        self.classes = classes
        #: One record per run: stage, epoch, step, ``rows`` (as :data:`TCAVResult.COLUMNS`) and
        #: ``nonfinite_classes`` (classes left unscored) - resumable.
        self.records: list[dict[str, Any]] = []
        self.last_result: TCAVResult | None = None

    def _method(self, tcav: Any, layer: str | None, **legacy: Any) -> TCAV:
        given = {k: v for k, v in legacy.items() if v is not None}
        if isinstance(tcav, TCAV):
            if layer is not None or given:
                raise ValueError(
                    f"{self.name}: configure the given TCAV object, not the callback: got a TCAV and also "
                    f"{sorted([*given, *(['layer'] if layer is not None else [])])}"
                )
            return tcav
        if isinstance(tcav, str):
            if layer is not None and layer != tcav:
                raise ValueError(f"{self.name}: the layer is given twice ({tcav!r} and layer={layer!r})")
            layer = tcav
        elif tcav is not None:
            raise ValueError(f"{self.name}: tcav must be a TCAV object or a layer name, got {type(tcav).__name__}")
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"{self.name}: layer must be a dotted module name (or pass a TCAV object), got {layer!r}")
        return TCAV(
            layer,
            num_random=given.get("num_random", 10),
            l2=given.get("l2", 1e-2),
            alpha=given.get("alpha", 0.05),
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def _check_concepts(self, concepts: Any, random_examples: Any) -> dict[str, Tensor] | list[str]:
        name = self.name
        if isinstance(concepts, Mapping):
            if not concepts:
                raise ValueError(f"{name}: concepts must not be empty")
            for concept, value in concepts.items():
                if not isinstance(value, Tensor) or not value.is_floating_point() or value.ndim < 2:
                    raise ValueError(
                        f"{name}: concept {concept!r} must be a float example tensor [n, ...], got {type(value)}"
                    )
                if value.shape[0] < MIN_EXAMPLES:
                    raise ValueError(
                        f"{name}: concept {concept!r} has {value.shape[0]} example(s); a CAV needs at least "
                        f"{MIN_EXAMPLES}"
                    )
            if not isinstance(random_examples, Tensor):
                raise ValueError(f"{name}: concepts given as example tensors need random_examples= (a tensor of "
                                 "random inputs)")
            return dict(concepts)
        if isinstance(concepts, str) or not concepts or not all(isinstance(c, str) for c in concepts):
            raise ValueError(
                f"{name}: concepts must be a mapping name -> examples or a list of names, got {concepts!r}"
            )
        if random_examples is not None and not isinstance(random_examples, Tensor):
            raise ValueError(f"{name}: random_examples must be a tensor of random inputs")
        return list(concepts)

    # ------------------------------------------------------------------------------------------ identity, state
    @property
    def layer(self) -> Any:
        return self.tcav.layer

    def _state_key_parts(self) -> dict[str, Any]:
        return {"layer": self.layer if isinstance(self.layer, str) else type(self.layer).__name__}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": str(self._state_key_parts()["layer"]),
                "concepts": list(self.concepts), "num_random": self.tcav.num_random}

    @property
    def history(self) -> list[tuple[int, list[list[Any]]]]:
        """``[(epoch, rows), ...]`` over the runs (derived from :attr:`records`)."""
        return [(int(r["epoch"]), [list(row) for row in r["rows"]]) for r in self.records]

    @history.setter
    def history(self, value: Sequence[tuple[int, list[list[Any]]]]) -> None:
        self.records = [
            {"stage": "fit", "epoch": int(e), "step": None, "rows": [list(row) for row in rows],
             "nonfinite_classes": []}
            for e, rows in value
        ]

    # ------------------------------------------------------------------------------------------ setup
    def validate(self, trainer: Any, pl_module: Any, context: ValidationContext) -> None:
        model = self.layer_module(pl_module)
        try:
            resolve_layer(model, self.layer)
        except (ValueError, TypeError) as err:
            raise ConfigurationError(f"{self.name}: {err}") from err
        if context.probe is None or context.logits is None:
            return
        if context.probe.labels is None:
            raise ConfigurationError(
                f"{self.name}: the class inputs are scored for their label, but the {self.split} batches have no "
                "labels (set label_key=)"
            )
        check_class_logits(self.name, context.logits, self.classes, "TCAV scores")
        if isinstance(self.concepts, list):
            self._check_concept_source(self._concept_source(context.dataset))

    def _concept_source(self, dataset: Any) -> Any:
        source = self.concept_data if self.concept_data is not None else dataset
        if not callable(getattr(source, "concept_examples", None)) or (
            self.random_examples is None and not callable(getattr(source, "random_examples", None))
        ):
            raise ConfigurationError(
                f"{self.name}: concepts given by name ({self.concepts}) need a concept dataset with "
                "concept_examples(name, n, seed) and random_examples(n, seed) (e.g. ConceptScenes), but the "
                f"{self.split} data is a {type(source).__name__}: pass concept_data= or use such a dataset"
            )
        return source

    def _check_concept_source(self, source: Any) -> None:
        where = "concept_data" if self.concept_data is not None else f"the {self.split} split"
        need = self.num_concept_examples
        for concept in self.concepts:
            count = None
            if callable(getattr(source, "concept_indices", None)):
                try:
                    count = len(source.concept_indices(concept))
                except (ValueError, KeyError) as err:
                    raise ConfigurationError(f"{self.name}: unknown concept {concept!r}: {err}") from err
            if count is None:
                try:
                    count = int(source.concept_examples(concept, need, seed=self.seed).shape[0])
                except ValueError as err:
                    raise ConfigurationError(
                        f"{self.name}: concept {concept!r} has too few examples in {where} for "
                        f"num_concept_examples={need} (minimum {MIN_EXAMPLES}): {err}"
                    ) from err
            if count < need:
                raise ConfigurationError(
                    f"{self.name}: concept {concept!r} has {count} examples in {where}, fewer than "
                    f"num_concept_examples={need}; lower num_concept_examples (minimum {MIN_EXAMPLES}) or draw "
                    "from more data (concept_data=)"
                )
        if self.random_examples is None and hasattr(source, "__len__") and len(source) < self.num_random_examples:
            raise ConfigurationError(
                f"{self.name}: {where} has {len(source)} samples, fewer than num_random_examples="
                f"{self.num_random_examples} (minimum {MIN_EXAMPLES})"
            )

    # ------------------------------------------------------------------------------------------ work
    def _examples(self, trainer: Any) -> tuple[dict[str, Tensor], Tensor]:
        if isinstance(self.concepts, dict):
            return self.concepts, self.random_examples  # type: ignore[return-value]
        dataset = None if self.concept_data is not None else self.dataset(trainer, self.split)
        source = self._concept_source(dataset)
        examples = {
            name: source.concept_examples(name, self.num_concept_examples, seed=self.seed + i)
            for i, name in enumerate(self.concepts)
        }
        pool = self.random_examples
        if pool is None:
            pool = source.random_examples(self.num_random_examples, seed=self.seed + 7919)
        return examples, pool

    def compute(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        model = self.layer_module(pl_module)

        def fit() -> CAVBank:
            concepts, pool = self._examples(trainer)
            with outputs_as_logits(model, self.output_reader):
                return self.tcav.fit_cavs(model, concepts, pool)

        bank = self.run_agreed(fit)
        # score with rank zero's CAVs everywhere
        bank.vectors = broadcast(bank.vectors.contiguous(), 0, self.reducer)
        bank.accuracies = broadcast(bank.accuracies.contiguous(), 0, self.reducer)
        probe = self.run_agreed(lambda: self.probe_shard(trainer, pl_module))
        positive, totals, nonfinite, classes = self.run_agreed(lambda: self._counts(model, pl_module, probe, bank))
        positive = self.sum_over_ranks(positive.to(probe.inputs.device)).cpu()
        totals = self.sum_over_ranks(totals.to(probe.inputs.device)).cpu()
        nonfinite = self.sum_over_ranks(nonfinite.to(probe.inputs.device)).cpu()
        bad = [int(k) for k, n in zip(classes, nonfinite.tolist()) if n > 0]
        if bad:
            detail = ", ".join(f"class {k}: {int(n)}" for k, n in zip(classes, nonfinite.tolist()) if n > 0)
            self.say_once(
                f"nonfinite-classes-{bad}",
                f"NaN or inf logits or conceptual sensitivities for the inputs of classes {bad} ({detail} inputs); "
                "no TCAV score is computed for these classes",
            )
            totals = totals.masked_fill(nonfinite > 0, 0)
        result = TCAVResult.from_counts(bank, classes, positive, totals, self.tcav.alpha)
        self.last_result = result
        rows = result.rows()
        self.records.append(self.history_record(trainer, rows=rows, nonfinite_classes=bad))
        if trainer.is_global_zero and rows:
            self.last_outputs = list(
                log_table(
                    trainer.loggers,
                    f"{self.log_key}/scores",
                    list(TCAVResult.COLUMNS),
                    rows,
                    step=self.logger_step(trainer),
                    fallback_dir=os.path.dirname(self.output_path(trainer, "scores")),  # <output_dir>/tcavscores
                )
            )
        metrics = {f"{self.log_key}/{e.target}/{e.concept}": e.score for e in result.entries}
        if result.entries:
            metrics[f"{self.log_key}/num_significant"] = float(sum(e.significant for e in result.entries))
        return metrics

    def _counts(
        self, model: Any, pl_module: Any, probe: Any, bank: CAVBank
    ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """This rank's ``(positive [K, M], totals [K], nonfinite [K], classes)``: per class, how many of its finite
        inputs have a positive sensitivity along each CAV, how many finite inputs it has, and how many inputs
        whose logits or sensitivities are NaN / inf."""
        n = probe.num_real
        if n == 0:  # this rank only holds padding: it takes part in the sums with zeros
            num_outputs = int(self.eval_logits(pl_module, probe.inputs[:1]).shape[1])
            classes = self.classes if self.classes is not None else list(range(num_outputs))
            k, m = len(classes), bank.vectors.shape[0]
            zeros = torch.zeros(k, dtype=torch.long)
            return torch.zeros(k, m, dtype=torch.long), zeros, zeros.clone(), classes
        labels = probe.labels[:n].long().reshape(-1).cpu()
        # the logits come from the sensitivity pass itself (eval mode), not from a forward pass of their own
        with recording_outputs(model, self.output_reader) as outputs, outputs_as_logits(model, self.output_reader):
            sens = directional_derivatives(
                model, self.layer, probe.inputs[:n], labels.clone(), bank.vectors, batch_size=self.tcav.batch_size
            )
        logits = torch.cat(outputs).float().cpu()
        classes = self.classes if self.classes is not None else list(range(int(logits.shape[1])))
        positive = torch.zeros(len(classes), bank.vectors.shape[0], dtype=torch.long)
        totals = torch.zeros(len(classes), dtype=torch.long)
        nonfinite = torch.zeros(len(classes), dtype=torch.long)
        ids = None if probe.sample_ids is None else probe.sample_ids[:n].cpu()
        finite = self.finite_rows(logits, ids)
        finite &= torch.isfinite(sens).all(dim=1)
        for i, k in enumerate(classes):
            sel = labels == int(k)
            ok = sel & finite
            totals[i] = int(ok.sum())
            nonfinite[i] = int((sel & ~finite).sum())
            positive[i] = (sens[ok] > 0).sum(dim=0)
        return positive, totals, nonfinite, classes
