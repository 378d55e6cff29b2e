"""What a callback keeps and reports: configuration errors, runtime fault records, and how histories merge.

Histories are lists of records keyed by ``(stage, step)``; :func:`merge_records` combines a loaded checkpoint's
records with those in memory so that nothing is rolled back (a ``trainer.validate(ckpt_path=...)`` after ``fit``
appends) and nothing is duplicated (a resumed run continues).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_xai.callbacks.probe import ProbeBatch

__all__ = ["ConfigurationError", "ErrorLog", "ErrorRecord", "ValidationContext", "merge_records", "record_key"]


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
