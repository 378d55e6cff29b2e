"""The two-sided Welch t-test TCAV uses for significance (Welch, "The generalization of Student's problem when
several different population variances are involved", Biometrika 1947), with the Student-t tail from the
regularised incomplete beta function (continued fraction, Numerical Recipes ch. 6.4): pure Python, no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["welch_t_test"]


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
