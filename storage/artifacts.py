"""Where each artifact lives under the data root, and its copy in the artifact store.

One function per kind keeps the layout in one place; writers use `core.io.atomic_dir` on
these paths so a reader never sees a half-written folder. With an object-store root
(MISTUDIO_ARTIFACT_ROOT) a finished artifact is `push`ed there, and a reader `pull`s what this
node lacks (storage.store); without one both are no-ops.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class Artifacts:
    def __init__(self, home: Path, root_uri: str = ""):
        self.home = Path(home)
        self.store = None
        if root_uri:
            from storage.store import ArtifactStore

            self.store = ArtifactStore(root_uri, self.home)

    @classmethod
    def of(cls, settings) -> "Artifacts":
        return cls(settings.home, settings.artifact_root)

    def pull(self, path: str | Path) -> Path:
        """`path`, fetched from the artifact store first if this node lacks it (or holds an old copy)."""
        return self.store.pull(path) if self.store else Path(path)

    def push(self, path: str | Path) -> None:
        """Publish a finished artifact folder to the artifact store."""
        if self.store:
            self.store.push(path)

    def remove(self, path: str | Path) -> None:
        """Delete a scratch folder here and in the artifact store."""
        if self.store:
            self.store.delete(path)
        shutil.rmtree(path, ignore_errors=True)

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
