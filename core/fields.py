"""Field docstrings of config dataclasses, read from their source: the one place a setting is
documented is the string under its field, and forms and command-line help are built from it."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Any, NamedTuple, Sequence


class FieldInfo(NamedTuple):
    """One setting as a form or a command line shows it."""

    name: str
    hint: Any
    """Its type annotation (e.g. int | None)."""
    default: Any
    doc: str


def describe(cls: type, only: Sequence[str] | None = None) -> list[FieldInfo]:
    """The fields of a dataclass (or just those named in `only`) with their types, defaults and
    docstrings, in order."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        out.append(FieldInfo(f.name, hints[f.name], default, docs.get(f.name, "")))
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring (first paragraph, one line)} for `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # builtins, classes made at run time
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                first = inspect.cleandoc(after.value.value).split("\n\n")[0]
                docs[stmt.target.id] = " ".join(first.split())
    return docs
