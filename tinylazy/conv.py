"""The image ops of the VAE: 2-D convolution, GroupNorm(+SiLU), nearest upsampling, pixel attention.

They work on one image at a time, (C, H, W), NCHW as in PyTorch, and are
written against ``xp`` (NumPy or CuPy).  Speed comes from four choices:

- a 3x3 stride-1 convolution on an even-sized image runs as Winograd's
  F(2x2, 3x3) (Lavin & Gray 2016): per 2x2 output tile, 16 products of
  transformed 4x4 input tiles with transformed filters instead of 36, i.e. 16
  GEMMs ``(Cout, Cin) @ (Cin, tiles)`` with 2.25x fewer multiply-adds than
  direct convolution; its transforms use only +-1 and 1/2, so the rounding
  error stays at the direct method's level;
- every other convolution is one GEMM per band of output rows,
  ``(Cout, Cin*k*k) @ cols (Cin*k*k, rows*Wo)``, the official weight layout
  (Cout, Cin, k, k) being the GEMM's left operand as it is;
- both work in bands of output rows, which bounds their buffers (a whole
  256x256x128 im2col would be 300 MB in float32) and keeps them in cache, and
  ops write straight into the zero-bordered buffer the next convolution reads
  (``pad_buffer``);
- the pool of ``tinylazy.parallel`` runs the elementwise passes and, under its
  BLAS policy, splits every GEMM by output channels, one single-threaded BLAS
  call per thread.
"""
import math

import numpy as np

from . import parallel
from .backend import array_module_of
from .parallel import gemm_parts, parts

GN_EPS = 1e-6              # every GroupNorm of diffusers' AutoencoderKL (resnet_eps and conv_norm_out)
BAND_BYTES = 8 << 20       # im2col / Winograd band buffers: a few MB stays in the last-level cache
PIECE = 1 << 16            # elements per block of elementwise work: 256 KB in float32, within L2
WINOGRAD_MIN_PIXELS = 1024  # smaller images: Winograd's 16 GEMMs per band cost more in calls than they save
ATTN_ROWS = 512            # attention queries per block: bounds the (rows, H*W) score matrix


def _parallel(xp, fn, items, work):
    """fn(item) for every item: ``parallel.for_each`` for NumPy, in order for CuPy (the GPU queues them)."""
    parallel.for_each(fn, items, work if xp is np else 0)


# ----------------------------------------------------------------------------
# padded buffers

def pad_buffer(xp, shape, dtype, pad):
    """An uninitialised (C, H, W) interior with a zero border.

    pad = (top, bottom, left, right).  Returns (buffer (C, H+top+bottom, W+left+right), interior view).
    """
    C, H, W = shape
    t, b, l, r = pad
    buf = xp.empty((C, H + t + b, W + l + r), dtype=dtype)
    buf[:, :t] = 0
    buf[:, t + H:] = 0
    buf[:, :, :l] = 0
    buf[:, :, l + W:] = 0
    return buf, buf[:, t:t + H, l:l + W]


def pad_forward(x, pad):
    """(C, H, W) -> (C, H+top+bottom, W+left+right), zeros outside, as F.pad / Conv2d(padding=...)."""
    xp = array_module_of(x)
    buf, inner = pad_buffer(xp, x.shape, x.dtype, pad)
    inner[...] = x
    return buf


# ----------------------------------------------------------------------------
# convolution: Conv2d(Cin, Cout, k, stride) on an already padded input

def conv2d_forward(xpad, w, b, stride=1, residual=None):
    """xpad (Cin, Hp, Wp), w (Cout, Cin, k, k), b (Cout,) -> (Cout, Ho, Wo) [+ residual (Cout, Ho, Wo)].

    Ho = (Hp - k) // stride + 1, the output of Conv2d(padding=0) on the padded image.
    """
    xp = array_module_of(xpad)
    Cin, Hp, Wp = xpad.shape
    Cout, _, k, _ = w.shape
    Ho, Wo = (Hp - k) // stride + 1, (Wp - k) // stride + 1
    wmat = w.reshape(Cout, Cin * k * k)             # rows ordered (cin, ky, kx), as the cols below
    y = xp.empty((Cout, Ho * Wo), dtype=xpad.dtype)
    res = None if residual is None else residual.reshape(Cout, Ho * Wo)

    def gemm(c, cols, p0, p1):                       # y[c, p0:p1] = wmat[c] @ cols + b (+ residual)
        band = y[c[0]:c[1], p0:p1]
        xp.matmul(wmat[c[0]:c[1]], cols, out=band)   # (c, K) @ (K, p1 - p0)
        band += b[c[0]:c[1], None]
        if res is not None:
            band += res[c[0]:c[1], p0:p1]

    if k == 1 and stride == 1:                       # a 1x1 convolution is one GEMM on the pixels
        x2 = xpad.reshape(Cin, Hp * Wp)
        _parallel(xp, lambda c: gemm(c, x2, 0, Ho * Wo), gemm_parts(Cout), y.size)
        return y.reshape(Cout, Ho, Wo)
    rows = max(1, min(Ho, BAND_BYTES // (Cin * k * k * Wo * xpad.itemsize)))
    cols_buf = xp.empty(Cin * k * k * rows * Wo, dtype=xpad.dtype)
    for r0 in range(0, Ho, rows):
        r1 = min(Ho, r0 + rows)
        cols = cols_buf[:Cin * k * k * (r1 - r0) * Wo].reshape(Cin, k, k, r1 - r0, Wo)

        def fill(c, r0=r0, r1=r1, cols=cols):      # cols[c, ky, kx, i, j] = xpad[c, s*i + ky, s*j + kx]
            for ky in range(k):
                y0 = r0 * stride + ky
                for kx in range(k):
                    cols[c[0]:c[1], ky, kx] = xpad[c[0]:c[1], y0:y0 + (r1 - r0 - 1) * stride + 1:stride,
                                                   kx:kx + (Wo - 1) * stride + 1:stride]
        _parallel(xp, fill, parts(Cin), cols.size)
        cols2 = cols.reshape(Cin * k * k, (r1 - r0) * Wo)
        _parallel(xp, lambda c, cols2=cols2, r0=r0, r1=r1: gemm(c, cols2, r0 * Wo, r1 * Wo), gemm_parts(Cout),
                  cols.size)
    return y.reshape(Cout, Ho, Wo)


# ----------------------------------------------------------------------------
# Winograd F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A per 2x2 output tile,
# d the 4x4 input tile at (2i, 2j) of the padded image, g a 3x3 filter (cross-correlation,
# as Conv2d), with B^T = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]],
# G = [[1,0,0], [1/2,1/2,1/2], [1/2,-1/2,1/2], [0,0,1]], A^T = [[1,1,1,0], [0,1,-1,-1]].

WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def winograd_weights(w):
    """(Cout, Cin, 3, 3) -> U (16, Cout, Cin), U[4a+b] = (G g G^T)[a, b], computed in float64 and rounded once."""
    xp = array_module_of(w)
    Cout, Cin = w.shape[:2]
    K = xp.asarray(np.kron(WINOGRAD_G, WINOGRAD_G))                          # (16, 9): G (x) G on flat 3x3
    U = K @ w.reshape(Cout * Cin, 9).T.astype(xp.float64)                    # (16, 9) @ (9, Cout*Cin)
    return U.reshape(16, Cout, Cin).astype(w.dtype)


def _at(v0, v1, v2, v3):
    """A^T along one axis of a 4-point tile: (v0 + v1 + v2, v1 - v2 - v3)."""
    s, d = v1 + v2, v1 - v2
    s += v0
    d -= v3
    return s, d


def conv3x3_winograd_forward(xpad, U, b, residual=None):
    """xpad (Cin, H+2, W+2) with H, W even, U = winograd_weights(w), b (Cout,)
    -> (Cout, H, W) [+ residual (Cout, H, W)]: Conv2d(k=3, stride=1) of the padded image."""
    xp = array_module_of(xpad)
    Cin, Hp, Wp = xpad.shape
    Cout = U.shape[1]
    H, W = Hp - 2, Wp - 2
    if H % 2 or W % 2:
        raise ValueError(f"Winograd F(2x2, 3x3) needs an even output size, got {H}x{W}")
    ty_all, tx = H // 2, W // 2                                   # tiles per column / per row
    y = xp.empty((Cout, H, W), dtype=xpad.dtype)
    rows = max(1, min(ty_all, BAND_BYTES // (16 * max(Cin, Cout) * tx * xpad.itemsize)))   # tile rows per band
    v_buf = xp.empty(16 * Cin * rows * tx, dtype=xpad.dtype)
    m_buf = xp.empty(16 * Cout * rows * tx, dtype=xpad.dtype)
    for t0 in range(0, ty_all, rows):
        n = min(rows, ty_all - t0)
        V = v_buf[:16 * Cin * n * tx].reshape(4, 4, Cin, n, tx)
        M = m_buf[:16 * Cout * n * tx].reshape(4, 4, Cout, n, tx)
        out = y[:, 2 * t0:2 * (t0 + n)].reshape(Cout, n, 2, tx, 2)  # (Cout, n, 2, tx, 2): tile rows and columns
        res = None if residual is None else residual[:, 2 * t0:2 * (t0 + n)].reshape(Cout, n, 2, tx, 2)

        def input_transform(c, V=V, t0=t0, n=n):                   # V = B^T d B: columns, then rows
            x = xpad[c[0]:c[1], 2 * t0:2 * (t0 + n) + 2]              # (c, 2n+2, W+2), the band's input rows
            ev, od = x[:, :, 0::2].copy(), x[:, :, 1::2].copy()       # (c, 2n+2, tx+1): unit-stride halves
            cols = (ev[:, :, :-1] - ev[:, :, 1:], od[:, :, :-1] + ev[:, :, 1:],
                    ev[:, :, 1:] - od[:, :, :-1], od[:, :, :-1] - od[:, :, 1:])          # 4 x (c, 2n+2, tx)
            for k, ck in enumerate(cols):
                r = [ck[:, i:i + 2 * n:2] for i in range(4)]                             # (c, n, tx)
                xp.subtract(r[0], r[2], out=V[0, k, c[0]:c[1]])
                xp.add(r[1], r[2], out=V[1, k, c[0]:c[1]])
                xp.subtract(r[2], r[1], out=V[2, k, c[0]:c[1]])
                xp.subtract(r[1], r[3], out=V[3, k, c[0]:c[1]])

        def gemm_output_transform(c, V=V, M=M, out=out, res=res, n=n):
            m = M[:, :, c[0]:c[1]]
            xp.matmul(U[:, c[0]:c[1]], V.reshape(16, Cin, n * tx),          # 16 x (c, Cin) @ (Cin, n*tx)
                      out=m.reshape(16, c[1] - c[0], n * tx))
            m[1, 1] += b[c[0]:c[1], None, None]     # M[1,1] enters all four outputs with weight +1: the bias
            half = [_at(m[0, j], m[1, j], m[2, j], m[3, j]) for j in range(4)]      # Y = A^T M A: rows,
            for a in range(2):
                for k, t in enumerate(_at(*(half[j][a] for j in range(4)))):         # then columns
                    if res is not None:
                        t += res[c[0]:c[1], :, a, :, k]
                    out[c[0]:c[1], :, a, :, k] = t
        _parallel(xp, input_transform, parts(Cin), V.size)
        _parallel(xp, gemm_output_transform, gemm_parts(Cout), M.size)
    return y


# ----------------------------------------------------------------------------
# GroupNorm(groups, C, eps=1e-6) with its affine, optionally followed by SiLU

def groupnorm_forward(x, gamma, beta, groups, eps=GN_EPS, silu=False, out=None):
    """x (C, H, W) -> (C, H, W): per group of C/groups channels, (x - mean) / sqrt(var + eps) * gamma + beta.

    Biased variance over the group's channels and pixels (two passes), applied as x * a + b per
    channel like PyTorch's GroupNorm kernel.  silu=True fuses the following SiLU, y / (1 + exp(-y)).
    out: where to write (e.g. a padded buffer's interior).  Work goes in blocks of whole channels of
    about PIECE elements, so that the passes over a block stay in cache.
    """
    xp = array_module_of(x)
    C, H, W = x.shape
    if out is None:
        out = xp.empty(x.shape, dtype=x.dtype)
    cg = C // groups
    step = max(1, min(cg, PIECE // (H * W)))                     # channels per block

    def one_group(g):
        c0, c1 = g * cg, (g + 1) * cg
        mean = x[c0:c1].mean(dtype=x.dtype)
        ss = 0.0
        for c in range(c0, c1, step):
            d = x[c:c + step] - mean
            d *= d
            ss += float(d.sum(dtype=x.dtype))
        a = gamma[c0:c1] * (1.0 / math.sqrt(ss / (cg * H * W) + eps))
        b = beta[c0:c1] - mean * a
        for c in range(c0, c1, step):
            y = x[c:c + step] * a[c - c0:c - c0 + step, None, None]
            y += b[c - c0:c - c0 + step, None, None]
            if silu:
                e = xp.negative(y)
                with np.errstate(over="ignore"):               # exp(-y) = inf for y < -88: y / inf = -0, the limit
                    xp.exp(e, out=e)
                e += 1
                xp.divide(y, e, out=out[c:c + step])
            else:
                out[c:c + step] = y
    _parallel(xp, one_group, range(groups), x.size)
    return out


# ----------------------------------------------------------------------------
# nearest-neighbour 2x upsampling (F.interpolate(scale_factor=2.0, mode="nearest"))

def upsample2x_forward(x, out=None):
    """(C, H, W) -> (C, 2H, 2W): every pixel repeated into a 2x2 block.  out: where to write."""
    xp = array_module_of(x)
    C, H, W = x.shape
    if out is None:
        out = xp.empty((C, 2 * H, 2 * W), dtype=x.dtype)

    def part(c):
        for a in (0, 1):
            for b in (0, 1):
                out[c[0]:c[1], a::2, b::2] = x[c[0]:c[1]]
    _parallel(xp, part, parts(C), out.size)
    return out


# ----------------------------------------------------------------------------
# single-head self-attention over the pixels (diffusers' Attention with group_norm,
# heads 1, residual_connection, as in the VAE's mid block)

def pixel_attention_forward(x, gn_w, gn_b, groups, wq, bq, wk, bk, wv, bv, wo, bo):
    """x (C, H, W) -> x + to_out(softmax(q^T k / sqrt(C)) v), q, k, v = to_q/k/v(GN(x)) over the H*W tokens.

    Linear weights (C, C) act on tokens as columns: W @ (C, T) + b.  The scale is folded into q,
    as PyTorch's SDPA does; query blocks of ATTN_ROWS bound the score matrix.
    """
    xp = array_module_of(x)
    C, H, W = x.shape
    T = H * W
    h = groupnorm_forward(x, gn_w, gn_b, groups).reshape(C, T)
    q, k, v, o = (xp.empty((C, T), dtype=x.dtype) for _ in range(4))
    linear_cols_forward(wq, h, bq, out=q)
    linear_cols_forward(wk, h, bk, out=k)
    linear_cols_forward(wv, h, bv, out=v)
    q *= 1.0 / math.sqrt(C)

    def block(r):
        s = q[:, r[0]:r[1]].T @ k                                   # (rows, C) @ (C, T) -> (rows, T)
        s -= s.max(axis=1, keepdims=True)
        p = xp.exp(s, out=s)
        p /= p.sum(axis=1, keepdims=True)
        xp.matmul(v, p.T, out=o[:, r[0]:r[1]])                      # (C, T) @ (T, rows) -> (C, rows)
    blocks = [(t, min(T, t + ATTN_ROWS)) for t in range(0, T, ATTN_ROWS)]
    _parallel(xp, block, blocks, T * T if parallel.SPLIT_GEMMS else 0)    # else BLAS's threads share each block
    y = linear_cols_forward(wo, o, bo, residual=x.reshape(C, T))
    return y.reshape(C, H, W)


def linear_cols_forward(w, x, b, residual=None, out=None):
    """w (Cout, Cin), x (Cin, N), b (Cout,) -> w @ x + b [+ residual] (Cout, N), rows shared by the pool."""
    xp = array_module_of(x)
    if out is None:
        out = xp.empty((w.shape[0], x.shape[1]), dtype=x.dtype)

    def rows(c):
        o = out[c[0]:c[1]]
        xp.matmul(w[c[0]:c[1]], x, out=o)
        o += b[c[0]:c[1], None]
        if residual is not None:
            o += residual[c[0]:c[1]]
    _parallel(xp, rows, gemm_parts(w.shape[0]), out.size)
    return out
