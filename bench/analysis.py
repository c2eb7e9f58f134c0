"""Feature analysis at width: wall time of each stage of `core.analysis.analyze_features` for
every latent of a 4,608- and a 65,536-latent SAE on SmolLM2 (d_model 576).

Fixture per width (built once under $MISTUDIO_BENCH_CACHE, reused): a TopK SAE (k 32) with
random weights and b_dec at the mean of real `blocks.15.hook_resid_post` activations, saved as a
SAELens folder, and its features discovered by the project's own `discover_features` over the
first --tokens tokens of the builtin corpus (special tokens excluded, every default on).

Stages, as `analyze_features` reports them: logit effects (W_dec[i] @ W_U for all latents, top
and bottom tokens, decoded), similar features (exact top-n decoder cosines), co-occurrence
(exact counts over the stored co-active latents of every example), NLP (spaCy over every
latent's top windows), measured ablation (--ablate latents, two forwards per batch of latents),
then the registry write of every latent's analysis is timed separately (SQLite).

With --before REV the same stages of REV's `core/analysis.py` (run from `git show`, against
this tree's readers) are timed at the widths given in --before-widths, side by side.

    .venv/bin/python -m bench.analysis [--widths 4608,65536] [--tokens N] [--ablate 32]
                                       [--before REV] [--before-widths 4608] [--no-record]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from bench import _common as C

K = 32


def fixture(model, tok, d_sae: int, tokens: int) -> tuple[Path, Path, Path]:
    """(sae_dir, features_dir, dataset_dir) for a random TopK SAE of width `d_sae`, discovered
    over `tokens` tokens (built once, then reused)."""
    from core.data import iter_batches, special_token_ids
    from core.features import DiscoverConfig, discover_features
    from core.formats.saelens import save_saelens
    from core.hooks import run_hooked
    from core.sae import build_sae

    ds = C.dataset_dir(tok)
    root = C.CACHE / f"analysis-{d_sae}-{tokens}"
    sae_dir, feat_dir = root / "sae", root / "features"
    if (feat_dir / "discovery.json").is_file():
        return sae_dir, feat_dir, ds
    torch.manual_seed(0)
    sae = build_sae("topk", 576, d_sae, k=K)
    b = next(iter(iter_batches(ds, 8, tok.pad_token_id)))
    with torch.no_grad():
        x = run_hooked(model, b.input_ids, b.attention_mask, [C.HOOK])[C.HOOK]
        keep = b.attention_mask.bool() & ~torch.isin(b.input_ids, torch.tensor(special_token_ids(tok)))
        sae.b_dec.copy_(x[keep].mean(0))
    save_saelens(sae, sae.config(hook_name=C.HOOK, model_name="smollm2"), sae_dir)
    print(f"[bench] discovering {d_sae} latents over {tokens} tokens into {feat_dir}", flush=True)
    t0 = time.perf_counter()
    s = discover_features(model, tok, sae_dir, ds, feat_dir, DiscoverConfig(), batch_size=8, max_tokens=tokens,
                          exclude_token_ids=special_token_ids(tok))
    print(f"[bench] discovery: {s.live_features} live latents, {s.heap_examples_count} top examples, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return sae_dir, feat_dir, ds
