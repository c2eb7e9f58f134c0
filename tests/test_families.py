"""Hook sites on every supported decoder family, each a tiny random model built in the test.

For every family: `find_layers` finds the blocks, `model_info` reads the config, every site
exists with the right shape, resid_pre / resid_post agree with the model's own hidden states,
resid_pre + attn_out + mlp_out == resid_post (the sublayer sites are exactly the terms added
to the residual stream), and the forward stops after the deepest hooked layer.

A family that cannot be built in the installed transformers fails here, loudly: it is not
skipped.
"""

import importlib

import pytest
import torch

from core.hooks import SITES, hook_name, run_hooked
from core.models import find_layers, model_info

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS, D, HEADS, VOCAB, FFN = 3, 64, 4, 128, 128
B, T = 2, 10
PAD_FROM = 6  # the second row is padded from this position on

_RMS = dict(num_hidden_layers=N_LAYERS, hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=2,
            intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)

# family id -> (config class, model class, model_type, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama", _RMS),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", _RMS),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(_RMS, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mistral", dict(_RMS, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gemma", dict(_RMS, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gemma2", dict(_RMS, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3", dict(_RMS, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "gpt2",
             dict(n_layer=N_LAYERS, n_embd=D, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB, n_positions=64,
                  bos_token_id=1, eos_token_id=2)),
    # GPT-NeoX's default (Pythia): attention and MLP both read the block input, both added at once.
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox",
                 dict(num_hidden_layers=N_LAYERS, hidden_size=D, num_attention_heads=HEADS, intermediate_size=FFN,
                      vocab_size=VOCAB, max_position_embeddings=64, use_parallel_residual=True,
                      bos_token_id=1, eos_token_id=2)),
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox",
                            dict(num_hidden_layers=N_LAYERS, hidden_size=D, num_attention_heads=HEADS,
                                 intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64,
                                 use_parallel_residual=False, bos_token_id=1, eos_token_id=2)),
}

_built: dict[str, torch.nn.Module] = {}


def build(family: str) -> torch.nn.Module:
    """The family's tiny model (seeded, eval mode), built once per session. Fails, never skips."""
    if family not in _built:
        config_cls, model_cls, _, kwargs = FAMILIES[family]
        transformers = importlib.import_module("transformers")
        try:
            config = getattr(transformers, config_cls)(**kwargs)
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(config).eval()
        except Exception as e:  # noqa: BLE001 - report why, as a failure
            pytest.fail(f"{family}: cannot build {model_cls} in transformers {transformers.__version__}: "
                        f"{type(e).__name__}: {e}")
        _built[family] = model
    return _built[family]


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, PAD_FROM:] = 0
    ids[1, PAD_FROM:] = 0  # the pad id
    return ids, mask


def real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unpadded positions of [B, T, D] activations, as [n, D]."""
    return x[mask.bool()]


def close(a, b, mask):
    a, b = real(a, mask), real(b, mask)
    assert torch.isfinite(a).all()
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0), f"max error {err:.3g} at scale {scale:.3g}"


families = pytest.mark.parametrize("family", list(FAMILIES))


@families
def test_layers_and_info(family):
    model = build(family)
    assert len(find_layers(model)) == N_LAYERS
    info = model_info(model)
    assert (info.architecture, info.n_layers, info.d_model) == (FAMILIES[family][2], N_LAYERS, D)
    assert info.vocab_size == VOCAB and info.dtype == "float32"


@families
def test_every_site_at_layer_1(family):
    model = build(family)
    ids, mask = inputs()
    names = [hook_name(1, s) for s in SITES]
    acts = run_hooked(model, ids, mask, names)
    assert list(acts) == names
    for name, a in acts.items():
        assert a.shape == (B, T, D) and a.dtype == torch.float32, name
        assert torch.isfinite(real(a, mask)).all(), name


@families
def test_resid_matches_hidden_states(family):
    """resid_pre at L is hidden_states[L], resid_post at L is hidden_states[L + 1].

    Only intermediate entries are compared: the last one is after the final norm.
    hidden_states[0] is the input of block 0 (Gemma's embeddings already scaled by √d).
    """
    model = build(family)
    ids, mask = inputs()
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hs) == N_LAYERS + 1
    for layer in (0, 1):
        # Each on its own, so each run stops right after its site.
        pre = run_hooked(model, ids, mask, [hook_name(layer, "resid_pre")])[hook_name(layer, "resid_pre")]
        post = run_hooked(model, ids, mask, [hook_name(layer)])[hook_name(layer)]
        close(pre, hs[layer], mask)
        close(post, hs[layer + 1], mask)
        if layer == 0 and family.startswith("gemma"):
            # Gemma scales its embeddings by √d inside embed_tokens: block 0 reads the scaled ones.
            raw = model.get_input_embeddings().weight[ids]
            close(pre, raw * D**0.5, mask)


@families
def test_sublayers_add_up(family):
    """attn_out and mlp_out are exactly the terms the block adds to its residual stream."""
    model = build(family)
    ids, mask = inputs()
    for layer in (0, 1):
        acts = run_hooked(model, ids, mask, [hook_name(layer, s) for s in SITES])
        pre, post = acts[hook_name(layer, "resid_pre")], acts[hook_name(layer, "resid_post")]
        attn, mlp = acts[hook_name(layer, "attn_out")], acts[hook_name(layer, "mlp_out")]
        close(pre + attn + mlp, post, mask)
        # Neither term is zero or a copy of the stream: the identity says something.
        assert real(attn, mask).abs().max() > 1e-3 and real(mlp, mask).abs().max() > 1e-3
    # Each sublayer site alone (the run stops as soon as it is captured) gives the same tensor.
    for site in ("attn_out", "mlp_out"):
        alone = run_hooked(model, ids, mask, [hook_name(1, site)])[hook_name(1, site)]
        close(alone, acts[hook_name(1, site)], mask)


@families
def test_stops_after_deepest_hooked_layer(family):
    model = build(family)
    layers = find_layers(model)
    calls = []
    handles = [layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in (1, N_LAYERS - 1)]
    try:
        ids, mask = inputs()
        run_hooked(model, ids, mask, [hook_name(1, s) for s in SITES])
        assert calls == [1]  # block 1 finished, the last block never ran
        calls.clear()
        run_hooked(model, ids, mask, [hook_name(1, "attn_out")])
        assert calls == []  # stopped inside block 1
        calls.clear()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert calls == [1, N_LAYERS - 1]  # the counting hooks do fire on a full forward
    finally:
        for h in handles:
            h.remove()
