"""One definition per variation: every model satisfies the protocol, both backends decide by the
one rule (test_opencl.py checks that they make the same decisions), and a lazy run that computes
everything is the plain run, bit for bit, on both."""
import numpy as np
import pytest

import tinylazy as tl
from tinylazy.api import lazy_dit
from tinylazy.lazy import LazyDiT, LazyGates
from tinylazy.protocol import Model

CFG = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
STEPS = 4


@pytest.fixture(scope="module")
def host():
    return tl.DiT.from_config(CFG, seed=3, scheme="random", dtype="float32")


@pytest.fixture(scope="module")
def device(host):
    opencl = pytest.importorskip("tinylazy.opencl")
    if not opencl.available():
        pytest.skip("no OpenCL platform")
    return opencl.OpenCLDiT.from_model(host)


def test_models_and_lazy_wrappers_satisfy_the_protocol(host):
    tmap = tl.create_diffusion(STEPS).timestep_map
    assert isinstance(host, Model) and isinstance(LazyDiT(host, tmap), Model)
    assert host.weights_hash is None                       # built from parameters: no hash given
    assert LazyGates.zeros(host, STEPS).weights_hash == tl.io.weights_hash(host)


def test_device_models_satisfy_the_protocol(host, device):
    lazy = lazy_dit(device, tl.create_diffusion(STEPS).timestep_map)
    assert isinstance(device, Model) and isinstance(lazy, Model) and type(lazy).__name__ == "OpenCLLazyDiT"
    assert device.weights_hash == host.weights_hash and lazy.backend == "opencl"


@pytest.mark.parametrize("backend", ["numpy", "opencl"])
@pytest.mark.parametrize("threshold", [True, False, -0.1, 1.5, "0.5", None])
def test_one_threshold_rule_on_both_backends(request, backend, threshold):
    """``threshold=True`` was 1.0 on NumPy and an error on OpenCL: a bool is no threshold on either."""
    model = request.getfixturevalue("host" if backend == "numpy" else "device")
    noise, y = tl.make_noise(model, 2, seed=1), np.array([1, 2])
    with pytest.raises(ValueError, match="threshold must be a number in"):
        tl.ddim_sample(model, noise, y, STEPS, gates=LazyGates.zeros(model, STEPS), threshold=threshold)


@pytest.mark.parametrize("backend", ["numpy", "opencl"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_lazy_all_compute_is_the_plain_run_bit_for_bit(request, backend, cfg_scale):
    model = request.getfixturevalue("host" if backend == "numpy" else "device")
    noise, y = tl.make_noise(model, 3, seed=2), np.array([0, 5, 9])
    plain = tl.ddim_sample(model, noise, y, STEPS, cfg_scale)
    gated = tl.ddim_sample(model, noise, y, STEPS, cfg_scale, gates=LazyGates.zeros(model, STEPS))   # scores 0.5
    forced = tl.ddim_sample(model, noise, y, STEPS, cfg_scale, decisions=np.ones((STEPS, CFG.depth, 2), bool))
    np.testing.assert_array_equal(gated, plain)
    np.testing.assert_array_equal(forced, plain)
