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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import (
    Target,
    check_positive_int,
    gradient_context,
    model_state_guard,
    select_scores,
    validate_target,
)
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.interpretation.embedding import layer_features, model_device

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
# statistics
# ---------------------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for coef in (
            m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0)),
        ):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def welch_t_test(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> tuple[float, float]:
    """Two-sided Welch t-test (unequal variances) of the means of ``a`` and ``b``: returns ``(t, p)``.

    ``t = (mean a - mean b) / sqrt(var a / n_a + var b / n_b)`` (sample variances), with the Welch-Satterthwaite
    degrees of freedom; ``p = I_{df / (df + t^2)}(df / 2, 1 / 2)`` (the Student-t tail through the regularised
    incomplete beta function). When both samples are constant, ``p`` is 1 for equal means and 0 otherwise.
    Each sample needs at least 2 values.
    """
    xa = torch.as_tensor(a, dtype=torch.float64).flatten()
    xb = torch.as_tensor(b, dtype=torch.float64).flatten()
    if xa.numel() < 2 or xb.numel() < 2:
        raise ValueError(f"a t-test needs at least 2 values per sample, got {xa.numel()} and {xb.numel()}")
    na, nb = xa.numel(), xb.numel()
    ma, mb = float(xa.mean()), float(xb.mean())
    va, vb = float(xa.var(unbiased=True)) / na, float(xb.var(unbiased=True)) / nb
    se2 = va + vb
    diff = ma - mb
    if se2 <= 1e-300:
        if abs(diff) <= 1e-12 * max(1.0, abs(ma), abs(mb)):
            return 0.0, 1.0
        return math.copysign(math.inf, diff), 0.0
    t = diff / math.sqrt(se2)
    df = se2 * se2 / ((va * va) / (na - 1) + (vb * vb) / (nb - 1))
    p = _betainc(df / 2.0, 0.5, df / (df + t * t))
    return t, min(1.0, max(0.0, p))


# ---------------------------------------------------------------------------------------------------------------
# CAVs
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(inputs: Tensor) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
        raise ValueError(f"TCAV: inputs must be a float batch [B, ...], got {getattr(inputs, 'shape', inputs)}")
    if inputs.shape[0] == 0:
        raise ValueError("TCAV: inputs is an empty batch; TCAV scores need inputs of the explained classes")


def _split(n: int, test_fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=g)
    n_test = 0 if test_fraction == 0 else max(1, min(n - 1, round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def train_cav(
    positive: Tensor,
    negative: Tensor,
    *,
    l2: float = 1e-2,
    test_fraction: float = 0.25,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[Tensor, float]:
    """Train one CAV: returns ``(unit vector [D] pointing towards ``positive``, held-out accuracy)``.

    ``positive [P, D]`` (concept) and ``negative [Q, D]`` (random) activations. L2-regularised (``l2 / 2 *
    ||w||^2`` on the scaled features), class-balanced logistic regression by full-batch L-BFGS from zero, trained
    on all but a seeded ``test_fraction`` of each set; the accuracy on that held-out part is returned (``nan`` when
    ``test_fraction`` is 0). See the module docstring.
    """
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise ValueError(
            f"CAV activations must be [P, D] and [Q, D] with the same D, got {list(positive.shape)} and "
            f"{list(negative.shape)}"
        )
    min_size = 2 if test_fraction > 0 else 1
    if positive.shape[0] < min_size or negative.shape[0] < min_size:
        raise ValueError(
            f"a CAV needs at least {min_size} concept and {min_size} random examples, got {positive.shape[0]} and "
            f"{negative.shape[0]}"
        )
    g = torch.Generator().manual_seed(seed)
    p_train, p_test = _split(positive.shape[0], test_fraction, g)
    n_train, n_test = _split(negative.shape[0], test_fraction, g)
    # everything inside the autograd context: activations made under inference_mode are copied into normal tensors
    with gradient_context():
        pos = positive.detach().cpu().double().clone()
        neg = negative.detach().cpu().double().clone()
        x = torch.cat([pos[p_train], neg[n_train]])
        y = torch.cat([torch.ones(len(p_train)), torch.zeros(len(n_train))]).double()
        weights = torch.cat(
            [torch.full((len(p_train),), 0.5 / len(p_train)), torch.full((len(n_train),), 0.5 / len(n_train))]
        ).double()
        mean = x.mean(dim=0, keepdim=True)
        scale = float((x - mean).square().sum(dim=1).mean().sqrt())
        scale = scale if scale > 0 else 1.0
        xs = (x - mean) / scale
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            logits = xs @ w + b
            # logistic loss log(1 + e^z) - y z, written out (the fused kernel is slow on small CPU tensors)
            loss = (weights * (torch.nn.functional.softplus(logits) - y * logits)).sum()
            loss = loss + 0.5 * l2 * w.square().sum()
            gw, gb = torch.autograd.grad(loss, (w, b))
            w.grad, b.grad = gw, gb
            return loss.detach()

        optimizer.step(closure)
        w_final, b_final = w.detach().clone(), b.detach().clone()
        norm = float(w_final.norm())
        if norm == 0.0 or not math.isfinite(norm):
            raise ValueError("the CAV classifier did not learn a direction (identical or degenerate activations)")
        accuracy = float("nan")
        if len(p_test) and len(n_test):
            pred_pos = (((pos[p_test] - mean) / scale) @ w_final + b_final) > 0
            pred_neg = (((neg[n_test] - mean) / scale) @ w_final + b_final) <= 0
            accuracy = 0.5 * (float(pred_pos.double().mean()) + float(pred_neg.double().mean()))
        vector = (w_final / norm).float()
    return vector, accuracy


@dataclass
class CAVBank:
    """Every CAV of one TCAV run: ``R`` per concept (against each random set) and ``R`` random-vs-random ones."""

    layer: str
    concepts: list[str]
    num_random: int
    #: ``[(K + 1) * R, D]`` unit vectors: concept ``i``'s runs at rows ``i*R .. (i+1)*R - 1``, the random
    #: (null) CAVs in the last ``R`` rows.
    vectors: Tensor
    #: Held-out accuracy of each CAV, same order.
    accuracies: Tensor

    def rows_of(self, concept: str | None) -> slice:
        """The rows of ``concept``'s CAVs (``None``: the random-vs-random CAVs)."""
        if concept is None:
            i = len(self.concepts)
        elif concept in self.concepts:
            i = self.concepts.index(concept)
        else:
            raise ValueError(f"unknown concept {concept!r}; the bank holds {self.concepts}")
        return slice(i * self.num_random, (i + 1) * self.num_random)


def directional_derivatives(
    model: nn.Module,
    layer: str | nn.Module,
    inputs: Tensor,
    target: Target,
    directions: Tensor,
    *,
    batch_size: int = 32,
) -> Tensor:
    """Conceptual sensitivities ``S [B, M]``: the gradient of each input's target score (the class logit for an
    int / ``LongTensor[B]`` target) with respect to ``layer``'s flattened activation, dotted with each of the
    ``M`` rows of ``directions [M, D]``.

    Eval mode, model state restored, hooks removed; works under ``no_grad`` / ``inference_mode``. The gradient is
    taken with respect to the captured activation only (no parameter gradient is written).
    """
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
        raise ValueError(f"inputs must be a float batch [B, ...], got {getattr(inputs, 'shape', inputs)}")
    if inputs.shape[0] == 0:
        raise ValueError("directional_derivatives: inputs is an empty batch; there is nothing to differentiate")
    if directions.ndim != 2:
        raise ValueError(f"directions must be [M, D], got {list(directions.shape)}")
    if not callable(target):
        validate_target(target, inputs.shape[0], None)
    check_positive_int("batch_size", batch_size)
    device = model_device(model)
    dirs = directions.detach().float().to(device)
    out: list[Tensor] = []
    with model_state_guard(model), gradient_context():
        if isinstance(target, Tensor):
            target = target.detach().clone()
        for start in range(0, inputs.shape[0], batch_size):
            sl = slice(start, min(start + batch_size, inputs.shape[0]))
            x = inputs[sl].detach().clone().to(device).requires_grad_(True)
            tgt = target[sl].to(device) if isinstance(target, Tensor) and target.ndim == 1 else target
            with capture_layer(model, layer) as capture:
                scores = select_scores(model(x), tgt)
            act = capture.activation
            if act.flatten(1).shape[1] != dirs.shape[1]:
                raise ValueError(
                    f"the layer activation has {act.flatten(1).shape[1]} values per sample but the CAVs have "
                    f"{dirs.shape[1]}: were they trained on inputs of another size?"
                )
            (grad,) = torch.autograd.grad(scores.sum(), act, allow_unused=True)
            if grad is None:
                raise ValueError("the explained score does not depend on the layer's activation")
            out.append((grad.flatten(1).float() @ dirs.T).detach().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# results
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
        self.num_random = check_positive_int("num_random", num_random, minimum=2)
        self.random_size = None if random_size is None else check_positive_int("random_size", random_size, 2)
        for name, value, low, high in (("l2", l2, 0.0, math.inf), ("test_fraction", test_fraction, 0.0, 0.9)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be a significance level in (0, 1), got {alpha!r}")
        self.l2 = float(l2)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.test_fraction = float(test_fraction)
        if (
            isinstance(concept_fraction, bool)
            or not isinstance(concept_fraction, (int, float))
            or not (0.0 < concept_fraction <= 1.0)
        ):
            raise ValueError(f"concept_fraction must be in (0, 1], got {concept_fraction!r}")
        self.concept_fraction = float(concept_fraction)
        self.alpha = float(alpha)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
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
