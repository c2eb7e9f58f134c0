"""Feature exports: one JSON document per feature that a feature page renders from, written
as Neuronpedia-style batch files or as a zipped dashboard bundle.

A document follows the field names of SAEDashboard's Neuronpedia batches (feature_index,
activations with bin_min/bin_max/bin_contains/tokens/values, pos_str/pos_values,
neg_str/neg_values, frac_nonzero, freq_hist_data_bar_values/heights) and adds miStudio's own
measured fields under their own names (explanation, similar_features, coactive_features,
ablation, nlp). Fields we do not compute (correlated neurons, logit histograms) are absent
rather than made up. Top activations carry bin_min = -1 and bin_contains = -1 as in those
batches; a quantile bin carries its activation range and the share of firing tokens it holds.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from core.features import store
from core.io import atomic_dir, atomic_file

BUNDLE_FORMAT = "mistudio-feature-bundle/1"


def _activation(ex: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains, "tokens": list(ex["tokens"]),
            "values": [float(v) for v in ex["acts"]], "maxValue": float(ex["activation"]),
            "maxValueTokenIndex": int(ex["max_index"]), "row_id": int(ex["row_id"]), "pos": int(ex["pos"])}


def _activations(examples: list[dict], n_quantiles: int) -> list[dict[str, Any]]:
    top = [e for e in examples if e.get("kind", "top") == "top"]
    out = [_activation(e, -1, float(top[0]["activation"]), -1) for e in top]
    quant = [e for e in examples if e.get("kind") == "quantile"]
    for b in sorted({e["bin"] for e in quant}, reverse=True):  # highest activations first, like the top
        rows = [e for e in quant if e["bin"] == b]
        lo, hi = min(e["activation"] for e in rows), max(e["activation"] for e in rows)
        out += [_activation(e, float(lo), float(hi), 1.0 / max(n_quantiles, 1))
                for e in sorted(rows, key=lambda e: -e["activation"])]
    return out


def _histogram(edges: list[float], counts: list[int]) -> tuple[list[float], list[int]]:
    """Bar centres (geometric, log-spaced bins) and heights over the non-empty span."""
    counts = list(counts or [])
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return [], []
    e = np.asarray(edges, dtype=float)
    centres = [float(e[0] / 10 ** 0.05)] + list(np.sqrt(e[:-1] * e[1:])) + [float(e[-1] * 10 ** 0.05)]
    span = range(nz[0], nz[-1] + 1)
    return [round(float(centres[i]), 6) for i in span], [int(counts[i]) for i in span]


def feature_documents(features: Iterable[dict], features_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Feature documents for registry feature rows (latent, frequency, n_fired, max_act, mean_act,
    top_tokens, label fields, analysis), with examples and histograms read from `features_dir`."""
    features = list(features)
    info = store.info(features_dir)
    n_quantiles = int(info.get("config", {}).get("n_quantiles", 0))
    wanted = [int(f["latent"]) for f in features]
    by = store.examples_by_latent(features_dir, wanted)
    hists = store.histograms(features_dir, wanted) if "hist_edges" in info else {}
    docs = []
    for f in features:
        latent = int(f["latent"])
        ex = sorted(by.get(latent, []), key=lambda e: (e.get("kind", "top") != "top", e.get("bin", -1), e["rank"]))
        analysis = f.get("analysis") or {}
        logits = analysis.get("logits") or {}
        bars, heights = _histogram(info.get("hist_edges", []), hists.get(latent, []))
        docs.append({
            "feature_index": latent,
            "explanation": {"name": f.get("label", ""), "category": f.get("category", ""),
                            "description": f.get("description", ""), "source": f.get("label_source", "")},
            "frac_nonzero": float(f["frequency"]), "n_fired": int(f["n_fired"]),
            "max_act": float(f["max_act"]), "mean_act": float(f["mean_act"]), "top_tokens": list(f.get("top_tokens") or []),
            "pos_str": logits.get("pos_str", []), "pos_values": logits.get("pos_values", []),
            "neg_str": logits.get("neg_str", []), "neg_values": logits.get("neg_values", []),
            "logits_final_norm": logits.get("final_norm", ""),
            "freq_hist_data_bar_values": bars, "freq_hist_data_bar_heights": heights,
            "num_tokens_for_dashboard": int(info.get("tokens", 0)),
            "activations": _activations(ex, n_quantiles) if ex else [],
            "similar_features": analysis.get("similar", []), "coactive_features": analysis.get("coactive", []),
            "ablation": analysis.get("ablation"), "nlp": analysis.get("nlp"), "detection": analysis.get("detection"),
        })
    return docs


def write_neuronpedia(docs: list[dict], out_dir: str | os.PathLike, model_id: str, layer: int, sae_set: str,
                      per_file: int = 128) -> list[Path]:
    """Batch files batch-0.json, batch-1.json, ... of `per_file` features each, written atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for n, start in enumerate(range(0, max(len(docs), 1), per_file)):
            batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set,
                     "features": docs[start:start + per_file],
                     "settings": {"n_batches_to_sample_from": 0, "n_prompt_to_select": 0}}
            (tmp / f"batch-{n}.json").write_text(json.dumps(batch))
    return sorted(out_dir.glob("batch-*.json"))


def write_bundle(docs: list[dict], out_path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """A zip a feature page renders from: manifest.json (the SAE, its metrics) and one
    features/<latent>.json per feature."""
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", json.dumps({"format": BUNDLE_FORMAT, **meta,
                                                    "latents": [d["feature_index"] for d in docs]}, default=str))
            for d in docs:
                z.writestr(f"features/{d['feature_index']}.json", json.dumps(d))
    return out_path


def read_bundle(path: str | os.PathLike) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """(manifest, {latent: document}) of a bundle written by `write_bundle`."""
    from core.errors import UserError

    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("manifest.json"))
            if manifest.get("format") != BUNDLE_FORMAT:
                raise UserError(f"{path} is not a miStudio feature bundle ({manifest.get('format')!r})")
            docs = {int(n.split("/")[1][:-5]): json.loads(z.read(n)) for n in z.namelist() if n.startswith("features/")}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as e:
        raise UserError(f"{path} is not a readable feature bundle ({type(e).__name__}); export one with: "
                        "mistudio features export --format bundle") from None
    return manifest, docs
