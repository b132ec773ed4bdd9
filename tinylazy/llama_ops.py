"""The LLaMA ops of Large-DiT (Alpha-VLLM's DiT_Llama), forward and backward side by side.

RMSNorm (apex ``FusedRMSNorm``), the affine LayerNorm of the optional q/k norm
(``nn.LayerNorm``), rotary position embeddings over the flattened token index, and the
SwiGLU gate ``silu(w1 z) * w3 z``.  The rest of Large-DiT (linears, attention, modulate,
the gated residual, the final LayerNorm) is ``tinylazy.ops``.  As there, each backward
takes only the cache its docstring names and never modifies its arguments.
Shapes: B batch, T tokens, D hidden, H heads, Dh = D / H.
"""
import numpy as np

from . import ops
from .backend import array_module_of
from .parallel import rowwise

RMS_EPS = 1e-5                 # DiT_Llama norm_eps (RMSNorm of attention_norm / ffn_norm)
QK_NORM_EPS = 1e-5             # nn.LayerNorm's default eps (q_norm / k_norm)
ROPE_THETA = 10000.0           # precompute_freqs_cis(head_dim, 4096, theta=10000.0)
ROPE_POSITIONS = 4096          # positions the official table covers


def _rows(x):
    return x.reshape(-1, x.shape[-1])                     # (..., n) -> (N, n)


# ----------------------------------------------------------------------------
# RMSNorm with weight: y = x / sqrt(mean(x^2) + eps) * w

def _rmsnorm_kernel(xhat, rstd, x, eps):
    xp = array_module_of(x)
    ms = xp.einsum("nd,nd->n", x, x)[:, None]                 # (N, 1) sum of squares
    ms /= x.shape[-1]
    ms += eps
    xp.sqrt(ms, out=ms)
    xp.divide(1.0, ms, out=rstd)
    xp.multiply(x, rstd, out=xhat)


def rmsnorm_forward(x, w, eps=RMS_EPS, return_cache=False):
    """(..., D), w (D,) -> y (..., D): the normalised x times w, in that order (apex).

    With ``return_cache`` returns (y, xhat, rstd): xhat = x * rstd (..., D) and
    rstd = 1 / sqrt(mean(x^2) + eps) (..., 1), the backward's cache with w."""
    xp = array_module_of(x)
    xhat = ops.empty(x.shape, x.dtype, xp)
    rstd = ops.empty(x.shape[:-1] + (1,), x.dtype, xp)
    rowwise(lambda a, r, b: _rmsnorm_kernel(a, r, b, eps), _rows(xhat), _rows(rstd), _rows(x))
    y = xhat * w
    return (y, xhat, rstd) if return_cache else y


def rmsnorm_backward(dy, xhat, rstd, w, weight_grad=True):
    """dy (..., D); cache: xhat, rstd, w.  -> dx (..., D), dw (D,) (None without ``weight_grad``).

    With g = dy w: dx = rstd (g - xhat mean(g xhat)), the mean over the last axis."""
    xp = array_module_of(dy)
    g = dy * w
    dot = xp.einsum("...d,...d->...", g, xhat)[..., None]     # (..., 1)
    dot *= 1.0 / xhat.shape[-1]
    dx = xhat * dot
    xp.subtract(g, dx, out=dx)
    dx *= rstd
    dw = xp.einsum("nd,nd->d", _rows(dy), _rows(xhat)) if weight_grad else None
    return dx, dw


# ----------------------------------------------------------------------------
# LayerNorm with weight and bias (q_norm / k_norm), over ``groups`` equal slices of the last axis

def layernorm_affine_forward(x, w, b, groups=1, eps=QK_NORM_EPS, return_cache=False):
    """(..., D) -> LN(x) * w + b, LN over each of ``groups`` slices of D / groups (1: all of D).

    Official q/k norm: ``nn.LayerNorm`` over the q (or k) of one model-parallel rank, so a
    checkpoint trained on M ranks normalises M groups of heads separately.  With
    ``return_cache`` returns (y, xhat, rstd): xhat (..., D), rstd (..., groups, 1)."""
    lead, D = x.shape[:-1], x.shape[-1]
    xhat, rstd = ops.layernorm_forward(x.reshape(*lead, groups, D // groups), eps, return_rstd=True)
    xhat = xhat.reshape(x.shape)
    y = xhat * w
    y += b
    return (y, xhat, rstd) if return_cache else y


def layernorm_affine_backward(dy, xhat, rstd, w, param_grads=True):
    """dy (..., D); cache: xhat, rstd (..., groups, 1), w.  -> dx, dw (D,), db (D,) (None, None
    without ``param_grads``)."""
    xp = array_module_of(dy)
    lead, D, groups = dy.shape[:-1], dy.shape[-1], rstd.shape[-2]
    split = lambda a: a.reshape(*lead, groups, D // groups)                 # (..., D) -> (..., G, D/G)
    dx = ops.layernorm_backward(split(dy * w), split(xhat), rstd).reshape(dy.shape)
    if not param_grads:
        return dx, None, None
    return dx, xp.einsum("nd,nd->d", _rows(dy), _rows(xhat)), _rows(dy).sum(axis=0)


# ----------------------------------------------------------------------------
# Rotary position embeddings (RoPE) over the flattened token index

def rope_table(head_dim, positions, theta=ROPE_THETA):
    """cos, sin (positions, head_dim / 2) float32: the official ``precompute_freqs_cis``.

    Official float32 arithmetic: e = float(arange(0, Dh, 2)) / Dh, freqs = 1 / theta**e,
    angles = t * freqs (t = 0, 1, ...), then cos and sin.  PyTorch's float32 pow, cos and
    sin are not correctly rounded (and differ between CPU and GPU); as for the timestep
    features (embeddings.timestep_features), tinylazy evaluates them in float64 and rounds
    once to float32, the official float32 arithmetic elsewhere (docs/large-dit.md)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    e = np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / np.float32(head_dim)
    p = np.power(np.float64(theta), e.astype(np.float64)).astype(np.float32)      # theta ** e, rounded once
    freqs = np.float32(1.0) / p                                                    # float32 division
    angles = np.outer(np.arange(positions, dtype=np.float32), freqs)              # (T, Dh/2) float32 products
    a = angles.astype(np.float64)
    return np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)


def rope_forward(x, cos, sin):
    """x (B, T, H, Dh), cos/sin (T, Dh/2) -> (B, T, H, Dh): each pair (x[2i], x[2i+1]) of a
    head, taken as the complex number x[2i] + i x[2i+1], times cos + i sin of its token's angle."""
    xp = array_module_of(x)
    a, b = x[..., 0::2], x[..., 1::2]                         # (B, T, H, Dh/2) real and imaginary parts
    c, s = cos[None, :, None, :], sin[None, :, None, :]       # (1, T, 1, Dh/2)
    y = ops.empty(x.shape, x.dtype, xp)
    re, im = y[..., 0::2], y[..., 1::2]
    xp.multiply(a, c, out=re)
    re -= b * s                                               # (a + ib)(c + is) = (ac - bs) + i(as + bc)
    xp.multiply(a, s, out=im)
    im += b * c
    return y


def rope_backward(dy, cos, sin):
    """dy (B, T, H, Dh) -> dx: the rotation is orthogonal, so the backward rotates by -angle."""
    return rope_forward(dy, cos, -sin)


# ----------------------------------------------------------------------------
# SwiGLU: g = silu(h1) * h3, h1 = w1 z, h3 = w3 z

def swiglu_forward(h1, h3):
    """h1, h3 (..., F) -> silu(h1) * h3 (the official ``F.silu(x1) * x3``)."""
    g = ops.silu_forward(h1)
    g *= h3
    return g


def swiglu_backward(dg, h1, h3):
    """dg (..., F); cache: h1, h3.  -> dh1 = dg h3 silu'(h1), dh3 = dg silu(h1)."""
    dh3 = ops.silu_forward(h1)
    dh3 *= dg
    return ops.silu_backward(dg * h3, h1), dh3
