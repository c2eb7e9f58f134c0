"""Numbers, byte sizes and durations as every page prints them ("–" for a missing value), and
free text made literal for Markdown elements."""

from __future__ import annotations

import math
import re
from typing import Any

_MARKUP = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:&=\"'^])")
"""ASCII punctuation that Markdown, GitHub's extensions or Streamlit's own (colors, icons,
LaTeX) give a meaning; CommonMark lets a backslash make any of them literal."""


_AUTOLINK = re.compile(r"(://|(?<![^\W_])www\.|@)", re.IGNORECASE)
"""What GitHub's autolinking finds in plain text after parsing (escapes do not stop it):
"http://...", "www.", "a@b.c"."""
WORD_JOINER = "\u2060"
"""Invisible and zero-width: placed inside those, the text reads the same and links nothing."""


def literal(text: Any) -> str:
    """Free text from users or models (labels, descriptions, names, file names, NLP summaries, job
    messages) for an element that renders Markdown (st.markdown, st.caption, st.error, ...):
    every markup character escaped, so `**x**` shows its asterisks, `![x](url)` fetches nothing
    and `<b>` is not HTML; a word joiner inside "://", "www." and "@" keeps URLs and addresses
    from turning into links."""
    text = _AUTOLINK.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], str(text))
    return _MARKUP.sub(r"\\\1", text)


ERROR_CHARS = 400
"""The most of an error message the dashboard shows (a message can quote a huge value)."""


def error_line(error: BaseException | str) -> str:
    """An error as the dashboard shows it: its first line, cut to ERROR_CHARS, as literal text
    (a message quotes paths and values users typed, which must not render as Markdown)."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 1] + "…"
    return literal(text)


def code_span(text: Any) -> str:
    """Free text as a Markdown code span (paths, file names, URLs): shown verbatim in monospace,
    fenced by more backticks than the text holds in a row, so none of it closes the span."""
    text = " ".join(str(text).split("\n"))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def fmt_number(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"

