"""End to end on the real embedded SmolLM2-135M through the actors, on a small slice of the
built-in corpus: the same path `mistudio demo` takes, only smaller."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.data import builtin_corpus
from storage.registry import SAE, Dataset, Model
from actors.jobs.add_model import EMBEDDED_ID
from ui.cli_demo import demo_summary

pytestmark = pytest.mark.slow


def test_demo_pipeline_on_smollm2(client):
    job = client.wait(client.submit("add_model", {"source": "embedded"}), timeout=600)
    assert job["state"] == "completed", job["message"]
    model = client.get(Model, EMBEDDED_ID)
    assert (model["architecture"], model["n_layers"], model["d_model"], model["vocab_size"]) == ("llama", 30, 576, 49152)
    assert 130e6 < model["n_params"] < 140e6

    ds = client.wait(client.submit("add_dataset", {"model_id": EMBEDDED_ID, "source": "builtin",
                                                   "context_length": 128, "max_documents": 60}), timeout=300)
    assert ds["state"] == "completed", ds["message"]
    job = client.wait(client.submit("pipeline", {
        "model_id": EMBEDDED_ID, "dataset_id": ds["result"]["dataset_id"], "layer": 3, "max_tokens": 3000,
        "train": {"expansion_factor": 2, "k": 16, "batch_size": 512, "epochs": 3}, "top_k": 8}), timeout=900)
    assert job["state"] == "completed", job["message"]

    sae = client.get(SAE, job["result"]["sae_id"])
    assert sae["hook_name"] == "blocks.3.hook_resid_post" and sae["d_in"] == 576
    assert sae["history"][-1]["fvu"] < sae["history"][0]["fvu"]

    # SmolLM2 defines BOS (<|im_start|>, id 1): every row starts with it, and BOS/EOS/pad (1, 2)
    # are left out by id, each step counting them; cfg.json says so in SAELens's fields.
    stats = client.get(Dataset, ds["result"]["dataset_id"])["stats"]
    assert (stats["prepend_bos"], stats["bos_token_id"]) == (True, 1)
    cfg = json.loads((Path(sae["path"]) / "cfg.json").read_text())
    assert (cfg["prepend_bos"], cfg["metadata"]["prepend_bos"], cfg["metadata"]["exclude_special_tokens"],
            cfg["metadata"]["context_size"]) == (True, True, [1, 2], 128)
    assert sae["metrics"]["excluded_special"] > 0 and sae["metrics"]["eval_excluded_special"] > 0

    # The top contexts are real text from the corpus, decoded from real tokens.
    corpus = "\n".join(builtin_corpus())
    features = client.features(sae["id"], limit=5)
    assert len(features) == 5 and all(f["n_fired"] > 0 for f in features)
    for f in features:
        ex = client.examples(sae["id"], f["latent"])[0]
        text = "".join(ex["tokens"]).strip()
        assert len(text) >= 3 and text in corpus, text
    table = pq.read_table(f"{sae['features_path']}/features.parquet")
    assert table.num_rows == sae["d_sae"]

    summary = demo_summary(client, client.job(job["id"]))
    assert "FVU" in summary and "dead latents" in summary and f"#{features[0]['latent']}" in summary
    assert f"ce_loss_score {sae['metrics']['ce_loss_score']:.3f}" in summary  # SAELens's figures beside ours
    if sae["metrics"]["excluded_outliers"] == 0:  # the conventions then agree on the variance explained
        assert sae["metrics"]["explained_variance"] == pytest.approx(1 - sae["metrics"]["fvu"], abs=1e-9)

    # Issue 4's feature page on the real model: analysis, then heuristic labels, then one document
    # per feature holding everything the dashboard and the Neuronpedia export show.
    latents = [f["latent"] for f in features[:3]]
    job = client.wait(client.submit("analyze", {"sae_id": sae["id"], "latents": latents,
                                                "config": {"ablation_latents": latents[:1], "ablation_top": 0,
                                                           "ablation_contexts": 4}}), timeout=600)
    assert job["state"] == "completed", job["message"]
    job = client.wait(client.submit("label", {"sae_id": sae["id"], "latents": latents}), timeout=300)
    assert job["state"] == "completed", job["message"]
    docs = {d["feature_index"]: d for d in client.feature_documents(sae["id"], latents)}
    for latent in latents:
        d = docs[latent]
        kinds = {a["bin_min"] == -1 for a in d["activations"]}
        assert kinds == {True, False}, "top and quantile examples"
        assert sum(d["freq_hist_data_bar_heights"]) == d["n_fired"] > 0
        assert len(d["pos_str"]) == 10 and len(d["neg_str"]) == 10 and "RMSNorm" in d["logits_final_norm"]
        assert len(d["similar_features"]) == 10 and d["coactive_features"]
        assert d["nlp"]["summary"] and d["nlp"]["n_examples"] + d["nlp"]["special"] > 0
        assert d["explanation"]["name"] and d["explanation"]["source"] == "heuristic"
    ablation = docs[latents[0]]["ablation"]
    assert ablation and all(abs(x) < 20 for x in ablation["delta_loss_at_max"]), ablation
