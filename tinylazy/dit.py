"""The DiT model (Peebles & Xie 2023), forward pass, keyed by the official parameter names.

Mirrors facebookresearch/DiT ``models.py``.  Each block is split into pieces
that the lazy sampler and the backward pass call one by one:

    mod = block_modulation(l, c_act)           # six (B, D) vectors from adaLN
    z   = modulated_input(x, shift, scale)     # modulate(LN(x)): the gate's input Z
    a   = attn(l, z);  x = x + gate_msa * a    # attention branch
    m   = mlp(l, z);   x = x + gate_mlp * m    # MLP branch
"""
import numpy as np

from . import ops
from .backend import get_xp, resolve_dtype, to_numpy
from .config import DiTConfig
from .embeddings import pos_embed_2d, timestep_features

FREQ_DIM = 256          # TimestepEmbedder.frequency_embedding_size
NUM_TIMESTEPS = 1000    # the model is called with original (0..999) timesteps


# ----------------------------------------------------------------------------
# Parameters

def param_shapes(cfg: DiTConfig):
    """Official state-dict names -> shapes, in the official module order."""
    D, C, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
    n_table = cfg.num_classes + (1 if cfg.class_dropout_prob > 0 else 0)
    shapes = {
        "pos_embed": (1, cfg.num_tokens, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, FREQ_DIM),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (n_table, D),
    }
    F = cfg.mlp_hidden
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (F, D), b + "mlp.fc1.bias": (F,),
            b + "mlp.fc2.weight": (D, F), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    shapes.update({
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
        "final_layer.linear.weight": (p * p * cfg.out_channels, D),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
    })
    return shapes


def init_params(cfg: DiTConfig, seed=0, scheme="official"):
    """Fresh float64 parameters.

    scheme="official": ``DiT.initialize_weights`` (xavier-uniform linears, zero biases,
    N(0, 0.02) label table and timestep MLP, adaLN-Zero and a zero final layer).
    scheme="random": every tensor random and non-zero (adaLN included), for tests
    whose point would be lost on zero-initialised modulation.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name == "pos_embed":
            params[name] = pos_embed_2d(cfg.hidden_size, cfg.grid_size).astype(np.float32).astype(np.float64)[None]
        elif scheme == "random":
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            std = 1.0 / np.sqrt(fan_in) if name.endswith("weight") and "embedding" not in name else 0.3
            params[name] = rng.normal(0.0, std, size=shape)
        elif scheme == "official":
            params[name] = _official_init(name, shape, rng)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
    return params


def _official_init(name, shape, rng):
    if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
        return np.zeros(shape)                                       # adaLN-Zero, zero final layer
    if name.endswith("bias"):
        return np.zeros(shape)
    if name.startswith("t_embedder") or name.startswith("y_embedder"):
        return rng.normal(0.0, 0.02, size=shape)
    fan_out, fan_in = shape[0], int(np.prod(shape[1:]))              # xavier_uniform_ on (out, -1)
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape)


# ----------------------------------------------------------------------------
# Model

class DiT:
    """A DiT with parameters ``self.params[name]`` (official names), on ``backend`` in ``dtype``.

    ``model(x, t, y)`` is the official ``DiT.forward``: x (B, C, H, W), t (B,) original
    timesteps 0..999, y (B,) class ids with ``num_classes`` the null class
    -> (B, out_channels, H, W).
    """

    def __init__(self, config: DiTConfig, params, dtype="float32", backend="numpy"):
        self.config = config.validate()
        self.dtype = resolve_dtype(dtype)
        self.backend = backend
        self.xp = get_xp(backend)
        expected = param_shapes(config)
        missing = [k for k in expected if k not in params]
        unexpected = [k for k in params if k not in expected]
        if missing or unexpected:
            raise ValueError(f"parameters do not match {config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, shape in expected.items():
            if tuple(params[k].shape) != shape:
                raise ValueError(f"parameter {k}: shape {tuple(params[k].shape)}, expected {shape}")
        self.params = {k: self.xp.asarray(params[k], dtype=self.dtype) for k in expected}

    @classmethod
    def from_config(cls, config, seed=0, scheme="official", dtype="float32", backend="numpy"):
        return cls(config, init_params(config, seed, scheme), dtype=dtype, backend=backend)

    # -- input checks ---------------------------------------------------------
    def _check_inputs(self, x, t, y):
        cfg, xp = self.config, self.xp
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {cfg.in_channels}, "
                             f"{cfg.input_size}, {cfg.input_size})")
        B = x.shape[0]
        t_host = np.asarray(to_numpy(t)).reshape(-1)
        if t_host.size == 1 and B != 1:
            t_host = np.repeat(t_host, B)
        if t_host.shape != (B,):
            raise ValueError(f"t has {t_host.size} entries for a batch of {B}")
        if np.any(t_host < 0) or np.any(t_host > NUM_TIMESTEPS - 1) or not np.all(np.isfinite(t_host)):
            raise ValueError(f"timesteps must lie in 0..{NUM_TIMESTEPS - 1}, got {t_host.min()}..{t_host.max()}")
        y_host = np.asarray(to_numpy(y)).reshape(-1)
        if y_host.shape != (B,):
            raise ValueError(f"y has {y_host.size} entries for a batch of {B}")
        n_rows = self.params["y_embedder.embedding_table.weight"].shape[0]
        if not np.issubdtype(y_host.dtype, np.integer) or np.any(y_host < 0) or np.any(y_host >= n_rows):
            raise ValueError(f"class labels must be integers in 0..{n_rows - 1} "
                             f"({cfg.num_classes} = null class), got {y_host.tolist()[:8]}")
        return xp.asarray(x, dtype=self.dtype), t_host, y_host

    # -- embeddings -------------------------------------------------------------
    def embed_tokens(self, x):
        """x (B, C, H, W) -> tokens (B, T, D): patch embedding plus the fixed position embedding."""
        P, p = self.params, self.config.patch_size
        h = ops.patch_embed_forward(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], p)
        h += P["pos_embed"]
        return h

    def timestep_embed(self, t):
        """t (B,) -> (B, D): features in float32 (reference.md), cast, then Linear-SiLU-Linear."""
        P = self.params
        f = self.xp.asarray(timestep_features(t, FREQ_DIM), dtype=self.dtype)
        h = ops.silu_forward(ops.linear_forward(f, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"]))
        return ops.linear_forward(h, P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])

    def class_embed(self, y):
        """y (B,) -> (B, D): a row of the label table (row num_classes = null)."""
        return self.params["y_embedder.embedding_table.weight"][self.xp.asarray(y)]

    def condition(self, t, y):
        """c = t_emb + y_emb; returns SiLU(c), the input of every adaLN modulation."""
        return ops.silu_forward(self.timestep_embed(t) + self.class_embed(y))

    # -- blocks -------------------------------------------------------------------
    def block_modulation(self, l, c_act):
        """(B, D) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D)."""
        P, D = self.params, self.config.hidden_size
        m = ops.linear_forward(c_act, P[f"blocks.{l}.adaLN_modulation.1.weight"],
                               P[f"blocks.{l}.adaLN_modulation.1.bias"])
        return tuple(m[:, i * D:(i + 1) * D] for i in range(6))

    @staticmethod
    def modulated_input(x, shift, scale):
        """modulate(LN(x), shift, scale): the input Z of a branch (and of its lazy gate)."""
        return ops.modulate_forward(ops.layernorm_forward(x), shift, scale)

    def attn(self, l, z):
        """Attention branch of block l, before the gate_msa multiply: (B, T, D) -> (B, T, D)."""
        P, H = self.params, self.config.num_heads
        B, T, D = z.shape
        qkv = ops.linear_forward(z, P[f"blocks.{l}.attn.qkv.weight"], P[f"blocks.{l}.attn.qkv.bias"])
        qkv = qkv.reshape(B, T, 3, H, D // H).transpose(2, 0, 3, 1, 4)   # (3, B, H, T, Dh)
        o = ops.sdpa_forward(qkv[0], qkv[1], qkv[2])                     # (B, H, T, Dh)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, D)                     # (B, T, D)
        return ops.linear_forward(o, P[f"blocks.{l}.attn.proj.weight"], P[f"blocks.{l}.attn.proj.bias"])

    def mlp(self, l, z):
        """MLP branch of block l, before the gate_mlp multiply: fc1 -> tanh-GELU -> fc2."""
        P = self.params
        h = ops.linear_forward(z, P[f"blocks.{l}.mlp.fc1.weight"], P[f"blocks.{l}.mlp.fc1.bias"])
        h = ops.gelu_tanh_forward(h)
        return ops.linear_forward(h, P[f"blocks.{l}.mlp.fc2.weight"], P[f"blocks.{l}.mlp.fc2.bias"])

    def block(self, l, x, c_act):
        """One adaLN-Zero block: x (B, T, D) -> (B, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.block_modulation(l, c_act)
        x = x + gate_msa[:, None, :] * self.attn(l, self.modulated_input(x, shift_msa, scale_msa))
        x = x + gate_mlp[:, None, :] * self.mlp(l, self.modulated_input(x, shift_mlp, scale_mlp))
        return x

    def final_layer(self, x, c_act):
        """Final adaLN layer and unpatchify: (B, T, D) -> (B, out_channels, H, W)."""
        P, D, cfg = self.params, self.config.hidden_size, self.config
        m = ops.linear_forward(c_act, P["final_layer.adaLN_modulation.1.weight"],
                               P["final_layer.adaLN_modulation.1.bias"])
        shift, scale = m[:, :D], m[:, D:]                                 # official order: shift first
        h = ops.linear_forward(self.modulated_input(x, shift, scale),
                               P["final_layer.linear.weight"], P["final_layer.linear.bias"])
        return ops.unpatchify(h, cfg.patch_size, cfg.out_channels)

    # -- full passes ----------------------------------------------------------------
    def forward(self, x, t, y):
        x, t, y = self._check_inputs(x, t, y)
        h = self.embed_tokens(x)
        c_act = self.condition(t, y)
        for l in range(self.config.depth):
            h = self.block(l, h, c_act)
        return self.final_layer(h, c_act)

    __call__ = forward

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        """Official ``forward_with_cfg``: batch = [cond half; uncond half].

        The first half of x is used for both halves; guidance is applied to the
        first ``guide_channels`` output channels (3 in the official code, a quirk
        kept for FID reproducibility); ``guide_channels=None`` guides all eps channels.
        """
        xp = self.xp
        x = xp.asarray(x, dtype=self.dtype)
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(xp.concatenate([half, half], axis=0), t, y)
        g = self.config.in_channels if guide_channels is None else guide_channels
        eps, rest = out[:, :g], out[:, g:]
        cond_eps, uncond_eps = eps[: len(eps) // 2], eps[len(eps) // 2:]
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return xp.concatenate([xp.concatenate([half_eps, half_eps], axis=0), rest], axis=1)

    # -- bookkeeping ---------------------------------------------------------------------
    def num_params(self):
        return int(sum(int(np.prod(v.shape)) for k, v in self.params.items() if k != "pos_embed"))

    def __repr__(self):
        c = self.config
        return (f"DiT(depth={c.depth}, hidden={c.hidden_size}, heads={c.num_heads}, patch={c.patch_size}, "
                f"input={c.in_channels}x{c.input_size}x{c.input_size}, classes={c.num_classes}, "
                f"dtype={self.dtype.name}, backend={self.backend})")
