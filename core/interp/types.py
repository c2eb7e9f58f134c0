"""What every part of labeling shares: the label, what a labeler sees of a feature, the label
categories, and the errors an endpoint raises (which the orchestration tells apart)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import UserError

CATEGORIES = ("token", "morphology", "syntax", "semantic", "entity", "format/code", "position", "other")
"""What a label can be about: one token; a part of words (suffix, prefix); a grammatical role;
a meaning or topic; named entities; code, markup or layout; a place in the text; anything else."""
MAX_NAME_WORDS = 5
MAX_NAME_CHARS = 60


@dataclass
class Label:
    """A feature's label, however it was written."""

    name: str
    """A short name: at most five words."""
    category: str = "other"
    """One of CATEGORIES."""
    description: str = ""
    """One or two sentences on what the feature responds to."""
    source: str = "heuristic"
    """Who wrote it: "heuristic", "local:<model>", "openai:<model>" or "user"."""
    raw: str = ""
    """The model's answer as written (empty for heuristic labels)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FeatureContext:
    """What a labeler sees of one feature."""

    latent: int
    """The feature's index in the SAE."""
    top_tokens: list[str]
    """Its most frequent max-activating tokens, as decoded (" the", "ing")."""
    examples: list[str]
    """Its top context windows as text, the max-activating token marked <<like this>>."""
    frequency: float = 0.0
    """Fraction of tokens it fires on."""
    nlp_summary: str = ""
    """The NLP summary's sentence (core.nlp), or empty."""
    promoted: list[str] = field(default_factory=list)
    """Tokens its decoder direction promotes through the unembedding (logit effects), or empty."""
    suppressed: list[str] = field(default_factory=list)
    """Tokens it suppresses."""
    pos: dict[str, int] = field(default_factory=dict)
    """Part-of-speech counts of the max-activating words (from the NLP summary)."""
    entities: dict[str, int] = field(default_factory=dict)
    """Entity-label counts of the max-activating words (from the NLP summary)."""

    @classmethod
    def build(cls, latent: int, feature: dict, examples: list[dict], nlp: dict | None = None,
              logits: dict | None = None, n_examples: int = 10) -> "FeatureContext":
        """From a features.parquet row, examples.parquet rows, an NLP summary dict and logit effects."""
        nlp, logits = nlp or {}, logits or {}
        return cls(latent, [str(t) for t in feature.get("top_tokens") or []],
                   [marked(e) for e in examples[:n_examples]], float(feature.get("frequency") or 0.0),
                   nlp.get("summary", ""), list(logits.get("pos_str", []))[:10], list(logits.get("neg_str", []))[:10],
                   dict(nlp.get("pos", {})), dict(nlp.get("entities", {})))


def marked(example: dict) -> str:
    """An example window as text with its max token between << >>."""
    toks, i = ["" if t is None else str(t) for t in example.get("tokens") or []], int(example.get("max_index") or 0)
    if not 0 <= i < len(toks):
        return "".join(toks)
    return "".join(toks[:i]) + "<<" + toks[i] + ">>" + "".join(toks[i + 1:])


def short_name(name: str) -> str:
    """At most MAX_NAME_WORDS words and MAX_NAME_CHARS characters: every label's name, whoever
    wrote it, is cut the same way."""
    return " ".join(name.split()[:MAX_NAME_WORDS])[:MAX_NAME_CHARS].strip()


class EndpointError(UserError):
    """The endpoint answered with an HTTP error status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class EndpointUnreachable(UserError):
    """No HTTP answer at all: nothing listens, the name does not resolve, or it timed out."""
