"""The LLM explainer's two halves around a client's completion: the prompt it sends (an editable
template with {placeholders}, its default text in llm_prompt.py beside this file) and the
parsing of the answer a model writes back into a Label — forgiving, since small models break
the JSON form they are asked for."""

from __future__ import annotations

import json
import re
import string
from dataclasses import asdict, dataclass, fields

from core.errors import UserError
from core.interp.explainers import llm_prompt
from core.interp.types import CATEGORIES, MAX_NAME_WORDS, FeatureContext, Label, short_name

PLACEHOLDERS = ("examples", "top_tokens", "nlp_summary", "promoted", "suppressed", "frequency", "latent")
"""What a prompt template may refer to as {name}."""


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


DEFAULT_TEMPLATE = PromptTemplate(name="default", system=llm_prompt.SYSTEM, user=llm_prompt.USER,
                                  answer_prefix=llm_prompt.ANSWER_PREFIX)


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
    name = short_name(" ".join(str(name).split()).strip(strip))
    if not name:
        raise UserError(f"the labeling model ({source}) returned no usable label: {raw[:80]!r}; "
                        "try a larger model or edit the prompt template")
    return Label(name, _category(str(category)), " ".join(str(description).split())[:500], source, raw)
