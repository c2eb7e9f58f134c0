"""One SAE being trained: its model, optimizer, shuffle buffer, schedule and bookkeeping.

The type's loss lives in `core/sae/`; this module owns what every type shares: the outlier
filter and activation scale, the optimizer (core.train.optim: Adam with linear lr warm-up and a
final linear decay to 0, or schedule-free sign-SGD at a constant rate), the
sparsity-coefficient warmup (for types with a penalty), decoder rows kept unit-norm (the
gradient component parallel to each row is removed before the step, rows renormalised after
it, rather than SAELens's norm-weighted penalty, so feature activations are comparable across
latents), dead latents tracked by tokens since they last fired, gradient clipping, and the
final evaluation of the returned SAE in raw units.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch

from core.progress import check_cancel as _check_cancel, rate
from core.errors import UserError
from core.sae import StepContext, registry
from core.sae.base import chunk_rows
from core.evals.reconstruction import evaluate
from core.train import optim
from core.train.config import RunSpec, TrainResult, default_dead_tokens, prefer_bf16
from core.train.history import History
from core.train.optim import default_lr


class Stats(NamedTuple):
    median_norm: float
    threshold: float  # raw norm above which a token is an outlier (inf when disabled)
    scale: float
    sample: torch.Tensor  # raw, outliers removed, float32 on CPU



class RunState:
    """One SAE being trained: model, optimizer, shuffle buffer, schedule and bookkeeping."""

    def __init__(self, spec: RunSpec, sample: torch.Tensor, pass_tokens: int | None, scratch: dict):
        cfg = self.cfg = spec.cfg
        self.spec, self.scratch = spec, scratch
        self.device = torch.device(cfg.device)
        self.amp = cfg.autocast if cfg.autocast is not None else prefer_bf16(self.device)
        self.stats = stats(sample, spec.d_in, cfg.outlier_norm_multiple)
        self.budget = cfg.total_tokens if cfg.total_tokens is not None else pass_tokens * cfg.epochs
        self.total_steps = max(1, math.ceil(self.budget / cfg.batch_size))
        d_sae = cfg.width(spec.d_in)
        self.d_sae = d_sae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.sae = registry.build(cfg.sae, spec.d_in, d_sae)
        with torch.no_grad():
            self.sae.W_enc.mul_(optim.RECIPES[cfg.optimizer].encoder_init)
        self.sae.initialise(self.stats.sample * self.stats.scale)
        self.sae.to(self.device)
        self.params = list(self.sae.parameters())
        self.base_lr = cfg.lr if cfg.lr is not None else default_lr(d_sae, cfg.optimizer)
        self.opt = optim.make_optimizer(cfg.optimizer, self.params, self.base_lr)
        self.scheduled = optim.scheduled(cfg.optimizer)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.parts: list[torch.Tensor] = []  # tokens waiting to be shuffled into batches
        self.buffered = 0
        self.excluded = self.step = self.tokens = 0
        self.final: dict | None = None  # set by result(); shown in progress
        self.finished = False  # the data ran out before the budget (epochs counted with outliers)
        self.lr = 0.0
        self.history = History()  # bounded: merged pairwise past HISTORY_ROWS rows
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
            check_cancel(should_cancel)
            self._step(b)
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self._log()
                report(progress, states, t0)

    # ---- one optimizer step

    def _step(self, xb: torch.Tensor) -> None:
        cfg, sae = self.cfg, self.sae
        self.lr = self.base_lr
        if self.scheduled:
            self.lr *= lr_factor(self.step, self.total_steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
            for group in self.opt.param_groups:
                group["lr"] = self.lr
        warm = max(1.0, cfg.sparsity_warmup_frac * self.total_steps)
        x = xb.to(self.device, non_blocking=True) * self.stats.scale
        ctx = StepContext(self.since_fired >= self.dead_tokens,
                          cfg.sae.sparsity_coefficient() * min(1.0, (self.step + 1) / warm), self.amp, self.scratch)
        out = sae.training_step(x, ctx)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        _project_decoder_grad(sae.W_dec)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        sae.after_step()
        self.since_fired += len(x)
        self.since_fired.masked_fill_(out.fired, 0)  # (indexing with the mask would sync a GPU)
        self.step += 1
        self.tokens += len(x)
        # Summed where they are: reading a number back every step would stall a GPU on each one;
        # they are read (and the loss checked) once per log line and at a checkpoint.
        w = self.window
        for key, value in (("loss", out.loss), ("fvu", out.fvu), ("sq_err", out.sq_err), ("l0", out.l0)):
            w[key] = w[key] + value.detach().double()
        w["steps"] += 1
        w["tokens"] += len(x)

    def _read_window(self) -> dict[str, float]:
        """The window's sums as numbers; UserError if the loss stopped being finite in it."""
        w = {k: float(v) for k, v in self.window.items()}
        if not math.isfinite(w["loss"]):
            raise UserError(f"training diverged (loss is {w['loss'] / max(w['steps'], 1)}) by step {self.step} of "
                            f"{self.spec.name}; lower --lr or check the activations")
        return w

    def _log(self) -> None:
        w = self._read_window()
        n = max(w["steps"], 1)
        self.history.add({
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
    def dead_tokens(self) -> int:
        """The dead window now: the config's, or the default for the tokens trained so far."""
        return self.cfg.dead_tokens or default_dead_tokens(self.d_sae, self.cfg.optimizer, self.tokens)

    @property
    def dead_frac(self) -> float:
        return float((self.since_fired >= self.dead_tokens).float().mean())

    def result(self, held: torch.Tensor | None, progress, states, t0) -> TrainResult:
        if self.tokens == 0:
            raise UserError(f"{self.spec.name}: every token was excluded as an outlier or non-finite; "
                            "raise --outlier-norm-multiple or check the activations")
        if self.window["steps"]:
            self._log()
        self.opt.zero_grad(set_to_none=True)  # room for the folded copy: the gradients are spent
        with optim.averaged(self.opt):  # a schedule-free run's result is its running average
            self.sae.calibrate(self.stats.sample * self.stats.scale, self.cfg.batch_size)
            folded = self.sae.folded(self.stats.scale)
        split, eval_x = "training sample", self.stats.sample
        if held is not None and len(held):
            norms = held.norm(dim=1)
            split, eval_x = "held-out", held[norms <= self.stats.threshold]
        # Evaluated in blocks no larger than the step's, so the dense encode stays within them.
        final = evaluate(folded, eval_x, chunk_rows(self.cfg.batch_size, folded.d_sae)) | {
            "dead_frac": self.dead_frac,
            "dead_tokens": self.dead_tokens,
            "autocast": self.amp,
            "tokens": self.tokens,
            "excluded_outliers": self.excluded,
            "outlier_frac": self.excluded / max(self.tokens + self.excluded, 1),
            "median_norm": self.stats.median_norm,
            "outlier_norm_threshold": self.stats.threshold,
            "eval_tokens": len(eval_x),
            "eval_split": split,
        }
        self.final = final
        report(progress, states, t0)
        return TrainResult(folded, self.history.all(), final, self.stats.scale)

    # ---- checkpoint state (plain types and tensors only: loadable with weights_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                "since_fired": self.since_fired.cpu(), "buf": self.buffer(), "excluded": self.excluded,
                "step": self.step, "tokens": self.tokens, "lr": self.lr, "history": self.history.state_dict(),
                "window": self._read_window(), "finished": self.finished}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.sae.load_state_dict(d["sae"])
        self.opt.load_state_dict(d["opt"])
        self.gen.set_state(d["gen"])
        self.since_fired.copy_(d["since_fired"])
        self.parts, self.buffered = [d["buf"]], len(d["buf"])
        self.excluded, self.step, self.tokens, self.lr = d["excluded"], d["step"], d["tokens"], d["lr"]
        self.history.load_state_dict(d["history"])
        self.window, self.finished = dict(d["window"]), d["finished"]


_WINDOW_KEYS = ("loss", "fvu", "sq_err", "l0", "steps", "tokens")


@torch.no_grad()
def _project_decoder_grad(W_dec: torch.nn.Parameter) -> None:
    """Remove the gradient component parallel to each (unit-norm) decoder row.

    In place, the rows' dot products as one einsum (a batched product): the two [d_sae × d]
    temporaries of `g -= (g * W).sum(1) * W` took 188 ms at 65,536 latents, this 49 ms."""
    g = W_dec.grad
    if g is not None:
        g.addcmul_(torch.einsum("ij,ij->i", g, W_dec).unsqueeze(1), W_dec, value=-1)


def lr_factor(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warmup from 0, constant, then linear decay to 0 over the final fraction."""
    warm = max(1, round(total_steps * warmup_frac))
    if step < warm:
        return (step + 1) / warm
    decay_len = round(total_steps * decay_frac)
    if decay_len and step >= total_steps - decay_len:
        return max(0.0, (total_steps - step) / decay_len)
    return 1.0




def stats(sample: torch.Tensor, d_in: int, multiple: float | None) -> Stats:
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
    return Stats(median, threshold, math.sqrt(d_in) / mean_norm, kept)


def check_cancel(should_cancel) -> None:
    _check_cancel(should_cancel, "training")


_METRICS = ("loss", "mse", "fvu", "l0", "dead_frac", "lr")


def report(on_progress, states: Sequence[RunState], t0: float) -> None:
    """One progress dict for all runs: token totals, the first run's metrics at top level (what
    a single-SAE chart reads) and every run's under `runs`."""
    if on_progress is None:
        return
    done = sum(s.tokens for s in states)
    total = sum(s.budget for s in states)
    d: dict[str, Any] = {"phase": "train", "done": done, "total": total, "unit": "tokens",
                         **rate(done, total, t0), "step": states[0].step}
    per_run = {}
    for s in states:
        last = s.history.last
        m = {k: last[k] for k in _METRICS} if last else {}
        if s.final is not None:
            m |= {k: s.final[k] for k in ("mse", "fvu", "l0", "dead_frac")}
        per_run[s.spec.name] = m | {"step": s.step, "tokens": s.tokens}
    d |= {k: v for k, v in per_run[states[0].spec.name].items() if k in _METRICS}
    if len(states) > 1:
        d["runs"] = per_run
    on_progress(d)
