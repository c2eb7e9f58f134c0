"""SAEs in the field's formats: find and import them; export SAELens folders.

One module per format documents and reads that format (`saelens`, `sparsify`,
`dictionary_learning`, `gemma_scope`); this module keeps the registry of them and what they
share. `sources` turns a path, an archive or a Hugging Face repo id into a local folder.

Every importer maps its tensors to SAELens names and builds the SAE with
`saelens.sae_from_tensors`, so every format gets the same shape and NaN checks, and the imported
SAE reproduces the *source project's own* encoder (checked against each project's code;
tests/test_formats.py re-derives each forward pass from that project's published math).

JumpReLU thresholds are clamped at 0 on import: ReLU(pre)·[pre > θ] (SAELens, Gemma Scope,
dictionary_learning) equals our pre·[pre > max(θ, 0)] for every θ.

The hook site must be known: from the files, or the ``hook_name`` argument when the files do not
say. A ``hook_name`` that contradicts the files is refused rather than silently believed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch

from core.errors import UserError
from core.formats import dictionary_learning, gemma_scope, saelens, sparsify
from core.formats.base import Format
from core.formats.saelens import save_saelens
from core.formats.sources import open_source
from core.hooks import SITES, parse_hook_name
from core.sae import SAE, SAEConfig

__all__ = ["FORMATS", "Format", "FoundSAE", "find_saes", "detect_format", "import_sae", "export_saelens",
           "open_source"]

_REGISTRY: dict[str, Format] = {f.name: f for f in (saelens.FORMAT, sparsify.FORMAT, dictionary_learning.FORMAT,
                                                     gemma_scope.FORMAT)}
"""In the order detection tries them: the first format whose marker file a folder holds wins."""
FORMATS = tuple(_REGISTRY)
"""The format names `import_sae` accepts."""

# Files a user may point at instead of the SAE's folder.
_FILES = {name for f in _REGISTRY.values() for name in f.markers + f.config_files}
_MAX_DEPTH = 8  # a Gemma Scope release is 3 deep, dictionary_learning's pretrained set 4
_HOOK_EXAMPLE = "blocks.6.hook_resid_post"


class FoundSAE(NamedTuple):
    """One SAE found on disk."""

    path: Path
    """The SAE's folder."""
    format: str
    """One of FORMATS."""
    hook_name: str
    """The hook site the files name (TransformerLens style); "" when they do not say."""


# ---------------------------------------------------------------------------------- discovery


def _marker_format(folder: Path) -> str:
    for fmt in _REGISTRY.values():
        if any((folder / name).is_file() for name in fmt.markers):
            return fmt.name
    return ""


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_saes(path: str | os.PathLike) -> list[FoundSAE]:
    """Every SAE at or under `path`, naturally sorted (layers.2 before layers.10).

    A sparsify run holds one folder per hookpoint, a dictionary_learning run trainer_0/,
    trainer_1/..., a SAELens or Gemma Scope release one folder per SAE; a folder that is an SAE
    is not searched further. `path` may also be one SAE's folder or file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; point at an SAE folder or a folder of SAEs")
    if path.is_file():
        return [_found(path.parent, detect_format(path))]
    found = []
    root_depth = len(path.parts)
    for dirpath, dirnames, _ in os.walk(path):
        folder = Path(dirpath)
        fmt = _marker_format(folder)
        if fmt:
            found.append(_found(folder, fmt))
            dirnames.clear()
            continue
        # Skip hidden folders (our own .tmp-* writes, .git, .cache) and stop at a sane depth.
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if len(folder.parts) - root_depth >= _MAX_DEPTH:
            dirnames.clear()
    return sorted(found, key=lambda f: _natural_key(f.path))


def _found(folder: Path, fmt: str) -> FoundSAE:
    try:
        hook = _REGISTRY[fmt].read_hook(folder)
    except UserError:
        hook = ""  # an unreadable config shows up when that SAE is imported
    return FoundSAE(folder, fmt, hook)


def detect_format(path: str | os.PathLike) -> str:
    """The format of the one SAE at `path` (its folder or one of its files)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; point at an SAE folder")
    if path.is_file():
        if path.name not in _FILES:
            raise UserError(f"{path} is not a file miStudio imports SAEs from; point at the SAE's folder")
        folder = path.parent
    else:
        folder = path
    fmt = _marker_format(folder) or _format_from_config(folder)
    if fmt:
        return fmt
    inside = find_saes(folder) if path.is_dir() else []
    if inside:
        names = ", ".join(str(f.path.relative_to(folder)) for f in inside[:3]) + (", ..." if len(inside) > 3 else "")
        raise UserError(f"{folder} holds {len(inside)} SAEs ({names}), not one; import them one at a time")
    raise UserError(
        f"no SAE found at {folder}; expected a SAELens (cfg.json + sae_weights.safetensors), sparsify "
        "(cfg.json + sae.safetensors), dictionary_learning (ae.pt + config.json) or Gemma Scope (params.npz) folder"
    )


def _format_from_config(folder: Path) -> str:
    """A folder whose weights file is missing: tell the format from its config, so that the
    importer can say which file is missing."""
    for fmt in _REGISTRY.values():
        if fmt.owns_config(folder):
            return fmt.name
    return ""


# ---------------------------------------------------------------------------------- import / export


def import_sae(path: str | os.PathLike, *, format: str | None = None, hook_name: str | None = None,
               expected_d_in: int | None = None, model_name: str = "") -> tuple[SAE, SAEConfig]:
    """Load the SAE at `path` (its folder or one of its files) as a miStudio SAE and its config.

    `format` skips detection. `hook_name` names the site when the files do not (it must agree
    with them when they do). `expected_d_in` is the d_model of the model it will be applied to.
    `model_name` overrides the model the files name. Nothing is written anywhere.
    """
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if format is None:
        format = detect_format(path)
    elif format not in FORMATS:
        raise UserError(f"unknown SAE format '{format}'; pick one of {', '.join(FORMATS)}")
    elif not folder.is_dir():
        raise UserError(f"{folder} does not exist; point at an SAE folder")
    sae, cfg = _REGISTRY[format].load(folder, lambda stated: _resolve_hook(folder, stated, hook_name))
    if isinstance(getattr(sae, "threshold", None), torch.Tensor):
        with torch.no_grad():
            sae.threshold.clamp_(min=0.0)
    if expected_d_in is not None and sae.d_in != expected_d_in:
        raise UserError(f"SAE d_in={sae.d_in} does not match {cfg.hook_name} of this model (d_model={expected_d_in}); "
                        "pick the matching model or SAE")
    cfg = dataclasses.replace(cfg, model_name=model_name or cfg.model_name, dtype="float32")
    return sae, cfg


def export_saelens(sae: SAE, cfg: SAEConfig, folder: str | os.PathLike) -> Path:
    """Write `folder` atomically as a SAELens folder (cfg.json + sae_weights.safetensors)."""
    return save_saelens(sae, cfg, folder)


def _resolve_hook(folder: Path, stated: str, given: str | None) -> str:
    """The hook the SAE reads: what its files say, else `given`; a contradiction is an error."""
    if given:
        layer, site = parse_hook_name(given)
        given = f"blocks.{layer}.hook_{site}"
    if stated:
        try:
            parse_hook_name(stated)
        except UserError:
            raise UserError(f"{folder} was trained on {stated}, which miStudio does not hook; it hooks "
                            f"blocks.L.hook_{{{','.join(SITES)}}}") from None
        if given and given != stated:
            raise UserError(f"{folder} says it reads {stated} but hook_name={given}; leave hook_name out "
                            f"or pass {stated}")
        return stated
    if not given:
        raise UserError(f"cannot tell which hook site {folder} was trained on; pass its hook name, "
                        f"e.g. hook_name={_HOOK_EXAMPLE}")
    return given
