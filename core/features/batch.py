"""One batch of discovery: its latent activations, its non-pad tokens, and what a candidate
example gathers from them when it enters a table (its context window, that latent's activation
at each window position, and the strongest other latents at its token). The activations are
gone after the batch, so everything an example shows is gathered here, vectorized."""

from __future__ import annotations

from typing import NamedTuple

import torch

from core.errors import UserError
from core.features.config import Batch
from core.features.schema import OUTLIER_LATENTS

ENCODE_BLOCK_BYTES = 128 * 2**20
"""Most bytes of a TopK SAE's dense pre-activations discovery holds at once: a batch is encoded
a block of tokens at a time (512 tokens at 65,536 latents; much smaller blocks cost the matmul
CPU time) into one reused buffer, so the [tokens × d_sae] matrix never lives whole (512 MiB for
a batch of 2,048 tokens at 65,536 latents, page-faulted in anew for every batch)."""


MIN_BLOCK_ROWS = 16
"""Fewest tokens in an encoding block. The BLAS gives each token the same numbers whatever the
block's row count from 16 rows up (checked bit for bit with torch's CPU BLAS, 1 and 2 threads), but a
matrix-vector product for a single row rounds differently; so no block is smaller."""


class Acts:
    """A batch's latent activations: a dense z [n, d_sae], or a TopK SAE's own (values,
    indices) [n, k] — read as they are, so no pass over an [n, d_sae] matrix is needed. The
    indices are sorted within each token, so `keys` (token · d_sae + latent) ascend and a
    (token, latent) lookup is a binary search."""

    def __init__(self, sae, x: torch.Tensor, scratch: dict | None = None):
        """`scratch`: a dict that keeps the reused pre-activation buffer between batches."""
        self.d_sae = int(sae.W_dec.shape[0])
        self.z = self.values = self.indices = self.keys = None
        if not hasattr(sae, "encode_topk"):
            self.z = sae.encode(x).float()
            return
        values, indices = encode_topk_blocks(sae, x, self.d_sae, scratch)
        self.indices, order = indices.sort(dim=1)
        self.values = values.float().gather(1, order)
        self.keys = (torch.arange(len(x), device=x.device)[:, None] * self.d_sae + self.indices).reshape(-1)
        if len(x) * self.d_sae < 2**31:  # the binary searches run faster on 4-byte keys
            self.keys = self.keys.int()

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense activations [len(rows), d_sae] of some tokens (an index or a boolean mask)."""
        if self.z is not None:
            return self.z[rows]
        v = self.values[rows]
        return torch.zeros((len(v), self.d_sae), device=v.device).scatter_(1, self.indices[rows], v)

    def pairs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The firing (token, latent, activation) entries of tokens `rows`, by token then latent."""
        if self.values is None:
            z = self.z[rows] if len(rows) < len(self.z) else self.z
            tok, lat = (z > 0).nonzero(as_tuple=True)
            return rows[tok], lat, z[tok, lat]
        v, i = self.values[rows], self.indices[rows]
        tok = rows[:, None].expand_as(i)
        live = v > 0
        if bool(live.all()):  # the usual case: no selection needed
            return tok.reshape(-1), i.reshape(-1), v.reshape(-1)
        return tok[live], i[live], v[live]

    def at(self, tok: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        """The activation of latent `lat` at token `tok` (same shapes)."""
        if self.z is not None:
            return self.z[tok, lat]
        q = (tok * self.d_sae + lat).to(self.keys.dtype)
        i = torch.searchsorted(self.keys, q.reshape(-1)).clamp(max=len(self.keys) - 1).view(q.shape)
        return torch.where(self.keys[i] == q, self.values.view(-1)[i], 0.0)


def encode_topk_blocks(sae, x: torch.Tensor, d_sae: int, scratch: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sae.encode_topk(x)`, a block of `ENCODE_BLOCK_BYTES` at a time; on the CPU into the one
    buffer kept in `scratch` (CUDA's caching allocator already reuses memory). Each token's
    numbers are those of one call over the whole batch."""
    rows = max(MIN_BLOCK_ROWS, min(len(x), ENCODE_BLOCK_BYTES // (4 * d_sae)))
    if rows == len(x) and scratch is None:
        return sae.encode_topk(x)
    buf = None
    if scratch is not None and x.device.type == "cpu" and x.dim() == 2:
        dtype = sae.W_dec.dtype
        buf = scratch.get("pre")
        if buf is None or buf.numel() < (rows + MIN_BLOCK_ROWS) * d_sae or buf.dtype != dtype:
            buf = scratch["pre"] = torch.empty((rows + MIN_BLOCK_ROWS) * d_sae, dtype=dtype)
    parts = [sae.encode_topk(xb) if buf is None else sae.encode_topk(xb, out=buf[:len(xb) * d_sae].view(len(xb), d_sae))
             for xb in _blocks(x, rows)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def _blocks(x: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """x in blocks of `rows` rows, a short remainder (< MIN_BLOCK_ROWS) joined to the block before."""
    starts = list(range(0, len(x), rows))
    if len(starts) > 1 and len(x) - starts[-1] < MIN_BLOCK_ROWS:
        starts.pop()
    return [x[a:b] for a, b in zip(starts, [*starts[1:], len(x)])]


class BatchView(NamedTuple):
    """One batch's non-pad tokens and what a candidate gathers from them."""

    acts: Acts  # latent activations of the non-pad tokens
    b_idx: torch.Tensor  # [n] batch row of each token
    t_idx: torch.Tensor  # [n] position of each token
    pos_map: torch.Tensor  # [B, T] token index in acts, -1 on padding
    input_ids: torch.Tensor
    row_ids: torch.Tensor
    doc_ids: torch.Tensor
    co_i: torch.Tensor  # [n, m] strongest latents of each token
    co_v: torch.Tensor


def gather(view: BatchView, latents: torch.Tensor, flat: torch.Tensor, before: int,
           after: int) -> dict[str, torch.Tensor]:
    """Table fields (all but key) of candidates: token `flat` (index into view.acts) for latent
    `latents`, any matching shape; windows add a trailing W dimension."""
    b, t = view.b_idx[flat], view.t_idx[flat]
    T = view.pos_map.shape[1]
    tt = t[..., None] + torch.arange(-before, after + 1, device=flat.device)  # [..., W]
    in_row = (tt >= 0) & (tt < T)
    at = b[..., None] * T + tt.clamp(0, T - 1)  # flat [B·T] index of each window position
    src = view.pos_map.view(-1)[at]  # token index of each window position, -1 on padding
    valid = in_row & (src >= 0)
    win_acts = torch.where(valid, view.acts.at(src.clamp_min(0), latents[..., None].expand_as(src)), 0.0)
    return {"value": win_acts[..., before], "row_id": view.row_ids[b], "pos": t.int(),  # the window's centre is the token
            "doc": view.doc_ids[b], "win_tokens": torch.where(valid, view.input_ids.reshape(-1)[at], -1).int(),
            "win_acts": win_acts, "co_lat": view.co_i[flat], "co_val": view.co_v[flat]}



def best_per_row(view: BatchView, tok: torch.Tensor, lat: torch.Tensor, val: torch.Tensor, c: int) -> tuple:
    """Each latent's best `c` rows of the batch, one token each (its best), from the firing
    (token, latent, activation) pairs: keys [d_sae, c] (-inf where fewer) and token indices.
    Sparse — O(pairs), no [tokens, d_sae] matrix; rows of one document (here or in the table)
    are merged in `merge_documents`."""
    from core.features.tables import segment_top

    d_sae = view.acts.d_sae
    group = view.b_idx[tok] * d_sae + lat  # (row, latent)
    present = torch.zeros(view.pos_map.shape[0] * d_sae, dtype=torch.bool, device=tok.device)  # B · d_sae bools
    present[group] = True
    groups = present.nonzero().squeeze(1)
    local = (present.cumsum(0) - 1)[group]  # each pair's (row, latent) as an index into groups
    best, entry = segment_top(local, val, len(groups), 1, nonnegative=True)  # each row's best token
    keys, pick = segment_top(groups % d_sae, best[:, 0], d_sae, c, nonnegative=True)
    flat = torch.where(pick >= 0, tok[entry[pick.clamp_min(0), 0]], 0)
    return keys, flat


def to_device(x, device: torch.device) -> torch.Tensor:
    """x as a tensor on `device`; host tensors go to a GPU through pinned memory without waiting."""
    x = torch.as_tensor(x)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def as_tensors(batch: Batch, device) -> tuple:
    if len(batch) not in (4, 5):
        raise UserError("a discovery batch is (input_ids, attention_mask, row_ids, acts[, doc_ids])")
    input_ids, mask, row_ids, acts = batch[:4]
    input_ids = to_device(input_ids, device).long()
    mask = to_device(mask, device).bool()
    row_ids = to_device(row_ids, device).long()
    acts = to_device(acts, device)
    doc_ids = to_device(batch[4], device).long() if len(batch) == 5 and batch[4] is not None else row_ids
    if acts.shape[:2] != mask.shape or input_ids.shape != mask.shape or row_ids.shape != mask.shape[:1] \
            or doc_ids.shape != row_ids.shape:
        raise UserError(
            f"batch shapes disagree: input_ids {list(input_ids.shape)}, attention_mask {list(mask.shape)}, "
            f"row_ids {list(row_ids.shape)}, acts {list(acts.shape)}; they must be [B,T], [B,T], [B], [B,T,d_in]"
        )
    return input_ids, mask, row_ids, acts, doc_ids



def token_index(mask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """A batch's non-pad tokens from its [B, T] mask: batch row and position of each (b_idx, t_idx),
    pos_map ([B, T] token index, -1 on padding) and whether no position is padding. Worked out
    on the host, where the data loader made the mask, and sent to `device` without waiting: on a
    GPU these data-dependent shapes cost no host-device sync."""
    m = torch.as_tensor(mask).bool().cpu()
    b_idx, t_idx = m.nonzero(as_tuple=True)
    pos_map = torch.full(m.shape, -1, dtype=torch.long)
    pos_map[b_idx, t_idx] = torch.arange(len(b_idx))
    if device.type == "cuda":
        b_idx, t_idx, pos_map = (t.pin_memory().to(device, non_blocking=True) for t in (b_idx, t_idx, pos_map))
    return b_idx, t_idx, pos_map, bool(m.all())


def outlier_rows(zo, out, norms, b_idx, t_idx, input_ids, row_ids) -> dict:
    """Excluded tokens (mask `out`, their latent activations `zo`) and their strongest latents."""
    vals, lat = zo.topk(min(OUTLIER_LATENTS, zo.shape[1]), dim=1)
    b, t = b_idx[out], t_idx[out]
    return {
        "row_id": row_ids[b].cpu().numpy(),
        "pos": t.cpu().numpy(),
        "token_id": input_ids[b, t].cpu().numpy(),
        "norm": norms[out].cpu().numpy(),
        "latents": lat.cpu().numpy(),
        "acts": vals.cpu().numpy(),
    }

