"""Labeling many features: the explainer (heuristic, or a client's LLM label) over each one,
going past a feature that fails, then optionally a detection score per label."""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

from core.errors import Cancelled, UserError
from core.progress import Meter, check_cancel
from core.interp.explainers.heuristic import heuristic_label
from core.interp.explainers.llm import DEFAULT_TEMPLATE, PromptTemplate
from core.interp.scorers.detection import detection_score
from core.interp.types import EndpointUnreachable, FeatureContext, Label


class Labeled(NamedTuple):
    labels: dict[int, Label]
    """Latent → its new label."""
    errors: dict[int, str]
    """Latent → why it got none (one line)."""


def label_many(labeler, contexts: Iterable[FeatureContext], progress: Callable[[dict], None] | None = None,
               should_cancel: Callable[[], bool] | None = None, template: PromptTemplate = DEFAULT_TEMPLATE,
               give_up_after: int = 3, total: int | None = None) -> Labeled:
    """Label each feature (labeler None: heuristic labels). A feature that fails is recorded in
    `errors` and the rest go on — except when the first `give_up_after` features all find the
    endpoint unreachable: then it is down, and waiting out a timeout per feature would only
    delay the same answer, so that error is raised. With `total`, `contexts` is consumed lazily
    (a generator reading features block by block); else it is read whole first."""
    if total is None:
        contexts = list(contexts)
        total = len(contexts)
    labels: dict[int, Label] = {}
    errors: dict[int, str] = {}
    unreachable = 0
    meter = Meter(progress, "label", total=total, unit="features", should_cancel=should_cancel,
                  what="labeling")
    meter.report(failed=0)
    for ctx in contexts:
        meter.check()
        try:
            labels[ctx.latent] = heuristic_label(ctx) if labeler is None else labeler.label(ctx, template)
        except Cancelled:
            raise
        except EndpointUnreachable as e:
            errors[ctx.latent] = str(e)
            unreachable += 1
            if unreachable >= give_up_after and not labels:
                raise
        except Exception as e:  # noqa: BLE001 — one feature's failure (a model error too) must not end the job
            errors[ctx.latent] = str(e) if isinstance(e, UserError) else \
                f"{type(e).__name__}: {' '.join(str(e).split())}"
        meter.add(1, failed=len(errors))
    return Labeled(labels, errors)


def label_features(labeler, features: list[dict], features_dir, template: PromptTemplate = DEFAULT_TEMPLATE,
                   detection: bool = False, n_detect: int = 5, progress: Callable[[dict], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None, block: int = 4096) -> dict[str, Any]:
    """Label registry feature rows (latent, top_tokens, frequency, analysis) from their discovered
    examples, read `block` latents at a time (tens of thousands of latents never hold all their
    examples at once); with `detection` (and a model), score each label on its top contexts
    against other features' contexts. Returns {"labels": {latent: label dict}, "errors": {latent: message}}."""
    from core.features import store

    texts: dict[int, list[str]] = {}  # the first n_detect windows of each latent with examples

    def contexts():
        for start in range(0, len(features), block):
            chunk = features[start:start + block]
            examples = store.examples_by_latent(features_dir, {f["latent"] for f in chunk}, kind="top",
                                                columns=["latent", "kind", "tokens", "max_index"])
            for f in chunk:
                ex = examples.get(f["latent"], [])
                if ex:
                    texts[f["latent"]] = ["".join(e["tokens"]) for e in ex[:n_detect]]
                analysis = f.get("analysis") or {}
                yield FeatureContext.build(f["latent"], f, ex, analysis.get("nlp"), analysis.get("logits"))

    labels, errors = label_many(labeler, contexts(), progress, should_cancel, template, total=len(features))
    out = {i: lab.to_dict() for i, lab in labels.items()}
    if detection and labeler is not None:
        # the other features' texts: the first window of each of the lowest-numbered latents
        firsts = [(j, texts[j][0]) for j in sorted(texts)[: n_detect + 1]]
        for k, (i, lab) in enumerate(labels.items()):
            check_cancel(should_cancel, "labeling")
            others = [t for j, t in firsts if j != i][:n_detect]
            if texts.get(i) and others:
                try:
                    out[i]["detection"] = detection_score(labeler, lab, texts[i], others)._asdict()
                except Exception as e:  # noqa: BLE001 — the label stands without its score
                    errors[i] = f"detection: {e}"
            if progress is not None:
                progress({"phase": "detect", "done": k + 1, "total": len(labels), "unit": "features"})
    return {"labels": out, "errors": errors}
