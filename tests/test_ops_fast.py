"""The float32 fast path of the forward (ops.py, "The float32 fast path"): each kernel against the
float64 ops on odd shapes (rows not a multiple of the chunk, T a prime, batch 1), split over three
threads with small chunks and sub-blocks, and against the plain float32 ops, whose arithmetic it
keeps (bit for bit where the GEMM is the same call: the GELU, LayerNorm + modulate)."""
import numpy as np
import pytest

from tinylazy import ops, parallel


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Three pool threads and chunks / sub-blocks much smaller than the arrays; skipped where
    GEMMs are not split over the pool (another BLAS: the fast path is off)."""
    if not parallel.SPLIT_GEMMS:
        pytest.skip("NumPy's BLAS is not OpenBLAS: no fast path")
    monkeypatch.setattr(parallel, "NUM_THREADS", 3)
    monkeypatch.setattr(parallel, "MIN_BLOCK", 1 << 8)
    monkeypatch.setattr(parallel, "MIN_WORK", 1 << 8)
    monkeypatch.setattr(ops, "GEMM_MIN_WORK", 1 << 8)
    monkeypatch.setattr(ops, "SUB_BYTES", 1 << 10)
    monkeypatch.setattr(ops, "MLP_ROWS", 7)


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def rel_err(a, ref):
    return np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("M, K, N", [(3, 40, 200),       # few rows: split by the weight's rows (adaLN)
                                     (37, 24, 97),       # more weight columns than rows: by columns
                                     (301, 33, 50)])     # more rows: by rows
def test_split_linear(small_chunks, rng, M, K, N):
    x, w, b = f32(rng, M, K), f32(rng, N, K), f32(rng, N)
    y = ops.linear_forward(x, w, b)
    assert y.dtype == np.float32 and ops._fast32(x, w)
    assert rel_err(y, ops.linear_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))) < 1e-6
    plain = np.matmul(x, w.T)                              # one BLAS call
    plain += b
    assert np.abs(y - plain).max() <= 1e-6 * np.abs(plain).max()


@pytest.mark.parametrize("N, D, F", [(61, 16, 40),      # more rows than hidden units: each thread its rows
                                     (1, 16, 40),       # a single row
                                     (23, 12, 100)])    # fewer: fc1 by its weight's columns, then fc2
def test_mlp_fast(small_chunks, rng, N, D, F):
    x, w1, b1 = f32(rng, 2, N, D), f32(rng, F, D, scale=0.5), f32(rng, F)
    w2, b2 = f32(rng, D, F, scale=0.3), f32(rng, D)
    y, h, s, g = ops.mlp_forward(x, w1, b1, w2, b2)
    assert h is None and s is None and g is None and y.shape == (2, N, D)
    ref = ops.mlp_forward(*(a.astype(np.float64) for a in (x, w1, b1, w2, b2)))[0]
    assert rel_err(y, ref) < 1e-5
    # the same GELU arithmetic as the plain kernels: the output of the path that keeps h, s, g
    kept = ops.mlp_forward(x, w1, b1, w2, b2, return_hidden=True, return_act=True)
    assert np.abs(y - kept[0]).max() <= 1e-6 * np.abs(kept[0]).max()
    g_plain = np.empty_like(kept[1])
    ops._gelu_tanh_kernel(g_plain, kept[1])
    np.testing.assert_array_equal(kept[3], g_plain)
    h2 = np.matmul(x.reshape(-1, D), w1.T)                 # _gelu_rows: bias add then the GELU, in place
    g_ref = np.empty_like(h2)
    ops._gelu_tanh_kernel(g_ref, h2 + b1)
    ops._gelu_rows(h2, b1, *ops._gelu_scratch(F))
    np.testing.assert_array_equal(h2, g_ref)


@pytest.mark.parametrize("B, T, D", [(3, 37, 24), (1, 37, 24), (2, 5, 200), (23, 3, 8)])   # last: whole samples per block
def test_layernorm_modulate(small_chunks, rng, B, T, D):
    x, shift, scale = f32(rng, B, T, D, scale=3.0) + 1, f32(rng, B, D), f32(rng, B, D)
    z = ops.layernorm_modulate_forward(x, shift, scale)
    np.testing.assert_array_equal(z, ops.modulate_forward(ops.layernorm_forward(x), shift, scale))
    ref = ops.layernorm_modulate_forward(*(a.astype(np.float64) for a in (x, shift, scale)))
    assert ref.dtype == np.float64 and rel_err(z, ref) < 1e-6


def test_float64_keeps_the_plain_ops(small_chunks, rng):
    """The audit mode never takes the fast path."""
    assert not ops._fast32(np.zeros(3), np.zeros(3, np.float32))
    x = rng.standard_normal((2, 9, 8))
    np.testing.assert_array_equal(ops.layernorm_modulate_forward(x, x[:, 0], x[:, 1]),
                                  ops.modulate_forward(ops.layernorm_forward(x), x[:, 0], x[:, 1]))


@pytest.mark.skipif(parallel.BLAS_SWITCH is None, reason="no OpenBLAS thread switch in this NumPy")
def test_the_pool_leaves_the_callers_blas_threads_alone():
    """The pool threads set their BLAS to one thread; the caller's own GEMMs keep theirs (in the
    OpenBLAS NumPy ships the switch is process-wide, and the first forward used to halve them)."""
    threads = parallel.get_num_threads()
    try:
        parallel.set_num_threads(2)                          # a new pool: its threads' initializer runs
        before = parallel.BLAS_SWITCH(2)
        a = np.ones((64, 64), np.float32)
        parallel.run_all([(np.matmul, (a, a)) for _ in range(2)])
        assert parallel.BLAS_SWITCH(before) == 2
    finally:
        parallel.set_num_threads(threads)
