"""Gemma Scope (Google DeepMind): ``params.npz``, or Gemma Scope 2's ``params.safetensors``.

``params.npz`` holds ``W_enc [d_in, d_sae]``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``; encode is
ReLU(pre)·[pre > θ] with pre = x·W_enc + b_enc — *no* b_dec subtraction (the Gemma Scope tutorial,
and SAELens's gemma_2 loader sets apply_b_dec_to_input=False) → ``jumprelu``,
apply_b_dec_to_input=False.

The files do not name the hook; the release layout does:
``gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz``: ``res`` → resid_post, ``mlp`` →
mlp_out (Gemma 2's MLP output after its post-norm, which is our hook_mlp_out). ``att`` SAEs read
the per-head attention output before o_proj (TransformerLens hook_z, d_in = n_heads·d_head), not
attn_out, and transcoders predict one site from another: both refused. Gemma Scope 2 folders
(``resid_post/layer_12_width_16k_l0_medium/params.safetensors``, lowercase ``w_enc``/``w_dec``, and a
``config.json`` naming the Hugging Face module read) are read the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from core.errors import UserError
from core.formats.base import Format, Resolve
from core.formats.readers import float32, read_json_object, read_npz, read_safetensors
from core.formats.saelens import sae_from_tensors
from core.sae import SAE, JumpReLUConfig, SAEConfig

_RELEASE = re.compile(r"gemma-scope-(?!2-)(\d+b)-(pt|it)-(res|mlp|att|transcoders)(?![a-z])")
_RELEASE_2 = re.compile(r"gemma-scope-2-([\w.]+?)-(pt|it)(?![a-z])")
_LAYER = re.compile(r"^layer_(\d+)(?:_|$)")
_WIDTH = re.compile(r"width_(\d+)([km])(?:_|$)")
_POINT_2 = re.compile(r"layers\.(\d+)\.(output|post_feedforward_layernorm\.output|self_attn\.o_proj\.input)$")
_POINT_2_SITE = {"output": "resid_post", "post_feedforward_layernorm.output": "mlp_out",
                 "self_attn.o_proj.input": "hook_z"}


def _params_file(folder: Path) -> Path:
    for name in ("params.npz", "params.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder / 'params.npz'} is missing; a Gemma Scope SAE folder holds params.npz")


def _site(folder: Path) -> tuple[int | None, str, str]:
    """(layer, site, model name) of a Gemma Scope SAE from its release layout (and Gemma Scope 2's
    config.json). site is resid_post / mlp_out (ours), or hook_z / transcoder / embedding (not
    ours), or "" when nothing says."""
    parts = Path(os.path.abspath(folder)).parts
    # The release (a Hugging Face repo name, maybe inside a hub-cache folder name) may be any
    # ancestor; the layout folders below it are the last three parts.
    site, model = "", ""
    for part in parts:
        if m := _RELEASE.search(part):
            size, variant, kind = m.groups()
            site = {"res": "resid_post", "mlp": "mlp_out", "att": "hook_z", "transcoders": "transcoder"}[kind]
            model = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
        elif m := _RELEASE_2.search(part):
            model = f"gemma-3-{m.group(1)}-{m.group(2)}"
    layer = None
    for part in parts[-3:]:
        if m := _LAYER.match(part):
            layer = int(m.group(1))
        elif part in ("resid_post", "mlp_out"):  # Gemma Scope 2: <release>/resid_post/layer_9_width_16k_l0_small
            site = part
        elif part == "attn_out":
            site = "hook_z"  # Gemma Scope 2's attn_out SAEs read o_proj's input, like Gemma Scope's att ones
        elif part.startswith(("transcoder", "clt")):
            site = "transcoder"
        elif part == "embedding":
            site = "embedding"
    config = folder / "config.json"
    if config.is_file():  # Gemma Scope 2 names the Hugging Face module it read
        raw = read_json_object(config)
        point = raw.get("hf_hook_point_in")
        if raw.get("hf_hook_point_out"):
            site = "transcoder"
        elif isinstance(point, str) and (m := _POINT_2.search(point)):
            layer, site = int(m.group(1)), _POINT_2_SITE[m.group(2)]
    return layer, site, model


def read_hook(folder: Path) -> str:
    layer, site, _ = _site(folder)
    if site == "embedding":
        return "hook_embed"
    if layer is None:
        return ""
    if site == "hook_z":
        return f"blocks.{layer}.attn.hook_z"
    if site in ("resid_post", "mlp_out"):
        return f"blocks.{layer}.hook_{site}"
    return ""


def load(folder: Path, resolve: Resolve) -> tuple[SAE, SAEConfig]:
    path = _params_file(folder)
    _, site, model = _site(folder)
    if site == "transcoder":
        raise UserError(f"{folder} is a Gemma Scope transcoder (it predicts the MLP output from its input), "
                        "which miStudio cannot represent; import a residual or MLP SAE")
    if site == "hook_z":
        raise UserError(f"{folder} is a Gemma Scope attention SAE: it reads the per-head attention output before "
                        "o_proj (hook_z, d_in = n_heads*d_head), not hook_attn_out, and miStudio does not hook it")
    if site == "embedding":
        raise UserError(f"{folder} is a Gemma Scope embedding SAE (scaled token embeddings), which miStudio "
                        "does not hook")
    hook = resolve(read_hook(folder))
    if (folder / "config.json").is_file():
        arch = read_json_object(folder / "config.json").get("architecture", "jump_relu")
        if arch != "jump_relu":
            raise UserError(f"{folder / 'config.json'} says architecture '{arch}'; Gemma Scope SAEs are jump_relu")
    raw = read_npz(path) if path.suffix == ".npz" else float32(read_safetensors(path))
    if "affine_skip_connection" in raw:
        raise UserError(f"{path} holds a skip connection (a transcoder), which miStudio cannot represent")
    # Gemma Scope 2 writes w_enc / w_dec; Gemma Scope writes W_enc / W_dec.
    tensors = {("W_" + key[2:] if key.startswith("w_") else key): value for key, value in raw.items()}
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise UserError(f"{path} has a scaling_factor other than 1, which miStudio does not apply; "
                        "fold it into W_dec first")
    if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
        raise UserError(f"{path} lacks a 2-D W_enc (it holds {', '.join(sorted(raw))}); download it again")
    d_in, d_sae = tensors["W_enc"].shape
    width = _WIDTH.search(folder.name) or _WIDTH.search(folder.parent.name)
    if width:
        n, unit = int(width.group(1)), width.group(2)
        if d_sae // (1000 if unit == "k" else 1_000_000) != n:
            raise UserError(f"{path} has {d_sae} latents but its folder says width_{n}{unit}; "
                            "the files are from different SAEs, download them again")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, type_config=JumpReLUConfig(), apply_b_dec_to_input=False,
                    hook_name=hook, model_name=model, prepend_bos=True)
    return sae_from_tensors(cfg, tensors, str(path)), cfg


def owns_config(folder: Path) -> bool:
    """Never: a Gemma Scope folder without its weights file has nothing else that marks it."""
    return False


FORMAT = Format("gemma_scope", markers=("params.npz", "params.safetensors"), config_files=("config.json",),
                read_hook=read_hook, owns_config=owns_config, load=load)
