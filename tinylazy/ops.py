"""The ops of the DiT forward pass, written against NumPy/CuPy (``xp``).

Each op is a plain function on arrays of the model dtype.  The backward of an
op sits next to its forward (``foo_forward`` / ``foo_backward``) and keeps only
the cache it needs.  Shapes: B batch, T tokens, D hidden, H heads, Dh = D / H.
"""
import math

from .backend import array_module_of

LN_EPS = 1e-6                                  # DiT's LayerNorm(elementwise_affine=False, eps=1e-6)
GELU_K = math.sqrt(2.0 / math.pi)              # tanh-GELU: 0.5 x (1 + tanh(k (x + 0.044715 x^3)))
GELU_C = 0.044715


# ----------------------------------------------------------------------------
# linear: y = x W^T + b, W in the official (out, in) layout

def linear_forward(x, w, b=None):
    """(..., in) -> (..., out)."""
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]) @ w.T          # (N, in) @ (in, out) -> (N, out)
    if b is not None:
        y += b
    return y.reshape(*lead, w.shape[0])


# ----------------------------------------------------------------------------
# SiLU

def silu_forward(x):
    xp = array_module_of(x)
    return x / (1 + xp.exp(-x))


# ----------------------------------------------------------------------------
# tanh-GELU (nn.GELU(approximate="tanh"))

def gelu_tanh_forward(x):
    xp = array_module_of(x)
    inner = x * x
    inner *= GELU_C * x
    inner += x
    inner *= GELU_K
    y = xp.tanh(inner, out=inner)
    y += 1
    y *= x
    y *= 0.5
    return y


# ----------------------------------------------------------------------------
# LayerNorm without affine over the last axis

def layernorm_forward(x, eps=LN_EPS):
    """(..., D) -> (..., D): (x - mean) / sqrt(var + eps), biased variance."""
    xp = array_module_of(x)
    xc = x - x.mean(axis=-1, keepdims=True)
    var = (xc * xc).mean(axis=-1, keepdims=True)
    xc *= 1.0 / xp.sqrt(var + eps)
    return xc


# ----------------------------------------------------------------------------
# modulate (adaLN): x * (1 + scale) + shift, per-sample shift/scale broadcast over tokens

def modulate_forward(x, shift, scale):
    """x (B, T, D), shift/scale (B, D) -> (B, T, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------
# softmax over the last axis (numerically stable)

def softmax_forward(s):
    xp = array_module_of(s)
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s, out=s)
    p /= p.sum(axis=-1, keepdims=True)
    return p


# ----------------------------------------------------------------------------
# scaled dot-product attention: softmax(q k^T / sqrt(Dh)) v

def sdpa_forward(q, k, v):
    """q, k, v (B, H, T, Dh) -> (B, H, T, Dh).  Scale folded into q, as PyTorch's SDPA does."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = softmax_forward((q * scale) @ k.swapaxes(-1, -2))   # (B, H, T, T)
    return p @ v


# ----------------------------------------------------------------------------
# patch embedding: Conv2d(C, D, kernel=p, stride=p), then flatten(2).transpose(1, 2)

def patchify(x, p):
    """(B, C, H, W) -> (B, T, C*p*p), tokens row-major over the (H/p, W/p) grid."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).transpose(0, 2, 4, 1, 3, 5)   # (B, h, w, C, p, p)
    return x.reshape(B, h * w, C * p * p)


def patch_embed_forward(x, w, b, p):
    """x (B, C, H, W), w (D, C, p, p), b (D,) -> (B, T, D)."""
    return linear_forward(patchify(x, p), w.reshape(w.shape[0], -1), b)


# ----------------------------------------------------------------------------
# unpatchify: (B, T, p*p*C) -> (B, C, H, W) via einsum 'nhwpqc->nchpwq'

def unpatchify(x, p, c):
    B, T, _ = x.shape
    h = w = int(round(math.sqrt(T)))
    x = x.reshape(B, h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4)    # (B, c, h, p, w, p)
    return x.reshape(B, c, h * p, w * p)
