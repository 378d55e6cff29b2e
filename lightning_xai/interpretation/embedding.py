"""A layer's features for a dataset, and their 2-D embedding (PCA or t-SNE) for a scatter plot.

This module also holds the two pieces every dataset-level interpretation method here needs - walking over data
given in any common form (:func:`iterate_batches`) and collecting one feature vector per sample from a layer
(:func:`layer_features`) - so that TCAV, relevant units and the example rankings read data the same way.

Features are collected in eval mode under ``torch.no_grad()`` with the model's state restored afterwards
(:func:`~lightning_xai.attribution.base.model_state_guard`); the layer hook is removed on exit. Data is read in
chunks of ``batch_size`` samples, and only the reduced features ``[N, D]`` are kept.

Projections:

* ``"pca"`` - principal component analysis (Pearson, 1901) of the centred features, computed exactly by a
  singular value decomposition (or, with ``pca_solver="randomized"``, approximately by :func:`torch.pca_lowrank`,
  the randomised SVD of Halko, Martinsson & Tropp, SIAM Review 2011, under a fixed seed).
  Signs are made deterministic: each principal axis is oriented so that its largest-magnitude loading is
  positive. ``explained_variance_ratio`` holds each axis' share of the total variance.
* ``"tsne"`` - t-SNE (van der Maaten & Hinton, JMLR 2008) from scikit-learn (an optional dependency, imported
  on use), seeded through ``random_state``; the perplexity is capped at ``(N - 1) / 3`` as scikit-learn requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_xai.attribution.base import model_device, model_state_guard
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.attribution.token_grid import Reshape, check_reshape
from lightning_xai.batch import BatchReader
from lightning_xai.checks import check_choice, check_int, check_optional_int
from lightning_xai.interpretation.layer_maps import unit_positions

__all__ = [
    "Embedding",
    "LayerReduction",
    "check_layer_features",
    "embed_layer",
    "iterate_batches",
    "layer_features",
    "model_device",
    "project_features",
    "reduce_activation",
]

#: How a layer's activation ``[B, C, *spatial]`` becomes one vector per sample: ``"flatten"`` keeps every value
#: (``[B, C*H*W]``), ``"mean"`` / ``"max"`` pool each channel over its spatial positions (``[B, C]``),
#: ``"mean_square"`` is each channel's mean squared activation (its energy, ``[B, C]``), or a callable.
LayerReduction = Literal["flatten", "mean", "max", "mean_square"] | Callable[[Tensor], Tensor]
_REDUCTIONS = ("flatten", "mean", "max", "mean_square")

#: Data accepted wherever a method reads a dataset: an input tensor, an ``(inputs, labels)`` tuple of tensors,
#: a map-style :class:`~torch.utils.data.Dataset` (items ``x``, ``(x, y, ...)`` or dicts) or any iterable of
#: batches in those forms (a ``DataLoader``).
Data = Tensor | tuple[Tensor, Tensor] | Dataset | Iterable[Any]

#: How a dataset item or a batch is read: a tensor is the input, a tuple ``(x, y, ...)``, a dict or an object
#: with the keys of :mod:`lightning_xai.batch` (``"image"``, ``"inputs"``, ..., ``"label"``, ``"y"``, ...).
_READER = BatchReader()


def _split(item: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs, labels)`` of one dataset item or one batch: a tensor, ``(x, y, ...)`` or a dict."""
    readable = isinstance(item, (Tensor, Mapping)) or hasattr(item, "__dict__")
    if isinstance(item, (str, bytes)) or not (readable or (isinstance(item, Sequence) and len(item) > 0)):
        raise TypeError(f"cannot read an input from a {type(item).__name__}; expected a Tensor, (x, y, ...) or a dict")
    sample = _READER.read(item)
    return torch.as_tensor(sample.inputs), sample.labels


def iterate_batches(data: Data, batch_size: int = 64) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(inputs, labels)`` chunks of ``data``; ``labels`` is ``None`` where the data has none.

    ``data`` is an input tensor (chunked into ``batch_size`` rows), an ``(inputs, labels)`` tuple of two tensors
    with the same first dimension, a map-style ``Dataset`` (read ``batch_size`` items at a time and stacked), or
    any other iterable of batches (e.g. a ``DataLoader``, whose own batch size is kept).
    """
    check_int("batch_size", batch_size, minimum=1, owner="iterate_batches")
    if isinstance(data, Tensor):
        if data.ndim < 1:
            raise ValueError("input data needs a batch dimension, got a 0-d tensor")
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size], None
        return
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[0].ndim >= 1
        and data[1].ndim >= 1
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and labels differ in length: {x.shape[0]} and {y.shape[0]}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
        for start in range(0, total, batch_size):
            items = [_split(data[i]) for i in range(start, min(start + batch_size, total))]
            xs = torch.stack([it[0] for it in items])
            ys = None if any(it[1] is None for it in items) else torch.stack([it[1].reshape(()) for it in items])
            yield xs, ys
        return
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        for batch in data:
            x, y = _split(batch)
            yield x, y
        return
    raise TypeError(
        f"cannot read data from a {type(data).__name__}; pass a tensor, an (inputs, labels) tuple, a map-style "
        "Dataset or an iterable of batches (DataLoader)"
    )


def reduce_activation(
    activation: Tensor,
    reduce: LayerReduction,
    *,
    inputs: Tensor | None = None,
    reshape: Reshape = None,
    pad_token: int | None = None,
    owner: str = "reduce_activation",
    layer: str = "",
) -> Tensor:
    """One feature vector per sample from a layer activation (see :data:`LayerReduction`).

    The pooled reductions (``"mean"``, ``"max"``, ``"mean_square"``) pool each *unit* over its positions. With the
    layer's ``inputs`` the units are found by
    :func:`~lightning_xai.interpretation.layer_maps.unit_positions`: a token layer ``[B, T, D]`` of an image model
    gives ``D`` units over its patch tokens (class token dropped, grid by ``reshape``), a token layer of a text
    model fed ids ``[B, T]`` gives ``D`` units over its real tokens (prefix tokens and ``pad_token`` positions
    left out; a sequence with no real token gives ``NaN``). Without ``inputs`` the activation is read channel
    first, ``[B, C, *spatial]`` (e.g. unit maps already laid out). ``"flatten"`` and a callable take the raw
    output as it is (every value: a token layer's class token and padding included).

    A 2-D activation ``[B, C]`` has no spatial positions: ``"mean"``, ``"max"`` and ``"flatten"`` return it as is
    and ``"mean_square"`` returns its square.
    """
    if callable(reduce):
        out = reduce(activation)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != activation.shape[0]:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"a callable reduce must return [B, D] = [{activation.shape[0]}, D], got {shape}")
        return out
    if reduce not in _REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; valid values: {list(_REDUCTIONS)} or a callable")
    if activation.ndim < 2:
        raise ValueError(f"a layer activation needs shape [B, C, ...], got {list(activation.shape)}")
    if reduce == "flatten":
        return activation.flatten(1)
    real = None
    if inputs is None:
        flat = activation.flatten(2) if activation.ndim > 2 else activation.unsqueeze(2)
    else:
        flat, real = unit_positions(activation, inputs, reshape, pad_token=pad_token, owner=owner, layer=layer)
    if real is None:
        if reduce == "mean":
            return flat.mean(dim=2)
        if reduce == "max":
            return flat.amax(dim=2)
        return flat.square().mean(dim=2)
    keep = real[:, None, :].expand_as(flat)
    count = real.sum(dim=1, keepdim=True).to(flat.dtype)  # [B, 1]; 0 for a sequence of padding only
    if reduce == "max":
        out = flat.masked_fill(~keep, float("-inf")).amax(dim=2)
    else:
        values = flat.square() if reduce == "mean_square" else flat
        out = values.masked_fill(~keep, 0.0).sum(dim=2) / count.clamp(min=1)
    return out.masked_fill(count == 0, float("nan"))


def layer_features(
    model: nn.Module,
    layer: str | nn.Module,
    data: Data,
    *,
    reduce: LayerReduction = "mean",
    batch_size: int = 64,
    max_samples: int | None = None,
    reshape: Reshape = None,
    pad_token: int | None = None,
    owner: str = "layer_features",
) -> tuple[Tensor, Tensor | None]:
    """The reduced activation of ``layer`` for every sample of ``data``: ``(features [N, D], labels [N] | None)``.

    Runs in eval mode under ``torch.no_grad()`` (the model's modes and gradients are restored afterwards, the
    hook removed), ``batch_size`` samples per forward pass; features are returned as float32 on the CPU.
    ``max_samples`` stops after that many samples. Pooled reductions pool units over positions as
    :func:`reduce_activation` says with the batch's inputs: a vision transformer's token layer gives its ``D``
    channels pooled over the patch tokens (``reshape``: the patch grid, as for the CAM family), a text model's
    its ``D`` channels over the real tokens (``pad_token``: the padding id, ``None``: no padding).
    """
    if max_samples is not None:
        check_int("max_samples", max_samples, minimum=1, owner=owner)
    if not callable(reduce) and reduce not in _REDUCTIONS:
        raise ValueError(f"{owner}: unknown reduce {reduce!r}; valid values: {list(_REDUCTIONS)} or a callable")
    reshape = check_reshape(reshape, owner)
    check_optional_int("pad_token", pad_token, minimum=0, owner=owner)
    name, _ = resolve_layer(model, layer)
    device = model_device(model)
    features: list[Tensor] = []
    labels: list[Tensor] = []
    has_labels = True
    seen = 0
    with model_state_guard(model), torch.no_grad(), capture_layer(model, layer) as capture:
        for x, y in iterate_batches(data, batch_size):
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None and seen + x.shape[0] > max_samples:
                keep = max_samples - seen
                x, y = x[:keep], None if y is None else y[:keep]
            capture.clear()
            x = x.to(device)
            model(x)
            feats = reduce_activation(
                capture.activation, reduce, inputs=x, reshape=reshape, pad_token=pad_token, owner=owner, layer=name
            )
            features.append(feats.float().cpu())
            if y is None:
                has_labels = False
            else:
                labels.append(y.reshape(-1).cpu())
            seen += x.shape[0]
    if not features:
        raise ValueError("the data is empty: there are no samples to compute features for")
    return torch.cat(features), torch.cat(labels) if has_labels and labels else None


def check_layer_features(
    model: nn.Module,
    layer: str | nn.Module,
    inputs: Tensor,
    *,
    reduce: LayerReduction = "mean",
    reshape: Reshape = None,
    pad_token: int | None = None,
    owner: str = "layer_features",
) -> None:
    """Raise the ``ValueError`` of a layer whose features :func:`layer_features` cannot read - a token layer whose
    tokens ``reshape`` cannot lay out on a patch grid - from one forward pass of ``inputs`` (a setup check; the
    model's state is restored)."""
    name, _ = resolve_layer(model, layer)
    x = inputs.detach().to(model_device(model))
    with model_state_guard(model), torch.no_grad(), capture_layer(model, name) as capture:
        model(x)
    if not callable(reduce) and reduce != "flatten":
        unit_positions(capture.activation, x, check_reshape(reshape, owner), pad_token=pad_token, owner=owner,
                       layer=name)


def _orient(components: Tensor) -> Tensor:
    """Signs of principal axes ``[D, k]`` such that each axis' largest-magnitude loading is positive."""
    idx = components.abs().argmax(dim=0)
    signs = torch.sign(components[idx, torch.arange(components.shape[1])])
    signs[signs == 0] = 1.0
    return signs


def project_features(
    features: Tensor,
    method: Literal["pca", "tsne"] = "pca",
    *,
    dim: int = 2,
    seed: int = 0,
    perplexity: float = 30.0,
    pca_solver: Literal["exact", "randomized"] = "exact",
) -> tuple[Tensor, Tensor | None]:
    """Project ``features [N, D]`` to ``[N, dim]``; returns ``(coordinates, explained_variance_ratio | None)``.

    PCA returns the scores on the first ``dim`` principal axes (see the module docstring for the sign
    convention) and each axis' share of the total variance; t-SNE returns its embedding and ``None``.

    ``pca_solver="exact"`` (default) takes the axes from a full singular value decomposition of the centred
    features; ``"randomized"`` uses the randomised low-rank algorithm of Halko, Martinsson & Tropp (SIAM Review
    2011; ``torch.pca_lowrank`` with ``dim + 10`` columns and 6 power iterations, seeded by ``seed``), which is
    faster for very wide features but approximate: on a flat spectrum its explained variance can be a few per
    cent off.
    """
    if not isinstance(features, Tensor) or features.ndim != 2:
        shape = list(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a [N, D] tensor, got {shape}")
    check_int("dim", dim, minimum=1, owner="project_features")
    if method not in ("pca", "tsne"):
        raise ValueError(f"unknown projection method {method!r}; valid values: ['pca', 'tsne']")
    n, d = features.shape
    if n < 2:
        raise ValueError(f"a projection needs at least 2 samples, got {n}")
    x = features.detach().double().cpu()
    if method == "pca":
        if dim > min(n, d):
            raise ValueError(f"PCA to {dim} dimensions needs at least {dim} samples and features, got [{n}, {d}]")
        check_choice("pca_solver", pca_solver, ("exact", "randomized"), owner="project_features")
        if pca_solver == "exact":
            _, s, vh = torch.linalg.svd(x - x.mean(dim=0, keepdim=True), full_matrices=False)
            v = vh.T
        else:
            q = min(dim + 10, n, d)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _, s, v = torch.pca_lowrank(x, q=q, center=True, niter=6)
        v = v[:, :dim]
        v = v * _orient(v)
        centred = x - x.mean(dim=0, keepdim=True)
        coords = centred @ v
        total = centred.square().sum()
        ratio = (s[:dim].square() / total) if total > 0 else torch.zeros(dim, dtype=x.dtype)
        return coords.float(), ratio.float()
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:  # pragma: no cover - scikit-learn is installed in the dev environment
        raise ImportError("t-SNE needs scikit-learn: pip install 'lightning-xai[extras]'") from err
    if not (isinstance(perplexity, (int, float)) and math.isfinite(perplexity) and perplexity > 0):
        raise ValueError(f"perplexity must be a positive number, got {perplexity!r}")
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {n}")
    perp = min(float(perplexity), (n - 1) / 3.0)
    tsne = TSNE(
        n_components=dim, perplexity=perp, random_state=seed, init="pca", method="exact" if dim > 3 else "barnes_hut"
    )
    coords = torch.from_numpy(tsne.fit_transform(x.numpy())).float()
    return coords, None


@dataclass
class Embedding:
    """A layer's features for a dataset projected to a few dimensions (one row per sample)."""

    #: ``[N, dim]`` projected coordinates.
    coordinates: Tensor
    #: ``[N]`` labels of the samples, where the data has them.
    labels: Tensor | None
    #: ``"pca"`` or ``"tsne"``.
    method: str
    #: The layer's dotted name.
    layer: str
    #: PCA only: each axis' share of the total variance.
    explained_variance_ratio: Tensor | None = None

    def rows(self) -> list[list[float | int]]:
        """``[x, y, ..., label]`` rows (label ``-1`` where there is none) for a table."""
        labels = self.labels.tolist() if self.labels is not None else [-1] * self.coordinates.shape[0]
        return [[*map(float, c), int(lab)] for c, lab in zip(self.coordinates.tolist(), labels)]


def embed_layer(
    model: nn.Module,
    layer: str | nn.Module,
    data: Data,
    *,
    method: Literal["pca", "tsne"] = "pca",
    reduce: LayerReduction = "mean",
    dim: int = 2,
    seed: int = 0,
    perplexity: float = 30.0,
    batch_size: int = 64,
    max_samples: int | None = None,
) -> Embedding:
    """Collect ``layer``'s features for ``data`` (:func:`layer_features`) and project them
    (:func:`project_features`)."""
    name, _ = resolve_layer(model, layer)
    feats, labels = layer_features(model, layer, data, reduce=reduce, batch_size=batch_size, max_samples=max_samples)
    coords, ratio = project_features(feats, method, dim=dim, seed=seed, perplexity=perplexity)
    return Embedding(coords, labels, method, name, ratio)
