"""What a callback explains: one target specification shared by every callback, beyond single-label classification.

A callback's ``target=`` is one of

* ``"prediction"`` - the predicted class (argmax of the logits);
* ``"label"`` - the true class from the data;
* an ``int`` - that class for every sample;
* ``"multilabel"`` - each positive label of a multi-label model (sigmoid outputs): every sample is explained once
  per label whose probability exceeds ``threshold`` (the labels from the data when it has multi-hot labels, else
  the predicted ones); the rows of the result name ``(sample, class)`` pairs;
* ``"regression"`` - the model's (single) output itself, for regression models (``[B]`` or ``[B, 1]`` outputs);
* ``"segmentation:<class>"`` - the summed logit of ``<class>`` over the pixels predicted as that class (a
  segmentation model's ``[B, C, H, W]`` output);
* a callable ``output -> Tensor[B]`` (e.g. :func:`lightning_xai.attribution.contrastive_target`), or the import
  path of one as a string, ``"package.module:function"`` (usable from YAML).

:class:`TargetSpec` parses the value at construction (a bad value raises at once), checks it against the model's
output and the data at setup (a class out of range raises there, before the first training step), and resolves it
for a probe batch into :class:`ResolvedTargets`: which rows of the batch are explained and with what target.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_xai.checks import prefix

__all__ = ["RegressionTarget", "ResolvedTargets", "SegmentationTarget", "TargetSpec"]

_NAMED = ("prediction", "label", "multilabel", "regression")


class RegressionTarget:
    """The model's output itself, ``output.reshape(B, -1)[:, index]`` (for regression models)."""

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def __call__(self, output: Tensor) -> Tensor:
        flat = output.reshape(output.shape[0], -1)
        if self.index >= flat.shape[1]:
            raise ValueError(f"regression output index {self.index} is out of range for {flat.shape[1]} outputs")
        return flat[:, self.index]

    def __repr__(self) -> str:
        return f"RegressionTarget({self.index})"


class SegmentationTarget:
    """The logit of class ``c`` summed over the pixels where the model predicts ``c`` (``[B, C, H, W]`` outputs).

    The mask is taken from the output (detached), so the score is the evidence for the predicted region of ``c``.
    """

    def __init__(self, class_index: int) -> None:
        self.class_index = class_index

    def __call__(self, output: Tensor) -> Tensor:
        if output.ndim < 3:
            raise ValueError(f"a segmentation target needs a [B, C, H, W] output, got shape {list(output.shape)}")
        if self.class_index >= output.shape[1]:
            raise ValueError(
                f"segmentation class {self.class_index} is out of range for {output.shape[1]} output channels"
            )
        mask = (output.detach().argmax(dim=1) == self.class_index).to(output.dtype)
        return (output[:, self.class_index] * mask).flatten(1).sum(dim=1)

    def __repr__(self) -> str:
        return f"SegmentationTarget({self.class_index})"


@dataclass
class ResolvedTargets:
    """The rows of a probe batch that are explained (``rows``, indices into the batch) and their ``target``
    (a ``LongTensor`` of classes, one per row, or a callable ``output -> Tensor[len(rows)]``), with a short
    human-readable name of each row's target (``names``) for captions and tables."""

    rows: Tensor
    target: Tensor | Callable[[Tensor], Tensor]
    names: list[str]

    def classes(self) -> Tensor | None:
        return self.target if isinstance(self.target, Tensor) else None


def _load_callable(path: str, owner: str | None) -> Callable[[Tensor], Tensor]:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{prefix(owner)}cannot import the target {path!r}: {err}") from err
    if not callable(obj):
        raise ValueError(f"{prefix(owner)}the target {path!r} is not callable")
    return obj


class TargetSpec:
    """A parsed ``target=`` value (see the module docstring).

    Args:
        target: the value given to the callback.
        threshold: probability threshold of the ``"multilabel"`` target.
        owner: the callback's name, for error messages.
    """

    def __init__(self, target: Any, *, threshold: float = 0.5, owner: str | None = None) -> None:
        self.owner = owner
        self.threshold = threshold
        self.value = target
        self.fn: Callable[[Tensor], Tensor] | None = None
        self.index: int | None = None
        if isinstance(target, bool):
            raise ValueError(self._invalid(target))
        if isinstance(target, int):
            if target < 0:
                raise ValueError(f"{prefix(owner)}a class-index target must be >= 0, got {target}")
            self.kind, self.index = "index", target
        elif isinstance(target, str) and target in _NAMED:
            self.kind = target
            if target == "regression":
                self.fn = RegressionTarget()
        elif isinstance(target, str) and target.startswith("segmentation:"):
            suffix = target.split(":", 1)[1]
            if not suffix.isdigit():
                raise ValueError(f"{prefix(owner)}target {target!r} must be 'segmentation:<class index>'")
            self.kind, self.index = "segmentation", int(suffix)
            self.fn = SegmentationTarget(self.index)
        elif isinstance(target, str) and ":" in target:
            self.kind, self.fn = "callable", _load_callable(target, owner)
        elif callable(target):
            self.kind, self.fn = "callable", target
        else:
            raise ValueError(self._invalid(target))

    def _invalid(self, target: Any) -> str:
        return (
            f"{prefix(self.owner)}target must be 'prediction', 'label', a class index "
            "(int >= 0), 'multilabel', 'regression', 'segmentation:<class>', a callable output -> Tensor[B], or "
            f"the import path of one ('package.module:function'), got {target!r}"
        )

    @property
    def needs_labels(self) -> bool:
        return self.kind == "label"

    def check(self, logits: Tensor, labels: Tensor | None) -> None:
        """Check the target against one batch of model outputs and labels (at setup); raises a clear error."""
        where = prefix(self.owner)
        if self.kind == "label" and labels is None:
            raise ValueError(f"{where}target='label' but the data has no labels; use target='prediction' "
                             "or pass label_key=")
        if self.kind in ("prediction", "label", "index", "multilabel") and logits.ndim != 2:
            raise ValueError(
                f"{where}target={self.value!r} needs class scores [B, num_classes] from the model, got shape "
                f"{list(logits.shape)}; use target='regression', 'segmentation:<class>' or a callable"
            )
        if self.kind == "index" and self.index is not None and self.index >= logits.shape[1]:
            raise ValueError(
                f"{where}target class {self.index} is out of range: the model has {logits.shape[1]} outputs "
                f"(valid classes 0..{logits.shape[1] - 1})"
            )
        if self.kind == "label" and labels is not None:
            if labels.ndim == 1 and labels.numel() and (int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0):
                raise ValueError(
                    f"{where}labels in the data range over {int(labels.min())}..{int(labels.max())} but the model "
                    f"has {logits.shape[1]} outputs"
                )
        if self.kind == "regression" and logits.reshape(logits.shape[0], -1).shape[1] != 1:
            raise ValueError(
                f"{where}target='regression' needs one output per sample, got shape {list(logits.shape)}; use a "
                "callable target to pick an output"
            )
        if self.fn is not None and self.kind != "callable":
            self.fn(logits)  # raises with a clear message for out-of-range classes / wrong shapes
        if self.kind == "callable":
            assert self.fn is not None
            scores = self.fn(logits)
            if not isinstance(scores, Tensor) or scores.shape != (logits.shape[0],):
                shape = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(
                    f"{where}the target callable {self.value!r} must return one score per sample "
                    f"(Tensor[{logits.shape[0]}]), got {shape}"
                )

    def resolve(self, logits: Tensor, labels: Tensor | None, class_name: Callable[[int], str] = str) -> ResolvedTargets:
        """Which rows to explain and with what target, for one probe batch (``logits`` from an eval-mode pass)."""
        batch = logits.shape[0]
        device = logits.device
        every = torch.arange(batch, device=device)
        if self.kind == "prediction":
            classes = logits.argmax(dim=1)
        elif self.kind == "label":
            if labels is None:
                raise ValueError(f"{prefix(self.owner)}target='label' but the batch has no labels")
            classes = labels.to(device).long().reshape(-1)
        elif self.kind == "index":
            classes = torch.full((batch,), int(self.index or 0), dtype=torch.long, device=device)
        elif self.kind == "multilabel":
            if labels is not None and labels.ndim == 2 and labels.shape == logits.shape:
                positive = labels.to(device) > 0.5
            else:
                positive = torch.sigmoid(logits.float()) > self.threshold
            rows, classes = positive.nonzero(as_tuple=True)
            return ResolvedTargets(rows, classes, [class_name(int(c)) for c in classes.tolist()])
        else:
            assert self.fn is not None
            name = repr(self.fn) if self.kind != "regression" else "output"
            return ResolvedTargets(every, self.fn, [name] * batch)
        return ResolvedTargets(every, classes, [class_name(int(c)) for c in classes.tolist()])

    def __repr__(self) -> str:
        return f"TargetSpec({self.value!r})"
