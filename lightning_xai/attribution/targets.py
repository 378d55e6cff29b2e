"""Callable targets: what to explain beyond "the logit of class c".

Every attributor accepts ``target`` as an int, a ``LongTensor[B]`` or a callable ``output -> Tensor[B]``
(:data:`lightning_xai.attribution.base.Target`). This module holds ready-made callables; they are small
classes rather than lambdas so that they have a readable ``repr``, compare equal, and pickle (DDP, configs).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["ContrastiveTarget", "contrastive_target"]


class ContrastiveTarget:
    """ "Why ``a`` and not ``b``?": the score ``output[:, a] - output[:, b]`` (a logit difference).

    Explaining the difference of two logits highlights evidence that separates the two classes and cancels
    evidence they share. For linear attributions (gradients, Integrated Gradients, Grad-CAM before its ReLU)
    the result is exactly the difference of the two separate attributions.
    """

    def __init__(self, a: int, b: int) -> None:
        for label, value in (("a", a), ("b", b)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"contrastive class {label} must be a non-negative int class index, got {value!r}")
        if a == b:
            raise ValueError(f"contrastive classes must differ (why {a} and not {b}?), got a == b == {a}")
        self.a = a
        self.b = b

    def __call__(self, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 2:
            shape = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"a contrastive target needs a model output [B, num_classes], got {shape}")
        num = output.shape[1]
        if max(self.a, self.b) >= num:
            raise ValueError(
                f"contrastive classes ({self.a}, {self.b}) are out of range: the model has {num} outputs "
                f"(valid classes 0..{num - 1})"
            )
        return output[:, self.a] - output[:, self.b]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ContrastiveTarget) and (self.a, self.b) == (other.a, other.b)

    def __hash__(self) -> int:
        return hash((ContrastiveTarget, self.a, self.b))

    def __repr__(self) -> str:
        return f"contrastive_target({self.a}, {self.b})"


def contrastive_target(a: int, b: int) -> ContrastiveTarget:
    """The callable target "why ``a`` and not ``b``": ``output -> output[:, a] - output[:, b]``.

    Usable with any attributor, e.g. ``IntegratedGradients()(model, x, contrastive_target(3, 5))``.
    """
    return ContrastiveTarget(a, b)
