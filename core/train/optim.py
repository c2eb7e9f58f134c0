"""The optimizers an SAE trains with, by name (TrainConfig.optimizer), and their default rates.

- `signum` (the default): sign-SGD (each step moves every weight by ±lr) under the `schedulefree`
  package's wrapper with momentum 0.95, as sparsify now trains by default: a constant lr, and
  the weights to evaluate and save are the wrapper's running average (`averaged`), not the ones
  stepped. At equal tokens it reconstructs held-out tokens far better than Adam (bench/recipe.py).
- `adam`: torch's fused Adam; the run applies a linear warm-up and a final linear decay.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from schedulefree import ScheduleFreeWrapper

OPTIMIZERS = ("signum", "adam")
BASE_LR = {"adam": 2e-4, "signum": 3.5e-3}
"""The learning rate at 2^14 latents."""
WIDTH_POWER = {"adam": 0.5, "signum": 0.25}
"""The default rate ∝ d_sae^−power. Adam: sparsify's former rule. signum: sparsify uses
5e-3 · (2^14 / d_sae)^½, which on SmolLM2 (bench/recipe.py, bench/RESULTS.md) leaves TopK SAEs
with latents that never fire — 1.5% at 16,384 latents and 9% at 4,608 after 250k tokens (the
schedule-free average loses latents the stepped weights still use) — while 3.75e-3 at 16,384
and 4.7e-3 at 4,608 leave 0.04%, for a held-out FVU 9% / 12% higher: a base of 3.5e-3 and a
fourth-root rule go through both."""


def default_lr(d_sae: int, optimizer: str = "signum") -> float:
    """The width-scaled default rate for `optimizer`: BASE_LR at 2^14 latents, ∝ d_sae^−WIDTH_POWER."""
    return BASE_LR[optimizer] * (2**14 / d_sae) ** WIDTH_POWER[optimizer]


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr · sign(∇p): the step's size does not depend on the gradient's scale."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_add_(params, torch._foreach_sign(grads), alpha=-group["lr"])


class _ScheduleFree(ScheduleFreeWrapper):
    @staticmethod
    def swap(x: torch.Tensor, y: torch.Tensor) -> None:
        # The package swaps in place through byte views, which needs a unit last stride; W_enc is
        # held transposed (W_dec.T's layout), so swap that one through a temporary copy.
        if x.stride(-1) == 1 and y.stride(-1) == 1:
            ScheduleFreeWrapper.swap(x, y)
        else:
            held = x.clone()
            x.copy_(y)
            y.copy_(held)


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)  # fused: 6× faster step on CPU
    if name == "signum":
        opt = _ScheduleFree(SignSGD(params, lr), momentum=0.95)
        opt.train()  # the wrapper steps the interpolated weights; eval() swaps in the average
        return opt
    raise ValueError(f"unknown optimizer {name!r}")


def scheduled(name: str) -> bool:
    """Whether the run's warm-up/decay schedule applies (a schedule-free optimizer has none)."""
    return name == "adam"


@contextlib.contextmanager
def averaged(opt: torch.optim.Optimizer) -> Iterator[None]:
    """The parameters hold the weights to evaluate or save while inside: a schedule-free
    wrapper's running average (then the stepped weights again); other optimizers' as they are."""
    if not hasattr(opt, "eval"):
        yield
        return
    opt.eval()
    try:
        yield
    finally:
        opt.train()
