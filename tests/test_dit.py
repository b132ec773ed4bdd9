"""Forward-pass parity of tinylazy's DiT against the PyTorch stand-in (official numerics)."""
import numpy as np
import pytest

import tinylazy as tl
from tinylazy.embeddings import pos_embed_2d, timestep_features

from conftest import BACKENDS, rel_err
from official_features import official_timestep_features

torch = pytest.importorskip("torch")
from torch_dit import TorchDiT  # noqa: E402

# Several geometries: official widths at reduced depth and input size (XL/2 widths included).
CONFIGS = {
    "tiny": tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10),
    "S/4-ish": tl.get_config("DiT-S/4", input_size=16, depth=2, num_classes=7),
    "XL/2-widths": tl.get_config("DiT-XL/2", input_size=8, depth=2, num_classes=5),
    "pixel-noSigma": tl.DiTConfig(input_size=12, patch_size=3, in_channels=1, hidden_size=48, depth=3, num_heads=2,
                                  num_classes=3, learn_sigma=False),
}
TOL = {"float64": 1e-12, "float32": 1e-5}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


def _inputs(cfg, B=4, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size))
    t = np.array([0, 999, 500, 17][:B])
    y = np.array([0, cfg.num_classes, cfg.num_classes - 1, 1][:B])   # the null class included
    return x, t, y


def _torch_out(cfg, params, dtype, x, t, y, cfg_scale=None, pinned=True):
    """The stand-in's output; pinned timestep features unless told otherwise: the parity tests
    compare at 1e-12, and PyTorch's own float32 cos/sin are an ulp off on some features."""
    m = TorchDiT.from_params(cfg, params, TORCH_DTYPE[dtype], pinned_features=pinned)
    args = (torch.from_numpy(x).to(TORCH_DTYPE[dtype]), torch.from_numpy(t), torch.from_numpy(y))
    with torch.no_grad():
        out = m(*args) if cfg_scale is None else m.forward_with_cfg(*args, cfg_scale)
    return out.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_torch(name, dtype, backend):
    cfg = CONFIGS[name]
    params = tl.init_params(cfg, seed=3, scheme="random")
    x, t, y = _inputs(cfg)
    out = tl.DiT(cfg, params, dtype=dtype, backend=backend)(x, t, y)
    assert out.shape == (4, cfg.out_channels, cfg.input_size, cfg.input_size)
    assert out.dtype == np.dtype(dtype)
    err = rel_err(out, _torch_out(cfg, params, dtype, x, t, y))
    assert err <= TOL[dtype], f"{name} {dtype}: relative error {err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5, 4.0])
def test_forward_with_cfg_matches_torch(cfg_scale, dtype, backend):
    cfg = CONFIGS["tiny"]
    params = tl.init_params(cfg, seed=4, scheme="random")
    x, t, _ = _inputs(cfg)
    t = np.array([999, 250, 999, 250])
    y = np.array([3, 7, cfg.num_classes, cfg.num_classes])          # [y; null] as official sample.py
    out = tl.DiT(cfg, params, dtype=dtype, backend=backend).forward_with_cfg(x, t, y, cfg_scale)
    err = rel_err(out, _torch_out(cfg, params, dtype, x, t, y, cfg_scale=cfg_scale))
    assert err <= TOL[dtype], f"cfg {cfg_scale} {dtype}: relative error {err:.3e}"


def test_forward_with_cfg_channel_quirk_and_all_channel_option():
    cfg = CONFIGS["tiny"]                                              # 4 latent channels, learned sigma: 8 outputs
    m = tl.DiT(cfg, tl.init_params(cfg, seed=5, scheme="random"), dtype="float64")
    x, _, _ = _inputs(cfg)
    t, y = np.array([10, 10, 10, 10]), np.array([1, 2, 10, 10])
    plain = m(np.concatenate([x[:2], x[:2]]), t, y)
    quirk = m.forward_with_cfg(x, t, y, 4.0)
    full = m.forward_with_cfg(x, t, y, 4.0, guide_channels=None)
    guided = plain[2:, :4] + 4.0 * (plain[:2, :4] - plain[2:, :4])
    np.testing.assert_allclose(quirk[:2, :3], guided[:, :3], rtol=1e-13)
    np.testing.assert_array_equal(quirk[:2, 3], plain[:2, 3])          # channel 3 left unguided (official quirk)
    np.testing.assert_allclose(full[:2, :4], guided, rtol=1e-13)
    np.testing.assert_array_equal(quirk[:, 4:], plain[:, 4:])          # variance channels untouched


def test_pytorch_own_float32_features_differ_by_at_most_an_ulp_effect():
    """States the gap between the pinned (correctly rounded) features and PyTorch's own float32 exp/cos/sin."""
    t = torch.arange(1000)
    own = TorchDiT(CONFIGS["tiny"]).t_embedder.features(t).numpy()
    pinned = timestep_features(t.numpy())
    assert np.array_equal(pinned, official_timestep_features(t.numpy()))
    feat_gap = np.abs(own.astype(np.float64) - pinned).max()
    # An ulp of a frequency or of t * freq moves a phase near 999 by up to ulp(999) = 6.1e-5, and cos/sin
    # follow with slope <= 1: measured 3.0e-5 (PyTorch 2.13 CPU, t = 997), bounded by that one ulp.
    assert feat_gap <= np.spacing(np.float32(999)) + 2.0 ** -24
    cfg = CONFIGS["XL/2-widths"]
    params = tl.init_params(cfg, seed=6, scheme="random")
    x, t, y = _inputs(cfg)
    ours = tl.DiT(cfg, params, dtype="float32")(x, t, y)
    own_features = _torch_out(cfg, params, "float32", x, t, y, pinned=False)
    gap = rel_err(ours, own_features)
    print(f"features max abs gap {feat_gap:.2e}; DiT output relative gap vs PyTorch's own float32 features {gap:.2e}")
    assert gap <= 1e-5                                  # measured 1.0e-6 (5.6e-7 with pinned features): 10x margin


def test_pos_embed_matches_mae_layout():
    pe = pos_embed_2d(8, 3)                                             # (9, 8)
    # first half of the channels encodes the column (w), the second the row (h); sin then cos
    np.testing.assert_allclose(pe[1, 0], np.sin(1.0))
    np.testing.assert_allclose(pe[3, 4], np.sin(1.0))
    np.testing.assert_allclose(pe[3, 0], 0.0)


def test_registry_has_the_twelve_official_configs():
    for w, (d, h, n) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items():
        for p in (2, 4, 8):
            c = tl.get_config(f"DiT-{w}/{p}")
            assert (c.depth, c.hidden_size, c.num_heads, c.patch_size) == (d, h, n, p)
    assert tl.get_config("DiT-XL-2") == tl.get_config("DiT-XL/2")
    with pytest.raises(KeyError, match="unknown DiT configuration"):
        tl.get_config("DiT-XXL/2")


def test_official_init_is_adaln_zero():
    cfg = CONFIGS["tiny"]
    m = tl.DiT.from_config(cfg, scheme="official", dtype="float64")
    x, t, y = _inputs(cfg)
    np.testing.assert_array_equal(m(x, t, y), 0.0)                     # zero final layer


@pytest.mark.parametrize("bad, match", [
    (dict(x=np.zeros((2, 3, 8, 8))), "x has shape"),
    (dict(t=np.array([0, 1000])), "timesteps must lie"),
    (dict(t=np.array([-1, 3])), "timesteps must lie"),
    (dict(y=np.array([0, 11])), "class labels"),
    (dict(y=np.array([0.5, 1.0])), "class labels"),
    (dict(y=np.array([0, 1, 2])), "y has 3 entries"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    cfg = CONFIGS["tiny"]
    m = tl.DiT.from_config(cfg, scheme="random")
    args = dict(x=np.zeros((2, 4, 8, 8)), t=np.array([0, 1]), y=np.array([0, 1]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        m(args["x"], args["t"], args["y"])


def test_params_validated_before_building():
    cfg = CONFIGS["tiny"]
    params = tl.init_params(cfg, scheme="random")
    bad = dict(params)
    bad["blocks.0.attn.qkv.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
        tl.DiT(cfg, bad)
    del bad["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="missing"):
        tl.DiT(cfg, bad)
