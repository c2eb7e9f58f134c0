"""The GPU figures of issues 22 and 23 in one short run (under 8 minutes on one GPU).

On one device, side by side:

1. extraction — SmolLM2-135M `blocks.15.hook_resid_post` over the built-in corpus with
   `core.extract.extract_activations` (forward on the GPU, Parquet writes): tokens/s. Its
   activations (kept in GPU memory) feed steps 2 and 3.
2. discovery — `core.features.discover_features` of a TopK SAE (k 32, random weights, b_dec at the
   data mean) at each width: tokens/s, next to extraction's.
3. training — a TopK SAE (k 32, batch 4096, AuxK on) at each width, the same tokens for every
   contender: ours (`core.train.train_sae`, device cuda: bf16 autocast for the encoder, fp32
   master weights), SAELens's `SAETrainer` and sparsify's `SparseCoder` stepped by its default
   optimizer, each when importable (install them beside the project to include them: the GPU
   machine cannot download). Steady tokens/s and peak GPU memory.

    .venv/bin/python -m bench.gpu                      # on a GPU machine
    .venv/bin/python -m bench.gpu --device cpu --widths 1024 --tokens 16384 --no-record   # a smoke run

Results are appended to bench/RESULTS.md with the device's name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import _common as C

K, BATCH = 32, 4096


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def extraction(model, tok, ds: Path, tmp: Path, tokens: int, device: str) -> tuple[float, torch.Tensor]:
    from core.data import special_token_ids
    from core.extract import extract_activations, iter_activations

    sync(device)
    t0 = time.perf_counter()
    stats = extract_activations(model, tok, ds, [C.HOOK], tmp / "acts", batch_size=32, max_tokens=tokens,
                                exclude_token_ids=special_token_ids(tok))
    sync(device)
    rate = stats[C.HOOK].tokens / (time.perf_counter() - t0)
    x = torch.from_numpy(np.concatenate([np.array(a) for a in iter_activations(tmp / "acts" / C.HOOK)]))
    return rate, x


def discovery(model, tok, ds: Path, tmp: Path, x: torch.Tensor, d_sae: int, tokens: int, device: str) -> float:
    from core.data import special_token_ids
    from core.features import DiscoverConfig, discover_features
    from core.formats.saelens import save_saelens
    from core.sae import build_sae

    torch.manual_seed(0)
    sae = build_sae("topk", x.shape[1], d_sae, k=K)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    sae_dir = tmp / f"sae-{d_sae}"
    save_saelens(sae, sae.config(hook_name=C.HOOK, model_name="smollm2"), sae_dir)
    sync(device)
    t0 = time.perf_counter()
    s = discover_features(model, tok, sae_dir, ds, tmp / f"features-{d_sae}", DiscoverConfig(), batch_size=32,
                          max_tokens=tokens, exclude_token_ids=special_token_ids(tok))
    sync(device)
    return (s.tokens + s.excluded_outliers) / (time.perf_counter() - t0)


def batches(x: torch.Tensor, total: int | None = None):
    """`total` tokens (None: without end) of `x` in training batches, cycling through it."""
    n = 0
    while total is None or n < total:
        i = n % (len(x) - BATCH)
        yield x[i:i + BATCH]
        n += BATCH


def train_ours(x: torch.Tensor, d_sae: int, tokens: int, device: str, **settings) -> float:
    from core.sae import TopKConfig
    from core.train import TrainConfig, train_sae

    cfg = TrainConfig(sae=TopKConfig(k=K), d_sae=d_sae, batch_size=BATCH, total_tokens=tokens, device=device,
                      sample_tokens=BATCH * 2, **settings,
                      log_every=max(1, min(10, tokens // BATCH // 8)))  # marks enough for a short run
    marks: list[tuple[float, int]] = []

    def progress(d):
        sync(device)
        marks.append((time.perf_counter(), d.get("done", 0)))

    t0 = time.perf_counter()
    res = train_sae(lambda: (b.cpu().numpy() for b in batches(x, tokens + 2 * BATCH)), x.shape[1], cfg,
                    progress=progress)
    # The first mark at each token count: the final evaluation reports the last count again,
    # later (taking that one counted the evaluation as training time, which understated our
    # rate: by ~25% in 8-step runs at 16,384 latents).
    first: dict[int, float] = {}
    for t, n in marks:
        if n > 0:
            first.setdefault(n, t)
    steady = sorted((t, n) for n, t in first.items())
    (t_a, n_a), (t_b, n_b) = steady[0], steady[-1]
    if n_b > n_a:  # from the first step on (the prelude and the final evaluation left out)
        return (n_b - n_a) / (t_b - t_a)
    return res.final["tokens"] / (time.perf_counter() - t0)


def train_saelens(x: torch.Tensor, d_sae: int, tokens: int, device: str) -> float:
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=K, normalize_activations="expected_average_only_in"),
        model_name="SmolLM2-135M (cached activations)", hook_name=C.HOOK, dataset_path="builtin",
        training_tokens=tokens, train_batch_size_tokens=BATCH, n_batches_for_norm_estimate=2,
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None, verbose=False,
        device=device, dtype="float32")
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
    pulls: list[float] = []

    def provider():
        for b in batches(x):  # the trainer stops when its budget is spent
            sync(device)
            pulls.append(time.perf_counter())
            yield b.to(device)

    SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=provider()).fit()
    steps = pulls[cfg.n_batches_for_norm_estimate:]
    return (len(steps) - 1) * BATCH / (steps[-1] - steps[0])


def train_sparsify(x: torch.Tensor, d_sae: int, tokens: int, device: str) -> float:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=K), device, dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (d_sae / 2**14) ** 0.5}]),
                              momentum=0.95)
    opt.train()
    since = torch.zeros(d_sae, dtype=torch.long, device=device)
    times = []
    for b in batches(x, tokens):
        b = b.to(device)
        out = sae(b, dead_mask=since > 10_000_000)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since += len(b)
        since[out.latent_indices.flatten()] = 0
        sae.set_decoder_norm_to_unit_norm()
        sync(device)
        times.append(time.perf_counter())
    return (len(times) - 1) * BATCH / (times[-1] - times[0])


TRAINERS = {"miStudio": train_ours, "SAELens": train_saelens, "sparsify": train_sparsify}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--widths", default="16384,65536")
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per contender and width")
    ap.add_argument("--extract-tokens", type=int, default=400_000)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    device, widths = args.device, [int(w) for w in args.widths.split(",")]
    from core.models import load_model

    model, tok = load_model(C.model_dir(), device=device)
    ds = C.dataset_dir(tok)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else C.machine()["cpu"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ext, x = extraction(model, tok, ds, tmp, args.extract_tokens, device)
        print(f"[gpu] {name}: extraction {ext:,.0f} tok/s ({len(x):,} tokens cached)", flush=True)
        x = x.to(device)
        for width in widths:
            disc = discovery(model, tok, ds, tmp, x.cpu(), width, args.extract_tokens, device)
            print(f"[gpu] discovery at {width:,} latents: {disc:,.0f} tok/s ({disc / ext:.2f}× extraction)", flush=True)
            row = {"width": width, "discovery": disc}
            for who, fn in TRAINERS.items():
                reset_peak(device)
                try:
                    row[who] = (fn(x, width, args.tokens, device), peak_gib(device))
                except ImportError as e:
                    row[who] = None
                    print(f"[gpu]   {who}: not installed ({e.name})", flush=True)
                    continue
                rate, peak = row[who]
                print(f"[gpu]   {who:8s} {rate:10,.0f} tok/s" + (f", peak {peak:.2f} GiB" if peak else ""), flush=True)
            rows.append(row)
    if args.no_record:
        return
    lines = [f"\n### GPU: extraction, discovery and training — {dt.date.today()}, {name}\n",
             f"`{C.command_line()}` — SmolLM2 `{C.HOOK}`, extraction {ext:,.0f} tok/s; TopK k {K}, batch {BATCH}, "
             f"{args.tokens:,} training tokens per run.\n",
             "| latents | discovery tok/s (× extraction) | " + " | ".join(f"{w} tok/s (peak GiB)" for w in TRAINERS)
             + " |", "|---" * (2 + len(TRAINERS)) + "|"]
    for r in rows:
        cells = [f"{r[w][0]:,.0f} ({r[w][1]:.2f})" if r[w] and r[w][1] else f"{r[w][0]:,.0f}" if r[w] else "—"
                 for w in TRAINERS]
        lines.append(f"| {r['width']:,} | {r['discovery']:,.0f} ({r['discovery'] / ext:.2f}×) | " + " | ".join(cells)
                     + " |")
    with open(C.RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
