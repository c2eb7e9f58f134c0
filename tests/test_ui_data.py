"""The Datasets and Models pages, driven by AppTest against the real actors of the test session.

As in tests/test_ui.py, AppTest runs the page scripts in this process, so the app's cached
`Client()` attaches to the session's in-process Ray and reads the same registry (the
`ui_client` fixture of tests/conftest.py sets that up).
"""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from storage.registry import Dataset, Model
from tests.conftest import plain

PAGES = Path(__file__).resolve().parents[1] / "ui" / "app_pages"
DATASETS, MODELS = str(PAGES / "datasets.py"), str(PAGES / "models.py")
TIMEOUT = 60  # the first run imports the engine and connects


def run_page(path: str) -> AppTest:
    at = AppTest.from_file(path, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def rerun(node) -> AppTest:
    """Run the app again (after an interaction with `node`, a widget or the AppTest itself)."""
    at = node.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def table_rows(at: AppTest, column: str) -> list[dict]:
    """The rows of the page's table that has `column`."""
    (table,) = [t for t in at.dataframe if column in t.value.columns]
    return table.value.to_dict("records")


def charts_with(at: AppTest, title: str) -> list[str]:
    """The Vega-Lite specs (altair charts) on the page whose text has `title`."""
    return [c.proto.spec for c in at.get("vega_lite_chart") if title in c.proto.spec]


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


def new_jobs(client, before: set[str]) -> list[dict]:
    return [j for j in client.jobs() if j["id"] not in before]


# -- Datasets page -----------------------------------------------------------------------------
def test_datasets_page_lists_and_shows_a_dataset(tiny_run, ui_client):
    at = run_page(DATASETS)
    assert at.title[0].value == "Datasets"
    rows = {r["id"]: r for r in table_rows(at, "context_length")}
    ds = ui_client.get(Dataset, tiny_run["dataset_id"])
    row = rows[tiny_run["dataset_id"]]
    assert row["model_id"] == "tiny-llama" and row["source"] == "builtin"
    assert (row["documents"], row["rows"], row["tokens"], row["context_length"]) == \
        (ds["documents"], ds["rows"], ds["tokens"], 64)

    rerun(at.selectbox(key="ds-selected").select(tiny_run["dataset_id"]))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Rows"] == f"{ds['rows']:,}" and metrics["Tokens"] == f"{ds['tokens']:,}"
    (hist,) = charts_with(at, "Tokens per row")  # an altair chart; the progress panel draws others
    assert '"bar"' in hist and '"end"' in hist
    rerun(at.radio(key="ds-length-unit").set_value("document"))
    assert charts_with(at, "Tokens per document") and not charts_with(at, "Tokens per row")

    # the sample browser decodes a row with the tiny byte-level tokenizer: the text is the row's bytes
    from core.data import read_rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ui_client.get(Model, "tiny-llama")["path"])
    rerun(at.number_input(key=f"ds-row-{tiny_run['dataset_id']}").set_value(3))
    ids = [int(i) for i in read_rows(ds["path"], [3])[3]]
    assert f"row 3 · {len(ids)} tokens" in texts(at.caption)
    assert tok.decode(ids) in [c.value for c in at.code]


def test_tokenization_preview_counts_tokens(tiny_run, ui_client):
    at = run_page(DATASETS)
    rerun(at.selectbox(key="ds-selected").select(tiny_run["dataset_id"]))
    rerun(at.text_area(key="ds-preview-text").input("Hi <b>café</b>\n"))
    # the tiny tokenizer is byte-level with no BOS: one token per byte, and é is two bytes
    assert "**16 tokens** with `tiny-llama`'s tokenizer" in texts(at.markdown)
    chips = at.html[-1].value
    assert chips.count('title="') == 16 and "&lt;" in chips and "<b>" not in chips  # escaped
    assert "↵" in chips  # the newline token is visible


def test_add_builtin_dataset_from_form(tiny_run, ui_client):
    at = run_page(DATASETS)
    before = {j["id"] for j in ui_client.jobs()}
    assert at.radio(key="ds-source-kind").value == "builtin"
    assert [o.split(" — ")[0] for o in at.selectbox(key="ds-corpus").options] == ["stdlib-docs", "stdlib-source"]
    at.selectbox(key="ds-corpus").select("stdlib-source")  # the standard library's code, streamed
    at.selectbox(key="ds-model").select("tiny-llama")
    at.text_input(key="ds-name").input("ui-builtin")
    at.number_input(key="ds-context-length").set_value(32)
    at.number_input(key="ds-max-documents").set_value(6)
    rerun(at.button(key="ds-submit").click())
    assert not at.error, texts(at.error)
    (job,) = new_jobs(ui_client, before)
    assert job["kind"] == "add_dataset"
    assert job["spec"] == {"model_id": "tiny-llama", "source": "stdlib-source", "name": "ui-builtin", "text_column": "text",
                           "context_length": 32, "max_documents": 6, "prepend_bos": True,  # BOS-first by default
                           "encoding": "utf-8"}
    assert job["id"] in texts(at.success)
    assert at.progress, "the progress panel shows the new job"

    done = ui_client.wait(job["id"], timeout=120)
    assert done["state"] == "completed", done["message"]
    rerun(at)
    rows = {r["id"]: r for r in table_rows(at, "context_length")}
    new = rows[done["result"]["dataset_id"]]
    assert new["name"] == "ui-builtin" and new["context_length"] == 32 and new["documents"] == 6
    assert new["tokens"] == done["result"]["tokens"] > 0


def test_add_uploaded_file(tiny_run, ui_client):
    at = run_page(DATASETS)
    rerun(at.radio(key="ds-source-kind").set_value("upload"))
    before = {j["id"] for j in ui_client.jobs()}
    at.selectbox(key="ds-model").select("tiny-llama")
    body = b'{"body": "first document"}\n{"body": "the second one"}\n{"body": "   "}\n'
    at.file_uploader(key="ds-upload").set_value(("notes.jsonl", body, "application/json"))
    at.text_input(key="ds-text-column").input("body")
    rerun(at.button(key="ds-submit").click())
    assert not at.error, texts(at.error)
    (job,) = new_jobs(ui_client, before)
    saved = Path(job["spec"]["source"])
    assert saved.name == "notes.jsonl" and saved.read_bytes() == body
    assert saved.parent.parent == ui_client.settings.home / "uploads"
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".tmp-")]
    done = ui_client.wait(job["id"], timeout=120)
    assert done["state"] == "completed", done["message"]
    assert done["result"]["documents"] == 2  # the blank one is dropped
    assert done["result"]["tokens"] == len("first document") + len("the second one")


def test_add_dataset_bad_path_is_one_line_error(tiny_run, ui_client):
    at = run_page(DATASETS)
    rerun(at.radio(key="ds-source-kind").set_value("path"))
    before = {j["id"] for j in ui_client.jobs()}
    at.text_input(key="ds-path").input("no-such-dir/texts.jsonl")  # relative: under the first allowed root
    rerun(at.button(key="ds-submit").click())
    (error,) = at.error
    assert "data file not found: no-such-dir/texts.jsonl" in plain(error.value) and "\n" not in plain(error.value)
    assert not new_jobs(ui_client, before)


def test_add_dataset_outside_the_allowed_roots_is_refused(tiny_run, ui_client, tmp_path):
    """A server file outside MISTUDIO_ALLOWED_ROOTS is refused before it is looked at, also
    through a symlink or `..` that leads out; a template-free submit is refused the same way."""
    link = tmp_path / "etc-link"
    link.symlink_to("/etc")
    for path in ("/etc/passwd", str(link / "passwd"), f"{tmp_path}/../../../../../../etc/passwd"):
        at = run_page(DATASETS)
        rerun(at.radio(key="ds-source-kind").set_value("path"))
        before = {j["id"] for j in ui_client.jobs()}
        at.text_input(key="ds-path").input(path)
        rerun(at.button(key="ds-submit").click())
        (error,) = at.error
        shown = plain(error.value)
        assert shown.startswith(f"{path} is outside the folders the dashboard may read"), shown
        assert "MISTUDIO_ALLOWED_ROOTS" in shown and "\n" not in shown
        assert not new_jobs(ui_client, before)


# -- Models page -------------------------------------------------------------------------------
def test_models_page_lists_model_and_hook_sites(tiny_run, ui_client):
    from core.hooks import SITES

    at = run_page(MODELS)
    assert at.title[0].value == "Models"
    rows = {r["id"]: r for r in table_rows(at, "architecture")}
    tiny = rows["tiny-llama"]
    assert (tiny["n_layers"], tiny["d_model"], tiny["quantization"]) == (2, 64, "none")
    assert tiny["datasets"] >= 1
    rerun(at.selectbox(key="m-selected").select("tiny-llama"))
    hooks = table_rows(at, "resid_post")
    assert [h["layer"] for h in hooks] == [0, 1]
    assert {hooks[0][s] for s in SITES} == {f"blocks.0.hook_{s}" for s in SITES}
    assert "blocks.1.hook_mlp_out" in hooks[1].values()
    model = ui_client.get(Model, "tiny-llama")
    assert model["path"] in texts(at.caption)


def test_models_page_estimates_memory_of_a_folder(tiny_run, tiny_model_dir, ui_client):
    from core.models import estimate_memory

    at = run_page(MODELS)
    rerun(at.radio(key="m-source-kind").set_value("folder"))
    rerun(at.text_input(key="m-source-folder").input(str(tiny_model_dir)))
    at.number_input(key="m-est-batch-size").set_value(2)
    rerun(at.number_input(key="m-est-context-length").set_value(16))
    assert not at.error, texts(at.error)
    est = estimate_memory(tiny_model_dir, batch_size=2, context_length=16)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Parameters"] == f"{est.n_params:,}"
    assert metrics["Weights"].endswith(("KB", "MB")) and metrics["Activations"].endswith(("KB", "MB"))
    assert f"memory estimate: {est.detail}" in texts(at.caption)
    assert "batch 2 × 16 tokens" in est.detail

    rerun(at.selectbox(key="m-quantization").set_value("8bit"))
    est8 = estimate_memory(tiny_model_dir, quantization="8bit", batch_size=2, context_length=16)
    assert est8.weights_bytes < est.weights_bytes
    assert f"memory estimate: {est8.detail}" in texts(at.caption)


def test_models_page_bad_source_is_one_line_error(tiny_run, ui_client):
    at = run_page(MODELS)
    rerun(at.radio(key="m-source-kind").set_value("folder"))
    rerun(at.text_input(key="m-source-folder").input("no-such-model"))
    (error,) = at.error
    shown = plain(error.value)
    assert shown.startswith("model not found: /") and "no-such-model" in shown and "\n" not in shown
    before = {j["id"] for j in ui_client.jobs()}
    rerun(at.button(key="m-submit").click())
    assert [plain(e.value) for e in at.error][-1] == "no-such-model does not exist on the server; check the path"
    assert not new_jobs(ui_client, before)
    # a folder outside the allowed roots: refused before its config is read for the estimate
    rerun(at.text_input(key="m-source-folder").input("/etc"))
    (error,) = at.error
    assert plain(error.value).startswith("/etc is outside the folders the dashboard may read")
    rerun(at.button(key="m-submit").click())
    assert not new_jobs(ui_client, before)


def test_delete_panels_confirm_then_delete_or_refuse(tiny_run, ui_client):
    """Datasets: a dataset nothing needs is deleted only once confirmed; Models: a model others
    need is refused in one line, and stays."""
    job = ui_client.wait(ui_client.submit("add_dataset", {"model_id": "tiny-llama", "source": "builtin",
                                                          "name": "scratch-ui", "context_length": 32,
                                                          "max_documents": 2}))
    assert job["state"] == "completed", job["message"]
    ds = job["result"]["dataset_id"]
    path = Path(ui_client.local(next(d["path"] for d in ui_client.datasets() if d["id"] == ds)))
    at = run_page(DATASETS)
    at.selectbox(key="del-dataset").select(ds)
    rerun(at.button(key="del-dataset-go").click())
    assert any("Tick the box to confirm" in w.value for w in at.warning) and path.is_dir()
    at.checkbox(key="del-dataset-sure").check()
    rerun(at.button(key="del-dataset-go").click())
    assert not at.error, texts(at.error)
    assert f"Deleted {ds}." in texts(at.success) and not path.exists()
    assert ds not in {d["id"] for d in ui_client.datasets()}

    at = run_page(MODELS)
    at.selectbox(key="del-model").select("tiny-llama")
    at.checkbox(key="del-model-sure").check()
    rerun(at.button(key="del-model-go").click())
    assert any(plain(e.value).startswith("model tiny-llama is needed by dataset ") for e in at.error), texts(at.error)
    assert ui_client.get(Model, "tiny-llama") is not None
