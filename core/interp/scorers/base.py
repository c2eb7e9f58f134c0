"""What a scorer is: a function that asks a judge model questions about a label and returns a
NamedTuple of numbers. The orchestration stores that tuple's `_asdict()` beside the label, so a
scorer's fields are its stored record. The judges are the clients (LocalLabeler, OpenAILabeler).

A scorer that classifies texts as matching the label or not (detection; fuzzing would too)
shares the two summaries below."""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

from core.interp.types import Label


class Judge(Protocol):
    """What a scorer needs of a client: Yes/No answers with a confidence."""

    def yes_margins(self, prompts: list[list[dict[str, str]]]) -> list[float]:
        """For each chat prompt, log P(Yes) − log P(No) (or ±1 where only the answer is known): > 0 means Yes."""
        ...


class Scorer(Protocol):
    """A scorer's signature: the judge, the label, the feature's own contexts (positives) and
    contexts where it does not fire (negatives) → a NamedTuple of numbers."""

    def __call__(self, judge: Judge, label: Label, positives: list[str], negatives: list[str], /) -> NamedTuple:
        ...


def balanced_accuracy(true_positives: int, n_positives: int, true_negatives: int, n_negatives: int) -> float:
    """Mean of the true-positive and true-negative rates: 0.5 is chance whatever the class mix."""
    return 0.5 * (true_positives / n_positives + true_negatives / n_negatives)


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Chance that a positive scores above a negative, ties counting half (the ranking quality
    without a threshold)."""
    return sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives) / (len(positives) * len(negatives))
