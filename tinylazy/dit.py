"""The DiT model (Peebles & Xie 2023), forward and backward passes, keyed by the official parameter names.

Mirrors facebookresearch/DiT ``models.py``.  ``DiTSchema`` writes the forward once,
the official block being modulate -> branch -> gated residual, twice:

    mod = block_modulation(l, c_act)           # six (B, D) vectors from adaLN
    z   = modulated_input(x, shift, scale)     # modulate(LN(x)): the gate's input Z
    a   = branch(l, "attn", z);  x = x + gate_msa * a
    m   = branch(l, "mlp", z);   x = x + gate_mlp * m

over pieces that ``DiT`` implements with ``tinylazy.ops`` and the OpenCL backend with
its kernels.  A ``branch=`` hook replaces the module call (lazy reuse, gate training's
soft blend; see protocol.py).  Each piece ``foo`` of ``DiT`` fills an optional ``cache``
dict and has a ``foo_backward`` that reads it, written in the same order reversed with
the same names.
"""

import numpy as np

from . import ops
from .backend import get_xp, resolve_dtype, to_numpy
from .config import DiTConfig
from .embeddings import pos_embed_2d, timestep_features
from .protocol import check_cfg_scale

FREQ_DIM = 256          # TimestepEmbedder.frequency_embedding_size
NUM_TIMESTEPS = 1000    # the model is called with original (0..999) timesteps
MODULATION_NAMES = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")   # official chunk order


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

def _check_array(name, a):
    """Model inputs are arrays (NumPy, or CuPy on that backend); lists and scalars are a TypeError."""
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        raise TypeError(f"{name} must be a NumPy or CuPy array of shape (B, C, H, W), got {type(a).__name__}")


def check_params(params, expected, config):
    """A ValueError unless ``params`` has exactly the names of ``expected`` (name -> shape), in
    those shapes; returns ``expected``."""
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected]
    if missing or unexpected:
        raise ValueError(f"parameters do not match {config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if tuple(params[k].shape) != shape:
            raise ValueError(f"parameter {k}: shape {tuple(params[k].shape)}, expected {shape}")
    return expected


def _sub(cache, name):
    """The part of ``cache`` that the piece ``name`` fills, or None when nothing is kept."""
    if cache is None:
        return None
    cache[name] = {}
    return cache[name]


def _put(grads, prefix, dw, db):
    grads[prefix + ".weight"] = dw
    grads[prefix + ".bias"] = db


class DiTSchema:
    """The DiT forward written once (official ``DiT.forward`` and ``DiTBlock.forward``) over the
    pieces a backend implements: ``DiT`` with ``tinylazy.ops`` (and caches for the backward),
    ``opencl.OpenCLDiT`` with fused kernels on device buffers.

        embed_tokens(x, cache) -> h                  patches + pos_embed (B, T, D)
        condition(t, y, cache) -> c_act              SiLU(t_emb + y_emb) (B, D)
        block_modulation(l, c_act, cache) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        modulated_input(x, shift, scale, cache) -> z     modulate(LN(x), shift, scale)
        branch_input(l, kind, x, shift, scale, cache) -> z   a branch's Z (default: modulated_input)
        branch(l, kind, z, cache) -> out             the attention or MLP module (protocol.py)
        gated_residual(x, gate, out) -> x            x + gate * out
        final_layer(h, c_act, cache) -> out          final adaLN, linear and unpatchify
        record_inputs, record_branch_input, record_branch_output     (only while ``recorder`` is set)

    ``cache`` is a dict each piece fills for its backward, or None; ``branch`` a hook that
    replaces ``self.branch`` (protocol.py).
    """

    # A tinylazy.trace.Recorder receives every named intermediate while it is set;
    # when None (the default) each recording point costs one ``is None`` test.
    recorder = None

    def forward_checked(self, x, t, y, cache=None, branch=None):
        """The forward on inputs that ``check_inputs`` returned.

        cache keys: "embed", "cond", "blocks.{l}" (l = 0..depth-1), "final"."""
        if self.recorder is not None:
            self.record_inputs(x, t, y)
        h = self.embed_tokens(x, _sub(cache, "embed"))
        c_act = self.condition(t, y, _sub(cache, "cond"))
        for l in range(self.config.depth):
            h = self.block(l, h, c_act, _sub(cache, f"blocks.{l}"), branch)
        return self.final_layer(h, c_act, _sub(cache, "final"))

    def block(self, l, x, c_act, cache=None, branch=None):
        """One adaLN-Zero block, x (B, T, D) -> (B, T, D): attention, then MLP.

        cache: "modulation", and per kind "{kind}_in" (branch_input's), "{kind}" (the
        branch's), "gate_{kind}" (B, D) and, without a hook, "out_{kind}" (B, T, D) the branch
        output (for the gate gradient)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.block_modulation(
            l, c_act, _sub(cache, "modulation"))
        x = self.residual_branch(l, "attn", x, shift_msa, scale_msa, gate_msa, cache, branch)
        return self.residual_branch(l, "mlp", x, shift_mlp, scale_mlp, gate_mlp, cache, branch)

    def branch_input(self, l, kind, x, shift, scale, cache=None):
        """The input Z of module ``kind`` of block l: modulate(norm(x), shift, scale).  DiT's
        norm is one LayerNorm without parameters (``modulated_input``); a family whose norm has
        per-block weights (large_dit.LargeDiT's RMSNorm) overrides this."""
        return self.modulated_input(x, shift, scale, cache)

    def residual_branch(self, l, kind, x, shift, scale, gate, cache=None, branch=None):
        """x + gate * branch(l, kind, modulate(LN(x), shift, scale)): one half of a block."""
        z = self.branch_input(l, kind, x, shift, scale, _sub(cache, f"{kind}_in"))
        if self.recorder is not None:
            self.record_branch_input(l, kind, x, z)
        out = (self.branch if branch is None else branch)(l, kind, z, _sub(cache, kind))
        x = self.gated_residual(x, gate, out)
        if self.recorder is not None:
            self.record_branch_output(l, kind, out, x)
        if cache is not None:
            cache[f"gate_{kind}"] = gate
            if branch is None:                     # a hook's backward is its own (lazy_train.soft_backward)
                cache[f"out_{kind}"] = out
        return x


class DiT(DiTSchema):
    """A DiT with parameters ``self.params[name]`` (official names), on ``backend`` in ``dtype``.

    ``model(x, t, y)`` is the official ``DiT.forward``: x (B, C, H, W), t (B,) original
    timesteps 0..999, y (B,) class ids with ``num_classes`` the null class
    -> (B, out_channels, H, W).

    Training: ``out, cache = model.forward_train(x, t, y)`` keeps the activations the
    backward needs, and ``grads, dx = model.backward(dout, cache)`` returns dL/dparam
    under the official names and dL/dx, given dout = dL/dout.  Every piece of the
    forward takes an optional ``cache`` dict that it fills, and has a ``*_backward``
    that reads it; a ``grads`` dict receives parameter gradients, and ``grads=None``
    computes input gradients only (the frozen-DiT case of LazyDiT's gate training).
    weights_hash: ``io.weights_hash`` of ``params`` when the caller knows it (``load_dit``).
    """

    BLOCK = "blocks"                                  # official name of the block list: blocks.{l}.
    X_EMBEDDER, POS_EMBED = "x_embedder.proj", True   # the patch embedder; a position table is added
    OPS = {}                                          # trace op descriptions that differ from trace.OPS

    def __init__(self, config: DiTConfig, params, dtype="float32", backend="numpy", weights_hash=None):
        self.config = config.validate()
        self.weights_hash = weights_hash
        self.dtype = resolve_dtype(dtype)
        self.backend = backend
        self.xp = get_xp(backend)
        expected = check_params(params, param_shapes(config), config)
        self.params = {k: self.xp.asarray(params[k], dtype=self.dtype) for k in expected}

    @classmethod
    def from_config(cls, config, seed=0, scheme="official", dtype="float32", backend="numpy"):
        return cls(config, init_params(config, seed, scheme), dtype=dtype, backend=backend)

    # -- input checks ---------------------------------------------------------
    def check_inputs(self, x, t, y):
        """-> x as a model array, t and y (B,) on the host; a ValueError for bad shapes or values."""
        cfg, xp = self.config, self.xp
        _check_array("x", x)
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
    def embed_tokens(self, x, cache=None):
        """x (B, C, H, W) -> tokens (B, T, D): patch embedding plus the fixed position embedding
        (``POS_EMBED``; Large-DiT has none).  The embedder's weight is a conv's (D, C, p, p) or a
        Linear's (D, C*p*p): the same numbers in the same order.

        cache: x (referenced, not copied: leave it unchanged until the backward)."""
        P, p = self.params, self.config.patch_size
        h = ops.patch_embed_forward(x, P[self.X_EMBEDDER + ".weight"], P[self.X_EMBEDDER + ".bias"], p)
        if self.POS_EMBED:
            h += P["pos_embed"]
        if self.recorder is not None:
            self.record("embed/tokens", h)
        if cache is not None:
            cache["x"] = x
        return h

    def embed_tokens_backward(self, dh, cache, grads=None):
        """dh (B, T, D) -> dx (B, C, H, W).  pos_embed is a frozen buffer (official), so it gets no gradient."""
        dx, dw, db = ops.patch_embed_backward(dh, cache["x"], self.params[self.X_EMBEDDER + ".weight"],
                                              self.config.patch_size, grads is not None)
        if grads is not None:
            _put(grads, self.X_EMBEDDER, dw, db)
        return dx

    def timestep_embed(self, t, cache=None):
        """t (B,) -> (B, D): features in float32 (docs/numerics.md), cast, then Linear-SiLU-Linear.

        cache: features (B, 256), hidden (B, D) before the SiLU."""
        P = self.params
        f = self.xp.asarray(timestep_features(t, FREQ_DIM), dtype=self.dtype)
        h = ops.linear_forward(f, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"])
        if cache is not None:
            cache.update(features=f, hidden=h)
        emb = ops.linear_forward(ops.silu_forward(h), P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
        if self.recorder is not None:
            self.recorder("cond/t_freq", f)
            self.recorder("cond/t_emb", emb)
        return emb

    def timestep_embed_backward(self, demb, cache, grads):
        """demb (B, D) -> parameter gradients only: the features are constant."""
        P, h = self.params, cache["hidden"]
        ds, dw, db = ops.linear_backward(demb, ops.silu_forward(h), P["t_embedder.mlp.2.weight"])
        _put(grads, "t_embedder.mlp.2", dw, db)
        dh = ops.silu_backward(ds, h)
        _, dw, db = ops.linear_backward(dh, cache["features"], P["t_embedder.mlp.0.weight"], input_grad=False)
        _put(grads, "t_embedder.mlp.0", dw, db)

    def class_embed(self, y, cache=None):
        """y (B,) -> (B, D): a row of the label table (row num_classes = null).  cache: y."""
        y = self.xp.asarray(y)
        if cache is not None:
            cache["y"] = y
        emb = ops.embedding_forward(self.params["y_embedder.embedding_table.weight"], y)
        if self.recorder is not None:
            self.recorder("cond/y_emb", emb)
        return emb

    def class_embed_backward(self, demb, cache, grads):
        """demb (B, D) -> the label table's gradient (rows of repeated labels add up)."""
        name = "y_embedder.embedding_table.weight"
        grads[name] = ops.embedding_backward(demb, cache["y"], self.params[name].shape[0])

    def condition(self, t, y, cache=None):
        """c = t_emb + y_emb; returns SiLU(c), the input of every adaLN modulation.

        cache: t and y (the embedders' caches), c (B, D)."""
        c = self.timestep_embed(t, _sub(cache, "t")) + self.class_embed(y, _sub(cache, "y"))
        if self.recorder is not None:
            self.recorder("cond/c", c)
        if cache is not None:
            cache["c"] = c
        return ops.silu_forward(c)

    def condition_backward(self, dc_act, cache, grads):
        """dc_act (B, D), the gradient of SiLU(c) summed over all its uses -> embedder gradients."""
        dc = ops.silu_backward(dc_act, cache["c"])
        self.class_embed_backward(dc, cache["y"], grads)
        self.timestep_embed_backward(dc, cache["t"], grads)

    # -- blocks -------------------------------------------------------------------
    def block_modulation(self, l, c_act, cache=None):
        """(B, D) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D).

        cache: c_act (referenced; every block shares the one array)."""
        P, D = self.params, self.config.hidden_size
        m = ops.linear_forward(c_act, P[f"{self.BLOCK}.{l}.adaLN_modulation.1.weight"],
                               P[f"{self.BLOCK}.{l}.adaLN_modulation.1.bias"])
        if cache is not None:
            cache["c_act"] = c_act
        mods = tuple(m[:, i * D:(i + 1) * D] for i in range(6))
        if self.recorder is not None:
            for name, v in zip(MODULATION_NAMES, mods):
                self.recorder(f"block.{l:02d}/mod/{name}", v)
        return mods

    def block_modulation_backward(self, l, dmods, cache, grads):
        """dmods: the six (B, D) gradients in forward order -> dc_act (B, D)."""
        dm = self.xp.concatenate(dmods, axis=1)                           # 6 x (B, D) -> (B, 6D)
        name = f"{self.BLOCK}.{l}.adaLN_modulation.1"
        dc_act, dw, db = ops.linear_backward(dm, cache["c_act"], self.params[name + ".weight"])
        _put(grads, name, dw, db)
        return dc_act

    @staticmethod
    def modulated_input(x, shift, scale, cache=None):
        """modulate(LN(x), shift, scale): the input Z of a branch (and of its lazy gate).

        cache: xhat = LN(x) (B, T, D), rstd (B, T, 1), scale (B, D)."""
        if cache is None:                          # one pass, the same bits (ops: the float32 fast path)
            return ops.layernorm_modulate_forward(x, shift, scale)
        xhat, rstd = ops.layernorm_forward(x, return_rstd=True)
        cache.update(xhat=xhat, rstd=rstd, scale=scale)
        return ops.modulate_forward(xhat, shift, scale)

    @staticmethod
    def modulated_input_backward(dz, cache, mod_grads=True):
        """dz (B, T, D) -> dx (B, T, D), dshift, dscale (B, D); the last two None without mod_grads."""
        dxhat, dshift, dscale = ops.modulate_backward(dz, cache["xhat"], cache["scale"], mod_grads)
        return ops.layernorm_backward(dxhat, cache["xhat"], cache["rstd"]), dshift, dscale

    def branch_input_backward(self, l, kind, dz, cache, grads=None):
        """dz (B, T, D), the gradient of ``branch_input``'s Z -> dx (B, T, D), dshift, dscale (B, D);
        the last two None with grads=None (no parameter gradients asked for)."""
        return self.modulated_input_backward(dz, cache, grads is not None)

    def attn(self, l, z, cache=None):
        """Attention branch of block l, before the gate_msa multiply: (B, T, D) -> (B, T, D).

        cache: z, qkv (3, B, H, T, Dh) (a view of the qkv linear's output), lse (B, H, T, 1),
        o (B, T, D) the proj input."""
        P, H = self.params, self.config.num_heads
        B, T, D = z.shape
        qkv = ops.linear_forward(z, P[f"blocks.{l}.attn.qkv.weight"], P[f"blocks.{l}.attn.qkv.bias"])
        if self.recorder is not None:
            self._record_qkv(l, qkv)
        qkv = qkv.reshape(B, T, 3, H, D // H).transpose(2, 0, 3, 1, 4)   # (3, B, H, T, Dh)
        o = ops.empty((B, T, H, D // H), qkv.dtype, self.xp)            # written as (B, H, T, Dh)
        res = ops.sdpa_forward(qkv[0], qkv[1], qkv[2], return_lse=cache is not None, out=o.transpose(0, 2, 1, 3))
        lse = res[1] if cache is not None else None
        o = o.reshape(B, T, D)
        if cache is not None:
            cache.update(z=z, qkv=qkv, lse=lse, o=o)
        if self.recorder is not None:
            self.recorder(f"block.{l:02d}/attn/o", o)
        return ops.linear_forward(o, P[f"blocks.{l}.attn.proj.weight"], P[f"blocks.{l}.attn.proj.bias"])

    def attn_backward(self, l, da, cache, grads=None):
        """da (B, T, D), the gradient of the branch output -> dz (B, T, D)."""
        P, H, pg = self.params, self.config.num_heads, grads is not None
        B, T, D = da.shape
        q, k, v = cache["qkv"]
        do, dw, db = ops.linear_backward(da, cache["o"], P[f"blocks.{l}.attn.proj.weight"], pg)
        if pg:
            _put(grads, f"blocks.{l}.attn.proj", dw, db)
        do = do.reshape(B, T, H, D // H).transpose(0, 2, 1, 3)           # (B, T, D) -> (B, H, T, Dh)
        o = cache["o"].reshape(B, T, H, D // H).transpose(0, 2, 1, 3)
        dqkv = ops.empty((B, T, 3, H, D // H), da.dtype, self.xp)
        ops.sdpa_backward(do, q, k, v, o, cache["lse"], grads_out=dqkv.transpose(2, 0, 3, 1, 4))  # (3, B, H, T, Dh)
        dz, dw, db = ops.linear_backward(dqkv.reshape(B, T, 3 * D), cache["z"],
                                         P[f"blocks.{l}.attn.qkv.weight"], pg)
        if pg:
            _put(grads, f"blocks.{l}.attn.qkv", dw, db)
        return dz

    def mlp(self, l, z, cache=None):
        """MLP branch of block l, before the gate_mlp multiply: fc1 -> tanh-GELU -> fc2.

        cache: z, h (B, T, 4D) the GELU input, s its gate (the output h s is recomputed for fc2's dW)."""
        P, pre = self.params, f"blocks.{l}.mlp."
        m, h, s, g = ops.mlp_forward(z, P[pre + "fc1.weight"], P[pre + "fc1.bias"], P[pre + "fc2.weight"],
                                     P[pre + "fc2.bias"], return_hidden=cache is not None or self.recorder is not None,
                                     return_act=self.recorder is not None)
        if cache is not None:
            cache.update(z=z, h=h, s=s)
        if self.recorder is not None:
            self.recorder(f"block.{l:02d}/mlp/hidden", h)
            self.recorder(f"block.{l:02d}/mlp/act", g)
        return m

    def mlp_backward(self, l, dm, cache, grads=None):
        """dm (B, T, D), the gradient of the branch output -> dz (B, T, D)."""
        P, pg, h, s = self.params, grads is not None, cache["h"], cache["s"]
        dg, dw, db = ops.linear_backward(dm, ops.gelu_tanh_output(h, s) if pg else None,
                                         P[f"blocks.{l}.mlp.fc2.weight"], pg)
        if pg:
            _put(grads, f"blocks.{l}.mlp.fc2", dw, db)
        dh = ops.gelu_tanh_backward(dg, h, s)
        dz, dw, db = ops.linear_backward(dh, cache["z"], P[f"blocks.{l}.mlp.fc1.weight"], pg)
        if pg:
            _put(grads, f"blocks.{l}.mlp.fc1", dw, db)
        return dz

    def branch(self, l, kind, z, cache=None):
        """The module ``kind`` of block l on z (B, T, D), before its gate multiply."""
        return self.attn(l, z, cache) if kind == "attn" else self.mlp(l, z, cache)

    @staticmethod
    def gated_residual(x, gate, out):
        """x + gate * out: x, out (B, T, D), gate (B, D).  The backward is gated_residual_backward in ops."""
        return ops.gated_residual_forward(x, gate, out)

    def block_backward(self, l, dx, cache, grads=None):
        """dx (B, T, D), the gradient of the block output -> dx of its input, dc_act (B, D).

        The forward read bottom to top; with grads=None no adaLN gradients are formed
        and dc_act is None."""
        pg = grads is not None
        # x = x + gate_mlp * m
        dm, dgate_mlp = ops.gated_residual_backward(dx, cache["gate_mlp"], cache["out_mlp"], pg)
        dz = self.mlp_backward(l, dm, cache["mlp"], grads)
        dx_mlp, dshift_mlp, dscale_mlp = self.branch_input_backward(l, "mlp", dz, cache["mlp_in"], grads)
        dx_mlp += dx
        dx = dx_mlp
        # x = x + gate_msa * a
        da, dgate_msa = ops.gated_residual_backward(dx, cache["gate_attn"], cache["out_attn"], pg)
        dz = self.attn_backward(l, da, cache["attn"], grads)
        dx_attn, dshift_msa, dscale_msa = self.branch_input_backward(l, "attn", dz, cache["attn_in"], grads)
        dx_attn += dx
        dx = dx_attn
        if not pg:
            return dx, None
        dc_act = self.block_modulation_backward(
            l, (dshift_msa, dscale_msa, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp), cache["modulation"], grads)
        return dx, dc_act

    def final_layer(self, x, c_act, cache=None):
        """Final adaLN layer and unpatchify: (B, T, D) -> (B, out_channels, H, W).

        cache: c_act (referenced), final_in (the modulated_input cache), z (B, T, D)."""
        P, D, cfg = self.params, self.config.hidden_size, self.config
        m = ops.linear_forward(c_act, P["final_layer.adaLN_modulation.1.weight"],
                               P["final_layer.adaLN_modulation.1.bias"])
        shift, scale = m[:, :D], m[:, D:]                                 # official order: shift first
        z = self.modulated_input(x, shift, scale, _sub(cache, "final_in"))
        if cache is not None:
            cache.update(c_act=c_act, z=z)
        h = ops.linear_forward(z, P["final_layer.linear.weight"], P["final_layer.linear.bias"])
        out = ops.unpatchify(h, cfg.patch_size, cfg.out_channels)
        if self.recorder is not None:
            rec = self.recorder
            for name, v in (("shift", shift), ("scale", scale), ("norm", ops.layernorm_forward(x)), ("z", z),
                            ("tokens", h), ("out", out)):
                rec(f"final/{name}", v)
        return out

    def final_layer_backward(self, dout, cache, grads=None):
        """dout (B, out_channels, H, W) -> dx (B, T, D), dc_act (B, D) (None without grads)."""
        P, pg = self.params, grads is not None
        dh = ops.unpatchify_backward(dout, self.config.patch_size)       # (B, C, H, W) -> (B, T, p*p*C)
        dz, dw, db = ops.linear_backward(dh, cache["z"], P["final_layer.linear.weight"], pg)
        dx, dshift, dscale = self.modulated_input_backward(dz, cache["final_in"], pg)
        if not pg:
            return dx, None
        _put(grads, "final_layer.linear", dw, db)
        dm = self.xp.concatenate([dshift, dscale], axis=1)                # 2 x (B, D) -> (B, 2D)
        dc_act, dw, db = ops.linear_backward(dm, cache["c_act"], P["final_layer.adaLN_modulation.1.weight"])
        _put(grads, "final_layer.adaLN_modulation.1", dw, db)
        return dx, dc_act

    # -- full passes ----------------------------------------------------------------
    def forward(self, x, t, y, cache=None, branch=None):
        """The official forward.  Pass a dict as ``cache`` to keep what ``backward`` needs;
        ``branch`` replaces the module calls (protocol.py)."""
        return self.forward_checked(*self.check_inputs(x, t, y), cache, branch)

    __call__ = forward

    def forward_train(self, x, t, y):
        """-> out, cache: the forward keeping, per piece, only what its backward reads.

        cache keys: "embed", "cond", "blocks.{l}" (l = 0..depth-1), "final"; the
        contents are listed in each piece's docstring.  Per block that is 18 (B, T, D)
        arrays (xhat, z twice; qkv three; o and the two branch outputs; h and the GELU gate s four each; PyTorch
        keeps h and the GELU output) and no (T, T) attention matrix."""
        cache = {}
        out = self.forward(x, t, y, cache)
        return out, cache

    def backward(self, dout, cache, param_grads=True):
        """dout = dL/dout (B, out_channels, H, W) and the cache of forward_train ->
        (grads, dx): grads maps every trainable official name to dL/dparam (None
        without param_grads; pos_embed is a frozen buffer, as in the official code),
        dx = dL/dx (B, C, H, W).

        The cache is consumed: each block's activations are freed once its backward
        ran, so the peak holds the gradients and the activations at once only briefly.
        """
        cfg = self.config
        needed = ["embed", "cond", "final"] + [f"blocks.{l}" for l in range(cfg.depth)]
        if any(k not in cache for k in needed):
            raise ValueError("cache is incomplete: backward needs the cache of one forward_train "
                             "and consumes it (run forward_train again)")
        expected = (cache["embed"]["x"].shape[0], cfg.out_channels, cfg.input_size, cfg.input_size)
        if tuple(dout.shape) != expected:
            raise ValueError(f"dout has shape {tuple(dout.shape)}, expected the output's {expected}")
        dout = self.xp.asarray(dout, dtype=self.dtype)
        grads = {} if param_grads else None
        dh, dc_act = self.final_layer_backward(dout, cache.pop("final"), grads)
        for l in reversed(range(cfg.depth)):
            dh, dc = self.block_backward(l, dh, cache.pop(f"blocks.{l}"), grads)
            if param_grads:
                dc_act += dc
        if param_grads:
            self.condition_backward(dc_act, cache.pop("cond"), grads)
        dx = self.embed_tokens_backward(dh, cache.pop("embed"), grads)
        return grads, dx

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3, branch=None):
        """Official ``forward_with_cfg``: batch = [cond half; uncond half].

        The first half of x is used for both halves; guidance is applied to the
        first ``guide_channels`` output channels (3 in the official code, a quirk
        kept for FID reproducibility); ``guide_channels=None`` guides all eps channels.
        ``branch`` goes to the forward.
        """
        xp = self.xp
        cfg_scale = check_cfg_scale(cfg_scale)
        _check_array("x", x)
        x = xp.asarray(x, dtype=self.dtype)
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(xp.concatenate([half, half], axis=0), t, y, branch=branch)
        g = self.config.in_channels if guide_channels is None else guide_channels
        eps, rest = out[:, :g], out[:, g:]
        cond_eps, uncond_eps = eps[: len(eps) // 2], eps[len(eps) // 2:]
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if self.recorder is not None:
            self.recorder("cfg/eps", half_eps)
        return xp.concatenate([xp.concatenate([half_eps, half_eps], axis=0), rest], axis=1)

    # -- trace recording (tinylazy.trace; called only while ``recorder`` is set) --------
    def record(self, name, value):
        """recorder(name, value) with this family's description of the op where it has its own (``OPS``)."""
        self.recorder(name, value, op=self.OPS.get(name.split("/", 1)[1] if name.startswith("block.") else name))

    def record_inputs(self, x, t, y):
        self.recorder("input/x", x)
        self.recorder("input/t", t)
        self.recorder("input/y", y)

    def record_branch_input(self, l, kind, x, z):
        """LN(x) (recomputed: the same op on the same array, so the same bits) and Z = modulate(LN(x))."""
        self.recorder(f"block.{l:02d}/{kind}/norm", ops.layernorm_forward(x))
        self.recorder(f"block.{l:02d}/{kind}/z", z)

    def record_branch_output(self, l, kind, out, x):
        """The branch output before the gate multiply, and the residual stream after it."""
        self.record(f"block.{l:02d}/{kind}/out", out)
        self.record(f"block.{l:02d}/{kind}/residual", x)

    def _record_qkv(self, l, qkv):
        """q, k, v as (B, T, D) (head h at columns h*Dh..(h+1)*Dh) and, if asked, softmax(q k^T / sqrt(Dh))."""
        rec, D, H = self.recorder, self.config.hidden_size, self.config.num_heads
        for i, name in enumerate("qkv"):
            rec(f"block.{l:02d}/attn/{name}", qkv[..., i * D:(i + 1) * D])
        if rec.attn_probs:
            B, T, _ = qkv.shape
            q, k, _ = qkv.reshape(B, T, 3, H, D // H).transpose(2, 0, 3, 1, 4)     # (B, H, T, Dh)
            s = (q * (1.0 / float(np.sqrt(D // H)))) @ k.swapaxes(-1, -2)            # as ops.sdpa_forward
            rec(f"block.{l:02d}/attn/probs", ops.softmax_forward(s))                # (B, H, T, T)

    # -- bookkeeping ---------------------------------------------------------------------
    def num_params(self):
        return int(sum(int(np.prod(v.shape)) for k, v in self.params.items() if k != "pos_embed"))

    def __repr__(self):
        c = self.config
        return (f"DiT(depth={c.depth}, hidden={c.hidden_size}, heads={c.num_heads}, patch={c.patch_size}, "
                f"input={c.in_channels}x{c.input_size}x{c.input_size}, classes={c.num_classes}, "
                f"dtype={self.dtype.name}, backend={self.backend})")
