"""Feature analysis from the weights, from discovery's data and measured on the model: logit
effects, similar features, co-occurring features, NLP summaries and the ablation effect. Nothing
here is estimated: each number is a product of weights, a count over discovery's examples, or
the difference of two forward passes.

* Logit effects: the decoder direction W_dec[i] pushed through the unembedding, W_U · d. The
  final norm's elementwise scale is folded in (RMSNorm: weight, Gemma's RMSNorm: 1 + weight;
  LayerNorm also removes the direction's mean, its linear part). Its per-position 1/RMS factor
  depends on the whole residual stream, not on the feature, and is not applied; so the values
  rank tokens, they are not logit changes of a particular input.
* Similar features: the exact top-n decoder cosines, from W_dec @ W_dec.T computed in blocks
  with a running top-n (the whole matrix of a 65,536-latent SAE would be 17 GB).
* Co-occurring features: over a latent's examples (top and quantile), how often each other
  latent was among the strongest at the example's token (discovery's `coactive_latents`),
  counted for a block of latents at a time in numpy.
* Ablation effect: core/ablation.py.

Every stage works on all latents of a wide SAE in matrix operations over blocks whose size
bounds memory (see `AnalyzeConfig`); the job reports each stage's progress and can be limited
to chosen latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from core.ablation import Ablation, AblationEffect, ablation_effect, ablation_effects  # noqa: F401 (re-exported)
from core.data import decode_tokens, read_rows
from core.errors import UserError, at_least_one
from core.formats.saelens import load_saelens
from core.latents import check_latents
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


def _check_latents(sae, latents: Sequence[int] | None) -> list[int]:
    """`latents` in the given order (all latents when None), each checked against the SAE."""
    d_sae = int(sae.W_dec.shape[0])
    if latents is None:
        return list(range(d_sae))
    check_latents(latents, d_sae)
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
                  chunk: int = 512, progress: Callable[[int], None] | None = None,
                  should_cancel: CancelCheck = None) -> LogitEffects:
    """Top-n promoted and suppressed tokens of each latent's decoder direction (all latents when
    `latents` is None), chunked so at most [chunk, vocab] logits exist at once (512 × 49,152
    fp32 = 100 MB); `progress(done)` after each chunk."""
    W_U = model.get_output_embeddings().weight.detach().float()
    latents = _check_latents(sae, latents)
    n = min(n, int(W_U.shape[0]))
    tops, bottoms, what = [], [], ""
    for start in range(0, len(latents), chunk):
        check_cancel(should_cancel, "analysis")
        idx = torch.tensor(latents[start:start + chunk], dtype=torch.long)
        d, what = _fold_norm(model, sae.W_dec.detach()[idx].float().to(W_U.device), apply_final_norm)
        logits = d @ W_U.T  # [chunk, vocab]
        tops.append(logits.topk(n, dim=1))
        bottoms.append(logits.topk(n, dim=1, largest=False))
        if progress is not None:
            progress(min(start + chunk, len(latents)))
    cat = lambda parts, k: torch.cat([p[k] for p in parts]).tolist() if parts else []
    return LogitEffects(latents, cat(tops, 1), cat(tops, 0), cat(bottoms, 1), cat(bottoms, 0), final_norm=what)


@torch.no_grad()
def similar_features(sae, latents: Sequence[int] | None = None, n: int = 10, chunk: int = 1024,
                     block: int = 8192, progress: Callable[[int], None] | None = None,
                     should_cancel: CancelCheck = None) -> tuple[list[list[int]], list[list[float]]]:
    """Per latent, the n other latents with the highest decoder cosine similarity, and the
    cosines — exact: every pair is computed, a [chunk, block] tile of W @ W.T at a time (32 MB
    at the defaults), and each row keeps a running top-n over its tiles.

    Among the asked latents the matrix is symmetric, so each pair is computed once: row block I
    meets the asked latents from block I on, and a tile's transpose updates the later blocks'
    rows (after block I, its rows are final). Against the other latents it is one-sided."""
    W = sae.W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    latents = _check_latents(sae, latents)
    d_sae = W.shape[0]
    n = min(n, d_sae - 1)
    asked = torch.tensor(sorted(set(latents)), dtype=torch.long)
    others = torch.ones(d_sae, dtype=torch.bool)
    others[asked] = False
    others = others.nonzero()[:, 0]
    best = _RunningTop(len(asked), n)
    for start in range(0, len(asked), chunk):
        check_cancel(should_cancel, "analysis")
        rows = slice(start, min(start + chunk, len(asked)))
        for col in range(start, len(asked), block):  # asked × asked, from this block on
            cols = slice(col, min(col + block, len(asked)))
            cos = W[asked[rows]] @ W[asked[cols]].T
            own = torch.arange(cols.start, max(cols.start, min(rows.stop, cols.stop)))  # a row is not its own neighbour
            cos[own - rows.start, own - cols.start] = -torch.inf
            best.add(rows, cos, asked[cols])
            later = slice(max(cols.start, rows.stop), cols.stop)  # rows of later blocks: by symmetry
            if later.start < later.stop:
                best.add(later, cos[:, later.start - cols.start:].T, asked[rows])
        for col in range(0, len(others), block):  # asked × the rest
            ids = others[col:col + block]
            best.add(rows, W[asked[rows]] @ W[ids].T, ids)
        if progress is not None:
            progress(rows.stop)
    at = {int(i): j for j, i in enumerate(asked.tolist())}
    order = torch.tensor([at[i] for i in latents], dtype=torch.long)
    return best.ids[order].tolist(), best.values[order].tolist()


class _RunningTop:
    """The n largest values seen so far per row, and their column ids."""

    def __init__(self, rows: int, n: int):
        self.n = n
        self.values = torch.full((rows, n), -torch.inf)
        self.ids = torch.full((rows, n), -1, dtype=torch.long)

    def add(self, rows: slice, tile: torch.Tensor, col_ids: torch.Tensor) -> None:
        v, i = tile.topk(min(self.n, tile.shape[1]), dim=1)
        v = torch.cat([self.values[rows], v], 1)
        i = torch.cat([self.ids[rows], col_ids[i]], 1)
        top, pick = v.topk(self.n, dim=1)
        self.values[rows], self.ids[rows] = top, i.gather(1, pick)


def coactive_counts(features_dir: Path, latents: Sequence[int], n: int = 10, block: int = 4096,
                    progress: Callable[[int], None] | None = None,
                    should_cancel: CancelCheck = None) -> dict[int, list[dict]]:
    """Per latent (those with examples), the n latents most often co-active at its examples'
    tokens: [{latent, count, mean_act}], most frequent first, ties by larger mean activation,
    then by latent number — the ranking of `core.features.store.rank_coactive`, counted here for
    `block` latents at a time from the Arrow columns (no Python row per example)."""
    from core.features import store

    wanted = np.unique(np.asarray(list(latents), dtype=np.int64))
    out: dict[int, list[dict]] = {}
    if not len(wanted):
        return out
    lo = int(wanted[0])
    while lo <= wanted[-1]:
        check_cancel(should_cancel, "analysis")
        hi = lo + block
        t = store.example_block(features_dir, lo, hi, ["latent", "coactive_latents", "coactive_acts"])
        out.update(_rank_block(t, wanted[(wanted >= lo) & (wanted < hi)], n))
        if progress is not None:
            progress(int((wanted < hi).sum()))
        lo = int(wanted[np.searchsorted(wanted, hi)]) if hi <= wanted[-1] else hi
    return out


def _rank_block(t, wanted: np.ndarray, n: int) -> dict[int, list[dict]]:
    """The co-active ranking of the `wanted` latents of one block's example table."""
    if not t.num_rows:
        return {}
    owner = t.column("latent").to_numpy().astype(np.int64)
    co = t.column("coactive_latents").combine_chunks()
    acts = t.column("coactive_acts").combine_chunks()
    owner = np.repeat(owner, co.value_lengths().fill_null(0).to_numpy())
    other = co.flatten().to_numpy().astype(np.int64)
    act = acts.flatten().to_numpy().astype(np.float64)
    keep = np.isin(owner, wanted)
    owner, other, act = owner[keep], other[keep], act[keep]
    if not len(owner):
        return {}
    span = int(other.max()) + 1
    pair, inverse, count = np.unique(owner * span + other, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=act) / count
    own, oth = pair // span, pair % span
    order = np.lexsort((oth, -mean, -count, own))
    own, oth, count, mean = own[order], oth[order], count[order], mean[order]
    first = np.searchsorted(own, own, side="left")
    top = np.arange(len(own)) - first < n
    out: dict[int, list[dict]] = {}
    for o, x, c, m in zip(own[top].tolist(), oth[top].tolist(), count[top].tolist(), mean[top].tolist()):
        out.setdefault(o, []).append({"latent": x, "count": c, "mean_act": m})
    return out


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
    """Latents whose ablation effect is measured (two forwards over their contexts, shared with other latents)."""
    ablation_top: int = 8
    """Also measure the ablation of this many of the most frequent live latents."""
    ablation_contexts: int = 8
    """Top contexts per measured latent."""
    ablation_after: int = 16
    """Tokens after the max position kept in each context (the row's prefix is always whole)."""
    ablation_tokens: int = 2048
    """Padded token positions per ablation forward, rows of several latents together (bounds its
    [rows, positions, vocab] logits: 2048 × 49,152 fp32 = 400 MB)."""
    ablation_group: int = 16
    """Latents measured together: their rows share forwards, and progress moves once per group."""
    block_latents: int = 4096
    """Latents per block of the co-occurrence count and the NLP pass (bounds the examples held)."""

    def check(self) -> None:
        for name in ("n_logits", "n_similar", "n_coactive", "ablation_top", "ablation_contexts", "ablation_after"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)} must be 0 or more")
        at_least_one(ablation_tokens=self.ablation_tokens, ablation_group=self.ablation_group,
                     block_latents=self.block_latents)


PARSE_LATENTS = 256
"""Latents whose windows one spaCy pass parses (the NLP stage reports after each)."""


def nlp_summaries(features_dir: Path, latents: Sequence[int], block: int = 4096, per_feature: int = 10,
                  progress: Callable[[int], None] | None = None, should_cancel: CancelCheck = None) -> dict:
    """core.nlp summaries of each latent's top `per_feature` windows, read and parsed for
    `block` latents at a time (a window shared by several latents is parsed once per run)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from core import nlp
    from core.features import store

    wanted = sorted({int(i) for i in latents})
    cache: dict = {}
    out: dict[int, Any] = {}
    for s in range(0, len(wanted), block):
        check_cancel(should_cancel, "analysis")
        chunk = wanted[s:s + block]
        t = store.example_block(features_dir, chunk[0], chunk[-1] + 1, ["latent", "rank", "pos", "tokens", "max_index"],
                                kind="top")
        keep = pc.and_(pc.less(t.column("rank"), per_feature), pc.is_in(t.column("latent"), pa.array(chunk, pa.int32())))
        t = t.filter(keep)
        examples: dict[int, list[dict]] = {i: [] for i in chunk}
        for row in t.sort_by([("latent", "ascending"), ("rank", "ascending")]).to_pylist():
            examples[row["latent"]].append(row)
        for p in range(0, len(chunk), PARSE_LATENTS):  # parsed in parts so progress moves within a block
            part = chunk[p:p + PARSE_LATENTS]
            out.update(nlp.analyze_many({i: examples[i] for i in part}, per_feature=per_feature, cache=cache))
            if progress is not None:
                progress(s + p + len(part))
    return out


def analyze_features(model, tokenizer, sae_dir: Path, features_dir: Path, dataset_dir: Path | None, cfg: AnalyzeConfig,
                     latents: Sequence[int] | None = None, progress: Progress = None,
                     should_cancel: CancelCheck = None) -> dict[int, dict[str, Any]]:
    """Per live latent (or `latents`): logit effects, similar and co-active features, an NLP
    summary, and for a chosen few the measured ablation effect — as JSON-ready dicts. Progress
    names each stage ("logit effects", "similar features", "co-occurrence", "NLP", "ablation")."""
    from core.features import FeatureQuery
    from core.features import store as features_store

    cfg.check()
    sae, sae_cfg = load_saelens(sae_dir)
    sae = sae.to(next(model.parameters()).device)
    live = [f["latent"] for f in features_store.feature_page(features_dir, FeatureQuery(live_only=True),
                                                             columns=["latent"]).rows]  # most frequent first
    targets = sorted(set(live)) if latents is None else check_latents(latents, int(sae.W_dec.shape[0]))
    if not targets:
        return {}
    stage = _stage_reporter(progress, len(targets))
    out: dict[int, dict[str, Any]] = {i: {} for i in targets}
    eff = logit_effects(model, sae, targets, n=cfg.n_logits, progress=stage("logit effects"),
                        should_cancel=should_cancel)
    text = _token_strings(tokenizer, eff.top_ids + eff.bottom_ids)
    for j, i in enumerate(targets):
        out[i]["logits"] = {"pos_str": text(eff.top_ids[j]), "pos_values": eff.top_values[j],
                            "neg_str": text(eff.bottom_ids[j]), "neg_values": eff.bottom_values[j],
                            "final_norm": eff.final_norm}
    del eff
    ids, cos = similar_features(sae, targets, n=cfg.n_similar, progress=stage("similar features"),
                                should_cancel=should_cancel)
    for j, i in enumerate(targets):
        out[i]["similar"] = [[a, b] for a, b in zip(ids[j], cos[j])]
    del ids, cos
    co = coactive_counts(features_dir, targets, cfg.n_coactive, cfg.block_latents, stage("co-occurrence"),
                         should_cancel)
    for i in targets:
        out[i]["coactive"] = co.get(i, [])
    if cfg.nlp:
        for i, summary in nlp_summaries(features_dir, targets, cfg.block_latents, progress=stage("NLP"),
                                        should_cancel=should_cancel).items():
            out[i]["nlp"] = summary.to_dict()
    # ablation re-reads the contexts' rows: only possible when the discovery dataset is known
    chosen = [i for i in dict.fromkeys([*cfg.ablation_latents, *live[:cfg.ablation_top]]) if i in out] \
        if dataset_dir is not None else []
    if chosen:
        for i, ab in _ablations(model, tokenizer, sae, sae_cfg.hook_name, features_dir, dataset_dir, chosen, cfg,
                                stage("ablation", len(chosen)), should_cancel).items():
            out[i]["ablation"] = ab
    return out


def _ablations(model, tokenizer, sae, hook_name: str, features_dir: Path, dataset_dir: Path, chosen: list[int],
               cfg: AnalyzeConfig, progress, should_cancel) -> dict[int, dict[str, Any]]:
    """The measured ablation of each chosen latent on its top contexts (rows of several latents
    share each forward), as JSON-ready dicts; a latent that cannot be measured gets its reason."""
    from core.features import store as features_store

    examples = features_store.examples_by_latent(features_dir, chosen, kind="top", columns=["latent", "row_id", "pos"])
    tops = {i: examples.get(i, [])[: cfg.ablation_contexts] for i in chosen}
    rows = read_rows(dataset_dir, sorted({e["row_id"] for top in tops.values() for e in top}))
    items = [Ablation(i, [torch.from_numpy(rows[e["row_id"]][: e["pos"] + 1 + cfg.ablation_after]) for e in tops[i]],
                      [e["pos"] for e in tops[i]]) for i in chosen]
    results = ablation_effects(model, sae, hook_name, items, pad_id=tokenizer.pad_token_id or 0,
                               max_tokens=cfg.ablation_tokens, group=cfg.ablation_group, progress=progress,
                               should_cancel=should_cancel)
    out = {}
    for i, ab in zip(chosen, results):
        if isinstance(ab, UserError):  # e.g. every context ends at its max token: say so on the feature
            out[i] = {"error": str(ab)}
            continue
        d = ab._asdict()
        d["dropped_str"] = decode_tokens(tokenizer, ab.dropped_ids)
        d["raised_str"] = decode_tokens(tokenizer, ab.raised_ids)
        out[i] = d
    return out


def _token_strings(tokenizer, rows: list[list[int]]) -> Callable[[list[int]], list[str]]:
    """id rows → their token strings, each distinct id decoded once (a vocabulary, not 65k × 20)."""
    uniq = sorted({i for r in rows for i in r})
    strings = dict(zip(uniq, decode_tokens(tokenizer, uniq)))
    return lambda ids: [strings[i] for i in ids]


def _stage_reporter(progress: Progress, total: int):
    """stage(name[, of]) → a callback(done) reporting that stage's progress (0 of it at once)."""
    def stage(name: str, of: int | None = None) -> Callable[[int], None]:
        def report(done: int) -> None:
            if progress is not None:
                progress({"phase": "analyze", "stage": name, "done": done, "total": of or total, "unit": "latents"})
        report(0)
        return report
    return stage
