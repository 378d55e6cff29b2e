"""Token models in callbacks: which positions of integer ``[B, T]`` inputs are padding.

A callback that scores or compares token attributions leaves padding out (a padded position is not part of the
text: it has no relevance to rank, no evidence to find, nothing to remove). The padding id is the callback's
``pad_token`` argument or, when that is ``None``, the one the model declares (:func:`model_pad_token`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["model_pad_token", "resolve_pad_token", "valid_positions"]


def model_pad_token(model: Any) -> int | None:
    """The padding id a token model declares: an int ``pad_token`` attribute of a submodule (as on
    :class:`~lightning_xai.models.transformers.TextTransformer`) or ``config.pad_token_id`` (HuggingFace models);
    ``None`` if it declares none."""
    modules = model.modules() if hasattr(model, "modules") else [model]
    for module in modules:
        config = getattr(module, "config", None)
        for value in (getattr(module, "pad_token", None), getattr(config, "pad_token_id", None)):
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return None


def resolve_pad_token(callback: Any, pad_token: int | None, model: Any) -> int | None:
    """``pad_token`` if given, else the model's (:func:`model_pad_token`); the callback says once which it uses
    (``callback.say_once``), or that every position is scored when there is none."""
    if pad_token is not None:
        return pad_token
    found = model_pad_token(model)
    if found is not None:
        callback.say_once("pad", f"pad_token=None: the model's pad token {found} is taken as padding and left out")
    else:
        callback.say_once(
            "pad",
            "pad_token is not given and the model declares none: every token position is used, padding included "
            "(pass pad_token= if the sequences are padded)",
        )
    return found


def valid_positions(inputs: Tensor, pad_token: int | None) -> Tensor | None:
    """``bool[B, T]``: the positions of token ids ``inputs`` that are not ``pad_token`` (``None``: no padding)."""
    return None if pad_token is None else inputs != pad_token
