"""Model-level visualisation: what maximises a class or a unit, and which dataset examples do.

* :class:`ActivationMaximization` - gradient ascent on the *input* to maximise a class logit or a unit's mean
  activation (Erhan, Bengio, Courville & Vincent, "Visualizing Higher-Layer Features of a Deep Network",
  Univ. Montreal tech. report 1341, 2009; for class logits Simonyan, Vedaldi & Zisserman, "Deep Inside
  Convolutional Networks: Visualising Image Classification Models and Saliency Maps", ICLR workshop 2014,
  arXiv 2013), with the usual image priors: an L2 penalty (Simonyan et al.), a total-variation penalty
  (Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them", CVPR 2015), random
  jitter and periodic Gaussian blur (Yosinski, Clune, Nguyen, Fuchs & Lipson, "Understanding Neural Networks
  Through Deep Visualization", ICML Deep Learning workshop 2015).
* :func:`rank_examples` - the top-K and bottom-K examples of a dataset for a class score or a unit, in one
  streaming pass with a bounded buffer (:class:`TopKBuffer`).

Both leave the model as they found it (modes, ``requires_grad``, ``.grad``, parameters, hooks; see
:func:`~lightning_xai.attribution.base.model_state_guard`), take gradients only with respect to the images
(:func:`torch.autograd.grad`), and work inside ``torch.no_grad()`` / ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import (
    Target,
    gradient_context,
    model_state_guard,
    select_scores,
    validate_target,
)
from lightning_xai.attribution.filters import gaussian_blur
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.attribution.token_grid import Reshape, check_reshape
from lightning_xai.checks import check_float, check_int, check_optional_int
from lightning_xai.interpretation.embedding import (
    Data,
    LayerReduction,
    iterate_batches,
    model_device,
    reduce_activation,
)
from lightning_xai.interpretation.layer_maps import unit_positions

__all__ = [
    "ActivationMaximization",
    "ActivationMaximizationResult",
    "ExampleRanking",
    "TopKBuffer",
    "rank_examples",
    "total_variation",
]


def _image_seed(seed: int, index: int) -> int:
    """An independent seed for image ``index`` of a run seeded with ``seed`` (so results do not depend on how
    the images are chunked)."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def total_variation(images: Tensor) -> Tensor:
    """Squared total variation per image, ``Tensor[B]``: the mean of squared differences between vertically and
    horizontally neighbouring pixels (the ``beta = 2`` TV prior of Mahendran & Vedaldi, CVPR 2015)."""
    dy = images[..., 1:, :] - images[..., :-1, :]
    dx = images[..., :, 1:] - images[..., :, :-1]
    return dy.square().flatten(1).mean(1) + dx.square().flatten(1).mean(1)


@dataclass
class ActivationMaximizationResult:
    """Images found by :class:`ActivationMaximization` and their objective before and after the ascent."""

    #: ``[n, C, H, W]`` optimised images (detached, on the model's device).
    images: Tensor
    #: ``[n]`` the raw objective (logit or unit activation, no regulariser, no jitter) of the starting images.
    initial_scores: Tensor
    #: ``[n]`` the raw objective of the returned images.
    final_scores: Tensor


class ActivationMaximization:
    """Synthesise inputs that maximise a class logit or a unit's mean activation by regularised gradient ascent.

    For each image ``x`` (started from seeded noise ``init_mean + init_std * N(0, 1)`` or from given images) the
    method maximises, with Adam on the pixels,

        ``J(x) = f(T(x)) - l2 * mean((x - init_mean)^2) - tv * TV(x)``

    where ``f`` is the objective (the logit ``target`` - not a softmax probability, which can grow by pushing other
    classes down - or the spatial mean of channel ``unit`` of ``layer``), ``T`` a random translation by up to
    ``jitter`` pixels (circular, drawn afresh each step), ``TV`` the squared total variation
    (:func:`total_variation`); every ``blur_every`` steps the image is blurred with a Gaussian of ``blur_sigma``
    pixels, and after each step clamped to ``clamp`` (the input range: this project's images are in [0, 1]; pass
    ``clamp=None`` for normalised inputs). The L2 penalty pulls towards ``init_mean`` (grey), not towards black.

    Images are optimised ``batch_size`` at a time; each image draws its noise and its jitter from its own
    generator seeded by ``(seed, image index)``, and the model is evaluated in eval mode (no batch statistics), so
    the result does not depend on ``batch_size``. The model is left unchanged.

    Args:
        steps: number of gradient-ascent steps.
        lr: Adam learning rate (in input units per step, roughly).
        l2: weight of the L2 penalty.
        tv: weight of the total-variation penalty.
        jitter: maximum translation in pixels (0 disables jitter).
        blur_every: blur every n steps (0 disables blurring).
        blur_sigma: standard deviation of the blur in pixels.
        init_mean, init_std: the noise the images start from.
        clamp: ``(low, high)`` input range, or ``None``.
        batch_size: images optimised together.
        seed: seed of the noise and the jitter.
        reshape: how a token layer's output ``[B, T, D]`` (a vision transformer block) is read for a unit
            objective: its units are the ``D`` channels and unit ``d``'s objective is the mean of channel ``d`` over
            the patch tokens (class token dropped) - ``None`` infers the patch grid, ``(h, w)`` gives it (prefix
            ``T - h * w``), a callable ``Tensor[B, T, D] -> Tensor[B, D, h, w]`` does the layout (the option of the
            CAM family and :class:`~lightning_xai.interpretation.dissection.NetworkDissection`).
    """

    def __init__(
        self,
        steps: int = 128,
        lr: float = 0.05,
        l2: float = 1e-2,
        tv: float = 1e-1,
        jitter: int = 2,
        blur_every: int = 0,
        blur_sigma: float = 0.5,
        init_mean: float = 0.5,
        init_std: float = 0.1,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        batch_size: int = 16,
        seed: int = 0,
        reshape: Reshape = None,
    ) -> None:
        self.steps = check_int("steps", steps, minimum=1, owner="ActivationMaximization")
        self.lr = check_float("lr", lr, minimum=0.0, strict=True, owner="ActivationMaximization")
        self.l2 = check_float("l2", l2, minimum=0.0, owner="ActivationMaximization")
        self.tv = check_float("tv", tv, minimum=0.0, owner="ActivationMaximization")
        self.jitter = check_int("jitter", jitter, minimum=0, owner="ActivationMaximization")
        self.blur_every = check_int("blur_every", blur_every, minimum=0, owner="ActivationMaximization")
        self.blur_sigma = check_float("blur_sigma", blur_sigma, minimum=0.0, owner="ActivationMaximization")
        self.init_mean = check_float("init_mean", init_mean, owner="ActivationMaximization")
        self.init_std = check_float("init_std", init_std, minimum=0.0, owner="ActivationMaximization")
        if clamp is not None:
            if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
                raise ValueError(f"clamp must be a (low, high) pair or None, got {clamp!r}")
            low = check_float("clamp[0]", clamp[0], owner="ActivationMaximization")
            high = check_float("clamp[1]", clamp[1], owner="ActivationMaximization")
            if not low < high:
                raise ValueError(f"clamp must satisfy low < high, got {clamp!r}")
            clamp = (low, high)
        self.clamp = clamp
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner="ActivationMaximization")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.reshape = check_reshape(reshape, "ActivationMaximization")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------------------------------------------ objective
    @staticmethod
    def _count(target: Target | None, unit: int | Tensor | None, init: Tensor | None, num_images: int | None) -> int:
        counts = {
            name: int(value.shape[0])
            for name, value in (("target", target), ("unit", unit), ("init", init))
            if isinstance(value, Tensor) and value.ndim >= 1
        }
        if num_images is not None:
            check_int("num_images", num_images, minimum=1, owner="ActivationMaximization")
            counts["num_images"] = num_images
        if len(set(counts.values())) > 1:
            raise ValueError(f"the number of images is given inconsistently: {counts}")
        return next(iter(counts.values()), 1)

    def _objective(
        self, model: nn.Module, layer: str | None, target: Target | None, units: Tensor | None
    ) -> Callable[[Tensor, slice], Tensor]:
        if layer is None:
            assert target is not None

            def class_score(x: Tensor, sl: slice) -> Tensor:
                tgt = target[sl] if isinstance(target, Tensor) and target.ndim == 1 else target
                return select_scores(model(x), tgt)

            return class_score

        assert units is not None

        def unit_score(x: Tensor, sl: slice) -> Tensor:
            with capture_layer(model, layer) as capture:
                model(x)
            # [B, units, positions]: a token layer's units are its channels over the patch tokens
            values, _ = unit_positions(
                capture.activation, x, self.reshape, text=False, owner="ActivationMaximization", layer=layer
            )
            if int(units.max()) >= values.shape[1]:
                raise ValueError(
                    f"ActivationMaximization: unit {int(units.max())} is out of range: layer {layer!r} has "
                    f"{values.shape[1]} units (valid 0..{values.shape[1] - 1})"
                )
            return values[torch.arange(values.shape[0], device=values.device), units[sl].to(values.device)].mean(1)

        return unit_score

    # ------------------------------------------------------------------------------------------------ public
    def __call__(
        self,
        model: nn.Module,
        *,
        target: Target | None = None,
        layer: str | nn.Module | None = None,
        unit: int | Tensor | None = None,
        num_images: int | None = None,
        image_shape: tuple[int, ...] | None = None,
        init: Tensor | None = None,
        first_index: int = 0,
    ) -> ActivationMaximizationResult:
        """Optimise images for a class (``target``: an int, a ``LongTensor[n]`` with one class per image, or a
        callable ``output -> Tensor[n]``) or for a unit (``layer`` and ``unit``: an int or a ``LongTensor[n]``).

        Start from ``init`` (``[n, C, H, W]``, not modified) or from seeded noise of shape ``image_shape``
        (``(C, H, W)``); ``n`` is ``num_images`` or the length of a tensor ``target`` / ``unit`` / ``init``.
        ``first_index`` is the index of the first image in the seeding (image ``i`` draws from a generator seeded by
        ``(seed, first_index + i)``), so that a shard of a larger run - e.g. one rank's share of the classes -
        reproduces exactly the images of the whole run.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (target is None) == (layer is None):
            raise ValueError("give either target= (a class objective) or layer= and unit= (a unit objective)")
        if layer is not None and unit is None:
            raise ValueError("a unit objective needs unit= (a channel index of the layer)")
        if layer is None and unit is not None:
            raise ValueError("unit= needs layer= (the layer the unit belongs to)")
        n = self._count(target, unit, init, num_images)
        check_int("first_index", first_index, minimum=0, owner="ActivationMaximization")
        if target is not None and not callable(target):
            validate_target(target, n, None)
        units: Tensor | None = None
        layer_name: str | None = None
        if layer is not None:
            layer_name, _ = resolve_layer(model, layer)
            if isinstance(unit, bool) or not isinstance(unit, (int, Tensor)):
                raise TypeError(f"unit must be an int or a LongTensor[n], got {type(unit).__name__}")
            units = torch.as_tensor(unit).long().reshape(-1)
            if units.numel() == 1:
                units = units.expand(n)
            if int(units.min()) < 0:
                raise ValueError(f"unit indices must be >= 0, got {int(units.min())}")
        device = model_device(model)
        if init is not None:
            if not isinstance(init, Tensor) or not init.is_floating_point() or init.ndim != 4:
                raise ValueError(f"init must be a float image batch [n, C, H, W], got {getattr(init, 'shape', init)}")
            shape = tuple(init.shape[1:])
        else:
            if image_shape is None or len(tuple(image_shape)) != 3:
                raise ValueError(f"image_shape must be (C, H, W) when no init images are given, got {image_shape!r}")
            shape = tuple(int(s) for s in image_shape)
            if min(shape) < 1:
                raise ValueError(f"image_shape must be positive, got {image_shape!r}")

        images, first, last = [], [], []
        with model_state_guard(model), gradient_context():
            objective = self._objective(model, layer_name, target, units)
            for start in range(0, n, self.batch_size):
                sl = slice(start, min(start + self.batch_size, n))
                gens = [
                    torch.Generator().manual_seed(_image_seed(self.seed, first_index + i))
                    for i in range(sl.start, sl.stop)
                ]
                if init is not None:
                    x0 = init[sl].detach().clone().to(device)
                else:
                    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                    x0 = (self.init_mean + self.init_std * noise).to(device)
                    if self.clamp is not None:
                        x0 = x0.clamp(*self.clamp)
                x, start_score, end_score = self._ascend(objective, x0, sl, gens)
                images.append(x)
                first.append(start_score)
                last.append(end_score)
        return ActivationMaximizationResult(torch.cat(images), torch.cat(first), torch.cat(last))

    def _jitter(self, x: Tensor, gens: list[torch.Generator]) -> Tensor:
        if self.jitter == 0:
            return x
        rolled = []
        for i, g in enumerate(gens):
            dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=g).tolist()
            rolled.append(torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1)))
        return torch.stack(rolled)

    def _ascend(
        self, objective: Callable[[Tensor, slice], Tensor], x0: Tensor, sl: slice, gens: list[torch.Generator]
    ) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            start_score = objective(x0, sl).detach()
        x = x0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        for step in range(self.steps):
            score = objective(self._jitter(x, gens), sl)
            loss = -score.sum()
            if self.l2 > 0:
                loss = loss + self.l2 * (x - self.init_mean).square().flatten(1).mean(1).sum()
            if self.tv > 0 and x.ndim == 4:
                loss = loss + self.tv * total_variation(x).sum()
            (grad,) = torch.autograd.grad(loss, x)
            x.grad = grad
            optimizer.step()
            x.grad = None
            with torch.no_grad():
                if self.blur_every and (step + 1) % self.blur_every == 0 and x.ndim == 4:
                    x.copy_(gaussian_blur(x, self.blur_sigma))
                if self.clamp is not None:
                    x.clamp_(*self.clamp)
        x = x.detach()
        with torch.no_grad():
            end_score = objective(x, sl).detach()
        return x, start_score, end_score


# ---------------------------------------------------------------------------------------------------------------
# top-K / bottom-K examples
# ---------------------------------------------------------------------------------------------------------------


class TopKBuffer:
    """The ``k`` largest (or smallest) scores seen so far in each column, with their sample indices and payloads.

    ``update(scores, indices, rows=..., cells=...)`` takes a chunk: ``scores [b]`` or ``[b, U]`` (one column per
    ranked quantity, e.g. per unit), ``indices [b]`` (the samples' positions in the dataset), ``rows`` - tensors
    ``[b, ...]`` kept per sample (e.g. the images) - and ``cells`` - tensors ``[b, U, ...]`` kept per sample and
    column (e.g. a unit's argmax position). Memory stays ``k * U`` entries whatever the number of samples.
    Afterwards ``scores``, ``indices`` and each payload are ``[k', U, ...]`` (``k' = min(k, samples seen)``),
    sorted best first. Ties keep an unspecified one of the tied samples. A ``NaN`` or infinite score raises a
    ``ValueError`` naming the samples: it has no place in a ranking (``topk`` would put a ``NaN`` first).
    """

    def __init__(self, k: int, *, largest: bool = True) -> None:
        self.k = check_int("k", k, minimum=1, owner="TopKBuffer")
        self.largest = largest
        self.scores: Tensor | None = None
        self.indices: Tensor | None = None
        self.payload: dict[str, Tensor] = {}

    def update(
        self,
        scores: Tensor,
        indices: Tensor,
        rows: dict[str, Tensor] | None = None,
        cells: dict[str, Tensor] | None = None,
    ) -> None:
        new = scores.detach().float().cpu()
        if new.ndim == 1:
            new = new[:, None]
        b, u = new.shape
        indices = indices.detach().long().cpu().reshape(-1)
        if indices.shape[0] != b:
            raise ValueError(f"indices must have one entry per score row ({b}), got {indices.shape[0]}")
        finite = torch.isfinite(new).all(dim=1)
        if not bool(finite.all()):
            bad = indices[~finite].tolist()
            raise ValueError(
                f"TopKBuffer: NaN or inf scores for samples {bad}; a non-finite score cannot be ranked (check the "
                "model's outputs on these samples)"
            )
        if self.scores is not None and self.scores.shape[1] != u:
            raise ValueError(f"every chunk must have {self.scores.shape[1]} score columns, got {u}")
        old_k = 0 if self.scores is None else self.scores.shape[0]
        pool = new if self.scores is None else torch.cat([self.scores, new])
        pool_idx = indices[:, None].expand(b, u)
        if self.indices is not None:
            pool_idx = torch.cat([self.indices, pool_idx])
        kk = min(self.k, pool.shape[0])
        top, pos = pool.topk(kk, dim=0, largest=self.largest, sorted=True)
        cols = torch.arange(u).expand(kk, u)
        from_old = pos < old_k
        payload: dict[str, Tensor] = {}
        for kind, group in (("row", rows or {}), ("cell", cells or {})):
            for name, value in group.items():
                value = value.detach().cpu()
                if value.shape[0] != b or (kind == "cell" and (value.ndim < 2 or value.shape[1] != u)):
                    expected = f"[{b}, {u}, ...]" if kind == "cell" else f"[{b}, ...]"
                    raise ValueError(f"payload {name!r} must have shape {expected}, got {list(value.shape)}")
                tail = value.shape[2:] if kind == "cell" else value.shape[1:]
                out = value.new_zeros((kk, u, *tail))
                old = self.payload.get(name)
                if old is not None and from_old.any():
                    out[from_old] = old[pos[from_old], cols[from_old]]
                fresh = ~from_old
                new_pos = pos[fresh] - old_k
                out[fresh] = value[new_pos, cols[fresh]] if kind == "cell" else value[new_pos]
                payload[name] = out
        self.scores = top
        self.indices = pool_idx.gather(0, pos)
        self.payload = payload


@dataclass
class ExampleRanking:
    """The top-K and bottom-K examples of a dataset for one score (a class logit or a unit's activation)."""

    #: ``[k]`` positions of the highest-scoring samples in the data's order, best first.
    top_indices: Tensor
    top_scores: Tensor
    #: ``[k]`` positions of the lowest-scoring samples, lowest first.
    bottom_indices: Tensor
    bottom_scores: Tensor
    #: ``[k, C, H, W]`` the inputs themselves (when kept).
    top_inputs: Tensor | None = None
    bottom_inputs: Tensor | None = None


def rank_examples(
    model: nn.Module,
    data: Data,
    *,
    target: int | Callable[[Tensor], Tensor] | None = None,
    layer: str | nn.Module | None = None,
    unit: int | None = None,
    k: int = 8,
    reduce: LayerReduction = "mean",
    batch_size: int = 64,
    keep_inputs: bool = True,
    reshape: Reshape = None,
    pad_token: int | None = None,
) -> ExampleRanking:
    """Rank the samples of ``data`` by a class score (``target``: a class index - its logit - or a callable
    ``output -> Tensor[B]``) or by a unit (``layer`` and ``unit``: the unit's activation reduced over its
    positions by ``reduce``, default the mean) and return the ``k`` highest and ``k`` lowest.

    Units are read as :func:`~lightning_xai.interpretation.embedding.reduce_activation` says: a vision
    transformer's token layer ``[B, T, D]`` has ``D`` units over its patch tokens (``reshape``: the patch grid, as
    for the CAM family); a text model's token layer ``D`` units over its real tokens (``pad_token``: the padding
    id, left out; ``None``: every token is real).

    One pass over the data in eval mode under ``no_grad``, ``batch_size`` samples per forward pass, memory bounded
    by ``k`` (:class:`TopKBuffer`).
    """
    if (target is None) == (layer is None):
        raise ValueError("give either target= (a class score) or layer= and unit= (a unit's activation)")
    if layer is not None and (isinstance(unit, bool) or not isinstance(unit, int) or unit < 0):
        raise ValueError(f"a unit ranking needs unit= a channel index >= 0, got {unit!r}")
    if target is not None and not callable(target):
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be a class index >= 0 or a callable output -> Tensor[B], got {target!r}")
    check_int("k", k, minimum=1, owner="rank_examples")
    check_int("batch_size", batch_size, minimum=1, owner="rank_examples")
    reshape = check_reshape(reshape, "rank_examples")
    check_optional_int("pad_token", pad_token, minimum=0, owner="rank_examples")
    layer_name = resolve_layer(model, layer)[0] if layer is not None else ""
    top, bottom = TopKBuffer(k, largest=True), TopKBuffer(k, largest=False)
    device = model_device(model)
    seen = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(model_state_guard(model))
        stack.enter_context(torch.no_grad())
        capture = stack.enter_context(capture_layer(model, layer)) if layer is not None else None
        for x, _ in iterate_batches(data, batch_size):
            if capture is not None:
                capture.clear()
            x_dev = x.to(device)
            out = model(x_dev)
            if capture is not None:
                feats = reduce_activation(
                    capture.activation, reduce, inputs=x_dev, reshape=reshape, pad_token=pad_token,
                    owner="rank_examples", layer=layer_name,
                )
                if unit >= feats.shape[1]:  # type: ignore[operator]
                    raise ValueError(
                        f"rank_examples: unit {unit} is out of range: layer {layer_name!r} has {feats.shape[1]} units "
                        f"(valid 0..{feats.shape[1] - 1})"
                    )
                scores = feats[:, unit]
            else:
                scores = select_scores(out, target)  # type: ignore[arg-type]
            idx = torch.arange(seen, seen + x.shape[0])
            rows = {"inputs": x} if keep_inputs else None
            top.update(scores, idx, rows)
            bottom.update(scores, idx, rows)
            seen += x.shape[0]
    if top.scores is None:
        raise ValueError("the data is empty: there is nothing to rank")
    return ExampleRanking(
        top.indices[:, 0],
        top.scores[:, 0],
        bottom.indices[:, 0],
        bottom.scores[:, 0],
        top.payload["inputs"][:, 0] if keep_inputs else None,
        bottom.payload["inputs"][:, 0] if keep_inputs else None,
    )
