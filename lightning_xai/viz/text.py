"""Token attributions rendered as highlighted text: HTML for W&B / notebooks, plain text with scores otherwise.

The text counterpart of the heatmap renderer: a token attribution ``Tensor[T]`` (one score per token, raw and
signed, as the token attributors return it) and the tokens' strings become

* :func:`tokens_to_html`: one ``<span>`` per token whose background is red for positive and blue for negative
  evidence, its opacity proportional to ``|score| / vmax`` (``vmax`` = the largest magnitude of the sequence unless
  given, so maps of one batch can share a scale), the exact score in the hover title. Wrap a batch with
  :func:`batch_to_html` and log it with ``wandb.Html(html)``.
* :func:`tokens_to_text`: ``token(+0.123) token(-0.045) ...`` for logs, terminals and text loggers; with ``top_k``
  only the ``k`` largest-magnitude tokens are annotated.

Non-finite scores are never hidden: they render as ``nan`` / ``inf`` (grey, struck through in HTML) and never as
a plausible colour. Token strings are HTML-escaped. Pure Python + torch; no Lightning, no W&B import.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_xai.checks import check_float, check_optional_int

__all__ = ["batch_to_html", "decode_tokens", "tokens_to_html", "tokens_to_text"]

#: RGB of positive and negative evidence (the colours of the signed heatmaps: red / blue).
POSITIVE_RGB = (214, 39, 40)
NEGATIVE_RGB = (31, 119, 180)


def decode_tokens(
    ids: Tensor | Sequence[int], vocabulary: Sequence[str] | Callable[[int], str] | None = None
) -> list[str] | list[list[str]]:
    """Token ids (``[T]`` or ``[B, T]``) as strings for rendering: ``vocabulary`` is a list of names (e.g.
    :attr:`~lightning_xai.data.tokens.PlantedTokens.token_names`), a callable ``id -> str`` (e.g. a HuggingFace
    tokenizer's ``convert_ids_to_tokens``) or ``None`` (the ids themselves). Ids outside a list are shown as
    ``"<id>"``, never silently as another token."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if values and isinstance(values[0], list):
        return [decode_tokens(row, vocabulary) for row in values]  # type: ignore[misc]

    def name(i: int) -> str:
        if vocabulary is None:
            return str(i)
        if callable(vocabulary):
            return str(vocabulary(i))
        return str(vocabulary[i]) if 0 <= i < len(vocabulary) else f"<{i}>"

    return [name(int(i)) for i in values]


def _scores(tokens: Sequence[str], scores: Tensor | Sequence[float], owner: str) -> list[float]:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise ValueError(f"{owner}: tokens must be a sequence of strings, got {type(tokens).__name__}")
    values = scores.detach().flatten().tolist() if isinstance(scores, Tensor) else [float(s) for s in scores]
    if len(values) != len(tokens):
        raise ValueError(f"{owner}: got {len(tokens)} tokens but {len(values)} scores; give one score per token")
    return values


def _vmax(values: list[float], vmax: float | None, owner: str) -> float:
    if vmax is not None:
        return check_float("vmax", vmax, minimum=0.0, strict=True, owner=owner)
    finite = [abs(v) for v in values if math.isfinite(v)]
    return max(finite, default=0.0)


def _format(value: float, precision: int) -> str:
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("+inf" if value > 0 else "-inf")
    return f"{value:+.{precision}f}"


def tokens_to_html(
    tokens: Sequence[str],
    scores: Tensor | Sequence[float],
    *,
    vmax: float | None = None,
    precision: int = 3,
    skip: Sequence[str] = (),
) -> str:
    """One HTML ``<div>`` of highlighted tokens (see the module docstring).

    Args:
        tokens: the token strings (e.g. :meth:`~lightning_xai.data.tokens.PlantedTokens.decode`).
        scores: one score per token, ``Tensor[T]`` or a list.
        vmax: the magnitude drawn fully opaque; ``None`` = the sequence's largest finite magnitude.
        precision: decimals of the scores in the hover titles.
        skip: token strings left out of the rendering (e.g. ``"[PAD]"``).
    """
    owner = "tokens_to_html"
    values = _scores(tokens, scores, owner)
    top = _vmax(values, vmax, owner)
    spans = []
    for token, value in zip(tokens, values, strict=True):
        if token in skip:
            continue
        text, title = html.escape(str(token)), html.escape(_format(value, precision))
        if not math.isfinite(value):
            style = "background:#ddd;color:#555;text-decoration:line-through"
        else:
            alpha = 0.0 if top == 0 else min(abs(value) / top, 1.0)
            r, g, b = POSITIVE_RGB if value >= 0 else NEGATIVE_RGB
            style = f"background:rgba({r},{g},{b},{alpha:.3f})"
        spans.append(
            f'<span title="{title}" style="{style};padding:1px 3px;margin:1px;border-radius:3px">{text}</span>'
        )
    return '<div style="font-family:monospace;line-height:1.9">' + " ".join(spans) + "</div>"


def batch_to_html(
    tokens: Sequence[Sequence[str]],
    scores: Tensor,
    *,
    captions: Sequence[str] | None = None,
    shared_scale: bool = False,
    precision: int = 3,
    skip: Sequence[str] = (),
) -> str:
    """An HTML document with one highlighted sequence per row of ``scores [B, T]``, each under its caption.

    ``shared_scale``: one ``vmax`` for the whole batch (comparable opacity across rows) instead of one per row.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[0] != len(tokens):
        shape = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"batch_to_html: scores must be a tensor [B, T] with B = {len(tokens)}, got {shape}")
    if captions is not None and len(captions) != len(tokens):
        raise ValueError(f"batch_to_html: got {len(captions)} captions for {len(tokens)} sequences")
    vmax = None
    if shared_scale:
        finite = scores[torch.isfinite(scores)].abs()
        vmax = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else None
    rows = []
    for i, row in enumerate(tokens):
        caption = f'<div style="font-size:small;color:#555">{html.escape(captions[i])}</div>' if captions else ""
        rows.append(caption + tokens_to_html(row, scores[i], vmax=vmax, precision=precision, skip=skip))
    return "<div>" + "".join(rows) + "</div>"


def tokens_to_text(
    tokens: Sequence[str],
    scores: Tensor | Sequence[float],
    *,
    precision: int = 3,
    top_k: int | None = None,
    skip: Sequence[str] = (),
) -> str:
    """``token(+0.123) token(-0.045) ...``; with ``top_k`` only the ``k`` largest-magnitude tokens carry their
    score (non-finite scores are always shown)."""
    owner = "tokens_to_text"
    values = _scores(tokens, scores, owner)
    top_k = check_optional_int("top_k", top_k, minimum=1, owner=owner, none_means="annotate every token")
    shown = set(range(len(values)))
    if top_k is not None:
        finite = [i for i in range(len(values)) if tokens[i] not in skip and math.isfinite(values[i])]
        order = sorted(finite, key=lambda i: -abs(values[i]))
        shown = set(order[:top_k]) | {i for i, v in enumerate(values) if not math.isfinite(v)}
    parts = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
        if token in skip:
            continue
        parts.append(f"{token}({_format(value, precision)})" if i in shown else str(token))
    return " ".join(parts)
