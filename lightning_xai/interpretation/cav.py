"""Concept activation vectors (Kim et al., ICML 2018): training a CAV by L2-regularised logistic regression on a
layer's activations (:func:`train_cav`), the bank of trained CAVs (:class:`CAVBank`), and the directional
derivatives of class logits along them (:func:`directional_derivatives`). Used by
:class:`~lightning_xai.interpretation.tcav.TCAV`.
"""

from __future__ import annotations

import math
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
from lightning_xai.attribution.layers import capture_layer
from lightning_xai.checks import check_int
from lightning_xai.interpretation.embedding import model_device

__all__ = ["CAVBank", "check_tcav_inputs", "directional_derivatives", "train_cav"]


def check_tcav_inputs(inputs: Tensor) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
        raise ValueError(f"TCAV: inputs must be a float batch [B, ...], got {getattr(inputs, 'shape', inputs)}")
    if inputs.shape[0] == 0:
        raise ValueError("TCAV: inputs is an empty batch; TCAV scores need inputs of the explained classes")


def _split(n: int, test_fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=g)
    n_test = 0 if test_fraction == 0 else max(1, min(n - 1, round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def train_cav(
    positive: Tensor,
    negative: Tensor,
    *,
    l2: float = 1e-2,
    test_fraction: float = 0.25,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[Tensor, float]:
    """Train one CAV: returns ``(unit vector [D] pointing towards ``positive``, held-out accuracy)``.

    ``positive [P, D]`` (concept) and ``negative [Q, D]`` (random) activations. L2-regularised (``l2 / 2 *
    ||w||^2`` on the scaled features), class-balanced logistic regression by full-batch L-BFGS from zero, trained
    on all but a seeded ``test_fraction`` of each set; the accuracy on that held-out part is returned (``nan`` when
    ``test_fraction`` is 0). See the module docstring.
    """
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise ValueError(
            f"CAV activations must be [P, D] and [Q, D] with the same D, got {list(positive.shape)} and "
            f"{list(negative.shape)}"
        )
    min_size = 2 if test_fraction > 0 else 1
    if positive.shape[0] < min_size or negative.shape[0] < min_size:
        raise ValueError(
            f"a CAV needs at least {min_size} concept and {min_size} random examples, got {positive.shape[0]} and "
            f"{negative.shape[0]}"
        )
    g = torch.Generator().manual_seed(seed)
    p_train, p_test = _split(positive.shape[0], test_fraction, g)
    n_train, n_test = _split(negative.shape[0], test_fraction, g)
    # everything inside the autograd context: activations made under inference_mode are copied into normal tensors
    with gradient_context():
        pos = positive.detach().cpu().double().clone()
        neg = negative.detach().cpu().double().clone()
        x = torch.cat([pos[p_train], neg[n_train]])
        y = torch.cat([torch.ones(len(p_train)), torch.zeros(len(n_train))]).double()
        weights = torch.cat(
            [torch.full((len(p_train),), 0.5 / len(p_train)), torch.full((len(n_train),), 0.5 / len(n_train))]
        ).double()
        mean = x.mean(dim=0, keepdim=True)
        scale = float((x - mean).square().sum(dim=1).mean().sqrt())
        scale = scale if scale > 0 else 1.0
        xs = (x - mean) / scale
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            logits = xs @ w + b
            # logistic loss log(1 + e^z) - y z, written out (the fused kernel is slow on small CPU tensors)
            loss = (weights * (torch.nn.functional.softplus(logits) - y * logits)).sum()
            loss = loss + 0.5 * l2 * w.square().sum()
            gw, gb = torch.autograd.grad(loss, (w, b))
            w.grad, b.grad = gw, gb
            return loss.detach()

        optimizer.step(closure)
        w_final, b_final = w.detach().clone(), b.detach().clone()
        norm = float(w_final.norm())
        if norm == 0.0 or not math.isfinite(norm):
            raise ValueError("the CAV classifier did not learn a direction (identical or degenerate activations)")
        accuracy = float("nan")
        if len(p_test) and len(n_test):
            pred_pos = (((pos[p_test] - mean) / scale) @ w_final + b_final) > 0
            pred_neg = (((neg[n_test] - mean) / scale) @ w_final + b_final) <= 0
            accuracy = 0.5 * (float(pred_pos.double().mean()) + float(pred_neg.double().mean()))
        vector = (w_final / norm).float()
    return vector, accuracy


@dataclass
class CAVBank:
    """Every CAV of one TCAV run: ``R`` per concept (against each random set) and ``R`` random-vs-random ones."""

    layer: str
    concepts: list[str]
    num_random: int
    #: ``[(K + 1) * R, D]`` unit vectors: concept ``i``'s runs at rows ``i*R .. (i+1)*R - 1``, the random
    #: (null) CAVs in the last ``R`` rows.
    vectors: Tensor
    #: Held-out accuracy of each CAV, same order.
    accuracies: Tensor

    def rows_of(self, concept: str | None) -> slice:
        """The rows of ``concept``'s CAVs (``None``: the random-vs-random CAVs)."""
        if concept is None:
            i = len(self.concepts)
        elif concept in self.concepts:
            i = self.concepts.index(concept)
        else:
            raise ValueError(f"unknown concept {concept!r}; the bank holds {self.concepts}")
        return slice(i * self.num_random, (i + 1) * self.num_random)


def directional_derivatives(
    model: nn.Module,
    layer: str | nn.Module,
    inputs: Tensor,
    target: Target,
    directions: Tensor,
    *,
    batch_size: int = 32,
) -> Tensor:
    """Conceptual sensitivities ``S [B, M]``: the gradient of each input's target score (the class logit for an
    int / ``LongTensor[B]`` target) with respect to ``layer``'s flattened activation, dotted with each of the
    ``M`` rows of ``directions [M, D]``.

    Eval mode, model state restored, hooks removed; works under ``no_grad`` / ``inference_mode``. The gradient is
    taken with respect to the captured activation only (no parameter gradient is written).
    """
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
        raise ValueError(f"inputs must be a float batch [B, ...], got {getattr(inputs, 'shape', inputs)}")
    if inputs.shape[0] == 0:
        raise ValueError("directional_derivatives: inputs is an empty batch; there is nothing to differentiate")
    if directions.ndim != 2:
        raise ValueError(f"directions must be [M, D], got {list(directions.shape)}")
    if not callable(target):
        validate_target(target, inputs.shape[0], None)
    check_int("batch_size", batch_size, minimum=1, owner="directional_derivatives")
    device = model_device(model)
    dirs = directions.detach().float().to(device)
    out: list[Tensor] = []
    with model_state_guard(model), gradient_context():
        if isinstance(target, Tensor):
            target = target.detach().clone()
        for start in range(0, inputs.shape[0], batch_size):
            sl = slice(start, min(start + batch_size, inputs.shape[0]))
            x = inputs[sl].detach().clone().to(device).requires_grad_(True)
            tgt = target[sl].to(device) if isinstance(target, Tensor) and target.ndim == 1 else target
            with capture_layer(model, layer) as capture:
                scores = select_scores(model(x), tgt)
            act = capture.activation
            if act.flatten(1).shape[1] != dirs.shape[1]:
                raise ValueError(
                    f"the layer activation has {act.flatten(1).shape[1]} values per sample but the CAVs have "
                    f"{dirs.shape[1]}: were they trained on inputs of another size?"
                )
            (grad,) = torch.autograd.grad(scores.sum(), act, allow_unused=True)
            if grad is None:
                raise ValueError("the explained score does not depend on the layer's activation")
            out.append((grad.flatten(1).float() @ dirs.T).detach().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# results
