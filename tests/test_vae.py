"""The AutoencoderKL against diffusers' (random weights, every tensor moved off its init), and its loader."""
import copy
import json

import numpy as np
import pytest

from tinylazy import conv, parallel
from tinylazy.io import WeightsError, write_safetensors
from tinylazy.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, convert_state_dict, load_vae, param_shapes

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SMALL = {
    "lpb1-g8": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    "lpb2-g32": VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32, latent_channels=3),
}


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def torch_vae(cfg, seed=0):
    """diffusers' AutoencoderKL in float64 with every parameter perturbed (norm affines included)."""
    n = len(cfg.block_out_channels)
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                                latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups)
    m = m.double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def in_dtype(m, torch_dtype):
    """A copy of the float64 module ``m`` in ``torch_dtype`` (``m`` itself stays float64)."""
    return m if torch_dtype == torch.float64 else copy.deepcopy(m).to(torch_dtype)


def state_dict(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module", params=list(SMALL))
def pair(request):
    cfg = SMALL[request.param]
    m = torch_vae(cfg)
    return cfg, m, state_dict(m)


@pytest.fixture(autouse=True)
def two_threads_all_winograd(monkeypatch):
    """Exercise the thread pool whatever the machine, and Winograd on the small test images too
    (even-sized ones; odd sizes still take im2col)."""
    monkeypatch.setattr(parallel, "NUM_THREADS", 2)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_PIXELS", 0)


# ----------------------------------------------------------------------------
# ops

@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("cin, cout, h, w, k, stride, pad", [
    (5, 7, 8, 6, 3, 1, (1, 1, 1, 1)), (6, 3, 9, 7, 3, 1, (1, 1, 1, 1)), (4, 6, 8, 8, 3, 2, (0, 1, 0, 1)),
    (3, 5, 7, 5, 3, 2, (0, 1, 0, 1)), (6, 4, 5, 3, 1, 1, (0, 0, 0, 0))])
def test_conv2d_matches_torch(dtype, tol, cin, cout, h, w, k, stride, pad):
    rng = np.random.default_rng(0)
    x, wt, b, res = (rng.standard_normal(s).astype(dtype) for s in
                     [(cin, h, w), (cout, cin, k, k), (cout,), (cout, (h + pad[0] + pad[1] - k) // stride + 1,
                                                                 (w + pad[2] + pad[3] - k) // stride + 1)])
    t = torch.nn.functional.pad(torch.from_numpy(x).double()[None], (pad[2], pad[3], pad[0], pad[1]))
    ref = torch.nn.functional.conv2d(t, torch.from_numpy(wt).double(), torch.from_numpy(b).double(),
                                     stride=stride)[0].numpy()
    xpad = conv.pad_forward(x, pad)
    out = conv.conv2d_forward(xpad, wt, b, stride=stride, residual=res)
    assert out.dtype == dtype and rel_err(out, ref + res) <= tol
    if k == 3 and stride == 1 and h % 2 == 0 and w % 2 == 0:
        out = conv.conv3x3_winograd_forward(xpad, conv.winograd_weights(wt), b, residual=res)
        assert out.dtype == dtype and rel_err(out, ref + res) <= tol


def test_conv_bands_and_winograd_guard(monkeypatch):
    """Many small bands (rows and tiles split across bands, partial last band) give the same result."""
    rng = np.random.default_rng(1)
    x, wt, b = rng.standard_normal((8, 10, 12)), rng.standard_normal((6, 8, 3, 3)), rng.standard_normal(6)
    xpad = conv.pad_forward(x, (1, 1, 1, 1))
    whole = conv.conv2d_forward(xpad, wt, b), conv.conv3x3_winograd_forward(xpad, conv.winograd_weights(wt), b)
    monkeypatch.setattr(conv, "BAND_BYTES", 1)
    np.testing.assert_allclose(conv.conv2d_forward(xpad, wt, b), whole[0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(conv.conv3x3_winograd_forward(xpad, conv.winograd_weights(wt), b), whole[1],
                               rtol=0, atol=1e-13)
    np.testing.assert_allclose(whole[0], whole[1], rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="even output size, got 9x12"):
        conv.conv3x3_winograd_forward(xpad[:, 1:], conv.winograd_weights(wt), b)


@pytest.mark.parametrize("silu", [False, True])
def test_groupnorm_matches_torch(silu, monkeypatch):
    monkeypatch.setattr(conv, "PIECE", 50)                         # several blocks per group
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 5, 7)) * 3 + 2
    g, b = rng.standard_normal(12), rng.standard_normal(12)
    ref = torch.nn.functional.group_norm(torch.from_numpy(x)[None], 4, torch.from_numpy(g), torch.from_numpy(b), 1e-6)
    ref = (torch.nn.functional.silu(ref) if silu else ref)[0].numpy()
    buf, inner = conv.pad_buffer(np, x.shape, x.dtype, (1, 1, 1, 1))
    conv.groupnorm_forward(x, g, b, 4, silu=silu, out=inner)
    assert rel_err(inner, ref) <= 1e-13
    assert not buf[:, 0].any() and not buf[:, -1].any() and not buf[:, :, 0].any() and not buf[:, :, -1].any()


def test_upsample_matches_torch():
    x = np.random.default_rng(3).standard_normal((3, 4, 5))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], scale_factor=2.0, mode="nearest")[0].numpy()
    np.testing.assert_array_equal(conv.upsample2x_forward(x), ref)


# ----------------------------------------------------------------------------
# model

def test_param_shapes_match_diffusers(pair):
    cfg, _, sd = pair
    assert list(param_shapes(cfg).items()) == [(k, v.shape) for k, v in sd.items()]


def test_real_config_param_shapes():
    with torch.device("meta"):                                  # shapes only, no initialisation
        m = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4,
                                    block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    assert param_shapes(VAEConfig()) == {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("dtype, torch_dtype, tol", [("float64", torch.float64, 1e-12),
                                                     ("float32", torch.float32, 1e-5)])
def test_decode_matches_diffusers(pair, dtype, torch_dtype, tol):
    cfg, m, sd = pair
    z = np.random.default_rng(1).standard_normal((2, cfg.latent_channels, 5, 7))
    with torch.no_grad():
        ref = in_dtype(m, torch_dtype).decode(torch.from_numpy(z).to(torch_dtype)).sample.double().numpy()
    vae = AutoencoderKL(cfg, sd, dtype=dtype)
    out = vae.decode(z)
    np.testing.assert_array_equal(vae.decode(z), out)              # reused buffers hold no state
    f = 2 ** (len(cfg.block_out_channels) - 1)
    assert out.shape == (2, cfg.out_channels, 5 * f, 7 * f) and out.dtype == np.dtype(dtype)
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("dtype, torch_dtype, tol", [("float64", torch.float64, 1e-12),
                                                     ("float32", torch.float32, 1e-5)])
@pytest.mark.parametrize("size", [(16, 12), (11, 13)])
def test_encode_matches_diffusers(pair, dtype, torch_dtype, tol, size):
    cfg, m, sd = pair
    x = np.random.default_rng(2).uniform(-1, 1, (2, cfg.in_channels) + size)
    with torch.no_grad():
        post = in_dtype(m, torch_dtype).encode(torch.from_numpy(x).to(torch_dtype)).latent_dist
        ref = {k: getattr(post, k).double().numpy() for k in ("parameters", "mean", "logvar", "std", "var")}
    q = AutoencoderKL(cfg, sd, dtype=dtype).encode(x)
    for k, v in ref.items():
        assert rel_err(getattr(q, k), v) <= tol, k
    assert q.mode() is q.mean


def test_pool_split_gemms_and_attention_blocks(pair, monkeypatch):
    """GEMMs split by output channels across the pool, attention in query blocks: same numbers."""
    cfg, _, sd = pair
    vae = AutoencoderKL(cfg, sd, dtype="float64")
    z = np.random.default_rng(6).standard_normal((1, cfg.latent_channels, 6, 5))
    x = np.random.default_rng(7).uniform(-1, 1, (1, cfg.in_channels, 12, 10))
    monkeypatch.setattr(parallel, "SPLIT_GEMMS", False)
    want = vae.decode(z), vae.encode(x).parameters
    monkeypatch.setattr(conv, "ATTN_ROWS", 7)
    monkeypatch.setattr(parallel, "SPLIT_GEMMS", True)
    got = vae.decode(z), vae.encode(x).parameters
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-13


def test_posterior_clamp_and_sample():
    p = np.random.default_rng(3).standard_normal((2, 8, 3, 3)) * 30                 # logvar beyond [-30, 20]
    ref = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(torch.from_numpy(p))
    q = DiagonalGaussian(p)
    for k in ("mean", "logvar", "std", "var"):
        np.testing.assert_array_equal(getattr(q, k), getattr(ref, k).numpy())
    noise = np.random.default_rng(7).standard_normal(q.mean.shape)
    np.testing.assert_array_equal(q.sample(np.random.default_rng(7)), q.mean + q.std * noise)
    np.testing.assert_array_equal(q.sample(7), q.sample(7))


def test_real_config_builds_and_decodes(monkeypatch):
    monkeypatch.setattr(conv, "WINOGRAD_MIN_PIXELS", 1024)            # the default: im2col on this tiny latent
    vae = AutoencoderKL.from_config(VAEConfig(), seed=0)
    out = vae.decode(np.random.default_rng(0).standard_normal((1, 4, 4, 4)))
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.std() > 0


# ----------------------------------------------------------------------------
# loading

def to_ldm(sd, n_blocks):
    """diffusers names -> CompVis/LDM names, as in the single-file vae-ft-ema checkpoint."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k2 = k2.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f"mid_block.attentions.0.{a}." in k2:
                k2 = k2.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
                if k2.endswith("weight") and b != "norm":
                    v = v[:, :, None, None]                                   # 1x1 conv weights
        if k2.startswith("encoder.down_blocks."):
            k2 = k2.replace("encoder.down_blocks.", "encoder.down.").replace(".resnets.", ".block.")
            k2 = k2.replace(".downsamplers.0.", ".downsample.")
        if k2.startswith("decoder.up_blocks."):
            i = int(k2.split(".")[2])
            rest = k2.split(".", 3)[3].replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            k2 = f"decoder.up.{n_blocks - 1 - i}.{rest}"
        out[k2] = v
    return out


def test_load_layouts(tmp_path, pair):
    """diffusers folder, single files with current, older (query/key/...) and LDM names: same decode."""
    cfg, m, sd = pair
    z = np.random.default_rng(4).standard_normal((1, cfg.latent_channels, 3, 4))
    want = AutoencoderKL(cfg, sd, dtype="float64").decode(z)

    m.save_pretrained(tmp_path / "folder")
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in sd.items()}
    ldm = to_ldm(sd, len(cfg.block_out_channels))
    assert len(convert_state_dict(ldm)) == len(sd)
    ldm.update({"loss.logvar": np.zeros(()), "model_ema.decay": np.ones(())})
    sources = [tmp_path / "folder"]
    for name, tensors in (("current", sd), ("old", old), ("ldm", ldm),
                          ("full-sd", {"first_stage_model." + k: v for k, v in ldm.items()}
                           | {"model.diffusion_model.x.weight": np.zeros(2)})):
        write_safetensors(tmp_path / f"{name}.safetensors", tensors)
        sources.append(tmp_path / f"{name}.safetensors")
    for src in sources:
        config = cfg if src.name != "folder" and cfg.norm_num_groups != 32 else None
        vae = load_vae(src, dtype="float64", config=config)
        assert vae.config == cfg, src
        assert rel_err(vae.decode(z), want) <= 1e-14, src


def test_load_upcasts_half_precision(tmp_path):
    cfg = SMALL["lpb2-g32"]
    m = torch_vae(cfg)
    z = np.random.default_rng(5).standard_normal((1, cfg.latent_channels, 2, 2))
    from safetensors.torch import save_file
    for tdt in (torch.float16, torch.bfloat16):
        sd = {k: v.to(tdt).contiguous() for k, v in m.state_dict().items()}
        save_file(sd, tmp_path / "half.safetensors")
        vae = load_vae(tmp_path / "half.safetensors", dtype="float64")
        want = AutoencoderKL(cfg, {k: v.double().numpy() for k, v in sd.items()}, dtype="float64").decode(z)
        assert vae.params["decoder.conv_in.weight"].dtype == np.float64
        np.testing.assert_array_equal(vae.decode(z), want)


def test_load_errors(tmp_path, pair):
    cfg, m, sd = pair
    groups = None if cfg.norm_num_groups == 32 else cfg

    def write(tensors, name="bad.safetensors"):
        write_safetensors(tmp_path / name, tensors)
        return tmp_path / name

    missing = write({k: v for k, v in sd.items() if k != "decoder.up_blocks.0.resnets.0.conv2.bias"})
    with pytest.raises(WeightsError,
                       match=r"bad\.safetensors.*missing keys: decoder\.up_blocks\.0\.resnets\.0\.conv2\.bias"):
        load_vae(missing, config=groups)
    wrong = dict(sd)
    wrong["decoder.mid_block.attentions.0.to_k.weight"] = np.zeros((3, 3))
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*wrong shapes: decoder\.mid_block\.attentions\.0\.to_k"
                                           r"\.weight: \(3, 3\), expected"):
        load_vae(write(wrong), config=groups)
    extra = write(dict(sd, **{"decoder.extra.weight": np.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected keys: decoder\.extra\.weight"):
        load_vae(extra, config=groups)
    nocfg = write({k: v for k, v in sd.items() if k != "encoder.conv_in.weight"})
    with pytest.raises(WeightsError, match=r"missing 'encoder\.conv_in\.weight'"):
        load_vae(nocfg)
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError, match=r"folder: no diffusion_pytorch_model\.safetensors"):
        load_vae(tmp_path / "folder")
    write(sd, "folder/diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=r"folder: no config\.json"):
        load_vae(tmp_path / "folder")
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64], "act_fn": "relu"}))
    with pytest.raises(WeightsError, match=r"config\.json: act_fn = 'relu' is not supported"):
        load_vae(tmp_path / "folder")
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_vae(tmp_path / "nothing")


@pytest.mark.parametrize("config, match", [
    ({"layers_per_block": 10 ** 8}, "layers_per_block must be an integer in 1..64, got 100000000"),
    ({"layers_per_block": 2.0}, "layers_per_block must be an integer"),
    ({"layers_per_block": True}, "layers_per_block must be an integer"),
    ({"block_out_channels": [32] * 17}, "block_out_channels must list 1..16"),
    ({"block_out_channels": [32, 10 ** 9]}, "must be integers in 1..65536"),
    ('{"block_out_channels": [32, 1e999]}', "must be integers in 1..65536"),
    ({"block_out_channels": "abc"}, "no block_out_channels list"),
    ({"down_block_types": 3}, "down_block_types = 3 is not supported"),
    ({"use_quant_conv": "yes"}, "use_quant_conv must be true or false"),
    ({"scaling_factor": -1}, "scaling_factor must be a finite number > 0"),
    ([1], "a list of 1 items, not a JSON object"),
])
def test_config_json_values_are_bounded_before_anything_is_sized(tmp_path, config, match):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", {"x": np.zeros(1, np.float32)})
    text = config if isinstance(config, str) else json.dumps(
        dict({"block_out_channels": [32, 64]}, **config) if isinstance(config, dict) else config)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(WeightsError, match=match):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100000)
    with pytest.raises(WeightsError, match="config.json: JSON nested too deeply"):
        load_vae(tmp_path)


def test_bad_input_shape(pair):
    cfg, _, sd = pair
    vae = AutoencoderKL(cfg, sd)
    with pytest.raises(ValueError, match=r"z has shape \(1, 5, 4, 4\), expected \(B, %d, H, W\)" % cfg.latent_channels):
        vae.decode(np.zeros((1, 5, 4, 4)))
    with pytest.raises(ValueError, match=r"x has shape \(3, 16, 16\)"):
        vae.encode(np.zeros((3, 16, 16)))
