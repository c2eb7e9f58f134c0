"""A portable data root: artifact paths stored relative to MISTUDIO_HOME, read back absolute under
the data root that opens the registry, older registries' absolute paths moved on open, and a
copied data root that works on its own copy (storage.portable).

The registry tests run on SQLite and PostgreSQL (test_registry's fixtures). The copy test builds
its data root with the real job kinds (plans → run → record of add_model, add_dataset and the
pipeline) run in this process instead of through Ray, whose one session cluster serves one data
root.
"""

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from storage import Artifacts, Registry, Settings
from storage.portable import COLUMNS_OF
from storage.registry import SAE, Activation, Base, Dataset, Job, Model
from tests.test_registry import db_url, pg_base_url  # noqa: F401 - fixtures, SQLite and PostgreSQL


def _model(model_id: str, path: str, source: str = "embedded") -> Model:
    return Model(id=model_id, name=model_id, source=source, path=path, architecture="llama", n_layers=2,
                 d_model=64, n_params=1000, dtype="float32", vocab_size=257)


def _sae(sae_id: str, path: str, features_path: str | None = None) -> SAE:
    return SAE(id=sae_id, name=sae_id, model_id="m", hook_name="blocks.1.hook_resid_post", architecture="topk",
               d_in=64, d_sae=256, path=path, features_path=features_path)


def _raw(reg: Registry, sql: str) -> list[tuple]:
    """What the database itself holds, past the registry's conversion."""
    with reg.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def test_paths_under_the_data_root_are_stored_relative_and_read_back_absolute(db_url, tmp_path):  # noqa: F811
    home, user = tmp_path / "home", tmp_path / "mine" / "my-model"
    reg = Registry(db_url, home)
    try:
        reg.add(_model("m", str(home / "models" / "m")))
        reg.add(_model("own", str(user), source=str(user)))  # registered in place, outside the root
        added = reg.add(_sae("sae-1", str(home / "saes" / "sae-1")))
        assert added["path"] == str(home / "saes" / "sae-1")
        updated = reg.update(SAE, "sae-1", features_path=str(home / "features" / "sae-1"))
        assert updated["features_path"] == str(home / "features" / "sae-1")

        assert _raw(reg, "SELECT id, path FROM models ORDER BY id") == [("m", "models/m"), ("own", str(user))]
        assert _raw(reg, "SELECT path, features_path FROM saes") == [("saes/sae-1", "features/sae-1")]
        assert reg.get(Model, "m")["path"] == str(home / "models" / "m")
        assert reg.get(Model, "own")["path"] == str(user)
        assert [s["id"] for s in reg.list(SAE, path=str(home / "saes" / "sae-1"))] == ["sae-1"]
    finally:
        reg.close()

    moved = Registry(db_url, tmp_path / "elsewhere")  # the same registry opened from another data root
    try:
        sae = moved.get(SAE, "sae-1")
        assert (sae["path"], sae["features_path"]) == (str(tmp_path / "elsewhere" / "saes" / "sae-1"),
                                                        str(tmp_path / "elsewhere" / "features" / "sae-1"))
        assert moved.get(Model, "own")["path"] == str(user)
    finally:
        moved.close()


def test_an_old_registry_with_absolute_paths_is_moved_on_open(db_url, tmp_path):  # noqa: F811
    """Rows written before paths were relative: this data root's own become relative; another
    root's (the registry copied from /old/home) become relative where this root holds the artifact
    under the same kind folder and id, and so does any other path under that old root which this
    root holds (a model folder registered in place there); the rest (a user's own folder, a missing
    artifact) stay."""
    home, old = tmp_path / "home", Path("/old/home")
    legacy = Registry(db_url)  # no data root: paths kept exactly as given, as before
    try:
        legacy.add(_model("m", str(home / "models" / "m")))
        legacy.add(_model("mine", "/data/models/mine", source="/data/models/mine"))  # a user's folder, in place
        inside = str(old / "imports" / "tiny")  # a user's folder, registered in place inside the old root
        legacy.add(_model("tiny", inside, source=inside))
        legacy.add(Dataset(id="ds-1", name="ds", source="builtin", text_column="text", model_id="m", context_length=64,
                           path=str(old / "datasets" / "ds-1"), documents=1, rows=1, tokens=10))
        legacy.add(Activation(id="act-1", job_id="extract-1", model_id="m", dataset_id="ds-1",
                              hook_name="blocks.1.hook_resid_post", tokens=10, d_model=64,
                              path=str(old / "activations" / "extract-1" / "blocks.1.hook_resid_post")))
        legacy.add(_sae("sae-x", str(old / "saes" / "sae-x"), str(old / "features" / "sae-x")))
        legacy.add(_sae("sae-gone", str(old / "saes" / "sae-gone")))  # not in the new root
        legacy.add(_sae("sae-odd", "/elsewhere/saes/sae-other"))  # another id's folder, under no known old root
    finally:
        legacy.close()
    for rel in ("datasets/ds-1", "activations/extract-1/blocks.1.hook_resid_post", "saes/sae-x",
                "features/sae-x", "saes/sae-other", "models/mine", "imports/tiny"):
        (home / rel).mkdir(parents=True)

    reg = Registry(db_url, home)
    try:
        assert _raw(reg, "SELECT id, path FROM models ORDER BY id") == [
            ("m", "models/m"), ("mine", "/data/models/mine"), ("tiny", "imports/tiny")]
        assert _raw(reg, "SELECT path FROM datasets") == [("datasets/ds-1",)]
        assert _raw(reg, "SELECT path FROM activations") == [("activations/extract-1/blocks.1.hook_resid_post",)]
        assert _raw(reg, "SELECT id, path, features_path FROM saes ORDER BY id") == [
            ("sae-gone", str(old / "saes" / "sae-gone"), None),
            ("sae-odd", "/elsewhere/saes/sae-other", None),
            ("sae-x", "saes/sae-x", "features/sae-x")]
        assert reg.get(SAE, "sae-x")["features_path"] == str(home / "features" / "sae-x")
        assert reg.get(Activation, "act-1")["path"] == str(home / "activations" / "extract-1" /
                                                           "blocks.1.hook_resid_post")
    finally:
        reg.close()
    again = Registry(db_url, home)  # a second open finds nothing more to move
    try:
        assert _raw(again, "SELECT id, path FROM saes ORDER BY id")[2] == ("sae-x", "saes/sae-x")
    finally:
        again.close()


def test_an_old_registry_moves_to_an_artifact_only_the_store_holds(tmp_path):
    """With an object-store artifact root a node may lack the folder: the store's copy counts."""
    store = f"file://{tmp_path / 'store'}"
    old = Settings.from_env({"MISTUDIO_HOME": str(tmp_path / "old"), "MISTUDIO_ARTIFACT_ROOT": store})
    folder = old.home / "saes" / "sae-x"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    Artifacts.of(old).push(folder)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    legacy = Registry(url)
    legacy.add(_sae("sae-x", str(folder)))
    legacy.close()

    env = {"MISTUDIO_HOME": str(tmp_path / "new"), "MISTUDIO_DATABASE_URL": url, "MISTUDIO_ARTIFACT_ROOT": store}
    new = Settings.from_env(env)
    artifacts = Artifacts.of(new)
    reg = Registry.of(new, artifacts)
    try:
        assert _raw(reg, "SELECT path FROM saes") == [("saes/sae-x",)]
        path = reg.get(SAE, "sae-x")["path"]
        assert path == str(new.home / "saes" / "sae-x") and not Path(path).exists()
        assert (artifacts.pull(path) / "cfg.json").read_text() == "{}"
    finally:
        reg.close()


def test_the_registry_of_settings_uses_their_data_root(tmp_path):
    settings = Settings.from_env({"MISTUDIO_HOME": str(tmp_path / "home")})
    reg = Registry.of(settings)
    try:
        reg.add(_model("m", str(settings.home / "models" / "m")))
        assert _raw(reg, "SELECT path FROM models") == [("models/m",)]
        assert reg.get(Model, "m")["path"] == str(settings.home / "models" / "m")
    finally:
        reg.close()


def test_a_copied_data_root_does_not_take_the_original_head_for_its_own(tmp_path):
    """The copy carries the original's ray_head.json: that head serves the original's registry,
    so the copy starts its own head (and `mistudio stop` in the copy leaves the original's alone)."""
    import socket

    from actors import cluster

    with socket.socket() as head:  # something answering at the recorded address, like a live head
        head.bind(("127.0.0.1", 0))
        head.listen()
        original = Settings.from_env({"MISTUDIO_HOME": str(tmp_path / "original")})
        copy = Settings.from_env({"MISTUDIO_HOME": str(tmp_path / "copy")})
        record = {"address": f"127.0.0.1:{head.getsockname()[1]}", "dashboard": "", "home": str(original.home)}
        for settings in (original, copy):
            settings.home.mkdir()
            cluster.head_file(settings).write_text(json.dumps(record))
        assert cluster.recorded_head(original) == record
        assert cluster.recorded_head(copy) is None
        del record["home"]  # a record written before heads noted their data root is still taken
        cluster.head_file(copy).write_text(json.dumps(record))
        assert cluster.recorded_head(copy) == record


# -- a copied data root ------------------------------------------------------------------------------


class _Report:
    """The progress reporter a step gets, without a ProgressActor: nothing asks it to stop."""

    def __call__(self, metrics, force=False):
        pass

    def flush(self):
        pass

    def should_cancel(self):
        return False

    def requested(self):
        return ""


class Studio:
    """One data root's registry and artifacts, running jobs in this process the way the JobManager
    and a ModelWorker do (submit → check → plans → run each step → record)."""

    def __init__(self, home: Path):
        from core.models import ModelCache

        self.settings = Settings.from_env({"MISTUDIO_HOME": str(home)})
        self.artifacts = Artifacts.of(self.settings)
        self.registry = Registry.of(self.settings, self.artifacts)
        self.models = ModelCache(1)

    def run(self, kind_name: str, values: dict) -> dict:
        from actors import jobs, specs

        spec = specs.parse_spec(kind_name, values)
        refs = {k: getattr(spec, k) for k in ("model_id", "dataset_id", "sae_id") if hasattr(spec, k)}
        job = self.registry.create_job(kind_name, specs.to_dict(spec), **refs)
        kind = jobs.get(kind_name)
        kind.check(self.registry, spec)
        state = lambda s, message="": self.registry.set_job_state(job["id"], s, message=message)  # noqa: E731
        ctx = jobs.JobContext(job["id"], self.registry, self.artifacts, call=lambda plan: self._step(job["id"], plan),
                              state=state)
        result = jobs.execute(ctx, kind, spec)
        return self.registry.set_job_state(job["id"], "completed", result=result)["result"]

    def _step(self, job_id: str, plan):
        from actors import jobs
        from core import models

        def model():
            if plan.model.id not in self.models:
                self.models[plan.model.id] = models.load_model(plan.model.path, device="cpu")
            return self.models[plan.model.id]

        ctx = jobs.RunContext(job_id, "cpu", _Report(), self.artifacts, self.models, model=model,
                              tokenizer=lambda: model()[1], state=lambda *a, **k: None)
        return jobs.get(plan.kind).run(ctx, plan)

    def close(self):
        self.registry.close()


def _everything(reg: Registry) -> str:
    """Every row of every table as the database holds it, as one text, but for what a user typed as
    a source (a model folder registered in place, a dataset's file: where it came from, kept as
    written)."""
    def row(r):
        r = dict(r)
        r.pop("source", None)
        if isinstance(r.get("spec"), dict):
            r["spec"] = {k: v for k, v in r["spec"].items() if k != "source"}
        return r

    with reg.engine.connect() as conn:
        return json.dumps({t.name: [row(r) for r in conn.execute(t.select()).mappings()]
                           for t in Base.metadata.sorted_tables}, default=str)


def _as_older_registry(db: Path, root: Path) -> int:
    """Write the registry's relative paths back as absolute ones under `root`, as miStudio did
    before paths were relative; returns how many it wrote."""
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        with conn:
            for t, cols in COLUMNS_OF.items():
                for c in cols:
                    conn.execute(f"UPDATE {t} SET {c} = ? || '/' || {c} WHERE {c} NOT LIKE '/%'", (str(root),))
        return conn.total_changes
    finally:
        conn.close()


@pytest.mark.parametrize("written", ["relative", "absolute, by an older miStudio"])
def test_a_copied_data_root_opens_and_works_on_its_own_copy(written, tiny_model_dir, tmp_path, one_thread):
    from core.data import read_rows
    from core.features import store as features_store
    from core.formats.saelens import load_saelens

    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(tiny_model_dir, original / "imports" / "tiny-llama")  # a model folder inside the root
    studio = Studio(original)
    try:
        studio.run("add_model", {"source": str(original / "imports" / "tiny-llama"), "name": "tiny-llama"})
        ds = studio.run("add_dataset", {"model_id": "tiny-llama", "source": "builtin", "context_length": 64,
                                        "max_documents": 20})
        run = studio.run("pipeline", {"model_id": "tiny-llama", "dataset_id": ds["dataset_id"], "layer": 1,
                                      "max_tokens": 1500, "top_k": 5,
                                      "train": {"expansion_factor": 2, "k": 4, "batch_size": 256, "epochs": 1}})
        assert str(original) not in _everything(studio.registry)  # no table names the data root
    finally:
        studio.close()  # (a SQLite registry is copied closed: its WAL is folded back into registry.db)

    if written != "relative":  # model, dataset, activations, SAE and its features
        assert _as_older_registry(original / "registry.db", original) == 5
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    studio = Studio(copy)
    try:
        sae = studio.registry.get(SAE, run["sae_id"])
        assert Path(sae["path"]) == copy / "saes" / sae["id"]
        weights, cfg = load_saelens(sae["path"])
        assert (weights.d_in, cfg.hook_name) == (64, "blocks.1.hook_resid_post")
        assert Path(sae["features_path"]) == copy / "features" / sae["id"]
        top = features_store.top_features(sae["features_path"], 1)[0]
        assert features_store.read_examples(sae["features_path"], top["latent"])
        dataset = studio.registry.get(Dataset, ds["dataset_id"])
        assert Path(dataset["path"]) == copy / "datasets" / ds["dataset_id"] and read_rows(dataset["path"], [0])[0].size
        (act,) = studio.registry.list(Activation)
        assert Path(act["path"]).is_relative_to(copy) and Path(act["path"]).is_dir()
        assert studio.registry.get(Model, "tiny-llama")["path"] == str(copy / "imports" / "tiny-llama")
        assert str(original) not in _everything(studio.registry)  # an older registry's paths were moved on open

        # a new write: another dataset, and features discovered again on it, load the copy's model
        ds2 = studio.run("add_dataset", {"model_id": "tiny-llama", "source": "builtin", "context_length": 32,
                                         "max_documents": 10})
        studio.run("discover", {"dataset_id": ds2["dataset_id"], "sae_id": sae["id"], "top_k": 3,
                                "max_tokens": 800})
        assert (copy / "datasets" / ds2["dataset_id"] / "stats.json").is_file()
        assert studio.registry.get(SAE, sae["id"])["features_dataset_id"] == ds2["dataset_id"]
        assert features_store.read_examples(studio.registry.get(SAE, sae["id"])["features_path"], top["latent"]) \
            is not None
        assert not original.exists()  # nothing wrote to, or recreated, the old data root
        assert str(copy) not in _everything(studio.registry)
        rows = _raw(studio.registry, f"SELECT path FROM datasets WHERE id = '{ds2['dataset_id']}'")
        assert rows == [(f"datasets/{ds2['dataset_id']}",)]
        assert studio.registry.get(Job, studio.registry.jobs(kind="discover")[0]["id"])["state"] == "completed"
    finally:
        studio.close()
