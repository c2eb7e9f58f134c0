"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK(ReLU(pre)): the k largest pre-activations per token survive. The loss is the FVU plus
AuxK: the top k_aux = d_in/2 dead latents reconstruct what the live ones missed.

Speed: the decoder is a gather (`embedding_bag` over the k chosen rows) and the encoder's
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

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import UserError
from core.sae.base import (SAE, SAETypeConfig, StepContext, StepOut, block_shape, fired_latents,
                           reconstruction_terms, sparse_step_bytes)
from core.sae.registry import register
from core.sae.selection import _best, _joined, row_topk

# `_ByLatent.dots` builds a CSR pattern; torch warns once per process that CSR is in beta.
warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)


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


def sparse_decode(sae: SAE, x_c: torch.Tensor, b_dec: torch.Tensor | None, values: torch.Tensor,
                  latents: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                  dense: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ReLU activations of chosen (row, latent) pairs — `values` their pre-activations from
    the no-grad pass, `rows` ascending, row r reading token r mod len(x_c), `offsets` where each
    row's pairs start — and each row's decode (no bias), with the sparse backward of
    `_GatherPre` and `_GatherDecode`.

    `AuxPicker.joined` puts AuxK's pairs on rows len(x_c).. after the main ones: one gather and
    one decode serve both losses, so each weight's sparse gradient is one sum, not a second
    dense [d_sae × d_in] tensor added to the first. Or, when its picks fill much of the
    [tokens × dead latents] matrix, it gives them as `dense`: that matrix of pre-activations
    (0 where not picked) and the dead latents, encoded and decoded with dense products whose
    gradients are added into the same sums; the decode then has AuxK's rows appended.
    `b_dec` is given when x_c = x − b_dec."""
    by_latent = _ByLatent(latents, sae.d_sae, rows)
    x_rows = x_c.detach().repeat(len(offsets) // len(x_c), 1)  # AuxK's rows read the same tokens
    if dense is None:
        acts = _GatherPre.apply(x_rows, b_dec, sae.W_enc, sae.b_enc, by_latent, values.float()).relu()
        return acts, _GatherDecode.apply(latents, acts, sae.W_dec, by_latent, offsets)
    aux_pre, dead = dense
    pre, aux_pre = _GatherPre.apply(x_rows, b_dec, sae.W_enc, sae.b_enc, by_latent, values.float(), aux_pre, dead)
    acts = pre.relu()
    decoded, aux_hat = _GatherDecode.apply(latents, acts, sae.W_dec, by_latent, offsets, aux_pre.relu(), dead)
    return acts, torch.cat([decoded, aux_hat])


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


def pre_blocks(sae: SAE, x_in: torch.Tensor, ctx: StepContext, columns: torch.Tensor | None = None):
    """The encoder pre-activations x_in @ W_enc + b_enc of the batch as (first column, block)
    pairs, [tokens × latents] blocks of `block_shape` (blocks of latents within a block of
    consecutive tokens, in order), each computed into the same reused buffer: the caller takes
    what it needs from a block before asking for the next. Call under no_grad.
    `columns`: these latents' pre-activations, in this order (`AuxPicker.blocks`), not all in
    their own.

    So the dense [batch × d_sae] matrix is never alive at once: 1 GiB at batch 4096 × 65,536
    latents, against 256 MiB for a block (`PRE_CHUNK_BYTES`).
    """
    width = sae.d_sae if columns is None else len(columns)
    rows, cols = block_shape(len(x_in), width, ctx.chunk_tokens, ctx.chunk_latents)
    dtype = torch.bfloat16 if ctx.amp else torch.float32
    # The weights cast once per step: autocast, entered anew for each block, cast them per block.
    W_enc, b_enc = sae.W_enc.detach().to(dtype), sae.b_enc.detach().to(dtype)
    if columns is not None:  # W_enc.T is W_enc's own layout: a gather of contiguous rows
        W_T = W_enc.T
        W_enc = torch.index_select(W_T, 0, columns, out=_buffer(ctx, "W_enc", W_T, W_T.shape[1], width)).T
        b_enc = b_enc[columns]
    for s in range(0, len(x_in), rows):
        xb = x_in[s: s + rows].detach().to(dtype)
        for c0 in range(0, width, cols):
            w = min(cols, width - c0)
            yield c0, torch.addmm(b_enc[c0: c0 + w], xb, W_enc[:, c0: c0 + w], out=_buffer(ctx, "pre", xb, w))


def _buffer(ctx: StepContext, key: str, x: torch.Tensor, cols: int, rows: int | None = None) -> torch.Tensor | None:
    """A reused [rows (len(x)), cols] buffer of x's dtype (fp32, or bf16 under autocast) named
    `key` on CPU (None elsewhere): a block of the pre-activations, or W_enc's columns in AuxK's
    order.

    glibc hands out allocations this large (> 32 MB) as fresh mmapped pages, so a new buffer
    per step is page-faulted in anew: 30-50 ms of a 400 ms step at batch 4096 × 4608 latents,
    and most of AuxK's cost at 65,536 latents. CUDA's caching allocator already reuses memory.
    """
    if ctx.scratch is None or x.device.type != "cpu":
        return None
    rows = len(x) if rows is None else rows
    n = rows * cols
    buf = ctx.scratch.get(key)
    if buf is None or buf.numel() < n or buf.dtype != x.dtype:
        buf = ctx.scratch[key] = torch.empty(n, dtype=x.dtype)
    return buf[:n].view(rows, cols)


class _ByLatent:
    """The batch's chosen (token, latent) pairs grouped by latent, which is how both sparse
    weight gradients sum: grad W_enc[:, l] = Σ grad_pre[n, l] · x[n] and grad W_dec[l] =
    Σ acts[n, l] · grad_x̂[n] over the tokens n that chose l. Sorted once per step and used for
    both; each sum is one `embedding_bag` over the tokens, one bag per latent. Measured on 2
    CPU cores at batch 4096, k 32, 4608 latents: 7 ms per product, vs 20 ms as a CSR matmul
    and 28 ms as a COO one (which sorts its own copy).

    `indices` is [N, k] (k latents per token), or flat [P] with `tokens` [P] naming each
    pair's token (BatchTopK: tokens keep different numbers of latents).
    """

    def __init__(self, indices: torch.Tensor, d_sae: int, tokens: torch.Tensor | None = None):
        self.shape = indices.shape
        self.flat = indices.reshape(-1)
        self.order = torch.argsort(self.flat, stable=True)
        if tokens is None:
            self.tokens = torch.div(self.order, indices.shape[1], rounding_mode="floor")  # ascending per latent
        else:
            self.tokens = tokens[self.order]
        self.crow = torch.zeros(d_sae + 1, dtype=torch.long, device=indices.device)
        self.crow[1:] = torch.bincount(self.flat, minlength=d_sae).cumsum(0)

    def sum_rows(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[d_sae, d]: for each latent l, Σ weights[n, j] · rows[n] over the (n, j) that chose l."""
        return F.embedding_bag(self.tokens, rows.float(), self.crow[:-1], mode="sum",
                               per_sample_weights=weights.reshape(-1)[self.order].float())

    def dots(self, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[N, k]: table[indices[n, j]] · rows[n] for every chosen pair, as one sampled matmul
        over the (latent, token) pattern (3× faster than embedding_bag's backward, measured)."""
        pattern = torch.sparse_csr_tensor(self.crow, self.tokens, torch.zeros(len(self.flat), device=rows.device),
                                          (len(self.crow) - 1, len(rows)), check_invariants=False)
        by_latent = torch.sparse.sampled_addmm(pattern, table.float(), rows.float().T, beta=0.0).values()
        return torch.empty_like(by_latent).index_put_((self.order,), by_latent).view(self.shape)


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


class _GatherPre(torch.autograd.Function):
    """Encoder pre-activations (x - b_dec) @ W_enc + b_enc at chosen (token, latent) pairs,
    with a sparse backward.

    The values come from the dense pre-activations computed without autograd; this Function
    only supplies their gradient, which touches the N×K chosen entries instead of a dense
    N×d_sae matrix: x.T @ grad_pre becomes a sum over each latent's tokens (`_ByLatent`). The
    input x carries no gradient, so the one through x - b_dec is needed only summed over
    tokens, for b_dec: -W_enc @ grad_b_enc, a matrix-vector product (no per-token gather).
    With AuxK's dense block (`aux_pre` [N × n_dead], `dead`), its gradient's products with x
    are added to the dead latents' rows of the same sums.
    """

    @staticmethod
    def forward(ctx, x_c, b_dec, W_enc, b_enc, by_latent, values, aux_pre=None, dead=None):
        ctx.save_for_backward(x_c, W_enc, dead)
        ctx.by_latent = by_latent
        return values.clone() if aux_pre is None else (values.clone(), aux_pre.clone())

    @staticmethod
    def backward(ctx, grad, grad_aux=None):
        x_c, W_enc, dead = ctx.saved_tensors
        by_latent = ctx.by_latent
        grad = grad.float()
        grad_b_dec = grad_W = None
        grad_b = torch.zeros(W_enc.shape[1], device=grad.device).index_add_(0, by_latent.flat, grad.reshape(-1))
        if grad_aux is not None:
            grad_b.index_add_(0, dead, grad_aux.float().sum(0))
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc.float() @ grad_b)
        if ctx.needs_input_grad[2]:
            rows = by_latent.sum_rows(grad, x_c)  # [d_sae, d_in]: W_enc's own (column-major) layout
            if grad_aux is not None:
                rows.index_add_(0, dead, (grad_aux.T @ x_c.to(grad_aux.dtype)).float())
            grad_W = rows.T
        return None, grad_b_dec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None, None, None


class _GatherDecode(torch.autograd.Function):
    """x̂ = Σ_j acts[:, j] · W_dec[indices[:, j]], with a sparse backward for W_dec; for flat
    pairs sorted by token, `offsets` [N] says where each token's pairs start. With AuxK's
    dense block (`aux_acts` [N × n_dead], `dead`), also its decode aux_acts @ W_dec[dead].

    `embedding_bag`'s own W_dec backward sorts the indices again; the shared `_ByLatent`
    grouping is already sorted.
    """

    @staticmethod
    def forward(ctx, indices, acts, W_dec, by_latent, offsets=None, aux_acts=None, dead=None):
        ctx.by_latent = by_latent
        decoded = F.embedding_bag(indices, W_dec, offsets, per_sample_weights=acts, mode="sum")
        if aux_acts is None:
            ctx.save_for_backward(acts, W_dec, None, None, None)
            return decoded
        W_dead = W_dec.index_select(0, dead).to(aux_acts.dtype)
        ctx.save_for_backward(acts, W_dec, aux_acts, W_dead, dead)
        return decoded, (aux_acts @ W_dead).float()

    @staticmethod
    def backward(ctx, grad, grad_aux=None):
        acts, W_dec, aux_acts, W_dead, dead = ctx.saved_tensors
        grad_acts = grad_W = grad_aux_acts = None
        if ctx.needs_input_grad[1]:
            grad_acts = ctx.by_latent.dots(W_dec.detach(), grad)  # grad_acts[n, j] = grad[n] · W_dec[indices[n, j]]
        if aux_acts is not None and ctx.needs_input_grad[5]:
            grad_aux_acts = grad_aux.to(W_dead.dtype) @ W_dead.T
        if ctx.needs_input_grad[2]:
            grad_W = ctx.by_latent.sum_rows(acts, grad)
            if aux_acts is not None:
                grad_W.index_add_(0, dead, (aux_acts.T @ grad_aux.to(aux_acts.dtype)).float())
        return None, grad_acts, grad_W, None, None, grad_aux_acts, None
