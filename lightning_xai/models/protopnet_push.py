"""ProtoPNet's push (prototype projection; Chen et al., NeurIPS 2019, section 2.2): every prototype becomes, bit for
bit, the latent vector of its nearest training patch of its own class; each rank scans its share of the data and
the global nearest patch wins. Formerly part of :mod:`lightning_xai.models.protopnet`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_xai.checks import check_int
from lightning_xai.distributed import broadcast
from lightning_xai.models.protopnet_parts import (
    _distributed,
    _eval_mode,
    _gather,
    l2_distances,
    log_similarity,
)
from lightning_xai.namespace import pl

__all__ = ["PrototypePushMixin"]


class PrototypePushMixin:
    """The push of :class:`~lightning_xai.models.protopnet.ProtoPNet`: project every prototype onto its nearest
    latent patch of a training image of its class (exact, DDP-aware) and keep the patch's record."""

    def push(self, data: Dataset | DataLoader | pl.LightningDataModule, batch_size: int | None = None) -> dict:
        """Project every prototype onto its nearest latent patch among the training images of its class.

        Args:
            data: the training set - a ``Dataset`` of ``(image, label, ...)`` items, a ``DataLoader`` (its
                ``dataset`` is used in its own order; its sampler and batch size are ignored) or a DataModule (its
                ``dataset("train")`` if it has one, else its ``train_dataloader().dataset``). Dataset indices are
                what the push record stores.
            batch_size: images per forward pass (default ``push_batch_size``).

        Call it on every rank of a distributed run, with the same dataset everywhere: each rank scans the indices
        ``rank::world_size`` and the global nearest patch wins (ties: smaller dataset index, then row-major
        position). The latent vectors are computed in eval mode without gradients; every submodule's train/eval
        mode is restored afterwards. Under DDP, the buffers of ``features`` and ``add_on`` are first broadcast
        from rank 0. The new prototype is, bit for bit, the winning patch's vector in the latent map of its image
        computed on its own: ``latent(image[None].contiguous())`` in eval mode.

        Returns:
            ``{"mean_distance", "max_distance"}``: squared distances between the prototypes before the push and
            their new values (how far they moved).
        """
        dataset = self._push_dataset(data)
        if batch_size is not None:
            check_int("batch_size", batch_size, minimum=1, owner="ProtoPNet.push")
        batch_size = self.push_batch_size if batch_size is None else batch_size
        if len(dataset) == 0:
            raise ValueError("cannot push onto an empty dataset")
        rank, world = _distributed()
        with torch.inference_mode(False), torch.no_grad(), _eval_mode(self):
            if world > 1:
                for buffer in [*self.features.buffers(), *self.add_on.buffers()]:
                    buffer.copy_(broadcast(buffer, src=0))
            local = self._scan(dataset, range(rank, len(dataset), world), batch_size)
            distance, index, position, images = (_gather(t, world) for t in local)  # each [world, P, ...]
            winners = self._pick_winners(distance, index, position)
            p = torch.arange(self.num_prototypes, device=self.device)
            chosen = distance[winners, p]
            missing = (~torch.isfinite(chosen)).nonzero().flatten()
            if missing.numel():
                classes = sorted({int(c) for c in self.prototype_classes[missing]})
                raise ValueError(
                    f"the push data has no images of class(es) {classes}: their prototypes cannot be pushed"
                )
            self._project(index[winners, p], position[winners, p], chosen, images[winners, p], world)
        return {"mean_distance": float(chosen.mean()), "max_distance": float(chosen.max())}

    @staticmethod
    def _push_dataset(data: Any) -> Dataset:
        if isinstance(data, DataLoader):
            return data.dataset
        if isinstance(data, pl.LightningDataModule):
            if callable(getattr(data, "dataset", None)):
                return data.dataset("train")
            data.setup("fit")
            return data.train_dataloader().dataset
        if isinstance(data, Dataset) and hasattr(data, "__len__"):
            return data
        raise TypeError(
            f"data must be a Dataset (with __len__), a DataLoader or a LightningDataModule, got {type(data).__name__}"
        )

    def _scan(self, dataset: Dataset, indices: range, batch_size: int) -> tuple[Tensor, ...]:
        """This rank's best patch per prototype among ``indices``: distance, dataset index, position, image."""
        P, device, dtype = self.num_prototypes, self.device, self.prototypes.dtype
        reader = self.batch_reader  # the model's input_key / label_key read dataset items and their batches
        image_shape = reader.inputs(dataset[0]).shape
        best_dist = torch.full((P,), float("inf"), device=device, dtype=dtype)
        best_index = torch.full((P,), -1, dtype=torch.long, device=device)
        best_pos = torch.full((P,), -1, dtype=torch.long, device=device)
        best_img = torch.zeros(P, *image_shape, device=device, dtype=dtype)
        classes = self.prototype_classes
        loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False)
        offset = 0
        for batch in loader:
            x = reader.inputs(batch).to(device, dtype).contiguous()
            y = reader.labels(batch, required=True).to(device).long()
            distances = l2_distances(self.latent(x), self.prototypes)  # [B, P, h, w]
            own = (y[:, None] == classes[None, :])[:, :, None, None]
            distances = torch.where(own, distances, torch.full_like(distances, float("inf")))
            b, _, h, w = distances.shape
            flat = distances.permute(1, 0, 2, 3).reshape(P, -1)  # [P, B*h*w], row-major over (image, row, col)
            values, where = flat.min(dim=1)  # first occurrence on ties
            better = values < best_dist
            if bool(better.any()):
                img = where // (h * w)
                global_index = torch.as_tensor(list(indices[offset : offset + b]), device=device)[img]
                best_dist = torch.where(better, values, best_dist)
                best_index = torch.where(better, global_index, best_index)
                best_pos = torch.where(better, where % (h * w), best_pos)
                best_img = torch.where(better.view(-1, 1, 1, 1), x[img], best_img)
            offset += b
        return best_dist, best_index, best_pos, best_img

    @staticmethod
    def _pick_winners(distance: Tensor, index: Tensor, position: Tensor) -> Tensor:
        """Per prototype, the rank whose candidate is smallest in ``(distance, index, position)`` order."""
        world, P = distance.shape
        winners = torch.zeros(P, dtype=torch.long, device=distance.device)
        d, i, q = distance.tolist(), index.tolist(), position.tolist()
        for p in range(P):
            winners[p] = min(range(world), key=lambda r: (d[r][p], i[r][p] if i[r][p] >= 0 else math.inf, q[r][p]))
        return winners

    def _project(self, index: Tensor, position: Tensor, distance: Tensor, images: Tensor, world: int) -> None:
        """Copy the winning patches into the prototypes and store the push record.

        A patch's latent vector is taken from its image's latent map computed *on its own*, in eval mode, as
        ``latent(image[None].contiguous())``: convolution kernels can round differently with the batch composition
        and the memory format (e.g. channels-last images), so the scan's batched vectors may differ from it in the
        last bits, and "the prototype is exactly this image's latent vector" needs one canonical computation.
        Every rank computes the same thing from the same gathered images; rank 0's result is then broadcast so that
        the bytes are identical everywhere even where kernels are not bitwise deterministic across processes.
        """
        P, (C, H, W) = self.num_prototypes, images.shape[1:]
        vectors, maps = [], []
        for p in range(P):
            z = self.latent(images[p : p + 1].contiguous())  # [1, D, h, w]: the image alone, contiguous memory
            w = z.shape[3]
            vector = z[0, :, int(position[p]) // w, int(position[p]) % w]
            d = l2_distances(z, vector.view(1, -1, 1, 1))  # [1, 1, h, w]: the pushed prototype on its source
            vectors.append(vector)
            maps.append(log_similarity(d, self.epsilon))
        rows, cols = position // w, position % w
        boxes = torch.tensor(
            [self.rf.box(int(r), int(c), (H, W)) for r, c in zip(rows.tolist(), cols.tolist())], dtype=torch.long
        )
        sim = F.interpolate(torch.cat(maps), size=(H, W), mode="bilinear", align_corners=False)  # [P, 1, H, W]
        crop_h = int((boxes[:, 2] - boxes[:, 0]).max())
        crop_w = int((boxes[:, 3] - boxes[:, 1]).max())
        crops = torch.zeros(P, C, crop_h, crop_w, device=self.device, dtype=images.dtype)
        crop_maps = torch.zeros(P, 1, crop_h, crop_w, device=self.device, dtype=sim.dtype)
        for p, (top, left, bottom, right) in enumerate(boxes.tolist()):
            crops[p, :, : bottom - top, : right - left] = images[p, :, top:bottom, left:right]
            crop_maps[p, :, : bottom - top, : right - left] = sim[p, :, top:bottom, left:right]
        new_prototypes = torch.stack(vectors).view_as(self.prototypes).contiguous()
        if world > 1:
            for tensor in (new_prototypes, crop_maps):
                tensor.copy_(broadcast(tensor, src=0))
        self.prototypes.copy_(new_prototypes)
        self.push_index.copy_(index)
        self.push_position.copy_(torch.stack([rows, cols], dim=1))
        self.push_box.copy_(boxes)
        self.push_distance.copy_(distance)
        self.push_crops = crops
        self.push_crop_maps = crop_maps
        self.push_count += 1
        self.prototypes_pushed.fill_(1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The crop buffers' size is only known after a push: take the checkpoint's.
        for name in ("push_crops", "push_crop_maps"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(saved, Tensor) and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def source_crop(self, prototype: int) -> tuple[Tensor, Tensor]:
        """The source patch of ``prototype`` from the last push, ``([C, h, w] crop, [1, h, w] similarity map)``."""
        check_int("prototype", prototype, minimum=0, maximum=self.num_prototypes - 1, owner="ProtoPNet.source_crop")
        if int(self.push_count) == 0:
            raise ValueError("the prototypes have not been pushed yet: there are no source patches")
        top, left, bottom, right = self.push_box[prototype].tolist()
        return (
            self.push_crops[prototype, :, : bottom - top, : right - left],
            self.push_crop_maps[prototype, :, : bottom - top, : right - left],
        )
