"""The detection score: a judge model is asked whether each of a mix of texts (the feature's
real contexts and others) matches the label; balanced accuracy says how well the label picks the
feature's contexts out. It measures the label *and* the judging model: it means something only
where a capable model is at hand (SmolLM2-135M is near chance even on easy labels)."""

from __future__ import annotations

from typing import NamedTuple

from core.errors import UserError
from core.interp.scorers.base import Judge, auroc, balanced_accuracy
from core.interp.scorers.detection_prompt import DETECT_QUESTION
from core.interp.types import Label


class DetectionResult(NamedTuple):
    balanced_accuracy: float
    """Mean of the true-positive and true-negative rates: 0.5 is chance, 1 a perfect label."""
    true_positives: int
    """The feature's contexts the model said match the label."""
    false_negatives: int
    true_negatives: int
    """Other contexts the model said do not match."""
    false_positives: int
    n: int
    """Contexts asked about (positives + negatives)."""
    auroc: float
    """Chance that a positive gets a larger Yes-margin than a negative (ties count half): the
    ranking quality without the Yes/No threshold, which small models bias towards one answer."""
    margins: list[float]
    """log P(Yes) − log P(No) per context, positives first (> 0: said Yes)."""


def _what(label: Label) -> str:
    desc = label.description.strip().rstrip(".")
    return f'"{label.name}" ({desc})' if desc and desc.lower() != label.name.lower() else f'"{label.name}"'


def detection_score(scorer: Judge, label: Label, positives: list[str], negatives: list[str]) -> DetectionResult:
    """Ask `scorer` (a LocalLabeler: next-token Yes/No logits, batched; or an OpenAILabeler:
    logprobs or a one-token answer) whether each text contains what the label describes;
    positives are the feature's real contexts, negatives contexts where it does not fire.
    Only meaningful with a capable model: a weak one scores near 0.5 whatever the label."""
    if not positives or not negatives:
        raise UserError("a detection score needs both the feature's contexts and other contexts; "
                        f"got {len(positives)} and {len(negatives)}")
    what = _what(label)
    prompts = [[{"role": "user", "content": DETECT_QUESTION.format(text=t, what=what)}]
               for t in [*positives, *negatives]]
    margins = [float(m) for m in scorer.yes_margins(prompts)]
    tp = sum(m > 0 for m in margins[:len(positives)])
    fp = sum(m > 0 for m in margins[len(positives):])
    tn = len(negatives) - fp
    pos, neg = margins[:len(positives)], margins[len(positives):]
    return DetectionResult(balanced_accuracy(tp, len(positives), tn, len(negatives)), tp, len(positives) - tp, tn,
                           fp, len(margins), auroc(pos, neg), margins)
