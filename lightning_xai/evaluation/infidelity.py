"""Infidelity and max-sensitivity (Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and
Sensitivity of Explanations", NeurIPS 2019): Monte-Carlo estimates over seeded random perturbations. See
:mod:`lightning_xai.evaluation.faithfulness` for the conventions.

The perturbations of a sample are seeded by ``(seed, sample identity, draw)``: pass ``sample_ids`` (the
samples' dataset indices) to ``update`` and the metric is the same in one process and under DDP, whatever the
sharding; without them the identity is the sample's position in the process's stream mixed with the rank.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import Target, chunk_slices, model_state_guard
from lightning_xai.checks import check_int
from lightning_xai.evaluation.base import PerSampleMeanMetric, check_image_batch, heatmap_batch, renamed_argument
from lightning_xai.evaluation.scoring import (
    AttributorSpec,
    check_model,
    heat_for,
    positive_float,
    prepare_target,
    resolve_attributor,
    sample_keys_for,
    score_pairs,
    seeded_noise,
    settings_of,
)

__all__ = ["Infidelity", "MaxSensitivity", "infidelity", "max_sensitivity"]


def _num_samples(owner: str, num_samples: int, samples: int | None) -> int:
    """``num_samples`` checked (>= 1), or the value of its deprecated alias ``samples`` (with a warning)."""
    num_samples = renamed_argument(owner, "samples", "num_samples", samples, num_samples)
    return check_int("num_samples", num_samples, minimum=1, owner=owner)


def infidelity(
    attributions: Tensor,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    *,
    noise_std: float = 0.1,
    num_samples: int = 32,
    scale: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    softmax: bool = False,
    sample_ids: Tensor | None = None,
    sample_offset: int = 0,
    samples: int | None = None,
) -> Tensor:
    """Infidelity (Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and Sensitivity of
    Explanations", NeurIPS 2019), Monte-Carlo estimate per sample, ``Tensor[B]``; lower is better::

        INFD = E_I[(I . phi - (f(x) - f(x - I)))^2]

    ``phi`` is the channel-summed relevance per pixel, so the perturbation ``I`` is per pixel too: Gaussian
    ``N(0, noise_std^2)``, the same value subtracted from every channel of the pixel (``I . phi`` is then the
    first-order prediction of the score change). ``num_samples`` perturbations per image, seeded by ``(seed,
    sample_ids[i], draw)`` for image ``i`` (``sample_offset + i`` without ``sample_ids``). With ``scale=True``
    (default) the attribution is first multiplied by the optimal ``beta = E[(I . phi) d] / E[(I . phi)^2]``
    (Yeh et al., Sec. 3), which makes the value invariant to the scale of ``phi``: it equals
    ``E[d^2] - E[(I . phi) d]^2 / E[(I . phi)^2]``.
    ``softmax`` defaults to False: gradient-type attributions explain the logit.
    """
    noise_std = positive_float("noise_std", noise_std, owner="infidelity")
    samples = _num_samples("infidelity", num_samples, samples)
    check_int("batch_size", batch_size, minimum=1, owner="infidelity")
    heat = heat_for(attributions, inputs).double()
    b, _, h, w = inputs.shape
    target = prepare_target(target, b, inputs.device)
    x = inputs.detach()
    points = samples + 1
    dot = torch.zeros(b * points, device=x.device, dtype=torch.float64)
    keys = sample_keys_for(b, sample_ids, sample_offset)

    def build(sl: slice, images: Tensor, pts: Tensor) -> Tensor:
        noise = seeded_noise(
            sl, (h, w), seed=seed, points=points, keys=keys, device=x.device, dtype=x.dtype, kind="normal"
        )
        noise = noise * noise_std
        noise = noise * (pts > 0).view(-1, 1, 1).to(noise.dtype)  # point 0 is the unperturbed input
        dot[sl] = (noise.double() * heat[images]).flatten(1).sum(dim=1)
        return x[images] - noise.unsqueeze(1)

    scores = score_pairs(model, build, b, points, target, batch_size=batch_size, softmax=softmax, device=x.device)
    diff = (scores[:, :1] - scores[:, 1:]).double()  # f(x) - f(x - I)
    a = dot.view(b, points)[:, 1:]
    if scale:
        aa, ad, dd = (a * a).mean(dim=1), (a * diff).mean(dim=1), (diff * diff).mean(dim=1)
        value = torch.where(aa > 0, dd - ad**2 / torch.where(aa > 0, aa, torch.ones_like(aa)), dd).clamp_min(0)
    else:
        value = ((a - diff) ** 2).mean(dim=1)
    return value.float()


def max_sensitivity(
    attributions: Tensor | None,
    inputs: Tensor,
    model: nn.Module,
    target: Target,
    attributor: AttributorSpec,
    *,
    radius: float = 0.02,
    num_samples: int = 10,
    normalize: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    sample_ids: Tensor | None = None,
    sample_offset: int = 0,
    samples: int | None = None,
) -> Tensor:
    """Max-sensitivity (Yeh et al., NeurIPS 2019), Monte-Carlo estimate per sample, ``Tensor[B]``; lower is
    better::

        SENS = max_{d} ||phi(x + d) - phi(x)||_2 / ||phi(x)||_2

    over ``num_samples`` perturbations ``d`` drawn uniformly from the L-infinity ball of ``radius`` (seeded by
    ``(seed, sample_ids[i], draw)`` for image ``i``, ``sample_offset + i`` without ``sample_ids``); ``phi`` is
    the channel-summed map of ``attributor``.
    ``attributions`` is ``phi(x)`` if already computed, else ``None`` (computed here). ``normalize=False``
    drops the division by ``||phi(x)||``; with it, samples whose ``phi(x)`` is all zero give ``NaN`` (excluded
    by the metric). The attributor is called on chunks of at most ``batch_size`` perturbed images.
    """
    explain = resolve_attributor(attributor)
    radius = positive_float("radius", radius, owner="max_sensitivity")
    samples = _num_samples("max_sensitivity", num_samples, samples)
    check_int("batch_size", batch_size, minimum=1, owner="max_sensitivity")
    check_image_batch(inputs)
    check_model(model)
    x = inputs.detach()
    b = x.shape[0]
    target = prepare_target(target, b, x.device)
    diffs = torch.empty(b * samples, device=x.device, dtype=torch.float64)
    keys = sample_keys_for(b, sample_ids, sample_offset)
    with model_state_guard(model):  # eval mode for any callable; every mode / grad flag restored afterwards
        if attributions is None:
            attributions = explain(model, x, target)
        reference = heat_for(attributions, x).double()
        for sl in chunk_slices(b * samples, batch_size):
            images = torch.arange(sl.start, sl.stop, device=x.device) // samples
            noise = seeded_noise(
                sl,
                tuple(x.shape[1:]),
                seed=seed,
                points=samples,
                keys=keys,
                device=x.device,
                dtype=x.dtype,
                kind="uniform",
            )
            noise = noise * radius
            chunk_target = target[images] if isinstance(target, Tensor) else target
            perturbed = heatmap_batch(explain(model, x[images] + noise, chunk_target), "perturbed attributions")
            if perturbed.shape[1:] != reference.shape[1:]:
                raise ValueError(
                    f"the attributor returned maps of shape {list(perturbed.shape)} for perturbed inputs, but "
                    f"{list(reference.shape)} for the inputs"
                )
            diffs[sl] = (perturbed.double() - reference[images]).flatten(1).norm(dim=1)
    worst = diffs.view(b, samples).max(dim=1).values
    if normalize:
        norm = reference.flatten(1).norm(dim=1)
        worst = torch.where(norm > 0, worst / torch.where(norm > 0, norm, torch.ones_like(norm)), float("nan"))
    return worst.float()


class _MonteCarloMetric(PerSampleMeanMetric):
    """What :class:`Infidelity` and :class:`MaxSensitivity` share: ``num_samples`` seeded perturbations per image
    (seeded by sample identity), evaluated in chunks of ``batch_size``; **lower is better**. A subclass names its
    functional form (``estimate``) and the settings it adds (``_settings``); its ``update`` calls
    :meth:`_estimate`."""

    higher_is_better = False
    estimate: staticmethod
    _settings: tuple[str, ...] = ()

    def __init__(
        self,
        num_samples: int,
        seed: int,
        batch_size: int,
        return_per_sample: bool,
        samples: int | None,
        **kwargs: object,
    ) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        owner = type(self).__name__
        self.num_samples = _num_samples(owner, num_samples, samples)
        self.seed = int(seed)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)

    @property
    def samples(self) -> int:
        """Deprecated name of :attr:`num_samples`."""
        warnings.warn(f"{type(self).__name__}.samples is deprecated; use num_samples", DeprecationWarning, stacklevel=2)
        return self.num_samples

    def _estimate(
        self, attributions: Tensor | None, inputs: Tensor, model: nn.Module, target: Target, sample_ids: Tensor | None
    ) -> None:
        """Score a batch with the functional form, the metric's settings and the samples' identities."""
        settings = settings_of(self, ("num_samples", "seed", "batch_size", *self._settings))
        keys = self._sample_keys(inputs.shape[0], sample_ids)
        self._accumulate(type(self).estimate(attributions, inputs, model, target, **settings, sample_ids=keys))


class Infidelity(_MonteCarloMetric):
    """Mean infidelity (Yeh et al., NeurIPS 2019) under Gaussian pixel perturbations; **lower is better**.

    See :func:`infidelity`. ``update(attributions, inputs, model, target, sample_ids=None)``; pass the images'
    dataset indices as ``sample_ids`` for results independent of the sharding (see the module docstring).

    Args:
        noise_std: standard deviation of the perturbation (in input units); default 0.1.
        num_samples: perturbations per image; default 32 (``samples`` is a deprecated alias).
        scale: multiply the attribution by its optimal scale first (default True).
        seed, batch_size, return_per_sample: as for the other metrics; ``softmax`` defaults to False.
    """

    estimate = staticmethod(infidelity)
    _settings = ("noise_std", "scale", "softmax")

    def __init__(
        self,
        noise_std: float = 0.1,
        num_samples: int = 32,
        scale: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        softmax: bool = False,
        return_per_sample: bool = False,
        *,
        samples: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(num_samples, seed, batch_size, return_per_sample, samples, **kwargs)
        self.noise_std = positive_float("noise_std", noise_std, owner=type(self).__name__)
        self.scale = bool(scale)
        self.softmax = bool(softmax)

    def update(
        self,
        attributions: Tensor,
        inputs: Tensor,
        model: nn.Module,
        target: Target,
        sample_ids: Tensor | None = None,
    ) -> None:
        self._estimate(attributions, inputs, model, target, sample_ids)


class MaxSensitivity(_MonteCarloMetric):
    """Mean max-sensitivity (Yeh et al., NeurIPS 2019) of an attributor; **lower is better**.

    See :func:`max_sensitivity`. ``update(attributions_or_None, inputs, model, target, sample_ids=None)``: pass
    ``sample_ids`` as for :class:`Infidelity`, and the maps
    already computed for ``inputs`` (or ``None`` to compute them). Samples whose map is all zero are excluded
    and counted (their relative sensitivity is undefined).

    Args:
        attributor: an Attributor, a registered name / dict, or a callable ``(model, inputs, target) -> maps``.
        radius: half-width of the L-infinity ball of perturbations (input units); default 0.02.
        num_samples: perturbations per image; default 10 (``samples`` is a deprecated alias).
        normalize: divide by ``||phi(x)||`` (default True).
        seed, batch_size (perturbed images per attributor call), return_per_sample.
    """

    estimate = staticmethod(max_sensitivity)
    _settings = ("attributor", "radius", "normalize")

    def __init__(
        self,
        attributor: AttributorSpec,
        radius: float = 0.02,
        num_samples: int = 10,
        normalize: bool = True,
        seed: int = 0,
        batch_size: int = 32,
        return_per_sample: bool = False,
        *,
        samples: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(num_samples, seed, batch_size, return_per_sample, samples, **kwargs)
        self.attributor = resolve_attributor(attributor)
        self.radius = positive_float("radius", radius, owner=type(self).__name__)
        self.normalize = bool(normalize)

    def update(
        self,
        attributions: Tensor | None,
        inputs: Tensor,
        model: nn.Module,
        target: Target,
        sample_ids: Tensor | None = None,
    ) -> None:
        self._estimate(attributions, inputs, model, target, sample_ids)
