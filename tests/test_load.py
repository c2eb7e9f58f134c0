"""Load: twenty jobs queued behind two busy ModelWorkers start in priority order, spread over
both workers, and all complete."""

from __future__ import annotations

import dataclasses
import random
import time

import ray

from actors.client import Client
from actors.worker import NAMESPACE
from tests.test_queue import blocker, small_import


def restart_actors(settings) -> Client:
    """A job manager (and fresh workers) for `settings`, as after a redeploy."""
    for name in ("job_manager", "model_worker", "model_worker-1"):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue
        end = time.monotonic() + 30
        while time.monotonic() < end:  # the name is free once the actor is gone
            try:
                ray.get_actor(name, namespace=NAMESPACE)
                time.sleep(0.1)
            except ValueError:
                break
    return Client(settings)


def test_twenty_jobs_on_two_workers_start_in_priority_order(tiny_run, client, tmp_path):
    two = restart_actors(dataclasses.replace(client.settings, workers=2, worker_cpus=1))
    try:
        busy = [blocker(two), blocker(two)]
        working = {w["name"]: w["busy"] for w in two.workers_status()}
        assert working == {"model_worker": working["model_worker"], "model_worker-1": working["model_worker-1"]}
        assert set(working.values()) == set(busy)  # one blocking training on each worker

        priorities = list(range(20))
        random.Random(0).shuffle(priorities)
        jobs = [small_import(two, tiny_run, tmp_path, f"load{i}", p) for i, p in enumerate(priorities)]
        assert [j["id"] for j in two.queue()] == [jobs[priorities.index(p)] for p in sorted(priorities, reverse=True)]
        for job_id in busy:
            two.finalize(job_id)
        done = {j: two.wait(j, timeout=600) for j in jobs}
        assert all(d["state"] == "completed" for d in done.values()), [d["message"] for d in done.values()]
        started = [j for _, j in sorted((done[j]["started_at"], j) for j in jobs)]
        assert started == [jobs[priorities.index(p)] for p in sorted(priorities, reverse=True)]
        assert all(two.wait(b, timeout=300)["state"] == "completed" for b in busy)
    finally:
        again = restart_actors(client.settings)  # the session's own manager and worker again
        client.manager = again.manager
