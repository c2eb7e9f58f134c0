"""Sparse autoencoders: one file per type behind one interface, and the SAELens folder.

Types (SAELens names): `standard` (ReLU + L1), `topk` (TopK + AuxK), `jumprelu` (JumpReLU,
straight-through threshold), and `batchtopk`, which trains as BatchTopK and is saved as
`jumprelu` with its learned global threshold. Each type file registers itself with
`core.sae.registry` and carries its own config dataclass; adding a type is adding a file and
importing it below.

A SAELens SAE folder is `cfg.json` + `sae_weights.safetensors` holding `W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]` (+ `threshold [d_sae]` for JumpReLU).
We write the v6 layout (run metadata under `metadata`) so SAELens loads our exports unchanged
and gives the same encodings, and we read the older flat layout too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.errors import UserError
from core.io import atomic_dir
from core.sae import registry
from core.sae.base import SAE, SAEConfig, SAETypeConfig, StepContext, StepOut
from core.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from core.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from core.sae.registry import build_sae
from core.sae.standard import StandardConfig, StandardSAE
from core.sae.topk import TopKConfig, TopKSAE

__all__ = ["SAE", "SAEConfig", "SAETypeConfig", "StepContext", "StepOut", "registry", "StandardSAE",
           "StandardConfig", "TopKSAE", "TopKConfig", "JumpReLUSAE", "JumpReLUConfig", "BatchTopKSAE",
           "BatchTopKConfig", "build_sae", "save_saelens", "load_saelens", "sae_from_tensors"]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

def save_saelens(sae: SAE, cfg: SAEConfig, folder: str | os.PathLike) -> Path:
    """Write `folder` (atomically) as a SAELens folder: cfg.json + sae_weights.safetensors."""
    sae = sae.to_inference()
    got = (sae.architecture, sae.d_in, sae.d_sae, sae.type_config.cfg_json())
    want = (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.type_config.cfg_json())
    if got != want:
        raise UserError(f"SAEConfig (architecture, d_in, d_sae, type settings) = {want} does not match the SAE's "
                        f"{got}; build the config with sae.config(...)")
    tensors = {name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous() for name in sae.TENSOR_NAMES}
    cfg_json = cfg.to_cfg_json() | {"dtype": "float32", "apply_b_dec_to_input": sae.apply_b_dec_to_input}
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
    cfg = SAEConfig.from_cfg_json(raw)
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
    sae = cls.from_config(cfg)  # checks the type's knobs against d_sae
    with torch.no_grad():
        for name in cls.TENSOR_NAMES:
            getattr(sae, name).copy_(tensors[name].to(torch.float32))
    return sae
