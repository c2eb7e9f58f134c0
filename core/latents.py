"""A selection of an SAE's latents, as a person writes it: "0-99, 512, 4096-4111".

The analyze and label jobs take a `latents` list (empty: every live latent); the CLI's
`--latents` flag and the dashboard's field accept ranges too and are checked here, so a bad
selection is one line naming what is wrong before any work starts.
"""

from __future__ import annotations

from typing import Iterable

from core.errors import UserError

MAX_SELECTED = 1 << 22
"""A range larger than any SAE's width is a typo (e.g. 0-10000000), not a request."""


def parse_latents(text: str) -> list[int]:
    """Comma-separated latent numbers and inclusive ranges ("0-99,512") → sorted distinct ints;
    blank → [] (every live latent)."""
    out: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise UserError(f"latents: {part!r} is not a number or a range; write e.g. 0-99,512") from None
        if a > b:
            raise UserError(f"latents: range {part!r} runs backwards; write it low-high, e.g. {b}-{a}")
        if b - a + 1 + len(out) > MAX_SELECTED:
            raise UserError(f"latents: {part!r} selects more than {MAX_SELECTED:,} latents; narrow the range")
        out.update(range(a, b + 1))
    return sorted(out)


def check_latents(latents: Iterable[int], d_sae: int, what: str = "this SAE") -> list[int]:
    """The latents as sorted distinct ints, or one line naming the first out of range."""
    chosen = sorted({int(i) for i in latents})
    bad = [i for i in chosen if not 0 <= i < d_sae]
    if bad:
        raise UserError(f"latent {bad[0]} is out of range: {what} has latents "
                        f"0-{d_sae - 1}")
    return chosen
