"""One writer per job (storage.fencing), on a real SQLite file and a real PostgreSQL: a run's
writes are accepted only while the job carries the run's attempt token, checked in the same
transaction as the write."""

import threading
import time

import pytest

from storage.fencing import FencedRegistry, StaleAttempt, claim
from storage.registry import SAE, Feature, Job
from tests.test_registry import db_url, pg_base_url, registry  # noqa: F401 - fixtures (both backends)


def sae_row(sae_id: str, job_id: str) -> SAE:
    return SAE(id=sae_id, name=sae_id, model_id="m", hook_name="blocks.1.hook_resid_post", architecture="topk",
               d_in=4, d_sae=8, path=f"/data/saes/{sae_id}", training_job_id=job_id)


def feature_rows(n: int) -> list[dict]:
    return [{"latent": i, "n_fired": 1, "frequency": 0.5, "max_act": 1.0, "mean_act": 0.5, "top_tokens": []}
            for i in range(n)]


def started(registry, job_id: str) -> FencedRegistry:
    """What the dispatcher does: a fresh attempt, and the run's fenced view of the registry."""
    job = claim(registry, job_id, "loading", only_from=("queued",))
    return FencedRegistry(registry, job_id, job["attempt"])


def test_a_superseded_runs_writes_are_refused_and_the_current_runs_accepted(registry):
    job_id = registry.create_job("train", {})["id"]
    old = started(registry, job_id)
    old.set_job_state(job_id, "running")
    old.add(sae_row("sae-early", job_id))  # while it owns the job: accepted
    assert registry.get(SAE, "sae-early") is not None

    # the job changes hands (a worker death requeues it; a new run starts)
    assert claim(registry, job_id, "queued", message="requeued")["state"] == "queued"
    new = started(registry, job_id)
    assert new.attempt != old.attempt

    for write in (lambda: old.add(sae_row("sae-stale", job_id)),
                  lambda: old.replace_features("sae-early", feature_rows(3)),
                  lambda: old.update(SAE, "sae-early", features_path="/stale"),
                  lambda: old.set_job_state(job_id, "completed", result={"sae_id": "sae-stale"}),
                  lambda: claim(old, job_id, "queued", message="the stale run requeues")):
        with pytest.raises(StaleAttempt, match=f"job {job_id}: attempt .* no longer owns the job"):
            write()
    assert registry.get(SAE, "sae-stale") is None
    assert registry.features("sae-early") == []
    assert registry.get(SAE, "sae-early")["features_path"] is None
    job = registry.get(Job, job_id)
    assert (job["state"], job["attempt"], job["result"]) == ("loading", new.attempt, {})

    with new.atomic():  # the current run: its result rows and its completion, together
        new.add(sae_row("sae-new", job_id))
        new.replace_features("sae-new", feature_rows(3))
        claim(new, job_id, "completed", result={"sae_id": "sae-new"})
    job = registry.get(Job, job_id)
    assert (job["state"], job["result"]) == ("completed", {"sae_id": "sae-new"})
    assert len(registry.features("sae-new")) == 3
    assert [s["id"] for s in registry.list(SAE, training_job_id=job_id)] == ["sae-early", "sae-new"]
    with pytest.raises(StaleAttempt):  # an ended run writes nothing more either
        new.add(sae_row("sae-after", job_id))


def test_a_restarted_managers_interrupted_mark_fences_off_the_old_run(registry):
    """The measured fault: a new head's job manager marks the job failed while the old head's
    run lives on and later records its SAE. The mark changes the attempt: nothing is recorded."""
    job_id = registry.create_job("train", {})["id"]
    old = started(registry, job_id)
    old.set_job_state(job_id, "running")
    marked = claim(registry, job_id, "failed", only_from=("running",), message="interrupted")
    assert marked["state"] == "failed" and marked["attempt"] != old.attempt
    with pytest.raises(StaleAttempt):
        with old.atomic():
            old.add(sae_row("sae-late", job_id))
            claim(old, job_id, "completed", result={"sae_id": "sae-late"})
    assert registry.get(SAE, "sae-late") is None
    assert registry.get(Job, job_id)["state"] == "failed"
    assert claim(registry, job_id, "queued") is None  # final is final


def test_an_atomic_block_lands_whole_or_not_at_all(registry):
    job_id = registry.create_job("train", {})["id"]
    run = started(registry, job_id)
    with pytest.raises(RuntimeError, match="record failed"):
        with run.atomic():
            run.add(sae_row("sae-1", job_id))
            run.set_job_state(job_id, "saving")
            raise RuntimeError("record failed half-way")
    assert registry.get(SAE, "sae-1") is None
    assert registry.get(Job, job_id)["state"] == "loading"


def test_a_claim_waits_for_a_fenced_write_in_flight_and_never_undoes_it(registry):
    """The check and the write are one transaction holding the job's row (PostgreSQL) or the
    database (SQLite): a claim made meanwhile waits for the commit, then sees the job completed
    and leaves it (no "interrupted" over a completed job with its result)."""
    job_id = registry.create_job("train", {})["id"]
    run = started(registry, job_id)
    inside, order = threading.Event(), []

    def record():
        with run.atomic():
            run.add(sae_row("sae-1", job_id))
            inside.set()
            time.sleep(1.0)
            claim(run, job_id, "completed", result={"sae_id": "sae-1"})
            order.append("recorded")

    t = threading.Thread(target=record)
    t.start()
    assert inside.wait(30)
    marked = claim(registry, job_id, "failed", only_from=("loading", "running", "saving"), message="interrupted")
    order.append("claim returned")
    t.join()
    assert order == ["recorded", "claim returned"]
    assert marked is None
    job = registry.get(Job, job_id)
    assert (job["state"], job["result"]) == ("completed", {"sae_id": "sae-1"})
    assert registry.get(SAE, "sae-1") is not None


def test_a_run_that_lost_the_race_to_a_claim_writes_nothing(registry):
    """The other order: the claim commits first; the run's transaction then fails its check."""
    job_id = registry.create_job("train", {})["id"]
    run = started(registry, job_id)
    claim(registry, job_id, "failed", message="interrupted")
    with pytest.raises(StaleAttempt):
        run.replace_features("sae-x", feature_rows(2))
    assert registry.list(Feature, sae_id="sae-x") == []
