"""Sparse autoencoders: one module per architecture behind one interface.

Architectures (SAELens names): `standard` (ReLU + L1), `topk` (TopK + AuxK), `jumprelu`
(JumpReLU, straight-through threshold), and `batchtopk`, which trains as BatchTopK and is
saved as `jumprelu` with its learned global threshold. Adding an architecture is adding a
module with an `SAE` subclass and registering it below.

SAEs are saved and loaded as SAELens folders by `core.formats.saelens` (which this package
does not import: the formats depend on the SAE types, not the other way round).
"""

from __future__ import annotations

from core.errors import UserError
from core.sae.base import SAE, SAEConfig, StepContext, StepOut, check_k
from core.sae.batchtopk import BatchTopKSAE
from core.sae.jumprelu import JumpReLUSAE
from core.sae.standard import StandardSAE
from core.sae.topk import TopKSAE

__all__ = ["SAE", "SAEConfig", "StepContext", "StepOut", "check_k", "StandardSAE", "TopKSAE", "JumpReLUSAE",
           "BatchTopKSAE", "INFERENCE_ARCHITECTURES", "TRAINING_ARCHITECTURES", "build_sae"]

INFERENCE_ARCHITECTURES: dict[str, type[SAE]] = {"standard": StandardSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE}
"""What a cfg.json's `architecture` may say."""
TRAINING_ARCHITECTURES: dict[str, type[SAE]] = INFERENCE_ARCHITECTURES | {"batchtopk": BatchTopKSAE}
"""What a training config's `architecture` may say."""


def build_sae(architecture: str, d_in: int, d_sae: int, k: int = 0, **kwargs) -> SAE:
    """A freshly initialised SAE of a training architecture."""
    cls = TRAINING_ARCHITECTURES.get(architecture)
    if cls is None:
        raise UserError(f"unknown SAE architecture '{architecture}'; pick one of {', '.join(TRAINING_ARCHITECTURES)}")
    if architecture in ("topk", "batchtopk"):
        return cls(d_in, d_sae, k, **kwargs)
    return cls(d_in, d_sae, **kwargs)
