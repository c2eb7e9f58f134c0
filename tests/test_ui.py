"""The Streamlit dashboard, driven by AppTest against the real actors of the test session.

AppTest runs the page scripts in this process, so the app's cached `Client()` attaches to the
session's in-process Ray (MISTUDIO_RAY_ADDRESS=local and ray already initialised) and reads the
same registry. AppTest never fires `st.fragment(run_every=...)` timers: `at.run()` re-renders.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from ui.components.formatting import literal
from tests.conftest import plain

UI = Path(__file__).resolve().parents[1] / "ui"
APP, JOBS, FEATURES = str(UI / "app.py"), str(UI / "app_pages" / "jobs.py"), str(UI / "app_pages" / "features.py")
SYSTEM = str(UI / "app_pages" / "system.py")
STEERING = str(UI / "app_pages" / "steering.py")
TIMEOUT = 60  # the first run imports the engine and connects


def run_page(path: str) -> AppTest:
    at = AppTest.from_file(path, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def history_rows(at: AppTest) -> list[dict]:
    return at.dataframe[-1].value.to_dict("records")  # the job history is the page's last table


# -- pure helpers ----------------------------------------------------------------------------
def test_token_html_escapes_and_shades():
    from ui.components.tokens import token_html

    out = token_html(["<b>", " ", "\n", "x y", ""], [0.0, 1.0, 2.0, -1.0, 0.5], max_act=2.0, highlight=2)
    assert "<b>" not in out and "&lt;b&gt;" in out  # token text is escaped
    assert "·" in out and "↵" in out and "∅" in out  # whitespace and empty tokens are visible
    assert "rgba(255, 127, 14, 1.00)" in out and "rgba(255, 127, 14, 0.50)" in out
    assert "rgba(255, 127, 14, 0.00)" in out  # negative activations are clear, not inverted
    assert out.count("outline") == 1
    assert 'title="&#x27;&lt;b&gt;&#x27;: 0.000"' in out  # the tooltip is escaped too


def test_progress_text_names_the_stage_of_a_staged_step():
    from ui.components.jobs import _bar

    job = {"kind": "analyze", "step": "analyze", "state": "running"}
    frac, text = _bar(job, {"step": "analyze", "stage": "NLP", "done": 512, "total": 4608, "unit": "latents",
                            "fraction": 512 / 4608})
    assert text == "analyze · NLP · 512 / 4,608 latents · 11%" and round(frac, 2) == 0.11


# -- Jobs page -------------------------------------------------------------------------------
def test_jobs_page_lists_completed_run(tiny_run, ui_client):
    at = run_page(JOBS)
    assert at.title[0].value == "Jobs"
    rows = {r["id"]: r for r in history_rows(at)}
    job = tiny_run["job"]
    assert rows[job["id"]]["state"] == "completed"
    assert rows[job["id"]]["kind"] == "pipeline"
    at.selectbox(key="run-model").select("tiny-llama").run()
    layer = at.number_input(key="layer-tiny-llama")
    assert (layer.min, layer.max) == (0, 1)  # bounded by the model's 2 layers
    # nothing runs: the panel shows the most recent finished job at 100%
    assert not ui_client.active_jobs()
    assert any("Nothing is running" in c.value for c in at.caption)
    latest = ui_client.jobs()[0]  # other tests may have finished jobs since the tiny run
    assert f"`{latest['id']}` — **{latest['state']}**" in " ".join(m.value for m in at.markdown)
    assert literal(latest["message"]) in " ".join(c.value for c in at.caption)  # shown as text, not Markdown
    if latest["state"] == "completed":
        assert at.progress and at.progress[0].value == 100
        chartable = any(k in p for p in ui_client.history(latest["id"]) for k in ("samples_per_s", "loss"))
        # (an import reports no rates: other tests may leave one as the latest job)
        assert bool(at.get("vega_lite_chart")) == chartable, "charts are drawn from the job's whole history"


def fill_small_run(at: AppTest, dataset_id: str, k: int = 4) -> None:
    at.selectbox(key="run-model").select("tiny-llama").run()  # other tests may register more models
    at.selectbox(key="run-dataset-tiny-llama").select(dataset_id)
    at.number_input(key="layer-tiny-llama").set_value(1)
    at.number_input(key="max_tokens").set_value(600)
    at.number_input(key="expansion_factor").set_value(2)
    at.number_input(key="k").set_value(k)
    at.number_input(key="epochs").set_value(1)
    at.number_input(key="train_batch_size").set_value(128)
    at.number_input(key="top_k").set_value(3)


def test_submit_enqueues_a_job_and_cancel(tiny_run, ui_client):
    at = run_page(JOBS)
    before = {j["id"] for j in ui_client.jobs()}
    fill_small_run(at, tiny_run["dataset_id"])
    at.button(key="submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    new = [j for j in ui_client.jobs() if j["id"] not in before]
    assert len(new) == 1 and new[0]["kind"] == "pipeline"
    job_id = new[0]["id"]
    assert new[0]["spec"]["train"] == {"architecture": "topk", "expansion_factor": 2, "k": 4, "epochs": 1, "batch_size": 128}
    assert new[0]["spec"]["max_tokens"] == 600 and new[0]["spec"]["layer"] == 1
    assert any(job_id in s.value for s in at.success)  # the new id shows at once
    # the job shows up in the panel straight away: queued at 0%, or already further along
    p = ui_client.progress(job_id)
    assert p is not None and 0.0 <= p.get("fraction", 0.0) <= 1.0
    assert p["phase"] != "queued" or (p["fraction"] == 0.0 and p["message"] == "queued, waiting for a worker")
    bars = [b for b in at.progress]
    assert bars, "the progress panel shows a bar for the new job"
    assert any(job_id in m.value for m in at.markdown)
    # a poll (AppTest does not fire the fragment timer) still renders without error
    at.run()
    assert not at.exception and not at.error
    # cancel through the panel's button while it is still active
    if ui_client.job(job_id)["state"] not in ("completed", "failed", "cancelled"):
        cancel = [b for b in at.button if b.key == f"cancel-{job_id}"]
        if cancel:
            cancel[0].click().run()
            assert not at.exception and not at.error
    final = ui_client.wait(job_id, timeout=180)
    assert final["state"] in ("cancelled", "completed"), final["message"]
    # once nothing runs, the next render lists the job in the history with its final state
    at.run()
    assert not at.exception
    assert {r["id"]: r for r in history_rows(at)}[job_id]["state"] == final["state"]


def test_bad_input_shows_one_line_error(tiny_run, ui_client):
    at = run_page(JOBS)
    fill_small_run(at, tiny_run["dataset_id"], k=100_000)  # wider than the SAE (64 × 2)
    at.button(key="submit").click().run()
    assert not at.exception
    errors = [plain(e.value) for e in at.error]
    assert len(errors) == 1 and "k=100000 must be between 1 and the SAE width 128" in errors[0], errors
    assert "\n" not in errors[0]


# -- Features page ---------------------------------------------------------------------------
def test_features_page_lists_features_and_contexts(tiny_run, ui_client):
    sae_id = tiny_run["job"]["result"]["sae_id"]
    at = run_page(FEATURES)
    at.selectbox(key="sae").select(sae_id).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    labels = {m.label for m in at.metric}
    assert {"FVU", "L0", "Dead"} <= labels
    assert len(at.get("vega_lite_chart")) >= 4  # training curves: loss, MSE, FVU, L0, dead fraction
    table = at.dataframe[0]  # the latents table (a feature page below may add its logit effects)
    df = table.value
    assert list(df.columns) == ["latent", "label", "frequency", "n_fired", "max_act", "mean_act", "top_tokens"]
    assert len(df) > 0 and (df["n_fired"] > 0).all()
    assert df["frequency"].is_monotonic_decreasing
    live = {f["latent"] for f in ui_client.features(sae_id) if f["n_fired"] > 0}
    assert set(df["latent"]) == live

    # a latent's top contexts, shaded by activation
    latent = at.selectbox(key="latent").value
    assert latent == int(df["latent"].iloc[0])
    examples = ui_client.examples(sae_id, latent)
    assert examples
    top_block, quantile_block = at.html  # top contexts, then quantile samples (in an expander)
    assert top_block.value.count("background-color: rgba(255, 127, 14,") >= sum(len(e["tokens"]) for e in examples)
    assert "outline" in top_block.value and "–" in quantile_block.value  # quantile rows show their bin range
    assert any("Activation histogram" in m.value for m in at.markdown)

    # pick another latent
    other = int(df["latent"].iloc[-1])
    at.selectbox(key="latent").select(other).run()
    assert not at.exception and not at.error
    assert f"{ui_client.examples(sae_id, other)[0]['activation']:.3f}" in at.html[0].value

    # min-frequency filter
    cut = float(df["frequency"].median())
    at.number_input(key="min_frequency").set_value(cut).run()
    filtered = at.dataframe[0].value
    assert 0 < len(filtered) <= len(df) and (filtered["frequency"] >= cut).all()

    # search over top tokens
    at.number_input(key="min_frequency").set_value(0.0).run()
    feature = next(f for f in ui_client.features(sae_id) if f["top_tokens"] and str(f["top_tokens"][0]).strip())
    token = str(feature["top_tokens"][0] if not isinstance(feature["top_tokens"][0], (list, tuple))
                else feature["top_tokens"][0][0])
    at.text_input(key="search").input(token).run()
    found = at.dataframe[0].value
    assert feature["latent"] in set(found["latent"])
    assert len(found) <= len(df)


def test_features_page_asks_the_client_for_one_page_at_a_time(tiny_run, ui_client, monkeypatch):
    """The latents table is a page (offset, limit, sort, filters) the registry serves; with more
    latents than a page a page picker appears, and new filters go back to the first page."""
    from actors.client import Client

    sae_id = tiny_run["job"]["result"]["sae_id"]
    real, calls = Client.feature_page, []

    def as_if_many(self, sae, **query):
        calls.append(query)
        return real(self, sae, **query)._replace(total=1200)  # as if 1,200 latents matched

    monkeypatch.setattr(Client, "feature_page", as_if_many)
    at = run_page(FEATURES)
    at.selectbox(key="sae").select(sae_id).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert (calls[-1]["offset"], calls[-1]["limit"], calls[-1]["live_only"]) == (0, 500, True)
    assert any("of 1,200 matching" in c.value for c in at.caption)
    at.number_input(key="page").set_value(3).run()
    assert not at.exception and (calls[-1]["offset"], calls[-1]["limit"]) == (1000, 500)
    at.selectbox(key="order_by").select("max_act").run()
    assert (calls[-1]["offset"], calls[-1]["order_by"]) == (0, "max_act")


def test_picking_a_latent_reuses_the_page_shown(tiny_run, ui_client, monkeypatch):
    """A rerun that keeps the filters (picking a latent) does not ask the registry for the page
    again; new filters do."""
    from actors.client import Client

    sae_id = tiny_run["job"]["result"]["sae_id"]
    real, calls = Client.feature_page, []
    monkeypatch.setattr(Client, "feature_page", lambda self, sae, **q: calls.append(q) or real(self, sae, **q))
    at = run_page(FEATURES)
    at.selectbox(key="sae").select(sae_id).run()
    asked = len(calls)
    other = int(at.dataframe[0].value["latent"].iloc[-1])
    at.selectbox(key="latent").select(other).run()
    assert not at.exception and at.selectbox(key="latent").value == other
    assert len(calls) == asked
    at.selectbox(key="order_by").select("max_act").run()
    assert len(calls) == asked + 1 and calls[-1]["order_by"] == "max_act"


MARKDOWN_LABEL = "**bold** ![x](http://example.invalid/x.png)"


def test_labels_and_descriptions_render_as_text(tiny_run, ui_client):
    """A label holding Markdown (an image link that would make every viewer's browser fetch it)
    is shown as typed: escaped in the header and the caption, never rendered."""
    sae_id = tiny_run["job"]["result"]["sae_id"]
    latent = next(f["latent"] for f in ui_client.features(sae_id) if f["n_fired"] > 0)
    description = "see <img src=http://example.invalid/y.png> and :red[alarm]"
    ui_client.set_label(sae_id, latent, MARKDOWN_LABEL, "other", description)
    try:
        at = run_page(FEATURES)
        at.selectbox(key="sae").select(sae_id).run()
        at.selectbox(key="latent").select(latent).run()
        assert not at.exception, [e.value for e in at.exception]
        header = next(m.value for m in at.markdown if m.value.startswith(f"### Latent {latent}:"))
        assert header == f"### Latent {latent}: {literal(MARKDOWN_LABEL)}"
        assert "![x](" not in header and "**bold**" not in header
        assert literal(description) in " ".join(c.value for c in at.caption)
    finally:
        ui_client.set_label(sae_id, latent, "", "other", "")


def test_feature_page_label_editing_and_jobs(tiny_run, ui_client):
    sae_id = tiny_run["job"]["result"]["sae_id"]
    at = run_page(FEATURES)
    at.selectbox(key="sae").select(sae_id).run()
    latent = at.selectbox(key="latent").value
    at.text_input(key=f"label_name-{latent}").input("edited in the browser")
    at.selectbox(key=f"label_category-{latent}").select("semantic")
    at.button[[b.label for b in at.button].index("Save label")].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    row = next(f for f in ui_client.features(sae_id) if f["latent"] == latent)
    assert (row["label"], row["category"], row["label_source"]) == ("edited in the browser", "semantic", "user")
    assert any("edited in the browser" in m.value for m in at.markdown)

    # label and max-activation filters
    at.selectbox(key="label_filter").select("semantic").run()
    semantic = set(at.dataframe[0].value["latent"])
    assert latent in semantic and all(f["category"] == "semantic" and f["label"]
                                      for f in ui_client.features(sae_id) if f["latent"] in semantic)
    at.selectbox(key="label_filter").select("unlabeled").run()
    assert latent not in set(at.dataframe[0].value["latent"])
    at.selectbox(key="label_filter").select("all").run()
    everything = at.dataframe[0].value
    cut = float(everything["max_act"].median())
    at.number_input(key="min_max_act").set_value(cut).run()
    strong = at.dataframe[0].value
    assert 0 < len(strong) < len(everything) and (strong["max_act"] >= cut).all()
    at.number_input(key="min_max_act").set_value(0.0).run()

    before = {j["id"] for j in ui_client.jobs()}
    at.button(key="analyze").click().run()
    new = [j for j in ui_client.jobs() if j["id"] not in before]
    assert [j["kind"] for j in new] == ["analyze"] and any(new[0]["id"] in x.value for x in at.success)
    assert ui_client.wait(new[0]["id"], timeout=300)["state"] == "completed"
    at.run()
    # the page shows the most frequent latent, one of the 8 whose ablation the button measures
    assert any("Ablation effect" in m.value for m in at.markdown)
    assert list(at.dataframe[1].value.columns) == ["promotes", "+", "suppresses", "−"]
    assert any("final norm" in c.value for c in at.caption), "logit effects say what was applied"

    # a latent selection: a bad one is one line and starts nothing; a good one goes into the job's spec
    before = {j["id"] for j in ui_client.jobs()}
    at.text_input(key="job_latents").input("9-1").run()
    shown = lambda: [e.value.replace("\\", "") for e in at.error]  # the line is shown Markdown-escaped
    assert shown() == ["latents: range '9-1' runs backwards; write it low-high, e.g. 1-9"]
    at.text_input(key="job_latents").input("0-1, 99999").run()
    assert shown() == [f"latent 99999 is out of range: SAE {sae_id} has latents 0-255"]
    at.text_input(key="job_latents").input("0-1").run()
    at.button(key="autolabel").click().run()
    new = [j for j in ui_client.jobs() if j["id"] not in before]
    assert [(j["kind"], j["spec"]["latents"]) for j in new] == [("label", [0, 1])]
    done = ui_client.wait(new[0]["id"], timeout=300)
    assert done["state"] == "completed" and done["result"]["labeled"] + len(done["result"]["failed"]) <= 2


def test_steering_page_compares_with_the_baseline(tiny_run, ui_client):
    sae_id = tiny_run["job"]["result"]["sae_id"]
    at = run_page(STEERING)
    at.selectbox(key="steer_sae").select(sae_id).run()
    latent = next(f["latent"] for f in ui_client.features(sae_id) if f["n_fired"] > 0)
    at.multiselect(key="steer_latents").select(latent).run()
    at.number_input(key=f"steer_strength-{latent}").set_value(40.0)
    at.text_area(key="steer_prompts").input("Hello\nThe end")
    at.number_input(key="steer_max_tokens").set_value(4)
    at.button(key="steer_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    labels = [m.value for m in at.markdown if m.value.startswith("*") and not m.value.startswith("**")]
    assert labels[:2] == ["*baseline* · perplexity " + labels[0].split("perplexity ")[1],
                          f"*latent {latent} add +40* · perplexity " + labels[1].split("perplexity ")[1]]
    assert len(at.code) >= 4  # two prompts × (baseline, steered)
    exp = ui_client.experiments(sae_id)[0]
    assert exp["mode"] == "compare" and any(exp["id"] in c.value for c in at.caption)


def test_steering_picker_asks_for_one_page_of_latents(tiny_run, ui_client, monkeypatch):
    """The Steering page offers a page of latents matching its search, and reads the chosen
    ones by number: never every latent of the SAE."""
    from actors.client import Client

    sae_id = tiny_run["job"]["result"]["sae_id"]
    latent = [f for f in ui_client.features(sae_id) if f["n_fired"] > 0][-1]["latent"]
    pages, reads = [], []
    real_page, real_features = Client.feature_page, Client.features
    monkeypatch.setattr(Client, "feature_page", lambda self, sae, **q: pages.append(q) or real_page(self, sae, **q))
    monkeypatch.setattr(Client, "features", lambda self, sae, **q: reads.append(q) or real_features(self, sae, **q))
    at = run_page(STEERING)
    at.selectbox(key="steer_sae").select(sae_id).run()
    assert (pages[-1]["limit"], pages[-1]["live_only"], pages[-1]["search"]) == (200, True, "")
    at.text_input(key="steer_search").input(str(latent)).run()
    assert pages[-1]["search"] == str(latent)
    assert any(o.startswith(f"{latent} · ") for o in at.multiselect(key="steer_latents").options)
    at.multiselect(key="steer_latents").select(latent).run()
    at.text_input(key="steer_search").input("").run()  # the chosen latent stays chosen off the search's page
    assert not at.exception and at.multiselect(key="steer_latents").value == [latent]
    assert all(q.get("latents") for q in reads), reads  # features are read by number only


def test_features_page_before_any_discovery_says_how(monkeypatch, ui_client):
    from actors.client import Client

    monkeypatch.setattr(Client, "saes", lambda self: [])
    at = run_page(FEATURES)
    assert any("No SAE has discovered features yet" in i.value for i in at.info)


def test_page_errors_are_readable(monkeypatch, ui_client):
    from actors.client import Client

    def boom(self, *a, **k):
        raise RuntimeError("registry unavailable\nsecond line")

    monkeypatch.setattr(Client, "jobs", boom)
    at = run_page(JOBS)
    assert not at.exception
    shown = [plain(e.value) for e in at.error]
    assert any("RuntimeError: registry unavailable" in e and "second line" not in e for e in shown), shown


# -- the app ---------------------------------------------------------------------------------
def test_app_navigates_between_pages(tiny_run, ui_client):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert at.title[0].value == "Jobs"
    at.switch_page("app_pages/features.py").run()
    assert not at.exception
    assert at.title[0].value == "Features"
    at.switch_page("app_pages/steering.py").run()
    assert not at.exception and at.title[0].value == "Steering"
    at.switch_page("app_pages/system.py").run()
    assert not at.exception
    assert at.title[0].value == "System"
    for page, title in (("datasets", "Datasets"), ("models", "Models"), ("extraction", "Extraction"),
                        ("training", "Training"), ("saes", "SAEs"), ("templates", "Templates"),
                        ("settings", "Settings")):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception and not at.error, (page, [e.value for e in at.error])
        assert at.title[0].value == title


def test_a_password_keeps_the_app_closed_until_signed_in(tiny_run, ui_client, monkeypatch):
    monkeypatch.setenv("MISTUDIO_UI_PASSWORD", "open sesame")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [t.value for t in at.title] == ["miStudio"]  # the sign-in form, no page
    at.text_input(key="password").set_value("wrong")
    at.button[0].click().run()
    assert any("Wrong password" in plain(e.value) for e in at.error) and [t.value for t in at.title] == ["miStudio"]
    at.text_input(key="password").set_value("open sesame")
    at.button[0].click().run()
    assert not at.exception and at.title[0].value == "Jobs"


def test_system_page_shows_this_machine_and_the_worker(tiny_run, ui_client):
    import os

    import psutil

    at = run_page(SYSTEM)
    assert not at.error, [e.value for e in at.error]
    labels = [m.label for m in at.metric]
    assert any(lbl.startswith("CPU") for lbl in labels) and "Memory" in labels
    memory = next(m.value for m in at.metric if m.label == "Memory")
    assert memory.endswith(f"/ {psutil.virtual_memory().total / 1024 ** 3:,.1f} GB")
    assert f"{os.cpu_count()} CPU cores" in at.markdown[0].value
    worker = next(m.value for m in at.markdown if m.value.startswith("**model_worker**"))
    assert "`tiny-llama`" in worker.split("models loaded:")[1]  # (other tests may have loaded more)


def test_no_model_registered_says_how_to_add(monkeypatch, ui_client):
    from actors.client import Client

    monkeypatch.setattr(Client, "models", lambda self: [])
    at = run_page(JOBS)
    assert any("mistudio models add" in i.value for i in at.info)
    monkeypatch.undo()
    monkeypatch.setattr(Client, "datasets", lambda self: [])
    at = run_page(JOBS)
    assert any("mistudio datasets add" in i.value for i in at.info)


def test_polling_stops_when_nothing_runs(tiny_run, ui_client):
    """The panel's fragment gets a timer only while a job is active."""
    import streamlit as st

    seen = []
    real = st.fragment

    def spy(*a, **k):
        seen.append(k.get("run_every"))
        return real(*a, **k)

    deadline = time.monotonic() + 120
    while ui_client.active_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(st, "fragment", spy)
        run_page(JOBS)
        assert seen == [None]
        # while a job is active the panel polls
        from actors.client import Client
        from ui.components.jobs import POLL_S

        running = {"id": "pipeline-fake", "kind": "pipeline", "state": "running", "step": "train",
                   "message": "", "started_at": None, "finished_at": None}
        mp.setattr(Client, "active_jobs", lambda self: [running])
        at = run_page(JOBS)
        assert seen == [None, POLL_S]
        assert any("pipeline-fake" in m.value for m in at.markdown)
        assert any(b.key == "cancel-pipeline-fake" for b in at.button)


def test_no_page_prints_a_stray_module_string():
    """Streamlit's magic writes any bare string statement of a page script onto the page: only
    the module docstring may be one."""
    import ast

    for path in sorted((UI / "app_pages").glob("*.py")) + [UI / "app.py"]:
        body = ast.parse(path.read_text()).body
        stray = [n.lineno for n in body[1:] if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                 and isinstance(n.value.value, str)]
        assert not stray, f"{path.name} line(s) {stray}: make them comments"


def test_pages_import_only_the_client_and_components():
    """The dashboard's contract: a page talks to `actors.client` and `ui.components`, and to no
    other miStudio module (no core, storage, actors.specs or ui.cli reached around the Client)."""
    import ast
    import sys

    allowed = {"actors.client", "ui.components"}
    libraries = {"streamlit", "pandas", "altair", "numpy"}
    for path in sorted((UI / "app_pages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (name in allowed or name.startswith("ui.components.") or top in libraries
                      or top in sys.stdlib_module_names or name == "__future__")
                assert ok, f"{path.name} line {node.lineno} imports {name}: ask the Client instead"


def test_an_oidc_provider_keeps_the_app_closed_until_signed_in(tiny_run, ui_client):
    """With Streamlit's [auth] configured, a visitor who is not logged in sees only Sign in."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "s3cret",
                          "client_id": "mistudio", "client_secret": "x",
                          "server_metadata_url": "https://idp.invalid/.well-known/openid-configuration"}
    at.run()
    assert not at.exception
    assert [t.value for t in at.title] == ["miStudio"]
    assert [b.label for b in at.button] == ["Sign in"]


def test_dashboard_errors_are_one_capped_line_of_literal_text():
    """An error quotes what a user typed: the page shows its first line, cut to a bounded
    length, with Markdown shown as text (an image link fetches nothing)."""
    from core.errors import UserError
    from ui.components.formatting import ERROR_CHARS, error_line

    shown = error_line(UserError("bad ![x](http://evil.example/x.png) " + "y" * 5000 + "\nsecond line"))
    assert "\n" not in shown and "second" not in shown and "![x](" not in shown
    assert len(plain(shown)) == ERROR_CHARS and plain(shown).endswith("y…")
    assert plain(shown).startswith("bad ![x](http://evil.example/x.png) yyy")
