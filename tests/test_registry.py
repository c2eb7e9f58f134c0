"""The SQLAlchemy registry on a real SQLite file."""

import pytest

from storage import Registry
from storage.registry import SAE, Model


@pytest.fixture
def registry(tmp_path):
    return Registry(f"sqlite:///{tmp_path / 'registry.db'}")


def test_job_lifecycle_timestamps_and_final_states_are_final(registry):
    job = registry.create_job("extract", {"layers": [3]}, model_id="m")
    assert job["state"] == "queued" and job["message"] == "queued, waiting for a worker"
    assert job["created_at"] is not None and job["started_at"] is None
    running = registry.set_job_state(job["id"], "running")
    assert running["started_at"] is not None
    failed = registry.set_job_state(job["id"], "failed", message="boom")
    assert failed["finished_at"] >= failed["started_at"]
    late = registry.set_job_state(job["id"], "running", message="late update")  # e.g. a delayed worker message
    assert (late["state"], late["message"]) == ("failed", "boom")
    with pytest.raises(ValueError):
        registry.set_job_state(job["id"], "exploded")


def test_what_runs_on_this_model_is_one_query(registry):
    a = registry.create_job("extract", {}, model_id="m1")
    b = registry.create_job("train", {}, model_id="m2")
    registry.set_job_state(b["id"], "running")
    registry.set_job_state(a["id"], "completed")
    assert [j["id"] for j in registry.active_jobs()] == [b["id"]]
    assert [j["id"] for j in registry.jobs(model_id="m1")] == [a["id"]]
    assert [j["id"] for j in registry.jobs(state="running")] == [b["id"]]


def test_features_are_replaced_in_bulk_and_sorted(registry):
    registry.add(Model(id="m", name="m", source="x", path="/m", architecture="llama", n_layers=2, d_model=4,
                       n_params=10, dtype="float32", vocab_size=9))
    registry.add(SAE(id="s", name="s", model_id="m", hook_name="blocks.1.hook_resid_post", architecture="topk",
                     d_in=4, d_sae=3, k=1, path="/s"))
    rows = [{"latent": i, "n_fired": i, "frequency": i / 10, "max_act": 1.0, "mean_act": 0.5, "top_tokens": ["a"]}
            for i in range(3)]
    assert registry.replace_features("s", rows) == 3
    assert registry.replace_features("s", rows) == 3  # re-running discovery replaces, never duplicates
    feats = registry.features("s")
    assert [f["latent"] for f in feats] == [2, 1, 0]
    assert [f["latent"] for f in registry.features("s", min_frequency=0.1, limit=1)] == [2]
