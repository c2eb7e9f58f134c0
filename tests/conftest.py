"""Shared fixtures: a tiny byte-level tokenizer, a tiny Llama, and (slow) the real SmolLM2.

Keep this file small; put fixtures used by one test file in that file.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level tokenizer (256 byte tokens + <|endoftext|> as eos/pad), no merges, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.pad_token = fast.eos_token
    fast.padding_side = "right"
    return fast


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """2-layer Llama (d_model 64) with random weights, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=512,
        pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The embedded SmolLM2 GGUF converted once per session to a safetensors folder (~30 s)."""
    from core.models import convert_gguf, embedded_gguf_path

    return convert_gguf(embedded_gguf_path(), tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama, tiny_tokenizer, tmp_path_factory):
    """The tiny Llama and its tokenizer saved as a model folder, to register like a user's model."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def studio_home(tmp_path_factory):
    """A data root for the whole session's Ray actors (one Ray per test session)."""
    return tmp_path_factory.mktemp("mistudio_home")


@pytest.fixture(scope="session")
def client(studio_home):
    """A real in-process Ray (num_cpus=2, no dashboard) with the real named actors."""
    import ray

    from actors.client import Client
    from storage import Settings

    settings = Settings.from_env({"MISTUDIO_HOME": str(studio_home), "MISTUDIO_RAY_ADDRESS": "local",
                                  "MISTUDIO_WORKER_CPUS": "2"})
    c = Client(settings)
    yield c
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(client, tiny_model_dir):
    """A completed pipeline (model → dataset → extract → train → discover) on the tiny Llama."""
    model_id = client.wait(client.submit("add_model", {"source": str(tiny_model_dir), "name": "tiny-llama"}))
    assert model_id["state"] == "completed", model_id["message"]
    ds = client.wait(client.submit("add_dataset", {"model_id": "tiny-llama", "source": "builtin",
                                                   "context_length": 64, "max_documents": 40}))
    assert ds["state"] == "completed", ds["message"]
    job = client.wait(client.submit("pipeline", {
        "model_id": "tiny-llama", "dataset_id": ds["result"]["dataset_id"], "layer": 1, "max_tokens": 3000,
        "train": {"expansion_factor": 4, "k": 8, "batch_size": 256, "epochs": 2}, "top_k": 5}))
    assert job["state"] == "completed", job["message"]
    return {"dataset_id": ds["result"]["dataset_id"], "job": job}


@pytest.fixture(scope="module")
def ui_client(client, tmp_path_factory):
    """The session's client, with the environment set so the dashboard's own Client() (built
    by pages run under AppTest in this process) finds the same Ray and registry; the dashboard
    may read the session's temporary folders (test models and data files live there)."""
    import os

    from ui.components.client import get_client

    saved = {k: os.environ.get(k) for k in client.settings.to_env()}
    os.environ.update(client.settings.to_env(), MISTUDIO_ALLOWED_ROOTS=str(tmp_path_factory.getbasetemp()))
    get_client.clear()
    yield client
    get_client.clear()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread avoids OpenMP spin/yield overhead on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def plain(markdown: str) -> str:
    """What a reader sees of text the dashboard escaped with ui.components.formatting.literal
    (backslash escapes and word joiners removed)."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")
