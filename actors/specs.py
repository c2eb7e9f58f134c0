"""Job specs in general: a spec dict parsed for its kind, templates, job files.

A spec is a dataclass of its kind's file (actors/jobs/<kind>.py); it round-trips through JSON
(the registry stores it, a template stores it, the CLI reads it from flags or a file). Unknown
keys and wrong types are one-line errors naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from core.errors import UserError


PROMPT_SETS = "steering_prompts"
"""Template kind of a named list of prompts for steering: values {"prompts": [...]}."""
LABEL_PROMPT = "label_prompt"
"""Template kind of a labeling prompt: values are core.interp.PromptTemplate's fields."""
TEMPLATE_FORMAT = "mistudio-template/1"


def check_template(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """Validate a template's values: a job form may leave out required fields (it is filled in
    when used), but every key it has must exist and have the right type."""
    if kind == PROMPT_SETS:
        prompts = values.get("prompts")
        if set(values) != {"prompts"} or not isinstance(prompts, list) or not prompts \
                or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError('a steering_prompts template needs {"prompts": [...]} with at least one non-empty prompt')
        return values
    if kind == LABEL_PROMPT:
        from core.interp import PromptTemplate

        PromptTemplate.from_json(json.dumps(values))  # raises a one-line UserError when malformed
        return values
    from actors import jobs

    if kind not in jobs.names():
        raise UserError(f"unknown template kind {kind!r}; choose one of {', '.join(template_kinds())}")
    cls = jobs.get(kind).spec
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(sorted(unknown))} in a {kind} template; allowed: {', '.join(hints)}")
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise UserError(f"{kind} template key {name!r} should be {_type_name(hints[name])}, got {shown(value)}")
    # The training settings a train job (config) or a pipeline (train) holds: checked as a submit would.
    settings = {"train": "config", "pipeline": "train"}.get(kind)
    if settings and isinstance(values.get(settings), dict):
        from actors.jobs.train import train_config

        train_config(values[settings])
    return values


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr, cut to `limit` characters (a file's value
    can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def template_kinds() -> list[str]:
    """Every kind a template may have: each job kind, a steering prompt set, a labeling prompt."""
    from actors import jobs

    return [*jobs.names(), PROMPT_SETS, LABEL_PROMPT]


def template_document(kind: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
    """A template as an exported JSON document."""
    return {"format": TEMPLATE_FORMAT, "kind": kind, "name": name, "values": values}


def read_template_document(text: str, where: str = "template file") -> tuple[str, str, dict[str, Any]]:
    """(kind, name, values) from an exported template, validated."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e.msg} at line {e.lineno}); export templates with: "
                        "mistudio templates export") from None
    if not isinstance(doc, dict) or doc.get("format") != TEMPLATE_FORMAT:
        raise UserError(f"{where} is not a miStudio template (no \"format\": \"{TEMPLATE_FORMAT}\")")
    kind, name, values = doc.get("kind"), doc.get("name"), doc.get("values")
    if not isinstance(kind, str) or not isinstance(name, str) or not name.strip() or not isinstance(values, dict):
        raise UserError(f"{where} needs a string kind, a non-empty name and a values object")
    return kind, name.strip(), check_template(kind, values)


def parse_spec(kind: str, values: dict[str, Any]):
    """Build the spec dataclass for `kind` from a dict, with one-line errors for bad input, and
    check what the spec alone can tell (the registry is checked when the job is submitted)."""
    from actors import jobs  # the kinds import this module's helpers

    k = jobs.get(kind)
    fields = {f.name: f for f in dataclasses.fields(k.spec)}
    unknown = set(values) - set(fields)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(sorted(unknown))} in a {kind} spec; "
                        f"allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(k.spec)
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise UserError(f"{kind} spec key {name!r} should be {_type_name(hints[name])}, got {shown(value)}")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"this {kind} job needs {', '.join(missing)}")
    spec = k.spec(**values)
    k.check(None, spec)
    return spec


def zero_for_all(**values: int | None) -> None:
    """One-line errors for limits where 0 (or None) means "all" and a negative number means nothing."""
    for name, value in values.items():
        if value is not None and value < 0:
            raise UserError(f"{name}={value} must be 0 (all) or more")


def config(cls, values: dict[str, Any], what: str):
    """A dataclass of options (TrainConfig, DiscoverConfig, ...) from a spec's dict, with
    one-line errors naming the option."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown {what} option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(names))}")
    obj = cls(**values)  # a dataclass takes any value; its types are checked next
    check_types(obj, what)
    return obj


def check_types(obj, what: str, skip: tuple[str, ...] = ()) -> None:
    """One-line errors for a dataclass instance whose field values are not of their declared
    types (a dataclass does not check what it is given)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name not in skip and not _type_ok(value, hints[f.name]):
            raise UserError(f"{what} option {f.name!r} should be {_type_name(hints[f.name])}, got {shown(value)}")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None:  # a plain class: int, str, ...
        return hint.__name__
    return str(hint).replace("typing.", "")  # list[int], int | None, dict[str, typing.Any]


def to_dict(spec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _no_aliases_loader():
    import yaml

    class NoAliases(yaml.SafeLoader):
        """SafeLoader without anchors and aliases: a job file has no use for them, and nested
        aliases ("billion laughs") expand without limit."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise UserError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a job file; "
                                "write the values out")
            return super().compose_node(parent, index)
    return NoAliases


def load_job_file(path: str, partial: bool = False,
                  template: tuple[str, dict[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """Read a job config (YAML or JSON: `kind:` plus the spec's fields) and validate it fully.

    Everything is checked here, before any Ray call, so a typo costs nothing. `partial` checks
    keys and types only (a template may leave fields to fill in); `template` (kind, values)
    supplies defaults that the file's fields override.
    """
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"job config {path} not found; check the path")
    try:
        doc = yaml.load(p.read_text(), Loader=_no_aliases_loader())  # JSON is YAML too
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"{p.name} is not valid YAML/JSON{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{p.name} must be a mapping with a 'kind' key and the job's fields")
    values = dict(doc)
    kind = values.pop("kind", None) or (template[0] if template else None)
    if kind is None:
        from actors import jobs

        raise UserError(f"{p.name} has no 'kind'; set it to one of {', '.join(jobs.names())}")
    kind = str(kind)
    if template is not None:
        if template[0] != kind:
            raise UserError(f"the template is for {template[0]} jobs but {p.name} is a {kind} job")
        values = {**template[1], **values}
    if partial:
        check_template(kind, values)
    else:
        parse_spec(kind, values)
    return kind, values
