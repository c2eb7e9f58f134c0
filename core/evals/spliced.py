"""Honest SAE evaluation on a held-out slice of tokens: reconstruction, density, and what
splicing the SAE into the model does to its next-token predictions.

Two passes over the slice. The first captures the activation at the hook (the forward stops
there), sets aside special-token positions and norm outliers, accumulates the reconstruction and
density metrics and the mean activation. The second runs, per batch, the clean model and three
spliced forwards — the SAE reconstruction, zeros, the mean — and accumulates next-token
cross-entropy and KL against the clean distribution; no logits outlive their batch.

Special tokens (BOS, EOS, pad: `exclude_token_ids`, SAELens's `exclude_special_tokens` rule)
are set aside by identity. The attention sink puts a massive activation on each context's first
position: on SmolLM2 at layer 15 that is ~0.5% of tokens (one per row) with norms ~100× the
median, holding ~99% of the activation variance. With BOS prepended (the dataset's
`prepend_bos`) that position is BOS, so it is excluded by id. The norm guard
(`outlier_norm_threshold`, off unless given) catches any massive token that is not special.
Set-aside positions are left unchanged in every spliced forward (their next tokens are still
predicted and scored) and kept out of the reconstruction and density metrics, so an SAE is
neither credited nor blamed for them. How many there were of each is reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.data import TokenBatch, iter_batches
from core.errors import UserError
from core.formats.saelens import load_saelens
from core.hooks import patched, run_hooked, validate_hooks
from core.io import atomic_file
from core.models import d_model
from core.progress import Meter, check_cancel
from core.sae.base import SAE

EVAL_FILENAME = "eval.json"


@torch.no_grad()
def evaluate_sae(model, sae: SAE, hook_name: str, batches: Iterable[TokenBatch], *,
                 outlier_norm_threshold: float = math.inf, exclude_token_ids: Sequence[int] = (),
                 dense_threshold: float = 0.1, hist_bins: int = 40,
                 progress: Callable[[dict], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> dict:
    """Evaluate `sae` at `hook_name` of `model` on `batches` (right-padded; read into memory,
    since the mean ablation needs a first pass). The SAE is moved to the model's device. Its
    length is its documented return value; the body is the two passes.

    Returns a flat JSON-able dict:

    - tokens: non-pad tokens in the slice.
    - excluded_special: tokens whose id is in `exclude_token_ids` (BOS, EOS, pad).
    - excluded_outliers: the other tokens whose activation norm exceeds `outlier_norm_threshold`.
      Both kinds are left unchanged in every spliced forward and excluded from the reconstruction
      and density metrics, which are over the other `tokens - excluded_special -
      excluded_outliers` ("evaluated") tokens.
    - l0: mean number of non-zero latents per evaluated token.
    - mse: mean squared error per element, Σ‖x − x̂‖² / (N·d_in).
    - fvu: fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean over evaluated tokens.
    - cos_sim: mean cosine similarity between x and x̂.
    - dead_frac: fraction of latents that never fired on the evaluated tokens.
    - dense_frac: fraction of latents firing on more than `dense_threshold` of them.
    - density_hist: {"edges": [...], "counts": [...]}, a `hist_bins`-bin histogram of
      log10(firing frequency) over [log10(1/N), 0], of the latents that fired at least once
      (dead latents, whose log10 is −∞, are left out: they are `dead_frac`).
    - ce_tokens: positions in the cross-entropy and KL means: every non-pad position whose next
      token is a real token.
    - ce_clean: mean next-token cross-entropy (nats) of the unmodified model.
    - ce_sae / ce_zero / ce_mean: the same with the activation at the hook replaced, at every
      evaluated position, by the SAE reconstruction / zeros / the mean activation x̄.
    - ce_loss_recovered_zero: (ce_zero − ce_sae) / (ce_zero − ce_clean); 1 means the SAE loses
      nothing, 0 that it is as bad as zero ablation. None when ce_zero == ce_clean.
    - ce_loss_recovered_mean: the same against mean ablation.
    - kl_sae / kl_zero / kl_mean: mean per-position KL(clean ‖ spliced) of the next-token
      distributions (nats), over the same positions.

    `progress` gets {"phase": "evaluate", "done", "total", "unit": "tokens", "samples_per_s",
    "eta_s"} once per batch of each pass; every token is read twice (capture, then splice), so
    `total` is 2 × tokens and `done` counts both passes. `should_cancel` is checked per batch.
    """
    validate_hooks(model, [hook_name])
    width = d_model(model)
    if sae.d_in != width:
        raise UserError(f"the SAE reads d_in={sae.d_in} but {hook_name} of this model has width {width}; "
                        f"evaluate an SAE trained on this model's {hook_name}")
    if hist_bins < 1:
        raise UserError(f"hist_bins must be at least 1, got {hist_bins}")
    batches = list(batches)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    if tokens == 0:
        raise UserError("no tokens to evaluate: the batches are empty; give a non-empty held-out slice")
    device = next(model.parameters()).device
    sae.to(device)
    clock = Meter(progress, "evaluate", total=2 * tokens)

    # Pass 1: activations at the hook → outliers, reconstruction, density, mean.
    recon = _Reconstruction(sae.d_in, sae.d_sae, device)
    special_ids = torch.tensor(sorted(set(int(i) for i in exclude_token_ids)), dtype=torch.long)
    keeps = []
    for b in batches:
        check_cancel(should_cancel, "evaluation")
        x = run_hooked(model, b.input_ids, b.attention_mask, [hook_name])[hook_name]
        real = b.attention_mask.to(device).bool()
        ordinary = real & ~torch.isin(b.input_ids, special_ids).to(device)
        keep = ordinary & (x.norm(dim=-1) <= outlier_norm_threshold)
        keeps.append(keep)
        recon.add(x[keep], sae, outliers=int((ordinary & ~keep).sum()), special=int((real & ~ordinary).sum()))
        clock.add(int(real.sum()))
    metrics = recon.result(hook_name, dense_threshold, hist_bins)
    mean = recon.mean().float()

    # Pass 2: clean vs spliced next-token predictions.
    def splice(keep, replacement):
        def fn(x):
            return torch.where(keep[..., None], replacement(x).to(x.dtype), x)
        return fn

    ablations = {
        "sae": lambda x: sae(x)[0],
        "zero": torch.zeros_like,
        "mean": lambda x: mean.to(x.dtype).expand_as(x),
    }
    ce = dict.fromkeys(["clean", *ablations], 0.0)
    kl = dict.fromkeys(ablations, 0.0)
    positions = 0
    for b, keep in zip(batches, keeps):
        check_cancel(should_cancel, "evaluation")
        ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
        target = (mask[:, 1:] * mask[:, :-1]).bool()  # positions whose next token is real
        labels = ids[:, 1:][target]
        clean = _next_token_logprobs(model, ids, mask, target)
        ce["clean"] += float(F.nll_loss(clean, labels, reduction="sum"))
        for key, replacement in ablations.items():
            with patched(model, {hook_name: splice(keep, replacement)}):
                logp = _next_token_logprobs(model, ids, mask, target)
            ce[key] += float(F.nll_loss(logp, labels, reduction="sum"))
            kl[key] += float(F.kl_div(logp, clean, log_target=True, reduction="sum"))
        positions += len(labels)
        clock.add(int(mask.sum()))
    if positions == 0:
        raise UserError("no next-token positions to score: every row is a single token; use rows of 2+ tokens")

    ce = {k: v / positions for k, v in ce.items()}
    return {
        "tokens": tokens,
        **metrics,
        "ce_tokens": positions,
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
        "ce_loss_recovered_zero": _recovered(ce["zero"], ce["sae"], ce["clean"]),
        "ce_loss_recovered_mean": _recovered(ce["mean"], ce["sae"], ce["clean"]),
        **{f"kl_{k}": v / positions for k, v in kl.items()},
    }


def _recovered(ablated: float, spliced: float, clean: float) -> float | None:
    """Fraction of the CE gap between an ablation and the clean model that the SAE closes."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else None


def _next_token_logprobs(model, ids, mask, target) -> torch.Tensor:
    """float32 log-probabilities [n, vocab] at the `target` positions (next token real)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    return logits[target].float().log_softmax(-1)


class _Reconstruction:
    """Running sums for the reconstruction and density metrics, in float64 where they add up."""

    def __init__(self, d_in: int, d_sae: int, device):
        self.n = self.outliers = self.special = 0
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)      # Σ x
        self.sum_sq = torch.zeros(d_in, dtype=torch.float64, device=device)   # Σ x²
        self.sq_err = self.cos = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.int64, device=device)     # tokens each latent fired on

    def add(self, x: torch.Tensor, sae: SAE, outliers: int, special: int = 0) -> None:
        self.outliers += outliers
        self.special += special
        if not len(x):
            return
        x_hat, z = sae(x)
        x_hat = x_hat.float()
        self.n += len(x)
        xd = x.double()
        self.sum += xd.sum(0)
        self.sum_sq += xd.pow(2).sum(0)
        self.sq_err += float((x_hat.double() - xd).pow(2).sum())
        self.cos += float(F.cosine_similarity(x_hat, x, dim=-1, eps=1e-8).double().sum())
        self.fired += (z > 0).sum(0)

    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    def result(self, hook_name: str, dense_threshold: float, bins: int) -> dict:
        if self.n == 0:
            raise UserError(f"every token at {hook_name} was excluded ({self.special} special tokens, "
                            f"{self.outliers} norm outliers); raise the outlier norm threshold or check the slice")
        n, d = self.n, len(self.sum)
        # Σ‖x − x̄‖² = Σ_d (Σ x_d² − N x̄_d²), per dimension in float64.
        total_var = float((self.sum_sq - self.sum.pow(2) / n).sum())
        freq = (self.fired.double() / n).cpu().numpy()
        live = freq[freq > 0]
        counts, edges = np.histogram(np.log10(live), bins=bins, range=(math.log10(1 / n), 0.0))
        return {
            "excluded_special": self.special,
            "excluded_outliers": self.outliers,
            "l0": float(self.fired.sum()) / n,
            "mse": self.sq_err / (n * d),
            "fvu": self.sq_err / total_var if total_var > 0 else None,
            "cos_sim": self.cos / n,
            "dead_frac": float((freq == 0).mean()),
            "dense_frac": float((freq > dense_threshold).mean()),
            "density_hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        }


def evaluate_saved_sae(model, tokenizer, sae_dir: Path, dataset_dir: Path, rows: int, *, batch_size: int = 8,
                       outlier_norm_threshold: float = math.inf, exclude_token_ids: Sequence[int] = (),
                       progress: Callable[[dict], None] | None = None,
                       should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """CE loss recovered, KL and the reconstruction metrics of a saved SAE on the dataset's first
    `rows` rows (the held-out slice), written to `eval.json` in the SAE folder."""
    sae, cfg = load_saelens(sae_dir)
    batches = iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_rows=rows)
    metrics = evaluate_sae(model, sae, cfg.hook_name, batches, outlier_norm_threshold=outlier_norm_threshold,
                           exclude_token_ids=exclude_token_ids, progress=progress, should_cancel=should_cancel)
    metrics["eval_rows"] = rows
    with atomic_file(Path(sae_dir) / EVAL_FILENAME) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    return metrics
