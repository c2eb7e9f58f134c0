"""The sparse step's machinery, shared by TopK and BatchTopK: the encoder's pre-activations in
reused blocks (`pre_blocks`), and the gather kernels that encode and decode only the chosen
(token, latent) pairs with a sparse backward (`sparse_decode`: `_GatherPre`, `_GatherDecode`,
grouped by latent in `_ByLatent`), AuxK's dense block included. Why each piece is shaped so, and
what it measured, is in core/sae/topk.py's module docstring and on each piece.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from core.sae.base import SAE, StepContext, block_shape

# `_ByLatent.dots` builds a CSR pattern; torch warns once per process that CSR is in beta.
warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)


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
    # The weights cast once per step (autocast, entered anew for each block, would cast them per
    # block); AuxK's few columns gathered before the cast, not after a cast of all of W_enc.
    W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
    if columns is not None:  # W_enc.T is W_enc's own layout: a gather of contiguous rows
        W_T = W_enc.T
        W_enc = torch.index_select(W_T, 0, columns, out=_buffer(ctx, "W_enc", W_T, W_T.shape[1], width)).T
        b_enc = b_enc[columns]
    W_enc, b_enc = W_enc.to(dtype), b_enc.to(dtype)
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
