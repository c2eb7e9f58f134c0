"""TopK sparse autoencoder with SAELens tensor names, and the SAELens folder format.

A SAELens SAE folder is `cfg.json` + `sae_weights.safetensors` holding `W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`. We write the v6 layout (run
metadata under `metadata`) so SAELens loads our exports unchanged and gives the same
encodings, and we read the older flat layout too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import UserError
from core.io import atomic_dir

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
TENSOR_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")
_METADATA_FIELDS = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path")


@dataclass
class SAEConfig:
    """What `cfg.json` records about an SAE: its shape, how to apply it, and where it was trained."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model for residual hooks)."""
    d_sae: int
    """Number of latents."""
    k: int
    """Latents kept per token by the TopK activation."""
    architecture: str = "topk"
    """SAELens architecture name; only "topk" is implemented here."""
    dtype: str = "float32"
    """Weight dtype as written to disk (we always save fp32)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens default)."""
    normalize_activations: str = "none"
    """SAELens input normalization; "none" because our training folds its scale into the weights."""
    hook_name: str = ""
    """TransformerLens hook name, e.g. blocks.15.hook_resid_post."""
    model_name: str = ""
    """Model the SAE was trained on (hub id or local name)."""
    context_size: int = 0
    """Tokens per sequence during extraction."""
    prepend_bos: bool = False
    """Whether sequences started with BOS during extraction."""
    dataset_path: str = ""
    """Dataset the activations came from."""

    def to_cfg_json(self) -> dict[str, Any]:
        """SAELens v6 `cfg.json` contents."""
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            # Newer SAELens versions know these; older ones drop unknown fields on load.
            "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "metadata": {name: getattr(self, name) for name in _METADATA_FIELDS},
        }

    @classmethod
    def from_cfg_json(cls, d: dict[str, Any]) -> "SAEConfig":
        """Parse a SAELens `cfg.json`: the v6 layout or the older flat one (hook_name at top level)."""
        if not isinstance(d, dict):
            raise UserError("cfg.json does not hold a JSON object; re-export the SAE from SAELens")
        missing = [name for name in ("d_in", "d_sae") if name not in d]
        if missing:
            raise UserError(f"cfg.json lacks {', '.join(missing)}; add them or re-export the SAE")
        # Older SAELens wrote TopK SAEs as activation_fn_str="topk" with k in activation_fn_kwargs.
        fn_kwargs = d.get("activation_fn_kwargs") or {}
        architecture = d.get("architecture", "standard")
        if d.get("activation_fn_str") == "topk" or ("k" in fn_kwargs and architecture == "standard"):
            architecture = "topk"
        k = d.get("k", fn_kwargs.get("k"))
        if architecture == "topk" and k is None:
            raise UserError("cfg.json says architecture topk but gives no k; add \"k\": <int> to cfg.json")
        meta = d.get("metadata") or {}
        flat = {name: meta.get(name, d.get(name)) for name in _METADATA_FIELDS}
        try:
            return cls._build(d, architecture, k, flat)
        except (TypeError, ValueError) as e:
            raise UserError(f"cfg.json has a field of the wrong type ({e}); fix it or re-export the SAE") from None

    @classmethod
    def _build(cls, d: dict[str, Any], architecture: str, k: Any, flat: dict[str, Any]) -> "SAEConfig":
        return cls(
            d_in=int(d["d_in"]),
            d_sae=int(d["d_sae"]),
            k=int(k) if k is not None else 0,
            architecture=architecture,
            dtype=str(d.get("dtype", "float32")),
            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
            normalize_activations=str(d.get("normalize_activations") or "none"),
            hook_name=str(flat["hook_name"] or ""),
            model_name=str(flat["model_name"] or ""),
            context_size=int(flat["context_size"] or 0),
            prepend_bos=bool(flat["prepend_bos"]),
            dataset_path=str(flat["dataset_path"] or ""),
        )


def check_k(k: int, d_sae: int) -> None:
    """TopK needs 1 <= k <= d_sae; say which knob to turn otherwise."""
    if not 1 <= k <= d_sae:
        raise UserError(f"k={k} must be between 1 and d_sae={d_sae}; lower --k or raise --expansion")


class TopKSAE(nn.Module):
    """z = TopK(ReLU((x - b_dec) @ W_enc + b_enc)), x_hat = z @ W_dec + b_dec (Gao et al. 2024)."""

    def __init__(self, d_in: int, d_sae: int, k: int, apply_b_dec_to_input: bool = True):
        super().__init__()
        check_k(k, d_sae)
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        # Unit-norm decoder rows and a tied encoder: the initialisation Gao et al. found best.
        W_dec = torch.randn(d_sae, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> "TopKSAE":
        return cls(cfg.d_in, cfg.d_sae, cfg.k, cfg.apply_b_dec_to_input)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [..., d_sae]."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k kept activations and their latent indices, each [..., k] (values may be 0)."""
        values, indices = self.pre_acts(x).topk(self.k, dim=-1)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [..., d_sae] with at most k non-zeros per token."""
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z


def save_saelens(sae: TopKSAE, cfg: SAEConfig, folder: str | os.PathLike) -> Path:
    """Write `folder` (atomically) as a SAELens folder: cfg.json + sae_weights.safetensors."""
    if (cfg.d_in, cfg.d_sae, cfg.k) != (sae.d_in, sae.d_sae, sae.k):
        raise UserError(
            f"SAEConfig (d_in={cfg.d_in}, d_sae={cfg.d_sae}, k={cfg.k}) does not match the SAE "
            f"(d_in={sae.d_in}, d_sae={sae.d_sae}, k={sae.k}); build the config from the SAE"
        )
    tensors = {name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous() for name in TENSOR_NAMES}
    cfg_json = cfg.to_cfg_json() | {"dtype": "float32", "apply_b_dec_to_input": sae.apply_b_dec_to_input}
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILENAME))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2))
    return folder


def load_saelens(folder: str | os.PathLike) -> tuple[TopKSAE, SAEConfig]:
    """Load a SAELens TopK folder (safetensors only; never unpickles anything)."""
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
    if cfg.architecture != "topk":
        raise UserError(f"{folder} holds a '{cfg.architecture}' SAE; only topk SAEs load here, import it as its own architecture")
    if cfg.normalize_activations != "none":
        raise UserError(
            f"{folder} uses normalize_activations='{cfg.normalize_activations}', which TopKSAE does not apply; "
            "fold the normalization into the weights and set it to 'none'"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_path} is not a readable safetensors file ({e}); re-export the SAE") from None
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise UserError(f"{weights_path} lacks tensor(s) {', '.join(missing)}; a TopK SAE needs {', '.join(TENSOR_NAMES)}")
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,), "b_dec": (cfg.d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(
                f"{name} has shape {list(tensors[name].shape)} but cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}) "
                f"implies {list(shape)}; fix d_in/d_sae in cfg.json"
            )
    for name in TENSOR_NAMES:
        if not bool(torch.isfinite(tensors[name]).all()):
            raise UserError(f"{name} in {weights_path} holds NaN or inf values; re-export or retrain the SAE")
    if raw.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].float().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise UserError(
                f"{folder} sets rescale_acts_by_decoder_norm with non-unit decoder rows, which TopKSAE does not apply; "
                "fold the decoder norms into the encoder (SAELens fold_W_dec_norm) and save again"
            )
    sae = TopKSAE.from_config(cfg)
    with torch.no_grad():
        for name in TENSOR_NAMES:
            getattr(sae, name).copy_(tensors[name].to(torch.float32))
    return sae, cfg
