"""Steering: generate with SAE feature directions added or clamped at the SAE's own hook site.

Two edits, applied to the activation x at every position the model computes (prompt and
generated tokens alike; the KV cache stays on, so each generated step sees T = 1):

* add:   x + strength · W_dec[i] / ‖W_dec[i]‖ — a fixed push along the feature's direction;
* clamp: x + (strength − z_i(x)) · W_dec[i], with z = sae.encode(x) — the feature's activation is
  set to `strength` while the SAE's error term and every other latent stay as they were.

Several features compose: the adds sum, and every clamp reads z of the unedited x. Modes:
compare (each feature alone), blend (all together) and sweep (one feature at several
strengths), each beside an unsteered baseline generated with the same seed. Every output's
perplexity is measured under the unsteered model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from core import hooks
from core.errors import UserError

MODES = ("compare", "blend", "sweep")
EDITS = ("add", "clamp")


@dataclass
class SteerFeature:
    latent: int
    strength: float
    """add: how far along the unit decoder direction; clamp: the activation to hold."""
    mode: str = "add"
    """add or clamp."""

    def label(self) -> str:
        sign = "+" if self.mode == "add" and self.strength >= 0 else ""
        return f"latent {self.latent} {self.mode} {sign}{self.strength:g}"


@dataclass
class GenerationConfig:
    max_new_tokens: int = 40
    temperature: float = 1.0
    """0 decodes greedily; above 0 samples."""
    top_p: float = 1.0
    top_k: int = 0
    """0 keeps every token."""
    repetition_penalty: float = 1.0
    seed: int = 0
    """Reseeded before every generation, so baseline and steered outputs draw the same random stream."""
    steer_prompt: bool = True
    """Steer the prompt's positions too; False steers only the generated ones."""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        # Written so that NaN fails each test (every comparison with NaN is false).
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0 and self.repetition_penalty > 0
                and math.isfinite(self.temperature) and math.isfinite(self.repetition_penalty)):
            raise UserError(f"use a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0 and a finite "
                            f"repetition_penalty > 0 (got temperature={self.temperature}, top_p={self.top_p}, "
                            f"top_k={self.top_k}, repetition_penalty={self.repetition_penalty})")


@dataclass
class Generation:
    prompt: str
    label: str
    """"baseline" or what was steered, e.g. "latent 12 add +8"."""
    features: list[SteerFeature]
    text: str
    """The generated continuation (new tokens only, special tokens skipped)."""
    token_ids: list[int]
    perplexity: float | None = None
    """exp(mean NLL of the generated tokens) under the unsteered model, given the prompt (None
    when nothing was generated)."""


def check_features(sae, features: list[SteerFeature]) -> None:
    d_sae = int(sae.W_dec.shape[0])
    for f in features:
        if not 0 <= f.latent < d_sae:
            raise UserError(f"latent {f.latent} is out of range: this SAE has latents 0-{d_sae - 1}")
        if f.mode not in EDITS:
            raise UserError(f"steering mode {f.mode!r} is not one of {', '.join(EDITS)}")
        if not math.isfinite(f.strength):
            raise UserError(f"strength {f.strength} on latent {f.latent} is not a finite number")


def steering_edit(sae, features: list[SteerFeature]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edit for `hooks.patched`: adds and clamps of `features` on activations [B, T, d]."""
    check_features(sae, features)
    adds = [f for f in features if f.mode == "add"]
    clamps = [f for f in features if f.mode == "clamp"]
    W = sae.W_dec.detach().float()
    push = sum((f.strength * W[f.latent] / W[f.latent].norm().clamp_min(1e-12) for f in adds),
               torch.zeros(W.shape[1], device=W.device))
    idx = torch.tensor([f.latent for f in clamps], dtype=torch.long, device=W.device)
    target = torch.tensor([f.strength for f in clamps], dtype=torch.float32, device=W.device)

    def edit(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf + push.to(xf.device)
        if len(idx):
            z = sae.encode(xf)[..., idx]  # of the unedited x
            out = out + (target.to(xf.device) - z) @ W[idx].to(xf.device)
        if not torch.isfinite(out).all():
            raise UserError(f"steering with {', '.join(f.label() for f in features)} produced non-finite "
                            "activations; use a smaller strength")
        return out
    return edit


class _FiniteLogits:
    """A logits processor that stops generation on NaN/inf logits with a one-line error."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, input_ids, scores):
        if not torch.isfinite(scores).all():
            raise UserError(f"{self.what} produced non-finite logits; use a smaller strength")
        return scores


def _after_first(edit):
    """The edit on every forward but the first: with the KV cache on, the first forward of a
    generation reads the prompt and each later one a generated token."""
    calls = [0]

    def gated(x):
        calls[0] += 1
        return x if calls[0] == 1 else edit(x)
    return gated


@torch.no_grad()
def generate(model, tokenizer, prompt: str, sae, hook_name: str, features: list[SteerFeature],
             gen: GenerationConfig) -> Generation:
    """One generation of `prompt` with `features` steered (none: the baseline)."""
    from transformers import LogitsProcessorList

    if not prompt.strip():
        raise UserError("a steering prompt is empty; give some text to continue")
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    label = ", ".join(f.label() for f in features) or "baseline"
    edits = {}
    if features:
        edit = steering_edit(sae, features)
        edits[hook_name] = edit if gen.steer_prompt else _after_first(edit)
    sampling = gen.temperature > 0
    torch.manual_seed(gen.seed)
    with hooks.patched(model, edits):
        out = model.generate(
            **enc, max_new_tokens=gen.max_new_tokens, do_sample=sampling, use_cache=True,
            temperature=gen.temperature if sampling else None, top_p=gen.top_p if sampling else None,
            top_k=gen.top_k if sampling else None, repetition_penalty=gen.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([_FiniteLogits(label)]))
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return Generation(prompt, label, list(features), tokenizer.decode(new, skip_special_tokens=True), new)


@torch.no_grad()
def perplexity(model, tokenizer, prompt: str, token_ids: list[int]) -> float | None:
    """exp(mean NLL) of `token_ids` following `prompt` under `model` as it is (no hooks)."""
    if not token_ids:
        return None
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
    ids = torch.tensor([prompt_ids + list(token_ids)], device=device)
    logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids):])
    return float(nll.exp())


def _runs(mode: str, features: list[SteerFeature], strengths: list[float] | None) -> list[list[SteerFeature]]:
    """The feature sets to generate with, baseline first."""
    if mode not in MODES:
        raise UserError(f"steering mode {mode!r} is not one of {', '.join(MODES)}")
    if not features:
        raise UserError("pick at least one feature to steer with")
    if mode == "compare":
        return [[]] + [[f] for f in features]
    if mode == "blend":
        return [[], list(features)]
    if len(features) != 1 or not strengths:
        raise UserError("a sweep takes exactly one feature and a list of strengths")
    if not all(math.isfinite(s) for s in strengths):
        raise UserError(f"sweep strengths {strengths} must all be finite numbers")
    return [[]] + [[dataclasses.replace(features[0], strength=float(s))] for s in strengths]


def steer(model, tokenizer, sae, hook_name: str, prompts: list[str], features: list[SteerFeature],
          mode: str = "compare", gen: GenerationConfig | None = None, strengths: list[float] | None = None,
          progress: Callable[[dict], None] | None = None) -> list[Generation]:
    """Baseline and steered generations for every prompt, each with its perplexity."""
    gen = gen or GenerationConfig()
    gen.check()
    d_model = int(model.get_input_embeddings().embedding_dim)
    if int(sae.W_dec.shape[1]) != d_model:
        raise UserError(f"SAE d_in={int(sae.W_dec.shape[1])} does not match {hook_name} of this model "
                        f"(d_model={d_model}); pick the model the SAE was trained on")
    hooks.validate_hooks(model, [hook_name])
    if not prompts:
        raise UserError("give at least one prompt")
    runs = _runs(mode, features, strengths)
    for run in runs:
        check_features(sae, run)
    out = []
    total = len(prompts) * len(runs)
    for prompt in prompts:
        for run in runs:
            g = generate(model, tokenizer, prompt, sae, hook_name, run, gen)
            g.perplexity = perplexity(model, tokenizer, prompt, g.token_ids)
            out.append(g)
            if progress:
                progress({"phase": "steer", "done": len(out), "total": total, "unit": "generations"})
    return out


@dataclass
class Experiment:
    """A steering run as saved and exported: what was asked and every output."""

    mode: str
    prompts: list[str]
    features: list[SteerFeature]
    generation: GenerationConfig
    outputs: list[Generation]
    hook_name: str = ""
    sae: str = ""
    """The SAE's id or name."""
    strengths: list[float] = field(default_factory=list)
    name: str = ""
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Experiment":
        feats = lambda fs: [SteerFeature(**f) for f in fs]
        try:
            return cls(**{**d, "features": feats(d["features"]), "generation": GenerationConfig(**d["generation"]),
                          "outputs": [Generation(**{**o, "features": feats(o["features"])}) for o in d["outputs"]]})
        except (KeyError, TypeError) as e:
            raise UserError(f"not a steering experiment ({e}); export one with: mistudio steer export") from None

    @classmethod
    def from_json(cls, text: str) -> "Experiment":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"a steering experiment file is not JSON ({e.msg} at line {e.lineno})") from None
