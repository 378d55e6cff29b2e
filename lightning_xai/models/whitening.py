"""The concept whitening layer and its evaluation (pure torch): whitening, Cayley rotation steps, purity.

Z. Chen, Y. Bei and C. Rudin, "Concept Whitening for Interpretable Image Recognition", Nature Machine Intelligence
2020. See :mod:`lightning_xai.models.concept_whitening` for the method (whitening, concept alignment, DDP); this
module holds :class:`ConceptWhitening`, :func:`replace_batchnorm`, the matrix functions
(:func:`zca_inverse_sqrt`, :func:`newton_inverse_sqrt`, :func:`cayley_step`, :func:`orthogonality_error`); it
re-exports the evaluation functions of :mod:`lightning_xai.models.whitening_metrics` (:func:`concept_purity`,
:func:`best_filter_auc`, :func:`pooled_activations`). ``lightning_xai.models.concept_whitening`` re-exports every name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.attribution.layers import StopForward, resolve_layer
from lightning_xai.checks import check_choice, check_float, check_int
from lightning_xai.distributed import rank_and_world_size, sum_over_ranks
from lightning_xai.models.whitening_metrics import POOLINGS, best_filter_auc, concept_purity, pooled_activations

__all__ = [
    "POOLINGS",
    "WHITENINGS",
    "ConceptWhitening",
    "best_filter_auc",
    "cayley_step",
    "concept_purity",
    "newton_inverse_sqrt",
    "orthogonality_error",
    "pooled_activations",
    "replace_batchnorm",
    "zca_inverse_sqrt",
]


WHITENINGS = ("zca", "newton")


def _distributed_world() -> int:
    return rank_and_world_size()[1]


def _differentiable_all_reduce(tensor: Tensor) -> Tensor:
    """Sum over DDP ranks whose backward sums the gradients over ranks too (as SyncBatchNorm's statistics)."""
    import torch.distributed.nn.functional as dist_fn  # not importable on builds without distributed support

    return dist_fn.all_reduce(tensor)


def _distributed_rank() -> int:
    return rank_and_world_size()[0]


class _InverseSqrtSPD(torch.autograd.Function):
    """``Sigma^{-1/2}`` of a symmetric positive definite matrix, with a backward that is stable for close eigenvalues.

    For ``W = f(Sigma) = U f(Lambda) U^T`` the differential is ``dW = U (K * (U^T dSigma U)) U^T`` with
    ``K_ij = (f(l_i) - f(l_j)) / (l_i - l_j)`` (``f'(l_i)`` on the diagonal), hence
    ``dL/dSigma = U (K * (U^T dL/dW U)) U^T``. For ``f(l) = l^{-1/2}``:
    ``K_ij = -1 / (s_i s_j (s_i + s_j))`` with ``s = sqrt(l)``, which is ``f'`` when ``l_i = l_j``.
    """

    @staticmethod
    def forward(ctx: Any, sigma: Tensor) -> Tensor:
        eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
        eigenvalues = eigenvalues.clamp_min(torch.finfo(sigma.dtype).tiny)
        ctx.save_for_backward(eigenvalues, eigenvectors)
        return (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.mT

    @staticmethod
    def backward(ctx: Any, grad_w: Tensor) -> Tensor:
        eigenvalues, u = ctx.saved_tensors
        s = eigenvalues.sqrt()
        k = -1.0 / (s[:, None] * s[None, :] * (s[:, None] + s[None, :]))
        grad = u @ (k * (u.mT @ grad_w @ u)) @ u.mT
        return (grad + grad.mT) / 2


def zca_inverse_sqrt(sigma: Tensor) -> Tensor:
    """``sigma^{-1/2}`` (ZCA whitening matrix) of a symmetric positive definite ``[C, C]`` matrix, differentiable."""
    return _InverseSqrtSPD.apply(sigma)


def newton_inverse_sqrt(sigma: Tensor, iterations: int) -> Tensor:
    """Approximate ``sigma^{-1/2}`` by ``iterations`` coupled Newton-Schulz steps on ``sigma / tr(sigma)``.

    ``Y_0 = sigma_N``, ``Z_0 = I``, ``T = (3 I - Z Y) / 2``, ``Y <- Y T``, ``Z <- T Z``; ``Z -> sigma_N^{-1/2}``
    (N. J. Higham, "Functions of Matrices", SIAM 2008, the numerically stable coupled form of IterNorm's
    iteration; the uncoupled ``P <- (3 P - P^3 sigma_N) / 2`` diverges in floating point after enough steps).
    The trace normalisation puts the eigenvalues in (0, 1], where the iteration converges; eigenvalues far
    below the trace need more steps.
    """
    trace = sigma.diagonal().sum()
    y = sigma / trace
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    z = eye
    for _ in range(iterations):
        t = 1.5 * eye - 0.5 * z @ y
        y, z = y @ t, t @ z
    return z / trace.sqrt()


def orthogonality_error(rotation: Tensor) -> float:
    """``max |R^T R - I|``: 0 for an orthogonal matrix."""
    r = rotation.double()
    return float((r.mT @ r - torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)).abs().max())


def cayley_step(
    rotation: Tensor,
    gradient: Tensor,
    objective: Any,
    initial_step: float = 1.0,
    shrink: float = 0.5,
    max_tries: int = 20,
    rho: float = 1e-4,
    normalize_step: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """One curvilinear-search step of Wen & Yin (2013) that decreases ``objective`` on the orthogonal matrices.

    Args:
        rotation: the current orthogonal ``Q [C, C]``.
        gradient: the Euclidean gradient ``G = dF/dQ`` at ``Q``.
        objective: ``F``, a callable ``Tensor [C, C] -> float``.
        initial_step: the first ``tau`` tried; ``tau`` is multiplied by ``shrink`` until the Armijo condition
            ``F(Y(tau)) <= F(Q) - rho * tau * ||A||_F^2 / 2`` holds (at most ``max_tries`` tries).
        normalize_step: start from ``initial_step / ||A||_F`` instead, so that the first rotation tried has a
            fixed size ``||tau A||_F = initial_step`` whatever the scale of the gradient.

    Returns ``(Y(tau), info)`` with ``Y(tau) = (I + tau/2 A)^{-1} (I - tau/2 A) Q``, ``A = G Q^T - Q G^T``
    (``Q`` itself when no ``tau`` satisfies the condition or ``A = 0``) and ``info`` = ``objective_before``,
    ``objective_after``, ``step`` (the accepted ``tau``, 0 if none). Computed in float64.
    """
    q = rotation.double()
    g = gradient.double().to(q.device)
    a = g @ q.mT - q @ g.mT
    eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
    before = float(objective(q))
    slope = 0.5 * float((a * a).sum())  # -dF(Y(tau))/dtau at tau = 0
    info = {"objective_before": before, "objective_after": before, "step": 0.0}
    if slope <= 1e-30:
        return rotation, info
    tau = initial_step / math.sqrt(2 * slope) if normalize_step else initial_step
    for _ in range(max_tries):
        y = torch.linalg.solve(eye + 0.5 * tau * a, (eye - 0.5 * tau * a) @ q)
        after = float(objective(y))
        if after <= before - rho * tau * slope:
            info.update(objective_after=after, step=tau)
            return y.to(rotation.dtype), info
        tau *= shrink
    return rotation, info


class ConceptWhitening(nn.Module):
    """Concept whitening layer (Chen, Bei & Rudin, Nature Machine Intelligence 2020) for ``[B, C, H, W]`` inputs.

    Args:
        num_features: ``C``, the number of channels (as ``BatchNorm2d``'s ``num_features``).
        num_concepts: ``k <= C``: axes ``0 .. k-1`` are aligned with concepts ``0 .. k-1``.
        whitening: ``"zca"`` (eigendecomposition) or ``"newton"`` (IterNorm's Newton-Schulz iterations).
        newton_iterations: the iterations of ``"newton"``.
        eps: added to the covariance's diagonal before whitening, > 0.
        momentum: running-statistics update ``running = (1 - momentum) * running + momentum * batch``.
        pool: how an axis activation map becomes one number per image for alignment: ``"mean"`` or ``"max"``.
        rotation_step: the size ``||tau A||_F`` of the first rotation tried by the line search of every update
            (the step is normalised by the gradient's size; backtracking then halves it until the concept loss
            decreases enough).
        sync_stats: all-reduce the batch statistics and the concept gradients across DDP ranks.

    Buffers: ``running_mean [C]``, ``running_whitening [C, C]``, ``rotation [C, C]`` (``Q``, identity at first)
    and ``num_rotation_updates``. The output has the input's dtype. There are no affine parameters (a per-channel
    scale could flip or mix the meaning of the concept axes).
    """

    def __init__(
        self,
        num_features: int,
        num_concepts: int,
        whitening: str = "zca",
        newton_iterations: int = 10,
        eps: float = 1e-5,
        momentum: float = 0.1,
        pool: str = "mean",
        rotation_step: float = 0.5,
        sync_stats: bool = True,
    ) -> None:
        super().__init__()
        owner = "ConceptWhitening"
        check_int("num_features", num_features, minimum=1, owner=owner)
        check_int("num_concepts", num_concepts, minimum=1, owner=owner)
        if num_concepts > num_features:
            raise ValueError(
                f"num_concepts={num_concepts} concept axes do not fit in a layer of num_features={num_features} "
                "channels: use at most as many concepts as channels"
            )
        check_choice("whitening", whitening, WHITENINGS, owner=owner)
        check_choice("pool", pool, POOLINGS, owner=owner)
        check_int("newton_iterations", newton_iterations, minimum=1, owner=owner)
        self.num_features = num_features
        self.num_concepts = num_concepts
        self.whitening = whitening
        self.newton_iterations = newton_iterations
        self.eps = check_float("eps", eps, minimum=0, strict=True, owner=owner)
        # momentum in (0, 1]: 1 keeps only the latest batch's statistics
        check_float("momentum", momentum, minimum=0, strict=True, owner=owner)
        self.momentum = check_float("momentum", momentum, maximum=1, owner=owner)
        self.pool = pool
        self.rotation_step = check_float("rotation_step", rotation_step, minimum=0, strict=True, owner=owner)
        self.sync_stats = bool(sync_stats)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_whitening", torch.eye(num_features))
        self.register_buffer("rotation", torch.eye(num_features))
        self.register_buffer("num_rotation_updates", torch.tensor(0, dtype=torch.long))
        # Concept gradient accumulators: plain attributes, not buffers, so that DDP's buffer broadcast never
        # overwrites a rank's own sums with rank 0's.
        self._concept_sum: Tensor | None = None
        self._concept_count: Tensor | None = None
        self._collecting: int | None = None
        self._stop_forward = False

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_concepts={self.num_concepts}, whitening={self.whitening!r}, eps={self.eps}, "
            f"momentum={self.momentum}, pool={self.pool!r}"
        )

    # ------------------------------------------------------------------------------------------- whitening
    def _sync(self) -> bool:
        return self.sync_stats and _distributed_world() > 1

    def _inverse_sqrt(self, sigma: Tensor) -> Tensor:
        if self.whitening == "zca":
            return zca_inverse_sqrt(sigma)
        return newton_inverse_sqrt(sigma, self.newton_iterations)

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean [C], covariance [C, C])`` of the pixels of ``x [B, C, H, W]`` (``1/m`` normalisation, no eps),
        over all DDP ranks when synchronised; differentiable."""
        flat = x.transpose(0, 1).reshape(self.num_features, -1)  # [C, m]
        total = flat.sum(dim=1)
        count = torch.tensor(float(flat.shape[1]), dtype=flat.dtype, device=flat.device)
        sync = self._sync()
        if sync:
            total = _differentiable_all_reduce(total)
            count = sum_over_ranks(count)
        mean = total / count
        centred = flat - mean[:, None]
        scatter = centred @ centred.mT  # two passes (mean first): no cancellation in E[zz^T] - mu mu^T
        if sync:
            scatter = _differentiable_all_reduce(scatter)
        return mean, scatter / count

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ConceptWhitening expects [B, {self.num_features}, H, W] inputs, got shape {tuple(x.shape)}"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = x.to(self._compute_dtype(x))
            if self._collecting is not None:
                self._accumulate(z)
                if self._stop_forward:
                    raise StopForward
            if self.training and self._collecting is None:
                mean, covariance = self.batch_statistics(z)
                eye = torch.eye(self.num_features, dtype=z.dtype, device=z.device)
                whitening = self._inverse_sqrt(covariance + self.eps * eye)
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean), self.momentum)
                    self.running_whitening.lerp_(whitening.detach().to(self.running_whitening), self.momentum)
            else:
                mean, whitening = self.running_mean.to(z), self.running_whitening.to(z)
            transform = self.rotation.to(z).mT @ whitening  # Q^T W
            y = torch.einsum("oc,bchw->bohw", transform, z - mean.view(1, -1, 1, 1))
        return y.to(x.dtype)

    @torch.no_grad()
    def set_statistics(self, total: Tensor, outer: Tensor, count: Tensor | float) -> None:
        """Set the running statistics to the population's: ``mean = total / count`` and the whitening matrix of
        ``covariance = outer / count - mean mean^T`` (``total [C]`` = sum of the pixels, ``outer [C, C]`` = sum
        of their outer products, accumulated in float64). Used by the recalibration pass."""
        count = float(count)
        if count <= 0:
            raise ValueError("ConceptWhitening.set_statistics: no pixels were accumulated (count = 0)")
        mean = total.double() / count
        covariance = outer.double() / count - torch.outer(mean, mean)
        covariance = (covariance + covariance.mT) / 2
        if not (torch.isfinite(mean).all() and torch.isfinite(covariance).all()):
            raise ValueError("ConceptWhitening.set_statistics: the accumulated statistics are not finite (NaN/inf)")
        eye = torch.eye(self.num_features, dtype=torch.float64, device=covariance.device)
        whitening = self._inverse_sqrt(covariance + self.eps * eye)
        self.running_mean.copy_(mean.to(self.running_mean))
        self.running_whitening.copy_(whitening.to(self.running_whitening))

    def whitened(self, x: Tensor) -> Tensor:
        """``W (x - mu)`` with the running statistics (before the rotation), ``[B, C, H, W]``."""
        z = x.to(self._compute_dtype(x))
        centred = z - self.running_mean.to(z).view(1, -1, 1, 1)
        return torch.einsum("oc,bchw->bohw", self.running_whitening.to(z), centred)

    # ------------------------------------------------------------------------------------ concept alignment
    @contextlib.contextmanager
    def accumulate_concept(self, concept: int, stop_forward: bool = True) -> Iterator[None]:
        """While open, every forward call adds the pooled-activation gradient of ``concept``'s axis to the sums.

        Uses the running statistics (never the batch's, never updating them), whatever the mode. With
        ``stop_forward`` the forward pass of the enclosing model stops right after this layer (the exception that
        does it is swallowed when the context closes), saving the rest of the network's computation.
        """
        if isinstance(concept, bool) or not isinstance(concept, int) or not 0 <= concept < self.num_concepts:
            raise ValueError(f"concept must be an axis index in [0, {self.num_concepts}), got {concept!r}")
        if self._collecting is not None:
            raise RuntimeError("accumulate_concept contexts cannot be nested")
        self._collecting, self._stop_forward = concept, stop_forward
        try:
            yield
        except StopForward:
            pass
        finally:
            self._collecting, self._stop_forward = None, False

    @torch.no_grad()
    def _accumulate(self, z: Tensor) -> None:
        j = self._collecting
        assert j is not None
        white = self.whitened(z).flatten(2)  # [B, C, HW]
        if self.pool == "mean":
            direction = white.mean(dim=2)  # d mean_s(q_j^T x_s) / d q_j
        else:
            q = self.rotation[:, j].to(white)
            best = torch.einsum("c,bcs->bs", q, white).argmax(dim=1)  # [B]
            direction = white[torch.arange(white.shape[0], device=white.device), :, best]  # x at the argmax
        if self._concept_sum is None or self._concept_sum.device != z.device:
            self._concept_sum = torch.zeros(self.num_features, self.num_concepts, dtype=torch.float64, device=z.device)
            self._concept_count = torch.zeros(self.num_concepts, dtype=torch.float64, device=z.device)
        self._concept_sum[:, j] += direction.double().sum(dim=0)
        self._concept_count[j] += direction.shape[0]

    def concept_directions(self) -> tuple[Tensor, Tensor]:
        """``(sums [C, k], counts [k])`` of the accumulated concept gradients (all-reduced over DDP ranks)."""
        device = self.rotation.device
        if self._concept_sum is None:
            sums = torch.zeros(self.num_features, self.num_concepts, dtype=torch.float64, device=device)
            counts = torch.zeros(self.num_concepts, dtype=torch.float64, device=device)
        else:
            sums, counts = self._concept_sum.clone(), self._concept_count.clone()
        if self._sync():
            sums, counts = sum_over_ranks(sums), sum_over_ranks(counts)
        return sums, counts

    def reset_concepts(self) -> None:
        """Drop the accumulated concept gradients."""
        self._concept_sum = self._concept_count = None

    @torch.no_grad()
    def update_rotation(self) -> dict[str, float]:
        """One Cayley step on ``Q`` towards the accumulated concept directions, then reset the sums.

        All ranks must call it together under DDP (the sums are all-reduced, so all ranks take the same step).
        Concepts without accumulated examples do not pull on their axis. Returns the line-search info of
        :func:`cayley_step` (``objective`` = the concept loss ``-sum_j q_j^T g_j``) plus ``alignment`` = the mean
        over concepts of ``q_j^T g_j`` after the step.
        """
        sums, counts = self.concept_directions()
        self.reset_concepts()
        target = torch.zeros(self.num_features, self.num_features, dtype=torch.float64, device=sums.device)
        seen = counts > 0
        target[:, : self.num_concepts] = torch.where(seen, sums / counts.clamp_min(1), torch.zeros_like(sums))

        def objective(q: Tensor) -> float:
            return -float((q * target).sum())

        rotation, info = cayley_step(
            self.rotation, -target, objective, initial_step=self.rotation_step, normalize_step=True
        )
        if orthogonality_error(rotation) > 1e-6:  # rounding drift: project back onto the orthogonal group
            u, _, vh = torch.linalg.svd(rotation.double())
            rotation = (u @ vh).to(rotation.dtype)
        self.rotation.copy_(rotation)
        self.num_rotation_updates += 1
        info["alignment"] = -info["objective_after"] / max(1, int(seen.sum()))
        return info


def replace_batchnorm(model: nn.Module, layer: str, num_concepts: int, **kwargs: Any) -> ConceptWhitening:
    """Replace the ``BatchNorm2d`` called ``layer`` in ``model`` by a :class:`ConceptWhitening` layer, in place.

    ``kwargs`` go to :class:`ConceptWhitening`. The running mean starts at the BatchNorm's and the running
    whitening matrix at ``diag(1 / sqrt(running_var + eps))`` (what the BatchNorm did in eval mode, without its
    affine parameters, which a CW layer does not have: a pretrained network needs fine-tuning). Raises
    ``ValueError`` when the layer does not exist (naming close matches) or is not a ``BatchNorm2d``.
    Returns the new layer.
    """
    name, module = resolve_layer(model, layer)
    if not isinstance(module, nn.BatchNorm2d):
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}, not a BatchNorm2d: concept whitening replaces a "
            "BatchNorm2d layer"
        )
    cw = ConceptWhitening(module.num_features, num_concepts, **kwargs)
    if module.track_running_stats and module.running_mean is not None:
        with torch.no_grad():
            cw.running_mean.copy_(module.running_mean)
            cw.running_whitening.copy_(torch.diag((module.running_var + module.eps).rsqrt()))
    device = next(iter(module.buffers()), cw.rotation).device
    cw.to(device)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, cw)
    return cw
