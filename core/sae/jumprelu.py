"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope architecture).

z = pre · H(pre − θ) with a learned threshold θ > 0 per latent. Loss = E‖x − x̂‖² + λ·E[L0],
on activations scaled so E‖x‖ = √d_in. H has no useful derivative, so θ is trained with the
paper's straight-through estimator: a rectangle kernel of width ε (`bandwidth`) around the
threshold stands in for the Dirac delta, in both the activation and the L0 term. λ ramps up
over the sparsity warmup. θ is trained directly and kept ≥ `MIN_THRESHOLD` after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.sae.base import SAE, SAETypeConfig, StepContext, StepOut, init_sparse_bias, reconstruction_terms
from core.sae.registry import register

MIN_THRESHOLD = 1e-6


def _kernel(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1 on |u| < ½."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre·H(pre − θ); ∂/∂pre = H(pre − θ), ∂/∂θ = −(θ/ε)·K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_t = (-(threshold / eps) * _kernel((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_t, None


class _Step(torch.autograd.Function):
    """H(pre − θ); no gradient to pre, ∂/∂θ = −(1/ε)·K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = (-(1.0 / eps) * _kernel((pre - threshold) / eps) * grad).sum(0)
        return None, grad_t, None


@dataclass
class JumpReLUConfig(SAETypeConfig):
    """JumpReLU knobs (Rajamanoharan et al. 2024)."""

    ALIASES = {"k": "init_l0", "jumprelu_bandwidth": "bandwidth", "jumprelu_init_threshold": "init_threshold"}

    l0_coefficient: float = 1.0
    """λ of the L0 penalty, in units where E‖x‖ = √d_in."""
    bandwidth: float = 0.05
    """Width ε of the straight-through estimator's kernel, in scaled units."""
    init_threshold: float = 0.01
    """Initial threshold, in scaled units."""
    init_l0: int = 32
    """The L0 the encoder bias is initialised for (the penalty sets the final L0)."""

    def sparsity_coefficient(self) -> float:
        return self.l0_coefficient


@register("jumprelu")
class JumpReLUSAE(SAE):
    Config = JumpReLUConfig
    STEP_DENSE_COPIES = 5.0  # measured 4.8 at 16,384 latents, batch 4096 (bench/RESULTS.md)
    TENSOR_NAMES = SAE.TENSOR_NAMES + ("threshold",)

    def __init__(self, d_in: int, d_sae: int, type_config: JumpReLUConfig | None = None,
                 apply_b_dec_to_input: bool = True):
        super().__init__(d_in, d_sae, type_config, apply_b_dec_to_input)
        self.threshold = torch.nn.Parameter(torch.full((d_sae,), float(self.type_config.init_threshold)))
        self.bandwidth = self.type_config.bandwidth

    def initialise(self, x: torch.Tensor) -> None:
        super().initialise(x)
        init_sparse_bias(self, x, self.type_config.init_l0)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOut:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            pre = self.pre_acts(x)
        pre = pre.float()
        z = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
        x_hat = z @ self.W_dec + self.b_dec
        sq_err, total_var = reconstruction_terms(x, x_hat)
        n = len(x)
        l0 = _Step.apply(pre, self.threshold, self.bandwidth).sum() / n
        loss = sq_err / n + ctx.sparsity_coefficient * l0
        live = z > 0
        return StepOut(loss, (sq_err / total_var).detach(), sq_err.detach(), live.sum(1).float().mean(), live.any(0))

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.threshold.clamp_(min=MIN_THRESHOLD)
