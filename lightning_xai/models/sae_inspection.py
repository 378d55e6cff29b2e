"""Inspecting a trained sparse autoencoder's latents on images: where each latent fires, which images activate it
most, a loggable table of them, and the latents' overlap with labelled concepts (network dissection).

:class:`SAEInspection` is a mixin of :class:`~lightning_xai.models.sae.SparseAutoencoder` (the methods are called
on the module: ``module.top_activating(images)``); it needs an
:class:`~lightning_xai.models.activations.ActivationSource` with ``spatial="positions"`` on a layer with feature
maps ``[B, C, h, w]``. The dissection of latents follows Bau et al., "Network Dissection", CVPR 2017, applied to
the dictionary features of Bricken et al., "Towards Monosemanticity", 2023. Split from
``lightning_xai.models.sae`` (the training module), which keeps every method reachable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_xai.checks import check_int
from lightning_xai.interpretation.dissection import DissectionResult, NetworkDissection
from lightning_xai.models.activations import ActivationSource
from lightning_xai.models.sae_architectures import SAEConfig, SparseAutoencoderBase
from lightning_xai.viz.logging import log_table
from lightning_xai.viz.render import overlay

__all__ = ["SAEInspection"]


class _LatentMaps(nn.Module):
    """Layer output ``[B, C, h, w]`` -> SAE latent maps ``[B, d_sae, h, w]`` (``spatial="positions"``)."""

    def __init__(self, sae: SparseAutoencoderBase, source: ActivationSource) -> None:
        super().__init__()
        self.sae = sae
        self._source = [source]  # not a submodule: the frozen model is not part of this module

    def forward(self, layer_output: Tensor) -> Tensor:
        source = self._source[0]
        batch = layer_output.shape[0]
        f = self.sae.encode(source.to_vectors(layer_output))
        h, w = layer_output.shape[2], layer_output.shape[3]
        return f.reshape(batch, h * w, -1).transpose(1, 2).reshape(batch, -1, h, w)


class _LatentModel(nn.Module):
    """``images -> latent maps`` with the maps as the output of the submodule ``"latents"`` (for dissection)."""

    def __init__(self, sae: SparseAutoencoderBase, source: ActivationSource) -> None:
        super().__init__()
        self.latents = _LatentMaps(sae, source)

    def forward(self, images: Tensor) -> Tensor:
        return self.latents(self.latents._source[0].layer_output(images))


class SAEInspection:
    """Latent inspection on images (see the module docstring); mixed into
    :class:`~lightning_xai.models.sae.SparseAutoencoder`, which provides ``sae``, ``config``, ``device``,
    ``top_images``, ``log_top_latents`` and ``_require_source``."""

    sae: SparseAutoencoderBase
    config: SAEConfig
    top_images: int
    log_top_latents: int
    device: torch.device

    def _require_source(self, source: ActivationSource | None) -> ActivationSource:
        raise NotImplementedError

    @torch.no_grad()
    def latent_maps(self, images: Tensor, source: ActivationSource | None = None) -> Tensor:
        """Latent activations per position, ``[B, d_sae, h, w]`` (source with ``spatial="positions"`` and a
        feature-map layer)."""
        source = self._require_source(source)
        if source.spatial != "positions":
            raise ValueError(f"latent maps need an activation source with spatial='positions', not {source.spatial!r}")
        layer_output = source.layer_output(images)
        if layer_output.ndim != 4:
            raise ValueError(
                f"latent maps need a layer with feature maps, {source.layer!r} outputs {list(layer_output.shape)}"
            )
        return _LatentMaps(self.sae, source).to(self.sae.b_dec.device)(layer_output.to(self.sae.b_dec.device))

    @torch.no_grad()
    def top_activating(
        self,
        images: Tensor,
        latents: Sequence[int] | None = None,
        n_top: int = 4,
        batch_size: int = 64,
        source: ActivationSource | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per latent, the ``n_top`` images with the largest maximum (over positions) activation:
        ``(scores [L, n_top], image indices [L, n_top])``, best first; ties go to the smaller index."""
        check_int("n_top", n_top, minimum=1, owner="SparseAutoencoder")
        check_int("batch_size", batch_size, minimum=1, owner="SparseAutoencoder")
        if n_top > images.shape[0]:
            raise ValueError(f"n_top = {n_top} is more than the {images.shape[0]} images given")
        chosen = torch.arange(self.config.d_sae) if latents is None else torch.as_tensor(list(latents)).long()
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= self.config.d_sae):
            raise ValueError(f"latent indices must be in [0, {self.config.d_sae}), got {chosen.tolist()}")
        scores = torch.cat(
            [
                self.latent_maps(images[s : s + batch_size], source).amax(dim=(2, 3))[:, chosen.to(self.device)].cpu()
                for s in range(0, images.shape[0], batch_size)
            ]
        )  # [N, L]
        order = torch.argsort(scores.t(), dim=1, descending=True, stable=True)[:, :n_top]
        return scores.t().gather(1, order), order

    def latent_table(
        self,
        images: Tensor,
        latents: Sequence[int] | None = None,
        n_top: int | None = None,
        source: ActivationSource | None = None,
        num_latents: int | None = None,
    ) -> tuple[list[str], list[list[Any]]]:
        """Rows ``[latent, fire_rate, max_activation, top_1, ..., top_n]``: each ``top_j`` a ``uint8 [H, W, 3]``
        overlay of the latent's spatial activation on one of its top-activating ``images``. ``fire_rate`` is the
        fraction of ``images`` on which the latent is non-zero somewhere. Without ``latents``, the
        ``num_latents`` (default ``log_top_latents`` or 8) latents with the largest maxima are shown."""
        n_top = self.top_images if n_top is None else n_top
        n_top = min(n_top, images.shape[0])
        maps = torch.cat([self.latent_maps(images[s : s + 64], source).cpu() for s in range(0, images.shape[0], 64)])
        peak = maps.amax(dim=(2, 3))  # [N, d_sae]
        if latents is None:
            count = num_latents or self.log_top_latents or 8
            latents = torch.argsort(peak.amax(dim=0), descending=True, stable=True)[:count].tolist()
        latents = [int(i) for i in latents]
        columns = ["latent", "fire_rate", "max_activation", *[f"top_{j + 1}" for j in range(n_top)]]
        rows: list[list[Any]] = []
        for latent in latents:
            order = torch.argsort(peak[:, latent], descending=True, stable=True)[:n_top]
            pictures = overlay(images[order].float().cpu(), maps[order, latent], signed=False)
            fire_rate = float((peak[:, latent] > 0).float().mean())
            rows.append([latent, fire_rate, float(peak[:, latent].max()), *[np.ascontiguousarray(p) for p in pictures]])
        return columns, rows

    def log_latent_table(
        self,
        loggers: Sequence[object] | None,
        images: Tensor,
        *,
        step: int,
        key: str = "sae/top_latents",
        latents: Sequence[int] | None = None,
        fallback_dir: str | None = None,
        source: ActivationSource | None = None,
    ) -> list[str]:
        """Log :meth:`latent_table` with :func:`~lightning_xai.viz.logging.log_table` (call on rank zero)."""
        columns, rows = self.latent_table(images, latents, source=source)
        return log_table(loggers, key, columns, rows, step=step, fallback_dir=fallback_dir)

    def latent_concept_iou(
        self,
        data: Iterable[Any],
        concept_names: Sequence[str],
        *,
        source: ActivationSource | None = None,
        quantile: float = 0.005,
        iou_threshold: float = 0.04,
        **kwargs: Any,
    ) -> DissectionResult:
        """Network dissection of the SAE latents: ``IoU(latent, concept)`` of thresholded, upsampled latent maps
        against concept masks, with :class:`~lightning_xai.interpretation.dissection.NetworkDissection` (its
        thresholds: the top-``quantile`` of each latent's activations over ``data``; sums over all images).

        ``data``: re-iterable batches ``(images, concept_masks)`` (see the dissection module). Sparse latents
        are zero on most positions: a threshold of 0 then means "fires at all". Returns the
        :class:`~lightning_xai.interpretation.dissection.DissectionResult` (``.iou`` is ``[d_sae, C]``).
        """
        source = self._require_source(source)
        if source.spatial != "positions":
            raise ValueError(f"latent maps need an activation source with spatial='positions', not {source.spatial!r}")
        model = _LatentModel(self.sae, source)
        dissection = NetworkDissection("latents", quantile=quantile, iou_threshold=iou_threshold, **kwargs)
        return dissection(model, data, concept_names)
