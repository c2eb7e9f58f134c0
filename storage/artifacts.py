"""Where each artifact lives under the data root.

One function per kind keeps the layout in one place; writers use `core.io.atomic_dir` on
these paths so a reader never sees a half-written folder.
"""

from __future__ import annotations

from pathlib import Path


class Artifacts:
    def __init__(self, home: Path):
        self.home = Path(home)

    def model(self, model_id: str) -> Path:
        """A Hugging Face model folder (safetensors + tokenizer)."""
        return self.home / "models" / model_id

    def dataset(self, dataset_id: str) -> Path:
        """Parquet token shards + stats.json."""
        return self.home / "datasets" / dataset_id

    def activations(self, job_id: str) -> Path:
        """One sub-folder per hook name with Parquet activation shards."""
        return self.home / "activations" / job_id

    def sae(self, sae_id: str) -> Path:
        """A SAELens folder: cfg.json + sae_weights.safetensors."""
        return self.home / "saes" / sae_id

    def features(self, sae_id: str) -> Path:
        """features.parquet + examples.parquet."""
        return self.home / "features" / sae_id

    def checkpoints(self, job_id: str) -> Path:
        """Training checkpoints (ckpt-*.pt) of one train job."""
        return self.home / "checkpoints" / job_id
