"""TCAV: testing with concept activation vectors (Kim, Wattenberg, Gilmer, Cai, Wexler, Viegas & Sayres,
"Interpretability Beyond Feature Attribution: Quantitative Testing with Concept Activation Vectors (TCAV)",
ICML 2018).

Does the model's prediction of class ``k`` depend on a human concept ``C`` (given only by example images)?

1. **CAV.** A linear classifier separates a layer's (flattened) activations of concept examples from those of
   random examples; the concept activation vector ``v_C`` is the unit normal of its decision boundary, pointing
   towards the concept. Here: L2-regularised logistic regression in torch, full-batch L-BFGS from zero (so the
   result depends only on the data and the seed of the train / held-out split), class-balanced, on activations
   centred by their mean and divided by one global scale (a scalar, so the direction in activation space is
   unchanged). Its accuracy on a held-out ``test_fraction`` of each set is reported: a CAV near 50 % held-out
   accuracy means the layer does not represent the concept, and its TCAV scores mean little.
2. **Conceptual sensitivity** of an input ``x`` of class ``k``: ``S_{C,k}(x) = grad_a z_k(a(x)) . v_C``, the
   directional derivative of the class **logit** ``z_k`` (not the loss, not a probability) with respect to the
   layer activation ``a`` along ``v_C``; computed with :func:`torch.autograd.grad` with respect to the captured
   activation, never into parameters. ``S > 0``: moving the activation towards the concept raises the logit.
3. **TCAV score** ``= |{x of class k : S_{C,k}(x) > 0}| / |{x of class k}|`` in ``[0, 1]``.
4. **Significance.** One CAV is trained per random set (concept vs ``random_i``, ``i = 1..R``), giving ``R``
   scores; ``R`` random-vs-random CAVs (``random_i`` vs ``random_{i+1 mod R}``) give the null distribution. A
   two-sided Welch t-test (:func:`welch_t_test`) compares the two lists of scores; a concept is significant for a
   class when ``p < alpha / number of concepts`` (Bonferroni over the concepts tested).

Caveats, measured on this project's tests: the score counts signs only, so a tiny but consistent effect of a
concept direction scores near 0 or 1 just like a large one; and the ``R`` runs of a concept share its example set,
so the t-test treats as independent what is partly one draw, which makes it anti-conservative for concept sets
that happen to be atypical (a set of random images can come out "significant"). Check ``cav_accuracy`` (a concept
the layer cannot tell from random images has a meaningless score), use larger concept sets, and optionally
``concept_fraction < 1`` to resample the concept set per run. In exploratory runs of the spurious-tag set-up of
the tests over 6 seeds, the tag was significant for all 6 models trained with the cue, but also for 2 of the 6
trained with the tag at random, whose logit moved by less than 0.2 when the tag was added.

The sensitivity gradient does not depend on the CAV, so it is computed once per input and dotted with every CAV
(concept and random) at once; inputs are processed ``batch_size`` at a time.

CAV training and the directional derivatives live in :mod:`~lightning_xai.interpretation.cav`, the t-test in
:mod:`~lightning_xai.interpretation.statistics`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_xai.attribution.layers import resolve_layer
from lightning_xai.checks import check_float, check_int, check_optional_int
from lightning_xai.interpretation.cav import CAVBank, directional_derivatives, train_cav
from lightning_xai.interpretation.cav import check_tcav_inputs as _check_inputs
from lightning_xai.interpretation.embedding import layer_features
from lightning_xai.interpretation.statistics import welch_t_test

__all__ = [
    "TCAV",
    "CAVBank",
    "TCAVResult",
    "TCAVScore",
    "directional_derivatives",
    "train_cav",
    "welch_t_test",
]


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TCAVScore:
    """The TCAV test of one (class, concept) pair."""

    target: int
    concept: str
    #: Mean TCAV score over the ``R`` CAVs of the concept, in [0, 1].
    score: float
    #: Sample standard deviation of those scores.
    std: float
    #: Mean and standard deviation of the random-vs-random CAVs' scores (the null).
    random_score: float
    random_std: float
    #: Two-sided Welch t-test p-value (uncorrected), and ``p < alpha / number of concepts``.
    p_value: float
    significant: bool
    #: Mean held-out accuracy of the concept's CAVs.
    cav_accuracy: float
    #: Number of class inputs the scores were computed on.
    num_inputs: int
    scores: list[float] = field(default_factory=list)
    random_scores: list[float] = field(default_factory=list)


@dataclass
class TCAVResult:
    """TCAV scores per (class, concept) with their significance (see the module docstring)."""

    layer: str
    alpha: float
    concepts: list[str]
    classes: list[int]
    entries: list[TCAVScore]

    COLUMNS = (
        "class",
        "concept",
        "tcav_score",
        "std",
        "random_score",
        "random_std",
        "p_value",
        "significant",
        "cav_accuracy",
        "num_inputs",
    )

    @property
    def threshold(self) -> float:
        """The Bonferroni-corrected p-value threshold ``alpha / number of concepts``."""
        return self.alpha / max(1, len(self.concepts))

    def get(self, target: int, concept: str) -> TCAVScore:
        for entry in self.entries:
            if entry.target == target and entry.concept == concept:
                return entry
        raise KeyError(f"no TCAV score for class {target} and concept {concept!r}")

    def rows(self) -> list[list[object]]:
        return [
            [
                e.target,
                e.concept,
                e.score,
                e.std,
                e.random_score,
                e.random_std,
                e.p_value,
                e.significant,
                e.cav_accuracy,
                e.num_inputs,
            ]
            for e in self.entries
        ]

    @classmethod
    def from_counts(
        cls, bank: CAVBank, classes: Sequence[int], positive: Tensor, totals: Tensor, alpha: float
    ) -> TCAVResult:
        """Build the result from ``positive [len(classes), M]`` - the number of class inputs with ``S > 0`` for
        each CAV of ``bank`` - and ``totals [len(classes)]`` (counts add up over data shards)."""
        threshold = alpha / max(1, len(bank.concepts))
        entries = []
        null_rows = bank.rows_of(None)
        for i, k in enumerate(classes):
            n = int(totals[i])
            if n == 0:
                continue
            null = (positive[i, null_rows].double() / n).tolist()
            for concept in bank.concepts:
                rows = bank.rows_of(concept)
                runs = (positive[i, rows].double() / n).tolist()
                _, p = welch_t_test(runs, null)
                runs_t = torch.tensor(runs, dtype=torch.float64)
                null_t = torch.tensor(null, dtype=torch.float64)
                entries.append(
                    TCAVScore(
                        target=int(k),
                        concept=concept,
                        score=float(runs_t.mean()),
                        std=float(runs_t.std()) if len(runs) > 1 else 0.0,
                        random_score=float(null_t.mean()),
                        random_std=float(null_t.std()) if len(null) > 1 else 0.0,
                        p_value=p,
                        significant=bool(p < threshold),
                        cav_accuracy=float(bank.accuracies[rows].double().nanmean()),
                        num_inputs=n,
                        scores=runs,
                        random_scores=null,
                    )
                )
        return cls(bank.layer, alpha, list(bank.concepts), [int(k) for k in classes], entries)


# ---------------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------------


class TCAV:
    """Test whether classes depend on user-defined concepts at one layer (Kim et al., ICML 2018).

    ``TCAV("layer3")(model, inputs, targets, concepts={"striped": x_striped}, random_examples=x_pool)`` returns a
    :class:`TCAVResult`. The steps are public for callers that shard data (the callback): :meth:`activations`,
    :meth:`random_sets`, :meth:`train_cavs`, :meth:`counts` and :meth:`TCAVResult.from_counts`.

    Args:
        layer: the layer whose activation space the CAVs live in (dotted name or module).
        num_random: number ``R`` of random sets (>= 2; the paper uses many, e.g. 10 or more): ``R`` CAVs per
            concept and ``R`` random-vs-random CAVs.
        random_size: examples per random set drawn from a random pool (default: the size of the largest concept
            set).
        l2: L2 regularisation of the CAV logistic regression (on activations scaled to unit mean norm).
        max_iter: L-BFGS iterations per CAV.
        test_fraction: share of each set held out to measure CAV accuracy (0 uses everything for training).
        alpha: significance level before the Bonferroni correction over concepts.
        batch_size: inputs per forward/backward pass.
        seed: seed of the random-set draws and of the CAV train / held-out splits.
        concept_fraction: share of each concept's examples used per run, drawn afresh (seeded) for each of the
            ``R`` runs; 1 (the paper) uses the whole set every time. Below 1 the concept runs vary in their
            positive set as the random-vs-random runs do.
    """

    def __init__(
        self,
        layer: str | nn.Module,
        *,
        num_random: int = 10,
        random_size: int | None = None,
        l2: float = 1e-2,
        max_iter: int = 100,
        test_fraction: float = 0.25,
        alpha: float = 0.05,
        batch_size: int = 32,
        seed: int = 0,
        concept_fraction: float = 1.0,
    ) -> None:
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"layer must be a dotted module name or an nn.Module, got {type(layer).__name__}")
        self.layer = layer
        self.num_random = check_int("num_random", num_random, minimum=2, owner="TCAV")
        self.random_size = check_optional_int("random_size", random_size, minimum=2, owner="TCAV")
        self.l2 = check_float("l2", l2, minimum=0.0, owner="TCAV")
        self.test_fraction = check_float("test_fraction", test_fraction, minimum=0.0, maximum=0.9, owner="TCAV")
        self.alpha = check_float("alpha (a significance level)", alpha, minimum=0.0, maximum=1.0, strict=True,
                                 owner="TCAV")
        self.max_iter = check_int("max_iter", max_iter, minimum=1, owner="TCAV")
        self.concept_fraction = check_float("concept_fraction", concept_fraction, minimum=0.0, maximum=1.0,
                                            owner="TCAV")
        if self.concept_fraction == 0.0:
            raise ValueError(f"TCAV: concept_fraction must be in (0, 1], got {concept_fraction!r}")
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner="TCAV")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"TCAV: seed must be an int, got {seed!r}")
        self.seed = seed

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"TCAV({fields})"

    # ------------------------------------------------------------------------------------------------ steps
    def activations(self, model: nn.Module, examples: Tensor) -> Tensor:
        """The layer's flattened activations ``[N, D]`` of ``examples`` (eval mode, no_grad, CPU float32)."""
        if not isinstance(examples, Tensor) or not examples.is_floating_point() or examples.ndim < 2:
            raise ValueError(f"examples must be a float batch [N, ...], got {getattr(examples, 'shape', examples)}")
        if examples.shape[0] == 0:
            raise ValueError("TCAV: got an empty set of examples; every concept and random set needs examples")
        feats, _ = layer_features(model, self.layer, examples, reduce="flatten", batch_size=self.batch_size)
        return feats

    def random_sets(self, pool_size: int, set_size: int) -> list[Tensor]:
        """Indices of ``num_random`` random sets of ``set_size`` examples drawn (seeded, without replacement
        within a set) from a pool of ``pool_size`` examples."""
        if pool_size < 2:
            raise ValueError(f"the random pool needs at least 2 examples, got {pool_size}")
        size = min(set_size, pool_size)
        g = torch.Generator().manual_seed(self.seed + 7919)
        return [torch.randperm(pool_size, generator=g)[:size] for _ in range(self.num_random)]

    def train_cavs(self, layer: str, concept_acts: Mapping[str, Tensor], random_acts: Sequence[Tensor]) -> CAVBank:
        """Train every CAV from activations: each concept against each random set, and each random set
        ``i`` against random set ``i + 1`` (mod ``R``). ``len(random_acts)`` must equal ``num_random``."""
        if not concept_acts:
            raise ValueError("TCAV needs at least one concept")
        if len(random_acts) != self.num_random:
            raise ValueError(f"expected {self.num_random} random sets, got {len(random_acts)}")
        vectors, accuracies = [], []
        g = torch.Generator().manual_seed(self.seed + 104729)

        def subsample(acts: Tensor) -> Tensor:
            if self.concept_fraction >= 1.0:
                return acts
            keep = max(2, round(self.concept_fraction * acts.shape[0]))
            return acts[torch.randperm(acts.shape[0], generator=g)[:keep]]

        pairs = [(subsample(acts), random_acts[i]) for acts in concept_acts.values() for i in range(self.num_random)]
        pairs += [(random_acts[i], random_acts[(i + 1) % self.num_random]) for i in range(self.num_random)]
        for j, (pos, neg) in enumerate(pairs):
            vector, accuracy = train_cav(
                pos, neg, l2=self.l2, test_fraction=self.test_fraction, max_iter=self.max_iter, seed=self.seed + j
            )
            vectors.append(vector)
            accuracies.append(accuracy)
        return CAVBank(layer, list(concept_acts), self.num_random, torch.stack(vectors), torch.tensor(accuracies))

    def fit_cavs(
        self, model: nn.Module, concepts: Mapping[str, Tensor], random_examples: Tensor | Sequence[Tensor]
    ) -> CAVBank:
        """Compute activations of the concept examples and the random sets and train every CAV.

        ``random_examples`` is either one pool tensor (``num_random`` sets of ``random_size`` examples are drawn
        from it, see :meth:`random_sets`) or a sequence of exactly ``num_random`` tensors (the sets).
        """
        if not isinstance(concepts, Mapping) or not concepts:
            raise ValueError("concepts must be a non-empty mapping {name: example tensor [n, ...]}")
        layer, _ = resolve_layer(model, self.layer)
        for name, x in concepts.items():
            if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == 0:
                raise ValueError(f"TCAV: concept {name!r} has no examples; give each concept at least 2")
        if isinstance(random_examples, Tensor) and random_examples.ndim >= 1 and random_examples.shape[0] == 0:
            raise ValueError("TCAV: random_examples is empty; the random counterparts need at least 2 examples")
        concept_acts = {str(name): self.activations(model, x) for name, x in concepts.items()}
        if isinstance(random_examples, Tensor):
            pool = self.activations(model, random_examples)
            size = self.random_size or max(a.shape[0] for a in concept_acts.values())
            random_acts = [pool[idx] for idx in self.random_sets(pool.shape[0], size)]
        else:
            random_acts = [self.activations(model, x) for x in random_examples]
        return self.train_cavs(layer, concept_acts, random_acts)

    def counts(
        self, model: nn.Module, inputs: Tensor, targets: Tensor | int, bank: CAVBank, classes: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """``(positive [len(classes), M], totals [len(classes)])``: for each class of ``classes``, how many of
        its inputs (those whose target is that class) have a positive sensitivity along each CAV of ``bank``."""
        _check_inputs(inputs)
        targets = torch.as_tensor(targets).long().reshape(-1)
        if targets.numel() == 1:
            targets = targets.expand(inputs.shape[0])
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"targets must have one class per input ({inputs.shape[0]}), got {targets.shape[0]}")
        targets = targets.cpu()
        sens = directional_derivatives(
            model, self.layer, inputs, targets.clone(), bank.vectors, batch_size=self.batch_size
        )
        positive = torch.zeros(len(classes), bank.vectors.shape[0], dtype=torch.long)
        totals = torch.zeros(len(classes), dtype=torch.long)
        for i, k in enumerate(classes):
            sel = targets == int(k)
            totals[i] = int(sel.sum())
            positive[i] = (sens[sel] > 0).sum(dim=0)
        return positive, totals

    # ------------------------------------------------------------------------------------------------ all in one
    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | int,
        concepts: Mapping[str, Tensor],
        random_examples: Tensor | Sequence[Tensor],
        *,
        classes: Sequence[int] | None = None,
    ) -> TCAVResult:
        """Run TCAV: ``inputs [B, ...]`` with their classes ``targets`` (an int or ``LongTensor[B]``, usually the
        labels), concept examples ``{name: [n, ...]}`` and random examples (a pool or ``num_random`` sets).
        ``classes`` restricts the classes reported (default: every class in ``targets``)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_inputs(inputs)
        bank = self.fit_cavs(model, concepts, random_examples)
        target_tensor = torch.as_tensor(targets).long().reshape(-1)
        if classes is None:
            classes = sorted(set(target_tensor.tolist()))
        positive, totals = self.counts(model, inputs, targets, bank, classes)
        return TCAVResult.from_counts(bank, classes, positive, totals, self.alpha)
