"""Bad input is refused before anything runs, in one line that names the fix (issue 24's list).

Each case goes through the function that refuses it (what the CLI, the dashboard and job files
all call at submit) or, where the refusal is the CLI's own, through `mistudio` itself; none of
these needs Ray. Cases that need a running job (cancelling a finished one, a taken model id)
are in tests/test_cli.py and tests/test_actors.py; exports in tests/test_export.py.
"""

import math

import pytest

from actors import specs
from core.errors import UserError
from core.train import TrainConfig
from ui import cli


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("options, message", [
    ({"lr": 0}, r"^lr=0 must be a positive number"),
    ({"lr": -1}, r"^lr=-1 must be a positive number"),
    ({"lr": math.nan}, r"^lr=nan must be a positive number"),
    ({"epochs": 0}, r"^epochs=0 must be at least 1$"),
    ({"total_tokens": -5}, r"^total_tokens=-5 must be at least 1"),
    ({"lr_warmup_frac": 2}, r"^lr_warmup_frac=2 must be a fraction of the run, between 0 and 1$"),
    ({"lr_decay_frac": -1}, r"^lr_decay_frac=-1 must be a fraction"),
    ({"lr_warmup_frac": 0.6, "lr_decay_frac": 0.6}, r"^lr_warmup_frac \+ lr_decay_frac = 1.2 exceeds the run"),
    ({"log_every": 0}, r"^log_every=0 must be at least 1$"),
    ({"dead_tokens": 0}, r"^dead_tokens=0 must be at least 1"),
    ({"grad_clip": math.nan}, r"^grad_clip=nan must be 0 \(off\) or a positive number$"),
    ({"outlier_norm_multiple": 0}, r"^outlier_norm_multiple=0 must be positive, or null"),
    ({"device": "banana"}, r"^device 'banana' is not a torch device; use cpu, cuda or cuda:N$"),
    ({"batch_size": 1}, r"^batch_size=1 is too small"),
])
def test_training_settings_that_cannot_train_are_refused(options, message):
    with pytest.raises(UserError, match=message) as e:
        TrainConfig(**options).resolved(576)
    one_line(e)


def test_a_device_this_machine_lacks_is_refused():
    import torch

    count = torch.cuda.device_count()
    with pytest.raises(UserError, match=r"^device 'cuda:7': this machine has ") as e:
        TrainConfig(device="cuda:7").resolved(64) if count <= 7 else pytest.fail("a machine with 8+ GPUs")
    one_line(e)


def test_a_width_that_cannot_fit_is_refused_before_the_job_with_a_width_that_fits():
    import psutil

    with pytest.raises(UserError) as e:
        TrainConfig(expansion_factor=100_000).resolved(576)
    msg = one_line(e)
    assert msg.startswith("an SAE of 57,600,000 latents on d_in=576 with batch 4,096 needs at least 867.4 GiB")
    suggested = int(msg.split("use about ")[1].split(" latents")[0].replace(",", ""))
    assert 1024 <= suggested and suggested % 1024 == 0
    TrainConfig(d_sae=suggested).resolved(576)  # the width it names is accepted
    assert psutil.virtual_memory().total > 0


def test_the_train_jobs_config_checks_types_and_values_at_submit():
    from actors.jobs.train import TrainSpec, check

    with pytest.raises(UserError, match=r"^lr=0 must be a positive number") as e:
        check(None, TrainSpec(activation_ids=["a"], config={"lr": 0}))
    one_line(e)


def test_a_template_with_a_bad_nested_setting_is_refused_when_saved():
    with pytest.raises(UserError, match=r"^training option 'k' should be int, got 'many'$"):
        specs.check_template("train", {"config": {"sae": {"architecture": "topk", "k": "many"}}})
    with pytest.raises(UserError, match=r"^lr_decay_frac=-1 must be a fraction"):
        specs.check_template("pipeline", {"train": {"lr_decay_frac": -1}})
    assert specs.check_template("train", {"config": {"sae": {"architecture": "topk", "k": 8}}})


def test_dataset_and_steering_numbers():
    from actors.jobs.add_dataset import AddDatasetSpec
    from actors.jobs.add_dataset import check as check_dataset
    from core.steer import GenerationConfig

    with pytest.raises(UserError, match=r"^max_documents=-1 must be 0 \(all\) or more$"):
        check_dataset(None, AddDatasetSpec(model_id="m", max_documents=-1))
    for bad in ({"temperature": math.nan}, {"temperature": -1}, {"repetition_penalty": math.inf}, {"top_p": 0}):
        with pytest.raises(UserError, match=r"^use a finite temperature >= 0") as e:
            GenerationConfig(**bad).check()
        one_line(e)


def test_a_yaml_bomb_is_refused_without_expanding(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["kind: train", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"^line 3: YAML aliases \(\*name\) are not allowed in a job file") as e:
        specs.load_job_file(str(bomb))
    one_line(e)


def test_long_values_are_cut_in_messages(tmp_path):
    job = tmp_path / "long.yaml"
    job.write_text("kind: extract\nmodel_id: m\ndataset_id: d\nlayers: " + "x" * 5000 + "\n")
    with pytest.raises(UserError) as e:
        specs.load_job_file(str(job))
    assert one_line(e).endswith("…") and "x" * 100 not in str(e.value)


def test_cli_errors_are_one_line_and_the_traceback_is_on_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MISTUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MISTUDIO_WORKERS", "abc")
    with pytest.raises(SystemExit) as e:
        cli.main(["models", "list"])
    assert str(e.value) == "error: MISTUDIO_WORKERS='abc' is not a whole number; fix or unset it (default 1)"
    assert not (tmp_path / "home" / "ray_head.json").exists()  # refused before a Ray head started
    monkeypatch.delenv("MISTUDIO_WORKERS")

    def boom(a):
        raise RuntimeError("the disk caught fire\nand more detail")
    monkeypatch.setattr(cli, "cmd_models", boom)
    parser = cli.build_parser("models")
    parser.set_defaults(fn=boom)
    monkeypatch.setattr(cli, "build_parser", lambda command=None: parser)
    with pytest.raises(SystemExit) as e:
        cli.main(["models", "list"])
    assert str(e.value) == "error: RuntimeError: the disk caught fire (mistudio --debug ... shows the traceback)"
    with pytest.raises(RuntimeError, match="the disk caught fire"):
        cli.main(["--debug", "models", "list"])
