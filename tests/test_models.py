"""Model loading, layer discovery, and the embedded SmolLM2 end to end (slow)."""

import pytest
import torch

from core.errors import UserError
from core.models import (EMBEDDED_MODEL_NAME, convert_gguf, embedded_gguf_path, find_layers, load_model,
                         model_info)


def test_embedded_gguf_path():
    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf" and EMBEDDED_MODEL_NAME in path.name


def test_model_info_and_find_layers(tiny_llama):
    assert find_layers(tiny_llama) is tiny_llama.model.layers
    info = model_info(tiny_llama)
    assert (info.architecture, info.n_layers, info.d_model, info.dtype) == ("llama", 2, 64, "float32")
    assert info.vocab_size == tiny_llama.config.vocab_size
    assert info.n_params == sum(p.numel() for p in tiny_llama.parameters())


def test_find_layers_gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, vocab_size=100))
    assert find_layers(model) is model.gpt_neox.layers


def test_load_model_folder_round_trip(tmp_path, tiny_llama, tiny_tokenizer):
    tiny_llama.save_pretrained(tmp_path / "m")
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    tok.save_pretrained(tmp_path / "m")  # saved without a pad token
    model, loaded_tok = load_model(str(tmp_path / "m"))
    assert not model.training
    assert loaded_tok.pad_token == loaded_tok.eos_token and loaded_tok.padding_side == "right"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_llama(ids).logits, atol=1e-6)


def test_load_model_errors(tmp_path):
    for missing in ("/no/such/model", "./nope", "~/nope-model", "model.gguf"):
        with pytest.raises(UserError, match="not found"):
            load_model(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="offline|online"):
        load_model("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in tests
    with pytest.raises(UserError, match="dtype"):
        load_model(str(tmp_path / "empty"), dtype="int3")


def test_convert_gguf_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), arch="weirdformer")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="'weirdformer'"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_says_paris(smollm2_dir):
    model, tokenizer = load_model(smollm2_dir)
    info = model_info(model)
    assert (info.architecture, info.n_layers, info.d_model, info.vocab_size) == ("llama", 30, 576, 49152)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
