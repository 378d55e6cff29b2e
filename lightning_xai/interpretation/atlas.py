"""Activation atlas: a map of what a layer can represent, drawn from the activations a dataset produces.

Carter, Armstrong, Schubert, Johnson and Olah, "Activation Atlas", Distill 2019. The method:

1. **Collect** spatial activation vectors of one layer: for each image, the ``C``-dimensional activation
   ``a[:, i, j]`` at ``positions_per_image`` random positions ``(i, j)`` of the layer's ``[C, h, w]`` map (the
   paper samples one random position per image over a million images). Positions are drawn from a generator
   seeded by ``(seed, image index)``, so the collected set does not depend on batching or on how the data is
   sharded over ranks; shards are concatenated in rank order with
   :func:`lightning_xai.distributed.gather_rows`.
2. **Reduce** the vectors to 2-D: UMAP (McInnes, Healy & Melville, arXiv:1802.03426, 2018; the paper's choice)
   when ``umap-learn`` is installed, otherwise t-SNE (van der Maaten & Hinton, JMLR 2008), or PCA (fast, linear);
   ``method="auto"`` picks UMAP, then t-SNE.
3. **Bin** the 2-D layout into a ``grid_size x grid_size`` grid over its bounding box and **average** the raw
   activation vectors of each non-empty cell (cells with fewer than ``min_count`` vectors are dropped).
4. **Render** each cell by feature visualisation of its averaged direction ``d``: the input that maximises the
   spatial mean of ``a(x)[:, i, j] . d / |d|`` with :class:`~lightning_xai.interpretation.visualization.
   ActivationMaximization` (its L2 / total-variation / jitter / blur regularisers), all cells optimised together
   in batches; on the atlas image each cell's icon is scaled by the square root of its count (the paper shows
   density the same way).

**Vision transformers.** A token layer ``[B, T, D]`` of an image model is read as in network dissection
(:func:`~lightning_xai.interpretation.layer_maps.unit_positions`): the activation vectors are the ``D``-channel
vectors of the patch tokens (class token dropped, grid by ``reshape`` as for the CAM family), and a cell's
direction is rendered as the mean over the patch tokens of ``a . d / |d|``. Text token layers are refused with a
clear error (the icons are optimised in image space).

**Class-filtered atlas** (the paper's class activation atlas): with ``target_class``, each collected vector gets
its attribution toward that class, ``a . d logit_class / d a`` at its position (gradient x activation), and each
cell the mean over its members (:attr:`AtlasResult.class_attribution`); :meth:`AtlasResult.render` fades cells
with little attribution.

Cost: one forward pass over the collected images (one forward+backward with ``target_class``), the 2-D reduction,
and ``ActivationMaximization.steps`` forward+backward passes per ``batch_size`` cells. The model is left as it
was (modes, ``requires_grad``, ``.grad``, hooks; see :func:`~lightning_xai.attribution.base.model_state_guard`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightning_xai.attribution.base import gradient_context, model_state_guard
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.attribution.token_grid import Reshape, check_reshape
from lightning_xai.checks import check_choice, check_int, check_optional_int
from lightning_xai.distributed import Reducer, default_reducer, gather_rows, shard_bounds
from lightning_xai.interpretation.embedding import Data, iterate_batches, model_device, project_features
from lightning_xai.interpretation.layer_maps import unit_positions
from lightning_xai.interpretation.visualization import ActivationMaximization

__all__ = ["ActivationAtlas", "AtlasResult", "DirectionObjective", "bin_cells", "cell_means", "layout_2d"]

METHODS = ("auto", "umap", "tsne", "pca")


def layout_2d(vectors: Tensor, method: str = "auto", *, seed: int = 0) -> tuple[Tensor, str]:
    """2-D coordinates ``[N, 2]`` of ``vectors [N, C]`` and the method used (see the module docstring)."""
    method = check_choice("method", method, METHODS, owner="ActivationAtlas")
    if method == "auto":
        method = "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    if method == "umap":
        try:
            import umap
        except ImportError as err:
            raise ImportError("ActivationAtlas: method='umap' needs umap-learn (pip install umap-learn)") from err
        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, max(2, vectors.shape[0] - 1)))
        return torch.from_numpy(reducer.fit_transform(vectors.double().cpu().numpy())).float(), method
    coords, _ = project_features(vectors, method, dim=2, seed=seed)
    return coords, method


def bin_cells(coords: Tensor, grid_size: int, min_count: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Bin 2-D ``coords [N, 2]`` into a ``grid_size`` square grid over their bounding box.

    Returns ``(cell_of [N], cells [K, 2], counts [K])``: the index (into ``cells``) of each point's cell, ``-1`` for
    points in dropped cells (fewer than ``min_count`` points); the ``(row, col)`` of the ``K`` kept cells, row 0 at
    the top (largest ``y``), in row-major order; their point counts.
    """
    check_int("grid_size", grid_size, minimum=1, owner="ActivationAtlas")
    low = coords.amin(0)
    span = (coords.amax(0) - low).clamp(min=1e-12)
    pos = ((coords - low) / span * grid_size).floor().long().clamp(0, grid_size - 1)
    col, row = pos[:, 0], grid_size - 1 - pos[:, 1]
    flat = row * grid_size + col
    counts_all = torch.bincount(flat, minlength=grid_size * grid_size)
    kept = (counts_all >= max(1, min_count)).nonzero().flatten()
    index_of = torch.full((grid_size * grid_size,), -1, dtype=torch.long)
    index_of[kept] = torch.arange(kept.numel())
    cells = torch.stack([kept // grid_size, kept % grid_size], dim=1)
    return index_of[flat], cells, counts_all[kept]


def cell_means(values: Tensor, cell_of: Tensor, num_cells: int) -> Tensor:
    """Mean of ``values [N, ...]`` over the members of each cell (``cell_of [N]``, ``-1`` = none): ``[K, ...]``."""
    keep = cell_of >= 0
    flat = values[keep].reshape(int(keep.sum()), -1).double()
    sums = torch.zeros(num_cells, flat.shape[1], dtype=torch.double).index_add_(0, cell_of[keep], flat)
    counts = torch.bincount(cell_of[keep], minlength=num_cells).clamp(min=1).double()
    return (sums / counts[:, None]).to(values.dtype).reshape(num_cells, *values.shape[1:])


class DirectionObjective(nn.Module):
    """``x -> [B, K]``: for each of ``K`` directions ``d_k`` the spatial mean of ``a(x) . d_k / |d_k|`` where
    ``a(x) [B, C, h, w]`` is the activation of ``layer`` (a ``[B, C]`` activation is used as it is; a token layer
    ``[B, T, D]`` of images gives its patch tokens' ``D``-vectors, laid out by ``reshape``). A model whose
    "logits" are direction scores, so that :class:`ActivationMaximization` with ``target=k`` visualises ``d_k``."""

    def __init__(self, model: nn.Module, layer: str, directions: Tensor, reshape: Reshape = None) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.reshape = check_reshape(reshape, "ActivationAtlas")
        norms = directions.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.register_buffer("directions", (directions / norms).detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        with capture_layer(self.model, self.layer) as capture:
            self.model(x)
        flat, _ = unit_positions(  # [B, C, P]
            capture.activation, x, self.reshape, text=False, owner="ActivationAtlas", layer=self.layer
        )
        return torch.einsum("bcp,kc->bk", flat, self.directions.to(flat.dtype)) / flat.shape[2]


@dataclass
class AtlasResult:
    """An activation atlas (see :class:`ActivationAtlas`); all tensors on the CPU."""

    #: ``[N, C]`` the collected activation vectors (all ranks, in rank order).
    vectors: Tensor
    #: ``[N]`` the index of the image each vector comes from (in the whole, unsharded data).
    image_index: Tensor
    #: ``[N]`` the image's label, or ``None``.
    labels: Tensor | None
    #: ``[N, 2]`` the 2-D layout and ``method`` the reduction that made it.
    coords: Tensor
    method: str
    grid_size: int
    #: ``[N]`` index into :attr:`cells` of each vector's cell (``-1``: dropped, too few members).
    cell_of: Tensor
    #: ``[K, 2]`` ``(row, col)`` of the non-empty cells; ``counts [K]`` their sizes.
    cells: Tensor
    counts: Tensor
    #: ``[K, C]`` the mean activation vector of each cell.
    directions: Tensor
    #: ``[K, C_in, H, W]`` each cell's feature visualisation (``None`` when not rendered).
    icons: Tensor | None
    #: ``[K]`` the direction objective of the icons and of random inputs (same shape and range).
    icon_scores: Tensor | None
    random_scores: Tensor | None
    #: ``[K]`` mean attribution toward ``target_class`` of each cell's members (``None`` without a class).
    class_attribution: Tensor | None = None
    target_class: int | None = None

    def render(self, tile: int = 48, *, pad: int = 1) -> np.ndarray:
        """The atlas as one ``uint8 [H, W, 3]`` image: a ``grid_size`` square of ``tile``-pixel slots on white, each
        non-empty cell's icon scaled by ``sqrt(count / max count)``; with a class, cells whose attribution is below
        the largest fade towards white in proportion."""
        if self.icons is None:
            raise ValueError("ActivationAtlas: the cells have no icons (render_icons=False); nothing to draw")
        check_int("tile", tile, minimum=4, owner="AtlasResult.render")
        size = self.grid_size * (tile + pad) + pad
        canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        icons = self.icons.float()
        low = icons.amin(dim=(1, 2, 3), keepdim=True)
        high = icons.amax(dim=(1, 2, 3), keepdim=True)
        icons = (icons - low) / (high - low).clamp(min=1e-12)
        if icons.shape[1] == 1:
            icons = icons.expand(-1, 3, -1, -1)
        icons = icons[:, :3]
        weight = torch.ones(len(self.counts))
        if self.class_attribution is not None:
            top = float(self.class_attribution.max())
            weight = (self.class_attribution / top).clamp(0, 1) if top > 0 else torch.zeros(len(self.counts))
        largest = float(self.counts.max())
        for k, (row, col) in enumerate(self.cells.tolist()):
            side = max(4, round(tile * float(self.counts[k] / largest) ** 0.5))
            icon = F.interpolate(icons[k : k + 1], size=(side, side), mode="bilinear", align_corners=False)[0]
            pixels = icon.clamp(0, 1) * weight[k] + (1 - weight[k])
            y = pad + row * (tile + pad) + (tile - side) // 2
            x = pad + col * (tile + pad) + (tile - side) // 2
            canvas[y : y + side, x : x + side] = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return canvas

    def table(self) -> tuple[list[str], list[list[object]]]:
        """``(columns, rows)``: one row per cell - position, count, most common label, scores, attribution."""
        columns = ["cell", "row", "col", "count", "top_label", "icon_score", "random_score", "class_attribution"]
        rows: list[list[object]] = []
        for k, (row, col) in enumerate(self.cells.tolist()):
            top_label: object = ""
            if self.labels is not None:
                members = self.labels[self.cell_of == k]
                if members.numel():
                    top_label = int(torch.mode(members).values)
            rows.append([
                k, row, col, int(self.counts[k]), top_label,
                float("nan") if self.icon_scores is None else float(self.icon_scores[k]),
                float("nan") if self.random_scores is None else float(self.random_scores[k]),
                float("nan") if self.class_attribution is None else float(self.class_attribution[k]),
            ])
        return columns, rows


def _first(data: Data, count: int | None) -> tuple[Data, bool]:
    """The first ``count`` samples of a tensor, ``(inputs, labels)`` pair or sized Dataset (so that every world size
    reads the same images), and whether that could be done (not for other iterables)."""
    if count is None:
        return data, True
    if isinstance(data, Tensor):
        return data[:count], True
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return (data[0][:count], data[1][:count]), True
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return Subset(data, range(min(count, len(data)))), True  # type: ignore[arg-type]
    return data, False


def _shard(data: Data, rank: int, world_size: int) -> tuple[Data, int]:
    """This rank's contiguous share of a tensor, ``(inputs, labels)`` pair or sized Dataset, and its offset in the
    whole data; other iterables (loaders with a distributed sampler) are taken to be sharded already."""
    if world_size == 1:
        return data, 0
    if isinstance(data, Tensor):
        start, stop, _ = shard_bounds(data.shape[0], world_size, rank)
        return data[start:stop], start
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        start, stop, _ = shard_bounds(data[0].shape[0], world_size, rank)
        return (data[0][start:stop], data[1][start:stop]), start
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        start, stop, _ = shard_bounds(len(data), world_size, rank)  # type: ignore[arg-type]
        return Subset(data, range(start, stop)), start
    return data, 0


class ActivationAtlas:
    """Activation atlas of one layer (Carter et al., Distill 2019); see the module docstring for the method.

    ``ActivationAtlas(layer="features.3")(model, data)`` returns an :class:`AtlasResult` (``.render()`` gives the
    image, ``.table()`` the cell table). Configured before any model exists, so a YAML file can name it.

    Args:
        layer: dotted name of the layer (as in ``model.named_modules()``).
        grid_size: cells per side of the grid.
        positions_per_image: spatial positions sampled per image (all positions if the map has fewer).
        method: ``"auto"`` (UMAP if installed, else t-SNE), ``"umap"``, ``"tsne"`` or ``"pca"``.
        min_count: cells with fewer vectors are dropped.
        max_samples: images read from the data (``None``: all).
        visualization: the :class:`ActivationMaximization` that renders the cells (default: 64 steps, jitter 1,
            TV 0.1, L2 0.01, inputs in [0, 1]); ``render_icons=False`` skips rendering.
        batch_size: images per forward pass when collecting.
        seed: seed of the position sampling and of the 2-D reduction.
        reshape: how a token layer's output ``[B, T, D]`` (a vision transformer block) is laid out on its patch
            grid: ``None`` (class token dropped, grid inferred), ``(h, w)`` or a callable
            ``Tensor[B, T, D] -> Tensor[B, D, h, w]`` - the option of the CAM family and of network dissection.
    """

    def __init__(
        self,
        layer: str,
        grid_size: int = 8,
        positions_per_image: int = 8,
        method: str = "auto",
        min_count: int = 1,
        max_samples: int | None = None,
        visualization: ActivationMaximization | None = None,
        render_icons: bool = True,
        batch_size: int = 64,
        seed: int = 0,
        reshape: Reshape = None,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(layer, (str, nn.Module)):
            raise ValueError(f"{owner}: layer must be a dotted module name, got {layer!r}")
        self.layer = layer
        self.grid_size = check_int("grid_size", grid_size, minimum=1, owner=owner)
        self.positions_per_image = check_int("positions_per_image", positions_per_image, minimum=1, owner=owner)
        self.method = check_choice("method", method, METHODS, owner=owner)
        self.min_count = check_int("min_count", min_count, minimum=1, owner=owner)
        self.max_samples = check_optional_int("max_samples", max_samples, minimum=1, owner=owner, none_means="all")
        if visualization is not None and not isinstance(visualization, ActivationMaximization):
            raise ValueError(f"{owner}: visualization must be an ActivationMaximization, got {visualization!r}")
        self.visualization = visualization or ActivationMaximization(steps=64, jitter=1, batch_size=16, seed=seed)
        self.render_icons = bool(render_icons)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.seed = check_int("seed", seed, owner=owner)
        self.reshape = check_reshape(reshape, owner)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------------------------------------------ collect
    def collect(
        self, model: nn.Module, data: Data, *, target_class: int | None = None, reducer: Reducer | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, tuple[int, ...]]:
        """``(vectors [N, C], image_index [N], labels [N] | None, attribution [N] | None, input shape)`` over all
        ranks (this rank reads its shard of ``data``)."""
        reducer = reducer or default_reducer()
        layer, _ = resolve_layer(model, self.layer)
        data, limited = _first(data, self.max_samples)
        shard, offset = _shard(data, reducer.rank, reducer.world_size)
        device = model_device(model)
        vectors, index, labels, attrs = [], [], [], []
        has_labels, shape = True, None
        seen = 0
        with model_state_guard(model), gradient_context(), capture_layer(model, layer) as capture:
            for x, y in iterate_batches(shard, self.batch_size):
                if self.max_samples is not None and not limited:  # an iterable: each rank reads its share
                    limit = -(-self.max_samples // reducer.world_size)
                    if seen >= limit:
                        break
                    x, y = x[: limit - seen], None if y is None else y[: limit - seen]
                x = x.to(device)
                if target_class is not None and not x.is_floating_point():
                    raise ValueError(
                        f"ActivationAtlas: target_class needs a gradient through the inputs, but they are {x.dtype} "
                        f"{list(x.shape)}; the class-filtered atlas reads float inputs (images [B, C, H, W])"
                    )
                if target_class is not None:
                    x = x.detach().clone().requires_grad_(True)  # a gradient path even with frozen parameters
                shape = tuple(x.shape[1:])
                capture.clear()
                with torch.set_grad_enabled(target_class is not None):
                    out = model(x)
                act = capture.activation
                grad = None
                if target_class is not None:
                    logits = out if isinstance(out, Tensor) else out[0]
                    (grad,) = torch.autograd.grad(logits[:, target_class].sum(), act)
                flat = self.unit_vectors(act.detach(), x, layer)  # [B, C, P]
                for i in range(flat.shape[0]):
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + offset + seen + i)
                    count = min(self.positions_per_image, flat.shape[2])
                    pos = torch.randperm(flat.shape[2], generator=gen)[:count].to(flat.device)
                    vectors.append(flat[i][:, pos].T.float().cpu())
                    index.append(torch.full((count,), offset + seen + i, dtype=torch.long))
                    if y is not None:
                        labels.append(y.reshape(-1)[i].cpu().expand(count).long())
                    if grad is not None:
                        g = self.unit_vectors(grad, x, layer)
                        attrs.append((flat[i][:, pos] * g[i][:, pos]).sum(0).float().cpu())
                has_labels = has_labels and y is not None
                seen += x.shape[0]
        if shape is None:
            shape = (0,)
        width = vectors[0].shape[1] if vectors else 0
        local = torch.cat(vectors) if vectors else torch.zeros(0, width)
        widths = gather_rows(torch.tensor([[width]], dtype=torch.long), reducer)
        width = int(widths.max())
        local = local if local.shape[1] == width else torch.zeros(0, width)
        all_vectors = gather_rows(local, reducer)
        if all_vectors.shape[0] < 2:
            raise ValueError(f"ActivationAtlas: collected {all_vectors.shape[0]} activation vectors; need at least 2")
        all_index = gather_rows(torch.cat(index) if index else torch.zeros(0, dtype=torch.long), reducer)
        all_labels = None
        if has_labels and labels:
            all_labels = gather_rows(torch.cat(labels), reducer)
        all_attr = gather_rows(torch.cat(attrs), reducer) if target_class is not None else None
        shapes = gather_rows(torch.tensor([list(shape)[:3] + [0] * (3 - len(shape[:3]))]), reducer)
        input_shape = tuple(int(s) for s in shapes.max(0).values.tolist() if s > 0)
        return all_vectors, all_index, all_labels, all_attr, input_shape

    def check_layer(self, model: nn.Module, inputs: Tensor) -> None:
        """Raise the ``ValueError`` of a layer whose output cannot be read as unit vectors - a token layer whose
        tokens ``reshape`` cannot lay out on a patch grid, a text token layer - from one forward pass of ``inputs``
        (a setup check)."""
        layer, _ = resolve_layer(model, self.layer)
        x = inputs.detach().to(model_device(model))
        with model_state_guard(model), torch.no_grad(), capture_layer(model, layer) as capture:
            model(x)
        self.unit_vectors(capture.activation, x, layer)

    def unit_vectors(self, act: Tensor, inputs: Tensor, layer: str) -> Tensor:
        """``act`` (or its gradient) as unit vectors over positions ``[B, C, P]``: the channels of a feature map,
        the ``D`` channels of a vision transformer's patch tokens; a text token layer raises."""
        values, _ = unit_positions(act, inputs, self.reshape, text=False, owner=type(self).__name__, layer=layer)
        return values

    # ------------------------------------------------------------------------------------------------ atlas
    def __call__(
        self, model: nn.Module, data: Data, *, target_class: int | None = None, reducer: Reducer | None = None
    ) -> AtlasResult:
        """Collect, lay out, bin, average and render (see the class docstring). Every rank returns the same atlas."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"ActivationAtlas: model must be a torch.nn.Module, got {type(model).__name__}")
        if target_class is not None:
            check_int("target_class", target_class, minimum=0, owner="ActivationAtlas")
        reducer = reducer or default_reducer()
        vectors, index, labels, attr, input_shape = self.collect(
            model, data, target_class=target_class, reducer=reducer
        )
        if not bool(torch.isfinite(vectors).all()):
            raise FloatingPointError("ActivationAtlas: the layer's activations contain NaN or inf; no atlas drawn")
        coords, method = layout_2d(vectors, self.method, seed=self.seed)
        cell_of, cells, counts = bin_cells(coords, self.grid_size, self.min_count)
        directions = cell_means(vectors, cell_of, len(counts))
        class_attr = cell_means(attr, cell_of, len(counts)) if attr is not None else None
        icons = icon_scores = random_scores = None
        if self.render_icons:
            icons, icon_scores, random_scores = self.render_cells(model, directions, input_shape, reducer=reducer)
        return AtlasResult(vectors, index, labels, coords, method, self.grid_size, cell_of, cells, counts,
                           directions, icons, icon_scores, random_scores, class_attr, target_class)

    def render_cells(
        self, model: nn.Module, directions: Tensor, input_shape: tuple[int, ...], *, reducer: Reducer | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Feature visualisations of ``directions [K, C]``: ``(icons [K, *input_shape], their objective [K], the
        objective of seeded random inputs [K])``; the cells are shared out over the ranks and gathered."""
        reducer = reducer or default_reducer()
        layer, _ = resolve_layer(model, self.layer)
        if len(input_shape) != 3:
            raise ValueError(f"ActivationAtlas renders image inputs [C, H, W]; the data's inputs are {input_shape}")
        device = model_device(model)
        objective = DirectionObjective(model, layer, directions.to(device), self.reshape)
        start, stop, _ = shard_bounds(directions.shape[0], reducer.world_size, reducer.rank)
        ids = torch.arange(start, stop, device=device)
        am = self.visualization
        if ids.numel():
            result = am(objective, target=ids, image_shape=input_shape, first_index=start)
            icons, scores = result.images.cpu(), result.final_scores.cpu()
            gen = torch.Generator().manual_seed(self.seed + 7919)
            low, high = am.clamp if am.clamp is not None else (0.0, 1.0)
            noise = low + (high - low) * torch.rand(ids.numel(), *input_shape, generator=gen)
            with model_state_guard(objective), torch.no_grad():
                out = objective(noise.to(device))
            random = out.gather(1, ids.view(-1, 1)).squeeze(1).cpu()
        else:
            icons = torch.zeros(0, *input_shape)
            scores = random = torch.zeros(0)
        return gather_rows(icons, reducer), gather_rows(scores, reducer), gather_rows(random, reducer)
