"""Fixed embeddings of DiT: timestep frequency features and 2-D sin-cos positions.

Both are computed on the host in NumPy (they are tiny) and moved to the
model's backend by the caller.
"""
import math

import numpy as np


def timestep_features(t, dim=256, max_period=10000):
    """Sinusoidal timestep features, official ``TimestepEmbedder.timestep_embedding``.

    Official arithmetic is float32: ``freqs = exp(-ln(max_period) * arange(half) / half)``
    and ``args = t.float() * freqs``; the output is ``[cos(args), sin(args)]`` (cos first).
    PyTorch's float32 exp/cos/sin are not correctly rounded (and differ between CPU
    and GPU), so tinylazy pins the features down: the same float32 arithmetic, with
    exp, cos and sin evaluated in float64 and rounded once to float32 (docs/numerics.md).

    t: (B,) timesteps (int or float).  Returns float32 (B, dim).
    """
    t = np.asarray(t).reshape(-1)
    half = dim // 2
    k = np.arange(half, dtype=np.float32)
    expo = (np.float32(-math.log(max_period)) * k) / np.float32(half)         # float32, as official
    freqs = np.exp(expo.astype(np.float64)).astype(np.float32)                 # correctly rounded
    args = t.astype(np.float32)[:, None] * freqs[None, :]                      # (B, half) float32
    a = args.astype(np.float64)
    emb = np.concatenate([np.cos(a), np.sin(a)], axis=-1).astype(np.float32)   # (B, 2*half)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _sincos_1d(embed_dim, pos):
    """MAE ``get_1d_sincos_pos_embed_from_grid``: (M,) positions -> (M, embed_dim), sin first."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega                       # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_2d(embed_dim, grid_size):
    """MAE ``get_2d_sincos_pos_embed`` as used by DiT: (grid_size**2, embed_dim) float64.

    The meshgrid puts the w coordinate first, so the first half of the channels
    encodes the column and the second half the row (official behaviour).
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)   # (2, G, G), w first
    emb_a = _sincos_1d(embed_dim // 2, grid[0])
    emb_b = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)           # (G*G, D)
