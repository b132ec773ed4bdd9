"""Large-DiT (DiT_Llama): parity with a PyTorch stand-in of the official numerics, gradients,
the LLaMA ops, lazy sampling and gate training on the second family."""
import numpy as np
import pytest
import torch

import tinylazy as tl
from tinylazy import lazy_train, llama_ops
from tinylazy.large_dit import (LARGE_DIT_CONFIGS, LargeDiT, LargeDiTConfig, ffn_hidden_size, get_large_config,
                                init_params)
from tinylazy.lazy import LazyGates, LazyStats, alternate_decisions, full_step_macs

from conftest import rel_err
from torch_large_dit import TorchLargeDiT, official_freqs_cis, pinned_freqs_cis

# cond_size 32 < hidden 48: the min(D, 1024) split of the official widths, at test size.
SMALL = LargeDiTConfig(input_size=8, hidden_size=48, depth=2, num_heads=4, cond_size=32, num_classes=10,
                       ffn_hidden=96)
QKNORM = SMALL.replace(qk_norm=True, qk_norm_groups=2)          # as if trained on two model-parallel ranks
CONFIGS = {"plain": SMALL, "qknorm": QKNORM}
QKNORM_SHAPE = (QKNORM.in_channels, QKNORM.input_size, QKNORM.input_size)


def inputs(B=3, seed=0, cfg=SMALL):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size))
    return x, np.array([0, 517, 999][:B]), np.array([1, 7, cfg.num_classes][:B])    # the null class too


def torch_out(tm, x, t, y, dtype):
    with torch.no_grad():
        return tm(torch.from_numpy(x).to(dtype), torch.from_numpy(t), torch.from_numpy(y)).numpy()


# ----------------------------------------------------------------------------
# Configuration

def test_official_registry_widths():
    c3, c7 = get_large_config("3B"), get_large_config("DiT_Llama_7B_patch2")
    assert (c3.hidden_size, c3.depth, c3.num_heads, c3.ffn_hidden, c3.cond_size) == (3072, 32, 32, 8192, 1024)
    assert (c7.hidden_size, c7.ffn_hidden, c7.head_dim) == (4096, 11008, 128)        # int(2*16384/3) -> 11008
    assert LARGE_DIT_CONFIGS["DiT_Llama_600M_patch2"].ffn_hidden == 4096
    assert ffn_hidden_size(4096, 256, 1.3) == 14336
    assert LargeDiT.from_config(SMALL.replace(depth=1)).num_params() == sum(
        a.size for a in init_params(SMALL.replace(depth=1)).values())
    with pytest.raises(ValueError, match="even integer"):
        SMALL.replace(num_heads=16)                                                   # head dim 3
    with pytest.raises(KeyError):
        get_large_config("1B")


# ----------------------------------------------------------------------------
# Parity with the official numerics

@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_forward_matches_official(name, dtype, tol):
    cfg = CONFIGS[name]
    P = init_params(cfg, seed=1, scheme="random")
    x, t, y = inputs(cfg=cfg)
    out = LargeDiT(cfg, P, dtype=dtype)(x, t, y)
    assert out.dtype == dtype
    tdt = getattr(torch, dtype)
    ref = TorchLargeDiT.from_params(cfg, P, dtype=tdt, pinned_tables=True)     # compared at 1e-12: pinned tables
    assert rel_err(out, torch_out(ref, x, t, y, tdt)) <= tol


def test_forward_with_cfg_matches_official():
    P = init_params(QKNORM, seed=3, scheme="random")
    x, t, y = inputs(B=2, cfg=QKNORM)
    t, y = np.array([400, 400]), np.array([3, QKNORM.num_classes])
    out = LargeDiT(QKNORM, P, dtype="float64").forward_with_cfg(x, t, y, 4.0)
    with torch.no_grad():
        ref = TorchLargeDiT.from_params(QKNORM, P, pinned_tables=True).forward_with_cfg(torch.from_numpy(x), torch.from_numpy(t),
                                                                    torch.from_numpy(y), 4.0).numpy()
    assert rel_err(out, ref) <= 1e-12


def test_official_float32_tables_and_rotation():
    """What tinylazy's definitions leave out: PyTorch's own float32 rotary table (pow, cos, sin
    not correctly rounded) and timestep features, and the official float32 rotation in float64."""
    cfg = QKNORM
    cos, sin = llama_ops.rope_table(cfg.head_dim, 4096)
    pinned = pinned_freqs_cis(cfg.head_dim, 4096)                  # written independently of tinylazy
    assert np.array_equal(pinned.real.numpy(), cos) and np.array_equal(pinned.imag.numpy(), sin)
    official = official_freqs_cis(cfg.head_dim, 4096)
    assert np.abs(official.real.numpy() - cos).max() <= 2e-6 and np.abs(official.imag.numpy() - sin).max() <= 2e-6
    P = init_params(cfg, seed=4, scheme="random")
    x, t, y = inputs(cfg=cfg)
    out32 = LargeDiT(cfg, P, dtype="float32")(x, t, y)
    own = torch_out(TorchLargeDiT.from_params(cfg, P, dtype=torch.float32), x, t, y, torch.float32)
    assert rel_err(out32, own) <= 1e-4                   # measured ~1e-6 (docs/large-dit.md)
    out64 = LargeDiT(cfg, P, dtype="float64")(x, t, y)
    cast = torch_out(TorchLargeDiT.from_params(cfg, P, pinned_tables=True, rope_float32=True), x, t, y, torch.float64)
    assert 0 < rel_err(out64, cast) <= 1e-5              # q, k rounded to float32 for the rotation only


# ----------------------------------------------------------------------------
# Gradients: the whole model against autograd, the ops by central differences

def test_backward_matches_autograd():
    cfg = QKNORM
    P = init_params(cfg, seed=5, scheme="random")
    x, t, y = inputs(cfg=cfg)
    model = LargeDiT(cfg, P, dtype="float64")
    out, cache = model.forward_train(x, t, y)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    grads, dx = model.backward(dout, cache)
    tm = TorchLargeDiT.from_params(cfg, P, pinned_tables=True)                   # compared at 1e-12: pinned tables
    xt = torch.from_numpy(x).requires_grad_()
    tm(xt, torch.from_numpy(t), torch.from_numpy(y)).backward(torch.from_numpy(dout))
    assert rel_err(dx, xt.grad.numpy()) <= 1e-12
    names = {k for k, _ in tm.named_parameters()}
    assert set(grads) == names
    assert max(rel_err(grads[k], p.grad.numpy()) for k, p in tm.named_parameters()) <= 1e-11


def _check_grad(f, inputs, douts, analytic, eps=1e-6):
    """Central differences of sum(f(*inputs) * douts) along a random direction of each input."""
    rng = np.random.default_rng(0)
    for i, a in enumerate(inputs):
        d = rng.standard_normal(a.shape)
        plus = [b + eps * d if j == i else b for j, b in enumerate(inputs)]
        minus = [b - eps * d if j == i else b for j, b in enumerate(inputs)]
        num = sum(np.sum(o * g) for o, g in zip(f(*plus), douts)) - sum(np.sum(o * g) for o, g in zip(f(*minus), douts))
        assert abs(num / (2 * eps) - np.sum(analytic[i] * d)) <= 1e-7 * max(1.0, abs(num / (2 * eps)))


def test_llama_ops_backward_by_central_differences():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 5, 12)), 1 + 0.2 * rng.standard_normal(12), rng.standard_normal(12)
    dy = rng.standard_normal(x.shape)
    y, xhat, rstd = llama_ops.rmsnorm_forward(x, w, return_cache=True)
    _check_grad(lambda x, w: [llama_ops.rmsnorm_forward(x, w)], [x, w], [dy], llama_ops.rmsnorm_backward(dy, xhat, rstd, w))
    for groups in (1, 3):
        _, xhat, rstd = llama_ops.layernorm_affine_forward(x, w, b, groups, return_cache=True)
        _check_grad(lambda x, w, b: [llama_ops.layernorm_affine_forward(x, w, b, groups)], [x, w, b], [dy],
                    llama_ops.layernorm_affine_backward(dy, xhat, rstd, w))
    q = rng.standard_normal((2, 5, 3, 4))
    cos, sin = (a.astype(np.float64) for a in llama_ops.rope_table(4, 5))
    dq = rng.standard_normal(q.shape)
    _check_grad(lambda q: [llama_ops.rope_forward(q, cos, sin)], [q], [dq], [llama_ops.rope_backward(dq, cos, sin)])
    h1, h3, dg = (rng.standard_normal((4, 7)) for _ in range(3))
    _check_grad(lambda h1, h3: [llama_ops.swiglu_forward(h1, h3)], [h1, h3], [dg],
                llama_ops.swiglu_backward(dg, h1, h3))


def test_rope_is_the_official_complex_product():
    q = np.random.default_rng(4).standard_normal((1, 6, 2, 8))
    cos, sin = llama_ops.rope_table(8, 6)
    z = (q[..., 0::2] + 1j * q[..., 1::2]) * (cos + 1j * sin)[None, :, None, :]
    want = np.stack([z.real, z.imag], axis=-1).reshape(q.shape)
    np.testing.assert_allclose(llama_ops.rope_forward(q, cos.astype(np.float64), sin.astype(np.float64)), want,
                               rtol=0, atol=1e-15)
    assert cos[0].tolist() == [1.0] * 4 and sin[0].tolist() == [0.0] * 4           # position 0 is not rotated


# ----------------------------------------------------------------------------
# LazyDiT on the second family

@pytest.fixture(scope="module")
def model64():
    return LargeDiT(QKNORM, init_params(QKNORM, seed=6, scheme="random"), dtype="float64")


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_lazy_all_compute_is_the_plain_run_bit_for_bit(model64, cfg_scale):
    steps = 4
    noise, y = tl.make_noise(model64, 3, seed=2), np.array([0, 5, 9])
    plain = tl.ddim_sample(model64, noise, y, steps, cfg_scale)
    gated = tl.ddim_sample(model64, noise, y, steps, cfg_scale, gates=LazyGates.zeros(model64, steps))
    forced = tl.ddim_sample(model64, noise, y, steps, cfg_scale, decisions=np.ones((steps, QKNORM.depth, 2), bool))
    np.testing.assert_array_equal(gated, plain)
    np.testing.assert_array_equal(forced, plain)


def test_lazy_skipping_reuses_modules(model64):
    steps = 4
    noise, y = tl.make_noise(model64, 2, seed=3), np.array([1, 2])
    stats = LazyStats()
    lazy = tl.ddim_sample(model64, noise, y, steps, decisions=alternate_decisions(steps, QKNORM.depth),
                          lazy_stats=stats)
    assert stats.lazy_ratio == 0.5 and not np.array_equal(lazy, tl.ddim_sample(model64, noise, y, steps))
    spent, full = stats.macs()
    m = QKNORM.module_macs()
    assert full == 4 * 2 * full_step_macs(QKNORM) and full - spent == 2 * 2 * QKNORM.depth * (m["attn"] + m["mlp"])
    assert m["mlp"] == 3 * QKNORM.num_tokens * QKNORM.hidden_size * QKNORM.ffn_hidden          # SwiGLU: 3 GEMMs


def test_gates_are_named_after_the_layers(model64, tmp_path):
    g = LazyGates.zeros(model64, 3)
    g.attn[:] = np.random.default_rng(0).normal(0, 0.01, g.attn.shape)
    assert "layers.1.mlp_lazy_learning.2.weight" in g.state_dict()
    tl.save_gates(g, tmp_path / "g.safetensors")
    back = tl.load_gates(tmp_path / "g.safetensors", model64, steps=3)
    np.testing.assert_array_equal(back.attn, g.attn.astype(np.float32))
    dit = tl.DiT.from_config(tl.DiTConfig(input_size=8, hidden_size=48, depth=2, num_heads=4, num_classes=10))
    dit_gates = LazyGates.zeros(dit, 3)
    tl.save_gates(dit_gates, tmp_path / "d.safetensors")
    with pytest.raises(tl.lazy.GatesError, match="blocks are blocks"):
        tl.load_gates(tmp_path / "d.safetensors", model64)


def test_gate_training_gradient_by_central_differences(model64):
    """lazy_train's soft backward through the Large-DiT pieces (RMSNorm, q/k norm, rotary, SwiGLU)."""
    diffusion = tl.create_diffusion(4)
    rng = np.random.default_rng(0)
    x0, y = rng.standard_normal((2, 4, 8, 8)), np.array([1, QKNORM.num_classes])
    x_next, caches = lazy_train.teacher_step(model64, diffusion, x0, y, 3, rng.standard_normal(x0.shape))
    t = np.full(2, diffusion.timestep_map[2])
    target = model64(x_next, t, y)
    w = {k: rng.normal(0, 0.01, (QKNORM.depth, QKNORM.hidden_size)) for k in ("attn", "mlp")}
    loss = lambda w: lazy_train.lazy_loss(model64, x_next, t, y, caches, w, 1e-2, 1e-2, target, backward=False)["loss"]
    grads = lazy_train.lazy_loss(model64, x_next, t, y, caches, w, 1e-2, 1e-2, target)["grads"]
    for kind in ("attn", "mlp"):
        d = rng.standard_normal(w[kind].shape)
        plus = dict(w, **{kind: w[kind] + 1e-6 * d})
        minus = dict(w, **{kind: w[kind] - 1e-6 * d})
        num = (loss(plus) - loss(minus)) / 2e-6
        assert abs(num - np.sum(grads[kind] * d)) <= 1e-7 * abs(num)


def test_gate_trainer_runs_on_large_dit():
    cfg = SMALL.replace(num_classes=3)
    model = LargeDiT(cfg, init_params(cfg, seed=7, scheme="random"), dtype="float32")
    rng = np.random.default_rng(1)
    images, labels = rng.standard_normal((8, 4, 8, 8)).astype(np.float32), np.arange(8) % 3
    trainer = lazy_train.GateTrainer(model, images, labels, steps=4, batch=4, calib_every=2, calib_samples=2)
    before = trainer.gates.attn.copy()
    losses = [trainer.step()["loss"] for _ in range(2)]
    assert all(np.isfinite(losses)) and not np.array_equal(trainer.gates.attn, before)
    assert trainer.gates.blocks == "layers" and trainer.measured is not None


def test_recorded_names_and_ops(model64):
    from tinylazy.golden import trace_forward
    x, t, y = inputs(B=2, cfg=QKNORM)
    trace = trace_forward(model64, x, t[:2], y[:2])
    block = [n[len("block.01/"):] for n in trace.names if n.startswith("block.01/")]
    assert block[6:] == ["attn/norm", "attn/z", "attn/q", "attn/k", "attn/v", "attn/q_rope", "attn/k_rope",
                         "attn/o", "attn/out", "attn/residual", "mlp/norm", "mlp/z", "mlp/hidden", "mlp/up",
                         "mlp/act", "mlp/out", "mlp/residual"]
    assert "RMS" not in trace.meta["ops"]["final/norm"] and "sqrt(mean(x^2)" in trace.meta["ops"]["attn/norm"]
    assert "no position table" in trace.meta["ops"]["embed/tokens"]
    w = model64.params["layers.1.ffn_norm.weight"]
    np.testing.assert_array_equal(trace["block.01/mlp/norm"],
                                  llama_ops.rmsnorm_forward(trace["block.01/attn/residual"], w))


def test_ddpm_and_ddim_sampling_agree_across_dtypes():
    """The one sampler loop runs the second family: float32 follows the float64 audit run."""
    P = init_params(QKNORM, seed=8, scheme="random")
    m64, m32 = LargeDiT(QKNORM, P, dtype="float64"), LargeDiT(QKNORM, P, dtype="float32")
    noise, y = tl.make_noise(QKNORM_SHAPE, 2, seed=4), np.array([2, 7])
    for sample in (lambda m: tl.ddpm_sample(m, noise, y, 5, cfg_scale=2.0, step_noise=9),
                   lambda m: tl.ddim_sample(m, noise, y, 5, cfg_scale=2.0)):
        a, b = sample(m64), sample(m32)
        assert a.dtype == np.float64 and b.dtype == np.float32 and np.isfinite(a).all()
        assert rel_err(b, a) <= 1e-4
