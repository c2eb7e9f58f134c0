"""What every SAE architecture shares: the config that `cfg.json` records, and the module
interface the trainer, evaluation, discovery, steering and the formats rely on.

Tensors carry SAELens's names: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`,
`b_dec [d_in]`, plus `threshold [d_sae]` for JumpReLU. An architecture is one module in this
package: its inference rule (`activation`) and its training loss (`training_step`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError

@dataclass
class SAETypeConfig:
    """The knobs of one SAE type; each type file subclasses it with its own documented fields.

    Everything another layer needs to know about a type it asks here, by method, instead of
    comparing the type's name: its penalty, its run name, what cfg.json records of it.
    """

    architecture: ClassVar[str] = ""
    """The registry name (set by `core.sae.registry.register`)."""
    ALIASES: ClassVar[dict[str, str]] = {}
    """Older flat job-file names of this type's fields (e.g. jumprelu_bandwidth -> bandwidth)."""

    def check(self, d_sae: int) -> None:
        """Raise a one-line UserError when these knobs cannot train an SAE with d_sae latents."""

    def sparsity_coefficient(self) -> float:
        """Weight of the sparsity penalty once warmed up (0: the activation itself is sparse)."""
        return 0.0

    def run_name(self) -> str:
        """How runs of this type are told apart in names (e.g. "topk-k32")."""
        return self.architecture

    def cfg_json(self) -> dict[str, Any]:
        """Type-specific SAELens cfg.json fields."""
        return {}

    @classmethod
    def from_cfg_json(cls, d: dict[str, Any]) -> "SAETypeConfig":
        """This type's config from a SAELens cfg.json (training-only knobs keep their defaults)."""
        return cls()

    def inference_config(self) -> "SAETypeConfig":
        """These knobs as a cfg.json records them (training-only knobs at their defaults), so a
        saved and reloaded SAE has an equal config."""
        return type(self).from_cfg_json(self.cfg_json())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in the registry and in job files: architecture + fields."""
        return {"architecture": self.architecture} | dataclasses.asdict(self)

    def summary(self) -> str:
        """The inference knobs in a few characters, for tables ("k=32"; "" when none)."""
        return ", ".join(f"{k}={v}" for k, v in self.cfg_json().items() if isinstance(v, (int, float))
                         and not isinstance(v, bool))


@dataclass
class SAEConfig:
    """What `cfg.json` records about an SAE: its shape, its type, how to apply it, and where it
    was trained.

    `core.formats.saelens` reads and writes it as `cfg.json` (`to_cfg_json` / `from_cfg_json`)."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model for residual hooks)."""
    d_sae: int
    """Number of latents."""
    type_config: SAETypeConfig = field(kw_only=True)
    """The inference type and its knobs (k for TopK), from `core.sae.registry`."""
    dtype: str = "float32"
    """Weight dtype as written to disk (we always save fp32)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens default)."""
    normalize_activations: str = "none"
    """SAELens input normalization; "none" because our training folds its scale into the weights."""
    hook_name: str = ""
    """TransformerLens hook name, e.g. blocks.15.hook_resid_post."""
    model_name: str = ""
    """Model the SAE was trained on (hub id or local name)."""
    context_size: int = 0
    """Tokens per sequence during extraction."""
    prepend_bos: bool = False
    """Whether every context started with BOS (the dataset's `prepend_bos`)."""
    dataset_path: str = ""
    """Dataset the activations came from."""
    exclude_special_tokens: bool | list[int] = False
    """Token ids whose positions were left out of training and evaluation (BOS, EOS, pad), or
    True/False as SAELens writes it (True: the tokenizer's structural special tokens)."""
    outlier_norm_threshold: float | None = None
    """Raw ‖x‖ above which tokens were left out of training and evaluation by the norm guard
    (TrainConfig.outlier_norm_multiple); None when no norm filter was used."""

    @property
    def architecture(self) -> str:
        """SAELens inference architecture, e.g. "standard", "topk" or "jumprelu"."""
        return self.type_config.architecture

class StepContext(NamedTuple):
    """What the trainer tells an architecture's `training_step` about this step."""

    dead: torch.Tensor
    """bool [d_sae]: latents that have not fired for `dead_tokens` tokens (AuxK revives them)."""
    sparsity_coefficient: float
    """The type's penalty weight (`SAETypeConfig.sparsity_coefficient`) times the warmup ramp."""
    amp: bool
    """The encoder's matmul in bf16 (`TrainConfig.autocast`: by default where bf16 is native and faster)."""
    scratch: dict | None = None
    """Reusable buffers shared by the runs of one training (their steps run one at a time);
    None: allocate afresh."""
    chunk_tokens: int = 0
    """Tokens per block of encoder pre-activations in the sparse (TopK family) steps; 0: as
    `block_shape` chooses. The result does not depend on it (to float rounding)."""
    chunk_latents: int = 0
    """Latents per block, likewise (0: as `block_shape` chooses)."""


PRE_CHUNK_BYTES = 256 * 2**20
"""Most bytes of fp32 encoder pre-activations a sparse (TopK family) step holds at once.

The step never needs the dense [batch × d_sae] pre-activations as a whole, only each token's
chosen latents, so it computes them a block at a time into one reused buffer (`block_shape`):
at batch 4096 that is the whole batch up to 16,384 latents (one block: the step as before),
and 16,384 latents a block beyond, where the whole matrix would be 1 GiB at 65,536 latents."""


def chunk_rows(n: int, d_sae: int, chunk_tokens: int = 0) -> int:
    """Tokens per block of a dense [n × d_sae] computation (the evaluation's) within PRE_CHUNK_BYTES."""
    rows = chunk_tokens if chunk_tokens > 0 else PRE_CHUNK_BYTES // (4 * max(d_sae, 1))
    return max(1, min(n, rows))


MIN_BLOCK_LATENTS = 4096
"""The narrowest block of latents `block_shape` makes before it splits the tokens too."""


def block_shape(n: int, d_sae: int, chunk_tokens: int = 0, chunk_latents: int = 0) -> tuple[int, int]:
    """(tokens, latents) per block of a sparse step's pre-activations for a batch of n tokens:
    the whole [n × d_sae] matrix while it fits in PRE_CHUNK_BYTES, else all n tokens × as many
    latents as fit (at least MIN_BLOCK_LATENTS), fewer tokens only past that.

    Blocks of latents, not of tokens: each product x @ W_enc[:, block] packs its slice of W_enc
    once, where blocks of tokens repack all of W_enc per block. At 65,536 latents, batch 4096,
    the product in 4 blocks of 1,024 tokens ran at 88 GFLOP/s on 2 AVX2 cores, in 4 blocks of
    16,384 latents at 97, whole at 96-99 (bench/RESULTS.md, 2026-12-07)."""
    budget = PRE_CHUNK_BYTES // 4
    if chunk_tokens > 0 or chunk_latents > 0:  # set by hand (tests): exactly that
        return max(1, min(n, chunk_tokens or n)), max(1, min(d_sae, chunk_latents or d_sae))
    if n * d_sae <= budget:
        return max(1, n), d_sae
    cols = min(d_sae, max(MIN_BLOCK_LATENTS, budget // max(n, 1)))
    return max(1, min(n, budget // cols)), cols


def sparse_step_bytes(d_in: int, d_sae: int, batch: int, pairs_per_token: int) -> int:
    """Peak bytes of a sparse (TopK family) step: three blocks of `chunk_rows` tokens × d_sae
    (the evaluation's pre-activations, dense activations and mask at the end; the step itself
    holds one `block_shape` block, AuxK picking in place), plus ~48
    bytes per chosen (token, latent) pair (value, index, grouping by latent, gradient) for the
    `pairs_per_token` the type picks and AuxK's d_in/2."""
    block = 4 * chunk_rows(batch, d_sae) * d_sae
    return 3 * block + 48 * batch * (pairs_per_token + d_in // 2)


class StepOut(NamedTuple):
    loss: torch.Tensor
    """What the optimizer minimises (with autograd)."""
    fvu: torch.Tensor
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (detached)."""
    sq_err: torch.Tensor
    """Σ‖x − x̂‖² over the batch in the trainer's scaled units (detached)."""
    l0: torch.Tensor
    """Mean number of non-zero latents per token (detached)."""
    fired: torch.Tensor
    """bool [d_sae]: latents that fired in this batch."""


def fired_latents(latents: torch.Tensor, live: torch.Tensor, d_sae: int) -> torch.Tensor:
    """bool [d_sae]: the latents of (latent, live) pairs that fired, by a scatter (indexing with
    the `live` mask would make a GPU wait for the host on every step)."""
    hit = torch.zeros(d_sae, dtype=torch.uint8, device=latents.device)
    return hit.scatter_reduce_(0, latents.reshape(-1), live.reshape(-1).to(torch.uint8), "amax").bool()


def reconstruction_terms(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ‖x − x̂‖², Σ‖x − x̄‖²) over a batch; the FVU's numerator and denominator."""
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    # One fused kernel each way instead of a sub/pow/sum chain and its backward: ~8 ms less
    # per 4096-token step on 2 CPU cores.
    return F.mse_loss(x_hat, x, reduction="sum"), total_var


class SAE(nn.Module):
    """x̂ = activation((x − b_dec) @ W_enc + b_enc) @ W_dec + b_dec, with unit-norm decoder rows at init.

    A type is a subclass registered with `core.sae.registry.register(name)`: it sets `Config`
    (its knobs), implements `activation` (inference) and `training_step` (the loss), and may
    override `initialise`; `TENSOR_NAMES` lists what is saved. `d_out` is the width of what the
    decoder writes: d_in for an SAE (a transcoder would read one hook and write another).
    """

    architecture: ClassVar[str] = ""
    Config: ClassVar[type[SAETypeConfig]] = SAETypeConfig
    inference: ClassVar[bool] = True
    """Whether cfg.json may name this type (BatchTopK trains only and is saved as JumpReLU)."""
    TENSOR_NAMES: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")
    STEP_DENSE_COPIES: ClassVar[float] = 5.0
    """How many fp32 [batch × d_sae] tensors the type's training step holds at its peak, for
    `step_bytes` (dense types: pre-activations, activations, masks, their gradients; measured
    3.8 for standard and 4.8 for JumpReLU at 16,384 latents, bench/RESULTS.md)."""

    def __init__(self, d_in: int, d_sae: int, type_config: SAETypeConfig | None = None,
                 apply_b_dec_to_input: bool = True):
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise UserError(f"an SAE needs d_in and d_sae of at least 1 (got d_in={d_in}, d_sae={d_sae})")
        self.type_config = type_config if type_config is not None else self.Config()
        self.type_config.check(d_sae)
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_in
        self.apply_b_dec_to_input = apply_b_dec_to_input
        # Unit-norm decoder rows and a tied encoder: the initialisation Gao et al. found best.
        W_dec = torch.randn(d_sae, self.d_out)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> "SAE":
        return cls(cfg.d_in, cfg.d_sae, cfg.type_config, apply_b_dec_to_input=cfg.apply_b_dec_to_input)

    def config(self, **metadata: Any) -> SAEConfig:
        """The cfg.json contents for this SAE; `metadata` fills hook_name, model_name, ..."""
        return SAEConfig(d_in=self.d_in, d_sae=self.d_sae, type_config=self.type_config.inference_config(),
                         apply_b_dec_to_input=self.apply_b_dec_to_input, **metadata)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of scaled activations: b_dec at their
        geometric median (types with a penalty also start their encoder bias sparse)."""
        self.b_dec.copy_(geometric_median(x))

    def pre_acts(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder pre-activations [..., d_sae]; of a 2-D x into `out` ([len(x), d_sae], the same
        numbers) when given, so a caller can reuse one buffer."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if out is None:
            return x @ self.W_enc + self.b_enc
        return torch.matmul(x, self.W_enc, out=out).add_(self.b_enc)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [..., d_sae]."""
        return self.activation(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    # ---------------------------------------------------------------- training interface

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOut:
        """Forward and loss on one batch of scaled activations; the caller runs backward."""
        raise NotImplementedError

    @classmethod
    def step_bytes(cls, type_config: SAETypeConfig, d_in: int, d_sae: int, batch: int) -> int:
        """Peak bytes of one training step's own tensors (beyond the weights, their gradients
        and the optimizer's state), before any runs: what `TrainConfig` checks a width against."""
        return int(cls.STEP_DENSE_COPIES * 4 * batch * d_sae)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-impose constraints after an optimizer step: unit-norm decoder rows."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def calibrate(self, x: torch.Tensor, batch_size: int) -> None:
        """Re-estimate, from the weights as they will be saved, what inference needs besides
        them (`x`: scaled training tokens). Nothing, for most types."""

    def to_inference(self) -> "SAE":
        """The module to save and apply; BatchTopK turns into JumpReLU here."""
        return self

    @torch.no_grad()
    def folded(self, scale: float) -> "SAE":
        """A CPU fp32 inference copy that maps raw x to raw x̂ when trained on scale·x.

        pre_s = (s·x − b_dec)W_enc + b_enc; dividing both biases (and any threshold) by s gives
        pre = pre_s / s, so the same latents fire, activations come out in raw units, and
        z·W_dec + b_dec/s = x̂_s / s. W_enc and the unit-norm W_dec rows stay as trained.
        """
        out = copy.deepcopy(self.to_inference()).to("cpu", torch.float32)
        for name in ("b_enc", "b_dec", "threshold"):
            if hasattr(out, name):
                getattr(out, name).div_(scale)
        return out


def geometric_median(x: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """Weiszfeld iterations from the mean: robust to the heavy tail of residual streams."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-6)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


@torch.no_grad()
def init_sparse_bias(sae: SAE, x: torch.Tensor, l0: int) -> None:
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
