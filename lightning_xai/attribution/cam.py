"""Class activation maps: which regions of a convolutional feature map drove one decision.

Every method here weighs the ``K`` channels ``A_k`` (shape ``[h, w]``) of one layer's output ``A`` and sums them
into a coarse map ``sum_k w_k A_k`` (or a position-wise variant), optionally passed through a ReLU, then
upsamples it bilinearly (``align_corners=False``) to the input resolution. They differ in how the weights are
found:

========================  ==========================================================  ===================
class (registry name)     channel weights                                             model evaluations
========================  ==========================================================  ===================
``CAM`` ("cam")           the final linear layer's weights of the target class        1 forward
``GradCAM`` ("gradcam")   spatial mean of the gradient ``dS/dA_k``                    1 forward + backward
``GradCAMPlusPlus``       alpha-weighted sum of the positive gradients                1 forward + backward
``LayerCAM``              position-wise: ``relu(dS/dA_kij)`` times ``A_kij``          1 forward + backward
``ScoreCAM``              score of the input masked by each (upsampled) channel       ``B * K`` forwards
========================  ==========================================================  ===================

Conventions shared by all of them:

* The layer is given by dotted name (``"layer4"``, ``"layer4.1.relu"``), as a module, or ``None`` for
  :func:`~lightning_xai.attribution.layers.default_layer` (the last module with a spatial 4-D output, e.g.
  ``"layer4"`` of a torchvision ResNet). Its output must be ``[B, K, h, w]``, or the tokens ``[B, T, D]``
  of a vision transformer, laid out on their patch grid (class token dropped; ``reshape``: see
  :mod:`~lightning_xai.attribution.token_grid`). A module called several times in
  one forward pass is taken at its **last** call (for the shared ``relu`` of a torchvision ``BasicBlock``: the
  block output). The activation is captured with :func:`~lightning_xai.attribution.layers.capture_layer`,
  which hands a clone downstream, so in-place operations after the layer (``ReLU(inplace=True)``,
  ``out += identity``) cannot corrupt it.
* ``S`` is the explained score of each sample (:func:`~lightning_xai.attribution.base.select_scores`: the
  target logit, or a callable target's value). Gradients are taken with :func:`torch.autograd.grad` of
  ``S.sum()`` with respect to the activation only (never the input, never the parameters); in eval mode the
  samples of a batch are independent, so this is each sample's own gradient.
* The result is ``Tensor[B, 1, H, W]`` at the input's resolution, raw (not normalised): the coarse map is
  computed at the layer's resolution, the optional ReLU applied, then upsampled. Bilinear weights are
  non-negative, so a ReLU'd map stays non-negative.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.attribution.base import (
    Attributor,
    Target,
    chunk_slices,
    model_logits,
    select_scores,
    validate_target,
)
from lightning_xai.attribution.layers import capture_layer, default_layer, resolve_layer
from lightning_xai.attribution.token_grid import Reshape, check_reshape, token_grid
from lightning_xai.checks import check_choice, check_int, check_optional_int

__all__ = ["CAM", "GradCAM", "GradCAMPlusPlus", "LayerCAM", "ScoreCAM"]

Layer = str | nn.Module | None


def _check_flag(name: str, value: bool, owner: str) -> bool:
    """A bool switch; a ``TypeError`` otherwise (the CAM classes' documented error, where
    :func:`lightning_xai.checks.check_bool` raises a ``ValueError``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")
    return value


def _check_layer(layer: Layer, what: str = "layer") -> Layer:
    if layer is None or isinstance(layer, nn.Module):
        return layer
    if not isinstance(layer, str):
        raise TypeError(
            f"{what} must be a dotted module name (e.g. 'layer4'), an nn.Module or None, got {type(layer).__name__}"
        )
    if not layer:
        raise ValueError(f"{what} must be a non-empty dotted module name (e.g. 'layer4'), or None; got ''")
    return layer


def _upsample(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, h, w]`` -> ``[B, 1, H, W]`` by bilinear interpolation (``align_corners=False``)."""
    cam = cam.unsqueeze(1)
    if tuple(cam.shape[-2:]) == tuple(size):
        return cam
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


class _CAMBase(Attributor):
    """Shared configuration and checks of the layer-based CAM methods (not registered)."""

    requires_image = True

    def __init__(self, layer: Layer = None, relu: bool = True, reshape: Reshape = None) -> None:
        self.layer = _check_layer(layer)
        self.relu = _check_flag("relu", relu, type(self).__name__)
        self.reshape = check_reshape(reshape, type(self).__name__)

    def _as_grid(self, activation: Tensor, inputs: Tensor) -> Tensor:
        """A token layer's ``[B, T, D]`` as ``[B, D, h, w]`` (see :mod:`~lightning_xai.attribution.token_grid`);
        a feature map as it is."""
        return token_grid(activation, (inputs.shape[-2], inputs.shape[-1]), self.reshape)

    def _layer(self, model: nn.Module, inputs: Tensor) -> str | nn.Module:
        return self.layer if self.layer is not None else default_layer(model, inputs)

    def _check_activation(self, activation: Tensor, inputs: Tensor, name: str) -> None:
        if activation.ndim not in (3, 4) or activation.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"{type(self).__name__} needs a layer whose output is a feature map [B, K, h, w] (or tokens "
                f"[B, T, D]) with "
                f"B = {inputs.shape[0]}; layer {name!r} returns shape {list(activation.shape)}"
            )

    def _finish(self, cam: Tensor, inputs: Tensor) -> Tensor:
        """Optional ReLU at the layer's resolution, then bilinear upsampling to the input's size."""
        if self.relu:
            cam = cam.clamp_min(0)
        return _upsample(cam, (inputs.shape[-2], inputs.shape[-1]))


class _GradientCAM(_CAMBase):
    """One forward pass with the layer captured, then ``dS/dA`` by :func:`torch.autograd.grad` (not registered)."""

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        layer = self._layer(model, inputs)
        with capture_layer(model, layer) as capture:
            output = model(inputs)
        activation = capture.activation
        self._check_activation(activation, inputs, capture.name)
        scores = select_scores(output, target)
        if not scores.requires_grad or not activation.requires_grad:
            raise ValueError(
                f"{type(self).__name__}: the explained score has no gradient path to layer {capture.name!r} "
                "(is the layer after the output, or is part of forward detached / run under no_grad?)"
            )
        (grad,) = torch.autograd.grad(scores.sum(), activation, allow_unused=True)
        if grad is None:
            raise ValueError(
                f"{type(self).__name__}: the explained score does not depend on layer {capture.name!r}; "
                "pick a layer on the path from input to output"
            )
        cam = self._combine(self._as_grid(activation.detach(), inputs), self._as_grid(grad.detach(), inputs))
        return self._finish(cam, inputs)

    def _combine(self, activation: Tensor, grad: Tensor) -> Tensor:
        """``A, dS/dA`` (both ``[B, K, h, w]``) -> the map before the ReLU, ``[B, h, w]``."""
        raise NotImplementedError


class CAM(_CAMBase):
    """Class Activation Mapping (Zhou, Khosla, Lapedriza, Oliva, Torralba, "Learning Deep Features for
    Discriminative Localization", CVPR 2016).

    For a network that ends in ``feature map A -> global average pool -> linear head``, the target logit is
    ``y_c = b_c + sum_k W[c, k] * mean_ij A_kij``, so ``M_c = sum_k W[c, k] A_k`` is the spatial layout of the
    evidence for class ``c`` (``y_c - b_c`` is the mean of ``M_c``). No gradients are needed; one forward pass
    records ``A``. The head's bias is not part of the map.

    Args:
        layer: the feature map before the global average pool (``None``: the default layer).
        head: dotted name (or module) of the final ``nn.Linear``; ``None`` takes the last ``nn.Linear`` in
            ``model.modules()`` order. Its ``in_features`` must equal the layer's channel count ``K``.
        relu: pass the map through a ReLU. Default ``False``: the paper's map is the signed weighted sum.

    Returns ``Tensor[B, 1, H, W]``. The target must be a class index (int or ``LongTensor[B]``) of the head:
    a callable target has no row of ``W`` and raises ``TypeError``.
    """

    name = "cam"

    def __init__(
        self, layer: Layer = None, head: str | nn.Module | None = None, relu: bool = False, reshape: Reshape = None
    ) -> None:
        super().__init__(layer=layer, relu=relu, reshape=reshape)
        self.head = _check_layer(head, "head")

    def _head(self, model: nn.Module) -> tuple[str, nn.Linear]:
        if self.head is None:
            linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(
                    f"CAM needs a global-average-pool + nn.Linear head, but {type(model).__name__} has no nn.Linear; "
                    "use GradCAM for other architectures"
                )
            return linears[-1]
        name, module = resolve_layer(model, self.head)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"CAM head {name!r} must be an nn.Linear, got {type(module).__name__}")
        return name, module

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        if callable(target):
            raise TypeError(
                "CAM explains a class index (int or LongTensor[B]) of the linear head, not a callable target; "
                "use GradCAM for callable targets"
            )
        head_name, head = self._head(model)
        layer = self._layer(model, inputs)
        with torch.no_grad(), capture_layer(model, layer) as capture:
            output = model(inputs)
        activation = capture.activation.detach()
        self._check_activation(activation, inputs, capture.name)
        activation = self._as_grid(activation, inputs)
        channels = activation.shape[1]
        if head.in_features != channels:
            raise ValueError(
                f"CAM head {head_name!r} has in_features={head.in_features} but layer {capture.name!r} has "
                f"{channels} channels: CAM needs feature map -> global average pool -> this linear head "
                "(pass head= / layer= explicitly, or use GradCAM)"
            )
        output = model_logits(output)
        if output.ndim == 2 and output.shape[1] != head.out_features:
            raise ValueError(
                f"CAM head {head_name!r} has {head.out_features} outputs but the model returns "
                f"{output.shape[1]} classes: it is not the model's final layer (pass head= explicitly)"
            )
        validate_target(target, inputs.shape[0], head.out_features)
        weight = head.weight.detach()
        if isinstance(target, Tensor) and target.ndim == 1:
            rows = weight[target.to(weight.device).long()]  # [B, K]
        else:
            rows = weight[int(target)].expand(inputs.shape[0], -1)
        cam = torch.einsum("bk,bkhw->bhw", rows.to(activation.dtype), activation)
        return self._finish(cam, inputs)


class GradCAM(_GradientCAM):
    """Grad-CAM (Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from Deep
    Networks via Gradient-based Localization", ICCV 2017).

    ``w_k = (1 / hw) * sum_ij dS/dA_kij`` (the spatial mean of the gradient) and
    ``map = relu(sum_k w_k A_k)``. On a global-average-pool + linear head this is CAM divided by ``h * w``.

    Args:
        layer: dotted name, module or ``None`` (default layer).
        relu: apply the paper's ReLU (default ``True``); ``False`` returns the signed map.

    Returns ``Tensor[B, 1, H, W]``, raw.
    """

    name = "gradcam"

    def _combine(self, activation: Tensor, grad: Tensor) -> Tensor:
        weights = grad.mean(dim=(2, 3), keepdim=True)
        return (weights * activation).sum(dim=1)


class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++ (Chattopadhyay, Sarkar, Howlader, Balasubramanian, "Grad-CAM++: Generalized Gradient-based
    Visual Explanations for Deep Convolutional Networks", WACV 2018).

    With ``g = dS/dA`` (first-order gradient of the explained score, shape ``[B, K, h, w]``) and
    ``sum_A_k = sum_ab A_kab``, this computes exactly:

    1. ``alpha_kij = g_kij^2 / (2 g_kij^2 + sum_A_k * g_kij^3)``, the paper's closed form (eq. 19) for an
       exponential score ``exp(S)`` whose higher derivatives are powers of the first (piecewise-linear network),
       with the denominator replaced by 1 where it is 0. It is evaluated as ``1 / (2 + g_kij * sum_A_k)``
       (equal wherever ``g != 0``, and free of the underflow of ``g^3``), ``0`` where ``g = 0``, and ``g^2``
       where ``2 + g * sum_A_k = 0``.
    2. With ``normalize_alpha=True`` (default), per sample and channel, ``alpha_kij /= sum_ab alpha_kab`` (left as
       is where that sum is 0), over the positions ``alpha_normalization`` names:

       * ``"all"`` (default): every position, as the authors' released code does (``alphas /=
         sum(alphas)`` over the feature map, github.com/adityac94/Grad_CAM_plus_plus); ``alpha`` is 0 where
         ``g = 0``, and positions with negative gradient take part with their (possibly negative) ``alpha``.
       * ``"positive"``: only the positions with ``g > 0`` (the default of this library before; it makes the
         weights an alpha-weighted **mean** of the positive gradients).

       Both make Grad-CAM++ reduce to Grad-CAM in the paper's uniform case (``alpha = 1/Z``): on a global-average-
       pool + linear head the gradient is spatially constant and both give ``w_k = W[c, k] / hw`` for a positive
       class weight. They differ where the gradient changes sign over the map (on intermediate layers of a trained
       VGG-style network by 9-16 %). ``normalize_alpha=False`` skips the step (the un-normalised variant of TorchCAM and
       pytorch-grad-cam, whose scale grows with ``1 / sum_A_k``).
    3. ``w_k = sum_ij alpha_kij * relu(g_kij)`` and ``map = relu(sum_k w_k A_k)``.

    The paper's ``dexp(S)/dA = exp(S) g`` carries a positive per-sample factor ``exp(S)``; it is dropped (it
    cancels in ``alpha`` and only rescales each sample's map, overflowing for large logits), so the weights are
    in the units of Grad-CAM's.

    Args:
        layer: dotted name, module or ``None`` (default layer).
        relu: apply the final ReLU (default ``True``).
        normalize_alpha: step 2 above (default ``True``).
        alpha_normalization: ``"all"`` (default, the authors' code) or ``"positive"``, the positions step 2 sums
            over.

    Returns ``Tensor[B, 1, H, W]``, raw.
    """

    name = "gradcam_plus_plus"

    ALPHA_NORMALIZATIONS = ("all", "positive")

    def __init__(
        self,
        layer: Layer = None,
        relu: bool = True,
        normalize_alpha: bool = True,
        alpha_normalization: Literal["all", "positive"] = "all",
        reshape: Reshape = None,
    ) -> None:
        super().__init__(layer=layer, relu=relu, reshape=reshape)
        owner = type(self).__name__
        self.normalize_alpha = _check_flag("normalize_alpha", normalize_alpha, owner)
        self.alpha_normalization = check_choice(
            "alpha_normalization", alpha_normalization, self.ALPHA_NORMALIZATIONS, owner=owner
        )

    def _combine(self, activation: Tensor, grad: Tensor) -> Tensor:
        total = activation.sum(dim=(2, 3), keepdim=True)  # sum_ab A_kab, [B, K, 1, 1]
        reduced = 2 + grad * total  # the paper's denominator divided by g^2
        safe = torch.where(reduced == 0, torch.ones_like(reduced), reduced)
        alpha = torch.where(reduced == 0, grad.square(), 1 / safe)
        alpha = torch.where(grad == 0, torch.zeros_like(alpha), alpha)
        if self.normalize_alpha:
            counted = alpha if self.alpha_normalization == "all" else torch.where(grad > 0, alpha, 0)
            norm = counted.sum(dim=(2, 3), keepdim=True)
            alpha = alpha / torch.where(norm == 0, torch.ones_like(norm), norm)
        weights = (alpha * grad.clamp_min(0)).sum(dim=(2, 3), keepdim=True)
        return (weights * activation).sum(dim=1)


class LayerCAM(_GradientCAM):
    """LayerCAM (Jiang, Zhang, Hou, Cheng, Wei, "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE Transactions on Image Processing, 2021).

    Position-wise weights instead of one weight per channel: ``map_ij = relu(sum_k relu(dS/dA_kij) * A_kij)``.
    Where the gradient is spatially constant and positive (global average pool + linear head with positive
    class weights) it equals Grad-CAM. Works on shallow layers too, where Grad-CAM's averaged gradient is noisy.

    Args:
        layer: dotted name, module or ``None`` (default layer).
        relu: apply the outer ReLU (default ``True``); the ReLU on the gradient is part of the method.

    Returns ``Tensor[B, 1, H, W]``, raw.
    """

    name = "layercam"

    def _combine(self, activation: Tensor, grad: Tensor) -> Tensor:
        return (grad.clamp_min(0) * activation).sum(dim=1)


class ScoreCAM(_CAMBase):
    """Score-CAM (Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, "Score-CAM: Score-Weighted Visual
    Explanations for Convolutional Neural Networks", CVPR Workshops 2020). Gradient-free.

    For every sample ``b`` and channel ``k`` of the layer:

    1. ``M_bk`` = the channel upsampled bilinearly to the input size and min-max normalised to ``[0, 1]``
       (a constant channel gives an all-zero mask);
    2. ``s_bk`` = the score of the masked input ``x_b * M_bk`` (mask broadcast over input channels): for an int or
       ``LongTensor`` target the **softmax probability** of the target class; for a callable target the
       callable's value on the masked inputs' output, used directly (no softmax), so the callable must map any
       ``[n, ...]`` output to ``Tensor[n]``;
    3. weights: ``weighting="softmax"`` (default, Algorithm 1 of the paper): ``w_b = softmax_k(s_b)``;
       ``weighting="score"`` (the authors' released code): ``w_bk = s_bk``, optionally minus the score of the
       baseline input ``x_b * 0`` (``baseline_subtract=True``, the paper's "increase of confidence"
       ``f(x * M) - f(x_b)``; it has no effect under softmax, which is shift invariant, so that combination is
       rejected);
    4. ``map = relu(sum_k w_bk A_bk)`` at the layer's resolution, then upsampled.

    Cost: ``B * K`` extra forward passes (plus ``B`` with ``baseline_subtract``), run in chunks of at most
    ``batch_size`` inputs (samples and channels flattened together), under ``torch.no_grad()``. The forward pass
    that records the activation is chunked the same way, so no forward call sees more than ``batch_size`` inputs.
    ``max_channels`` keeps, per sample, only the channels with the largest spatial mean activation (the others are
    neither evaluated nor summed) to bound the cost on wide layers.

    Args:
        layer: dotted name, module or ``None`` (default layer).
        relu: apply the final ReLU (default ``True``).
        batch_size: most masked inputs per forward pass (default 32).
        max_channels: ``None`` (all channels) or a positive int.
        weighting: ``"softmax"`` or ``"score"`` (step 3).
        baseline_subtract: subtract the all-zero input's score (only with ``weighting="score"``).

    Returns ``Tensor[B, 1, H, W]``, raw.
    """

    name = "scorecam"

    def __init__(
        self,
        layer: Layer = None,
        relu: bool = True,
        batch_size: int = 32,
        max_channels: int | None = None,
        weighting: Literal["softmax", "score"] = "softmax",
        baseline_subtract: bool = False,
        reshape: Reshape = None,
    ) -> None:
        super().__init__(layer=layer, relu=relu, reshape=reshape)
        owner = type(self).__name__
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.max_channels = check_optional_int(
            "max_channels", max_channels, minimum=1, owner=owner, none_means="all channels"
        )
        self.weighting = check_choice("weighting", weighting, ("softmax", "score"), owner=owner)
        self.baseline_subtract = _check_flag("baseline_subtract", baseline_subtract, owner)
        if baseline_subtract and weighting == "softmax":
            raise ValueError(
                "baseline_subtract=True has no effect with weighting='softmax' (softmax is shift invariant); "
                "use weighting='score' to subtract the baseline score"
            )

    @staticmethod
    def _scores(output: Tensor, target: Target, samples: Tensor) -> Tensor:
        """Score of each row of ``output``, whose row ``i`` belongs to sample ``samples[i]``."""
        if callable(target):
            return select_scores(output, target)
        output = model_logits(output)
        if output.ndim == 2:
            output = output.softmax(dim=1)
        if isinstance(target, Tensor) and target.ndim == 1:
            target = target.to(samples.device)[samples]
        return select_scores(output, target)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        layer = self._layer(model, inputs)
        x = inputs.detach()
        batch = x.shape[0]
        size = (x.shape[-2], x.shape[-1])
        samples_all = torch.arange(batch, device=x.device)
        with torch.no_grad():
            parts = []
            with capture_layer(model, layer) as capture:
                for sl in chunk_slices(batch, self.batch_size):
                    capture.clear()
                    output = model(x[sl])
                    self._scores(output, target, samples_all[sl])  # validates the target early
                    parts.append(capture.activation)
            activation = torch.cat(parts)
            self._check_activation(activation, x, capture.name)
            activation = self._as_grid(activation, x)
            if self.max_channels is not None and self.max_channels < activation.shape[1]:
                top = activation.mean(dim=(2, 3)).topk(self.max_channels, dim=1).indices  # [B, K']
                index = top[:, :, None, None].expand(-1, -1, *activation.shape[2:])
                activation = activation.gather(1, index)
            channels = activation.shape[1]
            maps = activation.reshape(batch * channels, 1, *activation.shape[2:])
            sample_of = samples_all.repeat_interleave(channels)
            scores = torch.empty(batch * channels, dtype=activation.dtype, device=activation.device)
            for sl in chunk_slices(batch * channels, self.batch_size):
                mask = F.interpolate(maps[sl], size=size, mode="bilinear", align_corners=False)
                low = mask.amin(dim=(2, 3), keepdim=True)
                span = mask.amax(dim=(2, 3), keepdim=True) - low
                mask = torch.where(span > 0, (mask - low) / torch.where(span > 0, span, 1), 0)
                owner = sample_of[sl]
                scores[sl] = self._scores(model(x[owner] * mask.to(x.dtype)), target, owner).to(scores.dtype)
            if self.baseline_subtract:
                base = torch.empty(batch, dtype=scores.dtype, device=scores.device)
                for sl in chunk_slices(batch, self.batch_size):
                    output = model(torch.zeros_like(x[sl]))
                    base[sl] = self._scores(output, target, samples_all[sl]).to(base.dtype)
                scores = scores - base[sample_of]
            weights = scores.view(batch, channels)
            if self.weighting == "softmax":
                weights = weights.softmax(dim=1)
            cam = (weights[:, :, None, None] * activation).sum(dim=1)
        return self._finish(cam, x)
