"""The OpenCL backend against the NumPy reference: every kernel, the forward, CFG, DDIM and lazy sampling.

Sizes are chosen awkward on purpose (primes, not multiples of the GEMM's 6 x 16 tile, of the
attention's 8-key tile or of the vector widths) so that every edge path runs.  Each check prints
the relative error max|a - b| / max|b| and the NMSE sum((a - b)^2) / sum(b^2); float32 passes at
relative error <= 1e-4, except the constant tests, which hold the kernels to the float64 path at
5e-7..1e-6.  Skips when PyOpenCL or an OpenCL device is missing.
"""
import math
import sys

import numpy as np
import pytest

import tinylazy as tl
from tinylazy import lazy, ops, sampling
from tinylazy import opencl as O

TOL = 1e-4


@pytest.fixture(scope="module")
def rt():
    try:
        return O.get_runtime()
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"no OpenCL device: {e}")


def check(name, got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    nmse = float(((got - want) ** 2).sum() / max((want ** 2).sum(), 1e-30))
    print(f"{name}: rel err {rel:.2e}, NMSE {nmse:.2e}")
    assert rel <= tol, f"{name}: relative error {rel:.3e} > {tol:g} (NMSE {nmse:.3e})"


def rand(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


# ----------------------------------------------------------------------------
# Kernels

@pytest.mark.parametrize("M,K,N", [(37, 29, 45), (5, 40, 16), (97, 300, 101)])   # K = 300: 3 chunks of KC
@pytest.mark.parametrize("gelu", [False, True])
def test_linear(rt, M, K, N, gelu):
    rng = np.random.default_rng(M * N)
    x, w, b = rand(rng, M, K), rand(rng, N, K, scale=K ** -0.5), rand(rng, N)
    got = O.linear(rt, rt.to_device(x), O.PackedLinear(rt, w, b), gelu=gelu).get()
    want = ops.linear_forward(x, w, b)
    check(f"linear {M}x{K}x{N} gelu={gelu}", got, ops.gelu_tanh_forward(want) if gelu else want)


def test_linear_half_weights(rt):
    """Half-precision weight storage: exact float32 arithmetic on float16-rounded weights."""
    rng = np.random.default_rng(1)
    x, w, b = rand(rng, 37, 300), rand(rng, 45, 300, scale=300 ** -0.5), rand(rng, 45)
    got = O.linear(rt, rt.to_device(x), O.PackedLinear(rt, w, b, weights="float16"), gelu=True).get()
    want = ops.gelu_tanh_forward(ops.linear_forward(x, w.astype(np.float16).astype(np.float32), b))
    check("linear float16 weights", got, want)


@pytest.mark.parametrize("D", [36, 31, 40])
def test_layernorm_modulate(rt, D):
    rng = np.random.default_rng(D)
    B, T = 3, 7
    x = rand(rng, B * T, D, scale=3.0, shift=2.0)              # a large mean, as residual streams have
    mod = rand(rng, B, 6 * D, scale=0.5)
    out = rt.empty((B * T, D))
    got = O.layernorm_modulate(rt, rt.to_device(x), rt.to_device(mod), 3 * D, 4 * D, T, out).get()
    want = ops.modulate_forward(ops.layernorm_forward(x.reshape(B, T, D)), mod[:, 3 * D:4 * D], mod[:, 4 * D:5 * D])
    check(f"layernorm_modulate D={D}", got, want.reshape(B * T, D))


@pytest.mark.parametrize("B,T,H,Dh", [(2, 37, 3, 12), (1, 9, 2, 8), (2, 20, 1, 5)])
def test_attention(rt, B, T, H, Dh):
    rng = np.random.default_rng(T)
    D = H * Dh
    qkv = rand(rng, B, T, 3 * D, scale=4.0)                    # large logits: the running max matters
    got = O.attention(rt, rt.to_device(qkv), B, T, H, rt.empty((B * T, D))).get()
    q, k, v = qkv.reshape(B, T, 3, H, Dh).transpose(2, 0, 3, 1, 4)
    want = ops.sdpa_forward(q, k, v).transpose(0, 2, 1, 3).reshape(B * T, D)
    check(f"attention B={B} T={T} H={H} Dh={Dh}", got, want)


def test_silu(rt):
    x = rand(np.random.default_rng(0), 101, scale=4.0)
    check("silu", O.silu(rt, rt.to_device(x), rt.empty((101,))).get(), ops.silu_forward(x))


def test_class_embed_add(rt):
    rng = np.random.default_rng(1)
    c, table, y = rand(rng, 3, 37), rand(rng, 8, 37), np.array([7, 0, 3])
    got = O.class_embed_add(rt, rt.to_device(c), rt.to_device(y, np.int32), rt.to_device(table)).get()
    check("class_embed_add", got, c + table[y])


def test_gated_residual(rt):
    rng = np.random.default_rng(2)
    B, T, D = 2, 5, 36
    x, mod, br = rand(rng, B * T, D), rand(rng, B, 6 * D), rand(rng, B * T, D)
    got = O.gated_residual(rt, rt.to_device(x), rt.to_device(mod), 5 * D, rt.to_device(br), T).get()
    want = x.reshape(B, T, D) + mod[:, None, 5 * D:] * br.reshape(B, T, D)
    check("gated_residual", got, want.reshape(B * T, D))


@pytest.mark.parametrize("C,p,G,D", [(3, 2, 3, 20), (1, 3, 2, 7)])
def test_patch_embed(rt, C, p, G, D):
    rng = np.random.default_rng(C * D)
    B, S = 2, G * p
    x, w, b, pos = rand(rng, B, C, S, S), rand(rng, D, C, p, p), rand(rng, D), rand(rng, G * G, D)
    wp = rt.to_device(w.reshape(D, -1).T)                       # (D, C, p, p) -> (C*p*p, D)
    got = O.patch_embed(rt, rt.to_device(x), wp, rt.to_device(b), rt.to_device(pos), p, rt.empty((B * G * G, D)))
    want = ops.patch_embed_forward(x, w, b, p) + pos
    check(f"patch_embed C={C} p={p} D={D}", got.get(), want.reshape(B * G * G, D))


def test_unpatchify(rt):
    rng = np.random.default_rng(3)
    B, G, p, C = 2, 3, 2, 5
    tok = rand(rng, B, G * G, p * p * C)
    got = O.unpatchify(rt, rt.to_device(tok), B, G, p, C, rt.empty((B, C, G * p, G * p))).get()
    np.testing.assert_array_equal(got, ops.unpatchify(tok, p, C))


def test_cfg_combine(rt):
    rng = np.random.default_rng(4)
    out = rand(rng, 6, 5, 3, 3)
    got = O.cfg_combine(rt, rt.to_device(out), 4.0, 3).get()
    cond, uncond = out[:3, :3], out[3:, :3]
    eps = uncond + 4.0 * (cond - uncond)                         # DiT.forward_with_cfg's guidance
    want = np.concatenate([np.concatenate([eps, eps]), out[:, 3:]], axis=1)
    check("cfg_combine", got, want)


@pytest.mark.parametrize("i", [9, 4, 0])
def test_ddim_update(rt, i):
    rng = np.random.default_rng(i)
    diffusion = tl.create_diffusion(10)
    x, model_out = rand(rng, 3, 2, 5, 5), rand(rng, 3, 4, 5, 5)
    shape = x.shape
    x_next, pred, eps = rt.empty(shape), rt.empty(shape), rt.empty(shape)
    O.ddim_update(rt, rt.to_device(x), rt.to_device(model_out), O.ddim_coefficients(diffusion, i), x_next, pred, eps)
    want = sampling.ddim_step(diffusion, model_out, x, i)
    for name, got in (("x_next", x_next), ("pred_xstart", pred), ("eps", eps)):
        check(f"ddim_update i={i} {name}", got.get(), want[name], tol=1e-6)


def test_gate_score(rt):
    rng = np.random.default_rng(5)
    B, T, D = 3, 70, 36                                          # T > the 64 work-items of a group
    z, gates = rand(rng, B, T, D), rand(rng, 4, D, scale=0.02)
    got = O.gate_score(rt, rt.to_device(z.reshape(B * T, D)), rt.to_device(gates), 2, B, T, rt.empty((B,))).get()
    want = 1.0 / (1.0 + np.exp(-(z @ gates[2]).sum(axis=1)))    # LazyDiT.scores
    check("gate_score", got, want)


# ----------------------------------------------------------------------------
# Each kernel constant on inputs where it matters, against the float64 path
#
# The checks above compare with NumPy in float32 at 1e-4, which a wrong constant can pass
# (LayerNorm eps 1e-5 in the kernel did).  Here each input is chosen so that the constant
# moves the result by far more than float32 rounding, the reference is the float64 path,
# and the tolerance sits between the two: the kernels measured <= 1.8e-7 (PoCL on this
# machine's CPU), the tolerances are 5-13x what each measured, and each test first asserts
# that the named wrong constants would move the float64 result by more than 2x its tolerance.

def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("D", [36, 31])
def test_layernorm_eps_on_low_variance_rows(rt, D):
    """Row standard deviations 1e-4..1e-2 (variance 1e-8..1e-4 against eps 1e-6) and one of 1."""
    rng = np.random.default_rng(D)
    B, T = 3, 6
    std = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1.0])[None, :, None]
    x = (rng.standard_normal((B, T, D)) * std).astype(np.float32)     # mean ~0: float32 keeps the deviations
    mod = rand(rng, B, 6 * D, scale=0.5)
    out = rt.empty((B * T, D))
    got = O.layernorm_modulate(rt, rt.to_device(x.reshape(B * T, D)), rt.to_device(mod), 3 * D, 4 * D, T, out).get()
    x64, mod64 = _f64(x, mod)
    ref = lambda eps: ops.modulate_forward(ops.layernorm_forward(x64, eps=eps), mod64[:, 3 * D:4 * D],  # noqa: E731
                                           mod64[:, 4 * D:5 * D]).reshape(B * T, D)
    want, tol = ref(1e-6), 1e-6                                       # DiT's eps; measured 7.7e-8
    assert _rel(ref(1e-5), want) > 0.3 and _rel(ref(1.01e-6), want) > 2 * tol   # eps 1e-5: 0.40; 1% off: 2e-3
    check(f"layernorm eps, low-variance rows D={D}", got, want, tol=tol)


def test_gelu_constants(rt):
    """tanh-GELU 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) on x in [-3, 3], where the cubic
    term and the tanh are far from saturating; an identity weight makes the GEMM exact."""
    M, K = 37, 45
    x = np.random.default_rng(1).permutation(np.linspace(-3, 3, M * K)).astype(np.float32).reshape(M, K)
    layer = O.PackedLinear(rt, np.eye(K, dtype=np.float32), np.zeros(K, np.float32))
    assert np.array_equal(O.linear(rt, rt.to_device(x), layer).get(), x)
    got = O.linear(rt, rt.to_device(x), layer, gelu=True).get()
    x64, = _f64(x)
    gelu = lambda k, c: 0.5 * x64 * (1 + np.tanh(k * (x64 + c * x64 ** 3)))   # noqa: E731
    want, tol = ops.gelu_tanh_forward(x64), 5e-7                      # measured 7.4e-8
    assert _rel(gelu(math.sqrt(2 / math.pi), 0.044715), want) < 1e-15  # the float64 path is that formula
    assert _rel(gelu(math.sqrt(2 / math.pi), 0.0447), want) > 2 * tol  # 2.9e-6
    assert _rel(gelu(0.7979, 0.044715), want) > 2 * tol                 # 1.6e-6
    check("gelu constants", got, want, tol=tol)


@pytest.mark.parametrize("B,T,H,Dh", [(2, 37, 3, 12), (1, 9, 2, 8)])
def test_attention_softmax_scale(rt, B, T, H, Dh):
    """Unit-variance q, k: logits q.k / sqrt(Dh) of order 1, where softmax is neither one-hot nor flat."""
    D = H * Dh
    qkv = rand(np.random.default_rng(T), B, T, 3 * D)
    got = O.attention(rt, rt.to_device(qkv), B, T, H, rt.empty((B * T, D))).get()
    q, k, v = _f64(*qkv.reshape(B, T, 3, H, Dh).transpose(2, 0, 3, 1, 4))
    ref = lambda c: ops.sdpa_forward(q * c, k, v).transpose(0, 2, 1, 3).reshape(B * T, D)  # noqa: E731
    want, tol = ref(1.0), 1e-6                                        # scale 1 / sqrt(Dh); measured 1.8e-7
    for wrong in (math.sqrt(Dh / D), 1 / math.sqrt(Dh), math.sqrt(Dh), 1.01):   # 1/sqrt(D), 1/Dh, none, 1% off
        assert _rel(ref(wrong), want) > 2 * tol
    check(f"attention scale B={B} T={T} H={H} Dh={Dh}", got, want, tol=tol)


def test_gather_and_skip_select(rt):
    rng = np.random.default_rng(6)
    B, n = 5, 3 * 12
    src, cache = rand(rng, B, n), rand(rng, B, n)
    idx = np.array([4, 1], np.int32)
    got = O.gather_samples(rt, rt.to_device(src), rt.to_device(idx, np.int32), n, rt.empty((2, n))).get()
    np.testing.assert_array_equal(got, src[idx])
    slot = np.array([-1, 1, -1, -1, 0], np.int32)               # samples 4 and 1 computed, in that order
    got = O.skip_select(rt, rt.to_device(cache), rt.to_device(got), rt.to_device(slot, np.int32), n).get()
    want = cache.copy()
    want[idx] = src[idx]
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------
# The model

# T = 25 tokens, D = 36 (3 heads of 12), 3 channels: no size is a multiple of a tile.
CFG = tl.DiTConfig(input_size=10, patch_size=2, in_channels=3, hidden_size=36, depth=2, num_heads=3, num_classes=7)


@pytest.fixture(scope="module")
def models(rt):
    host = tl.DiT.from_config(CFG, seed=0, scheme="random", dtype="float32")
    return host, O.OpenCLDiT.from_model(host, device=rt.device)


def test_forward(models):
    host, dev = models
    rng = np.random.default_rng(7)
    x = rand(rng, 4, 3, 10, 10)
    t, y = np.array([0, 999, 500, 17]), np.array([0, 7, 6, 1])  # the null class included
    check("forward", dev(x, t, y), host(x, t, y))


def test_forward_half_weights(models):
    host, _ = models
    linear = lambda k: k.endswith(".weight") and not k.startswith(("x_embedder", "y_embedder"))
    half = {k: v.astype(np.float16).astype(np.float32) if linear(k) else v for k, v in host.params.items()}
    dev = O.OpenCLDiT.from_model(host, weights="float16")
    rng = np.random.default_rng(7)
    x, t, y = rand(rng, 2, 3, 10, 10), np.array([3, 900]), np.array([4, 7])
    check("forward float16 weights", dev(x, t, y), tl.DiT(CFG, half, dtype="float32")(x, t, y))


@pytest.mark.parametrize("guide_channels", [3, None])
def test_forward_with_cfg(models, guide_channels):
    host, dev = models
    rng = np.random.default_rng(8)
    x = rand(rng, 4, 3, 10, 10)
    t, y = np.array([250] * 4), np.array([2, 5, 7, 7])
    check(f"forward_with_cfg g={guide_channels}", dev.forward_with_cfg(x, t, y, 4.0, guide_channels),
          host.forward_with_cfg(x, t, y, 4.0, guide_channels))


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_ddim_sample(models, cfg_scale):
    host, dev = models
    noise, labels = sampling.make_noise(host, batch=3, seed=9), np.array([1, 6, 3])
    trace = {"opencl": [], "numpy": []}
    got = tl.ddim_sample(dev, noise, labels, steps=5, cfg_scale=cfg_scale,
                         callback=lambda i, d: trace["opencl"].append(d))
    want = sampling.ddim_sample(host, noise, labels, steps=5, cfg_scale=cfg_scale,
                                callback=lambda i, d: trace["numpy"].append(d))
    diffusion = tl.create_diffusion(5)
    for i, (a, b) in zip(range(4, -1, -1), zip(trace["opencl"], trace["numpy"])):
        assert (a["step"], a["t"]) == (b["step"], b["t"])
        for key in ("x", "model_output", "pred_xstart", "x_next"):
            check(f"ddim cfg={cfg_scale} step {a['step']} {key}", a[key], b[key])
        # eps = (c1 x - x0) / c2 cancels: float32 leaves it a few ulps of c1 x over c2 of noise
        # (~1e-3 relative at the last step, where c2 ~ 0.01), in the reference as much as here.
        c1, c2, _, _ = O.ddim_coefficients(diffusion, i)
        noise_floor = 8 * 2.0 ** -24 * c1 * np.abs(b["x"]).max() / (c2 * np.abs(b["eps"]).max())
        check(f"ddim cfg={cfg_scale} step {a['step']} eps", a["eps"], b["eps"], tol=TOL + noise_floor)
    check(f"ddim cfg={cfg_scale} final", got, want)


def test_lazy_sample_forced_decisions(models):
    """Per-row decisions (both halves of the guided batch decide apart) hit every path:
    all rows compute, none, and a gathered subset."""
    host, dev = models
    noise, labels = sampling.make_noise(host, batch=3, seed=10), np.array([0, 4, 6])
    keep = np.random.default_rng(11).random((6, CFG.depth, 2, 6)) < 0.5
    keep[:, 0, 0], keep[:, 1, 1] = True, False                   # all compute / none compute
    stats = {"opencl": lazy.LazyStats(), "numpy": lazy.LazyStats()}
    got = tl.ddim_sample(dev, noise, labels, steps=6, cfg_scale=4.0, decisions=keep, lazy_stats=stats["opencl"])
    want = tl.ddim_sample(host, noise, labels, steps=6, cfg_scale=4.0, decisions=keep, lazy_stats=stats["numpy"])
    np.testing.assert_array_equal(stats["opencl"].skips, stats["numpy"].skips)
    assert stats["opencl"].lazy_ratio > 0.3
    check("lazy forced final", got, want)


def test_lazy_sample_gates(models):
    host, dev = models
    noise, labels = sampling.make_noise(host, batch=2, seed=12), np.array([5, 2])
    gates = lazy.LazyGates.zeros(host, 6)
    rng = np.random.default_rng(13)
    gates.attn[:], gates.mlp[:] = rand(rng, *gates.attn.shape, scale=0.05), rand(rng, *gates.mlp.shape, scale=0.05)
    stats = {"opencl": lazy.LazyStats(), "numpy": lazy.LazyStats()}
    got = tl.ddim_sample(dev, noise, labels, steps=6, cfg_scale=1.5, gates=gates, lazy_stats=stats["opencl"])
    want = tl.ddim_sample(host, noise, labels, steps=6, cfg_scale=1.5, gates=gates, lazy_stats=stats["numpy"])
    np.testing.assert_array_equal(stats["opencl"].skips, stats["numpy"].skips)   # identical gate decisions
    assert 0 < stats["opencl"].lazy_ratio < 1
    check("lazy gate scores (summed per module)", stats["opencl"].scores, stats["numpy"].scores)
    check("lazy gates final", got, want)


def test_bad_inputs(models):
    _, dev = models
    with pytest.raises(ValueError, match="x has shape"):
        dev(np.zeros((2, 4, 10, 10), np.float32), [0, 0], [0, 0])
    with pytest.raises(ValueError, match="class labels"):
        dev(np.zeros((1, 3, 10, 10), np.float32), [0], [8])
    with pytest.raises(ValueError, match="even batch"):
        dev.forward_with_cfg(np.zeros((3, 3, 10, 10), np.float32), [0] * 3, [0] * 3, 2.0)
    with pytest.raises(ValueError, match="noise has shape"):
        tl.ddim_sample(dev, np.zeros((2, 3, 10, 10), np.float32), [1], steps=2)


# ----------------------------------------------------------------------------
# Devices, loader and messages

def test_device_selection(rt, monkeypatch):
    p, d, pname, dname = O.list_devices()[0]
    assert O.select_device(f"{p}:{d}").int_ptr == O.select_device(dname[:6].lower()).int_ptr
    monkeypatch.setenv(O.DEVICE_ENV, f"{p}:{d}")
    assert O.select_device().name.strip() == dname
    with pytest.raises(ValueError, match="no OpenCL device matches"):
        O.select_device("no-such-device-xyz")
    with pytest.raises(ValueError, match="does not exist"):
        O.select_device("99:0")


def test_build_failure_shows_log(rt, tmp_path, monkeypatch):
    (tmp_path / "common.cl").write_text((O.KERNEL_DIR / "common.cl").read_text())
    (tmp_path / "broken.cl").write_text("__kernel void k(__global float* x)\n{\n    x[0] = undefined_name;\n}\n")
    monkeypatch.setattr(O, "KERNEL_DIR", tmp_path)
    with pytest.raises(RuntimeError, match=r"(?s)build of .*broken\.cl failed.*build log.*broken\.cl:3"):
        O.Runtime(rt.device).kernel("broken", "k")


def test_missing_pyopencl_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyopencl", None)          # import pyopencl -> ImportError
    with pytest.raises(RuntimeError, match="pip install pyopencl pocl-binary-distribution"):
        O.list_devices()


def test_no_platform_message(monkeypatch):
    cl = pytest.importorskip("pyopencl")
    monkeypatch.setattr(cl, "get_platforms", lambda: [])
    with pytest.raises(RuntimeError, match="no OpenCL platform.*pocl-binary-distribution"):
        O.list_devices()
