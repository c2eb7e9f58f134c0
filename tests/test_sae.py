import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError
from core.formats.saelens import from_cfg_json, load_saelens, save_saelens, to_cfg_json
from core.sae import SAEConfig, TopKConfig, TopKSAE


def _sae(d_in=6, d_sae=12, k=3, seed=0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, TopKConfig(k=k))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


def _cfg(sae: TopKSAE) -> SAEConfig:
    return SAEConfig(d_in=sae.d_in, d_sae=sae.d_sae, type_config=TopKConfig(k=sae.k), hook_name="blocks.3.hook_resid_post",
                     model_name="smollm2", context_size=128, prepend_bos=True, dataset_path="stdlib")


def test_encode_keeps_top_k_of_relu_pre_acts():
    sae = _sae()
    x = torch.randn(20, 6)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = sae.encode(x)
    assert z.shape == (20, 12)
    assert ((z > 0).sum(1) <= 3).all()
    for row_pre, row_z in zip(pre, z):
        keep = row_pre.topk(3).indices
        expected = torch.zeros(12)
        expected[keep] = row_pre[keep].relu()
        torch.testing.assert_close(row_z, expected)
    x_hat, z2 = sae(x)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(x_hat, z @ sae.W_dec + sae.b_dec)
    values, indices = sae.encode_topk(x)
    torch.testing.assert_close(torch.zeros_like(z).scatter(1, indices, values), z)


def test_parameter_names_and_shapes_match_saelens():
    sae = TopKSAE(5, 20, TopKConfig(k=4))
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (5, 20), "W_dec": (20, 5), "b_enc": (20,), "b_dec": (5,)}
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))


@pytest.mark.parametrize("k", [0, 13])
def test_k_out_of_range_is_a_user_error(k):
    with pytest.raises(UserError, match=rf"k={k} must be between 1 and the SAE width 12; lower k or raise the expansion factor"):
        TopKSAE(6, 12, TopKConfig(k=k))


def test_cfg_json_v6_layout_and_round_trip():
    cfg = _cfg(_sae())
    d = to_cfg_json(cfg)
    assert d["architecture"] == "topk" and d["device"] == "cpu" and d["k"] == 3
    assert (d["d_in"], d["d_sae"], d["dtype"], d["apply_b_dec_to_input"], d["normalize_activations"]) == (6, 12, "float32", True, "none")
    # The run metadata where SAELens 6 reads it; no norm guard used → no outlier_norm_threshold.
    assert d["metadata"] == {"model_name": "smollm2", "hook_name": "blocks.3.hook_resid_post", "context_size": 128,
                             "prepend_bos": True, "dataset_path": "stdlib", "exclude_special_tokens": False,
                             "sae_lens_version": "6.0.0"}
    assert d["prepend_bos"] is True  # also at the top level, where SAELens before 6 reads it
    assert "hook_name" not in d
    assert from_cfg_json(json.loads(json.dumps(d))) == cfg


def test_cfg_json_older_flat_layouts():
    flat = {"architecture": "topk", "d_in": 6, "d_sae": 12, "k": 3, "hook_name": "blocks.1.hook_resid_pre",
            "model_name": "gpt2", "context_size": 64, "prepend_bos": True, "dataset_path": "x"}
    cfg = from_cfg_json(flat)
    assert (cfg.hook_name, cfg.model_name, cfg.context_size, cfg.type_config.k) == ("blocks.1.hook_resid_pre", "gpt2", 64, 3)
    v5 = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}, "d_in": 6, "d_sae": 12}
    assert (from_cfg_json(v5).architecture, from_cfg_json(v5).type_config.k) == ("topk", 7)
    with pytest.raises(UserError, match="no k"):
        from_cfg_json({"architecture": "topk", "d_in": 6, "d_sae": 12})
    with pytest.raises(UserError, match="d_sae"):
        from_cfg_json({"architecture": "topk", "d_in": 6, "k": 2})


def test_save_load_round_trip(tmp_path):
    sae = _sae()
    folder = save_saelens(sae, _cfg(sae), tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp dir left behind
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    loaded, cfg = load_saelens(folder)
    assert cfg == _cfg(sae)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    x = torch.randn(30, 6)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_load_rejects_bad_folders(tmp_path):
    sae = _sae()
    folder = save_saelens(sae, _cfg(sae), tmp_path / "sae")
    cfg_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    good = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps(good | {"d_in": 7}))
    with pytest.raises(UserError, match=r"W_enc in .* has shape \[6, 12\] but the config \(d_in=7, d_sae=12\)"):
        load_saelens(folder)
    cfg_path.write_text(json.dumps(good))

    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "b_enc"}, str(weights))
    with pytest.raises(UserError, match="lacks tensor.*b_enc"):
        load_saelens(folder)

    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_saelens(folder)

    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        load_saelens(folder)


def test_load_rejects_other_architectures(tmp_path):
    sae = _sae()
    folder = save_saelens(sae, _cfg(sae), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"architecture": "jumprelu"}))
    with pytest.raises(UserError, match="jumprelu"):
        load_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "layer_norm"}))
    with pytest.raises(UserError, match="layer_norm"):
        load_saelens(folder)


def test_load_rejects_unfolded_decoder_norm_rescaling(tmp_path):
    sae = _sae()
    folder = save_saelens(sae, _cfg(sae), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"rescale_acts_by_decoder_norm": True}))
    load_saelens(folder)  # unit-norm rows: rescaling is the identity, so it loads
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    save_file(tensors | {"W_dec": tensors["W_dec"] * 2}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(UserError, match="fold_W_dec_norm"):
        load_saelens(folder)
