"""Collectives over data-parallel processes, written once and used by every layer (pure torch, no Lightning).

Everything in the library that aggregates over data - callbacks' probe sets, dissection's quantile sketches, the
concept bottleneck's intervention percentiles, concept whitening's statistics, ProtoPNet's push, activation caches,
probes and sparse autoencoders - reduces through a :class:`Reducer`:

* :class:`Reducer` is the single-process reducer (every collective returns the local value, shaped as if one rank
  took part);
* :class:`DistributedReducer` runs the collectives with :mod:`torch.distributed` (identical to :class:`Reducer`
  when no process group is initialised); under Lightning's DDP that is the group the strategy set up;
* :class:`ThreadGroup` simulates ``world_size`` ranks with threads inside one process, so that every distributed
  code path can be tested exactly (same collectives, same order) without spawning processes.

Besides the elementwise ``sum`` / ``min`` / ``max`` and the stacking ``gather`` of equal shapes, the helpers
:func:`gather_rows` (rows of different counts per rank, concatenated in rank order), :func:`broadcast` and
:func:`agree` (an "everyone succeeded?" vote, so that a failure on one rank never leaves the others waiting in a
collective) are built on those four operations.

A collective must be called by every rank, in the same order; that is the caller's contract.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DistributedReducer",
    "RankFailed",
    "Reducer",
    "ThreadGroup",
    "agree",
    "broadcast",
    "default_reducer",
    "gather_rows",
    "rank_and_world_size",
    "run_agreed",
    "shard_bounds",
    "sum_over_ranks",
]

#: ``reduce(tensor, op)`` with ``op`` in ``"sum" | "min" | "max"`` returns the reduction over all processes.
ReduceFn = Callable[[Tensor, str], Tensor]


class RankFailed(RuntimeError):
    """Raised on every rank when another rank failed the same stage (the failing rank raises its own error)."""


class Reducer:
    """Combines a tensor over all processes: ``reducer(tensor, op)`` with ``op`` one of ``"sum"``, ``"min"``,
    ``"max"`` (elementwise, same shape back) or ``"gather"`` (``[world_size, *shape]``, in rank order).

    This base class is the single-process reducer (every op returns the local value). Subclasses run the
    reductions through a backend: :class:`DistributedReducer`, or the threads of :class:`ThreadGroup` in tests.
    """

    OPS = ("sum", "min", "max", "gather")

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    def __call__(self, tensor: Tensor, op: str) -> Tensor:
        self._check(tensor, op)
        return tensor[None] if op == "gather" else tensor

    def _check(self, tensor: Tensor, op: str) -> None:
        if op not in self.OPS:
            raise ValueError(f"unknown reduction {op!r}; valid ones: {list(self.OPS)}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"can only reduce tensors, got {type(tensor).__name__}")


class DistributedReducer(Reducer):
    """Reductions with :mod:`torch.distributed` (identical to :class:`Reducer` when it is not initialised).

    Args:
        device: where the collectives run; ``None`` picks the current CUDA device for the NCCL backend and the
            tensor's own device otherwise. Results come back on the input's device.
        group: the process group (default: the world).
    """

    def __init__(self, device: torch.device | str | None = None, group: object | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.group = group

    @staticmethod
    def _active() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.group) if self._active() else 1

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.group) if self._active() else 0

    def _device_for(self, tensor: Tensor) -> torch.device:
        import torch.distributed as dist

        if self.device is not None:
            return self.device
        if dist.get_backend(self.group) == "nccl" and tensor.device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return tensor.device

    def __call__(self, tensor: Tensor, op: str) -> Tensor:
        self._check(tensor, op)
        if not self._active() or self.world_size == 1:
            return super().__call__(tensor, op)
        import torch.distributed as dist

        local = tensor.detach().to(self._device_for(tensor)).contiguous().clone()
        if op == "gather":
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local, group=self.group)
            result = torch.stack(parts)
        else:
            reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
            dist.all_reduce(local, op=reduce_op, group=self.group)
            result = local
        return result.to(tensor.device)


def default_reducer() -> Reducer:
    """:class:`DistributedReducer` when :mod:`torch.distributed` is initialised, else the local :class:`Reducer`."""
    return DistributedReducer() if DistributedReducer._active() else Reducer()


def rank_and_world_size(reducer: Reducer | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` without a process group)."""
    reducer = default_reducer() if reducer is None else reducer
    return reducer.rank, reducer.world_size


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """``(start, stop, per_rank)``: this rank's contiguous slice of ``total`` items, the slices padded to one size
    ``per_rank = ceil(total / world_size)`` (the last ranks may hold fewer, or no, real items)."""
    per_rank = -(-total // world_size)
    start = min(rank * per_rank, total)
    stop = min(start + per_rank, total)
    return start, stop, per_rank


# ------------------------------------------------------------------------------------------------------ helpers
def agree(ok: bool, reducer: Reducer | None = None) -> bool:
    """Whether every rank passed ``ok=True`` (a vote that every rank must join)."""
    reducer = default_reducer() if reducer is None else reducer
    if reducer.world_size == 1:
        return bool(ok)
    flag = torch.tensor([1.0 if ok else 0.0])
    return bool(float(reducer(flag, "min")) > 0.5)


def run_agreed(fn: Callable[[], Any], reducer: Reducer | None = None) -> Any:
    """Run ``fn`` on this rank, then vote: the failing rank re-raises its own error, the others :class:`RankFailed`,
    so that no rank goes on to a collective that another rank will never join."""
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # re-raised below, after the vote every rank joins
        error = err
    if not agree(error is None, reducer) and error is None:
        error = RankFailed("another rank failed this stage; see its warning")
    if error is not None:
        raise error
    return result


def broadcast(tensor: Tensor, src: int = 0, reducer: Reducer | None = None) -> Tensor:
    """Rank ``src``'s ``tensor`` on every rank (every rank passes a tensor of the same shape and dtype)."""
    reducer = default_reducer() if reducer is None else reducer
    if reducer.world_size == 1:
        return tensor
    return reducer(tensor, "gather")[src].clone()


def gather_rows(rows: Tensor, reducer: Reducer | None = None) -> Tensor:
    """Concatenate every rank's ``rows[n_r, ...]`` in rank order; ranks may hold different counts (also none).

    Rows are padded to the largest count for the collective and the padding dropped afterwards.
    """
    reducer = default_reducer() if reducer is None else reducer
    if reducer.world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = reducer(count, "gather").reshape(-1).tolist()
    largest = max(counts)
    if largest == 0:
        return rows[:0]
    padded = rows.new_zeros((largest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = reducer(padded, "gather")
    return torch.cat([parts[r, :n] for r, n in enumerate(counts)])


def sum_over_ranks(tensor: Tensor, reducer: Reducer | None = None) -> Tensor:
    """Elementwise sum of ``tensor`` over every rank."""
    reducer = default_reducer() if reducer is None else reducer
    return reducer(tensor, "sum")


# ---------------------------------------------------------------------------------------------------- testing
class ThreadGroup:
    """``world_size`` simulated ranks in one process, one thread each, exchanging tensors at barriers.

    ``ThreadGroup(2).run(fn)`` calls ``fn(reducer)`` on two threads, each with its own :class:`Reducer` whose
    collectives really exchange the ranks' tensors, and returns the per-rank results in rank order (the first
    exception of any rank is re-raised). Used to test distributed code paths without spawning processes. Give
    each rank its own model replica (``copy.deepcopy``), as each DDP process has: forward hooks are per module, so
    two threads capturing on one shared model would record each other's activations.
    """

    def __init__(self, world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"ThreadGroup: world_size must be an integer >= 1, got {world_size!r}")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Tensor | None] = [None] * world_size

    def reducer(self, rank: int) -> Reducer:
        return _ThreadReducer(self, rank)

    def _exchange(self, rank: int, tensor: Tensor, op: str) -> Tensor:
        self._slots[rank] = tensor.detach().clone()
        self._barrier.wait()
        parts = list(self._slots)
        shapes = {tuple(p.shape) for p in parts}  # type: ignore[union-attr]
        self._barrier.wait()  # every rank has read the slots before any rank writes the next ones
        if len(shapes) != 1:
            raise RuntimeError(f"collective {op!r} called with different shapes on different ranks: {sorted(shapes)}")
        stacked = torch.stack(parts)  # type: ignore[arg-type]
        if op == "gather":
            return stacked
        if op == "sum":
            return stacked.sum(0)
        return stacked.amin(0) if op == "min" else stacked.amax(0)

    def run(self, fn: Callable[[Reducer], Any], *, timeout: float = 60.0) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(self.reducer(rank))
            except BaseException as err:  # reported to the caller below
                errors[rank] = err
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"ThreadGroup: a rank did not finish within {timeout} s (a collective was not joined)")
        return results


class _ThreadReducer(Reducer):
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self._rank = rank

    @property
    def world_size(self) -> int:
        return self._group.world_size

    @property
    def rank(self) -> int:
        return self._rank

    def __call__(self, tensor: Tensor, op: str) -> Tensor:
        self._check(tensor, op)
        return self._group._exchange(self._rank, tensor, op)
