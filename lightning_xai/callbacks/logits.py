"""What the interpretation callbacks read from the model's class logits: the logits of a pass that is run for
something else (so that no second forward pass is needed), the setup check that the output is class logits with
the requested classes in range, and how to name probe samples in a report of non-finite values."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from lightning_xai.batch import OutputReader
from lightning_xai.callbacks.base import ConfigurationError
from lightning_xai.callbacks.probe import ProbeBatch

__all__ = ["check_class_logits", "probe_sample_names", "recording_outputs"]


def check_class_logits(owner: str, logits: Tensor, classes: Sequence[int] | None, why: str) -> int:
    """The number of classes of ``logits [B, num_classes]`` (from the setup dry pass); raises
    :class:`~lightning_xai.callbacks.base.ConfigurationError` naming ``owner`` when the output is not class logits
    (``why`` says what the callback does with them) or when ``classes`` are out of range."""
    if logits.ndim != 2:
        raise ConfigurationError(
            f"{owner}: {why} class logits [B, num_classes]; the model output has shape {list(logits.shape)} "
            "(set output_key=)"
        )
    num_classes = int(logits.shape[1])
    bad = [c for c in classes or [] if c >= num_classes]
    if bad:
        raise ConfigurationError(
            f"{owner}: classes {bad} are out of range: the model has {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )
    return num_classes


@contextmanager
def recording_outputs(model: nn.Module, reader: OutputReader) -> Iterator[list[Tensor]]:
    """Within the block, the logits of every forward call of ``model`` are appended (detached) to the yielded list
    - so that a pass that hooks a layer also yields the predictions, without a second forward pass."""
    outputs: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        outputs.append(reader(output).detach())

    handle = model.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def probe_sample_names(probe: ProbeBatch, bad: Tensor) -> list[int]:
    """How to name this rank's real probe rows ``bad`` (a mask) in a message: their sample ids (dataset indices,
    or positions in a given ``probe_batch``)."""
    rows = bad.nonzero().reshape(-1).cpu()
    if probe.sample_ids is None:
        return rows.tolist()
    return probe.sample_ids.cpu()[rows].tolist()
