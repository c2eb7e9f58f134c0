"""What discovery writes: the file names, the columns of each table, the histogram's bin edges,
and the query a reader of the feature table asks (the store over Parquet and the registry over
its rows answer the same `FeatureQuery`).

Files of a features folder (written atomically, together):
* `features.parquet`: one row per latent — n_fired, frequency, max_act, mean_act, top_tokens,
  hist_counts (exact counts in the log-spaced bins of discovery.json), below_min_frequency.
* `examples.parquet`: per latent its top rows (kind "top", bin -1, by rank) then its quantile
  rows (kind "quantile", bin 0 = lowest decile ..., by activation), with windows and co-active
  latents, in row groups of about `row_group_latents` latents so a reader can filter by latent.
* `outliers.parquet`: the excluded tokens with their strongest latents.
* `discovery.json`: the config, token counts and the histogram's bin edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

FEATURES_FILE = "features.parquet"
EXAMPLES_FILE = "examples.parquet"
OUTLIERS_FILE = "outliers.parquet"
INFO_FILE = "discovery.json"

FEATURE_COLUMNS = ["latent", "n_fired", "frequency", "max_act", "mean_act", "top_tokens", "hist_counts",
                   "below_min_frequency"]
EXAMPLE_COLUMNS = ["latent", "kind", "bin", "rank", "activation", "row_id", "pos", "token_ids", "tokens", "acts",
                   "max_index", "coactive_latents", "coactive_acts"]
OUTLIER_COLUMNS = ["row_id", "pos", "token_id", "token", "norm", "latents", "acts"]
REGISTRY_COLUMNS = ["latent", "n_fired", "frequency", "max_act", "mean_act", "top_tokens"]
"""The feature columns the registry keeps a row of per latent (what lists and sorts need)."""
SORT_KEYS = ("frequency", "max_act", "mean_act", "n_fired", "latent")
"""What a feature listing may be sorted by: the statistics descending (ties by latent), or latent."""

TOP_TOKENS = 5  # max-token strings listed per feature
STRING_COLUMNS = ["kind", "tokens.list.element", "top_tokens.list.element"]
"""Columns written dictionary-encoded (repetitive strings); numbers are written plain, which is
faster and, for float activations, no larger."""
FEATURE_ROW_GROUP = 2048
"""Latents per row group of features.parquet: one latent's histogram (or any wide column) is read
from its row group alone, not decoded for every latent of a 65k-latent SAE."""
FILTER_COLUMNS = ["latent", "kind", "bin"]
"""Columns with row-group statistics: what readers filter on (by latent, then kind)."""
OUTLIER_LATENTS = 10  # strongest latents listed per outlier token
HIST_EDGES = np.round(10.0 ** np.arange(-3.0, 4.0 + 1e-9, 0.1), 10)
"""Activation histogram bin edges: 10 per decade from 1e-3 to 1e4, plus an underflow bin below
and an overflow bin above (len(HIST_EDGES) + 1 counts per latent)."""


@dataclass(frozen=True)
class FeatureQuery:
    """One page of a feature listing: which latents (filters), in what order, which slice."""

    order_by: str = "frequency"
    """One of SORT_KEYS: statistics sort descending with ties by latent; "latent" ascending."""
    offset: int = 0
    """Rows skipped after filtering and sorting (the page's start)."""
    limit: int | None = None
    """Rows returned at most (None: all that remain)."""
    min_frequency: float = 0.0
    """Latents firing on a smaller fraction of tokens are left out."""
    live_only: bool = False
    """Leave out latents that never fired."""
    min_max_act: float = 0.0
    """Leave out latents whose largest activation is below this."""
    latents: tuple[int, ...] | None = None
    """Only these latents (None: every latent)."""
    labels: str = "all"
    """all, labeled, unlabeled, or one label category (labels live in the registry, so only it
    answers anything but "all")."""
    search: str = ""
    """Case-insensitive text found in the label or a top token, or a latent number."""

    def check(self) -> None:
        from core.errors import UserError

        if self.order_by not in SORT_KEYS:
            raise UserError(f"cannot sort features by {self.order_by!r}; use one of {', '.join(SORT_KEYS)}")
        if self.offset < 0 or (self.limit is not None and self.limit < 0):
            raise UserError(f"offset={self.offset}, limit={self.limit}: both must be 0 or more")


class FeaturePage(NamedTuple):
    rows: list[dict[str, Any]]
    """The page's feature rows, in the query's order."""
    total: int
    """How many latents pass the filters (all pages together)."""


def matches(row: dict[str, Any], search: str) -> bool:
    """Whether a feature row answers a search: its latent number, or text in its label or one of
    its top tokens (case-insensitive). Older rows held top tokens as [token, count] pairs."""
    q = search.lower()
    if q.strip().isdigit() and int(q) == row["latent"]:
        return True
    return q in (row.get("label") or "").lower() or any(
        q in str(t[0] if isinstance(t, (list, tuple)) and t else t).lower() for t in row.get("top_tokens") or [])

