"""Extraction speed: our early-stopped hooked forward vs the two ways people do it by hand.

Contenders, on the same batches of 8 × 256 real tokens of the builtin corpus (no padding):

* hooked     — `core.hooks.run_hooked(model, ids, mask, ["blocks.15.hook_resid_post"])`
* truncated  — a bare `model.model(...)` with `model.model.layers` sliced to the first 16
               layers for the call (restored after): the floor for any layer-15 extraction
* full_hs    — the whole model with `output_hidden_states=True` (30 layers + LM head)
* full       — the same full forward without output_hidden_states (context: what the hidden
               states themselves cost)
* extract    — `core.extract.extract` over the same batches: hooked forward + masking +
               running stats + Parquet shard writes, into a temp folder

After one warmup batch each, every batch is run by every contender back to back (order rotated
from batch to batch), so load changes on a shared machine hit all contenders alike. tokens/s is
per repetition (all batches) and the reported value is the median; ratios are the median over
(repetition, batch) pairs of the paired time ratios. `extract` is called once per batch (one
output folder and one shard per call: the same bytes written per token as a long run).

Targets: hooked ≥ 0.9 × truncated; hooked ≥ 2.5 × full_hs.

    .venv/bin/python -m bench.extraction [--quick] [--batches N] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench import _common as C

SEQ = 256
BATCH = 8
LAYER = 15


def full_rows(ds: Path, n: int) -> list[np.ndarray]:
    """The first `n` rows of exactly SEQ tokens (so batches carry no padding)."""
    rows = []
    for shard in sorted(ds.glob("shard-*.parquet")):
        for ids in pq.read_table(shard, columns=["input_ids"]).column(0).to_pylist():
            if len(ids) == SEQ:
                rows.append(np.asarray(ids, dtype=np.int64))
                if len(rows) == n:
                    return rows
    raise SystemExit(f"only {len(rows)} rows of {SEQ} tokens in {ds}; need {n}")


def make_batches(ds: Path, n_batches: int):
    from core.data import TokenBatch

    rows = full_rows(ds, n_batches * BATCH)
    out = []
    for b in range(n_batches):
        ids = torch.from_numpy(np.stack(rows[b * BATCH:(b + 1) * BATCH]))
        out.append(TokenBatch(ids, torch.ones_like(ids), torch.arange(b * BATCH, (b + 1) * BATCH)))
    return out


def contenders(model):
    from core.extract import extract
    from core.hooks import run_hooked

    inner = model.model

    def hooked(batches):
        for b in batches:
            run_hooked(model, b.input_ids, b.attention_mask, [C.HOOK])

    def truncated(batches):
        layers = inner.layers
        inner.layers = torch.nn.ModuleList(list(layers)[:LAYER + 1])
        try:
            with torch.no_grad():
                for b in batches:
                    inner(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        finally:
            inner.layers = layers  # never keep the slice

    def full_hs(batches):
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False,
                      output_hidden_states=True)

    def full(batches):
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def extract_all(batches):
        tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
        try:
            extract(model, batches, [C.HOOK], tmp / "out")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return {"hooked": hooked, "truncated": truncated, "full_hs": full_hs, "full": full, "extract": extract_all}


def check_same(model, batch) -> float:
    """Max abs difference between run_hooked's layer-15 output and the full forward's
    hidden_states[16]: the contenders must compute the same thing."""
    from core.hooks import run_hooked

    got = run_hooked(model, batch.input_ids, batch.attention_mask, [C.HOOK])[C.HOOK]
    with torch.no_grad():
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                    output_hidden_states=True).hidden_states[LAYER + 1]
    return float((got - ref).abs().max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 batches × 3 repetitions (about 2 minutes)")
    ap.add_argument("--batches", type=int, default=None, help="batches of 8×256 tokens per repetition (default 4)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    n_batches = args.batches or (2 if args.quick else 4)
    reps = args.reps or 3
    load_before = C.load_avg()

    model, tok = C.load(args.threads)
    batches = make_batches(C.dataset_dir(tok), n_batches)
    tokens = n_batches * BATCH * SEQ
    fns = contenders(model)
    names = list(fns)
    print(f"[extraction] {n_batches} batches × {BATCH}×{SEQ} = {tokens} tokens per repetition, "
          f"{reps} repetitions, {torch.get_num_threads()} threads; load {load_before}", flush=True)

    diff = check_same(model, batches[0])
    print(f"[extraction] max |run_hooked − hidden_states[{LAYER + 1}]| = {diff:.2e}")
    for name in names:  # warmup: one batch each
        fns[name](batches[:1])

    # Interleaved per batch: every contender runs each batch back to back (order rotated), so a
    # change in machine load hits all of them alike; per-(rep, batch) times give paired ratios.
    times = {n: [[0.0] * n_batches for _ in range(reps)] for n in names}
    k = 0
    for r in range(reps):
        for i, batch in enumerate(batches):
            order = names[k % len(names):] + names[:k % len(names)]
            k += 1
            for name in order:
                t0 = time.perf_counter()
                fns[name]([batch])
                times[name][r][i] = time.perf_counter() - t0
        print(f"  rep {r + 1}: " + ", ".join(f"{n} {tokens / sum(times[n][r]):.0f}" for n in names) + " tokens/s",
              flush=True)
    rates = {n: [tokens / sum(times[n][r]) for r in range(reps)] for n in names}

    def ratio(a, b):
        # median over (rep, batch) pairs of time_b / time_a = tokens/s of a over tokens/s of b
        return C.median([tb / ta for ra, rb in zip(times[a], times[b]) for ta, tb in zip(ra, rb)])

    r_trunc, r_full = ratio("hooked", "truncated"), ratio("hooked", "full_hs")
    r_ext = ratio("extract", "truncated")
    r_ext_hooked = ratio("extract", "hooked")
    med = {n: C.median(rates[n]) for n in names}
    print()
    for n in names:
        print(f"{n:9s} {C.spread(rates[n])} tokens/s")
    print(f"hooked / truncated = {r_trunc:.3f}  (target ≥ 0.9: {'met' if r_trunc >= 0.9 else 'NOT met'})")
    print(f"hooked / full_hs   = {r_full:.3f}  (target ≥ 2.5: {'met' if r_full >= 2.5 else 'NOT met'})")
    print(f"extract / truncated = {r_ext:.3f};  extract / hooked = {r_ext_hooked:.3f}")
    load_after = C.load_avg()
    if args.no_record:
        return

    # Per-layer FLOP model of SmolLM2 (d 576, 9 heads, 3 KV heads of 64, MLP 1536, vocab 49152):
    # weight matmuls + attention scores and mixing over the full 256×256 (masked) matrix.
    cfg = model.config
    d, ff, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * ff) + 4 * SEQ * d
    stopped = (LAYER + 1) * per_layer
    whole = cfg.num_hidden_layers * per_layer + 2 * d * v
    flop_ratio = whole / stopped
    flops = {"hooked": stopped, "truncated": stopped, "full_hs": whole, "full": whole, "extract": stopped}
    rows = [[n, C.spread(rates[n]), f"{flops[n] * med[n] / 1e9:.0f}"] for n in names]
    body = "\n".join([
        f"Sizes: {n_batches} batches × {BATCH}×{SEQ} tokens = {tokens} tokens per repetition, {reps} repetitions "
        f"({'--quick' if args.quick else 'default sizes'}), 1 warmup batch per contender, contenders interleaved "
        f"batch by batch (order rotated); ratios = median of {reps * n_batches} paired per-batch ratios. Check: max |run_hooked − hidden_states[{LAYER + 1}]| = {diff:.1e}.\n",
        C.table(["contender", "tokens/s median (min–max)", "GFLOP/s (FLOP model)"], rows), "",
        C.table(["ratio (median of paired per-batch)", "value", "target", "status"], [
            ["hooked / truncated", f"{r_trunc:.3f}", "≥ 0.9", C.ok(r_trunc >= 0.9)],
            ["hooked / full_hs", f"{r_full:.3f}", "≥ 2.5", C.ok(r_full >= 2.5)],
            ["full / full_hs", f"{ratio('full', 'full_hs'):.3f}", "—", "—"],
            ["extract / truncated", f"{r_ext:.3f}", "—", "—"],
            ["extract / hooked", f"{r_ext_hooked:.3f}", "—", "—"],
        ]), "",
        f"FLOP model: a full forward (30 layers + LM head {d}×{v}) costs {flop_ratio:.2f}× a forward "
        f"stopped after layer {LAYER} ({whole / 1e6:.1f} vs {stopped / 1e6:.1f} MFLOP per token), so at equal "
        f"FLOP rate stopping early buys {flop_ratio:.2f}×; the measured {r_full:.2f}× "
        + ("is above it: the full forward also runs at a lower FLOP rate (the GFLOP/s column)."
           if r_full > flop_ratio else "is at or below it: the full forward runs at the same or a higher FLOP "
           "rate (the GFLOP/s column)."),
    ])
    C.append_result("extraction (bench/extraction.py)", body, load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    main()
