"""What every metric of :mod:`lightning_xai.evaluation` shares: validation of maps, masks and inputs, pixel
ranking, and the DDP-correct metric states.

* :func:`heatmap_batch` / :func:`mask_batch` / :func:`check_image_batch`: validation (non-finite values raise,
  naming the samples: a broken explanation or input should be loud, never averaged away);
* :func:`token_map_batch` / :func:`check_token_batch`: the same for token models - one relevance per token
  position ``[B, T]``, token ids ``LongTensor[B, T]`` (never cast to float);
* :func:`descending_ranks`: the pixel order used by every rank-based score;
* :class:`PerSampleMeanMetric`: a mean of one value per sample with undefined samples excluded and counted;
* :class:`CurveMetric`: the same, also keeping each sample's perturbation curve;
* :func:`sample_keys`: the identity that seeds a sample's random perturbations.

**Every metric computes on a rank that saw no data** (a small validation set under DDP): every state is a
tensor or a one-dimensional ``"cat"`` list, so that torchmetrics' empty placeholder has the same number of
dimensions as the other ranks' states. ``compute()`` before any ``update()`` (on every rank) returns ``NaN``
(``Tensor[0]`` with ``return_per_sample=True``) after torchmetrics' warning; :meth:`CurveMetric.curve` raises a
``RuntimeError`` then, on every rank alike.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_xai.distributed import DistributedReducer, rank_and_world_size

__all__ = [
    "CurveMetric",
    "PerSampleMeanMetric",
    "check_image_batch",
    "check_token_batch",
    "descending_ranks",
    "heatmap_batch",
    "is_token_batch",
    "mask_batch",
    "sample_keys",
    "token_map_batch",
]


def _bad_samples(values: Tensor) -> list[int]:
    finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return (~finite).nonzero().flatten().tolist()


def heatmap_batch(attributions: Tensor, name: str = "attributions") -> Tensor:
    """Validate attribution maps and reduce them to one signed map per image, ``Tensor[B, H, W]``.

    Accepts ``[B, C, H, W]`` (channels are summed, so ``[B, 1, H, W]`` is simply squeezed) or ``[B, H, W]``.
    Raises ``TypeError`` for non-tensors or non-floating tensors and ``ValueError`` for other ranks, an empty
    batch and non-finite values (``NaN``/``inf``), naming the offending samples.
    """
    if not isinstance(attributions, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attributions).__name__}")
    if not attributions.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {attributions.dtype}")
    if attributions.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape [B, C, H, W] or [B, H, W], got {list(attributions.shape)}")
    if attributions.shape[0] == 0:
        raise ValueError(f"{name}: got an empty batch")
    bad = _bad_samples(attributions)
    if bad:
        raise ValueError(f"{name} contain NaN or inf values (samples {bad}); fix the explanation before scoring it")
    return attributions.sum(dim=1) if attributions.ndim == 4 else attributions


def check_image_batch(inputs: Tensor, name: str = "inputs") -> Tensor:
    """``inputs`` if it is a non-empty, finite, floating-point image batch ``[B, C, H, W]``; a ``NaN``/``inf``
    pixel raises a ``ValueError`` naming the samples (the model's scores on it would be meaningless)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {inputs.dtype}")
    if inputs.ndim != 4 or inputs.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty image batch [B, C, H, W], got shape {list(inputs.shape)}")
    bad = _bad_samples(inputs)
    if bad:
        raise ValueError(f"{name} contain NaN or inf values (samples {bad}); the model cannot be scored on them")
    return inputs


def mask_batch(masks: Tensor, heat: Tensor, name: str = "masks") -> Tensor:
    """Validate ground-truth ``masks`` against heatmaps ``heat [B, H, W]``; return a bool ``Tensor[B, H, W]``.

    Masks are ``[B, 1, H, W]`` or ``[B, H, W]``; bool, integer (non-zero = inside) or floating (``> 0.5``).
    ``name`` names the argument in errors.
    """
    if not isinstance(masks, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    squeezed = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    if squeezed.ndim != 3 or squeezed.shape != heat.shape:
        raise ValueError(
            f"{name} of shape {list(masks.shape)} do not match the attribution maps: expected [B, 1, H, W] or "
            f"[B, H, W] with [B, H, W] = {list(heat.shape)}"
        )
    if squeezed.dtype == torch.bool:
        out = squeezed
    elif squeezed.is_floating_point():
        bad = _bad_samples(squeezed)
        if bad:
            raise ValueError(f"{name} contain NaN or inf values (samples {bad})")
        out = squeezed > 0.5
    else:
        out = squeezed != 0
    return out.to(heat.device)


def token_map_batch(attributions: Tensor, name: str = "attributions") -> Tensor:
    """Validate token attributions: one signed relevance per token position, ``Tensor[B, T]`` (floating point,
    non-empty, finite - ``NaN``/``inf`` raise a ``ValueError`` naming the samples). Returned as given."""
    if not isinstance(attributions, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attributions).__name__}")
    if not attributions.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {attributions.dtype}")
    if attributions.ndim != 2 or attributions.shape[0] == 0 or attributions.shape[1] == 0:
        raise ValueError(f"token {name} must be a non-empty [B, T] tensor, got shape {list(attributions.shape)}")
    bad = _bad_samples(attributions)
    if bad:
        raise ValueError(f"{name} contain NaN or inf values (samples {bad}); fix the explanation before scoring it")
    return attributions


def scored_heat(attributions: Tensor, valid: Tensor | None) -> tuple[Tensor, bool]:
    """``(heat, tokens)``: image maps as :func:`heatmap_batch` gives them (``[B, H, W]``, ``tokens=False``), or token
    maps ``[B, T]`` as one-row images ``[B, 1, T]`` (``tokens=True``; callers lay their ``[B, T]`` masks out the
    same way with :func:`as_token_rows`). A 2-D map is read as tokens only with ``valid`` (bool ``[B, T]``: ``True``
    at the tokens, ``False`` at padding): without it ``[N, M]`` is ambiguous and raises."""
    if isinstance(attributions, Tensor) and attributions.ndim == 2:
        if valid is None:
            raise ValueError(
                f"attributions must have shape [B, C, H, W] or [B, H, W], got {list(attributions.shape)}; token maps "
                "[B, T] are scored with valid= (bool [B, T]: True at the tokens, False at padding)"
            )
        return token_map_batch(attributions).unsqueeze(1), True
    return heatmap_batch(attributions), False


def as_token_rows(values: Tensor | None) -> Tensor | None:
    """A ``[B, T]`` tensor as one-row images ``[B, 1, T]`` (anything else unchanged), to go with
    :func:`scored_heat`'s token maps."""
    return values.unsqueeze(1) if isinstance(values, Tensor) and values.ndim == 2 else values


def is_token_batch(inputs: object) -> bool:
    """Whether ``inputs`` are token ids: an integer (not bool) tensor ``[B, T]``."""
    return (
        isinstance(inputs, Tensor)
        and inputs.ndim == 2
        and not inputs.is_floating_point()
        and not inputs.is_complex()
        and inputs.dtype != torch.bool
    )


def check_token_batch(inputs: Tensor, name: str = "inputs") -> Tensor:
    """``inputs`` if it is a non-empty batch of token ids, an integer ``LongTensor[B, T]`` (ids are never cast
    to float: a perturbation replaces them by other ids)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
    if not is_token_batch(inputs) or inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty batch of token ids, an integer tensor [B, T], got {inputs.dtype} "
            f"{list(inputs.shape)}"
        )
    return inputs


#: Seed of the fixed pseudo-random order that breaks ties in :func:`descending_ranks` (``tie_break="random"``).
TIE_BREAK_SEED = 20_170_101


def descending_ranks(heat: Tensor, *, tie_break: str = "position") -> Tensor:
    """Rank of every element of ``heat [B, ...]`` by decreasing value per sample, 0 = most relevant.

    ``tie_break="position"`` keeps the flattened (row-major) order among equal values; ``"random"`` orders them
    by a fixed pseudo-random permutation of the positions (the same for every call, so results stay
    deterministic), so that a tie is never resolved in favour of the top rows - the order the deletion,
    insertion and region-perturbation curves use.
    """
    flat = heat.reshape(heat.shape[0], -1)
    n = flat.shape[1]
    if tie_break == "random":
        gen = torch.Generator().manual_seed(TIE_BREAK_SEED)
        perm = torch.randperm(n, generator=gen).to(flat.device)
        order = perm[torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices]
    elif tie_break == "position":
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    else:
        raise ValueError(f"unknown tie_break {tie_break!r}; valid values: ['position', 'random']")
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=flat.device).expand_as(order))
    return ranks.view_as(heat)


def constant_maps(heat: Tensor) -> Tensor:
    """``Tensor[B]`` bool: which maps are constant (all pixels equal) and so carry no ranking information."""
    flat = heat.reshape(heat.shape[0], -1)
    return (flat == flat[:, :1]).all(dim=1)


def sample_keys(num: int, sample_ids: Tensor | None, position: int, rank: int, world_size: int) -> Tensor:
    """The identity that seeds the random perturbations of each of ``num`` samples, ``LongTensor[num]``.

    ``sample_ids`` (the samples' dataset indices) when given: then the draws depend neither on batching nor on
    how the data is sharded over processes. Otherwise ``(position + i) * world_size + rank`` for the ``i``-th
    sample of a batch that starts at stream ``position`` of this process: distinct over processes, equal to the
    dataset index for a ``DistributedSampler`` without shuffling (and to the stream position in one process).
    """
    if sample_ids is None:
        return (torch.arange(num, dtype=torch.long) + position) * world_size + rank
    if not isinstance(sample_ids, Tensor) or sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
        got = sample_ids.dtype if isinstance(sample_ids, Tensor) else type(sample_ids).__name__
        raise ValueError(f"sample_ids must be an integer tensor [B] of dataset indices, got {got}")
    if sample_ids.shape != (num,):
        raise ValueError(f"sample_ids must have shape [{num}] (one index per sample), got {list(sample_ids.shape)}")
    if bool((sample_ids < 0).any()):
        raise ValueError(f"sample_ids must be non-negative dataset indices, got {sample_ids.tolist()}")
    return sample_ids.detach().to("cpu", torch.long)


class PerSampleMeanMetric(Metric):
    """A metric that is the mean of one value per sample, with undefined samples excluded and counted.

    Subclasses compute a ``Tensor[B]`` per batch (``NaN`` = excluded) and pass it to :meth:`_accumulate`. The
    states are a float64 sum, a count and an exclusion count (all ``dist_reduce_fx="sum"``), so :meth:`compute`
    is exact under DDP. With ``return_per_sample=True`` the per-sample values are also kept (a ``"cat"`` state)
    and :meth:`compute` returns them, ``NaN`` for excluded samples, in update order (under DDP: rank by rank).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, return_per_sample: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not isinstance(return_per_sample, bool):
            raise TypeError(f"return_per_sample must be a bool, got {return_per_sample!r}")
        self.return_per_sample = return_per_sample
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("excluded", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if return_per_sample:
            self.add_state("values", [], dist_reduce_fx="cat")
        # Images seen since the last reset (a plain attribute, local to the process): metrics with seeded random
        # perturbations and no sample_ids seed each image by its position in the stream (see sample_keys).
        self._seen = 0
        self._in_forward = False

    def forward(self, *args: object, **kwargs: object) -> object:
        self._in_forward = True  # Metric.forward resets the states internally; keep the stream position
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._in_forward = False

    def reset(self) -> None:
        super().reset()
        if not getattr(self, "_in_forward", False):
            self._seen = 0

    def _sample_keys(self, num: int, sample_ids: Tensor | None) -> Tensor:
        """:func:`sample_keys` for the next ``num`` samples of this process (rank from the metric's group)."""
        rank, world_size = rank_and_world_size(DistributedReducer(group=self.process_group))
        return sample_keys(num, sample_ids, self._seen, rank, world_size)

    def _accumulate(self, values: Tensor) -> None:
        self._seen += values.shape[0]
        values = values.detach().to(self.total.device)
        valid = ~torch.isnan(values)
        self.total += values[valid].double().sum()
        self.count += valid.sum()
        self.excluded += (~valid).sum()
        if self.return_per_sample:
            self.values.append(values.float())

    def compute(self) -> Tensor:
        """The mean over the non-excluded samples (``NaN`` if there are none), or the per-sample values."""
        if self.return_per_sample:
            return dim_zero_cat(self.values).float() if len(self.values) else torch.zeros(0, device=self.total.device)
        if int(self.count) == 0:
            return torch.tensor(float("nan"), device=self.total.device)
        return (self.total / self.count).float()

    @property
    def num_excluded(self) -> int:
        """How many samples were skipped as undefined (e.g. empty masks) since the last reset, in this process.
        Under DDP, read it inside ``with metric.sync_context():`` (on every rank) for the global count."""
        return int(self.excluded)


class CurveMetric(PerSampleMeanMetric):
    """A per-sample mean metric that also keeps each sample's curve, for :meth:`curve`.

    The curves of the scored (non-excluded) samples are stored flattened in a one-dimensional ``"cat"`` state
    (so that a rank without samples synchronises an empty placeholder of the same rank), with the number of
    points per curve in a ``"max"`` state.
    """

    def __init__(self, return_per_sample: bool = False, **kwargs: object) -> None:
        super().__init__(return_per_sample=return_per_sample, **kwargs)
        self.add_state("curves", [], dist_reduce_fx="cat")
        self.add_state("num_points", torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")
        self._axis: Tensor | None = None

    def _record(self, axis: Tensor, scores: Tensor, values: Tensor) -> None:
        if self._axis is not None and self._axis.numel() != axis.numel():
            raise ValueError(
                f"this batch gives curves of {axis.numel()} points but earlier batches gave {self._axis.numel()} "
                "(images of different sizes with `step`/region-based steps); use one image size per metric"
            )
        self._axis = axis.detach().cpu().float()
        self.num_points.fill_(axis.numel())
        kept = scores.detach().float().to(self.total.device)[~torch.isnan(values.to(self.total.device))]
        self.curves.append(kept.reshape(-1))
        self._accumulate(values)

    def reset(self) -> None:
        super().reset()
        self._axis = None

    def curve(self) -> tuple[Tensor, Tensor]:
        """``(x, mean_scores)`` for plotting: the curve's x axis and the mean score over all scored samples
        (synchronised across DDP ranks: call it on every rank, also on ranks that saw no data). Raises a
        ``RuntimeError`` on every rank when no rank has scored a sample."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            points = int(self.num_points)
            curves = dim_zero_cat(self.curves) if len(self.curves) else torch.zeros(0, device=self.total.device)
        axis = self._axis
        if points > 0 and self.distributed_available_fn():  # a rank without data learns the axis from the others
            local = torch.full((points,), -torch.inf) if axis is None else axis
            gather = self.dist_sync_fn or gather_all_tensors
            axis = torch.stack(gather(local.to(self.total.device).float(), group=self.process_group)).amax(0).cpu()
        if points == 0 or curves.numel() == 0 or axis is None:
            raise RuntimeError(f"{type(self).__name__}.curve() called before update() scored any sample")
        mean = curves.view(-1, points).mean(dim=0)
        return axis.to(mean.device), mean


def renamed_argument(owner: str, old: str, new: str, old_value: object, new_value: object) -> object:
    """The value of an argument renamed from ``old`` to ``new``: ``new_value``, or - with a
    ``DeprecationWarning`` - ``old_value`` when the caller still passes the old name (``None`` = not passed)."""
    if old_value is None:
        return new_value
    warnings.warn(f"{owner}: {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
    return old_value
