"""Sparse-autoencoder architectures: one config dataclass each and the ``nn.Module`` it builds.

:class:`ReLUSAEConfig` -> :class:`ReLUSAE`, :class:`TiedSAEConfig` -> :class:`TiedSAE`, :class:`TopKSAEConfig` ->
:class:`TopKSAE` (see :mod:`lightning_xai.models.sae` for the definitions, losses and references). Each module's
``training_forward`` returns the loss with its named parts (the shape SAELens gives its training pass). Pure torch:
:class:`~lightning_xai.models.sae.SparseAutoencoder` trains them with Lightning. Formerly part of
``lightning_xai.models.sae``, which re-exports every name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.checks import check_bool, check_choice, check_float, check_int

__all__ = [
    "B_DEC_INITS",
    "SAE_ARCHITECTURES",
    "ReLUSAE",
    "ReLUSAEConfig",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoderBase",
    "TiedSAE",
    "TiedSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "build_sae",
    "config_from_dict",
    "config_to_dict",
]


B_DEC_INITS = ("mean", "zeros")


@dataclass
class SAEConfig:
    """Shared hyper-parameters (validated on construction).

    Args:
        d_in: size of one activation vector (``C`` of the layer for ``spatial="positions"``).
        d_sae: number of latents (dictionary size), e.g. ``8 * d_in``.
        init_b_dec: ``"mean"`` (mean of the first training batch) or ``"zeros"``.
        dead_window: a latent that was zero on this many consecutive training vectors is dead.
    """

    architecture: ClassVar[str] = ""

    d_in: int
    d_sae: int
    init_b_dec: str = "mean"
    dead_window: int = 100_000

    def __post_init__(self) -> None:
        check_int("d_in", self.d_in, minimum=1, owner=type(self).__name__)
        check_int("d_sae", self.d_sae, minimum=1, owner=type(self).__name__)
        check_choice("init_b_dec", self.init_b_dec, B_DEC_INITS, owner=type(self).__name__)
        check_int("dead_window", self.dead_window, minimum=1, owner=type(self).__name__)


@dataclass
class ReLUSAEConfig(SAEConfig):
    """ReLU + L1 with untied weights (Bricken et al. 2023).

    Args:
        l1_coefficient: ``lambda`` of the L1 penalty (on vectors of mean norm ``sqrt(d_in)``, ~1..10).
        l1_warmup_steps: linear warm-up of ``lambda`` from 0 over this many steps (0: none).
        resample_every: resample dead latents every this many optimiser steps (``None``: never).
        resample_max: at most this many resamplings.
        resample_pool: recent training vectors kept per process to draw new directions from.
        resample_encoder_scale: new encoder columns have this times the mean alive encoder-column norm.
    """

    architecture: ClassVar[str] = "relu"

    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 0
    resample_every: int | None = None
    resample_max: int = 4
    resample_pool: int = 8192
    resample_encoder_scale: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("l1_coefficient", self.l1_coefficient, minimum=0.0, owner=type(self).__name__)
        check_int("l1_warmup_steps", self.l1_warmup_steps, minimum=0, owner=type(self).__name__)
        if self.resample_every is not None:
            check_int("resample_every", self.resample_every, minimum=1, owner=type(self).__name__)
        check_int("resample_max", self.resample_max, minimum=0, owner=type(self).__name__)
        check_int("resample_pool", self.resample_pool, minimum=1, owner=type(self).__name__)
        check_float("resample_encoder_scale", self.resample_encoder_scale, minimum=0.0, owner=type(self).__name__)


@dataclass
class TiedSAEConfig(SAEConfig):
    """ReLU + L1 with tied weights, encoder = decoder transposed (Cunningham et al., ICLR 2024).

    Args:
        l1_coefficient, l1_warmup_steps: as in :class:`ReLUSAEConfig`.
    """

    architecture: ClassVar[str] = "tied"

    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("l1_coefficient", self.l1_coefficient, minimum=0.0, owner=type(self).__name__)
        check_int("l1_warmup_steps", self.l1_warmup_steps, minimum=0, owner=type(self).__name__)


@dataclass
class TopKSAEConfig(SAEConfig):
    """TopK activation with the AuxK loss (Gao et al. 2024).

    Args:
        k: active latents per vector, ``1 <= k <= d_sae``.
        aux_k: dead latents used by the auxiliary loss (default ``d_in // 2``, at most ``d_sae``).
        aux_coefficient: weight of the auxiliary loss (``1/32``).
        post_relu: apply ReLU to the ``k`` kept values (Gao et al.'s reference code; latents are then
            non-negative and ``L0 <= k``); ``False`` keeps them signed, so that ``L0 == k`` exactly.
    """

    architecture: ClassVar[str] = "topk"

    k: int = 32
    aux_k: int | None = None
    aux_coefficient: float = 1.0 / 32.0
    post_relu: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("k", self.k, minimum=1, owner=type(self).__name__)
        if self.k > self.d_sae:
            raise ValueError(
                f"k = {self.k} active latents is more than the d_sae = {self.d_sae} latents; use k <= d_sae"
            )
        if self.aux_k is not None:
            check_int("aux_k", self.aux_k, minimum=1, owner=type(self).__name__)
        check_float("aux_coefficient", self.aux_coefficient, minimum=0.0, owner=type(self).__name__)
        check_bool("post_relu", self.post_relu, owner=type(self).__name__)

    @property
    def effective_aux_k(self) -> int:
        return min(self.d_sae, self.aux_k if self.aux_k is not None else max(1, self.d_in // 2))


SAE_ARCHITECTURES: dict[str, type[SAEConfig]] = {
    cls.architecture: cls for cls in (ReLUSAEConfig, TiedSAEConfig, TopKSAEConfig)
}


def config_to_dict(config: SAEConfig) -> dict[str, Any]:
    """``{"architecture": name, **fields}``: a plain dict (checkpoint-safe, YAML-friendly)."""
    return {"architecture": config.architecture, **dataclasses.asdict(config)}


def config_from_dict(values: dict[str, Any]) -> SAEConfig:
    """Inverse of :func:`config_to_dict`."""
    values = dict(values)
    name = values.pop("architecture", None)
    if name not in SAE_ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {name!r}; valid architectures: {sorted(SAE_ARCHITECTURES)}")
    return SAE_ARCHITECTURES[name](**values)


@dataclass
class SAEOutput:
    """One training forward pass: ``loss == sum(losses.values())``; ``metrics`` are unweighted diagnostics."""

    x_hat: Tensor
    latents: Tensor
    loss: Tensor
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _random_unit_rows(rows: int, cols: int) -> Tensor:
    w = torch.randn(rows, cols)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


class SparseAutoencoderBase(nn.Module):
    """Shared parts: the pre-encoder bias ``b_dec``, decoding, the unit-norm constraint, the MSE."""

    config: SAEConfig

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        self.config = config
        self.d_in = config.d_in
        self.d_sae = config.d_sae
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))

    # -- to implement
    @property
    def decoder_weight(self) -> Tensor:
        """``[d_sae, d_in]``: row ``i`` is latent ``i``'s decoder column (unit norm)."""
        raise NotImplementedError

    def encoder_matrix(self) -> Tensor:
        """``[d_in, d_sae]``."""
        raise NotImplementedError

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    # -- shared
    def pre_activations(self, x: Tensor) -> Tensor:
        """``W_enc^T (x - b_dec) + b_enc``, computed as ``x W_enc + (b_enc - b_dec W_enc)``: the same numbers, but
        the gradient of ``b_dec`` then costs a vector-matrix product instead of a second ``[N, d_sae] x
        [d_sae, d_in]`` matrix product."""
        w = self.encoder_matrix()
        return torch.addmm(self.b_enc - self.b_dec @ w, x, w)

    def encode(self, x: Tensor) -> Tensor:
        """Latents ``f [N, d_sae]`` of vectors ``x [N, d_in]``."""
        return self.activation(self.pre_activations(x))

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``[N, d_in]`` of latents ``f``."""
        return torch.addmm(self.b_dec, f, self.decoder_weight)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x``."""
        return self.decode(self.encode(x))

    @staticmethod
    def mse(x_hat: Tensor, x: Tensor) -> Tensor:
        """``mean over the batch of ||x - x_hat||^2`` (summed over dimensions)."""
        return (x_hat - x).square().sum(dim=-1).mean()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder column to unit L2 norm (in place)."""
        w = self.decoder_weight
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Remove from the decoder's gradient the component parallel to each (unit) column."""
        w = self.decoder_weight
        if w.grad is None:
            return
        # g_i -= (g_i . w_i / w_i . w_i) w_i: exact for any non-zero column, without dividing the whole matrix
        coefficient = (w.grad * w).sum(dim=1, keepdim=True) / w.square().sum(dim=1, keepdim=True).clamp_min(1e-24)
        w.grad.addcmul_(coefficient, w, value=-1.0)

    def training_forward(self, x: Tensor, *, step: int = 0, dead: Tensor | None = None) -> SAEOutput:
        raise NotImplementedError


class _L1Mixin:
    config: ReLUSAEConfig | TiedSAEConfig

    def l1_coefficient_at(self, step: int) -> float:
        """``lambda_t``: the L1 coefficient after the linear warm-up."""
        warmup = self.config.l1_warmup_steps
        ramp = 1.0 if warmup == 0 else min(1.0, step / warmup)
        return self.config.l1_coefficient * ramp

    def _l1_forward(self, x: Tensor, step: int) -> SAEOutput:
        f = self.encode(x)  # type: ignore[attr-defined]
        x_hat = self.decode(f)  # type: ignore[attr-defined]
        mse = SparseAutoencoderBase.mse(x_hat, x)
        l1 = f.sum(dim=-1).mean()
        coefficient = self.l1_coefficient_at(step)
        losses = {"mse": mse, "l1": coefficient * l1}
        metrics = {"l1_norm": l1.detach(), "l1_coefficient": torch.tensor(coefficient)}
        return SAEOutput(x_hat, f, mse + coefficient * l1, losses, metrics)


class _UntiedSAE(SparseAutoencoderBase):
    """Untied weights: ``W_enc [d_in, d_sae]`` starts as ``W_dec^T``, ``W_dec [d_sae, d_in]`` with random unit
    rows (Gao et al.'s initialisation)."""

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        w = _random_unit_rows(config.d_sae, config.d_in)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.t().clone())

    @property
    def decoder_weight(self) -> Tensor:
        return self.W_dec

    def encoder_matrix(self) -> Tensor:
        return self.W_enc


class ReLUSAE(_L1Mixin, _UntiedSAE):
    """ReLU SAE with untied weights (see the module docstring). Parameters ``W_enc [d_in, d_sae]``, ``b_enc``,
    ``W_dec [d_sae, d_in]`` (unit rows), ``b_dec``."""

    def training_forward(self, x: Tensor, *, step: int = 0, dead: Tensor | None = None) -> SAEOutput:
        return self._l1_forward(x, step)

    @torch.no_grad()
    def resample(self, index: Tensor, directions: Tensor, encoder_norm: float) -> None:
        """Give latents ``index`` the unit decoder columns ``directions [n, d_in]``, encoder columns
        ``directions * encoder_norm`` and zero encoder bias."""
        self.W_dec[index] = directions
        self.W_enc[:, index] = directions.t() * encoder_norm
        self.b_enc[index] = 0.0


class TiedSAE(_L1Mixin, SparseAutoencoderBase):
    """ReLU SAE with tied weights ``W [d_sae, d_in]`` (unit rows): encoder ``W^T``, decoder ``W``."""

    def __init__(self, config: TiedSAEConfig) -> None:
        super().__init__(config)
        self.W = nn.Parameter(_random_unit_rows(config.d_sae, config.d_in))

    @property
    def decoder_weight(self) -> Tensor:
        return self.W

    def encoder_matrix(self) -> Tensor:
        return self.W.t()

    def training_forward(self, x: Tensor, *, step: int = 0, dead: Tensor | None = None) -> SAEOutput:
        return self._l1_forward(x, step)


class TopKSAE(_UntiedSAE):
    """TopK SAE with the AuxK loss (see the module docstring); parameters as :class:`ReLUSAE`."""

    config: TopKSAEConfig

    def _keep_top(self, pre: Tensor, k: int) -> Tensor:
        values, index = pre.topk(k, dim=-1, sorted=False)
        if self.config.post_relu:
            values = F.relu(values)
        return torch.zeros_like(pre).scatter_(-1, index, values)

    def activation(self, pre: Tensor) -> Tensor:
        return self._keep_top(pre, self.config.k)

    def training_forward(self, x: Tensor, *, step: int = 0, dead: Tensor | None = None) -> SAEOutput:
        pre = self.pre_activations(x)
        f = self._keep_top(pre, self.config.k)
        x_hat = self.decode(f)
        mse = self.mse(x_hat, x)
        aux = torch.zeros((), device=x.device, dtype=x.dtype)
        num_dead = 0 if dead is None else int(dead.sum())
        if num_dead > 0:
            assert dead is not None
            k_aux = min(self.config.effective_aux_k, num_dead)
            masked = pre.masked_fill(~dead.to(pre.device), float("-inf"))
            z = self._keep_top(masked, k_aux)
            error = (x - x_hat).detach()
            aux = (z @ self.W_dec - error).square().sum(dim=-1).mean()
        weighted_aux = self.config.aux_coefficient * aux
        metrics = {"aux_mse": aux.detach(), "num_dead": torch.tensor(float(num_dead))}
        return SAEOutput(x_hat, f, mse + weighted_aux, {"mse": mse, "aux": weighted_aux}, metrics)


def build_sae(config: SAEConfig | dict[str, Any]) -> SparseAutoencoderBase:
    """The ``nn.Module`` of a config (or of its :func:`config_to_dict` form)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if isinstance(config, ReLUSAEConfig):
        return ReLUSAE(config)
    if isinstance(config, TiedSAEConfig):
        return TiedSAE(config)
    if isinstance(config, TopKSAEConfig):
        return TopKSAE(config)
    raise TypeError(
        f"config must be one of {[c.__name__ for c in SAE_ARCHITECTURES.values()]} or a dict, "
        f"got {type(config).__name__}"
    )

