"""The image ops of the VAE: 2-D convolution, GroupNorm(+SiLU), nearest upsampling.

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
  256x256x128 im2col would be 300 MB in float32) and keeps them in cache;
- ops write straight into the zero-bordered buffer the next convolution reads
  (``pad_buffer``), and elementwise work runs in cache-sized pieces on a small
  thread pool (NumPy's ufuncs release the GIL), next to BLAS's own threads.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backend import array_module_of

GN_EPS = 1e-6              # every GroupNorm of diffusers' AutoencoderKL (resnet_eps and conv_norm_out)
BAND_BYTES = 8 << 20       # im2col / Winograd band buffers: a few MB stays in the last-level cache
PIECE = 1 << 16            # elements per block of elementwise work: 256 KB in float32, within L2
_threads = {"n": min(os.cpu_count() or 1, 8), "pool": None}


# ----------------------------------------------------------------------------
# thread pool for elementwise work

def set_num_threads(n):
    """Threads for the elementwise ops (BLAS keeps its own setting, e.g. OPENBLAS_NUM_THREADS)."""
    if int(n) < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    if _threads["pool"] is not None:
        _threads["pool"].shutdown()
    _threads.update(n=int(n), pool=None)


def _parallel(xp, fn, items):
    """fn(item) for every item: on the pool for NumPy, in order for CuPy (the GPU queues them anyway)."""
    items = list(items)
    if xp is not np or _threads["n"] == 1 or len(items) == 1:
        for it in items:
            fn(it)
        return
    if _threads["pool"] is None:
        _threads["pool"] = ThreadPoolExecutor(_threads["n"], thread_name_prefix="tinylazy")
    for f in [_threads["pool"].submit(fn, it) for it in items]:
        f.result()


def _split(n, parts):
    """[0, n) as at most ``parts`` contiguous (start, stop) ranges."""
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


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
    if k == 1 and stride == 1:
        y = w.reshape(Cout, Cin) @ xpad.reshape(Cin, Hp * Wp)         # (Cout, Cin) @ (Cin, HW)
        y += b[:, None]
        if residual is not None:
            y += residual.reshape(Cout, -1)
        return y.reshape(Cout, Ho, Wo)
    wmat = w.reshape(Cout, Cin * k * k)             # rows ordered (cin, ky, kx), as the cols below
    y = xp.empty((Cout, Ho * Wo), dtype=xpad.dtype)
    res = None if residual is None else residual.reshape(Cout, Ho * Wo)
    rows = max(1, min(Ho, BAND_BYTES // (Cin * k * k * Wo * xpad.itemsize)))
    cols_buf = xp.empty(Cin * k * k * rows * Wo, dtype=xpad.dtype)
    chunks = _split(Cin, _threads["n"])
    for r0 in range(0, Ho, rows):
        r1 = min(Ho, r0 + rows)
        cols = cols_buf[:Cin * k * k * (r1 - r0) * Wo].reshape(Cin, k, k, r1 - r0, Wo)

        def fill(c, r0=r0, r1=r1, cols=cols):      # cols[c, ky, kx, i, j] = xpad[c, s*i + ky, s*j + kx]
            for ky in range(k):
                y0 = r0 * stride + ky
                for kx in range(k):
                    cols[c[0]:c[1], ky, kx] = xpad[c[0]:c[1], y0:y0 + (r1 - r0 - 1) * stride + 1:stride,
                                                   kx:kx + (Wo - 1) * stride + 1:stride]
        _parallel(xp, fill, chunks)
        band = y[:, r0 * Wo:r1 * Wo]
        xp.matmul(wmat, cols.reshape(Cin * k * k, (r1 - r0) * Wo), out=band)   # (Cout, K) @ (K, rows*Wo)
        band += b[:, None]
        if res is not None:
            band += res[:, r0 * Wo:r1 * Wo]
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
    per_row = 16 * max(Cin, Cout) * tx * xpad.itemsize
    rows = max(1, min(ty_all, BAND_BYTES // per_row))              # tile rows per band
    v_buf = xp.empty(16 * Cin * rows * tx, dtype=xpad.dtype)
    m_buf = xp.empty(16 * Cout * rows * tx, dtype=xpad.dtype)
    bias = b[:, None, None]                                       # (Cout, 1, 1)
    cin_parts, cout_parts = _split(Cin, _threads["n"]), _split(Cout, _threads["n"])
    for t0 in range(0, ty_all, rows):
        n = min(rows, ty_all - t0)
        V = v_buf[:16 * Cin * n * tx].reshape(4, 4, Cin, n, tx)

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
        _parallel(xp, input_transform, cin_parts)
        M = m_buf[:16 * Cout * n * tx].reshape(16, Cout, n * tx)
        xp.matmul(U, V.reshape(16, Cin, n * tx), out=M)            # 16 x (Cout, Cin) @ (Cin, n*tx)
        M = M.reshape(4, 4, Cout, n, tx)
        out = y[:, 2 * t0:2 * (t0 + n)].reshape(Cout, n, 2, tx, 2)  # (Cout, n, 2, tx, 2): tile rows and columns
        res = None if residual is None else residual[:, 2 * t0:2 * (t0 + n)].reshape(Cout, n, 2, tx, 2)

        def output_transform(c, M=M, out=out, res=res):            # Y = A^T M A + bias (+ residual)
            m = M[:, :, c[0]:c[1]]
            m[1, 1] += bias[c[0]:c[1]]             # M[1,1] enters all four outputs with weight +1
            for a in range(2):
                if a == 0:
                    r = [m[0, j] + m[1, j] for j in range(4)]
                    for j in range(4):
                        r[j] += m[2, j]
                else:
                    r = [m[1, j] - m[2, j] for j in range(4)]
                    for j in range(4):
                        r[j] -= m[3, j]
                for k, (u, v, w, sign) in enumerate(((r[0], r[1], r[2], 1), (r[1], r[2], r[3], -1))):
                    t = u + v if sign > 0 else u - v
                    if res is not None:
                        t += res[c[0]:c[1], :, a, :, k]
                    (xp.add if sign > 0 else xp.subtract)(t, w, out=out[c[0]:c[1], :, a, :, k])
        _parallel(xp, output_transform, cout_parts)
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
                xp.exp(e, out=e)
                e += 1
                xp.divide(y, e, out=out[c:c + step])
            else:
                out[c:c + step] = y
    _parallel(xp, one_group, range(groups))
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
    _parallel(xp, part, _split(C, _threads["n"]))
    return out
