"""sparsify (EleutherAI): one folder per hookpoint.

A folder holds ``cfg.json`` (d_in, k, num_latents or expansion_factor, ...) + ``sae.safetensors``
(``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``); the run's
training config (model, dataset, ctx_len) is ``config.json`` one folder up. sparsify encodes
TopK(ReLU((x − b_dec)·encoder.weightᵀ + encoder.bias)) — our ``topk`` exactly.

Refused: transcoders (they read a module's input, skip b_dec, and predict its output), skip
connections, the ``groupmax`` activation and legacy ``signed`` SAEs.

Hookpoints are module names under the HF base model: ``layers.6`` / ``h.6`` is the block output
(blocks.6.hook_resid_post), ``layers.6.mlp`` → hook_mlp_out, ``layers.6.self_attn`` / ``h.6.attn`` →
hook_attn_out. Those sublayer modules' outputs are our sites except where a post-sublayer norm
follows them (Gemma 2/3), which we refuse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.formats.base import Format, Resolve
from core.formats.readers import check_shapes, float32, int_field, need, read_json, read_json_object, read_safetensors
from core.formats.saelens import sae_from_tensors
from core.sae import SAE, SAEConfig, TopKConfig

_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)[._](\d+)(?:\.([A-Za-z_]+))?$")
_SUBLAYER_SITES = {"mlp": "mlp_out", "feed_forward": "mlp_out", "ffn": "mlp_out",
                   "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out", "self_attention": "attn_out"}
# Families whose sublayer output goes through a post-sublayer norm before the residual add.
_POST_NORM_FAMILIES = re.compile(r"gemma[-_]?[23]", re.IGNORECASE)


def _run_config(folder: Path) -> dict[str, Any]:
    path = folder.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}  # the run's training config only adds metadata
    return raw if isinstance(raw, dict) else {}


def read_hook(folder: Path) -> str:
    m = _HOOKPOINT.match(folder.name)
    if m is None:
        return ""
    layer, sub = int(m.group(1)), m.group(2)
    if sub is None:
        return f"blocks.{layer}.hook_resid_post"
    site = _SUBLAYER_SITES.get(sub)
    if site is None:
        return ""  # e.g. layers.6.mlp.act: inside a sublayer, no site of ours
    return f"blocks.{layer}.hook_{site}"


def owns_config(folder: Path) -> bool:
    """A cfg.json with sparsify's size fields (and no d_sae, which SAELens's claims first)."""
    path = folder / "cfg.json"
    raw = read_json(path) if path.is_file() else None
    return isinstance(raw, dict) and bool({"k", "num_latents", "expansion_factor"} & raw.keys())


def load(folder: Path, resolve: Resolve) -> tuple[SAE, SAEConfig]:
    cfg_path = need(folder / "cfg.json", "a sparsify SAE folder needs cfg.json and sae.safetensors")
    weights_path = need(folder / "sae.safetensors", "a sparsify SAE folder needs cfg.json and sae.safetensors")
    raw = read_json_object(cfg_path)
    if "d_in" not in raw:
        raise UserError(f"{cfg_path} lacks d_in; sparsify writes it next to the SparseCoderConfig fields")
    for flag, what in (("transcode", "a transcoder (it predicts a module's output from its input)"),
                       ("skip_connection", "a skip-connection SAE (W_skip)"),
                       ("signed", "a legacy signed SAE (it keeps negative activations)")):
        if raw.get(flag):
            raise UserError(f"{folder} is {what}, which miStudio cannot represent; import a plain sparsify SAE")
    if raw.get("activation", "topk") != "topk":
        raise UserError(f"{folder} uses the '{raw.get('activation')}' activation; miStudio loads sparsify's topk SAEs")
    d_in = int_field(raw, "d_in", None, cfg_path)
    num_latents = int_field(raw, "num_latents", 0, cfg_path)
    d_sae = num_latents or d_in * int_field(raw, "expansion_factor", 32, cfg_path)
    k = int_field(raw, "k", 32, cfg_path)

    stated = read_hook(folder)
    run = _run_config(folder)
    model = str(run.get("model") or "")
    if stated and not stated.endswith("resid_post") and _POST_NORM_FAMILIES.search(model):
        raise UserError(f"{folder} reads the {folder.name} module of {model}, whose output passes a "
                        f"post-sublayer norm before the residual add, so it is not miStudio's {stated}; "
                        "retrain on the norm's output")
    hook = resolve(stated)

    tensors = read_safetensors(weights_path)
    implied = f"cfg.json (d_in={d_in}, d_sae={d_sae})"
    check_shapes(weights_path, tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                         "W_dec": (d_sae, d_in), "b_dec": (d_in,)}, implied)
    if "W_skip" in tensors:
        raise UserError(f"{weights_path} holds a skip connection (W_skip), which miStudio cannot represent")
    t = float32(tensors)
    mapped = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
              "b_dec": t["b_dec"]}
    ctx_len = run.get("ctx_len")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, type_config=TopKConfig(k=k), hook_name=hook, model_name=model,
                    dataset_path=str(run.get("dataset") or ""),
                    context_size=ctx_len if isinstance(ctx_len, int) and not isinstance(ctx_len, bool) else 0)
    return sae_from_tensors(cfg, mapped, str(weights_path)), cfg


FORMAT = Format("sparsify", markers=("sae.safetensors",), config_files=("cfg.json",), read_hook=read_hook,
                owns_config=owns_config, load=load)
