"""Massive activations once BOS is prepended and special tokens are excluded by id.

SmolLM2's attention sink gives one position per row a residual norm ~100× the median. Without
BOS that position is each row's first text token; with BOS it is BOS, which training,
evaluation and discovery now drop by id. This script measures whether any *non-special* token
still carries a massive norm, which decides whether the norm filter must stay on by default:

* the real SmolLM2-135M at blocks.15.hook_resid_post over the builtin corpus (rows of ≤ 256
  tokens), with BOS prepended and BOS/EOS/pad excluded, beside the old contexts (no BOS,
  nothing excluded) for comparison;
* the tiny random models of tests/test_families.py (every family, last block's resid_post),
  rows starting with a BOS id, the BOS position excluded.

Per case: tokens kept, specials excluded, median and max norm, max/median, the tokens a 10×
median cut would drop (TrainConfig.outlier_norm_multiple's old default) and the share of the
variance Σ‖x − x̄‖² held by the top 0.5% of tokens (by their own ‖x − x̄‖²).

    .venv/bin/python -m bench.sink [--tokens N] [--no-record]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench import _common

TOP_SHARE = 0.005


def summary(x: torch.Tensor, excluded: int) -> dict:
    """The norm and variance figures of the kept tokens x [N, d]."""
    x = x.double()
    norms = x.norm(dim=1)
    dev = (x - x.mean(0)).pow(2).sum(1)
    top = max(1, round(TOP_SHARE * len(x)))
    med = float(norms.median())
    over = norms > 10 * med
    return {"tokens": len(x), "excluded": excluded, "median": med, "max": float(norms.max()),
            "ratio": float(norms.max()) / med, "over_10x": int(over.sum()),
            "over_10x_var_share": float(dev[over].sum() / dev.sum()),
            "top_var_share": float(dev.topk(top).values.sum() / dev.sum())}


def collect(model, batches, hook: str, exclude: list[int]) -> dict:
    from core.hooks import run_hooked

    ids_out, kept, excluded = [], [], 0
    ex = torch.tensor(exclude, dtype=torch.long)
    with torch.no_grad():
        for b in batches:
            acts = run_hooked(model, b.input_ids, b.attention_mask, [hook])[hook]
            real = b.attention_mask.bool()
            mask = real & ~torch.isin(b.input_ids, ex)
            excluded += int((real & ~mask).sum())
            kept.append(acts[mask].float())
            ids_out.append(b.input_ids[mask])
    return summary(torch.cat(kept), excluded)


def smollm2(tokens: int) -> dict[str, dict]:
    from core.data import iter_batches, special_token_ids, tokenize_dataset

    model, tok = _common.load(2)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bos in (("SmolLM2, BOS prepended, specials excluded", True), ("SmolLM2, no BOS (old)", False)):
            ds = Path(tmp) / name.split(",")[1].strip().replace(" ", "-")
            tokenize_dataset(tok, "builtin", ds, context_length=256, prepend_bos=bos)
            batches = iter_batches(ds, 8, tok.pad_token_id, max_tokens=tokens)
            out[name] = collect(model, batches, _common.HOOK, special_token_ids(tok) if bos else [])
            out["_heldout" + ("" if bos else "_old")] = heldout(ds, tok)
    out["_special_ids"] = {"ids": special_token_ids(tok), "bos": tok.bos_token_id}
    return out


def heldout(ds: Path, tok) -> dict:
    """The demo's held-out slice (40k tokens extracted, 5% of those rows, core.train.sources):
    its rows, its tokens, and the tokens evaluated once BOS/EOS/pad are left out."""
    from core.data import iter_batches, read_stats, special_token_ids
    from core.train.sources import default_eval_rows, row_tokens

    stats = read_stats(ds)
    rows = default_eval_rows(round(stats.rows * min(1.0, 40_000 / stats.tokens)))
    tokens = sum(int(b.attention_mask.sum()) for b in iter_batches(ds, 256, 0, max_rows=rows))
    return {"rows": rows, "tokens": tokens, "evaluated": row_tokens(ds, rows, special_token_ids(tok))}


def families() -> dict[str, dict]:
    from tests.test_families import FAMILIES, N_LAYERS, VOCAB, build

    out = {}
    g = torch.Generator().manual_seed(0)
    for family in FAMILIES:
        model = build(family)
        bos = getattr(model.config, "bos_token_id", None) or 1
        ids = torch.randint(3, VOCAB, (16, 48), generator=g)
        ids[:, 0] = bos
        batch = [type("B", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})()]
        out[family] = collect(model, batch, f"blocks.{N_LAYERS - 1}.hook_resid_post", [bos])
    return out


def table(rows: dict[str, dict]) -> str:
    head = ("| case | tokens kept | specials excluded | median ‖x‖ | max ‖x‖ | max/median | > 10× median "
            "| their share of the variance | variance in top 0.5% |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {k} | {r['tokens']} | {r['excluded']} | {r['median']:.2f} | {r['max']:.2f} | {r['ratio']:.2f} "
             f"| {r['over_10x']} | {100 * r['over_10x_var_share']:.2f}% | {100 * r['top_var_share']:.2f}% |"
             for k, r in rows.items() if not k.startswith("_")]
    return "\n".join([head, *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=30_000, help="SmolLM2 tokens per case")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    before = _common.load_avg()
    real = smollm2(args.tokens)
    tiny = families()
    body = (f"SmolLM2-135M {_common.HOOK}, builtin corpus, rows ≤ 256 tokens, first {args.tokens} tokens; "
            f"special ids {real['_special_ids']['ids']} (BOS {real['_special_ids']['bos']}):\n\n{table(real)}\n\n"
            f"The demo's held-out slice: with BOS {real['_heldout']}; without (old) {real['_heldout_old']}.\n\n"
            f"Tiny random families (tests/test_families.py), last block's resid_post, 16 rows × 48 tokens "
            f"starting with BOS, BOS excluded:\n\n{table(tiny)}\n")
    print(body)
    if not args.no_record:
        _common.append_result("massive activations with BOS prepended, specials excluded (bench/sink.py)", body,
                              load_before=before)


if __name__ == "__main__":
    main()
