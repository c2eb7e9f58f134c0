import math

import numpy as np
import pytest
import torch

from core.errors import Cancelled, UserError
from core.sae import SAEConfig, TopKSAE, load_saelens, save_saelens
from core.sae import StepContext
from core.train import TrainConfig, _lr_factor, evaluate, train_sae

D_IN = 32
SCALE = 50.0  # raw activations far from E‖x‖ = √d, so the folded scale matters


def synthetic(n=12_000, atoms=48, active=3, seed=0) -> np.ndarray:
    """Sparse non-negative combinations of a random unit dictionary, plus an offset and noise."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((atoms, D_IN))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    idx = np.stack([rng.choice(atoms, active, replace=False) for _ in range(n)])
    coef = rng.uniform(0.5, 2.0, (n, active))
    x = (coef[:, :, None] * D[idx]).sum(1) + 3.0 + 0.01 * rng.standard_normal((n, D_IN))
    return (x * SCALE).astype(np.float32)


def source(x: np.ndarray, chunk=2_500):
    return lambda: iter([x[i : i + chunk] for i in range(0, len(x), chunk)])


def fvu(sae: TopKSAE, x: np.ndarray) -> float:
    return evaluate(sae, torch.from_numpy(x))["fvu"]


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = TrainConfig(expansion_factor=4, k=4, batch_size=256, epochs=4, lr=1e-2, log_every=10, sample_tokens=4096)


@pytest.fixture(scope="module")
def trained():
    x = synthetic()
    calls = []
    result = train_sae(source(x), D_IN, CFG, progress=calls.append)
    return x, result, calls


def test_fvu_falls_and_ends_low(trained):
    x, result, _ = trained
    first, last = result.history[0]["fvu"], result.history[-1]["fvu"]
    assert first > 0.3 and last < 0.1, (first, last)
    assert result.final["fvu"] < 0.1
    assert result.final["l0"] <= 4 and result.final["tokens"] == 4 * len(x)
    assert [h["step"] for h in result.history] == sorted(h["step"] for h in result.history)
    assert set(result.history[0]) == {"step", "tokens", "loss", "mse", "fvu", "l0", "dead_frac", "lr"}


def test_decoder_rows_stay_unit_norm(trained):
    _, result, _ = trained
    torch.testing.assert_close(result.sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)


def test_scale_is_folded_into_the_weights(trained):
    x, result, _ = trained
    s = result.scale
    xt = torch.from_numpy(x[:2000])
    assert math.isclose(float((xt * s).norm(dim=1).mean()), math.sqrt(D_IN), rel_tol=0.05)
    # The returned SAE on raw x equals the trained (scaled-space) SAE on s·x, divided by s.
    scaled = TopKSAE(D_IN, 128, 4)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(scaled, name).copy_(getattr(result.sae, name))
        scaled.b_enc.mul_(s)
        scaled.b_dec.mul_(s)
        torch.testing.assert_close(result.sae(xt)[0], scaled(xt * s)[0] / s, rtol=1e-4, atol=1e-3)
    # ... so raw-space FVU is what training reported.
    assert abs(fvu(result.sae, x) - result.history[-1]["fvu"]) < 0.02
    assert abs(fvu(result.sae, x) - result.final["fvu"]) < 0.02


def test_save_load_round_trip_gives_identical_encodings(trained, tmp_path):
    x, result, _ = trained
    cfg = SAEConfig(d_in=D_IN, d_sae=128, k=4, hook_name="blocks.0.hook_resid_post")
    sae, loaded_cfg = load_saelens(save_saelens(result.sae, cfg, tmp_path / "sae"))
    xt = torch.from_numpy(x[:500])
    assert loaded_cfg == cfg
    assert torch.equal(sae.encode(xt), result.sae.encode(xt))


def test_progress_reports(trained):
    _, _, calls = trained
    assert calls[0]["done"] == 0
    for c in calls[1:]:
        assert c["phase"] == "train" and c["unit"] == "tokens"
        assert {"done", "total", "samples_per_s", "eta_s", "step", "loss", "mse", "fvu", "l0", "dead_frac"} <= set(c)
    assert calls[-1]["done"] == calls[-1]["total"]


def test_outliers_are_excluded_and_counted():
    x = synthetic(n=3_000)
    x[[5, 700, 2999]] *= 1000.0  # massive-activation tokens
    cfg = TrainConfig(expansion_factor=4, k=4, batch_size=256, epochs=2, lr=1e-2, log_every=5, sample_tokens=1024)
    result = train_sae(source(x, chunk=1_000), D_IN, cfg)
    assert result.final["excluded_outliers"] == 6  # 3 tokens × 2 epochs
    assert result.final["tokens"] == 2 * (3_000 - 3)
    assert result.final["outlier_norm_threshold"] < 1000.0 * result.final["median_norm"]
    # The scale was estimated without them: E‖s·x‖ = √d on the ordinary tokens.
    kept = np.delete(x, [5, 700, 2999], axis=0)
    assert math.isclose(float(np.linalg.norm(kept * result.scale, axis=1).mean()), math.sqrt(D_IN), rel_tol=0.05)
    assert np.isfinite(result.final["fvu"]) and result.final["fvu"] < 0.6


def test_total_tokens_budget_cycles_the_data():
    x = synthetic(n=1_000)
    cfg = TrainConfig(expansion_factor=4, k=4, batch_size=128, total_tokens=2_500, log_every=100, sample_tokens=512)
    result = train_sae(source(x, chunk=300), D_IN, cfg)
    assert result.final["tokens"] == 2_500
    assert result.history[-1]["tokens"] == 2_500


def test_k_larger_than_d_sae_is_a_user_error():
    with pytest.raises(UserError, match="k=200 must be between 1 and d_sae=128"):
        train_sae(source(synthetic(n=100)), D_IN, TrainConfig(expansion_factor=4, k=200))


def test_wrong_width_is_a_user_error():
    with pytest.raises(UserError, match=r"expected \[N, 16\]"):
        train_sae(source(synthetic(n=100)), 16, TrainConfig(expansion_factor=4, k=4))


def test_cancel_raises_cancelled():
    checks = []

    def should_cancel():
        checks.append(1)
        return len(checks) > 3

    cfg = TrainConfig(expansion_factor=4, k=4, batch_size=64, epochs=1, sample_tokens=256)
    with pytest.raises(Cancelled):
        train_sae(source(synthetic(n=2_000)), D_IN, cfg, should_cancel=should_cancel)


def test_lr_schedule_warms_up_and_decays_to_zero():
    f = [_lr_factor(s, 100, 0.05, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and f[4] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[81] < 1.0 and f[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))


def test_sparse_gradients_match_dense_autograd():
    """The sparse encoder backward and gather decoder give the same gradients as dense math."""
    torch.manual_seed(0)
    d, m, k = 8, 40, 3
    sae = TopKSAE(d, m, k)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(30, d) * 2
    dead = torch.zeros(m, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_step(x, StepContext(dead, 0.0, 0.5, amp=False))
    out.loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    for p in sae.parameters():
        p.grad = None

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    total_var = (x - x.mean(0)).pow(2).sum()
    n_dead, k_aux = int(dead.sum()), min(d // 2, int(dead.sum()))
    av, ai = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, ai, av.relu())
    aux = min(n_dead / (d // 2), 1.0) * (z_aux @ sae.W_dec - (x - x_hat).detach()).pow(2).sum() / total_var
    loss = (x_hat - x).pow(2).sum() / total_var + 0.5 * aux
    loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_path_runs_and_stays_close():
    """The CUDA path autocasts the encoder matmuls to bf16; exercise that logic on CPU."""
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4)
    x = torch.randn(64, 16) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    grads = []
    for amp in (False, True):
        for p in sae.parameters():
            p.grad = None
        out = sae.training_step(x, StepContext(dead, 0.0, 1 / 32, amp=amp))
        out.loss.backward()
        assert math.isfinite(float(out.loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in sae.parameters()]))
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.9
