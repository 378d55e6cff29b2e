"""The constrained lasso of relevant units (Oramas, Wang & Tuytelaars, ICLR 2019):
``argmin_W ||X W - Y||_F^2  s.t.  ||w_c||_1 <= mu`` per class column, by accelerated projected gradient (FISTA,
Beck & Teboulle, SIAM J. Imaging Sciences 2009) with the exact Euclidean projection onto the l1 ball of Duchi,
Shalev-Shwartz, Singer & Chandra, ICML 2008.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_xai.checks import check_int

__all__ = ["constrained_lasso", "project_l1_ball"]


def project_l1_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each column of ``v`` onto the l1 ball ``{w : ||w||_1 <= radius}``.

    ``v`` is a vector ``[n]`` or a matrix ``[n, C]`` (columns projected independently). The sort-based algorithm
    of Duchi et al. (ICML 2008, Fig. 1), ``O(n log n)``: columns already inside the ball are returned unchanged;
    otherwise ``w = sign(v) * max(|v| - theta, 0)`` with the threshold ``theta`` that puts ``w`` on the sphere.
    """
    if not isinstance(radius, (int, float)) or isinstance(radius, bool) or not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    if not isinstance(v, Tensor) or v.ndim not in (1, 2) or not v.is_floating_point():
        raise ValueError(f"v must be a float vector [n] or matrix [n, C], got {getattr(v, 'shape', type(v))}")
    vector = v.ndim == 1
    mat = v[:, None] if vector else v
    n = mat.shape[0]
    mags = mat.abs()
    if radius == 0:
        out = torch.zeros_like(mat)
    else:
        u, _ = mags.sort(dim=0, descending=True)
        css = u.cumsum(dim=0) - radius
        j = torch.arange(1, n + 1, dtype=mat.dtype, device=mat.device)[:, None]
        positive = (u - css / j) > 0  # true for j = 1..rho (a prefix)
        rho = positive.sum(dim=0).clamp_min(1)  # [C]
        theta = css.gather(0, (rho - 1)[None]).squeeze(0) / rho.to(mat.dtype)
        out = torch.sign(mat) * (mags - theta.clamp_min(0)[None]).clamp_min(0)
        inside = mags.sum(dim=0) <= radius
        out = torch.where(inside[None], mat, out)
    return out[:, 0] if vector else out


def constrained_lasso(
    features: Tensor, targets: Tensor, mu: float, *, max_iter: int = 2000, tol: float = 1e-7
) -> tuple[Tensor, int]:
    """``argmin_W ||features @ W - targets||_F^2`` s.t. every column of ``W`` has l1 norm ``<= mu``.

    ``features [N, m]``, ``targets [N, C]``; returns ``(W [m, C], iterations)``. FISTA with the l1-ball projection
    (see the module docstring), computed in float64, stopping when the relative change of ``W`` falls below
    ``tol``.
    """
    if features.ndim != 2 or targets.ndim != 2 or features.shape[0] != targets.shape[0]:
        raise ValueError(
            f"features must be [N, m] and targets [N, C] with the same N, got {list(features.shape)} and "
            f"{list(targets.shape)}"
        )
    if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"mu (the l1 budget per class) must be a finite number > 0, got {mu!r}")
    check_int("max_iter", max_iter, minimum=1, owner="constrained_lasso")
    x = features.detach().double()
    y = targets.detach().double().to(x.device)
    gram = x.T @ x
    xty = x.T @ y
    lipschitz = 2.0 * float(torch.linalg.matrix_norm(x, ord=2)) ** 2
    w = torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype, device=x.device)
    if lipschitz == 0.0:
        return w.float(), 0
    step = 1.0 / lipschitz
    z, t = w.clone(), 1.0
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 - reported
        grad = 2.0 * (gram @ z - xty)
        w_next = project_l1_ball(z - step * grad, float(mu))
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = w_next + ((t - 1.0) / t_next) * (w_next - w)
        change = float((w_next - w).norm()) / max(float(w_next.norm()), 1e-12)
        w, t = w_next, t_next
        if change < tol:
            break
    return w.float(), iteration
