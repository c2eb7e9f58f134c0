"""The job commands' flags, made from the kinds' spec dataclasses (actors/jobs/<kind>.py).

Each field becomes a flag (`--field-name`, and the flag it has always had where a kind's
`Command.aliases` names one); its docstring is the help and its default the default, so no
default is written twice. A dict field a kind lists in `Command.nested` gets a flag per key
(TrainSpec.config → --k, --expansion, ...); only the keys given go into the spec, so the key's
dataclass default applies. Imported only for the subcommand being parsed: `mistudio --help`
loads no engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, NamedTuple

from actors import jobs
from core.fields import field_docs


class Flag(NamedTuple):
    dest: str
    """The spec field, or "field.key" for a key of a nested dict field."""
    names: list[str]
    options: dict[str, Any]
    """argparse's add_argument keywords."""
    required: bool
    """The action needs it (the spec has no default and the CLI supplies none)."""


def kinds_of(command: str) -> list[jobs.Kind]:
    return [k for k in jobs.kinds() if k.cli is not None and k.cli.command == command]


def kind_of(command: str, action: str | None) -> jobs.Kind | None:
    """The kind that `mistudio COMMAND ACTION` submits, if it submits one."""
    return next((k for k in kinds_of(command) if k.cli.action == action), None)


def add_flags(parser: argparse.ArgumentParser, command: str, positional_help: str = "") -> None:
    """Every flag of the kinds this command submits (a flag two kinds share is added once), and
    the command's positional argument when a kind reads one."""
    seen: set[str] = set()
    for kind in kinds_of(command):
        if kind.cli.positional and "positional" not in seen:
            seen.add("positional")
            f = next(f for f in dataclasses.fields(kind.spec) if f.name == kind.cli.positional)
            parser.add_argument(f.name, nargs="?", default=_default(f),
                                help=_escape(positional_help or field_docs(kind.spec).get(f.name, "")))
        for flag in flags(kind):
            if flag.dest not in seen:
                seen.add(flag.dest)
                parser.add_argument(*flag.names, dest=flag.dest, **flag.options)


def flags(kind: jobs.Kind) -> list[Flag]:
    """The flags of a kind's spec, in field order."""
    cmd, docs = kind.cli, field_docs(kind.spec)
    hints = typing.get_type_hints(kind.spec)
    out = []
    for f in dataclasses.fields(kind.spec):
        if f.name in cmd.skip or f.name == cmd.positional:
            continue
        if f.name in cmd.nested:
            out += _nested(kind, f.name)
            continue
        alias, dashed = cmd.aliases.get(f.name), "--" + f.name.replace("_", "-")
        names = [f"--{alias}"] + ([dashed] if f.name not in cmd.types else []) if alias else [dashed]
        default = cmd.defaults.get(f.name, _default(f))
        flag = _flag(f.name, names, hints[f.name], default, default, docs.get(f.name, ""), cmd)
        if flag is not None:
            required = f.name in cmd.required or (_default(f) is None and f.name not in cmd.defaults
                                                  and f.default is dataclasses.MISSING
                                                  and f.default_factory is dataclasses.MISSING)
            out.append(flag._replace(required=required))
    return out


def _nested(kind: jobs.Kind, name: str) -> list[Flag]:
    """A flag per key the kind's field list gives (TrainConfig's: its own fields and every SAE
    type's knobs), named `--key-name` unless the kind renames it."""
    keys_of, renamed = kind.cli.nested[name]
    keys = keys_of()
    out = []
    for key in keys:
        dest = f"{name}.{key.name}"
        flag_name = renamed.get(key.name, key.name.replace("_", "-"))
        shown = kind.cli.defaults.get(dest, key.default)
        flag = _flag(dest, [f"--{flag_name}"], key.hint, kind.cli.defaults.get(dest), shown, key.doc, kind.cli)
        if flag is not None:
            out.append(flag)
    return out


def _flag(dest: str, names: list[str], hint: Any, default: Any, shown: Any, doc: str,
          cmd: jobs.Command) -> Flag | None:
    """One flag; None for a field a flag cannot spell (a dict) unless the kind gives its type."""
    base = _base(hint)
    kind_type = cmd.types.get(dest)
    options: dict[str, Any] = {"default": default}
    if base is bool and hint is not bool and kind_type is None:  # bool | None: auto unless on or off
        options["type"], options["metavar"] = _on_off, "on|off"
    elif base is bool and kind_type is None:
        if shown:  # on by default: the flag turns it off
            names = ["--no-" + n[2:] for n in names]
        options["action"] = "store_const"
        options["const"] = not shown
        doc += " (on by default)" if shown else ""
    else:
        item = typing.get_args(base)[0] if typing.get_origin(base) is list else None
        if kind_type is None and (typing.get_origin(base) is dict or _base(item) is not item or item is dict
                                  or typing.get_origin(item) is dict):
            return None
        if dest in cmd.repeat:
            options["action"], options["type"] = "append", kind_type or item
        else:
            options["type"] = kind_type or (_comma_list(dest, item) if item is not None else base)
        if dest in cmd.choices:
            options["choices"] = list(cmd.choices[dest])
        else:
            options["metavar"] = names[0][2:].upper().replace("-", "_")
        if shown not in (None, "", []):
            doc += f" (default: {','.join(map(str, shown)) if isinstance(shown, list) else shown})"
    options["help"] = _escape(doc)
    return Flag(dest, names, options, False)


def spec_values(kind: jobs.Kind, a: argparse.Namespace) -> dict[str, Any]:
    """The spec dict of the parsed flags: what was given, and the flags' defaults; a flag left
    at None is left out, so the spec's own default applies."""
    values: dict[str, Any] = {}
    if kind.cli.positional and getattr(a, kind.cli.positional, None) is not None:
        values[kind.cli.positional] = getattr(a, kind.cli.positional)
    for flag in flags(kind):
        value = getattr(a, flag.dest, None)
        if value is None:
            continue
        if "." in flag.dest:
            name, key = flag.dest.split(".", 1)
            values.setdefault(name, {})[key] = value
        else:
            values[flag.dest] = value
    return values


def missing(kind: jobs.Kind, a: argparse.Namespace) -> list[str]:
    """The flags (or positional argument) this action needs and was not given."""
    out = [f.names[0] for f in flags(kind) if f.required and getattr(a, f.dest, None) in (None, [])]
    positional = kind.cli.positional
    if positional and getattr(a, positional, None) is None:
        out.insert(0, positional)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _on_off(text: str) -> bool:
    """A three-state flag's value: on or off (left out: the setting's automatic choice)."""
    if text.lower() not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is neither on nor off")
    return text.lower() == "on"


def _base(hint: Any) -> Any:
    """`int | None` → int; anything else as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [h for h in typing.get_args(hint) if h is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _comma_list(name: str, item: type) -> Callable[[str], list]:
    """Comma-separated values of one type, e.g. 5,15 → [5, 15]."""
    what = {int: "integers like 5,10", float: "numbers like 0,4,8"}.get(item, "values like a,b")

    def parse(text: str) -> list:
        try:
            return [item(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated {what}, got {text!r}") from None

    return parse


def _escape(text: str) -> str:
    return text.replace("%", "%%")
