"""What AuxK costs in a TopK training step, at research width.

One TopK SAE (d_in 576, k 32, batch 4096) on the cached SmolLM2 activations, stepped (loss,
backward, the default optimizer: sign-SGD under the schedule-free wrapper) with AuxK off (no
latent dead) and on with a given share of its latents dead, in interleaved rounds; medians and
the ratio to the AuxK-off step. The dead sets are fixed random draws: a short run at 65k
latents had ~25k idle latents (the training-at-width issue's profile), a long run a few
percent. Each set is timed as drawn (the latents' pre-activations like live ones', half of them
positive: AuxK's worst case) and truly dead (their encoder bias lowered so their
pre-activations are below zero almost everywhere, as a trained SAE's dead latents are: AuxK
then has almost nothing to reconstruct with).

`--run STEPS` measures the case that matters instead: two real default training runs
(`train_sae`, sign-SGD, the default dead window, on the bench's cached tokens, cycled), with
AuxK (its default α) and without (α 0), each in its own process; ms per step over the steps
from the first dead latent on, and the ratio. Every dead set, its pre-activations and the
picks are then what training makes of them.

`--sparse` also times each case with AuxK's picks kept sparse however densely they fill the
[tokens × dead latents] matrix (`DENSE_AUXK_MIN_FILL` out of reach), to show what the dense
products save.

Target (training-at-width issue): at 65,536 latents the step with AuxK active is within 15% of
the step with it off.

    .venv/bin/python -m bench.auxk [--d-sae 65536] [--dead 0.02,0.38] [--rounds 3] [--sparse] [--no-record]
    .venv/bin/python -m bench.auxk --run 200 [--d-sae 65536] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import numpy as np
import torch

from bench import _common as C

D_IN, K, BATCH = 576, 32, 4096


def step_seconds(sae, x: torch.Tensor, dead: torch.Tensor, opt, scratch: dict, amp: bool, fill: float) -> float:
    from core.sae import topk
    from core.sae.base import StepContext

    topk.DENSE_AUXK_MIN_FILL, default = fill, topk.DENSE_AUXK_MIN_FILL
    try:
        t = time.perf_counter()
        out = sae.training_step(x, StepContext(dead, 1.0, amp, scratch))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t
    finally:
        topk.DENSE_AUXK_MIN_FILL = default


def run_marks(d_sae: int, steps: int, alpha: float, threads: int) -> list[tuple[float, int, float]]:
    """(time, tokens, dead fraction) after each step of a real default run."""
    from core.extract import iter_activations
    from core.sae import TopKConfig
    from core.train import TrainConfig, train_sae

    torch.set_num_threads(threads)
    x = np.concatenate([np.array(b) for b in iter_activations(C.acts_dir(threads))])
    cfg = TrainConfig(sae=TopKConfig(k=K, auxk_alpha=alpha), d_sae=d_sae, batch_size=BATCH,
                      total_tokens=steps * BATCH, sample_tokens=2 * BATCH, log_every=1)
    marks: list[tuple[float, int, float]] = []

    def progress(d):
        if d.get("done") and (not marks or d["done"] > marks[-1][1]):  # the evaluation repeats the last
            marks.append((time.perf_counter(), d["done"], d.get("dead_frac", 0.0)))

    train_sae(lambda: iter([x] * (steps * BATCH // len(x) + 2)), x.shape[1], cfg, progress=progress)
    return marks


def real_runs(a) -> str:
    """`--run`: a real run with AuxK and one without, each in its own process; the table."""
    runs = {}
    for name, alpha in (("AuxK on", 1 / 32), ("AuxK off (α 0)", 0.0)):
        code = (f"import json; from bench.auxk import run_marks; "
                f"print(json.dumps(run_marks({a.d_sae}, {a.run}, {alpha}, {a.threads})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
        print(f"  {name}: {len(runs[name])} steps", flush=True)
    on = runs["AuxK on"]
    first = next((i for i, m in enumerate(on) if m[2] > 0), None)
    if first is None or first + 2 >= len(on):
        return f"no latent was dead before the last steps of {a.run}: run longer"
    rows, per = [], {}
    for name, marks in runs.items():
        per[name] = (marks[-1][0] - marks[first][0]) / (len(marks) - 1 - first)
        dead = [m[2] for m in marks[first:]]
        rows.append([name, f"{per[name] * 1000:,.0f}", f"{BATCH / per[name]:,.0f}", f"{min(dead):.2%}-{max(dead):.2%}"])
    ratio = per["AuxK on"] / per["AuxK off (α 0)"]
    rows[0].append(f"{ratio:.2f}× {C.ok(ratio <= 1.15)}")
    rows[1].append("—")
    return (f"Two real default runs (TopK k {K}, d_sae {a.d_sae:,}, batch {BATCH}, sign-SGD, the default dead "
            f"window, {a.run} steps on the bench's cached tokens), each in its own process; ms per step over "
            f"steps {first + 2}-{len(on)}, from the first step with a dead latent on:\n\n"
            + C.table(["run", "ms/step", "tokens/s", "dead latents", "on / off (≤ 1.15×)"], rows))


def main(argv: list[str] | None = None) -> None:
    from core.extract import iter_activations
    from core.sae import TopKConfig, TopKSAE, topk
    from core.train.config import prefer_bf16
    from core.train.optim import make_optimizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-sae", type=int, default=65_536)
    ap.add_argument("--dead", default="0.02,0.38", help="shares of latents dead, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matmul", choices=("auto", "fp32", "bf16"), default="auto",
                    help="the encoder matmul's dtype (auto: the training default, prefer_bf16)")
    ap.add_argument("--sparse", action="store_true", help="also time each case with AuxK's dense products off")
    ap.add_argument("--run", type=int, default=0, metavar="STEPS", help="two real runs of this many steps instead")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load_before = C.load_avg()
    if a.run:
        body = real_runs(a)
        print(body)
        if not a.no_record:
            C.append_result(f"bench/auxk.py --run — AuxK's cost in real runs at {a.d_sae:,} latents", body,
                            load_before=load_before)
        return
    x = torch.from_numpy(np.concatenate([np.array(b) for b in iter_activations(C.acts_dir(a.threads))])[:BATCH])
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, a.d_sae, TopKConfig(k=K))
    sae.initialise(x)
    def optimizer(model):  # a tiny lr: the weights barely move
        return make_optimizer("signum", list(model.parameters()), 1e-6)

    dense, sparse = topk.DENSE_AUXK_MIN_FILL, float("inf")
    opt = optimizer(sae)
    gen = torch.Generator().manual_seed(1)
    none = torch.zeros(a.d_sae, dtype=torch.bool)
    cases = {"off": (sae, opt, none, dense)}
    with torch.no_grad():
        spread = float(((x - sae.b_dec) @ sae.W_enc[:, :256]).std())
    for share in (float(s) for s in a.dead.split(",")):
        dead = torch.zeros(a.d_sae, dtype=torch.bool)
        dead[torch.randperm(a.d_sae, generator=gen)[:round(share * a.d_sae)]] = True
        cases[f"{share:.0%} drawn"] = (sae, opt, dead, dense)
        if a.sparse:
            cases[f"{share:.0%} drawn, sparse"] = (sae, opt, dead, sparse)
        # Truly dead latents: their encoder bias 4 standard deviations down, so (as in a trained
        # SAE) their pre-activations are below zero on nearly every token.
        low = copy.deepcopy(sae)
        with torch.no_grad():
            low.b_enc[dead] -= 4 * spread
        low_opt = optimizer(low)
        cases[f"{share:.0%} truly dead"] = (low, low_opt, dead, dense)
        if a.sparse:
            cases[f"{share:.0%} truly dead, sparse"] = (low, low_opt, dead, sparse)
    scratch: dict = {}
    amp = prefer_bf16(torch.device("cpu")) if a.matmul == "auto" else a.matmul == "bf16"
    for model, optim, dead, fill in cases.values():  # warm-up: buffers, kernels, optimizer state
        step_seconds(model, x, dead, optim, scratch, amp, fill)
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(a.rounds):
        for name, (model, optim, dead, fill) in cases.items():
            times[name].append(step_seconds(model, x, dead, optim, scratch, amp, fill))
            print(f"  round {r + 1} {name:>24}: {times[name][-1] * 1000:,.0f} ms/step", flush=True)
    off = C.median(times["off"])
    rows = [[name, f"{C.median(t) * 1000:,.0f}", f"{BATCH / C.median(t):,.0f}", f"{C.median(t) / off:.2f}×",
             C.ok(C.median(t) / off <= 1.15) if name != "off" else "—"] for name, t in times.items()]
    body = (f"TopK d_in {D_IN}, d_sae {a.d_sae:,}, k {K}, batch {BATCH}, encoder matmul in {'bf16' if amp else 'fp32'}, "
            f"sign-SGD (schedule-free), AuxK dense from a {dense:.3g} fill ('sparse': never), "
            f"{a.rounds} interleaved rounds (medians):\n\n"
            + C.table(["AuxK", "ms/step", "tokens/s", "step / off", "within 15%"], rows))
    print(body)
    if not a.no_record:
        C.append_result(f"bench/auxk.py — AuxK's cost in the TopK step at {a.d_sae:,} latents", body,
                        load_before=load_before)


if __name__ == "__main__":
    main()
