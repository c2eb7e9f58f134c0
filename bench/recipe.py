"""Which optimizer trains the best SAE per token (issue 22, deliverable 1, first part).

SmolLM2-135M `blocks.15.hook_resid_post` over the start of the `stdlib-source` corpus (BOS-first
rows of 256 tokens, special tokens left out as the studio's extraction does), tokens over 10×
the median norm dropped; all of them shuffled once, the first `--holdout` held out (so they come
from every document, as the training tokens do).
Every contender trains a TopK SAE (k 32, batch 4096, AuxK on, studio defaults otherwise) on the
same tokens in the same order and is scored on the held-out tokens: FVU, L0 and the fraction of
latents dead at the end of training and never firing on the held-out tokens. Contenders (each
at its optimizer's default rate, `core.train.optim.default_lr`, times a multiple): `adam`
(warm-up and decay), `signum` (schedule-free sign-SGD, the studio's default), and the variants
of the dead-latent study: the dead window in tokens per latent, AuxK's weight, a 5% warm-up under
signum, and lower rates.

    .venv/bin/python -m bench.recipe --d-sae 16384 --tokens 250000

The fixture (all of stdlib-source tokenized; `--data-tokens` + `--holdout` activations extracted:
2.2M took 24 minutes on 2 cores; a larger cache serves a smaller request) is built once under
$MISTUDIO_BENCH_CACHE/recipe; a 16k-latent run of 250k tokens takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch

from bench import _common as C

K, BATCH = 32, 4096
CONTENDERS = {"adam": {"optimizer": "adam"}, "adam ×5 lr": {"optimizer": "adam", "lr_multiple": 5.0},
              "signum": {"optimizer": "signum"},
              # the dead-latent study: AuxK's window and weight, a warm-up, a lower rate
              "signum dead 4×": {"optimizer": "signum", "dead_per_latent": 4},
              "signum dead 2×": {"optimizer": "signum", "dead_per_latent": 2},
              "signum dead 1×": {"optimizer": "signum", "dead_per_latent": 1},
              # the default window shrinks from 4 × d_sae after 16 × d_sae tokens (1 / tokens) to 1×
              "signum dead 4×→2×": {"optimizer": "signum", "recipe": {"dead_late_per_latent": 2}},
              # the encoder's matmul in bf16 (the default where bf16 is native and faster) or in fp32
              "signum bf16": {"optimizer": "signum", "autocast": True},
              "signum fp32": {"optimizer": "signum", "autocast": False},
              "signum auxk ×4": {"optimizer": "signum", "dead_per_latent": 4, "auxk_multiple": 4.0},
              "signum warm-up": {"optimizer": "signum", "warmup": True},
              "signum ¾ lr": {"optimizer": "signum", "lr_multiple": 0.75},
              "signum ½ lr": {"optimizer": "signum", "lr_multiple": 0.5},
              "signum ¼ lr": {"optimizer": "signum", "lr_multiple": 0.25}}


def activations(tokens: int) -> Path:
    """≥ `tokens` cached activations of the hook over stdlib-source (built once)."""
    built = sorted((int(d.name.split("-")[1]), d / C.HOOK) for d in (C.CACHE / "recipe").glob("acts-*")
                   if (d / C.HOOK / "stats.json").is_file()) if (C.CACHE / "recipe").is_dir() else []
    hook = next((h for n, h in built if n >= tokens), None)  # a larger cache serves: its start is the same
    if hook is not None:
        return hook
    out = C.CACHE / "recipe" / f"acts-{tokens}"
    hook = out / C.HOOK
    from core.data import special_token_ids, tokenize_dataset
    from core.extract import extract_activations

    model, tok = C.load(torch.get_num_threads())
    ds = C.CACHE / "recipe" / "ds"
    if not (ds / "stats.json").is_file():
        print(f"[recipe] tokenizing the start of stdlib-source into {ds}", flush=True)
        tokenize_dataset(tok, "stdlib-source", ds, context_length=256)  # all of it: ≈ 10M tokens
    print(f"[recipe] extracting {tokens} tokens of {C.HOOK} (a few minutes on 2 cores)", flush=True)
    extract_activations(model, tok, ds, [C.HOOK], out, max_tokens=tokens, exclude_token_ids=special_token_ids(tok))
    return hook


def load(tokens: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """`holdout` and `tokens` kept tokens, both drawn at random from the first `holdout + tokens`
    (one shuffle in place, seed 0). Two reads of the cache into one array, so millions of tokens
    fit: the norms, then the kept rows."""
    from core.extract import iter_activations

    hook = activations(tokens + holdout)
    norms = np.concatenate([np.linalg.norm(np.asarray(a, dtype=np.float64), axis=1)
                            for a in iter_activations(hook)])
    keep = np.isfinite(norms) & (norms <= 10 * np.median(norms))
    x, n, start, filled = None, min(int(keep.sum()), tokens + holdout), 0, 0
    for a in iter_activations(hook):
        rows = np.asarray(a)[keep[start:start + len(a)]][:n - filled]
        start += len(a)
        if x is None:
            x = np.empty((n, rows.shape[1]), dtype=np.float32)
        x[filled:filled + len(rows)] = rows
        filled += len(rows)
        if filled == n:
            break
    # Held-out tokens drawn from the whole cache, not its first documents: a latent of a topic
    # the first few files lack would otherwise count as never firing.
    np.random.default_rng(0).shuffle(x)
    return x[:holdout], x[holdout:]


def sae_config(arch: str):
    """The type's defaults, k 32 for the TopK family."""
    from core.sae import registry

    cfg = registry.config_for(arch)
    return dataclasses.replace(cfg, k=K) if hasattr(cfg, "k") else cfg


def run(name: str, held: np.ndarray, train: np.ndarray, d_sae: int, tokens: int, arch: str = "topk") -> dict:
    from core.evals.reconstruction import evaluate
    from core.train import TrainConfig, default_lr, optim, train_sae

    opts = dict(CONTENDERS[name])
    lr = default_lr(d_sae, opts["optimizer"]) * opts.pop("lr_multiple", 1.0)
    sae = sae_config(arch)
    if "auxk_multiple" in opts:
        sae = dataclasses.replace(sae, auxk_alpha=sae.auxk_alpha * opts.pop("auxk_multiple"))
    if "dead_per_latent" in opts:
        opts["dead_tokens"] = opts.pop("dead_per_latent") * d_sae
    recipe = opts.pop("recipe", {})  # changes to the optimizer's Recipe for this run
    if opts.pop("warmup", False):  # the run's linear warm-up (5%) under signum, no decay
        opts["lr_decay_frac"] = 0.0
        recipe["scheduled"] = True
    cfg = TrainConfig(sae=sae, d_sae=d_sae, batch_size=BATCH, total_tokens=tokens, lr=lr, **opts)
    def chunks():  # held-out tokens are never trained on: fed as the lead slice, the trainer's hold-out
        yield held[:BATCH]
        for i in range(0, len(train), BATCH):
            yield train[i:i + BATCH]

    t0 = time.perf_counter()
    kept = optim.RECIPES[cfg.optimizer]
    optim.RECIPES[cfg.optimizer] = dataclasses.replace(kept, **recipe)
    try:
        res = train_sae(chunks, held.shape[1], cfg, holdout_tokens=BATCH)
    finally:
        optim.RECIPES[cfg.optimizer] = kept
    wall = time.perf_counter() - t0
    scores = evaluate(res.sae, torch.from_numpy(held))
    with torch.no_grad():  # never firing on the held-out tokens: bench.peers's definition
        fired = torch.zeros(d_sae, dtype=torch.bool)
        for block in torch.from_numpy(held).split(BATCH):
            fired |= (res.sae.encode(block) > 0).any(0)
    return {"fvu": scores["fvu"], "l0": scores["l0"], "dead": res.final["dead_frac"],
            "never": float((~fired).float().mean()), "wall": wall,
            "tokens": res.final["tokens"], "lr": lr}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=250_000, help="training tokens per contender")
    ap.add_argument("--holdout", type=int, default=32_768)
    ap.add_argument("--data-tokens", type=int, default=250_000,
                    help="distinct training tokens cached (a longer run cycles through them)")
    ap.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    ap.add_argument("--architectures", default="topk", help="comma-separated SAE types (default: topk)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONTENDERS)
    held, train = load(args.data_tokens, args.holdout)
    print(f"[recipe] {len(held)} held-out and {len(train)} training tokens; {args.d_sae} latents, k {K}, "
          f"{args.tokens} tokens each; load {C.load_avg()}", flush=True)
    rows = []
    for arch in args.architectures.split(","):
        for name in names:
            out = run(name, held, train, args.d_sae, args.tokens, arch)
            rows.append((f"{arch}: {name}", out))
            print(f"  {arch:9s} {name:10s} lr {out['lr']:.2e}: held-out FVU {out['fvu']:.4f}, L0 {out['l0']:.1f}, "
                  f"dead {out['dead']:.2%}, never firing {out['never']:.2%}, {out['tokens'] / out['wall']:,.0f} tok/s", flush=True)
    if args.no_record:
        return
    m = C.machine()
    lines = [f"\n### Recipe: optimizer at equal tokens — {dt.date.today()}, {m['cpu']}, {m['nproc']} cores, "
             f"torch {m['torch']}\n",
             f"`{C.command_line()}` — {args.d_sae:,} latents, k {K} where the type has one, batch {BATCH}, "
             f"{args.tokens:,} training tokens ({args.tokens / len(train):.1f} passes over {len(train):,}), "
             f"{len(held):,} held-out tokens of SmolLM2 `{C.HOOK}` over stdlib-source; load {C.load_avg()}.\n",
             "| SAE type: optimizer | lr | held-out FVU | L0 | dead | never fires (held out) | tok/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {o['lr']:.2e} | {o['fvu']:.4f} | {o['l0']:.1f} | {o['dead']:.2%} | {o['never']:.2%} | "
              f"{o['tokens'] / o['wall']:,.0f} |" for n, o in rows]
    with open(C.RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
