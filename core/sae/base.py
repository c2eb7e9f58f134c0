"""What every SAE architecture shares: the config that `cfg.json` records, and the module
interface the trainer, evaluation, discovery, steering and the formats rely on.

Tensors carry SAELens's names: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`,
`b_dec [d_in]`, plus `threshold [d_sae]` for JumpReLU. An architecture is one module in this
package: its inference rule (`activation`) and its training loss (`training_step`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError

@dataclass
class SAEConfig:
    """What `cfg.json` records about an SAE: its shape, how to apply it, and where it was trained.

    `core.formats.saelens` reads and writes it as `cfg.json` (`to_cfg_json` / `from_cfg_json`)."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model for residual hooks)."""
    d_sae: int
    """Number of latents."""
    k: int = 0
    """Latents kept per token by the TopK activation (0 for other architectures)."""
    architecture: str = "topk"
    """SAELens inference architecture: "standard" (ReLU), "topk" or "jumprelu"."""
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
    """Whether sequences started with BOS during extraction."""
    dataset_path: str = ""
    """Dataset the activations came from."""


def check_k(k: int, d_sae: int) -> None:
    """TopK needs 1 <= k <= d_sae; say which knob to turn otherwise."""
    if not 1 <= k <= d_sae:
        raise UserError(f"k={k} must be between 1 and d_sae={d_sae}; lower --k or raise --expansion")


class StepContext(NamedTuple):
    """What the trainer tells an architecture's `training_step` about this step."""

    dead: torch.Tensor
    """bool [d_sae]: latents that have not fired for `dead_tokens` tokens (AuxK revives them)."""
    sparsity_coefficient: float
    """L1 / L0 penalty weight after sparsity warmup (unused by TopK and BatchTopK)."""
    auxk_alpha: float
    """Weight of the AuxK loss (TopK and BatchTopK)."""
    amp: bool
    """bf16 autocast for the encoder matmul (CUDA only)."""
    scratch: dict | None = None
    """Reusable buffers shared by the runs of one training (their steps run one at a time);
    None: allocate afresh."""


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


def reconstruction_terms(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ‖x − x̂‖², Σ‖x − x̄‖²) over a batch; the FVU's numerator and denominator."""
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    # One fused kernel each way instead of a sub/pow/sum chain and its backward: ~8 ms less
    # per 4096-token step on 2 CPU cores.
    return F.mse_loss(x_hat, x, reduction="sum"), total_var


class SAE(nn.Module):
    """x̂ = activation((x − b_dec) @ W_enc + b_enc) @ W_dec + b_dec, with unit-norm decoder rows at init.

    Subclasses set `architecture` (the SAELens name written to cfg.json) and implement
    `activation` (inference) and `training_step` (the loss); `TENSOR_NAMES` lists what is saved.
    """

    architecture: ClassVar[str] = ""
    TENSOR_NAMES: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")

    def __init__(self, d_in: int, d_sae: int, apply_b_dec_to_input: bool = True):
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise UserError(f"an SAE needs d_in and d_sae of at least 1 (got d_in={d_in}, d_sae={d_sae})")
        self.d_in, self.d_sae = d_in, d_sae
        self.apply_b_dec_to_input = apply_b_dec_to_input
        # Unit-norm decoder rows and a tied encoder: the initialisation Gao et al. found best.
        W_dec = torch.randn(d_sae, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> "SAE":
        return cls(cfg.d_in, cfg.d_sae, apply_b_dec_to_input=cfg.apply_b_dec_to_input)

    def config(self, **metadata: Any) -> SAEConfig:
        """The cfg.json contents for this SAE; `metadata` fills hook_name, model_name, ..."""
        return SAEConfig(d_in=self.d_in, d_sae=self.d_sae, k=getattr(self, "k", 0), architecture=self.architecture,
                         apply_b_dec_to_input=self.apply_b_dec_to_input, **metadata)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [..., d_sae]."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

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

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-impose constraints after an optimizer step: unit-norm decoder rows."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

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
