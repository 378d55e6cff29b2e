"""Meaningful perturbation: the smallest, smoothest region whose blurring destroys the class score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.base import Attributor, Target, chunk_slices, model_logits, select_scores
from lightning_xai.attribution.filters import gaussian_blur
from lightning_xai.attribution.perturbing import check_fits, check_pair, check_seed, expand_target, generator
from lightning_xai.checks import check_float, check_int

__all__ = ["MeaningfulPerturbation"]


def _class_probability(output: Tensor, target: Target) -> Tensor:
    """Softmax probability of the target class; a callable target's value is used as it is."""
    if callable(target):
        return select_scores(output, target)
    output = model_logits(output)
    if not isinstance(output, Tensor) or output.ndim != 2:
        return select_scores(output, target)  # raises the standard, helpful error
    return select_scores(output.softmax(dim=1), target)


class MeaningfulPerturbation(Attributor):
    """Meaningful perturbation (Fong & Vedaldi, "Interpretable Explanations of Black Boxes by Meaningful
    Perturbation", ICCV 2017): the smallest, smoothest region whose blurring destroys the class score.

    A low-resolution deletion mask ``m`` (``mask_size``, upsampled bilinearly to the image) blends the input
    with its Gaussian blur, ``x' = (1 - m) * x + m * blur(x)``, and is optimised with Adam (``iterations``,
    ``lr``) to minimise

        ``score(x') + l1_coeff * mean(m) + tv_coeff * mean(|grad m|^tv_beta)``,

    clamping ``m`` to ``[0, 1]`` after each step (the paper's projected gradient). ``score`` is the softmax
    probability of the target class for int / LongTensor targets (as in the paper) and the callable's value for
    callable targets. Optionally the input is randomly translated by up to ``jitter`` pixels at every step (the
    paper's remedy against adversarial masks; shifts drawn from the seeded generator). Returns the upsampled
    deletion mask in ``[0, 1]`` (``1`` = evidence: blurring it removes the class), ``Tensor[B, 1, H, W]``.

    Gradients are taken with :func:`torch.autograd.grad` with respect to the mask only; samples are optimised
    in chunks of ``batch_size`` (independently: per-sample losses and element-wise Adam).

    Cost: ``B * iterations`` forward and backward passes.
    """

    name = "meaningful_perturbation"
    requires_image = True

    def __init__(
        self,
        mask_size: int | tuple[int, int] = 8,
        iterations: int = 300,
        lr: float = 0.1,
        l1_coeff: float = 0.2,
        tv_coeff: float = 0.2,
        tv_beta: float = 3.0,
        blur_sigma: float = 5.0,
        jitter: int = 0,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        owner = type(self).__name__
        self.mask_size = check_pair("mask_size", mask_size, owner=owner)
        self.iterations = check_int("iterations", iterations, minimum=1, owner=owner)
        self.lr = check_float("lr", lr, minimum=0.0, strict=True, owner=owner)
        self.l1_coeff = check_float("l1_coeff", l1_coeff, minimum=0.0, owner=owner)
        self.tv_coeff = check_float("tv_coeff", tv_coeff, minimum=0.0, owner=owner)
        self.tv_beta = check_float("tv_beta", tv_beta, minimum=1.0, owner=owner)
        self.blur_sigma = check_float("blur_sigma", blur_sigma, minimum=0.0, owner=owner)
        self.jitter = check_int("jitter", jitter, minimum=0, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.seed = check_seed(seed, owner=owner)

    def _total_variation(self, mask: Tensor) -> Tensor:
        dh = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().pow(self.tv_beta).flatten(1)
        dw = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().pow(self.tv_beta).flatten(1)
        parts = [d.mean(1) for d in (dh, dw) if d.shape[1] > 0]
        return sum(parts) if parts else mask.new_zeros(mask.shape[0])

    @staticmethod
    def _shift(images: Tensor, shifts: Tensor) -> Tensor:
        """Translate each image by ``shifts[i] = (dy, dx)`` pixels, replicating the border."""
        n, c, h, w = images.shape
        rows = (torch.arange(h, device=images.device) - shifts[:, :1]).clamp(0, h - 1)
        cols = (torch.arange(w, device=images.device) - shifts[:, 1:]).clamp(0, w - 1)
        out = images.gather(2, rows[:, None, :, None].expand(n, c, h, w))
        return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        check_fits("MeaningfulPerturbation", "mask_size", self.mask_size, height, width)
        blurred = gaussian_blur(x, self.blur_sigma)
        shifts = None
        if self.jitter > 0:
            g = generator(self.seed)
            shifts = torch.randint(0, self.jitter + 1, (self.iterations, batch, 2), generator=g).to(x.device)
        result = x.new_zeros(batch, 1, height, width)
        for part in chunk_slices(batch, self.batch_size):
            xs, bs = x[part], blurred[part]
            t = expand_target(target, torch.arange(batch, device=x.device)[part])
            mask = torch.full((xs.shape[0], 1, *self.mask_size), 0.5, dtype=x.dtype, device=x.device)
            mask.requires_grad_(True)
            optimiser = torch.optim.Adam([mask], lr=self.lr)
            for step in range(self.iterations):
                up = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
                xi, bi = (
                    (xs, bs)
                    if shifts is None
                    else (self._shift(xs, shifts[step, part]), self._shift(bs, shifts[step, part]))
                )
                score = _class_probability(model(xi * (1 - up) + bi * up), t)
                loss = (
                    score + self.l1_coeff * mask.abs().flatten(1).mean(1) + self.tv_coeff * self._total_variation(mask)
                ).sum()
                (grad,) = torch.autograd.grad(loss, mask)
                mask.grad = grad
                optimiser.step()
                mask.grad = None
                with torch.no_grad():
                    mask.clamp_(0.0, 1.0)
            with torch.no_grad():
                result[part] = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        return result
