"""Large-DiT (Alpha-VLLM's DiT_Llama, LLaMA2-Accessory ``Large-DiT-ImageNet/models.py``):
DiT's adaLN-Zero block with LLaMA parts, the paper's second model family (3B and 7B).

The same block schema as DiT (``dit.DiTSchema``): six adaLN vectors, then for attention
and for the feed-forward module ``z = modulate(norm(x), shift, scale)``,
``x = x + gate * branch(z)``.  What differs from DiT, and is implemented here as pieces:

* blocks are ``layers.{l}``; the norm before each branch is an RMSNorm with weight
  (``attention_norm`` / ``ffn_norm``, eps 1e-5) instead of a LayerNorm without parameters;
* attention: ``attention.wq/wk/wv/wo`` without bias, an optional LayerNorm with weight and
  bias on the whole q and k (``q_norm`` / ``k_norm``, before the head split), rotary
  embeddings on q and k over the flattened token index (no position table is added);
* the feed-forward module is SwiGLU: ``w2(silu(w1 z) * w3 z)``, hidden int(2 * 4D / 3)
  rounded up to a multiple of 256;
* the patch embedder is a Linear on flattened patches, and the timestep and label
  embedders and every adaLN input have width min(D, 1024).

The timestep and label embedders, the conditioning, the adaLN modulation, the final layer,
the input checks and ``forward_with_cfg`` are DiT's own (inherited from ``dit.DiT``; only
widths differ).  Parameters sit in a ``storage.BlockWeights`` mapping, so a model can run
from memory-mapped float32, float16 or bfloat16 weights that are converted to the model
dtype a block at a time (``large_dit_io.load_large_dit``).  Backward passes: input and
parameter gradients, as ``DiT`` (gate training uses the input gradients).
"""
import dataclasses
import zlib
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from . import llama_ops, ops
from .backend import get_xp, resolve_dtype
from .config import LatentGeometry
from .dit import FREQ_DIM, DiT, check_params
from .storage import BlockWeights

ADALN_MAX = 1024           # min(dim, 1024): width of the timestep/label embedders and of every adaLN input
NORMS = {"attn": "attention_norm", "mlp": "ffn_norm"}       # the RMSNorm before each branch

# What makes each Large-DiT trace tensor (trace.OPS holds DiT's; the names the two share with the
# same meaning, conditioning, modulation and the final layer, keep DiT's descriptions).
OPS = {
    "embed/tokens": "x_embedder(patchify(x)) (N, T, D): a Linear on (C, p, p) patches, no position table",
    "attn/norm": "attention_norm(x): x / sqrt(mean(x^2) + 1e-5) * weight (N, T, D)",
    "attn/z": "norm * (1 + scale_msa) + shift_msa (N, T, D)",
    "attn/q": "attention.wq(z) (n, T, D), head h in columns h*Dh..(h+1)*Dh",
    "attn/k": "attention.wk(z) (n, T, D)",
    "attn/v": "attention.wv(z) (n, T, D)",
    "attn/q_rope": "rotary embedding of q_norm(q) (q itself without qk-norm), heads merged (n, T, D)",
    "attn/k_rope": "rotary embedding of k_norm(k) (k itself without qk-norm), heads merged (n, T, D)",
    "attn/probs": "softmax(q_rope k_rope^T / sqrt(Dh)) per head (n, H, T, T)",
    "attn/o": "probs @ v, heads merged (n, T, D): the input of attention.wo",
    "attn/out": "attention.wo(o), or the cached output when skipped (N, T, D), before the gate_msa multiply",
    "mlp/norm": "ffn_norm(x): x / sqrt(mean(x^2) + 1e-5) * weight (N, T, D); x = attn/residual",
    "mlp/z": "norm * (1 + scale_mlp) + shift_mlp (N, T, D)",
    "mlp/hidden": "feed_forward.w1(z) (n, T, F)",
    "mlp/up": "feed_forward.w3(z) (n, T, F)",
    "mlp/act": "silu(hidden) * up (n, T, F)",
    "mlp/out": "feed_forward.w2(act), or the cached output when skipped (N, T, D), before the gate_mlp multiply",
}


# ----------------------------------------------------------------------------
# Configuration

def ffn_hidden_size(dim, multiple_of=256, ffn_dim_multiplier=None):
    """The official FeedForward width: int(2 * 4D / 3), times ffn_dim_multiplier if given,
    rounded up to a multiple of multiple_of (DiT_Llama: 256, no multiplier)."""
    f = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        f = int(ffn_dim_multiplier * f)
    return multiple_of * ((f + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class LargeDiTConfig(LatentGeometry):
    """DiT_Llama's constructor arguments, with the official defaults.

    ffn_hidden and cond_size are derived when None (the official rules, ``ffn_hidden_size``
    and min(D, 1024)) and stored resolved, so a config read from a file equals the
    registry's (the official multiple_of / ffn_dim_multiplier arguments only choose
    ffn_hidden: pass ``ffn_hidden_size(D, multiple_of, multiplier)``).  qk_norm_groups: how
    many slices of q and k the q/k LayerNorm normalises separately (the model-parallel
    size the checkpoint was trained with; 1 for one rank)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 4096
    depth: int = 32
    num_heads: int = 32
    ffn_hidden: Optional[int] = None
    norm_eps: float = 1e-5
    qk_norm: bool = False
    qk_norm_groups: int = 1
    cond_size: Optional[int] = None
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1

    family: ClassVar[str] = "large-dit"
    block_prefix: ClassVar[str] = "layers"

    def __post_init__(self):
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", ffn_hidden_size(self.hidden_size))
        if self.cond_size is None:
            object.__setattr__(self, "cond_size", min(self.hidden_size, ADALN_MAX))

    @property
    def mlp_hidden(self):
        return self.ffn_hidden

    def validate(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                     "ffn_hidden", "cond_size", "qk_norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads or self.head_dim % 2:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be an even integer "
                             f"(rotary embeddings rotate pairs of a head's values)")
        if self.num_heads % self.qk_norm_groups:
            raise ValueError(f"qk_norm_groups {self.qk_norm_groups} must divide num_heads {self.num_heads}")
        if self.num_tokens > llama_ops.ROPE_POSITIONS:
            raise ValueError(f"{self.num_tokens} tokens exceed the {llama_ops.ROPE_POSITIONS} positions of the "
                             f"official rotary table")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        return self

    def identity(self):
        """What the weights hash covers of this config (``io.config_identity``): every field that
        changes what the weights compute.  As for DiT, class_dropout_prob counts only as whether
        the label table has a null row, and the q/k-norm groups only when there is a q/k norm,
        so two configs that build the same network have the same identity."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["null_class"] = bool(d.pop("class_dropout_prob") > 0)
        d["qk_norm_groups"] = self.qk_norm_groups if self.qk_norm else 1
        return d

    def replace(self, **kw):
        derived = {k: None for k in ("ffn_hidden", "cond_size") if k not in kw and "hidden_size" in kw}
        return dataclasses.replace(self, **derived, **kw).validate()

    def module_macs(self):
        """Multiply-accumulates per sample row of each part of one forward (lazy.module_macs)."""
        T, D, F, Dc = self.num_tokens, self.hidden_size, self.ffn_hidden, self.cond_size
        pc = self.patch_size ** 2 * self.in_channels
        return {
            "attn": 4 * T * D * D + 2 * T * T * D,          # wq, wk, wv, wo; q k^T and p v
            "mlp": 3 * T * D * F,                           # w1, w3, w2
            "adaLN": 6 * D * Dc,                            # per block
            "gate": T * D,
            "embed": T * pc * D + FREQ_DIM * Dc + Dc * Dc,  # patches, timestep MLP
            "final": 2 * D * Dc + T * D * self.patch_size ** 2 * self.out_channels,
        }


# The official registry (models.py ``DiT_models``): 32 heads each, patch 2.
LARGE_DIT_CONFIGS = {
    "DiT_Llama_600M_patch2": LargeDiTConfig(hidden_size=1536, depth=16, num_heads=32),
    "DiT_Llama_3B_patch2": LargeDiTConfig(hidden_size=3072, depth=32, num_heads=32),
    "DiT_Llama_7B_patch2": LargeDiTConfig(hidden_size=4096, depth=32, num_heads=32),
}
HEADS_BY_WIDTH = {c.hidden_size: c.num_heads for c in LARGE_DIT_CONFIGS.values()}

# The tiny random model of the Large-DiT goldens (tests/golden/tiny-large-dit.*; large_dit_io.write_tiny):
# two blocks with q/k norm in two groups and the adaLN width below D, as the 3B and 7B have it.
TINY = LargeDiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=4, ffn_hidden=64, cond_size=16,
                      qk_norm=True, qk_norm_groups=2, num_classes=10)


def get_large_config(name, **overrides):
    """A registered Large-DiT configuration by its official name ("DiT_Llama_3B_patch2"; "3B" also works)."""
    key = name if name in LARGE_DIT_CONFIGS else f"DiT_Llama_{name}_patch2"
    if key not in LARGE_DIT_CONFIGS:
        raise KeyError(f"unknown Large-DiT configuration {name!r}; known: {', '.join(LARGE_DIT_CONFIGS)}")
    return LARGE_DIT_CONFIGS[key].replace(**overrides) if overrides else LARGE_DIT_CONFIGS[key]


# ----------------------------------------------------------------------------
# Parameters

def param_shapes(cfg: LargeDiTConfig):
    """Official state-dict names -> shapes, in the official module order."""
    D, F, Dc, p = cfg.hidden_size, cfg.ffn_hidden, cfg.cond_size, cfg.patch_size
    n_table = cfg.num_classes + (1 if cfg.class_dropout_prob > 0 else 0)
    shapes = {
        "x_embedder.weight": (D, p * p * cfg.in_channels),
        "x_embedder.bias": (D,),
        "t_embedder.mlp.0.weight": (Dc, FREQ_DIM),
        "t_embedder.mlp.0.bias": (Dc,),
        "t_embedder.mlp.2.weight": (Dc, Dc),
        "t_embedder.mlp.2.bias": (Dc,),
        "y_embedder.embedding_table.weight": (n_table, Dc),
    }
    for i in range(cfg.depth):
        b = f"layers.{i}."
        shapes.update({b + f"attention.{w}.weight": (D, D) for w in ("wq", "wk", "wv", "wo")})
        if cfg.qk_norm:
            shapes.update({b + f"attention.{n}_norm.{k}": (D,) for n in "qk" for k in ("weight", "bias")})
        shapes.update({
            b + "feed_forward.w1.weight": (F, D), b + "feed_forward.w2.weight": (D, F),
            b + "feed_forward.w3.weight": (F, D),
            b + "attention_norm.weight": (D,), b + "ffn_norm.weight": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, Dc), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    shapes.update({
        "final_layer.linear.weight": (p * p * cfg.out_channels, D),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, Dc),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })
    return shapes


def init_param(name, shape, seed=0, scheme="official", dtype=np.float64):
    """One fresh parameter, drawn from its own stream (seed, crc32 of the name), so that any
    tensor can be made alone (the benchmarks write multi-GB files a tensor at a time).

    scheme="official": DiT_Llama's initialisation (xavier-uniform linears, zero biases,
    N(0, 0.02) embedders, norm weights 1, zero adaLN and final layer).  scheme="random":
    every tensor non-zero, uniform float32 values (fast enough for billions) with standard
    deviation 1/sqrt(fan_in) for matrices, 0.3 for vectors and the label table, norm
    weights around 1, for tests and benchmarks."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    dtype = np.dtype(dtype)
    is_norm = name.endswith("norm.weight")
    if scheme == "random":
        std = 1.0 / np.sqrt(shape[1]) if len(shape) == 2 and "embedding" not in name else 0.2 if is_norm else 0.3
        a = rng.random(shape, dtype=np.float32)
        a -= np.float32(0.5)
        a *= np.float32(std * np.sqrt(12.0))                            # uniform, standard deviation std
        if is_norm:
            a += np.float32(1.0)
        return a.astype(dtype, copy=False)
    if scheme != "official":
        raise ValueError(f"unknown init scheme {scheme!r}")
    if is_norm:
        return np.ones(shape, dtype)
    if "adaLN_modulation" in name or name.startswith("final_layer.linear") or len(shape) == 1:
        return np.zeros(shape, dtype)                                  # adaLN-Zero, zero final layer, biases
    if name.startswith(("t_embedder", "y_embedder")):
        return (0.02 * rng.standard_normal(shape)).astype(dtype)
    a = np.sqrt(6.0 / (shape[0] + shape[1]))                            # xavier_uniform_ on (out, in)
    return rng.uniform(-a, a, size=shape).astype(dtype)


def init_params(cfg: LargeDiTConfig, seed=0, scheme="official", dtype=np.float64):
    """Fresh parameters (official names -> arrays); see ``init_param``."""
    return {name: init_param(name, shape, seed, scheme, dtype) for name, shape in param_shapes(cfg).items()}


# ----------------------------------------------------------------------------
# Model

class LargeDiT(DiT):
    """A Large-DiT with parameters ``self.params[name]`` (official names), on NumPy in ``dtype``.

    ``params`` given to the constructor may be NumPy arrays (memory-mapped ones included)
    of float64, float32 or float16, or ``storage.Bfloat16Array``: they are kept as given
    and converted to ``dtype`` a block at a time (``storage.BlockWeights``).  The forward,
    ``forward_with_cfg``, ``forward_train`` / ``backward`` and the branch hook are those
    of ``dit.DiT``; the pieces that differ are below.
    """

    BLOCK = "layers"
    X_EMBEDDER, POS_EMBED = "x_embedder", False     # a Linear on flattened patches, no position table
    OPS = OPS

    def __init__(self, config: LargeDiTConfig, params, dtype="float32", backend="numpy", weights_hash=None):
        self.config = config.validate()
        self.weights_hash = weights_hash
        self.dtype = resolve_dtype(dtype)
        if backend != "numpy":
            raise ValueError(f"Large-DiT runs on the NumPy backend only (got backend={backend!r})")
        self.backend, self.xp = backend, get_xp(backend)
        expected = check_params(params, param_shapes(config), config)
        self.params = BlockWeights({k: params[k] for k in expected}, self.dtype)
        cos, sin = llama_ops.rope_table(config.head_dim, config.num_tokens)
        self.rope = cos.astype(self.dtype), sin.astype(self.dtype)     # (T, Dh/2), float32 values

    @classmethod
    def from_config(cls, config, seed=0, scheme="official", dtype="float32", backend="numpy"):
        return cls(config, init_params(config, seed, scheme), dtype=dtype, backend=backend)

    # -- the input of a branch: RMSNorm with the block's weight, then modulate -------------
    def branch_input(self, l, kind, x, shift, scale, cache=None):
        """modulate(RMSNorm(x) * w, shift, scale), w = layers.{l}.attention_norm / ffn_norm.

        cache: xhat (B, T, D), rstd (B, T, 1), w (D,), scale (B, D)."""
        w = self.params[f"layers.{l}.{NORMS[kind]}.weight"]
        n, xhat, rstd = llama_ops.rmsnorm_forward(x, w, self.config.norm_eps, return_cache=True)
        if cache is not None:
            cache.update(xhat=xhat, rstd=rstd, w=w, scale=scale)
        return ops.modulate_forward(n, shift, scale)

    def branch_input_backward(self, l, kind, dz, cache, grads=None):
        """dz (B, T, D) -> dx (B, T, D), dshift, dscale (B, D) (None, None with grads=None)."""
        pg, xhat, w = grads is not None, cache["xhat"], cache["w"]
        dn, dshift, dscale = ops.modulate_backward(dz, xhat * w if pg else None, cache["scale"], pg)
        dx, dw = llama_ops.rmsnorm_backward(dn, xhat, cache["rstd"], w, pg)
        if pg:
            grads[f"layers.{l}.{NORMS[kind]}.weight"] = dw
        return dx, dshift, dscale

    def record_branch_input(self, l, kind, x, z):
        """The RMSNorm output (recomputed: the same op on the same array) and Z."""
        w = self.params[f"layers.{l}.{NORMS[kind]}.weight"]
        self.record(f"block.{l:02d}/{kind}/norm", llama_ops.rmsnorm_forward(x, w, self.config.norm_eps))
        self.record(f"block.{l:02d}/{kind}/z", z)

    # -- attention: wq, wk, wv, optional q/k LayerNorm, rotary embeddings, SDPA, wo ------------
    def attn(self, l, z, cache=None):
        """Attention branch of block l, before the gate_msa multiply: (B, T, D) -> (B, T, D).

        cache: z; with qk-norm per n in q, k: "{n}_hat" (B, T, D), "{n}_rstd" (B, T, G, 1);
        q, k (B, T, H, Dh) after the rotary embedding, v (B, T, H, Dh), lse (B, H, T, 1),
        o (B, T, D)."""
        P, cfg, pre = self.params, self.config, f"layers.{l}.attention."
        B, T, D = z.shape
        H, Dh = cfg.num_heads, cfg.head_dim
        q, k, v = (ops.linear_forward(z, P[pre + f"{w}.weight"]) for w in ("wq", "wk", "wv"))   # (B, T, D) each
        if self.recorder is not None:
            for name, a in zip("qkv", (q, k, v)):
                self.record(f"block.{l:02d}/attn/{name}", a)
        rotated = []
        for name, a in (("q", q), ("k", k)):
            if cfg.qk_norm:
                a, hat, rstd = llama_ops.layernorm_affine_forward(
                    a, P[pre + f"{name}_norm.weight"], P[pre + f"{name}_norm.bias"], cfg.qk_norm_groups,
                    return_cache=True)
                if cache is not None:
                    cache.update({f"{name}_hat": hat, f"{name}_rstd": rstd})
            r = llama_ops.rope_forward(a.reshape(B, T, H, Dh), *self.rope)             # (B, T, H, Dh)
            if self.recorder is not None:
                self.record(f"block.{l:02d}/attn/{name}_rope", r.reshape(B, T, D))
            rotated.append(r)
        q, k = rotated
        v = v.reshape(B, T, H, Dh)
        heads = lambda a: a.transpose(0, 2, 1, 3)                                      # (B, T, H, Dh) -> (B, H, T, Dh)
        if self.recorder is not None and self.recorder.attn_probs:
            s = (heads(q) * (1.0 / float(np.sqrt(Dh)))) @ heads(k).swapaxes(-1, -2)   # as ops.sdpa_forward
            self.record(f"block.{l:02d}/attn/probs", ops.softmax_forward(s))
        o = ops.empty((B, T, H, Dh), z.dtype, self.xp)
        res = ops.sdpa_forward(heads(q), heads(k), heads(v), return_lse=cache is not None, out=heads(o))
        o = o.reshape(B, T, D)
        if cache is not None:
            cache.update(z=z, q=q, k=k, v=v, lse=res[1], o=o)
        if self.recorder is not None:
            self.record(f"block.{l:02d}/attn/o", o)
        return ops.linear_forward(o, P[pre + "wo.weight"])

    def attn_backward(self, l, da, cache, grads=None):
        """da (B, T, D), the gradient of the branch output -> dz (B, T, D)."""
        P, cfg, pre, pg = self.params, self.config, f"layers.{l}.attention.", grads is not None
        B, T, D = da.shape
        H, Dh = cfg.num_heads, cfg.head_dim
        do, dw, _ = ops.linear_backward(da, cache["o"], P[pre + "wo.weight"], pg)
        if pg:
            grads[pre + "wo.weight"] = dw
        heads = lambda a: a.transpose(0, 2, 1, 3)
        dq, dk, dv = (ops.empty((B, T, H, Dh), da.dtype, self.xp) for _ in range(3))
        ops.sdpa_backward(heads(do.reshape(B, T, H, Dh)), heads(cache["q"]), heads(cache["k"]), heads(cache["v"]),
                          heads(cache["o"].reshape(B, T, H, Dh)), cache["lse"], grads_out=(heads(dq), heads(dk),
                                                                                        heads(dv)))
        dz = None
        for name, d in (("q", dq), ("k", dk), ("v", dv)):
            d = d.reshape(B, T, D)
            if name != "v":
                d = llama_ops.rope_backward(d.reshape(B, T, H, Dh), *self.rope).reshape(B, T, D)
                if cfg.qk_norm:
                    d, dwn, dbn = llama_ops.layernorm_affine_backward(
                        d, cache[f"{name}_hat"], cache[f"{name}_rstd"], P[pre + f"{name}_norm.weight"], pg)
                    if pg:
                        grads[pre + f"{name}_norm.weight"], grads[pre + f"{name}_norm.bias"] = dwn, dbn
            dzi, dw, _ = ops.linear_backward(d, cache["z"], P[pre + f"w{name}.weight"], pg)
            if pg:
                grads[pre + f"w{name}.weight"] = dw
            dz = dzi if dz is None else dz + dzi
        return dz

    # -- feed-forward: SwiGLU ----------------------------------------------------------------
    def mlp(self, l, z, cache=None):
        """Feed-forward branch of block l, before the gate_mlp multiply: w2(silu(w1 z) * w3 z).

        cache: z, h1 = w1 z and h3 = w3 z (B, T, F)."""
        P, pre = self.params, f"layers.{l}.feed_forward."
        h1 = ops.linear_forward(z, P[pre + "w1.weight"])
        h3 = ops.linear_forward(z, P[pre + "w3.weight"])
        g = llama_ops.swiglu_forward(h1, h3)
        if cache is not None:
            cache.update(z=z, h1=h1, h3=h3)
        if self.recorder is not None:
            for name, a in (("hidden", h1), ("up", h3), ("act", g)):
                self.record(f"block.{l:02d}/mlp/{name}", a)
        return ops.linear_forward(g, P[pre + "w2.weight"])

    def mlp_backward(self, l, dm, cache, grads=None):
        """dm (B, T, D), the gradient of the branch output -> dz (B, T, D)."""
        P, pre, pg = self.params, f"layers.{l}.feed_forward.", grads is not None
        h1, h3 = cache["h1"], cache["h3"]
        dg, dw, _ = ops.linear_backward(dm, llama_ops.swiglu_forward(h1, h3) if pg else None, P[pre + "w2.weight"], pg)
        if pg:
            grads[pre + "w2.weight"] = dw
        dh1, dh3 = llama_ops.swiglu_backward(dg, h1, h3)
        dz, dw1, _ = ops.linear_backward(dh1, cache["z"], P[pre + "w1.weight"], pg)
        dz3, dw3, _ = ops.linear_backward(dh3, cache["z"], P[pre + "w3.weight"], pg)
        dz += dz3
        if pg:
            grads[pre + "w1.weight"], grads[pre + "w3.weight"] = dw1, dw3
        return dz

    # -- bookkeeping ------------------------------------------------------------------------
    def num_params(self):
        return int(sum(int(np.prod(s)) for s in param_shapes(self.config).values()))

    def __repr__(self):
        c = self.config
        return (f"LargeDiT(depth={c.depth}, hidden={c.hidden_size}, heads={c.num_heads}, ffn={c.ffn_hidden}, "
                f"cond={c.cond_size}, qk_norm={c.qk_norm}, patch={c.patch_size}, "
                f"input={c.in_channels}x{c.input_size}x{c.input_size}, classes={c.num_classes}, "
                f"dtype={self.dtype.name})")
