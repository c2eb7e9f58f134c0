"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch instead of per token.

During training the k·N largest ReLU pre-activations of a batch of N tokens survive, so tokens
get different numbers of latents with the same mean L0 = k. Inference cannot look at a batch,
so a global threshold θ is learned alongside — an exponential moving average of the smallest
kept activation per batch, estimated once more from the final weights when training ends
(`calibrate`) — and the SAE is saved as a JumpReLU SAE with θ for every latent (what SAELens
does too). Trained with FVU + AuxK like TopK.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from core.sae.base import SAE, StepContext, StepOut, fired_latents, reconstruction_terms, sparse_step_bytes
from core.sae.jumprelu import JumpReLUSAE
from core.sae.registry import register
from core.sae.selection import _joined
from core.sae.sparse import pre_blocks, sparse_decode
from core.sae.topk import AuxPicker, TopKConfig, top_per_row

THRESHOLD_MOMENTUM = 0.99
"""θ ← m·θ + (1 − m)·(smallest kept activation in this batch)."""

ROW_CANDIDATES = 4
"""Each token's top ROW_CANDIDATES·k pre-activations are the first candidates for the batch's
top k·N (`batch_topk_pairs`); tokens that may hold more are looked at again."""


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

    @classmethod
    def step_bytes(cls, type_config: BatchTopKConfig, d_in: int, d_sae: int, batch: int) -> int:
        return sparse_step_bytes(d_in, d_sae, batch, ROW_CANDIDATES * type_config.k)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOut:
        """The batch's k·N largest ReLU pre-activations as (token, latent) pairs, picked a block
        of tokens at a time (`batch_topk_pairs`), with the sparse encoder and decoder of TopK:
        the same loss and gradients as the dense formula without a dense [N × d_sae] tensor."""
        x_c = x - self.b_dec if self.apply_b_dec_to_input else x
        b_dec_in = self.b_dec if self.apply_b_dec_to_input else None
        aux = AuxPicker(self, ctx)
        values, tokens, latents = batch_topk_pairs(self, x_c, ctx, aux)
        offsets = torch.zeros(len(x), dtype=torch.long, device=x.device)
        offsets[1:] = torch.bincount(tokens, minlength=len(x)).cumsum(0)[:-1]
        acts, decoded = sparse_decode(self, x_c, b_dec_in, *aux.joined(values, latents, tokens, offsets))
        acts = acts[:len(values)]
        self._update_threshold(acts.detach())
        n = len(x)
        x_hat = decoded[:n] + self.b_dec
        sq_err, total_var = reconstruction_terms(x, x_hat)
        fvu = sq_err / total_var
        loss = fvu + aux.loss(decoded[n:], (x - x_hat).detach()) / total_var
        live = acts.detach() > 0
        return StepOut(loss, fvu.detach(), sq_err.detach(), live.sum().float() / len(x),
                       fired_latents(latents, live, self.d_sae))

    @torch.no_grad()
    def _update_threshold(self, acts: torch.Tensor) -> None:
        kept = acts[acts > 0]
        if not kept.numel():
            return
        smallest = kept.min()
        t = self.global_threshold
        t.copy_(smallest if t < 0 else THRESHOLD_MOMENTUM * t + (1 - THRESHOLD_MOMENTUM) * smallest)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, batch_size: int) -> None:
        """θ again from the final weights: the mean over batches of `x` of the smallest kept
        activation, which the moving average estimates during training. The average lags the
        weights (a short run ends with θ from weights long gone: measured L0 6 at k 16 after
        100 steps), and a schedule-free run saves averaged weights, not the ones θ followed."""
        ctx = StepContext(torch.zeros(self.d_sae, dtype=torch.bool, device=self.W_enc.device), 0.0, False)
        smallest = []
        for b in x.split(batch_size):
            if smallest and len(b) < batch_size:  # a shorter batch's smallest kept value is larger
                break
            b = b.to(self.W_enc.device, torch.float32)
            b_c = b - self.b_dec if self.apply_b_dec_to_input else b
            values, _, _ = batch_topk_pairs(self, b_c, ctx, AuxPicker(self, ctx))
            if len(values):
                smallest.append(values.min())
        if smallest:
            self.global_threshold.copy_(torch.stack(smallest).mean())

    @torch.no_grad()
    def to_inference(self) -> JumpReLUSAE:
        out = JumpReLUSAE(self.d_in, self.d_sae, apply_b_dec_to_input=self.apply_b_dec_to_input).to(self.W_enc.device)
        for name in SAE.TENSOR_NAMES:
            getattr(out, name).copy_(getattr(self, name))
        out.threshold.fill_(max(float(self.global_threshold), 0.0))
        return out


@torch.no_grad()
def batch_topk_pairs(sae: BatchTopKSAE, x_in: torch.Tensor, ctx: StepContext,
                     aux: AuxPicker) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positive entries among the k·N largest ReLU pre-activations of the batch, exactly
    (up to ties), as fp32 values, tokens and latents, sorted by token; AuxK picks its dead
    latents from the same blocks.

    A flat top-k·N over the dense [N × d_sae] matrix needs that matrix (1 GiB at 4096 × 65,536)
    and is slow (one thread: 30 s at that size, measured). Instead each block of tokens gives
    its tokens' top m = ROW_CANDIDATES·k, and τ, the k·N-th largest of those candidates, is a
    lower bound on the batch's true cut. A token whose m-th candidate is below τ has nothing
    else above the cut; the few tokens whose m-th candidate reaches τ are computed again and
    give every entry ≥ τ. The batch's top k·N is then among the candidates.
    """
    n, d = len(x_in), sae.d_sae
    keep = min(sae.k * max(n, 1), n * d)
    m = min(d, ROW_CANDIDATES * sae.k)
    values, latents = top_per_row(sae, x_in, ctx, aux, m)
    values = values.float().relu_()
    tokens = torch.arange(n, device=x_in.device).unsqueeze(1).expand(n, m)
    if m < d:  # tokens left out latents: find the ones that may hold more of the top k·N
        tau = values.reshape(-1).topk(min(keep, values.numel()), sorted=False).values.min()
        floor = values.min(1).values
        again = ((floor >= tau) & (floor > 0)).nonzero().squeeze(1)
        if len(again):
            rest = torch.ones(n, dtype=torch.bool, device=x_in.device)
            rest[again] = False
            extra = _entries_at_least(sae, x_in[again], ctx, tau)
            values, tokens, latents = (torch.cat([values[rest].reshape(-1), extra[0]]),
                                       torch.cat([tokens[rest].reshape(-1), again[extra[1]]]),
                                       torch.cat([latents[rest].reshape(-1), extra[2]]))
    values, tokens, latents = values.reshape(-1), tokens.reshape(-1), latents.reshape(-1)
    if len(values) > keep:
        values, top = values.topk(keep, sorted=False)
        tokens, latents = tokens[top], latents[top]
    positive = values > 0
    values, tokens, latents = values[positive], tokens[positive], latents[positive]
    order = torch.argsort(tokens, stable=True)
    return values[order], tokens[order], latents[order]


def _entries_at_least(sae: BatchTopKSAE, x_in: torch.Tensor, ctx: StepContext,
                      tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, row, latent) of every positive pre-activation ≥ τ of these tokens."""
    vs, rows, ls = [], [], []
    start = 0
    for c0, pre in pre_blocks(sae, x_in, ctx):
        pre = pre.float()
        r, l = ((pre >= tau) & (pre > 0)).nonzero(as_tuple=True)
        vs.append(pre[r, l])
        rows.append(r + start)
        ls.append(l + c0)
        if c0 + pre.shape[1] == sae.d_sae:
            start += len(pre)
    return _joined(vs), _joined(rows), _joined(ls)
