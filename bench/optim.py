"""What the optimizer step costs at width (training-at-width issue).

One step of each optimizer over a TopK SAE's weights (d_in 576; W_enc held column-major, as its
transpose, the way the sparse step gathers it), with gradients of the same layouts as training's:
`signum` (the default: sign-SGD under the schedule-free wrapper), `adam` as training builds it
(`core.train.optim._Adam`: W_enc stepped through a row-major alias of its storage) and torch's
fused Adam given the weights themselves (what `adam` was before the alias: its kernel copies a
column-major weight, its gradient and both moments every step). Interleaved rounds, medians of
ms per step; a tiny lr, so the weights barely move.

    .venv/bin/python -m bench.optim [--widths 16384,65536] [--rounds 7] [--no-record]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import _common as C

D_IN = 576


def contenders(d_sae: int) -> dict:
    from core.sae import TopKConfig, TopKSAE
    from core.train.optim import make_optimizer

    out = {}
    for name in ("signum", "adam", "torch fused Adam, W_enc as it is"):
        torch.manual_seed(0)
        sae = TopKSAE(D_IN, d_sae, TopKConfig(k=32))
        params = list(sae.parameters())
        for p in params:
            p.grad = torch.randn_like(p)  # randn_like keeps the weight's layout, as autograd does
        opt = (torch.optim.Adam(params, lr=1e-9, fused=True) if name.startswith("torch")
               else make_optimizer(name, params, 1e-9))
        out[name] = opt
    assert not sae.W_enc.is_contiguous() and sae.W_enc.T.is_contiguous(), "W_enc is held as its transpose"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="16384,65536")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    load_before, rows = C.load_avg(), []
    for d_sae in (int(w) for w in a.widths.split(",")):
        opts = contenders(d_sae)
        times = {name: [] for name in opts}
        for r in range(a.rounds + 1):  # the first round warms up (state allocated, pages faulted in)
            for name, opt in opts.items():
                start = time.perf_counter()
                opt.step()
                if r:
                    times[name].append(time.perf_counter() - start)
        base = C.median(times["torch fused Adam, W_enc as it is"])
        for name, ts in times.items():
            rows.append([f"{d_sae:,}", name, C.spread(t * 1e3 for t in ts), f"{C.median(ts) / base:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    body = (f"One optimizer step over a TopK SAE's weights (d_in {D_IN}, W_enc column-major as trained), "
            f"{a.rounds} interleaved rounds after a warm-up, torch threads {torch.get_num_threads()}:\n\n"
            + C.table(["latents", "optimizer", "ms a step, median (min–max)", "/ torch fused Adam"], rows))
    if not a.no_record:
        C.append_result("bench/optim.py — the optimizer step at width", body, load_before=load_before)


if __name__ == "__main__":
    main()
