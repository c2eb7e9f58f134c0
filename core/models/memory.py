"""How much memory loading a model and running a batch through it will take, before loading it:
read from the model's config alone (weights by dtype or quantization, activations by batch,
context and how many layers run), so the dashboard can warn before a job runs out of memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import UserError
from core.models.loading import _DTYPE_LABELS, _check_options, _resolve

@dataclass
class MemoryEstimate:
    """Memory a model will need, estimated from its config before any weight is read."""

    weights_bytes: int
    """Parameters and buffers as `load_model` would hold them (quantized Linear weights with
    their scales)."""
    activations_bytes: int
    """Peak extra memory of one no-grad forward of batch × context tokens (see `estimate_memory`)."""
    total_bytes: int
    detail: str
    """One human-readable line, e.g. "weights 538 MB (fp32, 135M params) + activations ..."."""
    n_params: int
    """Parameter count (tied weights once), exact: counted on the model built from the config."""


def _human(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _config(source, trust_remote_code: bool):
    from transformers import AutoConfig

    kind, where = _resolve(source)
    try:
        if kind == "gguf":  # parses the metadata (and the vocabulary: a few seconds), not the tensors
            return AutoConfig.from_pretrained(where.parent, gguf_file=where.name)
        return AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot read the config of '{source}' ({str(e).splitlines()[0]}); check the name and "
                        "that you are online (HF_HUB_OFFLINE=1 allows only cached models), or give a local folder") from e
    except ValueError as e:  # transformers' way of saying "unsupported GGUF architecture / model type"
        raise UserError(f"cannot read the config of '{source}' ({str(e).splitlines()[0]}); "
                        "use the model's Hugging Face folder or id instead") from e


def _first(cfg, *keys, default=None):
    return next((getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k, None), int)), default)


def estimate_memory(source, *, dtype: str = "float32", quantization: str = "none", batch_size: int = 8,
                    context_length: int = 256, deepest_layer: int | None = None,
                    trust_remote_code: bool = False) -> MemoryEstimate:
    """Estimate the memory of loading `source` and running a forward, without loading weights.
    (One piece: one formula over one config, term by term, each commented where it is added.)

    Weights: the model is built from its config on the meta device (no memory, no weights
    read), so every parameter is counted exactly for any architecture instead of by a
    per-family formula (GPT-2's position table, GPT-NeoX's biases, untied heads all come out
    right). Bytes per parameter follow what transformers does with bitsandbytes: only the
    Linear (and GPT-2 Conv1D) layers other than the output head are quantized — 8bit: 1 byte
    per weight + a float32 scale per output row; 4bit NF4 with double quantization: 0.5 byte +
    one 8-bit scale per 64 weights + one float32 per 16384 — while embeddings, norms, biases and
    the head stay in `dtype`.

    Activations: the peak memory growth of a no-grad forward, in `dtype`, for B = batch_size
    and T = context_length tokens. Earlier blocks' tensors are freed, so the peak is what lives
    across blocks plus one block's working set (per token, d = width, H / Hkv = query / kv heads,
    hd = head width):
      * across blocks: the residual stream (d) and one hooked site copied to float32 (4·d bytes);
      * attention: normed input (d), q and its rotary copy (2·H·hd), k and v (2·Hkv·hd), k and v
        repeated to every head for GQA (2·H·hd), the output (H·hd); with eager attention also the
        scores and their softmax (2·H·T per token) — the default SDPA kernel works blockwise;
      * MLP: normed input (d) + up, act(gate) and their product (3·ffn);
      * the full model (deepest_layer None): the logits (vocab);
      * 4bit: one weight matrix dequantized to `dtype` (bitsandbytes dequantizes per matmul).
    Attention, MLP and logits are added, not maxed: on CPU the allocator seldom returns the
    attention's freed memory before the MLP asks for its own, and the sum is what the process's
    anonymous memory actually grows by. Measured on SmolLM2 (8 × 256 tokens, tests/test_models.py)
    the growth is 0.88-0.94× the estimate in fp32 and 0.9-1.3× in 4bit: within 2×. 8bit on a CPU
    without AVX-512 is the exception (bitsandbytes' fallback int8 matmul fragments glibc's heap:
    up to 9×; MALLOC_MMAP_THRESHOLD_=131072 brings it to 1×).
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    torch_dtype = _check_options(dtype, quantization)
    if batch_size < 1 or context_length < 1:
        raise UserError(f"batch size and context length must be positive, got {batch_size} and {context_length}")
    config = _config(source, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    quantized = {id(m.weight) for m in model.modules()
                 if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and m is not head}
    weights = n_params = biggest = 0
    for p in {id(p): p for p in model.parameters()}.values():  # tied weights once
        n, rows = p.numel(), p.shape[0]
        n_params += n
        if quantization == "none" or id(p) not in quantized:
            weights += n * p.element_size()
        elif quantization == "8bit":
            weights += n + 4 * rows
        else:
            weights += n // 2 + n // 64 + n // 16384 * 4
            biggest = max(biggest, n)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers_ = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    if deepest_layer is not None and not 0 <= deepest_layer < n_layers_:
        raise UserError(f"layer {deepest_layer} is out of range: the model has {n_layers_} layers "
                        f"(0-{n_layers_ - 1}); pick a layer within it")
    eager = model.config._attn_implementation == "eager"
    e = torch_dtype.itemsize
    logits = deepest_layer is None
    activations = _forward_bytes(cfg, e, batch_size, context_length, deepest_layer, eager) + biggest * e

    label = _DTYPE_LABELS[torch_dtype] if quantization == "none" else \
        f"{'int8' if quantization == '8bit' else 'NF4'} + {_DTYPE_LABELS[torch_dtype]}"
    ran = n_layers_ if deepest_layer is None else deepest_layer + 1
    detail = (f"weights {_human(weights)} ({label}, {n_params / 1e6:.0f}M params) + activations "
              f"{_human(activations)} (batch {batch_size} × {context_length} tokens, {ran} of {n_layers_} layers"
              f"{', eager attention' if eager else ''}{', logits' if logits else ''})")
    return MemoryEstimate(weights, activations, weights + activations, detail, n_params)


def _forward_bytes(cfg, e: int, batch_size: int, context_length: int, deepest_layer: int | None, eager: bool) -> int:
    """The activation terms of `estimate_memory` (its docstring lists them) for a text config
    `cfg`, `e` bytes per element."""
    d = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head")
    kv_heads = _first(cfg, "num_key_value_heads", default=heads)
    head_dim = _first(cfg, "head_dim", default=d // heads)
    ffn = _first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * d)
    tokens = batch_size * context_length
    attention = tokens * (d + 5 * heads * head_dim + 2 * kv_heads * head_dim) * e
    if eager:
        attention += 2 * batch_size * heads * context_length ** 2 * e
    mlp = tokens * (d + 3 * ffn) * e
    logits = tokens * _first(cfg, "vocab_size") * e if deepest_layer is None else 0
    return tokens * d * (e + 4) + attention + mlp + logits


GPU_MEMORY_FRACTION = 0.5
"""Share of a GPU's free memory a job's batches may take (the rest: the allocator's slack, other
work on the card)."""
MAX_GPU_ROWS = 512
"""Most rows per forward chosen from free memory (beyond this a GPU is busy already)."""


def gpu_batch_size(model, batch_size: int, context_length: int, deepest_layer: int | None,
                   bytes_per_token: int = 0, free_bytes: int | None = None) -> int:
    """Rows per forward: on the CPU `batch_size`; on a CUDA device as many rows of
    `context_length` tokens as fit in GPU_MEMORY_FRACTION of its free memory
    (torch.cuda.mem_get_info, or `free_bytes` when given) by the forward's activation estimate
    plus `bytes_per_token` of the caller's own, at least `batch_size` and at most MAX_GPU_ROWS."""
    device = next(model.parameters()).device
    if device.type != "cuda" and free_bytes is None:
        return batch_size
    free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    e = next(model.parameters()).element_size()
    eager = getattr(model.config, "_attn_implementation", "") == "eager"
    per_row = _forward_bytes(cfg, e, 1, context_length, deepest_layer, eager) + bytes_per_token * context_length
    return max(batch_size, min(MAX_GPU_ROWS, int(free * GPU_MEMORY_FRACTION) // max(per_row, 1)))
