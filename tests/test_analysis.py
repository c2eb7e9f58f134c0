"""Feature analysis: logit effects through each family's final norm, decoder cosine neighbours,
and the measured ablation effect against a plain per-context loop."""

import pytest
import torch

from core.analysis import ablation_effect, final_norm, logit_effects, similar_features
from core.errors import UserError
from core.models import find_layers
from core.sae import build_sae

HOOK = "blocks.1.hook_resid_post"


def _tiny(family: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=97, max_position_embeddings=64)
    if family == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=97))
    elif family == "gemma":
        m = tf.GemmaForCausalLM(tf.GemmaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, **common))
    else:
        m = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, num_key_value_heads=2, **common))
    with torch.no_grad():  # norms with non-trivial weights and biases, so folding them matters
        norm = final_norm(m)
        norm.weight.normal_(0.3, 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0, 1.0)
    return m.eval()


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(1)
    return build_sae("topk", 64, 128, k=8)


@pytest.mark.parametrize("family, what", [("llama", "LlamaRMSNorm weight"), ("gemma", "GemmaRMSNorm 1 + weight"),
                                          ("gpt2", "LayerNorm's mean removal")])
def test_logit_effects_fold_the_final_norm(family, what, sae):
    """Our ranking equals the ranking of the norm module applied to the direction (without its
    bias, which does not depend on the feature) followed by the unembedding."""
    model = _tiny(family)
    eff = logit_effects(model, sae, [3, 40], n=5)
    assert what in eff.final_norm and "not applied" in eff.final_norm
    norm = final_norm(model)
    W_U = model.get_output_embeddings().weight
    with torch.no_grad():
        for j, latent in enumerate([3, 40]):
            d = sae.W_dec[latent][None]
            normed = norm(d) - (norm.bias if getattr(norm, "bias", None) is not None else 0)
            logits = (normed @ W_U.T)[0]
            assert eff.top_ids[j] == logits.topk(5).indices.tolist()
            assert eff.bottom_ids[j] == (-logits).topk(5).indices.tolist()
    raw = logit_effects(model, sae, [3], n=5, apply_final_norm=False)
    assert raw.final_norm == "no final norm applied"
    assert raw.top_values[0] == pytest.approx((sae.W_dec[3] @ W_U.T).topk(5).values.tolist(), rel=1e-5)


def test_logit_effects_all_latents_chunked(tiny_llama, sae):
    whole = logit_effects(tiny_llama, sae, None, n=3, chunk=1000)
    parts = logit_effects(tiny_llama, sae, None, n=3, chunk=7)
    assert whole.latents == list(range(128)) and whole.top_ids == parts.top_ids
    with pytest.raises(UserError, match="latent 128 is out of range: this SAE has latents 0-127"):
        logit_effects(tiny_llama, sae, [128])


def test_similar_features_match_brute_force(sae):
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    cos = W @ W.T
    ids, vals = similar_features(sae, None, n=4, chunk=10)
    for i in range(128):
        row = cos[i].clone()
        row[i] = -2
        assert ids[i] == row.topk(4).indices.tolist() and i not in ids[i]
        assert vals[i] == pytest.approx(row.topk(4).values.tolist(), abs=1e-6)


def _loop_reference(model, sae, contexts, positions, latent):
    """Each context alone, clean and ablated through a plain forward hook on block 1's output."""
    block = find_layers(model)[1]
    d = sae.W_dec[latent]

    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        y = x - sae.encode(x)[..., latent][..., None] * d
        return (y, *out[1:]) if isinstance(out, tuple) else y

    at_max, after = [], []
    for c, p in zip(contexts, positions):
        ids = c[None]
        with torch.no_grad():
            clean = model(ids).logits.log_softmax(-1)[0]
            h = block.register_forward_hook(hook)
            try:
                abl = model(ids).logits.log_softmax(-1)[0]
            finally:
                h.remove()
        nll = lambda lp: -lp[:-1].gather(1, c[1:, None])[:, 0]
        delta = nll(abl) - nll(clean)
        at_max.append(float(delta[p]))
        after.append(float(delta[p:].mean()))
    return at_max, after


def test_ablation_matches_a_plain_loop_and_ignores_padding(tiny_llama, sae):
    torch.manual_seed(5)
    contexts = [torch.randint(0, 250, (n,)) for n in (12, 7, 9)]
    positions = [4, 2, 7]
    latent = 17
    with torch.no_grad():  # make sure the latent fires on these contexts
        sae.b_enc[latent] = 5.0
    # a fourth context whose position is its last token has no next token: skipped
    eff = ablation_effect(tiny_llama, sae, HOOK, contexts + [torch.arange(6)], positions + [5], latent)
    at_max, after = _loop_reference(tiny_llama, sae, contexts, positions, latent)
    assert eff.n_contexts == 3 and all(a > 0 for a in eff.activation)
    assert eff.delta_loss_at_max == pytest.approx(at_max, abs=1e-4)
    assert eff.delta_loss_after == pytest.approx(after, abs=1e-4)
    assert eff.mean_delta_loss_at_max == pytest.approx(sum(at_max) / 3, abs=1e-4)
    assert any(abs(v) > 1e-4 for v in at_max)
    alone = ablation_effect(tiny_llama, sae, HOOK, contexts[1:2], positions[1:2], latent)
    assert alone.delta_loss_at_max == pytest.approx(eff.delta_loss_at_max[1:2], abs=1e-4)
    assert len(eff.dropped_ids) == 5 and eff.dropped_values == sorted(eff.dropped_values)


def test_a_latent_that_never_fires_changes_nothing(tiny_llama):
    torch.manual_seed(2)
    s = build_sae("standard", 64, 32)
    with torch.no_grad():
        s.b_enc[4] = -1e6  # latent 4 can never fire
    contexts = [torch.randint(0, 250, (10,))]
    eff = ablation_effect(tiny_llama, s, HOOK, contexts, [3], 4)
    assert eff.delta_loss_at_max == [0.0] and eff.delta_loss_after == [0.0] and eff.activation == [0.0]


@pytest.mark.parametrize("contexts, positions, message", [
    ([torch.arange(5)], [5], "position 5 is outside a context of 5 tokens"),
    ([torch.arange(5)], [4], "no context has a token after"),
    ([torch.arange(5)], [1, 2], "1 contexts but 2 positions"),
])
def test_bad_ablation_input(tiny_llama, sae, contexts, positions, message):
    with pytest.raises(UserError, match=message):
        ablation_effect(tiny_llama, sae, HOOK, contexts, positions, 3)
    with pytest.raises(UserError, match="SAE d_in=32 does not match"):
        ablation_effect(tiny_llama, build_sae("topk", 32, 64, k=4), HOOK, [torch.arange(5)], [1], 3)


@pytest.mark.slow
def test_analysis_on_smollm2(smollm2_dir):
    """On the real model: logit effects name real vocabulary tokens, and removing a latent that
    fires at a position changes the next-token loss by a finite, nonzero amount."""
    from core.models import load_model

    model, tok = load_model(smollm2_dir)
    torch.manual_seed(0)
    s = build_sae("topk", 576, 4608, k=32)
    eff = logit_effects(model, s, [0, 1], n=5)
    assert "LlamaRMSNorm" in eff.final_norm
    assert all(isinstance(t, str) and t for t in tok.convert_ids_to_tokens(eff.top_ids[0]))
    ids = tok("The capital of France is Paris, and the capital of Italy is Rome.", return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        from core.hooks import run_hooked

        x = run_hooked(model, ids[None], None, ["blocks.15.hook_resid_post"])["blocks.15.hook_resid_post"][0]
        z = s.encode(x.float())
    latent = int(z[5].argmax())
    ab = ablation_effect(model, s, "blocks.15.hook_resid_post", [ids], [5], latent)
    assert ab.activation[0] > 0 and ab.delta_loss_at_max[0] != 0
    assert abs(ab.delta_loss_at_max[0]) < 20
