"""dictionary_learning (saprmarks): ``trainer_N/ae.pt`` + ``config.json``.

``ae.pt`` is a state dict, loaded with ``weights_only=True`` only; ``config.json`` names
``trainer.dict_class``, ``layer``, ``submodule_name`` (like ``resid_post_layer_3``) and ``lm_name``.
A run holds trainer_0/, trainer_1/, ...; the pretrained sets name the site in their folders
(dictionaries/pythia-70m-deduped/resid_out_layer3/10_32768). What their loaders' default
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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from core.errors import UserError
from core.formats.base import Format, Resolve
from core.formats.readers import check_shapes, float32, int_field, need, read_json, read_json_object, read_state_dict
from core.formats.saelens import sae_from_tensors
from core.sae import SAE, JumpReLUConfig, SAEConfig, SAETypeConfig, StandardConfig, TopKConfig

_SITE = {"resid_post": "resid_post", "resid_out": "resid_post", "resid_pre": "resid_pre",
         "mlp_out": "mlp_out", "mlp": "mlp_out", "attn_out": "attn_out", "attn": "attn_out"}
_NAME = re.compile(r"^(" + "|".join(sorted(_SITE, key=len, reverse=True)) + r")(?:_layer_?(\d+))?$")
# dict_class → the state-dict keys that identify it (for configs that do not name the class).
_KEYS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
    "GatedAutoEncoder": {"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"},
}


def _trainer(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    raw = read_json_object(path)
    trainer = raw.get("trainer", {})
    if not isinstance(trainer, dict):
        raise UserError(f"{path}: 'trainer' is not an object; re-save the SAE")
    return trainer


def _hook_from_names(names: list[str], layer: Any) -> str:
    for name in names:
        m = _NAME.match(name or "")
        if m is None:
            continue
        number = m.group(2) if m.group(2) is not None else layer
        if isinstance(number, (int, str)) and str(number).isdigit():
            return f"blocks.{int(number)}.hook_{_SITE[m.group(1)]}"
    return ""


def read_hook(folder: Path) -> str:
    trainer = _trainer(folder)
    submodule = trainer.get("submodule_name")
    # The run's submodule name first (resid_post_layer_3), then the pretrained sets' folder names
    # (dictionaries/pythia-70m-deduped/resid_out_layer3/10_32768).
    names = ([submodule] if isinstance(submodule, str) else []) + [folder.name, folder.parent.name]
    return _hook_from_names(names, trainer.get("layer"))


def _dict_class(trainer: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> str:
    named = trainer.get("dict_class")
    if isinstance(named, str) and named:
        return named
    keys = set(tensors)
    for cls, needed in _KEYS.items():
        if keys == needed:
            return cls
    if keys == {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}:
        raise UserError(f"{path} may be an AutoEncoderTopK or a BatchTopKSAE and no config.json says which; "
                        "add config.json with trainer.dict_class")
    raise UserError(f"cannot tell the dictionary_learning class of {path} (tensors {', '.join(sorted(keys))}); "
                    "add config.json with trainer.dict_class")


def owns_config(folder: Path) -> bool:
    """A config.json with a trainer block (Gemma Scope 2's config.json has none)."""
    path = folder / "config.json"
    raw = read_json(path) if path.is_file() else None
    return isinstance(raw, dict) and isinstance(raw.get("trainer"), dict)


def load(folder: Path, resolve: Resolve) -> tuple[SAE, SAEConfig]:
    weights_path = need(folder / "ae.pt", "a dictionary_learning SAE folder needs ae.pt (and config.json)")
    trainer = _trainer(folder)
    hook = resolve(read_hook(folder))
    tensors = read_state_dict(weights_path)
    dict_class = _dict_class(trainer, tensors, weights_path)
    d_in, d_sae = _tensor_sizes(dict_class, tensors, folder, weights_path)
    # The config's sizes, where it gives them, must agree with the tensors.
    d_in = int_field(trainer, "activation_dim", d_in, folder / "config.json")
    d_sae = int_field(trainer, "dict_size", d_sae, folder / "config.json")
    m = _to_saelens(dict_class, tensors, trainer, weights_path, d_in, d_sae)
    lm_name = trainer.get("lm_name")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, type_config=m.type_config, apply_b_dec_to_input=m.apply_b_dec,
                    hook_name=hook, model_name=lm_name if isinstance(lm_name, str) else "")
    return sae_from_tensors(cfg, m.tensors, str(weights_path)), cfg


def _tensor_sizes(dict_class: str, tensors: dict[str, torch.Tensor], folder: Path,
                  weights_path: Path) -> tuple[int, int]:
    """(d_in, d_sae) from the encoder of a class we load; other classes are refused here."""
    if dict_class == "GatedAutoEncoder":
        raise UserError(f"{folder} holds a gated SAE (GatedAutoEncoder), which miStudio does not load; "
                        "it loads ReLU, TopK and JumpReLU SAEs")
    if dict_class in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"):
        if "encoder.weight" not in tensors or tensors["encoder.weight"].ndim != 2:
            raise UserError(f"{weights_path} lacks a 2-D encoder.weight, which a {dict_class} has; "
                            "check trainer.dict_class in config.json")
        d_sae, d_in = tensors["encoder.weight"].shape
        return d_in, d_sae
    if dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
            raise UserError(f"{weights_path} lacks a 2-D W_enc, which a {dict_class} has; "
                            "check trainer.dict_class in config.json")
        d_in, d_sae = tensors["W_enc"].shape
        return d_in, d_sae
    raise UserError(f"{folder} holds a dictionary_learning {dict_class}, which miStudio does not load; it loads "
                    "AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE "
                    "and JumpReluAutoEncoder")


class _Mapped(NamedTuple):
    tensors: dict[str, torch.Tensor]
    """Under SAELens names."""
    type_config: SAETypeConfig
    """Our SAE type reproducing the class's encode."""
    apply_b_dec: bool


def _to_saelens(dict_class: str, tensors: dict[str, torch.Tensor], trainer: dict[str, Any], weights_path: Path,
                d_in: int, d_sae: int) -> _Mapped:
    """The SAE a `dict_class` state dict describes, as SAELens tensors reproducing their default encode.

    One branch per class, each checking its own tensor names and shapes; kept together so the
    five conventions can be read side by side.
    """
    implied = f"config.json (activation_dim={d_in}, dict_size={d_sae})"
    t = float32(tensors)
    if dict_class == "AutoEncoder":
        check_shapes(weights_path, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                       "decoder.weight": (d_in, d_sae), "bias": (d_in,)}, implied)
        # AutoEncoder.from_pretrained(normalize_decoder=True), their default: unit decoder columns,
        # the norms folded into the encoder (same reconstruction, rescaled features).
        norms = t["decoder.weight"].norm(dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        mapped = {"W_enc": (t["encoder.weight"] * norms[:, None]).T.contiguous(), "b_enc": t["encoder.bias"] * norms,
                  "W_dec": (t["decoder.weight"] / norms).T.contiguous(), "b_dec": t["bias"]}
        return _Mapped(mapped, StandardConfig(), True)
    if dict_class == "AutoEncoderNew":
        check_shapes(weights_path, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                       "decoder.weight": (d_in, d_sae), "decoder.bias": (d_in,)}, implied)
        mapped = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"],
                  "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["decoder.bias"]}
        return _Mapped(mapped, StandardConfig(), False)
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        check_shapes(weights_path, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                       "decoder.weight": (d_in, d_sae), "b_dec": (d_in,)}, implied)
        mapped = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"],
                  "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["b_dec"]}
        if dict_class == "AutoEncoderTopK":
            return _Mapped(mapped, TopKConfig(k=_k(trainer, tensors, weights_path)), True)
        mapped["threshold"] = _scalar_threshold(tensors, weights_path, d_sae)
        return _Mapped(mapped, JumpReLUConfig(), True)
    if dict_class == "MatryoshkaBatchTopKSAE":
        check_shapes(weights_path, t, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                       "b_dec": (d_in,)}, implied)
        mapped = {name: t[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        mapped["threshold"] = _scalar_threshold(tensors, weights_path, d_sae)
        return _Mapped(mapped, JumpReLUConfig(), True)
    # JumpReluAutoEncoder: apply_b_dec_to_input is a plain attribute, False unless set by hand
    check_shapes(weights_path, t, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                   "b_dec": (d_in,), "threshold": (d_sae,)}, implied)
    mapped = {name: t[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    return _Mapped(mapped, JumpReLUConfig(), False)


def _k(trainer: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> int:
    stored = tensors.get("k")
    if stored is not None and stored.numel() != 1:
        raise UserError(f"{path}: k should be a single number but has shape {list(stored.shape)}; re-save the SAE")
    if "k" in trainer:
        k = int_field(trainer, "k", None, path.parent / "config.json")
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


FORMAT = Format("dictionary_learning", markers=("ae.pt",), config_files=("config.json",), read_hook=read_hook,
                owns_config=owns_config, load=load)
