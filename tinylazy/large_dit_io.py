"""Large-DiT weights on disk: memory-mapped safetensors, with the family and the
configuration read from the keys.

``load_large_dit`` checks the header with ``io.SafetensorsFile`` (every key, shape and
dtype, before any data is touched), then maps the file: every tensor is a read-only
view of the mapping (``np.memmap``), never a copy, so a model costs page cache rather
than private memory and its pages are read on first use.  Tensors stored in the model
dtype are used in place; float16 and bfloat16 ones (and float32 ones in float64 audit
mode) are converted a block at a time (``storage.BlockWeights``).  Loading verifies every
value is finite and hashes the weights (``io.weights_hash``), one pass over the file.

A file is Large-DiT when it has ``layers.0.attention.wq.weight``; ``api.load_dit`` sends
such files here.  What the shapes cannot tell (the number of heads, the latent size, the
patch size, the q/k-norm groups) comes from the file's ``config`` metadata, written by
``save_large_dit`` and ``convert_large_dit``, else from arguments, else the official
defaults (32 heads for the official widths, 32x32 latents, patch 2, one group).
"""
import dataclasses
import json
import math
import os
import re
import sys

import numpy as np

from .io import (FLOAT_DTYPES, SafetensorsFile, WeightsError, block_count, describe_value, int_value, parse_json,
                 weights_hash, write_safetensors)
from .large_dit import HEADS_BY_WIDTH, LargeDiT, LargeDiTConfig, param_shapes
from .storage import Bfloat16Array, stored_dtype, to_bfloat16, to_float16

FAMILY_KEY = "layers.0.attention.wq.weight"
_VIEW = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
STORAGES = ("float64", "float32", "float16", "bfloat16")


def _weights_file(path):
    """A folder holding exactly one safetensors file -> that file's path; any other existing path
    -> itself (``io.SafetensorsFile`` refuses what is not a regular file); None: neither."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        return os.path.join(path, found[0]) if len(found) == 1 else None
    return path if os.path.exists(path) else None


def is_large_dit(path):
    """Whether ``path`` (a file, or a folder with one safetensors file) holds Large-DiT keys.
    Anything unreadable is "no": ``io.load_dit`` then reports what is wrong with it."""
    f = _weights_file(path)
    if f is None:
        return False
    try:
        with SafetensorsFile(f) as st:
            return FAMILY_KEY in st.entries
    except (WeightsError, OSError):
        return False


# ----------------------------------------------------------------------------
# The mapping

def map_tensors(f):
    """An open, validated ``SafetensorsFile`` of float tensors -> {name: read-only view of the
    file} (bfloat16 as ``Bfloat16Array``), mapped from the descriptor the header was checked
    on; the views keep the mapping alive."""
    if sys.byteorder != "little":
        raise WeightsError(f"{f.path}: memory-mapped weights need a little-endian machine")
    mm = f.memmap()
    views = {}
    for name, e in f.entries.items():
        if e.dtype not in _VIEW:
            raise WeightsError(f"{f.path}: tensor {describe_value(name)} is {e.dtype}, not a float tensor")
        a = mm[e.begin:e.end].view(_VIEW[e.dtype]).reshape(e.shape)
        views[name] = Bfloat16Array(a) if e.dtype == "BF16" else a
    return views


def _check_finite(label, name, a):
    """A NaN or Inf anywhere in a stored tensor is an error (bfloat16: exponent bits all ones)."""
    if isinstance(a, Bfloat16Array):
        bad = bool(np.any((a.raw & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    else:
        bad = not np.isfinite(a).all()
    if bad:
        raise WeightsError(f"{label}: tensor {name!r} contains NaN or Inf")


# ----------------------------------------------------------------------------
# Configuration from the keys

_MAX_SETTING = 1 << 20
# What a file may state about its configuration beyond what its shapes show, and the fields
# it states that the shapes decide (checked against them).
_SETTINGS = ("num_heads", "input_size", "patch_size", "qk_norm_groups")
_FROM_SHAPES = ("in_channels", "hidden_size", "depth", "ffn_hidden", "cond_size", "qk_norm", "num_classes",
                "learn_sigma")


def _meta_config(f):
    """The file's stated configuration: its metadata 'config' object (``save_large_dit``) and
    its metadata 'num_heads', which must agree with the config's."""
    cfg = {}
    if "config" in f.metadata:
        where = f"{f.path}: metadata 'config'"
        cfg = parse_json(f.metadata["config"], where)
        if not isinstance(cfg, dict):
            raise WeightsError(f"{where} is {describe_value(cfg)}, not a JSON object")
    if "num_heads" in f.metadata:
        heads = int_value(f"{f.path}: metadata 'num_heads'", f.metadata["num_heads"], 1, _MAX_SETTING, text=True)
        if "num_heads" in cfg and cfg["num_heads"] != heads:
            raise WeightsError(f"{f.path}: metadata 'num_heads' is {heads} but its config says "
                               f"{describe_value(cfg['num_heads'])}")
        cfg.setdefault("num_heads", heads)
    return cfg


def infer_config(label, shapes, meta, num_heads=None, input_size=None, patch_size=None):
    """LargeDiTConfig from the tensor shapes (name -> shape) of Large-DiT weights and ``meta``
    (what their file records: num_heads, input_size, patch_size, qk_norm_groups, norm_eps,
    class_dropout_prob, and the fields the shapes decide, which must agree with them), the
    arguments winning over ``meta`` (see the module docstring).  ``label`` names the weights
    in errors.  Block indices must run 0..N-1 (``io.block_count``) before anything is sized."""

    def need(name, ndim):
        if name not in shapes:
            raise WeightsError(f"{label}: cannot infer the Large-DiT configuration: missing {name!r}")
        if len(shapes[name]) != ndim:
            raise WeightsError(f"{label}: {name!r} has shape {shapes[name]}, expected {ndim} dimensions")
        return shapes[name]

    def setting(key, arg, default):
        if arg is not None:
            return int_value(f"{label}: the {key} argument", arg, 1, _MAX_SETTING)
        if key in meta:
            return int_value(f"{label}: metadata config {key}", meta[key], 1, _MAX_SETTING)
        return default

    depth = block_count(label, shapes, "layers")
    if depth == 0:
        raise WeightsError(f"{label}: no Large-DiT blocks (layers.N.*) found")
    D, patch_in = need("x_embedder.weight", 2)
    Dc = need("t_embedder.mlp.0.weight", 2)[0]
    F = need("layers.0.feed_forward.w1.weight", 2)[0]
    kv = need("layers.0.attention.wk.weight", 2)[0]
    if kv != D:
        raise WeightsError(f"{label}: wk has {kv} output rows for hidden size {D}: grouped-query attention "
                           f"(n_kv_heads < n_heads) is not supported")
    rows = need("y_embedder.embedding_table.weight", 2)[0]
    out_rows = need("final_layer.linear.weight", 2)[0]
    p = setting("patch_size", patch_size, 2)
    C, rem = divmod(patch_in, p * p)
    oc, rem2 = divmod(out_rows, p * p)
    if rem or rem2 or oc not in (C, 2 * C):
        raise WeightsError(f"{label}: x_embedder takes {patch_in} and final_layer.linear gives {out_rows} values "
                           f"per patch: not p*p*C and p*p*2C (or p*p*C) with patch size {p}")
    if num_heads is None and "num_heads" not in meta and D not in HEADS_BY_WIDTH:
        raise WeightsError(f"{label}: cannot tell the number of attention heads for hidden size {D} (not an "
                           f"official Large-DiT width, and the file records none): pass num_heads=N")
    heads = setting("num_heads", num_heads, HEADS_BY_WIDTH.get(D))
    eps = meta.get("norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, float) or not 0 < eps < 1:
        raise WeightsError(f"{label}: metadata config norm_eps is {describe_value(eps)}, not a number in (0, 1)")
    dropout = meta.get("class_dropout_prob", 0.1)           # official: > 0, so the table has a null row
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise WeightsError(f"{label}: metadata config class_dropout_prob is {describe_value(dropout)}, not a "
                           f"number in [0, 1)")
    try:
        cfg = LargeDiTConfig(input_size=setting("input_size", input_size, 32), patch_size=p, in_channels=C,
                             hidden_size=D, depth=depth, num_heads=heads, ffn_hidden=F, norm_eps=eps,
                             qk_norm="layers.0.attention.q_norm.weight" in shapes,
                             qk_norm_groups=setting("qk_norm_groups", None, 1), cond_size=Dc,
                             num_classes=rows - (1 if dropout > 0 else 0), learn_sigma=oc == 2 * C,
                             class_dropout_prob=float(dropout)).validate()
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{label}: {e}") from None
    contradicted = [f"{key} is {describe_value(meta[key])}, the tensors give {getattr(cfg, key)}"
                    for key in _FROM_SHAPES if key in meta and not (type(meta[key]) is type(getattr(cfg, key))
                                                                     and meta[key] == getattr(cfg, key))]
    if contradicted:
        raise WeightsError(f"{label}: the metadata config contradicts the tensors: " + "; ".join(contradicted))
    return cfg


def validate(label, shapes, dtypes, cfg):
    """Every key present, none left over, every shape right, float dtypes only (name -> shape,
    name -> safetensors dtype): one error listing all problems."""
    expected = param_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted(k if len(k) <= 200 else k[:200] + "..." for k in set(shapes) - set(expected))
    misshaped = [f"{k}: {shapes[k]}, expected {s}" for k, s in expected.items() if k in shapes and shapes[k] != s]
    nonfloat = [f"{k} ({dtypes[k]})" for k in expected if k in dtypes and dtypes[k] not in FLOAT_DTYPES]
    problems = [f"{title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "")
                for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", misshaped), ("non-float tensors", nonfloat)) if items]
    if problems:
        raise WeightsError(f"{label}: does not match a Large-DiT with depth {cfg.depth}, hidden {cfg.hidden_size}: "
                           + "; ".join(problems))


# ----------------------------------------------------------------------------
# Loading and saving

def load_large_dit(path, dtype="float32", backend="numpy", num_heads=None, input_size=None, patch_size=None,
                   verify=True):
    """A ``LargeDiT`` over the memory-mapped tensors of ``path`` (a file, or a folder with one).

    The header is checked first (``io.SafetensorsFile``: a regular file, exact coverage,
    known dtypes), then the names (block indices 0..N-1), the configuration against the
    shapes and the metadata, every key, shape and dtype, all before the file is mapped.
    verify (default): check that every value is finite and hash the weights and the
    configuration (``io.weights_hash``; one pass over the file; the model carries the
    hash, and a ``weights_hash`` in the file's metadata must match it).  verify=False maps
    the file and reads nothing: the model then has no hash (None)."""
    fpath = _weights_file(path)
    if fpath is None:
        raise WeightsError(f"{path}: no such file, or not a folder with exactly one .safetensors file")
    with SafetensorsFile(fpath) as f:
        shapes = {k: e.shape for k, e in f.entries.items()}
        cfg = infer_config(fpath, shapes, _meta_config(f), num_heads, input_size, patch_size)
        validate(fpath, shapes, {k: e.dtype for k, e in f.entries.items()}, cfg)
        recorded = f.metadata.get("weights_hash")
        if recorded is not None and not re.fullmatch(r"[0-9a-f]{64}", recorded):
            raise WeightsError(f"{fpath}: metadata 'weights_hash' is {describe_value(recorded)}, not a sha256 "
                               f"hex digest")
        stored = map_tensors(f)
    model = LargeDiT(cfg, stored, dtype=dtype, backend=backend)
    if verify:
        for name in sorted(stored):
            _check_finite(fpath, name, stored[name])
        model.weights_hash = weights_hash(model)
        model.params.release()
        if recorded is not None and recorded != model.weights_hash:
            raise WeightsError(f"{fpath}: tensors and configuration (num_heads {cfg.num_heads}) do not match the "
                               f"weights_hash in the file's metadata (modified or corrupted file)")
    return model


class _Rounded:
    """A tensor to write in ``storage``, rounded from its value when the storage is narrower."""

    def __init__(self, value, storage):
        self.value, self.storage, self.shape = value, storage, tuple(value.shape)
        self.st_dtype = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}[storage]

    def stored(self):
        a = self.value() if callable(self.value) else self.value
        if self.storage == "bfloat16":
            return a if isinstance(a, Bfloat16Array) else to_bfloat16(a)
        if isinstance(a, Bfloat16Array):
            a = a.astype(np.float32)                                # exact
        if self.storage == "float16":
            return to_float16(a)
        return np.asarray(a, dtype=self.storage)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.stored())


class _Lazy:
    """A tensor made on demand by ``make()``, with its shape known up front."""

    def __init__(self, shape, make):
        self.shape, self.make = tuple(shape), make

    def __call__(self):
        return self.make()


def save_large_dit(params, config, path, storage="float32", metadata=None, record_hash=True, progress=None):
    """Write Large-DiT parameters with official keys to a safetensors file (atomically).

    params: a ``LargeDiT`` (its ``params``) or a mapping name -> array, or name ->
    callable returning the array (made one at a time: the benchmarks write multi-GB
    random models).  storage: "float32", "bfloat16" (round to nearest even), "float16"
    or "float64".  The metadata records the config, num_heads and, with
    ``record_hash``, the weights hash of the values as stored (one more pass)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    source = params.params if hasattr(params, "params") else params
    shapes = param_shapes(config)
    if set(source) != set(shapes):
        raise ValueError(f"parameters do not match {config}: {sorted(set(source) ^ set(shapes))[:5]}")
    tensors = {k: _Rounded(source[k] if not callable(source[k]) else _Lazy(shapes[k], source[k]), storage)
               for k in sorted(shapes)}
    meta = dict(metadata or {})
    meta.update(config=json.dumps(dataclasses.asdict(config)), num_heads=str(config.num_heads),
                family=config.family)
    if record_hash:
        meta["weights_hash"] = weights_hash(_StoredValues(tensors, config))
    write_safetensors(path, tensors, meta, progress=progress)


class _StoredValues:
    """A model as ``io.weights_hash`` sees it: ``params``, the values as ``save_large_dit`` stores
    them (widened to float32), and the ``config``."""

    def __init__(self, tensors, config):
        self.params, self.config = _WidenedMap(tensors), config


class _WidenedMap(dict):
    def __getitem__(self, name):
        a = dict.__getitem__(self, name).stored()
        return a.astype(np.float32) if isinstance(a, Bfloat16Array) else a


def storage_of(model):
    """{stored dtype: bytes} of a LargeDiT's weights (e.g. {"BF16": 14.6e9})."""
    out = {}
    for a in model.params.stored.values():
        out[stored_dtype(a)] = out.get(stored_dtype(a), 0) + a.nbytes
    return out


def nbytes_of(config, storage="float32"):
    """Bytes of a Large-DiT's weights in ``storage``."""
    item = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[storage]
    return item * sum(math.prod(s) for s in param_shapes(config).values())
