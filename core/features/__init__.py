"""Features of an SAE: discovery (which tokens each latent fires on) and the feature tables it
writes, with one read path.

* schema.py — file names, columns, histogram edges, the feature-listing query;
* config.py — what discovery keeps (DiscoverConfig) and reports (DiscoverySummary);
* batch.py, tables.py, accumulator.py — the running state: update(batch), merge(other), finalize();
* writer.py — the atomic, columnar Parquet writes;
* store.py — every read of a features folder (pages, examples, histograms, info, co-activity);
* discovery.py — `discover(...)`, the driver, and `discover_features` over a dataset with the model.

The torch side (the accumulator and the driver) is imported on first use, so readers of feature
tables (the registry, the Client) do not load torch for them.
"""

from core.features.config import Batch, DiscoverConfig, DiscoverySummary
from core.features.schema import HIST_EDGES, FeaturePage, FeatureQuery

__all__ = ["Accumulator", "Batch", "DiscoverConfig", "Discovered", "DiscoverySummary", "FeaturePage", "FeatureQuery",
           "HIST_EDGES", "discover", "discover_features"]

_LAZY = {"Accumulator": "core.features.accumulator", "Discovered": "core.features.accumulator",
         "discover": "core.features.discovery", "discover_features": "core.features.discovery"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'core.features' has no attribute {name!r}")
