"""Running explanation methods inside a callback (a mixin of :class:`~lightning_xai.callbacks.base.XAICallback`):
per-method fault isolation with rank agreement, the setup-time dry run that tells configuration mistakes from
runtime faults, and unique method names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lightning_xai.batch import OutputReader, outputs_as_logits
from lightning_xai.callbacks.probe import ProbeBatch
from lightning_xai.callbacks.records import ConfigurationError, ValidationContext
from lightning_xai.callbacks.targets import ResolvedTargets, TargetSpec

__all__ = ["MethodRunner", "eager_forward", "method_names"]


@contextmanager
def eager_forward(pl_module: Any) -> Iterator[Any]:
    """Run a LightningModule that the Trainer compiled (``trainer.fit(torch.compile(model))``) with its original,
    eager ``forward`` for the duration: explanations hook into submodules, which compiled code does not call.
    Restored on exit (also on error); a module that was not compiled is left alone."""
    ctx = getattr(pl_module, "_compiler_ctx", None)
    original = ctx.get("original_forward") if isinstance(ctx, dict) else None
    if original is None:
        yield pl_module
        return
    had_own = "forward" in vars(pl_module)
    compiled = vars(pl_module).get("forward")
    pl_module.forward = original
    try:
        yield pl_module
    finally:
        if had_own:
            pl_module.forward = compiled
        else:
            del pl_module.forward


class MethodRunner:
    """Runs attributor-like methods for a callback; expects ``name``, ``target``, ``output_reader``, ``fault``
    and ``agree`` from the callback."""

    name: str
    target: TargetSpec
    output_reader: OutputReader

    def fault(self, trainer: Any, method: str | None, err: BaseException) -> None:  # provided by the callback
        raise NotImplementedError

    def agree(self, ok: bool) -> bool:  # provided by the callback
        raise NotImplementedError

    def explain_rows(
        self, trainer: Any, pl_module: Any, methods: Mapping[str, Any], probe: ProbeBatch, resolved: ResolvedTargets
    ) -> dict[str, Tensor]:
        """Each method's maps of ``probe.inputs[resolved.rows]`` on this rank; a method that fails or gives NaN /
        inf is reported by name (:meth:`fault`) and left out on every rank (the ranks agree), the others go on.
        A rank with no rows to explain still runs one padding sample so that its maps have the right shape."""
        rows = resolved.rows
        empty = rows.numel() == 0
        run_rows = rows if not empty else torch.zeros(1, dtype=torch.long, device=rows.device)
        target = resolved.target
        if isinstance(target, Tensor):
            target = target if not empty else torch.zeros(1, dtype=torch.long, device=rows.device)
        inputs = probe.inputs[run_rows]
        results: dict[str, Tensor] = {}
        for name, method in methods.items():
            local, ok = None, True
            try:
                with outputs_as_logits(pl_module, self.output_reader):
                    local = method(pl_module, inputs, target).detach().float()
                if not bool(torch.isfinite(local).all()):
                    raise FloatingPointError(f"the {name} map contains NaN or inf")
            except Exception as err:  # isolated per method; reported by name
                ok = False
                self.fault(trainer, name, err)
            if self.agree(ok) and local is not None:
                results[name] = local[: rows.numel()]
        return results

    def dry_run_methods(self, pl_module: Any, context: ValidationContext, methods: Mapping[str, Any]) -> None:
        """Run every method once on the first probe sample at setup. A ``ValueError`` / ``KeyError`` /
        ``TypeError`` / ``IndexError`` (a wrong layer name, a class out of range, an unreadable output) is a
        configuration mistake and raises :class:`ConfigurationError` naming the method; other faults are left to
        the runtime policy (``on_error``)."""
        if context.probe is None or context.logits is None:
            return
        resolved = self.target.resolve(context.logits, context.probe.labels)
        target = resolved.target
        if isinstance(target, Tensor) and target.numel() == 0:  # e.g. no positive label: explain class 0
            target = torch.zeros(1, dtype=torch.long, device=context.logits.device)
        for name, method in methods.items():
            try:
                with outputs_as_logits(pl_module, self.output_reader):
                    method(pl_module, context.probe.inputs[:1], target if callable(target) else target[:1])
            except (ValueError, KeyError, TypeError, IndexError) as err:
                raise ConfigurationError(f"{self.name}: method {name!r} cannot run: {err}") from err
            except Exception:  # a runtime fault: handled by on_error when it recurs during training
                pass


def method_names(specs: Sequence[Any], build: Callable[[Any], Any]) -> dict[str, Any]:
    """``{name: built}`` for attributor-like specs, names made unique (``gradcam``, ``gradcam_2``)."""
    if isinstance(specs, (str, dict)) or not isinstance(specs, Sequence):
        specs = [specs]
    built: dict[str, Any] = {}
    for spec in specs:
        obj = build(spec)
        key = getattr(obj, "name", None) or type(obj).__name__.lower()
        base, i = key, 2
        while key in built:
            key, i = f"{base}_{i}", i + 1
        built[key] = obj
    return built
