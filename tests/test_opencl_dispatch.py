"""backend="opencl" through the public entry points: load_dit, ddim_sample and examples/sample.py."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinylazy as tl

from conftest import rel_err

opencl = pytest.importorskip("tinylazy.opencl")
if not opencl.available():
    pytest.skip("no OpenCL platform", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    m = tl.DiT.from_config(tl.get_config("tiny-dit-digits", depth=2), scheme="random")
    path = str(tmp_path_factory.mktemp("w") / "m.safetensors")
    tl.save_dit(m, path)
    return m, path


def test_load_dit_opencl_and_ddim_sample_route_to_the_device(weights):
    m, path = weights
    om = tl.load_dit(path, backend="opencl")
    assert om.backend == "opencl" and om.weights_hash == tl.load_dit(path).weights_hash
    noise, y = tl.make_noise(m, 2, 0), np.array([3, 7])
    ref = tl.ddim_sample(m, noise, y, steps=3, cfg_scale=1.5)
    assert rel_err(tl.ddim_sample(om, noise, y, steps=3, cfg_scale=1.5), ref) < 1e-4
    with pytest.raises(ValueError, match="eta = 0"):
        tl.ddim_sample(om, noise, y, steps=3, eta=0.5, step_noise=0)
    with pytest.raises(ValueError, match="float32 only"):
        tl.load_dit(path, dtype="float64", backend="opencl")


def test_sample_cli_opencl(weights, tmp_path):
    _, path = weights
    out = tmp_path / "s.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "sample.py"), "--weights", path,
                        "--backend", "opencl", "--steps", "2", "--batch", "2", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "sample.py"), "--weights", path,
                        "--backend", "opencl", "--sampler", "ddpm"], capture_output=True, text=True)
    assert r.returncode == 2 and "ddim" in r.stderr and "Traceback" not in r.stderr
