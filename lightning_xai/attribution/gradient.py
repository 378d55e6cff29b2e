"""The gradient family: Saliency, Input x Gradient, Integrated Gradients and SmoothGrad.

All four explain the score ``s(x)`` selected by ``target`` (see :func:`~lightning_xai.attribution.base.
select_scores`) through its gradient ``d s / d x`` with respect to the input, and return signed raw values with
the **same shape as the input**: ``[B, C, H, W]`` for images (one value per channel, reduce channels in the
renderer), ``[B, F]`` for tabular data. Gradients are taken with :func:`torch.autograd.grad` on a copy of the
input, so parameter ``.grad`` is never touched (see the contract in :mod:`lightning_xai.attribution.base`).

The multi-evaluation methods (Integrated Gradients over ``steps`` points of a path, SmoothGrad over ``num_samples``
noisy copies) stack their evaluations into chunks of at most ``batch_size`` model inputs, so memory is bounded
by ``batch_size`` whatever the batch, the number of steps or the number of samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lightning_xai.attribution.arguments import renamed
from lightning_xai.attribution.base import (
    Attributor,
    Target,
    build_attributor,
    chunk_slices,
    input_gradient,
    select_scores,
)
from lightning_xai.attribution.filters import gaussian_blur
from lightning_xai.checks import check_choice, check_float, check_int, check_optional_int

__all__ = ["InputXGradient", "IntegratedGradients", "Saliency", "SmoothGrad"]

# ---------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------


def _score_gradient(model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
    """``d s(x) / d x`` for a leaf ``inputs`` that requires grad.

    The model receives a clone of the leaf, so a forward that normalises its input in place
    (``x.sub_(mean)``) works, and the gradient still arrives at the leaf.
    """
    scores = select_scores(model(inputs.clone()), target)
    return input_gradient(scores, inputs)


def _chunk_target(target: Target, index: Tensor | slice) -> Target:
    """The target for a chunk of rows taken from the batch at ``index``: a ``LongTensor[B]`` is indexed, an
    int, a 0-d tensor or a callable applies to every row as it is."""
    if isinstance(target, Tensor) and target.ndim == 1:
        return target[index]
    return target


def _scores_in_chunks(model: nn.Module, inputs: Tensor, target: Target, batch_size: int) -> Tensor:
    """The explained score ``s(x)`` of every sample, ``Tensor[B]``, in forward passes of at most ``batch_size``."""
    with torch.no_grad():
        return torch.cat(
            [
                select_scores(model(inputs[sl]), _chunk_target(target, sl))
                for sl in chunk_slices(len(inputs), batch_size)
            ]
        )


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """Reshape ``values[N]`` to ``[N, 1, ..., 1]`` so that it broadcasts over samples of rank ``ndim``."""
    return values.view(-1, *([1] * (ndim - 1)))


# ---------------------------------------------------------------------------------------------------------------
# single-gradient methods
# ---------------------------------------------------------------------------------------------------------------


class Saliency(Attributor):
    """Gradient of the target score with respect to the input.

    ``mode`` chooses how the gradient ``g = d s(x) / d x`` is reported:

    * ``"abs"`` (default): ``|g|``, the saliency map of Simonyan, Vedaldi and Zisserman, "Deep Inside
      Convolutional Networks: Visualising Image Classification Models and Saliency Maps", ICLR Workshop 2014.
      The paper also takes the maximum over colour channels; here the channels are kept (input shape) and the
      channel reduction is left to the renderer.
    * ``"squared"``: ``g ** 2``, the relevance of sensitivity analysis (the squared local gradient, as
      formulated e.g. by Montavon, Samek and Müller, "Methods for Interpreting and Understanding Deep Neural
      Networks", Digital Signal Processing 2018); sums to the squared gradient norm.
    * ``"signed"``: ``g`` itself, the explanation vector of Baehrens et al., "How to Explain Individual
      Classification Decisions", JMLR 2010: positive where increasing the feature increases the score.

    Returns a tensor of the input's shape; non-negative unless ``mode="signed"``.
    """

    name = "saliency"
    MODES: tuple[str, ...] = ("abs", "squared", "signed")

    def __init__(self, mode: str = "abs") -> None:
        self.mode = check_choice("mode", mode, self.MODES, owner=type(self).__name__)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        grad = _score_gradient(model, inputs, target)
        if self.mode == "abs":
            return grad.abs()
        if self.mode == "squared":
            return grad.square()
        return grad


class InputXGradient(Attributor):
    """Input times gradient, ``x * d s(x) / d x`` (signed, input shape).

    Shrikumar, Greenside, Shcherbina and Kundaje, "Not Just a Black Box: Learning Important Features Through
    Propagating Activation Differences", arXiv:1605.01713, 2016. The first-order Taylor contribution of each
    feature relative to an all-zero input; for a linear model ``s(x) = w.x + b`` it is exactly ``w * x``, which
    sums to ``s(x) - s(0)``.
    """

    name = "input_x_gradient"

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        return inputs.detach() * _score_gradient(model, inputs, target)


# ---------------------------------------------------------------------------------------------------------------
# Integrated Gradients
# ---------------------------------------------------------------------------------------------------------------


class IntegratedGradients(Attributor):
    """Integrated Gradients: the gradient averaged along the straight path from a baseline ``x'`` to ``x``,
    times ``x - x'``.

    Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017::

        IG_i(x) = (x_i - x'_i) * integral_0^1  d s(x' + a (x - x')) / d x_i  da

    The result is signed, has the input's shape and, up to the quadrature error, satisfies *completeness*:
    ``sum_i IG_i(x) = s(x) - s(x')``; :meth:`attribute_with_gap` returns the remaining gap per sample.

    Args:
        baseline: the reference input ``x'``: ``"zeros"`` (default), a number (constant fill), a tensor
            broadcastable to the input batch (``[C, H, W]`` for one reference, ``[B, C, H, W]`` for one per
            sample), or ``"blur"``: each image Gaussian-blurred with ``blur_sigma`` (images ``[B, C, H, W]``
            only), the blurred baseline discussed by Sturmfels, Lundberg and Lee, "Visualizing the Impact of
            Feature Attribution Baselines", Distill 2020.
        steps: number of points on the path (gradient evaluations per sample), ``>= 1``.
        method: the quadrature rule on ``[0, 1]``: ``"riemann_trapezoid"`` (default; ``steps`` equally spaced
            points including both ends, end points weighted 1/2, error ``O(1/steps**2)``; with ``steps=1`` the
            midpoint rule) or ``"gauss_legendre"`` (``steps`` Gauss-Legendre nodes, exact for integrands that are
            polynomials in ``a`` of degree ``< 2 * steps``; usually reaches a given gap with far fewer steps).
        batch_size: the most model inputs per forward pass; the ``B * steps`` path points are evaluated in
            chunks of at most this many and their weighted gradients accumulated.
        blur_sigma: standard deviation in pixels of the ``"blur"`` baseline (ignored otherwise).
    """

    name = "integrated_gradients"
    METHODS: tuple[str, ...] = ("riemann_trapezoid", "gauss_legendre")
    BASELINES: tuple[str, ...] = ("zeros", "blur")

    def __init__(
        self,
        baseline: str | float | Tensor = "zeros",
        steps: int = 32,
        method: str = "riemann_trapezoid",
        batch_size: int = 64,
        blur_sigma: float = 5.0,
    ) -> None:
        owner = type(self).__name__
        if isinstance(baseline, str):
            check_choice("baseline", baseline, self.BASELINES, owner=owner)
        elif isinstance(baseline, Tensor):
            if not baseline.is_floating_point():
                raise TypeError(f"{owner}: a baseline tensor must be floating point, got dtype {baseline.dtype}")
            baseline = baseline.detach()
        else:
            try:
                baseline = check_float("baseline", baseline, owner=owner)
            except ValueError:
                raise ValueError(
                    f"{owner}: unknown baseline {baseline!r}; valid values: {list(self.BASELINES)}, a finite number "
                    "or a tensor broadcastable to the input"
                ) from None
        self.baseline = baseline
        self.steps = check_int("steps", steps, minimum=1, owner=owner)
        self.method = check_choice("method", method, self.METHODS, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.blur_sigma = check_float("blur_sigma", blur_sigma, minimum=0.0, strict=True, owner=owner)

    def quadrature(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """The path points ``a_k`` in ``[0, 1]`` and their weights ``w_k`` (summing to 1), ``steps`` of each,
        so that ``integral_0^1 f(a) da ~ sum_k w_k f(a_k)``."""
        n = self.steps
        if self.method == "gauss_legendre":
            nodes, weights = np.polynomial.legendre.leggauss(n)  # on [-1, 1]
            alphas, weights = torch.from_numpy((nodes + 1.0) / 2.0), torch.from_numpy(weights / 2.0)
        elif n == 1:
            alphas, weights = torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
        else:
            alphas = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
            weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
            weights[0] = weights[-1] = 0.5 / (n - 1)
        return alphas.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype)

    def make_baseline(self, inputs: Tensor) -> Tensor:
        """The baseline ``x'`` for a batch, with the batch's shape, dtype and device (no gradient)."""
        x = inputs.detach()
        if isinstance(self.baseline, Tensor):
            try:
                shape = torch.broadcast_shapes(self.baseline.shape, x.shape)
            except RuntimeError:
                shape = None
            if shape != x.shape:
                raise ValueError(
                    f"baseline tensor of shape {list(self.baseline.shape)} does not broadcast to the input shape "
                    f"{list(x.shape)}; give one reference {list(x.shape[1:])} or one per sample {list(x.shape)}"
                )
            return self.baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
        if self.baseline == "zeros":
            return torch.zeros_like(x)
        if self.baseline == "blur":
            if x.ndim != 4:
                raise ValueError(
                    f"the 'blur' baseline needs image batches [B, C, H, W], got shape {list(x.shape)}; "
                    "use 'zeros', a number or a tensor baseline"
                )
            with torch.no_grad():
                return gaussian_blur(x, self.blur_sigma)
        return torch.full_like(x, self.baseline)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        return self._integrate(model, inputs, target, with_gap=False)[0]

    def attribute_with_gap(self, model: nn.Module, inputs: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        """Attributions and the completeness gap ``gap[b] = sum(attr[b]) - (s(x_b) - s(x'_b))``, ``Tensor[B]``.

        Called like the attributor itself, with the same checks and the same no-side-effect context. The gap
        measures the quadrature error (a correct IG has gap -> 0 as ``steps`` grows); the end points cost
        ``2 B`` more forward passes (no backward), in chunks of ``batch_size``.
        """
        attributions, gap = self.run_in_context(
            model, inputs, target, lambda m, x, t: self._integrate(m, x, t, with_gap=True)
        )
        assert gap is not None
        return attributions.detach(), gap.detach()

    def _integrate(
        self, model: nn.Module, inputs: Tensor, target: Target, *, with_gap: bool
    ) -> tuple[Tensor, Tensor | None]:
        x = inputs.detach()
        x0 = self.make_baseline(x)
        delta = x - x0
        alphas, weights = self.quadrature(x.dtype, x.device)
        if isinstance(target, Tensor) and target.ndim == 1:
            target = target.to(x.device)
        batch, n = x.shape[0], alphas.numel()
        integral = torch.zeros_like(x)
        # row r of the (steps x batch) grid is path point k = r // batch of sample b = r % batch
        for sl in chunk_slices(batch * n, self.batch_size):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            k, b = rows // batch, rows % batch
            a = _per_sample(alphas[k], x.ndim)
            points = (x0[b] + a * delta[b]).requires_grad_(True)
            grad = _score_gradient(model, points, _chunk_target(target, b))
            integral.index_add_(0, b, grad * _per_sample(weights[k], x.ndim))
        attributions = delta * integral
        if not with_gap:
            return attributions, None
        scores = _scores_in_chunks(model, x, target, self.batch_size)
        reference = _scores_in_chunks(model, x0, target, self.batch_size)
        gap = attributions.flatten(1).sum(1) - (scores - reference)
        return attributions, gap


# ---------------------------------------------------------------------------------------------------------------
# SmoothGrad
# ---------------------------------------------------------------------------------------------------------------


@renamed(samples="num_samples")
class SmoothGrad(Attributor):
    """Average of a gradient attribution over noisy copies of the input.

    Smilkov, Thorat, Kim, Viégas and Wattenberg, "SmoothGrad: removing noise by adding noise", ICML Workshop on
    Visualization for Deep Learning 2017 (arXiv:1706.03825)::

        SG(x) = 1/n sum_{j=1..n} M(x + e_j),    e_j ~ N(0, sigma_b^2),  sigma_b = noise * (max(x_b) - min(x_b))

    The paper averages the raw gradient, so the default ``base`` is ``Saliency(mode="signed")`` (signed result);
    take the magnitude in the renderer, or pass ``Saliency()`` for the average of ``|g|``. With
    ``squared=True`` the squared base attributions are averaged: SmoothGrad-Squared of Hooker, Erhan,
    Kindermans and Kim, "A Benchmark for Interpretability Methods in Deep Neural Networks", NeurIPS 2019
    (non-negative).

    Args:
        base: the attributor applied to each noisy copy: an :class:`Attributor`, a registered name or a dict
            for :func:`~lightning_xai.attribution.base.build_attributor`; ``None`` for ``Saliency("signed")``.
        num_samples: number of noisy copies ``n`` per input, ``>= 1`` (formerly ``samples``, a deprecated
            alias).
        noise: the noise standard deviation as a fraction of each sample's value range ``max - min`` (over all
            its features); the paper recommends 0.1 - 0.2. ``0`` gives the base attribution itself.
        squared: average the squared base attributions (SmoothGrad-Squared).
        seed: seed of the private :class:`torch.Generator` that draws the noise, re-seeded on every call, so
            a call is reproducible and the global RNG is untouched; ``None`` for fresh non-deterministic noise.
            The draws do not depend on ``batch_size``; they may differ between devices.
        batch_size: the most noisy copies passed to the base's ``attribute`` in one call (one forward pass for
            single-gradient bases; a multi-step base such as IG chunks its own evaluations by its own
            ``batch_size``).

    Returns the base attribution's shape (the input's shape for the gradient family).
    """

    name = "smoothgrad"

    def __init__(
        self,
        base: Attributor | str | dict | None = None,
        num_samples: int = 16,
        noise: float = 0.15,
        squared: bool = False,
        seed: int | None = 0,
        batch_size: int = 64,
    ) -> None:
        self.base = Saliency(mode="signed") if base is None else build_attributor(base)
        owner = type(self).__name__
        self.num_samples = check_int("num_samples", num_samples, minimum=1, owner=owner)
        self.noise = check_float("noise", noise, minimum=0.0, owner=owner)
        if not isinstance(squared, bool):  # a TypeError, as before the shared checks
            raise TypeError(f"{owner}: squared must be a bool (True or False), got {squared!r}")
        self.squared = squared
        self.seed = check_optional_int("seed", seed, minimum=0, owner=owner, none_means="fresh noise")
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.requires_image = self.base.requires_image

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, total = x.shape[0], x.shape[0] * self.num_samples
        flat = x.flatten(1)
        sigma = _per_sample(self.noise * (flat.amax(1) - flat.amin(1)), x.ndim)
        if isinstance(target, Tensor) and target.ndim == 1:
            target = target.to(x.device)
        generator = self._generator(x.device)
        # row r of the (samples x batch) grid is noisy copy j = r // batch of sample b = r % batch; the noise is
        # drawn one [B, ...] block per copy, in order, so it does not depend on how the rows are chunked
        blocks: dict[int, Tensor] = {}
        next_block = 0
        result: Tensor | None = None
        for sl in chunk_slices(total, self.batch_size):
            first, last = sl.start // batch, (sl.stop - 1) // batch
            for j in [j for j in blocks if j < first]:
                del blocks[j]
            while next_block <= last:
                blocks[next_block] = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                next_block += 1
            eps = torch.cat([blocks[j] for j in range(first, last + 1)])[
                sl.start - first * batch : sl.stop - first * batch
            ]
            b = torch.arange(sl.start, sl.stop, device=x.device) % batch
            noisy = (x[b] + sigma[b] * eps).requires_grad_(True)
            attributions = self.base.attribute(model, noisy, _chunk_target(target, b)).detach()
            if self.squared:
                attributions = attributions.square()
            if result is None:
                result = attributions.new_zeros((batch, *attributions.shape[1:]))
            result.index_add_(0, b, attributions)
        assert result is not None
        return result / self.num_samples
