"""Exact row-wise selection for the sparse steps: each row's k largest entries (`row_topk`,
faster than torch's top-k on long CPU rows) and the merge of per-block picks (`_best`).

One home for the selection the TopK family shares: TopK's k per token, BatchTopK's candidates,
AuxK's dead-latent picks and `encode_topk`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


POSITIVE_ROWS = 0.99
"""`row_topk(positive=True)` reads the groups that this share of the rows needs."""

GROUPED_TOPK_MIN_COLUMNS = 8192
"""Rows at least this long take `row_topk`'s two passes; shorter ones (the small path, 4,608
latents) gained nothing measurable from them and keep torch's one."""


def row_topk(x: torch.Tensor, k: int, positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of a 2-D x and their columns, unsorted: what
    `x.topk(k, dim=1, sorted=False)` gives (up to which of equal entries), faster on the CPU
    for long rows. `positive`: only the positive ones of those k are wanted; a row may come
    with fewer, or other non-positive entries, or zeros at column 0 (padding), which the
    caller drops.

    The columns are dealt into g groups of c (column j to group j mod g) and each row's group
    maxima taken, a cheap vectorised pass; the row's top k then lie in the groups of its k
    largest maxima: those k maxima are k of the row's entries, so the k-th of them is at most
    the row's k-th largest entry v, and a group holding an entry ≥ v has a maximum ≥ v (equal
    to the k-th only in a tie with v, where either entry is a right answer). One top-k over
    the g maxima and one over the k·c entries of the chosen groups replace a top-k over the
    row. Measured on one CPU thread (bf16, 256 rows): 3-4× torch's top-k at 65,536 columns
    and k 32, 2-2.5× for AuxK's k 288 over 25,000 dead columns, ~2× at 16,384 columns;
    c ≈ √(n/k) at most 16 was about the best. CUDA's own top-k is left as it is.

    With `positive`, only the groups with a positive maximum can hold a wanted entry: when a
    row has m < k of them, its m best groups are enough. AuxK's truly dead latents are negative
    almost everywhere (m ≈ 5 of 2,340 groups at k 288): the second pass then reads a few dozen
    entries a row, not 2,000. m is taken for 99% of the rows (`POSITIVE_ROWS`): a few loud
    tokens (one in 4,096 with 455 positive dead latents where the median token had none) would
    otherwise set every row's m; they are done on their own, whole, their results padded
    with zeros to the others' width (bench/auxk.py, "truly dead").
    """
    n = x.shape[1]
    c = min(16, math.isqrt(n // max(k, 1)))
    if x.device.type != "cpu" or n < GROUPED_TOPK_MIN_COLUMNS or c < 4:
        return x.topk(k, dim=1, sorted=False)
    g = n // c
    maxima = x[:, :g * c].unflatten(1, (c, g)).amax(1)
    m = k
    if positive:
        counts = (maxima > 0).sum(1, dtype=torch.int32)
        m = max(1, min(k, int(counts.kthvalue(math.ceil(POSITIVE_ROWS * len(x))).values)))
        loud = (counts > m).nonzero().squeeze(1) if m < k else counts[:0]
        if len(loud):
            values, columns = _groups_topk(x, maxima, m, c, k)
            wide_v, wide_c = row_topk(x[loud], k)
            pad = k - values.shape[1]
            values, columns = F.pad(values, (0, pad)), F.pad(columns, (0, pad))
            values[loud], columns[loud] = wide_v, wide_c
            return values, columns
    return _groups_topk(x, maxima, m, c, k)


def _groups_topk(x: torch.Tensor, maxima: torch.Tensor, m: int, c: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`row_topk`'s second pass: the top k of the entries of each row's m largest groups."""
    n, g = x.shape[1], maxima.shape[1]
    groups = maxima.topk(m, dim=1, sorted=False).indices
    columns = (groups.unsqueeze(2) + g * torch.arange(c, device=x.device)).flatten(1)
    if g * c < n:  # the last n mod c columns, in no group: candidates themselves
        columns = torch.cat([columns, torch.arange(g * c, n, device=x.device).expand(len(x), -1)], 1)
    values = x.gather(1, columns)
    if values.shape[1] <= k:  # (positive) no more candidates than wanted: all of them
        return values, columns
    values, pick = values.topk(k, dim=1, sorted=False)
    return values, columns.gather(1, pick)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _best(values: list[torch.Tensor], index: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest of the [rows, ·] candidate blocks `values` and the matching `index`
    entries: the top k over several blocks of columns from each block's own top k."""
    v, i = (values[0], index[0]) if len(values) == 1 else (torch.cat(values, 1), torch.cat(index, 1))
    if v.shape[1] <= k:
        return v, i
    v, pick = v.topk(k, dim=1, sorted=False)
    return v, i.gather(1, pick)
