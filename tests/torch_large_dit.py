"""A PyTorch stand-in with the official Large-DiT numerics (Alpha-VLLM DiT_Llama, models.py).

Written for the tests from the official structure, model parallelism taken out (one rank:
fairscale's Column/RowParallelLinear and ParallelEmbedding are plain Linear and Embedding,
apex's FusedRMSNorm is the RMSNorm below, flash-attn is SDPA, which the official code
uses for float32), so its state dict has the official keys.  Test-only.

Two official float32 islands are options, as the timestep features are in torch_dit.py: by
default the timestep features and the rotary table are PyTorch's own float32 exp/pow/cos/sin,
as in the official code; ``pinned_tables=True`` puts in correctly rounded ones, written here and
in tests/official_features.py independently of tinylazy (a test that compares at 1e-12 needs
them, and says so where it asks for them).  ``rope_float32=True`` rotates q and k in float32 as
the official ``apply_rotary_emb`` does (``xq.float()``; a no-op in float32), False rotates in
the model dtype, as tinylazy's float64 audit mode does.
``qk_norm_groups`` > 1 builds the q/k LayerNorm of a checkpoint trained on that many
model-parallel ranks (each normalises its own slice of heads).
"""
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from official_features import f32
from torch_dit import LabelEmbedder, TimestepEmbedder, TorchDiT, modulate


class RMSNorm(nn.Module):
    """apex FusedRMSNorm: weight * (x * rsqrt(mean(x^2) + eps))."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class GroupedLayerNorm(nn.Module):
    """nn.LayerNorm(D) on one rank (groups=1), or one per model-parallel rank's slice of D."""

    def __init__(self, dim, groups):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        D, g = x.shape[-1], self.groups
        parts = [F.layer_norm(p, (D // g,), w, b, 1e-5)
                 for p, w, b in zip(x.split(D // g, -1), self.weight.split(D // g), self.bias.split(D // g))]
        return torch.cat(parts, dim=-1)


def official_freqs_cis(dim, end, theta=10000.0):
    """The official precompute_freqs_cis, verbatim in its arithmetic (complex64)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


@functools.lru_cache(maxsize=None)
def pinned_freqs_cis(dim, end, theta=10000.0):
    """precompute_freqs_cis's float32 arithmetic with each operation rounded once to float32
    (``f32`` of the Python float result; see official_features.py): e = float(2i) / dim,
    freqs = 1 / theta**e, angle = t * freqs, then cos and sin, the non-elementary functions
    being ``math``'s float64 ones rounded once."""
    freqs = [f32(1.0 / f32(theta ** f32(float(2 * i) / dim))) for i in range(dim // 2)]
    angles = [[f32(float(t) * f) for f in freqs] for t in range(end)]
    cos = np.array([[f32(math.cos(a)) for a in row] for row in angles], np.float32)
    sin = np.array([[f32(math.sin(a)) for a in row] for row in angles], np.float32)
    return torch.complex(torch.from_numpy(cos), torch.from_numpy(sin))


class Attention(nn.Module):
    def __init__(self, dim, n_heads, qk_norm, groups, rope_float32):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        if qk_norm:
            self.q_norm, self.k_norm = GroupedLayerNorm(dim, groups), GroupedLayerNorm(dim, groups)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.rope_float32 = rope_float32

    def apply_rotary_emb(self, xq, xk, freqs_cis):
        cast = (lambda a: a.float()) if self.rope_float32 else (lambda a: a)
        cdt = torch.complex64 if self.rope_float32 or xq.dtype == torch.float32 else torch.complex128
        xq_ = torch.view_as_complex(cast(xq).reshape(*xq.shape[:-1], -1, 2).contiguous())
        xk_ = torch.view_as_complex(cast(xk).reshape(*xk.shape[:-1], -1, 2).contiguous())
        f = freqs_cis.to(cdt).view(1, xq_.shape[1], 1, xq_.shape[-1])
        return (torch.view_as_real(xq_ * f).flatten(3).type_as(xq),
                torch.view_as_real(xk_ * f).flatten(3).type_as(xk))

    def forward(self, x, freqs_cis):
        B, T, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq = xq.view(B, T, self.n_heads, self.head_dim)
        xk = xk.view(B, T, self.n_heads, self.head_dim)
        xv = xv.view(B, T, self.n_heads, self.head_dim)
        xq, xk = self.apply_rotary_emb(xq, xk, freqs_cis)
        out = F.scaled_dot_product_attention(xq.permute(0, 2, 1, 3), xk.permute(0, 2, 1, 3), xv.permute(0, 2, 1, 3))
        return self.wo(out.permute(0, 2, 1, 3).flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg, rope_float32):
        super().__init__()
        D = cfg.hidden_size
        self.attention = Attention(D, cfg.num_heads, cfg.qk_norm, cfg.qk_norm_groups, rope_float32)
        self.feed_forward = FeedForward(D, cfg.ffn_hidden)
        self.attention_norm = RMSNorm(D, cfg.norm_eps)
        self.ffn_norm = RMSNorm(D, cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_size, 6 * D))

    def forward(self, x, freqs_cis, adaln_input):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(adaln_input).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa),
                                                       freqs_cis)
        return x + gate_mlp.unsqueeze(1) * self.feed_forward(modulate(self.ffn_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, p * p * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_size, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TorchLargeDiT(nn.Module):
    def __init__(self, cfg, pinned_tables=False, rope_float32=False):
        super().__init__()
        self.cfg = cfg
        p, C = cfg.patch_size, cfg.in_channels
        self.x_embedder = nn.Linear(p * p * C, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.cond_size, pinned_features=pinned_tables)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.cond_size)
        self.layers = nn.ModuleList([TransformerBlock(cfg, rope_float32) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.freqs_cis = self.rotary_table(cfg, pinned_tables)

    @staticmethod
    def rotary_table(cfg, pinned):
        """The official table of 4096 positions (pinned: the first num_tokens, all that are used)."""
        return pinned_freqs_cis(cfg.head_dim, cfg.num_tokens) if pinned else official_freqs_cis(cfg.head_dim, 4096)

    @classmethod
    def from_params(cls, cfg, params, dtype=torch.float64, share=False, **kw):
        """The stand-in with ``params`` (official names); share=True wraps same-dtype NumPy arrays
        without a copy (full-width blocks)."""
        with torch.device("meta"):                                   # no default initialisation: assigned below
            m = cls(cfg, **kw)
        m.freqs_cis = cls.rotary_table(cfg, kw.get("pinned_tables", False))
        sd = {}
        for k, v in params.items():
            a = np.asarray(v)
            sd[k] = torch.from_numpy(a) if share and a.dtype == np.dtype(str(dtype).split(".")[1]) else \
                torch.from_numpy(np.asarray(a, dtype=np.float64)).to(dtype)
        m.load_state_dict(sd, strict=True, assign=True)
        return m

    def patchify(self, x):
        B, C, H, W = x.size()
        p = self.cfg.patch_size
        x = x.view(B, C, H // p, p, W // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)

    unpatchify = TorchDiT.unpatchify
    forward_with_cfg = TorchDiT.forward_with_cfg

    def forward(self, x, t, y):
        x = self.x_embedder(self.patchify(x))
        adaln_input = self.t_embedder(t) + self.y_embedder(y)
        freqs = self.freqs_cis[: x.size(1)]
        for layer in self.layers:
            x = layer(x, freqs, adaln_input)
        return self.unpatchify(self.final_layer(x, adaln_input))
