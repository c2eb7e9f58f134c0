"""Train sparse autoencoders — several at once, from one pass over the activations.

An activation *source* is a callable `source(start_chunk)` yielding chunks
`{hook_name: float32 [N, d_in]}` in a fixed order from chunk `start_chunk` on; every run (one
SAE) reads its hook's array from each chunk, so any number of SAEs on any hooks train from one
pass of the LLM or of the cache. This module owns the stream: the held-out slice, the sample
each run estimates its scale and b_dec from, passes, checkpoints and pause/finalize requests;
`core.train.run` owns one SAE's steps.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from core.errors import Paused, UserError
from core.train.checkpoints import CheckpointConfig, resume, save_checkpoint
from core.train.config import RunSpec, TrainConfig, TrainResult
from core.train.run import RunState, check_cancel, report

Progress = Callable[[dict], None]
Source = Callable[[int], Iterable[dict[str, np.ndarray]]]


def train_sae(activations: Callable[[], Iterable[np.ndarray]], d_in: int, cfg: TrainConfig,
              progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None, *,
              holdout_tokens: int = 0, checkpoint: CheckpointConfig | None = None,
              requested: Callable[[], str] | None = None) -> TrainResult:
    """Train one SAE on `activations()` (a fresh iterator of float32 [N, d_in] chunks per call)."""

    source = replayable(lambda: ({"x": chunk} for chunk in activations()))
    results = train_saes(source, [RunSpec("sae", "x", d_in, cfg)], progress=progress, should_cancel=should_cancel,
                         holdout_tokens=holdout_tokens, checkpoint=checkpoint, requested=requested)
    return results["sae"]


def train_saes(source: Source, runs: Sequence[RunSpec], *, progress: Progress | None = None,
               should_cancel: Callable[[], bool] | None = None, holdout_tokens: int = 0,
               checkpoint: CheckpointConfig | None = None,
               requested: Callable[[], str] | None = None) -> dict[str, TrainResult]:
    """Train every SAE in `runs` from one stream of `source` chunks; results by run name.

    The first `holdout_tokens` tokens of every pass are never trained on; the final evaluation
    uses them. The next `sample_tokens` estimate each run's scale, outlier threshold and b_dec.
    `requested()` is asked at every chunk boundary: "pause" saves a checkpoint and raises
    Paused (resuming from it continues exactly); "finalize" ends training there and returns
    the SAEs as they are, evaluated like finished ones.

    One piece: the stream position, the checkpoint cadence and the pause/finalize requests are
    one state machine over the chunk loop; split, each part would need all of it.
    """
    if not runs:
        raise UserError("nothing to train: give at least one SAE")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"SAE names must be unique within a training run, got {names}")
    runs = [_resolved(r) for r in runs]
    hooks = list(dict.fromkeys(r.hook_name for r in runs))
    d_ins = {r.hook_name: r.d_in for r in runs}
    need = max(r.cfg.sample_tokens for r in runs)
    count_all = any(r.cfg.total_tokens is None for r in runs)
    held, samples, pass_tokens = _prelude(source, hooks, d_ins, holdout_tokens, need,
                                          count_all, should_cancel)
    scratch: dict = {}  # one set of step buffers for all runs: their steps take turns
    states = [RunState(r, samples[r.hook_name], pass_tokens.get(r.hook_name), scratch) for r in runs]
    cursor = _Cursor()
    if checkpoint is not None and checkpoint.resume:
        resume(checkpoint.folder, runs, holdout_tokens, states, cursor)
    t0 = time.perf_counter()
    report(progress, states, t0)
    last_ckpt = max(s.step for s in states)
    while not all(s.done for s in states):
        produced, whole_pass = 0, cursor.chunk == 0
        # Closed on every way out (done, pause, cancel, error) rather than when collected: a
        # prefetching source then stops its producer thread and releases its readers at once.
        with _closing(source(cursor.chunk)) as chunks:
            for chunk in chunks:
                check_cancel(should_cancel)
                for hook in hooks:
                    x = _as_tensor(chunk.get(hook), hook, d_ins[hook])
                    seen = cursor.seen.get(hook, 0)
                    cursor.seen[hook] = seen + len(x)
                    x = x[max(0, holdout_tokens - seen):]  # the held-out slice is never trained on
                    produced += len(x)
                    for s in states:
                        if s.spec.hook_name == hook and not s.done:
                            s.feed(x, progress, states, t0, should_cancel)
                cursor.chunk += 1
                busiest = max(s.step for s in states)
                if checkpoint is not None and checkpoint.every_steps > 0 and busiest - last_ckpt >= checkpoint.every_steps:
                    save_checkpoint(checkpoint, runs, holdout_tokens, states, cursor)
                    last_ckpt = busiest
                request = requested() if requested is not None else ""
                if request == "pause":
                    if checkpoint is None:
                        raise UserError("pausing needs a checkpoint folder to save to; cancel instead")
                    save_checkpoint(checkpoint, runs, holdout_tokens, states, cursor)
                    raise Paused(f"paused at step {busiest}; resume to continue from its checkpoint")
                if request == "finalize":
                    for s in states:
                        if not s.done:
                            s.finish(progress, states, t0, should_cancel)
                if all(s.done for s in states):
                    break
            else:  # the pass ended
                cursor.next_pass()
                for s in states:
                    # Runs counted in epochs stop after their last pass; an empty pass ends everything.
                    if (whole_pass and produced == 0) or (s.cfg.total_tokens is None and cursor.passes >= s.cfg.epochs):
                        s.finish(progress, states, t0, should_cancel)
    scratch.clear()  # the step buffers (up to 2 × 256 MiB) are spent: not held through the evaluation
    return {s.spec.name: s.result(held.get(s.spec.hook_name), progress, states, t0) for s in states}


def _resolved(r: RunSpec) -> RunSpec:
    """The run with its width set and its settings checked."""
    if r.output_hook and r.output_hook != r.hook_name:
        raise UserError(f"{r.name}: training to write another hook ({r.output_hook}) than the one read "
                        f"({r.hook_name}) needs a transcoder type, which miStudio does not have yet")
    return r._replace(cfg=r.cfg.resolved(r.d_in))


def replayable(make: Callable[[], Iterable[dict[str, np.ndarray]]]) -> Source:
    """A Source from a function that restarts the chunk stream: chunks before `start` are
    read and dropped (cheap for cached activations; a live model skips batches itself)."""
    def source(start: int) -> Iterator[dict[str, np.ndarray]]:
        for i, chunk in enumerate(make()):
            if i >= start:
                yield chunk
    return source


@contextlib.contextmanager
def _closing(chunks: Iterable[dict[str, np.ndarray]]) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """Iterate `chunks`, closing the iterator (a generator's finally blocks run) on the way out."""
    it = iter(chunks)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _as_tensor(a, hook: str, d_in: int) -> torch.Tensor:
    if a is None:
        raise UserError(f"the activation source yielded a chunk without {hook}; extract that hook first")
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != d_in:
        raise UserError(f"activation chunk for {hook} has shape {list(a.shape)}, expected [N, {d_in}]; "
                        "check d_in and the hook")
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: cached chunks are read-only views


def _prelude(source: Source, hooks: list[str], d_ins: dict[str, int], holdout: int, need: int, count_all: bool,
             should_cancel) -> tuple[dict, dict, dict]:
    """Per hook: the held-out tokens, the next `need` tokens (the sample), and (when
    `count_all`) the number of trainable tokens in one pass (all minus the held-out)."""
    held = {h: [] for h in hooks}
    sample = {h: [] for h in hooks}
    got_h, got_s, total = dict.fromkeys(hooks, 0), dict.fromkeys(hooks, 0), dict.fromkeys(hooks, 0)
    with _closing(source(0)) as chunks:
        for chunk in chunks:
            check_cancel(should_cancel)
            for h in hooks:
                x = _as_tensor(chunk.get(h), h, d_ins[h])
                total[h] += len(x)
                take = x[: max(0, holdout - got_h[h])]
                held[h].append(take)
                got_h[h] += len(take)
                rest = x[len(take):][: max(0, need - got_s[h])]
                sample[h].append(rest)
                got_s[h] += len(rest)
            if not count_all and all(got_s[h] >= need for h in hooks):
                break
    for h in hooks:
        if not got_s[h]:
            where = "after the held-out tokens " if holdout else ""
            raise UserError(f"the activation source yielded no tokens for {h} {where}to train on; "
                            "extract activations first (or lower the held-out slice)")
    trainable = {h: total[h] - got_h[h] for h in hooks} if count_all else {}
    return ({h: torch.cat(held[h]) for h in hooks if got_h[h]}, {h: torch.cat(sample[h]) for h in hooks}, trainable)


class _Cursor:
    """Where the stream is: the next chunk to read, and tokens seen per hook in this pass."""

    def __init__(self):
        self.chunk = self.passes = 0
        self.seen: dict[str, int] = {}

    def next_pass(self) -> None:
        self.chunk, self.seen = 0, {}
        self.passes += 1
