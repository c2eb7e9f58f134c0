"""ReLU SAE with an L1 penalty (SAELens "standard"; Bricken et al. 2023, Anthropic's April 2024 update).

z = ReLU(pre). Loss = E‖x − x̂‖² + λ·E[Σᵢ zᵢ], on activations scaled so E‖x‖ = √d_in, where
Anthropic's λ ≈ 5 applies. Decoder rows are kept at unit norm, so the L1 term needs no
‖W_dec,i‖ weighting. λ ramps up linearly over the sparsity warmup (`sparsity_coefficient`).
"""

from __future__ import annotations

import torch

from core.sae.base import SAE, StepContext, StepOut, reconstruction_terms


class StandardSAE(SAE):
    architecture = "standard"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOut:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            pre = self.pre_acts(x)
        z = pre.float().relu()
        x_hat = z @ self.W_dec + self.b_dec
        sq_err, total_var = reconstruction_terms(x, x_hat)
        n = len(x)
        loss = sq_err / n + ctx.sparsity_coefficient * z.sum() / n
        live = z > 0
        return StepOut(loss, (sq_err / total_var).detach(), sq_err.detach(), live.sum(1).float().mean(), live.any(0))
