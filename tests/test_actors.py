"""The pipeline through real Ray actors (in-process Ray, real JobManager/ModelWorker/ProgressActor)
on a tiny random Llama, plus job lifecycle, cancel and bad input."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from core.errors import UserError
from storage.registry import SAE, Activation, Dataset, Model


def test_pipeline_writes_artifacts_and_registry_rows(client, tiny_run):
    job = tiny_run["job"]
    res = job["result"]
    assert job["state"] == "completed" and job["finished_at"] >= job["started_at"]

    model = client.get(Model, "tiny-llama")
    assert (model["architecture"], model["n_layers"], model["d_model"]) == ("llama", 2, 64)
    assert model["n_params"] > 0 and model["dtype"] == "float32"

    dataset = client.get(Dataset, tiny_run["dataset_id"])
    assert dataset["documents"] == 40 and dataset["tokens"] > 3000
    assert sorted(Path(dataset["path"]).glob("shard-*.parquet"))

    act = client.get(Activation, res["activation_id"])
    assert act["hook_name"] == "blocks.1.hook_resid_post" and act["d_model"] == 64
    shards = sorted(Path(act["path"]).glob("shard-*.parquet"))
    assert sum(pq.ParquetFile(s).metadata.num_rows for s in shards) == act["tokens"] >= 3000

    sae = client.get(SAE, res["sae_id"])
    assert (sae["d_in"], sae["d_sae"], sae["sae_config"]["k"], sae["hook_name"]) == (64, 256, 8, "blocks.1.hook_resid_post")
    cfg = json.loads((Path(sae["path"]) / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["d_sae"] == 256
    # What it was trained on: the tiny tokenizer has no BOS; its EOS/pad (256) was left out by
    # default at extraction, training and evaluation, and each says how many it left out.
    assert dataset["stats"]["prepend_bos"] is False and cfg["prepend_bos"] is False
    assert (cfg["metadata"]["exclude_special_tokens"], cfg["normalize_activations"]) == ([256], "none")
    assert cfg["metadata"]["context_size"] == 64 and cfg["metadata"]["model_name"] == model["name"]
    assert sae["metrics"]["excluded_special"] == act["stats"]["excluded_special"]
    assert sae["metrics"]["eval_excluded_special"] >= 0
    assert ("outlier_norm_threshold" in cfg["metadata"]) == (sae["metrics"]["outlier_norm_threshold"] != float("inf"))
    with safe_open(str(Path(sae["path"]) / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"W_enc": (64, 256), "W_dec": (256, 64), "b_enc": (256,), "b_dec": (64,)}
    fvus = [h["fvu"] for h in sae["history"]]
    assert len(fvus) >= 2 and fvus[-1] < fvus[0], "FVU should fall during training"

    feats = client.features(res["sae_id"])
    assert len(feats) == 256
    live = [f for f in feats if f["n_fired"] > 0]
    assert live and all(0 < f["frequency"] <= 1 for f in live)
    top = live[0]
    examples = client.examples(res["sae_id"], top["latent"])
    assert 1 <= len(examples) <= 5
    assert examples[0]["activation"] == pytest.approx(top["max_act"], rel=1e-5)
    for ex in examples:
        assert len(ex["tokens"]) == len(ex["acts"]) == len(ex["token_ids"])
        assert ex["acts"][ex["max_index"]] == pytest.approx(ex["activation"], rel=1e-5)


def test_worker_keeps_the_model_loaded(client, tiny_run):
    status = client.worker_status()
    assert "tiny-llama" in status["loaded"]
    assert status["threads"] == 2  # sized on purpose, not Ray's default of one thread


def test_job_shows_queued_at_once_and_progress_history(client, tiny_run):
    job_id = client.submit("extract", {"model_id": "tiny-llama", "dataset_id": tiny_run["dataset_id"],
                                       "layers": [0], "max_tokens": 500})
    first = client.progress(job_id)
    assert first is not None and first["done"] == 0
    assert client.job(job_id)["state"] in ("queued", "loading", "running", "saving", "completed")
    job = client.wait(job_id, timeout=120)
    assert job["state"] == "completed", job["message"]
    phases = [p.get("phase") for p in client.history(job_id)]
    assert phases[0] == "queued" and phases[-1] == "completed" and "extract" in phases


def test_cancel_running_training_leaves_no_sae(client, tiny_run):
    act_id = tiny_run["job"]["result"]["activation_id"]
    before = {s["id"] for s in client.saes()}
    job_id = client.submit("train", {"activation_ids": [act_id],
                                     "config": {"expansion_factor": 4, "k": 8, "batch_size": 64, "epochs": 500}})
    client.wait(job_id, timeout=60, poll=0.2,
                on_progress=lambda job, p: client.cancel(job_id) if p.get("phase") == "train" else None)
    job = client.job(job_id)
    assert job["state"] == "cancelled"
    assert {s["id"] for s in client.saes()} == before
    saes_dir = client.settings.home / "saes"
    assert not any(p.name.startswith(".tmp-") for p in saes_dir.iterdir())


@pytest.mark.parametrize("kind, spec, message", [
    ("extract", {"model_id": "tiny-llama", "dataset_id": "DS", "layers": [7]}, "layer 7 is out of range"),
    ("pipeline", {"model_id": "tiny-llama", "dataset_id": "DS", "layer": 1,
                  "train": {"expansion_factor": 1, "k": 100}}, "k=100 must be between 1 and the SAE width 64"),
    ("extract", {"model_id": "no-such-model", "dataset_id": "DS"}, "model 'no-such-model' is not registered"),
    ("extract", {"model_id": "tiny-llama", "dataset_id": "DS", "colour": 1}, "unknown key(s) colour"),
    ("extract", {"model_id": "tiny-llama", "dataset_id": "DS", "layers": "1"}, "'layers' should be"),
])
def test_bad_input_is_refused_with_one_line(client, tiny_run, kind, spec, message):
    spec = {k: tiny_run["dataset_id"] if v == "DS" else v for k, v in spec.items()}
    with pytest.raises(UserError) as err:
        client.submit(kind, spec)
    assert message in str(err.value) and "\n" not in str(err.value)
    if "unknown key" not in message and "should be" not in message:
        failed = client.jobs(state="failed")[0]
        assert message in failed["message"]


def _failed(client, kind, spec) -> str:
    job = client.wait(client.submit(kind, spec), timeout=120)
    assert job["state"] == "failed"
    assert "\n" not in job["message"]
    return job["message"]


def test_bad_model_and_dataset_sources_fail_cleanly(client, tiny_run, tiny_model_dir, tmp_path):
    # a model source that cannot load is refused at submit, before any worker loads anything
    with pytest.raises(UserError, match=r"^model not found: .*nowhere; give an existing model folder"):
        client.submit("add_model", {"source": str(tmp_path / "nowhere")})
    no_tokenizer = tmp_path / "weights-only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(UserError, match=r"weights-only has no tokenizer \(tokenizer.json, .*save_pretrained") as e:
        client.submit("add_model", {"source": str(no_tokenizer)})
    assert "\n" not in str(e.value)
    assert not any((client.settings.home / "models" / name).exists() for name in ("nowhere", "weights-only"))

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    assert "empty" in _failed(client, "add_dataset", {"model_id": "tiny-llama", "source": str(empty)})

    csv = tmp_path / "notes.csv"
    csv.write_text("body,id\nhello world,1\n")
    msg = _failed(client, "add_dataset", {"model_id": "tiny-llama", "source": str(csv), "text_column": "text"})
    assert "column 'text' not found" in msg and "body" in msg
    datasets_dir = client.settings.home / "datasets"
    assert not any(p.name.startswith(".tmp-") for p in datasets_dir.iterdir())


def test_pipeline_sae_carries_held_out_evaluation(client, tiny_run):
    sae = client.get(SAE, tiny_run["job"]["result"]["sae_id"])
    m = sae["metrics"]
    assert m["eval_split"] == "held-out" and m["eval_rows"] >= 1
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "ce_loss_recovered_zero", "ce_loss_recovered_mean",
                "kl_sae", "cos_sim", "dense_frac", "density_hist", "fvu", "l0", "dead_frac", "eval_dead_frac"):
        assert key in m, key
    assert m["ce_loss_recovered_zero"] == pytest.approx(
        (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"]), rel=1e-6)
    on_disk = json.loads((Path(sae["path"]) / "eval.json").read_text())
    assert on_disk["ce_sae"] == m["ce_sae"]


def test_one_train_job_trains_hooks_times_variants(client, tiny_run):
    """Two hooks extracted together × two variants = four SAEs from one pass; then the same
    spec on the fly (no cache); then a resumed run equals the checkpointed one."""
    ds = tiny_run["dataset_id"]
    ext = client.wait(client.submit("extract", {"model_id": "tiny-llama", "dataset_id": ds, "layers": [0, 1],
                                                "max_tokens": 1500}))
    assert ext["state"] == "completed", ext["message"]
    acts = list(ext["result"]["activation_ids"].values())
    cfg = {"expansion_factor": 2, "k": 4, "batch_size": 128, "epochs": 1}
    job = client.wait(client.submit("train", {"activation_ids": acts, "config": cfg, "eval_rows": 2,
                                              "variants": [{}, {"architecture": "batchtopk", "k": 2}]}), timeout=300)
    assert job["state"] == "completed", job["message"]
    saes = job["result"]["saes"]
    assert len(saes) == 4
    rows = [client.get(SAE, s["sae_id"]) for s in saes.values()]
    assert {(r["hook_name"], r["architecture"]) for r in rows} == {
        (f"blocks.{layer}.hook_resid_post", arch) for layer in (0, 1) for arch in ("topk", "jumprelu")}
    assert all(r["training_job_id"] == job["id"] and "ce_loss_recovered_zero" in r["metrics"] for r in rows)

    live = client.wait(client.submit("train", {
        "model_id": "tiny-llama", "dataset_ids": [ds, ds], "hook_names": ["blocks.0.hook_mlp_out"],
        "config": cfg | {"total_tokens": 1000}, "eval_rows": 2, "max_tokens": 600}), timeout=300)
    assert live["state"] == "completed", live["message"]
    sae = client.get(SAE, live["result"]["sae_id"])
    assert sae["hook_name"] == "blocks.0.hook_mlp_out" and sae["metrics"]["tokens"] == 1000

    spec = {"activation_ids": acts[:1], "config": cfg | {"epochs": 3}, "checkpoint_every": 5}
    first = client.wait(client.submit("train", spec), timeout=300)
    assert first["state"] == "completed", first["message"]
    assert sorted((client.settings.home / "checkpoints" / first["id"]).glob("ckpt-*.pt"))
    again = client.wait(client.submit("train", spec | {"resume_job": first["id"]}), timeout=300)
    assert again["state"] == "completed", again["message"]
    a, b = client.get(SAE, first["result"]["sae_id"]), client.get(SAE, again["result"]["sae_id"])
    assert a["metrics"]["fvu"] == b["metrics"]["fvu"] and a["history"] == b["history"]


def test_train_spec_with_mismatched_inputs_is_refused(client, tiny_run):
    with pytest.raises(UserError, match="activation set 'nope' is not registered"):
        client.submit("train", {"activation_ids": ["nope"]})
    with pytest.raises(UserError, match="layer 9 is out of range"):
        client.submit("train", {"model_id": "tiny-llama", "dataset_ids": [tiny_run["dataset_id"]],
                                "hook_names": ["blocks.9.hook_resid_post"]})


def test_quantization_and_special_token_exclusion_reach_the_worker(client, tiny_model_dir, tmp_path):
    """A model registered 8-bit is loaded 8-bit by every job; `exclude_special_tokens` drops the
    tokenizer's special tokens from extraction (counted in the activation stats)."""
    job = client.wait(client.submit("add_model", {"source": str(tiny_model_dir), "name": "tiny-8bit",
                                                  "quantization": "8bit"}))
    assert job["state"] == "completed", job["message"]
    assert client.get(Model, "tiny-8bit")["quantization"] == "8bit"
    eos = "<|endoftext|>"  # the tiny tokenizer's special token
    (tmp_path / "docs.txt").write_text(f"{eos}The quick brown fox.\nHi!{eos}again\nNo special token here.\n")
    ds = client.wait(client.submit("add_dataset", {"model_id": "tiny-8bit", "source": str(tmp_path / "docs.txt"),
                                                   "context_length": 32}))
    assert ds["state"] == "completed", ds["message"]
    runs = {}
    for exclude in (False, None):  # None: the spec's default, which is to exclude them
        flag = {} if exclude is None else {"exclude_special_tokens": exclude}
        job = client.wait(client.submit("extract", {"model_id": "tiny-8bit", "dataset_id": ds["result"]["dataset_id"],
                                                    "layers": [1], **flag}))
        assert job["state"] == "completed", job["message"]
        (act_id,) = job["result"]["activation_ids"].values()
        runs[exclude] = client.get(Activation, act_id)
    assert client.worker_status()["quantization"]["tiny-8bit"] == "8bit"
    assert runs[None]["stats"]["excluded_special"] == 2
    assert runs[None]["tokens"] == runs[False]["tokens"] - 2
    # the activation set carries what its SAEs' cfg.json will state (the tiny tokenizer has no BOS)
    assert (runs[None]["stats"]["excluded_token_ids"], runs[None]["stats"]["prepend_bos"]) == ([256], False)
    assert (runs[False]["stats"]["excluded_token_ids"], runs[False]["stats"]["excluded_special"]) == ([], 0)
    with pytest.raises(UserError, match="quantization 'int3'"):
        client.submit("add_model", {"source": str(tiny_model_dir), "quantization": "int3"})


def test_a_taken_model_id_is_refused_not_replaced(client, tiny_run, tiny_model_dir, tmp_path):
    """Model ids are slugs of names: another model whose name slugs to a registered id is refused
    at submit (registering it would replace the row every SAE of the first one points at); the
    same source again re-registers the same model."""
    import shutil

    from storage.registry import Model

    before = client.get(Model, "tiny-llama")
    other = shutil.copytree(tiny_model_dir, tmp_path / "another-model")
    with pytest.raises(UserError, match=r"the model id 'tiny-llama' is taken by 'tiny-llama' \(from "):
        client.submit("add_model", {"source": str(other), "name": "Tiny Llama"})
    assert client.get(Model, "tiny-llama") == before
    again = client.wait(client.submit("add_model", {"source": str(tiny_model_dir), "name": "tiny-llama"}))
    assert again["state"] == "completed", again["message"]
    assert client.get(Model, "tiny-llama")["source"] == before["source"]


def test_batch_discovery_goes_past_a_failed_sae(client, tiny_run, tmp_path):
    """Several SAEs in one discover job, one after another: a bad one (d_in 32 on a d_model 64
    model) is recorded with its reason and the next one still runs; progress says which SAE of
    how many is running."""
    from core.formats.saelens import save_saelens
    from core.sae import build_sae

    good = tiny_run["job"]["result"]["sae_id"]
    bad = build_sae("topk", 32, 64, k=4)
    save_saelens(bad, bad.config(hook_name="blocks.1.hook_resid_post", model_name="tiny-llama"), tmp_path / "bad")
    client.registry.add(SAE(id="sae-bad-din", name="bad", model_id="tiny-llama", hook_name="blocks.1.hook_resid_post",
                            architecture="topk", d_in=32, d_sae=64, sae_config=bad.type_config.to_dict(), path=str(tmp_path / "bad")))
    job_id = client.submit("discover", {"dataset_id": tiny_run["dataset_id"], "sae_ids": ["sae-bad-din", good],
                                        "top_k": 3, "max_tokens": 600})
    job = client.wait(job_id, timeout=300)
    assert job["state"] == "completed", job["message"]
    res = job["result"]
    assert list(res["saes"]) == [good] and "d_in=32" in res["failed"]["sae-bad-din"]
    assert job["message"].startswith("1 of 2 SAEs discovered; failed: sae-bad-din: SAE d_in=32")
    seen = {(p.get("sae_id"), p.get("sae_position"), p.get("sae_total")) for p in client.history(job_id)}
    assert (good, 2, 2) in seen
    assert client.get(SAE, good)["features_dataset_id"] == tiny_run["dataset_id"]

    job = client.wait(client.submit("discover", {"dataset_id": tiny_run["dataset_id"], "sae_ids": ["sae-bad-din"]}))
    assert job["state"] == "failed" and "d_in=32" in job["message"]
    with pytest.raises(UserError, match="unknown discovery option"):
        client.submit("discover", {"dataset_id": tiny_run["dataset_id"], "sae_id": good, "config": {"topk": 3}})


def test_steer_job_runs_on_the_worker_and_saves_the_experiment(client, tiny_run, tmp_path, capsys, monkeypatch):
    from core.steer import Experiment
    from ui import cli

    sae_id = tiny_run["job"]["result"]["sae_id"]
    client.save_template("steering_prompts", "greetings", {"prompts": ["Hello"]})
    job = client.wait(client.submit("steer", {
        "sae_id": sae_id, "prompts": ["The"], "prompt_template": "greetings", "mode": "sweep",
        "features": [{"latent": 3, "strength": 0.0}], "strengths": [0.0, 30.0],
        "generation": {"max_new_tokens": 4, "temperature": 0}}))
    assert job["state"] == "completed", job["message"]
    outs = job["result"]["outputs"]
    assert [(o["prompt"], o["label"]) for o in outs] == [
        (p, label) for p in ("Hello", "The") for label in ("baseline", "latent 3 add +0", "latent 3 add +30")]
    assert outs[0]["token_ids"] == outs[1]["token_ids"]
    exp = Experiment.from_dict(client.experiment(job["result"]["experiment_id"])["record"])
    assert exp.sae == sae_id and exp.hook_name == "blocks.1.hook_resid_post" and exp.outputs[2].label.endswith("+30")
    assert [e["id"] for e in client.experiments(sae_id)][0] == job["result"]["experiment_id"]

    bad = client.wait(client.submit("steer", {"sae_id": sae_id, "prompts": ["x"],
                                              "features": [{"latent": 9999, "strength": 1.0}]}))
    assert bad["state"] == "failed" and bad["message"].startswith("latent 9999 is out of range")
    with pytest.raises(UserError, match="unknown steering feature option"):
        client.submit("steer", {"sae_id": sae_id, "prompts": ["x"], "features": [{"latnt": 1, "strength": 1.0}]})

    monkeypatch.setenv("MISTUDIO_HOME", str(client.settings.home))
    monkeypatch.setenv("MISTUDIO_RAY_ADDRESS", "local")
    cli.main(["steer", "run", "--sae", sae_id, "--feature", "3:25", "--feature", "4:1:clamp", "--prompt", "Hi",
              "--max-new-tokens", "3", "--name", "cli-run"])
    out = capsys.readouterr().out
    assert "[baseline]" in out and "[latent 3 add +25]" in out and "[latent 4 clamp 1]" in out
    exp_id = out.strip().splitlines()[-1].split()[-1]
    cli.main(["steer", "export", "--experiment", exp_id, "--out", str(tmp_path / "e.json")])
    assert Experiment.from_json((tmp_path / "e.json").read_text()).name == "cli-run"


def test_analyze_label_and_edit_features(client, tiny_run):
    """Analysis fills every live feature's logit effects, neighbours, co-active latents and NLP
    summary, and measures the ablation of the most frequent ones; heuristic and local-model
    labels are written; a person's label is kept by later labeling."""
    sae_id = tiny_run["job"]["result"]["sae_id"]
    job = client.wait(client.submit("analyze", {"sae_id": sae_id, "config": {"ablation_top": 2, "n_logits": 4}}))
    assert job["state"] == "completed", job["message"]
    feats = client.features(sae_id)
    live = [f for f in feats if f["n_fired"] > 0]
    assert job["result"]["latents"] == len(live) and job["result"]["ablations"] == 2
    top = live[0]["analysis"]
    assert len(top["logits"]["pos_str"]) == 4 and "not applied" in top["logits"]["final_norm"]
    assert len(top["similar"]) == 10 and top["nlp"]["n_examples"] >= 1 and top["nlp"]["summary"]
    assert all(c["latent"] != live[0]["latent"] for c in top["coactive"])
    ab = top["ablation"]
    assert ab["n_contexts"] >= 1 and len(ab["delta_loss_at_max"]) == ab["n_contexts"] and ab["dropped_str"]

    # other tests of the session may have hand-labeled some latents already: use two that are not
    free = [f["latent"] for f in live if f["label_source"] != "user"]
    client.set_label(sae_id, free[1], "my own label", "semantic", "written by hand")
    job = client.wait(client.submit("label", {"sae_id": sae_id, "method": "heuristic"}))
    assert job["state"] == "completed", job["message"]
    by = {f["latent"]: f for f in client.features(sae_id)}
    assert by[free[0]]["label_source"] == "heuristic" and by[free[0]]["label"]
    assert (by[free[1]]["label"], by[free[1]]["label_source"]) == ("my own label", "user")

    job = client.wait(client.submit("label", {"sae_id": sae_id, "method": "local", "limit": 2, "detection": True}))
    assert job["state"] == "completed", job["message"]
    assert job["result"]["labeled"] + len(job["result"]["failed"]) == 2
    local = [f for f in client.features(sae_id) if f["label_source"] == "local:tiny-llama"]
    assert len(local) == job["result"]["labeled"]
    assert all(0 <= f["analysis"]["detection"]["balanced_accuracy"] <= 1 for f in local)
    assert "logits" in local[0]["analysis"], "detection is added to the analysis, not replacing it"

    with pytest.raises(UserError, match="category 'colour' is not one of"):
        client.set_label(sae_id, 0, "x", "colour")
    with pytest.raises(UserError, match="latent 99999 is out of range"):
        client.set_label(sae_id, 99999, "x")
    with pytest.raises(UserError, match="openai labeling needs base_url"):
        client.submit("label", {"sae_id": sae_id, "method": "openai"})
    before = {f["latent"]: f["label"] for f in client.features(sae_id)}
    down = client.wait(client.submit("label", {"sae_id": sae_id, "method": "openai", "limit": 2,
                                               "base_url": "http://127.0.0.1:9/v1", "endpoint_model": "m"},
                                     api_key="sk-never-stored"))
    assert down["state"] == "failed" and "labeling endpoint http://127.0.0.1:9/v1 is unreachable" in down["message"]
    assert {f["latent"]: f["label"] for f in client.features(sae_id)} == before, "nothing else lost"
    assert "sk-never-stored" not in str(client.job(down["id"]))


def test_reporter_sends_a_new_stage_at_once_and_holds_back_the_rest(client):
    """Within one interval, numbers of the same stage are held back (sent by flush), but a new
    stage is sent at once: a short stage's start must not be lost behind the throttle."""
    import ray

    from actors.progress import ProgressActor, Reporter

    actor = ProgressActor.remote()
    r = Reporter(actor, "job-r", interval=3600)
    r({"phase": "analyze", "stage": "similar features", "done": 0, "total": 8})
    r({"phase": "analyze", "stage": "similar features", "done": 4, "total": 8})
    r({"phase": "analyze", "stage": "co-occurrence", "done": 0, "total": 8})
    r({"phase": "analyze", "stage": "co-occurrence", "done": 8, "total": 8})
    sent = [(p["stage"], p["done"]) for p in ray.get(actor.history.remote("job-r"))]
    assert sent == [("similar features", 0), ("co-occurrence", 0)]
    r.flush()
    assert ray.get(actor.get.remote("job-r"))["done"] == 8
    ray.kill(actor)
