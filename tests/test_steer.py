"""Steering: the add and clamp edits, generation with the KV cache, modes, perplexity, errors."""

import math

import pytest
import torch

from core.errors import UserError
from core.hooks import patched
from core.sae import build_sae
from core.steer import (Experiment, GenerationConfig, SteerFeature, generate, perplexity, steer, steering_edit)

HOOK = "blocks.1.hook_resid_post"
GREEDY = GenerationConfig(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(3)
    s = build_sae("topk", 64, 256, k=8)
    with torch.no_grad():
        s.W_dec.mul_(torch.rand(256, 1) + 0.5)  # decoder rows of different norms: add must normalise
    return s


def test_add_and_clamp_algebra(sae):
    x = torch.randn(2, 5, 64)
    add = steering_edit(sae, [SteerFeature(7, 3.0, "add")])(x)
    direction = sae.W_dec[7] / sae.W_dec[7].norm()
    assert torch.allclose(add - x, 3.0 * direction.expand_as(x), atol=1e-5)

    z = sae.encode(x)[..., 11]
    clamp = steering_edit(sae, [SteerFeature(11, 2.5, "clamp")])(x)
    assert torch.allclose(clamp - x, (2.5 - z)[..., None] * sae.W_dec[11], atol=1e-5)

    both = steering_edit(sae, [SteerFeature(7, 3.0), SteerFeature(11, 2.5, "clamp")])(x)
    assert torch.allclose(both, add + (clamp - x), atol=1e-5), "adds sum; clamps read z of the unedited x"


def test_zero_strength_is_the_baseline(tiny_llama, tiny_tokenizer, sae):
    base = generate(tiny_llama, tiny_tokenizer, "Hello there", sae, HOOK, [], GREEDY)
    zero = generate(tiny_llama, tiny_tokenizer, "Hello there", sae, HOOK, [SteerFeature(5, 0.0)], GREEDY)
    assert base.token_ids == zero.token_ids and len(base.token_ids) == 8
    strong = generate(tiny_llama, tiny_tokenizer, "Hello there", sae, HOOK, [SteerFeature(5, 200.0)], GREEDY)
    assert strong.token_ids != base.token_ids and strong.label == "latent 5 add +200"


def test_generated_positions_are_steered_with_the_cache(tiny_llama, tiny_tokenizer, sae):
    """With use_cache the edit sees the prompt once and then T = 1 per new token; the output
    equals a no-cache greedy loop steered at every position."""
    feats = [SteerFeature(9, 40.0)]
    edit = steering_edit(sae, feats)
    seen = []

    def spy(x):
        seen.append(x.shape[1])
        return edit(x)

    prompt = "The quick brown"
    ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
    with patched(tiny_llama, {HOOK: spy}), torch.no_grad():
        out = tiny_llama.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True,
                                  pad_token_id=tiny_tokenizer.pad_token_id)
    assert seen == [ids.shape[1], 1, 1, 1, 1]
    loop = ids
    with patched(tiny_llama, {HOOK: edit}), torch.no_grad():
        for _ in range(5):
            nxt = tiny_llama(loop, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            loop = torch.cat([loop, nxt], 1)
    assert out.tolist() == loop.tolist()
    got = generate(tiny_llama, tiny_tokenizer, prompt, sae, HOOK, feats,
                   GenerationConfig(max_new_tokens=5, temperature=0))
    assert got.token_ids == loop[0, ids.shape[1]:].tolist()[: len(got.token_ids)]


def test_steer_prompt_false_leaves_the_prompt_alone(tiny_llama, tiny_tokenizer, sae):
    gen = GenerationConfig(max_new_tokens=1, temperature=0, steer_prompt=False)
    base = generate(tiny_llama, tiny_tokenizer, "Hello", sae, HOOK, [], gen)
    first = generate(tiny_llama, tiny_tokenizer, "Hello", sae, HOOK, [SteerFeature(5, 500.0)], gen)
    assert first.token_ids == base.token_ids, "the first new token is predicted from the unsteered prompt"


def test_same_seed_same_sample(tiny_llama, tiny_tokenizer, sae):
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    a = generate(tiny_llama, tiny_tokenizer, "Once", sae, HOOK, [], gen)
    b = generate(tiny_llama, tiny_tokenizer, "Once", sae, HOOK, [], gen)
    c = generate(tiny_llama, tiny_tokenizer, "Once", sae, HOOK, [], GenerationConfig(max_new_tokens=10, seed=12))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_modes_rows_and_perplexity(tiny_llama, tiny_tokenizer, sae):
    feats = [SteerFeature(3, 20.0), SteerFeature(4, 1.5, "clamp")]
    rows = steer(tiny_llama, tiny_tokenizer, sae, HOOK, ["Hi", "Yes"], feats, "compare", GREEDY)
    assert [r.label for r in rows] == ["baseline", "latent 3 add +20", "latent 4 clamp 1.5"] * 2
    assert [r.prompt for r in rows] == ["Hi"] * 3 + ["Yes"] * 3
    blend = steer(tiny_llama, tiny_tokenizer, sae, HOOK, ["Hi"], feats, "blend", GREEDY)
    assert [r.label for r in blend] == ["baseline", "latent 3 add +20, latent 4 clamp 1.5"]
    sweep = steer(tiny_llama, tiny_tokenizer, sae, HOOK, ["Hi"], feats[:1], "sweep", GREEDY, strengths=[0, 50])
    assert [r.label for r in sweep] == ["baseline", "latent 3 add +0", "latent 3 add +50"]
    assert sweep[1].token_ids == sweep[0].token_ids

    r = rows[1]
    ids = tiny_tokenizer("Hi", return_tensors="pt")["input_ids"][0].tolist()
    full = torch.tensor([ids + r.token_ids])
    with torch.no_grad():
        logp = tiny_llama(full).logits[0].log_softmax(-1)
    nll = -sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(r.token_ids)) / len(r.token_ids)
    assert r.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert perplexity(tiny_llama, tiny_tokenizer, "Hi", []) is None


@pytest.mark.parametrize("features, mode, kwargs, message", [
    ([SteerFeature(999, 1.0)], "compare", {}, "latent 999 is out of range: this SAE has latents 0-255"),
    ([SteerFeature(1, float("nan"))], "compare", {}, "is not a finite number"),
    ([SteerFeature(1, 1.0, "multiply")], "compare", {}, "steering mode 'multiply'"),
    ([SteerFeature(1, 1.0)], "shuffle", {}, "steering mode 'shuffle'"),
    ([SteerFeature(1, 1.0), SteerFeature(2, 1.0)], "sweep", {"strengths": [1.0]}, "exactly one feature"),
    ([], "blend", {}, "at least one feature"),
])
def test_bad_requests_are_one_line_errors(tiny_llama, tiny_tokenizer, sae, features, mode, kwargs, message):
    with pytest.raises(UserError) as e:
        steer(tiny_llama, tiny_tokenizer, sae, HOOK, ["Hi"], features, mode, GREEDY, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overflowing_strength_stops_with_a_clear_error(tiny_llama, tiny_tokenizer, sae):
    """1e39 is a finite Python float but overflows float32: the edit stops generation."""
    with pytest.raises(UserError, match="latent 2 add \\+1e\\+39 produced non-finite activations"):
        steer(tiny_llama, tiny_tokenizer, sae, HOOK, ["Hi"], [SteerFeature(2, 1e39)], "blend", GREEDY)


def test_wrong_sae_width_and_empty_prompt(tiny_llama, tiny_tokenizer):
    with pytest.raises(UserError, match="SAE d_in=32 does not match"):
        steer(tiny_llama, tiny_tokenizer, build_sae("topk", 32, 64, k=4), HOOK, ["Hi"], [SteerFeature(1, 1.0)])
    with pytest.raises(UserError, match="prompt is empty"):
        steer(tiny_llama, tiny_tokenizer, build_sae("topk", 64, 64, k=4), HOOK, ["  "], [SteerFeature(1, 1.0)])


def test_experiment_json_round_trip(tiny_llama, tiny_tokenizer, sae):
    feats = [SteerFeature(3, 20.0)]
    rows = steer(tiny_llama, tiny_tokenizer, sae, HOOK, ["Hi"], feats, "compare", GREEDY)
    exp = Experiment("compare", ["Hi"], feats, GREEDY, rows, hook_name=HOOK, sae="sae-1", name="t")
    back = Experiment.from_json(exp.to_json())
    assert back == exp
    with pytest.raises(UserError, match="not a steering experiment"):
        Experiment.from_json('{"mode": "compare"}')


@pytest.mark.slow
def test_steering_smollm2(smollm2_dir):
    """On the real model the baseline answers "Paris", an add along one decoder direction
    changes the continuation, and perplexities are finite."""
    from core.models import load_model

    model, tok = load_model(smollm2_dir)
    torch.manual_seed(0)
    sae = build_sae("topk", 576, 4608, k=32)
    hook = "blocks.15.hook_resid_post"
    rows = steer(model, tok, sae, hook, ["The capital of France is"], [SteerFeature(10, 60.0)], "compare",
                 GenerationConfig(max_new_tokens=6, temperature=0))
    assert "Paris" in rows[0].text
    assert rows[1].token_ids != rows[0].token_ids
    assert all(r.perplexity is not None and math.isfinite(r.perplexity) and r.perplexity > 1 for r in rows)
