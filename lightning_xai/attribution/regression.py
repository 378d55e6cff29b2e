"""The regressions behind the LIME surrogate: weighted ridge and the K-Lasso feature selection on the exact
lasso path (LARS with the lasso modification)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["lars_lasso_path", "lasso_selection", "weighted_ridge"]


def weighted_ridge(z: Tensor, y: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``argmin_{beta, b} sum_i w_i (y_i - z_i beta - b)^2 + alpha |beta|^2`` (intercept unpenalised), float64.

    Solved as a least-squares problem on weighted, centred data stacked with ``sqrt(alpha) I`` rows
    (minimum-norm solution when ``alpha = 0`` and the design is rank deficient).
    """
    z, y, w = z.double(), y.double(), w.double()
    wn = w / w.sum()
    z_mean, y_mean = wn @ z, wn @ y
    sw = w.sqrt()[:, None]
    a = sw * (z - z_mean)
    rhs = sw[:, 0] * (y - y_mean)
    if alpha > 0:
        a = torch.cat([a, math.sqrt(alpha) * torch.eye(z.shape[1], dtype=torch.float64)])
        rhs = torch.cat([rhs, torch.zeros(z.shape[1], dtype=torch.float64)])
    beta = torch.linalg.lstsq(a, rhs[:, None], driver="gelsd").solution[:, 0]
    return beta, y_mean - z_mean @ beta


def lars_lasso_path(x: np.ndarray, y: np.ndarray, *, max_steps: int | None = None) -> list[list[int]]:
    """The active sets along the exact lasso regularisation path of ``min_b |y - x b|^2 / 2 + lambda |b|_1``.

    LARS with the lasso modification (Efron, Hastie, Johnstone & Tibshirani, "Least Angle Regression", Annals of
    Statistics 2004, section 3.1): starting from ``lambda = max |x^T y|`` (nothing active), the piecewise-linear
    path is followed breakpoint by breakpoint; at each breakpoint exactly one variable joins the active set (the
    one whose correlation with the residual reaches the active ones') or leaves it (an active coefficient
    crosses zero). Returns the active set after each breakpoint (variable indices in order of entry), so
    consecutive sets differ by one variable. The path ends when the residual is uncorrelated with every variable
    or the active columns become linearly dependent. ``x`` and ``y`` are expected centred (no intercept).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, p = x.shape
    beta = np.zeros(p)
    corr = x.T @ y
    c_max = float(np.abs(corr).max()) if p else 0.0
    if c_max <= 0.0 or not np.isfinite(c_max):
        return []
    tiny = 1e-12 * c_max
    active: list[int] = [int(np.argmax(np.abs(corr)))]
    path: list[list[int]] = [list(active)]
    limit = max_steps if max_steps is not None else 8 * max(p, 1)
    for _ in range(limit):
        corr = x.T @ (y - x @ beta)
        c_max = float(np.abs(corr[active]).max())
        if c_max <= tiny:
            break
        signs = np.sign(corr[active])
        xa = x[:, active] * signs
        gram = xa.T @ xa
        ones = np.ones(len(active))
        try:
            g_inv_1 = np.linalg.solve(gram, ones)
            a_a = 1.0 / math.sqrt(float(ones @ g_inv_1))
            w = a_a * g_inv_1
            u = xa @ w
            # dependent active columns (the path reached the rank of the design): the last variable that entered
            # cannot take a coefficient of its own, so its set is not on the path
            dependent = not np.all(np.isfinite(u)) or np.abs(xa.T @ u - a_a).max() > 1e-6 * a_a
        except (np.linalg.LinAlgError, ValueError, ZeroDivisionError):
            dependent = True
        if dependent:
            if len(path) > 1:
                path.pop()
            break
        a = x.T @ u
        inactive = [j for j in range(p) if j not in active]
        gamma, entering = c_max / a_a, None
        for j in inactive:
            for num, den in ((c_max - corr[j], a_a - a[j]), (c_max + corr[j], a_a + a[j])):
                if den > 1e-15 * a_a:
                    step = num / den
                    if 0.0 <= step < gamma:
                        gamma, entering = step, j
        direction = signs * w  # d beta_active / d gamma
        leaving, gamma_drop = None, gamma
        for i, j in enumerate(active):
            if direction[i] != 0.0:
                step = -beta[j] / direction[i]
                if 1e-15 < step < gamma_drop:
                    gamma_drop, leaving = step, i
        if leaving is not None:
            beta[active] += gamma_drop * direction
            beta[active[leaving]] = 0.0
            active.pop(leaving)
        else:
            beta[active] += gamma * direction
            if entering is None:  # the least-squares fit on the active set is reached
                break
            active.append(entering)
        path.append(list(active))
        if not active or len(active) > n - 1:  # centred data has rank <= n - 1
            break
    return path


def lasso_selection(z: Tensor, y: Tensor, w: Tensor, k: int) -> list[int]:
    """The features of the K-Lasso of Ribeiro et al. (KDD 2016): on the weighted, centred data, follow the exact
    lasso path (:func:`lars_lasso_path`) and keep the active set with the most features, at most ``k``, that
    comes last on the path (the smallest penalty). Because the active set changes by one feature per breakpoint,
    exactly ``k`` features are returned whenever the path ever holds ``k`` (fewer only when the design or the
    scores support fewer). Sorted feature indices."""
    zc, yc, wn = z.double().numpy(), y.double().numpy(), w.double().numpy()
    wn = wn / wn.sum()
    root = np.sqrt(wn)[:, None]
    xw = (zc - wn @ zc) * root
    yw = (yc - wn @ yc) * root[:, 0]
    best: list[int] = []
    for active in lars_lasso_path(xw, yw):
        if len(active) <= k and len(active) >= len(best):
            best = active
    return sorted(best)
