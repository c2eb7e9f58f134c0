"""The heuristic explainer: a label from a feature's top tokens, marked examples and NLP counts
alone — no model, so it is instant and always available."""

from __future__ import annotations

import os
import re
from typing import Callable

from core.interp.types import FeatureContext, Label, short_name

CODE_CHARS = set("(){}[]<>=_/\\#*&|$@`+%^~")
PROSE_PUNCT = set(".,;:!?'\"-–—…‘’“”«»")
ENTITY_NAMES = {"GPE": "place names", "LOC": "locations", "PERSON": "people's names", "ORG": "organization names",
                "NORP": "nationalities and groups", "DATE": "dates", "TIME": "times", "CARDINAL": "numbers",
                "ORDINAL": "ordinal numbers", "MONEY": "amounts of money", "PERCENT": "percentages",
                "QUANTITY": "quantities", "PRODUCT": "product names", "EVENT": "event names", "FAC": "facility names",
                "WORK_OF_ART": "titles of works", "LAW": "laws", "LANGUAGE": "language names"}


def heuristic_label(ctx: FeatureContext) -> Label:
    """A label from the top tokens, the marked examples and the NLP counts alone, by the first
    rule that fits: whitespace → punctuation (code or prose) → a dominant entity type → word
    pieces (morphology) → one dominant token → a dominant part of speech → the top tokens."""
    top3 = ctx.top_tokens[:3]
    toks = [t for t in ctx.top_tokens if t.strip()]
    listed = ", ".join(repr(t) for t in (toks or ctx.top_tokens)[:3])
    tail = f" {ctx.nlp_summary}" if ctx.nlp_summary else ""
    n_words = sum(ctx.pos.values())
    if top3 and not any(t.strip() for t in top3):
        return Label("whitespace and line breaks", "format/code", f"Fires on layout: {listed}.{tail}")
    if toks and all(set(t.strip()) <= CODE_CHARS | PROSE_PUNCT for t in toks[:3]):
        if all(set(t.strip()) <= PROSE_PUNCT for t in toks[:3]):
            return Label(f"punctuation {toks[0].strip()}", "syntax", f"Fires on punctuation such as {listed}.{tail}")
        return Label(f"code punctuation {toks[0].strip()}", "format/code",
                     f"Fires on code or markup punctuation such as {listed}.{tail}")
    if ctx.entities and n_words and max(ctx.entities.values()) / n_words >= 0.5:
        ent = max(ctx.entities, key=ctx.entities.get)
        return Label(f"{ENTITY_NAMES.get(ent, ent.lower())} ({ent})", "entity",
                     f"Fires inside {ent} entities ({ctx.entities[ent]} of {n_words} contexts).{tail}")
    if ctx.examples and _share_marked(None, ctx.examples) >= 0.6:  # the token continues a word
        pieces = [t.strip().lower() for t in toks[:3]]
        suffix = os.path.commonprefix([p[::-1] for p in pieces])[::-1]
        common = max(suffix, os.path.commonprefix(pieces), key=len)  # "ing"/"ings" share a start, not an end
        name = f"word piece -{common}" if len(common) >= 2 else "pieces inside words"
        return Label(name, "morphology", f"Fires on word pieces that continue a word, such as {listed}.{tail}")
    if len(toks) == 1 or (toks and ctx.examples and _share_marked(lambda m: m == toks[0], ctx.examples) >= 0.8):
        return Label(f"token {toks[0]!r}", "token", f"Fires on the token {toks[0]!r}.{tail}")
    if n_words and max(ctx.pos.values()) / n_words >= 0.6:
        from core.nlp import POS_NAMES

        tag = max(ctx.pos, key=ctx.pos.get)
        what = POS_NAMES.get(tag, tag.lower())
        return Label(what, "syntax", f"Fires on {what} ({ctx.pos[tag]} of {n_words}), such as {listed}.{tail}")
    name = " / ".join(t.strip() for t in toks[:3]) or f"latent {ctx.latent}"
    return Label(short_name(name), "other", f"Top tokens {listed}.{tail}")


_MARKED = re.compile(r"(.?)<<(.*?)>>", re.S)


def _share_marked(match: Callable[[str], bool] | None, examples: list[str]) -> float:
    """Share of examples whose marked token satisfies `match`; with None, whose marked token
    starts with a letter right after a letter (a piece inside a word: "runn<<ing>>")."""
    hits = 0
    for e in examples:
        m = _MARKED.search(e)
        if m is None:
            continue
        before, tok = m.groups()
        hits += match(tok) if match is not None else (before.isalpha() and tok[:1].isalpha())
    return hits / max(1, len(examples))
