"""Peak memory vs corpus size: extraction and training must stay flat when the data grows 10×.

Every case runs in a fresh subprocess (`python -m bench.memory --child ...`) and reports its own
peak RSS, `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the parent cross-checks it with the
rusage `os.wait4` returns for that child).

* tokenize  — `core.pipeline.tokenize_dataset` of the builtin corpus written once (1×) and ten
              times over (10×) as a .jsonl file; it builds the two datasets the extraction uses.
              Informational: tokenizing holds the documents in memory, so it is not in the target.
* extract   — `core.pipeline.extract_activations` of SmolLM2 blocks.15.hook_resid_post (the real
              model, batch 8, Parquet shards) over the first N tokens of the 1× dataset and the
              first 10·N tokens of the 10× dataset.
* train     — `core.pipeline.train_on_activations` (TopK, 8×, k 32, batch 4096, one epoch: cached
              Parquet source → trainer → SAELens folder) on an activation cache of M tokens and
              one of 10·M tokens, both in core.extract's Parquet layout, filled with the real
              cached SmolLM2 activations (the 10× cache repeats them).
* baselines — the same process with the model loaded and one 8-token hooked forward run
              (extraction), or the training modules imported (training): the fixed part of each peak.

Target: peak RSS at 10× within 15% of 1×, for extraction and for training.

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
    if kind == "tokenize":
        from transformers import AutoTokenizer

        from core.pipeline import tokenize_dataset

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
            from core.pipeline import extract_activations

            extract_activations(model, tok, Path(src), [C.HOOK], Path(out), batch_size=8, max_tokens=tokens)
    elif kind in ("train", "train-base"):
        import torch

        torch.set_num_threads(threads)
        from core.pipeline import train_on_activations
        from core.train import TrainConfig

        if kind == "train":
            cfg = TrainConfig(architecture="topk", expansion_factor=8, k=32, batch_size=4096, epochs=1)
            meta = {"model_name": "SmolLM2-135M", "hook_name": C.HOOK, "context_size": 256, "dataset_path": src}
            train_on_activations(Path(src), Path(out), cfg, meta)
    else:
        raise SystemExit(f"unknown child kind {kind}")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("RESULT " + json.dumps({"peak_mib": peak_kib / 1024, "seconds": time.perf_counter() - t0}), flush=True)


# --------------------------------------------------------------------------- parent side


def run_child(kind: str, src="", out="", tokens: int = 0, threads: int = 2) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--child", kind, "--src", str(src), "--out", str(out),
           "--tokens", str(tokens), "--threads", str(threads)]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, cwd=C.REPO, stdout=out_f, stderr=err_f, text=True)
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
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--src", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.src, args.out, args.tokens, args.threads)

    load_before = C.load_avg()
    n_ext = 2_500 if args.quick else (None if args.full else 5_000)
    n_train = 25_000 if args.quick else (None if args.full else 50_000)
    print(f"[memory] load {load_before}; fixtures under {MEM}", flush=True)
    C.model_dir()
    import shutil

    runs = MEM / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    res: dict[str, dict] = {}

    # Tokenize the 1× and 10× corpora (measured, informational); they feed the extraction cases.
    ds = {}
    for times in (1, 10):
        ds[times] = runs / f"ds-{times}x"
        res[f"tokenize {times}×"] = run_child("tokenize", corpus_jsonl(times), ds[times], 0, args.threads)
        res[f"tokenize {times}×"]["tokens"] = json.loads((ds[times] / "stats.json").read_text())["tokens"]
    corpus_tokens = res["tokenize 1×"]["tokens"]
    n_ext = n_ext or corpus_tokens
    n_train = n_train or corpus_tokens

    res["extract baseline"] = run_child("extract-base", threads=args.threads)
    res["extract baseline"]["tokens"] = 0
    for times in (1, 10):
        r = run_child("extract", ds[times], runs / f"ext-{times}x", n_ext * times, args.threads)
        from core.extract import count_activations

        r["tokens"] = count_activations(runs / f"ext-{times}x" / C.HOOK)
        res[f"extract {times}×"] = r
        shutil.rmtree(runs / f"ext-{times}x", ignore_errors=True)

    caches = {times: activation_cache(n_train * times) for times in (1, 10)}
    res["train baseline"] = run_child("train-base", threads=args.threads)
    res["train baseline"]["tokens"] = 0
    for times in (1, 10):
        r = run_child("train", caches[times], runs / f"sae-{times}x", n_train * times, args.threads)
        r["tokens"] = n_train * times
        res[f"train {times}×"] = r

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
    rows = [[name, f"{r['tokens']:,}", f"{r['peak_mib']:,.0f}", f"{r['wait4_mib']:,.0f}", f"{r['seconds']:.0f}"]
            for name, r in res.items()]
    size_note = "--quick" if args.quick else ("--full" if args.full else "default sizes")
    body = "\n".join([
        f"Sizes ({size_note}): extraction {n_ext:,} vs {10 * n_ext:,} tokens (1× corpus dataset vs a dataset of the "
        f"corpus repeated 10×, {res['tokenize 1×']['tokens']:,} vs {res['tokenize 10×']['tokens']:,} tokens on disk); "
        f"training one epoch over a {n_train:,}- vs {10 * n_train:,}-token activation cache "
        "(core.extract Parquet layout, real SmolLM2 activations, the 10× one repeating them). "
        "One fresh subprocess per case; peak = its ru_maxrss.\n",
        C.table(["case", "tokens", "peak RSS MiB (self)", "peak RSS MiB (wait4)", "seconds"], rows), "",
        C.table(["measure", "value", "target", "status"], [
            ["extraction peak RSS 10× / 1×", f"{ratios['extract']:.3f}", "≤ 1.15", C.ok(ratios["extract"] <= 1.15)],
            ["training peak RSS 10× / 1×", f"{ratios['train']:.3f}", "≤ 1.15", C.ok(ratios["train"] <= 1.15)],
            ["tokenization peak RSS 10× / 1× (informational)", f"{ratios['tokenize']:.3f}", "—", "—"],
        ]), "",
        f"Above the baseline process: extraction {above['extract'][1]:,.0f} → {above['extract'][0]:,.0f} MiB, "
        f"training {above['train'][1]:,.0f} → {above['train'][0]:,.0f} MiB (1× → 10×).",
    ])
    C.append_result("peak memory vs corpus size (bench/memory.py)", body, load_before=load_before,
                    load_after=load_after)


if __name__ == "__main__":
    main()
