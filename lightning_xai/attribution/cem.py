"""Contrastive Explanation Method (CEM): pertinent positives and pertinent negatives.

Dhurandhar, Chen, Luss, Tu, Ting, Shanmugam and Das, "Explanations based on the Missing: Towards Contrastive
Explanations with Pertinent Negatives", NeurIPS 2018. For an input ``x0`` explained as class ``t0``:

* the **pertinent positive** (PP) is a minimal, sparse part ``delta`` of ``x0`` that *alone* still yields ``t0``
  ("what must be present");
* the **pertinent negative** (PN) is a minimal, sparse addition ``delta`` to ``x0`` whose presence moves the
  prediction away from ``t0`` ("what is - and must remain - absent").

Both minimise the paper's elastic-net objective over a box ``D`` (below), with ``f`` the model's logits:

    ``min_{delta in D}  c * hinge(delta) + beta * ||delta||_1 + ||delta||_2^2 + gamma * ||v - AE(v)||_2^2``

    PP: ``v = b + delta``, ``hinge = max(max_{i != t0} f_i(v) - f_t0(v), -kappa)``,
        ``D = {delta : delta_j between 0 and x0_j - b_j}`` (a part of the input: each feature keeps at most its
        own deviation from the baseline ``b``, with its sign);
    PN: ``v = x0 + delta``, ``hinge = max(f_t0(v) - max_{i != t0} f_i(v), -kappa)``,
        ``D = {delta : delta >= 0 (direction "increase", the paper's "adding" of missing features), v within
        feature_range}``.

``kappa`` is the confidence margin, ``AE`` an optional autoencoder (any ``nn.Module`` mapping inputs to
inputs; ``gamma`` its weight) that keeps ``v`` near the data manifold. The baseline ``b`` defines "absent" (0 for
images whose background is black, as MNIST in the paper).

**Solver.** Projected FISTA (Beck & Teboulle, SIAM J. Imaging Sciences 2009) on the smooth part
``g = c * hinge + ||.||^2 + gamma * AE term`` with the proximal operator of ``alpha_k * beta * ||.||_1`` (soft
thresholding at ``alpha_k * beta``), then the projection onto the box ``D``; step sizes decay polynomially
``alpha_k = lr * (1 - k / K)^(1/2)`` as in the paper. (The authors' reference code thresholds at ``beta``
whatever the step size, which minimises the stated objective only when ``alpha = 1``; the proximal step used here
does minimise it, which ``tests/test_cem.py`` checks against the closed-form optimum for a linear model.)

**Search over c.** ``c_steps`` rounds of bisection per image, as in the paper: a round that finds a solution
with the full margin (PP: ``t0`` still leads by ``>= kappa``; PN: another class leads ``t0`` by ``>= kappa``)
lowers the upper bound of ``c``, a round that does not raises the lower bound (``c *= 10`` while there is no upper
bound). The returned ``delta`` is, over all rounds and iterations, the feasible point with the margin that has the
smallest elastic-net cost ``beta * ||delta||_1 + ||delta||_2^2``; where none was found the map is zero and
:attr:`CEMResult.found` is ``False`` (the attributor warns naming the samples).

**Cost and memory.** Per image ``c_steps * max_iterations`` forward+backward passes (plus one forward each for the
margin check), run ``batch_size`` images at a time (every image of a chunk shares each forward pass), so memory is
bounded by ``batch_size``. There is no randomness: the result is a deterministic function of the inputs (for a
deterministic model). No side effects (see :mod:`lightning_xai.attribution.base`); the autoencoder is also left
as it was.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import (
    Attributor,
    Target,
    gradient_context,
    model_logits,
    model_state_guard,
    validate_target,
)
from lightning_xai.checks import check_choice, check_float, check_int, check_range

__all__ = ["CEMPertinentNegative", "CEMPertinentPositive", "CEMResult", "ContrastiveExplanation"]

MODES = ("pp", "pn")
DIRECTIONS = ("increase", "any")


@dataclass
class CEMResult:
    """What :meth:`ContrastiveExplanation.explain` found for a batch (all tensors detached, on the inputs' device)."""

    #: ``[B, ...]`` the pertinent positive or negative ``delta`` (zero where none was found).
    delta: Tensor
    #: ``[B, ...]`` the input the model sees: ``baseline + delta`` (PP) or ``inputs + delta`` (PN).
    explained_input: Tensor
    #: ``[B]`` whether a ``delta`` with the full margin ``kappa`` was found.
    found: Tensor
    #: ``[B]`` the class the model predicts for :attr:`explained_input`.
    predicted: Tensor
    #: ``[B]`` the class explained (``t0``).
    target: Tensor
    #: ``[B]`` the weight ``c`` of the round that found the returned ``delta`` (NaN where none was found).
    c: Tensor
    #: ``[B]`` elastic-net cost ``beta * ||delta||_1 + ||delta||_2^2`` of the returned ``delta``.
    elastic_net: Tensor


def _other_max(logits: Tensor, target: Tensor) -> Tensor:
    """``max_{i != t} logits_i`` per row."""
    masked = logits.masked_fill(nn.functional.one_hot(target, logits.shape[1]).bool(), float("-inf"))
    return masked.amax(dim=1)


def _per_row(values: Tensor, ndim: int) -> Tensor:
    return values.view(-1, *([1] * (ndim - 1)))


class ContrastiveExplanation(Attributor):
    """Contrastive Explanation Method (Dhurandhar et al., NeurIPS 2018): pertinent positive (``mode="pp"``) or
    pertinent negative (``mode="pn"``) of each input for its target class; see the module docstring for the
    objective, the solver and the search over ``c``.

    Called as an attributor, ``cem(model, inputs, target)`` returns ``delta`` (input shape, signed: the part kept
    for a PP, the addition for a PN); :meth:`explain` returns the whole :class:`CEMResult`. ``target`` is the
    class ``t0`` explained (an int or a ``LongTensor[B]``; usually the predicted class); a callable target does not
    define the other classes the hinge compares with and is refused.

    Args:
        mode: ``"pp"`` (pertinent positive) or ``"pn"`` (pertinent negative, the default); fixed by the
            registered subclasses :class:`CEMPertinentPositive` (``"cem_pp"``) and :class:`CEMPertinentNegative`
            (``"cem_pn"``).
        kappa: confidence margin of the hinge (logit units).
        beta: weight of the L1 (sparsity) term.
        gamma: weight of the autoencoder reconstruction term (used only with ``autoencoder``).
        autoencoder: an ``nn.Module`` reconstructing inputs (same shape in and out), or ``None``.
        c_init: the initial weight ``c`` of the hinge.
        c_steps: rounds of the bisection search over ``c``.
        max_iterations: FISTA iterations per round.
        lr: initial FISTA step size ``alpha_0``.
        baseline: the value meaning "absent" (a float, or a tensor broadcastable to one input).
        feature_range: ``(low, high)`` bounds of valid inputs (PN keeps ``inputs + delta`` inside), or ``None``.
        direction: PN only: ``"increase"`` (``delta >= 0``, adding what is missing, the paper's setting) or
            ``"any"``.
        batch_size: images optimised together (the largest batch the model sees).
    """

    requires_image = False
    #: The mode of a subclass that fixes it (``"pp"`` / ``"pn"``), ``None`` for this class.
    fixed_mode: str | None = None

    def __init__(
        self,
        mode: str | None = None,
        kappa: float = 0.1,
        beta: float = 0.1,
        gamma: float = 0.0,
        autoencoder: nn.Module | None = None,
        c_init: float = 10.0,
        c_steps: int = 4,
        max_iterations: int = 100,
        lr: float = 1e-2,
        baseline: float | Tensor = 0.0,
        feature_range: tuple[float, float] | None = None,
        direction: str = "increase",
        batch_size: int = 32,
    ) -> None:
        owner = type(self).__name__
        if mode is None:
            mode = self.fixed_mode or "pn"
        self.mode = check_choice("mode", mode, MODES, owner=owner)
        if self.fixed_mode is not None and self.mode != self.fixed_mode:
            raise ValueError(f"{owner}: mode is {self.fixed_mode!r} for this class, got {mode!r}")
        self.kappa = check_float("kappa", kappa, minimum=0.0, owner=owner)
        self.beta = check_float("beta", beta, minimum=0.0, owner=owner)
        self.gamma = check_float("gamma", gamma, minimum=0.0, owner=owner)
        if autoencoder is not None and not isinstance(autoencoder, nn.Module):
            kind = type(autoencoder).__name__
            raise ValueError(f"{owner}: autoencoder must be a torch.nn.Module or None, got {kind}")
        self.autoencoder = autoencoder
        self.c_init = check_float("c_init", c_init, minimum=0.0, strict=True, owner=owner)
        self.c_steps = check_int("c_steps", c_steps, minimum=1, owner=owner)
        self.max_iterations = check_int("max_iterations", max_iterations, minimum=1, owner=owner)
        self.lr = check_float("lr", lr, minimum=0.0, strict=True, owner=owner)
        if isinstance(baseline, Tensor):
            if not baseline.is_floating_point() or not bool(torch.isfinite(baseline).all()):
                raise ValueError(f"{owner}: a baseline tensor must be floating point and finite")
            self.baseline: float | Tensor = baseline.detach().clone()
        else:
            self.baseline = check_float("baseline", baseline, owner=owner)
        self.feature_range = check_range("feature_range", feature_range, owner=owner, allow_none=True)
        self.direction = check_choice("direction", direction, DIRECTIONS, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)

    # ------------------------------------------------------------------------------------------------ public
    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        result = self._explain(model, inputs, target)
        if not bool(result.found.all()):
            missing = (~result.found).nonzero().flatten().tolist()
            what = "pertinent positive" if self.mode == "pp" else "pertinent negative"
            warnings.warn(
                f"{type(self).__name__}: no {what} with margin kappa={self.kappa} found for sample(s) {missing} "
                f"within c_steps={self.c_steps} x max_iterations={self.max_iterations}; their maps are zero "
                "(raise c_init, c_steps or max_iterations)",
                RuntimeWarning,
                stacklevel=4,
            )
        return result.delta

    def explain(self, model: nn.Module, inputs: Tensor, target: Target) -> CEMResult:
        """The full result (``delta``, the explained input, whether found, its class, ``c``, cost) for a batch."""
        result = self.run_in_context(model, inputs, target, self._explain)
        return CEMResult(*(t.detach() for t in vars(result).values()))

    def minimize(self, model: nn.Module, inputs: Tensor, target: Target, c: float | Tensor) -> Tensor:
        """The last FISTA iterate for a *fixed* weight ``c`` (a float or ``Tensor[B]``): an approximate minimiser
        of the objective itself, without the search over ``c`` or the margin bookkeeping (for checking the
        solver against a known optimum)."""

        def run(m: nn.Module, x: Tensor, t: Target) -> Tensor:
            t = self._target_tensor(m, x, t)
            lo, hi = self._box(x)
            cc = torch.as_tensor(c, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()
            with model_state_guard(self.autoencoder) if self.autoencoder is not None else contextlib.nullcontext():
                delta, *_ = self._fista(m, x.detach(), t, lo, hi, cc, track=False)
            return delta

        return self.run_in_context(model, inputs, target, run).detach()

    def objective(self, model: nn.Module, inputs: Tensor, target: Tensor, delta: Tensor, c: Tensor) -> Tensor:
        """The objective per sample, ``Tensor[B]`` (the hinge, elastic net and autoencoder terms), for ``delta``."""
        hinge, recon = self._hinge(model, inputs, target, delta)
        return c * hinge + self._elastic_net(delta) + self.gamma * recon

    # ------------------------------------------------------------------------------------------------ pieces
    def _target_tensor(self, model: nn.Module, x: Tensor, target: Target) -> Tensor:
        if callable(target) and not isinstance(target, Tensor):
            raise TypeError(
                f"{type(self).__name__} explains a class against the others; give target as an int or a "
                "LongTensor[B] of class indices (a callable target does not say which classes compete)"
            )
        if isinstance(target, Tensor) and target.ndim == 1:
            return target.to(x.device).long()
        return torch.full((x.shape[0],), int(target), dtype=torch.long, device=x.device)

    def _box(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise bounds ``lo <= delta <= hi`` of the feasible set ``D``."""
        base = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        if self.mode == "pp":
            u = x - base
            return torch.minimum(u, torch.zeros_like(u)), torch.maximum(u, torch.zeros_like(u))
        inf = torch.full_like(x, float("inf"))
        lo, hi = -inf, inf
        if self.feature_range is not None:
            lo, hi = self.feature_range[0] - x, self.feature_range[1] - x
        if self.direction == "increase":
            lo = lo.clamp(min=0.0)
            hi = hi.clamp(min=0.0)
        return lo, hi

    def _evaluated(self, x: Tensor, delta: Tensor) -> Tensor:
        if self.mode == "pp":
            return torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device) + delta
        return x + delta

    def _hinge(
        self, model: nn.Module, x: Tensor, target: Tensor, delta: Tensor, *, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(hinge [B], reconstruction error [B])`` at ``delta``; the hinge without the ``-kappa`` floor is the
        margin by which the wrong side leads."""
        v = self._evaluated(x, delta)
        logits = model_logits(model(v))
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"{type(self).__name__} needs class logits [B, num_classes >= 2], got shape {list(logits.shape)}"
            )
        if check:  # once per round: these checks read values back from the device
            validate_target(target, x.shape[0], logits.shape[1])
            finite = torch.isfinite(logits).all(dim=1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                raise FloatingPointError(f"{type(self).__name__}: the model output is NaN or inf for sample(s) {bad} "
                                         "of the chunk; no contrastive explanation can be scored")
        t_logit = logits.gather(1, target.view(-1, 1)).squeeze(1)
        lead = _other_max(logits, target) - t_logit  # > 0: another class leads t0
        margin = lead if self.mode == "pp" else -lead
        hinge = margin.clamp(min=-self.kappa)
        recon = v.new_zeros(v.shape[0])
        if self.autoencoder is not None and self.gamma > 0:
            rec = self.autoencoder(v)
            if not isinstance(rec, Tensor) or rec.shape != v.shape:
                shape = list(rec.shape) if isinstance(rec, Tensor) else type(rec).__name__
                raise ValueError(f"{type(self).__name__}: the autoencoder must return the input's shape "
                                 f"{list(v.shape)}, got {shape}")
            recon = (v - rec).square().flatten(1).sum(1)
        return hinge, recon

    def _elastic_net(self, delta: Tensor) -> Tensor:
        flat = delta.flatten(1)
        return self.beta * flat.abs().sum(1) + flat.square().sum(1)

    def _fista(
        self, model: nn.Module, x: Tensor, target: Tensor, lo: Tensor, hi: Tensor, c: Tensor, *, track: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One round of projected FISTA at weights ``c [B]``. Returns ``(last iterate, best delta with margin,
        its elastic-net cost (inf where none), found [B])``."""
        n = x.shape[0]
        delta = torch.zeros_like(x)
        y = delta.clone()
        best = torch.zeros_like(x)
        best_cost = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        nonfinite = torch.zeros(n, dtype=torch.bool, device=x.device)  # checked once, after the round
        for k in range(self.max_iterations):
            alpha = self.lr * (1.0 - k / self.max_iterations) ** 0.5
            y_leaf = y.detach().requires_grad_(True)
            hinge, recon = self._hinge(model, x, target, y_leaf, check=k == 0)
            smooth = (c * hinge + self.gamma * recon).sum()
            (grad,) = torch.autograd.grad(smooth, y_leaf, allow_unused=True)
            if grad is None:
                raise ValueError(f"{type(self).__name__}: the model output does not depend on the input")
            grad = grad + 2.0 * y  # the ||delta||^2 term
            z = y - alpha * grad
            threshold = alpha * self.beta
            shrunk = torch.sign(z) * (z.abs() - threshold).clamp(min=0.0)
            new = torch.maximum(torch.minimum(shrunk, hi), lo).detach()
            y = torch.maximum(torch.minimum(new + (k / (k + 3.0)) * (new - delta), hi), lo)
            delta = new
            if track:
                with torch.no_grad():
                    margin, _ = self._hinge(model, x, target, delta, check=False)
                    nonfinite |= ~torch.isfinite(margin) | ~torch.isfinite(delta.flatten(1)).all(dim=1)
                    ok = margin <= -self.kappa
                    if not self.kappa:
                        ok = margin < 0 if self.mode == "pn" else margin <= 0
                    cost = self._elastic_net(delta)
                    better = ok & (cost < best_cost)
                    best = torch.where(_per_row(better, x.ndim), delta, best)
                    best_cost = torch.where(better, cost, best_cost)
        if bool(nonfinite.any()):
            bad = nonfinite.nonzero().flatten().tolist()
            raise FloatingPointError(f"{type(self).__name__}: the model output or its gradient became NaN or inf "
                                     f"during the search for sample(s) {bad} of the chunk; not explained")
        return delta, best, best_cost, torch.isfinite(best_cost)

    def _explain(self, model: nn.Module, inputs: Tensor, target: Target) -> CEMResult:
        t_all = self._target_tensor(model, inputs, target)
        parts: list[CEMResult] = []
        guard = model_state_guard(self.autoencoder) if self.autoencoder is not None else contextlib.nullcontext()
        with guard, gradient_context():
            for start in range(0, inputs.shape[0], self.batch_size):
                sl = slice(start, min(start + self.batch_size, inputs.shape[0]))
                parts.append(self._explain_chunk(model, inputs[sl].detach(), t_all[sl]))
        return CEMResult(*(torch.cat([getattr(p, f) for p in parts]) for f in vars(parts[0])))

    def _explain_chunk(self, model: nn.Module, x: Tensor, target: Tensor) -> CEMResult:
        n = x.shape[0]
        lo, hi = self._box(x)
        c = torch.full((n,), self.c_init, dtype=x.dtype, device=x.device)
        c_low = torch.zeros_like(c)
        c_high = torch.full_like(c, float("inf"))
        best = torch.zeros_like(x)
        best_cost = torch.full_like(c, float("inf"))
        best_c = torch.full_like(c, float("nan"))
        for _ in range(self.c_steps):
            _, found_delta, cost, found = self._fista(model, x, target, lo, hi, c, track=True)
            better = found & (cost < best_cost)
            best = torch.where(_per_row(better, x.ndim), found_delta, best)
            best_cost = torch.where(better, cost, best_cost)
            best_c = torch.where(better, c, best_c)
            c_high = torch.where(found, torch.minimum(c_high, c), c_high)
            c_low = torch.where(found, c_low, torch.maximum(c_low, c))
            bounded = torch.isfinite(c_high)
            c = torch.where(bounded, (c_low + c_high) / 2, c * 10.0)
        found_any = torch.isfinite(best_cost)
        with torch.no_grad():
            explained = self._evaluated(x, best)
            predicted = model_logits(model(explained)).argmax(dim=1)
        return CEMResult(best, explained, found_any, predicted, target, best_c, self._elastic_net(best))


class CEMPertinentPositive(ContrastiveExplanation):
    """The pertinent positive of CEM (registered as ``"cem_pp"``): a minimal sparse part of the input that alone
    keeps the target class (see :class:`ContrastiveExplanation`; ``mode`` is ``"pp"``)."""

    name = "cem_pp"
    fixed_mode = "pp"


class CEMPertinentNegative(ContrastiveExplanation):
    """The pertinent negative of CEM (registered as ``"cem_pn"``): a minimal sparse addition to the input that
    moves the prediction away from the target class (see :class:`ContrastiveExplanation`; ``mode`` is ``"pn"``)."""

    name = "cem_pn"
    fixed_mode = "pn"
