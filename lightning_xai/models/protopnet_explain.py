"""ProtoPNet's explanations ("this looks like that", Chen et al., NeurIPS 2019): for an image, its most activated
prototypes with the similarity maps and the pushed source patches; tables and galleries for loggers. Formerly part
of :mod:`lightning_xai.models.protopnet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai.checks import check_int
from lightning_xai.models.protopnet_parts import (
    PrototypeExplanation,
    _eval_mode,
    log_similarity,
)
from lightning_xai.viz.logging import log_table
from lightning_xai.viz.render import overlay, to_uint8_images

__all__ = ["PrototypeExplanationMixin"]


class PrototypeExplanationMixin:
    """Explanations of :class:`~lightning_xai.models.protopnet.ProtoPNet`: "this looks like that" - the most
    activated prototypes of an image with their source patches, as records, tables and galleries."""

    def explain(
        self, images: Tensor, top_k: int | None = None, target: int | Tensor | None = None
    ) -> PrototypeExplanation:
        """Explain ``images [B, C, H, W]`` as "this looks like that": the ``top_k`` prototypes by contribution to
        the ``target`` logit, with their similarity maps.

        ``target``: ``None`` (the predicted class), a class index or a LongTensor ``[B]``. Runs in eval mode without
        gradients and restores every submodule's mode (works inside ``no_grad`` / ``inference_mode``).
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != self.in_channels:
            shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, {self.in_channels}, H, W], got {shape}")
        k = self.explain_top_k if top_k is None else check_int("top_k", top_k, minimum=1, owner="ProtoPNet.explain")
        if k > self.num_prototypes:
            raise ValueError(f"top_k must be <= the number of prototypes ({self.num_prototypes}), got {k}")
        with torch.no_grad(), _eval_mode(self):
            out = self.outputs(images.to(self.device))
        B = images.shape[0]
        if target is None:
            target_t = out.logits.argmax(dim=1)
        elif isinstance(target, int) and not isinstance(target, bool):
            target_t = torch.full((B,), target, dtype=torch.long, device=self.device)
        elif isinstance(target, Tensor) and target.shape == (B,) and not target.is_floating_point():
            target_t = target.to(self.device).long()
        else:
            raise ValueError(f"target must be None, an int or a LongTensor [{B}], got {target!r}")
        if bool(((target_t < 0) | (target_t >= self.num_classes)).any()):
            raise ValueError(f"target classes must lie in [0, {self.num_classes}), got {target_t.tolist()}")
        weights = self.last_layer.weight.detach()[target_t]  # [B, P]
        contributions = out.similarities * weights
        top = contributions.topk(k, dim=1).indices  # [B, k]
        rows = torch.arange(B, device=self.device)[:, None]
        maps = log_similarity(out.distance_maps[rows, top], self.epsilon)  # [B, k, h, w]
        maps = F.interpolate(maps, size=images.shape[2:], mode="bilinear", align_corners=False)
        return PrototypeExplanation(
            logits=out.logits,
            target=target_t,
            prototype_indices=top,
            prototype_classes=self.prototype_classes[top],
            similarities=out.similarities[rows, top],
            weights=weights[rows, top],
            contributions=contributions[rows, top],
            similarity_maps=maps,
            source_indices=self.push_index[top],
            source_boxes=self.push_box[top],
        )

    def explanation_table(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        top_k: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of the explanation table (one row per image and prototype rank; images are ``uint8``).

        ``"this"``: the input with the prototype's similarity map; ``"looks_like_that"``: the prototype's source
        crop with its own similarity map. Needs pushed prototypes. ``mean``/``std`` undo an input normalisation for
        display.
        """
        if int(self.push_count) == 0:
            raise ValueError("the prototypes have not been pushed yet: push() before explaining with source patches")
        exp = self.explain(images, top_k=top_k)
        B, k = exp.prototype_indices.shape
        this = overlay(
            images.detach().cpu().repeat_interleave(k, dim=0),
            exp.similarity_maps.reshape(B * k, 1, *images.shape[2:]).cpu(),
            signed=False,
            mean=mean,
            std=std,
        )
        columns = ["sample", "label", "prediction", "rank", "prototype", "prototype_class", "similarity",
                   "class_weight", "contribution", "source_index", "this", "looks_like_that"]  # fmt: skip
        predictions = exp.logits.argmax(dim=1).tolist()
        rows: list[list[Any]] = []
        for b in range(B):
            for r in range(k):
                j = int(exp.prototype_indices[b, r])
                crop, crop_map = self.source_crop(j)
                that = overlay(crop[None].cpu(), crop_map[None].cpu(), signed=False, mean=mean, std=std)[0]
                rows.append([
                    b,
                    -1 if labels is None else int(labels[b]),
                    predictions[b],
                    r + 1,
                    j,
                    int(exp.prototype_classes[b, r]),
                    float(exp.similarities[b, r]),
                    float(exp.weights[b, r]),
                    float(exp.contributions[b, r]),
                    int(exp.source_indices[b, r]),
                    this[b * k + r],
                    that,
                ])  # fmt: skip
        return columns, rows

    def log_explanations(
        self,
        loggers: Sequence[object] | None,
        images: Tensor,
        *,
        step: int,
        labels: Tensor | None = None,
        top_k: int | None = None,
        key: str = "protopnet/explanations",
        fallback_dir: str | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> list[str]:
        """Log :meth:`explanation_table` with :func:`~lightning_xai.viz.logging.log_table` (call on rank zero)."""
        columns, rows = self.explanation_table(images, labels=labels, top_k=top_k, mean=mean, std=std)
        return log_table(loggers, key, columns, rows, step=step, fallback_dir=fallback_dir)

    def prototype_gallery(self, tile: int = 32, pad: int = 2) -> np.ndarray:
        """All source patches as one ``uint8 [H, W, 3]`` image: a row per class, a column per prototype of it.

        Each crop is resized (nearest neighbour) to ``tile x tile`` pixels; tiles are separated by ``pad`` white
        pixels. Needs pushed prototypes.
        """
        check_int("tile", tile, minimum=1, owner="ProtoPNet.prototype_gallery")
        check_int("pad", pad, minimum=0, owner="ProtoPNet.prototype_gallery")
        if int(self.push_count) == 0:
            raise ValueError("the prototypes have not been pushed yet: there is no gallery")
        m = self.prototypes_per_class
        canvas = np.full((pad + self.num_classes * (tile + pad), pad + m * (tile + pad), 3), 255, dtype=np.uint8)
        for j in range(self.num_prototypes):
            crop, _ = self.source_crop(j)
            resized = F.interpolate(crop[None].float().cpu(), size=(tile, tile), mode="nearest")
            row, col = divmod(j, m)
            top, left = pad + row * (tile + pad), pad + col * (tile + pad)
            canvas[top : top + tile, left : left + tile] = to_uint8_images(resized)[0]
        return canvas
