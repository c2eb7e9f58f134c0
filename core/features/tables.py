"""The running per-latent tables of discovery and their merges.

A table holds [d_sae, n] slots per latent; each batch contributes its own per-latent best
candidates, the two are concatenated and merged with one `torch.topk` on a key — no
per-feature Python heaps. The top table's key is the activation; the quantile reservoir's key
is a uniform random number drawn for each firing (token, latent) pair, so its survivors are a
uniform sample without replacement of the latent's firing tokens (the top-S of i.i.d. keys).

Every merge here keeps "the n largest keys of everything seen" (for one-per-document tables:
of each document's best), which is a function of the set of entries, not of the order they came
in: that is what makes two tables built over disjoint halves of a stream merge into the table
of the whole stream (`merge_tables`, `merge_documents`).
"""

from __future__ import annotations

import torch

from core.features.batch import BatchView, gather

Table = dict[str, torch.Tensor]
"""A running per-latent table; every field has leading dims [d_sae, slots]: key (what the merge
ranks by, -inf where empty), value (the activation), row_id, pos, doc, win_tokens [.., W] (-1
outside the row or on padding), win_acts [.., W] (0 there), co_lat / co_val [.., n_coactive+1]."""


SLOT_BYTES_FIXED = 4 + 4 + 8 + 4 + 8
"""Bytes of a slot's key, value, row_id, pos and doc; each window position adds 8 (token id and
activation) and each co-active latent 8 (latent and activation)."""


def slot_bytes(w: int, m: int) -> int:
    """Bytes one table slot holds, for windows of `w` positions and `m` co-active latents."""
    return SLOT_BYTES_FIXED + 8 * w + 8 * m


def empty_table(d_sae: int, k: int, w: int, m: int, device: torch.device) -> Table:
    # Token ids, positions and latent ids fit int32 (vocabularies, rows and widths < 2**31):
    # at 65,536 latents x 70 slots that halves the biggest fields of the tables.
    full = lambda dtype, *shape: torch.full((d_sae, k, *shape), -1, dtype=dtype, device=device)
    return {"key": torch.full((d_sae, k), -torch.inf, device=device), "value": torch.zeros((d_sae, k), device=device),
            "row_id": full(torch.long), "pos": full(torch.int32), "doc": full(torch.long),
            "win_tokens": full(torch.int32, w), "win_acts": torch.zeros((d_sae, k, w), device=device),
            "co_lat": full(torch.int32, m), "co_val": torch.zeros((d_sae, k, m), device=device)}



def merge_winners(table: Table, rows: torch.Tensor, keys: torch.Tensor, flat: torch.Tensor, view: BatchView,
                  before: int, after: int) -> Table:
    """Merge candidates given by keys and token indices ([len(rows), c]) of the latents `rows`
    into the table in place: each winner takes the slot of an entry it evicts, and windows are
    gathered only for winners — once the table holds high values, few candidates win and nothing
    else moves. Only the latents with candidates are read, so a batch costs O(its contenders),
    not O(d_sae). Slots are not kept in key order (`by_key` sorts them once, at the end)."""
    k_old = table["key"].shape[1]
    new_keys, sel = torch.cat([table["key"][rows], keys], 1).topk(k_old, dim=1)
    won = (sel >= k_old) & (new_keys > -torch.inf)  # an empty candidate never displaces anything
    kept = torch.zeros((len(sel), k_old + 1), dtype=torch.bool, device=sel.device)
    kept.scatter_(1, sel.clamp(max=k_old), True)
    evicted = ~kept[:, :k_old]
    # pair each latent's winners with as many of its evicted slots, in order
    free = evicted & (evicted.cumsum(1) <= won.sum(1, keepdim=True))
    i, j = won.nonzero(as_tuple=True)
    slot = free.nonzero(as_tuple=True)[1]
    lat = rows[i]
    tok = flat[i, sel[i, j] - k_old]
    for f, v in gather(view, lat, tok, before, after).items():
        table[f][lat, slot] = v
    table["key"][lat, slot] = new_keys[i, j]
    return table


def by_key(table: Table) -> Table:
    """The table with each latent's slots in descending key order."""
    order = table["key"].argsort(dim=1, descending=True, stable=True)
    return {f: v.gather(1, order if v.dim() == 2 else order[..., None].expand_as(v)) for f, v in table.items()}


def segment_top(seg: torch.Tensor, key: torch.Tensor, n_seg: int, c: int,
                nonnegative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries grouped by `seg` (e.g. latent), each group's `c` largest keys: keys [n_seg, c]
    (-inf where a group has fewer) and entry indices (-1 there). One stable sort, no loop: the
    bits of a non-negative float32 order like the float, so (group, key descending) packs into
    one int64. `nonnegative`: the caller knows every key is >= 0 (saves checking, a host-device
    sync on a GPU)."""
    if key.dtype == torch.float32 and (nonnegative or len(key) == 0 or bool(key.min() >= 0)):
        packed = seg.long() * 2**32 + (2**31 - 1 - key.view(torch.int32).long())
        order = torch.argsort(packed, stable=True)
    else:
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
    s = seg[order]
    counts = torch.bincount(s, minlength=n_seg)
    rank = torch.arange(len(s), device=seg.device) - (torch.cumsum(counts, 0) - counts)[s]
    keep = rank < c
    keys = torch.full((n_seg, c), -torch.inf, device=key.device, dtype=key.dtype)
    entry = torch.full((n_seg, c), -1, dtype=torch.long, device=seg.device)
    keys[s[keep], rank[keep]] = key[order[keep]]
    entry[s[keep], rank[keep]] = order[keep]
    return keys, entry


def contenders(table_key: torch.Tensor, lat: torch.Tensor, key: torch.Tensor, c: int):
    """`segment_top` by latent of the entries that beat their latent's lowest key in the table
    (-inf while it has a free slot): once the table holds high values few do, so little is
    sorted. Returns the latents with a contender (ascending), their keys [n, c] and entry
    indices into `lat` / `key` (-1 where fewer); keys are >= 0 (activations of firing pairs, or
    the reservoir's uniform numbers)."""
    floor = table_key.min(dim=1).values
    hot = (key > floor[lat]).nonzero().squeeze(1)
    lat_hot = lat[hot]
    has = torch.zeros(len(table_key), dtype=torch.bool, device=lat.device)
    has[lat_hot] = True
    rows = has.nonzero().squeeze(1)
    local = (has.cumsum(0) - 1)[lat_hot]  # each contender's latent as an index into rows (no sort)
    keys, entry = segment_top(local, key[hot], len(rows), c, nonnegative=True)
    return rows, keys, torch.cat([hot, hot.new_full((1,), -1)])[entry]  # entry -1 (an empty slot) reads the -1


def per_token_top(tok: torch.Tensor, lat: torch.Tensor, val: torch.Tensor, n: int, m: int):
    """Each token's m strongest firing latents and their activations ([n, m]; -1 / 0 where fewer);
    `val` holds firing activations (> 0)."""
    keys, entry = segment_top(tok, val, n, m, nonnegative=True)
    return torch.where(entry >= 0, lat[entry.clamp_min(0)], -1).int(), torch.where(entry >= 0, keys, 0.0)



def merge_documents(table: Table, new: Table, k: int) -> Table:
    """Keep each latent's best k entries (by key) of the running table and the batch candidates,
    only the best entry of each document."""
    both = {f: torch.cat([table[f], new[f]], 1) for f in table}
    order = both["key"].argsort(dim=1, descending=True)
    both = {f: v.gather(1, order if v.dim() == 2 else order[..., None].expand_as(v)) for f, v in both.items()}
    doc = both["doc"]
    earlier = torch.ones(doc.shape[1], doc.shape[1], dtype=torch.bool, device=doc.device).tril(-1)
    dup = ((doc[:, :, None] == doc[:, None, :]) & earlier).any(2) & (doc >= 0)
    keys = torch.where(dup, -torch.inf, both["key"])
    both["key"] = keys
    _, sel = keys.topk(k, dim=1)
    out = {f: v.gather(1, sel if v.dim() == 2 else sel[..., None].expand(-1, -1, v.shape[2])) for f, v in both.items()}
    out["value"] = torch.where(out["key"] > -torch.inf, out["value"], 0.0)  # an empty slot holds nothing
    return out


def merge_tables(table: Table, other: Table) -> Table:
    """The table of two streams from the tables of each: every latent's n largest keys among
    both tables' slots (n = the width of `table`). Filled slots of a table are exactly the n
    largest keys of its stream, so this is the n largest of the union: the table one pass over
    both streams gives (up to the order of equal keys)."""
    n = table["key"].shape[1]
    both = {f: torch.cat([table[f], other[f]], 1) for f in table}
    _, sel = both["key"].topk(n, dim=1)
    return {f: v.gather(1, sel if v.dim() == 2 else sel[..., None].expand(-1, -1, v.shape[2])) for f, v in both.items()}
