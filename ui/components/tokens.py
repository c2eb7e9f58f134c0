"""Tokens on the page: whitespace made visible, contexts shaded by activation, top-token strings."""

from __future__ import annotations

import html
import math
from typing import Any

_WS = "color: #999;"


def visible_token(token: str) -> str:
    """A token's text, HTML-escaped, with whitespace made visible (newline ↵, tab ⇥, spaces ·)."""
    if token == "":
        return f'<span style="{_WS}">∅</span>'
    if token.strip() == "":  # a whitespace-only token would be invisible: mark every character
        marks = {"\n": "↵", "\t": "⇥", "\r": "␍", " ": "·"}
        out = "".join(marks.get(ch, "␣") for ch in token)
        return f'<span style="{_WS}">{out}</span>' + "<br>" * token.count("\n")
    text = html.escape(token)
    text = text.replace("\r", f'<span style="{_WS}">␍</span>')
    text = text.replace("\t", f'<span style="{_WS}">⇥</span>')
    return text.replace("\n", f'<span style="{_WS}">↵</span><br>')


def token_html(tokens: list[str], acts: list[float], max_act: float | None = None,
               highlight: int | None = None) -> str:
    """Tokens as spans shaded by activation (0 → clear, `max_act` → full orange).

    Pass the latent's max activation so contexts of one feature are shaded on one scale; the
    activation of each token is in its tooltip, and `highlight` outlines one token (the max).
    """
    acts = [float(a) if a is not None else 0.0 for a in acts]
    scale = max_act if max_act and max_act > 0 else max([a for a in acts if math.isfinite(a)] or [0.0])
    scale = scale if scale > 0 else 1.0
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        alpha = min(max(a / scale, 0.0), 1.0) if math.isfinite(a) else 0.0
        style = f"background-color: rgba(255, 127, 14, {alpha:.2f}); border-radius: 3px; padding: 0 1px;"
        if i == highlight:
            style += " outline: 1.5px solid #b34700;"
        title = html.escape(f"{tok!r}: {a:.3f}", quote=True)
        spans.append(f'<span style="{style}" title="{title}">{visible_token(tok)}</span>')
    return ('<div style="font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; '
            'white-space: pre-wrap; line-height: 1.9; word-break: break-word;">' + "".join(spans) + "</div>")


def top_token_text(top_tokens: Any, n: int = 8) -> str:
    """A feature's top tokens as one readable string (entries may be str, [tok, count] or dicts)."""
    out = []
    for t in list(top_tokens or [])[:n]:
        if isinstance(t, dict):
            t = t.get("token", next(iter(t.values()), ""))
        elif isinstance(t, (list, tuple)) and t:
            t = t[0]
        out.append(repr(str(t)))
    return " ".join(out)
