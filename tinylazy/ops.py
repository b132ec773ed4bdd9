"""The ops of the DiT forward and backward passes, written against NumPy/CuPy (``xp``).

Each op is a plain function on arrays of the model dtype.  The backward of an
op sits next to its forward (``foo_forward`` / ``foo_backward``) and takes only
the cache it needs, named in its docstring; backward functions never modify
their arguments.  Shapes: B batch, T tokens, D hidden, H heads, Dh = D / H.
"""
import math

import numpy as np

from . import memory, parallel
from .backend import array_module_of
from .parallel import rowwise

LN_EPS = 1e-6                                  # DiT's LayerNorm(elementwise_affine=False, eps=1e-6)
GELU_K = math.sqrt(2.0 / math.pi)              # tanh-GELU: 0.5 x (1 + tanh(k (x + 0.044715 x^3)))
GELU_C = 0.044715


def _split_gemms(a):
    """Whether ``a``'s GEMMs go to the pool in blocks (NumPy, and parallel.SPLIT_GEMMS)."""
    return parallel.SPLIT_GEMMS and array_module_of(a) is np


def _matmul_kernel(out, a, b):
    array_module_of(a).matmul(a, b, out=out)


def empty(shape, dtype, xp=np):
    """An op's output array: on NumPy from memory.empty (recycled inside memory.recycling())."""
    return memory.empty(shape, dtype) if xp is np else xp.empty(shape, dtype=dtype)


def _rows(x):
    """(..., n) -> (N, n) view (a copy only if x is not contiguous)."""
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------
# linear: y = x W^T + b, W in the official (out, in) layout

def _linear_kernel(y, x, wt, b):
    array_module_of(x).matmul(x, wt, out=y)
    if b is not None:
        y += b


def linear_forward(x, w, b=None):
    """(..., in) -> (..., out).  The rows are split over the pool when GEMMs are (parallel.py)."""
    y = _pooled_matmul(x.reshape(-1, x.shape[-1]), w.T, b)   # (N, in) @ (in, out) -> (N, out)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _mlp_kernel(y, h, s, g, x, w1t, b1, w2t, b2):
    """mlp_forward on a block of rows, a cache-sized chunk of rows at a time: fc1, GELU, fc2
    while the chunk's hidden activations are in cache.  h, s, g (N, 4D) are written where
    given, else they live in per-chunk scratch."""
    n = max(GEMM_MIN_ROWS, CACHE_BYTES // (3 * w1t.shape[1] * x.itemsize))    # h, s, g of a chunk
    scratch = np.empty((2, min(n, x.shape[0]), w1t.shape[1]), dtype=y.dtype)
    for i in range(0, x.shape[0], n):
        rows = slice(i, i + n)
        k = len(x[rows])
        hi = h[rows] if h is not None else scratch[0, :k]
        gi = g[rows] if g is not None else scratch[1, :k]
        _linear_kernel(hi, x[rows], w1t, b1)
        _gelu_tanh_kernel(gi, hi, None if s is None else s[rows])
        _linear_kernel(y[rows], gi, w2t, b2)


def mlp_forward(x, w1, b1, w2, b2, return_hidden=False, return_act=False):
    """fc2(gelu_tanh(fc1(x))): x (..., D) -> y (..., D), as (y, h, s, g): with ``return_hidden``
    also the GELU input h = fc1(x) and its gate s (gelu_tanh_forward; the backward's cache),
    with ``return_act`` also the GELU output g = h s, each (..., 4D); None where not asked for.
    When GEMMs are split over the pool, each pool thread runs its rows through fc1, the
    GELU and fc2 a chunk at a time, so that what is not asked for never leaves the cache."""
    lead = x.shape[:-1]
    if not (return_hidden or return_act) and _fast32(x, w1, w2):
        return _mlp_fast(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2).reshape(*lead, w2.shape[0]), None, None, None
    if not _split_gemms(x):
        h = linear_forward(x, w1, b1)
        g, s = gelu_tanh_forward(h, return_gate=True)
        return (linear_forward(g, w2, b2), h if return_hidden else None, s if return_hidden else None,
                g if return_act else None)
    x2 = x.reshape(-1, x.shape[-1])
    dtype = np.result_type(x2, w1, w2)
    y = empty((x2.shape[0], w2.shape[0]), dtype)
    hidden = [empty((x2.shape[0], w1.shape[0]), dtype) if want else None
              for want in (return_hidden, return_hidden, return_act)]            # h, s, g
    kept = [i for i, a in enumerate(hidden) if a is not None]

    def kernel(yy, xx, *blocks):
        hsg = [None] * 3
        for i, blk in zip(kept, blocks):
            hsg[i] = blk
        _mlp_kernel(yy, *hsg, xx, w1.T, b1, w2.T, b2)
    rowwise(kernel, y, x2, *(hidden[i] for i in kept))
    return (y.reshape(*lead, w2.shape[0]),
            *(a.reshape(*lead, w1.shape[0]) if a is not None else None for a in hidden))


def linear_backward(dy, x, w, param_grads=True, input_grad=True):
    """dy (..., out); cache: x (..., in), the forward input (unused without param_grads).

    Returns dx (..., in), dw (out, in), db (out,); dw and db are None without
    ``param_grads``, dx is None without ``input_grad``.
    """
    dy2 = dy.reshape(-1, dy.shape[-1])            # (N, out)
    if param_grads and input_grad and _pooled(dy2):
        dx, dw, db = _pooled_linear_grads(dy2, x.reshape(-1, x.shape[-1]), w)
        return dx.reshape(*dy.shape[:-1], w.shape[1]), dw, db
    dx = _pooled_matmul(dy2, w).reshape(*dy.shape[:-1], w.shape[1]) if input_grad else None
    if not param_grads:
        return dx, None, None
    dw = _pooled_matmul(dy2.T, x.reshape(-1, x.shape[-1]))   # (out, N) @ (N, in) -> (out, in)
    return dx, dw, dy2.sum(axis=0)


def _pooled(a):
    """Whether ``a``'s dx and dw GEMMs go to the pool side by side: split GEMMs, threads and enough work."""
    return _split_gemms(a) and parallel.NUM_THREADS > 1 and a.size >= parallel.MIN_BLOCK


def _dw_db_kernel(dw, db, dyt, x):
    """dw = dy^T x and db = sum of dy over rows, for a block of dy's columns (dyt = dy^T's rows)."""
    np.matmul(dyt, x, out=dw)
    dyt.sum(axis=1, out=db)


def _pooled_linear_grads(dy2, x2, w):
    """dx = dy w, and dw = dy^T x with db, at once on the pool, each GEMM on its own half of the
    threads (at 2 threads: one whole GEMM per thread).  The two have the same FLOPs, and neither
    is split more than it must be: dw's reduction runs over all N rows, so each of its blocks
    re-packs all of x (measured on the digits model's shapes: up to 1.9x slower split in two)."""
    dtype = np.result_type(dy2, w, x2)
    dx = empty((dy2.shape[0], w.shape[1]), dtype)
    dw = empty((dy2.shape[1], x2.shape[1]), dtype)
    db = empty(dy2.shape[1], dy2.dtype)
    kx = (parallel.NUM_THREADS + 1) // 2
    tasks = [(_matmul_kernel, (dx[lo:hi], dy2[lo:hi], w)) for lo, hi in parallel.cuts(dx.shape[0], kx)]
    tasks += [(_dw_db_kernel, (dw[lo:hi], db[lo:hi], dy2.T[lo:hi], x2))
              for lo, hi in parallel.cuts(dw.shape[0], parallel.NUM_THREADS - kx)]
    parallel.run_all(tasks)
    return dx, dw, db


def _pooled_matmul(a, b, bias=None):
    """a @ b (+ bias), a (N, K): a's rows split over the pool when GEMMs are; a plain matmul otherwise."""
    if not _split_gemms(a):
        y = a @ b
        if bias is not None:
            y += bias
        return y
    out = empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    if _fast32(a, b):
        _matmul_into(out, a, b, bias)
        return out
    rowwise(lambda o, aa: _linear_kernel(o, aa, b, bias), out, a)
    return out


# ----------------------------------------------------------------------------
# SiLU: x sigmoid(x)

def silu_forward(x):
    xp = array_module_of(x)
    return x / (1 + xp.exp(-x))


def silu_backward(dy, x):
    """Cache: x.  d/dx x s(x) = s (1 + x (1 - s))."""
    xp = array_module_of(x)
    s = 1 / (1 + xp.exp(-x))
    g = 1 - s
    g *= x
    g += 1
    g *= s
    g *= dy
    return g


# ----------------------------------------------------------------------------
# tanh-GELU (nn.GELU(approximate="tanh"))

def _gelu_tanh_kernel(y, x, s=None, t=None):
    """y = x s, s = (1 + tanh(u)) / 2, u = k (x + c x^3); s is kept if given (else y is its scratch);
    t: optional scratch for c x (else a temporary).  y may be x (in place)."""
    xp = array_module_of(x)
    s = xp.multiply(x, x, out=y if s is None else s)
    s *= GELU_C * x if t is None else xp.multiply(x, GELU_C, out=t)
    s += x
    s *= GELU_K
    xp.tanh(s, out=s)
    s += 1
    s *= 0.5                                      # exact: the same bits as (1 + tanh) x / 2
    xp.multiply(s, x, out=y)


def gelu_tanh_forward(x, return_gate=False):
    """With ``return_gate`` returns (y, s): the gate s = (1 + tanh(u)) / 2, y = x s, which the
    backward takes instead of recomputing it."""
    xp = array_module_of(x)
    y = empty(x.shape, x.dtype, xp)
    if not return_gate:
        rowwise(_gelu_tanh_kernel, _rows(y), _rows(x))
        return y
    s = empty(x.shape, x.dtype, xp)
    rowwise(_gelu_tanh_kernel, _rows(y), _rows(x), _rows(s))
    return y, s


def _multiply_kernel(y, a, b):
    array_module_of(a).multiply(a, b, out=y)


def gelu_tanh_output(x, s):
    """gelu(x) = x s from the forward's input x and gate s: its output, recomputed by one
    multiply instead of kept (row blocks on the pool)."""
    y = empty(x.shape, np.result_type(x, s), array_module_of(x))
    rowwise(_multiply_kernel, _rows(y), _rows(x), _rows(s))
    return y


def _gelu_tanh_gate_kernel(s, x):
    xp = array_module_of(x)
    s = xp.multiply(x, x, out=s)
    s *= -2 * GELU_K * GELU_C
    s -= 2 * GELU_K
    s *= x                                        # -2 u
    with np.errstate(over="ignore"):              # exp -> inf for u << 0 gives s = 0, the right limit
        xp.exp(s, out=s)
    s += 1
    xp.reciprocal(s, out=s)


def gelu_tanh_gate(x):
    """s = (1 + tanh(u)) / 2 = sigmoid(2 u), u = k (x + c x^3), so that gelu(x) = x s.

    The exp form (one exp instead of a tanh, about twice as fast in NumPy float32), for a
    backward without the forward's gate at hand (gelu_tanh_backward with s=None).
    """
    s = empty(x.shape, x.dtype, array_module_of(x))
    rowwise(_gelu_tanh_gate_kernel, _rows(s), _rows(x))
    return s


def _gelu_tanh_backward_kernel(g, dy, x, s):
    g = array_module_of(x).multiply(x, x, out=g)
    g *= 6 * GELU_K * GELU_C
    g += 2 * GELU_K
    g *= x                                        # 2 x u'
    g *= 1 - s
    g += 1
    g *= s
    g *= dy


def gelu_tanh_backward(dy, x, s=None):
    """Cache: x, the forward input, and the gate s from gelu_tanh_forward(x, return_gate=True)
    (recomputed by gelu_tanh_gate(x), which gives the same numbers to rounding, if not given).

    d/dx [x s] = s + 2 x u' s (1 - s) = s (1 + 2 x u' (1 - s)),  u' = k (1 + 3 c x^2).
    """
    if s is None:
        s = gelu_tanh_gate(x)
    g = empty(x.shape, x.dtype, array_module_of(x))
    rowwise(_gelu_tanh_backward_kernel, _rows(g), _rows(dy), _rows(x), _rows(s))
    return g


# ----------------------------------------------------------------------------
# LayerNorm without affine over the last axis

def _layernorm_kernel(xhat, rstd, x, eps):
    xp = array_module_of(x)
    xp.subtract(x, x.mean(axis=-1, keepdims=True), out=xhat)
    var = (xhat * xhat).mean(axis=-1, keepdims=True)
    xp.divide(1.0, xp.sqrt(var + eps), out=rstd)
    xhat *= rstd


def layernorm_forward(x, eps=LN_EPS, return_rstd=False):
    """(..., D) -> xhat (..., D): (x - mean) / sqrt(var + eps), biased variance.

    With ``return_rstd`` also returns rstd = 1 / sqrt(var + eps), (..., 1): the
    backward's cache is (xhat, rstd).
    """
    xp = array_module_of(x)
    xhat = empty(x.shape, x.dtype, xp)
    rstd = empty(x.shape[:-1] + (1,), x.dtype, xp)
    rowwise(lambda xh, r, xx: _layernorm_kernel(xh, r, xx, eps), _rows(xhat), _rows(rstd), _rows(x))
    return (xhat, rstd) if return_rstd else xhat


def _layernorm_backward_kernel(dx, dxhat, xhat, rstd):
    xp = array_module_of(xhat)
    dot = xp.einsum("nd,nd->n", dxhat, xhat)[:, None]             # (N, 1)
    dot *= 1.0 / xhat.shape[-1]
    xp.multiply(xhat, dot, out=dx)
    xp.subtract(dxhat, dx, out=dx)
    dx -= dxhat.mean(axis=-1, keepdims=True)
    dx *= rstd


def layernorm_backward(dxhat, xhat, rstd):
    """Cache: xhat (..., D), rstd (..., 1).

    dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), means over the last axis.
    """
    dx = empty(xhat.shape, xhat.dtype, array_module_of(xhat))
    rowwise(_layernorm_backward_kernel, _rows(dx), _rows(dxhat), _rows(xhat), _rows(rstd))
    return dx


# ----------------------------------------------------------------------------
# modulate (adaLN): x * (1 + scale) + shift, per-sample shift/scale broadcast over tokens

def _modulate_kernel(y, x, shift, scale):
    xp = array_module_of(x)
    xp.multiply(x, 1 + scale[:, None, :], out=y)
    y += shift[:, None, :]


def modulate_forward(x, shift, scale):
    """x (B, T, D), shift/scale (B, D) -> (B, T, D).  Blocks of samples on the pool."""
    y = empty(x.shape, np.result_type(x, shift, scale), array_module_of(x))
    rowwise(_modulate_kernel, y, x, shift, scale)
    return y


def _modulate_backward_kernel(dx, dshift, dscale, dy, x, scale):
    xp = array_module_of(dy)
    xp.multiply(dy, 1 + scale[:, None, :], out=dx)
    if dshift is not None:
        dshift[...] = dy.sum(axis=1)
        dscale[...] = xp.einsum("btd,btd->bd", dy, x)


def modulate_backward(dy, x, scale, mod_grads=True):
    """dy (B, T, D); cache: x (B, T, D), scale (B, D).

    Returns dx (B, T, D), dshift, dscale (B, D), summed over tokens; dshift and
    dscale are None without ``mod_grads`` (x is then unused).
    """
    xp = array_module_of(dy)
    dx = empty(dy.shape, np.result_type(dy, scale), xp)
    if not mod_grads:
        rowwise(lambda a, b, c: _modulate_backward_kernel(a, None, None, b, None, c), dx, dy, scale)
        return dx, None, None
    dshift, dscale = (empty(scale.shape, np.result_type(dy, x), xp) for _ in range(2))
    rowwise(_modulate_backward_kernel, dx, dshift, dscale, dy, x, scale)
    return dx, dshift, dscale


# ----------------------------------------------------------------------------
# gated residual (adaLN-Zero): x + gate * branch, per-sample gate broadcast over tokens

def _gated_residual_kernel(y, x, gate, branch):
    array_module_of(x).multiply(branch, gate[:, None, :], out=y)
    y += x


def gated_residual_forward(x, gate, branch):
    """x, branch (B, T, D), gate (B, D) -> x + gate * branch (B, T, D).  Blocks of samples on the pool."""
    y = empty(x.shape, np.result_type(x, gate, branch), array_module_of(x))
    rowwise(_gated_residual_kernel, y, x, gate, branch)
    return y


def _gated_residual_backward_kernel(dbranch, dgate, dy, gate, branch):
    xp = array_module_of(dy)
    xp.multiply(dy, gate[:, None, :], out=dbranch)
    if dgate is not None:
        dgate[...] = xp.einsum("btd,btd->bd", dy, branch)


def gated_residual_backward(dy, gate, branch, gate_grad=True):
    """dy (B, T, D); cache: gate (B, D), branch (B, T, D) (unused without ``gate_grad``).

    Returns dbranch = gate dy (B, T, D) and dgate (B, D), summed over tokens (None
    without ``gate_grad``); dx is dy itself.
    """
    xp = array_module_of(dy)
    dbranch = empty(dy.shape, np.result_type(dy, gate), xp)
    if not gate_grad:
        rowwise(lambda a, b, c: _gated_residual_backward_kernel(a, None, b, c, None), dbranch, dy, gate)
        return dbranch, None
    dgate = empty(gate.shape, np.result_type(dy, branch), xp)
    rowwise(_gated_residual_backward_kernel, dbranch, dgate, dy, gate, branch)
    return dbranch, dgate


# ----------------------------------------------------------------------------
# softmax over the last axis (numerically stable)

def _softmax_kernel(p, lse, s):
    xp = array_module_of(s)
    m = s.max(axis=-1, keepdims=True)
    xp.subtract(s, m, out=p)
    xp.exp(p, out=p)
    z = p.sum(axis=-1, keepdims=True)
    p /= z
    xp.log(z, out=z)
    xp.add(z, m, out=lse)


def _softmax(s, p):
    """Softmax of s into p (which may be s itself) -> p, lse."""
    lse = empty(s.shape[:-1] + (1,), s.dtype, array_module_of(s))
    rowwise(_softmax_kernel, _rows(p), _rows(lse), _rows(s))
    return p, lse


def softmax_forward(s, return_lse=False):
    """(..., n) -> p (..., n).  With ``return_lse`` also log-sum-exp of s, (..., 1):
    p = exp(s - lse), which is how the attention backward recomputes p."""
    p, lse = _softmax(s, empty(s.shape, s.dtype, array_module_of(s)))
    return (p, lse) if return_lse else p


def _softmax_backward_kernel(ds, dp, p, dot):
    array_module_of(p).subtract(dp, dot, out=ds)
    ds *= p


def softmax_backward(dp, p, dot=None):
    """Cache: p.  ds = p (dp - sum(dp p)), the sum over the last axis; a caller
    that knows that sum another way passes it as ``dot`` (..., 1)."""
    if dot is None:
        dot = (dp * p).sum(axis=-1, keepdims=True)
    ds = empty(p.shape, p.dtype, array_module_of(p))
    rowwise(_softmax_backward_kernel, _rows(ds), _rows(dp), _rows(p), _rows(dot))
    return ds


# ----------------------------------------------------------------------------
# scaled dot-product attention: softmax(q k^T / sqrt(Dh)) v

CACHE_BYTES = 1 << 21                          # working set per pool thread that stays in cache
GEMM_MIN_ROWS = 256                            # rows per GEMM call below which BLAS loses speed (the MLP:
                                               # 128-row chunks measured 1.16x slower on DiT-S/2 than 256)


def _sdpa_kernel(o, lse, q, k, v, scale):
    """sdpa of a block (B', H', T, Dh) a cache-sized chunk at a time (several items of
    axis 0, or some of axis 1 of one item), so that the chunk's scores stay in cache
    between the two GEMMs and the softmax."""
    for c, (qs, s) in _chunks(q, 1, 1):
        np.matmul(np.multiply(q[c], scale, out=qs), k[c].swapaxes(-1, -2), out=s)
        _softmax_kernel(s, lse[c], s)
        np.matmul(s, v[c], out=o[c])


def _chunks(q, n_q, n_scores):
    """The cache-sized chunks of a block q (B', H', T, Dh), as (index, scratch): index selects a
    chunk (several items of axis 0, or some of axis 1 of one item) whose n_scores (T, T) scratch
    matrices fit CACHE_BYTES; scratch is n_q views of q's chunk shape, then n_scores of the
    scores' shape, of buffers allocated once per call and reused chunk after chunk."""
    T = q.shape[-2]
    per_row = n_scores * T * T * q.itemsize
    n1 = max(1, min(q.shape[1], CACHE_BYTES // per_row))
    n0 = max(1, CACHE_BYTES // (per_row * q.shape[1])) if n1 == q.shape[1] else 1
    lead = (min(n0, q.shape[0]), min(n1, q.shape[1]), T)
    bufs = [empty(lead + (last,), q.dtype) for last in [q.shape[-1]] * n_q + [T] * n_scores]
    for i in range(0, q.shape[0], n0):
        for j in range(0, q.shape[1], n1):
            c = (slice(i, i + n0), slice(j, j + n1))
            items, heads = q[c].shape[:2]
            yield c, [b[:items, :heads] for b in bufs]


def _pool_blocks(q):
    """How attention's arrays go to rowwise: blocks of samples, or of heads (axis 1 first)
    when the batch is smaller than the pool."""
    return (lambda a: a.swapaxes(0, 1)) if q.shape[0] < parallel.NUM_THREADS else (lambda a: a)


def sdpa_forward(q, k, v, return_lse=False, out=None):
    """q, k, v (B, H, T, Dh) -> (B, H, T, Dh), written into ``out`` if given (an array or a
    view of that shape).  Scale folded into q, as PyTorch's SDPA does.

    With ``return_lse`` also the softmax's log-sum-exp (B, H, T, 1).  The backward
    keeps that instead of the (T, T) probabilities and recomputes them (as
    FlashAttention does): one extra q k^T GEMM saves H T^2 numbers per sample and block.
    When GEMMs are split over the pool, its threads run it on chunks of
    samples (of heads when the batch is smaller than the pool): the same GEMMs and
    softmax per (sample, head), with the scores kept in cache.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if not _split_gemms(q):
        s = (q * scale) @ k.swapaxes(-1, -2)                # (B, H, T, T)
        p, lse = _softmax(s, s)
        o = p @ v
        if out is not None:
            out[...] = o
            o = out
        return (o, lse) if return_lse else o
    dtype = np.result_type(q, k, v)
    o = empty(q.shape, dtype) if out is None else out
    lse = empty(q.shape[:-1] + (1,), dtype)
    split = _pool_blocks(q)
    rowwise(lambda *blocks: _sdpa_kernel(*blocks, scale), *(split(a) for a in (o, lse, q, k, v)))
    return (o, lse) if return_lse else o


def _exp_minus_kernel(s, lse):
    s -= lse
    array_module_of(s).exp(s, out=s)


def _sdpa_backward_chunk(dq, dk, dv, dout, q, k, v, out, lse, scale, scratch=None):
    """sdpa_backward's math on arrays (..., T, Dh), written into dq, dk, dv; ``scratch``:
    arrays for q / sqrt(Dh), p and ds, of q's and the scores' shapes (else allocated)."""
    xp = array_module_of(q)
    if scratch is None:
        scores = q.shape[:-1] + q.shape[-2:-1]
        scratch = (empty(q.shape, q.dtype, xp), empty(scores, q.dtype, xp), empty(scores, q.dtype, xp))
    qs, p, ds = scratch
    xp.multiply(q, scale, out=qs)
    xp.matmul(qs, k.swapaxes(-1, -2), out=p)                # (..., T, T)
    _exp_minus_kernel(p, lse)
    xp.matmul(p.swapaxes(-1, -2), dout, out=dv)
    xp.matmul(dout, v.swapaxes(-1, -2), out=ds)             # dp, turned into ds in place
    dot = xp.einsum("...td,...td->...t", dout, out)[..., None]
    _softmax_backward_kernel(ds, ds, p, dot)
    xp.matmul(ds, k, out=dq)
    dq *= scale
    xp.matmul(ds.swapaxes(-1, -2), qs, out=dk)


def _sdpa_backward_kernel(dq, dk, dv, dout, q, k, v, out, lse, scale):
    """_sdpa_backward_chunk on a block (B', H', T, Dh) a cache-sized chunk at a time (as
    _sdpa_kernel), so that p and ds stay in cache through the five GEMMs."""
    for c, scratch in _chunks(q, 1, 2):                      # q / sqrt(Dh); p, ds
        _sdpa_backward_chunk(dq[c], dk[c], dv[c], dout[c], q[c], k[c], v[c], out[c], lse[c], scale, scratch)


def sdpa_backward(dout, q, k, v, out, lse, grads_out=None):
    """dout (B, H, T, Dh); cache: q, k, v, out (the forward output), lse.

    Returns dq, dk, dv (B, H, T, Dh), written into ``grads_out`` = (dq, dk, dv) if given
    (arrays or views of that shape).  p = exp(q k^T / sqrt(Dh) - lse) is recomputed; the
    softmax's row sum sum(dp p) equals sum(dout out) over Dh, which is cheaper.  When GEMMs
    are split over the pool, its threads run it on chunks of samples (of heads
    when the batch is smaller than the pool), as sdpa_forward: the same GEMMs per (sample, head).
    """
    xp = array_module_of(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if grads_out is None:
        grads_out = tuple(empty(q.shape, np.result_type(dout, q, k, v), xp) for _ in range(3))
    if not _split_gemms(q):
        _sdpa_backward_chunk(*grads_out, dout, q, k, v, out, lse, scale)
        return grads_out
    split = _pool_blocks(q)
    rowwise(lambda *blocks: _sdpa_backward_kernel(*blocks, scale),
            *(split(a) for a in (*grads_out, dout, q, k, v, out, lse)))
    return grads_out


# ----------------------------------------------------------------------------
# The float32 fast path of the forward (docs/benchmarks.md, "DiT forward"): the same math on
# the pool as the ops above, arranged for this machine's two cores.  Used for NumPy float32
# when GEMMs are split over the pool (parallel.SPLIT_GEMMS); float64 (the audit mode), CuPy
# and another BLAS keep the plain ops above.
#  - A GEMM is split where the other thread does not re-read what this one reads: by rows of
#    the input when it has more rows than the weight has columns (DiT-S/2 at batch 8), by the
#    weight's columns otherwise (DiT-XL/2 at batch 2, whose weights stream from memory), and
#    by the weight's rows when only a few input rows meet a big weight (adaLN); every output
#    element is the same dot product in the same order whatever the split (checked bit for bit
#    on the DiT shapes), so the float32 bits of the linears do not move.
#  - Elementwise work runs on sub-blocks of SUB_BYTES per operand, right after the GEMM that
#    wrote them, so that its passes (9 for the GELU) read L2 instead of memory, and LayerNorm
#    and modulate run as one pass; the same ops in the same order as the kernels above: the
#    same bits.  Smaller sub-blocks lose more than they gain: each NumPy call hands the GIL
#    to the other thread and back (two threads got through 0.73x the work of one in 64 KB
#    tanh calls, 1.4-1.7x in 256-512 KB ones).
#  Attention keeps its kernel above (_sdpa_kernel): a softmax normalised after p v, with its
#  row maxima as a reduction across rows of s^T, ran the op 1.05x faster on two threads but
#  moved no whole forward measurably (leave-one-out A/B, docs/benchmarks.md), so its float32
#  bits stay.  So no float32 bit of the forward moves.

SUB_BYTES = 1 << 19                            # per operand of a sub-block of elementwise work (L2: 2 MB)
GEMM_SMALL_ROWS = 32                           # fewer input rows than this: split a GEMM by the weight's rows
MLP_ROWS = 512                                 # rows per fc1 -> GELU -> fc2 chunk (DiT-S/2 b8: 256 measured 0-4% slower)
GEMM_MIN_WORK = 1 << 20                        # multiply-adds of a GEMM worth the pool


def _fast32(*arrays):
    """Whether the float32 fast path applies to ``arrays`` (NumPy float32, GEMMs split over the pool)."""
    return parallel.SPLIT_GEMMS and all(type(a) is np.ndarray and a.dtype == np.float32 for a in arrays)


def _column_cuts(n, k, align=16):
    """[0, n) in at most k ranges whose inner bounds are multiples of ``align`` (whole SIMD columns)."""
    bounds = sorted({min(n, (n * i // k + align // 2) // align * align) for i in range(1, k)})
    edges = [0] + [b for b in bounds if 0 < b < n] + [n]
    return list(zip(edges[:-1], edges[1:]))


def _matmul_into(out, a, b, bias=None):
    """out = a @ b (+ bias), a (M, K), b (K, N), on the pool (see the section's comment)."""
    (M, K), N = a.shape, b.shape[1]
    k = parallel.NUM_THREADS
    if k <= 1 or M * N * K < GEMM_MIN_WORK:
        parallel.run_here(_linear_kernel, out, a, b, bias)
        return
    if M < GEMM_SMALL_ROWS and b.T.flags.c_contiguous:        # b = w.T: each thread its rows of w
        def job(lo, hi):
            out[:, lo:hi] = np.matmul(b.T[lo:hi], a.T).T          # (w a^T)^T: the same dot products
            if bias is not None:
                out[:, lo:hi] += bias[lo:hi]
        parallel.run_all([(job, c) for c in _column_cuts(N, k)])
    elif N > M:                                               # by the weight's columns
        parallel.run_all([(_linear_kernel, (out[:, lo:hi], a, b[:, lo:hi], None if bias is None else bias[lo:hi]))
                          for lo, hi in _column_cuts(N, k)])
    else:                                                     # by the input's rows
        parallel.run_all([(_linear_kernel, (out[lo:hi], a[lo:hi], b, bias)) for lo, hi in parallel.cuts(M, k)])


def _gelu_rows(h, b, s, t):
    """h <- gelu_tanh(h + b) in place (b may be None), len(s) rows at a time; s, t: scratch.
    The ops of _linear_kernel's bias add and of _gelu_tanh_kernel: the same bits."""
    r = s.shape[0]
    for i in range(0, h.shape[0], r):
        x = h[i:i + r]
        ss, tt = s[:len(x)], t[:len(x)]
        if b is not None:
            x += b
        _gelu_tanh_kernel(x, x, ss, tt)


def _gelu_scratch(cols):
    r = max(1, SUB_BYTES // (4 * cols))
    return np.empty((r, cols), np.float32), np.empty((r, cols), np.float32)


def _mlp_fast(x2, w1, b1, w2, b2):
    """fc2(gelu_tanh(fc1(x))) for x2 (N, D), the output only.  With more rows than hidden units
    each thread runs its rows through fc1, the GELU and fc2, MLP_ROWS rows at a time;
    otherwise fc1 is split by its weight's columns, each thread applying the GELU to its own
    columns as soon as its GEMM is done, and fc2 as any GEMM."""
    N, F = x2.shape[0], w1.shape[0]
    y = empty((N, w2.shape[0]), np.float32)
    if N >= F or parallel.NUM_THREADS <= 1:
        def rows(yy, xx):
            n = min(MLP_ROWS, len(xx))
            h, scratch = np.empty((n, F), np.float32), _gelu_scratch(F)
            for i in range(0, len(xx), n):
                hi = h[:len(xx[i:i + n])]
                np.matmul(xx[i:i + n], w1.T, out=hi)
                _gelu_rows(hi, b1, *scratch)
                _linear_kernel(yy[i:i + n], hi, w2.T, b2)
        rowwise(rows, y, x2)
        return y
    g = empty((N, F), np.float32)

    def columns(lo, hi):
        np.matmul(x2, w1.T[:, lo:hi], out=g[:, lo:hi])
        _gelu_rows(g[:, lo:hi], b1[lo:hi], *_gelu_scratch(hi - lo))
    parallel.run_all([(columns, c) for c in _column_cuts(F, parallel.NUM_THREADS)])
    _matmul_into(y, g, w2.T, b2)
    return y


def _sample_blocks(kernel, big, small):
    """kernel(*(a[b0:b1, t0:t1] for a in big), *(s[b0:b1, None] for s in small)) over blocks of
    about SUB_BYTES, big: (B, T, D) arrays, small: (B, D): some tokens of one sample, or whole
    samples; the blocks go to the pool threads in contiguous groups."""
    B, T, D = big[0].shape
    r = max(1, SUB_BYTES // (4 * D))                          # tokens per block
    if r >= T:                                                 # whole samples per block
        n = r // T
        blocks = [(b, min(b + n, B), 0, T) for b in range(0, B, n)]
    else:
        blocks = [(b, b + 1, t, t + r) for b in range(B) for t in range(0, T, r)]

    def run(group):
        for b0, b1, t0, t1 in group:
            kernel(*(a[b0:b1, t0:t1] for a in big), *(s[b0:b1, None] for s in small))
    if parallel.NUM_THREADS <= 1 or big[0].size < parallel.MIN_WORK:
        parallel.run_here(run, blocks)
    else:
        parallel.run_all([(run, (blocks[lo:hi],)) for lo, hi in parallel.cuts(len(blocks), parallel.NUM_THREADS)])


def _layernorm_modulate_kernel(z, x, shift, scale1, eps):
    """_layernorm_kernel then _modulate_kernel on a (b, t, D) block (shift, scale1 = 1 + scale:
    (b, 1, D)): the same ops, so the same bits, without the LN output in between."""
    np.subtract(x, x.mean(axis=-1, keepdims=True), out=z)
    var = (z * z).mean(axis=-1, keepdims=True)
    np.multiply(z, np.divide(1.0, np.sqrt(var + eps)), out=z, order="C")   # C order: 2x faster in place here
    z *= scale1
    z += shift


def layernorm_modulate_forward(x, shift, scale, eps=LN_EPS):
    """modulate(layernorm(x), shift, scale): x (B, T, D), shift/scale (B, D) -> (B, T, D), one
    pass over sub-blocks on the fast path (the same bits as the two ops), else the two ops."""
    if not _fast32(x, shift, scale):
        return modulate_forward(layernorm_forward(x, eps), shift, scale)
    z = empty(x.shape, np.float32)
    _sample_blocks(lambda zz, xx, sh, sc: _layernorm_modulate_kernel(zz, xx, sh, sc, eps), (z, x), (shift, 1 + scale))
    return z


# ----------------------------------------------------------------------------
# patch embedding: Conv2d(C, D, kernel=p, stride=p), then flatten(2).transpose(1, 2)

def patchify(x, p):
    """(B, C, H, W) -> (B, T, C*p*p), tokens row-major over the (H/p, W/p) grid."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).transpose(0, 2, 4, 1, 3, 5)   # (B, h, w, C, p, p)
    return x.reshape(B, h * w, C * p * p)


def patchify_backward(dy, p, x_shape):
    """(B, T, C*p*p) -> (B, C, H, W): patchify's inverse (it is a permutation)."""
    B, C, H, W = x_shape
    h, w = H // p, W // p
    dy = dy.reshape(B, h, w, C, p, p).transpose(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return dy.reshape(B, C, H, W)


def patch_embed_forward(x, w, b, p):
    """x (B, C, H, W), w (D, C, p, p), b (D,) -> (B, T, D)."""
    return linear_forward(patchify(x, p), w.reshape(w.shape[0], -1), b)


def patch_embed_backward(dy, x, w, p, param_grads=True):
    """dy (B, T, D); cache: x (B, C, H, W), the forward input (re-patchified for dw).

    Returns dx (B, C, H, W), dw (D, C, p, p), db (D,); dw, db None without ``param_grads``.
    """
    dpatches, dw, db = linear_backward(dy, patchify(x, p) if param_grads else None,
                                       w.reshape(w.shape[0], -1), param_grads)
    dx = patchify_backward(dpatches, p, x.shape)
    return dx, (dw.reshape(w.shape) if param_grads else None), db


# ----------------------------------------------------------------------------
# unpatchify: (B, T, p*p*C) -> (B, C, H, W) via einsum 'nhwpqc->nchpwq'

def unpatchify(x, p, c):
    B, T, _ = x.shape
    h = w = int(round(math.sqrt(T)))
    x = x.reshape(B, h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4)    # (B, c, h, p, w, p)
    return x.reshape(B, c, h * p, w * p)


def unpatchify_backward(dy, p):
    """(B, c, H, W) -> (B, T, p*p*c): the gradient patchified in unpatchify's layout (nhwpqc)."""
    B, c, H, W = dy.shape
    h, w = H // p, W // p
    dy = dy.reshape(B, c, h, p, w, p).transpose(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, c)
    return dy.reshape(B, h * w, p * p * c)


# ----------------------------------------------------------------------------
# embedding lookup: table rows by integer id (DiT's LabelEmbedder)

def embedding_forward(table, ids):
    """table (n, D), ids (B,) -> (B, D)."""
    return table[ids]


def embedding_backward(dy, ids, n_rows):
    """dy (B, D); cache: ids.  Scatter-add into the rows: a repeated id sums its rows."""
    xp = array_module_of(dy)
    dtable = xp.zeros((n_rows, dy.shape[-1]), dtype=dy.dtype)
    xp.add.at(dtable, ids, dy)
    return dtable
