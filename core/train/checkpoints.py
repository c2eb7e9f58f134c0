"""Checkpoints of a training run, taken at chunk boundaries.

A checkpoint holds each run's weights, optimizer, shuffle buffer and generator state and the
stream position, so a resumed run replays exactly the batches an uninterrupted run would have
seen and ends with the same weights. Only plain types and tensors are saved: checkpoints load
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from core.errors import UserError
from core.io import atomic_file
from core.train.config import RunSpec


class CheckpointConfig(NamedTuple):
    folder: Path
    """Where `ckpt-<chunk>.pt` files go."""
    every_steps: int
    """Take a checkpoint at the first chunk boundary after this many steps of the busiest run."""
    keep: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = True
    """Continue from the newest checkpoint in `folder` when one exists."""
    on_save: Callable[[Path], None] | None = None
    """Called with `folder` after each checkpoint is written and old ones pruned (the worker
    publishes it to the artifact store)."""


def _fingerprint(runs: Sequence[RunSpec], holdout: int) -> list:
    """What must match for a checkpoint to resume this run."""
    return [holdout] + [[r.name, r.hook_name, r.d_in, dataclasses.asdict(r.cfg)] for r in runs]


def save_checkpoint(ck: CheckpointConfig, runs, holdout: int, states, cursor) -> None:
    state = {"fingerprint": _fingerprint(runs, holdout), "chunk": cursor.chunk, "seen": dict(cursor.seen),
             "passes": cursor.passes, "runs": [s.state_dict() for s in states]}
    path = Path(ck.folder) / f"ckpt-{sum(s.step for s in states):010d}.pt"
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    for old in checkpoints(ck.folder)[:-max(1, ck.keep)]:
        old.unlink(missing_ok=True)
    if ck.on_save is not None:
        ck.on_save(Path(ck.folder))


def checkpoints(folder) -> list[Path]:
    """Checkpoint files in `folder`, oldest first."""
    return sorted(Path(folder).glob("ckpt-*.pt"))


def resume(folder, runs, holdout: int, states, cursor) -> None:
    found = checkpoints(folder) if Path(folder).is_dir() else []
    if not found:
        return
    try:
        state = torch.load(found[-1], map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        first = (str(e).splitlines() or [""])[0]
        raise UserError(f"checkpoint {found[-1]} cannot be read ({type(e).__name__}: {first}); "
                        "delete it to resume from the one before") from None
    if state.get("fingerprint") != _fingerprint(runs, holdout):
        raise UserError(f"checkpoint {found[-1]} was written by a run with other settings; "
                        "resume with the same config or point --checkpoint-dir elsewhere")
    cursor.chunk, cursor.seen, cursor.passes = state["chunk"], dict(state["seen"]), state["passes"]
    for s, d in zip(states, state["runs"]):
        s.load_state_dict(d)
