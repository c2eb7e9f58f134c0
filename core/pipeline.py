"""The steps of a miStudio run, composed from the engine's pieces.

Each step takes plain inputs (a loaded model, folders, a config) and returns plain outputs, so
the ModelWorker, a notebook and the tests all call the same functions. Progress and cancel
callbacks pass straight through to the engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from core import data, evaluate, extract, hooks
from core.data import TokenBatch
from core.features import DiscoverConfig, DiscoverySummary, FeatureQuery, discover
from core.features import store as features_store
from core.errors import Cancelled, UserError
from core.formats.saelens import load_saelens, save_saelens
from core.io import atomic_file
from core.sae import SAEConfig
from core.train import CheckpointConfig, RunSpec, Source, TrainConfig, TrainResult, replayable, train_saes

EVAL_FILENAME = "eval.json"

Progress = Callable[[dict], None] | None
CancelCheck = Callable[[], bool] | None


def tokenize_dataset(tokenizer, source: str, out_dir: Path, text_column: str = "text",
                     context_length: int = 256, max_documents: int | None = None,
                     progress: Progress = None) -> data.DatasetStats:
    """Load texts from `source` and write them as Parquet token shards under `out_dir`."""
    if context_length < 2:
        raise UserError(f"context length {context_length} is too short; use --context-length 2 or more")
    texts = data.load_texts(source, text_column=text_column, limit=max_documents)
    return data.tokenize_to_shards(texts, tokenizer, out_dir, context_length=context_length,
                                   progress=progress)


def extract_activations(model, tokenizer, dataset_dir: Path, hook_names: list[str], out_dir: Path,
                        batch_size: int = 8, max_tokens: int | None = None,
                        progress: Progress = None, should_cancel: CancelCheck = None,
                        exclude_token_ids: Sequence[int] = ()) -> dict[str, extract.HookStats]:
    """Run the hooked forward over a tokenized dataset and stream activations to Parquet."""
    hooks.validate_hooks(model, hook_names)
    batches = data.iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens)
    return extract.extract(model, batches, hook_names, out_dir, progress=progress, should_cancel=should_cancel,
                           total_tokens=_total_tokens(dataset_dir, max_tokens), exclude_token_ids=exclude_token_ids)


def train_on_activations(hook_dir: Path, out_dir: Path, cfg: TrainConfig, meta: dict[str, Any],
                         progress: Progress = None, should_cancel: CancelCheck = None
                         ) -> tuple[TrainResult, SAEConfig]:
    """Train one SAE on cached activations and save it as a SAELens folder.

    `meta` fills the cfg.json metadata: model_name, hook_name, context_size, dataset_path.
    """
    hook = meta.get("hook_name") or "x"
    stats = extract.read_hook_stats(hook_dir)
    run = RunSpec("sae", hook, stats.d_model, _with_budget(cfg, stats.tokens))
    result = train_runs(cached_source({hook: [hook_dir]}), [run], {"sae": out_dir}, {"sae": meta},
                        progress=progress, should_cancel=should_cancel)["sae"]
    return result, result.sae.config(**meta)


def cached_training(hook_dirs: dict[str, list[Path]], runs: list[RunSpec], eval_rows: int
                    ) -> tuple[Source, list[RunSpec], int]:
    """Source, runs with their token budgets fixed, and held-out tokens for training on cached
    activations, holding out the first `eval_rows` rows of the first dataset."""
    holdout = holdout_tokens(hook_dirs[runs[0].hook_name][0], eval_rows)
    passes = {h: sum(extract.count_activations(d) for d in dirs) - holdout for h, dirs in hook_dirs.items()}
    runs = [r._replace(cfg=_with_budget(r.cfg, passes[r.hook_name])) for r in runs]
    return cached_source(hook_dirs, lead_tokens=holdout), runs, holdout


def live_training(model, tokenizer, dataset_dirs: list[Path], runs: list[RunSpec], eval_rows: int,
                  batch_size: int = 8, max_tokens: int | None = None,
                  exclude_token_ids: Sequence[int] = ()) -> tuple[Source, int]:
    """Source and held-out tokens for training on the fly (the model runs as the trainer reads)."""
    holdout = row_tokens(dataset_dirs[0], eval_rows, exclude_token_ids)
    hook_names = list(dict.fromkeys(r.hook_name for r in runs))
    source = model_source(model, dataset_dirs, hook_names, tokenizer.pad_token_id, batch_size, max_tokens,
                          lead_tokens=holdout, exclude_token_ids=exclude_token_ids)
    return source, holdout


def row_tokens(dataset_dir: Path, rows: int, exclude_token_ids: Sequence[int] = ()) -> int:
    """Real tokens in the dataset's first `rows` rows, not counting excluded token ids."""
    if rows <= 0:
        return 0
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
    return sum(int((b.attention_mask.bool() & ~torch.isin(b.input_ids, excluded)).sum())
               for b in data.iter_batches(dataset_dir, 256, 0, max_rows=rows))


def _with_budget(cfg: TrainConfig, pass_tokens: int) -> TrainConfig:
    """Fix total_tokens from a known pass size: spares the trainer a counting pass."""
    if cfg.total_tokens is None:
        cfg = dataclasses.replace(cfg, total_tokens=pass_tokens * cfg.epochs)
    return cfg


def train_runs(source: Source, runs: list[RunSpec], out_dirs: dict[str, Path], metas: dict[str, dict[str, Any]], *,
               holdout_tokens: int = 0, checkpoint: CheckpointConfig | None = None,
               progress: Progress = None, should_cancel: CancelCheck = None,
               requested: Callable[[], str] | None = None) -> dict[str, TrainResult]:
    """Train several SAEs from one pass of `source`; save each as a SAELens folder in out_dirs[name].
    `requested` may pause or finalize the training (see core.train.train_saes)."""
    results = train_saes(source, runs, progress=progress, should_cancel=should_cancel,
                         holdout_tokens=holdout_tokens, checkpoint=checkpoint, requested=requested)
    for name, result in results.items():
        save_saelens(result.sae, result.sae.config(**metas[name]), out_dirs[name])
    return results


def cached_source(hook_dirs: dict[str, list[Path]], chunk_tokens: int = 4096, lead_tokens: int = 0) -> Source:
    """A training source over cached activations: {hook: [one folder per dataset]}.

    Datasets are mixed chunk by chunk, round-robin, after the first `lead_tokens` tokens of the
    first dataset (the held-out slice, so it comes from one dataset's first rows). The folders
    of one dataset must come from the same extraction, so their tokens line up across hooks.
    """
    hooks_ = list(hook_dirs)
    n_sets = {len(dirs) for dirs in hook_dirs.values()}
    if len(n_sets) != 1:
        raise UserError("every hook needs activations from the same datasets; extract each hook on each dataset")
    n = n_sets.pop()
    for i in range(n):
        counts = {h: extract.count_activations(hook_dirs[h][i]) for h in hooks_}
        if len(set(counts.values())) != 1:
            raise UserError(f"the activation sets of dataset {i + 1} hold different token counts {counts}; "
                            "use hooks extracted together in one extraction job")

    def dataset(i: int) -> Iterator[dict[str, np.ndarray]]:
        its = [extract.iter_activations(hook_dirs[h][i], chunk_tokens) for h in hooks_]
        for arrays in zip(*its):
            yield dict(zip(hooks_, arrays))

    return replayable(lambda: _interleave([dataset(i) for i in range(n)], lead_tokens))


def model_source(model, dataset_dirs: list[Path], hook_names: list[str], pad_token_id: int, batch_size: int = 8,
                 max_tokens: int | None = None, lead_tokens: int = 0,
                 exclude_token_ids: Sequence[int] = ()) -> Source:
    """A training source that runs the model on the fly (no activation cache): one chunk per
    token batch, datasets mixed batch by batch like `cached_source`. Skipped chunks on resume
    cost no forward pass."""
    hooks.validate_hooks(model, hook_names)
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)

    def dataset(d: Path) -> Iterator[TokenBatch]:
        return data.iter_batches(d, batch_size, pad_token_id, max_tokens=max_tokens)

    def src(start: int) -> Iterator[dict[str, np.ndarray]]:
        batches = _interleave([dataset(d) for d in dataset_dirs], lead_tokens, size=_batch_tokens)
        for i, b in enumerate(batches):
            if i < start:
                continue
            mask = b.attention_mask.bool() & ~torch.isin(b.input_ids, excluded)
            with torch.no_grad():
                acts = hooks.run_hooked(model, b.input_ids, b.attention_mask, hook_names)
            yield {h: a[mask.to(a.device)].cpu().numpy() for h, a in acts.items()}

    return src


def _batch_tokens(b: TokenBatch) -> int:
    return int(b.attention_mask.sum())


def _first_len(chunk: dict[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values())))


def _interleave(iterators: list[Iterator], lead_tokens: int, size: Callable[[Any], int] = _first_len) -> Iterator:
    """The first iterator until `lead_tokens` have passed, then all of them round-robin."""
    if not iterators:
        raise UserError("no datasets to train on; give at least one")
    first, led = iterators[0], 0
    while led < lead_tokens:
        item = next(first, None)
        if item is None:
            break
        led += size(item)
        yield item
    live = list(iterators)
    while live:
        for it in list(live):
            item = next(it, None)
            if item is None:
                live.remove(it)
            else:
                yield item


def holdout_tokens(hook_dir: Path, rows: int) -> int:
    """Cached tokens that belong to the first `rows` rows of the dataset (the held-out slice)."""
    n = 0
    if rows <= 0:
        return 0
    for shard in sorted(Path(hook_dir).glob("shard-*.parquet")):
        ids = pq.read_table(shard, columns=["row_id"]).column(0).to_numpy()
        n += int((ids < rows).sum())
        if len(ids) and ids[-1] >= rows:
            break
    return n


def default_eval_rows(dataset_rows: int) -> int:
    """Rows held out for evaluation: 5% of the dataset, at least 1 and at most 64."""
    return max(1, min(64, dataset_rows // 20))


def evaluate_saved_sae(model, tokenizer, sae_dir: Path, dataset_dir: Path, rows: int, *, batch_size: int = 8,
                       outlier_norm_threshold: float = math.inf, progress: Progress = None,
                       should_cancel: CancelCheck = None) -> dict[str, Any]:
    """CE loss recovered, KL and the reconstruction metrics of a saved SAE on the dataset's first
    `rows` rows (the held-out slice), written to `eval.json` in the SAE folder."""
    sae, cfg = load_saelens(sae_dir)
    batches = data.iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_rows=rows)
    metrics = evaluate.evaluate_sae(model, sae, cfg.hook_name, batches, outlier_norm_threshold=outlier_norm_threshold,
                                    progress=progress, should_cancel=should_cancel)
    metrics["eval_rows"] = rows
    with atomic_file(Path(sae_dir) / EVAL_FILENAME) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    return metrics


def discover_features(model, tokenizer, sae_dir: Path, dataset_dir: Path, out_dir: Path,
                      cfg: DiscoverConfig, batch_size: int = 8, max_tokens: int | None = None,
                      progress: Progress = None, should_cancel: CancelCheck = None,
                      exclude_token_ids: Sequence[int] = ()) -> DiscoverySummary:
    """Top activating contexts, quantile samples, histograms, co-active latents, frequency and
    max/mean activation for every latent of an SAE.

    Positions holding an `exclude_token_ids` token are no candidates (the model still reads them)."""
    sae, sae_cfg = load_saelens(sae_dir)
    hook_name = sae_cfg.hook_name
    hooks.validate_hooks(model, [hook_name])
    d_model = model.config.hidden_size
    if sae_cfg.d_in != d_model:
        raise UserError(f"SAE d_in={sae_cfg.d_in} does not match {hook_name} of this model (d_model={d_model}); "
                        "pick the model the SAE was trained on")
    sae = sae.to(next(model.parameters()).device)
    total = _total_tokens(dataset_dir, max_tokens)
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)

    def hooked_batches():
        for b in data.iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens):
            acts = hooks.run_hooked(model, b.input_ids, b.attention_mask, [hook_name])[hook_name]
            yield b.input_ids, b.attention_mask * ~torch.isin(b.input_ids, excluded), b.row_ids, acts, b.doc_ids

    with torch.no_grad():
        return discover(sae, hooked_batches(), out_dir, lambda ids: decode_tokens(tokenizer, ids), cfg,
                        total_tokens=total, progress=progress, should_cancel=should_cancel)


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (byte-level markers like 'Ġ' resolved)."""
    return [tokenizer.decode([i]) for i in ids]


def _total_tokens(dataset_dir: Path, max_tokens: int | None) -> int:
    tokens = data.read_stats(dataset_dir).tokens
    return min(tokens, max_tokens) if max_tokens else tokens



@dataclasses.dataclass
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
    ablation_latents: list[int] = dataclasses.field(default_factory=list)
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
    from core import analysis, nlp

    sae, sae_cfg = load_saelens(sae_dir)
    sae = sae.to(next(model.parameters()).device)
    live = [f["latent"] for f in features_store.feature_page(features_dir, FeatureQuery(live_only=True),
                                                             columns=["latent"]).rows]  # most frequent first
    targets = sorted(set(live if latents is None else latents))
    if not targets:
        return {}
    report = _stage_reporter(progress, len(targets))
    out: dict[int, dict[str, Any]] = {i: {} for i in targets}
    eff = analysis.logit_effects(model, sae, targets, n=cfg.n_logits)
    strings = lambda rows: [decode_tokens(tokenizer, r) for r in rows]
    for j, i in enumerate(targets):
        out[i]["logits"] = {"pos_str": strings([eff.top_ids[j]])[0], "pos_values": eff.top_values[j],
                            "neg_str": strings([eff.bottom_ids[j]])[0], "neg_values": eff.bottom_values[j],
                            "final_norm": eff.final_norm}
    ids, cos = analysis.similar_features(sae, targets, n=cfg.n_similar)
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
        rows = data.read_rows(dataset_dir, [e["row_id"] for e in top])
        ctx = [torch.from_numpy(rows[e["row_id"]][: e["pos"] + 1 + cfg.ablation_after]) for e in top]
        try:
            ab = analysis.ablation_effect(model, sae, sae_cfg.hook_name, ctx, [e["pos"] for e in top], i,
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
    if should_cancel is not None and should_cancel():
        raise Cancelled("analysis cancelled")


def _stage_reporter(progress: Progress, total: int):
    def report(stage: str, done: int, of: int | None = None):
        if progress is not None:
            progress({"phase": "analyze", "stage": stage, "done": done, "total": of or total, "unit": "latents"})
    return report


ANALYSIS_EXAMPLE_COLUMNS = ["latent", "kind", "row_id", "pos", "tokens", "max_index", "coactive_latents",
                            "coactive_acts"]
"""The example columns a feature analysis reads."""

