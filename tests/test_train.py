import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import Cancelled, UserError
from core.evals.reconstruction import evaluate
from core.formats.saelens import load_saelens, save_saelens
from core.sae import SAEConfig, StepContext, TopKConfig, TopKSAE
from core.train import TrainConfig, lr_factor, train_sae

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


CFG = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=256, epochs=4, lr=1e-2, log_every=10, sample_tokens=4096)


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
    """Adam's saved decoder rows are unit-norm. signum (the default) keeps the stepped rows
    unit-norm, and saves the schedule-free average of them: within a few percent of unit."""
    x, result, _ = trained
    norms = result.sae.W_dec.detach().norm(dim=1)
    assert 0.9 < float(norms.min()) and float(norms.max()) < 1.05, (float(norms.min()), float(norms.max()))
    adam = train_sae(source(x), D_IN, dataclasses.replace(CFG, optimizer="adam"))
    torch.testing.assert_close(adam.sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)


def test_scale_is_folded_into_the_weights(trained):
    x, result, _ = trained
    s = result.scale
    xt = torch.from_numpy(x[:2000])
    assert math.isclose(float((xt * s).norm(dim=1).mean()), math.sqrt(D_IN), rel_tol=0.05)
    # The returned SAE on raw x equals the trained (scaled-space) SAE on s·x, divided by s.
    scaled = TopKSAE(D_IN, 128, TopKConfig(k=4))
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
    cfg = SAEConfig(d_in=D_IN, d_sae=128, type_config=TopKConfig(k=4), hook_name="blocks.0.hook_resid_post")
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
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=256, epochs=2, lr=1e-2, log_every=5, sample_tokens=1024)
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
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=128, total_tokens=2_500, log_every=100, sample_tokens=512)
    result = train_sae(source(x, chunk=300), D_IN, cfg)
    assert result.final["tokens"] == 2_500
    assert result.history[-1]["tokens"] == 2_500


def test_dead_window_is_set_by_width_and_tokens_trained_not_run_length():
    """The default dead window under signum is 4 × d_sae tokens for the first 16 × d_sae tokens,
    then shrinks as 1 / tokens trained to d_sae from 64 × d_sae tokens on (32 × d_sae under Adam),
    whatever the budget; `dead_tokens` sets it."""
    from core.train.config import default_dead_tokens

    d = 4 * D_IN
    assert [default_dead_tokens(d, "signum", t) for t in (0, 16 * d, 32 * d, 64 * d, 10**9)] == [4 * d, 4 * d, 2 * d, d, d]
    assert {default_dead_tokens(d, "adam", t) for t in (0, 32 * d, 10**9)} == {32 * d}
    x = synthetic(n=1_000)
    for total, window in ((1_920, 4 * d), (4_096, 2 * d), (9_000, d)):  # d = 128: 16d = 2,048, 64d = 8,192
        cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=128, total_tokens=total,
                          log_every=100, sample_tokens=512)
        result = train_sae(source(x, chunk=300), D_IN, cfg)
        assert result.final["dead_tokens"] == window == default_dead_tokens(d, "signum", result.final["tokens"])
    adam = train_sae(source(x, chunk=300), D_IN, dataclasses.replace(cfg, optimizer="adam"))
    assert adam.final["dead_tokens"] == 32 * d
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=128, total_tokens=9_000, log_every=100,
                      sample_tokens=512, dead_tokens=1_000)
    assert train_sae(source(x, chunk=300), D_IN, cfg).final["dead_tokens"] == 1_000


def test_k_larger_than_d_sae_is_a_user_error():
    with pytest.raises(UserError, match="k=200 must be between 1 and the SAE width 128"):
        train_sae(source(synthetic(n=100)), D_IN, TrainConfig(sae=TopKConfig(k=200), expansion_factor=4))


def test_wrong_width_is_a_user_error():
    with pytest.raises(UserError, match=r"expected \[N, 16\]"):
        train_sae(source(synthetic(n=100)), 16, TrainConfig(sae=TopKConfig(k=4), expansion_factor=4))


def test_cancel_raises_cancelled():
    checks = []

    def should_cancel():
        checks.append(1)
        return len(checks) > 3

    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=64, epochs=1, sample_tokens=256)
    with pytest.raises(Cancelled):
        train_sae(source(synthetic(n=2_000)), D_IN, cfg, should_cancel=should_cancel)


def test_lr_schedule_warms_up_and_decays_to_zero():
    f = [lr_factor(s, 100, 0.05, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and f[4] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[81] < 1.0 and f[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))


AUXK_PATHS = {"own product, sparse": (10**9, math.inf), "own product, dense": (10**9, 0.0),
              "in place, sparse": (0, math.inf), "in place, dense": (0, 0.0)}


@pytest.fixture(params=list(AUXK_PATHS))
def auxk_path(request, monkeypatch):
    """Each of AuxK's ways to pick and decode, whatever the sizes would choose: the dead
    latents' pre-activations as a product of their own or in place in reordered blocks, the
    picks decoded as sparse pairs or as a dense [tokens × dead latents] block."""
    from core.sae import topk

    own, fill = AUXK_PATHS[request.param]
    monkeypatch.setattr(topk, "OWN_PRODUCT_PER_LATENT", own)
    monkeypatch.setattr(topk, "DENSE_AUXK_MIN_FILL", fill)
    return request.param


@pytest.mark.parametrize("m, dead_every, truly", [(40, 3, False), (40, 8, False), (20_000, 2, False),
                                                  (20_000, 50, False), (40, 3, True), (20_000, 2, True)])
def test_sparse_gradients_match_dense_autograd(m, dead_every, truly, auxk_path):
    """The sparse encoder backward and gather decoder give the same gradients as dense math,
    whichever way AuxK picks and decodes (`auxk_path`), also at a width whose picks take
    `row_topk`'s grouped passes, and truly dead (a few positive pre-activations per token, in
    the few groups `row_topk(positive=True)` reads)."""
    torch.manual_seed(0)
    d, k = 8, 3
    sae = TopKSAE(d, m, TopKConfig(k=k, auxk_alpha=0.5))
    x = torch.randn(30, d) * 2
    dead = torch.zeros(m, dtype=torch.bool)
    dead[::dead_every] = True
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        if truly:  # lowered until no token has more dead positives than AuxK picks (d/2), some have one
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            low = pre[:, dead].sort(1, descending=True).values[:, d // 2]
            sae.b_enc[dead] -= float(low.max().clamp_min(0)) + 1e-3
            positives = (((x - sae.b_dec) @ sae.W_enc + sae.b_enc)[:, dead] > 0).sum(1)
            assert int(positives.max()) <= d // 2 and int(positives.sum()) > 0
    out = sae.training_step(x, StepContext(dead, 0.0, amp=False))
    out.loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    for p in sae.parameters():
        p.grad = None

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    _assert_matches_dense(sae, out, sparse, x, pre, x_hat, dead, alpha=0.5)


def _assert_matches_dense(sae, out, sparse, x, pre, x_hat, dead, alpha):
    """The step's loss and sparse gradients equal autograd through the dense FVU + AuxK
    formula (the top d_in/2 dead latents' activations decode the residual, no bias)."""
    d = sae.d_in
    total_var = (x - x.mean(0)).pow(2).sum()
    n_dead, k_aux = int(dead.sum()), min(d // 2, int(dead.sum()))
    av, ai = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, ai, av.relu())
    aux = min(n_dead / (d // 2), 1.0) * (z_aux @ sae.W_dec - (x - x_hat).detach()).pow(2).sum() / total_var
    loss = (x_hat - x).pow(2).sum() / total_var + alpha * aux
    loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, p in sae.named_parameters():
        if p.grad is None:  # no dense path to it (b_dec when it is not subtracted from the input)
            assert sparse[name] is None or not sparse[name].any(), name
        else:
            torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("apply_b_dec_to_input, m", [(True, 40), (False, 40), (True, 20_000)])
def test_batchtopk_auxk_matches_dense_autograd(apply_b_dec_to_input, m, auxk_path):
    """BatchTopK's AuxK, each way (`auxk_path`), gives the loss and gradients of the dense
    formula (b_dec's only when it is subtracted)."""
    from core.sae import BatchTopKConfig, BatchTopKSAE

    torch.manual_seed(1)
    d = 8
    sae = BatchTopKSAE(d, m, BatchTopKConfig(k=3, auxk_alpha=0.5), apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(30, d) * 2
    dead = torch.zeros(m, dtype=torch.bool)
    dead[1::4] = True
    out = sae.training_step(x, StepContext(dead, 0.0, amp=False))
    out.loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    for p in sae.parameters():
        p.grad = None
    sae.global_threshold.fill_(-1.0)

    x_c = x - sae.b_dec if apply_b_dec_to_input else x
    pre = x_c @ sae.W_enc + sae.b_enc
    x_hat = sae.activation(pre) @ sae.W_dec + sae.b_dec
    _assert_matches_dense(sae, out, sparse, x, pre, x_hat, dead, alpha=0.5)


def test_reused_pre_activation_buffer_gives_the_same_step():
    """Steps sharing a scratch buffer (the trainer's CPU path) equal steps that allocate afresh,
    also when a shorter last batch reuses a larger buffer and AuxK picks dead latents from it."""
    torch.manual_seed(0)
    sae = TopKSAE(8, 48, TopKConfig(k=4, auxk_alpha=0.5))
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::5] = True  # AuxK reads the buffer too
    scratch: dict = {}
    for n in (40, 40, 17):
        x = torch.randn(n, 8) * 2
        outs = []
        for buf in (None, scratch):
            for p in sae.parameters():
                p.grad = None
            out = sae.training_step(x, StepContext(dead, 0.0, amp=False, scratch=buf))
            out.loss.backward()
            outs.append((out.loss.detach(), out.fired, [p.grad.clone() for p in sae.parameters()]))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        for a, b in zip(outs[0][2], outs[1][2]):
            assert torch.equal(a, b)
    assert scratch["pre"].numel() == 40 * 48


@pytest.mark.parametrize("shape, k, dtype", [((5, 8192), 1, torch.float32), ((7, 10_007), 32, torch.float32),
                                             ((3, 65_536), 32, torch.bfloat16), ((4, 25_000), 288, torch.bfloat16)])
def test_row_topk_equals_torch_topk(shape, k, dtype):
    """`row_topk`'s two grouped passes find each row's k largest entries, as torch's top-k:
    with a remainder of columns outside the groups, on a view (AuxK's dead tail of a block),
    and with many equal entries (any of equal entries is a right pick)."""
    from core.sae.selection import row_topk

    torch.manual_seed(0)
    for x in (torch.randn(shape).to(dtype), torch.randint(-50, 50, shape).to(dtype),
              torch.randn(shape[0], shape[1] + 300).to(dtype)[:, 300:]):
        values, columns = row_topk(x, k)
        want = x.topk(k, dim=1).values
        assert torch.equal(values.sort(1, descending=True).values, want)
        assert torch.equal(x.gather(1, columns), values)
        assert all(len(set(r.tolist())) == k for r in columns)  # k distinct columns per row


@pytest.mark.parametrize("shift, loud", [(0.0, 0), (3.0, 0), (4.5, 0), (4.5, 3)])
def test_row_topk_positive_keeps_every_positive_pick(shift, loud):
    """`row_topk(positive=True)` gives each row's positive entries among its top k (a row with
    few positive entries, as AuxK's truly dead latents, from only its groups with a positive
    maximum; a few loud rows with many, done on their own): the positive values and columns of
    torch's top-k, nothing positive besides."""
    from core.sae.selection import row_topk

    torch.manual_seed(0)
    x = (torch.randn(400, 20_300) - shift)[:, 300:]
    x[:loud] += shift  # under 1% of the rows with many positive entries
    values, columns = row_topk(x, 288, positive=True)
    positive = values > 0
    assert torch.equal(x.gather(1, columns)[positive], values[positive])  # the rest may be padding
    want_v, want_c = x.topk(288, dim=1)
    for r in range(len(x)):
        got = [int(c) for v, c in zip(values[r], columns[r]) if v > 0]
        assert len(got) == len(set(got)) and set(got) == {int(c) for v, c in zip(want_v[r], want_c[r]) if v > 0}
    if shift > 4:  # few positives: the candidates are far fewer than k (padded to k beside loud rows)
        assert values.shape[1] < 288 or bool(((values == 0) & (columns == 0)).any())


def _step_in_blocks(sae, x, dead, chunk_tokens, scratch=None, chunk_latents=0):
    """Loss, FVU, L0, fired latents, gradients (and BatchTopK's threshold) of one step whose
    pre-activations are computed in blocks of `chunk_tokens` tokens × `chunk_latents` latents
    (0: the default blocks)."""
    for p in sae.parameters():
        p.grad = None
    if hasattr(sae, "global_threshold"):
        sae.global_threshold.fill_(-1.0)
    out = sae.training_step(x, StepContext(dead, 0.0, amp=False, scratch=scratch, chunk_tokens=chunk_tokens,
                                           chunk_latents=chunk_latents))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    threshold = sae.global_threshold.clone() if hasattr(sae, "global_threshold") else None
    return out, grads, threshold


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("dead_every", [0, 3, 40])
def test_step_in_blocks_equals_the_step_in_one_block(arch, apply_b_dec_to_input, dead_every, auxk_path):
    """Computing the pre-activations (and picking TopK's, BatchTopK's over the whole batch, and
    AuxK's dead latents) a block at a time gives the one-block step's loss, metrics, fired
    latents and gradients: blocks of 1 and 7 tokens, of 2 and 9 latents (fewer than k, and a
    last block narrower than the rest) and both at once; AuxK each way (`auxk_path`), with a
    third of the latents dead or one."""
    from core.sae import BatchTopKConfig, BatchTopKSAE

    torch.manual_seed(2)
    d, m, n = 8, 40, 45
    if arch == "topk":
        sae = TopKSAE(d, m, TopKConfig(k=3, auxk_alpha=0.5), apply_b_dec_to_input=apply_b_dec_to_input)
    else:
        sae = BatchTopKSAE(d, m, BatchTopKConfig(k=3, auxk_alpha=0.5), apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(n, d) * 2
    dead = torch.zeros(m, dtype=torch.bool)
    if dead_every:
        dead[::dead_every] = True
    whole, whole_grads, whole_threshold = _step_in_blocks(sae, x, dead, n)
    for rows, cols in ((1, 0), (7, 0), (0, 2), (0, 9), (7, 9)):
        out, grads, threshold = _step_in_blocks(sae, x, dead, rows, scratch={}, chunk_latents=cols)
        for a, b in zip(whole[:4], out[:4]):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
        assert torch.equal(whole.fired, out.fired)
        for name, g in whole_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6,
                                       msg=f"{name}, blocks of {rows} tokens × {cols} latents")
        if threshold is not None:
            torch.testing.assert_close(threshold, whole_threshold, rtol=1e-6, atol=1e-6)


def test_batchtopk_looks_again_at_tokens_that_hold_more_than_their_candidates(monkeypatch):
    """With one candidate per k (a token's first guess of k latents) many tokens hold more of
    the batch's top k·N; they are computed again and the step still equals the dense formula."""
    from core.sae import BatchTopKConfig, BatchTopKSAE
    from core.sae import batchtopk
    from core.sae.topk import AuxPicker

    monkeypatch.setattr(batchtopk, "ROW_CANDIDATES", 1)
    torch.manual_seed(3)
    d, m, k = 8, 40, 3
    sae = BatchTopKSAE(d, m, BatchTopKConfig(k=k, auxk_alpha=0.5))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(30, d) * 2
    x[:5] *= 4  # a few loud tokens take many of the batch's latents
    dead = torch.zeros(m, dtype=torch.bool)
    dead[1::4] = True
    ctx = StepContext(dead, 0.0, amp=False, chunk_tokens=7)
    with torch.no_grad():
        _, tokens, _ = batchtopk.batch_topk_pairs(sae, x - sae.b_dec, ctx, AuxPicker(sae, ctx))
    assert int(torch.bincount(tokens).max()) > k  # some token holds more than its k candidates
    out = sae.training_step(x, ctx)
    out.loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    for p in sae.parameters():
        p.grad = None
    sae.global_threshold.fill_(-1.0)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    x_hat = sae.activation(pre) @ sae.W_dec + sae.b_dec
    _assert_matches_dense(sae, out, sparse, x, pre, x_hat, dead, alpha=0.5)


def test_the_sparse_step_holds_one_block_of_pre_activations():
    """The dense [batch × d_sae] pre-activations are never held: the reused buffer is one
    `block_shape` block (the whole batch while it fits in PRE_CHUNK_BYTES, so small SAEs keep
    their one-block step; then every token × fewer latents; fewer tokens only past
    MIN_BLOCK_LATENTS)."""
    from core.sae.base import MIN_BLOCK_LATENTS, PRE_CHUNK_BYTES, block_shape, chunk_rows

    assert block_shape(4096, 4608) == (4096, 4608)  # one block: the small path is the old one
    assert block_shape(4096, 16_384) == (4096, 16_384)
    assert block_shape(4096, 65_536) == (4096, 16_384)  # all tokens, a quarter of the latents
    assert block_shape(4096, 100_000) == (4096, 16_384)  # the last block narrower
    rows, cols = block_shape(65_536, 65_536)
    assert cols == MIN_BLOCK_LATENTS and rows * cols * 4 <= PRE_CHUNK_BYTES and rows < 65_536
    assert block_shape(10, 10**9) == (10, PRE_CHUNK_BYTES // 4 // 10)  # few tokens: wide blocks
    assert block_shape(4096, 48, chunk_tokens=5) == (5, 48) and block_shape(40, 48, 0, 7) == (40, 7)
    assert chunk_rows(4096, 65_536) * 65_536 * 4 <= PRE_CHUNK_BYTES  # the evaluation's blocks of tokens
    torch.manual_seed(0)
    sae = TopKSAE(8, 48, TopKConfig(k=4, auxk_alpha=0.5))
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::2] = True
    scratch: dict = {}
    sae.training_step(torch.randn(40, 8), StepContext(dead, 0.0, amp=False, scratch=scratch, chunk_tokens=6))
    assert scratch["pre"].numel() == 6 * 48
    assert scratch["W_enc"].numel() == 24 * 8  # few dead: their own product, from their W_enc columns
    scratch = {}
    sae.training_step(torch.randn(4096, 8), StepContext(dead, 0.0, amp=False, scratch=scratch, chunk_tokens=64))
    assert scratch["pre"].numel() == 64 * 48  # many: picked in place, W_enc's columns reordered
    assert scratch["W_enc"].numel() == 48 * 8


def test_bf16_autocast_path_runs_and_stays_close():
    """The encoder's matmul in bf16 (the default where bf16 is native and faster): the blocks of
    pre-activations are bf16 in a reused bf16 buffer, the weights and gradients stay fp32."""
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, TopKConfig(k=4))
    x = torch.randn(64, 16) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    grads = []
    for amp in (False, True):
        for p in sae.parameters():
            p.grad = None
        scratch = {}
        out = sae.training_step(x, StepContext(dead, 0.0, amp=amp, scratch=scratch))
        assert scratch["pre"].dtype == (torch.bfloat16 if amp else torch.float32)
        assert scratch["W_enc"].dtype == torch.float32  # AuxK's columns gathered, then cast: not all of W_enc
        out.loss.backward()
        assert math.isfinite(float(out.loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in sae.parameters()]))
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.9


# --------------------------------------------------------------------------- architectures

ARCH_CFG = dict(expansion_factor=4, k=4, batch_size=256, epochs=4, log_every=10, sample_tokens=4096)  # the default rate


@pytest.mark.parametrize("arch, extra", [("topk", {}), ("batchtopk", {}), ("standard", {"l1_coefficient": 0.2}),
                                         ("jumprelu", {"l0_coefficient": 0.01})])
def test_autocast_on_the_cpu_trains_as_well_as_fp32(arch, extra):
    """`autocast=True` puts the encoder's matmul in bf16 on the CPU too: every type still learns
    the code (held-out FVU within 0.02 of the fp32 run's, at the same L0 for the TopK family) and
    saves fp32 weights."""
    x = synthetic()
    runs = {ac: train_sae(source(x), D_IN, TrainConfig.from_dict(dict(architecture=arch, autocast=ac, **ARCH_CFG,
                                                                      **extra)), holdout_tokens=2_000)
            for ac in (False, True)}
    fp32, bf16 = runs[False].final, runs[True].final
    assert bf16["fvu"] < 0.15 and abs(bf16["fvu"] - fp32["fvu"]) < 0.02, (fp32, bf16)
    assert bf16["fvu"] != fp32["fvu"], "bf16 rounding shows: the setting reached the step"
    if arch in ("topk", "batchtopk"):
        assert abs(bf16["l0"] - fp32["l0"]) < 0.1 and 3.5 < bf16["l0"] <= 4.5, (fp32, bf16)
    assert all(p.dtype == torch.float32 for p in runs[True].sae.parameters())
    assert (fp32["autocast"], bf16["autocast"]) == (False, True)


@pytest.mark.parametrize("native", [False, True])
def test_autocast_left_out_follows_the_device(native, monkeypatch):
    """Left out, `autocast` is on where bf16 is preferred (a CUDA GPU; a CPU with AVX512-BF16 or
    AMX whose bf16 matmul is faster) and off elsewhere; the final metrics say which ran."""
    from core.train import run as train_run

    asked = []
    monkeypatch.setattr(train_run, "prefer_bf16", lambda device: asked.append(device.type) or native)
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=128, total_tokens=1_000, sample_tokens=512)
    assert train_sae(source(synthetic(n=1_000)), D_IN, cfg).final["autocast"] is native
    assert asked == ["cpu"]


def test_bf16_is_preferred_on_a_cpu_only_with_the_units_and_a_faster_matmul(monkeypatch):
    """On a CPU the default bf16 matmul needs AVX512-BF16 or AMX (else it is emulated and never
    timed) and a bf16 matmul measured faster than fp32: the flags alone do not tell (an Intel
    Xeon with AVX512-BF16 multiplied bf16 at 0.6× fp32's speed)."""
    from core.train import config

    timed = []
    for units, faster, want in ((False, True, False), (True, False, False), (True, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(config, "_cpu_bf16_faster", lambda threads, f=faster: timed.append(threads) or f)
        assert config.prefer_bf16(torch.device("cpu")) is want
    assert timed == [torch.get_num_threads()] * 2


def test_bf16_preference_on_this_machine():
    """Without the units (per /proc/cpuinfo) never bf16; with them, the measured comparison,
    taken once per process and thread count."""
    from core.train.config import _cpu_bf16_faster, prefer_bf16

    flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    assert flags, "no CPU flags in /proc/cpuinfo"
    units = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    chosen = prefer_bf16(torch.device("cpu"))
    assert chosen is (units and _cpu_bf16_faster(torch.get_num_threads()))
    if units:
        assert _cpu_bf16_faster.cache_info().hits >= 1  # measured once, then remembered


@pytest.mark.parametrize("arch, extra, inference", [
    ("topk", {}, "topk"),
    ("batchtopk", {}, "jumprelu"),
    ("standard", {"l1_coefficient": 0.2}, "standard"),
    ("jumprelu", {"l0_coefficient": 0.01}, "jumprelu"),
])
def test_every_architecture_learns_a_sparse_code(arch, extra, inference, tmp_path):
    """On sparse synthetic data each architecture ends with a low held-out FVU at a small L0,
    and is saved in its SAELens inference form."""
    x = synthetic()
    result = train_sae(source(x), D_IN, TrainConfig.from_dict(dict(architecture=arch, **ARCH_CFG, **extra)), holdout_tokens=2_000)
    assert result.sae.architecture == inference
    assert result.final["eval_split"] == "held-out" and result.final["eval_tokens"] == 2_000
    assert result.final["tokens"] == 4 * (len(x) - 2_000)
    assert result.final["fvu"] < 0.15, result.final
    assert 1 <= result.final["l0"] <= 12, result.final
    sae, cfg = load_saelens(save_saelens(result.sae, result.sae.config(hook_name="blocks.0.hook_resid_post"),
                                         tmp_path / arch))
    assert cfg.architecture == inference
    xt = torch.from_numpy(x[:300])
    torch.testing.assert_close(sae.encode(xt), result.sae.encode(xt))


def test_batchtopk_threshold_keeps_mean_l0_near_k():
    x = synthetic()
    result = train_sae(source(x), D_IN, TrainConfig.from_dict(dict(architecture="batchtopk", **ARCH_CFG)))
    thresholds = result.sae.threshold.detach()
    assert bool((thresholds == thresholds[0]).all()) and float(thresholds[0]) > 0  # one global threshold
    assert 2 <= result.final["l0"] <= 6


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_batchtopk_threshold_is_set_from_the_saved_weights_so_held_out_l0_is_k(optimizer):
    """θ's moving average lags the weights (a short run ends with θ from weights long gone) and
    a schedule-free run saves its averaged weights, not the ones θ followed: θ is estimated once
    more from the weights saved, so held-out tokens keep k latents on average."""
    cfg = TrainConfig.from_dict(dict(architecture="batchtopk", expansion_factor=8, k=4, batch_size=256, epochs=1,
                                     sample_tokens=4096, optimizer=optimizer))
    result = train_sae(source(synthetic(n=14_000)), D_IN, cfg, holdout_tokens=2_000)
    assert result.final["l0"] == pytest.approx(4, rel=0.15), result.final


def test_a_diverging_run_stops_with_one_line_by_its_next_log_line():
    """The loss is summed on the device and read once per log line (no host sync per step): a run
    whose loss stops being finite is stopped there, naming the step and the fix."""
    cfg = TrainConfig.from_dict(dict(architecture="topk", expansion_factor=2, k=4, batch_size=100, total_tokens=4_000,
                                     lr=1e38, log_every=5, sample_tokens=500))
    with pytest.raises(UserError, match=r"^training diverged \(loss is (nan|inf)\) by step 5 of .*; lower --lr"):
        train_sae(source(synthetic(n=4_000)), D_IN, cfg)


def test_sparsity_coefficient_warms_up(monkeypatch):
    seen = []
    from core.sae import StandardSAE

    real = StandardSAE.training_step

    def spy(self, x, ctx):
        seen.append(ctx.sparsity_coefficient)
        return real(self, x, ctx)

    monkeypatch.setattr(StandardSAE, "training_step", spy)
    cfg = TrainConfig.from_dict(dict(architecture="standard", expansion_factor=2, batch_size=100, total_tokens=2_000,
                      l1_coefficient=2.0, sparsity_warmup_frac=0.5, sample_tokens=500))
    train_sae(source(synthetic(n=2_000)), D_IN, cfg)
    assert seen == pytest.approx([2.0 * min(1.0, (i + 1) / 10) for i in range(20)])


# --------------------------------------------------------------------------- several SAEs, one pass


def two_hook_source(a: np.ndarray, b: np.ndarray, chunk=2_500, reads=None):
    def src(start):
        if reads is not None:
            reads.append(start)
        for i in range(start * chunk, len(a), chunk):
            yield {"h0": a[i: i + chunk], "h1": b[i: i + chunk]}
    return src


def test_several_saes_from_one_pass_equal_separate_runs():
    from core.train import RunSpec, train_saes
    a, b = synthetic(seed=1), synthetic(seed=2)[:, :16].copy()
    cfg_a = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=256, epochs=2, lr=1e-2, sample_tokens=2048)
    cfg_b = dataclasses_replace(cfg_a, architecture="batchtopk", k=2, seed=3)
    runs = [RunSpec("a", "h0", D_IN, cfg_a), RunSpec("a2", "h0", D_IN, dataclasses_replace(cfg_a, k=2)),
            RunSpec("b", "h1", 16, cfg_b)]
    reads = []
    together = train_saes(two_hook_source(a, b, reads=reads), runs, holdout_tokens=1_000)
    assert set(together) == {"a", "a2", "b"}
    # One read for the sample and one per epoch, shared by all three SAEs.
    assert reads == [0, 0, 0]
    for spec in runs:
        alone = train_saes(two_hook_source(a, b), [spec], holdout_tokens=1_000)[spec.name]
        for name, p in alone.sae.state_dict().items():
            assert torch.equal(p, together[spec.name].sae.state_dict()[name]), (spec.name, name)
        assert alone.final == together[spec.name].final


def test_progress_of_several_runs_lists_each():
    from core.train import RunSpec, train_saes
    a = synthetic(n=3_000)
    cfg = TrainConfig(sae=TopKConfig(k=2), expansion_factor=2, batch_size=200, epochs=1, sample_tokens=500, log_every=2)
    calls = []
    train_saes(two_hook_source(a, a[:, :16].copy(), chunk=500),
               [RunSpec("x", "h0", D_IN, cfg), RunSpec("y", "h1", 16, cfg)], progress=calls.append)
    last = calls[-1]
    assert set(last["runs"]) == {"x", "y"} and last["done"] == last["total"] == 6_000
    assert {"fvu", "l0", "dead_frac", "tokens"} <= set(last["runs"]["y"])


def dataclasses_replace(cfg, **kw):
    """The config with some fields (the SAE type's included) changed, as a job's variant does."""
    return TrainConfig.from_dict(cfg.to_dict() | kw)


# --------------------------------------------------------------------------- checkpoints and resume


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, optimizer):
    from core.train import CheckpointConfig, checkpoints
    x = synthetic(n=6_000)
    cfg = TrainConfig.from_dict(dict(architecture="topk", expansion_factor=4, k=4, batch_size=256, epochs=3, lr=1e-2,
                      sample_tokens=1024, log_every=3, optimizer=optimizer))
    full = train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500)

    ck = CheckpointConfig(tmp_path / "ck", every_steps=5, keep=2)
    steps = []

    def cancel_midway():
        return len(steps) > 0 and steps[-1] >= 40

    with pytest.raises(Cancelled):
        train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500, checkpoint=ck,
                  progress=lambda d: steps.append(d["step"]), should_cancel=cancel_midway)
    kept = checkpoints(ck.folder)
    assert len(kept) == 2  # retention
    assert not list(ck.folder.glob(".tmp-*"))  # nothing half-written left behind
    resumed = train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500, checkpoint=ck)
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    assert resumed.history == full.history
    assert resumed.final == full.final


def test_pause_then_resume_equals_an_uninterrupted_run(tmp_path):
    from core.errors import Paused
    from core.train import CheckpointConfig, checkpoints
    x = synthetic(n=6_000)
    cfg = TrainConfig.from_dict(dict(architecture="topk", expansion_factor=4, k=4, batch_size=256, epochs=3, lr=1e-2,
                      sample_tokens=1024, log_every=3))
    full = train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500)
    ck = CheckpointConfig(tmp_path / "ck", every_steps=0, keep=2, resume=False)  # no periodic checkpoints
    steps = []
    with pytest.raises(Paused, match=r"paused at step \d+"):
        train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500, checkpoint=ck,
                  progress=lambda d: steps.append(d["step"]),
                  requested=lambda: "pause" if steps and steps[-1] >= 30 else "")
    assert len(checkpoints(ck.folder)) == 1  # the pause wrote exactly one
    resumed = train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500, checkpoint=ck._replace(resume=True))
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    assert resumed.history == full.history and resumed.final == full.final
    with pytest.raises(UserError, match="pausing needs a checkpoint folder"):
        train_sae(source(x, chunk=500), D_IN, cfg, requested=lambda: "pause")


def test_finalize_stops_early_and_evaluates_what_it_has():
    x = synthetic(n=6_000)
    cfg = TrainConfig.from_dict(dict(architecture="topk", expansion_factor=4, k=4, batch_size=256, epochs=3, lr=1e-2,
                      sample_tokens=1024, log_every=3))
    full = train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500)
    steps = []
    early = train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=500, progress=lambda d: steps.append(d["step"]),
                      requested=lambda: "finalize" if steps and steps[-1] >= 20 else "")
    assert 20 <= early.history[-1]["step"] < full.history[-1]["step"]
    assert early.final["tokens"] < full.final["tokens"]
    assert early.final["eval_tokens"] == full.final["eval_tokens"]  # evaluated on the same held-out slice
    assert 0 < early.final["fvu"] < 1


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    from core.train import CheckpointConfig
    x = synthetic(n=3_000)
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=256, epochs=1, sample_tokens=512)
    ck = CheckpointConfig(tmp_path / "ck", every_steps=2)
    train_sae(source(x, chunk=500), D_IN, cfg, checkpoint=ck)
    with pytest.raises(UserError, match="other settings"):
        train_sae(source(x, chunk=500), D_IN, dataclasses_replace(cfg, k=3), checkpoint=ck)
    newest = sorted(ck.folder.glob("ckpt-*.pt"))[-1]
    newest.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read.*delete it"):
        train_sae(source(x, chunk=500), D_IN, cfg, checkpoint=ck)


def test_held_out_tokens_are_never_trained_on():
    """Poison the held-out slice with huge values: training must be unaffected by it."""
    x = synthetic(n=4_000)
    poisoned = x.copy()
    poisoned[:1_000] = 0.0  # a different held-out slice, same training tokens
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=256, epochs=2, sample_tokens=1024)
    a = train_sae(source(x, chunk=500), D_IN, cfg, holdout_tokens=1_000)
    b = train_sae(source(poisoned, chunk=500), D_IN, cfg, holdout_tokens=1_000)
    for name, p in a.sae.state_dict().items():
        assert torch.equal(p, b.sae.state_dict()[name])
    assert a.final["tokens"] == 2 * 3_000 and a.final["eval_tokens"] == 1_000


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown SAE architecture 'gated'; pick one of topk, jumprelu, batchtopk, standard"):
        TrainConfig.from_dict(dict(architecture="gated"))


def test_resume_from_a_checkpoint_taken_at_the_end_of_a_pass(tmp_path):
    """A checkpoint written after a pass's last chunk resumes into the next pass, not into a
    run that believes the data is empty (which would stop it short)."""
    from core.train import CheckpointConfig
    x = synthetic(n=6_000)
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=256, total_tokens=3 * 5_500, lr=1e-2, sample_tokens=1024)
    ck = CheckpointConfig(tmp_path / "ck", every_steps=5, keep=2, resume=False)
    full = train_sae(source(x, chunk=4_096), D_IN, cfg, holdout_tokens=500, checkpoint=ck)
    resumed = train_sae(source(x, chunk=4_096), D_IN, cfg, holdout_tokens=500, checkpoint=ck._replace(resume=True))
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    assert resumed.final == full.final


def test_training_on_the_fly_leaves_special_tokens_out_by_id(tiny_llama, tiny_tokenizer, tmp_path):
    """model_source drops the positions of the excluded ids (BOS/EOS/pad in a job; a frequent
    byte here) before the trainer sees them, and special_positions counts exactly those."""
    from core.data import builtin_corpus, iter_batches, tokenize_to_shards
    from core.train.sources import model_source, special_positions

    ds = tmp_path / "ds"
    tokenize_to_shards(builtin_corpus()[:3], tiny_tokenizer, ds, context_length=32)
    hook = "blocks.0.hook_resid_post"
    batches = list(iter_batches(ds, 4, tiny_tokenizer.pad_token_id, max_tokens=400))
    special = int(batches[0].input_ids[0, 2])
    real = sum(int(b.attention_mask.sum()) for b in batches)
    expected = sum(int((b.attention_mask.bool() & (b.input_ids == special)).sum()) for b in batches)
    assert 0 < expected < real
    kept = sum(len(c[hook]) for c in model_source(tiny_llama, [ds], [hook], tiny_tokenizer.pad_token_id, 4,
                                                  max_tokens=400, exclude_token_ids=[special])(0))
    assert kept == real - expected
    assert special_positions([ds], 400, [special]) == expected and special_positions([ds], 400, []) == 0


# --------------------------------------------------------------------------- optimizers


def test_signum_learns_and_returns_the_schedule_free_average():
    """sparsify's recipe: sign-SGD under a schedule-free wrapper at its width-scaled default lr,
    no warm-up or decay (the logged lr is constant); the SAE returned is the running average,
    which reconstructs better than the last stepped weights."""
    from core.train import default_lr

    x = synthetic()
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=4, batch_size=256, epochs=4, optimizer="signum",
                      log_every=10, sample_tokens=4096)
    result = train_sae(source(x), D_IN, cfg)
    assert result.final["fvu"] < 0.1, result.final["fvu"]
    assert {h["lr"] for h in result.history} == {default_lr(4 * D_IN, "signum")}


def test_averaged_swaps_in_the_running_average_and_back():
    from core.train.optim import averaged, make_optimizer

    w = torch.nn.Parameter(torch.zeros(4))
    opt = make_optimizer("signum", [w], lr=0.1)
    for _ in range(5):
        w.grad = -torch.ones(4)  # always the same direction: the stepped weights run ahead of the average
        opt.step()
    stepped = w.detach().clone()
    with averaged(opt):
        inside = w.detach().clone()
    assert torch.equal(w.detach(), stepped)
    assert (inside < stepped).all() and (inside > 0).all()


def test_signum_steps_as_the_schedulefree_wrapper_around_sign_sgd():
    """Our sign-SGD stepping the wrapper's z itself, with the wrapper's swaps skipped, gives the
    weights and running average of the package's swapping wrapper around plain sign-SGD, for a
    weight held transposed (W_enc's layout) too."""
    from schedulefree import ScheduleFreeWrapper

    from core.train.optim import SignSGD, averaged, make_optimizer

    torch.manual_seed(0)
    start = [torch.randn(6, 5).T, torch.randn(5)]  # a transposed (column-major) weight and a vector
    ours = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in start]
    theirs = [torch.nn.Parameter(t.contiguous().clone()) for t in start]
    opt = make_optimizer("signum", ours, lr=0.05)
    ref = ScheduleFreeWrapper(SignSGD(theirs, 0.05), momentum=0.95)
    ref.train()
    for _ in range(7):
        grads = [torch.randn(t.shape) for t in start]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    with averaged(opt), averaged(ref):
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(ours[0].detach(), start[0])


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(UserError, match=r"^optimizer 'lion' is not one of signum, adam$"):
        TrainConfig(optimizer="lion").resolved(D_IN)


# --------------------------------------------------------------------------- memory at width


def test_the_memory_prediction_has_no_dense_batch_term_for_the_topk_family():
    """The TopK family's step holds one block of pre-activations whatever the batch, so its
    prediction barely moves with the batch; a dense type's grows by its [batch × d_sae] tensors."""
    from core.sae import registry
    from core.sae.base import PRE_CHUNK_BYTES
    from core.train.config import training_bytes

    d_in, d_sae = 576, 65_536
    for arch in ("topk", "batchtopk"):
        sae = registry.config_for(arch)
        grow = training_bytes(d_in, d_sae, 8192, sae) - training_bytes(d_in, d_sae, 4096, sae)
        assert grow < 4096 * d_sae * 4 / 4  # the batches and pairs: a quarter of one dense [4096 × d_sae] tensor
        weights = 4 * 2 * d_in * d_sae
        # weights, gradients, the optimizer's state (signum: z; Adam: two moments), one
        # gradient-sized temporary: 3.5 × the weights under signum, 4.5 × under Adam
        for optimizer, times in (("signum", 3.5), ("adam", 4.5)):
            predicted = training_bytes(d_in, d_sae, 4096, sae, optimizer=optimizer)
            assert times * weights < predicted < times * weights + 3 * PRE_CHUNK_BYTES + 2**30
    standard = registry.config_for("standard")
    grow = training_bytes(d_in, d_sae, 8192, standard) - training_bytes(d_in, d_sae, 4096, standard)
    assert grow > 4 * 4096 * d_sae * 4


def test_a_batch_that_cannot_fit_is_refused_naming_a_batch_that_fits():
    """A dense type whose [batch × d_sae] tensors outgrow the machine is refused in one line that
    names a batch (and a width) that fit; the batch it names is accepted."""
    import psutil

    total, d_sae = psutil.virtual_memory().total, 16_384
    batch = 2 * total // (4 * 4 * d_sae)  # the standard step's four dense tensors alone: twice the memory
    with pytest.raises(UserError) as e:
        TrainConfig.from_dict(dict(architecture="standard", d_sae=d_sae, batch_size=batch)).resolved(576)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"an SAE of 16,384 latents on d_in=576 with batch {batch:,} needs")
    fits = int(msg.split(", or batch ")[1].split(" or smaller")[0].replace(",", ""))
    assert 2 <= fits < batch
    TrainConfig.from_dict(dict(architecture="standard", d_sae=d_sae, batch_size=fits)).resolved(576)


def test_adam_steps_a_column_major_weight_through_its_transpose():
    """`--optimizer adam` steps W_enc (column-major: held as its transpose) through a row-major
    alias of its storage, as fast as a row-major weight: the same weights as torch's Adam on the
    weight itself, W_enc keeps its layout, and a checkpoint of W_enc's own [d_in × d_sae] moments
    (saved before the alias) resumes to the same weights."""
    from core.train.optim import make_optimizer

    def weights():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(48, 8).T), torch.nn.Parameter(torch.randn(48, 8))]

    def run(params, opt, steps, seed=1):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            loss = sum((p * torch.randn(p.shape, generator=g)).sum() ** 2 for p in params)
            loss.backward()
            opt.step()
        return params

    ours = weights()
    opt = make_optimizer("adam", ours, 1e-2)
    run(ours, opt, 5)
    plain = weights()
    run(plain, torch.optim.Adam(plain, lr=1e-2, betas=(0.9, 0.999)), 5)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)
    assert ours[0].stride() == (1, 8)
    opt.zero_grad()  # the weight's own gradient too, not only the alias's
    assert ours[0].grad is None
    # W_enc's own moments, as plain fused Adam saved them, load into the alias transposed
    old_params = weights()
    old = torch.optim.Adam(old_params, lr=1e-2, betas=(0.9, 0.999), fused=True)
    run(old_params, old, 3)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in old_params]
    assert resumed[0].stride() == (1, 8)
    opt = make_optimizer("adam", resumed, 1e-2)
    saved = copy.deepcopy(old.state_dict())  # as from a checkpoint: not sharing old's moments
    for state in saved["state"].values():  # laid out by index, not by memory: loaded by index
        state.update({k: v.contiguous() for k, v in state.items() if v.dim() == 2})
    opt.load_state_dict(saved)
    run(resumed, opt, 2, seed=2)
    run(old_params, old, 2, seed=2)
    for a, b in zip(resumed, old_params):
        torch.testing.assert_close(a, b)
