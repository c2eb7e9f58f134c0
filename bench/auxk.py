"""What AuxK costs in a TopK training step, at research width.

One TopK SAE (d_in 576, k 32, batch 4096) on the cached SmolLM2 activations, stepped (loss,
backward, the default optimizer: sign-SGD under the schedule-free wrapper) with AuxK off (no latent dead) and on with a given share of its latents
dead, in interleaved rounds; medians and the ratio to the AuxK-off step. The dead sets are
fixed random draws: a short run at 65k latents had ~25k idle latents (the training-at-width
issue's profile), a long run a few percent. Each set is timed as drawn (the latents'
pre-activations like live ones', half of them positive: AuxK's worst case) and truly dead
(their encoder bias lowered so their pre-activations are below zero almost everywhere, as a
trained SAE's dead latents are: AuxK then has almost nothing to reconstruct with).
`--sparse` also times each case with AuxK's picks kept sparse however densely they fill the
[tokens × dead latents] matrix (`DENSE_AUXK_MIN_FILL` out of reach), to show what the dense
products save.

Target (training-at-width issue): at 65,536 latents the step with AuxK active is within 15% of
the step with it off.

    .venv/bin/python -m bench.auxk [--d-sae 65536] [--dead 0.02,0.38] [--rounds 3] [--sparse] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
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
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load_before = C.load_avg()
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
