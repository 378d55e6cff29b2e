"""Reading inputs, labels and masks out of batches, and logits out of model outputs - written once for every layer.

A user's run may yield batches as a tensor, a tuple ``(x, y, ...)``, a dict with any keys, or an object with
attributes (a dataclass, a HuggingFace ``BatchEncoding``), and its model may return a tensor, a tuple, a dict or a
HuggingFace-style output with ``.logits``. :class:`BatchReader` and :class:`OutputReader` read them with sensible
defaults and take an explicit key (a dict key, an attribute name, a tuple position) or a callable when the defaults
do not fit. A batch or output they cannot read raises a :class:`ValueError` naming what was found and the argument
that configures it. Pure torch: usable from a notebook, from attributors, metrics, callbacks and models alike.

:func:`outputs_as_logits` makes any model look like a ``x -> logits`` model for the duration of a ``with`` block
(a forward hook on the root module, removed on exit), so that every attributor and metric works on models whose
``forward`` returns a dict or an object, without renaming any layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CONCEPT_KEYS",
    "INPUT_KEYS",
    "LABEL_KEYS",
    "MASK_KEYS",
    "OUTPUT_KEYS",
    "BatchReader",
    "Key",
    "OutputReader",
    "Sample",
    "outputs_as_logits",
    "read_logits",
]

#: A field of a batch: a dict key or attribute name, a tuple position, or a callable ``batch -> value``.
Key = str | int | Callable[[Any], Any]

INPUT_KEYS = ("image", "images", "pixel_values", "input", "inputs", "x", "input_ids", "data", "tokens")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "classes")
MASK_KEYS = ("mask", "masks", "evidence_mask", "segmentation", "gt_mask")
CONCEPT_KEYS = ("concepts", "concept_labels", "concept")
OUTPUT_KEYS = ("logits", "logit", "output", "outputs", "scores", "y_hat", "preds", "prediction")


@dataclass
class Sample:
    """What a batch (or one dataset item) holds for the library: the model input, and labels / masks if any."""

    inputs: Any
    labels: Tensor | None = None
    masks: Tensor | None = None


def _fields(batch: Any) -> list[str]:
    """The names a user could pass as a key, for error messages."""
    if isinstance(batch, Mapping):
        return [str(k) for k in batch]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return [f"{i} ({type(v).__name__})" for i, v in enumerate(batch)]
    names = [n for n in vars(batch)] if hasattr(batch, "__dict__") else []
    return [n for n in names if not n.startswith("_")]


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a Tensor of shape {list(batch.shape)}"
    return f"a {type(batch).__name__} with fields {_fields(batch)}"


def _get(batch: Any, key: Key) -> Any:
    if callable(key):
        return key(batch)
    if isinstance(key, int) and not isinstance(key, bool):
        return batch[key]
    if isinstance(batch, Mapping):
        return batch[key]
    return getattr(batch, key)


def _find(batch: Any, keys: Sequence[str]) -> Any:
    if isinstance(batch, Mapping):
        return next((batch[k] for k in keys if k in batch), None)
    return next((getattr(batch, k) for k in keys if getattr(batch, k, None) is not None), None)


def _locate(batch: Any, keys: Sequence[str]) -> str | None:
    """The first of ``keys`` that :func:`_find` would read (``None`` if none is there)."""
    if isinstance(batch, Mapping):
        return next((k for k in keys if k in batch), None)
    return next((k for k in keys if getattr(batch, k, None) is not None), None)


def _replaced(batch: Any, key: str | int, value: Any) -> Any:
    """A shallow copy of ``batch`` with the field ``key`` set to ``value`` (the container type kept)."""
    if isinstance(batch, Mapping):
        out = copy.copy(batch) if isinstance(batch, MutableMapping) else dict(batch)
        out[key] = value
        return out
    if _is_sequence(batch) and isinstance(key, int):
        items = list(batch)
        items[key] = value
        if isinstance(batch, tuple):
            return type(batch)._make(items) if hasattr(type(batch), "_make") else tuple(items)  # namedtuples too
        return items
    if isinstance(key, str) and not isinstance(batch, Tensor) and hasattr(batch, "__dict__"):
        out = copy.copy(batch)
        setattr(out, key, value)
        return out
    raise TypeError(f"cannot set field {key!r} of {_describe(batch)}")


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _valid_key(key: object) -> bool:
    return key is None or (not isinstance(key, bool) and (isinstance(key, (str, int)) or callable(key)))


def _as_tensor(value: Any) -> Tensor | None:
    if value is None or isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class BatchReader:
    """Reads ``(inputs, labels, masks)`` from a batch or a dataset item.

    Args:
        input_key: where the model input is; ``None`` finds it: a tensor batch is the input, a tuple's first
            element, a dict's or object's first field among :data:`INPUT_KEYS`.
        label_key: where the labels are; ``None``: a tuple's second element, else the first of :data:`LABEL_KEYS`
            (no labels if none is found).
        mask_key: where ground-truth masks are; ``None``: a tuple's third element when it is a tensor, else the
            first of :data:`MASK_KEYS`.
        owner: who reads (named in error messages, e.g. the callback's class name).
        concept_key: where concept labels are (read by :meth:`concepts` only, never by :meth:`read`); ``None``: a
            tuple's third element - the layout of :class:`~lightning_xai.data.concepts.ConceptDataModule`'s
            ``(images, labels, concept_labels)`` batches; datasets with evidence masks put their masks there, and
            each reader reads the third element as what it asks for - else the first of :data:`CONCEPT_KEYS`.

    Each key is a dict key or attribute name (``"pixel_values"``), a tuple position (``0``) or a callable
    ``batch -> value``. :meth:`labels` and :meth:`concepts` take ``required=True`` for readers that cannot do
    without them: a batch without them then raises a :class:`ValueError` naming the owner, what is missing, what
    the batch holds and the argument to pass. :meth:`with_inputs` writes a new input back where :meth:`inputs`
    reads it (for methods that transform the input and then run a model's own step on it).
    """

    def __init__(
        self,
        input_key: Key | None = None,
        label_key: Key | None = None,
        mask_key: Key | None = None,
        *,
        owner: str | None = None,
        concept_key: Key | None = None,
    ) -> None:
        keys = {"input_key": input_key, "label_key": label_key, "mask_key": mask_key, "concept_key": concept_key}
        for name, key in keys.items():
            if not _valid_key(key):
                raise ValueError(
                    f"{owner + ': ' if owner else ''}{name} must be a key (str), a position (int), a callable "
                    f"or None, got {key!r}"
                )
        self.input_key = input_key
        self.label_key = label_key
        self.mask_key = mask_key
        self.concept_key = concept_key
        self.owner = owner

    def _where(self) -> str:
        return f"{self.owner}: " if self.owner else ""

    def read(self, batch: Any) -> Sample:
        """The sample's ``inputs`` (required), ``labels`` and ``masks`` (``None`` where absent)."""
        return Sample(self.inputs(batch), self.labels(batch), self.masks(batch))

    __call__ = read

    def _explicit(self, batch: Any, name: str, key: Key) -> Any:
        """The field at an explicitly given ``key``; a clear error naming the argument when it is not there."""
        try:
            return _get(batch, key)
        except (KeyError, AttributeError, IndexError, TypeError) as err:
            raise ValueError(f"{self._where()}{name}={key!r} is not in the batch ({_describe(batch)})") from err

    def inputs(self, batch: Any) -> Any:
        if self.input_key is not None:
            return self._explicit(batch, "input_key", self.input_key)
        if isinstance(batch, Tensor):
            return batch
        if _is_sequence(batch) and len(batch) > 0:
            return batch[0]
        if not isinstance(batch, Mapping) and not hasattr(batch, "__dict__"):
            raise TypeError(
                f"{self._where()}cannot read an input from a {type(batch).__name__}; expected a Tensor, a tuple/list, "
                "a dict or an object with fields (or pass input_key= as a callable)"
            )
        found = _find(batch, INPUT_KEYS)
        if found is None:
            raise ValueError(
                f"{self._where()}cannot find the input in {_describe(batch)}; none of the default keys "
                f"{list(INPUT_KEYS)} is there: pass input_key= (a key, a position or a callable)"
            )
        return found

    def labels(self, batch: Any, *, required: bool = False) -> Tensor | None:
        """The labels (``None`` where absent; with ``required=True`` a batch without labels raises)."""
        if self.label_key is not None:
            return _as_tensor(self._explicit(batch, "label_key", self.label_key))
        value = _as_tensor(self._default(batch, position=1, keys=LABEL_KEYS))
        if value is None and required:
            raise self._missing(batch, "labels", "label_key", position=1, keys=LABEL_KEYS)
        return value

    def concepts(self, batch: Any, *, required: bool = False) -> Tensor | None:
        """The concept labels (e.g. float 0/1 ``[B, k]``) at ``concept_key`` (``None`` where absent; with
        ``required=True`` a batch without them raises)."""
        if self.concept_key is not None:
            return _as_tensor(self._explicit(batch, "concept_key", self.concept_key))
        value = _as_tensor(self._default(batch, position=2, keys=CONCEPT_KEYS))
        if value is None and required:
            raise self._missing(batch, "concept labels", "concept_key", position=2, keys=CONCEPT_KEYS)
        return value

    def with_inputs(self, batch: Any, inputs: Any) -> Any:
        """A shallow copy of ``batch`` whose input - the field :meth:`inputs` reads - is ``inputs`` (the container
        type kept: a tuple, a list, a namedtuple, a dict, an object with attributes; a tensor batch is replaced)."""
        key = self.input_key
        if key is None:
            if isinstance(batch, Tensor):
                return inputs
            self.inputs(batch)  # the same errors as reading: no input, not a container
            key = 0 if _is_sequence(batch) else _locate(batch, INPUT_KEYS)
        elif callable(key):
            raise ValueError(
                f"{self._where()}input_key={key!r} is a callable: it reads the input but cannot write one back; "
                "pass input_key= as a key or a position"
            )
        else:
            self._explicit(batch, "input_key", key)
        try:
            return _replaced(batch, key, inputs)
        except (TypeError, AttributeError) as err:
            raise ValueError(f"{self._where()}cannot replace the input of {_describe(batch)}: {err}") from err

    def _missing(self, batch: Any, what: str, argument: str, *, position: int, keys: Sequence[str]) -> ValueError:
        """The error for a required field found nowhere by default."""
        if isinstance(batch, Tensor):
            where = "a bare tensor batch holds only the input"
        elif _is_sequence(batch):
            where = f"expected at position {position} of the tuple"
        else:
            where = f"none of the default keys {list(keys)} is there"
        return ValueError(
            f"{self._where()}the batch has no {what}: it is {_describe(batch)}; {where}: pass {argument}= (a key, "
            "a position or a callable)"
        )

    def masks(self, batch: Any) -> Tensor | None:
        if self.mask_key is not None:
            return _as_tensor(self._explicit(batch, "mask_key", self.mask_key))
        value = self._default(batch, position=2, keys=MASK_KEYS)
        return value if isinstance(value, Tensor) else None

    @staticmethod
    def _default(batch: Any, *, position: int, keys: Sequence[str]) -> Any:
        """An optional field found by default: a tuple's ``position``, else the first of ``keys`` (``None`` for a
        bare tensor batch)."""
        if isinstance(batch, Tensor):
            return None
        if _is_sequence(batch):
            return batch[position] if len(batch) > position else None
        return _find(batch, keys)

    def __repr__(self) -> str:
        concept = f", concept_key={self.concept_key!r}" if self.concept_key is not None else ""
        return (f"BatchReader(input_key={self.input_key!r}, label_key={self.label_key!r}, "
                f"mask_key={self.mask_key!r}{concept})")


class OutputReader:
    """Reads the logits (the tensor targets are taken from) out of a model's output.

    Args:
        output_key: ``None`` finds them: a tensor is returned as is, a tuple/list gives its first element, a dict
            or an object (a HuggingFace ``ModelOutput``) its first field among :data:`OUTPUT_KEYS`; otherwise a dict
            key / attribute name, a tuple position or a callable ``output -> Tensor``.
        owner: who reads (named in error messages).
    """

    def __init__(self, output_key: Key | None = None, *, owner: str | None = None) -> None:
        if not _valid_key(output_key):
            raise ValueError(
                f"{owner + ': ' if owner else ''}output_key must be a key (str), a position (int), a callable or "
                f"None, got {output_key!r}"
            )
        self.output_key = output_key
        self.owner = owner

    def __call__(self, output: Any) -> Tensor:
        where = f"{self.owner}: " if self.owner else ""
        if self.output_key is not None:
            try:
                value = _get(output, self.output_key)
            except (KeyError, AttributeError, IndexError, TypeError) as err:
                raise ValueError(
                    f"{where}output_key={self.output_key!r} is not in the model output ({_describe(output)})"
                ) from err
        elif isinstance(output, Tensor):
            return output
        elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)) and len(output) > 0:
            value = output[0]
        else:
            value = _find(output, OUTPUT_KEYS)
            if value is None and isinstance(output, Mapping):
                tensors = [v for v in output.values() if isinstance(v, Tensor)]
                value = tensors[0] if len(tensors) == 1 else None
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{where}cannot read logits from the model output ({_describe(output)}); none of the default keys "
                f"{list(OUTPUT_KEYS)} holds a tensor: pass output_key= (a key, a position or a callable)"
            )
        return value

    def __repr__(self) -> str:
        return f"OutputReader(output_key={self.output_key!r})"


def read_logits(output: Any) -> Tensor:
    """The logits of a model output with the default rules of :class:`OutputReader`."""
    return _DEFAULT_OUTPUT(output)


_DEFAULT_OUTPUT = OutputReader()


@contextmanager
def outputs_as_logits(model: nn.Module, reader: OutputReader | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model(x)`` returns ``reader(original output)`` (a forward hook on the root module).

    A model whose output already is a tensor (and no ``reader`` was given) is left alone. The hook is removed on
    exit, also when the block raises.
    """
    reader = _DEFAULT_OUTPUT if reader is None else reader

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Tensor:
        if isinstance(output, Tensor) and reader.output_key is None:
            return output
        return reader(output)

    handle = model.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()
