"""Labels for features: a heuristic one from top tokens and the NLP summary (no model), or one
written by a language model — a local Hugging Face causal LM (the embedded SmolLM2 by default,
offline) or any OpenAI-compatible chat-completions endpoint — from an editable prompt template.

A label's detection score asks a model whether each of a mix of texts (the feature's real
contexts and others) matches the label; balanced accuracy says how well the label picks the
feature's contexts out. It measures the label *and* the judging model: it means something only
where a capable model is at hand (SmolLM2-135M is near chance even on easy labels).
"""

from __future__ import annotations

import http.client
import inspect
import json
import math
import os
import re
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch

from core.errors import Cancelled, UserError

CATEGORIES = ("token", "morphology", "syntax", "semantic", "entity", "format/code", "position", "other")
"""What a label can be about: one token; a part of words (suffix, prefix); a grammatical role;
a meaning or topic; named entities; code, markup or layout; a place in the text; anything else."""
KEY_ENV = ("MISTUDIO_LABEL_API_KEY", "OPENAI_API_KEY")
"""Environment variables an endpoint's API key is read from, in this order."""
PLACEHOLDERS = ("examples", "top_tokens", "nlp_summary", "promoted", "suppressed", "frequency", "latent")
"""What a prompt template may refer to as {name}."""
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


# ------------------------------------------------------------------------------ heuristic

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
    return Label(_short(name), "other", f"Top tokens {listed}.{tail}")


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


# ------------------------------------------------------------------------------ prompts


@dataclass
class PromptTemplate:
    """A labeling prompt: a system and a user message with {placeholders} (see PLACEHOLDERS;
    write {{ and }} for literal braces)."""

    name: str
    """The template's name (what it is saved under)."""
    system: str
    """System message; empty sends none (a chat template may then add its own)."""
    user: str
    """User message: {examples} {top_tokens} {nlp_summary} {promoted} {suppressed} {frequency} {latent}."""
    answer_prefix: str = ""
    """Text a local model's answer is made to begin with (written after the chat template's
    assistant header; not formatted). '{"name": "' steers a small model into the JSON form.
    Endpoints get the messages only."""

    def __post_init__(self):
        for part in (self.system, self.user):
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(part) if f is not None}
            except ValueError as e:
                raise UserError(f"prompt template {self.name!r} is malformed ({e}); write {{placeholder}} "
                                "or {{ }} for a literal brace") from None
            unknown = used - set(PLACEHOLDERS)
            if unknown:
                raise UserError(f"prompt template {self.name!r} uses unknown placeholder(s) "
                                f"{', '.join(sorted(repr(u) for u in unknown))}; allowed: {', '.join(PLACEHOLDERS)}")

    def messages(self, ctx: FeatureContext) -> list[dict[str, str]]:
        values = {"examples": "\n".join(f"{i + 1}. {e}" for i, e in enumerate(ctx.examples)),
                  "top_tokens": ", ".join(repr(t) for t in ctx.top_tokens) or "unknown",
                  "nlp_summary": ctx.nlp_summary, "promoted": ", ".join(repr(t) for t in ctx.promoted) or "unknown",
                  "suppressed": ", ".join(repr(t) for t in ctx.suppressed) or "unknown",
                  "frequency": f"{ctx.frequency:.4%}", "latent": str(ctx.latent)}
        msgs = [{"role": "system", "content": self.system.format(**values)}] if self.system.strip() else []
        return msgs + [{"role": "user", "content": self.user.format(**values)}]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PromptTemplate":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"a prompt template is not JSON ({e.msg} at line {e.lineno}); check its quotes and "
                            "commas") from None
        known = [f.name for f in fields(cls)]
        required = {"name", "system", "user"}
        if not isinstance(d, dict) or not required <= set(d) or not set(d) <= set(known) \
                or not all(isinstance(v, str) for v in d.values()):
            got = ", ".join(sorted(d)) if isinstance(d, dict) else type(d).__name__
            raise UserError(f"a prompt template needs the string fields name, system, user (and optionally "
                            f"answer_prefix), got: {got or 'nothing'}")
        return cls(**d)


DEFAULT_TEMPLATE = PromptTemplate(
    name="default",
    system="You name the features of a language model. Answer with one JSON object.",
    user=("A feature of a language model fires on the tokens marked <<like this>> in these texts:\n{examples}\n\n"
          "The marked tokens: {top_tokens}. {nlp_summary}\n\n"
          "What do the marked tokens have in common? Reply with JSON with the keys \"name\" (at most five words), "
          "\"category\" (one of token, morphology, syntax, semantic, entity, format/code, position, other) "
          "and \"description\" (one sentence)."),
    answer_prefix='{"name": "',
)


# ------------------------------------------------------------------------------ parsing

_KEYS = {"name": "name", "label": "name", "title": "name", "category": "category", "type": "category",
         "description": "description", "explanation": "description"}
_LOOSE = re.compile(r"""["'*]*\b(name|label|category|description|explanation)\b["'*]*[ \t]*[:=][ \t]*\**[ \t]*"""
                    r"""(?:"([^"\n]*)"?|'([^'\n]*)'?|([^\n]*))""", re.I)
"""`"name": "value"`, `'name': 'value'`, `Name: value`, `**Name:** value` (one line each)."""
_NAMED = re.compile(r"""\b(?:named|called|labell?ed(?: as)?)\s*[:]?\s*["'“*]+([^"'”*\n]{1,80})""", re.I)
_CATEGORY_WORDS = {
    "token": "token", "tokens": "token", "lexical": "token", "word": "token",
    "morphology": "morphology", "morphological": "morphology", "suffix": "morphology", "prefix": "morphology",
    "subword": "morphology", "syntax": "syntax", "syntactic": "syntax", "grammar": "syntax", "grammatical": "syntax",
    "semantic": "semantic", "semantics": "semantic", "meaning": "semantic", "topic": "semantic",
    "entity": "entity", "entities": "entity", "ner": "entity", "format": "format/code", "formatting": "format/code",
    "code": "format/code", "markup": "format/code", "position": "position",
    "positional": "position", "other": "other"}


def parse_label(text: str, source: str) -> Label:
    """A label from a model's answer, by the first form that yields a name: a JSON object
    anywhere in it; "name": "..." / Name: ... fields, even in broken or cut-off JSON; a quoted
    name after "named"/"called"; its first line. Raises a one-line UserError when nothing does."""
    obj = _json_object(text)
    if obj is not None:
        return _clean(obj.get("name", ""), obj.get("category", ""), obj.get("description", ""), source, text,
                      strip=" \"'`*")  # a JSON string is whole: "closing }" keeps its brace
    loose = _loose_fields(text)
    if "name" in loose:  # even an empty one: the model answered in the form, with no name
        return _clean(loose["name"], loose.get("category", ""), loose.get("description", ""), source, text)
    m = _NAMED.search(text)
    if m:
        return _clean(m.group(1), "", _first_line(text), source, text)
    line = _first_line(text)
    if not re.search(r"\w", line) or line.startswith("{"):
        raise UserError(f"the labeling model ({source}) returned no usable label: {text[:80]!r}; "
                        "try a larger model or edit the prompt template")
    return _clean(line, "", line if len(line.split()) > MAX_NAME_WORDS else "", source, text)


def _json_object(text: str) -> dict[str, str] | None:
    """The first JSON object in `text` that has a non-empty name (keys matched loosely)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            d = {_KEYS[k.strip().lower()]: str(v) for k, v in obj.items()
                 if isinstance(k, str) and k.strip().lower() in _KEYS and v is not None}
            if d.get("name", "").strip():
                return d
    return None


def _loose_fields(text: str) -> dict[str, str]:
    """name / category / description values written as `"key": "value"` or `Key: value`, the
    first of each; a value cut off by the end of the answer is kept."""
    out: dict[str, str] = {}
    for m in _LOOSE.finditer(text):
        key = _KEYS[m.group(1).lower()]
        value = next((g for g in m.groups()[1:] if g is not None), "")
        if m.group(4) is not None:  # unquoted: stop where a next `"key":` begins
            value = re.split(r""",\s*["']?\w+["']?\s*:""", value)[0].rstrip(" ,}")
        out.setdefault(key, value.strip())
    return out


def _first_line(text: str) -> str:
    return next((ln.strip(" \t\"'*#->`") for ln in text.splitlines() if re.search(r"\w", ln)), "")[:200]


def _short(name: str) -> str:
    """At most MAX_NAME_WORDS words and MAX_NAME_CHARS characters."""
    return " ".join(name.split()[:MAX_NAME_WORDS])[:MAX_NAME_CHARS].strip()


def _category(text: str) -> str:
    """One of CATEGORIES from a model's loose wording ("Token", "code", "Semantics"); "other" when
    it names none or several (a model echoing the whole list)."""
    t = text.strip().lower()
    if t in CATEGORIES:
        return t
    found = {_CATEGORY_WORDS[w] for w in re.findall(r"[a-z]+", t) if w in _CATEGORY_WORDS}
    return found.pop() if len(found) == 1 else "other"


def _clean(name: str, category: str, description: str, source: str, raw: str,
           strip: str = " \"'`*.,:;{}[]") -> Label:
    name = _short(" ".join(str(name).split()).strip(strip))
    if not name:
        raise UserError(f"the labeling model ({source}) returned no usable label: {raw[:80]!r}; "
                        "try a larger model or edit the prompt template")
    return Label(name, _category(str(category)), " ".join(str(description).split())[:500], source, raw)


# ------------------------------------------------------------------------------ labelers


def _json_closed(text: str) -> bool:
    """Whether the first JSON object in `text` is complete (braces balanced outside strings)."""
    start = text.find("{")
    if start < 0:
        return False
    depth, in_str, escaped = 0, False, False
    for ch in text[start:]:
        if in_str:
            escaped, in_str = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{}":
            depth += 1 if ch == "{" else -1
            if depth == 0:
                return True
    return False


_YES, _NO = ("Yes", " Yes", "yes", " yes", "YES"), ("No", " No", "no", " no", "NO")


class LocalLabeler:
    """A Hugging Face causal LM in this process: greedy decoding through the tokenizer's chat
    template when it has one (a base model gets the messages as plain paragraphs)."""

    def __init__(self, model, tokenizer, name: str = "", max_new_tokens: int = 64):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        cfg = model.config
        self.source = f"local:{name or Path(getattr(cfg, '_name_or_path', '') or '').name or cfg.model_type}"

    @classmethod
    def embedded(cls, folder: str | os.PathLike | None = None, max_new_tokens: int = 64) -> "LocalLabeler":
        """The embedded SmolLM2-135M-Instruct, from a converted model `folder` (fast, see
        core.models.convert_gguf) or else the GGUF in its pip package (~20 s)."""
        from core.models import embedded_gguf_path, load_model

        model, tok = load_model(folder or embedded_gguf_path())
        return cls(model, tok, "SmolLM2-135M-Instruct", max_new_tokens)

    def __repr__(self) -> str:
        return f"LocalLabeler({self.source!r}, max_new_tokens={self.max_new_tokens})"

    @property
    def _templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, messages: list[dict[str, str]], prefix: str = "") -> str:
        """The text the model continues: the chat template with its assistant header, then `prefix`."""
        if self._templated:
            chat = lambda msgs: self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            try:
                return chat(messages) + prefix
            except Exception:  # noqa: BLE001 — jinja's TemplateError: some templates (Gemma) refuse a system role
                if not messages or messages[0]["role"] != "system" or len(messages) < 2:
                    raise
                merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
                return chat([merged, *messages[2:]]) + prefix
        text = "\n\n".join(m["content"] for m in messages if m["content"]) + "\n\nAnswer:"
        return text + (" " + prefix if prefix else "")

    def _encode(self, text: str) -> list[int]:
        # a chat template writes its own BOS; a plain prompt gets the tokenizer's
        return self.tokenizer(text, add_special_tokens=not self._templated)["input_ids"]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def complete(self, messages: list[dict[str, str]], prefix: str = "") -> str:
        """The model's greedy answer (beginning with `prefix`); it stops at the end of a JSON object."""
        from transformers import GenerationConfig, StoppingCriteriaList

        ids = torch.tensor([self._encode(self.prompt(messages, prefix))], device=self._device)
        tok = self.tokenizer
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                               eos_token_id=self.model.generation_config.eos_token_id or tok.eos_token_id,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        stop = _stop_at_json_end(tok, prefix, ids.shape[1])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                  stopping_criteria=StoppingCriteriaList([stop]))
        return prefix + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def _answer_ids(self) -> tuple[list[int], list[int]]:
        """First token ids of the Yes and No spellings; ids both share (a lone space) are dropped."""
        first = lambda words: {ids[0] for w in words if (ids := self.tokenizer.encode(w, add_special_tokens=False))}
        yes, no = first(_YES), first(_NO)
        yes, no = sorted(yes - no), sorted(no - yes)
        if not yes or not no:
            raise UserError("this tokenizer cannot tell Yes from No by their first token; "
                            "use another model for detection scores")
        return yes, no

    @torch.no_grad()
    def yes_margins(self, prompts: list[list[dict[str, str]]], batch_size: int = 8) -> list[float]:
        """For each prompt, log P(Yes) − log P(No) of the next token after the assistant header
        (each summed over spellings): > 0 means Yes. One forward per prompt, left-padded batches."""
        yes, no = self._answer_ids()
        seqs = [self._encode(self.prompt(m)) for m in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        out: list[float] = []
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, q in enumerate(chunk):
                ids[r, width - len(q):], mask[r, width - len(q):] = torch.tensor(q), 1
            # positions count real tokens only, so a left-padded prompt scores as it would alone
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                position_ids=pos.to(self._device), **keep).logits[:, -1].float()
            lp = logits.log_softmax(-1)
            out += (lp[:, yes].logsumexp(-1) - lp[:, no].logsumexp(-1)).tolist()
        return out

    def says_yes(self, messages: list[dict[str, str]]) -> bool:
        return self.yes_margins([messages])[0] > 0

    def _fit(self, ctx: FeatureContext, template: PromptTemplate) -> FeatureContext:
        """Drop examples from the end until the prompt and the answer fit the model's context:
        past it a model writes garbage (rotary positions) or fails (learned positions)."""
        cfg = self.model.config
        limit = next((v for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                      if isinstance(v := getattr(cfg, k, None), int)), None)
        while limit and len(ctx.examples) > 1 and len(self._encode(
                self.prompt(template.messages(ctx), template.answer_prefix))) + self.max_new_tokens > limit:
            ctx = replace(ctx, examples=ctx.examples[:-1])
        return ctx

    def label(self, ctx: FeatureContext, template: PromptTemplate = DEFAULT_TEMPLATE) -> Label:
        ctx = self._fit(ctx, template)
        return parse_label(self.complete(template.messages(ctx), template.answer_prefix), self.source)


def _stop_at_json_end(tokenizer, prefix: str, start: int):
    """A stopping criterion: the answer's JSON object is closed (what a small model writes after
    it is chatter). Built here so that importing this module does not import transformers."""
    from transformers import StoppingCriteria

    class StopAtJsonEnd(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            text = prefix + tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
            return torch.full((input_ids.shape[0],), _json_closed(text), dtype=torch.bool, device=input_ids.device)

    return StopAtJsonEnd()


class EndpointError(UserError):
    """The endpoint answered with an HTTP error status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class EndpointUnreachable(UserError):
    """No HTTP answer at all: nothing listens, the name does not resolve, or it timed out."""


def _public_url(url: str) -> str:
    """`url` without user:password@ or a query string, safe to show."""
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.hostname + (f":{u.port}" if u.port else "") if u.hostname else "",
                                    u.path, "", ""))


class OpenAILabeler:
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's server,
    Ollama, ...) over plain HTTP(S). `base_url` is the API root (usually ending in /v1) or the
    full .../chat/completions URL. The API key comes from `api_key` or the environment
    (MISTUDIO_LABEL_API_KEY, else OPENAI_API_KEY); it is sent only as a Bearer header and never
    logged, stored, shown in repr or put in an error message."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 200):
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"labeling endpoint {base_url!r} is not an http(s) URL; give one like "
                            "http://127.0.0.1:8000/v1")
        base = base_url.rstrip("/")
        u = urllib.parse.urlsplit(base)
        path = u.path.rstrip("/")  # the query (Azure's ?api-version=...) stays at the end
        path = path if path.endswith("/chat/completions") else path + "/chat/completions"
        self.url = urllib.parse.urlunsplit((u.scheme, u.netloc, path, u.query, ""))
        self.base_url, self.model, self.timeout, self.max_tokens = base, model, timeout, max_tokens
        self._key = api_key if api_key is not None else next((os.environ[k] for k in KEY_ENV if os.environ.get(k)), "")
        self._logprobs = True  # asked for in detection until the endpoint refuses them
        self.source = f"openai:{model}"
        self._where = f"labeling endpoint {_public_url(base)}"

    def __repr__(self) -> str:
        key = "set" if self._key else "none"
        return f"OpenAILabeler({_public_url(self.base_url)!r}, model={self.model!r}, key={key})"

    def _scrub(self, text: str) -> str:
        """One line, without the key (a server may echo what it was sent)."""
        text = " ".join(str(text).split())
        return text.replace(self._key, "***") if self._key else text

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise EndpointError(self._http_error(e), e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise EndpointUnreachable(f"{self._where} is unreachable ({self._scrub(reason)}); check the URL and "
                                      "that the server runs") from None
        try:
            out = json.loads(payload)
            out["choices"][0]["message"]["content"]  # may be null (an empty answer), must be there
            return out
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{self._where} returned something that is not a chat completion "
                            f"({self._scrub(payload[:80].decode('utf-8', 'replace'))!r}); check that the URL is the "
                            "API root of an OpenAI-compatible server (usually ending in /v1)") from None

    def _http_error(self, e: urllib.error.HTTPError) -> str:
        try:
            detail = e.read(2000).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        try:  # OpenAI's shape: {"error": {"message": ...}}; else the body as text
            err = json.loads(detail).get("error", detail)
            detail = err.get("message", "") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            pass
        fix = {401: "check the API key (the api_key argument, MISTUDIO_LABEL_API_KEY or OPENAI_API_KEY)",
               403: "check the API key and that it may use this model",
               404: "check the URL (the API root usually ends in /v1) and the model name",
               429: "the endpoint is rate-limiting; label fewer features or try later"}.get(
            e.code, "check the URL and the model name" if e.code < 500 else "the server failed; check its log")
        detail = self._scrub(detail)[:120]
        return f"{self._where} answered HTTP {e.code}{f' ({detail})' if detail else ''}; {fix}"

    def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        out = self._post({"model": self.model, "messages": messages, "temperature": 0,
                          "max_tokens": max_tokens or self.max_tokens})
        return str(out["choices"][0]["message"].get("content") or "")

    def label(self, ctx: FeatureContext, template: PromptTemplate = DEFAULT_TEMPLATE) -> Label:
        return parse_label(self.complete(template.messages(ctx)), self.source)

    def _yes_margin(self, messages: list[dict[str, str]]) -> float:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 1}
        try:
            out = self._post({**body, "logprobs": True, "top_logprobs": 5} if self._logprobs else body)
        except EndpointError as e:
            if not (self._logprobs and e.status in (400, 422)):
                raise
            self._logprobs = False  # this server does not do logprobs: ask for the answer only
            out = self._post(body)
        choice = out["choices"][0]
        try:
            top = (choice.get("logprobs") or {}).get("content")[0].get("top_logprobs") or []
        except (AttributeError, IndexError, TypeError):
            top = []
        yes = [float(t["logprob"]) for t in top if _yes_no(t.get("token")) == "yes"]
        no = [float(t["logprob"]) for t in top if _yes_no(t.get("token")) == "no"]
        if yes or no:
            return _margin(yes, no)
        word = _yes_no(choice["message"].get("content"))
        return 1.0 if word == "yes" else -1.0  # neither Yes nor No counts as No

    def yes_margins(self, prompts: list[list[dict[str, str]]]) -> list[float]:
        """For each prompt, log P(Yes) − log P(No) from the endpoint's top logprobs when it gives
        them, else ±1 from its one-token answer: > 0 means Yes. One request per prompt."""
        return [self._yes_margin(m) for m in prompts]

    def says_yes(self, messages: list[dict[str, str]]) -> bool:
        return self._yes_margin(messages) > 0


def _yes_no(token: Any) -> str:
    word = str(token or "").strip().strip("*.\"'!").lower()
    return word if word in ("yes", "no") else ""


def _margin(yes: list[float], no: list[float], cap: float = 50.0) -> float:
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs)) if xs else -math.inf
    return max(-cap, min(cap, lse(yes) - lse(no)))  # capped: one side absent from the top-k is "very sure"


# ------------------------------------------------------------------------------ bulk and scoring


class Labeled(NamedTuple):
    labels: dict[int, Label]
    """Latent → its new label."""
    errors: dict[int, str]
    """Latent → why it got none (one line)."""


def label_many(labeler, contexts: Iterable[FeatureContext], progress: Callable[[dict], None] | None = None,
               should_cancel: Callable[[], bool] | None = None, template: PromptTemplate = DEFAULT_TEMPLATE,
               give_up_after: int = 3) -> Labeled:
    """Label each feature (labeler None: heuristic labels). A feature that fails is recorded in
    `errors` and the rest go on — except when the first `give_up_after` features all find the
    endpoint unreachable: then it is down, and waiting out a timeout per feature would only
    delay the same answer, so that error is raised."""
    contexts = list(contexts)
    labels: dict[int, Label] = {}
    errors: dict[int, str] = {}
    unreachable = 0
    t0 = time.perf_counter()
    if progress is not None:
        progress({"phase": "label", "done": 0, "total": len(contexts), "unit": "features", "failed": 0})
    for i, ctx in enumerate(contexts):
        if should_cancel is not None and should_cancel():
            raise Cancelled("labeling cancelled")
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
        if progress is not None:
            rate = (i + 1) / max(time.perf_counter() - t0, 1e-9)
            progress({"phase": "label", "done": i + 1, "total": len(contexts), "unit": "features",
                      "samples_per_s": rate, "eta_s": (len(contexts) - i - 1) / rate, "failed": len(errors)})
    return Labeled(labels, errors)


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


DETECT_QUESTION = "Text: {text}\n\nDoes this text contain {what}? Answer Yes or No."


def _what(label: Label) -> str:
    desc = label.description.strip().rstrip(".")
    return f'"{label.name}" ({desc})' if desc and desc.lower() != label.name.lower() else f'"{label.name}"'


def detection_score(scorer, label: Label, positives: list[str], negatives: list[str]) -> DetectionResult:
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
    auroc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    return DetectionResult(0.5 * (tp / len(positives) + tn / len(negatives)), tp, len(positives) - tp, tn, fp,
                           len(margins), auroc, margins)


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
    contexts = [FeatureContext.build(f["latent"], f, examples.get(f["latent"], []),
                                     (f.get("analysis") or {}).get("nlp"), (f.get("analysis") or {}).get("logits"))
                for f in features]
    labels, errors = label_many(labeler, contexts, progress, should_cancel, template)
    out = {i: lab.to_dict() for i, lab in labels.items()}
    if detection and labeler is not None:
        texts = {i: ["".join(e["tokens"]) for e in ex[:n_detect]] for i, ex in examples.items()}
        order = sorted(texts)
        for k, (i, lab) in enumerate(labels.items()):
            if should_cancel is not None and should_cancel():
                raise Cancelled("labeling cancelled")
            others = [t for j in order if j != i for t in texts[j][:1]][:n_detect]
            if texts.get(i) and others:
                try:
                    out[i]["detection"] = detection_score(labeler, lab, texts[i], others)._asdict()
                except Exception as e:  # noqa: BLE001 — the label stands without its score
                    errors[i] = f"detection: {e}"
            if progress is not None:
                progress({"phase": "detect", "done": k + 1, "total": len(labels), "unit": "features"})
    return {"labels": out, "errors": errors}
