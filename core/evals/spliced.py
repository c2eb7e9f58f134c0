"""Honest SAE evaluation on a held-out slice of tokens: reconstruction, density, and what
splicing the SAE into the model does to its next-token predictions — under our definitions and,
side by side, SAELens's (`sae_lens.evals.run_evals`), so the field can reproduce the numbers.

Two passes over the slice. The first captures the activation at the hook (the forward stops
there), sets aside special-token positions and norm outliers, accumulates the reconstruction and
density metrics and the mean activation. The second runs, per batch, the clean model and the
spliced forwards — the SAE reconstruction, zeros, the mean, each under both conventions (a
forward the two share runs once) — and accumulates next-token cross-entropy and KL against the
clean distribution; no logits outlive their batch.

The two conventions differ only in which positions are touched and scored:

* ours: special tokens and norm outliers are left clean in every spliced forward (the SAE, zero
  and mean ablation alike) and out of the reconstruction metrics; CE and KL are over every
  position whose next token is real.
* SAELens's: the SAE is spliced at every non-special position (no norm guard), the zero and
  mean ablations replace every position (BOS included), explained variance is over every
  non-special token, CE is over non-special positions and KL over non-special positions
  including each row's last. On an SAE and rows without norm outliers, `explained_variance`
  is exactly 1 − `fvu`.

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

    And SAELens's figures under SAELens's names (`run_evals` with `exclude_special_tokens`;
    see the module docstring for the positions):

    - explained_variance: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over every non-special token.
    - ce_loss_without_sae / ce_loss_with_sae / ce_loss_with_ablation: mean next-token CE of the
      clean model / the SAE spliced / every position zeroed.
    - ce_loss_score: (ce_loss_with_ablation − ce_loss_with_sae) / (ce_loss_with_ablation −
      ce_loss_without_sae).
    - kl_div_with_sae / kl_div_with_ablation: mean KL(clean ‖ spliced); kl_div_score:
      (kl_div_with_ablation − kl_div_with_sae) / kl_div_with_ablation.
    - ce_loss_with_mean_ablation, ce_loss_score_mean_ablation, kl_div_with_mean_ablation,
      kl_div_score_mean_ablation: the same with every position set to the mean activation
      (not in SAELens; its convention).
    - field_ce_tokens / field_kl_tokens: the positions in those CE / KL means.

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
    special_ids = torch.tensor(sorted(set(int(i) for i in exclude_token_ids)), dtype=torch.long)

    # Pass 1: activations at the hook → reconstruction, density and the mean, over our evaluated
    # tokens (`keep`: no special token, no norm outlier) and SAELens's (`ordinary`: no special token).
    ours, field = _Reconstruction(sae.d_in, sae.d_sae, device), _Reconstruction(sae.d_in, sae.d_sae, device)
    masks = []
    for b in batches:
        check_cancel(should_cancel, "evaluation")
        x = run_hooked(model, b.input_ids, b.attention_mask, [hook_name])[hook_name]
        real = b.attention_mask.to(device).bool()
        ordinary = real & ~torch.isin(b.input_ids, special_ids).to(device)
        keep = ordinary & (x.norm(dim=-1) <= outlier_norm_threshold)
        masks.append((keep, ordinary))
        x_o = x[ordinary]
        x_hat, z = sae(x_o) if len(x_o) else (x_o, x_o)
        kept = keep[ordinary]
        ours.add(x_o[kept], x_hat[kept], z[kept], outliers=int((~kept).sum()), special=int((real & ~ordinary).sum()))
        field.add(x_o, x_hat, z)
        clock.add(int(real.sum()))
    metrics = ours.result(hook_name, dense_threshold, hist_bins)
    explained = field.explained_variance()
    ours_mean, field_mean = ours.mean().float(), field.mean().float()

    # Pass 2: clean vs spliced next-token predictions. Ours splice at our evaluated positions;
    # SAELens's splice the SAE at every non-special position and ablate every position.
    reconstruct = lambda x: sae(x)[0]  # noqa: E731
    splices = {  # name: (which positions, what replaces the activation there)
        "sae": ("ours", reconstruct),
        "zero": ("ours", torch.zeros_like),
        "mean": ("ours", lambda x: ours_mean.to(x.dtype).expand_as(x)),
        "field_sae": ("ordinary", reconstruct),
        "field_zero": ("real", torch.zeros_like),
        "field_mean": ("real", lambda x: field_mean.to(x.dtype).expand_as(x)),
    }
    scores = _Scores()
    for b, (keep, ordinary) in zip(batches, masks):
        check_cancel(should_cancel, "evaluation")
        ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
        at = {"ours": keep, "ordinary": ordinary, "real": mask.bool()}
        scores.start(ids, at["real"], ordinary, _logprobs(model, ids, mask))
        # The same replacement at the same positions is the same forward: run it once for all
        # the names it serves (one set of log-probs alive at a time: they are [tokens, vocab]).
        groups: list[tuple[torch.Tensor, Callable, list[str]]] = []
        for name, (where, replacement) in splices.items():
            same = next((g for g in groups if g[1] is replacement and torch.equal(g[0], at[where])), None)
            if same is None:
                groups.append((at[where], replacement, [name]))
            else:
                same[2].append(name)
        for positions, replacement, names in groups:
            with patched(model, {hook_name: _splice(positions, replacement)}):
                logp = _logprobs(model, ids, mask)
            for name in names:
                scores.add(name, logp)
            del logp
        clock.add(int(mask.sum()))
    if scores.positions == 0:
        raise UserError("no next-token positions to score: every row is a single token; use rows of 2+ tokens")
    return {"tokens": tokens, **metrics, **scores.ours(), "explained_variance": explained, **scores.field()}


def _splice(at: torch.Tensor, replacement: Callable[[torch.Tensor], torch.Tensor]):
    """A hook function replacing the activation by `replacement(x)` at the positions `at`."""
    def fn(x):
        return torch.where(at[..., None], replacement(x).to(x.dtype), x)
    return fn


def _logprobs(model, ids, mask) -> torch.Tensor:
    """float32 next-token log-probabilities [n_real, vocab] at every real position, row-major."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits[mask.bool()].float().log_softmax(-1)


class _Scores:
    """Running next-token CE and KL sums of each spliced forward, over two sets of positions.

    Ours: every real position whose next token is real (`ce_tokens`), for CE and KL alike.
    SAELens's (`get_downstream_reconstruction_metrics`): CE at the positions whose own token is not
    special and whose next token exists; KL at every position whose token is not special, the
    row's last included. (SAELens's rows have no padding; here "exists" means "is real".)
    """

    def __init__(self):
        self.ce: dict[str, float] = {}
        self.kl: dict[str, float] = {}
        self.positions = self.field_ce_positions = self.field_kl_positions = 0

    def start(self, ids: torch.Tensor, real: torch.Tensor, ordinary: torch.Tensor, clean: torch.Tensor) -> None:
        """A new batch: its positions, its next tokens, and the clean model's log-probs."""
        has_next = torch.zeros_like(real)
        has_next[:, :-1] = real[:, 1:] & real[:, :-1]
        nxt = torch.zeros_like(ids)
        nxt[:, :-1] = ids[:, 1:]
        # Each set as (rows of the log-probs, which index real positions; the labels there).
        field_ce = has_next & ordinary
        self.ce_at = {"": (has_next[real], nxt[has_next]), "field_": (field_ce[real], nxt[field_ce])}
        self.kl_at = {"": has_next[real], "field_": ordinary[real]}
        self.clean = clean
        self.positions += int(has_next.sum())
        self.field_ce_positions += int((has_next & ordinary).sum())
        self.field_kl_positions += int(ordinary.sum())
        for prefix in self.ce_at:
            self._ce(prefix + "clean", prefix, clean)

    def add(self, name: str, logp: torch.Tensor) -> None:
        prefix = "field_" if name.startswith("field_") else ""
        self._ce(name, prefix, logp)
        at = self.kl_at[prefix]
        kl = F.kl_div(logp[at], self.clean[at], log_target=True, reduction="sum")
        self.kl[name] = self.kl.get(name, 0.0) + float(kl)

    def _ce(self, name: str, prefix: str, logp: torch.Tensor) -> None:
        at, labels = self.ce_at[prefix]
        self.ce[name] = self.ce.get(name, 0.0) + float(F.nll_loss(logp[at], labels, reduction="sum"))

    def ours(self) -> dict[str, Any]:
        ce = {k: self.ce[k] / self.positions for k in ("clean", "sae", "zero", "mean")}
        return {
            "ce_tokens": self.positions,
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
            "ce_loss_recovered_zero": _recovered(ce["zero"], ce["sae"], ce["clean"]),
            "ce_loss_recovered_mean": _recovered(ce["mean"], ce["sae"], ce["clean"]),
            **{f"kl_{k}": self.kl[k] / self.positions for k in ("sae", "zero", "mean")},
        }

    def field(self) -> dict[str, Any]:
        n_ce, n_kl = max(self.field_ce_positions, 1), max(self.field_kl_positions, 1)
        ce = {k: self.ce["field_" + k] / n_ce for k in ("clean", "sae", "zero", "mean")}
        kl = {k: self.kl["field_" + k] / n_kl for k in ("sae", "zero", "mean")}
        return {
            "ce_loss_score": _recovered(ce["zero"], ce["sae"], ce["clean"]),
            "ce_loss_without_sae": ce["clean"], "ce_loss_with_sae": ce["sae"], "ce_loss_with_ablation": ce["zero"],
            "kl_div_score": _kl_score(kl["zero"], kl["sae"]),
            "kl_div_with_sae": kl["sae"], "kl_div_with_ablation": kl["zero"],
            "ce_loss_score_mean_ablation": _recovered(ce["mean"], ce["sae"], ce["clean"]),
            "ce_loss_with_mean_ablation": ce["mean"],
            "kl_div_score_mean_ablation": _kl_score(kl["mean"], kl["sae"]),
            "kl_div_with_mean_ablation": kl["mean"],
            "field_ce_tokens": self.field_ce_positions, "field_kl_tokens": self.field_kl_positions,
        }


def _recovered(ablated: float, spliced: float, clean: float) -> float | None:
    """Fraction of the CE gap between an ablation and the clean model that the SAE closes."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else None


def _kl_score(ablated: float, spliced: float) -> float | None:
    """SAELens's kl_div_score: the fraction of the ablation's KL that the SAE avoids."""
    return (ablated - spliced) / ablated if ablated != 0 else None


class _Reconstruction:
    """Running sums for the reconstruction and density metrics, in float64 where they add up."""

    def __init__(self, d_in: int, d_sae: int, device):
        self.n = self.outliers = self.special = 0
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)      # Σ x
        self.sum_sq = torch.zeros(d_in, dtype=torch.float64, device=device)   # Σ x²
        self.sq_err = self.cos = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.int64, device=device)     # tokens each latent fired on

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, outliers: int = 0, special: int = 0) -> None:
        """Tokens `x` [n, d_in], the SAE's reconstruction `x_hat` and latents `z` of them."""
        self.outliers += outliers
        self.special += special
        if not len(x):
            return
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

    def explained_variance(self) -> float | None:
        """SAELens's explained_variance: 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), i.e. 1 − FVU."""
        fvu = self._fvu()
        return None if fvu is None else 1.0 - fvu

    def _fvu(self) -> float | None:
        if self.n == 0:
            return None
        # Σ‖x − x̄‖² = Σ_d (Σ x_d² − N x̄_d²), per dimension in float64.
        total_var = float((self.sum_sq - self.sum.pow(2) / self.n).sum())
        return self.sq_err / total_var if total_var > 0 else None

    def result(self, hook_name: str, dense_threshold: float, bins: int) -> dict:
        if self.n == 0:
            raise UserError(f"every token at {hook_name} was excluded ({self.special} special tokens, "
                            f"{self.outliers} norm outliers); raise the outlier norm threshold or check the slice")
        n, d = self.n, len(self.sum)
        freq = (self.fired.double() / n).cpu().numpy()
        live = freq[freq > 0]
        counts, edges = np.histogram(np.log10(live), bins=bins, range=(math.log10(1 / n), 0.0))
        return {
            "excluded_special": self.special,
            "excluded_outliers": self.outliers,
            "l0": float(self.fired.sum()) / n,
            "mse": self.sq_err / (n * d),
            "fvu": self._fvu(),
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
