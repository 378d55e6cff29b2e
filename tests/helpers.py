"""Test helpers shared across test modules: small models with known structure and the no-side-effect check."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class LinearModel(nn.Module):
    """``y = W flatten(x) + b``: attributions have closed forms in ``W``."""

    def __init__(self, in_shape: tuple[int, ...] = (3, 8, 8), num_classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = int(torch.tensor(in_shape).prod())
        self.in_shape = in_shape
        self.fc = nn.Linear(n, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, n, generator=g))
            self.fc.bias.copy_(torch.randn(num_classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))

    def weight_map(self, cls: int) -> torch.Tensor:
        return self.fc.weight[cls].detach().view(self.in_shape)


class GapCNN(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU(inplace) -> global average pool -> linear: the CAM architecture.

    ``features`` is the CAM layer; the in-place ReLUs exercise the in-place trap.
    """

    def __init__(self, num_classes: int = 4, channels: int = 8, in_channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))


@dataclass
class ModelState:
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    grad_values: dict[str, torch.Tensor | None]
    params: dict[str, torch.Tensor]
    hooks: dict[str, int]


def _hook_count(module: nn.Module) -> int:
    return sum(
        len(getattr(module, attr, {}))
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
        )
    )


def snapshot(model: nn.Module) -> ModelState:
    named = dict(model.named_parameters())
    return ModelState(
        training={n: m.training for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in named.items()},
        grads={n: p.grad for n, p in named.items()},
        grad_values={n: None if p.grad is None else p.grad.clone() for n, p in named.items()},
        params={n: p.detach().clone() for n, p in named.items()},
        hooks={n: _hook_count(m) for n, m in model.named_modules()},
    )


def assert_unchanged(model: nn.Module, before: ModelState) -> None:
    """The attributors' contract (docs/architecture.md): modes, requires_grad, .grad, parameters and hooks."""
    after = snapshot(model)
    assert after.training == before.training, "a submodule's train/eval mode changed"
    assert after.requires_grad == before.requires_grad, "a parameter's requires_grad changed"
    for n, g in before.grads.items():
        assert after.grads[n] is g, f"parameter {n}: .grad object was replaced"
        if g is not None:
            assert torch.equal(after.grad_values[n], before.grad_values[n]), f"parameter {n}: .grad values changed"
    for n, p in before.params.items():
        assert torch.equal(after.params[n], p), f"parameter {n} changed"
    assert after.hooks == before.hooks, "hooks were left on the model"
    assert not torch.nn.modules.module._global_forward_hooks, "a global forward hook was left"
    assert not torch.nn.modules.module._global_backward_hooks, "a global backward hook was left"


def put_in_train_mode_with_grads(model: nn.Module) -> None:
    """A model in the middle of training: train mode, some grads set, one frozen parameter."""
    model.train()
    params = list(model.parameters())
    for i, p in enumerate(params):
        if i % 2 == 0:
            p.grad = torch.full_like(p, 0.5)
    params[-1].requires_grad_(False)


def hooked_output(model: nn.Module, layer: str | nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (a dotted name or the module) in an eval-mode forward pass, recorded with a plain
    forward hook: independent of the library's own layer capture, so tests can compare against it."""
    module = dict(model.named_modules())[layer] if isinstance(layer, str) else layer
    store: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
    return store[-1]
