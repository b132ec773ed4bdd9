"""DiT's timestep features written out for the tests, independently of tinylazy.embeddings.

Official ``TimestepEmbedder.timestep_embedding`` (facebookresearch/DiT models.py) is float32:

    freqs = exp(-math.log(max_period) * arange(half, dtype=float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = cat([cos(args), sin(args)], dim=-1)          # cos first; a zero column if dim is odd

Here every float32 operation of that code is one operation on Python floats rounded to
float32 (``f32``): the product of two float32 numbers (24 significant bits each, and the
integers k < 128, t < 1000) is exact in a Python float, so one rounding gives the float32
product; a quotient rounded twice (53 bits, then 24) is still the correctly rounded float32
quotient (53 >= 2 * 24 + 2), and for half = 128 it is exact anyway.  The scalar -ln(max_period) meets a float32
tensor, so PyTorch rounds it to float32 first.  exp, cos and sin are ``math``'s float64
functions rounded once to float32: the "correctly rounded" features that tinylazy
defines (README, Numerics), since PyTorch's own float32 exp/cos/sin differ between CPU
and GPU by an ulp.  Needs neither torch nor tinylazy.
"""
import math
import struct

import numpy as np


def f32(x):
    """The float32 nearest to the Python float x (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def official_timestep_features(t, dim=256, max_period=10000):
    """(B,) timesteps -> (B, dim) float32 features, [cos | sin]."""
    half = dim // 2
    scale = f32(-math.log(max_period))                                  # the Python scalar, as float32
    freqs = [f32(math.exp(f32(f32(scale * k) / half))) for k in range(half)]
    ts = np.asarray(t).reshape(-1)
    out = np.zeros((len(ts), dim), dtype=np.float32)
    for i, ti in enumerate(ts):
        args = [f32(f32(float(ti)) * f) for f in freqs]                 # t.float() * freqs, in float32
        out[i, :half] = [f32(math.cos(a)) for a in args]
        out[i, half:2 * half] = [f32(math.sin(a)) for a in args]
    return out
