"""Train sparse autoencoders — several at once, from one pass over the activations.

The recipe follows Gao et al. 2024, Anthropic's April 2024 update, Rajamanoharan et al. 2024
and EleutherAI's sparsify, with the lessons recorded in DESIGN.md:

* tokens whose norm exceeds `outlier_norm_multiple` × the median norm are excluded and counted
  (on SmolLM2 ~0.02% of tokens carry most of the variance and would make FVU meaningless);
* activations are scaled so E‖x‖ = √d_in, and the scale is folded back into the returned SAE,
  which therefore maps raw activations to raw reconstructions;
* b_dec starts at the geometric median of a sample, W_dec rows are unit-norm with W_enc = W_dec.T;
* decoder rows stay unit-norm: the gradient component parallel to each row is removed before
  the step and rows are renormalised after it (we do this rather than SAELens's norm-weighted
  penalty, so feature activations are directly comparable across latents);
* dead latents are tracked by tokens since they last fired; AuxK revives them (TopK, BatchTopK);
* Adam with linear lr warmup and a final linear decay to 0, a linear sparsity-coefficient
  warmup (ReLU-L1, JumpReLU), gradient clipping, fp32 master weights (bf16 autocast for the
  encoder matmul only on CUDA).

The architectures' losses live in `core/sae/`; this module owns the data stream, the schedule,
bookkeeping, checkpoints and the final evaluation. An activation *source* is a callable
`source(start_chunk)` yielding chunks `{hook_name: float32 [N, d_in]}` in a fixed order from
chunk `start_chunk` on; every run (one SAE) reads its hook's array from each chunk, so any
number of SAEs on any hooks train from one pass of the LLM or of the cache.

Resume: a checkpoint is taken at a chunk boundary and holds each run's weights, optimizer,
shuffle buffer and generator state and the stream position, so a resumed run replays exactly
the batches an uninterrupted run would have seen and ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from core.errors import Cancelled, Paused, UserError
from core.io import atomic_file
from core.sae import SAE, TRAINING_ARCHITECTURES, StepContext, build_sae, check_k

Progress = Callable[[dict], None]
Source = Callable[[int], Iterable[dict[str, np.ndarray]]]


@dataclass
class TrainConfig:
    """How to train one SAE. Defaults follow Gao et al. 2024 and sparsify (TopK)."""

    architecture: str = "topk"
    """"topk" (TopK + AuxK), "batchtopk" (saved as jumprelu), "jumprelu", or "standard" (ReLU + L1)."""
    expansion_factor: int = 8
    """d_sae = expansion_factor × d_in."""
    k: int = 32
    """Latents kept per token (topk) or per token on average (batchtopk); for standard and
    jumprelu, the L0 the encoder bias is initialised for (the penalty sets the final L0)."""
    lr: float | None = None
    """Adam learning rate; None → 2e-4 / √(d_sae / 2^14), sparsify's width-scaled default."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    total_tokens: int | None = None
    """Training budget in tokens, cycling the data as often as needed. None → `epochs` passes,
    which costs one extra read of the activations to count them."""
    epochs: int = 1
    """Passes over the data when `total_tokens` is None."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.; topk and batchtopk)."""
    l1_coefficient: float = 5.0
    """λ of the L1 penalty (standard), in units where E‖x‖ = √d_in (Anthropic's λ ≈ 5)."""
    l0_coefficient: float = 1.0
    """λ of the L0 penalty (jumprelu), in the same units."""
    sparsity_warmup_frac: float = 0.05
    """Fraction of steps over which the L1/L0 coefficient rises linearly from 0."""
    jumprelu_bandwidth: float = 0.05
    """Width ε of the straight-through estimator's kernel (jumprelu), in scaled units."""
    jumprelu_init_threshold: float = 0.01
    """Initial JumpReLU threshold, in scaled units."""
    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens is dead and gets AuxK gradient.
    None → 10M as in Gao et al., capped at a quarter of the run (at least one batch) so that
    short runs on small corpora still revive latents."""
    lr_warmup_frac: float = 0.05
    """Fraction of steps over which lr rises linearly from 0."""
    lr_decay_frac: float = 0.2
    """Final fraction of steps over which lr decays linearly to 0."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    log_every: int = 5
    """Steps between history entries and progress calls."""
    seed: int = 0
    """Seeds the initialisation and the shuffle."""
    outlier_norm_multiple: float | None = 10.0
    """Tokens with ‖x‖ > this × the median norm are excluded from training and evaluation (and
    counted); None disables. Non-finite tokens are always excluded."""
    sample_tokens: int = 16384
    """Tokens read first to estimate the median norm, the scale and b_dec."""
    shuffle_batches: int = 4
    """Tokens are shuffled within windows of this many batches (activation caches are in
    document order, and consecutive tokens are correlated)."""
    device: str = "cpu"
    """torch device to train on ("cpu", "cuda", "cuda:1")."""

    def __post_init__(self):
        if self.architecture not in TRAINING_ARCHITECTURES:
            raise UserError(f"unknown SAE architecture '{self.architecture}'; "
                            f"pick one of {', '.join(TRAINING_ARCHITECTURES)}")

    def validate(self, d_in: int) -> None:
        """One-line errors for settings that cannot train on d_in-wide activations."""
        if self.expansion_factor < 1:
            raise UserError(f"expansion factor {self.expansion_factor} must be at least 1")
        if self.architecture in ("topk", "batchtopk"):
            check_k(self.k, self.expansion_factor * d_in)
        if self.batch_size < 2:
            raise UserError(f"batch_size={self.batch_size} is too small; use at least 2 (FVU needs a batch mean)")


class RunSpec(NamedTuple):
    """One SAE of a multi-SAE training run."""

    name: str
    """Unique within the run (e.g. "blocks.6.hook_resid_post/topk-k32")."""
    hook_name: str
    """Which array of each source chunk this SAE reads."""
    d_in: int
    cfg: TrainConfig


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


class TrainResult(NamedTuple):
    sae: SAE
    """Trained SAE on CPU in inference form (BatchTopK → JumpReLU), scale folded in: it maps raw
    activations to raw reconstructions."""
    history: list[dict]
    """One entry per log step: step, tokens, loss, mse, fvu, l0, dead_frac, lr (window means)."""
    final: dict
    """Evaluation of the returned SAE in raw units on the held-out tokens (or, without a
    held-out slice, on the training sample; `eval_split` says which): mse, fvu, l0, plus
    dead_frac (from training), tokens (trained), excluded_outliers, outlier_frac,
    median_norm, outlier_norm_threshold, eval_tokens."""
    scale: float
    """Factor the raw activations were multiplied by during training (E‖scale·x‖ = √d_in)."""


class _Stats(NamedTuple):
    median_norm: float
    threshold: float  # raw norm above which a token is an outlier (inf when disabled)
    scale: float
    sample: torch.Tensor  # raw, outliers removed, float32 on CPU


# --------------------------------------------------------------------------- public API


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
    """
    if not runs:
        raise UserError("nothing to train: give at least one SAE")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"SAE names must be unique within a training run, got {names}")
    for r in runs:
        r.cfg.validate(r.d_in)
    hooks = list(dict.fromkeys(r.hook_name for r in runs))
    d_ins = {r.hook_name: r.d_in for r in runs}
    need = max(r.cfg.sample_tokens for r in runs)
    count_all = any(r.cfg.total_tokens is None for r in runs)
    held, samples, pass_tokens = _prelude(source, hooks, d_ins, holdout_tokens, need,
                                          count_all, should_cancel)
    scratch: dict = {}  # one set of step buffers for all runs: their steps take turns
    states = [_RunState(r, samples[r.hook_name], pass_tokens.get(r.hook_name), scratch) for r in runs]
    cursor = _Cursor()
    if checkpoint is not None and checkpoint.resume:
        _resume(checkpoint.folder, runs, holdout_tokens, states, cursor)
    t0 = time.perf_counter()
    _report(progress, states, t0)
    last_ckpt = max(s.step for s in states)
    while not all(s.done for s in states):
        produced, whole_pass = 0, cursor.chunk == 0
        for chunk in source(cursor.chunk):
            _check_cancel(should_cancel)
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
                _save_checkpoint(checkpoint, runs, holdout_tokens, states, cursor)
                last_ckpt = busiest
            request = requested() if requested is not None else ""
            if request == "pause":
                if checkpoint is None:
                    raise UserError("pausing needs a checkpoint folder to save to; cancel instead")
                _save_checkpoint(checkpoint, runs, holdout_tokens, states, cursor)
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
    return {s.spec.name: s.result(held.get(s.spec.hook_name), progress, states, t0) for s in states}


# --------------------------------------------------------------------------- data


def replayable(make: Callable[[], Iterable[dict[str, np.ndarray]]]) -> Source:
    """A Source from a function that restarts the chunk stream: chunks before `start` are
    read and dropped (cheap for cached activations; a live model skips batches itself)."""
    def source(start: int) -> Iterator[dict[str, np.ndarray]]:
        for i, chunk in enumerate(make()):
            if i >= start:
                yield chunk
    return source


def _check_cancel(should_cancel) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled("training cancelled")


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
    for chunk in source(0):
        _check_cancel(should_cancel)
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


def _geometric_median(x: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """Weiszfeld iterations from the mean: robust to the heavy tail of residual streams."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-6)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def _init_sparse_bias(sae: SAE, x: torch.Tensor, l0: int) -> None:
    """Set b_enc so each latent fires on about l0/d_sae of the sample at the start.

    With W_enc = W_dec.T and b_enc = 0, half of a ReLU or JumpReLU SAE's latents fire on every
    token (L0 ≈ d_sae/2), and the L1/L0 penalty takes many thousands of steps to undo that —
    more than a CPU run has (measured on SmolLM2: L0 ≈ 2,000 and FVU > 1 after 57 steps). Starting
    near the target sparsity lets the penalty tune rather than rescue.
    """
    pre = (x[:4096] - sae.b_dec) @ sae.W_enc
    n = len(pre)
    q = pre.kthvalue(min(n, max(1, round(n * (1 - min(1.0, l0 / sae.d_sae))))), dim=0).values
    floor = sae.threshold.detach() if hasattr(sae, "threshold") else 0.0
    sae.b_enc.copy_(floor - q)


def _stats(sample: torch.Tensor, d_in: int, multiple: float | None) -> _Stats:
    norms = sample.norm(dim=1)
    finite = torch.isfinite(norms)
    if not bool(finite.any()):
        raise UserError("every activation in the first sample is NaN or inf; re-extract activations")
    median = float(norms[finite].median())
    threshold = median * multiple if multiple else math.inf
    keep = finite & (norms <= threshold)
    kept = sample[keep]
    mean_norm = float(norms[keep].mean())
    if mean_norm <= 0:
        raise UserError("activations in the first sample are all zero; check the hook name and layer")
    return _Stats(median, threshold, math.sqrt(d_in) / mean_norm, kept)


class _Cursor:
    """Where the stream is: the next chunk to read, and tokens seen per hook in this pass."""

    def __init__(self):
        self.chunk = self.passes = 0
        self.seen: dict[str, int] = {}

    def next_pass(self) -> None:
        self.chunk, self.seen = 0, {}
        self.passes += 1


# --------------------------------------------------------------------------- one SAE


class _RunState:
    """One SAE being trained: model, optimizer, shuffle buffer, schedule and bookkeeping."""

    def __init__(self, spec: RunSpec, sample: torch.Tensor, pass_tokens: int | None, scratch: dict):
        cfg = self.cfg = spec.cfg
        self.spec, self.scratch = spec, scratch
        self.device = torch.device(cfg.device)
        self.amp = self.device.type == "cuda"
        self.stats = _stats(sample, spec.d_in, cfg.outlier_norm_multiple)
        self.budget = cfg.total_tokens if cfg.total_tokens is not None else pass_tokens * cfg.epochs
        self.total_steps = max(1, math.ceil(self.budget / cfg.batch_size))
        self.dead_tokens = cfg.dead_tokens or min(10_000_000, max(cfg.batch_size, self.budget // 4))
        d_sae = cfg.expansion_factor * spec.d_in
        kwargs = ({"init_threshold": cfg.jumprelu_init_threshold, "bandwidth": cfg.jumprelu_bandwidth}
                  if cfg.architecture == "jumprelu" else {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.sae = build_sae(cfg.architecture, spec.d_in, d_sae, cfg.k, **kwargs)
        with torch.no_grad():
            x = self.stats.sample * self.stats.scale
            self.sae.b_dec.copy_(_geometric_median(x))
            if cfg.architecture in ("standard", "jumprelu"):
                _init_sparse_bias(self.sae, x, cfg.k)
        self.sae.to(self.device)
        self.params = list(self.sae.parameters())
        self.base_lr = cfg.lr if cfg.lr is not None else default_lr(d_sae)
        # fused: 6× faster step on CPU
        self.opt = torch.optim.Adam(self.params, lr=self.base_lr, betas=(0.9, 0.999), fused=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.parts: list[torch.Tensor] = []  # tokens waiting to be shuffled into batches
        self.buffered = 0
        self.excluded = self.step = self.tokens = 0
        self.final: dict | None = None  # set by result(); shown in progress
        self.finished = False  # the data ran out before the budget (epochs counted with outliers)
        self.lr = 0.0
        self.history: list[dict] = []
        self.window = dict.fromkeys(_WINDOW_KEYS, 0.0)

    @property
    def done(self) -> bool:
        return self.finished or self.tokens >= self.budget

    # ---- data: outlier filter + shuffle buffer

    def feed(self, x: torch.Tensor, progress, states, t0, should_cancel) -> None:
        norms = x.norm(dim=1)
        keep = norms <= self.stats.threshold  # NaN norms compare False: non-finite tokens are dropped too
        self.excluded += int((~keep).sum())
        self.parts.append(x if bool(keep.all()) else x[keep])
        self.buffered += len(self.parts[-1])
        if self.buffered >= self.cfg.batch_size * max(1, self.cfg.shuffle_batches):
            self._flush(False, progress, states, t0, should_cancel)

    def buffer(self) -> torch.Tensor:
        """The waiting tokens as one tensor (joined once, at a flush or a checkpoint)."""
        if len(self.parts) != 1:
            self.parts = [torch.cat(self.parts) if self.parts else torch.zeros(0, self.spec.d_in)]
        return self.parts[0]

    def finish(self, progress, states, t0, should_cancel) -> None:
        """The data ran out: train on what is buffered (the last batch may be short), then stop."""
        if self.buffered and not self.done:
            self._flush(True, progress, states, t0, should_cancel)
        self.finished = True

    def _flush(self, final: bool, progress, states, t0, should_cancel) -> None:
        buf = self.buffer()
        x = buf[torch.randperm(len(buf), generator=self.gen)]
        bs = self.cfg.batch_size
        stop = len(x) if final else len(x) // bs * bs
        self.parts, self.buffered = [x[stop:]], len(x) - stop
        for i in range(0, stop, bs):
            b = x[i: min(i + bs, stop, i + self.budget - self.tokens)]
            if len(b) == 0 or self.done:
                break
            _check_cancel(should_cancel)
            self._step(b)
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self._log()
                _report(progress, states, t0)

    # ---- one optimizer step

    def _step(self, xb: torch.Tensor) -> None:
        cfg, sae = self.cfg, self.sae
        self.lr = self.base_lr * _lr_factor(self.step, self.total_steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        coeff = {"standard": cfg.l1_coefficient, "jumprelu": cfg.l0_coefficient}.get(cfg.architecture, 0.0)
        warm = max(1.0, cfg.sparsity_warmup_frac * self.total_steps)
        x = xb.to(self.device, non_blocking=True) * self.stats.scale
        ctx = StepContext(self.since_fired >= self.dead_tokens, coeff * min(1.0, (self.step + 1) / warm),
                          cfg.auxk_alpha, self.amp, self.scratch)
        out = sae.training_step(x, ctx)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        _project_decoder_grad(sae.W_dec)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        sae.after_step()
        self.since_fired += len(x)
        self.since_fired[out.fired] = 0
        self.step += 1
        self.tokens += len(x)
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise UserError(f"training diverged (loss is {loss}) at step {self.step} of {self.spec.name}; "
                            "lower --lr or check the activations")
        w = self.window
        for key, value in (("loss", loss), ("fvu", out.fvu), ("sq_err", out.sq_err), ("l0", out.l0)):
            w[key] += float(value)
        w["steps"] += 1
        w["tokens"] += len(x)

    def _log(self) -> None:
        w, n = self.window, max(self.window["steps"], 1)
        self.history.append({
            "step": self.step,
            "tokens": self.tokens,
            "loss": w["loss"] / n,
            # per-element MSE in raw activation units, so it is comparable with `final`
            "mse": w["sq_err"] / (max(w["tokens"], 1) * self.spec.d_in) / self.stats.scale ** 2,
            "fvu": w["fvu"] / n,
            "l0": w["l0"] / n,
            "dead_frac": self.dead_frac,
            "lr": self.lr,
        })
        self.window = dict.fromkeys(_WINDOW_KEYS, 0.0)

    @property
    def dead_frac(self) -> float:
        return float((self.since_fired >= self.dead_tokens).float().mean())

    def result(self, held: torch.Tensor | None, progress, states, t0) -> TrainResult:
        if self.tokens == 0:
            raise UserError(f"{self.spec.name}: every token was excluded as an outlier or non-finite; "
                            "raise --outlier-norm-multiple or check the activations")
        if self.window["steps"]:
            self._log()
        folded = self.sae.folded(self.stats.scale)
        split, eval_x = "training sample", self.stats.sample
        if held is not None and len(held):
            norms = held.norm(dim=1)
            split, eval_x = "held-out", held[norms <= self.stats.threshold]
        final = evaluate(folded, eval_x, self.cfg.batch_size) | {
            "dead_frac": self.dead_frac,
            "tokens": self.tokens,
            "excluded_outliers": self.excluded,
            "outlier_frac": self.excluded / max(self.tokens + self.excluded, 1),
            "median_norm": self.stats.median_norm,
            "outlier_norm_threshold": self.stats.threshold,
            "eval_tokens": len(eval_x),
            "eval_split": split,
        }
        self.final = final
        _report(progress, states, t0)
        return TrainResult(folded, self.history, final, self.stats.scale)

    # ---- checkpoint state (plain types and tensors only: loadable with weights_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                "since_fired": self.since_fired.cpu(), "buf": self.buffer(), "excluded": self.excluded,
                "step": self.step, "tokens": self.tokens, "lr": self.lr, "history": self.history,
                "window": self.window, "finished": self.finished}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.sae.load_state_dict(d["sae"])
        self.opt.load_state_dict(d["opt"])
        self.gen.set_state(d["gen"])
        self.since_fired.copy_(d["since_fired"])
        self.parts, self.buffered = [d["buf"]], len(d["buf"])
        self.excluded, self.step, self.tokens, self.lr = d["excluded"], d["step"], d["tokens"], d["lr"]
        self.history, self.window, self.finished = list(d["history"]), dict(d["window"]), d["finished"]


_WINDOW_KEYS = ("loss", "fvu", "sq_err", "l0", "steps", "tokens")


@torch.no_grad()
def _project_decoder_grad(W_dec: torch.nn.Parameter) -> None:
    """Remove the gradient component parallel to each (unit-norm) decoder row."""
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec


def _lr_factor(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warmup from 0, constant, then linear decay to 0 over the final fraction."""
    warm = max(1, round(total_steps * warmup_frac))
    if step < warm:
        return (step + 1) / warm
    decay_len = round(total_steps * decay_frac)
    if decay_len and step >= total_steps - decay_len:
        return max(0.0, (total_steps - step) / decay_len)
    return 1.0


def default_lr(d_sae: int) -> float:
    """sparsify's width-scaled default: 2e-4 at 16k latents, ∝ 1/√d_sae."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


# --------------------------------------------------------------------------- checkpoints


def _fingerprint(runs: Sequence[RunSpec], holdout: int) -> list:
    """What must match for a checkpoint to resume this run."""
    return [holdout] + [[r.name, r.hook_name, r.d_in, dataclasses.asdict(r.cfg)] for r in runs]


def _save_checkpoint(ck: CheckpointConfig, runs, holdout: int, states, cursor: _Cursor) -> None:
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


def _resume(folder, runs, holdout: int, states, cursor: _Cursor) -> None:
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


# --------------------------------------------------------------------------- eval + progress


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """MSE (per element), FVU = Σ‖x−x̂‖²/Σ‖x−x̄‖², and mean L0 over all of `x`."""
    mean = x.double().mean(0)
    sq_err = total_var = l0 = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size]
        x_hat, z = sae(xb)
        sq_err += float((x_hat - xb).double().pow(2).sum())
        total_var += float((xb.double() - mean).pow(2).sum())
        l0 += float((z > 0).sum())
    n = max(len(x), 1)
    return {"mse": sq_err / (n * x.shape[1]), "fvu": sq_err / max(total_var, 1e-12), "l0": l0 / n}


_METRICS = ("loss", "mse", "fvu", "l0", "dead_frac", "lr")


def _report(progress, states: Sequence[_RunState], t0: float) -> None:
    """One progress dict for all runs: token totals, the first run's metrics at top level (what
    a single-SAE chart reads) and every run's under `runs`."""
    if progress is None:
        return
    done = sum(s.tokens for s in states)
    total = sum(s.budget for s in states)
    elapsed = time.perf_counter() - t0
    rate = done / elapsed if elapsed > 0 and done else 0.0
    d: dict[str, Any] = {"phase": "train", "done": done, "total": total, "unit": "tokens", "samples_per_s": rate,
                         "eta_s": (total - done) / rate if rate else None, "step": states[0].step}
    per_run = {}
    for s in states:
        m = {k: s.history[-1][k] for k in _METRICS} if s.history else {}
        if s.final is not None:
            m |= {k: s.final[k] for k in ("mse", "fvu", "l0", "dead_frac")}
        per_run[s.spec.name] = m | {"step": s.step, "tokens": s.tokens}
    d |= {k: v for k, v in per_run[states[0].spec.name].items() if k in _METRICS}
    if len(states) > 1:
        d["runs"] = per_run
    progress(d)
