"""LIME and KernelSHAP with tokens as the interpretable features.

The image versions (:mod:`lightning_xai.attribution.surrogate`) explain segments; here every non-skipped token
position of a sequence is one feature, and an absent feature is the token replaced by ``mask_token``. The
sampling designs and the surrogate fits are the image versions' own (the same LIME kernel and solvers, the same
KernelSHAP kernel, constraints and exact enumeration when ``2^M <= num_samples``), so the two agree by
construction: on a model additive over tokens KernelSHAP returns the exact Shapley values, which for such a model
are the per-token effects ``f(x) - f(x with token t masked)``.

Both return ``Tensor[B, T]`` (0 at ``skip_tokens`` positions). The coalitions of a sequence are drawn from a
generator seeded by ``seed`` and the sequence itself, so its explanation does not depend on the batch around it.
Model-agnostic: no embedding layer, no gradient.
Cost: ``B * num_samples`` forward passes (``B * min(num_samples, 2^M)`` for KernelSHAP), in chunks of
``batch_size``; each sequence has its own design (its own number of features ``M_b``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import Target
from lightning_xai.attribution.perturbing import all_scores, generator
from lightning_xai.attribution.surrogate import LIME, KernelSHAP
from lightning_xai.attribution.tokens import TokenAttributor
from lightning_xai.checks import check_int

__all__ = ["TokenKernelSHAP", "TokenLIME"]


class _TokenSurrogate(TokenAttributor):
    """Tokens as features for a LIME / KernelSHAP design and fit (not registered)."""

    def __init__(self, surrogate: LIME | KernelSHAP, mask_token: int, skip_tokens: Sequence[int]) -> None:
        super().__init__(skip_tokens)
        self._surrogate = surrogate
        self.mask_token = check_int("mask_token", mask_token, minimum=0, owner=type(self).__name__)
        self.num_samples, self.batch_size, self.seed = surrogate.num_samples, surrogate.batch_size, surrogate.seed

    def _generator(self, row: Tensor) -> torch.Generator:
        """The sampling generator of one sequence: seeded by ``seed`` and the sequence's ids (hashes of ints and
        tuples are not randomised), so a sequence gets the same explanation wherever it stands in a batch."""
        if self.seed is None:
            return generator(None)
        return generator(hash((self.seed, *row.tolist())) & (2**63 - 1))

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        ids = inputs
        features = [(~row).nonzero().flatten() for row in self.skipped(ids)]  # positions explained, per sequence
        designs = [
            self._surrogate._design(len(f), self._generator(row)) if len(f) else None
            for f, row in zip(features, ids, strict=True)
        ]
        explained = [b for b, d in enumerate(designs) if d is not None]
        result = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        if not explained:
            return result
        owners, kept = [], []  # per evaluated sequence: its sample, and which positions keep their token
        for b in explained:
            coalitions = designs[b].coalitions.to(ids.device)
            keep = torch.ones(coalitions.shape[0], ids.shape[1], dtype=torch.bool, device=ids.device)
            keep[:, features[b]] = coalitions
            kept.append(keep)
            owners.append(torch.full((coalitions.shape[0],), b, dtype=torch.long, device=ids.device))
        owners, kept = torch.cat(owners), torch.cat(kept)

        def make_batch(part: slice) -> tuple[Tensor, None]:
            return torch.where(kept[part], ids[owners[part]], self.mask_token), None

        with torch.no_grad():
            scores = all_scores(model, len(owners), make_batch, owners, target, self.batch_size)
        sizes = [designs[b].coalitions.shape[0] for b in explained]
        for b, part in zip(explained, torch.split(scores, sizes), strict=True):
            values, _ = self._surrogate._fit(designs[b], part.cpu())
            result[b, features[b]] = values.to(device=ids.device, dtype=result.dtype)
        return result


class TokenLIME(_TokenSurrogate):
    """LIME (Ribeiro, Singh and Guestrin, "Why Should I Trust You?", KDD 2016) over tokens, as in the paper's
    text experiments: a sample keeps a random subset of the tokens (its size uniform in ``1..M``) and masks the
    others; samples are weighted by the exponential kernel on the cosine distance, and a weighted linear
    surrogate is fitted (``solver="ridge"`` or the paper's ``"k_lasso"`` with ``n_features`` tokens). See
    :class:`~lightning_xai.attribution.surrogate.LIME` for the details shared with the image version.

    Args:
        mask_token: id that replaces absent tokens.
        num_samples, kernel_width, solver, alpha, n_features, batch_size, seed: as the image LIME.
        skip_tokens: ids that are never masked and get 0.
    """

    name = "token_lime"

    def __init__(
        self,
        mask_token: int = 1,
        num_samples: int = 256,
        kernel_width: float = 0.25,
        solver: str = "ridge",
        alpha: float = 1.0,
        n_features: int = 5,
        skip_tokens: Sequence[int] = (),
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        surrogate = LIME(
            num_samples=num_samples,
            kernel_width=kernel_width,
            solver=solver,
            alpha=alpha,
            n_features=n_features,
            batch_size=batch_size,
            seed=seed,
        )
        super().__init__(surrogate, mask_token, skip_tokens)
        self.kernel_width, self.solver, self.alpha, self.n_features = kernel_width, solver, alpha, n_features


class TokenKernelSHAP(_TokenSurrogate):
    """KernelSHAP (Lundberg and Lee, NeurIPS 2017) over tokens: Shapley values of ``v(S) = f(x with the tokens
    outside S masked)``, exact when ``2^M <= num_samples`` (every coalition evaluated), else estimated from
    kernel-sampled coalitions with the efficiency constraint ``sum_t phi_t = f(x) - f(all masked)`` enforced.
    See :class:`~lightning_xai.attribution.surrogate.KernelSHAP`.

    Args:
        mask_token: id that replaces absent tokens.
        num_samples, batch_size, seed: as the image KernelSHAP.
        skip_tokens: ids that are never masked and get 0.
    """

    name = "token_kernel_shap"

    def __init__(
        self,
        mask_token: int = 1,
        num_samples: int = 256,
        skip_tokens: Sequence[int] = (),
        batch_size: int = 64,
        seed: int | None = 0,
    ) -> None:
        super().__init__(KernelSHAP(num_samples=num_samples, batch_size=batch_size, seed=seed), mask_token, skip_tokens)
