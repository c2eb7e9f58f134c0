"""Feature analysis from the weights and measured on the model: logit effects, similar features,
and the ablation effect. Nothing here is estimated: each number is a product of weights or
the difference of two forward passes.

* Logit effects: the decoder direction W_dec[i] pushed through the unembedding, W_U · d. The
  final norm's elementwise scale is folded in (RMSNorm: weight, Gemma's RMSNorm: 1 + weight;
  LayerNorm also removes the direction's mean, its linear part). Its per-position 1/RMS factor
  depends on the whole residual stream, not on the feature, and is not applied; so the values
  rank tokens, they are not logit changes of a particular input.
* Similar features: cosine similarity of decoder rows.
* Ablation effect: on contexts where the latent fires, the change in next-token loss when only
  that latent's contribution z_i(x)·W_dec[i] is removed from the activation at every position
  (the SAE's error term and every other latent stay).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from core import hooks
from core.data import decode_tokens, read_rows
from core.errors import UserError
from core.formats.saelens import load_saelens
from core.progress import check_cancel

Progress = Callable[[dict], None] | None
CancelCheck = Callable[[], bool] | None

NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "model_norm")


class LogitEffects(NamedTuple):
    latents: list[int]
    top_ids: list[list[int]]
    """Per latent, token ids it promotes most, strongest first."""
    top_values: list[list[float]]
    bottom_ids: list[list[int]]
    """Per latent, token ids it suppresses most, strongest first."""
    bottom_values: list[list[float]]
    final_norm: str
    """What was applied between the direction and the unembedding."""


class AblationEffect(NamedTuple):
    latent: int
    n_contexts: int
    """Contexts measured (those with a next token after the max position)."""
    activation: list[float]
    """The latent's activation at each context's max position."""
    delta_loss_at_max: list[float]
    """Per context: CE(ablated) − CE(clean) for the token after the max position (nats)."""
    delta_loss_after: list[float]
    """Per context: mean CE change over the next tokens from the max position on (nats)."""
    mean_delta_loss_at_max: float
    mean_delta_loss_after: float
    dropped_ids: list[int]
    """Tokens whose log-probability after the max position fell most when ablated (mean over contexts)."""
    dropped_values: list[float]
    raised_ids: list[int]
    raised_values: list[float]


def _check_latents(sae, latents: Sequence[int]) -> list[int]:
    d_sae = int(sae.W_dec.shape[0])
    bad = [i for i in latents if not 0 <= int(i) < d_sae]
    if bad:
        raise UserError(f"latent {bad[0]} is out of range: this SAE has latents 0-{d_sae - 1}")
    return [int(i) for i in latents]


def final_norm(model) -> torch.nn.Module | None:
    """The norm applied to the residual stream right before the unembedding, found by name in
    the decoder stack (model.norm, transformer.ln_f, gpt_neox.final_layer_norm, ...)."""
    base = getattr(model, "base_model", model)
    for holder in (base, getattr(base, "model", None), getattr(base, "language_model", None)):
        for name in NORM_NAMES:
            mod = getattr(holder, name, None) if holder is not None else None
            if isinstance(mod, torch.nn.Module) and hasattr(mod, "weight"):
                return mod
    return None


def _fold_norm(model, directions: torch.Tensor, apply: bool) -> tuple[torch.Tensor, str]:
    norm = final_norm(model) if apply else None
    if norm is None:
        return directions, "no final norm applied" + ("" if not apply else " (none found)")
    w = norm.weight.detach().float().to(directions.device)
    kind = type(norm).__name__
    if kind.startswith("Gemma"):  # Gemma's RMSNorm scales by (1 + weight)
        w = 1.0 + w
    if isinstance(norm, torch.nn.LayerNorm):
        directions = directions - directions.mean(dim=-1, keepdim=True)
        what = f"final LayerNorm's mean removal and scale folded in ({kind})"
    else:
        what = f"final norm scale folded in ({kind}{' 1 + weight' if kind.startswith('Gemma') else ' weight'})"
    return directions * w, what + "; the per-position normalisation is not applied"


@torch.no_grad()
def logit_effects(model, sae, latents: Sequence[int] | None = None, n: int = 10, apply_final_norm: bool = True,
                  chunk: int = 256) -> LogitEffects:
    """Top-n promoted and suppressed tokens of each latent's decoder direction (all latents when
    `latents` is None), chunked so at most [chunk, vocab] logits exist at once."""
    W_U = model.get_output_embeddings().weight.detach()
    latents = list(range(int(sae.W_dec.shape[0]))) if latents is None else _check_latents(sae, latents)
    n = min(n, int(W_U.shape[0]))
    out: dict[str, list] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": []}
    what = ""
    for start in range(0, len(latents), chunk):
        idx = torch.tensor(latents[start:start + chunk], dtype=torch.long)
        d = sae.W_dec.detach()[idx].float().to(W_U.device)
        d, what = _fold_norm(model, d, apply_final_norm)
        logits = d @ W_U.float().T  # [chunk, vocab]
        tv, ti = logits.topk(n, dim=1)
        bv, bi = (-logits).topk(n, dim=1)
        out["top_ids"] += ti.tolist()
        out["top_values"] += tv.tolist()
        out["bottom_ids"] += bi.tolist()
        out["bottom_values"] += (-bv).tolist()
    return LogitEffects(latents, **out, final_norm=what)


@torch.no_grad()
def similar_features(sae, latents: Sequence[int] | None = None, n: int = 10,
                     chunk: int = 1024) -> tuple[list[list[int]], list[list[float]]]:
    """Per latent, the n other latents with the highest decoder cosine similarity, and the cosines."""
    W = sae.W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    latents = list(range(W.shape[0])) if latents is None else _check_latents(sae, latents)
    n = min(n, W.shape[0] - 1)
    ids, vals = [], []
    for start in range(0, len(latents), chunk):
        idx = torch.tensor(latents[start:start + chunk], dtype=torch.long)
        cos = W[idx] @ W.T
        cos[torch.arange(len(idx)), idx] = -torch.inf  # not itself
        v, i = cos.topk(n, dim=1)
        ids += i.tolist()
        vals += v.tolist()
    return ids, vals


def _pad(contexts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for r, c in enumerate(contexts):
        ids[r, :len(c)] = torch.as_tensor(c, dtype=torch.long)
        mask[r, :len(c)] = 1
    return ids, mask


@torch.no_grad()
def ablation_effect(model, sae, hook_name: str, contexts: Sequence[torch.Tensor], positions: Sequence[int],
                    latent: int, n_tokens: int = 5, pad_id: int = 0) -> AblationEffect:
    """Measured change in next-token loss when `latent` is removed at `hook_name`.

    `contexts` are token-id rows as the model read them (1-D); `positions[j]` is where the latent
    fired strongly in context j. The contexts are run right-padded in one batch, clean and with
    x − z_latent(x)·W_dec[latent] at every position; padding never enters an average. A context
    whose max position is its last token has no next token and is skipped.
    """
    (latent,) = _check_latents(sae, [latent])
    hooks.validate_hooks(model, [hook_name])
    d_model = int(model.get_input_embeddings().embedding_dim)
    if int(sae.W_dec.shape[1]) != d_model:
        raise UserError(f"SAE d_in={int(sae.W_dec.shape[1])} does not match {hook_name} of this model "
                        f"(d_model={d_model}); pick the model the SAE was trained on")
    if len(contexts) != len(positions):
        raise UserError(f"{len(contexts)} contexts but {len(positions)} positions; give one position per context")
    for c, p in zip(contexts, positions):
        if not 0 <= p < len(c):
            raise UserError(f"position {p} is outside a context of {len(c)} tokens")
    keep = [j for j, (c, p) in enumerate(zip(contexts, positions)) if p < len(c) - 1]
    if not keep:
        raise UserError("no context has a token after the latent's position; give longer contexts")
    contexts = [contexts[j] for j in keep]
    positions = torch.tensor([positions[j] for j in keep])
    device = next(model.parameters()).device
    ids, mask = _pad(contexts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    direction = sae.W_dec.detach()[latent].float()
    seen: dict[str, torch.Tensor] = {}

    def ablate(x: torch.Tensor) -> torch.Tensor:
        z = sae.encode(x.float())[..., latent]
        seen["z"] = z
        return x.float() - z[..., None] * direction.to(x.device)

    clean = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    with hooks.patched(model, {hook_name: ablate}):
        ablated = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    targets = ids[:, 1:]
    nll_clean = -clean[:, :-1].gather(2, targets[..., None])[..., 0]  # [B, T-1]: predicting token t+1
    nll_abl = -ablated[:, :-1].gather(2, targets[..., None])[..., 0]
    delta = (nll_abl - nll_clean).cpu()
    valid = (mask[:, 1:].bool()).cpu()  # a real next token
    t = torch.arange(delta.shape[1])
    after = valid & (t[None, :] >= positions[:, None])
    rows = torch.arange(len(contexts))
    at_max = delta[rows, positions]
    mean_after = (delta * after).sum(1) / after.sum(1)
    dlogp = (ablated[rows, positions.to(device)] - clean[rows, positions.to(device)]).mean(0)  # [vocab]
    dv, di = dlogp.topk(n_tokens, largest=False)
    rv, ri = dlogp.topk(n_tokens)
    return AblationEffect(
        latent=latent, n_contexts=len(contexts), activation=seen["z"][rows, positions.to(device)].tolist(),
        delta_loss_at_max=at_max.tolist(), delta_loss_after=mean_after.tolist(),
        mean_delta_loss_at_max=float(at_max.mean()), mean_delta_loss_after=float(mean_after.mean()),
        dropped_ids=di.tolist(), dropped_values=dv.tolist(), raised_ids=ri.tolist(), raised_values=rv.tolist())


@dataclass
class AnalyzeConfig:
    """What `analyze_features` computes; every number is measured or read off the weights."""

    n_logits: int = 10
    """Promoted and suppressed tokens per latent (logit effects)."""
    n_similar: int = 10
    """Nearest latents by decoder cosine."""
    n_coactive: int = 10
    """Latents most often firing at the same tokens as the latent's examples."""
    nlp: bool = True
    """spaCy summary of each latent's top contexts."""
    ablation_latents: list[int] = field(default_factory=list)
    """Latents whose ablation effect is measured (two forwards over their contexts each)."""
    ablation_top: int = 8
    """Also measure the ablation of this many of the most frequent live latents."""
    ablation_contexts: int = 8
    """Top contexts per measured latent."""
    ablation_after: int = 16
    """Tokens after the max position kept in each context (the row's prefix is always whole)."""

def analyze_features(model, tokenizer, sae_dir: Path, features_dir: Path, dataset_dir: Path | None, cfg: AnalyzeConfig,
                     latents: Sequence[int] | None = None, progress: Progress = None,
                     should_cancel: CancelCheck = None) -> dict[int, dict[str, Any]]:
    """Per live latent (or `latents`): logit effects, similar and co-active features, an NLP
    summary, and for a chosen few the measured ablation effect — as JSON-ready dicts."""
    from core import nlp
    from core.features import FeatureQuery
    from core.features import store as features_store

    sae, sae_cfg = load_saelens(sae_dir)
    sae = sae.to(next(model.parameters()).device)
    live = [f["latent"] for f in features_store.feature_page(features_dir, FeatureQuery(live_only=True),
                                                             columns=["latent"]).rows]  # most frequent first
    targets = sorted(set(live if latents is None else latents))
    if not targets:
        return {}
    report = _stage_reporter(progress, len(targets))
    out: dict[int, dict[str, Any]] = {i: {} for i in targets}
    eff = logit_effects(model, sae, targets, n=cfg.n_logits)
    strings = lambda rows: [decode_tokens(tokenizer, r) for r in rows]
    for j, i in enumerate(targets):
        out[i]["logits"] = {"pos_str": strings([eff.top_ids[j]])[0], "pos_values": eff.top_values[j],
                            "neg_str": strings([eff.bottom_ids[j]])[0], "neg_values": eff.bottom_values[j],
                            "final_norm": eff.final_norm}
    ids, cos = similar_features(sae, targets, n=cfg.n_similar)
    for j, i in enumerate(targets):
        out[i]["similar"] = [[a, b] for a, b in zip(ids[j], cos[j])]
    report("logits and similar features", len(targets))

    examples = features_store.examples_by_latent(features_dir, targets, columns=ANALYSIS_EXAMPLE_COLUMNS)
    for i in targets:
        out[i]["coactive"] = features_store.rank_coactive(examples.get(i, []), cfg.n_coactive)
    if cfg.nlp:
        for start in range(0, len(targets), 512):  # one spaCy pass per chunk of latents
            _check(should_cancel)
            chunk = targets[start:start + 512]
            tops = {i: [e for e in examples.get(i, []) if e["kind"] == "top"] for i in chunk}
            for i, summary in nlp.analyze_many(tops).items():
                out[i]["nlp"] = summary.to_dict()
            report("NLP", start + len(chunk))
    # ablation re-reads the contexts' rows: only possible when the discovery dataset is known
    chosen = [i for i in dict.fromkeys([*cfg.ablation_latents, *live[:cfg.ablation_top]]) if i in out] \
        if dataset_dir is not None else []
    for n_done, i in enumerate(chosen, start=1):
        _check(should_cancel)
        top = [e for e in examples.get(i, []) if e["kind"] == "top"][: cfg.ablation_contexts]
        rows = read_rows(dataset_dir, [e["row_id"] for e in top])
        ctx = [torch.from_numpy(rows[e["row_id"]][: e["pos"] + 1 + cfg.ablation_after]) for e in top]
        try:
            ab = ablation_effect(model, sae, sae_cfg.hook_name, ctx, [e["pos"] for e in top], i,
                                          pad_id=tokenizer.pad_token_id or 0)
        except UserError as e:  # e.g. every context ends at its max token: say so on the feature
            out[i]["ablation"] = {"error": str(e)}
            continue
        d = ab._asdict()
        d["dropped_str"] = decode_tokens(tokenizer, ab.dropped_ids)
        d["raised_str"] = decode_tokens(tokenizer, ab.raised_ids)
        out[i]["ablation"] = d
        report("ablation", n_done, len(chosen))
    return out

def _check(should_cancel: CancelCheck) -> None:
    check_cancel(should_cancel, "analysis")

def _stage_reporter(progress: Progress, total: int):
    def report(stage: str, done: int, of: int | None = None):
        if progress is not None:
            progress({"phase": "analyze", "stage": stage, "done": done, "total": of or total, "unit": "latents"})
    return report

ANALYSIS_EXAMPLE_COLUMNS = ["latent", "kind", "row_id", "pos", "tokens", "max_index", "coactive_latents",
                            "coactive_acts"]
"""The example columns a feature analysis reads."""
