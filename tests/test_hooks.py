"""Hook names, and run_hooked against the model's own hidden states."""

import pytest
import torch

from core.errors import UserError
from core.hooks import SITES, hook_name, parse_hook_name, run_hooked, validate_hooks
from core.models import find_layers


def _inputs(vocab: int, lengths=(7, 4)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def test_names_round_trip():
    for site in SITES:
        assert parse_hook_name(hook_name(3, site)) == (3, site)
    assert hook_name(6) == "blocks.6.hook_resid_post"
    for bad in ("blocks.x.hook_resid_post", "layer.3.resid", "blocks.3.hook_residual"):
        with pytest.raises(UserError, match=r"expected blocks\.\{L\}\.hook_\{site\}"):
            parse_hook_name(bad)


def test_validate_layer_out_of_range(tiny_llama):
    with pytest.raises(UserError, match=r"layer 5 is out of range: the model has 2 layers \(0-1\)"):
        validate_hooks(tiny_llama, ["blocks.5.hook_resid_post"])
    validate_hooks(tiny_llama, [hook_name(1, s) for s in SITES])


def test_resid_matches_hidden_states(tiny_llama):
    ids, mask = _inputs(tiny_llama.config.vocab_size)
    with torch.no_grad():
        hs = tiny_llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    names = [hook_name(0, "resid_pre"), hook_name(0), hook_name(1, "resid_pre")]
    acts = run_hooked(tiny_llama, ids, mask, names)
    assert set(acts) == set(names)
    assert torch.allclose(acts[names[0]], hs[0], atol=1e-6)
    assert torch.allclose(acts[names[1]], hs[1], atol=1e-6)
    assert torch.allclose(acts[names[2]], hs[1], atol=1e-6)
    assert all(a.dtype == torch.float32 and a.shape == (2, 7, 64) and not a.requires_grad for a in acts.values())


def test_sublayer_sites_add_up(tiny_llama):
    """resid_post = resid_pre + attn_out + mlp_out for a sequential block."""
    ids, mask = _inputs(tiny_llama.config.vocab_size)
    acts = run_hooked(tiny_llama, ids, mask, [hook_name(1, s) for s in SITES])
    total = acts["blocks.1.hook_resid_pre"] + acts["blocks.1.hook_attn_out"] + acts["blocks.1.hook_mlp_out"]
    assert torch.allclose(total, acts["blocks.1.hook_resid_post"], atol=1e-5)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_stops_after_deepest_hooked_layer(tiny_llama):
    layers = find_layers(tiny_llama)
    before = _hook_count(tiny_llama)  # transformers installs hooks of its own
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    handles.append(tiny_llama.lm_head.register_forward_hook(lambda m, a, o: calls.append("lm_head")))
    try:
        ids, mask = _inputs(tiny_llama.config.vocab_size)
        run_hooked(tiny_llama, ids, mask, [hook_name(0)])
        assert calls == [0]
        calls.clear()
        run_hooked(tiny_llama, ids, mask, [hook_name(1, "attn_out")])
        assert calls == [0]  # block 1 started but never finished
        assert _hook_count(tiny_llama) == before + 3
    finally:
        for h in handles:
            h.remove()
    assert _hook_count(tiny_llama) == before  # run_hooked removed its hooks


def test_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)).eval()
    layers = find_layers(model)
    assert layers is model.transformer.h
    ids, mask = _inputs(300)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    acts = run_hooked(model, ids, mask, [hook_name(0), hook_name(0, "attn_out"), hook_name(0, "mlp_out")])
    assert torch.allclose(acts["blocks.0.hook_resid_post"], hs[1], atol=1e-5)
    assert acts["blocks.0.hook_attn_out"].shape == (2, 7, 64)


def test_hooks_removed_when_forward_fails(tiny_llama):
    before = _hook_count(tiny_llama)
    bad = torch.full((1, 3), 10_000)  # out of vocabulary: the embedding lookup raises
    with pytest.raises(IndexError):
        run_hooked(tiny_llama, bad, None, [hook_name(1)])
    assert _hook_count(tiny_llama) == before
