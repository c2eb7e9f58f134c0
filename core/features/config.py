"""What discovery keeps per latent (its config) and what a run reports (its summary)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from core.errors import UserError

Batch = tuple
"""(input_ids LongTensor[B,T], attention_mask LongTensor[B,T], row_ids LongTensor[B], acts FloatTensor[B,T,d_in]
[, doc_ids LongTensor[B]]); without doc_ids every row counts as its own document."""


@dataclass
class DiscoverConfig:
    """What discovery keeps per latent. The caller picks the batch size: a batch of n non-pad
    tokens is encoded at once into a dense [n, d_sae] fp32 matrix (4096 × 4608 ≈ 75 MB), or for a
    TopK SAE, 128 MiB of pre-activations at a time, into its (values, indices) [n, k]. The running
    state's size is fixed by these fields and the width (`accumulator.state_bytes`)."""

    top_k: int = 20
    """Examples kept per latent: the exact top activations over every token position."""
    window_before: int = 8
    """Context tokens kept before the max-activating token."""
    window_after: int = 4
    """Context tokens kept after it."""
    max_norm: float | None = None
    """Tokens whose activation norm exceeds this are outliers (excluded from top-k and
    statistics, listed in outliers.parquet). Pass the training run's
    `final["outlier_norm_threshold"]` to use the same cut as training."""
    outlier_norm_multiple: float | None = 10.0
    """When max_norm is None: the cut is this × the median norm of the first batch; None disables."""
    row_group_latents: int = 64
    """Latents per row group of examples.parquet (smaller = finer filtering, more overhead)."""
    n_quantiles: int = 10
    """Quantile bins of each latent's firing distribution (deciles by default); 0 disables."""
    quantile_examples: int = 5
    """Examples per quantile bin: the reservoir holds n_quantiles × quantile_examples tokens."""
    one_per_document: bool = False
    """Top examples hold at most one token per document (its best); quantile samples stay per token."""
    min_frequency: float = 0.0
    """Latents firing on a smaller fraction of tokens keep their statistics but no examples."""
    n_coactive: int = 8
    """Strongest other latents recorded at each example's token (its co-occurring features)."""
    seed: int = 0
    """Seed of the quantile reservoir's random keys: the same data and seed give the same samples."""

    def check(self) -> None:
        if self.top_k < 1 or self.window_before < 0 or self.window_after < 0:
            raise UserError(f"top_k={self.top_k}, window_before={self.window_before}, window_after={self.window_after}: "
                            "use top_k >= 1 and windows >= 0")
        if self.n_quantiles < 0 or self.quantile_examples < 0 or self.n_coactive < 0:
            raise UserError("n_quantiles, quantile_examples and n_coactive must be 0 or more")
        if not 0.0 <= self.min_frequency <= 1.0:
            raise UserError(f"min_frequency={self.min_frequency} must be a fraction between 0 and 1")

    @property
    def reservoir(self) -> int:
        return self.n_quantiles * self.quantile_examples


class DiscoverySummary(NamedTuple):
    n_latents: int
    """d_sae of the SAE."""
    tokens: int
    """Token positions scored (non-pad, outliers excluded); the denominator of frequency."""
    features_in_heap: int
    """Latents with at least one example with activation > 0."""
    heap_examples_count: int
    """Top examples held with activation > 0."""
    live_features: int
    """Latents that fired (activation > 0) on at least one token."""
    paths: dict
    """File name stem → path: features, examples, outliers, info."""
    excluded_outliers: int = 0
    """Non-pad tokens excluded as norm outliers."""
    quantile_examples_count: int = 0
    """Quantile examples held (a uniform sample of firing tokens per latent)."""
    excluded_special: int = 0
    """Non-pad positions left out by token id (BOS, EOS, pad: `exclude_token_ids`)."""
