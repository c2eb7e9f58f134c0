"""How good an SAE is: one home for the metrics every job reports.

* `reconstruction` — MSE, FVU and L0 of an SAE on activation tensors (no model): what training
  reports on its held-out slice.
* `spliced` — the SAE spliced into the model at its hook on held-out rows: reconstruction and
  density over the slice, next-token CE loss recovered against zero and mean ablation, and KL.
"""
