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


# --------------------------------------------------------------------------- at width: blocked == naive


@pytest.mark.parametrize("latents", [None, [250, 3, 77, 199, 0]])
def test_blocked_similar_features_equal_the_whole_matrix(latents):
    """Tiles of W @ W.T with a running top-n give the top-n of each whole row (all latents, or a
    chosen few in their order), with tiles that split rows and columns unevenly."""
    torch.manual_seed(3)
    s = build_sae("topk", 64, 251, k=4)
    W = s.W_dec / s.W_dec.norm(dim=1, keepdim=True)
    cos = W @ W.T
    cos.fill_diagonal_(-torch.inf)
    want = list(range(251)) if latents is None else latents
    ids, vals = similar_features(s, latents, n=6, chunk=7, block=40)
    assert ids == cos[want].topk(6, dim=1).indices.tolist()
    assert similar_features(s, latents, n=6, chunk=50, block=20)[0] == ids, "tiles narrower than a row block"
    for v, w in zip(vals, cos[want].topk(6, dim=1).values.tolist()):
        assert v == pytest.approx(w, abs=1e-6)
    eff_all = logit_effects(_tiny("llama"), s, want, n=3, chunk=4)
    eff_one = logit_effects(_tiny("llama"), s, want, n=3, chunk=1000)
    assert eff_all.top_ids == eff_one.top_ids and eff_all.bottom_ids == eff_one.bottom_ids


WORDS = [" the", " cat", " sat", " on", " mat", " Paris", " is", " in", " France", ".", " London", " and", " ran",
         " big", " dog", "\n"]


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    """A features folder from the project's own discovery: a TopK SAE over random activations of
    rows of English words (so spaCy has words to tag), small row groups."""
    from core.features import DiscoverConfig, discover

    torch.manual_seed(4)
    s = build_sae("topk", 8, 40, k=6)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, len(WORDS), (4, 24), generator=g), torch.ones(4, 24, dtype=torch.long),
                torch.arange(4) + 4 * b, torch.randn(4, 24, 8, generator=g)) for b in range(6)]
    cfg = DiscoverConfig(top_k=12, window_before=4, window_after=3, outlier_norm_multiple=None, row_group_latents=3,
                         n_coactive=5)
    out = tmp_path_factory.mktemp("an") / "features"
    discover(s, iter(batches), out, lambda ids: [WORDS[i] for i in ids], cfg)
    return out


def test_blocked_coactive_counts_equal_the_per_latent_ranking(discovered):
    """Counting a block of latents at a time in numpy gives each latent's ranking exactly as the
    per-latent reader (store.coactive_features) ranks it: counts, order, means."""
    from core.analysis import coactive_counts
    from core.features.store import coactive_features

    latents = list(range(40))
    blocked = coactive_counts(discovered, latents, n=7, block=6)
    assert set(blocked) == {i for i in latents if coactive_features(discovered, i, 7)}
    for i in latents:
        want = coactive_features(discovered, i, 7)
        got = blocked.get(i, [])
        assert [(c["latent"], c["count"]) for c in got] == [(c["latent"], c["count"]) for c in want]
        assert [c["mean_act"] for c in got] == pytest.approx([c["mean_act"] for c in want], rel=1e-9)
    assert sum(c["count"] for c in blocked[5]) > 0
    some = coactive_counts(discovered, [33, 2, 17], n=7, block=4)
    assert some == {i: blocked[i] for i in (2, 17, 33) if i in blocked}


def test_blocked_nlp_summaries_equal_one_latent_at_a_time(discovered, monkeypatch):
    """NLP over blocks of latents, each shared window parsed once, equals analysing each
    latent's top windows alone."""
    from core import nlp
    from core.analysis import nlp_summaries
    from core.features.store import read_examples

    latents = [0, 1, 2, 7, 8, 9, 20, 39]
    seen = []
    monkeypatch.setattr("core.analysis.PARSE_LATENTS", 2)  # progress moves within a block
    blocked = nlp_summaries(discovered, latents, block=3, progress=seen.append)
    assert list(blocked) == latents
    assert seen == [2, 3, 5, 6, 8]
    for i in latents:
        assert blocked[i].to_dict() == nlp.analyze(read_examples(discovered, i, kind="top")[:10]).to_dict()
    assert any(s.n_examples for s in blocked.values())


def test_ablation_of_several_latents_per_forward_equals_one_at_a_time(tiny_llama):
    """Rows of three latents packed into shared forwards (a small token budget forces several
    forwards that mix latents) give each latent the figures it gets measured alone; a latent
    that cannot be measured gets its one-line reason, the others go on."""
    from core.ablation import Ablation, ablation_effects

    torch.manual_seed(6)
    s = build_sae("topk", 64, 96, k=12)
    items = []
    for latent, lengths in ((5, (9, 14, 6)), (40, (11, 7)), (90, (13, 8, 10, 5))):
        ctx = [torch.randint(0, 250, (n,)) for n in lengths]
        items.append(Ablation(latent, ctx, [n // 2 for n in lengths]))
    items.insert(1, Ablation(7, [torch.arange(4)], [3]))  # no token after the position
    seen = []
    together = ablation_effects(tiny_llama, s, HOOK, items, max_tokens=30, group=3, progress=seen.append)
    assert seen == [3, 4], "progress moves with each group of latents"
    assert isinstance(together[1], UserError) and "no context has a token after" in str(together[1])
    for item, got in zip(items[:1] + items[2:], together[:1] + together[2:]):
        alone = ablation_effect(tiny_llama, s, HOOK, item.contexts, item.positions, item.latent)
        assert got.latent == item.latent and got.n_contexts == alone.n_contexts
        assert got.activation == pytest.approx(alone.activation, abs=1e-5)
        assert got.delta_loss_at_max == pytest.approx(alone.delta_loss_at_max, abs=1e-4)
        assert got.delta_loss_after == pytest.approx(alone.delta_loss_after, abs=1e-4)
        assert got.dropped_ids == alone.dropped_ids


# --------------------------------------------------------------------------- the latent selection


@pytest.mark.parametrize("text, want", [("", []), ("3", [3]), ("0-4, 2,9", [0, 1, 2, 3, 4, 9]), (" 7 ,", [7])])
def test_latent_selections_parse(text, want):
    from core.latents import parse_latents

    assert parse_latents(text) == want


@pytest.mark.parametrize("text, message", [
    ("a-3", "latents: 'a-3' is not a number or a range; write e.g. 0-99,512"),
    ("9-2", "latents: range '9-2' runs backwards; write it low-high, e.g. 2-9"),
    ("-4", "latents: '-4' is not a number or a range"),
    ("0-99999999", "selects more than"),
])
def test_bad_latent_selections_are_one_line(text, message):
    from core.latents import parse_latents

    with pytest.raises(UserError, match=message) as e:
        parse_latents(text)
    assert "\n" not in str(e.value)


def test_analyze_and_label_specs_check_the_selection():
    from actors.jobs import analyze, label
    from core.latents import check_latents

    with pytest.raises(UserError, match="latent -2 is out of range: latents are numbered from 0"):
        analyze.check(None, analyze.AnalyzeSpec("s", latents=[3, -2]))
    with pytest.raises(UserError, match="latent -1 is out of range"):
        label.check(None, label.LabelSpec("s", latents=[-1]))
    with pytest.raises(UserError, match="latent 4608 is out of range: SAE x has latents 0-4607"):
        check_latents([5, 4608, 9000], 4608, "SAE x")
    with pytest.raises(UserError, match="block_latents=0"):
        analyze.check(None, analyze.AnalyzeSpec("s", config={"block_latents": 0}))
    import argparse

    assert analyze.latents_flag("1-3,8") == [1, 2, 3, 8]
    with pytest.raises(argparse.ArgumentTypeError, match="runs backwards"):
        label.latents_flag("5-1")


@pytest.mark.slow
def test_a_latent_selection_through_the_real_model(smollm2_dir, tmp_path):
    """On SmolLM2 with features discovered by the project's discovery: analysing a selection
    gives exactly those latents, each stage filled, the chosen ablation equal to measuring it
    alone; labeling the selection labels those latents only."""
    from core.analysis import AnalyzeConfig, analyze_features
    from core.data import special_token_ids, tokenize_dataset
    from core.features import DiscoverConfig, discover_features
    from core.features.store import feature_rows, read_examples
    from core.formats.saelens import save_saelens
    from core.interp import label_features
    from core.models import load_model

    model, tok = load_model(smollm2_dir)
    hook = "blocks.6.hook_resid_post"
    torch.manual_seed(0)
    s = build_sae("topk", 576, 512, k=16)
    save_saelens(s, s.config(hook_name=hook, model_name="smollm2"), tmp_path / "sae")
    tokenize_dataset(tok, "builtin", tmp_path / "ds", context_length=64, max_documents=40)
    discover_features(model, tok, tmp_path / "sae", tmp_path / "ds", tmp_path / "features", DiscoverConfig(top_k=6),
                      max_tokens=400, exclude_token_ids=special_token_ids(tok))
    rows = {r["latent"]: r for r in feature_rows(tmp_path / "features", ["latent", "n_fired", "top_tokens", "frequency"])}
    live = sorted((i for i, r in rows.items() if r["n_fired"] > 0), key=lambda i: -rows[i]["n_fired"])
    chosen = [live[0], live[3], next(i for i in range(512) if rows[i]["n_fired"] == 0)]
    out = analyze_features(model, tok, tmp_path / "sae", tmp_path / "features", tmp_path / "ds",
                           AnalyzeConfig(ablation_top=0, ablation_latents=[live[3]], ablation_after=4), latents=chosen)
    assert sorted(out) == sorted(chosen)
    for i in chosen:
        assert len(out[i]["logits"]["pos_str"]) == 10 and len(out[i]["similar"]) == 10 and "summary" in out[i]["nlp"]
    assert out[live[0]]["coactive"] and out[chosen[2]]["coactive"] == [] and "ablation" not in out[live[0]]
    ab = out[live[3]]["ablation"]
    from core.data import read_rows

    top = read_examples(tmp_path / "features", live[3])[:8]
    ctx = read_rows(tmp_path / "ds", [e["row_id"] for e in top])
    alone = ablation_effect(model, s, hook, [torch.from_numpy(ctx[e["row_id"]][: e["pos"] + 5]) for e in top],
                            [e["pos"] for e in top], live[3], pad_id=tok.pad_token_id or 0)
    assert ab["delta_loss_at_max"] == pytest.approx(alone.delta_loss_at_max, abs=1e-4)
    with pytest.raises(UserError, match="latent 512 is out of range: this SAE has latents 0-511"):
        analyze_features(model, tok, tmp_path / "sae", tmp_path / "features", None, AnalyzeConfig(), latents=[5, 512])
    feats = [dict(rows[i], analysis=out[i]) for i in chosen]
    labels = label_features(None, feats, tmp_path / "features")
    assert set(labels["labels"]) | set(labels["errors"]) == set(chosen)
