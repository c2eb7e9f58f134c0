"""What every number in an SAE's metrics means and whose definition it follows.

Front ends show a metric through this table, so each number carries its convention: ours
(miStudio: special tokens and norm outliers set aside and left clean in every spliced forward)
or SAELens's (`sae_lens.evals.run_evals` with special tokens excluded: every other position
spliced, every position ablated). README's "Evaluation" section prints the same table.
"""

from __future__ import annotations

from typing import NamedTuple

OURS, SAELENS = "miStudio", "SAELens"


class Metric(NamedTuple):
    label: str  # short column title
    convention: str  # OURS or SAELENS
    meaning: str  # one line: the formula and the tokens it is over

    def tooltip(self) -> str:
        return f"{self.convention}'s definition: {self.meaning}"


METRICS: dict[str, Metric] = {
    "l0": Metric("L0", OURS, "mean number of non-zero latents per evaluated token"),
    "fvu": Metric("FVU", OURS, "Σ‖x − x̂‖² / Σ‖x − x̄‖² over the evaluated tokens (no special token, no norm outlier)"),
    "mse": Metric("MSE", OURS, "Σ‖x − x̂‖² / (N·d_in): mean squared error per element"),
    "cos_sim": Metric("cosine", OURS, "mean cosine similarity of x and x̂"),
    "dead_frac": Metric("dead", OURS, "share of latents that did not fire in training's last dead_tokens tokens (default 4 × d_sae, shrinking to 1 × from 16 × d_sae tokens trained; 32 × under adam)"),
    "eval_dead_frac": Metric("dead (slice)", OURS, "share of latents that never fired on the held-out slice"),
    "dense_frac": Metric("dense", OURS, "share of latents firing on more than 10% of the evaluated tokens"),
    "ce_loss_recovered_zero": Metric(
        "CE rec. (zero)", OURS, "(CE_zero − CE_SAE) / (CE_zero − CE_clean); the SAE and zeros spliced at the "
        "evaluated tokens only, CE over every position whose next token is real"),
    "ce_loss_recovered_mean": Metric("CE rec. (mean)", OURS, "the same against the mean activation of the evaluated "
                                                              "tokens"),
    "kl_sae": Metric("KL", OURS, "mean KL(clean ‖ SAE spliced) of the next-token distributions, nats"),
    "explained_variance": Metric("explained var.", SAELENS, "1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over every non-special "
                                                             "token (no norm guard)"),
    "ce_loss_score": Metric(
        "CE score", SAELENS, "(CE_ablation − CE_SAE) / (CE_ablation − CE_clean); the SAE spliced at every "
        "non-special position, zeros at every position (BOS included), CE over non-special positions"),
    "kl_div_score": Metric("KL score", SAELENS, "(KL_ablation − KL_SAE) / KL_ablation, KL over every non-special "
                                                "position"),
    "kl_div_with_sae": Metric("KL (SAELens)", SAELENS, "mean KL(clean ‖ SAE spliced) over every non-special "
                                                       "position, nats"),
    "ce_loss_score_mean_ablation": Metric("CE score (mean)", SAELENS, "ce_loss_score with every position set to the "
                                                                      "mean activation (not in SAELens; its rules)"),
}
"""The headline metrics, in display order. eval.json holds more (each CE and KL part, counts):
core.evals.spliced.evaluate_sae documents every key."""


def headline(metrics: dict) -> list[tuple[str, Metric, object]]:
    """(key, definition, value) of the headline metrics present in `metrics`, in table order."""
    return [(k, m, metrics[k]) for k, m in METRICS.items() if metrics.get(k) is not None]
