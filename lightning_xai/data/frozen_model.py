"""The frozen model behind an activation source: its weights (loaded, fingerprinted) and what the source asks of
it (a declared padding id, which layers emit token sequences).

Used by :class:`~lightning_xai.data.activation_source.ActivationSource` and the activation cache (the fingerprint
is the cache key); split from ``lightning_xai.data.activation_source``, which re-exports the public names.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_xai.attribution.base import model_state_guard

__all__ = ["load_weights", "model_fingerprint"]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of the model's state dict: every name, dtype, shape and value (parameters and buffers).

    Identical weights give identical fingerprints on any device; used to tell whether an activation cache was
    written by this very model.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, Tensor):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{list(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict file into ``model`` (strict): a ``torch.save``-d state dict, or a Lightning checkpoint
    (its ``"state_dict"``). When the keys only match after removing a common prefix (``"backbone."`` of an
    :class:`~lightning_xai.models.ImageClassifier` checkpoint, ``"model."``), the prefix is removed."""
    if not os.path.isfile(path):
        raise ValueError(f"weights file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict or a Lightning checkpoint")
    expected = set(model.state_dict())
    if set(state) != expected:
        prefixes = {key.split(".", 1)[0] + "." for key in state if "." in key}
        for prefix in sorted(prefixes):
            stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if set(stripped) == expected:
                state = stripped
                break
    model.load_state_dict(state, strict=True)


def _model_pad_token(model: nn.Module) -> int | None:
    """The ``pad_token`` attribute (an int) of ``model`` or of its first submodule that has one, else ``None``."""
    for module in model.modules():
        value = getattr(module, "pad_token", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _layers_with_token_outputs(model: nn.Module, inputs: Tensor) -> list[str]:
    """Names of the modules whose output on ``inputs`` is a 3-D tensor (one forward pass; for error messages)."""
    found: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_module: nn.Module, _inputs: tuple, output: object, name: str = name) -> None:
            if isinstance(output, Tensor) and output.ndim == 3 and name not in found:
                found.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), model_state_guard(model):
            model(inputs)
    except Exception:  # only a hint for an error message
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found
