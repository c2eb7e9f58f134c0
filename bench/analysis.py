"""Feature analysis at width: wall time of each stage of `core.analysis.analyze_features` for
every latent of a 4,608- and a 65,536-latent SAE on SmolLM2 (d_model 576).

Fixture per width (built once under $MISTUDIO_BENCH_CACHE, reused): a TopK SAE (k 32) with
random weights and b_dec at the mean of real `blocks.15.hook_resid_post` activations, saved as a
SAELens folder, and its features discovered by the project's own `discover_features` over the
first --tokens tokens of the builtin corpus (special tokens excluded, every default on).

Stages, as `analyze_features` reports them: logit effects (W_dec[i] @ W_U for all latents, top
and bottom tokens, decoded), similar features (exact top-n decoder cosines), co-occurrence
(exact counts over the stored co-active latents of every example), NLP (spaCy over every
latent's top windows), measured ablation (--ablate latents, two forwards per batch of latents),
then the job's record step (one bulk UPDATE of a SQLite registry) and heuristic labels of every
analysed latent (`core.interp.label_features`, the label job's core) are timed.

With --before REV the same stages of REV's `core/analysis.py` (run from `git show`, against
this tree's readers) are timed at the widths given in --before-widths, side by side.

    .venv/bin/python -m bench.analysis [--widths 4608,65536] [--tokens N] [--ablate 16]
                                       [--before REV] [--before-widths 4608] [--no-record]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from bench import _common as C

K = 32


def fixture(model, tok, d_sae: int, tokens: int) -> tuple[Path, Path, Path]:
    """(sae_dir, features_dir, dataset_dir) for a random TopK SAE of width `d_sae`, discovered
    over `tokens` tokens (built once, then reused)."""
    from core.data import iter_batches, special_token_ids
    from core.features import DiscoverConfig, discover_features
    from core.formats.saelens import save_saelens
    from core.hooks import run_hooked
    from core.sae import build_sae

    ds = C.dataset_dir(tok)
    root = C.CACHE / f"analysis-{d_sae}-{tokens}"
    sae_dir, feat_dir = root / "sae", root / "features"
    if (feat_dir / "discovery.json").is_file():
        return sae_dir, feat_dir, ds
    torch.manual_seed(0)
    sae = build_sae("topk", 576, d_sae, k=K)
    b = next(iter(iter_batches(ds, 8, tok.pad_token_id)))
    with torch.no_grad():
        x = run_hooked(model, b.input_ids, b.attention_mask, [C.HOOK])[C.HOOK]
        keep = b.attention_mask.bool() & ~torch.isin(b.input_ids, torch.tensor(special_token_ids(tok)))
        sae.b_dec.copy_(x[keep].mean(0))
    save_saelens(sae, sae.config(hook_name=C.HOOK, model_name="smollm2"), sae_dir)
    print(f"[bench] discovering {d_sae} latents over {tokens} tokens into {feat_dir}", flush=True)
    t0 = time.perf_counter()
    s = discover_features(model, tok, sae_dir, ds, feat_dir, DiscoverConfig(), batch_size=8, max_tokens=tokens,
                          exclude_token_ids=special_token_ids(tok))
    print(f"[bench] discovery: {s.live_features} live latents, {s.heap_examples_count} top examples, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return sae_dir, feat_dir, ds


class Timer:
    """Wall time per stage from analyze_features' progress events (a stage starts with done=0)."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = []
        self.t0 = time.perf_counter()

    def __call__(self, m: dict) -> None:
        if m.get("done") == 0 and (not self.marks or self.marks[-1][0] != m["stage"]):
            self.marks.append((m["stage"], time.perf_counter()))

    def stages(self, end: float) -> dict[str, float]:
        ends = [t for _, t in self.marks[1:]] + [end]
        out = {"load + live latents": self.marks[0][1] - self.t0} if self.marks else {}
        out.update({name: e - t for (name, t), e in zip(self.marks, ends)})
        return out


def run_after(model, tok, sae_dir: Path, feat_dir: Path, ds: Path, ablate: int) -> tuple[dict[str, float], dict]:
    from core.analysis import AnalyzeConfig, analyze_features

    timer = Timer()
    out = analyze_features(model, tok, sae_dir, feat_dir, ds, AnalyzeConfig(ablation_top=ablate), progress=timer)
    times = timer.stages(time.perf_counter())
    times["latents"] = len(out)
    times["ablations"] = sum("mean_delta_loss_at_max" in v.get("ablation", {}) for v in out.values())
    return times, out


def time_record(feat_dir: Path, analysis: dict) -> float:
    """The analyze job's record step: every latent's analysis in one bulk UPDATE of a SQLite
    registry holding the SAE's feature rows (as discovery's record step writes them)."""
    from core.features import store
    from core.features.schema import REGISTRY_COLUMNS
    from storage.registry import Registry

    with tempfile.TemporaryDirectory(prefix="mistudio-bench-an-") as tmp:
        reg = Registry(f"sqlite:///{tmp}/registry.db")
        reg.replace_features("sae", store.feature_rows(feat_dir, columns=REGISTRY_COLUMNS))
        t0 = time.perf_counter()
        reg.update_features("sae", [{"latent": int(k), "analysis": v} for k, v in analysis.items()])
        took = time.perf_counter() - t0
        reg.close()
    return took


def time_labels(label_features, feat_dir: Path, analysis: dict) -> float:
    """Heuristic labels of every analysed latent, as the label job runs them (its registry rows:
    latent, top tokens, frequency, analysis)."""
    from core.features import store

    rows = [dict(r, analysis=analysis[r["latent"]]) for r in
            store.feature_rows(feat_dir, columns=["latent", "top_tokens", "frequency"]) if r["latent"] in analysis]
    t0 = time.perf_counter()
    res = label_features(None, rows, feat_dir)
    assert len(res["labels"]) + len(res["errors"]) == len(rows)
    return time.perf_counter() - t0


def _module(rev: str, path: str, name: str) -> types.ModuleType:
    """`path` as it was at git revision `rev`, imported under `name` (against this tree's imports)."""
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=C.REPO, capture_output=True, text=True,
                         check=True).stdout
    mod = types.ModuleType(name)
    mod.__file__ = f"{rev}:{path}"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def run_before(rev: str, model, tok, sae_dir: Path, feat_dir: Path, ds: Path, ablate: int) -> dict[str, float]:
    """REV's analyze_features, stage by stage: its own functions, called as its body called them."""
    from core.data import decode_tokens, read_rows
    from core.features import FeatureQuery
    from core.features import store
    from core.formats.saelens import load_saelens

    old = _module(rev, "core/analysis.py", "_before_analysis")
    old_nlp = _module(rev, "core/nlp.py", "_before_nlp")
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name], t = now - t, now

    sae, sae_cfg = load_saelens(sae_dir)
    live = [f["latent"] for f in store.feature_page(feat_dir, FeatureQuery(live_only=True), columns=["latent"]).rows]
    targets = sorted(set(live))
    lap("load + live latents")
    eff = old.logit_effects(model, sae, targets, n=10)
    [(decode_tokens(tok, eff.top_ids[j]), decode_tokens(tok, eff.bottom_ids[j])) for j in range(len(targets))]
    lap("logit effects")
    old.similar_features(sae, targets, n=10)
    lap("similar features")
    examples = store.examples_by_latent(feat_dir, targets, columns=old.ANALYSIS_EXAMPLE_COLUMNS)
    for i in targets:
        store.rank_coactive(examples.get(i, []), 10)
    lap("co-occurrence")
    for start in range(0, len(targets), 512):
        chunk = targets[start:start + 512]
        old_nlp.analyze_many({i: [e for e in examples.get(i, []) if e["kind"] == "top"] for i in chunk})
    lap("NLP")
    for i in live[:ablate]:
        top = [e for e in examples.get(i, []) if e["kind"] == "top"][:8]
        rows = read_rows(ds, [e["row_id"] for e in top])
        ctx = [torch.from_numpy(rows[e["row_id"]][: e["pos"] + 1 + 16]) for e in top]
        try:
            old.ablation_effect(model, sae, sae_cfg.hook_name, ctx, [e["pos"] for e in top], i,
                                pad_id=tok.pad_token_id or 0)
        except Exception:  # noqa: BLE001 — as REV recorded the error and went on
            pass
    lap("ablation")
    times["latents"] = len(targets)
    return times


STAGES = ["load + live latents", "logit effects", "similar features", "co-occurrence", "NLP", "ablation",
          "record (registry)", "heuristic labels"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="4608,65536")
    p.add_argument("--tokens", type=int, default=16384, help="tokens discovered for the fixture")
    p.add_argument("--ablate", type=int, default=16, help="latents whose ablation is measured (most frequent)")
    p.add_argument("--before", default="", help="also time this git revision's analysis (e.g. c894dda)")
    p.add_argument("--before-widths", default="4608")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    before = C.load_avg()
    model, tok = C.load(a.threads)
    widths = [int(w) for w in a.widths.split(",")]
    results: dict[tuple[str, int], dict] = {}
    for w in widths:
        sae_dir, feat_dir, ds = fixture(model, tok, w, a.tokens)
        if a.before and str(w) in a.before_widths.split(","):
            results[("before", w)] = run_before(a.before, model, tok, sae_dir, feat_dir, ds, a.ablate)
            print("before", w, results[("before", w)], flush=True)
        results[("after", w)], analysis = run_after(model, tok, sae_dir, feat_dir, ds, a.ablate)
        from core.interp.label import label_features

        results[("after", w)]["record (registry)"] = time_record(feat_dir, analysis)
        results[("after", w)]["analysis JSON MB"] = len(json.dumps(analysis)) / 1e6
        results[("after", w)]["heuristic labels"] = time_labels(label_features, feat_dir, analysis)
        if ("before", w) in results:
            old = _module(a.before, "core/interp/label.py", "_before_label")
            results[("before", w)]["heuristic labels"] = time_labels(old.label_features, feat_dir, analysis)
        del analysis
        print("after", w, results[("after", w)], flush=True)
    header = ["stage"] + [f"{'this tree' if who == 'after' else a.before} @ {w:,}" for who, w in results]
    rows = []
    for s in STAGES:
        row = [s] + [f"{r[s]:.1f}" if s in r else "–" for r in results.values()]
        rows.append(row)
    rows.append(["**total**"] + [f"**{sum(r.get(s, 0) for s in STAGES):.1f}**" for r in results.values()])
    rows.append(["latents analysed"] + [f"{r['latents']:,}" for r in results.values()])
    rows.append(["analysis JSON (MB)"] + [f"{r['analysis JSON MB']:.0f}" if "analysis JSON MB" in r else "–"
                                          for r in results.values()])
    ratio = ""
    for w in widths:
        if ("before", w) in results:
            b, n = results[("before", w)], results[("after", w)]
            ratio += f"\nAt {w:,} latents, {a.before} / this tree: " + ", ".join(
                f"{s} {b[s] / max(n[s], 1e-9):.1f}×" for s in STAGES if s in b and s in n) + \
                f"; total {sum(b.get(s, 0) for s in STAGES) / sum(n.get(s, 0) for s in STAGES):.1f}×."
    body = (f"Every live latent of a random TopK SAE (k {K}, b_dec at the data mean) on SmolLM2 {C.HOOK}, features "
            f"discovered by `discover_features` over {a.tokens:,} builtin-corpus tokens; ablation measured for the "
            f"{a.ablate} most frequent latents (8 top contexts each). Wall seconds per stage, one run each.\n\n"
            + C.table(header, rows) + "\n" + ratio)
    print(body)
    if not a.no_record:
        C.append_result("analysis of every latent at 4,608 and 65,536 latents: wall time per stage", body,
                        load_before=before, load_after=C.load_avg())


if __name__ == "__main__":
    main()
