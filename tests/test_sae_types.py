"""The SAE type registry: a type is one file that registers itself and owns its knobs.

A type defined here, in the test, trains through core.train and is listed, parsed and
described by the registry with no other file changed.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.sae import SAE, SAETypeConfig, StepContext, StepOut, registry
from core.sae.base import reconstruction_terms
from core.train import TrainConfig, train_sae

D_IN = 16


@dataclass
class SquareConfig(SAETypeConfig):
    """Knobs of a toy type: ReLU with a penalty on the squared activations."""

    penalty: float = 0.05
    """Weight of Σ z² per token."""

    def check(self, d_sae: int) -> None:
        if self.penalty < 0:
            raise UserError(f"penalty={self.penalty} must be 0 or more")

    def sparsity_coefficient(self) -> float:
        return self.penalty

    def run_name(self) -> str:
        return f"{self.architecture}-p{self.penalty:g}"


class SquareSAE(SAE):
    """A toy type for this test only."""

    Config = SquareConfig

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOut:
        z = self.pre_acts(x).relu()
        x_hat = z @ self.W_dec + self.b_dec
        sq_err, total_var = reconstruction_terms(x, x_hat)
        loss = sq_err / len(x) + ctx.sparsity_coefficient * z.pow(2).sum() / len(x)
        live = z > 0
        return StepOut(loss, (sq_err / total_var).detach(), sq_err.detach(), live.sum(1).float().mean(), live.any(0))


@pytest.fixture
def square_type():
    registry.register("test-square")(SquareSAE)
    yield "test-square"
    registry.unregister("test-square")


def _data(n=6_000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((24, D_IN))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    pick = rng.integers(0, 24, (n, 2))
    return (atoms[pick].sum(1) + 0.01 * rng.standard_normal((n, D_IN))).astype(np.float32)


def test_a_type_registered_in_a_test_trains_through_core_train(square_type):
    cfg = TrainConfig.from_dict({"architecture": square_type, "penalty": 0.01, "expansion_factor": 2,
                                 "batch_size": 256, "epochs": 3, "lr": 1e-2, "sample_tokens": 1024})
    assert isinstance(cfg.sae, SquareConfig) and cfg.run_name() == "test-square-p0.01"
    x = _data()
    result = train_sae(lambda: iter([x[i: i + 1000] for i in range(0, len(x), 1000)]), D_IN, cfg,
                       holdout_tokens=500)
    assert isinstance(result.sae, SquareSAE) and result.sae.d_sae == 2 * D_IN
    assert result.final["fvu"] < 0.5, result.final
    assert square_type in registry.names(inference=True)
    assert registry.summarize(cfg.sae.to_dict()) == ""  # no cfg.json knobs to show
    assert registry.config_from_dict(cfg.sae.to_dict()) == cfg.sae
    about = {t["name"]: t for t in registry.catalogue()}[square_type]
    assert about["fields"] == [{"name": "penalty", "default": 0.05, "help": "Weight of Σ z² per token."}]


def test_flat_job_file_configs_keep_working():
    """Today's job files are flat: the type's knobs sit beside the schedule's, under their old
    names, and another type's knobs are ignored as before."""
    cfg = TrainConfig.from_dict({"architecture": "jumprelu", "k": 16, "jumprelu_bandwidth": 0.1,
                                 "l0_coefficient": 2.0, "l1_coefficient": 9.0, "epochs": 2})
    assert (cfg.sae.init_l0, cfg.sae.bandwidth, cfg.sae.l0_coefficient, cfg.epochs) == (16, 0.1, 2.0, 2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    nested = TrainConfig.from_dict({"sae": {"architecture": "topk", "k": 8}, "d_sae": 100})
    assert (nested.sae.k, nested.resolved(16).d_sae, nested.run_name()) == (8, 100, "topk-k8")
    assert TrainConfig(expansion_factor=3).resolved(16).d_sae == 48


@pytest.mark.parametrize("values, message", [
    ({"architecture": "gated"}, "unknown SAE architecture 'gated'; pick one of topk, "),
    ({"colour": 1}, "unknown training option(s) colour; allowed: "),
    ({"sae": {"architecture": "topk", "l1_coefficient": 1.0}}, "unknown setting(s) l1_coefficient for a topk SAE"),
])
def test_bad_training_configs_are_one_line_errors(values, message):
    with pytest.raises(UserError) as e:
        TrainConfig.from_dict(values)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_k_is_checked_against_the_resolved_width():
    with pytest.raises(UserError, match="k=200 must be between 1 and the SAE width 64; lower k"):
        TrainConfig.from_dict({"k": 200, "expansion_factor": 4}).resolved(16)


def test_a_type_registered_in_a_test_passes_a_training_jobs_check(square_type, tmp_path):
    """The train job kind checks a spec naming the new type (its knobs, checked by the type
    itself, against the width the job resolves) with no other file changed."""
    from actors import jobs, specs
    from storage import Registry
    from storage.registry import Activation, Dataset, Model

    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.add(Model(id="m", name="m", source="x", path="/m", architecture="llama", n_layers=2, d_model=D_IN,
                  n_params=1, dtype="float32", vocab_size=10))
    reg.add(Dataset(id="d", name="d", source="builtin", text_column="text", model_id="m", context_length=8,
                    path="/d", documents=1, rows=1, tokens=100))
    reg.add(Activation(id="a", job_id="j", model_id="m", dataset_id="d", hook_name="blocks.1.hook_resid_post",
                       path="/a", tokens=100, d_model=D_IN))
    train = jobs.get("train")

    def check(config):
        train.check(reg, specs.parse_spec("train", {"activation_ids": ["a"], "config": config}))

    check({"architecture": square_type, "penalty": 0.2, "expansion_factor": 2})
    check({"sae": {"architecture": square_type, "penalty": 0.0}, "d_sae": 100})
    with pytest.raises(UserError, match="penalty=-1 must be 0 or more"):
        check({"architecture": square_type, "penalty": -1})
    with pytest.raises(UserError, match="training option 'penalty' should be float"):
        check({"architecture": square_type, "penalty": "lots"})
    reg.close()
