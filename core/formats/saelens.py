"""SAELens: the one reader and writer of `cfg.json` + `sae_weights.safetensors`.

A SAELens SAE folder is `cfg.json` + `sae_weights.safetensors` holding `W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]` (+ `threshold [d_sae]` for JumpReLU).
We write the v6 layout (run metadata under `metadata`) so SAELens loads our exports unchanged
and gives the same encodings, and we read the older flat layout too (hook_name at top level;
TopK as ``activation_fn_str="topk"`` with k in ``activation_fn_kwargs``).

Every other format maps its tensors to these names and builds the SAE with `sae_from_tensors`,
so every format gets the same name, shape and NaN checks. miStudio stores its own SAEs in this
format too (`save_saelens` / `load_saelens`).

Refused on import: hook_z / per-head SAEs, a ``finetuning_scaling_factor``, activation functions
other than ReLU/TopK (JumpReLU is its own architecture), ``normalize_activations`` other than
"none", and ``rescale_acts_by_decoder_norm`` with non-unit decoder rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.errors import UserError
from core.formats.base import Format, Resolve
from core.formats.readers import need, read_json, read_json_object
from core.io import atomic_dir
from core.sae import SAE, SAEConfig, SAETypeConfig, registry

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
_METADATA_FIELDS = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path",
                    "exclude_special_tokens", "outlier_norm_threshold")
"""The run metadata, under `metadata` as SAELens 6 reads it (sae_lens.saes.sae.SAEMetadata keeps
every key). `exclude_special_tokens` is SAELens's own (a list of token ids, or a bool);
`outlier_norm_threshold` is ours: written only when a norm filter left tokens out."""


# ---------------------------------------------------------------------------------- cfg.json


def to_cfg_json(cfg: SAEConfig) -> dict[str, Any]:
    """SAELens v6 `cfg.json` contents: the shared fields, then the type's own (k for TopK)."""
    d: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        # Newer SAELens versions know these; older ones drop unknown fields on load.
        "reshape_activations": "none",
        # sae_lens_version marks the v6 layout: SAELens reads configs without it as pre-6.0
        # and drops the metadata block (hook_name, model_name, ...).
        "metadata": _metadata(cfg),
        # SAELens before 6 read prepend_bos at the top level; 6 reads metadata.prepend_bos.
        "prepend_bos": cfg.prepend_bos,
    }
    return d | cfg.type_config.cfg_json()


def _metadata(cfg: SAEConfig) -> dict[str, Any]:
    meta = {name: getattr(cfg, name) for name in _METADATA_FIELDS}
    if meta["outlier_norm_threshold"] is None or not math.isfinite(meta["outlier_norm_threshold"]):
        del meta["outlier_norm_threshold"]  # no norm filter (JSON has no inf)
    return meta | {"sae_lens_version": "6.0.0"}


def from_cfg_json(d: dict[str, Any]) -> SAEConfig:
    """Parse a SAELens `cfg.json`: the v6 layout or the older flat one (hook_name at top level)."""
    if not isinstance(d, dict):
        raise UserError("cfg.json does not hold a JSON object; re-export the SAE from SAELens")
    missing = [name for name in ("d_in", "d_sae") if name not in d]
    if missing:
        raise UserError(f"cfg.json lacks {', '.join(missing)}; add them or re-export the SAE")
    meta = d.get("metadata") or {}
    flat = {name: meta.get(name, d.get(name)) for name in _METADATA_FIELDS}
    try:
        return _config(d, registry.config_from_cfg_json(d), flat)
    except (TypeError, ValueError) as e:
        raise UserError(f"cfg.json has a field of the wrong type ({e}); fix it or re-export the SAE") from None


def _config(d: dict[str, Any], type_config: SAETypeConfig, flat: dict[str, Any]) -> SAEConfig:
    return SAEConfig(
        d_in=int(d["d_in"]),
        d_sae=int(d["d_sae"]),
        type_config=type_config,
        dtype=str(d.get("dtype", "float32")),
        apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
        normalize_activations=str(d.get("normalize_activations") or "none"),
        hook_name=str(flat["hook_name"] or ""),
        model_name=str(flat["model_name"] or ""),
        context_size=int(flat["context_size"] or 0),
        prepend_bos=bool(flat["prepend_bos"]),
        dataset_path=str(flat["dataset_path"] or ""),
        exclude_special_tokens=_excluded(flat["exclude_special_tokens"]),
        outlier_norm_threshold=None if flat["outlier_norm_threshold"] is None else float(flat["outlier_norm_threshold"]),
    )


def _excluded(value: Any) -> bool | list[int]:
    """metadata.exclude_special_tokens: a list of token ids or a bool (SAELens's two spellings)."""
    if isinstance(value, (list, tuple)):
        return [int(i) for i in value]
    return bool(value)


# ---------------------------------------------------------------------------------- folders


def save_saelens(sae: SAE, cfg: SAEConfig, folder: str | os.PathLike) -> Path:
    """Write `folder` (atomically) as a SAELens folder: cfg.json + sae_weights.safetensors."""
    sae = sae.to_inference()
    got = (sae.architecture, sae.d_in, sae.d_sae, sae.type_config.cfg_json())
    want = (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.type_config.cfg_json())
    if got != want:
        raise UserError(f"SAEConfig (architecture, d_in, d_sae, type settings) = {want} does not match the SAE's "
                        f"{got}; build the config with sae.config(...)")
    tensors = {name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous() for name in sae.TENSOR_NAMES}
    cfg_json = to_cfg_json(cfg) | {"dtype": "float32", "apply_b_dec_to_input": sae.apply_b_dec_to_input}
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILENAME))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2))
    return folder


def load_saelens(folder: str | os.PathLike) -> tuple[SAE, SAEConfig]:
    """Load a SAELens folder (safetensors only; never unpickles anything)."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path} is missing; a SAELens SAE folder needs {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); re-export the SAE") from None
    cfg = from_cfg_json(raw)
    if cfg.normalize_activations != "none":
        raise UserError(
            f"{folder} uses normalize_activations='{cfg.normalize_activations}', which miStudio does not apply; "
            "fold the normalization into the weights and set it to 'none'"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_path} is not a readable safetensors file ({e}); re-export the SAE") from None
    if raw.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].float().norm(dim=1) if "W_dec" in tensors else None
        if norms is not None and not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise UserError(
                f"{folder} sets rescale_acts_by_decoder_norm with non-unit decoder rows, which miStudio does not apply; "
                "fold the decoder norms into the encoder (SAELens fold_W_dec_norm) and save again"
            )
    return sae_from_tensors(cfg, tensors, str(weights_path)), cfg


def sae_from_tensors(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: str) -> SAE:
    """Build the SAE `cfg` describes from SAELens-named tensors, checking names, shapes and values.

    `source` names the file in error messages. Importers of other formats map their tensors to
    these names and call this, so every format gets the same checks.
    """
    cls = registry.get(cfg.architecture)
    if not cls.inference:
        raise UserError(f"{source}: architecture '{cfg.architecture}' is not supported; "
                        f"miStudio loads {', '.join(registry.names(inference=True))} SAEs")
    missing = [name for name in cls.TENSOR_NAMES if name not in tensors]
    if missing:
        raise UserError(f"{source} lacks tensor(s) {', '.join(missing)}; a {cfg.architecture} SAE needs "
                        f"{', '.join(cls.TENSOR_NAMES)}")
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,),
                "b_dec": (cfg.d_in,), "threshold": (cfg.d_sae,)}
    for name in cls.TENSOR_NAMES:
        if tuple(tensors[name].shape) != expected[name]:
            raise UserError(
                f"{name} in {source} has shape {list(tensors[name].shape)} but the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}) implies {list(expected[name])}; fix d_in/d_sae in the config"
            )
        if not bool(torch.isfinite(tensors[name]).all()):
            raise UserError(f"{name} in {source} holds NaN or inf values; re-export or retrain the SAE")
    sae = cls.from_config(cfg)  # checks the type's settings against d_sae
    with torch.no_grad():
        for name in cls.TENSOR_NAMES:
            getattr(sae, name).copy_(tensors[name].to(torch.float32))
    return sae


# ---------------------------------------------------------------------------------- import


def read_hook(folder: Path) -> str:
    raw = read_json_object(need(folder / CFG_FILENAME, "a SAELens SAE folder needs cfg.json"))
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    return str(meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "")


def owns_config(folder: Path) -> bool:
    """A cfg.json with d_sae: sparsify's cfg.json has none."""
    path = folder / CFG_FILENAME
    raw = read_json(path) if path.is_file() else None
    return isinstance(raw, dict) and "d_sae" in raw


def load(folder: Path, resolve: Resolve) -> tuple[SAE, SAEConfig]:
    """A SAELens folder someone else wrote: refuse what miStudio cannot apply, then `load_saelens`."""
    raw = read_json_object(need(folder / CFG_FILENAME,
                                "a SAELens SAE folder needs cfg.json and sae_weights.safetensors"))
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    head = meta.get("hook_head_index", raw.get("hook_head_index", raw.get("hook_point_head_index")))
    if head is not None:
        raise UserError(f"{folder} is a per-head SAE (hook_head_index={head}), which miStudio does not support")
    if raw.get("reshape_activations") == "hook_z":
        raise UserError(f"{folder} reads attention heads (hook_z), which miStudio does not hook")
    registry.check_activation_fn(raw, str(folder))
    if raw.get("finetuning_scaling_factor"):
        raise UserError(f"{folder} has a finetuning_scaling_factor, which miStudio does not apply; "
                        "fold it into W_dec and set it to false")
    hook = resolve(read_hook(folder))
    sae, cfg = load_saelens(folder)
    return sae, dataclasses.replace(cfg, hook_name=hook)


FORMAT = Format("saelens", markers=(WEIGHTS_FILENAME,), config_files=(CFG_FILENAME,), read_hook=read_hook,
                owns_config=owns_config, load=load)
