"""The optimizers an SAE trains with, by name (TrainConfig.optimizer), and their default rates.

- `signum` (the default): sign-SGD (each step moves every weight by ±lr) under the `schedulefree`
  package's wrapper with momentum 0.95, as sparsify now trains by default: a constant lr, and
  the weights to evaluate and save are the wrapper's running average (`averaged`), not the ones
  stepped. At equal tokens it reconstructs held-out tokens far better than Adam (bench/recipe.py).
- `adam`: torch's fused Adam (`_Adam`); the run applies a linear warm-up and a final linear decay.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from schedulefree import ScheduleFreeWrapper

@dataclass(frozen=True)
class Recipe:
    """What goes with an optimizer: its default rate, the encoder's start, the dead window, its
    state's size and whether the run's lr schedule applies (bench/RESULTS.md, "the default recipe")."""

    base_lr: float
    """The default learning rate at 2^14 latents."""
    width_power: float
    """The default rate ∝ d_sae^−width_power. Adam: sparsify's former square-root rule. signum:
    a fourth root — sparsify's square root took 4,608 latents to 9.4e-3, which left 9% of a TopK
    SAE's latents never firing after 250k tokens, where 4.7e-3 left 0.04%."""
    encoder_init: float
    """The encoder's columns start as the unit decoder rows times this. Adam: Gao et al.'s tied
    initialisation. signum: the norm sparsify's `nn.Linear` encoder starts at (≈ 1/√3): unit
    columns left 1.5% of a 16,384-latent TopK SAE never firing after 250k tokens at 5e-3, 1/√3
    left 0.4–0.7% with a lower held-out FVU."""
    dead_per_latent: int
    """The default dead window in tokens per latent at the start of a run (`default_dead_tokens`)."""
    dead_late_per_latent: int
    """...and once 16 × dead_per_latent / dead_late_per_latent × d_sae tokens are trained (64 ×
    d_sae under signum): from 16 × d_sae tokens on the window shrinks as 1 / tokens trained."""
    states: int
    """fp32 tensors of optimizer state per parameter (Adam: its two moments; signum: the
    schedule-free wrapper's z)."""
    scheduled: bool
    """Whether the run's warm-up/decay schedule applies (a schedule-free optimizer has none)."""


RECIPES = {"signum": Recipe(5e-3, 0.25, 3 ** -0.5, 4, 1, 1, False), "adam": Recipe(2e-4, 0.5, 1.0, 32, 32, 2, True)}
OPTIMIZERS = tuple(RECIPES)


def default_lr(d_sae: int, optimizer: str = "signum") -> float:
    """The width-scaled default rate: base_lr at 2^14 latents, ∝ d_sae^−width_power."""
    r = RECIPES[optimizer]
    return r.base_lr * (2**14 / d_sae) ** r.width_power


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr · sign(∇p): the step's size does not depend on the gradient's scale.

    Under `_ScheduleFree` (`steps_z`) it steps each weight's schedule-free z (the wrapper's
    state["z"]) itself, with the gradient taken at the weight. The step spends the gradients:
    they are overwritten by their signs, since a fresh sign tensor per weight is page-faulted
    in anew every step (at 65,536 latents 258 ms for both weights against 65 ms in place).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, steps_z: bool = False):
        super().__init__(params, {"lr": lr})
        self.steps_z = steps_z

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                targets = [self.state[p]["z"] for p in params] if self.steps_z else params
                signs = [p.grad for p in params]
                torch._foreach_sign_(signs)
                torch._foreach_add_(targets, signs, alpha=-group["lr"])


class _ScheduleFree(ScheduleFreeWrapper):
    """The `schedulefree` package's wrapper around `SignSGD(steps_z=True)`, without its swaps.

    The wrapper swaps each weight with its z buffer before and after the base step (three
    byte-wise XOR passes each way), so that an optimizer unaware of z steps z through the
    parameter; ours steps z itself, so `swap` does nothing and the wrapper's own interpolation,
    averaging and weighting run as they are. Same weights as the swapping wrapper around plain
    sign-SGD (tests/test_train.py); the swaps took 6% of a 16,384-latent TopK run's CPU time
    (profiled), the optimizer step 40% less time without them."""

    @staticmethod
    def swap(x: torch.Tensor, y: torch.Tensor) -> None:
        pass


class _Adam(torch.optim.Adam):
    """torch's fused Adam (6× faster a step than its default on a CPU), stepping a column-major
    weight — W_enc, held as its transpose for the sparse step's gathers — through a row-major
    alias of its storage: given the weight itself, the fused kernel copies it, its gradient and
    both moments every step (at 65,536 latents 184 ms a step against 43 ms through the alias,
    bench/optim.py). The state is the alias's, [d_sae × d_in]; a checkpoint holding W_enc's own
    [d_in × d_sae] moments (saved before this class) loads transposed."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float):
        self._weights: dict[torch.Tensor, torch.nn.Parameter] = {}  # alias → the weight it steps
        stepped = []
        for p in params:
            if p.dim() == 2 and not p.is_contiguous() and p.T.is_contiguous():
                alias = p.detach().T  # a leaf sharing p's storage: the step writes p
                self._weights[alias] = p
                p = alias
            stepped.append(p)
        super().__init__(stepped, lr=lr, betas=(0.9, 0.999), fused=True)

    @torch.no_grad()
    def step(self, closure=None):
        for alias, p in self._weights.items():
            alias.grad = None if p.grad is None else p.grad.T
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self._weights.values():
            p.grad = None if set_to_none or p.grad is None else p.grad.zero_()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for alias in self._weights:
            for key, value in self.state[alias].items():
                if value.dim() == 2 and value.shape != alias.shape and value.T.shape == alias.shape:
                    self.state[alias][key] = value.T.contiguous()


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return _Adam(params, lr)
    if name == "signum":
        opt = _ScheduleFree(SignSGD(params, lr, steps_z=True), momentum=0.95)
        opt.train()  # the wrapper steps the interpolated weights; eval() swaps in the average
        return opt
    raise ValueError(f"unknown optimizer {name!r}")


def scheduled(name: str) -> bool:
    """Whether the run's warm-up/decay schedule applies (a schedule-free optimizer has none)."""
    return RECIPES[name].scheduled


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
