"""Traces: every named intermediate of a forward pass or a sampling run, and the trace file.

A ``Recorder`` set as ``model.recorder`` (a ``DiT``; a ``LazyDiT`` records through
the DiT it wraps) receives each intermediate under a stable hierarchical name,
``step.03/block.02/attn/q``: the model calls ``recorder(name, array)`` with names
relative to the current step, and the sampling driver (``golden.py``) sets
``recorder.prefix`` to ``step.KK/`` before each step.  The names, their shapes and
the op that makes each are listed in ``OPS`` and in docs/golden.md.

A trace file is one safetensors file: the tensors under their trace names, and in
the metadata a JSON ``manifest`` (format version, tinylazy version, the model's
weights hash and config, dtype, backend, seed, sampler settings, and the ordered
tensor list; each tensor's ``op`` is its name without step and block numbers, a
key of the manifest's ``ops`` table, which says what made it).  With ``max_elements`` a tensor larger
than that is stored strided: the 1-D array ``flat[::stride]`` of its row-major
values, ``stride`` coprime to its size (so every channel and row is visited).
"""
import fnmatch
import json
import math
import os
import re

import numpy as np

from .backend import to_numpy
from .errors import FileError
from .io import SafetensorsFile, WeightsError, parse_json, write_safetensors

FORMAT = "tinylazy-trace"
FORMAT_VERSION = 1
MANIFEST_KEY = "manifest"

# What makes each tensor, by name with the step and block numbers taken out.  N is the
# model batch (2B with guidance, rows [cond; uncond]); in a lazy run the internals of a
# module (q, k, v, probs, o, hidden, act) have one row per *computing* sample only.
OPS = {
    "noise": "x_T: numpy default_rng(seed).standard_normal((B, C, H, W)), cast to the model dtype",
    "labels": "class ids (B,) int64: numpy default_rng(seed).integers(0, num_classes, B) unless given",
    "input/x": "model input (N, C, H, W); with guidance [x_t; x_t]",
    "input/t": "original timesteps (N,)",
    "input/y": "class ids (N,); with guidance [labels; num_classes]",
    "embed/tokens": "x_embedder.proj(x) as patches (N, T, D) + pos_embed",
    "cond/t_freq": "timestep_features(t) (N, 256): [cos, sin](t * freqs) in float32, cast to the model dtype",
    "cond/t_emb": "t_embedder.mlp.2(SiLU(t_embedder.mlp.0(t_freq))) (N, D)",
    "cond/y_emb": "y_embedder.embedding_table[y] (N, D)",
    "cond/c": "c = t_emb + y_emb (N, D)",
    "mod/shift_msa": "adaLN_modulation.1(SiLU(c)) chunk 0 of 6 (N, D)",
    "mod/scale_msa": "adaLN_modulation.1(SiLU(c)) chunk 1 of 6 (N, D)",
    "mod/gate_msa": "adaLN_modulation.1(SiLU(c)) chunk 2 of 6 (N, D)",
    "mod/shift_mlp": "adaLN_modulation.1(SiLU(c)) chunk 3 of 6 (N, D)",
    "mod/scale_mlp": "adaLN_modulation.1(SiLU(c)) chunk 4 of 6 (N, D)",
    "mod/gate_mlp": "adaLN_modulation.1(SiLU(c)) chunk 5 of 6 (N, D)",
    "attn/norm": "LayerNorm(x) over D, eps 1e-6, no affine (N, T, D); x = the residual stream",
    "attn/z": "norm * (1 + scale_msa) + shift_msa (N, T, D)",
    "attn/score": "LazyDiT gate: sigmoid(sum over tokens of z @ attn_lazy_learning[s]) (N,)",
    "attn/compute": "LazyDiT decision (N,) bool: score >= threshold (True = compute; the first step always computes)",
    "attn/q": "attn.qkv(z)[..., 0:D] (n, T, D), head h in columns h*Dh..(h+1)*Dh",
    "attn/k": "attn.qkv(z)[..., D:2D] (n, T, D)",
    "attn/v": "attn.qkv(z)[..., 2D:3D] (n, T, D)",
    "attn/probs": "softmax(q k^T / sqrt(Dh)) per head (n, H, T, T)",
    "attn/o": "probs @ v, heads merged (n, T, D): the input of attn.proj",
    "attn/out": "attn.proj(o), or the cached output when skipped (N, T, D), before the gate_msa multiply",
    "attn/residual": "x + gate_msa * attn/out (N, T, D)",
    "mlp/norm": "LayerNorm(x) over D, eps 1e-6, no affine (N, T, D); x = attn/residual",
    "mlp/z": "norm * (1 + scale_mlp) + shift_mlp (N, T, D)",
    "mlp/score": "LazyDiT gate: sigmoid(sum over tokens of z @ mlp_lazy_learning[s]) (N,)",
    "mlp/compute": "LazyDiT decision (N,) bool: score >= threshold (True = compute; the first step always computes)",
    "mlp/hidden": "mlp.fc1(z) (n, T, 4D)",
    "mlp/act": "GELU, tanh approximation, of hidden (n, T, 4D)",
    "mlp/out": "mlp.fc2(act), or the cached output when skipped (N, T, D), before the gate_mlp multiply",
    "mlp/residual": "x + gate_mlp * mlp/out (N, T, D): the block output",
    "final/shift": "final_layer.adaLN_modulation.1(SiLU(c)) chunk 0 of 2 (N, D)",
    "final/scale": "final_layer.adaLN_modulation.1(SiLU(c)) chunk 1 of 2 (N, D)",
    "final/norm": "LayerNorm(x) of the last block's output (N, T, D)",
    "final/z": "norm * (1 + scale) + shift (N, T, D)",
    "final/tokens": "final_layer.linear(z) (N, T, p*p*out_channels)",
    "final/out": "unpatchify(tokens) (N, out_channels, H, W): the model output",
    "cfg/eps": "guided eps: uncond + cfg_scale * (cond - uncond) on the first guide_channels channels (B, g, H, W)",
    "model_output": "the sampler's model output (B, out_channels, H, W): the guided cond half with guidance",
    "eps": "eps re-derived from x0 as ADM does: (sqrt(1/acp_t) x_t - x0) / sqrt(1/acp_t - 1) (B, C, H, W)",
    "x0": "predicted x_0: sqrt(1/acp_t) x_t - sqrt(1/acp_t - 1) eps_model (B, C, H, W)",
    "x_next": "the latents after the step, x_{t-1} (B, C, H, W)",
    "sample": "the final latents (B, C, H, W)",
    "image": "vae.decode(sample / 0.18215) (B, 3, 8H, 8W)",
}

_SCOPES = re.compile(r"(step|block)\.(\d+)/")


class TraceError(FileError):
    """A trace that cannot be written, read or compared; the message names the file and the reason."""


def kind_of(name):
    """The name without its step and block numbers: ``step.03/block.02/attn/q`` -> ``attn/q``."""
    return _SCOPES.sub("", name)


def position(name):
    """(step, layer) of a name, each None when the name has none."""
    found = dict((k, int(v)) for k, v in _SCOPES.findall(name))
    return found.get("step"), found.get("block")


def sample_stride(n, max_elements):
    """The stride that keeps at most about ``max_elements`` of n values: the smallest
    s >= ceil(n / max_elements) coprime to n (1 when the tensor is small enough)."""
    if max_elements is None or n <= max_elements:
        return 1
    s = -(-n // max_elements)
    while math.gcd(s, n) != 1:
        s += 1
    return s


# ----------------------------------------------------------------------------
# Recording

class Recorder:
    """Collects named intermediates in execution order (``model.recorder = Recorder()``).

    include / exclude: fnmatch patterns on the full name (``*/attn/probs``); a name is
    kept when it matches some include pattern (all, if none are given) and no exclude
    pattern.  attn_probs: also record the (n, H, T, T) attention probabilities (large).
    max_elements: store tensors larger than this strided (see the module docstring).
    Every value is copied to the host when recorded, so later in-place updates (the
    lazy cache) do not change it.
    """

    def __init__(self, include=None, exclude=None, attn_probs=False, max_elements=None):
        if max_elements is not None and int(max_elements) < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements}")
        self.include = list(include or [])
        self.exclude = list(exclude or [])
        self.attn_probs = bool(attn_probs)
        self.max_elements = None if max_elements is None else int(max_elements)
        self.prefix = ""
        self.arrays = {}            # name -> stored host array (strided: 1-D)
        self.entries = {}           # name -> manifest entry; insertion order = execution order
        self.ops = {}               # op key (the name's kind) -> what makes it

    def wants(self, name):
        return ((not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include))
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))

    def __call__(self, name, array, op=None):
        """Record ``array`` (NumPy, CuPy, PyOpenCL or anything ``to_numpy`` takes) as ``prefix + name``.

        op: what made it, for names ``OPS`` does not describe."""
        name = self.prefix + name
        if not self.wants(name):
            return
        if name in self.entries:
            raise TraceError(f"{name!r} recorded twice: the names of one trace must be unique")
        a = np.array(to_numpy(array))                     # a copy, on the host
        stride = sample_stride(a.size, self.max_elements) if a.dtype.kind == "f" else 1
        self.arrays[name] = a.reshape(-1)[::stride].copy() if stride > 1 else a
        key = kind_of(name)
        self.ops.setdefault(key, op or OPS.get(key, ""))
        self.entries[name] = {"name": name, "op": key, "shape": list(a.shape), "stride": stride}

    def trace(self, meta):
        """The recorded tensors as a ``Trace`` with manifest fields ``meta``."""
        meta = dict(meta, ops=dict(self.ops), recorded={"include": self.include, "exclude": self.exclude,
                                                        "attn_probs": self.attn_probs,
                                                        "max_elements": self.max_elements})
        return Trace(meta, list(self.entries.values()), dict(self.arrays))


# ----------------------------------------------------------------------------
# The trace and its file

class Trace:
    """Tensors in execution order with their manifest.

    meta: the manifest without its tensor list (``meta["ops"]``: op key -> description);
    entries: [{name, op, shape, stride}] in execution order; arrays: name -> stored array.  ``path`` is the file it was
    read from, if any.
    """

    def __init__(self, meta, entries, arrays, path=None):
        self.meta = dict(meta)
        self.entries = {e["name"]: e for e in entries}
        self.arrays = arrays
        self.path = path

    @property
    def names(self):
        return list(self.entries)

    @property
    def label(self):
        return self.path or "<in memory>"

    def __contains__(self, name):
        return name in self.entries

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, name):
        """The full tensor (only for tensors stored whole)."""
        e = self.entries[name]
        if e["stride"] != 1:
            raise TraceError(f"{self.label}: {name!r} is stored strided (every {e['stride']}th value)")
        return self.arrays[name]

    def manifest(self):
        return dict(self.meta, format=FORMAT, format_version=FORMAT_VERSION,
                    tensors=list(self.entries.values()))

    def save(self, path):
        """Write the trace to ``path`` (one safetensors file, atomic)."""
        write_safetensors(path, {n: self.arrays[n] for n in self.entries},
                          {MANIFEST_KEY: json.dumps(self.manifest(), separators=(",", ":")), "format": FORMAT})
        return path


# safetensors dtype -> NumPy dtype of the stored little-endian bytes (the ones a trace uses).
_STORED = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}


def _stored_shape(e):
    n = math.prod(e["shape"])
    return (len(range(0, n, e["stride"])),) if e["stride"] > 1 else tuple(e["shape"])


_MAX_ELEMENTS = 1 << 62          # a manifest shape's element count (int64 positions stay exact)
_SCALAR = (str, int, float, bool, type(None))


def _field(path, where, value, kinds, check=None, what=None):
    """``value`` of manifest field ``where``: of one of ``kinds`` (bool is not an int here) and ``check``."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = any(type(value) is k or (k is float and type(value) is int) for k in kinds)
    if not ok or (check is not None and value is not None and not check(value)):
        names = "/".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise TraceError(f"{path}: manifest field {where} is {_describe_value(value)}, expected "
                         f"{what or names}: not a trace this tinylazy can compare")
    return value


def _describe_value(v):
    from .io import describe_value
    return describe_value(v)


def _check_meta(path, m):
    """Every manifest field that compare, rerun and the report read: present where needed, of its type."""
    kind = _field(path, "kind", m.get("kind"), str, lambda v: v in ("sampling", "forward"), '"sampling" or "forward"')
    model = _field(path, "model", m.get("model"), dict)
    _field(path, "model.weights_hash", model.get("weights_hash"), (str, type(None)))
    _field(path, "model.file", model.get("file"), (str, type(None)))
    config = _field(path, "model.config", model.get("config"), (dict, type(None)))
    for k, v in (config or {}).items():
        _field(path, f"model.config.{k}", v, _SCALAR)
    for key in ("dtype", "backend", "device", "tinylazy_version"):
        _field(path, key, m.get(key), (str, type(None)))
    _field(path, "seed", m.get("seed"), (int, type(None)))
    finite = math.isfinite
    sampler = _field(path, "sampler", m.get("sampler"), dict if kind == "sampling" else (dict, type(None)))
    if sampler is not None:
        ints = lambda v: all(type(x) is int for x in v)
        for key, kinds, check, what in (
                ("name", str, None, None), ("steps", int, lambda v: 1 <= v <= 1000, "an integer in 1..1000"),
                ("eta", float, finite, None), ("cfg_scale", float, finite, None),
                ("guide_channels", int, lambda v: v >= 1, None), ("clip_denoised", bool, None, None),
                ("batch", int, lambda v: v >= 1, None), ("labels", list, ints, "a list of integers"),
                ("timestep_map", list, ints, "a list of integers")):
            _field(path, f"sampler.{key}", sampler.get(key), kinds if kind == "sampling" else (kinds, type(None)),
                   check, what)
    lazy = _field(path, "lazy", m.get("lazy"), (dict, type(None)))
    if lazy is not None:
        _field(path, "lazy.gates_hash", lazy.get("gates_hash"), (str, type(None)))
        _field(path, "lazy.gates_file", lazy.get("gates_file"), (str, type(None)))
        _field(path, "lazy.threshold", lazy.get("threshold", 0.5), float, finite)
        _field(path, "lazy.forced_decisions", lazy.get("forced_decisions"), (bool, type(None)))
        _field(path, "lazy.lazy_ratio", lazy.get("lazy_ratio"), (float, type(None)), finite)
    vae = _field(path, "vae", m.get("vae"), (dict, type(None)))
    if vae is not None:
        _field(path, "vae.scaling_factor", vae.get("scaling_factor"), float, finite)
    ops = _field(path, "ops", m.get("ops"), (dict, type(None)))
    for k, v in (ops or {}).items():
        _field(path, f"ops.{k}", v, str)
    recorded = _field(path, "recorded", m.get("recorded"), (dict, type(None)))
    if recorded is not None:
        strings = lambda v: all(isinstance(x, str) for x in v)
        for key in ("include", "exclude"):
            _field(path, f"recorded.{key}", recorded.get(key), (list, type(None)), strings, "a list of patterns")
        _field(path, "recorded.attn_probs", recorded.get("attn_probs", False), bool)
        _field(path, "recorded.max_elements", recorded.get("max_elements"), (int, type(None)), lambda v: v >= 1)


def _check_manifest(path, manifest):
    """-> (meta, entries) from a parsed manifest, or a TraceError naming what is wrong."""
    if not isinstance(manifest, dict):
        raise TraceError(f"{path}: the trace manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise TraceError(f"{path}: not a tinylazy trace (manifest format {_describe_value(manifest.get('format'))}, "
                         f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise TraceError(f"{path}: trace format version {_describe_value(version)}; this tinylazy reads version "
                         f"{FORMAT_VERSION}")
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise TraceError(f"{path}: manifest has no 'tensors' list")
    for i, e in enumerate(entries):
        ok = (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("op", ""), str)
              and isinstance(e.get("shape"), list) and len(e["shape"]) <= 32
              and all(type(s) is int and s >= 0 for s in e["shape"]) and math.prod(e["shape"]) <= _MAX_ELEMENTS
              and type(e.get("stride")) is int and 1 <= e["stride"] <= max(1, math.prod(e["shape"])))
        if not ok:
            raise TraceError(f"{path}: manifest tensor entry {i} is malformed (needs name, op, shape of at most "
                             f"32 sizes and 2^62 elements, and a stride in 1..elements): {_describe_value(e)}")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        seen = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise TraceError(f"{path}: manifest lists {_describe_value(dup)} twice")
    meta = {k: v for k, v in manifest.items() if k not in ("tensors", "format", "format_version")}
    _check_meta(path, meta)
    return meta, entries


def load_trace(path):
    """Read a trace file; a truncated, malformed or foreign file is a TraceError naming the problem.

    NaN and Inf are kept (a broken backend's trace must still be comparable).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TraceError(f"{path}: no such file")          # a folder or a FIFO: io.open_regular names it
    try:
        f = SafetensorsFile(path)
    except WeightsError as e:
        raise TraceError(f"not a readable trace: {e}") from None
    with f:
        if MANIFEST_KEY not in f.metadata:
            raise TraceError(f"{path}: a safetensors file without a trace manifest "
                             f"(no {MANIFEST_KEY!r} in its metadata): not a tinylazy trace")
        manifest = parse_json(f.metadata[MANIFEST_KEY], f"{path}: the trace manifest", TraceError)
        meta, entries = _check_manifest(path, manifest)
        listed, stored = {e["name"] for e in entries}, set(f.entries)
        if listed != stored:
            missing, extra = sorted(listed - stored), sorted(stored - listed)
            raise TraceError(f"{path}: manifest and tensors disagree: listed but not stored {missing[:5]}, "
                             f"stored but not listed {extra[:5]}")
        for e in entries:
            info = f.entries[e["name"]]
            if info.dtype not in _STORED:
                raise TraceError(f"{path}: tensor {e['name']!r} has dtype {info.dtype}, "
                                 f"not one a trace uses ({', '.join(_STORED)})")
            if info.shape != _stored_shape(e):
                raise TraceError(f"{path}: tensor {e['name']!r} is stored as {info.shape}, but the manifest "
                                 f"says shape {tuple(e['shape'])} with stride {e['stride']}")
        try:
            arrays = {e["name"]: f.read(e["name"], finite=False) for e in entries}
        except WeightsError as err:
            raise TraceError(f"not a readable trace: {err}") from None
    return Trace(meta, entries, arrays, path=path)
