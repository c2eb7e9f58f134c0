"""Reconstruction metrics of an SAE on activations: MSE, FVU and L0 (no model needed).

FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all the tokens given (1 − SAELens's explained variance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.sae import SAE


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """MSE (per element), FVU = Σ‖x−x̂‖²/Σ‖x−x̄‖², and mean L0 over all of `x`."""
    mean = x.double().mean(0)
    sq_err = total_var = l0 = 0.0
    pre = None
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size]
        if hasattr(sae, "encode_topk") and xb.dim() == 2:
            # A TopK SAE's k activations per token, decoded as a sum of k rows: of the dense
            # [n × d_sae] tensors only the pre-activations are held, in one reused buffer (the
            # dense forward held four: at 16,384 latents it was a training job's peak).
            if pre is None:
                pre = torch.empty(len(xb), sae.d_sae, dtype=sae.W_enc.dtype, device=xb.device)
            values, indices = sae.encode_topk(xb, out=pre[:len(xb)])
            x_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec
            l0 += float((values > 0).sum())
        else:
            x_hat, z = sae(xb)
            l0 += float((z > 0).sum())
        sq_err += float((x_hat - xb).double().pow(2).sum())
        total_var += float((xb.double() - mean).pow(2).sum())
    n = max(len(x), 1)
    return {"mse": sq_err / (n * x.shape[1]), "fvu": sq_err / max(total_var, 1e-12), "l0": l0 / n}
