"""What a training run is told: the schedule and data settings, with the SAE type's own knobs
nested (as sparsify's TrainConfig nests its SparseCoderConfig).

This dataclass is the one source of the training defaults: the CLI's flags, the dashboard's
form and the templates read them from here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from core.errors import UserError, at_least_one
from core.fields import FieldInfo, describe
from core.sae import SAE, SAETypeConfig, registry
from core.train.optim import OPTIMIZERS, RECIPES


def default_dead_tokens(d_sae: int, optimizer: str = "signum", trained: int = 0) -> int:
    """The dead window after `trained` tokens: set by the width and the tokens trained so far,
    never by the run's planned length (a short run's slow starters are not counted, and a long
    run does not wait Gao et al.'s fixed 10M tokens at small widths). Adam: 32 × d_sae, 1,000
    times the mean interval between a latent's firings at k = 32 (147k tokens at 4,608 latents,
    2.1M at 65,536). signum: 4 × d_sae for the first 16 × d_sae tokens, then shrinking as
    1 / tokens trained to d_sae from 64 × d_sae tokens on. Under sign steps latents go quiet as
    the run goes on and AuxK must revive them early, but not too early: at 16,384 latents the
    share of the saved SAE's latents never firing on held-out tokens was, for fixed windows of
    4×, 2× and 1× d_sae, 0.6%, 12.5% and 31% after 250k tokens and 2.7%, 0.40% and 0.04% after
    1M; the schedule keeps 4×'s 0.6% at 250k and reaches 0.18% after 1M at 4×'s FVU (0.110)
    (bench/RESULTS.md, "the dead window")."""
    r = RECIPES[optimizer]
    shrunk = r.dead_per_latent * d_sae * min(1.0, 16 * d_sae / max(trained, 1))
    return max(r.dead_late_per_latent * d_sae, round(shrunk))


def prefer_bf16(device) -> bool:
    """Whether the encoder's matmul runs in bf16 when `autocast` is left out: on a CUDA GPU
    from Ampere on (sparsify's autocast asks the same, emulation included); on a CPU with
    AVX512-BF16 or AMX only where a bf16 matmul of the encoder's shape measures faster than
    fp32 here (`_cpu_bf16_faster`). The flags alone do not tell: on a Zen 4 EPYC (AVX512-BF16)
    bf16 made the TopK step 1.3-1.6× faster, while on an Intel Xeon with AVX512-BF16 and no AMX
    oneDNN's bf16 matmul ran at 170 GFLOP/s against MKL's fp32 at 290 (bench/RESULTS.md)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if not cpu_has_bf16():
        return False  # emulated: always slower
    return _cpu_bf16_faster(torch.get_num_threads())


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), by torch's own probes
    (private; a torch without them is taken to lack the units). Without them bf16 is emulated."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


BF16_MARGIN = 0.9
"""bf16 is chosen on a CPU when its matmul takes under this share of fp32's: the bf16 step
also casts the input and the weights, and near a tie the fp32 numbers are worth keeping."""


@functools.lru_cache(maxsize=None)
def _cpu_bf16_faster(threads: int) -> bool:
    """Whether [512 × 576] @ [576 × 4,096] (a block of the encoder's matmul, 2.4 GFLOP) is
    faster in bf16 than in fp32 on this CPU with `threads` threads (~0.1 s, once per process
    and thread count)."""
    import torch

    secs = matmul_seconds(512, 576, 4096, (torch.float32, torch.bfloat16))
    return secs[torch.bfloat16] < BF16_MARGIN * secs[torch.float32]


def matmul_seconds(rows: int, d_in: int, d_sae: int, dtypes: tuple, rounds: int = 4) -> dict:
    """The best time of [rows × d_in] @ [d_in × d_sae] in each dtype, the dtypes interleaved
    over `rounds` rounds (the first a warm-up: oneDNN builds its kernel on the first call)."""
    import torch

    x, w = torch.randn(rows, d_in), torch.randn(d_in, d_sae)
    best: dict = {}
    for _ in range(rounds):
        for dtype in dtypes:
            a, b = x.to(dtype), w.to(dtype)
            t = time.perf_counter()
            torch.mm(a, b)
            best[dtype] = min(best.get(dtype, math.inf), time.perf_counter() - t)
    return best


def check_device(device: str) -> None:
    """A torch device this machine has ("cpu", "cuda", "cuda:N" with N below the GPU count)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"device {device!r}: this machine has no CUDA GPU; use cpu")
        if d.index is not None and d.index >= count:
            raise UserError(f"device {device!r}: this machine has {count} GPU(s) (cuda:0-cuda:{count - 1}); pick one")
    elif d.type != "cpu":
        raise UserError(f"device {device!r} is not supported for training; use cpu or cuda")


RUNTIME_BYTES = 800 * 2**20
"""A training job's own memory beside the SAE and its batches: Python, torch, pyarrow and the
activation reader's buffers (a 64-latent job peaks at 845 MiB RSS on CPU, of which 295 MiB are
the imports; bench/RESULTS.md, "memory at width")."""


def training_bytes(d_in: int, d_sae: int, batch_size: int, sae: SAETypeConfig | None = None,
                   optimizer: str = "signum", shuffle_batches: int = 4, sample_tokens: int = 16384) -> int:
    """Peak memory of training one SAE, predicted from its width, batch and optimizer (fp32):
    the weights, their gradients and the optimizer's state, one gradient-sized temporary (the
    decoder-gradient projection; in the forward, W_enc gathered into AuxK's order), the step's own
    tensors (`SAE.step_bytes`: one block of pre-activations for the TopK family, several dense
    [batch × d_sae] tensors for the others), the shuffle buffer and sample, and the runtime.
    Measured against peak RSS per width in bench/RESULTS.md ("memory at width")."""
    sae = sae if sae is not None else registry.config_for(registry.DEFAULT)
    weights = 4 * (2 * d_in * d_sae + d_in + d_sae)
    model = weights * (2 + RECIPES[optimizer].states) + 4 * d_in * d_sae
    step = registry.get(sae.architecture).step_bytes(sae, d_in, d_sae, batch_size)
    data = 4 * d_in * ((2 * shuffle_batches + 1) * batch_size + sample_tokens)
    return model + step + data + RUNTIME_BYTES


def device_bytes(device: str) -> int:
    """Total memory of the device training would run on (RAM for the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    import psutil

    return psutil.virtual_memory().total


def _largest(fits, step: int) -> int:
    """The largest multiple of `step` for which `fits` holds (0 when `step` does not): the
    predictions grow with width and with batch."""
    if not fits(step):
        return 0
    lo = step
    while fits(lo * 2):
        lo *= 2
    hi = lo * 2  # multiples of step; fits(lo), not fits(hi)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_fits(cfg: "TrainConfig", d_in: int, d_sae: int) -> None:
    """Refuse, before anything runs, an SAE whose training cannot fit in the device's total
    memory, naming a width (and, where one exists, a batch) whose prediction fits in half of it
    (room for the rest of the process and the machine)."""
    total = device_bytes(cfg.device)

    def need(width: int, batch: int = cfg.batch_size) -> int:
        return training_bytes(d_in, width, batch, cfg.sae, optimizer=cfg.optimizer,
                              shuffle_batches=cfg.shuffle_batches, sample_tokens=cfg.sample_tokens)

    if need(d_sae) <= total:
        return
    fits = max(1024, _largest(lambda w: need(w) <= total / 2, 1024))
    batch = _largest(lambda b: need(d_sae, b) <= total / 2, 2)
    other = f"batch {batch:,} or smaller" if batch >= 2 else "a smaller batch"
    raise UserError(f"an SAE of {d_sae:,} latents on d_in={d_in} with batch {cfg.batch_size:,} needs at least "
                    f"{need(d_sae) / 2**30:.1f} GiB to train, more than this machine's {total / 2**30:.1f} GiB on "
                    f"{cfg.device}; use about {fits:,} latents (--d-sae) or fewer, or {other}")


@dataclass
class TrainConfig:
    """How to train one SAE. Defaults follow Gao et al. 2024 and sparsify (TopK, AuxK, schedule-free
    sign-SGD), with the rate's width rule, the encoder's start and the dead window changed where
    ours measured better (core.train.optim, bench/RESULTS.md)."""

    sae: SAETypeConfig = field(default_factory=lambda: registry.config_for(registry.DEFAULT))
    """The SAE type and its knobs (k for TopK, l1_coefficient for ReLU-L1, ...): `core.sae.registry`."""
    expansion_factor: int = 8
    """d_sae = expansion_factor × d_in, unless `d_sae` is given."""
    d_sae: int | None = None
    """Number of latents; None → expansion_factor × d_in (set once by `resolved`)."""
    optimizer: str = "signum"
    """`signum`: sign-SGD under a schedule-free wrapper (momentum 0.95), sparsify's current
    optimizer: a constant lr, no warm-up or decay, and the SAE saved is the wrapper's running
    average. `adam`: Adam with linear lr warm-up and decay (lr_warmup_frac, lr_decay_frac), the
    former default (SAELens's recipe); at equal tokens its SAEs reconstruct far worse."""
    lr: float | None = None
    """Learning rate; None → the optimizer's width-scaled default: 5e-3 · (2^14 / d_sae)^¼ for
    signum (sparsify's square-root rule leaves latents that never fire at small widths),
    2e-4 · (2^14 / d_sae)^½ for adam (core.train.optim.default_lr)."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    total_tokens: int | None = None
    """Training budget in tokens, cycling the data as often as needed. None → `epochs` passes,
    which costs one extra read of the activations to count them."""
    epochs: int = 1
    """Passes over the data when `total_tokens` is None."""
    sparsity_warmup_frac: float = 0.05
    """Fraction of steps over which a penalised type's sparsity coefficient rises linearly from 0."""
    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens is dead (AuxK revives it in the TopK
    family; `dead_frac` counts it). None → `default_dead_tokens(d_sae, optimizer, tokens trained)`:
    under signum 4 × d_sae, shrinking to d_sae from 16 × d_sae tokens trained; never set by the
    run's length."""
    lr_warmup_frac: float = 0.05
    """Fraction of steps over which lr rises linearly from 0 (adam only)."""
    lr_decay_frac: float = 0.2
    """Final fraction of steps over which lr decays linearly to 0 (adam only)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    log_every: int = 5
    """Steps between history entries and progress calls."""
    seed: int = 0
    """Seeds the initialisation and the shuffle."""
    outlier_norm_multiple: float | None = 10.0
    """Tokens with ‖x‖ > this × the median norm are excluded from training and evaluation (and
    counted; the exported cfg.json states the threshold); None disables. A guard beside the
    special tokens left out by id: with BOS prepended, SmolLM2 still has a few text tokens (the
    first after BOS in some rows) at up to ~50× the median (bench/sink.py). Non-finite tokens
    are always excluded."""
    sample_tokens: int = 16384
    """Tokens read first to estimate the median norm, the scale and b_dec."""
    shuffle_batches: int = 4
    """Tokens are shuffled within windows of this many batches (activation caches are in
    document order, and consecutive tokens are correlated)."""
    autocast: bool | None = None
    """The encoder's matmul in bf16, its weights, gradients and optimizer kept in fp32. Left out:
    where bf16 is native and faster (`prefer_bf16`: a CUDA GPU, as sparsify does; a CPU with
    lscpu flag avx512_bf16 or amx_bf16 whose bf16 matmul measures faster than fp32, as on a
    Zen 4 EPYC, where the TopK step ran 1.3–1.6× faster at the same held-out FVU;
    bench/RESULTS.md, "bf16 on the CPU"); off (false in a job file):
    fp32 throughout, the same numbers on every CPU to fp32 rounding; on (true): bf16 even where
    it is emulated, and slower. The final metrics say which ran (`autocast`)."""
    device: str = "cpu"
    """torch device to train on ("cpu", "cuda", "cuda:1"), checked against the machine that
    checks the job. A train job on a worker with a GPU trains there whatever this says."""

    @property
    def architecture(self) -> str:
        return self.sae.architecture

    def width(self, d_in: int) -> int:
        """The number of latents on d_in-wide activations."""
        return self.d_sae if self.d_sae is not None else self.expansion_factor * d_in

    def resolved(self, d_in: int) -> "TrainConfig":
        """A copy with `d_sae` set for d_in-wide activations, checked: one-line errors for
        settings that cannot train."""
        if self.d_sae is None and self.expansion_factor < 1:
            raise UserError(f"expansion factor {self.expansion_factor} must be at least 1")
        d_sae = self.width(d_in)
        if d_sae < 1:
            raise UserError(f"d_sae={d_sae} must be at least 1")
        self.sae.check(d_sae)
        if self.batch_size < 2:
            raise UserError(f"batch_size={self.batch_size} is too small; use at least 2 (FVU needs a batch mean)")
        self.check()
        check_fits(self, d_in, d_sae)
        return dataclasses.replace(self, d_sae=d_sae)

    def check(self) -> None:
        """Numbers that would train nothing, or nonsense, and a device this machine lacks: one-line
        errors before any work starts (the width is checked by `resolved`, which knows d_in)."""
        check_device(self.device)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr={self.lr} must be a positive number (e.g. 2e-4), or left out for the width-scaled "
                            "default")
        if self.total_tokens is not None and self.total_tokens < 1:
            raise UserError(f"total_tokens={self.total_tokens} must be at least 1, or left out to train for `epochs`")
        if self.total_tokens is None and self.epochs < 1:
            raise UserError(f"epochs={self.epochs} must be at least 1")
        for name in ("lr_warmup_frac", "lr_decay_frac", "sparsity_warmup_frac"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UserError(f"{name}={value} must be a fraction of the run, between 0 and 1")
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            raise UserError(f"lr_warmup_frac + lr_decay_frac = {self.lr_warmup_frac + self.lr_decay_frac:g} exceeds "
                            "the run; make them add up to 1 at most")
        at_least_one(log_every=self.log_every, sample_tokens=self.sample_tokens, shuffle_batches=self.shuffle_batches)
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise UserError(f"dead_tokens={self.dead_tokens} must be at least 1, or left out for the default "
                            "(4 × d_sae shrinking to 1 × under signum, 32 × under adam)")
        if not (self.grad_clip >= 0):
            raise UserError(f"grad_clip={self.grad_clip} must be 0 (off) or a positive number")
        if self.outlier_norm_multiple is not None and not (self.outlier_norm_multiple > 0):
            raise UserError(f"outlier_norm_multiple={self.outlier_norm_multiple} must be positive, or null to turn "
                            "the norm guard off")

    def run_name(self) -> str:
        """How this config's SAEs are told apart in names (e.g. "topk-k32")."""
        return self.sae.run_name()

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form of job files and templates: the type's fields beside the schedule's."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sae"}
        return self.sae.to_dict() | d

    @classmethod
    def flat_fields(cls) -> list[FieldInfo]:
        """The keys of the flat form: the type's name, this config's own fields, then every
        registered type's knobs (defaults from the first type that has each)."""
        own = [f for f in describe(cls) if f.name != "sae"]
        arch = FieldInfo("architecture", str, registry.DEFAULT, "The SAE type (core.sae.registry).")
        knobs: dict[str, FieldInfo] = {}
        for name in registry.names():
            for f in describe(registry.get(name).Config):
                knobs.setdefault(f.name, f)
        return [arch, *own, *knobs.values()]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Parse a job file's or template's config: flat ({"architecture": "topk", "k": 32,
        "lr": ...}) as today's files are, or with the type under "sae". Knobs of another type
        than the one named are ignored (forms and old templates carry them); other unknown keys
        are one-line errors."""
        values = dict(values)
        nested = values.pop("sae", None)
        if nested is not None and not isinstance(nested, Mapping):
            raise UserError(f"training config key 'sae' should be an object, got {nested!r}")
        train_fields = {f.name for f in dataclasses.fields(cls)} - {"sae"}
        knobs = {k: values.pop(k) for k in list(values) if k not in train_fields}
        unknown = set(knobs) - registry.knob_names() - {"architecture"}
        if unknown:
            raise UserError(f"unknown training option(s) {', '.join(sorted(unknown))}; allowed: "
                            f"{', '.join(sorted(train_fields | registry.knob_names() | {'architecture'}))}")
        knobs |= dict(nested or {})
        name = str(knobs.pop("architecture", registry.DEFAULT))
        return cls(sae=registry.config_for(name, knobs, lenient=nested is None), **values)


class RunSpec(NamedTuple):
    """One SAE of a multi-SAE training run."""

    name: str
    """Unique within the run (e.g. "blocks.6.hook_resid_post/topk-k32")."""
    hook_name: str
    """Which array of each source chunk this SAE reads."""
    d_in: int
    cfg: TrainConfig
    output_hook: str = ""
    """Which array it learns to write; "" → the one it reads (an SAE). A transcoder would name
    another hook here."""


class TrainResult(NamedTuple):
    sae: SAE
    """Trained SAE on CPU in inference form (BatchTopK → JumpReLU), scale folded in: it maps raw
    activations to raw reconstructions."""
    history: list[dict]
    """One entry per log step (step, tokens, loss, mse, fvu, l0, dead_frac, lr; window means), at
    most `core.train.history.HISTORY_ROWS`: a longer run's entries each cover 2, 4, ... log steps."""
    final: dict
    """Evaluation of the returned SAE in raw units on the held-out tokens (or, without a
    held-out slice, on the training sample; `eval_split` says which): mse, fvu, l0, plus
    dead_frac (from training), tokens (trained), excluded_outliers, outlier_frac,
    median_norm, outlier_norm_threshold, eval_tokens."""
    scale: float
    """Factor the raw activations were multiplied by during training (E‖scale·x‖ = √d_in)."""
