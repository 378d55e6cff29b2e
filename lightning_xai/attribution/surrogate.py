"""LIME and KernelSHAP: local surrogate models over image segments."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_xai.attribution.arguments import renamed
from lightning_xai.attribution.base import (
    Attributor,
    Target,
    model_state_guard,
    unwrap_compiled,
    validate_image_batch,
    validate_target,
)
from lightning_xai.attribution.perturbing import (
    all_scores,
    baseline_images,
    check_baseline,
    check_seed,
    generator,
)
from lightning_xai.attribution.regression import lasso_selection, weighted_ridge
from lightning_xai.attribution.segmentation import Segmentation
from lightning_xai.checks import check_choice, check_float, check_int

__all__ = ["LIME", "KernelSHAP", "SegmentExplanation"]


class SegmentExplanation(NamedTuple):
    """Per-segment result of :class:`LIME` / :class:`KernelSHAP`.

    ``values[b]`` holds one value per segment of image ``b`` (``Tensor[M_b]``, float64), ``segments`` the label
    map ``LongTensor[B, H, W]``, ``intercept[b]`` the surrogate's intercept (KernelSHAP: ``f(baseline)``) and
    ``score[b]`` the explained score ``f(x)``.
    """

    values: list[Tensor]
    segments: Tensor
    intercept: Tensor
    score: Tensor

    def heatmap(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Paint every segment with its value: ``Tensor[B, 1, H, W]``."""
        maps = [v.to(self.segments.device)[seg] for v, seg in zip(self.values, self.segments)]
        return torch.stack(maps)[:, None].to(dtype)


class _Design(NamedTuple):
    coalitions: Tensor  # bool [n, M]: which segments are present in each evaluated input
    weights: Tensor  # float64 [n]


class _SegmentSurrogate(Attributor):
    """Shared plumbing of LIME and KernelSHAP: segments, coalition inputs, chunked evaluation, painting."""

    requires_image = True

    def __init__(
        self,
        num_samples: int,
        segmentation: str,
        grid: int | tuple[int, int],
        n_segments: int,
        compactness: float,
        baseline: float | str,
        blur_sigma: float,
        batch_size: int,
        seed: int | None,
    ) -> None:
        owner = type(self).__name__
        self.num_samples = check_int("num_samples", num_samples, minimum=2, owner=owner)
        self.segmentation = segmentation
        self._segmenter = Segmentation(segmentation, grid=grid, n_segments=n_segments, compactness=compactness)
        self.grid = self._segmenter.grid
        self.n_segments = n_segments
        self.compactness = compactness
        self.baseline = check_baseline(baseline, owner=owner)
        self.blur_sigma = check_float("blur_sigma", blur_sigma, minimum=0.0, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.seed = check_seed(seed, owner=owner)

    def _design(self, n_features: int, generator: torch.Generator) -> _Design:
        raise NotImplementedError

    def _fit(self, design: _Design, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``(values [M], intercept)`` from the coalitions and their scores (float64)."""
        raise NotImplementedError

    def explain_segments(self, model: nn.Module, inputs: Tensor, target: Target) -> SegmentExplanation:
        """The per-segment values with the segments, in the same no-side-effect context as ``__call__``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}")
        validate_image_batch(inputs, type(self).__name__)
        if not callable(target):
            validate_target(target, inputs.shape[0], None)
        model = unwrap_compiled(model)
        with model_state_guard(model), torch.no_grad():
            return self._explain(model, inputs.detach(), target)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        with torch.no_grad():
            return self._explain(model, inputs.detach(), target).heatmap(inputs.dtype)

    def _explain(self, model: nn.Module, x: Tensor, target: Target) -> SegmentExplanation:
        segments, counts = self._segmenter(x)
        fill = baseline_images(x, self.baseline, self.blur_sigma)
        g = generator(self.seed)
        designs = [self._design(m, g) for m in counts]
        sizes = [d.coalitions.shape[0] for d in designs]
        owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(x.device)
        rows = torch.cat([torch.arange(n) for n in sizes])
        present = [d.coalitions.to(x.device) for d in designs]

        def make_batch(part: slice) -> tuple[Tensor, None]:
            own = owners[part]
            keep = torch.stack(
                [present[b][r][segments[b]] for b, r in zip(own.tolist(), rows[part].tolist())]
            )  # [n, H, W]
            return torch.where(keep[:, None], x[own], fill[own]), None

        scores = all_scores(model, len(owners), make_batch, owners, target, self.batch_size)
        values, intercepts, full = [], [], []
        for design, part in zip(designs, torch.split(scores, sizes)):
            v, c = self._fit(design, part.cpu())
            values.append(v.to(x.device))
            intercepts.append(c)
            full.append(part[0])  # the first coalition of every design keeps every segment: it is x itself
        return SegmentExplanation(values, segments, torch.stack(intercepts).to(x.device), torch.stack(full))


def _random_subsets(sizes: Tensor, n_features: int, generator: torch.Generator) -> Tensor:
    """Bool ``[n, M]``: row ``i`` has ``sizes[i]`` present features chosen uniformly at random."""
    ranks = torch.rand(sizes.shape[0], n_features, generator=generator).argsort(1).argsort(1)
    return ranks < sizes[:, None]


@renamed(n_samples="num_samples", fill="baseline")
class LIME(_SegmentSurrogate):
    """LIME: Local Interpretable Model-agnostic Explanations (Ribeiro, Singh & Guestrin, KDD 2016), over segments.

    Interpretable features are segments (``segmentation="grid"``, default, or ``"slic"`` superpixels - see
    :mod:`lightning_xai.attribution.segmentation`). Each sample ``z`` in ``{0,1}^M`` keeps the present segments
    and replaces the absent ones by ``baseline`` (``"mean"``: the per-image, per-channel mean, default; a number;
    ``"blur"``). Sampling follows the paper: the number of present segments is uniform in ``1..M``, the segments
    uniform given that number; the first sample is the unperturbed image. Samples are weighted with the
    exponential kernel ``pi(z) = exp(-d(z)^2 / kernel_width^2)`` on the cosine distance ``d(z) = 1 - |z| /
    sqrt(|z| M)`` to the all-present vector, and the local linear surrogate ``g(z) = b + w.z`` is fitted by

    * ``solver="ridge"`` (default): weighted ridge regression, closed form (``alpha`` = L2 penalty, intercept
      unpenalised; ``alpha=0`` is weighted least squares);
    * ``solver="k_lasso"``: the paper's K-Lasso - the weighted lasso path is followed exactly (LARS with the
      lasso modification, as the authors' ``lime`` package does with scikit-learn's ``lars_path``; here
      :func:`~lightning_xai.attribution.regression.lars_lasso_path`, no scikit-learn needed), the last active
      set on the path with ``n_features`` segments is kept (exactly ``n_features`` whenever the path reaches
      that many) and refitted by weighted ridge; the other segments get weight 0.

    The heatmap paints each segment with its weight (signed, in score units per segment). Use
    :meth:`explain_segments` for the weights, intercept and segments themselves.

    Arguments renamed to the library's vocabulary (old names still work, with a ``DeprecationWarning``):
    ``num_samples`` (formerly ``n_samples``), ``baseline`` (formerly ``fill``).

    Cost: ``B * num_samples`` model evaluations (the first sample is the unperturbed image itself), in chunks of
    ``batch_size``.
    """

    name = "lime"

    def __init__(
        self,
        num_samples: int = 256,
        segmentation: str = "grid",
        grid: int | tuple[int, int] = 4,
        n_segments: int = 50,
        compactness: float = 10.0,
        baseline: float | str = "mean",
        blur_sigma: float = 5.0,
        kernel_width: float = 0.25,
        solver: str = "ridge",
        alpha: float = 1.0,
        n_features: int = 5,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        super().__init__(
            num_samples, segmentation, grid, n_segments, compactness, baseline, blur_sigma, batch_size, seed
        )
        owner = type(self).__name__
        self.kernel_width = check_float("kernel_width", kernel_width, minimum=0.0, strict=True, owner=owner)
        self.solver = check_choice("solver", solver, ("ridge", "k_lasso"), owner=owner)
        self.alpha = check_float("alpha", alpha, minimum=0.0, owner=owner)
        self.n_features = check_int("n_features", n_features, minimum=1, owner=owner)

    def _design(self, n_features: int, generator: torch.Generator) -> _Design:
        sizes = torch.randint(1, n_features + 1, (self.num_samples - 1,), generator=generator)
        coalitions = torch.cat(
            [torch.ones(1, n_features, dtype=torch.bool), _random_subsets(sizes, n_features, generator)]
        )
        present = coalitions.sum(1).double()
        distance = 1.0 - torch.sqrt(present / n_features)
        return _Design(coalitions, torch.exp(-(distance**2) / self.kernel_width**2))

    def _fit(self, design: _Design, scores: Tensor) -> tuple[Tensor, Tensor]:
        z = design.coalitions.double()
        if self.solver == "ridge":
            return weighted_ridge(z, scores, design.weights, self.alpha)
        chosen = lasso_selection(z, scores, design.weights, self.n_features)
        values = torch.zeros(z.shape[1], dtype=torch.float64)
        if not chosen:
            return values, (design.weights / design.weights.sum()) @ scores
        beta, intercept = weighted_ridge(z[:, chosen], scores, design.weights, self.alpha)
        values[chosen] = beta
        return values, intercept


@renamed(n_samples="num_samples", fill="baseline")
class KernelSHAP(_SegmentSurrogate):
    """KernelSHAP (Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017) over
    segments: Shapley values of the game ``v(S) = f(x with the segments outside S replaced by baseline)``.

    Coalitions ``z`` (``0 < |z| < M``) are weighted with the Shapley kernel ``pi(z) = (M - 1) / (C(M, |z|) |z|
    (M - |z|))``; the empty and full coalitions are enforced exactly as constraints (``phi_0 = f(baseline)`` and
    efficiency ``sum_j phi_j = f(x) - f(baseline)``), and the remaining weighted least-squares problem is solved
    in the orthonormal coordinates of the constraint's null space (minimum-norm when under-determined, so
    symmetric segments get equal values).

    * When ``2^M <= num_samples`` every coalition is evaluated: the result is then the exact Shapley values.
    * Otherwise ``num_samples - 2`` coalitions are sampled from the kernel itself (size ``s`` with probability
      proportional to ``(M - 1) / (s (M - s))``, then a uniform subset), in complementary pairs, and weighted
      equally; plus the empty and full coalitions. For an additive model the result is still exact.

    ``baseline`` (formerly ``fill``) is what absent segments become (``"mean"``, default; a number;
    ``"blur"``); ``num_samples`` was ``n_samples`` (the old names still work, with a ``DeprecationWarning``).
    The heatmap paints each segment
    with its Shapley value; :meth:`explain_segments` returns the values (``intercept`` = ``f(baseline)``).

    Cost: ``B * min(num_samples, 2^M)`` model evaluations (the full and empty coalitions included), in chunks
    of ``batch_size``.
    """

    name = "kernel_shap"

    def __init__(
        self,
        num_samples: int = 256,
        segmentation: str = "grid",
        grid: int | tuple[int, int] = 4,
        n_segments: int = 50,
        compactness: float = 10.0,
        baseline: float | str = "mean",
        blur_sigma: float = 5.0,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        super().__init__(
            num_samples, segmentation, grid, n_segments, compactness, baseline, blur_sigma, batch_size, seed
        )

    def _design(self, n_features: int, generator: torch.Generator) -> _Design:
        m = n_features
        full = torch.ones(1, m, dtype=torch.bool)
        empty = torch.zeros(1, m, dtype=torch.bool)
        if m < 63 and 2**m <= self.num_samples:  # exact: every coalition
            codes = torch.arange(1, 2**m - 1)
            others = ((codes[:, None] >> torch.arange(m)) & 1).bool()
            sizes = others.sum(1)
            weights = torch.tensor(
                [(m - 1) / (math.comb(m, s) * s * (m - s)) for s in sizes.tolist()], dtype=torch.float64
            )
        else:
            count = self.num_samples - 2
            if m > 1 and count > 0:
                s = torch.arange(1, m, dtype=torch.float64)
                size_probs = (m - 1) / (s * (m - s))
                n_pairs = (count + 1) // 2
                sizes = torch.multinomial(size_probs, n_pairs, replacement=True, generator=generator) + 1
                first = _random_subsets(sizes, m, generator)
                others = torch.stack([first, ~first], 1).view(-1, m)[:count]
            else:
                others = torch.zeros(0, m, dtype=torch.bool)
            weights = torch.ones(others.shape[0], dtype=torch.float64)
        coalitions = torch.cat([full, empty, others])
        return _Design(coalitions, torch.cat([torch.zeros(2, dtype=torch.float64), weights]))

    def _fit(self, design: _Design, scores: Tensor) -> tuple[Tensor, Tensor]:
        m = design.coalitions.shape[1]
        f_full, f_empty = scores[0], scores[1]
        gain = f_full - f_empty
        if m == 1:
            return gain.view(1), f_empty
        z = design.coalitions[2:].double()
        w = design.weights[2:]
        even = torch.full((m,), 1.0 / m, dtype=torch.float64) * gain
        if z.shape[0] == 0:
            return even, f_empty
        # phi = even + basis @ gamma satisfies sum(phi) = gain for any gamma (basis spans {v : sum v = 0}).
        basis = torch.linalg.qr(torch.eye(m, dtype=torch.float64) - 1.0 / m).Q[:, : m - 1]
        sw = w.sqrt()[:, None]
        residual = scores[2:] - f_empty - z @ even
        gamma = torch.linalg.lstsq(sw * (z @ basis), (sw[:, 0] * residual)[:, None], driver="gelsd").solution[:, 0]
        return even + basis @ gamma, f_empty
