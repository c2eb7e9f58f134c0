"""A training curve that stays bounded however long the run: at most `cap` rows.

Every log step yields one row of window means (loss, mse, fvu, l0 over the steps since the
previous row; dead_frac and lr as they are at that step). While fewer than `cap` rows are held
each is kept; once `cap` is passed, neighbouring rows are merged pairwise and every later row
covers twice as many log steps, so the curve stays evenly spaced over the whole run at
between cap/2 and cap rows. Merged rows are exact means over the steps (and, for mse, the
tokens) they cover, not samples.
"""

from __future__ import annotations

from typing import Any

HISTORY_ROWS = 1024
"""Rows a training history holds at most: enough for a smooth chart, and the registry's JSON
column stays small (a 200M-token run at batch 4096 and log_every 5 would otherwise keep ~10k)."""

_STEP_MEANS = ("loss", "fvu", "l0")  # window means over steps
_TOKEN_MEANS = ("mse",)  # window means over tokens
# Everything else (dead_frac, lr, step, tokens) is the value at the row's last step.


def merge(a: dict[str, Any], b: dict[str, Any], start: tuple[int, int]) -> dict[str, Any]:
    """One row covering `a`'s window then `b`'s; `start` = (step, tokens) before `a`'s window."""
    steps = (a["step"] - start[0], b["step"] - a["step"])
    tokens = (a["tokens"] - start[1], b["tokens"] - a["tokens"])
    out = dict(b)
    for keys, (wa, wb) in ((_STEP_MEANS, steps), (_TOKEN_MEANS, tokens)):
        for k in keys:
            if k in a and k in b:
                out[k] = (a[k] * wa + b[k] * wb) / max(wa + wb, 1)
    return out


class History:
    """Log-step rows, thinned by pairwise merging to at most `cap` (see the module doc)."""

    def __init__(self, cap: int | None = None):
        cap = cap if cap is not None else HISTORY_ROWS
        if cap < 2:
            raise ValueError("a history needs room for at least 2 rows")
        self.cap = cap
        self.rows: list[dict[str, Any]] = []
        self.stride = 1  # log steps per kept row
        self.pending: dict[str, Any] | None = None  # the row being filled, of `pending_n` log steps
        self.pending_n = 0
        self.last: dict[str, Any] | None = None  # the newest log step's own row (what progress shows)

    def add(self, row: dict[str, Any]) -> None:
        self.last = row
        self.pending = row if self.pending is None else merge(self.pending, row, self._end())
        self.pending_n += 1
        if self.pending_n >= self.stride:
            self._keep()

    def _end(self) -> tuple[int, int]:
        """(step, tokens) where the kept rows end."""
        return (self.rows[-1]["step"], self.rows[-1]["tokens"]) if self.rows else (0, 0)

    def _keep(self) -> None:
        self.rows.append(self.pending)
        self.pending, self.pending_n = None, 0
        if len(self.rows) >= self.cap:  # with the pending row, at most cap in all
            merged, start = [], (0, 0)
            for i in range(0, len(self.rows) - 1, 2):
                a, b = self.rows[i], self.rows[i + 1]
                merged.append(merge(a, b, start))
                start = (b["step"], b["tokens"])
            if len(self.rows) % 2:  # the odd last row starts the next pair
                self.pending, self.pending_n = self.rows[-1], self.stride
            self.rows, self.stride = merged, self.stride * 2

    def all(self) -> list[dict[str, Any]]:
        """The kept rows and the partly filled one: the curve up to the newest log step."""
        return self.rows + ([self.pending] if self.pending is not None else [])

    def __len__(self) -> int:
        return len(self.rows) + (self.pending is not None)

    # checkpoint state: plain types only (loadable with weights_only=True)
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "stride": self.stride, "pending": self.pending, "pending_n": self.pending_n,
                "last": self.last}

    def load_state_dict(self, d: dict[str, Any] | list) -> None:
        if isinstance(d, list):  # a checkpoint from before thinning: its rows, one per log step
            d = {"rows": d, "stride": 1, "pending": None, "pending_n": 0, "last": d[-1] if d else None}
        self.rows, self.stride = [dict(r) for r in d["rows"]], int(d["stride"])
        self.pending, self.pending_n, self.last = d["pending"], int(d["pending_n"]), d["last"]
