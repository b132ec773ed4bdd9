"""The OpenCL backend: DiT on any OpenCL 1.2 device through PyOpenCL, kernels in kernels_cl/.

The one module that imports PyOpenCL (lazily, with a message saying what to install).
Mirrors the paper's deployment on a phone GPU; on a machine without a GPU, PoCL runs
the same kernels on the CPU (``pip install pocl-binary-distribution``).

Layers, bottom up:
  * ``Runtime``: context, queue and device (``TINYLAZY_CL_DEVICE`` or an argument:
    "P:D" indices or a substring of the device or platform name), and a loader that
    builds each kernel family once per set of compile-time defines and shows the
    compiler's build log when a build fails.
  * one Python function per kernel (``linear``, ``layernorm_modulate``, ``attention``, ...),
    on device arrays (``pyopencl.array.Array``), each the twin of a ``tinylazy.ops`` op.
  * ``OpenCLDiT``: the DiT's one forward schema (``dit.DiTSchema``) on these kernels, with
    weights and activations resident on the device; only the input, the timestep features
    and the labels go up, and only the output comes back.
  * ``OpenCLLazyDiT`` and ``DeviceLatents``: where ``lazy.LazyDiT`` and the sampler loop of
    ``sampling`` keep their arrays (the gates and the cache; the latents), nothing else:
    the decision rule and the DDIM loop are those modules' own.
"""
import collections
import math
import os

import numpy as np

from .backend import to_numpy
from .dit import FREQ_DIM, MODULATION_NAMES, DiT, DiTSchema, init_params
from .embeddings import timestep_features
from .lazy import LazyDiT
from .protocol import KINDS, check_cfg_scale
from .resources import kernel_dir


KERNEL_DIR = kernel_dir()                 # the bundled kernels_cl/ (tinylazy.resources)
DEVICE_ENV = "TINYLAZY_CL_DEVICE"
INSTALL_HINT = "pip install pyopencl pocl-binary-distribution (PoCL runs OpenCL on the CPU)"


def _cl():
    """Import PyOpenCL, or fail with what to install."""
    try:
        import pyopencl
        import pyopencl.array  # noqa: F401  (device arrays)
    except ImportError as e:
        raise RuntimeError(f"backend='opencl' needs PyOpenCL: {INSTALL_HINT}") from e
    return pyopencl


# ----------------------------------------------------------------------------
# Devices

def list_devices():
    """[(platform index, device index, platform name, device name)] of every OpenCL device."""
    cl = _cl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    found = []
    for p, plat in enumerate(platforms):
        try:
            devices = plat.get_devices()
        except cl.Error:
            continue
        found += [(p, d, plat.name.strip(), dev.name.strip()) for d, dev in enumerate(devices)]
    if not found:
        raise RuntimeError(f"no OpenCL platform with a device was found: {INSTALL_HINT}")
    return found


def select_device(spec=None):
    """The ``pyopencl.Device`` named by spec, else by $TINYLAZY_CL_DEVICE, else the first GPU
    (or the first device when there is none).

    spec: "P:D" (platform and device indices, as ``list_devices`` numbers them) or a
    case-insensitive substring of "platform name / device name".
    """
    cl = _cl()
    found = list_devices()
    spec = os.environ.get(DEVICE_ENV) if spec is None else spec
    listing = "; ".join(f"{p}:{d} {pn} / {dn}" for p, d, pn, dn in found)

    def device(p, d):
        return cl.get_platforms()[p].get_devices()[d]

    if spec is None or str(spec).strip() == "":
        for p, d, _, _ in found:
            if device(p, d).type & cl.device_type.GPU:
                return device(p, d)
        return device(*found[0][:2])
    spec = str(spec).strip()
    if ":" in spec and all(s.strip().isdigit() for s in spec.split(":", 1)):
        p, d = (int(s) for s in spec.split(":", 1))
        if (p, d) not in [f[:2] for f in found]:
            raise ValueError(f"OpenCL device {spec!r} does not exist; devices: {listing}")
        return device(p, d)
    for p, d, pn, dn in found:
        if spec.lower() in f"{pn} / {dn}".lower():
            return device(p, d)
    raise ValueError(f"no OpenCL device matches {spec!r}; devices: {listing}")


class Runtime:
    """A device, its context and in-order queue, and the built kernel programs.

    profile=True records every launch's event in ``self.events`` as (kernel name, event),
    for per-kernel device times (``profile_summary``).
    """

    def __init__(self, device=None, profile=False):
        cl = _cl()
        self.cl = cl
        self.device = device if isinstance(device, cl.Device) else select_device(device)
        self.context = cl.Context([self.device])
        props = cl.command_queue_properties.PROFILING_ENABLE if profile else 0
        self.queue = cl.CommandQueue(self.context, properties=props)
        self.events = [] if profile else None
        self._programs = {}

    def __repr__(self):
        return f"Runtime({self.device.platform.name.strip()} / {self.device.name.strip()})"

    def kernel(self, family, name, **defines):
        """Kernel ``name`` of kernels_cl/<family>.cl, built with ``-D<key>=<value>`` for each define.

        Programs are cached per (family, defines); PoCL also caches binaries on disk.
        """
        key = (family, tuple(sorted(defines.items())))
        if key not in self._programs:
            self._programs[key] = (self._build(family, defines), {})
        program, kernels = self._programs[key]
        if name not in kernels:
            kernels[name] = getattr(program, name)
        return kernels[name]

    def launch(self, family, name, global_size, local_size, *args, **defines):
        """Enqueue kernel ``name`` of ``family`` (built with ``defines``) on the queue."""
        event = self.kernel(family, name, **defines)(self.queue, global_size, local_size, *args)
        if self.events is not None:
            self.events.append((name, event))
        return event

    def profile_summary(self):
        """{kernel name: total device seconds} of the recorded launches (profile=True); clears them."""
        self.queue.finish()
        total = {}
        for name, e in self.events:
            total[name] = total.get(name, 0.0) + (e.profile.end - e.profile.start) * 1e-9
        self.events.clear()
        return dict(sorted(total.items(), key=lambda kv: -kv[1]))

    def _build(self, family, defines):
        path = KERNEL_DIR / f"{family}.cl"
        if not path.is_file():
            raise FileNotFoundError(f"OpenCL kernel source {path} is missing")
        # common.cl is prepended; #line keeps the build log's line numbers those of the family file.
        source = (KERNEL_DIR / "common.cl").read_text() + f'\n#line 1 "{path.name}"\n' + path.read_text()
        options = ["-cl-std=CL1.2"] + [f"-D{k}={v}" for k, v in sorted(defines.items())]
        program = self.cl.Program(self.context, source)
        try:
            return program.build(options=options)
        except self.cl.Error as e:
            try:
                log = program.get_build_info(self.device, self.cl.program_build_info.LOG)
            except self.cl.Error:
                log = str(e)
            raise RuntimeError(f"OpenCL build of {path} failed on {self.device.name.strip()} "
                               f"with {' '.join(options)}; build log:\n{log}") from e

    # -- arrays ------------------------------------------------------------------
    def to_device(self, a, dtype=np.float32):
        return self.cl.array.to_device(self.queue, np.ascontiguousarray(a, dtype=dtype))

    def empty(self, shape, dtype=np.float32):
        return self.cl.array.empty(self.queue, tuple(shape), dtype)

    def finish(self):
        self.queue.finish()


_RUNTIMES = {}


def get_runtime(device=None):
    """The shared ``Runtime`` for a device spec (see ``select_device``); built once."""
    spec = os.environ.get(DEVICE_ENV) if device is None else device
    if isinstance(spec, Runtime):
        return spec
    key = spec if not hasattr(spec, "int_ptr") else spec.int_ptr
    if key not in _RUNTIMES:
        _RUNTIMES[key] = Runtime(spec)
    return _RUNTIMES[key]


def available(device=None):
    """True when PyOpenCL imports and an OpenCL device can be opened."""
    try:
        get_runtime(device)
        return True
    except (RuntimeError, ValueError):
        return False


# ----------------------------------------------------------------------------
# Kernels: one function each, on device arrays, named after the tinylazy.ops op they mirror

def _up(n, m):
    return -(-int(n) // m) * m


def _vw(n):
    """The widest vector (8, 4, 2, 1) whose width divides the row length n."""
    return next(w for w in (8, 4, 2, 1) if n % w == 0)


_i32 = np.int32
_f32 = np.float32
GEMM_TM, GEMM_TN = 6, 16
WEIGHT_DTYPES = {"float32": np.float32, "float16": np.float16}


class PackedLinear:
    """A linear layer's weight in the GEMM kernel's layout: W^T (K, Np) and bias (Np),
    columns zero-padded to Np = roundup(N, 16).  w: the official (N, K) weight.

    weights="float16" stores W^T in half precision (the bias stays float32), the storage
    phone GPUs use; the kernel widens it to float32 on load.
    """

    def __init__(self, rt, w, b=None, weights="float32"):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"a linear weight must be (out, in), got shape {w.shape}")
        if weights not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {tuple(WEIGHT_DTYPES)}, got {weights!r}")
        self.N, self.K = w.shape
        self.Np = _up(self.N, GEMM_TN)
        self.half = weights == "float16"
        wt = np.zeros((self.K, self.Np), WEIGHT_DTYPES[weights])     # (N, K) -> (K, Np)
        wt[:, :self.N] = w.T
        bias = np.zeros(self.Np, np.float32)
        if b is not None:
            bias[:self.N] = np.asarray(b, dtype=np.float32)
        self.wt, self.bias = rt.to_device(wt, wt.dtype), rt.to_device(bias)


def linear(rt, x, layer, out=None, gelu=False):
    """y = x W^T + b (then tanh-GELU if gelu): (M, K) -> (M, N).  ops.linear_forward."""
    M = x.size // layer.K
    if x.size != M * layer.K:
        raise ValueError(f"linear: input of {x.size} floats is not (M, {layer.K})")
    out = rt.empty((M, layer.N)) if out is None else out
    defines = {"HALF_WEIGHTS": 1} if layer.half else {}
    rt.launch("gemm", "linear", (_up(layer.Np // GEMM_TN, 4), _up(-(-M // GEMM_TM), 16)), (4, 16),
              _i32(M), _i32(layer.N), _i32(layer.K), _i32(layer.Np), x.data, layer.wt.data, layer.bias.data,
              out.data, _i32(1 if gelu else 0), **defines)
    return out


def layernorm_modulate(rt, x, mod, shift_off, scale_off, T, out):
    """out = LN(x) * (1 + scale) + shift, x (B*T, D), mod (B, ldm).  DiT.modulated_input."""
    rows, D = x.shape
    rt.launch("layernorm", "layernorm_modulate", (_up(rows, 16),), (16,), _i32(rows), _i32(T), _i32(D),
              x.data, mod.data, _i32(mod.shape[-1]), _i32(shift_off), _i32(scale_off), out.data, VW=_vw(D))
    return out


def attention(rt, qkv, B, T, H, out):
    """Softmax attention of every head: qkv (B, T, 3D) -> out (B, T, D).  ops.sdpa_forward."""
    Dh = qkv.shape[-1] // 3 // H
    rt.launch("attention", "attention", (_up(T, 16), H, B), (16, 1, 1), _i32(T), _i32(H),
              _f32(1.0 / math.sqrt(Dh)), qkv.data, out.data, HEAD_DIM=Dh, VW=_vw(Dh))
    return out


def silu(rt, x, out=None):
    """y = x / (1 + exp(-x)).  ops.silu_forward."""
    out = x if out is None else out
    rt.launch("elementwise", "silu", (_up(x.size, 64),), (64,), _i32(x.size), x.data, out.data)
    return out


def class_embed_add(rt, c, labels, table):
    """c (B, D) += table[labels].  DiT.class_embed added to the timestep embedding."""
    B, D = c.shape
    rt.launch("elementwise", "class_embed_add", (_up(D, 64), B), (64, 1), _i32(D), labels.data, table.data, c.data)
    return c


def gated_residual(rt, x, mod, gate_off, branch, T):
    """x += gate * branch, x and branch (B*T, D), gate = mod[:, gate_off:gate_off + D]."""
    rows, D = x.shape
    rt.launch("elementwise", "gated_residual", (_up(rows, 16),), (16,), _i32(rows), _i32(T), _i32(D), x.data,
              mod.data, _i32(mod.shape[-1]), _i32(gate_off), branch.data, VW=_vw(D))
    return x


def patch_embed(rt, x, wp, bias, pos, p, out):
    """Images (B, C, S, S) -> tokens (B*T, D) + pos.  ops.patch_embed_forward + pos_embed."""
    B, C, S, _ = x.shape
    D, G = wp.shape[-1], S // p
    rt.launch("patch", "patch_embed", (_up(D // _vw(D), 16), B * G * G), (16, 1), _i32(B), _i32(C), _i32(G),
              _i32(p), _i32(D), x.data, wp.data, bias.data, pos.data, out.data, VW=_vw(D))
    return out


def unpatchify(rt, tok, B, G, p, C, out):
    """Tokens (B, T, p*p*C) -> images (B, C, G*p, G*p).  ops.unpatchify."""
    S = G * p
    rt.launch("patch", "unpatchify", (_up(S * S, 64), C, B), (64, 1, 1), _i32(G), _i32(p), _i32(C),
              tok.data, out.data)
    return out


def cfg_combine(rt, out, cfg_scale, guide_channels):
    """In place on a [cond; uncond] output (2h, Co, S, S): DiT.forward_with_cfg's guidance."""
    B2, Co, S, _ = out.shape
    n, ng = Co * S * S, guide_channels * S * S
    rt.launch("diffusion", "cfg_combine", (_up(ng, 64), B2 // 2), (64, 1), _i32(B2 // 2), _i32(n), _i32(ng),
              _f32(cfg_scale), out.data)
    return out


def ddim_update(rt, x, model_out, coefs, x_next, pred_x0, eps):
    """One eta = 0 DDIM step on device (sampling.ddim_step); coefs = float32 (c1, c2, a, b)."""
    B, C, S, _ = x.shape
    n, n_out = C * S * S, model_out.shape[1] * S * S
    c1, c2, a, b = (_f32(v) for v in coefs)
    rt.launch("diffusion", "ddim_update", (_up(n, 64), B), (64, 1), _i32(n), _i32(n_out), c1, c2, a, b,
              x.data, model_out.data, x_next.data, pred_x0.data, eps.data)
    return x_next


def gate_score(rt, z, gates, row, B, T, out):
    """score[b] = sigmoid(sum_t Z[b, t] . w), z (B*T, D), w = gates[row] of (rows, D) -> out (B,)."""
    D = z.shape[-1]
    rt.launch("lazy", "gate_score", (64 * B,), (64,), _i32(T), _i32(D), z.data, gates.data, _i32(row), out.data,
              VW=_vw(D))
    return out


def gather_samples(rt, src, idx, n, out):
    """out[i] = src[idx[i]] for samples of n floats; idx a device int32 array."""
    rt.launch("lazy", "gather_samples", (_up(n // _vw(n), 64), idx.size), (64, 1), _i32(n), idx.data, src.data,
              out.data, VW=_vw(n))
    return out


def skip_select(rt, cache, fresh, slot, n):
    """cache[b] = fresh[slot[b]] where slot[b] >= 0, else unchanged; slot a device int32 (B,)."""
    rt.launch("lazy", "skip_select", (_up(n // _vw(n), 64), slot.size), (64, 1), _i32(n), slot.data, fresh.data,
              cache.data, VW=_vw(n))
    return cache


# ----------------------------------------------------------------------------
# The model

# A (B, D) chunk of a (B, k*D) device buffer (the adaLN modulation): the kernels take the
# buffer and the chunk's column offset.
Chunk = collections.namedtuple("Chunk", "buf offset")


class OpenCLDiT(DiTSchema):
    """A DiT whose forward runs in OpenCL kernels, weights and activations on the device.

    Built from official-name parameters (as ``tinylazy.DiT``) or from a NumPy DiT with
    ``OpenCLDiT.from_model``.  It runs the DiT's one forward schema (``dit.DiTSchema``) with
    its pieces as fused kernels on the workspace buffers of the batch size.  ``forward`` and
    ``forward_with_cfg`` take and return NumPy arrays with ``DiT``'s signatures and checks
    (the model protocol, protocol.py); ``forward_device`` and ``forward_with_cfg_device`` keep
    input and output on the device.  weights="float16" keeps the linear layers' weights in
    half precision on the device (arithmetic stays float32); it then matches a DiT whose
    linear weights were rounded to float16, not the float32 DiT.
    """

    backend = "opencl"
    xp = np
    dtype = np.dtype(np.float32)

    def __init__(self, config, params, device=None, weights="float32", weights_hash=None):
        self.host = DiT(config, params, dtype="float32", weights_hash=weights_hash)   # validates names and shapes
        self.config, self.params, self.weights_hash = self.host.config, self.host.params, weights_hash
        self.weights = weights
        self.rt = get_runtime(device)
        cfg, P, rt = self.config, self.params, self.rt
        D = cfg.hidden_size
        self.patch_w = rt.to_device(P["x_embedder.proj.weight"].reshape(D, -1).T)   # (D, C, p, p) -> (C*p*p, D)
        self.patch_b = rt.to_device(P["x_embedder.proj.bias"])
        self.pos = rt.to_device(P["pos_embed"].reshape(cfg.num_tokens, D))
        self.table = rt.to_device(P["y_embedder.embedding_table.weight"])
        lin = lambda name: PackedLinear(rt, P[name + ".weight"], P[name + ".bias"], weights)
        self.t_mlp = (lin("t_embedder.mlp.0"), lin("t_embedder.mlp.2"))
        self.blocks = [{k: lin(f"blocks.{l}.{k}") for k in
                        ("adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
                       for l in range(cfg.depth)]
        self.final_mod = lin("final_layer.adaLN_modulation.1")
        self.final_linear = lin("final_layer.linear")
        self._workspaces = {}
        self.ws = None                      # the workspace of the forward in progress

    @classmethod
    def from_model(cls, model, device=None, weights="float32"):
        """The OpenCL twin of a ``tinylazy.DiT`` (any backend and dtype; weights cast to float32,
        or the linear layers' to float16 with weights="float16"); it keeps the DiT's weights hash."""
        return cls(model.config, {k: to_numpy(v) for k, v in model.params.items()}, device=device, weights=weights,
                   weights_hash=model.weights_hash)

    @classmethod
    def from_config(cls, config, seed=0, scheme="official", device=None, weights="float32"):
        return cls(config, init_params(config, seed, scheme), device=device, weights=weights)

    def __repr__(self):
        c = self.config
        return (f"OpenCLDiT(depth={c.depth}, hidden={c.hidden_size}, heads={c.num_heads}, "
                f"patch={c.patch_size}, input={c.in_channels}x{c.input_size}x{c.input_size}, "
                f"classes={c.num_classes}, weights={self.weights}, device={self.rt.device.name.strip()!r})")

    def num_params(self):
        return self.host.num_params()

    # -- device buffers ----------------------------------------------------------
    def _workspace(self, B):
        """Activation buffers for batch B, allocated once and reused by every call."""
        if B not in self._workspaces:
            cfg, rt = self.config, self.rt
            T, D, F, S = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden, cfg.input_size
            self._workspaces[B] = {
                "x": rt.empty((B, cfg.in_channels, S, S)),
                "tfeat": rt.empty((B, FREQ_DIM)), "labels": rt.empty((B,), np.int32),
                "t_hidden": rt.empty((B, D)), "c": rt.empty((B, D)),
                "mod": rt.empty((B, 6 * D)), "final_mod": rt.empty((B, 2 * D)), "scores": rt.empty((B,)),
                "h": rt.empty((B * T, D)), "z": rt.empty((B * T, D)), "qkv": rt.empty((B * T, 3 * D)),
                "o": rt.empty((B * T, D)), "branch": rt.empty((B * T, D)), "z_sub": rt.empty((B * T, D)),
                "mlp": rt.empty((B * T, F)), "tokens_out": rt.empty((B * T, cfg.patch_size ** 2 * cfg.out_channels)),
                "out": rt.empty((B, cfg.out_channels, S, S)),
            }
        return self._workspaces[B]

    def upload(self, x):
        """Host images (B, C, H, W) into the input buffer of batch B's workspace."""
        buf = self._workspace(x.shape[0])["x"]
        buf.set(np.ascontiguousarray(x, dtype=np.float32))
        return buf

    # -- the pieces of the schema (dit.DiTSchema), on the workspace ws --------------
    def embed_tokens(self, x, cache=None):
        """Images (B, C, H, W) on the device -> tokens ws["h"] (B*T, D) + pos_embed."""
        h = patch_embed(self.rt, x, self.patch_w, self.patch_b, self.pos, self.config.patch_size, out=self.ws["h"])
        if self.recorder is not None:
            self._record("embed/tokens", h, x.shape[0])
        return h

    def condition(self, t, y, cache=None):
        """SiLU(t_emb + y_emb) into ws["c"]; the timestep features are computed on the host."""
        rt, ws = self.rt, self.ws
        ws["tfeat"].set(timestep_features(t, FREQ_DIM))                 # (B, 256)
        ws["labels"].set(np.asarray(y, dtype=np.int32))
        silu(rt, linear(rt, ws["tfeat"], self.t_mlp[0], out=ws["t_hidden"]))
        linear(rt, ws["t_hidden"], self.t_mlp[1], out=ws["c"])
        if self.recorder is not None:
            self._record("cond/t_freq", ws["tfeat"])
            self._record("cond/t_emb", ws["c"])
        class_embed_add(rt, ws["c"], ws["labels"], self.table)
        if self.recorder is not None:
            self._record("cond/c", ws["c"])
        return silu(rt, ws["c"])

    def block_modulation(self, l, c_act, cache=None):
        """adaLN of block l into ws["mod"] (B, 6D) -> its six chunks, in the official order."""
        D = self.config.hidden_size
        mod = linear(self.rt, c_act, self.blocks[l]["adaLN_modulation.1"], out=self.ws["mod"])
        if self.recorder is not None:
            host = mod.get()
            for i, name in enumerate(MODULATION_NAMES):
                self.recorder(f"block.{l:02d}/mod/{name}", host[:, i * D:(i + 1) * D])
        return tuple(Chunk(mod, i * D) for i in range(6))

    def modulated_input(self, x, shift, scale, cache=None):
        """LN(x) * (1 + scale) + shift into ws["z"], one fused kernel."""
        return layernorm_modulate(self.rt, x, shift.buf, shift.offset, scale.offset, self.config.num_tokens,
                                  out=self.ws["z"])

    def branch(self, l, kind, z, cache=None, out=None):
        """Module ``kind`` of block l on z (n*T, D) into out (default ws["branch"]): DiT.branch."""
        out = self.ws["branch"] if out is None else out
        return self._attn(l, z, out) if kind == "attn" else self._mlp(l, z, out)

    def gated_residual(self, x, gate, out):
        """x += gate * out, in place."""
        return gated_residual(self.rt, x, gate.buf, gate.offset, out, self.config.num_tokens)

    def _attn(self, l, z, out):
        rt, blk, cfg = self.rt, self.blocks[l], self.config
        B = z.shape[0] // cfg.num_tokens
        qkv = linear(rt, z, blk["attn.qkv"], out=self.ws["qkv"])
        o = attention(rt, qkv, B, cfg.num_tokens, cfg.num_heads, out=self.ws["o"])
        if self.recorder is not None:
            D = cfg.hidden_size
            host = qkv.get()[: B * cfg.num_tokens].reshape(B, cfg.num_tokens, 3 * D)
            for i, name in enumerate("qkv"):
                self.recorder(f"block.{l:02d}/attn/{name}", host[..., i * D:(i + 1) * D])
            self._record(f"block.{l:02d}/attn/o", o, B)
        return linear(rt, o, blk["attn.proj"], out=out)

    def _mlp(self, l, z, out):
        rt, blk = self.rt, self.blocks[l]
        act = linear(rt, z, blk["mlp.fc1"], out=self.ws["mlp"], gelu=True)              # fc1 + GELU fused
        if self.recorder is not None:
            self._record(f"block.{l:02d}/mlp/act", act, z.shape[0] // self.config.num_tokens)
        return linear(rt, act, blk["mlp.fc2"], out=out)

    def final_layer(self, h, c_act, cache=None):
        """Final adaLN layer and unpatchify into ws["out"]."""
        rt, ws, cfg, D = self.rt, self.ws, self.config, self.config.hidden_size
        B = ws["out"].shape[0]
        mod = linear(rt, c_act, self.final_mod, out=ws["final_mod"])               # (B, 2D): shift, scale
        z = layernorm_modulate(rt, h, mod, 0, D, cfg.num_tokens, out=ws["z"])
        tok = linear(rt, z, self.final_linear, out=ws["tokens_out"])
        out = unpatchify(rt, tok, B, cfg.grid_size, cfg.patch_size, cfg.out_channels, out=ws["out"])
        if self.recorder is not None:
            host = mod.get()
            self.recorder("final/shift", host[:, :D])
            self.recorder("final/scale", host[:, D:])
            self._record("final/z", z, B)
            self._record("final/tokens", tok, B)
            self._record("final/out", out)
        return out

    # -- trace recording (called only while ``recorder`` is set) ------------------------
    def _record(self, name, a, B=None):
        """Record device array a; with B, its first B*T rows (a workspace may be larger) as (B, T, n)."""
        host, T = a.get(), self.config.num_tokens
        self.recorder(name, host if B is None else host[: B * T].reshape(B, T, -1))

    def record_inputs(self, x, t, y):
        self.recorder("input/x", x)
        self.recorder("input/t", np.asarray(t))
        self.recorder("input/y", np.asarray(y))

    def record_branch_input(self, l, kind, x, z):
        """Z only: LN(x) never exists apart from Z in the fused kernel."""
        self._record(f"block.{l:02d}/{kind}/z", z, z.shape[0] // self.config.num_tokens)

    def record_branch_output(self, l, kind, out, x):
        B = x.shape[0] // self.config.num_tokens
        self._record(f"block.{l:02d}/{kind}/out", out, B)
        self._record(f"block.{l:02d}/{kind}/residual", x, B)

    # -- the forward passes --------------------------------------------------------------
    def check_inputs(self, x, t, y):
        return self.host.check_inputs(x, t, y)

    def forward_device(self, x, t, y, branch=None):
        """x: a device array (B, C, H, W) float32; t, y: host (B,) -> device (B, Co, H, W).

        The returned array is a workspace buffer, overwritten by the next call at this batch size."""
        self.ws = self._workspace(x.shape[0])
        return self.forward_checked(x, t, y, None, branch)

    def forward(self, x, t, y, branch=None):
        """Official ``DiT.forward`` on host arrays: x (B, C, H, W), t (B,), y (B,) -> NumPy output."""
        x, t, y = self.check_inputs(x, t, y)
        return self.forward_device(self.upload(x), t, y, branch).get()

    __call__ = forward

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3, branch=None):
        """Official ``forward_with_cfg`` (see ``DiT.forward_with_cfg``), guidance on the device."""
        cfg_scale = check_cfg_scale(cfg_scale)
        x = np.asarray(x, dtype=np.float32)
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        x, t, y = self.check_inputs(np.concatenate([half, half], axis=0), t, y)
        return self.forward_with_cfg_device(self.upload(x), t, y, cfg_scale, guide_channels, branch).get()

    def forward_with_cfg_device(self, x, t, y, cfg_scale, guide_channels=3, branch=None):
        """``forward_with_cfg`` on a device batch [x; x] that is already doubled -> device output."""
        out = self.forward_device(x, t, y, branch)
        g = self.config.in_channels if guide_channels is None else min(guide_channels, self.config.out_channels)
        cfg_combine(self.rt, out, cfg_scale, g)
        if self.recorder is not None:
            self.recorder("cfg/eps", out.get()[: out.shape[0] // 2, :g])
        return out


# ----------------------------------------------------------------------------
# Lazy sampling and the sampler's latents, on the device

class OpenCLLazyDiT(LazyDiT):
    """``lazy.LazyDiT`` (its step lookup, decision rule, statistics and trace names) with the
    gates and the cache in device memory.

    Per module: the gate scores are computed on the device and the (rows,) scores come back
    to the host (the one read per module) for the rule; the module then runs on the
    computing rows only, gathered into a compact batch, and ``skip_select`` writes their
    outputs into the cache.
    """

    def upload_gates(self, gates):
        S, L, D = gates.attn.shape
        return {kind: self.model.rt.to_device(gates.of(kind).reshape(S * L, D)) for kind in KINDS}

    def scores(self, s, l, kind, z):
        model, T = self.model, self.config.num_tokens
        return gate_score(model.rt, z, self.gate_w[kind], s * self.config.depth + l, z.shape[0] // T, T,
                          out=model.ws["scores"]).get()

    def rows(self, z):
        return z.shape[0] // self.config.num_tokens

    def run_branch(self, l, kind, z, keep, cached):
        model, rt, T = self.model, self.model.rt, self.config.num_tokens
        if cached is None:
            cached = rt.empty(z.shape)
        B, n_keep = len(keep), int(keep.sum())
        if n_keep == B:
            model.branch(l, kind, z, out=cached)
        elif n_keep > 0:                                                   # gather the computing rows, select back
            idx = np.flatnonzero(keep).astype(np.int32)
            slot = np.full(B, -1, np.int32)
            slot[idx] = np.arange(n_keep, dtype=np.int32)
            n = T * self.config.hidden_size
            zc = gather_samples(rt, z, rt.to_device(idx, np.int32), n, out=model.ws["z_sub"][: n_keep * T])
            fresh = model.branch(l, kind, zc, out=model.ws["branch"][: n_keep * T])
            skip_select(rt, cached, fresh, rt.to_device(slot, np.int32), n)
        return cached

    def forward_device(self, x, t, y):
        return self.model.forward_device(x, t, y, branch=self.hook(t, x.shape[0]))

    def forward_with_cfg_device(self, x, t, y, cfg_scale, guide_channels=3):
        return self.model.forward_with_cfg_device(x, t, y, cfg_scale, guide_channels, branch=self.hook(t, x.shape[0]))


def ddim_coefficients(diffusion, i):
    """float32 (c1, c2, a, b) of an eta = 0 DDIM step at respaced index i, rounded as
    ``sampling.ddim_step`` rounds them: looked up in float64 and cast, then sqrt in float32."""
    c1 = np.float32(diffusion.sqrt_recip_alphas_cumprod[i])
    c2 = np.float32(diffusion.sqrt_recipm1_alphas_cumprod[i])
    acp_prev = np.float32(diffusion.alphas_cumprod_prev[i])
    return c1, c2, np.sqrt(acp_prev), np.sqrt(np.float32(1) - acp_prev)


class DeviceLatents:
    """The sampler's latents on the device (``sampling.HostLatents``'s twin): the one DDIM loop
    of ``sampling.ddim_sample`` runs with x_t, the model output and the update (``ddim_update``,
    eta = 0, two buffers in turn) on the device.  Per step only the timestep goes up (and, in a
    lazy run, the scores come back once per module); the final latents come back at the end.
    A callback gets host copies, a download per step.
    """

    def __init__(self, model):
        self.rt = model.rt
        self.x = None

    def start(self, noise):
        rt = self.rt
        self.x = (rt.to_device(noise), rt.empty(np.shape(noise)))        # x_t, x_{t-1}; they swap every step
        self.pred_x0, self.eps = rt.empty(np.shape(noise)), rt.empty(np.shape(noise))
        return self.x[0]

    def denoiser(self, model, labels, cfg_scale, guide_channels):
        """x (B, C, H, W) on the device, original timestep -> device output (B, Co, H, W)."""
        rt, B = self.rt, len(labels)
        if cfg_scale == 1:
            return lambda x, t: model.forward_device(x, np.full(B, t, dtype=np.int64), labels)
        y = np.concatenate([labels, np.full(B, model.config.num_classes, dtype=np.int64)])   # [y; null]
        x_in = rt.empty((2 * B,) + self.x[0].shape[1:])

        def denoise(x, t):
            rt.cl.enqueue_copy(rt.queue, x_in.data, x.data, byte_count=x.nbytes)                   # [x; x]
            rt.cl.enqueue_copy(rt.queue, x_in.data, x.data, byte_count=x.nbytes, dst_offset=x.nbytes)
            out = model.forward_with_cfg_device(x_in, np.full(2 * B, t, dtype=np.int64), y, cfg_scale, guide_channels)
            return out[:B]                                                                         # the cond half
        return denoise

    def ddim_step(self, eta, clip_denoised):
        if eta != 0 or clip_denoised:
            raise ValueError("the OpenCL sampler runs DDIM with eta = 0 and no clipping")

        def step(diffusion, out, x, i, noise):
            x_next = self.x[1] if x is self.x[0] else self.x[0]
            ddim_update(self.rt, x, out, ddim_coefficients(diffusion, i), x_next, self.pred_x0, self.eps)
            return {"x_next": x_next, "pred_xstart": self.pred_x0, "eps": self.eps}
        return step

    def host(self, info):
        return {k: v.get() if isinstance(v, self.rt.cl.array.Array) else v for k, v in info.items()}

    @staticmethod
    def finish(x):
        return x.get()
