"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK(ReLU(pre)): the k largest pre-activations per token survive. The loss is the FVU plus
AuxK: the top k_aux = d_in/2 dead latents reconstruct what the live ones missed.

Speed (the kernels and the blocks live in core/sae/sparse.py, shared with BatchTopK): the
decoder is a gather (`embedding_bag` over the k chosen rows) and the encoder's
gradient is computed sparsely (`_GatherPre`), so one step costs one dense matmul plus O(N·k·d)
work. Measured on 2 shared CPU cores at d_in=576, d_sae=4608, k=32, batch 4096: a dense decoder
with autograd through the dense pre-activations took 1.9 s per step (≈2,100 tokens/s);
`embedding_bag` decoding 1.2 s; with the sparse encoder and decoder backward and fused Adam
0.35–0.45 s (≈9,000–12,000 tokens/s; the encoder matmul is ~0.2 s of it); with b_dec's gradient
as one matrix-vector product and W_enc's gradient in W_enc's own layout, 0.24 s on an idle
machine (bench/RESULTS.md, 2026-12-02). Then, on a slower 2-core machine (0.2 s for the
encoder matmul alone): 0.48 s → 0.35 s per step (medians, side by side) by reusing the
pre-activation buffer (`_buffer`), computing both weight gradients as `embedding_bag` sums
over tokens grouped by latent and the activations' gradient as one sampled matmul (`_ByLatent`).

Memory: the dense [N × d_sae] pre-activations are never alive at once (`pre_blocks`): they are
computed a block at a time (every token × a block of latents, `block_shape`) into one reused
buffer of at most `PRE_CHUNK_BYTES`, each block giving its tokens' top k among its latents and
AuxK's dead-latent picks before the next is computed; each token's top k over the blocks are
then the top k of their top k's (`top_per_row`). The backward already touched only the chosen
pairs, so nothing else needs the whole matrix. At 65,536 latents a training job's peak went
from 7.1 to 2.6 GB (bench/RESULTS.md, "memory at width"); up to 16,384 latents at batch 4096
the batch is one block, the step as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.errors import UserError
from core.sae.base import (SAE, SAETypeConfig, StepContext, StepOut, fired_latents,
                           reconstruction_terms, sparse_step_bytes)
from core.sae.registry import register
from core.sae.selection import _best, _joined, row_topk
from core.sae.sparse import pre_blocks, sparse_decode


def check_k(k: int, d_sae: int) -> None:
    """TopK needs 1 <= k <= d_sae; say which knob to turn otherwise."""
    if not 1 <= k <= d_sae:
        raise UserError(f"k={k} must be between 1 and the SAE width {d_sae}; lower k or raise the expansion factor")


@dataclass
class TopKConfig(SAETypeConfig):
    """TopK knobs (Gao et al. 2024)."""

    k: int = 32
    """Latents kept per token."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (Gao et al.)."""

    def check(self, d_sae: int) -> None:
        check_k(self.k, d_sae)

    def run_name(self) -> str:
        return f"{self.architecture}-k{self.k}"

    def cfg_json(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_cfg_json(cls, d: dict[str, Any]) -> "TopKConfig":
        k = d.get("k", (d.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise UserError("cfg.json says architecture topk but gives no k; add \"k\": <int> to cfg.json")
        return cls(k=int(k))


@register("topk")
class TopKSAE(SAE):
    Config = TopKConfig

    @property
    def k(self) -> int:
        return self.type_config.k

    def encode_topk(self, x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k kept activations and their latent indices, each [..., k] (values may be 0).
        `out`: a [len(x), d_sae] buffer for the pre-activations of a 2-D x (see `pre_acts`)."""
        pre = self.pre_acts(x, out)
        values, indices = row_topk(pre, self.k) if pre.dim() == 2 else pre.topk(self.k, dim=-1)
        return values.relu(), indices

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    @classmethod
    def step_bytes(cls, type_config: TopKConfig, d_in: int, d_sae: int, batch: int) -> int:
        return sparse_step_bytes(d_in, d_sae, batch, type_config.k)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOut:
        x_c = x - self.b_dec
        aux = AuxPicker(self, ctx)
        top_v, top_i = top_per_row(self, x_c, ctx, aux, self.k)
        n, k = top_i.shape
        tokens = torch.arange(n, device=x.device)
        pairs = aux.joined(top_v.reshape(-1), top_i.reshape(-1), tokens.repeat_interleave(k), tokens * k)
        acts, decoded = sparse_decode(self, x_c, self.b_dec, *pairs)
        x_hat = decoded[:n] + self.b_dec
        sq_err, total_var = reconstruction_terms(x, x_hat)
        fvu = sq_err / total_var
        loss = fvu + aux.loss(decoded[n:], (x - x_hat).detach()) / total_var
        live = acts[:n * k].detach().view(n, k) > 0
        return StepOut(loss, fvu.detach(), sq_err.detach(), live.sum(1).float().mean(),
                       fired_latents(top_i, live, self.d_sae))


@torch.no_grad()
def top_per_row(sae: SAE, x_in: torch.Tensor, ctx: StepContext, aux: "AuxPicker",
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's k largest encoder pre-activations of x_in ([N, k] values, unsorted, in the
    product's dtype) and their latents, from `aux.blocks`, AuxK picking its dead latents from
    the same blocks (TopK's k, BatchTopK's candidates)."""
    vs, ls, part_v, part_l = [], [], [], []
    for c0, pre in aux.blocks(x_in):
        aux.add(c0, pre)
        v, i = row_topk(pre, min(k, pre.shape[1]))
        part_v.append(v)
        part_l.append(aux.latents(i + c0))
        if c0 + pre.shape[1] == sae.d_sae:  # the last block of latents of these tokens
            aux.end_tokens()
            v, i = _best(part_v, part_l, k)
            vs.append(v)
            ls.append(i)
            part_v, part_l = [], []
    return _joined(vs), _joined(ls)


OWN_PRODUCT_PER_LATENT = 64
"""`AuxPicker.blocks` computes the dead latents' pre-activations as a product of their own when
tokens × dead latents ≤ this × d_sae (1.6% of the latents at batch 4096), else in place."""

DENSE_AUXK_MIN_FILL = 1 / 6
"""AuxK's picks take dense products when they fill at least this share of the [tokens × dead
latents] matrix (`AuxPicker.joined`). With every token's 288 picks kept (bench/auxk.py
--sparse, 16,384 latents, fp32 products): dense 1.2-1.3× faster than the sparse kernels at 25%
and 18% fill, slower at 13% (the dense products cost ~0.17 ms per dead latent on 2 CPU cores,
the sparse ones ~0.33 s for 1.2M pairs). Under autocast the dense products run in bf16, as
autocast runs a matmul."""


class AuxPicker:
    """AuxK (Gao et al.): the top k_aux = d_in/2 dead latents reconstruct what the live ones
    missed (no bias), scaled down while fewer than k_aux latents are dead, as in sparsify.

    The dead latents' top k_aux are picked with `row_topk`'s grouped passes, from the step's
    own pre-activations (`blocks`, `add`) when many are dead, from a product of their own when
    few are; their activations, decode and backward touch only the positive picks, gathered and
    decoded with the main pairs (`joined`, `sparse_decode`), or, when those fill much of the
    [N × dead] matrix, as that dense matrix. So AuxK costs a top-k over the dead columns plus
    O(N·k_aux·d_in), not a dense product per dead latent. Measured at 65,536 latents
    (bench/auxk.py, bench/RESULTS.md, 2026-12-07, Zen 4 EPYC, bf16 matmul, sign-SGD, 5 rounds):
    with 2% / 38% of the latents truly dead the step is 1.03-1.10× / 1.10-1.13× the step without
    AuxK; with dead latents whose pre-activations are like live ones' (half positive: all
    k_aux picks kept) 1.09× at 2% (dense; kept sparse 1.18×) and 1.59-1.70× at 38% (25k dead
    latents, too many for dense products: 9× the main pairs, decoded sparse).
    """

    def __init__(self, sae: SAE, ctx: StepContext):
        self.sae, self.ctx = sae, ctx
        alpha = sae.type_config.auxk_alpha
        self.dead = ctx.dead.nonzero().squeeze(1) if alpha > 0 else ctx.dead.new_zeros(0, dtype=torch.long)
        self.order = self.n_live = None
        self.k_aux_max = sae.d_in // 2
        self.k_aux = max(1, min(self.k_aux_max, len(self.dead)))
        self.weight = alpha * min(len(self.dead) / max(self.k_aux_max, 1), 1.0)
        self.values: list[torch.Tensor] = []  # per block of tokens: the picks' pre-activations, flat by token
        self.which: list[torch.Tensor] = []   # their dead latents' places in `dead`
        self.counts: list[torch.Tensor] = []  # picks per token
        self.part_v: list[torch.Tensor] = []  # this block of tokens' picks so far, per block of latents
        self.part_w: list[torch.Tensor] = []
        self.picked = False

    def blocks(self, x_in: torch.Tensor):
        """`pre_blocks` of x_in, AuxK's picks made on the way (`add`). When few latents are dead
        (N × dead ≤ `OWN_PRODUCT_PER_LATENT` × d_sae), their pre-activations are a product of
        their own, x_in @ W_enc[:, dead], picked from before the main blocks. Otherwise the main
        blocks come with W_enc's columns in `order`, the live ones, then the dead ones, a
        contiguous tail of each block of tokens whose top k_aux are picked in place: gathering
        the columns into that order moves d_in × d_sae values once per step (51 ms at 65,536
        latents in fp32), the own product costs N × dead × d_in multiply-adds, ~1/64 of a moved
        value's time each on 2 CPU cores in fp32 (more in bf16: bench/auxk.py). Both beat
        copying the dead columns out of every block (strided, ~10 ns a value: 54 ms a step
        with 2% of 65,536 latents dead). `latents` maps a block's column numbers back to latents."""
        if len(self.dead) * len(x_in) > OWN_PRODUCT_PER_LATENT * self.sae.d_sae:
            live = (~self.ctx.dead).nonzero().squeeze(1)
            self.order, self.n_live = torch.cat([live, self.dead]), len(live)
        elif len(self.dead):
            for c0, pre in pre_blocks(self.sae, x_in, self.ctx, self.dead):
                self._pick(pre, c0)
                if c0 + pre.shape[1] == len(self.dead):
                    self.end_tokens()
        return pre_blocks(self.sae, x_in, self.ctx, self.order)

    def latents(self, columns: torch.Tensor) -> torch.Tensor:
        """The latents of `blocks` column numbers."""
        return columns if self.order is None else self.order[columns]

    def add(self, c0: int, pre: torch.Tensor) -> None:
        """Pick the top dead latents per token of a `blocks` block starting at column c0 (call
        under no_grad); `end_tokens` after the last block of latents of its tokens."""
        skip = max(self.n_live - c0, 0) if self.order is not None else pre.shape[1]
        if skip < pre.shape[1]:
            self._pick(pre[:, skip:], c0 + skip - self.n_live)

    def _pick(self, columns: torch.Tensor, place: int) -> None:
        """Each token's top k_aux of these dead latents' columns, the first `place` in `dead`."""
        values, which = row_topk(columns, min(self.k_aux, columns.shape[1]), positive=True)
        self.part_v.append(values)
        self.part_w.append(which + place)

    def end_tokens(self) -> None:
        """Keep a block of tokens' top k_aux dead latents over its blocks of latents."""
        if not self.part_v:
            return
        values, which = _best(self.part_v, self.part_w, self.k_aux)
        self.part_v, self.part_w = [], []
        if values.device.type == "cpu":
            # Picks whose pre-activation is ≤ 0 add nothing (ReLU) and get no gradient: only the
            # positive ones go on, however many each token has. Truly dead latents are mostly
            # negative, so the pairs shrink from k_aux per token to a handful, and with them
            # the decode and backward; padding every token to the block's most (as before)
            # let one loud token set the cost. (On CUDA the count would be a host sync.)
            keep = values > 0
            values, which, counts = values[keep], which[keep], keep.sum(1)
        else:
            counts = torch.full((len(values),), values.shape[1], dtype=torch.long, device=values.device)
            values, which = values.reshape(-1), which.reshape(-1)
        self.values.append(values)
        self.which.append(which)
        self.counts.append(counts)

    def joined(self, values: torch.Tensor, latents: torch.Tensor, tokens: torch.Tensor,
               offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The main flat pairs of the N tokens (sorted by token; `offsets` [N] where each token's
        pairs start) followed by AuxK's picks on rows N + token: `sparse_decode`'s values,
        latents, rows, offsets and dense block (None).

        When the picks fill at least `DENSE_AUXK_MIN_FILL` of the [N × dead latents] matrix
        (few dead latents, most of them picked: early in a run, or a narrow SAE), they go as that
        dense matrix instead, encoded and decoded by dense products, which do the same sums
        faster than the sparse kernels do that many pairs per latent."""
        aux_v = _joined(self.values) if self.values else values[:0]
        self.picked = len(aux_v) > 0
        if not self.picked:
            return values, latents, tokens, offsets, None
        counts = _joined(self.counts)
        n = len(offsets)
        if len(aux_v) >= DENSE_AUXK_MIN_FILL * n * len(self.dead):
            rows = torch.arange(n, device=tokens.device).repeat_interleave(counts, output_size=len(aux_v))
            aux_pre = aux_v.new_zeros(n, len(self.dead)).index_put_((rows, _joined(self.which)), aux_v)
            return values, latents, tokens, offsets, (aux_pre, self.dead)
        aux_rows = torch.arange(n, 2 * n, device=tokens.device).repeat_interleave(counts, output_size=len(aux_v))
        return (torch.cat([values.float(), aux_v.float()]), torch.cat([latents, self.dead[_joined(self.which)]]),
                torch.cat([tokens, aux_rows]), torch.cat([offsets, len(values) + counts.cumsum(0) - counts]), None)

    def loss(self, aux_hat: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """α·Σ‖aux − resid‖², `aux_hat` the decode of AuxK's rows (0 when nothing is dead; the
        residual's, with no gradient, when no dead latent has a positive pre-activation)."""
        if not len(self.dead):
            return resid.new_zeros(())
        if not self.picked:
            return self.weight * resid.pow(2).sum()
        return self.weight * (aux_hat - resid).pow(2).sum()
