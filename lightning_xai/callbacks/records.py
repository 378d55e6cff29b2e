"""What a callback keeps and reports: configuration errors, runtime fault records, and how histories merge.

Histories are lists of records keyed by ``(stage, step)``; :func:`merge_records` combines a loaded checkpoint's
records with those in memory so that nothing is rolled back (a ``trainer.validate(ckpt_path=...)`` after ``fit``
appends) and nothing is duplicated (a resumed run continues). :class:`ResumableState` is the callback's
``state_dict`` / ``load_state_dict`` built on them (a mixin of :class:`~lightning_xai.callbacks.base.XAICallback`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import Tensor

from lightning_xai.callbacks.probe import ProbeBatch

__all__ = [
    "ConfigurationError",
    "ErrorLog",
    "ErrorRecord",
    "ResumableState",
    "ValidationContext",
    "merge_records",
    "record_key",
]


class ConfigurationError(ValueError):
    """A callback's configuration does not fit the model or the data (raised before the first training step)."""


@dataclass
class ErrorRecord:
    """One runtime fault of a callback: where it happened and what it was (``"text" in record`` searches the
    message)."""

    stage: str
    epoch: int
    step: int
    method: str | None
    message: str

    def __contains__(self, text: str) -> bool:
        return text in self.message

    def __str__(self) -> str:
        return self.message


class ErrorLog(list):
    """The :class:`ErrorRecord` s of a callback, oldest first; ``errors["gradcam"]`` is the last message of that
    method (``KeyError`` if it never failed)."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for record in reversed(self):
                if record.method == key:
                    return record.message
            raise KeyError(key)
        return super().__getitem__(key)

    def methods(self) -> set[str]:
        return {r.method for r in self if r.method}



@dataclass
class ValidationContext:
    """What the dry pass at setup saw, handed to :meth:`XAICallback.validate`."""

    probe: ProbeBatch | None
    logits: Tensor | None
    dataset: Any


def record_key(record: Any) -> Any:
    if isinstance(record, Mapping):
        return (record.get("stage"), record.get("step"), record.get("epoch"), repr(sorted(record.keys())))
    return repr(record)


def merge_records(first: Iterable[Any], second: Iterable[Any], key: Callable[[Any], Any]) -> list[Any]:
    """``first`` then the records of ``second`` whose key is not in ``first`` (order kept, no duplicates)."""
    merged = list(first)
    seen = {key(r) for r in merged}
    for record in second:
        if key(record) not in seen:
            merged.append(record)
            seen.add(key(record))
    return merged


class ResumableState:
    """A callback's checkpointed state: the fields it declares in ``state_fields``, its error records and its
    probe indices. Loading merges record lists with what is in memory (:meth:`merge_state`), so that nothing is
    rolled back. Expects ``state_fields``, ``errors`` and ``probe`` (a ``ProbeSet`` or ``None``) on the callback."""

    state_fields: ClassVar[tuple[str, ...]] = ()
    errors: ErrorLog
    probe: Any

    def state_dict(self) -> dict[str, Any]:
        state = {field: getattr(self, field) for field in self.state_fields}
        state["errors"] = [asdict(e) for e in self.errors]
        if self.probe is not None:
            state["probe_indices"] = None if self.probe.fixed else self.probe.indices
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.probe is not None and not self.probe.fixed and state_dict.get("probe_indices") is not None:
            self.probe.indices = list(state_dict["probe_indices"])
        loaded_errors = [ErrorRecord(**e) if isinstance(e, Mapping) else e for e in state_dict.get("errors", [])]
        self.errors = ErrorLog(
            merge_records(loaded_errors, self.errors, key=lambda e: (e.stage, e.step, e.method, e.message))
        )
        for field in self.state_fields:
            if field in state_dict:
                setattr(self, field, self.merge_state(field, getattr(self, field, None), state_dict[field]))

    def merge_state(self, field: str, current: Any, loaded: Any) -> Any:
        """How a loaded field combines with the one in memory: lists of records (dicts with ``stage`` and
        ``step``) are merged by ``(stage, step)`` so that nothing is rolled back; anything else is replaced."""
        if isinstance(current, list) and isinstance(loaded, list) and current:
            return merge_records(loaded, current, key=record_key)
        return loaded
