"""tinylazy sample (examples/sample.py) end to end in a subprocess, on tiny random models written here."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import tinylazy as tl
from tinylazy.image import make_grid, to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "sample.py")


def write_model(path, in_channels, input_size=16):
    cfg = tl.DiTConfig(input_size=input_size, patch_size=4, in_channels=in_channels, hidden_size=32, depth=1,
                       num_heads=2, num_classes=10)
    params = tl.init_params(cfg, seed=0, scheme="random")
    save_file({k: v.astype(np.float32) for k, v in params.items()}, str(path), metadata={"num_heads": "2"})
    return str(path)


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("w") / "pixel.safetensors", 1)


def run(*args, script=SCRIPT):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_usage_error(r, *phrases):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for p in phrases:
        assert p in lines[0], lines[0]


@pytest.mark.parametrize("extra,size", [
    ((), (4 * 74, 4 * 56)),                    # 10 classes: 4 per row, 3 rows, 16 px + 2 px padding, x4
    (("--batch", 3, "--sampler", "ddpm", "--cfg-scale", 1), (4 * 56, 4 * 20)),
])
def test_writes_png_grid(pixel_model, tmp_path, extra, size):
    out = tmp_path / "grid.png"
    r = run("--weights", pixel_model, "--steps", 3, "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    assert "ms/step" in r.stderr and "3/3" in r.stderr
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == size
    a = np.asarray(img)
    assert np.all(a[:8] == 0) and np.all(a[:, :8] == 0)               # torchvision's 2 px black padding, x4


def test_pixels_are_ddim_samples_of_the_seed_and_guidance(pixel_model, tmp_path):
    """Every pixel of the PNG is tl.ddim_sample's output for --seed and --cfg-scale (float32 NumPy, the
    CLI's defaults), through torchvision's grid and the x4 enlargement; the same seed gives the same
    picture, another seed or guidance scale another one."""
    from tinylazy.io import load_dit
    model = load_dit(pixel_model)
    labels = np.array([1, 2, 7])
    pictures = {}
    for seed, cfg_scale, name in ((5, 4.0, "a"), (5, 4.0, "again"), (6, 4.0, "seed"), (5, 1.0, "cfg")):
        out = tmp_path / f"{name}.png"
        r = run("--weights", pixel_model, "--steps", 3, "--classes", *labels, "--seed", seed, "--cfg-scale", cfg_scale,
                "--out", out)
        assert r.returncode == 0, r.stderr
        pictures[name] = np.asarray(Image.open(out))
        z = tl.ddim_sample(model, tl.make_noise(model, len(labels), seed=seed), labels, 3, cfg_scale)
        want = np.repeat(np.repeat(make_grid(z, nrow=4), 4, axis=0), 4, axis=1)   # 16 px images shown x4
        assert np.array_equal(pictures[name], want), f"{name}: {np.count_nonzero(pictures[name] != want)} pixels differ"
    assert np.array_equal(pictures["a"], pictures["again"])
    for other in ("seed", "cfg"):
        changed = np.count_nonzero(pictures[other] != pictures["a"]) / pictures["a"].size
        assert changed > 0.05, f"--{other}: only {changed:.0%} of the pixels changed"   # measured 23% / 12%


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "--cfg-scale" in r.stdout and "--sampler" in r.stdout


@pytest.mark.parametrize("args,phrases", [
    (("--steps", 0), ["--steps must be an integer in 1..1000, got 0"]),
    (("--steps", 1001), ["--steps must be an integer in 1..1000, got 1001"]),
    (("--classes", 3, 12), ["unknown class id 12", "classes 0..9"]),
    (("--cfg-scale", 0.5), ["--cfg-scale must be a number >= 1"]),
    (("--batch", 0), ["--batch must be >= 1"]),
    (("--vae", "/nonexistent/vae"), ["--vae /nonexistent/vae: no such file or folder"]),
])
def test_bad_input(pixel_model, tmp_path, args, phrases):
    assert_usage_error(run("--weights", pixel_model, "--out", tmp_path / "x.png", *args), *phrases)
    assert not (tmp_path / "x.png").exists()


def test_missing_and_bad_weights(tmp_path):
    assert_usage_error(run("--weights", tmp_path / "none.safetensors"), "no such file or folder",
                       "nor a bundled model (tiny-dit-digits)", "tinylazy convert")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert_usage_error(run("--weights", tmp_path / "junk.safetensors"), "cannot load the DiT", "junk.safetensors")


def test_latent_model_needs_vae(tmp_path):
    path = write_model(tmp_path / "latent.safetensors", 4)
    assert_usage_error(run("--weights", path, "--steps", 2), "latent-space model (4 channels)", "--vae")


def write_vae(path, latent_channels):
    vae = pytest.importorskip("tinylazy.vae")
    cfg = vae.VAEConfig(latent_channels=latent_channels, block_out_channels=(32, 32), layers_per_block=1)
    params = vae.init_params(cfg, seed=0)
    save_file({k: v.astype(np.float32) for k, v in params.items()}, str(path))
    return str(path)


def test_latent_model_with_vae(tmp_path):
    """8x8x4 latents decoded by a two-block VAE into 16x16 RGB images."""
    dit = write_model(tmp_path / "latent.safetensors", 4, input_size=8)
    vae = write_vae(tmp_path / "vae.safetensors", 4)
    out = tmp_path / "grid.png"
    r = run("--weights", dit, "--vae", vae, "--steps", 2, "--classes", 1, 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "VAE decode" in r.stderr and Image.open(out).size == (4 * 38, 4 * 20)


def test_vae_latent_channels_must_match(pixel_model, tmp_path):
    vae = write_vae(tmp_path / "vae.safetensors", 4)
    assert_usage_error(run("--weights", pixel_model, "--vae", vae, "--steps", 2),
                       "has 4 latent channels but the DiT", "takes 1")


def test_grid_matches_torchvision_conventions():
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], dtype=np.float32).reshape(1, 1, 1, 6)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 191, 255, 255]   # clamp, (x+1)/2, *255 + 0.5, floor
    one = make_grid(np.zeros((1, 3, 4, 5)))
    assert one.shape == (4, 5, 3)                                       # a single image: no padding
    g = make_grid(np.ones((5, 1, 4, 4)))
    assert g.shape == (2 * 6 + 2, 4 * 6 + 2, 3)
    assert g[2:6, 2:6].min() == 255 and g[:2].max() == 0 and g[8:14, 8:].max() == 0   # empty slots stay black
