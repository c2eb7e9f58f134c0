"""Sparse autoencoders: one file per type behind one interface.

Types (SAELens names): `standard` (ReLU + L1), `topk` (TopK + AuxK), `jumprelu` (JumpReLU,
straight-through threshold), and `batchtopk`, which trains as BatchTopK and is saved as
`jumprelu` with its learned global threshold. Each type file registers itself with
`core.sae.registry` and carries its own config dataclass; adding a type is adding a file and
importing it below.

SAEs are saved and loaded as SAELens folders by `core.formats.saelens` (which this package
does not import: the formats depend on the SAE types, not the other way round).
"""

from __future__ import annotations

from core.sae import registry
from core.sae.base import SAE, SAEConfig, SAETypeConfig, StepContext, StepOut
from core.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from core.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from core.sae.registry import build_sae
from core.sae.standard import StandardConfig, StandardSAE
from core.sae.topk import TopKConfig, TopKSAE

__all__ = ["SAE", "SAEConfig", "SAETypeConfig", "StepContext", "StepOut", "registry", "StandardSAE",
           "StandardConfig", "TopKSAE", "TopKConfig", "JumpReLUSAE", "JumpReLUConfig", "BatchTopKSAE",
           "BatchTopKConfig", "build_sae"]
