"""SAE training speed and quality: ours vs SAELens's own TopK trainer, plus the matmul roofline.

Both train a TopK SAE (d_in 576, d_sae 4608 = 8×, k 32, batch 4096) for the same number of
tokens on the SAME cached SmolLM2 activations (blocks.15.hook_resid_post of the builtin corpus):

* ours     — `core.train.train_sae(..., TrainConfig(sae=TopKConfig(k=32),
             expansion_factor=8, batch_size=4096, total_tokens=N), holdout_tokens=H)`, its defaults otherwise
* saelens  — SAELens's `SAETrainer` (its training loop, Adam, lr schedule, dead-latent
             tracking, activation scaler) on a `TopKTrainingSAE` built from
             `LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(...))` exactly as
             `LanguageModelSAETrainingRunner` builds it; the runner itself needs a
             TransformerLens model and an HF dataset, so the trainer gets our cached tensors as
             its `data_provider` (an iterator of [4096, 576] batches — the type it declares).
             Settings: its defaults plus what its docs recommend for this case —
             `normalize_activations="expected_average_only_in"`, lr decay over the final 20%.

Data: the studio's contexts (every row BOS-first, special tokens left out at extraction), and
the studio's default norm guard applied up front — tokens above 10× the median norm dropped
(bench/sink.py: a few text tokens after BOS still reach 11–52× the median) — so both see
identical tokens. The first H tokens (document
order) are held out; the rest are shuffled once (fixed seed) and cycled. FVU on the held-out
tokens is computed for both by one function, Σ‖x−x̂‖²/Σ‖x−x̄‖², in float64, with each SAE's
own encode/decode in raw units (both fold their activation scaling into the weights).

Speed: steady-state training tokens/s (time between the first and last step, from our
progress callback and from the timestamps at which SAELens's trainer pulls batches), and
end-to-end tokens/s (the whole call: our prelude + final eval; SAELens's norm estimation).
Roofline: this machine's fp32 rate for [4096×576]@[576×4608] is measured in every repetition;
the encoder matmul alone bounds tokens/s at 4096 / t_matmul.

Targets: ours ≥ 2.5× SAELens tokens/s; ours FVU ≤ SAELens FVU; ours ≥ 60% of the
encoder-matmul-only tokens/s.

SAELens lives in a separate venv (never the project's): /tmp/bench-venv, see bench/README.md.
Launched from the project venv, this script re-runs itself there.

    .venv/bin/python -m bench.train [--quick] [--steps S] [--reps R] [--threads T] [--no-saelens]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

from bench import _common as C

D_IN, EXPANSION, K, BATCH = 576, 8, 32, 4096
D_SAE = D_IN * EXPANSION
OUTLIER_MULTIPLE = 10.0
BENCH_VENV = os.environ.get("MISTUDIO_BENCH_VENV", "/tmp/bench-venv")


# --------------------------------------------------------------------------- data


def load_acts() -> tuple[np.ndarray, np.ndarray, int]:
    """(held-out, shuffled training tokens, outliers dropped) from the cached activations."""
    from core.extract import iter_activations

    x = np.concatenate([np.array(a) for a in iter_activations(C.acts_dir())])
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    keep = np.isfinite(norms) & (norms <= OUTLIER_MULTIPLE * np.median(norms[np.isfinite(norms)]))
    x = np.ascontiguousarray(x[keep])
    return x, keep, int((~keep).sum())


def split(x: np.ndarray, holdout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    held, rest = x[:holdout], x[holdout:]
    return held, np.ascontiguousarray(rest[np.random.default_rng(seed).permutation(len(rest))])


@torch.no_grad()
def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Σ‖x−x̂‖² / Σ‖x−x̄‖² over all of x, in float64."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# --------------------------------------------------------------------------- contenders


def run_ours(held: np.ndarray, train: np.ndarray, total: int, seed: int) -> dict:
    from core.sae import TopKConfig
    from core.train import TrainConfig, train_sae

    data = np.concatenate([held, train])

    def chunks():
        for i in range(0, len(data), BATCH):
            yield data[i:i + BATCH]

    marks: list[tuple[float, int]] = []

    def progress(d):
        if not marks or d["done"] > marks[-1][1]:
            marks.append((time.perf_counter(), d["done"]))

    cfg = TrainConfig(sae=TopKConfig(k=K), expansion_factor=EXPANSION, batch_size=BATCH, total_tokens=total,
                      seed=seed)
    t0 = time.perf_counter()
    res = train_sae(chunks, D_IN, cfg, progress=progress, holdout_tokens=len(held))
    wall = time.perf_counter() - t0
    steady = [(t, n) for t, n in marks if n > 0]
    (t_a, n_a), (t_b, n_b) = steady[0], steady[-1]
    with torch.no_grad():
        h = torch.from_numpy(held)
        x_hat, z = res.sae(h)
    return {"wall": wall, "tokens": res.final["tokens"], "steady": (n_b - n_a) / (t_b - t_a),
            "steady_steps": (n_b - n_a) / BATCH, "fvu": fvu(h, x_hat), "l0": float((z > 0).sum(1).float().mean()),
            "dead": res.final["dead_frac"], "excluded": res.final["excluded_outliers"],
            "own_fvu": res.final["fvu"]}


def profile_ours(held: np.ndarray, train: np.ndarray, total: int, top: int = 12) -> dict:
    """One extra (untimed) run of ours under torch.profiler, recording only the steady steps
    (from the first progress report to the last step, so the prelude and final evaluation are
    left out). Returns the top ops by self CPU time per step (grouped by input shapes), the
    wall ms per step under the profiler, and the encoder matmul's own ms per step — measured in
    the same moments as the rest of the step, so their ratio does not depend on how busy the
    machine was when the matmul rate was measured separately."""
    from torch.profiler import ProfilerActivity, profile

    from core.sae import TopKConfig
    from core.train import TrainConfig, train_sae

    data = np.concatenate([held, train])
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    state = {"on": False, "from": 0, "to": 0, "t0": 0.0, "t1": 0.0}

    def progress(d):
        if d["done"] > 0 and not state["on"] and not state["to"]:
            prof.start()
            state.update(on=True, **{"from": d["done"]}, t0=time.perf_counter())
        elif state["on"] and d["done"] >= total:
            state["t1"] = time.perf_counter()
            prof.stop()
            state.update(on=False, to=d["done"])

    cfg = TrainConfig(sae=TopKConfig(k=K), expansion_factor=EXPANSION, batch_size=BATCH, total_tokens=total)
    train_sae(lambda: (data[i:i + BATCH] for i in range(0, len(data), BATCH)), D_IN, cfg, progress=progress,
              holdout_tokens=len(held))
    n_steps = max((state["to"] - state["from"]) / BATCH, 1)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    enc_shape = [[D_SAE], [BATCH, D_IN], [D_IN, D_SAE]]
    enc_us = sum(e.self_cpu_time_total for e in events
                 if e.key == "aten::addmm" and [list(x) for x in e.input_shapes[:3]] == enc_shape)

    def shapes(e):
        return " ".join("×".join(map(str, x)) for x in e.input_shapes if x) or "—"

    rows = [[e.key, shapes(e), f"{e.count / n_steps:.1f}", f"{e.self_cpu_time_total / 1e3 / n_steps:.0f}",
             f"{e.self_cpu_time_total / total_us:.0%}"] for e in events[:top]]
    return {"rows": rows, "step_ms": (state["t1"] - state["t0"]) * 1e3 / n_steps,
            "cpu_ms": total_us / 1e3 / n_steps, "enc_ms": enc_us / 1e3 / n_steps, "n_ops": len(events)}


def saelens_config(total: int, steps: int):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig

    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations="expected_average_only_in"),
        model_name="SmolLM2-135M (cached activations)", hook_name=C.HOOK, dataset_path="builtin",
        training_tokens=total, train_batch_size_tokens=BATCH,
        lr_decay_steps=max(1, steps // 5),  # the docs' tutorial: decay over the final 20%
        n_batches_for_norm_estimate=4,  # 16k tokens, as many as our scale estimate reads
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None,
        verbose=False, device="cpu", dtype="float32")


def run_saelens(held: np.ndarray, train: np.ndarray, total: int, steps: int, seed: int) -> dict:
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = saelens_config(total, steps)
    torch.manual_seed(seed)
    # What LanguageModelSAETrainingRunner.__init__ does to build the SAE.
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
    t_train = torch.from_numpy(train)
    pulls: list[float] = []

    def provider():
        n, i = len(t_train), 0
        while True:
            pulls.append(time.perf_counter())
            a = (i * BATCH) % n
            b = a + BATCH
            yield t_train[a:b] if b <= n else torch.cat([t_train[a:], t_train[:b - n]])
            i += 1

    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=provider())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    wall = time.perf_counter() - t0
    step_pulls = pulls[cfg.n_batches_for_norm_estimate:]  # the first pulls estimate the norm
    with torch.no_grad():
        sae.eval()
        h = torch.from_numpy(held)
        z = sae.encode(h)
        x_hat = sae.decode(z)
    n_steps = trainer.n_training_steps
    return {"wall": wall, "tokens": trainer.n_training_samples,
            "steady": (len(step_pulls) - 1) * BATCH / (step_pulls[-1] - step_pulls[0]),
            "steady_steps": len(step_pulls) - 1, "fvu": fvu(h, x_hat), "l0": float((z > 0).sum(1).float().mean()),
            "dead": float(trainer.dead_neurons.float().mean()), "steps": n_steps}


def matmul_rate(reps: int = 8) -> dict:
    """Median seconds and GFLOP/s of [4096×576]@[576×4608] fp32 (plain mm and addmm with a bias)."""
    a, b, bias = torch.randn(BATCH, D_IN), torch.randn(D_IN, D_SAE), torch.randn(D_SAE)
    out = torch.empty(BATCH, D_SAE)
    flop = 2 * BATCH * D_IN * D_SAE
    res = {}
    for name, fn in (("mm", lambda: torch.mm(a, b, out=out)), ("addmm", lambda: torch.addmm(bias, a, b, out=out))):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        res[name] = C.median(ts)
    res["gflops"] = flop / res["mm"] / 1e9
    res["enc_tokens_s"] = BATCH / res["mm"]
    return res


# --------------------------------------------------------------------------- main


def _reexec_in_bench_venv(argv: list[str]) -> None:
    py = os.path.join(BENCH_VENV, "bin", "python")
    if not os.path.exists(py):
        sys.exit(f"sae_lens is not installed here and {py} does not exist. Build the bench venv:\n"
                 f"  python3 -m venv {BENCH_VENV} && {py} -m pip install torch==2.13.0 && "
                 f"{py} -m pip install -c constraints.txt sae-lens -e .\n"
                 "or run with --no-saelens (ours + roofline only).")
    C.acts_dir()  # build the activation cache with the project venv (it has the GGUF model package)
    env = dict(os.environ, BENCH_LAUNCHED_AS=C.command_line())
    print(f"[train] sae_lens is not in this venv; re-running under {py}", flush=True)
    os.execve(py, [py, "-m", "bench.train", *argv], env)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 steps × 2 repetitions")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of 4096 tokens (default 30)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions, contenders alternating (default 2)")
    ap.add_argument("--holdout", type=int, default=4096, help="held-out tokens for FVU (default 4096)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--no-saelens", action="store_true", help="ours + roofline only")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    with_sl = not args.no_saelens
    if with_sl and importlib.util.find_spec("sae_lens") is None:
        _reexec_in_bench_venv(argv)
    steps = args.steps or (12 if args.quick else 30)
    reps = args.reps or 2
    total = steps * BATCH
    torch.set_num_threads(args.threads)
    load_before = C.load_avg()

    x, _, dropped = load_acts()
    held, train = split(x, args.holdout)
    print(f"[train] {len(x)} cached tokens ({dropped} outliers > {OUTLIER_MULTIPLE:g}× median norm dropped), "
          f"{len(held)} held out, {len(train)} to train on; {steps} steps × {BATCH} = {total} tokens; "
          f"{reps} repetitions; {torch.get_num_threads()} threads; load {load_before}", flush=True)
    h64 = held.astype(np.float64)
    mean_norm = float(np.linalg.norm(h64.mean(0)))
    rms_dev = float(np.sqrt(((h64 - h64.mean(0)) ** 2).sum(1).mean()))
    print(f"[train] held-out: ‖mean‖ = {mean_norm:.1f}, RMS ‖x − mean‖ = {rms_dev:.1f}")
    if with_sl:
        import sae_lens
        sl_version = sae_lens.__version__

    results = {"ours": [], "saelens": []}
    mm = []
    names = ["ours", "saelens"] if with_sl else ["ours"]
    for r in range(reps):
        mm.append(matmul_rate())
        print(f"  rep {r + 1} matmul {mm[-1]['gflops']:.1f} GFLOP/s ({mm[-1]['mm'] * 1e3:.0f} ms; "
              f"addmm {mm[-1]['addmm'] * 1e3:.0f} ms)", flush=True)
        for name in (names if r % 2 == 0 else names[::-1]):
            out = run_ours(held, train, total, seed=r) if name == "ours" else run_saelens(held, train, total, steps, r)
            results[name].append(out)
            print(f"  rep {r + 1} {name:7s} steady {out['steady']:8.0f} tok/s, end-to-end "
                  f"{out['tokens'] / out['wall']:8.0f} tok/s ({out['wall']:.1f} s), FVU {out['fvu']:.4f}, "
                  f"L0 {out['l0']:.1f}, dead {out['dead']:.3f}", flush=True)
    mm.append(matmul_rate())
    prof = profile_ours(held, train, total)
    insitu = prof["enc_ms"] / prof["step_ms"]
    print(f"  profile of ours (untimed run): {prof['step_ms']:.0f} ms/step wall under the profiler, encoder "
          f"matmul {prof['enc_ms']:.0f} ms of it ({insitu:.0%})")
    for row in prof["rows"]:
        print("   ", " | ".join(row))

    med = {n: {k: C.median([o[k] for o in results[n]]) for k in ("steady", "fvu", "l0", "wall")} for n in names}
    for n in names:
        med[n]["e2e"] = C.median([o["tokens"] / o["wall"] for o in results[n]])
    gflops = C.median([m["gflops"] for m in mm])
    t_mm = C.median([m["mm"] for m in mm])
    enc_tok_s = BATCH / t_mm
    roof_frac = med["ours"]["steady"] / enc_tok_s
    # FLOPs we can justify per step of ours: the dense encoder matmul (2·N·d·D); the k-sparse
    # decoder forward and the four sparse backward products (grad W_enc, grad x, grad W_dec,
    # grad acts), 2·N·k·d each; AuxK over dead latents is left out (0 when none is dead).
    ours_flop = 2 * BATCH * D_IN * D_SAE + 5 * 2 * BATCH * K * D_IN
    # A dense TopK step (SAELens's): encoder and decoder forward, and for each two backward
    # matmuls (weights and input), all N×d×D: 6 × 2·N·d·D.
    dense_flop = 6 * 2 * BATCH * D_IN * D_SAE
    ours_gflops = ours_flop * med["ours"]["steady"] / BATCH / 1e9
    ours_dense_equiv = dense_flop * med["ours"]["steady"] / BATCH / 1e9
    print()
    print(f"matmul [4096×576]@[576×4608]: {gflops:.1f} GFLOP/s → encoder-only bound {enc_tok_s:,.0f} tokens/s")
    print(f"ours: {med['ours']['steady']:,.0f} tok/s steady = {roof_frac:.0%} of the encoder-only bound "
          f"(target ≥ 60%); {ours_gflops:.1f} GFLOP/s counted ({ours_gflops / gflops:.0%} of matmul), "
          f"{ours_dense_equiv:.1f} dense-equivalent GFLOP/s")
    lines = []
    if with_sl:
        speed = C.median([o["steady"] / s["steady"] for o, s in zip(results["ours"], results["saelens"])])
        e2e = C.median([(o["tokens"] / o["wall"]) / (s["tokens"] / s["wall"])
                        for o, s in zip(results["ours"], results["saelens"])])
        sl_gflops = dense_flop * med["saelens"]["steady"] / BATCH / 1e9
        fvu_ok = med["ours"]["fvu"] <= med["saelens"]["fvu"]
        print(f"saelens: {med['saelens']['steady']:,.0f} tok/s steady; {sl_gflops:.1f} GFLOP/s (dense step FLOPs)")
        print(f"ours / saelens steady = {speed:.2f}× (target ≥ 2.5: {'met' if speed >= 2.5 else 'NOT met'}); "
              f"end-to-end {e2e:.2f}×")
        print(f"FVU held-out: ours {med['ours']['fvu']:.4f} vs saelens {med['saelens']['fvu']:.4f} "
              f"({'no worse' if fvu_ok else 'WORSE'})")
    if args.no_record:
        return

    rows = []
    for n in names:
        for i, o in enumerate(results[n]):
            rows.append([n, i + 1, f"{o['steady']:,.0f}", f"{o['tokens'] / o['wall']:,.0f}", f"{o['wall']:.1f}",
                         f"{o['tokens']:,}", f"{o['fvu']:.4f}", f"{o['l0']:.1f}", f"{o['dead']:.3f}"])
    body = [
        f"Sizes: {steps} steps × {BATCH} tokens = {total:,} tokens per run ({'--quick' if args.quick else 'default sizes'}), "
        f"{reps} repetitions, contenders alternating order. Data: {len(x):,} cached tokens of {C.HOOK} "
        f"({dropped} outliers > {OUTLIER_MULTIPLE:g}× median norm dropped for both), first {len(held):,} held out, "
        f"{len(train):,} shuffled once and cycled. SAE: TopK, d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}.",
    ]
    if with_sl:
        body.append(f"SAELens {sl_version}: `SAETrainer` + `TopKTrainingSAE` from `LanguageModelSAERunnerConfig("
                    "sae=TopKTrainingSAEConfig(d_in=576, d_sae=4608, k=32, normalize_activations="
                    f"\"expected_average_only_in\"), train_batch_size_tokens=4096, lr_decay_steps={max(1, steps // 5)}, "
                    "n_batches_for_norm_estimate=4)`, other settings its defaults (lr 3e-4, constant scheduler then the linear decay above, no warmup, Adam "
                    "β=(0.9, 0.999), aux_loss_coefficient 1, rescale_acts_by_decoder_norm, dense activations, fp32). "
                    "Ours: TrainConfig defaults (lr 2e-4/√(4608/2^14) = 3.8e-4, 5% warmup, 20% decay, AuxK 1/32).")
    body += ["", C.table(["contender", "rep", "steady tok/s", "end-to-end tok/s", "wall s", "tokens", "held-out FVU",
                          "L0", "dead frac"], rows), ""]
    ratio_rows = [["ours / encoder-matmul-only tokens/s", f"{roof_frac:.2f}", "≥ 0.60", C.ok(roof_frac >= 0.6)]]
    if with_sl:
        ratio_rows = [["ours / SAELens steady tokens/s", f"{speed:.2f}×", "≥ 2.5×", C.ok(speed >= 2.5)],
                      ["ours / SAELens end-to-end tokens/s", f"{e2e:.2f}×", "—", "—"],
                      ["held-out FVU ours vs SAELens (medians)", f"{med['ours']['fvu']:.4f} vs {med['saelens']['fvu']:.4f}",
                       "ours ≤ SAELens", C.ok(fvu_ok)]] + ratio_rows
    body += [C.table(["measure", "value", "target", "status"], ratio_rows), ""]
    body.append(f"Held-out activations: ‖mean‖ = {mean_norm:.1f} vs RMS ‖x − mean‖ = {rms_dev:.1f}, so an SAE whose "
                f"b_dec starts at 0 has FVU ≈ 1 + ‖mean‖²/E‖x − mean‖² = {1 + mean_norm ** 2 / rms_dev ** 2:.2f} "
                "until it learns the mean; ours starts b_dec at the geometric median, SAELens v6 at zero.\n")
    mm_list = ", ".join(f"{m['gflops']:.0f}" for m in mm)
    body.append(
        f"Roofline: fp32 [4096×576]@[576×4608] = {2 * BATCH * D_IN * D_SAE / 1e9:.1f} GFLOP, measured "
        f"{gflops:.1f} GFLOP/s (median of {len(mm)} measurements taken between runs: "
        f"{mm_list}; addmm {C.median([m['addmm'] for m in mm]) * 1e3:.0f} ms vs mm "
        f"{t_mm * 1e3:.0f} ms) → encoder-matmul-only bound {enc_tok_s:,.0f} tokens/s. Ours at "
        f"{med['ours']['steady']:,.0f} tokens/s is {roof_frac:.0%} of it. Counted FLOPs of our step "
        f"(dense encoder 2·N·d·D + five k-sparse products 2·N·k·d; AuxK excluded) = {ours_flop / 1e9:.1f} GFLOP → "
        f"{ours_gflops:.1f} GFLOP/s achieved = {ours_gflops / gflops:.0%} of the measured matmul rate; a dense "
        f"TopK step costs 12·N·d·D = {dense_flop / 1e9:.0f} GFLOP, so ours delivers {ours_dense_equiv:.0f} "
        "dense-equivalent GFLOP/s" + (f"; SAELens's dense step achieves {sl_gflops:.1f} GFLOP/s "
                                      f"({sl_gflops / gflops:.0%} of the matmul rate)." if with_sl else "."))
    body += ["", f"Where our step's time goes (torch.profiler, one extra untimed run, steady steps only, "
             f"{prof['step_ms']:.0f} ms/step wall under the profiler, {prof['cpu_ms']:.0f} ms/step self CPU time "
             f"over {prof['n_ops']} distinct op/shape kinds; top {len(prof['rows'])} by self CPU time). In the same "
             f"run the encoder matmul (addmm 4096×576 @ 576×4608) took {prof['enc_ms']:.0f} ms per step = "
             f"**{insitu:.0%} of the step's wall time** — the in-situ counterpart of the roofline fraction above, "
             "immune to the load changing between the matmul measurement and the training runs:", "",
             C.table(["op", "input shapes", "calls/step", "self ms/step", "share of self CPU"], prof["rows"])]
    launched = os.environ.get("BENCH_LAUNCHED_AS")
    cmd = f"{launched}  (re-ran itself as `{C.command_line()}`)" if launched else None
    C.append_result("SAE training (bench/train.py)", "\n".join(body), command=cmd, load_before=load_before,
                    load_after=C.load_avg())


if __name__ == "__main__":
    main()
