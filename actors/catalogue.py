"""What a front end may offer: the vocabularies behind the dashboard's controls and the CLI's
choices (job states and kinds, hook sites, quantizations, SAE types and formats, label
categories, file types, template kinds), each a thin static call into core, storage or the job
kinds. The `Client` inherits them, so the pages talk to the Client alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from storage.registry import FINAL_STATES, JOB_STATES


class TemplateKinds(NamedTuple):
    """What a template can hold: a job kind's form, or one of the two prompt kinds."""
    jobs: tuple[str, ...]  # one per job kind: its spec's fields
    prompt_sets: str  # steering prompt sets
    label_prompt: str  # labeling prompts


class Catalogue:
    """Static vocabularies; every method imports what it reads lazily, so a page pays only for
    what it shows."""

    @staticmethod
    def job_states() -> tuple[str, ...]:
        return JOB_STATES

    @staticmethod
    def final_states() -> tuple[str, ...]:
        """States a job never leaves (completed, failed, cancelled)."""
        return FINAL_STATES

    @staticmethod
    def hook_sites() -> tuple[str, ...]:
        from core.hooks import SITES

        return SITES

    @staticmethod
    def hook_name(layer: int, site: str = "resid_post") -> str:
        """The TransformerLens name of a decoder block's hook site, e.g. blocks.6.hook_resid_post."""
        from core.hooks import hook_name

        return hook_name(layer, site)

    @staticmethod
    def quantizations() -> tuple[str, ...]:
        from core.models import QUANTIZATIONS

        return QUANTIZATIONS

    @staticmethod
    def estimate_memory(source: str, **options: Any):
        """core.models' MemoryEstimate of a model from its config alone (no weights are loaded);
        `source` "embedded" is the embedded SmolLM2. `options`: dtype, quantization, batch_size,
        context_length, trust_remote_code."""
        from core import models

        return models.estimate_memory(models.embedded_gguf_path() if source == "embedded" else source, **options)

    @staticmethod
    def sae_formats() -> tuple[str, ...]:
        """The SAE file formats import_sae reads."""
        from core.formats import FORMATS

        return FORMATS

    @staticmethod
    def metric_definitions():
        """core.evals' {metric key: Metric(label, convention, meaning)}: every headline number of an
        SAE with the definition (ours or SAELens's) it follows, in display order."""
        from core.evals.definitions import METRICS

        return METRICS

    @staticmethod
    def label_categories() -> tuple[str, ...]:
        from core.interp import CATEGORIES

        return CATEGORIES

    @staticmethod
    def data_file_types() -> tuple[str, ...]:
        """The suffixes of the text files a dataset can be added from."""
        from core.data import FILE_TYPES

        return FILE_TYPES

    @staticmethod
    def builtin_dataset() -> str:
        """The source name of the first built-in corpus (the standard library's documentation)."""
        from core.data import BUILTIN

        return BUILTIN

    @staticmethod
    def builtin_corpora() -> dict[str, str]:
        """The built-in corpora a dataset can be added from (available offline): name → what it is."""
        from core.data import CORPORA

        return {name: c.about for name, c in CORPORA.items()}

    @staticmethod
    def template_kinds() -> TemplateKinds:
        from actors import jobs
        from actors.specs import LABEL_PROMPT, PROMPT_SETS

        return TemplateKinds(tuple(jobs.names()), PROMPT_SETS, LABEL_PROMPT)

    @staticmethod
    def load_tokenizer(path: str):
        """The Hugging Face tokenizer in a model's local folder (see `local`)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    @staticmethod
    def job_kind(kind: str) -> dict[str, Any]:
        """A kind's name, whether it can pause/resume/finalize, and the steps it runs."""
        from actors import jobs

        return jobs.get(kind).info()

    @staticmethod
    def train_defaults() -> dict[str, Any]:
        """The training config's defaults in its flat job-file form (architecture, k, lr, ...)."""
        from core.train import TrainConfig

        return TrainConfig().to_dict()

    @staticmethod
    def sae_types() -> list[dict[str, Any]]:
        """The trainable SAE types and their settings (name, default, help), for forms."""
        from core.sae import registry

        return registry.catalogue()
