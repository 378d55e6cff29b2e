"""Sparse autoencoders (dictionary learning) on a frozen model's activations, trained as a LightningModule.

A sparse autoencoder (SAE) rewrites an activation vector ``x in R^d_in`` as a sparse, non-negative combination of
``d_sae`` learned unit directions ("dictionary atoms", the *decoder columns*; stored as the rows of
``W_dec [d_sae, d_in]``) plus a bias:

    f = act(W_enc^T (x - b_dec) + b_enc)          (latents, [d_sae], mostly zero)
    x_hat = W_dec^T f + b_dec                      (reconstruction)

References: H. Cunningham, A. Ewart, L. Riggs, R. Huben and L. Sharkey, "Sparse Autoencoders Find Highly
Interpretable Features in Language Models", ICLR 2024; T. Bricken et al., "Towards Monosemanticity: Decomposing
Language Models With Dictionary Learning", Transformer Circuits Thread (Anthropic), 2023; L. Gao et al.,
"Scaling and evaluating sparse autoencoders", arXiv 2406.04093, 2024 (ICLR 2025).

**Architectures** (one config dataclass each; :func:`build_sae` makes the ``nn.Module``; its
``training_forward`` returns the loss together with its named parts, whose sum it is):

* :class:`ReLUSAEConfig` -> :class:`ReLUSAE` (Bricken et al.): untied ``W_enc``, ``W_dec``, ``act = ReLU``; loss
  ``mse + lambda_t * l1`` with ``mse = mean_batch ||x - x_hat||^2`` and ``l1 = mean_batch sum_i f_i`` (``f >= 0``;
  the decoder columns have unit norm, so this equals the norm-weighted L1 ``sum_i f_i ||W_dec,i||``).
  ``lambda_t = l1_coefficient * min(1, step / l1_warmup_steps)``: a linear warm-up from 0. Dead latents can be
  *resampled* (below).
* :class:`TiedSAEConfig` -> :class:`TiedSAE` (Cunningham et al.): one matrix ``W [d_sae, d_in]`` serves as the
  decoder and, transposed, as the encoder; same loss. (Cunningham et al. use no decoder bias; here the
  pre-encoder bias ``b_dec`` is kept as in the other variants.)
* :class:`TopKSAEConfig` -> :class:`TopKSAE` (Gao et al.): ``act = ReLU(TopK_k(.))``: only the ``k`` largest
  pre-activations are kept (then ReLU), so ``L0 <= k`` by construction (``== k`` whenever the ``k``-th largest
  pre-activation is positive; with ``post_relu=False`` the kept values stay signed and ``L0 == k``). No L1.
  The auxiliary loss ``AuxK`` revives dead latents: with ``e = x - x_hat`` (detached) and ``e_hat = W_dec^T z``
  where ``z`` keeps the ``aux_k`` largest pre-activations *among the dead latents* (same activation),
  ``aux = mean_batch ||e - e_hat||^2``; loss ``mse + aux_coefficient * aux`` (``1/32`` as in the paper). ``aux``
  is 0 while no latent is dead; its gradient never reaches an alive latent's encoder or decoder column.

**Training** (:class:`SparseAutoencoder`, the LightningModule):

* ``b_dec`` starts at the mean of the first training batch (all-reduced over processes) with
  ``init_b_dec="mean"``; ``W_enc`` starts as ``W_dec^T`` with random unit decoder columns (Gao et al.).
* **Unit-norm decoder columns.** Before every optimiser step the gradient component parallel to each column is
  removed (``g_i <- g_i - (g_i . w_i) w_i``: the step is tangent to the unit sphere), and after every step each
  column is renormalised to norm 1 (Bricken et al.).
* **Dead latents.** ``samples_since_fired [d_sae]`` counts, per latent, the training vectors seen (on *all*
  processes: counts are all-reduced every step) since it was last non-zero; a latent is *dead* when that count
  reaches ``dead_window``.
* **Resampling** (ReLU variant, ``resample_every`` steps, at most ``resample_max`` times; Bricken et al.): every
  dead latent gets a new decoder column ``(x - b_dec) / ||x - b_dec||`` for an input ``x`` drawn from the last
  ``resample_pool`` training vectors (of all processes) with probability proportional to the square of its
  reconstruction loss ``||x - x_hat||^2``; its encoder column is that direction times ``resample_encoder_scale``
  (0.2) times the mean norm of the alive encoder columns, its encoder bias 0; the optimiser state (Adam's
  moments) of those rows/columns is reset to zero and the latent's dead counter restarts. The draw uses a
  generator seeded by ``seed`` and the step, identical on every process.

**Metrics** (``val_*`` / ``test_*``, torchmetrics states reduced over processes; sums over all evaluated vectors):

* ``l0``: mean number of non-zero latents per vector.
* ``fvu``: fraction of variance unexplained, *centred*: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (the mean
  over the evaluated set). This is what Gao et al. call "normalized MSE".
* ``explained_variance``: ``1 - fvu``, the fraction of the (centred) variance the reconstruction explains.
* ``nmse``: normalised MSE against the zero predictor: ``sum ||x - x_hat||^2 / sum ||x||^2``.
* ``dead_fraction``: fraction of latents that are zero on every evaluated vector (training: ``train_dead_fraction``
  from the window above).
* Downstream (on image or token batches with class labels, when an
  :class:`~lightning_xai.models.activations.ActivationSource` is known): the frozen model's mean cross-entropy and
  accuracy with the layer's own output (``ce_orig``, ``acc_orig``), with the SAE reconstruction spliced in
  (``ce_sae``, ``acc_sae``; a forward hook replaces the layer output by ``from_vectors(sae(to_vectors(output)))``)
  and with the layer zero-ablated (``ce_zero``). ``downstream_score = (ce_zero - ce_sae) / (ce_zero - ce_orig)``:
  1 for a perfect reconstruction, 0 for one as bad as zeroing the
  layer (NaN when ``ce_zero == ce_orig``): the "loss recovered" of the SAE literature.

**Token models.** With a source of ``spatial="tokens"`` (a transformer's residual stream ``[B, T, D]``, token ids
as inputs) every real token is one training vector and padding positions are left out of training, metrics and
the scale; splicing puts the reconstruction back at the real positions only (padding keeps the layer's output)
and zero-ablation zeroes the real positions only, so ``downstream_score`` measures the model with the SAE in the
loop. For a sequence classifier the cross-entropy is the classifier's loss on the class labels.

All vectors are in the source's (normalised) space; the source's scale is copied into the buffer
``activation_scale`` so that a saved SAE can be applied to raw activations (``x_raw * activation_scale``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_xai.checks import check_bool, check_int
from lightning_xai.distributed import default_reducer, sum_over_ranks
from lightning_xai.evaluation.sae_metrics import DownstreamScore, SAEReconstructionMetrics
from lightning_xai.models.activations import ActivationSource, as_activation_batch, find_activation_source
from lightning_xai.models.base import StepOutput, XAIModule
from lightning_xai.models.sae_architectures import (
    SAE_ARCHITECTURES,
    ReLUSAE,
    ReLUSAEConfig,
    SAEConfig,
    SAEOutput,
    SparseAutoencoderBase,
    TiedSAE,
    TiedSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    build_sae,
    config_from_dict,
    config_to_dict,
)
from lightning_xai.models.sae_inspection import SAEInspection
from lightning_xai.namespace import rank_zero_warn

__all__ = [
    "SAE_ARCHITECTURES",
    "DownstreamScore",
    "ReLUSAE",
    "ReLUSAEConfig",
    "SAEConfig",
    "SAEInspection",
    "SAEOutput",
    "SAEReconstructionMetrics",
    "SparseAutoencoder",
    "SparseAutoencoderBase",
    "TiedSAE",
    "TiedSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "build_sae",
    "config_from_dict",
    "config_to_dict",
]


def _reset_optimizer_slices(optimizer: torch.optim.Optimizer, param: Tensor, index: Tensor, dim: int) -> None:
    """Zero every per-element optimiser state of ``param`` (Adam's ``exp_avg``/``exp_avg_sq``, SGD's momentum)
    at ``index`` along ``dim``; scalar states (Adam's ``step``) are kept."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.index_fill_(dim, index.to(value.device), 0.0)


# ---------------------------------------------------------------------------------------------------------- module
class SparseAutoencoder(SAEInspection, XAIModule):
    """LightningModule training a sparse autoencoder on activation batches (see the module docstring).

    Args:
        sae: the architecture's config (:class:`ReLUSAEConfig`, :class:`TopKSAEConfig`, :class:`TiedSAEConfig`;
            in YAML ``class_path`` / ``init_args``) or its :func:`config_to_dict` form.
        optimizer, lr, weight_decay, scheduler, momentum: see :class:`~lightning_xai.models.base.XAIModule`.
        downstream: compute the downstream metrics on validation/test image batches (needs the source).
        log_top_latents: at the end of every validation epoch, log (rank zero, to the trainer's loggers) a table
            of this many latents with their top-activating probe images (0: off).
        top_images: images per latent in that table.
        probe_images: validation images (of rank zero, from the first batches) kept as the probe set.
        seed: seeds the resampling draws.

    Training batches: :class:`~lightning_xai.models.activations.ActivationBatch` (from
    :class:`~lightning_xai.models.activations.ActivationDataModule`), a tensor ``[N, d_in]`` or ``(tensor, ...)``.
    The activation source is ``trainer.datamodule.source`` or one given with :meth:`attach_source`.
    """

    def __init__(
        self,
        sae: ReLUSAEConfig | TopKSAEConfig | TiedSAEConfig | dict[str, Any],
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
        downstream: bool = True,
        log_top_latents: int = 0,
        top_images: int = 4,
        probe_images: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum)
        config = config_from_dict(sae) if isinstance(sae, dict) else sae
        if not isinstance(config, SAEConfig):
            raise TypeError(f"sae must be an SAE config dataclass or a dict, got {type(sae).__name__}")
        as_dict = config_to_dict(config)
        self.hparams_overrides["sae"] = as_dict  # a plain dict: checkpoints load with weights_only=True
        owner = type(self).__name__
        check_bool("downstream", downstream, owner=owner)
        check_int("log_top_latents", log_top_latents, minimum=0, owner=owner)
        check_int("top_images", top_images, minimum=1, owner=owner)
        check_int("probe_images", probe_images, minimum=1, owner=owner)
        check_int("seed", seed, owner=owner)
        self.config = config
        self.sae = build_sae(config)
        self.downstream = downstream
        self._said_no_downstream = False
        self.log_top_latents = log_top_latents
        self.top_images = top_images
        self.probe_images = probe_images
        self.seed = seed
        d_in, d_sae = config.d_in, config.d_sae
        self.register_buffer("samples_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("b_dec_initialized", torch.tensor(config.init_b_dec == "zeros"))
        self.register_buffer("activation_scale", torch.ones(()))
        self.register_buffer("scale_recorded", torch.zeros((), dtype=torch.bool))
        self.register_buffer("resamplings", torch.zeros((), dtype=torch.int64))
        # recent training vectors for resampling: a plain tensor, not a buffer (DDP would broadcast a buffer from
        # rank zero before every forward pass, but each process keeps its own vectors)
        self._pool_size = config.resample_pool if isinstance(config, ReLUSAEConfig) and config.resample_every else 0
        self._pool: Tensor | None = None
        self._pool_filled = 0
        self._pool_next = 0
        self._attached_source: list[ActivationSource] = []
        self._probe: list[Tensor] = []
        self.val_metrics = SAEReconstructionMetrics(d_in, d_sae)
        self.test_metrics = SAEReconstructionMetrics(d_in, d_sae)
        self.val_downstream = DownstreamScore()
        self.test_downstream = DownstreamScore()

    # ------------------------------------------------------------------------------------------ source
    def attach_source(self, source: ActivationSource) -> None:
        """Use ``source`` (instead of ``trainer.datamodule.source``) for downstream metrics and interpretation."""
        if not isinstance(source, ActivationSource):
            raise TypeError(f"source must be an ActivationSource, got {type(source).__name__}")
        self._check_source(source)
        self._attached_source = [source]

    @property
    def source(self) -> ActivationSource | None:
        """The attached source, else the trainer's ``datamodule.source``, else ``None``."""
        if self._attached_source:
            return self._attached_source[0]
        return find_activation_source(self._trainer)

    def _require_source(self, source: ActivationSource | None) -> ActivationSource:
        source = source if source is not None else self.source
        if source is None:
            raise ValueError(
                "no activation source: pass source=, call attach_source(), or train with an ActivationDataModule"
            )
        return source

    def _check_source(self, source: ActivationSource) -> None:
        shape = source.layer_shape
        d = source.known_vector_dim()
        if shape is None or d is None:
            return
        if d != self.config.d_in:
            raise ValueError(
                f"the SAE has d_in = {self.config.d_in}, but layer {source.layer!r} with spatial={source.spatial!r} "
                f"gives vectors of size {d} (layer output per sample: {list(shape)}); set d_in = {d}"
            )

    def setup(self, stage: str) -> None:
        source = self.source
        if source is None:
            return
        self._check_source(source)
        if self.log_top_latents > 0 and source.spatial != "positions":
            raise ValueError(
                f"{type(self).__name__}: log_top_latents={self.log_top_latents} logs images per latent and needs an "
                f"activation source with spatial='positions', got spatial={source.spatial!r}; set log_top_latents=0"
            )
        if stage != "fit" and source.normalize and bool(self.scale_recorded):
            # evaluate in the very space the SAE was trained in
            source.scale.fill_(float(self.activation_scale))
            source.scale_estimated.fill_(True)

    def on_fit_start(self) -> None:
        source = self.source
        if source is not None:
            self.activation_scale.fill_(float(source.scale))
            self.scale_recorded.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        """The SAE's reconstruction of (normalised) activation vectors ``x [N, d_in]``."""
        return self.sae(x)

    # ------------------------------------------------------------------------------------------ training
    def _vectors(self, batch: Any) -> tuple[Tensor, Any]:
        b = as_activation_batch(batch)
        x = b.activations
        if x.ndim != 2 or x.shape[1] != self.config.d_in:
            raise ValueError(
                f"the SAE has d_in = {self.config.d_in} but got activations of shape {list(x.shape)}; expected "
                f"[N, {self.config.d_in}] (check the layer and spatial mode of the activation source)"
            )
        return x, b

    def dead_latents(self) -> Tensor:
        """``BoolTensor[d_sae]``: latents zero on the last ``dead_window`` training vectors (all processes)."""
        return self.samples_since_fired >= self.config.dead_window

    @torch.no_grad()
    def _init_b_dec(self, x: Tensor) -> None:
        """The decoder bias starts at the mean of the first batch (all ranks): non-finite activations are rejected
        here, because the mean would absorb a NaN silently and every later step would train on NaN."""
        bad = (~torch.isfinite(x)).sum().double()
        totals = sum_over_ranks(
            torch.cat([x.double().sum(dim=0), x.new_tensor([x.shape[0]]).double(), bad.reshape(1).to(x.device)])
        )
        if float(totals[-1]) > 0:
            raise ValueError(
                f"{type(self).__name__}: the first training batch's activations hold {int(totals[-1])} non-finite "
                "values (NaN/inf; summed over all ranks); the decoder bias is initialised from their mean. Check the "
                "model and the activation source (a NaN input, a diverged model)"
            )
        totals = totals[:-1]
        self.sae.b_dec.copy_((totals[:-1] / totals[-1]).to(self.sae.b_dec.dtype))
        self.b_dec_initialized.fill_(True)

    @torch.no_grad()
    def _track(self, latents: Tensor, batch: int) -> None:
        fired = (latents != 0).any(dim=0).long()
        totals = sum_over_ranks(torch.cat([fired, fired.new_tensor([batch])]))
        self.samples_since_fired += totals[-1]
        self.samples_since_fired[totals[:-1] > 0] = 0

    @torch.no_grad()
    def _remember(self, x: Tensor) -> None:
        size = self._pool_size
        if size == 0:
            return
        if self._pool is None or self._pool.device != x.device:
            self._pool = torch.zeros(size, self.config.d_in, device=x.device)
            self._pool_filled = self._pool_next = 0
        rows = x[:size].to(self._pool.dtype)
        index = (torch.arange(rows.shape[0], device=self._pool.device) + self._pool_next) % size
        self._pool[index] = rows
        self._pool_next = int((self._pool_next + rows.shape[0]) % size)
        self._pool_filled = min(size, self._pool_filled + rows.shape[0])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, _ = self._vectors(batch)
        if not bool(self.b_dec_initialized):
            self._init_b_dec(x)
        dead = self.dead_latents() if isinstance(self.sae, TopKSAE) else None
        out = self.sae.training_forward(x, step=self.global_step, dead=dead)
        if not self.loss_is_usable(StepOutput(out.loss, dict(out.losses)), "train", batch_idx):
            return None
        self._track(out.latents, x.shape[0])
        self._remember(x)
        n = x.shape[0]
        self.log("train_loss", out.loss, on_step=True, on_epoch=True, batch_size=n, prog_bar=True)
        for name, value in out.losses.items():
            self.log(f"train_{name}", value, on_step=True, on_epoch=False, batch_size=n)
        with torch.no_grad():
            l0 = (out.latents != 0).sum(dim=1).float().mean()
        self.log("train_l0", l0, on_step=True, on_epoch=False, batch_size=n)
        self.log("train_dead_fraction", self.dead_latents().float().mean(), on_step=True, on_epoch=False, batch_size=n)
        return out.loss

    def configure_optimizers(self) -> Any:
        """As :class:`~lightning_xai.models.base.XAIModule`, but Adam / AdamW without a scheduler use the fused
        implementation (one pass over each parameter: on CPU about 3x faster than the default for-loop kernel,
        which otherwise costs as much as one of the step's large matrix products)."""
        params = list(self.optimizer_parameters())
        fusable = self.scheduler_name is None and self.optimizer_name in ("adam", "adamw")
        if not fusable or not params or any(p.device.type not in ("cpu", "cuda") for p in params):
            return super().configure_optimizers()
        return self.build_optimizer(params, fused=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.remove_parallel_gradient()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.normalize_decoder()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        config = self.config
        if not isinstance(config, ReLUSAEConfig) or config.resample_every is None:
            return
        step = self.global_step
        if step > 0 and step % config.resample_every == 0 and int(self.resamplings) < config.resample_max:
            self.resample_dead_latents()

    @torch.no_grad()
    def resample_dead_latents(self) -> int:
        """Resample the dead latents now (ReLU variant; see the module docstring); returns how many.

        Every process must call it (the candidate pools are gathered); all end with identical parameters.
        """
        sae = self.sae
        if not isinstance(sae, ReLUSAE):
            raise ValueError(f"resampling is implemented for the ReLU SAE, not {type(sae).__name__}")
        self.resamplings += 1
        dead = self.dead_latents()
        index = torch.nonzero(dead).flatten()
        reducer = default_reducer()
        local = (
            self._pool if self._pool is not None else torch.zeros(self._pool_size, self.config.d_in, device=self.device)
        )
        pools = reducer(local, "gather")
        filled = reducer(torch.tensor([self._pool_filled], device=local.device), "gather").flatten()
        candidates = torch.cat([pools[r, : int(filled[r])] for r in range(pools.shape[0])])
        if index.numel() == 0 or candidates.shape[0] == 0:
            return 0
        losses = (sae(candidates) - candidates).square().sum(dim=-1).double()
        weights = losses.square().cpu()
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.global_step))
        replace = index.numel() > candidates.shape[0]
        picks = torch.multinomial(weights, index.numel(), replacement=replace, generator=generator)
        directions = candidates[picks.to(candidates.device)] - sae.b_dec
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        encoder_norm = float(sae.W_enc[:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0
        sae.resample(index, directions, encoder_norm * self.config.resample_encoder_scale)  # type: ignore[union-attr]
        trainer = self._trainer
        if trainer is not None and trainer.optimizers:
            for optimizer in trainer.optimizers:
                _reset_optimizer_slices(optimizer, sae.W_dec, index, 0)
                _reset_optimizer_slices(optimizer, sae.W_enc, index, 1)
                _reset_optimizer_slices(optimizer, sae.b_enc, index, 0)
        self.samples_since_fired[index] = 0
        return int(index.numel())

    # ------------------------------------------------------------------------------------------ evaluation
    def reconstruct(self, x: Tensor) -> Tensor:
        """The SAE's reconstruction of (normalised) vectors ``x``."""
        return self.sae(x)

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, b = self._vectors(batch)
        f = self.sae.encode(x)
        x_hat = self.sae.decode(f)
        getattr(self, f"{stage}_metrics").update(x, x_hat, f)
        source = self.source
        labels = b.labels
        if self.downstream and source is not None and b.images is not None:
            mask = b.token_mask
            orig = source.model_output(b.images, attention_mask=mask) if labels is not None else None
            if orig is not None and orig.ndim == 2 and labels.ndim == 1 and labels.shape[0] == orig.shape[0]:
                spliced = source.model_output(b.images, replace=self.reconstruct, attention_mask=mask)
                zeroed = source.model_output(b.images, replace="zero", attention_mask=mask)
                getattr(self, f"{stage}_downstream").update(orig, spliced, zeroed, labels)
            else:
                self._say_no_downstream(labels, orig)
        latent_images = source is None or source.spatial == "positions"
        if stage == "val" and b.images is not None and self.log_top_latents > 0 and latent_images:
            kept = sum(t.shape[0] for t in self._probe)
            if kept < self.probe_images:
                self._probe.append(b.images[: self.probe_images - kept].detach().cpu())

    def _say_no_downstream(self, labels: Tensor | None, output: Tensor | None) -> None:
        """``downstream=True`` but a batch cannot give the downstream figures: said once, with the reason."""
        if self._said_no_downstream:
            return
        self._said_no_downstream = True
        if labels is None:
            why = "the evaluation batches carry no class labels (pass label_key= to ActivationDataModule)"
        else:
            why = (f"the model's output {tuple(output.shape)} and the labels {tuple(labels.shape)} are not "
                   "[B, num_classes] logits and [B] class indices")
        rank_zero_warn(
            f"{type(self).__name__}: downstream=True, but {why}; the downstream figures (ce_orig, ce_sae, ce_zero, "
            "downstream_score) are not computed. Pass downstream=False to silence this."
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_eval(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        downstream = getattr(self, f"{stage}_downstream")
        values: dict[str, Tensor] = {}
        if metrics.update_called:
            values.update(metrics.compute())
        if downstream.update_called:
            values.update(downstream.compute())
        metrics.reset()
        downstream.reset()
        if values:
            self.log_dict({f"{stage}_{k}": v.float() for k, v in values.items()}, sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self._probe = []

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        trainer = self.trainer
        quiet = trainer.sanity_checking or bool(trainer.fast_dev_run)
        if self.log_top_latents > 0 and self._probe and trainer.is_global_zero and not quiet:
            try:
                images = torch.cat(self._probe)
                self.log_latent_table(trainer.loggers, images, step=self.global_step)
            except Exception as error:  # a failed visualisation must not end the training run
                warnings.warn(f"SparseAutoencoder: logging the latent table failed: {error!r}", stacklevel=2)
        self._probe = []

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
