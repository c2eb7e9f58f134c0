"""The SAE types by name: each type file registers itself here, and every other layer builds,
lists and parses types through these functions instead of naming them.

Adding a type is adding one file in this package: an `SAE` subclass with its `Config`
dataclass, decorated with `@register("name")`, and one import line in `core/sae/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping

from core.errors import UserError
from core.fields import describe
from core.sae.base import SAE, SAETypeConfig

DEFAULT = "topk"
"""The type a training config gets when it names none."""

_TYPES: dict[str, type[SAE]] = {}


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make `cls` (and its Config) the SAE type `name`."""
    def add(cls: type[SAE]) -> type[SAE]:
        if name in _TYPES and _TYPES[name] is not cls:
            raise ValueError(f"SAE type {name!r} is already registered by {_TYPES[name].__qualname__}")
        cls.architecture = cls.Config.architecture = name
        _TYPES[name] = cls
        return cls
    return add


def unregister(name: str) -> None:
    """Forget a type (tests that register their own)."""
    _TYPES.pop(name, None)


def names(inference: bool = False) -> list[str]:
    """Registered type names; `inference=True`: only those a cfg.json may name."""
    ordered = sorted(_TYPES, key=lambda n: n != DEFAULT)  # the default first, then in registration order
    return [n for n in ordered if _TYPES[n].inference or not inference]


def get(name: str) -> type[SAE]:
    """The SAE class registered as `name`, or a one-line error listing the choices."""
    cls = _TYPES.get(name)
    if cls is None:
        raise UserError(f"unknown SAE architecture '{name}'; pick one of {', '.join(names())}")
    return cls


def config_for(name: str, values: Mapping[str, Any] | None = None, *, lenient: bool = False) -> SAETypeConfig:
    """Type `name`'s config from field values (or the type's older flat names, its ALIASES).

    `lenient`: silently drop keys that are another registered type's knobs (a flat job file or
    template carries, e.g., l1_coefficient beside a topk architecture); any other unknown key
    is an error.
    """
    cfg_cls = get(name).Config
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    kwargs, unknown = {}, []
    for key, value in (values or {}).items():
        field_name = cfg_cls.ALIASES.get(key, key)
        if field_name in fields:
            kwargs[field_name] = value
        elif not (lenient and key in knob_names()):
            unknown.append(key)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(sorted(unknown))} for a {name} SAE; "
                        f"it takes {', '.join(fields) or 'none'}")
    try:
        return cfg_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {name} SAE settings ({e})") from None


def config_from_dict(d: Mapping[str, Any]) -> SAETypeConfig:
    """Inverse of `SAETypeConfig.to_dict` (the registry's and job files' JSON form)."""
    values = dict(d)
    return config_for(str(values.pop("architecture", DEFAULT)), values)


def knob_names() -> set[str]:
    """Every field name (and alias) of every registered type's config."""
    out: set[str] = set()
    for cls in _TYPES.values():
        out |= {f.name for f in dataclasses.fields(cls.Config)} | set(cls.Config.ALIASES)
    return out


def build(cfg: SAETypeConfig, d_in: int, d_sae: int) -> SAE:
    """A freshly initialised SAE of `cfg`'s type."""
    return get(cfg.architecture)(d_in, d_sae, cfg)


def build_sae(architecture: str, d_in: int, d_sae: int, **knobs: Any) -> SAE:
    """A freshly initialised SAE by type name and knobs, e.g. build_sae("topk", 576, 4608, k=32)."""
    return build(config_for(architecture, knobs), d_in, d_sae)


def check_activation_fn(d: Mapping[str, Any], where: str) -> None:
    """Older SAELens cfg.json files name the activation (`activation_fn_str`); only ReLU and
    TopK are ones our types reproduce."""
    activation = d.get("activation_fn_str", d.get("activation_fn"))
    if activation not in (None, "relu", "topk"):
        raise UserError(f"{where} uses activation '{activation}'; miStudio loads ReLU, TopK and JumpReLU SAEs")


def config_from_cfg_json(d: Mapping[str, Any]) -> SAETypeConfig:
    """The inference type a SAELens cfg.json describes, with its knobs."""
    name = str(d.get("architecture") or "standard")
    # Older SAELens wrote TopK SAEs as "standard" with activation_fn_str="topk" and k in
    # activation_fn_kwargs.
    fn_kwargs = d.get("activation_fn_kwargs") or {}
    if d.get("activation_fn_str") == "topk" or ("k" in fn_kwargs and name == "standard"):
        name = "topk"
    cls = _TYPES.get(name)
    if cls is None or not cls.inference:
        raise UserError(f"cfg.json: architecture '{name}' is not supported; miStudio loads "
                        f"{', '.join(names(inference=True))} SAEs")
    return cls.Config.from_cfg_json(dict(d))


def summarize(d: Mapping[str, Any] | None) -> str:
    """A stored type config's inference knobs in a few characters ("k=32"; "" when unknown)."""
    try:
        return config_from_dict(d or {}).summary()
    except UserError:  # a type no longer registered: show the raw settings
        return ", ".join(f"{k}={v}" for k, v in (d or {}).items() if k != "architecture")


def catalogue() -> list[dict[str, Any]]:
    """Every registered type with its about line and settings (name, default, help): what the
    dashboard's form and the CLI's help are built from."""
    out = []
    for name in names():
        cls = _TYPES[name]
        fields = [{"name": f.name, "default": f.default, "help": f.doc} for f in describe(cls.Config)]
        about = (sys.modules[cls.__module__].__doc__ or name).strip().splitlines()[0]
        out.append({"name": name, "about": about, "fields": fields})
    return out
