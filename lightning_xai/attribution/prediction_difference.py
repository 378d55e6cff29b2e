"""Prediction difference analysis: the weight of evidence of each patch, against plausible replacements."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.arguments import renamed
from lightning_xai.attribution.base import (
    Attributor,
    Target,
    chunk_slices,
    model_logits,
    select_scores,
    validate_target,
)
from lightning_xai.attribution.perturbing import (
    all_scores,
    average_over_windows,
    check_fits,
    check_pair,
    check_seed,
    check_stride,
    generator,
    windows,
)
from lightning_xai.checks import check_choice, check_int

__all__ = ["PredictionDifference"]


def _log_odds_parts(output: Tensor, target: Target) -> Tensor:
    """``[n, 2]``: ``(log p, log (1 - p))`` of the explained class, computed stably from the logits.

    Int / LongTensor targets: ``p`` = softmax probability of the class (needs at least 2 outputs). Callable
    targets: the callable's value ``v`` is read as the logit of a binary decision, ``p = sigmoid(v)`` (so
    ``lambda y: y[:, a] - y[:, b]`` gives ``p(a | a or b)``).
    """
    if callable(target):
        v = select_scores(output, target)
        return torch.stack([F.logsigmoid(v), F.logsigmoid(-v)], 1)
    output = model_logits(output)
    if not isinstance(output, Tensor) or output.ndim != 2:
        select_scores(output, target)  # raises the standard error
    if output.shape[1] < 2:
        raise ValueError(
            "PredictionDifference needs class probabilities: a model output [B, K] with K >= 2 classes for an "
            f"int / LongTensor target (got {list(output.shape)}); for a single logit pass target=lambda y: y[:, 0]"
        )
    validate_target(target, output.shape[0], output.shape[1])
    index = target.to(output.device).long().view(-1, 1) if isinstance(target, Tensor) and target.ndim == 1 else None
    if index is None:
        index = torch.full((output.shape[0], 1), int(target), device=output.device, dtype=torch.long)
    lse = output.logsumexp(1)
    log_p = output.gather(1, index)[:, 0] - lse
    log_q = output.scatter(1, index, float("-inf")).logsumexp(1) - lse
    return torch.stack([log_p, log_q], 1)


@renamed(n_samples="num_samples")
class PredictionDifference(Attributor):
    """Prediction difference analysis (Zintgraf, Cohen, Adel & Welling, "Visualizing Deep Neural Network
    Decisions: Prediction Difference Analysis", ICLR 2017).

    For every ``window`` patch (all channels; sliding with ``stride``) the patch is replaced by ``num_samples``
    plausible values and the class probability without the patch is ``p(c | x without patch) = mean_s p(c |
    x_s)``. The relevance is the weight of evidence, in bits,

        ``WE = log2 odds(c | x) - log2 odds(c | x without patch)``,  ``odds(p) = p / (1 - p)``,

    positive where the patch is evidence for ``c``; each pixel gets the mean over the patches covering it.
    Probabilities: int / LongTensor targets use the softmax probability of the class; a callable target's value
    ``v`` is read as a binary logit, ``p = sigmoid(v)``. Log-odds are computed from the logits in a numerically
    stable way (no clamping; the paper's Laplace correction is not needed).

    Samplers draw the replacement patches from ``reference`` images, a float tensor ``[N, C, H, W]`` of the
    inputs' shape - e.g. a few hundred training or probe images, which is what the paper fits its model on:

    * ``"conditional"`` (default, the paper's best): a multivariate Gaussian over a ``(window + 2 padding)``
      square (all channels, ``D = C (kh + 2 padding) (kw + 2 padding)`` dimensions) is fitted to the patches of
      the reference images (mean and covariance, position-independent, a small ridge ``1e-5 * mean variance``
      added), and the patch is sampled from its Gaussian conditional given the surrounding ``padding``-pixel
      frame of the explained image (at borders, given the part of the frame inside the image). **It needs
      ``reference``**: at least :meth:`minimum_reference` images, enough for ``D + 1`` patch positions (a
      full-rank covariance). With ``reference=None`` it raises a ``ValueError`` naming that minimum: fitted on
      the explained image alone, the Gaussian has fewer patches than dimensions and its conditional reproduces
      the removed patch, so the evidence would silently shrink by orders of magnitude.
    * ``"marginal"``: the patch is copied from the same location of a reference image drawn uniformly at
      random (the empirical marginal of the patch). With ``reference=None`` the donors are the **other**
      images of the batch (never the explained image itself), so it needs ``B >= 2``.

    Memory is bounded by ``batch_size``: the replacement patches (and the conditional's random draws) are made
    per chunk of ``batch_size`` evaluations, window by window in a fixed order, so results do not depend on
    ``batch_size``. The conditional Gaussian's covariance is ``D x D`` float64 and is fitted on at most ~20000
    reference patches.

    Args:
        window, stride: the patch size and step (``stride=None``: half the window).
        sampling: ``"conditional"`` or ``"marginal"``.
        padding: frame width of the conditional sampler.
        num_samples: replacement samples per patch (formerly ``n_samples``, a deprecated alias).
        reference: reference images ``[N, C, H, W]`` (see above), or ``None``.
        batch_size: maximal number of inputs per forward pass.
        seed: seed of the private generator (``None``: non-deterministic).

    Cost: ``B * (1 + windows * num_samples)`` model evaluations (the paper uses stride 1 and 10 samples).
    """

    name = "prediction_difference"
    requires_image = True

    def __init__(
        self,
        window: int | tuple[int, int] = 4,
        stride: int | tuple[int, int] | None = None,
        sampling: str = "conditional",
        padding: int = 2,
        num_samples: int = 10,
        reference: Tensor | None = None,
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        owner = type(self).__name__
        self.window = check_pair("window", window, owner=owner)
        self.stride = check_stride(stride, self.window, owner=owner)
        self.sampling = check_choice("sampling", sampling, ("marginal", "conditional"), owner=owner)
        self.padding = check_int("padding", padding, minimum=0, owner=owner)
        self.num_samples = check_int("num_samples", num_samples, minimum=1, owner=owner)
        if reference is not None:
            if not isinstance(reference, Tensor) or not reference.is_floating_point() or reference.ndim != 4:
                raise ValueError(
                    f"{owner}: reference must be None or a floating-point image tensor [N, C, H, W], got "
                    f"{type(reference).__name__ if not isinstance(reference, Tensor) else list(reference.shape)}"
                )
            if reference.shape[0] < 1:
                raise ValueError(f"{owner}: reference must hold at least one image")
            reference = reference.detach()
        self.reference = reference
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.seed = check_seed(seed, owner=owner)

    def _outer(self) -> tuple[int, int]:
        return self.window[0] + 2 * self.padding, self.window[1] + 2 * self.padding

    def minimum_reference(self, image_shape: tuple[int, int, int] | torch.Size) -> int:
        """The fewest reference images the conditional sampler accepts for images ``[C, H, W]``: enough for
        ``D + 1`` patch positions, ``D = C (kh + 2 padding) (kw + 2 padding)``. 1 for the marginal sampler."""
        if self.sampling == "marginal":
            return 1
        c, h, w = (int(v) for v in image_shape)
        oh, ow = self._outer()
        positions = max(1, (h - oh + 1) * (w - ow + 1))
        return max(1, math.ceil((c * oh * ow + 1) / positions))

    def _reference(self, x: Tensor) -> Tensor | None:
        """The reference images on the inputs' device, or ``None`` (marginal: the other images of the batch)."""
        owner = type(self).__name__
        if self.reference is None:
            if self.sampling == "conditional":
                needed = self.minimum_reference(x.shape[1:])
                raise ValueError(
                    f"{owner}(sampling='conditional') needs reference images to fit the patch distribution: pass "
                    f"reference=<Tensor [N, {', '.join(str(int(v)) for v in x.shape[1:])}]> with N >= {needed} "
                    f"images (e.g. from the training or probe set; {needed} is the minimum for a full-rank "
                    f"{x.shape[1]}x{self._outer()[0]}x{self._outer()[1]} patch covariance, a few hundred is "
                    "better). Fitted on the explained image itself, the conditional would reproduce the removed "
                    "patch and the evidence would vanish. Or use sampling='marginal'."
                )
            if x.shape[0] < 2:
                raise ValueError(
                    f"{owner}(sampling='marginal') with reference=None samples patches from the other "
                    "images of the batch and needs a batch of >= 2 images; pass reference=<images [N, C, H, W]>"
                )
            return None
        ref = self.reference.to(device=x.device, dtype=x.dtype)
        if ref.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"{owner}: reference images have shape {list(ref.shape[1:])} but the inputs have {list(x.shape[1:])}"
            )
        needed = self.minimum_reference(x.shape[1:])
        if ref.shape[0] < needed:
            raise ValueError(
                f"{owner}(sampling='conditional'): reference holds {ref.shape[0]} images, fewer than the {needed} "
                f"needed for a full-rank {x.shape[1]}x{self._outer()[0]}x{self._outer()[1]} patch covariance; "
                "pass more reference images"
            )
        return ref

    def _gaussian(self, ref: Tensor, outer: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Mean ``[D]`` and covariance ``[D, D]`` (float64) of ``outer`` patches of the reference images."""
        h, w = ref.shape[2:]
        positions = (h - outer[0] + 1) * (w - outer[1] + 1)
        step = max(1, math.ceil(math.sqrt(positions * ref.shape[0] / 20000)))  # at most ~20k patches
        dim = ref.shape[1] * outer[0] * outer[1]
        count, total, outer_sum = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)
        for part in chunk_slices(ref.shape[0], max(1, 4096 // max(1, positions // (step * step)))):
            patches = F.unfold(ref[part].double(), outer, stride=step).transpose(1, 2).reshape(-1, dim).cpu()
            count += patches.shape[0]
            total += patches.sum(0)
            outer_sum += patches.T @ patches
        mean = total / count
        cov = (outer_sum - count * torch.outer(mean, mean)) / max(1, count - 1)
        ridge = 1e-5 * float(cov.diagonal().mean()) + 1e-12
        return mean, cov + ridge * torch.eye(dim, dtype=torch.float64)

    def _conditional_sampler(
        self, image: Tensor, corners: Tensor, gauss: tuple[Tensor, Tensor], g: torch.Generator
    ) -> Callable[[int], Tensor]:
        """``sample(k) -> [num_samples, C, kh, kw]``: draws for window ``k`` from the Gaussian conditional given
        its frame in ``image [C, H, W]``. Called for k = 0, 1, 2, ... in order (the draws depend on the order)."""
        mean, cov = gauss
        c, h, w = image.shape
        kh, kw = self.window
        pad = self.padding
        oh, ow = kh + 2 * pad, kw + 2 * pad
        stencil = torch.arange(c * oh * ow).view(c, oh, ow)
        inner = stencil[:, pad : pad + kh, pad : pad + kw].reshape(-1)
        d_in = inner.numel()
        cache: dict[tuple[int, int, int, int], tuple[Tensor, Tensor, Tensor]] = {}
        img = image.double().cpu()

        def sample(k: int) -> Tensor:
            r, col = corners[k].tolist()
            top, left = r - pad, col - pad
            i0, i1 = max(0, -top), min(oh, h - top)
            j0, j1 = max(0, -left), min(ow, w - left)
            key = (i0, i1, j0, j1)
            if key not in cache:
                frame = torch.zeros(c, oh, ow, dtype=torch.bool)
                frame[:, i0:i1, j0:j1] = True
                frame[:, pad : pad + kh, pad : pad + kw] = False
                observed = stencil[frame]
                s_oo = cov[observed][:, observed]
                s_io = cov[inner][:, observed]
                gain = torch.linalg.solve(s_oo, s_io.T).T if observed.numel() else s_io[:, :0]
                s_cond = cov[inner][:, inner] - gain @ s_io.T
                s_cond = 0.5 * (s_cond + s_cond.T)
                jitter = 1e-10 * float(s_cond.diagonal().abs().mean()) + 1e-12
                chol = torch.linalg.cholesky(s_cond + jitter * torch.eye(d_in, dtype=torch.float64))
                cache[key] = (observed, gain, chol)
            observed, gain, chol = cache[key]
            window_vals = torch.zeros(c, oh, ow, dtype=torch.float64)
            window_vals[:, i0:i1, j0:j1] = img[:, top + i0 : top + i1, left + j0 : left + j1]
            x_obs = window_vals.reshape(-1)[observed]
            mu = mean[inner] + gain @ (x_obs - mean[observed])
            eps = torch.randn(self.num_samples, d_in, generator=g, dtype=torch.float64)
            draws = mu + eps @ chol.T
            return draws.view(self.num_samples, c, kh, kw).to(device=image.device, dtype=image.dtype)

        return sample

    def _marginal_sampler(
        self, image_index: int, x: Tensor, ref: Tensor | None, corners: Tensor, g: torch.Generator
    ) -> Callable[[int], Tensor]:
        """``sample(k) -> [num_samples, C, kh, kw]``: window ``k`` copied from random donor images (the reference
        images, or the other images of the batch - never the explained image itself)."""
        kh, kw = self.window
        if ref is None:  # donors: the other images of the batch
            draws = torch.randint(0, x.shape[0] - 1, (corners.shape[0], self.num_samples), generator=g)
            donors_all = draws + (draws >= image_index).long()
            pool = x
        else:
            donors_all = torch.randint(0, ref.shape[0], (corners.shape[0], self.num_samples), generator=g)
            pool = ref

        def sample(k: int) -> Tensor:
            r, c = corners[k].tolist()
            return pool[donors_all[k].to(pool.device), :, r : r + kh, c : c + kw]

        return sample

    def _patcher(
        self, image: Tensor, corners: Tensor, sample: Callable[[int], Tensor]
    ) -> Callable[[slice], tuple[Tensor, None]]:
        """``make_batch`` for evaluation ``k * num_samples + s``: ``image`` with window ``k`` set to sample ``s``.
        The samples of a window are made when the first of its evaluations is built and kept only while the
        chunk needs them, so at most ``batch_size / num_samples + 2`` windows of samples are held at a time."""
        kh, kw = self.window
        n_s = self.num_samples
        held: dict[int, Tensor] = {}
        next_window = [0]

        def make_batch(part: slice) -> tuple[Tensor, None]:
            first, last = part.start // n_s, (part.stop - 1) // n_s
            for k in [k for k in held if k < first]:
                del held[k]
            while next_window[0] <= last:  # windows are drawn in order, whatever the chunk size
                held[next_window[0]] = sample(next_window[0])
                next_window[0] += 1
            images = image.expand(part.stop - part.start, -1, -1, -1).clone()
            for i, flat in enumerate(range(part.start, part.stop)):
                k, s = divmod(flat, n_s)
                r, c = corners[k].tolist()
                images[i, :, r : r + kh, c : c + kw] = held[k][s]
            return images, None

        return make_batch

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        x = inputs.detach()
        batch, _, height, width = x.shape
        check_fits("PredictionDifference", "window", self.window, height, width)
        outer = self._outer()
        if self.sampling == "conditional":
            check_fits("PredictionDifference", "window + 2 * padding", outer, height, width)
        ref = self._reference(x)
        corners = windows(height, width, self.window, self.stride)
        n_win, n_s = corners.shape[0], self.num_samples
        g = generator(self.seed)
        gauss = self._gaussian(ref, outer) if self.sampling == "conditional" else None
        evidence = torch.empty(batch, n_win, dtype=torch.float64)
        with torch.no_grad():
            images = torch.arange(batch, device=x.device)
            base = all_scores(model, batch, lambda p: (x[p], None), images, target, self.batch_size, _log_odds_parts)
            base_log_odds = base[:, 0] - base[:, 1]
            for b in range(batch):
                if gauss is not None:
                    sample = self._conditional_sampler(x[b], corners, gauss, g)
                else:
                    sample = self._marginal_sampler(b, x, ref, corners, g)
                owners = torch.full((n_win * n_s,), b, dtype=torch.long, device=x.device)
                make_batch = self._patcher(x[b], corners, sample)
                parts = all_scores(model, n_win * n_s, make_batch, owners, target, self.batch_size, _log_odds_parts)
                parts = parts.view(n_win, n_s, 2).logsumexp(1)  # log sum_s p_s, log sum_s (1 - p_s)
                evidence[b] = (base_log_odds[b] - (parts[:, 0] - parts[:, 1])).cpu()
        relevance = average_over_windows(evidence / math.log(2.0), corners, self.window, height, width)
        return relevance.to(device=x.device, dtype=x.dtype)
