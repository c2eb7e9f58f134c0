"""The steps of a miStudio run, composed from the engine's pieces.

Each step takes plain inputs (a loaded model, folders, a config) and returns plain outputs, so
the ModelWorker, a notebook and the tests all call the same functions. Progress and cancel
callbacks pass straight through to the engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from core import data, extract, hooks
from core.discover import DiscoverConfig, DiscoverySummary, discover
from core.errors import UserError
from core.sae import SAEConfig, load_saelens, save_saelens
from core.train import TrainConfig, TrainResult, train_sae

Progress = Callable[[dict], None] | None
CancelCheck = Callable[[], bool] | None


def tokenize_dataset(tokenizer, source: str, out_dir: Path, text_column: str = "text",
                     context_length: int = 256, max_documents: int | None = None,
                     progress: Progress = None) -> data.DatasetStats:
    """Load texts from `source` and write them as Parquet token shards under `out_dir`."""
    if context_length < 2:
        raise UserError(f"context length {context_length} is too short; use --context-length 2 or more")
    texts = data.load_texts(source, text_column=text_column, limit=max_documents)
    return data.tokenize_to_shards(texts, tokenizer, out_dir, context_length=context_length,
                                   progress=progress)


def extract_activations(model, tokenizer, dataset_dir: Path, hook_names: list[str], out_dir: Path,
                        batch_size: int = 8, max_tokens: int | None = None,
                        progress: Progress = None, should_cancel: CancelCheck = None
                        ) -> dict[str, extract.HookStats]:
    """Run the hooked forward over a tokenized dataset and stream activations to Parquet."""
    hooks.validate_hooks(model, hook_names)
    batches = data.iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens)
    return extract.extract(model, batches, hook_names, out_dir, progress=progress, should_cancel=should_cancel,
                           total_tokens=_total_tokens(dataset_dir, max_tokens))


def train_on_activations(hook_dir: Path, out_dir: Path, cfg: TrainConfig, meta: dict[str, Any],
                         progress: Progress = None, should_cancel: CancelCheck = None
                         ) -> tuple[TrainResult, SAEConfig]:
    """Train a TopK SAE on cached activations and save it as a SAELens folder.

    `meta` fills the cfg.json metadata: model_name, hook_name, context_size, dataset_path.
    """
    stats = extract.read_hook_stats(hook_dir)
    d_sae = stats.d_model * cfg.expansion_factor
    if not 1 <= cfg.k <= d_sae:
        raise UserError(f"k={cfg.k} must be between 1 and the SAE width {d_sae}; lower --k or raise --expansion")
    if cfg.total_tokens is None:  # known from the extraction: spares train_sae a counting pass
        cfg = dataclasses.replace(cfg, total_tokens=stats.tokens * cfg.epochs)
    result = train_sae(lambda: extract.iter_activations(hook_dir), stats.d_model, cfg,
                       progress=progress, should_cancel=should_cancel)
    sae_cfg = SAEConfig(d_in=stats.d_model, d_sae=d_sae, k=cfg.k, **meta)
    save_saelens(result.sae, sae_cfg, out_dir)
    return result, sae_cfg


def discover_features(model, tokenizer, sae_dir: Path, dataset_dir: Path, out_dir: Path,
                      cfg: DiscoverConfig, batch_size: int = 8, max_tokens: int | None = None,
                      progress: Progress = None, should_cancel: CancelCheck = None) -> DiscoverySummary:
    """Top activating contexts, frequency and max/mean activation for every latent of an SAE."""
    sae, sae_cfg = load_saelens(sae_dir)
    hook_name = sae_cfg.hook_name
    hooks.validate_hooks(model, [hook_name])
    d_model = model.config.hidden_size
    if sae_cfg.d_in != d_model:
        raise UserError(f"SAE d_in={sae_cfg.d_in} does not match {hook_name} of this model (d_model={d_model}); "
                        "pick the model the SAE was trained on")
    sae = sae.to(next(model.parameters()).device)
    total = _total_tokens(dataset_dir, max_tokens)

    def hooked_batches():
        for b in data.iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens):
            acts = hooks.run_hooked(model, b.input_ids, b.attention_mask, [hook_name])[hook_name]
            yield b.input_ids, b.attention_mask, b.row_ids, acts

    with torch.no_grad():
        return discover(sae, hooked_batches(), out_dir, lambda ids: decode_tokens(tokenizer, ids), cfg,
                        total_tokens=total, progress=progress, should_cancel=should_cancel)


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (byte-level markers like 'Ġ' resolved)."""
    return [tokenizer.decode([i]) for i in ids]


def _total_tokens(dataset_dir: Path, max_tokens: int | None) -> int:
    tokens = data.read_stats(dataset_dir).tokens
    return min(tokens, max_tokens) if max_tokens else tokens

