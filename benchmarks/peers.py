"""Peer comparison of the attribution benchmark: our attributors next to Captum, Zennit and pytorch-grad-cam.

    pip install -e ".[bench]"                            # captum, zennit, grad-cam
    python benchmarks/attribution.py --quick --peers     # calls run_peers() after the own table

For every pairing below, :func:`run_peers` runs our attributor and the peer's equivalent on the same model and
the same batch in the same process, and prints one row: median wall time of each (``repeats`` runs after one
warm-up, ours and peer interleaved so that both see the same machine load), ``ours/peer`` (below 1: ours is
faster), ``rel diff``, the largest absolute difference of the two maps divided by the largest absolute value of
either map (per sample, then the worst sample; both maps are first brought to the same convention, see the
notes), and ``agree`` (``rel diff <= tol``; ``no (expected)`` where the definitions are known to differ).

Peers run on a ``copy.deepcopy`` of the model, so their side effects (pytorch-grad-cam's ``model.eval()``,
``zero_grad()`` and parameter gradients, Captum's ``rule`` attributes) never reach the caller's model or our
measurements. A peer that is not installed is skipped; a peer that fails prints its error in its row and the
comparison goes on.

Pairings (ours | peer | how they are compared):

* Saliency: ``Saliency(mode="abs")`` | Captum ``Saliency``, ``abs=True`` | raw. Both ``|d logit / d x|``.
* Integrated Gradients (``riemann_trapezoid``): ``IntegratedGradients(steps=32, baseline="zeros",
  batch_size=64)`` | Captum ``IntegratedGradients(method="riemann_trapezoid", n_steps=32, baselines=0,
  internal_batch_size=64)`` | Captum times ``n / (n - 1)``. Same nodes ``linspace(0, 1, n)``, but Captum weights
  them ``1/n`` (ends halved), which sums to ``(n - 1) / n`` rather than 1 (Sundararajan et al., ICML 2017, integrate
  over ``[0, 1]``): Captum's IG is ``(n - 1) / n`` of the trapezoid rule's, 3 % low at 32 steps, and its
  completeness gap never closes below ``1/n`` of ``s(x) - s(x')``.
* Integrated Gradients (Gauss-Legendre): ``method="gauss_legendre"`` | Captum ``method="gausslegendre"`` | raw.
* SmoothGrad: ``SmoothGrad(num_samples=16, noise=0.15, batch_size=64)`` (mean signed gradient, Smilkov et al. 2017)
  | Captum ``NoiseTunnel(Saliency)``, ``nt_type="smoothgrad"``, ``abs=False``, ``stdevs = 0.15 x`` the batch's
  mean per-sample value range (Captum takes one absolute standard deviation per input tensor, ours one per
  sample: ``noise x (max - min)`` of that sample) | raw, but the noise draws differ: the rows agree when
  ``rel diff`` is within 1.5 times the Monte-Carlo spread of ours, the ``rel diff`` between our seeds 0 and 1. (On
  a linear model the gradient does not depend on the noise and the two agree exactly; see the tests.)
* Occlusion: ``Occlusion(window=16, stride=8, baseline=0)`` | Captum ``Occlusion``, ``sliding_window_shapes=(C, 16,
  16)``, ``strides=(C, 8, 8)``, ``baselines=0`` | ours broadcast over the channels. Both: mean over the windows
  covering a pixel of ``s(x) - s(x occluded)``. The window grids are equal only when ``(H - window) % stride ==
  0`` (true at 32x32 and 64x64): otherwise Captum's last window is cropped at the border, ours is aligned to it.
* Guided Backprop: ``GuidedBackprop()`` | Captum ``GuidedBackprop`` | raw (both: ``relu(g) * (x > 0)`` at every
  ``nn.ReLU``; Springenberg et al. 2015).
* Grad-CAM (pytorch-grad-cam): ``GradCAM(layer)`` | pytorch-grad-cam ``GradCAM(target_layers=[layer])`` with
  ``ClassifierOutputTarget`` per sample | ours min-max normalised per image: pytorch-grad-cam returns
  ``(cam - min) / (max - min)`` in ``[0, 1]`` only (it normalises twice with ``+ 1e-7`` in each denominator; the two
  nearly cancel). It normalises at the layer's resolution, then resizes
  with ``cv2.resize`` (bilinear, half-pixel centres like ``align_corners=False``); ours upsamples, then is
  normalised here. The two are equal when the upsampled map reaches the coarse map's extremes (always for a 2x2
  map, and without resizing); otherwise an interior extreme is slightly flattened by the upsampling.
* Grad-CAM (Captum): ``GradCAM(layer)`` | Captum ``LayerGradCam(..., relu_attributions=True)`` upsampled with
  ``LayerAttribution.interpolate(..., "bilinear")`` | raw.
* LRP epsilon: ``LRP("epsilon")`` | Zennit ``LayerMapComposite`` with ``Epsilon`` for Conv/Linear, ``Norm`` for
  average pooling and residual sums, ``Pass`` for activations, plus ``ResNetCanonizer`` on a ResNet | raw; and |
  Captum ``LRP`` (its default ``EpsilonRule(1e-9)`` everywhere; ours with ``epsilon=1e-9``) | raw, tolerance
  1e-3: Captum applies the epsilon rule at max and average pooling too, where ours back-propagates the plain
  gradient (no stabiliser); on small pooled outputs the 1e-9 shows at ~1e-4 of the map (with the pooling rules'
  epsilon set to 1e-30 both agree to 1e-15 in float64, see the tests). Relevance
  starts as the target logit for all three (Zennit is given ``one_hot * output`` as its output relevance). On
  models with BatchNorm the Zennit row has a looser tolerance (1e-2): Zennit's BatchNorm merge resets the running
  variance to 1, not ``1 - eps``, so the merged BatchNorm still divides by ``sqrt(1 + bn.eps)``; the epsilon rule,
  whose denominators are pre-activations close to 0 in a randomly initialised ResNet, amplifies this 5e-6 change
  of the forward pass to up to ~1e-2 of the map (with ``bn.eps = 0`` ours and Zennit's agree to 1e-6).
  Captum's LRP has no rule for residual sums (the gradient of ``out + identity`` hands the full relevance to
  both branches) and no BatchNorm folding: on a ResNet its relevance is wrong, which the conservation lines
  printed after the table show (a conserving epsilon-LRP of a randomly initialised torchvision ResNet, whose
  folded BatchNorms have zero biases, sums exactly to ``logit - fc.bias[target]``).
* LRP epsilon-plus: ``LRP("epsilon_plus")`` (zB with ``[0, 1]`` at the first layer, z+ for convolutions,
  epsilon for dense layers; Montavon et al. 2019, Kohlbrenner et al. 2020) | Zennit
  ``SpecialFirstLayerMapComposite`` with the same rules (``ZBox(0, 1)`` first, ``ZPlus`` for convolutions,
  ``Epsilon`` for ``nn.Linear``; stabilisers 1e-9 as ours), plus ``ResNetCanonizer`` on a ResNet | raw. Zennit's
  own ``EpsilonPlus`` composite has z+ at the first layer too, hence the explicit composite. Captum has no zB
  rule and its ``Alpha1_Beta0_Rule`` keeps the full bias in the denominator (ours and Zennit's z+: ``b+``), so it
  is not compared.

The LRP rows also run on a VGG-style network (:class:`~lightning_xai.models.backbones.VGGSmall`, no
BatchNorm, in-place ReLUs, max pooling), where all three libraries' definitions coincide.

Timings come from one shared machine: quote ratios from one run, never across runs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_xai.attribution import (
    LRP,
    GradCAM,
    GuidedBackprop,
    IntegratedGradients,
    Occlusion,
    Saliency,
    SmoothGrad,
    default_layer,
    resolve_layer,
)
from lightning_xai.attribution.base import model_state_guard

__all__ = [
    "PEERS",
    "Pairing",
    "PeerRow",
    "minmax_per_image",
    "normalised_max_difference",
    "pairings",
    "peer_versions",
    "run_peers",
]

#: The peer libraries by import name, with the PyPI distribution that provides them.
PEERS: dict[str, str] = {"captum": "captum", "zennit": "zennit", "pytorch_grad_cam": "grad-cam"}

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]

#: Random methods agree when their difference is at most this many times the spread between two of our seeds.
SPREAD_FACTOR = 1.5

# ---------------------------------------------------------------------------------------------------------------
# comparison helpers
# ---------------------------------------------------------------------------------------------------------------


def peer_versions() -> dict[str, str | None]:
    """``{import name: version}`` of each peer, ``None`` for the ones that are not installed."""
    versions: dict[str, str | None] = {}
    for module in PEERS:
        try:
            imported = importlib.import_module(module)
        except ImportError:
            versions[module] = None
            continue
        version = getattr(imported, "__version__", None)
        if version is None:
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as dist_version

            try:
                version = dist_version(PEERS[module])
            except PackageNotFoundError:
                version = "?"
        versions[module] = str(version)
    return versions


def normalised_max_difference(ours: Tensor, theirs: Tensor) -> float:
    """``max_b max|ours_b - theirs_b| / max(max|ours_b|, max|theirs_b|)``: the largest absolute difference of two
    batches of maps relative to the larger map of each sample, worst sample. 0 when both maps of a sample are 0.

    Raises ``ValueError`` when the shapes differ (bring both to one convention first).
    """
    if ours.shape != theirs.shape:
        raise ValueError(f"cannot compare maps of shapes {list(ours.shape)} and {list(theirs.shape)}")
    a = ours.detach().double().flatten(1)
    b = theirs.detach().to(a.device).double().flatten(1)
    scale = torch.maximum(a.abs().amax(1), b.abs().amax(1))
    diff = (a - b).abs().amax(1)
    ratio = torch.where(scale > 0, diff / torch.where(scale > 0, scale, torch.ones_like(scale)), diff)
    return float(ratio.max())


def minmax_per_image(maps: Tensor) -> Tensor:
    """Each sample's map affinely rescaled to ``[0, 1]`` (``(m - min) / (max - min)``; a constant map becomes 0),
    the normalisation pytorch-grad-cam applies to its output."""
    flat = maps.detach().flatten(1)
    low = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - low
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.view_as(maps)


def _one_hot(output: Tensor, target: Tensor) -> Tensor:
    return torch.zeros_like(output).scatter_(1, target.view(-1, 1).to(output.device), 1.0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the peers' per-call warnings (Captum warns on every guided-backprop call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# the peers' calls (each: (model, x, target) -> attribution tensor, on a model the caller may spoil)
# ---------------------------------------------------------------------------------------------------------------


def captum_saliency(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    from captum.attr import Saliency as CaptumSaliency

    return CaptumSaliency(model).attribute(_leaf(x), target=target, abs=True).detach()


def captum_integrated_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *, steps: int, method: str, batch_size: int
) -> Tensor:
    """Captum IG from the zero baseline; ``method`` is Captum's name (``"riemann_trapezoid"``, ``"gausslegendre"``)."""
    from captum.attr import IntegratedGradients as CaptumIG

    return (
        CaptumIG(model)
        .attribute(
            _leaf(x),
            baselines=torch.zeros_like(x),
            target=target,
            n_steps=steps,
            method=method,
            internal_batch_size=batch_size,
        )
        .detach()
    )


def captum_smoothgrad(
    model: nn.Module, x: Tensor, target: Tensor, *, samples: int, stdev: float, batch_size: int, seed: int = 0
) -> Tensor:
    """Captum's NoiseTunnel over signed Saliency; its noise comes from the global RNG, forked and seeded here."""
    from captum.attr import NoiseTunnel
    from captum.attr import Saliency as CaptumSaliency

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (
            NoiseTunnel(CaptumSaliency(model))
            .attribute(
                _leaf(x),
                nt_type="smoothgrad",
                nt_samples=samples,
                nt_samples_batch_size=max(1, batch_size // x.shape[0]),
                stdevs=stdev,
                target=target,
                abs=False,
            )
            .detach()
        )


def captum_occlusion(
    model: nn.Module, x: Tensor, target: Tensor, *, window: int, stride: int, batch_size: int
) -> Tensor:
    from captum.attr import Occlusion as CaptumOcclusion

    channels = x.shape[1]
    with torch.no_grad():
        return CaptumOcclusion(model).attribute(
            x.detach(),
            sliding_window_shapes=(channels, window, window),
            strides=(channels, stride, stride),
            baselines=0.0,
            target=target,
            perturbations_per_eval=max(1, batch_size // x.shape[0]),
        )


def captum_guided_backprop(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    from captum.attr import GuidedBackprop as CaptumGuidedBackprop

    with _quiet():
        return CaptumGuidedBackprop(model).attribute(_leaf(x), target=target).detach()


def captum_gradcam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str) -> Tensor:
    """Captum's LayerGradCam (ReLU'd) at ``layer``, bilinearly upsampled to the input like ours."""
    from captum.attr import LayerAttribution, LayerGradCam

    module = resolve_layer(model, layer)[1]
    cam = LayerGradCam(model, module).attribute(_leaf(x), target=target, relu_attributions=True).detach()
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")


def library_gradcam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str) -> Tensor:
    """pytorch-grad-cam's GradCAM at ``layer``: ``[B, 1, H, W]`` in ``[0, 1]`` (its own normalisation)."""
    from pytorch_grad_cam import GradCAM as LibraryGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = resolve_layer(model, layer)[1]
    targets = [ClassifierOutputTarget(int(c)) for c in target]
    with LibraryGradCAM(model=model, target_layers=[module]) as cam:
        maps = cam(input_tensor=x.detach().clone(), targets=targets)
    return torch.from_numpy(maps).to(dtype=x.dtype).unsqueeze(1)


def captum_lrp(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Captum's LRP with its default rules (``EpsilonRule(1e-9)`` for Conv/Linear/pooling/BatchNorm)."""
    from captum.attr import LRP as CaptumLRP

    with _quiet():
        return CaptumLRP(model).attribute(_leaf(x), target=target).detach()


def _is_resnet(model: nn.Module) -> bool:
    torchvision = importlib.import_module("torchvision")
    return isinstance(model, torchvision.models.ResNet)


def _zennit_canonizers(model: nn.Module) -> list:
    """Zennit's ResNetCanonizer for torchvision ResNets, its SequentialMergeBatchNorm for other BatchNorm models."""
    from zennit.canonizers import SequentialMergeBatchNorm

    if _is_resnet(model):
        from zennit.torchvision import ResNetCanonizer

        return [ResNetCanonizer()]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return [SequentialMergeBatchNorm()]
    return []


def zennit_composite(name: str, model: nn.Module, *, epsilon: float = 1e-6, stabilizer: float = 1e-9):
    """The Zennit composite equal to our named composite ``name`` (``"epsilon"`` or ``"epsilon_plus"``), with the
    canonizers ``model`` needs.

    Zennit's base map is rebuilt so that every stabiliser is ours: residual sums (Zennit's ``Sum``, our
    ``ResidualAdd``) get ``epsilon`` like our default epsilon rule for them, average pooling a negligible one
    (ours back-propagates its plain gradient), z+ and zB ``stabilizer`` (ours: 1e-9).
    """
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass, ZBox, ZPlus
    from zennit.types import Activation, AvgPool, BatchNorm, Convolution

    canonizers = _zennit_canonizers(model)
    base = [
        (Activation, Pass()),
        (Sum, Norm(stabilizer=epsilon)),
        (AvgPool, Norm(stabilizer=1e-12)),
        (BatchNorm, Pass()),
    ]
    if name == "epsilon":
        layer_map = [*base, (Convolution, Epsilon(epsilon=epsilon)), (nn.Linear, Epsilon(epsilon=epsilon))]
        return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    if name == "epsilon_plus":
        layer_map = [*base, (Convolution, ZPlus(stabilizer=stabilizer)), (nn.Linear, Epsilon(epsilon=epsilon))]
        first_map = [(Convolution, ZBox(low=0.0, high=1.0, stabilizer=stabilizer))]
        return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map, canonizers=canonizers)
    raise ValueError(f"no Zennit equivalent for composite {name!r}; valid: ['epsilon', 'epsilon_plus']")


def zennit_lrp(model: nn.Module, x: Tensor, target: Tensor, *, composite: str, epsilon: float = 1e-6) -> Tensor:
    """Zennit relevance of the input, starting from ``one_hot(target) * output`` (the target logit, as ours)."""
    from zennit.attribution import Gradient

    rules = zennit_composite(composite, model, epsilon=epsilon)
    with Gradient(model=model, composite=rules) as attributor:
        _, relevance = attributor(_leaf(x), lambda out: _one_hot(out, target) * out.detach())
    return relevance.detach()


# ---------------------------------------------------------------------------------------------------------------
# pairings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pairing:
    """One comparison: our method and the peer's on the model called ``model`` (``"main"`` or ``"vgg"``)."""

    method: str
    peer: str  # import name, a key of PEERS
    model: str
    ours: Method
    theirs: Method
    #: brings our map to the peer's convention (e.g. min-max normalisation), or None
    ours_view: Callable[[Tensor, Tensor], Tensor] | None = None
    #: brings the peer's map to ours (e.g. Captum's IG weights), or None
    theirs_view: Callable[[Tensor, Tensor], Tensor] | None = None
    tolerance: float = 1e-4
    #: a second run of ours (other seed): the tolerance becomes SPREAD_FACTOR x its difference to ``ours``
    spread: Method | None = None
    #: False where the definitions are known to differ (the row then reads "no (expected)")
    expected: bool = True
    note: str = ""


@dataclass
class PeerRow:
    """The measured outcome of one :class:`Pairing`."""

    method: str
    peer: str
    model: str
    ours_s: float
    peer_s: float
    difference: float
    tolerance: float
    expected: bool
    note: str
    error: str = ""

    @property
    def agree(self) -> bool:
        return not self.error and self.difference <= self.tolerance

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        if self.agree:
            return "yes" if self.expected else "yes (unexpected)"
        return "NO" if self.expected else "no (expected)"


def pairings(main: nn.Module, x: Tensor, *, layer: str | None = None, ig_steps: int = 32) -> list[Pairing]:
    """The pairings of the module docstring for the benchmark model ``main`` (a torchvision ResNet in the benchmark;
    its Grad-CAM layer is ``layer`` or :func:`~lightning_xai.attribution.default_layer`) and batch ``x``."""
    layer = layer if layer is not None else default_layer(main, x)
    residual = _is_resnet(main)
    flat = x.detach().flatten(1)
    stdev = 0.15 * float((flat.amax(1) - flat.amin(1)).mean())
    n = ig_steps
    window, stride = 16, 8
    if min(x.shape[-2:]) < window:
        window, stride = 4, 2
    rows = [
        Pairing("Saliency (abs)", "captum", "main", Saliency(mode="abs"), captum_saliency),
        Pairing(
            f"IG riemann_trapezoid ({n})",
            "captum",
            "main",
            IntegratedGradients(steps=n, method="riemann_trapezoid", batch_size=64),
            lambda m, x, t: captum_integrated_gradients(m, x, t, steps=n, method="riemann_trapezoid", batch_size=64),
            theirs_view=lambda a, _x: a * (n / (n - 1)),
            note=f"Captum's trapezoid weights sum to (n-1)/n; its map is compared after x n/(n-1) = {n / (n - 1):.4f}",
        ),
        Pairing(
            f"IG gauss_legendre ({n})",
            "captum",
            "main",
            IntegratedGradients(steps=n, method="gauss_legendre", batch_size=64),
            lambda m, x, t: captum_integrated_gradients(m, x, t, steps=n, method="gausslegendre", batch_size=64),
        ),
        Pairing(
            "SmoothGrad (16, noise .15)",
            "captum",
            "main",
            SmoothGrad(num_samples=16, noise=0.15, seed=0, batch_size=64),
            lambda m, x, t: captum_smoothgrad(m, x, t, samples=16, stdev=stdev, batch_size=64),
            spread=SmoothGrad(num_samples=16, noise=0.15, seed=1, batch_size=64),
            note=f"different noise draws: agree = within {SPREAD_FACTOR}x the spread between our seeds 0 and 1; "
            f"Captum's stdev is one number for the batch ({stdev:.4f} = 0.15 x mean range)",
        ),
        Pairing(
            f"Occlusion ({window}/{stride}, fill 0)",
            "captum",
            "main",
            Occlusion(window=window, stride=stride, baseline=0.0, batch_size=64),
            lambda m, x, t: captum_occlusion(m, x, t, window=window, stride=stride, batch_size=64),
            ours_view=lambda a, x: a.expand_as(x),
            note="ours [B,1,H,W] broadcast to Captum's [B,C,H,W]; equal window grids need (H - window) % stride == 0"
            + ("" if (x.shape[-1] - window) % stride == 0 and (x.shape[-2] - window) % stride == 0 else " (NOT here)"),
        ),
        Pairing("GuidedBackprop", "captum", "main", GuidedBackprop(), captum_guided_backprop),
        Pairing(
            f"GradCAM ({layer})",
            "pytorch_grad_cam",
            "main",
            GradCAM(layer=layer),
            lambda m, x, t: library_gradcam(m, x, t, layer=layer),
            ours_view=lambda a, _x: minmax_per_image(a),
            tolerance=1e-3,
            note="pytorch-grad-cam returns maps min-max normalised to [0, 1]: ours is compared after min-max "
            "normalisation",
        ),
        Pairing(
            f"GradCAM ({layer})",
            "captum",
            "main",
            GradCAM(layer=layer),
            lambda m, x, t: captum_gradcam(m, x, t, layer=layer),
            note="Captum LayerGradCam(relu_attributions=True) + LayerAttribution.interpolate(bilinear)",
        ),
    ]
    for model in ("main", "vgg"):
        batchnorm = model == "main" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in main.modules())
        rows += [
            Pairing(
                "LRP epsilon",
                "zennit",
                model,
                LRP("epsilon", epsilon=1e-6),
                lambda m, x, t: zennit_lrp(m, x, t, composite="epsilon", epsilon=1e-6),
                tolerance=1e-2 if batchnorm else 1e-4,
                note="Zennit Epsilon for Conv/Linear, Norm for pooling / residual sums (+ ResNetCanonizer on ResNets)"
                + (
                    "; tol 1e-2: Zennit's BatchNorm merge leaves x / sqrt(1 + bn.eps) behind, which the epsilon rule "
                    "amplifies on random weights (with bn.eps = 0 the maps agree to 1e-6)"
                    if batchnorm
                    else ""
                ),
            ),
            Pairing(
                "LRP epsilon (1e-9)",
                "captum",
                model,
                LRP("epsilon", epsilon=1e-9),
                captum_lrp,
                tolerance=1e-3,
                expected=model == "vgg" or not residual,
                note="Captum LRP: no rule for residual sums, no BatchNorm folding - see the conservation lines"
                if model == "main" and residual
                else "Captum LRP default rules: EpsilonRule(1e-9) everywhere, also at max/avg pooling, where ours "
                "passes the plain gradient (the 1e-9 on small pooled outputs: ~1e-4; without it the maps agree to "
                "1e-15 in float64), and on BatchNorm (equal to folding only while BatchNorm has no shift)",
            ),
            Pairing(
                "LRP epsilon_plus",
                "zennit",
                model,
                LRP("epsilon_plus"),
                lambda m, x, t: zennit_lrp(m, x, t, composite="epsilon_plus", epsilon=1e-6),
                tolerance=1e-3,
                note="Zennit SpecialFirstLayerMapComposite: ZBox(0, 1) first, ZPlus convs, Epsilon dense",
            ),
        ]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------


def _interleaved_times(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall times of ``repeats`` calls of each, alternating ours / peer so that both see the same load."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(1, repeats)):
        for fn, bucket in ((ours, times[0]), (theirs, times[1])):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def compare(
    pairing: Pairing, ours_model: nn.Module, peer_model: nn.Module, x: Tensor, target: Tensor, repeats: int
) -> PeerRow:
    """Run one pairing: both sides once (warm-up, and the maps compared), then ``repeats`` timed calls of each,
    interleaved; bring both maps to one convention and measure their difference."""

    def run_ours() -> Tensor:
        return pairing.ours(ours_model, x, target)

    def run_theirs() -> Tensor:
        return pairing.theirs(peer_model, x, target)

    row = PeerRow(
        pairing.method,
        pairing.peer,
        pairing.model,
        *(float("nan"),) * 3,
        pairing.tolerance,
        pairing.expected,
        pairing.note,
    )
    ours_map = run_ours()
    try:
        peer_map = run_theirs()
    except Exception as err:  # a peer's failure is reported in its row, the benchmark goes on
        message = str(err).splitlines()[0][:160] if str(err) else ""
        row.error = f"{type(err).__name__}: {message}"
        return row
    row.ours_s, row.peer_s = _interleaved_times(run_ours, run_theirs, repeats)
    a = pairing.ours_view(ours_map, x) if pairing.ours_view else ours_map
    b = pairing.theirs_view(peer_map, x) if pairing.theirs_view else peer_map
    if pairing.spread is not None:
        other = pairing.spread(ours_model, x, target)
        other = pairing.ours_view(other, x) if pairing.ours_view else other
        row.tolerance = SPREAD_FACTOR * normalised_max_difference(a, other)
    row.difference = normalised_max_difference(a, b)
    return row


def build_vgg(x: Tensor, num_classes: int, seed: int = 0) -> nn.Module:
    """The VGG-style model of the LRP rows (random weights from ``seed``; the global RNG is left as it was)."""
    from lightning_xai.models.backbones import VGGSmall

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VGGSmall(in_channels=x.shape[1], num_classes=num_classes).to(x.device).eval()


def _reference_sums(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
    """The target logits, and ``logit - bias`` of the last ``nn.Linear`` when that is the model's only bias (after
    folding BatchNorm: every BatchNorm at its initial state, running mean 0 and shift 0) - the exact sum of a
    conserving epsilon-LRP's input relevance (the epsilon rule lets the bias absorb its share)."""
    with model_state_guard(model), torch.no_grad():
        logits = model(x).gather(1, target.view(-1, 1)).squeeze(1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    other_bias = False
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            shift = (m.bias if m.bias is not None else torch.zeros(1)).detach()
            mean = m.running_mean if m.running_mean is not None else torch.zeros(1)
            other_bias |= bool(shift.abs().max() > 0) or bool(mean.abs().max() > 0)
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m is not (linears[-1] if linears else None):
            other_bias |= m.bias is not None and bool(m.bias.detach().abs().max() > 0)
    if other_bias or not linears or linears[-1].bias is None:
        return logits, None
    return logits, logits - linears[-1].bias.detach()[target]


def _print_conservation(label: str, model: nn.Module, peer_model: nn.Module, x: Tensor, target: Tensor) -> None:
    logits, exact = _reference_sums(model, x, target)
    reference = exact if exact is not None else logits
    what = "logit - fc bias (exact for a conserving epsilon-LRP here)" if exact is not None else "target logit"
    print(f"\nLRP-epsilon conservation on {label}: sum of input relevance per sample vs {what}")
    print(f"  {'reference':44s} mean {float(reference.mean()):+.4f}   (target logit mean {float(logits.mean()):+.4f})")
    candidates: list[tuple[str, Method]] = [("ours LRP('epsilon', epsilon=1e-9)", LRP("epsilon", epsilon=1e-9))]
    versions = peer_versions()
    if versions["zennit"]:
        name = "zennit epsilon" + (" + ResNetCanonizer" if _is_resnet(model) else "")
        candidates.append((name, lambda m, x, t: zennit_lrp(m, x, t, composite="epsilon", epsilon=1e-9)))
    if versions["captum"]:
        candidates.append(("captum LRP", captum_lrp))
    for name, method in candidates:
        try:
            relevance = method(model if name.startswith("ours") else peer_model, x, target)
        except Exception as err:
            print(f"  {name:44s} error: {type(err).__name__}: {err}")
            continue
        sums = relevance.flatten(1).sum(1).double()
        ratio = sums / reference.double()
        print(
            f"  {name:44s} mean {float(sums.mean()):+.4f}   sum/reference: mean {float(ratio.mean()):.4f}, "
            f"range [{float(ratio.min()):.4f}, {float(ratio.max()):.4f}]"
        )


def run_peers(model: nn.Module, x: Tensor, target: Tensor, t_fb: float, repeats: int) -> list[PeerRow]:
    """Compare our attributors with the installed peers on ``model`` and the batch ``x`` / ``target`` (the
    benchmark's ResNet) and on a VGG-style network, print the table, the notes and the LRP conservation sums,
    and return the rows. ``t_fb`` (seconds of one forward + input-gradient pass) is printed for scale."""
    versions = peer_versions()
    installed = {k: v for k, v in versions.items() if v}
    print("\npeer comparison (" + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()) + ")")
    if not installed:
        print("no peer installed: pip install -e '.[bench]' (captum, zennit, grad-cam)")
        return []
    target = torch.as_tensor(target).to(x.device).long().expand(x.shape[0]).clone()
    with model_state_guard(model), torch.no_grad():  # eval mode: no BatchNorm statistics update
        num_classes = model(x[:1]).shape[1]
    models = {"main": model, "vgg": build_vgg(x, num_classes)}
    # the peers get eval-mode copies (ours explain in eval mode too), so nothing they do reaches the caller's model
    peer_models = {k: copy.deepcopy(m).eval() for k, m in models.items()}
    labels = {"main": type(model).__name__.lower(), "vgg": "vgg_small"}
    print(
        f"same batch {list(x.shape)}, peers on deep copies of the models; one forward + input-gradient pass of "
        f"{labels['main']} = {t_fb * 1e3:.1f} ms; rel diff = max abs difference / max |map| (worst sample)\n"
    )
    header = (
        f"| {'method':32s} | {'peer':9s} | {'model':9s} | {'ours ms':>8s} | {'peer ms':>8s} | {'ours/peer':>9s} "
        f"| {'rel diff':>8s} | {'tol':>7s} | {'agree':16s} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    rows: list[PeerRow] = []
    notes: list[str] = []
    for pairing in pairings(model, x):
        if pairing.peer not in installed:
            continue
        row = compare(pairing, models[pairing.model], peer_models[pairing.model], x, target, repeats)
        rows.append(row)
        mark = ""
        if row.note:
            if row.note not in notes:
                notes.append(row.note)
            mark = f" [{notes.index(row.note) + 1}]"
        start = f"| {row.method + mark:32s} | {PEERS[row.peer]:9s} | {labels[row.model]:9s} |"
        if row.error:
            print(f"{start} error: {row.error}", flush=True)
            continue
        print(
            f"{start} {row.ours_s * 1e3:8.1f} | {row.peer_s * 1e3:8.1f} | {row.ours_s / row.peer_s:9.2f} | "
            f"{row.difference:8.1e} | {row.tolerance:7.1e} | {row.verdict:16s} |",
            flush=True,
        )
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    for key in ("main", "vgg"):
        _print_conservation(labels[key], models[key], peer_models[key], x, target)
    return rows
