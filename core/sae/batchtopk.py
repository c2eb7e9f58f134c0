"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch instead of per token.

During training the k·N largest ReLU pre-activations of a batch of N tokens survive, so tokens
get different numbers of latents with the same mean L0 = k. Inference cannot look at a batch,
so a global threshold θ is learned alongside — an exponential moving average of the smallest
kept activation per batch — and the SAE is saved as a JumpReLU SAE with θ for every latent
(what SAELens does too). Trained with FVU + AuxK like TopK.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from core.sae.base import SAE, StepContext, StepOut, reconstruction_terms
from core.sae.jumprelu import JumpReLUSAE
from core.sae.registry import register
from core.sae.topk import TopKConfig, auxk_loss

THRESHOLD_MOMENTUM = 0.99
"""θ ← m·θ + (1 − m)·(smallest kept activation in this batch)."""


@dataclass
class BatchTopKConfig(TopKConfig):
    """BatchTopK knobs: `k` is the mean number of latents per token over a batch."""


@register("batchtopk")
class BatchTopKSAE(SAE):
    Config = BatchTopKConfig
    inference = False  # saved as JumpReLU with the learned global threshold

    def __init__(self, d_in: int, d_sae: int, type_config: BatchTopKConfig | None = None,
                 apply_b_dec_to_input: bool = True):
        super().__init__(d_in, d_sae, type_config, apply_b_dec_to_input)
        self.k = self.type_config.k
        # A buffer (not a parameter): it is estimated, not trained, and travels with checkpoints.
        self.register_buffer("global_threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Batch-level TopK over all tokens in `pre` (what training sees)."""
        acts = pre.relu()
        flat = acts.reshape(-1)
        keep = min(self.k * max(acts.numel() // self.d_sae, 1), flat.numel())
        values, indices = flat.topk(keep, sorted=False)
        return torch.zeros_like(flat).scatter_(0, indices, values).reshape(acts.shape)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOut:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            pre = self.pre_acts(x)
        z = self.activation(pre.float())
        self._update_threshold(z)
        x_hat = z @ self.W_dec + self.b_dec
        sq_err, total_var = reconstruction_terms(x, x_hat)
        fvu = sq_err / total_var
        x_c = x - self.b_dec if self.apply_b_dec_to_input else x
        loss = fvu + auxk_loss(self, x_c, pre, (x - x_hat).detach(), ctx, self.type_config.auxk_alpha) / total_var
        live = z > 0
        return StepOut(loss, fvu.detach(), sq_err.detach(), live.sum(1).float().mean(), live.any(0))

    @torch.no_grad()
    def _update_threshold(self, z: torch.Tensor) -> None:
        kept = z[z > 0]
        if not kept.numel():
            return
        smallest = kept.min()
        t = self.global_threshold
        t.copy_(smallest if t < 0 else THRESHOLD_MOMENTUM * t + (1 - THRESHOLD_MOMENTUM) * smallest)

    @torch.no_grad()
    def to_inference(self) -> JumpReLUSAE:
        out = JumpReLUSAE(self.d_in, self.d_sae, apply_b_dec_to_input=self.apply_b_dec_to_input).to(self.W_enc.device)
        for name in SAE.TENSOR_NAMES:
            getattr(out, name).copy_(getattr(self, name))
        out.threshold.fill_(max(float(self.global_threshold), 0.0))
        return out
