"""Every op's backward against float64 central finite differences.

One check per differentiable input: the scalar L = sum(op(inputs) * R) for a fixed
random R, a random probe direction V, and the directional derivative <dL/dinput, V>
from the backward against (L(input + eps V) - L(input - eps V)) / (2 eps).
"""
import numpy as np
import pytest

from tinylazy import ops, parallel

EPS = 1e-6
RTOL = 1e-6


def check_grads(name, forward, backward, inputs, rng):
    """forward(*inputs) -> y; backward(dy) -> one gradient per input (None: not differentiable)."""
    saved = [a.copy() for a in inputs]
    r = rng.standard_normal(forward(*inputs).shape)
    grads = backward(r)
    for a, s in zip(inputs, saved):
        assert np.array_equal(a, s), f"{name}: the backward modified its cache"
    assert len(grads) == len(inputs)
    checked = 0
    for i, g in enumerate(grads):
        if g is None:
            continue
        assert g.shape == inputs[i].shape, f"{name}: gradient {i} has shape {g.shape}, input {inputs[i].shape}"
        v = rng.standard_normal(inputs[i].shape)

        def loss(step):
            args = list(inputs)
            args[i] = inputs[i] + step * v
            return float(np.sum(forward(*args) * r))

        numeric = (loss(EPS) - loss(-EPS)) / (2 * EPS)
        analytic = float(np.sum(g * v))
        rel = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-30)
        assert rel <= RTOL, f"{name}: input {i}: analytic {analytic!r} vs central difference {numeric!r} (rel {rel:.2e})"
        checked += 1
    assert checked, f"{name}: nothing checked"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear(rng):
    x, w, b = rng.standard_normal((2, 5, 7)), rng.standard_normal((3, 7)), rng.standard_normal(3)

    def backward(dy):
        return ops.linear_backward(dy, x, w)
    check_grads("linear", ops.linear_forward, backward, [x, w, b], rng)


def test_linear_skips_unneeded_grads(rng):
    x, w = rng.standard_normal((2, 5, 7)), rng.standard_normal((3, 7))
    dy = rng.standard_normal((2, 5, 3))
    dx, dw, db = ops.linear_backward(dy, x, w)
    dx2, dw2, db2 = ops.linear_backward(dy, None, w, param_grads=False)
    assert dw2 is None and db2 is None and np.array_equal(dx, dx2)
    dx3, dw3, db3 = ops.linear_backward(dy, x, w, input_grad=False)
    assert dx3 is None and np.array_equal(dw, dw3) and np.array_equal(db, db3)


def test_silu(rng):
    x = 3 * rng.standard_normal((4, 6))
    check_grads("silu", ops.silu_forward, lambda dy: (ops.silu_backward(dy, x),), [x], rng)


def test_gelu_tanh(rng):
    x = 3 * rng.standard_normal((4, 6, 5))
    y, s = ops.gelu_tanh_forward(x, return_gate=True)
    assert np.array_equal(y, ops.gelu_tanh_forward(x))
    check_grads("gelu_tanh", ops.gelu_tanh_forward, lambda dy: (ops.gelu_tanh_backward(dy, x),), [x], rng)
    check_grads("gelu_tanh, forward's gate", ops.gelu_tanh_forward,
                lambda dy: (ops.gelu_tanh_backward(dy, x, s),), [x], rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_tanh_bits(rng, dtype):
    """y = ((1 + tanh u) / 2) x has the bits of the textbook (1 + tanh u) x / 2 (halving is
    exact), and the forward's tanh gate equals the backward's exp form to rounding."""
    x = np.concatenate([4 * rng.standard_normal(4000), [-1e4, -60.0, -1e-3, 0.0, 1e-30, 60.0, 1e4]]).astype(dtype)
    with np.errstate(over="ignore"):
        u = ((x * x) * (ops.GELU_C * x) + x) * ops.GELU_K            # the kernel's order of operations
        y, s = ops.gelu_tanh_forward(x, return_gate=True)
        np.testing.assert_array_equal(y, ((np.tanh(u) + 1) * x) * 0.5)
        np.testing.assert_allclose(s, ops.gelu_tanh_gate(x), rtol=4 * np.finfo(dtype).eps, atol=np.finfo(dtype).eps)


def test_gelu_tanh_gate(rng):
    """s = (1 + tanh(u)) / 2 in the exp form, finite and exact at the extremes."""
    x = np.concatenate([3 * rng.standard_normal(50), [-1e4, -60.0, 0.0, 60.0, 1e4]])
    u = ops.GELU_K * (x + ops.GELU_C * x ** 3)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = ops.gelu_tanh_gate(x)
        s32 = ops.gelu_tanh_gate(x.astype(np.float32))
    np.testing.assert_allclose(s, (1 + np.tanh(u)) / 2, rtol=1e-14, atol=1e-15)   # 1 + tanh cancels near 0
    np.testing.assert_allclose(x * s, ops.gelu_tanh_forward(x), rtol=1e-14, atol=1e-13)
    assert s32.dtype == np.float32 and s[-5] == 0 and s[-1] == 1
    np.testing.assert_array_equal(ops.gelu_tanh_backward(x, x, s), ops.gelu_tanh_backward(x, x))


def test_layernorm(rng):
    x = 2 + 3 * rng.standard_normal((2, 5, 8))
    xhat, rstd = ops.layernorm_forward(x, return_rstd=True)
    assert np.array_equal(xhat, ops.layernorm_forward(x))
    check_grads("layernorm", ops.layernorm_forward, lambda dy: (ops.layernorm_backward(dy, xhat, rstd),), [x], rng)


def test_modulate(rng):
    x, shift, scale = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    check_grads("modulate", ops.modulate_forward, lambda dy: ops.modulate_backward(dy, x, scale),
                [x, shift, scale], rng)
    dx, dshift, dscale = ops.modulate_backward(x, x, scale, mod_grads=False)
    assert dshift is None and dscale is None and np.array_equal(dx, ops.modulate_backward(x, x, scale)[0])


def test_gated_residual(rng):
    x, gate, branch = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 5, 4))
    np.testing.assert_array_equal(ops.gated_residual_forward(x, gate, branch), x + gate[:, None, :] * branch)
    check_grads("gated_residual", ops.gated_residual_forward,
                lambda dy: (dy, *ops.gated_residual_backward(dy, gate, branch)[::-1]), [x, gate, branch], rng)
    dbranch, dgate = ops.gated_residual_backward(x, gate, branch, gate_grad=False)
    assert dgate is None and np.array_equal(dbranch, ops.gated_residual_backward(x, gate, branch)[0])


def test_softmax(rng):
    s = 4 * rng.standard_normal((2, 3, 7))
    p, lse = ops.softmax_forward(s, return_lse=True)
    assert np.array_equal(p, ops.softmax_forward(s))
    np.testing.assert_allclose(np.exp(s - lse), p, rtol=1e-13)
    check_grads("softmax", ops.softmax_forward, lambda dy: (ops.softmax_backward(dy, p),), [s], rng)


def test_sdpa(rng):
    q, k, v = (rng.standard_normal((2, 3, 6, 4)) for _ in range(3))
    out, lse = ops.sdpa_forward(q, k, v, return_lse=True)
    assert np.array_equal(out, ops.sdpa_forward(q, k, v))
    check_grads("sdpa", ops.sdpa_forward, lambda dy: ops.sdpa_backward(dy, q, k, v, out, lse), [q, k, v], rng)


def test_patchify_backward_is_its_inverse(rng):
    x = rng.standard_normal((2, 3, 8, 4))
    assert np.array_equal(ops.patchify_backward(ops.patchify(x, 2), 2, x.shape), x)


def test_patch_embed(rng):
    p = 2
    x, w, b = rng.standard_normal((2, 3, 6, 4)), rng.standard_normal((5, 3, p, p)), rng.standard_normal(5)

    def forward(x, w, b):
        return ops.patch_embed_forward(x, w, b, p)
    check_grads("patch_embed", forward, lambda dy: ops.patch_embed_backward(dy, x, w, p), [x, w, b], rng)
    dx, dw, db = ops.patch_embed_backward(forward(x, w, b), x, w, p, param_grads=False)
    assert dw is None and db is None and dx.shape == x.shape


def test_unpatchify(rng):
    p, c = 2, 3
    h = rng.standard_normal((2, 9, p * p * c))

    def forward(h):
        return ops.unpatchify(h, p, c)
    check_grads("unpatchify", forward, lambda dy: (ops.unpatchify_backward(dy, p),), [h], rng)


def test_embedding_repeated_ids(rng):
    table = rng.standard_normal((5, 4))
    ids = np.array([3, 1, 3, 4, 3])                     # a repeated id sums its rows

    def forward(table):
        return ops.embedding_forward(table, ids)
    check_grads("embedding", forward, lambda dy: (ops.embedding_backward(dy, ids, 5),), [table], rng)
    dy = rng.standard_normal((5, 4))
    dtable = ops.embedding_backward(dy, ids, 5)
    np.testing.assert_array_equal(dtable[3], dy[0] + dy[2] + dy[4])
    np.testing.assert_array_equal(dtable[[0, 2]], 0)


@pytest.mark.parametrize("op", ["linear", "silu", "gelu_tanh", "layernorm", "modulate", "sdpa", "patch_embed"])
def test_float32_stays_float32(op, rng):
    """No backward promotes float32 to float64 (that would double memory and halve GEMM speed)."""
    f = np.float32
    x = rng.standard_normal((2, 4, 8)).astype(f)
    if op == "linear":
        grads = ops.linear_backward(x, x, rng.standard_normal((8, 8)).astype(f))
    elif op == "silu":
        grads = (ops.silu_backward(x, x),)
    elif op == "gelu_tanh":
        grads = (ops.gelu_tanh_backward(x, x),)
    elif op == "layernorm":
        xhat, rstd = ops.layernorm_forward(x, return_rstd=True)
        grads = (ops.layernorm_backward(x, xhat, rstd),)
    elif op == "modulate":
        grads = ops.modulate_backward(x, x, x[:, 0])
    elif op == "sdpa":
        q = x.reshape(2, 2, 2, 8)
        out, lse = ops.sdpa_forward(q, q, q, return_lse=True)
        grads = ops.sdpa_backward(q, q, q, q, out, lse)
    else:
        img, w = x.reshape(2, 2, 4, 4), rng.standard_normal((8, 2, 2, 2)).astype(f)
        grads = ops.patch_embed_backward(ops.patch_embed_forward(img, w, w[:, 0, 0, 0], 2), img, w, 2)
    assert all(g.dtype == f for g in grads), [g.dtype for g in grads]


def test_row_parallel_results_do_not_depend_on_threads(monkeypatch, rng):
    """Row blocks on a thread pool compute every row as one call would: bit for bit."""
    x = rng.standard_normal((6, 96, 128)).astype(np.float32)        # big enough to be split
    q, k, v = (rng.standard_normal((4, 3, 96, 32)).astype(np.float32) for _ in range(3))

    shift, scale = x[:, 0], x[:, 1]                                    # (6, 128) per-sample rows

    def run():
        xhat, rstd = ops.layernorm_forward(x[:, ::2], return_rstd=True)  # a non-contiguous input too
        out, lse = ops.sdpa_forward(q, k, v, return_lse=True)
        return [ops.gelu_tanh_forward(x), ops.gelu_tanh_backward(x, x), xhat, rstd,
                ops.layernorm_backward(x[:, ::2], xhat, rstd), ops.softmax_forward(x),
                ops.softmax_backward(x, x), out, lse, *ops.sdpa_backward(q, k, v, q, out, lse),
                ops.modulate_forward(x, shift, scale), *ops.modulate_backward(x[:, ::-1], x, scale),
                ops.gated_residual_forward(x, scale, x[:, ::-1]), *ops.gated_residual_backward(x, scale, x[:, ::-1]),
                ops.gelu_tanh_output(x, x[:, ::-1])]

    monkeypatch.setattr(parallel, "NUM_THREADS", 1)
    single = run()
    monkeypatch.setattr(parallel, "NUM_THREADS", 3)
    monkeypatch.setattr(parallel, "MIN_BLOCK", 1 << 10)
    for a, b in zip(single, run()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_row_parallel_pool_survives_fork(monkeypatch, rng):
    """A forked child (e.g. a multiprocessing worker) gets a fresh pool, not a dead one."""
    import multiprocessing as mp
    monkeypatch.setattr(parallel, "NUM_THREADS", 2)
    x = rng.standard_normal((8, 1 << 14)).astype(np.float32)
    expected = ops.gelu_tanh_forward(x)                  # the parent's pool now exists
    with mp.get_context("fork").Pool(1) as pool:
        np.testing.assert_array_equal(pool.apply_async(ops.gelu_tanh_forward, (x,)).get(timeout=60), expected)


@pytest.mark.parametrize("batch", [4, 1])                   # 1: attention split over heads
def test_pooled_gemms_and_fused_paths(monkeypatch, rng, batch):
    """linear, the fused MLP and attention on the pool (single-threaded BLAS per thread,
    cache-sized chunks).  Attention runs the same (sample, head) GEMMs: the same bits.  A
    linear's rows go to BLAS in other blocks, which changes float32 rounding (as OpenBLAS's
    own threading does: 1 and 2 threads differ too), so it is checked to 1e-6; the fused
    GELU is bit for bit the GELU of its own hidden output, and fc2 is the same GEMM on the
    same chunks whatever the MLP is asked to return."""
    x = rng.standard_normal((batch, 96, 128)).astype(np.float32)
    w, b = rng.standard_normal((200, 128)).astype(np.float32), rng.standard_normal(200).astype(np.float32)
    w2, b2 = rng.standard_normal((128, 200)).astype(np.float32), rng.standard_normal(128).astype(np.float32)
    q, k, v = (rng.standard_normal((batch, 3, 96, 32)).astype(np.float32) for _ in range(3))
    monkeypatch.setattr(parallel, "SPLIT_GEMMS", False)            # the plain expressions
    plain_y, plain_attn = x @ w.T + b, ops.sdpa_forward(q, k, v, return_lse=True)
    plain_g, plain_s = ops.gelu_tanh_forward(plain_y, return_gate=True)
    plain_m = plain_g @ w2.T + b2
    np.testing.assert_array_equal(ops.linear_forward(x, w, b), plain_y)
    for a, c in zip(ops.mlp_forward(x, w, b, w2, b2, return_hidden=True, return_act=True),
                    (plain_m, plain_y, plain_s, plain_g)):
        np.testing.assert_array_equal(a, c)
    monkeypatch.undo()
    if not parallel.SPLIT_GEMMS:
        pytest.skip("NumPy's BLAS is not OpenBLAS: no pooled GEMMs")
    monkeypatch.setattr(parallel, "NUM_THREADS", 3)
    monkeypatch.setattr(parallel, "MIN_BLOCK", 1 << 10)
    monkeypatch.setattr(ops, "CACHE_BYTES", 1 << 14)               # several chunks per thread
    monkeypatch.setattr(ops, "GEMM_MIN_ROWS", 16)
    scale = np.abs(plain_y).max()
    assert np.abs(ops.linear_forward(x, w, b) - plain_y).max() <= 1e-6 * scale
    m, h, s, g = ops.mlp_forward(x, w, b, w2, b2, return_hidden=True, return_act=True)
    assert np.abs(h - plain_y).max() <= 1e-6 * scale
    assert np.abs(m - plain_m).max() <= 1e-6 * np.abs(plain_m).max()
    for a, c in zip((g, s), ops.gelu_tanh_forward(h, return_gate=True)):
        np.testing.assert_array_equal(a, c)
    for flags in [{}, {"return_hidden": True}, {"return_act": True}]:
        out = ops.mlp_forward(x, w, b, w2, b2, **flags)
        for a, c in zip(out, (m, h, s, g)):
            assert a is None or np.array_equal(a, c)
    for a, c in zip(plain_attn, ops.sdpa_forward(q, k, v, return_lse=True)):
        np.testing.assert_array_equal(a, c)
