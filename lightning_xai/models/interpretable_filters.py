"""Interpretable convolutional filters: a loss that pushes every filter of one conv layer towards one object part.

Zhang, Wu and Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018. For a filter's ``n x n`` feature
map ``x`` (after the ReLU), with ``d(i, mu) = ||i - mu||_1 / n`` the L1 distance of position ``i`` to ``mu`` in
units of the map size:

* **Templates.** One positive template per position ``mu`` (``n^2`` of them), ``T_mu(i) = tau * max(1 - beta *
  d(i, mu), -1)`` - "the part is at ``mu``": high near ``mu``, negative far away - and one negative template
  ``T-(i) = -tau`` - "the part is absent". ``tau = 0.5 / n^2``, ``beta = 4`` (the paper's values).
* **Mask** (forward pass, training *and* inference): ``x_masked = max(x * T^_mu^, 0)`` with ``mu^`` the arg-max
  position of ``x`` and ``T^_mu(i) = max(1 - beta * d(i, mu), -1)`` (the template's shape, without ``tau``, so
  the peak keeps its value): activations far from the filter's strongest response are removed.
* **Loss.** ``Loss_f = -MI(X; T)`` between the filter's (masked) feature maps ``X`` of the images of the batch
  and the templates ``T``, with ``p(x | T) = exp(tr(x T)) / Z_T`` normalised over the batch's images, priors
  ``p(T_mu) = alpha / n^2`` and ``p(T-) = 1 - alpha`` (default ``alpha = n^2 / (1 + n^2)``: every template
  equally likely) and ``p(x) = sum_T p(T) p(x | T)``. High mutual information means every image's map is
  explained by one template: one part, at one position, or nothing. The loss is computed exactly on the batch
  (autograd; the paper derives approximate gradients for efficiency). Here the loss is averaged over the
  layer's filters, and every image of the batch is treated as showing the object (the paper's single-category
  setting; its assignment of filters to categories for multi-class training is not implemented).

For non-square ``h x w`` maps, ``n = max(h, w)`` in the distance and ``n^2`` is replaced by ``h * w`` (the number
of positions) in ``tau`` and ``alpha``.

:class:`InterpretableFilterClassifier` adds the mask and the loss to :class:`~lightning_xai.models.ImageClassifier`.
Evaluation helpers: :func:`filter_peak_positions` and :func:`location_instability` (the paper's "location
instability": the standard deviation, over images, of the distance between a filter's inferred part position
and a ground-truth landmark, divided by the image diagonal; lower = the filter fires at a more consistent part).
For the semantic side, dissect the layer's (masked) output with
:class:`~lightning_xai.interpretation.dissection.NetworkDissection`; ``benchmarks/interpretable_filters.py`` does
both on the ground-truth flowers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.batch import BatchReader, Key
from lightning_xai.checks import check_float, check_int
from lightning_xai.models.classifier import ImageClassifier

__all__ = [
    "InterpretableFilterClassifier",
    "filter_loss",
    "filter_mutual_information",
    "filter_peak_positions",
    "location_instability",
    "mask_feature_map",
    "part_templates",
]


def _template_settings(
    owner: str, beta: float, alpha: float | None = None, tau: float | None = None
) -> tuple[float, float | None, float | None]:
    """``(beta, alpha, tau)`` checked with the shared checks: ``beta > 0``; ``alpha`` (the prior of the positive
    templates) in ``(0, 1)`` or ``None``; ``tau`` (the template scale) ``> 0`` or ``None`` (``0.5 / n^2``)."""
    beta = check_float("beta", beta, minimum=0, strict=True, owner=owner)
    if alpha is not None:
        alpha = check_float("alpha", alpha, minimum=0, maximum=1, strict=True, owner=owner)
    if tau is not None:
        tau = check_float("tau", tau, minimum=0, strict=True, owner=owner)
    return beta, alpha, tau


def _check_maps(x: Tensor, name: str = "feature maps") -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W] (a conv layer's output), got shape {list(x.shape)}")


def part_templates(
    height: int, width: int, beta: float = 4.0, *, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """The unscaled positive templates ``max(1 - beta * ||i - mu||_1 / n, -1)``, ``Tensor[h*w, h, w]``:
    entry ``[mu]`` is the template of position ``mu`` (row-major), ``n = max(h, w)``."""
    beta = _template_settings("part_templates", beta)[0]
    rows = torch.arange(height, device=device, dtype=dtype or torch.float32)
    cols = torch.arange(width, device=device, dtype=dtype or torch.float32)
    mu_r, mu_c = torch.meshgrid(rows, cols, indexing="ij")
    dist = (rows.view(1, -1, 1) - mu_r.reshape(-1, 1, 1)).abs() + (cols.view(1, 1, -1) - mu_c.reshape(-1, 1, 1)).abs()
    return (1 - beta * dist / max(height, width)).clamp_min(-1.0)


def mask_feature_map(x: Tensor, beta: float = 4.0) -> Tensor:
    """The paper's mask: ``max(x * T^_mu^, 0)`` per image and filter, ``mu^`` = arg-max position of ``x``.

    ``x`` is a rectified feature map ``[B, C, H, W]``; the selected template is a constant (no gradient flows
    through the arg-max), the masked map is differentiable in ``x``.
    """
    _check_maps(x)
    h, w = x.shape[-2:]
    templates = part_templates(h, w, beta, device=x.device, dtype=x.dtype)
    peak = x.detach().flatten(2).argmax(dim=2)  # [B, C]
    return (x * templates[peak]).clamp_min(0.0)


def filter_mutual_information(
    x: Tensor, beta: float = 4.0, alpha: float | None = None, tau: float | None = None
) -> Tensor:
    """``MI(X; T)`` of each filter over the batch (see the module docstring), ``Tensor[C]`` in nats.

    ``x``: (masked) feature maps ``[B, C, H, W]``; ``B >= 2`` (the distribution ``p(x | T)`` is over the batch).
    ``tau``: template scale, default ``0.5 / n^2`` (the paper's).
    """
    _check_maps(x)
    _, alpha, tau = _template_settings("filter_mutual_information", beta, alpha, tau)
    b, _, h, w = x.shape
    if b < 2:
        raise ValueError(f"the filter loss needs a batch of at least 2 images (p(x|T) is over the batch), got {b}")
    positions = h * w
    tau = 0.5 / positions if tau is None else tau
    alpha = positions / (1.0 + positions) if alpha is None else alpha
    templates = tau * part_templates(h, w, beta, device=x.device, dtype=x.dtype).view(positions, positions)
    flat = x.flatten(2)  # [B, C, P]
    scores = torch.cat([flat @ templates.T, -tau * flat.sum(dim=2, keepdim=True)], dim=2)  # [B, C, P + 1]
    log_p_x_given_t = scores - torch.logsumexp(scores, dim=0, keepdim=True)  # normalised over the batch
    log_prior = torch.cat(
        [
            torch.full((positions,), math.log(alpha / positions), device=x.device, dtype=x.dtype),
            torch.full((1,), math.log(1.0 - alpha), device=x.device, dtype=x.dtype),
        ]
    )
    log_p_x = torch.logsumexp(log_prior + log_p_x_given_t, dim=2, keepdim=True)  # [B, C, 1]
    joint = torch.exp(log_prior + log_p_x_given_t)  # p(T) p(x | T)
    return (joint * (log_p_x_given_t - log_p_x)).sum(dim=(0, 2))


def filter_loss(x: Tensor, beta: float = 4.0, alpha: float | None = None, tau: float | None = None) -> Tensor:
    """The filter loss: ``-MI(X; T)`` averaged over the filters of ``x [B, C, H, W]`` (a scalar)."""
    return -filter_mutual_information(x, beta, alpha, tau).mean()


def _find_activation(model: nn.Module, conv_name: str) -> str | None:
    """The ReLU that follows ``conv_name`` in its ``nn.Sequential`` (optionally after a BatchNorm), or None."""
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    names = [n for n, _ in parent.named_children()]
    index = names.index(child) + 1
    if index < len(names) and isinstance(parent[index], _BatchNorm):
        index += 1
    if index < len(names) and isinstance(parent[index], nn.ReLU):
        return f"{parent_name}.{names[index]}" if parent_name else names[index]
    return None


class InterpretableFilterClassifier(ImageClassifier):
    """:class:`~lightning_xai.models.ImageClassifier` whose ``filter_layer`` filters are trained to represent
    object parts (Zhang, Wu & Zhu, CVPR 2018; see the module docstring).

    Args:
        backbone, num_classes, in_channels, optimizer, lr, weight_decay, scheduler, momentum, on_nonfinite_loss,
            input_key, label_key: as in :class:`~lightning_xai.models.ImageClassifier`.
        filter_layer: dotted name of the ``nn.Conv2d`` whose filters are made interpretable (default: the last
            conv of ``"small_cnn"``). Anything else raises ``ValueError``.
        activation_layer: the module whose output is the rectified feature map that is masked (and fed to the
            loss). Default: the ``nn.ReLU`` that follows ``filter_layer`` in its ``nn.Sequential`` (after an
            optional BatchNorm, as in conv-BN-ReLU blocks); if there is none, the mask is applied to the conv's
            output after a ReLU. Its output must be 4-D with the conv's number of channels.
        filter_loss_weight: weight ``lambda`` of the filter loss, >= 0 (``0`` keeps only the mask).
        beta, alpha: template decay and positive-template prior (``None``: ``n^2 / (1 + n^2)``).
        tau: template scale in the loss, ``None`` = the paper's ``0.5 / n^2``. That value assumes the large
            activations of an un-normalised conv layer; behind a BatchNorm the activations are of order 1,
            ``tau * tr(x T)`` stays near 0, ``p(x | T)`` near uniform and the loss and its gradient near 0 (measured
            here: ``|loss| ~ 1e-4`` on SmallCNN). Use a larger ``tau`` (e.g. ``0.5``) there.

    Training loss: ``cross_entropy + filter_loss_weight * filter_loss``. Logged: the classifier's metrics, plus
    ``train_filter_loss`` / ``val_filter_loss`` (``-MI`` averaged over filters; ``sync_dist``) and
    ``train_total_loss``. The mask is part of the model: it is applied in every forward pass (training and
    inference), as in the paper; attributions of this module explain the masked network.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small_cnn",
        num_classes: int = 6,
        in_channels: int = 3,
        filter_layer: str = "backbone.features.0",
        activation_layer: str | None = None,
        filter_loss_weight: float = 1.0,
        beta: float = 4.0,
        alpha: float | None = None,
        tau: float | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
    ) -> None:
        owner = type(self).__name__
        check_float("filter_loss_weight", filter_loss_weight, minimum=0, owner=owner)
        beta, alpha, tau = _template_settings(owner, beta, alpha, tau)
        super().__init__(backbone=backbone, num_classes=num_classes, in_channels=in_channels, optimizer=optimizer,
                         lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum,
                         on_nonfinite_loss=on_nonfinite_loss, input_key=input_key, label_key=label_key)
        name, conv = resolve_layer(self, filter_layer)
        if not isinstance(conv, nn.Conv2d):
            convs = [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)]
            raise ValueError(
                f"filter_layer {name!r} is a {type(conv).__name__}, not an nn.Conv2d; the filter loss applies to a "
                f"conv layer's filters. Conv2d layers: {convs}"
            )
        if activation_layer is None:
            activation_layer = _find_activation(self, name)
        self.apply_relu = activation_layer is None
        self.activation_name, activation = (
            (name, conv) if activation_layer is None else resolve_layer(self, activation_layer)
        )
        self.filter_layer = name
        self.filter_loss_weight = float(filter_loss_weight)
        self.beta, self.alpha, self.tau = beta, alpha, tau
        self._num_filters = conv.out_channels
        self._record = False
        self._masked: list[Tensor] = []
        activation.register_forward_hook(self._mask_hook)

    def _mask_hook(self, _module: nn.Module, _inputs: tuple, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 4 or output.shape[1] != self._num_filters:
            shape = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"the feature map of filter_layer {self.filter_layer!r} (output of {self.activation_name!r}) must be "
                f"4-D [B, {self._num_filters}, H, W]; got {shape}"
            )
        x = F.relu(output) if self.apply_relu else output
        masked = mask_feature_map(x, self.beta)
        if self._record:
            self._masked.append(masked)
        return masked

    def _step_with_filter_loss(self, batch: Any, batch_idx: int, stage: str) -> Tensor | None:
        self._masked.clear()
        self._record = True
        try:
            step = super().training_step if stage == "train" else super().validation_step
            loss = step(batch, batch_idx)
        finally:
            self._record = False
        if not self._masked:
            raise ValueError(
                f"{self.activation_name!r} was not called in the forward pass; pick a layer the model uses"
            )
        floss = filter_loss(self._masked[-1], self.beta, self.alpha, self.tau)
        self._masked.clear()
        if loss is None:  # a non-finite loss skipped by on_nonfinite_loss="skip"
            return None
        n = len(self.batch_reader.labels(batch, required=True))
        self.log(f"{stage}_filter_loss", floss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        total = loss + self.filter_loss_weight * floss
        if stage == "train":
            self.log("train_total_loss", total, on_step=True, on_epoch=True, sync_dist=True, batch_size=n)
        return total

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._step_with_filter_loss(batch, batch_idx, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._step_with_filter_loss(batch, batch_idx, "val")


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def filter_peak_positions(model: nn.Module, layer: str | nn.Module, data: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Where each filter of ``layer`` fires most in each image, in input pixel coordinates.

    Args:
        model: any ``nn.Module`` (run in eval mode; its state is restored).
        layer: the module whose 4-D output ``[B, C, h, w]`` is analysed (e.g. the masked activation).
        data: iterable of batches: image tensors, or batches whose images
            :class:`~lightning_xai.batch.BatchReader`'s defaults find (a tuple's first element, ``"image"``, ...).

    Returns:
        ``(positions [N, C, 2], peaks [N, C])``: the centre ``(x, y)`` of the arg-max cell of each filter's map,
        mapped to input pixels (``(j + 0.5) * W / w``), and the maximum values.
    """
    positions, peaks = [], []
    reader = BatchReader(owner="filter_peak_positions")
    with model_state_guard(model), capture_layer(model, layer) as capture:
        for batch in data:
            images = reader.inputs(batch)
            capture.clear()
            model(images)
            act = capture.activation
            _check_maps(act, f"the output of {capture.name!r}")
            _, _, h, w = act.shape
            value, index = act.flatten(2).max(dim=2)
            row, col = index // w, index % w
            scale_x, scale_y = images.shape[-1] / w, images.shape[-2] / h
            positions.append(torch.stack([(col + 0.5) * scale_x, (row + 0.5) * scale_y], dim=-1).cpu())
            peaks.append(value.cpu())
    if not positions:
        raise ValueError("data yielded no batches")
    return torch.cat(positions), torch.cat(peaks)


def location_instability(
    positions: Tensor,
    landmarks: Tensor,
    image_size: tuple[int, int],
    peaks: Tensor | None = None,
    top_k: int | None = None,
) -> Tensor:
    """Location instability per filter (Zhang, Wu & Zhu, CVPR 2018): ``std_i(||p_ik - l_i||) / diagonal``.

    Args:
        positions: ``[N, C, 2]`` inferred part positions (see :func:`filter_peak_positions`).
        landmarks: ``[N, 2]`` ground-truth landmark of each image (same ``(x, y)`` pixel convention).
        image_size: ``(height, width)``; the diagonal ``sqrt(h^2 + w^2)`` normalises the result.
        peaks, top_k: if given, each filter is evaluated on its ``top_k`` images by peak activation only (the
            images where it fires; the paper uses a filter's top images).

    Returns ``Tensor[C]`` (lower = the filter's response keeps a more constant distance to the landmark).
    """
    if positions.ndim != 3 or positions.shape[2] != 2 or landmarks.shape != (positions.shape[0], 2):
        raise ValueError(
            f"positions must be [N, C, 2] and landmarks [N, 2]; got {list(positions.shape)} and {list(landmarks.shape)}"
        )
    distance = (positions - landmarks[:, None, :].to(positions)).norm(dim=2)  # [N, C]
    if top_k is not None:
        if peaks is None or peaks.shape != distance.shape:
            raise ValueError("top_k needs peaks of shape [N, C] (from filter_peak_positions)")
        check_int("top_k", top_k, minimum=2, maximum=distance.shape[0], owner="location_instability")
        index = peaks.topk(top_k, dim=0).indices  # [top_k, C]
        distance = distance.gather(0, index)
    if distance.shape[0] < 2:
        raise ValueError("location instability needs at least 2 images")
    return distance.std(dim=0) / math.hypot(*image_size)
