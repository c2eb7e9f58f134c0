"""Peak memory vs corpus size: extraction and training must stay flat when the data grows 10×.

Every case runs in a fresh subprocess (`python -m bench.memory --child ...`) and reports its own
peak RSS, `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the parent cross-checks it with the
rusage `os.wait4` returns for that child).

* tokenize  — `core.data.tokenize_dataset` of the builtin corpus written once (1×) and ten
              times over (10×) as a .jsonl file; it builds the two datasets the extraction uses.
              Informational: tokenizing holds the documents in memory, so it is not in the target.
* extract   — `core.extract.extract_activations` of SmolLM2 blocks.15.hook_resid_post (the real
              model, batch 8, Parquet shards) over the first N tokens of the 1× dataset and the
              first 10·N tokens of the 10× dataset.
* train     — `core.train.sources.train_on_activations` (TopK, 8×, k 32, batch 4096, one epoch: cached
              Parquet source → trainer → SAELens folder) on an activation cache of M tokens and
              one of 10·M tokens, both in core.extract's Parquet layout, filled with the real
              cached SmolLM2 activations (the 10× cache repeats them).
* baselines — the same process with the model loaded and one 8-token hooked forward run
              (extraction), or the training modules imported (training): the fixed part of each peak.

Target: peak RSS at 10× within 15% of 1×, for extraction and for training.

`--widths 4608,65536[,...]` measures instead peak RSS and steady tokens/s of one TopK training
job per width (d_in 576, k 32, batch 4096, AuxK active, `--steps` steps then the held-out
evaluation), this tree against an earlier commit (`--before`, default HEAD) run from a
`git archive` of it, the two alternating in every round (`--reps`), beside the memory
`core.train.config.training_bytes` predicts. Target (training-at-width issue): peak RSS at
or below sparsify's (3.8 GB at 65,664 latents), the step no slower.

    .venv/bin/python -m bench.memory --widths 4608,65536 --before ac778d5 --reps 3

`--stream` measures instead the unlimited-token data path (issue 23, item 2), two parts:

* passes — peak RSS of training 2M and 20M tokens (`--stream-tokens`, 1× and 10×) from the SAME
              activation cache (`--cache-tokens`, default 200k tokens of the real SmolLM2
              activations, so 10 and 100 passes), one fresh subprocess per run through
              `train_on_activations` (the cached job's path: Parquet → shuffle buffer → TopK
              steps), a small SAE (d_sae 576 = 1×, k 32, batch 4096: the data path's memory is what is
              measured), with current RSS sampled along the run. Target: 20M within 15% of 2M.
* on the fly — tokens/s of SmolLM2 (to blocks.15.hook_resid_post, batches of 8 rows) feeding a
              TopK SAE per `--fly-widths`, side by side in one process: the forward alone, the SAE
              steps alone (cached activations), on the fly one after the other (prefetch 0), and
              on the fly with the forward prefetched in a background thread at torch's default
              threads and with the cores split (1 forward thread + the rest for the steps).
              Against the harmonic mean of the two stages' rates (what running them in turn
              gives) and the slower stage's rate (what perfect overlap gives).

    .venv/bin/python -m bench.memory --stream [--stream-tokens 2000000] [--cache-tokens 200000]
                                     [--fly-tokens 16384] [--fly-widths 4608,32768] [--reps 1]

Sizes: default N = 5,000 and M = 50,000 tokens (about 5–10 minutes on 2 loaded cores);
--quick halves them; --full uses the whole corpus (N ≈ 143k, hours on 2 cores).

    .venv/bin/python -m bench.memory [--quick | --full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _common as C

MEM = C.CACHE / "mem"


# --------------------------------------------------------------------------- child side


def child(kind: str, src: str, out: str, tokens: int, threads: int) -> None:
    t0 = time.perf_counter()
    trace: list[tuple[int, float]] = []
    if kind == "tokenize":
        from transformers import AutoTokenizer

        from core.data import tokenize_dataset

        tok = AutoTokenizer.from_pretrained(str(C.model_dir()))
        tokenize_dataset(tok, src, Path(out), context_length=256)
    elif kind in ("extract", "extract-base"):
        model, tok = C.load(threads)
        if kind == "extract-base":
            # One 8-token hooked forward: pages in the weights the extraction reads (layers 0-15
            # and the embedding), which loading alone leaves memory-mapped and untouched.
            import torch

            from core.hooks import run_hooked

            ids = torch.tensor([tok("The capital of France is a city")["input_ids"][:8]])
            run_hooked(model, ids, torch.ones_like(ids), [C.HOOK])
        else:
            from core.extract import extract_activations

            def progress(d):  # peak RSS so far after every batch: shows where the growth happens
                trace.append((d["done"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))

            extract_activations(model, tok, Path(src), [C.HOOK], Path(out), batch_size=8, max_tokens=tokens,
                                progress=progress)
    elif kind == "prepare":  # the converted model, and caches when `tokens` is given
        C.model_dir()
        for times in ((1, 10) if tokens else ()):
            activation_cache(tokens * times)
        return
    elif kind in ("train", "train-base"):
        import torch

        torch.set_num_threads(threads)
        from core.train.sources import train_on_activations
        from core.sae import TopKConfig
        from core.train import TrainConfig

        if kind == "train":
            cfg = TrainConfig(sae=TopKConfig(k=32), expansion_factor=8, batch_size=4096, epochs=1)
            meta = {"model_name": "SmolLM2-135M", "hook_name": C.HOOK, "context_size": 256, "dataset_path": src}
            train_on_activations(Path(src), Path(out), cfg, meta)
    elif kind == "width":
        trace = width_child(src, tokens, threads)
    elif kind in ("stream", "stream-base"):
        trace = stream_child(kind, src, out, tokens, threads)
    elif kind == "fly":
        trace = fly_child(src, tokens, threads)
    else:
        raise SystemExit(f"unknown child kind {kind}")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("RESULT " + json.dumps({"peak_mib": peak_kib / 1024, "seconds": time.perf_counter() - t0, "trace": trace}),
          flush=True)


def width_child(spec: str, steps: int, threads: int) -> list:
    """One TopK training job at a width (`spec` = "d_sae[:arch]"), AuxK active, on the cached
    activations streamed from Parquet: `steps` steps of batch 4096 then the held-out evaluation.
    Returns [wall seconds, CPU seconds] of each step (clocks read by the progress callback
    after every step; CPU time is what the step costs whatever else loads the machine)."""
    import torch

    torch.set_num_threads(threads)
    from core.extract import iter_activations
    from core.sae import registry
    from core.train import TrainConfig, train_sae

    d_sae, _, arch = spec.partition(":")
    sae = registry.config_for(arch or "topk", {"k": WIDTH_K} if arch in ("", "topk", "batchtopk") else {})
    # dead_tokens = one batch: every latent idle in the last step counts as dead, so AuxK is
    # active on every step after the first (a short run's worst case, as in the measurement).
    cfg = TrainConfig(sae=sae, d_sae=int(d_sae), batch_size=WIDTH_BATCH, total_tokens=steps * WIDTH_BATCH,
                      dead_tokens=WIDTH_BATCH, log_every=1, lr_warmup_frac=0.0)
    acts = C.acts_dir(threads)
    clock: list[tuple[float, float]] = []
    train_sae(lambda: iter_activations(acts), 576, cfg, holdout_tokens=WIDTH_BATCH,
              progress=lambda d: clock.append((time.perf_counter(), time.process_time())))
    return [[b[0] - a[0], b[1] - a[1]] for a, b in zip(clock, clock[1:])][:steps]


WIDTH_K, WIDTH_BATCH = 32, 4096


def widths(a: argparse.Namespace) -> None:
    """Peak RSS and steady tokens/s per width, this tree against an earlier commit (`--before`),
    each job a fresh subprocess, the two trees alternating within every round."""
    load_before = C.load_avg()
    before_tree = Path(tempfile.mkdtemp(prefix="mistudio-before-"))
    archive = subprocess.run(["git", "archive", a.before], cwd=C.REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
    for script in ("memory.py", "_common.py"):  # this tree's harness drives the earlier tree's code
        (before_tree / "bench" / script).write_text((C.REPO / "bench" / script).read_text())
    rev = subprocess.run(["git", "rev-parse", "--short", a.before], cwd=C.REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    # The fixtures in a child: a parent that loaded the model would lend its peak to every child.
    subprocess.run([sys.executable, "-c", "from bench import _common as C; C.acts_dir()"], cwd=C.REPO, check=True)
    trees = {f"before ({rev})": before_tree, "after": C.REPO}
    specs = [w.strip() for w in a.widths.split(",")]
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.reps):
        for spec in specs:
            for name, tree in (trees.items() if r % 2 == 0 else reversed(trees.items())):
                res = run_child("width", spec, "", a.steps, a.threads, cwd=tree)
                steady = res["trace"][1:]  # the first step pages in buffers and optimizer state
                res["tok_s"] = WIDTH_BATCH / C.median([w for w, _ in steady]) if steady else float("nan")
                res["cpu_s"] = C.median([c for _, c in steady]) if steady else float("nan")
                got.setdefault((spec, name), []).append(res)
                print(f"    round {r + 1} {spec:>14} {name:>16}: peak {res['peak_mib']:,.0f} MiB, "
                      f"{res['tok_s']:,.0f} tok/s, {res['cpu_s']:.2f} CPU s/step", flush=True)
    body = width_table(specs, trees, got, a)
    print(body)
    if not a.no_record:
        C.append_result("bench/memory.py --widths — peak RSS and tokens/s of one training job per width, "
                        "before and after", body, load_before=load_before)


def width_table(specs, trees, got, a) -> str:
    from core.sae import registry
    from core.train.config import training_bytes

    before, after = list(trees)
    rows = []
    for spec in specs:
        d_sae, _, arch = spec.partition(":")
        b, f = got[(spec, before)], got[(spec, after)]
        pb, pf = C.median([x["peak_mib"] for x in b]), C.median([x["peak_mib"] for x in f])
        tb, tf = C.median([x["tok_s"] for x in b]), C.median([x["tok_s"] for x in f])
        cb, cf = C.median([x["cpu_s"] for x in b]), C.median([x["cpu_s"] for x in f])
        sae = registry.config_for(arch or "topk", {"k": WIDTH_K} if arch in ("", "topk", "batchtopk") else {})
        pred = training_bytes(576, int(d_sae), WIDTH_BATCH, sae) / 2**20
        rows.append([f"{int(d_sae):,}", arch or "topk", f"{pb:,.0f}", f"{pf:,.0f}", f"{pf / pb:.2f}×",
                     f"{pred:,.0f}", f"{tb:,.0f}", f"{tf:,.0f}", f"{tf / tb:.2f}×", f"{cb:.2f}", f"{cf:.2f}",
                     f"{cb / cf:.2f}×"])
    return (f"One training job per case in a fresh subprocess (`train_sae` streaming the cached SmolLM2 "
            f"blocks.15.hook_resid_post activations from Parquet): d_in 576, k {WIDTH_K}, batch {WIDTH_BATCH}, "
            f"{a.steps} steps, dead window one batch (AuxK active from the second step on), then the evaluation on "
            f"{WIDTH_BATCH} held-out tokens. Peak = the job's ru_maxrss; tok/s = batch / median step time from the "
            f"second step on; CPU s/step = the process's CPU time per step (what a step costs however loaded the "
            f"shared machine is; speed after / before = CPU before / CPU after). {a.reps} rounds, the two trees "
            "alternating within each round; medians. "
            f"`before` is `git archive {a.before}` run from a temp folder; predicted = "
            "`core.train.config.training_bytes` of this tree.\n\n"
            + C.table(["latents", "type", "peak MiB before", "peak MiB after", "after / before", "predicted MiB",
                       "tok/s before", "tok/s after", "after / before", "CPU s/step before", "CPU s/step after",
                       "speed after / before (CPU)"], rows))


# --------------------------------------------------------------------------- --stream

STREAM_D_SAE, STREAM_K, STREAM_BATCH = 64, 8, 4096


def _rss_mib() -> float:
    """This process's current resident set (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stream_child(kind: str, src: str, out: str, tokens: int, threads: int) -> list:
    """Train `tokens` tokens from the cache at `src` (as many passes as that takes) through
    `train_on_activations`; returns [tokens, current RSS MiB, peak RSS MiB] at ~40 points."""
    import torch

    torch.set_num_threads(threads)
    from core.sae import TopKConfig
    from core.train import TrainConfig
    from core.train.sources import train_on_activations

    if kind == "stream-base":
        return []
    cfg = TrainConfig(sae=TopKConfig(k=STREAM_K), d_sae=STREAM_D_SAE, batch_size=STREAM_BATCH, total_tokens=tokens)
    meta = {"model_name": "SmolLM2-135M", "hook_name": C.HOOK, "context_size": 256, "dataset_path": src}
    trace, every = [], max(1, tokens // 40)

    def progress(d):
        if d["done"] >= len(trace) * every:
            trace.append([d["done"], _rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])

    result, _ = train_on_activations(Path(src), Path(out), cfg, meta, progress=progress)
    trace.append([result.final["tokens"], _rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  len(result.history)])
    return trace


def fly_child(widths: str, tokens: int, threads: int) -> dict:
    """Tokens/s of the forward alone, the SAE steps alone and training on the fly with and
    without prefetch, per SAE width (comma-separated in `widths`). `threads` = the cores to use."""
    import torch

    from core.data import special_token_ids
    from core.extract import iter_activations
    from core.sae import TopKConfig
    from core.train import RunSpec, TrainConfig, replayable, train_saes
    from core.train.sources import live_training, model_source

    model, tok = C.load(threads)
    ds, acts = C.dataset_dir(tok), C.acts_dir(threads)
    excluded = special_token_ids(tok)
    out: dict = {"forward": {}, "widths": {}}

    def forward_rate(n_threads: int) -> list[float]:
        torch.set_num_threads(n_threads)
        src = model_source(model, [ds], [C.HOOK], tok.pad_token_id, 8, exclude_token_ids=excluded)
        t0, c0, n = time.perf_counter(), time.process_time(), 0
        for chunk in src(0):
            n += len(chunk[C.HOOK])
            if n >= tokens:
                break
        return [n / (time.perf_counter() - t0), n / (time.process_time() - c0)]

    def steady(run) -> list[float]:
        """[tokens per wall second, tokens per CPU second of the whole process] between the
        loop's first progress call and the last step's. On a shared machine the second is the
        honest cost: extra runnable threads win a bigger share of the cores from other tenants."""
        marks: list[tuple[float, float, int]] = []
        run(lambda d: marks.append((time.perf_counter(), time.process_time(), d["done"])))
        first = marks[0]  # the loop's start (after the prelude)
        last = next(m for m in marks if m[2] == marks[-1][2])  # the last step (not the evaluation after it)
        return [(last[2] - first[2]) / (last[0] - first[0]), (last[2] - first[2]) / (last[1] - first[1])]

    for n_threads in (threads, 1):
        out["forward"][n_threads] = forward_rate(n_threads)
    for w in [int(x) for x in widths.split(",")]:
        cfg = TrainConfig(sae=TopKConfig(k=32), d_sae=w, batch_size=2048, total_tokens=tokens, sample_tokens=2048,
                          log_every=1)
        runs = [RunSpec("sae", C.HOOK, 576, cfg)]
        res = out["widths"][w] = {}
        for n_threads in (threads, max(1, threads - 1)):
            torch.set_num_threads(n_threads)
            cached = replayable(lambda: ({C.HOOK: a} for a in iter_activations(acts, 2048)))
            res[f"sae {n_threads}t"] = steady(lambda p: train_saes(cached, runs, progress=p))
        for name, prefetch, fwd_threads, main_threads in (
                ("fly in turn", 0, None, threads), ("fly prefetch", 1, None, threads),
                ("fly prefetch split", 1, 1, max(1, threads - 1))):
            torch.set_num_threads(main_threads)
            source, holdout = live_training(model, tok, [ds], runs, eval_rows=0, batch_size=8,
                                            exclude_token_ids=excluded, prefetch=prefetch,
                                            forward_threads=fwd_threads)
            res[name] = steady(lambda p: train_saes(source, runs, progress=p))
        torch.set_num_threads(threads)
        print(f"    d_sae {w:,}: " + ", ".join(f"{k} {v[0]:,.0f} ({v[1]:,.0f}/CPU s)" for k, v in res.items()),
              flush=True)
    return out


def stream(a: argparse.Namespace) -> None:
    """Peak RSS of a 1× and 10× token run from one cache; tokens/s on the fly vs cached."""
    load_before = C.load_avg()
    parts = []
    if "passes" in a.parts:
        parts.append(stream_passes(a))
    if "fly" in a.parts:
        parts.append(stream_fly(a))
    body = "\n\n".join(parts)
    print(body)
    if not a.no_record:
        C.append_result("bench/memory.py --stream — tokens without limit: peak RSS of a 1× vs 10× token run from "
                        "one cache; on the fly vs cached tokens/s", body, load_before=load_before)


def stream_passes(a: argparse.Namespace) -> str:
    n1, n10 = a.stream_tokens, 10 * a.stream_tokens
    subprocess.run([sys.executable, "-c", f"from bench import memory as M; M.activation_cache({a.cache_tokens})"],
                   cwd=C.REPO, check=True)  # the fixtures in a child, as prepare() does
    cache = activation_cache(a.cache_tokens)
    import shutil

    runs_dir = MEM / "stream-runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    got: dict[str, list[dict]] = {}
    for r in range(a.reps):
        got.setdefault("baseline", []).append(run_child("stream-base", cache, "", 0, a.threads))
        for n in ((n1, n10) if r % 2 == 0 else (n10, n1)):
            res = run_child("stream", cache, runs_dir / f"sae-{n}", n, a.threads)
            got.setdefault(n, []).append(res)
            shutil.rmtree(runs_dir / f"sae-{n}", ignore_errors=True)
    peak = {k: C.median([x["peak_mib"] for x in v]) for k, v in got.items()}
    ratio = peak[n10] / peak[n1]
    rows = []
    for n in (n1, n10):
        tr = got[n][0]["trace"]
        mid = [t[1] for t in tr if t[0] >= 0.2 * n]
        rows.append([f"{n:,}", f"{n / a.cache_tokens:,.0f}", C.spread(x["peak_mib"] for x in got[n]),
                     f"{min(mid):,.0f}–{max(mid):,.0f}", tr[-1][3], f"{C.median([x['seconds'] for x in got[n]]):,.0f}",
                     f"{n / C.median([x['seconds'] for x in got[n]]):,.0f}"])
    print(f"\ntraining peak RSS {n10:,} / {n1:,} tokens = {ratio:.3f} (target ≤ 1.15)", flush=True)
    return "\n".join([
        f"**Passes.** Training from one {a.cache_tokens:,}-token cache of real SmolLM2 {C.HOOK} activations "
        f"(core.extract's Parquet layout) for {n1:,} and {n10:,} tokens: `train_on_activations`, TopK d_sae "
        f"{STREAM_D_SAE}, k {STREAM_K}, batch {STREAM_BATCH} (small, so the data path's memory is what is measured), "
        f"total_tokens set (as many passes as that takes), {a.threads} torch threads; one fresh subprocess per run, "
        f"{a.reps} run(s) each; peak = ru_maxrss; RSS along the run = current VmRSS sampled from 20% of the run to "
        "its end; history rows = the training curve kept (at most core.train.history.HISTORY_ROWS). Baseline "
        f"process (imports only): {peak['baseline']:,.0f} MiB.\n",
        C.table(["tokens", "passes", "peak RSS MiB", "RSS MiB along the run", "history rows", "seconds", "tokens/s"],
                rows), "",
        C.table(["measure", "value", "target", "status"],
                [[f"peak RSS {n10:,} / {n1:,} tokens", f"{ratio:.3f}", "≤ 1.15", C.ok(ratio <= 1.15)]])])


def stream_fly(a: argparse.Namespace) -> str:
    fly = run_child("fly", a.fly_widths, "", a.fly_tokens, a.threads)["trace"]
    fwd = {int(k): v for k, v in fly["forward"].items()}
    fly_rows = []
    for w, res in fly["widths"].items():
        (F, Fc), (S, Sc) = fwd[a.threads], res[f"sae {a.threads}t"]
        harmonic, slower = 1 / (1 / F + 1 / S), min(F, S)
        fewer = max(1, a.threads - 1)
        fly_rows.append([f"{int(w):,}", "stages alone", f"forward {F:,.0f} ({fwd[1][0]:,.0f} on 1 thread); SAE "
                         f"{S:,.0f} ({res[f'sae {fewer}t'][0]:,.0f} on {fewer})", f"harmonic {harmonic:,.0f}",
                         f"slower {slower:,.0f}", "", f"forward {Fc:,.0f}; SAE {Sc:,.0f}; in turn "
                         f"{1 / (1 / Fc + 1 / Sc):,.0f}"])
        for name in ("fly in turn", "fly prefetch", "fly prefetch split"):
            v, vc = res[name]
            fly_rows.append([f"{int(w):,}", name, f"{v:,.0f}", f"{v / harmonic:.2f}×", f"{v / slower:.2f}×",
                             f"{v / res['fly in turn'][0]:.2f}×", f"{vc:,.0f} ({vc / res['fly in turn'][1]:.2f}×)"])
    return "\n".join([
        f"**On the fly.** SmolLM2 to {C.HOOK}, batches of 8 rows of the builtin corpus (special tokens left out), "
        f"feeding one TopK SAE (k 32, batch 2048); steady tokens/s over {a.fly_tokens:,} trained tokens (from the "
        "training loop's start to its last step). `stages alone`: the forward alone and the SAE steps alone on cached "
        f"activations, at {a.threads} threads (and fewer); `fly in turn` = prefetch 0 (forward, then steps); "
        f"`fly prefetch` = the forward one batch ahead in a background thread, both stages at torch's "
        f"{a.threads} threads; `fly prefetch split` = the forward thread at 1 torch thread and the steps at "
        f"{max(1, a.threads - 1)}. Ratios against the harmonic mean of the two stages (running them in turn) and "
        "the slower stage (perfect overlap), and against `fly in turn`; tokens per CPU second = trained tokens over "
        "the process's CPU time in the same window (the work's cost whatever share of the machine it got).\n",
        C.table(["d_sae", "case", "tokens/s", "/ harmonic", "/ slower", "/ in turn", "tokens per CPU s (/ in turn)"],
                fly_rows),
    ])


# --------------------------------------------------------------------------- parent side


def prepare(train_tokens: int) -> None:
    subprocess.run([sys.executable, "-m", "bench.memory", "--child", "prepare", "--tokens", str(train_tokens)],
                   cwd=C.REPO, check=True)


def run_child(kind: str, src="", out="", tokens: int = 0, threads: int = 2, cwd: Path = C.REPO) -> dict:
    """Run `bench.memory --child` in a fresh process (from the tree at `cwd`; its own code is imported)."""
    cmd = [sys.executable, "-m", "bench.memory", "--child", kind, "--src", str(src), "--out", str(out),
           "--tokens", str(tokens), "--threads", str(threads)]
    env = os.environ | {"PYTHONPATH": str(cwd)}
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out_f, stderr=err_f, text=True, env=env)
        # wait4 reaps this child and returns its own rusage: a cross-check of its self-report.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0), err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} failed ({proc.returncode}):\n{stderr[-3000:]}")
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["wait4_mib"] = usage.ru_maxrss / 1024
    print(f"  {kind:13s} {tokens:>9,} tokens  peak {res['peak_mib']:7.0f} MiB  ({res['seconds']:.0f} s)", flush=True)
    return res


def corpus_jsonl(times: int) -> Path:
    """The builtin corpus repeated `times` times, one document per line."""
    from core.data import builtin_corpus

    path = MEM / f"corpus-{times}x.jsonl"
    if not path.exists():
        MEM.mkdir(parents=True, exist_ok=True)
        docs = builtin_corpus()
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for _ in range(times):
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
        tmp.replace(path)
    return path


def activation_cache(tokens: int) -> Path:
    """A `tokens`-token cache of blocks.15.hook_resid_post in core.extract's Parquet layout,
    filled with the real cached activations (repeated when more are needed)."""
    import numpy as np

    from core.extract import _ActivationWriter, _RunningStats, count_activations, iter_activations

    folder = MEM / f"acts-{tokens}" / C.HOOK
    if (folder / "stats.json").is_file() and count_activations(folder) == tokens:
        return folder
    real = C.acts_dir()
    import shutil

    shutil.rmtree(folder.parent, ignore_errors=True)
    writer, stats = _ActivationWriter(folder, 16384), _RunningStats()
    done = 0
    while done < tokens:
        for a in iter_activations(real, 4096):
            a = np.array(a[: tokens - done])
            n = len(a)
            rows = np.arange(done, done + n, dtype=np.int64) // 256
            writer.add(a, rows, (np.arange(done, done + n) % 256).astype(np.int32), np.zeros(n, np.int32))
            stats.update(a)
            done += n
            if done >= tokens:
                break
    writer.close()
    (folder / "stats.json").write_text(json.dumps(stats.result(C.HOOK).to_dict(), indent=1))
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="extraction 2.5k vs 25k tokens, training 25k vs 250k")
    size.add_argument("--full", action="store_true", help="the whole corpus (≈143k tokens) vs 10× (hours)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=2, help="runs of every case (median reported; default 2)")
    ap.add_argument("--extract-tokens", type=int, help="extraction tokens at 1× (overrides the size flags)")
    ap.add_argument("--train-tokens", type=int, help="training cache tokens at 1× (overrides the size flags)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--widths", help="instead: peak RSS and tokens/s of one TopK job per width "
                    "(comma-separated d_sae, each optionally :arch), this tree vs --before")
    ap.add_argument("--before", default="HEAD", help="the commit --widths compares against (default HEAD)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per --widths job (default 6)")
    ap.add_argument("--stream", action="store_true", help="instead: peak RSS of a 1× vs 10× token run from one "
                    "cache (many passes), and tokens/s of training on the fly vs cached")
    ap.add_argument("--stream-tokens", type=int, default=2_000_000, help="--stream: tokens of the 1× run")
    ap.add_argument("--cache-tokens", type=int, default=200_000, help="--stream: tokens in the activation cache")
    ap.add_argument("--fly-tokens", type=int, default=16_384, help="--stream: tokens trained per on-the-fly case")
    ap.add_argument("--parts", default="passes,fly", help="--stream: which parts (passes, fly)")
    ap.add_argument("--fly-widths", default="4608,32768", help="--stream: SAE widths of the on-the-fly cases")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--src", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.src, args.out, args.tokens, args.threads)
    if args.widths:
        return widths(args)
    if args.stream:
        return stream(args)

    load_before = C.load_avg()
    n_ext = 2_500 if args.quick else (None if args.full else 5_000)
    n_train = 25_000 if args.quick else (None if args.full else 50_000)
    n_ext, n_train = args.extract_tokens or n_ext, args.train_tokens or n_train
    print(f"[memory] load {load_before}; fixtures under {MEM}", flush=True)
    # Fixtures are made in a child: Linux carries a process's peak RSS across fork + exec (the
    # forked copy's high-water mark becomes the exec'd program's starting ru_maxrss), so a parent
    # that had loaded the model would lend its peak to every measured child.
    prepare(0)
    import shutil

    runs = MEM / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    from core.extract import count_activations

    samples: dict[str, list[dict]] = {}

    def case(name: str, kind: str, src="", out="", tokens: int = 0, count=None) -> None:
        r = run_child(kind, src, out, tokens, args.threads)
        r["tokens"] = count() if count else tokens
        samples.setdefault(name, []).append(r)
        if out and kind != "tokenize":
            shutil.rmtree(out, ignore_errors=True)

    # Each group: its baseline, then 1× and 10× alternating, `reps` times (RSS varies by tens of
    # MiB between identical runs: allocator and page-in timing).
    ds = {t: runs / f"ds-{t}x" for t in (1, 10)}
    for r in range(args.reps):
        for t in (1, 10):  # tokenize the 1× and 10× corpora; the first repetition's feed the extraction
            out = ds[t] if r == 0 else runs / f"ds-{t}x-{r}"
            case(f"tokenize {t}×", "tokenize", corpus_jsonl(t), out,
                 count=lambda out=out: json.loads((out / "stats.json").read_text())["tokens"])
    corpus_tokens = samples["tokenize 1×"][0]["tokens"]
    n_ext = n_ext or corpus_tokens
    n_train = n_train or corpus_tokens
    for r in range(args.reps):
        case("extract baseline", "extract-base")
        for t in (1, 10):
            out = runs / f"ext-{t}x"
            case(f"extract {t}×", "extract", ds[t], out, n_ext * t,
                 count=lambda out=out: count_activations(out / C.HOOK))
    prepare(n_train)
    caches = {t: activation_cache(n_train * t) for t in (1, 10)}  # made by prepare: found at once
    for r in range(args.reps):
        case("train baseline", "train-base")
        for t in (1, 10):
            case(f"train {t}×", "train", caches[t], runs / f"sae-{t}x", n_train * t)
    res = {name: {"peak_mib": C.median([x["peak_mib"] for x in xs]), "wait4_mib": C.median([x["wait4_mib"] for x in xs]),
                  "seconds": C.median([x["seconds"] for x in xs]), "tokens": xs[0]["tokens"],
                  "range": f"{min(x['peak_mib'] for x in xs):,.0f}–{max(x['peak_mib'] for x in xs):,.0f}"}
           for name, xs in samples.items()}

    ratios = {k: res[f"{k} 10×"]["peak_mib"] / res[f"{k} 1×"]["peak_mib"] for k in ("tokenize", "extract", "train")}
    above = {k: (res[f"{k} 10×"]["peak_mib"] - res[f"{k} baseline"]["peak_mib"],
                 res[f"{k} 1×"]["peak_mib"] - res[f"{k} baseline"]["peak_mib"]) for k in ("extract", "train")}
    print()
    for k, v in ratios.items():
        tgt = "" if k == "tokenize" else f" (target ≤ 1.15: {'met' if v <= 1.15 else 'NOT met'})"
        print(f"{k:9s} peak RSS 10× / 1× = {v:.3f}{tgt}")
    load_after = C.load_avg()
    if args.no_record:
        return
    rows = [[name, f"{r['tokens']:,}", f"{r['peak_mib']:,.0f}", r["range"], f"{r['wait4_mib']:,.0f}",
             f"{r['seconds']:.0f}"] for name, r in res.items()]
    size_note = "--quick" if args.quick else ("--full" if args.full else "default sizes")
    if args.extract_tokens or args.train_tokens:
        size_note = " ".join(a for a in sys.argv[1:] if not a.startswith("--no-"))
    # Peak RSS so far along the first 10× extraction run: where the growth happens.
    tr = samples["extract 10×"][0]["trace"]
    points = [tr[min(len(tr) - 1, max(0, round(f * len(tr)) - 1))] for f in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)]
    trace_line = ", ".join(f"{n:,} → {m:,.0f}" for n, m in points)
    at_1x = next((m for n, m in tr if n >= n_ext), tr[-1][1])
    late = next((m for n, m in tr if n >= 0.3 * n_ext * 10), tr[-1][1])
    body = "\n".join([
        f"Sizes ({size_note}): extraction {n_ext:,} vs {10 * n_ext:,} tokens (1× corpus dataset vs a dataset of the "
        f"corpus repeated 10×, {res['tokenize 1×']['tokens']:,} vs {res['tokenize 10×']['tokens']:,} tokens on disk); "
        f"training one epoch over a {n_train:,}- vs {10 * n_train:,}-token activation cache "
        "(core.extract Parquet layout, real SmolLM2 activations, the 10× one repeating them). "
        f"One fresh subprocess per run, {args.reps} runs per case (1× and 10× alternating); peak = the run's own "
        "ru_maxrss (cross-checked by the rusage os.wait4 returns), median over runs.\n",
        C.table(["case", "tokens", "peak RSS MiB (median)", "min–max", "wait4 MiB (median)", "seconds"], rows), "",
        C.table(["measure", "value", "target", "status"], [
            ["extraction peak RSS 10× / 1×", f"{ratios['extract']:.3f}", "≤ 1.15", C.ok(ratios["extract"] <= 1.15)],
            ["training peak RSS 10× / 1×", f"{ratios['train']:.3f}", "≤ 1.15", C.ok(ratios["train"] <= 1.15)],
            ["tokenization peak RSS 10× / 1× (informational)", f"{ratios['tokenize']:.3f}", "—", "—"],
        ]), "",
        f"Above the baseline process: extraction {above['extract'][1]:,.0f} → {above['extract'][0]:,.0f} MiB, "
        f"training {above['train'][1]:,.0f} → {above['train'][0]:,.0f} MiB (1× → 10×). For scale: core.extract "
        f"streams each hook's activations into its shard a row group at a time, so it holds at most one "
        f"2,048-token row group per hook (2,048 × 576 × 4 B = 4.5 MiB) whatever the corpus size.",
        "",
        f"Peak RSS so far along the first 10× extraction run (tokens → MiB): {trace_line}. At {n_ext:,} tokens "
        f"(the 1× size) it was {at_1x:,.0f} MiB; from 30% of the run to its end it grew "
        f"{tr[-1][1] - late:,.0f} MiB ({(tr[-1][1] - late) / late:.1%}).",
    ])
    C.append_result("peak memory vs corpus size (bench/memory.py)", body, load_before=load_before,
                    load_after=load_after)


if __name__ == "__main__":
    main()
