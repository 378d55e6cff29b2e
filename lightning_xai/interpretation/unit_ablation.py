"""Unit ablation: zero a layer's channels with forward hooks (:func:`ablate_units`), and measure each class's
accuracy with its relevant units zeroed against as many random units zeroed (:func:`unit_ablation`, the check
of Oramas, Wang & Tuytelaars, ICLR 2019). Eval mode, every hook removed and the model's state restored.

A unit is a channel: dim 1 of a feature map ``[B, C, ...]``, and the last dim of a vision transformer's token
layer ``[B, T, D]`` (zeroed in every token, the class token included), as relevant units read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import model_state_guard
from lightning_xai.attribution.layers import capture_layer, resolve_layer
from lightning_xai.checks import check_int
from lightning_xai.interpretation.embedding import Data, iterate_batches, model_device
from lightning_xai.interpretation.layer_maps import is_token_output, reject_text_tokens

if TYPE_CHECKING:
    from lightning_xai.interpretation.relevant_units import RelevantUnitsResult

__all__ = ["AblationReport", "ablate_units", "unit_ablation"]


@contextlib.contextmanager
def ablate_units(
    model: nn.Module, units: Mapping[str, Sequence[int] | Tensor], *, token_layers: Collection[str] = ()
) -> Iterator[None]:
    """Zero the given channels (dim 1) of each named layer's output while the context is open; for the layers in
    ``token_layers`` (outputs ``[B, T, D]``) the channels are the last dim, zeroed in every token.

    The hooks return a modified copy (never an in-place change of the layer's output) and are removed on exit,
    also on error.
    """
    handles = []
    try:
        for layer, channels in units.items():
            name, module = resolve_layer(model, layer)
            idx = torch.as_tensor(list(channels) if not isinstance(channels, Tensor) else channels).long()
            if idx.numel() == 0:
                continue

            tokens = name in token_layers or layer in token_layers

            def hook(
                _m: nn.Module, _i: tuple, output: Tensor, idx: Tensor = idx, name: str = name, tokens: bool = tokens
            ) -> Tensor:
                if not isinstance(output, Tensor) or output.ndim < (3 if tokens else 2):
                    expected = "tokens [B, T, D]" if tokens else "a tensor [B, C, ...]"
                    raise TypeError(f"layer {name!r} must output {expected} to ablate its units")
                dim = output.ndim - 1 if tokens else 1
                if int(idx.max()) >= output.shape[dim]:
                    raise ValueError(
                        f"unit {int(idx.max())} is out of range for layer {name!r} with {output.shape[dim]} units"
                    )
                out = output.clone()
                out.index_fill_(dim, idx.to(out.device), 0)
                return out

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class AblationReport:
    """Per-class accuracy with the class's relevant units zeroed, against as many random units zeroed."""

    #: ``[C]`` number of samples of each class.
    totals: Tensor
    #: ``[C]`` correct predictions without ablation.
    base_correct: Tensor
    #: ``[C]`` correct predictions with the class's relevant units ablated.
    relevant_correct: Tensor
    #: ``[C, R]`` correct predictions with each of ``R`` random unit sets ablated.
    random_correct: Tensor
    #: ``[C]`` number of units ablated per class.
    num_ablated: Tensor

    def _rate(self, correct: Tensor) -> Tensor:
        return correct.double() / self.totals.double().clamp_min(1)

    @property
    def base_accuracy(self) -> Tensor:
        return self._rate(self.base_correct)

    @property
    def relevant_accuracy(self) -> Tensor:
        return self._rate(self.relevant_correct)

    @property
    def random_accuracy(self) -> Tensor:
        """``[C]`` mean over the random draws."""
        return self._rate(self.random_correct.double().mean(dim=1))

    @property
    def relevant_drop(self) -> Tensor:
        return self.base_accuracy - self.relevant_accuracy

    @property
    def random_drop(self) -> Tensor:
        return self.base_accuracy - self.random_accuracy

    def rows(self) -> list[list[float | int]]:
        """``[class, samples, units, base acc, relevant-ablated acc, random-ablated acc, relevant drop, random
        drop]`` for every class with samples."""
        out = []
        for c in range(self.totals.shape[0]):
            if int(self.totals[c]) == 0:
                continue
            out.append(
                [
                    c,
                    int(self.totals[c]),
                    int(self.num_ablated[c]),
                    float(self.base_accuracy[c]),
                    float(self.relevant_accuracy[c]),
                    float(self.random_accuracy[c]),
                    float(self.relevant_drop[c]),
                    float(self.random_drop[c]),
                ]
            )
        return out


def _random_units(
    result: RelevantUnitsResult, cls: int, relevant: dict[str, list[int]], draw: int, seed: int
) -> dict[str, list[int]]:
    """As many units per layer as ``relevant`` has, drawn (seeded by class and draw) among that layer's other
    units."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + cls * 1009 + draw)
    per_layer: dict[str, list[int]] = {}
    for layer, ch in result.units:
        per_layer.setdefault(layer, []).append(ch)
    chosen: dict[str, list[int]] = {}
    for layer, channels in relevant.items():
        others = [ch for ch in per_layer.get(layer, []) if ch not in set(channels)]
        perm = torch.randperm(len(others), generator=g).tolist()
        chosen[layer] = [others[i] for i in perm[: len(channels)]]
    return chosen


def unit_ablation(
    model: nn.Module,
    result: RelevantUnitsResult,
    data: Data,
    *,
    num_random: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    positive_only: bool = True,
) -> AblationReport:
    """Zero each class's relevant units and measure that class's accuracy, against ``num_random`` draws of as
    many random units of the same layers (chosen among the units that are not relevant to the class).

    ``positive_only`` (default) ablates the units with a positive weight, whose response supports the class.
    Each sample is evaluated ``2 + num_random`` times (plain, relevant-ablated, random-ablated), in chunks of
    ``batch_size``; the random draws depend only on ``seed`` and the class, not on the data order. Counts are
    returned (summable across data shards). Layers that emit tokens ``[B, T, D]`` for image inputs are ablated
    along ``D`` (see the module docstring).
    """
    check_int("num_random", num_random, minimum=1, owner="unit_ablation")
    check_int("batch_size", batch_size, minimum=1, owner="unit_ablation")
    num_classes = result.num_classes
    relevant = [result.units_by_layer(c, positive_only=positive_only) for c in range(num_classes)]
    randoms = [[_random_units(result, c, relevant[c], r, seed) for r in range(num_random)] for c in range(num_classes)]
    totals = torch.zeros(num_classes, dtype=torch.long)
    base = torch.zeros(num_classes, dtype=torch.long)
    rel = torch.zeros(num_classes, dtype=torch.long)
    rnd = torch.zeros(num_classes, num_random, dtype=torch.long)
    device = model_device(model)
    layers = list(dict.fromkeys(layer for layer, _ in result.units))
    with model_state_guard(model), torch.no_grad():
        for x, y in iterate_batches(data, batch_size):
            if y is None:
                raise ValueError("unit ablation needs class labels: pass data that yields (inputs, labels)")
            x, y = x.to(device), y.reshape(-1).long().to(device)
            if int(y.max()) >= num_classes or int(y.min()) < 0:
                raise ValueError(f"labels must be in 0..{num_classes - 1}, got {y.unique().tolist()}")
            with contextlib.ExitStack() as stack:
                captures = [stack.enter_context(capture_layer(model, layer, clone_output=False)) for layer in layers]
                pred = model(x).argmax(dim=1)
            for cap in captures:
                reject_text_tokens(cap.activation, x, owner="unit_ablation", layer=cap.name)
            tokens = {cap.name for cap in captures if is_token_output(cap.activation, x)}
            for c in y.unique().tolist():
                sel = y == c
                xc = x[sel]
                totals[c] += int(sel.sum())
                base[c] += int((pred[sel] == c).sum())
                with ablate_units(model, relevant[c], token_layers=tokens):
                    rel[c] += int((model(xc).argmax(dim=1) == c).sum())
                for r, spec in enumerate(randoms[c]):
                    with ablate_units(model, spec, token_layers=tokens):
                        rnd[c, r] += int((model(xc).argmax(dim=1) == c).sum())
    counts = torch.tensor([sum(len(v) for v in relevant[c].values()) for c in range(num_classes)])
    return AblationReport(totals, base, rel, rnd, counts)
