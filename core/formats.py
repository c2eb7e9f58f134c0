"""SAEs in the field's formats: find and import them; export SAELens folders.

Every importer maps its tensors to SAELens names and builds the SAE with `sae_from_tensors`,
so every format gets the same shape and NaN checks, and the imported SAE reproduces the
*source project's own* encoder (checked against each project's code; tests/test_formats.py
re-derives each forward pass from that project's published math):

* ``saelens`` — ``cfg.json`` + ``sae_weights.safetensors``, the v6 layout or the older flat
  one (`core.sae.load_saelens`). Refused: hook_z / per-head SAEs, a ``finetuning_scaling_factor``,
  activation functions other than ReLU/TopK.
* ``sparsify`` (EleutherAI) — one folder per hookpoint: ``cfg.json`` (d_in, k, num_latents or
  expansion_factor, ...) + ``sae.safetensors`` (``encoder.weight [d_sae, d_in]``, ``encoder.bias``,
  ``W_dec [d_sae, d_in]``, ``b_dec``). sparsify encodes TopK(ReLU((x − b_dec)·encoder.weightᵀ +
  encoder.bias)) — our ``topk`` exactly. Refused: transcoders (they read a module's input, skip
  b_dec, and predict its output), skip connections, the ``groupmax`` activation and legacy
  ``signed`` SAEs. Hookpoints are module names under the HF base model: ``layers.6`` / ``h.6`` is
  the block output (blocks.6.hook_resid_post), ``layers.6.mlp`` → hook_mlp_out,
  ``layers.6.self_attn`` / ``h.6.attn`` → hook_attn_out. Those sublayer modules' outputs are our
  sites except where a post-sublayer norm follows them (Gemma 2/3), which we refuse.
* ``dictionary_learning`` (saprmarks) — ``trainer_N/ae.pt`` (a state dict; loaded with
  ``weights_only=True`` only) + ``config.json`` (``trainer.dict_class``, ``layer``,
  ``submodule_name`` like ``resid_post_layer_3``, ``lm_name``). What their loaders' default
  ``encode`` computes, per dict_class:
    - AutoEncoder: ReLU((x − bias)·encoderᵀ + b); their ``from_pretrained`` folds the decoder column
      norms into the encoder by default and so do we → ``standard``.
    - AutoEncoderNew: ReLU(x·encoderᵀ + b), decoder with its own bias → ``standard`` without b_dec
      subtraction.
    - AutoEncoderTopK: TopK(ReLU(...)) per token (the stored threshold is unused by default) → ``topk``.
    - BatchTopKSAE / MatryoshkaBatchTopKSAE: at inference ReLU(pre)·[ReLU(pre) > θ] with one
      learned scalar θ → ``jumprelu`` with θ for every latent (θ < 0, i.e. never set, is plain ReLU).
    - JumpReluAutoEncoder: ReLU(pre·[pre > θ]) on x *without* b_dec subtraction → ``jumprelu``,
      apply_b_dec_to_input=False.
    - GatedAutoEncoder and anything else: refused.
* ``gemma_scope`` (Google DeepMind) — ``params.npz`` with ``W_enc [d_in, d_sae]``, ``W_dec``,
  ``b_enc``, ``b_dec``, ``threshold``; encode is ReLU(pre)·[pre > θ] with pre = x·W_enc + b_enc —
  *no* b_dec subtraction (the Gemma Scope tutorial, and SAELens's gemma_2 loader sets
  apply_b_dec_to_input=False) → ``jumprelu``, apply_b_dec_to_input=False. The hook comes from the
  release layout ``gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz``: ``res`` →
  resid_post, ``mlp`` → mlp_out (Gemma 2's MLP output after its post-norm, which is our
  hook_mlp_out). ``att`` SAEs read the per-head attention output before o_proj (TransformerLens
  hook_z, d_in = n_heads·d_head), not attn_out, and transcoders predict one site from another:
  both refused. Gemma Scope 2 folders (``resid_post/layer_12_width_16k_l0_medium/params.safetensors``,
  lowercase ``w_enc``/``w_dec``) are read the same way.

JumpReLU thresholds are clamped at 0 on import: ReLU(pre)·[pre > θ] (SAELens, Gemma Scope,
dictionary_learning) equals our pre·[pre > max(θ, 0)] for every θ.

The hook site must be known: from the files, or the ``hook_name`` argument when the files do not
say. A ``hook_name`` that contradicts the files is refused rather than silently believed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import UserError
from core.hooks import SITES, parse_hook_name
from core.sae import (SAE, JumpReLUConfig, SAEConfig, StandardConfig, TopKConfig, load_saelens, sae_from_tensors,
                      save_saelens)

__all__ = ["FORMATS", "FoundSAE", "find_saes", "detect_format", "import_sae", "export_saelens", "open_source"]

FORMATS = ("saelens", "sparsify", "dictionary_learning", "gemma_scope")

# The file whose presence marks a folder as an SAE of each format (the first that matches wins).
_MARKERS = (
    ("sae_weights.safetensors", "saelens"),
    ("sae.safetensors", "sparsify"),
    ("ae.pt", "dictionary_learning"),
    ("params.npz", "gemma_scope"),
    ("params.safetensors", "gemma_scope"),
)
_FILE_FORMATS = dict(_MARKERS) | {"cfg.json": "", "config.json": ""}
_MAX_DEPTH = 8  # a Gemma Scope release is 3 deep, dictionary_learning's pretrained set 4
_HOOK_EXAMPLE = "blocks.6.hook_resid_post"
_Resolve = Callable[[str], str]
"""An importer calls it with the hook the files name ("" when they do not) before loading weights."""


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
    for name, fmt in _MARKERS:
        if (folder / name).is_file():
            return fmt
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
        hook = _HOOK_READERS[fmt](folder)
    except UserError:
        hook = ""  # an unreadable config shows up when that SAE is imported
    return FoundSAE(folder, fmt, hook)


def detect_format(path: str | os.PathLike) -> str:
    """The format of the one SAE at `path` (its folder or one of its files)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; point at an SAE folder")
    if path.is_file():
        if path.name not in _FILE_FORMATS:
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
    if (folder / "cfg.json").is_file():
        raw = _read_json(folder / "cfg.json")
        if isinstance(raw, dict) and "d_sae" in raw:
            return "saelens"
        if isinstance(raw, dict) and ({"k", "num_latents", "expansion_factor"} & raw.keys()):
            return "sparsify"
    if (folder / "config.json").is_file():
        raw = _read_json(folder / "config.json")
        if isinstance(raw, dict) and isinstance(raw.get("trainer"), dict):
            return "dictionary_learning"
    return ""


# ---------------------------------------------------------------------------------- sources

_ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.=-]+)*$")


def open_source(source: str, workdir: str | os.PathLike) -> Path:
    """A local path holding the SAE(s) named by `source`: a folder or file as it is; a .zip or
    .tar(.gz) archive unpacked into `workdir`; else a Hugging Face repo id, optionally with a
    subfolder ("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"), downloaded
    (only that subfolder) into `workdir`."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and source.lower().endswith(_ARCHIVES):
            return _unpack(path, Path(workdir))
        return path
    if not _HUB_ID.match(source):
        raise UserError(f"{source} is neither an existing path nor a Hugging Face repo id (owner/name[/subfolder]); "
                        "check the path")
    return _download(source, Path(workdir))


def _unpack(archive: Path, workdir: Path) -> Path:
    out = workdir / "unpacked"
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():  # nothing may land outside `out`
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise UserError(f"{archive.name} holds an unsafe path {name!r}; refusing to unpack it")
                z.extractall(out)
        else:
            with tarfile.open(archive) as t:
                t.extractall(out, filter="data")  # refuses links out, absolute paths and devices
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{archive.name} cannot be unpacked ({type(e).__name__}: {e}); check the archive") from None
    return out


def _download(source: str, workdir: Path) -> Path:
    from huggingface_hub import snapshot_download

    owner, name, *sub = source.split("/")
    subfolder = "/".join(sub)
    try:
        root = snapshot_download(f"{owner}/{name}", local_dir=workdir / "hub",
                                 allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except Exception as e:  # noqa: BLE001 — offline, unknown repo, gated: all one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"could not download {owner}/{name} from the Hugging Face Hub ({first}); check the id, "
                        "the network, or HF_TOKEN for a gated repo") from None
    path = Path(root) / subfolder
    if not path.exists():
        raise UserError(f"{owner}/{name} has no folder {subfolder!r}; check the path inside the repo")
    return path


# ---------------------------------------------------------------------------------- import


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
    sae, cfg = _IMPORTERS[format](folder, lambda stated: _resolve_hook(folder, stated, hook_name))
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


# ---------------------------------------------------------------------------------- file readers


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path} is missing; {what}")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is not valid JSON ({_one_line(e)}); re-save the SAE") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a JSON object; re-save the SAE")
    return raw


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({_one_line(e)}); "
                        "download or save it again") from None


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as e:
        raise UserError(f"{path} is not a readable .npz file ({_one_line(e)}); download it again") from None
    for key, array in arrays.items():
        if not np.issubdtype(array.dtype, np.number):
            raise UserError(f"{path}: array {key} has dtype {array.dtype}, not numbers; download it again")
    return {key: torch.from_numpy(array.astype(np.float32, copy=False)) for key, array in arrays.items()}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain PyTorch state dict, unpickled with weights_only=True (no arbitrary code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means "not a usable file"
        raise UserError(f"{path} is not a readable PyTorch state dict ({_one_line(e)}); "
                        "download or save it again") from None
    if isinstance(obj, dict) and {"ae", "optimizer"} <= obj.keys():
        raise UserError(f"{path} is a mid-training backup (biases still in training units), not a finished SAE; "
                        "use the ae.pt written at the end of training")
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path} is not a plain state dict of named tensors; save the SAE with "
                        "torch.save(ae.state_dict(), path)")
    return dict(obj)


def _check_shapes(source: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  implied_by: str) -> None:
    """Tensors under their own project's names: present, and shaped as the config implies."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise UserError(f"{source} lacks tensor(s) {', '.join(missing)}; it holds {', '.join(sorted(tensors))}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{name} in {source} has shape {list(tensors[name].shape)} but {implied_by} implies "
                            f"{list(shape)}; the config and the weights disagree, re-save the SAE")


def _int(raw: dict[str, Any], key: str, default: Any, source: Path) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise UserError(f"{source}: '{key}' must be an integer (got {value!r}); fix the config")
    return int(value)


def _float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to(torch.float32) for name, t in tensors.items()}


# ---------------------------------------------------------------------------------- SAELens


def _saelens_hook(folder: Path) -> str:
    raw = _read_json_object(_need(folder / "cfg.json", "a SAELens SAE folder needs cfg.json"))
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    return str(meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "")


def _import_saelens(folder: Path, resolve: _Resolve) -> tuple[SAE, SAEConfig]:
    raw = _read_json_object(_need(folder / "cfg.json",
                                  "a SAELens SAE folder needs cfg.json and sae_weights.safetensors"))
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    head = meta.get("hook_head_index", raw.get("hook_head_index", raw.get("hook_point_head_index")))
    if head is not None:
        raise UserError(f"{folder} is a per-head SAE (hook_head_index={head}), which miStudio does not support")
    if raw.get("reshape_activations") == "hook_z":
        raise UserError(f"{folder} reads attention heads (hook_z), which miStudio does not hook")
    activation = raw.get("activation_fn_str", raw.get("activation_fn"))
    if activation not in (None, "relu", "topk"):
        raise UserError(f"{folder} uses activation '{activation}'; miStudio loads ReLU, TopK and JumpReLU SAEs")
    if raw.get("finetuning_scaling_factor"):
        raise UserError(f"{folder} has a finetuning_scaling_factor, which miStudio does not apply; "
                        "fold it into W_dec and set it to false")
    hook = resolve(_saelens_hook(folder))
    sae, cfg = load_saelens(folder)
    return sae, dataclasses.replace(cfg, hook_name=hook)


# ---------------------------------------------------------------------------------- sparsify

_SPARSIFY_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)[._](\d+)(?:\.([A-Za-z_]+))?$")
_SUBLAYER_SITES = {"mlp": "mlp_out", "feed_forward": "mlp_out", "ffn": "mlp_out",
                   "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out", "self_attention": "attn_out"}
# Families whose sublayer output goes through a post-sublayer norm before the residual add.
_POST_NORM_FAMILIES = re.compile(r"gemma[-_]?[23]", re.IGNORECASE)


def _sparsify_run_config(folder: Path) -> dict[str, Any]:
    path = folder.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}  # the run's training config only adds metadata
    return raw if isinstance(raw, dict) else {}


def _sparsify_hook(folder: Path) -> str:
    m = _SPARSIFY_HOOKPOINT.match(folder.name)
    if m is None:
        return ""
    layer, sub = int(m.group(1)), m.group(2)
    if sub is None:
        return f"blocks.{layer}.hook_resid_post"
    site = _SUBLAYER_SITES.get(sub)
    if site is None:
        return ""  # e.g. layers.6.mlp.act: inside a sublayer, no site of ours
    return f"blocks.{layer}.hook_{site}"


def _import_sparsify(folder: Path, resolve: _Resolve) -> tuple[SAE, SAEConfig]:
    cfg_path = _need(folder / "cfg.json", "a sparsify SAE folder needs cfg.json and sae.safetensors")
    weights_path = _need(folder / "sae.safetensors", "a sparsify SAE folder needs cfg.json and sae.safetensors")
    raw = _read_json_object(cfg_path)
    if "d_in" not in raw:
        raise UserError(f"{cfg_path} lacks d_in; sparsify writes it next to the SparseCoderConfig fields")
    for flag, what in (("transcode", "a transcoder (it predicts a module's output from its input)"),
                       ("skip_connection", "a skip-connection SAE (W_skip)"),
                       ("signed", "a legacy signed SAE (it keeps negative activations)")):
        if raw.get(flag):
            raise UserError(f"{folder} is {what}, which miStudio cannot represent; import a plain sparsify SAE")
    if raw.get("activation", "topk") != "topk":
        raise UserError(f"{folder} uses the '{raw.get('activation')}' activation; miStudio loads sparsify's topk SAEs")
    d_in = _int(raw, "d_in", None, cfg_path)
    num_latents = _int(raw, "num_latents", 0, cfg_path)
    d_sae = num_latents or d_in * _int(raw, "expansion_factor", 32, cfg_path)
    k = _int(raw, "k", 32, cfg_path)

    stated = _sparsify_hook(folder)
    run = _sparsify_run_config(folder)
    model = str(run.get("model") or "")
    if stated and not stated.endswith("resid_post") and _POST_NORM_FAMILIES.search(model):
        raise UserError(f"{folder} reads the {folder.name} module of {model}, whose output passes a "
                        f"post-sublayer norm before the residual add, so it is not miStudio's {stated}; "
                        "retrain on the norm's output")
    hook = resolve(stated)

    tensors = _read_safetensors(weights_path)
    implied = f"cfg.json (d_in={d_in}, d_sae={d_sae})"
    _check_shapes(weights_path, tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                          "W_dec": (d_sae, d_in), "b_dec": (d_in,)}, implied)
    if "W_skip" in tensors:
        raise UserError(f"{weights_path} holds a skip connection (W_skip), which miStudio cannot represent")
    t = _float32(tensors)
    mapped = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
              "b_dec": t["b_dec"]}
    ctx_len = run.get("ctx_len")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, type_config=TopKConfig(k=k), hook_name=hook, model_name=model,
                    dataset_path=str(run.get("dataset") or ""),
                    context_size=ctx_len if isinstance(ctx_len, int) and not isinstance(ctx_len, bool) else 0)
    return sae_from_tensors(cfg, mapped, str(weights_path)), cfg


# ---------------------------------------------------------------------------------- dictionary_learning

_DL_SITE = {"resid_post": "resid_post", "resid_out": "resid_post", "resid_pre": "resid_pre",
            "mlp_out": "mlp_out", "mlp": "mlp_out", "attn_out": "attn_out", "attn": "attn_out"}
_DL_NAME = re.compile(r"^(" + "|".join(sorted(_DL_SITE, key=len, reverse=True)) + r")(?:_layer_?(\d+))?$")
# dict_class → the state-dict keys that identify it (for configs that do not name the class).
_DL_KEYS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
    "GatedAutoEncoder": {"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"},
}


def _dl_trainer(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    raw = _read_json_object(path)
    trainer = raw.get("trainer", {})
    if not isinstance(trainer, dict):
        raise UserError(f"{path}: 'trainer' is not an object; re-save the SAE")
    return trainer


def _dl_hook_from_names(names: list[str], layer: Any) -> str:
    for name in names:
        m = _DL_NAME.match(name or "")
        if m is None:
            continue
        number = m.group(2) if m.group(2) is not None else layer
        if isinstance(number, (int, str)) and str(number).isdigit():
            return f"blocks.{int(number)}.hook_{_DL_SITE[m.group(1)]}"
    return ""


def _dl_hook(folder: Path) -> str:
    trainer = _dl_trainer(folder)
    submodule = trainer.get("submodule_name")
    # The run's submodule name first (resid_post_layer_3), then the pretrained sets' folder names
    # (dictionaries/pythia-70m-deduped/resid_out_layer3/10_32768).
    names = ([submodule] if isinstance(submodule, str) else []) + [folder.name, folder.parent.name]
    return _dl_hook_from_names(names, trainer.get("layer"))


def _dl_class(trainer: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> str:
    named = trainer.get("dict_class")
    if isinstance(named, str) and named:
        return named
    keys = set(tensors)
    for cls, needed in _DL_KEYS.items():
        if keys == needed:
            return cls
    if keys == {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}:
        raise UserError(f"{path} may be an AutoEncoderTopK or a BatchTopKSAE and no config.json says which; "
                        "add config.json with trainer.dict_class")
    raise UserError(f"cannot tell the dictionary_learning class of {path} (tensors {', '.join(sorted(keys))}); "
                    "add config.json with trainer.dict_class")


def _import_dictionary_learning(folder: Path, resolve: _Resolve) -> tuple[SAE, SAEConfig]:
    weights_path = _need(folder / "ae.pt", "a dictionary_learning SAE folder needs ae.pt (and config.json)")
    trainer = _dl_trainer(folder)
    hook = resolve(_dl_hook(folder))
    tensors = _read_state_dict(weights_path)
    dict_class = _dl_class(trainer, tensors, weights_path)
    if dict_class == "GatedAutoEncoder":
        raise UserError(f"{folder} holds a gated SAE (GatedAutoEncoder), which miStudio does not load; "
                        "it loads ReLU, TopK and JumpReLU SAEs")
    if dict_class in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"):
        if "encoder.weight" not in tensors or tensors["encoder.weight"].ndim != 2:
            raise UserError(f"{weights_path} lacks a 2-D encoder.weight, which a {dict_class} has; "
                            "check trainer.dict_class in config.json")
        d_sae, d_in = tensors["encoder.weight"].shape
    elif dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
            raise UserError(f"{weights_path} lacks a 2-D W_enc, which a {dict_class} has; "
                            "check trainer.dict_class in config.json")
        d_in, d_sae = tensors["W_enc"].shape
    else:
        raise UserError(f"{folder} holds a dictionary_learning {dict_class}, which miStudio does not load; it loads "
                        "AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE "
                        "and JumpReluAutoEncoder")
    # The config's sizes, where it gives them, must agree with the tensors.
    d_in = _int(trainer, "activation_dim", d_in, folder / "config.json")
    d_sae = _int(trainer, "dict_size", d_sae, folder / "config.json")
    implied = f"config.json (activation_dim={d_in}, dict_size={d_sae})"
    t = _float32(tensors)
    if dict_class == "AutoEncoder":
        _check_shapes(weights_path, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                        "decoder.weight": (d_in, d_sae), "bias": (d_in,)}, implied)
        # AutoEncoder.from_pretrained(normalize_decoder=True), their default: unit decoder columns,
        # the norms folded into the encoder (same reconstruction, rescaled features).
        norms = t["decoder.weight"].norm(dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        mapped = {"W_enc": (t["encoder.weight"] * norms[:, None]).T.contiguous(), "b_enc": t["encoder.bias"] * norms,
                  "W_dec": (t["decoder.weight"] / norms).T.contiguous(), "b_dec": t["bias"]}
        type_config, apply_b_dec = StandardConfig(), True
    elif dict_class == "AutoEncoderNew":
        _check_shapes(weights_path, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                        "decoder.weight": (d_in, d_sae), "decoder.bias": (d_in,)}, implied)
        mapped = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"],
                  "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["decoder.bias"]}
        type_config, apply_b_dec = StandardConfig(), False
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        _check_shapes(weights_path, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                        "decoder.weight": (d_in, d_sae), "b_dec": (d_in,)}, implied)
        mapped = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"],
                  "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["b_dec"]}
        apply_b_dec = True
        if dict_class == "AutoEncoderTopK":
            type_config = TopKConfig(k=_dl_k(trainer, tensors, weights_path))
        else:
            type_config = JumpReLUConfig()
            mapped["threshold"] = _scalar_threshold(tensors, weights_path, d_sae)
    elif dict_class == "MatryoshkaBatchTopKSAE":
        _check_shapes(weights_path, t, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                        "b_dec": (d_in,)}, implied)
        mapped = {name: t[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        mapped["threshold"] = _scalar_threshold(tensors, weights_path, d_sae)
        type_config, apply_b_dec = JumpReLUConfig(), True
    else:  # JumpReluAutoEncoder: apply_b_dec_to_input is a plain attribute, False unless set by hand
        _check_shapes(weights_path, t, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                        "b_dec": (d_in,), "threshold": (d_sae,)}, implied)
        mapped = {name: t[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        type_config, apply_b_dec = JumpReLUConfig(), False
    lm_name = trainer.get("lm_name")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, type_config=type_config, apply_b_dec_to_input=apply_b_dec,
                    hook_name=hook, model_name=lm_name if isinstance(lm_name, str) else "")
    return sae_from_tensors(cfg, mapped, str(weights_path)), cfg


def _dl_k(trainer: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> int:
    stored = tensors.get("k")
    if stored is not None and stored.numel() != 1:
        raise UserError(f"{path}: k should be a single number but has shape {list(stored.shape)}; re-save the SAE")
    if "k" in trainer:
        k = _int(trainer, "k", None, path.parent / "config.json")
        if stored is not None and int(stored.item()) != k:
            raise UserError(f"config.json says k={k} but {path} stores k={int(stored.item())}; the config and the "
                            "weights disagree, re-save the SAE")
        return k
    if stored is None:
        raise UserError(f"{path} has no k and config.json gives none; add trainer.k to config.json")
    return int(stored.item())


def _scalar_threshold(tensors: dict[str, torch.Tensor], path: Path, d_sae: int) -> torch.Tensor:
    """BatchTopK's single learned threshold as a per-latent JumpReLU threshold; a threshold
    never set (−1) makes their encode a plain ReLU, which threshold 0 reproduces."""
    theta = tensors.get("threshold")
    if theta is None or theta.numel() != 1:
        raise UserError(f"{path} lacks the scalar threshold a BatchTopK SAE uses at inference; re-save the SAE")
    return torch.full((d_sae,), max(float(theta.item()), 0.0))


# ---------------------------------------------------------------------------------- Gemma Scope

_GS_RELEASE = re.compile(r"gemma-scope-(?!2-)(\d+b)-(pt|it)-(res|mlp|att|transcoders)(?![a-z])")
_GS2_RELEASE = re.compile(r"gemma-scope-2-([\w.]+?)-(pt|it)(?![a-z])")
_GS_LAYER = re.compile(r"^layer_(\d+)(?:_|$)")
_GS_WIDTH = re.compile(r"width_(\d+)([km])(?:_|$)")
_GS2_POINT = re.compile(r"layers\.(\d+)\.(output|post_feedforward_layernorm\.output|self_attn\.o_proj\.input)$")
_GS2_POINT_SITE = {"output": "resid_post", "post_feedforward_layernorm.output": "mlp_out",
                   "self_attn.o_proj.input": "hook_z"}


def _gs_file(folder: Path) -> Path:
    for name in ("params.npz", "params.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder / 'params.npz'} is missing; a Gemma Scope SAE folder holds params.npz")


def _gs_site(folder: Path) -> tuple[int | None, str, str]:
    """(layer, site, model name) of a Gemma Scope SAE from its release layout (and Gemma Scope 2's
    config.json). site is resid_post / mlp_out (ours), or hook_z / transcoder / embedding (not
    ours), or "" when nothing says."""
    parts = Path(os.path.abspath(folder)).parts
    # The release (a Hugging Face repo name, maybe inside a hub-cache folder name) may be any
    # ancestor; the layout folders below it are the last three parts.
    site, model = "", ""
    for part in parts:
        if m := _GS_RELEASE.search(part):
            size, variant, kind = m.groups()
            site = {"res": "resid_post", "mlp": "mlp_out", "att": "hook_z", "transcoders": "transcoder"}[kind]
            model = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
        elif m := _GS2_RELEASE.search(part):
            model = f"gemma-3-{m.group(1)}-{m.group(2)}"
    layer = None
    for part in parts[-3:]:
        if m := _GS_LAYER.match(part):
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
        raw = _read_json_object(config)
        point = raw.get("hf_hook_point_in")
        if raw.get("hf_hook_point_out"):
            site = "transcoder"
        elif isinstance(point, str) and (m := _GS2_POINT.search(point)):
            layer, site = int(m.group(1)), _GS2_POINT_SITE[m.group(2)]
    return layer, site, model


def _gs_hook(folder: Path) -> str:
    layer, site, _ = _gs_site(folder)
    if site == "embedding":
        return "hook_embed"
    if layer is None:
        return ""
    if site == "hook_z":
        return f"blocks.{layer}.attn.hook_z"
    if site in ("resid_post", "mlp_out"):
        return f"blocks.{layer}.hook_{site}"
    return ""


def _import_gemma_scope(folder: Path, resolve: _Resolve) -> tuple[SAE, SAEConfig]:
    path = _gs_file(folder)
    _, site, model = _gs_site(folder)
    if site == "transcoder":
        raise UserError(f"{folder} is a Gemma Scope transcoder (it predicts the MLP output from its input), "
                        "which miStudio cannot represent; import a residual or MLP SAE")
    if site == "hook_z":
        raise UserError(f"{folder} is a Gemma Scope attention SAE: it reads the per-head attention output before "
                        "o_proj (hook_z, d_in = n_heads*d_head), not hook_attn_out, and miStudio does not hook it")
    if site == "embedding":
        raise UserError(f"{folder} is a Gemma Scope embedding SAE (scaled token embeddings), which miStudio "
                        "does not hook")
    hook = resolve(_gs_hook(folder))
    if (folder / "config.json").is_file():
        arch = _read_json_object(folder / "config.json").get("architecture", "jump_relu")
        if arch != "jump_relu":
            raise UserError(f"{folder / 'config.json'} says architecture '{arch}'; Gemma Scope SAEs are jump_relu")
    raw = _read_npz(path) if path.suffix == ".npz" else _float32(_read_safetensors(path))
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
    width = _GS_WIDTH.search(folder.name) or _GS_WIDTH.search(folder.parent.name)
    if width:
        n, unit = int(width.group(1)), width.group(2)
        if d_sae // (1000 if unit == "k" else 1_000_000) != n:
            raise UserError(f"{path} has {d_sae} latents but its folder says width_{n}{unit}; "
                            "the files are from different SAEs, download them again")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, type_config=JumpReLUConfig(), apply_b_dec_to_input=False,
                    hook_name=hook, model_name=model, prepend_bos=True)
    return sae_from_tensors(cfg, tensors, str(path)), cfg


_IMPORTERS = {"saelens": _import_saelens, "sparsify": _import_sparsify,
              "dictionary_learning": _import_dictionary_learning, "gemma_scope": _import_gemma_scope}
_HOOK_READERS = {"saelens": _saelens_hook, "sparsify": _sparsify_hook, "dictionary_learning": _dl_hook,
                 "gemma_scope": _gs_hook}
