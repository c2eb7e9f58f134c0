"""SAELens's own evals on our exported SAE, beside the figures our evaluation recorded.

The check behind "numbers other labs can reproduce": the SAE folder we export is loaded with
`sae_lens.SAE.load_from_disk`, the model is rebuilt as a TransformerLens `HookedTransformer`
from the same weights, and `sae_lens.evals.run_evals` — SAELens's defaults, special tokens
excluded — runs over the same held-out rows. Every SAELens-convention figure in our `eval.json`
(explained_variance, ce_loss_score, kl_div_score and their parts) must equal SAELens's within
0.01 (tests/test_evaluate.py holds the same check at 1e-4 on a tiny model).

    .venv/bin/python -m bench.parity [--home mistudio_data] [--sae SAE_ID] [--no-record]

reads the SAE folder (default: the newest trained SAE, e.g. the demo's; `mistudio saes export`
copies that folder as is) and its held-out rows from
the studio's registry; run `DEMO_SERVE=0 make demo` first. Needs `sae-lens` (a test dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch

# The figures compared: SAELens's metric names, as our eval.json records them too.
FIGURES = ("explained_variance", "ce_loss_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
           "kl_div_score", "kl_div_with_sae", "kl_div_with_ablation")
TARGET = 0.01


def hooked_transformer(hf_model, model_folder: Path):
    """`hf_model` as a TransformerLens HookedTransformer, weights unprocessed (no LayerNorm
    folding or centring), so its hook activations equal the Hugging Face model's.
    `model_folder` holds the model's config.json (TransformerLens reads the architecture there)
    and its tokenizer files (TransformerLens re-reads the tokenizer by name)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    cfg = HookedTransformerConfig(**loading.convert_hf_model_config(str(model_folder)),
                                  device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    state = loading.get_pretrained_state_dict(str(model_folder), cfg, hf_model=hf_model)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


class RowStore:
    """What `run_evals` reads of an ActivationsStore: our rows, one per batch (rows differ in
    length and SAELens's forwards take no padding mask, so each row is its own batch)."""

    def __init__(self, rows: Sequence[Sequence[int]]):
        self.rows = [torch.tensor(r, dtype=torch.long) for r in rows]
        self.store_batch_size_prompts = 1
        self.context_size = max(len(r) for r in self.rows)
        self.reset_input_dataset()

    def reset_input_dataset(self) -> None:
        self._next = iter(self.rows)

    def get_batch_tokens(self, batch_size: int | None = None) -> torch.Tensor:
        assert batch_size in (None, 1), "RowStore serves one row per batch"
        return next(self._next)[None]


def saelens_figures(sae_dir: Path, model, rows: Sequence[Sequence[int]],
                    exclude_special_tokens: bool | Sequence[int] = True) -> dict[str, Any]:
    """SAELens's `run_evals` on `rows` with the SAE folder `sae_dir` (loaded by SAELens) spliced
    into the HookedTransformer `model`: its figures under their own names (FIGURES)."""
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    config = EvalConfig(batch_size_prompts=1, n_eval_reconstruction_batches=len(rows), compute_kl=True,
                        compute_ce_loss=True, n_eval_sparsity_variance_batches=len(rows),
                        compute_variance_metrics=True)
    metrics, _ = run_evals(sae, RowStore(rows), model, ActivationScaler(), config,
                           exclude_special_tokens=exclude_special_tokens)
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    return {k: flat[k] for k in FIGURES}


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(figure, ours, SAELens's, |difference|) for every figure in FIGURES."""
    return [(k, ours[k], theirs[k], abs(ours[k] - theirs[k])) for k in FIGURES]


def _held_out(home: Path, sae_id: str | None):
    """(SAE row, its model folder, the dataset folder, the held-out rows) from the registry."""
    from core.data import iter_batches
    from storage import Registry, Settings
    from storage.registry import SAE, Activation, Dataset, Job, Model

    reg = Registry.of(Settings.from_env({"MISTUDIO_HOME": str(home)}))
    saes = [s for s in reg.list(SAE) if s["training_job_id"] and sae_id in (None, s["id"])]
    if not saes:
        raise SystemExit(f"no trained SAE {sae_id or ''} in {home}: run `DEMO_SERVE=0 make demo` first")
    sae = max(saes, key=lambda s: s["created_at"])
    if sae["activation_id"]:  # trained on cached activations: their dataset holds the held-out rows
        dataset_id = reg.get(Activation, sae["activation_id"])["dataset_id"]
    else:  # trained on the fly: the job's first dataset
        dataset_id = reg.get(Job, sae["training_job_id"])["spec"]["dataset_ids"][0]
    dataset = reg.get(Dataset, dataset_id)
    model = reg.get(Model, sae["model_id"])
    n = sae["metrics"]["eval_rows"]
    rows = [row for b in iter_batches(Path(dataset["path"]), 1, 0, max_rows=n) for row in b.input_ids.tolist()]
    return sae, Path(model["path"]), rows


def main(argv: list[str] | None = None) -> None:
    from bench import _common

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=Path("mistudio_data"), help="the studio's data root")
    ap.add_argument("--sae", default=None, help="SAE id (default: the newest trained SAE)")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    sae, model_folder, rows = _held_out(a.home, a.sae)
    from core.models import load_model

    hf_model, _ = load_model(model_folder)
    ours = json.loads((Path(sae["path"]) / "eval.json").read_text())
    theirs = saelens_figures(Path(sae["path"]), hooked_transformer(hf_model, model_folder), rows)
    table = compare(ours, theirs)
    worst = max(d for *_, d in table)
    lines = [f"SAE {sae['id']} at {sae['hook_name']}, {len(rows)} held-out rows ({sum(map(len, rows)):,} tokens)", "",
             "| figure | miStudio eval.json | SAELens run_evals | difference |", "|---|---|---|---|",
             *(f"| {k} | {o:.4f} | {t:.4f} | {d:.1e} |" for k, o, t, d in table),
             "", f"Largest difference {worst:.1e} (target ≤ {TARGET}: {'met' if worst <= TARGET else 'NOT met'}). "
             f"Our own definitions on the same SAE: FVU {ours['fvu']:.4f}, CE loss recovered "
             f"{ours['ce_loss_recovered_zero']:.4f} (zero) / {ours['ce_loss_recovered_mean']:.4f} (mean), "
             f"KL {ours['kl_sae']:.4f}; L0 {sae['metrics']['l0']:.1f}, dead latents "
             f"{100 * sae['metrics']['dead_frac']:.2f}% (training's window)."]
    print("\n".join(lines))
    if not a.no_record:
        _common.append_result("bench/parity.py — SAELens's run_evals on the demo's exported SAE", "\n".join(lines))


if __name__ == "__main__":
    main()
