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
  * ``OpenCLDiT``: the DiT forward and ``forward_with_cfg`` with weights and activations
    resident on the device; only the input, the timestep features and the labels go up,
    and only the output comes back.
"""
import math
import numbers
import os

import numpy as np

from .diffusion import create_diffusion
from .dit import DiT, FREQ_DIM, MODULATION_NAMES
from .embeddings import timestep_features
from .lazy import DEFAULT_THRESHOLD, KINDS, _Decider
from .progress import Progress
from .resources import kernel_dir
from .sampling import check_cfg_scale, check_labels, check_steps

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

class OpenCLDiT:
    """A DiT whose forward runs in OpenCL kernels, weights and activations on the device.

    Built from official-name parameters (as ``tinylazy.DiT``) or from a NumPy DiT with
    ``OpenCLDiT.from_model``.  ``forward`` and ``forward_with_cfg`` take and return NumPy
    arrays with ``DiT``'s signatures and checks, so host-side code (samplers, goldens)
    can use it as a float32 DiT; ``forward_device`` keeps input and output on the device.
    weights="float16" keeps the linear layers' weights in half precision on the device
    (arithmetic stays float32); it then matches a DiT whose linear weights were rounded
    to float16, not the float32 DiT.
    """

    backend = "opencl"
    xp = np
    dtype = np.dtype(np.float32)
    recorder = None             # a tinylazy.trace.Recorder: the names DiT records (those the fused kernels keep)

    def __init__(self, config, params, device=None, weights="float32"):
        self.host = DiT(config, params, dtype="float32")      # validates names and shapes
        self.config, self.params = self.host.config, self.host.params
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

    @classmethod
    def from_model(cls, model, device=None, weights="float32"):
        """The OpenCL twin of a ``tinylazy.DiT`` (any backend and dtype; weights cast to float32,
        or the linear layers' to float16 with weights="float16")."""
        from .backend import to_numpy
        twin = cls(model.config, {k: to_numpy(v) for k, v in model.params.items()}, device=device, weights=weights)
        if getattr(model, "weights_hash", None) is not None:
            twin.weights_hash = model.weights_hash          # lets LazyGates check they fit
        return twin

    @classmethod
    def from_config(cls, config, seed=0, scheme="official", device=None, weights="float32"):
        from .dit import init_params
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
                "o": rt.empty((B * T, D)), "branch": rt.empty((B * T, D)), "z_sub": rt.empty((B * T, D)), "mlp": rt.empty((B * T, F)),
                "tokens_out": rt.empty((B * T, cfg.patch_size ** 2 * cfg.out_channels)),
                "out": rt.empty((B, cfg.out_channels, S, S)),
            }
        return self._workspaces[B]

    # -- the forward pass, mirroring DiT.forward piece by piece ------------------
    def _condition(self, ws, t, y):
        """SiLU(t_emb + y_emb) into ws["c"]: DiT.condition."""
        rt = self.rt
        ws["tfeat"].set(timestep_features(t, FREQ_DIM))                 # (B, 256), host-computed (reference.md)
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

    def _attn(self, l, z, B, ws, out):
        """Attention branch of block l before the gate: DiT.attn."""
        rt, blk, cfg = self.rt, self.blocks[l], self.config
        qkv = linear(rt, z, blk["attn.qkv"], out=ws["qkv"])
        o = attention(rt, qkv, B, cfg.num_tokens, cfg.num_heads, out=ws["o"])
        if self.recorder is not None:
            D = cfg.hidden_size
            host = qkv.get()[: B * cfg.num_tokens].reshape(B, cfg.num_tokens, 3 * D)
            for i, name in enumerate("qkv"):
                self.recorder(f"block.{l:02d}/attn/{name}", host[..., i * D:(i + 1) * D])
            self._record(f"block.{l:02d}/attn/o", o, B)
        return linear(rt, o, blk["attn.proj"], out=out)

    def _mlp(self, l, z, ws, out):
        """MLP branch of block l before the gate: DiT.mlp (fc1 + GELU fused)."""
        rt, blk = self.rt, self.blocks[l]
        act = linear(rt, z, blk["mlp.fc1"], out=ws["mlp"], gelu=True)
        if self.recorder is not None:
            self._record(f"block.{l:02d}/mlp/act", act, z.shape[0] // self.config.num_tokens)
        return linear(rt, act, blk["mlp.fc2"], out=out)

    def _compute(self, l, kind, z, B, ws, out):
        """Module ``kind`` ("attn" or "mlp") of block l on z (B*T, D), into out (B*T, D)."""
        return self._attn(l, z, B, ws, out) if kind == "attn" else self._mlp(l, z, ws, out)

    def _block(self, l, ws, B, branch):
        """One adaLN-Zero block on ws["h"]: DiT.block.  branch(l, kind, z, B, ws) gives a module's output."""
        rt, T, D = self.rt, self.config.num_tokens, self.config.hidden_size
        mod = linear(rt, ws["c"], self.blocks[l]["adaLN_modulation.1"], out=ws["mod"])   # (B, 6D)
        # chunks of mod: shift_msa 0, scale_msa D, gate_msa 2D, shift_mlp 3D, scale_mlp 4D, gate_mlp 5D
        rec = self.recorder
        if rec is not None:
            host = mod.get()
            for i, name in enumerate(MODULATION_NAMES):
                rec(f"block.{l:02d}/mod/{name}", host[:, i * D:(i + 1) * D])
        z = layernorm_modulate(rt, ws["h"], mod, 0, D, T, out=ws["z"])
        if rec is not None:
            self._record(f"block.{l:02d}/attn/z", z, B)
        a = branch(l, "attn", z, B, ws)
        gated_residual(rt, ws["h"], mod, 2 * D, a, T)
        if rec is not None:
            self._record_branch_output(l, "attn", a, ws["h"], B)
        z = layernorm_modulate(rt, ws["h"], mod, 3 * D, 4 * D, T, out=ws["z"])
        if rec is not None:
            self._record(f"block.{l:02d}/mlp/z", z, B)
        m = branch(l, "mlp", z, B, ws)
        gated_residual(rt, ws["h"], mod, 5 * D, m, T)
        if rec is not None:
            self._record_branch_output(l, "mlp", m, ws["h"], B)

    def _final_layer(self, ws, B):
        """Final adaLN layer and unpatchify into ws["out"]: DiT.final_layer."""
        rt, cfg, D = self.rt, self.config, self.config.hidden_size
        mod = linear(rt, ws["c"], self.final_mod, out=ws["final_mod"])            # (B, 2D): shift, scale
        z = layernorm_modulate(rt, ws["h"], mod, 0, D, cfg.num_tokens, out=ws["z"])
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

    def _record(self, name, a, B=None):
        """Record device array a; with B, its first B*T rows (a workspace may be larger) as (B, T, n)."""
        host, T = a.get(), self.config.num_tokens
        self.recorder(name, host if B is None else host[: B * T].reshape(B, T, -1))

    def _record_branch_output(self, l, kind, out, h, B):
        self._record(f"block.{l:02d}/{kind}/out", out, B)
        self._record(f"block.{l:02d}/{kind}/residual", h, B)

    def forward_device(self, x, t, y, branch=None):
        """x: a device array (B, C, H, W) float32; t, y: host (B,) -> device (B, Co, H, W).

        branch(l, kind, z, B, ws) -> device (B*T, D) replaces the module computation
        (the lazy sampler's hook); by default every module computes.  The returned array
        is a workspace buffer, overwritten by the next call at this batch size.
        """
        B = x.shape[0]
        ws = self._workspace(B)
        if branch is None:
            branch = lambda l, kind, z, B, ws: self._compute(l, kind, z, B, ws, out=ws["branch"])
        if self.recorder is not None:
            self.recorder("input/x", x)
            self.recorder("input/t", np.asarray(t))
            self.recorder("input/y", np.asarray(y))
        self._condition(ws, t, y)
        patch_embed(self.rt, x, self.patch_w, self.patch_b, self.pos, self.config.patch_size, out=ws["h"])
        if self.recorder is not None:
            self._record("embed/tokens", ws["h"], B)
        for l in range(self.config.depth):
            self._block(l, ws, B, branch)
        return self._final_layer(ws, B)

    def forward(self, x, t, y):
        """Official ``DiT.forward`` on host arrays: x (B, C, H, W), t (B,), y (B,) -> NumPy output."""
        x, t, y = self.host._check_inputs(x, t, y)
        ws = self._workspace(x.shape[0])
        ws["x"].set(np.ascontiguousarray(x, dtype=np.float32))
        return self.forward_device(ws["x"], t, y).get()

    __call__ = forward

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        """Official ``forward_with_cfg`` (see ``DiT.forward_with_cfg``), guidance on the device."""
        cfg_scale = check_cfg_scale(cfg_scale)
        x = np.asarray(x, dtype=np.float32)
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        x, t, y = self.host._check_inputs(np.concatenate([half, half], axis=0), t, y)
        ws = self._workspace(x.shape[0])
        ws["x"].set(np.ascontiguousarray(x))
        out = self.forward_device(ws["x"], t, y)
        g = self.config.in_channels if guide_channels is None else min(guide_channels, self.config.out_channels)
        out = cfg_combine(self.rt, out, cfg_scale, g).get()
        if self.recorder is not None:
            self.recorder("cfg/eps", out[: len(out) // 2, :g])
        return out


# ----------------------------------------------------------------------------
# Lazy forward and sampling, on the device

class OpenCLLazyDiT:
    """``tinylazy.lazy.LazyDiT`` on the device: the same decisions, the cache in device memory.

    Per module: Z and the gate score are computed on the device, the (rows,) scores
    come back to the host (the one read per module), the decision is made there as
    LazyDiT makes it, and the module then runs on the computing rows only (gathered
    into a compact batch) and ``skip_select`` writes their outputs into the cache.
    One instance holds the cache of one sampling run.
    """

    def __init__(self, model, timestep_map, gates=None, threshold=DEFAULT_THRESHOLD, decisions=None, stats=None):
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        self.model, self.config = model, model.config
        self.num_steps = len(timestep_map)
        self.step_of = {int(t): i for i, t in enumerate(timestep_map)}     # original timestep -> s
        if gates is not None:
            gates.check_run(model, timestep_map)
            S, L, D = gates.attn.shape
            self.gate_w = {kind: model.rt.to_device(gates.of(kind).reshape(S * L, D)) for kind in KINDS}
        self.gates = gates
        self.threshold = float(threshold)
        self.decide = _Decider(decisions, self.num_steps, self.config.depth)
        self.stats = stats
        if stats is not None:
            stats.start(self.config, self.num_steps)
        self.cache = {}                     # (layer, kind) -> device (rows*T, D), outputs before the gate multiply

    def forward_device(self, x, t, y):
        """As ``OpenCLDiT.forward_device``; t must be one step of the schedule for the whole batch."""
        s = self.step_of.get(int(np.asarray(t).reshape(-1)[0]))
        if s is None:
            raise ValueError(f"timestep {int(np.asarray(t).reshape(-1)[0])} is not a step of this "
                             f"{self.num_steps}-step schedule")
        k = self.num_steps - 1 - s                                         # sampling order
        if self.stats is not None:
            self.stats.row_steps += x.shape[0]
        return self.model.forward_device(x, t, y, branch=lambda l, kind, z, B, ws:
                                         self._module(k, s, l, kind, z, B, ws))

    def _module(self, k, s, l, kind, z, B, ws):
        model, rt, T = self.model, self.model.rt, self.config.num_tokens
        cache = self.cache.get((l, kind))
        rec = model.recorder
        if cache is None:                                                  # first step: always compute
            if rec is not None:
                rec(f"block.{l:02d}/{kind}/compute", np.ones(B, dtype=bool))
            cache = self.cache[(l, kind)] = rt.empty(z.shape)
            model._compute(l, kind, z, B, ws, out=cache)
            if self.stats is not None:
                self.stats.record(k, l, kind, B, 0)
            return cache
        if cache.shape != z.shape:
            raise ValueError(f"the batch changed within a lazy run ({cache.shape[0] // T} -> {B} rows)")
        scores = None
        if self.gates is not None:
            scores = gate_score(rt, z, self.gate_w[kind], s * self.config.depth + l, B, T, out=ws["scores"]).get()
        if self.decide.forced:
            keep = self.decide(k, l, kind, scores, B)
        elif scores is not None:
            keep = scores >= self.threshold
        else:
            keep = np.ones(B, dtype=bool)
        if rec is not None:
            if scores is not None:
                rec(f"block.{l:02d}/{kind}/score", scores)
            rec(f"block.{l:02d}/{kind}/compute", keep)
        n_keep = int(keep.sum())
        if n_keep == B:
            model._compute(l, kind, z, B, ws, out=cache)
        elif n_keep > 0:                                                   # gather the computing rows, select back
            idx = np.flatnonzero(keep).astype(np.int32)
            slot = np.full(B, -1, np.int32)
            slot[idx] = np.arange(n_keep, dtype=np.int32)
            n = T * self.config.hidden_size
            zc = gather_samples(rt, z, rt.to_device(idx, np.int32), n, out=ws["z_sub"][: n_keep * T])
            fresh = model._compute(l, kind, zc, n_keep, ws, out=ws["branch"][: n_keep * T])
            skip_select(rt, cache, fresh, rt.to_device(slot, np.int32), n)
        if self.stats is not None:
            self.stats.record(k, l, kind, B, B - n_keep, scores)
        return cache


def ddim_coefficients(diffusion, i):
    """float32 (c1, c2, a, b) of an eta = 0 DDIM step at respaced index i, rounded as
    ``sampling.ddim_step`` rounds them: looked up in float64 and cast, then sqrt in float32."""
    c1 = np.float32(diffusion.sqrt_recip_alphas_cumprod[i])
    c2 = np.float32(diffusion.sqrt_recipm1_alphas_cumprod[i])
    acp_prev = np.float32(diffusion.alphas_cumprod_prev[i])
    return c1, c2, np.sqrt(acp_prev), np.sqrt(np.float32(1) - acp_prev)


def ddim_sample(model, noise, labels, steps=20, cfg_scale=1.0, progress=False, callback=None, guide_channels=3,
                gates=None, threshold=DEFAULT_THRESHOLD, decisions=None, lazy_stats=None):
    """Respaced DDIM (eta = 0) with the latents on the device: ``sampling.ddim_sample``'s
    loop and arguments, and ``lazy.lazy_ddim_sample``'s when gates, decisions or
    lazy_stats are given.

    model: an ``OpenCLDiT``.  Per step only the timestep goes up (and, in a lazy run,
    the decisions come back once per module); the final latents come back at the end.
    callback(i, info) gets host copies of ``sampling.ddim_sample``'s info (x, model_output,
    eps, pred_xstart, x_next), which costs a download per step.
    """
    steps, cfg_scale = check_steps(steps), check_cfg_scale(cfg_scale)
    labels = check_labels(model, labels, cfg_scale)
    cfg, rt, B = model.config, model.rt, len(labels)
    shape = (B, cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(np.shape(noise)) != shape:
        raise ValueError(f"noise has shape {tuple(np.shape(noise))}, expected {shape} "
                         f"({B} labels, model input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size})")
    diffusion = create_diffusion(steps)
    lazy = gates is not None or decisions is not None or lazy_stats is not None
    net = OpenCLLazyDiT(model, diffusion.timestep_map, gates, threshold, decisions, lazy_stats) if lazy else model
    guided = cfg_scale > 1
    y = np.concatenate([labels, np.full(B, cfg.num_classes, dtype=np.int64)]) if guided else labels   # [y; null]
    g = cfg.in_channels if guide_channels is None else min(guide_channels, cfg.out_channels)
    x = rt.to_device(noise)
    x_in = rt.empty((2 * B,) + shape[1:]) if guided else x
    pred_x0, eps = rt.empty(shape), rt.empty(shape)
    indices = range(diffusion.num_timesteps - 1, -1, -1)
    for k, i in enumerate(Progress(indices, desc=f"DDIM {len(indices)} steps (OpenCL)") if progress else indices):
        t = int(diffusion.timestep_map[i])                        # the model sees the original timestep
        if guided:                                                # [x; x], copied on the device
            rt.cl.enqueue_copy(rt.queue, x_in.data, x.data, byte_count=x.nbytes)
            rt.cl.enqueue_copy(rt.queue, x_in.data, x.data, byte_count=x.nbytes, dst_offset=x.nbytes)
        out = net.forward_device(x_in, np.full(x_in.shape[0], t, dtype=np.int64), y)
        if guided:
            cfg_combine(rt, out, cfg_scale, g)
            if model.recorder is not None:
                model.recorder("cfg/eps", out.get()[:B, :g])
        x_before = x.get() if callback is not None else None
        ddim_update(rt, x, out, ddim_coefficients(diffusion, i), x, pred_x0, eps)   # x_next in place of x
        if callback is not None:
            callback(i, {"x_next": x.get(), "pred_xstart": pred_x0.get(), "eps": eps.get(), "step": k, "t": t,
                         "x": x_before, "model_output": out[:B].get()})
    return x.get()
