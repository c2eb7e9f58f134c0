"""Job specs and job config files: validated with one-line errors before anything runs."""

import subprocess
import sys

import pytest

from actors.jobs.pipeline import PipelineSpec
from actors.specs import load_job_file, parse_spec
from core.errors import UserError


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_valid_yaml_file_gives_kind_and_spec(tmp_path):
    kind, spec = load_job_file(write(tmp_path, "kind: pipeline\nmodel_id: m\ndataset_id: d\nlayer: 3\n"
                                               "train: {k: 16, epochs: 2}\n"))
    assert kind == "pipeline"
    parsed = parse_spec(kind, spec)
    assert isinstance(parsed, PipelineSpec) and parsed.layer == 3 and parsed.train == {"k": 16, "epochs": 2}


def test_json_files_work_too(tmp_path):
    kind, spec = load_job_file(write(tmp_path, '{"kind": "extract", "model_id": "m", "dataset_id": "d", '
                                               '"layers": [1, 2]}', "job.json"))
    assert (kind, spec["layers"]) == ("extract", [1, 2])


@pytest.mark.parametrize("text, message", [
    ("kind: train\nactivation_ids: [a]\nlr: 0.1\n", "unknown key(s) lr in a train spec"),
    ("kind: train\nconfig: {k: 3}\n", "needs either activation_ids"),
    ("kind: train\nactivation_ids: [a]\nmodel_id: m\n", "not both"),
    ("kind: train\nmodel_id: m\nhook_names: [blocks.1.hook_resid_post]\n", "needs model_id, dataset_ids and hook_names"),
    ("kind: train\nactivation_ids: [a]\nvariants: [{kk: 1}]\n", "unknown training option(s) kk"),
    ("kind: train\nactivation_ids: [a]\nconfig: {architecture: gated}\n", "unknown SAE architecture 'gated'"),
    ("kind: extract\nmodel_id: m\ndataset_id: d\nlayers: five\n", "'layers' should be list[int], got 'five'"),
    ("kind: extract\nmodel_id: m\ndataset_id: d\nbatch_size: 2.5\n", "'batch_size' should be int"),
    ("kind: pipeline\nmodel_id: m\ndataset_id: d\ntrain: {kk: 3}\n", "unknown training option(s) kk"),
    ("model_id: m\n", "has no 'kind'"),
    ("kind: bake\n", "unknown job kind 'bake'"),
    ("kind: extract\ndataset_id: d\n", "this extract job needs model_id"),
    ("kind: [extract\n", "is not valid YAML/JSON at line"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        load_job_file(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found; check the path"):
        load_job_file(str(tmp_path / "nope.yaml"))


def test_cli_refuses_a_bad_file_before_touching_ray(tmp_path):
    bad = write(tmp_path, "kind: train\nactivation_ids: [a]\ncolour: red\n")
    env_home = tmp_path / "home"
    out = subprocess.run([sys.executable, "-m", "ui.cli", "run", bad], capture_output=True, text=True,
                         env={"PATH": "", "MISTUDIO_HOME": str(env_home), "HOME": str(tmp_path)})
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: unknown key(s) colour in a train spec; allowed: activation_ids, model_id")
    assert not env_home.exists()  # no Ray head was started, nothing was written
