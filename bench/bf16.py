"""Is the encoder's matmul faster in bf16 than in fp32 on this CPU? (training-at-width issue)

The TopK step's one dense product is [rows × d_in] @ [d_in × d_sae]; the training default runs it
in bf16 where `core.train.config.prefer_bf16` says so. This times that product (d_in 576, a
1,024-token block as at 65,536 latents) in fp32 and in bf16 at a few widths, interleaved, best of
`--reps` after a warm-up (`core.train.config.matmul_seconds`), with torch's threads; GFLOP/s, the bf16 / fp32 speed ratio, and what `prefer_bf16`
chose (its own smaller probe). Two machines with the same `avx512_bf16` flag disagreed: a Zen 4
EPYC ran the TopK step 1.3–1.6× faster in bf16, an Intel Xeon without AMX ran this product in
bf16 at 0.6× fp32's speed (oneDNN's brgemm kernel against MKL's sgemm).

    .venv/bin/python -m bench.bf16 [--widths 4608,16384,65536] [--rows 1024] [--no-record]
"""

from __future__ import annotations

import argparse

import torch

from bench import _common as C

D_IN = 576


def main(argv: list[str] | None = None) -> None:
    from core.train.config import cpu_has_bf16, matmul_seconds, prefer_bf16

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default=None, help="comma-separated (default 4608,16384,65536; "
                    "4608 alone where bf16 is emulated: minutes a product at 65,536)")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    load_before = C.load_avg()
    chosen = prefer_bf16(torch.device("cpu"))
    rows = []
    widths = a.widths or ("4608,16384,65536" if cpu_has_bf16() else "4608")
    for width in (int(w) for w in widths.split(",")):
        flop = 2 * a.rows * D_IN * width
        secs = matmul_seconds(a.rows, D_IN, width, (torch.float32, torch.bfloat16), rounds=a.reps + 1)
        f32, b16 = secs[torch.float32], secs[torch.bfloat16]
        rows.append([f"{width:,}", f"{f32 * 1000:,.1f}", f"{flop / f32 / 1e9:,.0f}", f"{b16 * 1000:,.1f}",
                     f"{flop / b16 / 1e9:,.0f}", f"{f32 / b16:.2f}×"])
        print(f"  {width:>7,}: fp32 {f32 * 1000:,.1f} ms, bf16 {b16 * 1000:,.1f} ms, bf16 {f32 / b16:.2f}× as fast",
              flush=True)
    body = (f"[{a.rows:,} × {D_IN}] @ [{D_IN} × d_sae], best of {a.reps} after a warm-up, fp32 and bf16 "
            f"interleaved (the machine line lists the CPU's bf16 flags; native bf16: {cpu_has_bf16()}); "
            f"`prefer_bf16` chose "
            f"**{'bf16' if chosen else 'fp32'}**.\n\n"
            + C.table(["d_sae", "fp32 ms", "fp32 GFLOP/s", "bf16 ms", "bf16 GFLOP/s", "bf16 speed / fp32"], rows))
    print(body)
    if not a.no_record:
        C.append_result("bench/bf16.py — the encoder's matmul in bf16 and fp32 on this CPU", body,
                        load_before=load_before)


if __name__ == "__main__":
    main()
