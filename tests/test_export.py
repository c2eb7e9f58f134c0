"""Feature exports: Neuronpedia-style batches and the dashboard bundle, from a real discovery
and analysis on the tiny model."""

import json

import pytest

from core.errors import UserError
from core.export import read_bundle


@pytest.fixture(scope="module")
def analyzed(client, tiny_run):
    sae_id = tiny_run["job"]["result"]["sae_id"]
    job = client.wait(client.submit("analyze", {"sae_id": sae_id, "config": {"ablation_top": 1, "nlp": False}}))
    assert job["state"] == "completed", job["message"]
    return sae_id


def test_neuronpedia_batches(client, analyzed, tmp_path):
    client.export_features(analyzed, "neuronpedia", str(tmp_path / "np"))
    files = sorted((tmp_path / "np").glob("batch-*.json"))
    batches = [json.loads(p.read_text()) for p in files]
    live = [f for f in client.features(analyzed) if f["n_fired"] > 0]
    assert len(files) == -(-len(live) // 128) and all(len(b["features"]) <= 128 for b in batches)
    batch = {**batches[0], "features": [d for b in batches for d in b["features"]]}
    assert batch["layer"] == 1 and batch["model_id"] == "tiny-llama" and len(batch["features"]) == len(live)
    by = {f["latent"]: f for f in live}
    for doc in batch["features"]:
        f = by[doc["feature_index"]]
        assert doc["frac_nonzero"] == pytest.approx(f["frequency"])
        assert sum(doc["freq_hist_data_bar_heights"]) == f["n_fired"]
        assert len(doc["pos_str"]) == len(doc["pos_values"]) == 10 and doc["similar_features"]
        acts = doc["activations"]
        top = [a for a in acts if a["bin_min"] == -1]
        assert top and top[0]["maxValue"] == pytest.approx(f["max_act"], rel=1e-4)
        for a in acts:
            assert len(a["tokens"]) == len(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
        for a in acts[len(top):]:
            assert a["bin_contains"] == pytest.approx(0.1) and a["bin_min"] <= a["maxValue"] <= a["bin_max"]
    assert any(d["ablation"] for d in batch["features"]), "the most frequent latent's ablation was measured"


def test_bundle_round_trip(client, analyzed, tmp_path):
    latents = [f["latent"] for f in client.features(analyzed) if f["n_fired"] > 0][:3]
    path = client.export_features(analyzed, "bundle", str(tmp_path / "b.zip"), latents)
    manifest, docs = read_bundle(path)
    assert manifest["sae"]["id"] == analyzed and manifest["latents"] == latents
    assert docs == {d["feature_index"]: d for d in client.feature_documents(analyzed, latents)}
    (tmp_path / "bad.zip").write_text("nope")
    with pytest.raises(UserError, match="not a readable feature bundle"):
        read_bundle(tmp_path / "bad.zip")
    with pytest.raises(UserError, match="latent 100000 is out of range"):
        client.feature_documents(analyzed, [100000])
    with pytest.raises(UserError, match="export format 'csv'"):
        client.export_features(analyzed, "csv", str(tmp_path / "x"))


def test_cli_features_show_label_export(client, analyzed, tmp_path, capsys, monkeypatch):
    from ui import cli

    monkeypatch.setenv("MISTUDIO_HOME", str(client.settings.home))
    monkeypatch.setenv("MISTUDIO_RAY_ADDRESS", "local")
    latent = client.features(analyzed)[0]["latent"]
    cli.main(["features", "label", "--sae", analyzed, "--latent", str(latent), "--name", "line starts",
              "--category", "position", "--description", "first token of a line"])
    cli.main(["features", "show", "--sae", analyzed, "--latent", str(latent)])
    out = capsys.readouterr().out
    assert f"latent {latent}: line starts [position, user]" in out and "promotes" in out and "[[" in out
    assert "ablation: next-token loss" in out
    cli.main(["features", "export", "--sae", analyzed, "--format", "bundle", "--out", str(tmp_path / "b.zip"),
              "--latents", str(latent)])
    _, docs = read_bundle(tmp_path / "b.zip")
    assert docs[latent]["explanation"]["name"] == "line starts"

    # Exports never replace what is there unless asked: a folder with a user's file in it, a bundle.
    mine = tmp_path / "np"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    for out, fmt in ((mine, "neuronpedia"), (tmp_path / "b.zip", "bundle")):
        with pytest.raises(SystemExit) as e:
            cli.main(["features", "export", "--sae", analyzed, "--format", fmt, "--out", str(out)])
        assert str(e.value).startswith(f"error: {out} is already a ") and "--overwrite" in str(e.value)
    assert (mine / "keep.txt").read_text() == "mine" and read_bundle(tmp_path / "b.zip")[1].keys() == {latent}
    cli.main(["features", "export", "--sae", analyzed, "--format", "neuronpedia", "--out", str(mine), "--overwrite"])
    assert not (mine / "keep.txt").exists() and any(mine.iterdir())
    (tmp_path / "empty").mkdir()  # an empty folder is a new one
    cli.main(["features", "export", "--sae", analyzed, "--format", "neuronpedia", "--out", str(tmp_path / "empty")])
