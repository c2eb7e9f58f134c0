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


# --------------------------------------------------------------------------- patched

from core.hooks import patched  # noqa: E402
from tests.test_families import FAMILIES, N_LAYERS, build, inputs  # noqa: E402

# Sequential families: the MLP reads the stream after attention; parallel ones read the block input.
PARALLEL = {"gpt_neox", "phi"}


def _phi():
    """Phi-1/2 (parallel residual, one resid_dropout shared by both sublayers): not in
    test_families, and the case where following the term by identity matters."""
    if "phi" not in _extra:
        from transformers import PhiConfig, PhiForCausalLM

        torch.manual_seed(0)
        _extra["phi"] = PhiForCausalLM(PhiConfig(
            num_hidden_layers=N_LAYERS, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    return _extra["phi"]


_extra: dict = {}
ALL = [*FAMILIES, "phi"]
every_family = pytest.mark.parametrize("family", ALL)
patch_tests = pytest.mark.usefixtures("one_thread")


def _model(family):
    return _phi() if family == "phi" else build(family)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _close(a, b, mask, tol=1e-5):
    a, b = a[mask.bool()], b[mask.bool()]
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1.0), f"max error {err:.3g}"


@patch_tests
@every_family
def test_identity_edit_leaves_logits_unchanged(family):
    model = _model(family)
    ids, mask = inputs()
    clean = _logits(model, ids, mask)
    with patched(model, {hook_name(layer, s): (lambda x: x) for layer in (0, 1) for s in SITES}):
        assert torch.equal(_logits(model, ids, mask), clean)


@patch_tests
@every_family
def test_edit_sees_what_run_hooked_captures(family):
    model = _model(family)
    ids, mask = inputs()
    names = [hook_name(1, s) for s in SITES]
    want = run_hooked(model, ids, mask, names)
    seen = {}

    def keep(name):
        def fn(x):
            seen[name] = x.clone()
            return x
        return fn

    with patched(model, {n: keep(n) for n in names}):
        _logits(model, ids, mask)  # a full forward
    for name in names:
        assert seen[name].dtype == torch.float32 and seen[name].shape == want[name].shape, name
        _close(seen[name], want[name], mask)


@patch_tests
@every_family
def test_adding_at_resid_post_feeds_the_next_layer(family):
    """x + v at resid_post of L is what layer L + 1 reads, and gives the same logits as
    adding v at resid_pre of L + 1 or splicing the edited stream in there directly."""
    model = _model(family)
    ids, mask = inputs()
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    post, nxt = hook_name(1), hook_name(2, "resid_pre")
    clean = run_hooked(model, ids, mask, [post])[post]
    with patched(model, {post: lambda x: x + v}):
        got = run_hooked(model, ids, mask, [post, nxt])
        logits = _logits(model, ids, mask)
    _close(got[post], clean + v, mask)
    _close(got[nxt], clean + v, mask)
    assert not torch.allclose(logits, _logits(model, ids, mask))
    with patched(model, {nxt: lambda x: x + v}):
        _close(_logits(model, ids, mask), logits, mask)
    with patched(model, {nxt: lambda x: clean + v}):
        _close(_logits(model, ids, mask), logits, mask)


@patch_tests
@every_family
@pytest.mark.parametrize("zeroed", ["attn_out", "mlp_out"])
def test_zeroing_a_sublayer_removes_its_term(family, zeroed):
    """With one term zeroed, resid_post = resid_pre + the other term, as the block then computes it."""
    model = _model(family)
    ids, mask = inputs()
    names = [hook_name(1, s) for s in SITES]
    clean = run_hooked(model, ids, mask, names)
    with patched(model, {hook_name(1, zeroed): torch.zeros_like}):
        acts = run_hooked(model, ids, mask, names)
    pre, post = acts[hook_name(1, "resid_pre")], acts[hook_name(1)]
    attn, mlp = acts[hook_name(1, "attn_out")], acts[hook_name(1, "mlp_out")]
    assert (acts[hook_name(1, zeroed)] == 0).all()
    _close(pre, clean[hook_name(1, "resid_pre")], mask)  # upstream untouched
    _close(pre + attn + mlp, post, mask)
    assert not torch.allclose(post, clean[hook_name(1)], atol=1e-3)
    if zeroed == "attn_out":
        # Sequential blocks feed the MLP the changed stream; parallel ones the block input.
        moved = not torch.allclose(mlp, clean[hook_name(1, "mlp_out")], atol=1e-4)
        assert moved == (family not in PARALLEL)
    else:
        _close(attn, clean[hook_name(1, "attn_out")], mask)


@patch_tests
@every_family
def test_generate_with_cache_edits_every_step(family):
    """One call per generation step (T = prompt, then 1, 1, ...), and the cached generation
    under an edit scores its tokens exactly like a full patched forward of the final sequence."""
    model = _model(family)
    ids = inputs()[0][:1]
    calls = {s: [] for s in SITES}

    def count(site):
        def fn(x):
            calls[site].append(x.shape[1])
            return x
        return fn

    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    with patched(model, {hook_name(1, s): count(s) for s in SITES}):
        model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    assert all(c == [ids.shape[1], 1, 1] for c in calls.values()), calls

    v = 4 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    with patched(model, {hook_name(1): lambda x: x + v}):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), output_logits=True,
                             return_dict_in_generate=True, **gen)
        full = _logits(model, out.sequences, torch.ones_like(out.sequences))
    steps = torch.stack(out.logits, 1)  # [1, 3, V]: the logits each new token was picked from
    T = ids.shape[1]
    assert (steps - full[:, T - 1:-1]).abs().max() < 1e-4


def test_patched_removes_hooks_on_exit_and_on_error(tiny_llama):
    before = _hook_count(tiny_llama)
    ids, mask = _inputs(tiny_llama.config.vocab_size)
    edits = {hook_name(1, s): (lambda x: x) for s in SITES}
    with patched(tiny_llama, edits):
        assert _hook_count(tiny_llama) > before
        _logits(tiny_llama, ids, mask)
    assert _hook_count(tiny_llama) == before
    with pytest.raises(KeyError):
        with patched(tiny_llama, edits):
            raise KeyError("inside")
    assert _hook_count(tiny_llama) == before
    # An edit returning the wrong shape fails the forward loudly, and still cleans up.
    with pytest.raises(ValueError, match=r"edit at blocks\.1\.hook_attn_out returned \[2, 7, 3\]"):
        with patched(tiny_llama, {hook_name(1, "attn_out"): lambda x: x[..., :3]}):
            _logits(tiny_llama, ids, mask)
    assert _hook_count(tiny_llama) == before
    with pytest.raises(UserError, match="layer 9 is out of range"):
        with patched(tiny_llama, {hook_name(9): lambda x: x}):
            pass
    assert _hook_count(tiny_llama) == before


def test_edit_output_is_cast_to_model_dtype(tiny_llama):
    ids, mask = _inputs(tiny_llama.config.vocab_size)
    clean = _logits(tiny_llama, ids, mask)
    with patched(tiny_llama, {hook_name(0): lambda x: x.double()}):
        assert torch.equal(_logits(tiny_llama, ids, mask), clean)
