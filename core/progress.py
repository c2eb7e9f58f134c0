"""Progress and cancellation for long core work: the one rate meter and cancel check.

Every long core function takes `progress: Callable[[dict], None] | None` and
`should_cancel: Callable[[], bool] | None`. It reports dicts with `phase`, `done`, `total`,
`unit`, `samples_per_s` and `eta_s` (plus its own numbers) and checks for cancellation at
batch boundaries; a `Meter` does both so no module restates the arithmetic.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from core.errors import Cancelled

Progress = Callable[[dict], None]
CancelCheck = Callable[[], bool]


def check_cancel(should_cancel: CancelCheck | None, what: str) -> None:
    """Raise Cancelled("<what> cancelled") when the caller asked to stop."""
    if should_cancel is not None and should_cancel():
        raise Cancelled(f"{what} cancelled")


def rate(done: int, total: int | None, start: float) -> dict[str, Any]:
    """`samples_per_s` since `start` (a perf_counter time) and the `eta_s` it implies (None
    without a total or before any work)."""
    per_s = done / max(time.perf_counter() - start, 1e-9)
    eta = max(total - done, 0) / per_s if total and per_s > 0 else None
    return {"samples_per_s": per_s, "eta_s": eta}


class Meter:
    """Counts one phase's work and reports it: `add(n, **numbers)` after each batch."""

    def __init__(self, progress: Progress | None, phase: str, total: int | None = None, unit: str = "tokens",
                 should_cancel: CancelCheck | None = None, what: str | None = None):
        self.progress, self.phase, self.total, self.unit = progress, phase, total, unit
        self.should_cancel, self.what = should_cancel, what or phase
        self.done, self.start = 0, time.perf_counter()

    def check(self) -> None:
        """Raise Cancelled when the caller asked to stop."""
        check_cancel(self.should_cancel, self.what)

    def add(self, n: int, **numbers: Any) -> None:
        self.done += n
        self.report(**numbers)

    def report(self, **numbers: Any) -> None:
        if self.progress is not None:
            self.progress({"phase": self.phase, "done": self.done, "total": self.total, "unit": self.unit,
                           **rate(self.done, self.total, self.start), **numbers})
