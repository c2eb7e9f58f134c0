"""Labels for features (interpretation), split as delphi splits it:

* `types`: Label, FeatureContext, CATEGORIES and the endpoint errors every part shares;
* `explainers/`: who writes a label — `heuristic` (top tokens and the NLP summary, no model) and
  `llm` (the editable prompt template a model is asked with, and the parsing of its answer);
* `clients/`: the models an LLM label or a score is asked of — `local` (a Hugging Face causal LM
  in this process, the embedded SmolLM2 by default, offline) and `openai` (any OpenAI-compatible
  chat-completions endpoint);
* `scorers/`: how good a label is — `detection` (can a judge model pick the feature's contexts
  out of a mix by the label?), behind the small `base`;
* `label`: the orchestration, `label_features` / `label_many`.

The names other layers use are importable from here."""

from core.interp.types import (CATEGORIES, EndpointError, EndpointUnreachable, FeatureContext, Label,
                               marked)
from core.interp.explainers.heuristic import heuristic_label
from core.interp.explainers.llm import DEFAULT_TEMPLATE, PLACEHOLDERS, PromptTemplate, parse_label
from core.interp.clients.local import LocalLabeler
from core.interp.clients.openai import BASE_URL_ENV, KEY_ENV, OpenAILabeler, check_url, environment_key
from core.interp.scorers.detection import DETECT_QUESTION, DetectionResult, detection_score
from core.interp.label import Labeled, label_features, label_many

__all__ = ["BASE_URL_ENV", "CATEGORIES", "DEFAULT_TEMPLATE", "DETECT_QUESTION", "KEY_ENV",
           "PLACEHOLDERS", "check_url", "detection_score", "DetectionResult", "EndpointError",
           "EndpointUnreachable", "environment_key", "FeatureContext", "heuristic_label", "Label",
           "label_features", "label_many", "Labeled", "LocalLabeler", "marked", "OpenAILabeler",
           "parse_label", "PromptTemplate"]
