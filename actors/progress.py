"""ProgressActor: live numbers for every job, polled by the dashboard and the CLI.

Workers report on a timer (about once a second, never per step) through `Reporter`, which
also learns about a request (cancel; for training, pause or finalize) from the reply, so a
request costs no extra round trip.
The full series is kept (thinned when long) so charts show the whole run, not a window.
"""

from __future__ import annotations

import time
from typing import Any

import ray


MAX_POINTS = 2000


@ray.remote(num_cpus=0)
class ProgressActor:
    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Any]] = {}
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._requests: dict[str, str] = {}

    def report(self, job_id: str, metrics: dict[str, Any]) -> str:
        """Record the newest numbers; returns what the job has been asked to do ("cancel",
        "pause", "finalize") or ""."""
        point = dict(metrics, t=time.time())
        self._latest[job_id] = point
        series = self._history.setdefault(job_id, [])
        series.append(point)
        if len(series) > MAX_POINTS:  # keep the first and every other point: the whole run stays visible
            self._history[job_id] = series[::2]
        return self._requests.get(job_id, "")

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self._latest.get(job_id)

    def get_many(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        return {j: self._latest[j] for j in job_ids if j in self._latest}

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return self._history.get(job_id, [])

    def request(self, job_id: str, what: str) -> None:
        """Ask a job to cancel, pause or finalize; a cancel is never replaced by anything else."""
        if self._requests.get(job_id) != "cancel":
            self._requests[job_id] = what

    def clear(self, job_id: str) -> None:
        """Forget a job's request (it is resuming)."""
        self._requests.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        self.request(job_id, "cancel")

    def is_cancelled(self, job_id: str) -> bool:
        return self._requests.get(job_id) == "cancel"


class Reporter:
    """Throttles a job's progress to one ProgressActor call per `interval` seconds.

    Fills in `eta_s` from done/total/samples_per_s and adds the job's `step` (pipeline stage).
    """

    def __init__(self, actor, job_id: str, step: str = "", interval: float = 1.0):
        self.actor, self.job_id, self.step, self.interval = actor, job_id, step, interval
        self._last = 0.0
        self._request = ""
        self._pending: dict[str, Any] | None = None
        self._stage: tuple = (None, None)

    def __call__(self, metrics: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        stage = (metrics.get("phase"), metrics.get("stage"))
        # A new stage is always sent: held back, a short stage's start would be overwritten and
        # the bar would show the previous stage until the next one's first report.
        if not force and now - self._last < self.interval and stage == self._stage:
            self._pending = metrics  # sent by flush() if nothing newer comes
            return
        self._last, self._pending, self._stage = now, None, stage
        m = dict(metrics, step=self.step)
        done, total, rate = m.get("done"), m.get("total"), m.get("samples_per_s")
        if m.get("eta_s") is None and done is not None and total and rate:
            m["eta_s"] = max(total - done, 0) / rate
        if total:
            m["fraction"] = min(done / total, 1.0) if done is not None else 0.0
        self._request = ray.get(self.actor.report.remote(self.job_id, m))

    def flush(self) -> None:
        """Send the newest numbers that the throttle held back (the end of a step)."""
        if self._pending is not None:
            self(self._pending, force=True)

    def should_cancel(self) -> bool:
        return self._request == "cancel"

    def requested(self) -> str:
        """The latest request seen in a reply: "cancel", "pause", "finalize" or ""."""
        return self._request
