"""Models: loading (the embedded SmolLM2, GGUF → safetensors conversion, Hugging Face models,
bitsandbytes quantization), what a loaded model is (layers, width), how much memory one will
take, and the cache a worker keeps them in."""

from core.models.cache import ModelCache
from core.models.loading import (EMBEDDED_MODEL_NAME, QUANTIZATIONS, ModelInfo, check_source, convert_gguf, d_model,
                                 embedded_gguf_path, find_layers, gguf_architecture, load_model, model_info,
                                 n_layers, quantization_of)
from core.models.memory import MemoryEstimate, estimate_memory

__all__ = ["ModelCache", "EMBEDDED_MODEL_NAME", "QUANTIZATIONS", "ModelInfo", "check_source", "convert_gguf", "d_model",
           "embedded_gguf_path", "find_layers", "gguf_architecture", "load_model", "model_info", "n_layers",
           "quantization_of", "MemoryEstimate", "estimate_memory"]
