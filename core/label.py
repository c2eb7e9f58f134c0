"""Labels for features: a heuristic one from top tokens and the NLP summary (no model), or one
written by a language model — a local Hugging Face causal LM (the embedded SmolLM2 by default,
offline) or any OpenAI-compatible chat-completions endpoint — from an editable prompt template.

A label's detection score asks the labeling model whether each of a mix of texts (the feature's
real contexts and others) matches the label; balanced accuracy says how well the label picks
the feature's contexts out.
"""

from __future__ import annotations

import json
import os
import re
import string
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, NamedTuple

import torch

from core.errors import Cancelled, UserError

CATEGORIES = ("token", "morphology", "syntax", "semantic", "entity", "format/code", "position", "other")
"""What a label can be about: one token; a word part; a grammatical role; a meaning; named entities;
code, markup or layout; a place in the text; anything else."""
KEY_ENV = ("MISTUDIO_LABEL_API_KEY", "OPENAI_API_KEY")
PLACEHOLDERS = ("examples", "top_tokens", "nlp_summary", "promoted", "suppressed", "frequency", "latent")
MAX_NAME = 60


@dataclass
class Label:
    name: str
    """A short name, a few words."""
    category: str = "other"
    """One of CATEGORIES."""
    description: str = ""
    source: str = "heuristic"
    """heuristic, local:<model>, openai:<model> or user."""
    raw: str = ""
    """The model's answer as written (empty for heuristic labels)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FeatureContext:
    """What a labeler sees of one feature."""

    latent: int
    top_tokens: list[str]
    examples: list[str]
    """Context windows as text with the max-activating token marked <<like this>>."""
    frequency: float = 0.0
    nlp_summary: str = ""
    promoted: list[str] = field(default_factory=list)
    """Tokens the decoder direction promotes through the unembedding (logit effects)."""
    suppressed: list[str] = field(default_factory=list)
    pos: dict[str, int] = field(default_factory=dict)
    """Part-of-speech counts of the max-activating words (from the NLP summary)."""
    entities: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, latent: int, feature: dict, examples: list[dict], nlp: dict | None = None,
              logits: dict | None = None, n_examples: int = 10) -> "FeatureContext":
        """From a features.parquet row, examples.parquet rows, an NLP summary dict and logit effects."""
        return cls(latent, [str(t) for t in feature.get("top_tokens") or []],
                   [marked(e) for e in examples[:n_examples]], float(feature.get("frequency") or 0.0),
                   (nlp or {}).get("summary", ""), list((logits or {}).get("pos_str", []))[:10],
                   list((logits or {}).get("neg_str", []))[:10], dict((nlp or {}).get("pos", {})),
                   dict((nlp or {}).get("entities", {})))


def marked(example: dict) -> str:
    """An example window as text with its max token between << >>."""
    toks, i = list(example["tokens"]), int(example.get("max_index") or 0)
    return "".join(toks[:i]) + "<<" + toks[i] + ">>" + "".join(toks[i + 1:]) if toks else ""


# ------------------------------------------------------------------------------ heuristic

CODE_CHARS = set("(){}[]<>=;:._/\\#*&|$@`'\"")


def heuristic_label(ctx: FeatureContext) -> Label:
    """A label from the top tokens and the NLP summary alone."""
    if ctx.top_tokens and not any(t.strip() for t in ctx.top_tokens[:3]):
        return Label("whitespace and line breaks", "format/code",
                     f"Fires on layout: {', '.join(repr(t) for t in ctx.top_tokens[:3])}.")
    toks = [t for t in ctx.top_tokens if t.strip()] or ctx.top_tokens
    n_pos = sum(ctx.pos.values())
    if toks and all(set(t.strip()) <= CODE_CHARS for t in toks[:3] if t.strip()) and any(t.strip() for t in toks[:3]):
        return Label(f"code punctuation {toks[0].strip()!r}", "format/code",
                     f"Fires on code or markup punctuation such as {', '.join(repr(t) for t in toks[:3])}.")
    if ctx.entities and n_pos and max(ctx.entities.values()) / n_pos >= 0.5:
        ent = max(ctx.entities, key=ctx.entities.get)
        return Label(f"{ent} entities", "entity", f"Fires inside {ent} entities. {ctx.nlp_summary}".strip())
    if len(toks) == 1 or (toks and ctx.examples and _share_of(toks[0], ctx.examples) >= 0.8):
        return Label(f"token {toks[0]!r}", "token", f"Fires on the token {toks[0]!r}. {ctx.nlp_summary}".strip())
    if n_pos and max(ctx.pos.values()) / n_pos >= 0.6:
        tag = max(ctx.pos, key=ctx.pos.get)
        from core.nlp import POS_NAMES

        return Label(POS_NAMES.get(tag, tag.lower()), "syntax",
                     f"Fires on {POS_NAMES.get(tag, tag.lower())}: {', '.join(repr(t) for t in toks[:3])}. "
                     f"{ctx.nlp_summary}".strip())
    name = " / ".join(t.strip() or repr(t) for t in toks[:3]) or f"latent {ctx.latent}"
    return Label(name[:MAX_NAME], "other", f"Top tokens {', '.join(repr(t) for t in toks[:5])}. {ctx.nlp_summary}".strip())


def _share_of(token: str, examples: list[str]) -> float:
    return sum(f"<<{token}>>" in e for e in examples) / max(1, len(examples))


# ------------------------------------------------------------------------------ prompts


@dataclass
class PromptTemplate:
    name: str
    system: str
    user: str
    """With placeholders among: {examples} {top_tokens} {nlp_summary} {promoted} {suppressed} {frequency} {latent}."""

    def __post_init__(self):
        for part in (self.system, self.user):
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(part) if f is not None}
            except ValueError as e:
                raise UserError(f"prompt template {self.name!r} is malformed ({e}); write {{placeholder}} or {{{{ }}}}") \
                    from None
            unknown = used - set(PLACEHOLDERS)
            if unknown:
                raise UserError(f"prompt template {self.name!r} uses unknown placeholder(s) {', '.join(sorted(unknown))}; "
                                f"allowed: {', '.join(PLACEHOLDERS)}")

    def messages(self, ctx: FeatureContext) -> list[dict[str, str]]:
        values = {"examples": "\n".join(f"{i + 1}. {e}" for i, e in enumerate(ctx.examples)),
                  "top_tokens": ", ".join(repr(t) for t in ctx.top_tokens), "nlp_summary": ctx.nlp_summary,
                  "promoted": ", ".join(repr(t) for t in ctx.promoted), "suppressed": ", ".join(repr(t) for t in ctx.suppressed),
                  "frequency": f"{ctx.frequency:.4%}", "latent": str(ctx.latent)}
        return [{"role": "system", "content": self.system.format(**values)},
                {"role": "user", "content": self.user.format(**values)}]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PromptTemplate":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"a prompt template is not JSON ({e.msg})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names or not all(isinstance(v, str) for v in d.values()):
            raise UserError(f"a prompt template needs exactly the string fields {', '.join(sorted(names))}")
        return cls(**d)


DEFAULT_TEMPLATE = PromptTemplate(
    name="default",
    system="You explain features of a language model in a few words.",
    user=("A feature fires on the tokens marked <<like this>> in these texts:\n{examples}\n\n"
          "Its most frequent tokens: {top_tokens}. {nlp_summary}\n\n"
          "What do the marked tokens have in common? Reply with one JSON object, for example "
          '{{"name": "closing parenthesis", "category": "format/code", "description": "The ) that ends a call."}}. '
          "category is one of token, morphology, syntax, semantic, entity, format/code, position, other."),
)


# ------------------------------------------------------------------------------ parsing


def parse_label(text: str, source: str) -> Label:
    """A label from a model's answer: a JSON object anywhere in it, else "Name: / Category: /
    Description:" lines, else its first line as the name."""
    for m in re.finditer(r"\{[^{}]*\}", text, re.S):
        try:
            d = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and str(d.get("name") or "").strip():
            return _clean(str(d["name"]), str(d.get("category") or ""), str(d.get("description") or ""), source, text)
    fields_ = {k.lower(): v.strip() for k, v in re.findall(r"(?im)^\s*\**\s*(name|category|description)\s*\**\s*[:=]\s*(.+)$", text)}
    if fields_.get("name"):
        return _clean(fields_["name"], fields_.get("category", ""), fields_.get("description", ""), source, text)
    first = next((ln.strip(" \"'*#-") for ln in text.splitlines() if ln.strip(" \"'*#-{}")), "")
    if not first:
        raise UserError(f"the labeling model ({source}) returned no usable label: {text[:80]!r}")
    return _clean(first, "", "", source, text)


def _clean(name: str, category: str, description: str, source: str, raw: str) -> Label:
    name = " ".join(name.strip(" \"'`*.").split())[:MAX_NAME]
    if not name:
        raise UserError(f"the labeling model ({source}) returned an empty label name")
    cat = category.strip().lower()
    cat = next((c for c in CATEGORIES if c == cat or c.split("/")[0] == cat), "other")
    return Label(name, cat, " ".join(description.split()), source, raw)


# ------------------------------------------------------------------------------ labelers


class LocalLabeler:
    """A Hugging Face causal LM in this process (greedy decoding, the chat template when the
    tokenizer has one)."""

    def __init__(self, model, tokenizer, name: str = "", max_new_tokens: int = 80):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.source = f"local:{name or getattr(model.config, '_name_or_path', '') or model.config.model_type}"

    def _prompt_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = ids["input_ids"]
        else:
            ids = tok("\n\n".join(m["content"] for m in messages) + "\n", return_tensors="pt")["input_ids"]
        return ids.to(next(self.model.parameters()).device)

    @torch.no_grad()
    def complete(self, messages: list[dict[str, str]]) -> str:
        ids = self._prompt_ids(messages)
        out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def says_yes(self, messages: list[dict[str, str]]) -> bool:
        """Whether the next token after the prompt is more likely Yes than No (one forward)."""
        logits = self.model(self._prompt_ids(messages)).logits[0, -1]
        ids = lambda words: [i for w in words for i in self.tokenizer.encode(w, add_special_tokens=False)[:1]]
        return bool(logits[ids(["Yes", " Yes", "yes"])].max() > logits[ids(["No", " No", "no"])].max())

    def label(self, ctx: FeatureContext, template: PromptTemplate = DEFAULT_TEMPLATE) -> Label:
        return parse_label(self.complete(template.messages(ctx)), self.source)


class OpenAILabeler:
    """Any OpenAI-compatible `/chat/completions` endpoint. The API key comes from the argument
    or the environment (MISTUDIO_LABEL_API_KEY, else OPENAI_API_KEY) and is never written,
    logged or shown."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"labeling endpoint {base_url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000/v1")
        self.base_url, self.model, self.timeout = base_url.rstrip("/"), model, timeout
        self._key = api_key if api_key is not None else next((os.environ[k] for k in KEY_ENV if os.environ.get(k)), "")
        self.source = f"openai:{model}"

    def __repr__(self) -> str:
        return f"OpenAILabeler({self.base_url!r}, model={self.model!r}, key={'set' if self._key else 'none'})"

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 200) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST")
        where = f"labeling endpoint {self.base_url}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise UserError(f"{where} answered HTTP {e.code}; check the URL, the model name and the API key") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"{where} is unreachable ({reason}); check the URL and that the server runs") from None
        try:
            return str(json.loads(payload)["choices"][0]["message"]["content"] or "")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise UserError(f"{where} returned something that is not a chat completion: {payload[:60]!r}") from None

    def says_yes(self, messages: list[dict[str, str]]) -> bool:
        return self.complete(messages, max_tokens=2).strip().lower().startswith("yes")

    def label(self, ctx: FeatureContext, template: PromptTemplate = DEFAULT_TEMPLATE) -> Label:
        return parse_label(self.complete(template.messages(ctx)), self.source)


# ------------------------------------------------------------------------------ bulk and scoring


def label_many(labeler, contexts: Iterable[FeatureContext], template: PromptTemplate = DEFAULT_TEMPLATE,
               progress: Callable[[dict], None] | None = None, should_cancel: Callable[[], bool] | None = None
               ) -> tuple[dict[int, Label], dict[int, str]]:
    """Label each feature (labeler None: heuristic); a failure is recorded and the rest go on.
    Returns (labels, errors) keyed by latent."""
    contexts = list(contexts)
    labels, errors = {}, {}
    t0 = time.perf_counter()
    for i, ctx in enumerate(contexts):
        if should_cancel is not None and should_cancel():
            raise Cancelled("labeling cancelled")
        try:
            labels[ctx.latent] = heuristic_label(ctx) if labeler is None else labeler.label(ctx, template)
        except UserError as e:
            errors[ctx.latent] = str(e)
        if progress is not None:
            rate = (i + 1) / max(time.perf_counter() - t0, 1e-9)
            progress({"phase": "label", "done": i + 1, "total": len(contexts), "unit": "features",
                      "samples_per_s": rate, "eta_s": (len(contexts) - i - 1) / rate, "failed": len(errors)})
    return labels, errors


class DetectionResult(NamedTuple):
    balanced_accuracy: float
    """Mean of the true-positive and true-negative rates (0.5 is chance)."""
    true_positives: int
    false_negatives: int
    true_negatives: int
    false_positives: int
    n: int


DETECT_QUESTION = ('Does this text contain a token that matches the description "{label}"?\n\nText: {text}\n\n'
                   "Answer Yes or No.")


def detection_score(scorer, label: Label, positives: list[str], negatives: list[str]) -> DetectionResult:
    """Ask `scorer` (a LocalLabeler or OpenAILabeler) about each text; positives are the feature's
    real contexts, negatives contexts where it does not fire."""
    if not positives or not negatives:
        raise UserError("a detection score needs both the feature's contexts and other contexts")
    what = f"{label.name}: {label.description}".strip(": ")

    def yes(text: str) -> bool:
        return scorer.says_yes([{"role": "user", "content": DETECT_QUESTION.format(label=what, text=text)}])

    tp = sum(yes(t) for t in positives)
    fp = sum(yes(t) for t in negatives)
    tn = len(negatives) - fp
    return DetectionResult(0.5 * (tp / len(positives) + tn / len(negatives)), tp, len(positives) - tp, tn, fp,
                           len(positives) + len(negatives))


def label_features(labeler, features: list[dict], features_dir, template: PromptTemplate = DEFAULT_TEMPLATE,
                   detection: bool = False, n_detect: int = 5, progress: Callable[[dict], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Label registry feature rows (latent, top_tokens, frequency, analysis) from their discovered
    examples; with `detection` (and a model), score each label on its top contexts against other
    features' contexts. Returns {"labels": {latent: label dict}, "errors": {latent: message}}."""
    import pyarrow.parquet as pq

    from core.discover import EXAMPLES_FILE

    latents = {f["latent"] for f in features}
    table = pq.read_table(f"{features_dir}/{EXAMPLES_FILE}", columns=["latent", "kind", "tokens", "max_index"],
                          filters=[("kind", "=", "top")])
    examples: dict[int, list[dict]] = {}
    for row in table.to_pylist():
        if row["latent"] in latents:
            examples.setdefault(row["latent"], []).append(row)
    contexts = [FeatureContext.build(f["latent"], f, examples.get(f["latent"], []), (f.get("analysis") or {}).get("nlp"),
                                     (f.get("analysis") or {}).get("logits")) for f in features]
    labels, errors = label_many(labeler, contexts, template, progress, should_cancel)
    out = {i: lab.to_dict() for i, lab in labels.items()}
    if detection and labeler is not None:
        texts = {i: ["".join(e["tokens"]) for e in ex[:n_detect]] for i, ex in examples.items()}
        order = sorted(texts)
        for i, lab in labels.items():
            others = [t for j in order if j != i for t in texts[j][:1]][:n_detect]
            if texts.get(i) and others:
                try:
                    out[i]["detection"] = detection_score(labeler, lab, texts[i], others)._asdict()
                except UserError as e:
                    errors[i] = str(e)
    return {"labels": out, "errors": errors}
