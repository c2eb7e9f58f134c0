"""Reconstruction metrics of an SAE on activations: MSE, FVU and L0 (no model needed).

FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all the tokens given (1 − SAELens's explained variance).
"""

from __future__ import annotations

import torch

from core.sae import SAE


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """MSE (per element), FVU = Σ‖x−x̂‖²/Σ‖x−x̄‖², and mean L0 over all of `x`."""
    mean = x.double().mean(0)
    sq_err = total_var = l0 = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size]
        x_hat, z = sae(xb)
        sq_err += float((x_hat - xb).double().pow(2).sum())
        total_var += float((xb.double() - mean).pow(2).sum())
        l0 += float((z > 0).sum())
    n = max(len(x), 1)
    return {"mse": sq_err / (n * x.shape[1]), "fvu": sq_err / max(total_var, 1e-12), "l0": l0 / n}
