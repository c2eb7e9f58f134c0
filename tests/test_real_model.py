"""End to end on the real embedded SmolLM2-135M through the actors, on a small slice of the
built-in corpus: the same path `mistudio demo` takes, only smaller."""

import pyarrow.parquet as pq
import pytest

from core.data import builtin_corpus
from storage.registry import SAE, Model
from ui.cli import EMBEDDED_ID, demo_summary

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
