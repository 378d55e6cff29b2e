"""Adversarial training: robustness as a prior that makes a classifier's gradients human-aligned.

* **PGD.** Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018: an adversarial example is found by projected gradient descent on the loss inside an
  ``L_inf`` or ``L_2`` ball of radius ``eps`` around the input, and training on these worst-case inputs (the
  min-max objective) makes the model robust.
* **Robustness as a prior.** Tsipras, Santurkar, Engstrom, Turner and Madry, "Robustness May Be at Odds with
  Accuracy", ICLR 2019, and Engstrom, Ilyas, Santurkar, Tsipras, Tran and Madry, "Adversarial Robustness as a
  Prior for Learned Representations", arXiv:1906.00945, 2019: robust models have input gradients that are
  perceptually aligned (plain saliency maps highlight the object), and large-``eps`` *targeted* attacks on them
  paint features of the target class into the image instead of imperceptible noise. ``benchmarks/
  robust_saliency.py`` measures both on the ground-truth flowers.

:class:`PGDAttack` is pure torch (usable on any ``nn.Module``). :class:`AdversarialTrainingMixin` turns a
classification LightningModule of this project into its adversarially trained version;
:class:`AdversarialClassifier` is that mixin applied to :class:`~lightning_xai.models.ImageClassifier`.

**Applying the mixin to another module.** Put the mixin *first* among the bases and call
:meth:`~AdversarialTrainingMixin.configure_adversarial` at the end of ``__init__``::

    class AdversarialConceptBottleneck(AdversarialTrainingMixin, ConceptBottleneckModel):
        def __init__(self, ..., eps: float = 8 / 255, steps: int = 7) -> None:
            super().__init__(...)
            self.configure_adversarial(PGDAttack(eps=eps, steps=steps), num_classes=self.num_classes)

        def adversarial_logits(self, x: Tensor) -> Tensor:   # only if forward() does not return class logits
            return self(x).class_logits

The mixin's ``training_step`` replaces the batch's images by PGD examples of the batch (attacking the
cross-entropy of :meth:`~AdversarialTrainingMixin.adversarial_logits` against the batch's labels) and then runs
the wrapped module's own ``training_step`` on that batch, so whatever loss and training metrics the module has are
computed on the adversarial images. ``validation_step`` / ``test_step`` run the module's own step
on the clean batch and then log ``{stage}_clean_acc`` and ``{stage}_robust_acc`` (torchmetrics accuracies,
reduced across DDP ranks). Images and labels are read, and the images written back, by the module's
:class:`~lightning_xai.batch.BatchReader` (its ``input_key`` / ``label_key``): tuples, dicts with custom keys,
namedtuples and objects with attributes all work, and a batch without labels raises naming the module, the
batch's fields and ``label_key=``. Override :meth:`~AdversarialTrainingMixin.adversarial_inputs`,
:meth:`~AdversarialTrainingMixin.adversarial_labels` and :meth:`~AdversarialTrainingMixin.replace_inputs` only
for layouts a reader cannot express.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_xai.attribution.base import gradient_context, model_state_guard
from lightning_xai.batch import BatchReader, Key
from lightning_xai.checks import check_bool, check_choice, check_float, check_int, check_range
from lightning_xai.models.classifier import ImageClassifier

__all__ = ["ATTACK_MODES", "NORMS", "NORM_ALIASES", "AdversarialClassifier", "AdversarialTrainingMixin", "PGDAttack"]

#: Threat models: ``"linf"`` (``max_i |delta_i| <= eps``) and ``"l2"`` (``||delta||_2 <= eps`` per sample).
NORMS = ("linf", "l2")
#: The model's mode while the attack runs.
ATTACK_MODES = ("eval", "train")


#: Spellings of the norms accepted besides :data:`NORMS` (case, ``_`` and ``-`` are ignored).
NORM_ALIASES = {"inf": "linf", "linfinity": "linf", "2": "l2"}


def _norm_name(norm: object) -> object:
    """``norm`` with its alias resolved (``"Linf"``, ``"L_inf"``, ``"inf"`` -> ``"linf"``); other values as given."""
    if not isinstance(norm, str):
        return norm
    key = norm.lower().replace("_", "").replace("-", "")
    return NORM_ALIASES.get(key, key if key in NORMS else norm)


def _per_sample_norm(x: Tensor) -> Tensor:
    """``||x_i||_2`` of each sample, shaped to broadcast against ``x``."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


@contextlib.contextmanager
def _buffer_guard(model: nn.Module) -> Iterator[None]:
    """Restore every buffer's values on exit (BatchNorm running statistics updated by train-mode forwards)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class PGDAttack:
    """Projected gradient descent (Madry et al., ICLR 2018) in an ``L_inf`` or ``L_2`` ball.

    Args:
        eps: radius of the ball around each input, > 0 (in input units; e.g. ``8/255`` for ``L_inf`` on [0, 1]
            images, ``0.5`` for ``L_2`` on 32x32 images).
        norm: ``"linf"`` or ``"l2"``.
        steps: number of gradient steps, >= 1.
        step_size: step length per iteration, > 0; default ``2.5 * eps / steps`` (the rule of Madry et al.'s
            ``robustness`` library: the ball can be crossed and there is slack for the projection).
        random_start: start from a uniformly random point of the ball (``L_inf``: uniform in the cube; ``L_2``:
            uniform in the ball) instead of the input itself. Uses the global torch RNG (seed it for
            reproducibility).
        targeted: ``False``: move away from the given labels (maximise their cross-entropy); ``True``: move
            towards the given labels (minimise the cross-entropy of the targets).
        input_range: valid input range ``(low, high)``; every iterate is clamped to it (default ``(0, 1)``, the
            range of this project's datasets); ``None`` = no clamping.
        attack_mode: the model's mode while attacking. ``"eval"`` (default): BatchNorm uses its running
            statistics and dropout is off, so the attack sees the function that is evaluated, and no adversarial
            batch is ever folded into the BatchNorm statistics (which would pollute them with inputs the
            model never sees at test time). ``"train"``: attack the training-mode function (batch statistics,
            dropout on); the BatchNorm running statistics updated by those forward passes are restored
            afterwards.

    Steps (``g`` = gradient of the loss w.r.t. the input): ``L_inf``: ``x += step_size * sign(g)``; ``L_2``:
    ``x += step_size * g / ||g||_2``; then project onto the ball around the clean input and clamp to
    ``input_range``. Gradients are taken with :func:`torch.autograd.grad` w.r.t. the input only: parameters'
    ``.grad`` are never touched, and every module's mode, ``requires_grad`` and buffers are as before afterwards,
    also on error. Works inside ``torch.no_grad()`` / ``torch.inference_mode()`` (Lightning's validation).

    ``attack(model, inputs, labels)`` returns the adversarial inputs (detached, same shape/dtype/device). The
    ``steps`` model evaluations run one after the other on the given batch, so memory is that of one
    forward/backward pass of the batch (split large batches before calling).
    """

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        targeted: bool = False,
        input_range: tuple[float, float] | None = (0.0, 1.0),
        attack_mode: str = "eval",
    ) -> None:
        owner = "PGDAttack"
        self.eps = check_float("eps", eps, minimum=0, strict=True, owner=owner)
        self.norm = check_choice("norm", _norm_name(norm), NORMS, owner=owner)
        self.steps = check_int("steps", steps, minimum=1, owner=owner)
        self.step_size = (2.5 * self.eps / self.steps if step_size is None
                          else check_float("step_size", step_size, minimum=0, strict=True, owner=owner))
        self.random_start = check_bool("random_start", random_start, owner=owner)
        self.targeted = check_bool("targeted", targeted, owner=owner)
        self.input_range = check_range("input_range", input_range, owner=owner, allow_none=True)
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES, owner=owner)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"PGDAttack({fields})"

    # ------------------------------------------------------------------------------------------ geometry
    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        """Project ``x`` onto the ``eps``-ball around ``x0`` and clamp it to ``input_range``."""
        delta = x - x0
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        out = x0 + delta
        if self.input_range is not None:
            out = out.clamp(*self.input_range)
        return out

    def random_point(self, x0: Tensor) -> Tensor:
        """A uniformly random point of the ball around ``x0`` (then clamped to ``input_range``)."""
        if self.norm == "linf":
            delta = (torch.rand_like(x0) * 2 - 1) * self.eps
        else:
            direction = torch.randn_like(x0)
            direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
            dim = x0[0].numel()
            radius = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype) ** (1.0 / dim)
            delta = direction * radius.view(-1, *([1] * (x0.ndim - 1))) * self.eps
        return self.project(x0 + delta, x0)

    def _ascent_direction(self, grad: Tensor) -> Tensor:
        if self.norm == "linf":
            return grad.sign()
        return grad / _per_sample_norm(grad).clamp_min(1e-12)

    # ------------------------------------------------------------------------------------------ attack
    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor | int,
        *,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Adversarial examples of ``inputs``.

        Args:
            model: the attacked model; its state is guarded (see the class docstring).
            inputs: ``[B, ...]`` floating-point batch.
            labels: ``LongTensor[B]`` (or one int for the whole batch): the true classes (untargeted) or the
                target classes (``targeted=True``).
            forward: computes the logits ``[B, num_classes]`` from inputs; default ``model`` itself (pass e.g.
                ``lambda x: model(x)["logits"]`` for models whose output is not the logits).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"PGDAttack: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            kind = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
            raise TypeError(f"PGDAttack: inputs must be a floating-point tensor, got {kind}")
        if inputs.ndim < 2 or inputs.shape[0] == 0:
            raise ValueError(f"PGDAttack: inputs need a non-empty batch dimension, got shape {list(inputs.shape)}")
        forward = model if forward is None else forward
        with gradient_context(), model_state_guard(model, eval_mode=self.attack_mode == "eval"):
            guard = _buffer_guard(model) if self.attack_mode == "train" else contextlib.nullcontext()
            with guard:
                if self.attack_mode == "train":
                    model.train()
                x0 = inputs.detach().clone()
                y = self._labels(labels, x0)
                x = self.random_point(x0) if self.random_start else x0.clone()
                for step in range(self.steps):
                    x.requires_grad_(True)
                    logits = forward(x)
                    if step == 0:
                        self._check_logits(logits, y)
                    loss = F.cross_entropy(logits, y, reduction="sum")
                    if self.targeted:
                        loss = -loss
                    (grad,) = torch.autograd.grad(loss, x)
                    with torch.no_grad():
                        x = self.project(x.detach() + self.step_size * self._ascent_direction(grad), x0)
        return x.detach()

    @staticmethod
    def _check_logits(logits: object, y: Tensor) -> None:
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != y.shape[0]:
            shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"PGDAttack needs logits of shape [B, num_classes] = [{y.shape[0]}, C]; the model returned {shape} "
                "(pass forward= to map its output to logits)"
            )
        if int(y.max()) >= logits.shape[1]:
            raise ValueError(
                f"label {int(y.max())} is out of range for {logits.shape[1]} classes (valid 0..{logits.shape[1] - 1})"
            )

    @staticmethod
    def _labels(labels: Tensor | int, x0: Tensor) -> Tensor:
        if isinstance(labels, bool):
            raise TypeError(f"labels must be an int or a LongTensor[B], got bool {labels!r}")
        if isinstance(labels, int):
            labels = torch.full((x0.shape[0],), labels, dtype=torch.long)
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
            kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an int or an integer tensor of class indices, got {kind}")
        if labels.ndim != 1 or labels.shape[0] != x0.shape[0]:
            raise ValueError(f"labels must have shape [B] = [{x0.shape[0]}], got {list(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        return labels.detach().clone().long().to(x0.device)


class AdversarialTrainingMixin:
    """Adversarial training (Madry et al., ICLR 2018) for a classification LightningModule; see the module
    docstring for how to apply it. Call :meth:`configure_adversarial` in ``__init__``.

    Logged: the wrapped module's own metrics (its training metrics on the adversarial batch, its validation/test
    metrics on the clean batch), plus ``val_clean_acc``, ``val_robust_acc``, ``test_clean_acc`` and
    ``test_robust_acc`` (micro accuracy, torchmetrics states reduced across DDP ranks).
    """

    attack: PGDAttack
    eval_attack: PGDAttack | None

    def configure_adversarial(
        self, attack: PGDAttack, num_classes: int, eval_attack: PGDAttack | None = None, robust_eval: bool = True
    ) -> None:
        """Set the training attack, and the attack used to measure robust accuracy (default: ``attack`` with
        ``random_start=False``, so that the metric is deterministic); ``robust_eval=False`` skips it."""
        if not isinstance(self, nn.Module):
            raise TypeError("AdversarialTrainingMixin must be mixed into a LightningModule (an nn.Module)")
        if not isinstance(attack, PGDAttack):
            raise TypeError(f"attack must be a PGDAttack, got {type(attack).__name__}")
        if eval_attack is not None and not isinstance(eval_attack, PGDAttack):
            raise TypeError(f"eval_attack must be a PGDAttack or None, got {type(eval_attack).__name__}")
        check_int("num_classes", num_classes, minimum=2, owner=type(self).__name__)
        self.attack = attack
        if eval_attack is None:
            eval_attack = PGDAttack(
                eps=attack.eps,
                norm=attack.norm,
                steps=attack.steps,
                step_size=attack.step_size,
                random_start=False,
                targeted=False,
                input_range=attack.input_range,
                attack_mode="eval",
            )
        self.eval_attack = eval_attack if check_bool("robust_eval", robust_eval, owner=type(self).__name__) else None
        robust = MetricCollection({name: MulticlassAccuracy(num_classes, average="micro")
                                   for name in ("clean_acc", "robust_acc")})
        self.robust_metrics = nn.ModuleDict({stage: robust.clone(prefix=f"{stage}_") for stage in ("val", "test")})

    # ------------------------------------------------------------------------------- batch layout hooks
    @property
    def adversarial_batch_reader(self) -> BatchReader:
        """How batches are read: the module's own ``batch_reader`` (``input_key`` / ``label_key`` of
        :class:`~lightning_xai.models.base.XAIModule`), else the defaults of
        :class:`~lightning_xai.batch.BatchReader`."""
        reader = getattr(self, "batch_reader", None)
        return reader if isinstance(reader, BatchReader) else BatchReader(owner=type(self).__name__)

    def adversarial_inputs(self, batch: Any) -> Tensor:
        """The images of ``batch`` that are attacked (where the batch reader finds the input)."""
        return self.adversarial_batch_reader.inputs(batch)

    def adversarial_labels(self, batch: Any) -> Tensor:
        """The class labels of ``batch`` (required: the attack maximises their cross-entropy)."""
        return self.adversarial_batch_reader.labels(batch, required=True)

    def replace_inputs(self, batch: Any, inputs: Tensor) -> Any:
        """A copy of ``batch`` with its images replaced by ``inputs`` (same container type, same field)."""
        return self.adversarial_batch_reader.with_inputs(batch, inputs)

    def adversarial_logits(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]`` of ``x``: ``self(x)``."""
        return self(x)  # type: ignore[operator]

    # ------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = self.adversarial_inputs(batch), self.adversarial_labels(batch)
        x_adv = self.attack(self, x, y, forward=self.adversarial_logits)  # type: ignore[arg-type]
        return super().training_step(self.replace_inputs(batch, x_adv), batch_idx)  # type: ignore[misc]

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().validation_step(batch, batch_idx)  # type: ignore[misc]
        self._robust_eval_step(batch, "val")
        return out

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().test_step(batch, batch_idx)  # type: ignore[misc]
        self._robust_eval_step(batch, "test")
        return out

    def _robust_eval_step(self, batch: Any, stage: str) -> None:
        if self.eval_attack is None:
            return
        x, y = self.adversarial_inputs(batch), self.adversarial_labels(batch)
        metrics = self.robust_metrics[stage]
        clean_acc, robust_acc = metrics["clean_acc"], metrics["robust_acc"]
        clean_acc(self.adversarial_logits(x), y)
        x_adv = self.eval_attack(self, x, y, forward=self.adversarial_logits)  # type: ignore[arg-type]
        robust_acc(self.adversarial_logits(x_adv), y)
        log = self.log  # type: ignore[attr-defined]
        log(f"{stage}_clean_acc", clean_acc, on_step=False, on_epoch=True, batch_size=len(y))
        log(f"{stage}_robust_acc", robust_acc, on_step=False, on_epoch=True, batch_size=len(y), prog_bar=True)


class AdversarialClassifier(AdversarialTrainingMixin, ImageClassifier):
    """:class:`~lightning_xai.models.ImageClassifier` trained on PGD examples (Madry et al., ICLR 2018).

    Args:
        backbone, num_classes, in_channels, optimizer, lr, weight_decay, scheduler, momentum, on_nonfinite_loss,
            input_key, label_key: as in :class:`~lightning_xai.models.ImageClassifier` (the keys say where the
            attacked images and their labels are in a batch).
        eps, norm, steps, step_size, random_start, attack_mode, input_range: the training attack
            (:class:`PGDAttack`); ``eps <= 0``, ``steps < 1`` or an unknown ``norm`` raise ``ValueError`` here.
        eval_steps: PGD steps of the attack measuring robust accuracy (default: ``steps``); it uses the same
            ``eps`` / ``norm``, starts at the clean input (deterministic metric) and runs in eval mode.
        robust_eval: measure robust accuracy in validation/test (one extra attack per batch).

    Logged: ``train_loss`` / ``train_acc`` (on the adversarial training batch, i.e. robust training accuracy),
    ``val_loss`` / ``val_acc`` / ``test_*`` on clean data, and ``val_clean_acc``, ``val_robust_acc``,
    ``test_clean_acc``, ``test_robust_acc`` (see :class:`AdversarialTrainingMixin`).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small_cnn",
        num_classes: int = 6,
        in_channels: int = 3,
        eps: float = 8 / 255,
        norm: str = "linf",
        steps: int = 7,
        step_size: float | None = None,
        random_start: bool = True,
        attack_mode: str = "eval",
        input_range: tuple[float, float] | None = (0.0, 1.0),
        eval_steps: int | None = None,
        robust_eval: bool = True,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        momentum: float = 0.9,
        on_nonfinite_loss: str = "raise",
        input_key: Key | None = None,
        label_key: Key | None = None,
    ) -> None:
        # both attacks are validated before the backbone is built
        attack = PGDAttack(eps=eps, norm=norm, steps=steps, step_size=step_size, random_start=random_start,
                           input_range=input_range, attack_mode=attack_mode)
        if eval_steps is not None:
            check_int("eval_steps", eval_steps, minimum=1, owner=type(self).__name__)
        eval_attack = PGDAttack(eps=eps, norm=norm, steps=steps if eval_steps is None else eval_steps,
                                random_start=False, input_range=input_range)
        super().__init__(backbone=backbone, num_classes=num_classes, in_channels=in_channels, optimizer=optimizer,
                         lr=lr, weight_decay=weight_decay, scheduler=scheduler, momentum=momentum,
                         on_nonfinite_loss=on_nonfinite_loss, input_key=input_key, label_key=label_key)
        self.configure_adversarial(attack, num_classes=num_classes, eval_attack=eval_attack, robust_eval=robust_eval)
