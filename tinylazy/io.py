"""Weights on disk: a safetensors reader/writer, and loading/saving a DiT.

The safetensors format (huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then raw little-endian tensor data; offsets count
from the end of the header.  The reader is written on the format itself (not
``safetensors.numpy``) so that every tensor is read with one ``readinto`` straight
into its final array (float16/bfloat16 through a small chunk buffer): loading
never holds a second copy of the weights, and a bad file fails with an error
that names the file and the key before any model is built.

``load_dit`` accepts the official layout (the keys of facebookresearch/DiT's state
dict) or diffusers' ``DiTTransformer2DModel`` layout, mapped back to the official
names (docs/numerics.md), and infers the configuration from the tensor shapes.
"""
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import stat
import typing
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import atomic, resources
from .backend import check_backend, resolve_dtype, to_numpy
from .config import HEADS_BY_WIDTH, DiTConfig
from .dit import DiT, param_shapes
from .embeddings import pos_embed_2d
from .errors import FileError
from .progress import Progress


class WeightsError(FileError):
    """A weight file that cannot be used; the message names the file and the key."""


# ----------------------------------------------------------------------------
# Files from outside: regular files only, JSON that cannot blow up

def open_regular(path, error=WeightsError):
    """``path`` opened for unbuffered binary reading if it is a regular file, else ``error``.

    Opened with O_NONBLOCK, so a FIFO (or a device) is refused at once instead of
    blocking on a writer that never comes; for a regular file the flag changes nothing.
    """
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise error(f"{path}: is {kind}, not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text, where, error=WeightsError):
    """JSON from a file (str or UTF-8 bytes) -> value; every failure is one ``error`` naming ``where``.

    Refused as well as malformed JSON: NaN / Infinity (not JSON), integers longer
    than Python's 4300-digit limit, invalid UTF-8 and nesting deeper than the
    interpreter's recursion limit (a RecursionError caught here, never a crash).
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:                                 # JSONDecodeError, UnicodeDecodeError, int limits
        raise error(f"{where}: not valid JSON ({_short(e)})") from None


def read_json_file(path, error=WeightsError, max_bytes=1 << 20):
    """A small JSON file (config.json, an index, a tolerances table): regular, at most
    ``max_bytes``, valid JSON; anything else is one ``error`` naming the file."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{os.fspath(path)}: {size} bytes, more than the {max_bytes}-byte limit for this JSON file")
        raw = f.read(max_bytes + 1)
    return parse_json(raw, os.fspath(path), error)


def _short(e, limit=200):
    s = str(e)
    return s if len(s) <= limit else s[:limit] + "..."


def describe_value(v, limit=200):
    """A short, safe description of a value from a file, for error messages (never a deep repr)."""
    if isinstance(v, (bool, int, float)) or v is None:
        s = repr(v) if not isinstance(v, int) or abs(v) < 10 ** 30 else f"an integer of {len(str(abs(v)))} digits"
    elif isinstance(v, str):
        s = repr(v[:limit]) + ("..." if len(v) > limit else "")
    else:
        s = f"a {type(v).__name__}" + (f" of {len(v)} items" if isinstance(v, (list, dict, tuple)) else "")
    return s


# ----------------------------------------------------------------------------
# The safetensors format

# safetensors dtype -> dtype of the stored bytes.  BF16 has no NumPy dtype: its
# bytes are read as uint16 and widened to float32 (the top half of a float32).
_RAW = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_FROM_NUMPY = {np.dtype(v).newbyteorder("="): k for k, v in _RAW.items() if k != "BF16"}
_MAX_HEADER = 100 << 20          # safetensors' own limit on the JSON header
# Parsing JSON costs up to ~15x its bytes of memory: a header over _FREE_HEADER must be
# paid for by _HEADER_SHARE times as many bytes of tensor data (real files: the bundled
# DiT's header is 0.1% of its data, a 50-step DiT-XL trace's 6 MB; a trace strided to
# 64 values per tensor has about as much header as data, so it stays under 8 MiB).
_FREE_HEADER = 8 << 20
_HEADER_SHARE = 16
_EMPTY_ENTRIES = 1024            # zero-byte tensors allowed (every other tensor holds at least one byte)
_MAX_NDIM = 32
_CHUNK = 16 << 20                # bytes per chunk when converting f16/bf16 on the fly


class TensorInfo(typing.NamedTuple):
    dtype: str          # safetensors dtype, e.g. "F32"
    shape: tuple
    begin: int          # absolute byte offsets in the file
    end: int


class _HeaderObjects:
    """``object_pairs_hook`` of the header parse: refuses duplicate names, and stops the parse as
    soon as there are more objects than the data can back, or more than _EMPTY_ENTRIES zero-byte
    tensors (so a header of a million empty entries costs microseconds, not gigabytes)."""

    def __init__(self, data_bytes):
        self.count, self.empty, self.data_bytes = 0, 0, data_bytes

    def __call__(self, pairs):
        self.count += 1
        if self.count > self.data_bytes + _EMPTY_ENTRIES + 2:          # + the metadata and the header itself
            raise WeightsError(f"more than {self.data_bytes + _EMPTY_ENTRIES} header entries for "
                               f"{self.data_bytes} bytes of tensor data (a tensor holds at least one byte, but for "
                               f"{_EMPTY_ENTRIES} empty ones)")
        seen = dict(pairs)
        if len(seen) != len(pairs):
            keys = set()
            dup = next(k for k, _ in pairs if k in keys or keys.add(k))
            raise WeightsError(f"duplicate name {describe_value(dup)} in the header")
        offsets = seen.get("data_offsets")
        if type(offsets) is list and len(offsets) == 2 and offsets[0] == offsets[1]:
            self.empty += 1
            if self.empty > _EMPTY_ENTRIES:
                raise WeightsError(f"more than {_EMPTY_ENTRIES} zero-byte tensors in the header")
        return seen


class SafetensorsFile:
    """A validated safetensors file; ``read(name)`` reads one tensor.

    Opening checks the whole header and reads no tensor data: a regular file; the
    header length within the file and within 100 MiB (and, above 8 MiB, at most a
    sixteenth of the data it describes); valid JSON with no duplicate names, at
    most one entry per data byte and at most 1024 empty tensors (both counted while
    it parses); known dtypes; shapes that match their byte spans; and a data area
    covered exactly, as the safetensors library requires: sorted by offset the
    tensors start at the end of the header, each begins where the previous one
    ended, and the last ends at the end of the file (no gap, no overlap, no
    trailing bytes, so a header length that is off by a few bytes cannot shift
    every read).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._f = open_regular(self.path)
        try:
            self.metadata, self.entries = self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def _error(self, msg):
        return WeightsError(f"{self.path}: {msg}")

    def _parse_header(self):
        size = os.fstat(self._f.fileno()).st_size
        if size < 8:
            raise self._error(f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        head = bytearray(8)
        self._pread(0, head)
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise self._error(f"header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
        if n > _MAX_HEADER:
            raise self._error(f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
        data_start, data_bytes = 8 + n, size - 8 - n
        if n > _FREE_HEADER and n * _HEADER_SHARE > data_bytes:
            raise self._error(f"header of {n} bytes for only {data_bytes} bytes of tensor data (a header over "
                              f"{_FREE_HEADER >> 20} MiB must describe {_HEADER_SHARE} times its size)")
        raw = bytearray(n)
        self._pread(8, raw)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_HeaderObjects(data_bytes),
                                parse_constant=_no_constant)
        except WeightsError as e:
            raise self._error(str(e)) from None
        except RecursionError:
            raise self._error("header JSON nested too deeply") from None
        except ValueError as e:                             # JSONDecodeError, UnicodeDecodeError, int limits
            raise self._error(f"header is not valid JSON ({_short(e)})") from None
        del raw
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._error("__metadata__ must map strings to strings")
        entries = {name: self._parse_entry(name, e, data_start, size) for name, e in header.items()}
        self._check_coverage(entries, data_start, size)
        return metadata, entries

    def _parse_entry(self, name, e, data_start, size):
        if not (type(e) is dict and len(e) == 3 and "dtype" in e and "shape" in e and "data_offsets" in e):
            keys = sorted(map(str, e))[:5] if isinstance(e, dict) else describe_value(e)
            raise self._error(f"tensor {describe_value(name)}: header entry needs exactly dtype, shape and "
                              f"data_offsets, got {keys}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        raw = _RAW.get(dtype) if type(dtype) is str else None
        if raw is None:
            raise self._error(f"tensor {describe_value(name)}: unknown dtype {describe_value(dtype)} "
                              f"(known: {', '.join(_RAW)})")
        if type(shape) is not list or len(shape) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
            raise self._error(f"tensor {describe_value(name)}: bad shape {describe_value(shape)} (a list of at "
                              f"most {_MAX_NDIM} integers >= 0)")
        if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int
                or type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1]):
            raise self._error(f"tensor {describe_value(name)}: bad data_offsets {describe_value(offsets)}")
        nbytes = math.prod(shape) * raw.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._error(f"tensor {describe_value(name)}: data_offsets {offsets} span "
                              f"{offsets[1] - offsets[0]} bytes, but shape {tuple(shape)} of {dtype} needs {nbytes}")
        begin, end = data_start + offsets[0], data_start + offsets[1]
        if end > size:
            raise self._error(f"tensor {describe_value(name)} ends at byte {end} but the file has {size} bytes: "
                              f"data offsets out of range (truncated file?)")
        return TensorInfo(dtype, tuple(shape), begin, end)

    def _check_coverage(self, entries, data_start, size):
        """Sorted by offset, the tensors tile the data area exactly (safetensors' own rule)."""
        at, prev = data_start, None
        for begin, end, name in sorted((e.begin, e.end, k) for k, e in entries.items()):
            if begin != at:
                where = f"after tensor {describe_value(prev)}" if prev is not None else "at the start of the data"
                if begin < at:
                    raise self._error(f"tensors {describe_value(prev)} and {describe_value(name)} overlap "
                                      f"(bytes {begin - data_start}..{end - data_start} begin before byte "
                                      f"{at - data_start})")
                raise self._error(f"{begin - at} bytes {where} belong to no tensor (data byte "
                                  f"{at - data_start}): the data area must be covered exactly")
            at, prev = end, name
        if at != size:
            raise self._error(f"{size - at} bytes after the last tensor belong to no tensor (a header length "
                              f"that is off, or trailing data): the data area must be covered exactly")

    # -- reading ----------------------------------------------------------------
    def keys(self):
        return list(self.entries)

    def read(self, name, dtype=None, out=None, finite=True):
        """Read tensor ``name``.

        Float tensors are converted to ``dtype`` (None keeps F64/F32/F16 and widens
        BF16 to float32; the widening of F16/BF16 is exact); integer and bool tensors
        are returned as stored.  ``out``: a C-contiguous array of the tensor's shape
        to fill instead of allocating.  NaN or Inf in a float tensor is an error
        unless ``finite`` is False (traces keep them).
        """
        if name not in self.entries:
            raise self._error(f"no tensor {name!r}")
        e = self.entries[name]
        raw = _RAW[e.dtype]
        if e.dtype in FLOAT_DTYPES:
            target = (np.dtype(np.float32) if e.dtype == "BF16" else raw.newbyteorder("=")) if dtype is None \
                else np.dtype(dtype)
            if target.kind != "f":
                raise self._error(f"tensor {name!r}: cannot read a float tensor as {target}")
        else:
            target = raw.newbyteorder("=")
        if out is None:
            out = np.empty(e.shape, target)
        elif tuple(out.shape) != e.shape or not out.flags.c_contiguous or out.dtype != target:
            raise self._error(f"tensor {name!r}: output array {out.shape} {out.dtype} does not fit {e.shape} {target}")
        flat = out.reshape(-1)
        if flat.dtype == raw:
            self._pread(e.begin, flat.view(np.uint8))        # straight into the final array
        else:
            step = max(1, _CHUNK // raw.itemsize)
            buf = np.empty(min(flat.size, step), raw)
            for i in range(0, flat.size, step):
                m = min(step, flat.size - i)
                self._pread(e.begin + i * raw.itemsize, buf[:m].view(np.uint8))
                flat[i:i + m] = _widen(buf[:m], e.dtype)
        if finite and e.dtype in FLOAT_DTYPES and not np.isfinite(flat).all():
            raise self._error(f"tensor {name!r} contains NaN or Inf")
        return out

    def memmap(self):
        """The whole file as a read-only uint8 ``np.memmap`` of the descriptor opened (and
        validated) here, for readers that use tensors in place (``large_dit_io``)."""
        size = os.fstat(self._f.fileno()).st_size
        return np.memmap(self._f, dtype=np.uint8, mode="r", shape=(size,))

    def _pread(self, offset, buf):
        mv = memoryview(buf)
        self._f.seek(offset)
        while mv.nbytes:
            n = self._f.readinto(mv)
            if not n:
                raise self._error(f"unexpected end of file at byte {self._f.tell()}")
            mv = mv[n:]

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _widen(raw, st_dtype):
    """Stored values -> NumPy values; BF16 is the top 16 bits of a float32."""
    if st_dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def read_safetensors(path, dtype=None):
    """Read a whole file -> (dict name -> array, metadata dict).

    ``dtype`` converts float tensors (None keeps the file's float dtype, BF16 -> float32);
    integer and bool tensors are returned as stored.
    """
    with SafetensorsFile(path) as f:
        return {k: f.read(k, dtype) for k in f.keys()}, dict(f.metadata)


def _st_dtype(name, v):
    st = getattr(v, "st_dtype", None)                     # lazy values may declare e.g. "BF16"
    if st is None:
        st = _FROM_NUMPY.get(np.dtype(v.dtype).newbyteorder("="))
    if st not in _RAW:
        raise WeightsError(f"tensor {name!r}: dtype {v.dtype} has no safetensors equivalent")
    return st


def write_safetensors(path, tensors, metadata=None, progress=None):
    """Write ``tensors`` (name -> array) to ``path`` atomically (``tinylazy.atomic``: temp file + rename).

    Values may be NumPy or CuPy arrays, or lazy objects with ``shape``, ``dtype``
    (or ``st_dtype``) and ``__array__``: each is materialised only while it is
    written, so a writer never holds more than one tensor.  ``metadata``: str -> str.
    ``progress``: a label for a progress bar on stderr (None: silent).
    """
    path = os.fspath(path)
    header = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise WeightsError(f"{path}: metadata must map strings to strings, got {bad!r}")
        header["__metadata__"] = dict(metadata)
    offset, layout = 0, []
    for name, v in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise WeightsError(f"{path}: bad tensor name {name!r}")
        st, shape = _st_dtype(name, v), tuple(int(s) for s in v.shape)
        nbytes = math.prod(shape) * _RAW[st].itemsize
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        layout.append((name, v, st, nbytes))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)                       # data starts 8-byte aligned, as safetensors does
    if len(head) > _MAX_HEADER or (len(head) > _FREE_HEADER and len(head) * _HEADER_SHARE > offset) \
            or sum(nbytes == 0 for *_, nbytes in layout) > _EMPTY_ENTRIES:
        raise WeightsError(f"{path}: a header of {len(head)} bytes and {len(layout)} tensors for {offset} bytes of "
                           f"data is more than SafetensorsFile reads back (see its limits)")
    with atomic.writing(path) as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, v, st, nbytes in Progress(layout, desc=progress or "", disable=progress is None):
            a = np.ascontiguousarray(to_numpy(v))
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
            if a.nbytes != nbytes:
                raise WeightsError(f"{path}: tensor {name!r} produced {a.nbytes} bytes, its header says {nbytes}")
            f.write(a.reshape(-1).view(np.uint8))


# ----------------------------------------------------------------------------
# Weight layouts: official names -> the file tensors that hold them

# diffusers DiTTransformer2DModel names per official name (docs/numerics.md); several
# names are concatenated along axis 0 (q, k, v -> qkv).  The timestep and label
# embedders sit in block 0 and are copied into every other block.
_DIFFUSERS = [
    (r"x_embedder\.proj\.(weight|bias)", ["pos_embed.proj.{0}"]),
    (r"pos_embed", ["pos_embed.pos_embed"]),
    (r"t_embedder\.mlp\.0\.(weight|bias)", ["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.{0}"]),
    (r"t_embedder\.mlp\.2\.(weight|bias)", ["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.{0}"]),
    (r"y_embedder\.embedding_table\.weight", ["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", ["transformer_blocks.{0}.attn1.to_q.{1}",
                                                  "transformer_blocks.{0}.attn1.to_k.{1}",
                                                  "transformer_blocks.{0}.attn1.to_v.{1}"]),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", ["transformer_blocks.{0}.attn1.to_out.0.{1}"]),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", ["transformer_blocks.{0}.ff.net.0.proj.{1}"]),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", ["transformer_blocks.{0}.ff.net.2.{1}"]),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", ["transformer_blocks.{0}.norm1.linear.{1}"]),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", ["proj_out_1.{0}"]),
    (r"final_layer\.linear\.(weight|bias)", ["proj_out_2.{0}"]),
]
_DIFFUSERS_SHARED = [
    "norm1.emb.timestep_embedder.linear_1.weight", "norm1.emb.timestep_embedder.linear_1.bias",
    "norm1.emb.timestep_embedder.linear_2.weight", "norm1.emb.timestep_embedder.linear_2.bias",
    "norm1.emb.class_embedder.embedding_table.weight",
]
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def block_count(label, names, prefix):
    """The number of blocks ``{prefix}.{i}.*`` among ``names``.  Their indices must run 0..N-1
    without holes, so N is at most the number of tensors present, whatever numbers the names
    carry; an index of more than 6 digits is refused before it is turned into a number."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    idx = set()
    for k in names:
        m = pattern.match(k)
        if m:
            if len(m.group(1)) > 6:
                raise WeightsError(f"{label}: {describe_value(k)}: block index {m.group(1)[:12]}... "
                                   f"is not a plausible block number")
            idx.add(int(m.group(1)))
    holes = set(range(len(idx))) - idx
    if holes:
        shown = ", ".join(map(str, sorted(idx)[:6])) + (f", ... ({len(idx)} indices)" if len(idx) > 6 else "")
        raise WeightsError(f"{label}: {prefix} are numbered {shown}: block indices must run 0..N-1 "
                           f"without holes (no {prefix}.{min(holes)}.*)")
    return len(idx)


class _Layout:
    """The tensors of one model, in the official or the diffusers layout, and hints for its config."""

    def __init__(self, label, files, config_json=None, weight_map=None):
        self.label = label
        self.files = files
        self.where = {}
        for f in files:
            for k in f.entries:
                if k in self.where:
                    raise WeightsError(f"{label}: tensor {describe_value(k)} appears in both {self.where[k].path} "
                                       f"and {f.path}")
                self.where[k] = f
        if weight_map is not None:
            _check_weight_map(label, weight_map, self.where)
        self.diffusers = any(k.startswith("transformer_blocks.") for k in self.where)
        self.config_json = config_json or {}
        # diffusers does not store pos_embed (it is a recomputed buffer); compute it as the official code does.
        self.computed = {"pos_embed"} if self.diffusers and "pos_embed.pos_embed" not in self.where else set()

    def close(self):
        for f in self.files:
            f.close()

    def file_keys(self, name):
        """Official name -> the file keys that hold it (concatenated along axis 0)."""
        if not self.diffusers:
            return [name]
        for pattern, keys in _DIFFUSERS:
            m = re.fullmatch(pattern, name)
            if m:
                return [k.format(*m.groups()) for k in keys]
        return [name]

    def copies(self, depth):
        """(file key, block-0 key) pairs that must hold equal tensors."""
        if not self.diffusers:
            return []
        return [(f"transformer_blocks.{i}.{k}", f"transformer_blocks.0.{k}")
                for i in range(1, depth) for k in _DIFFUSERS_SHARED]

    def describe(self, name):
        keys = self.file_keys(name)
        return "" if keys == [name] else f" ({' + '.join(keys)})"

    def shape(self, name):
        """Shape of official tensor ``name`` from the header, or None when absent."""
        shapes = [self.where[k].entries[k].shape for k in self.file_keys(name) if k in self.where]
        if len(shapes) != len(self.file_keys(name)) or not shapes:
            return None
        if any(len(s) == 0 or s[1:] != shapes[0][1:] for s in shapes):
            return tuple(shapes)                              # parts that cannot be stacked: reported as is
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    def tensor_bytes(self):
        return sum(e.end - e.begin for f in self.files for e in f.entries.values())

    def depth(self):
        """The number of transformer blocks (``block_count``)."""
        return block_count(self.label, self.where, "transformer_blocks" if self.diffusers else "blocks")

    def stated_configs(self):
        """(where, dict) of each JSON 'config' in the files' metadata (``save_dit`` writes one)."""
        out = []
        for f in self.files:
            if "config" in f.metadata:
                where = f"{f.path}: metadata 'config'"
                cfg = parse_json(f.metadata["config"], where)
                if not isinstance(cfg, dict):
                    raise WeightsError(f"{where} is {describe_value(cfg)}, not a JSON object")
                out.append((where, cfg))
        return out

    def heads_hints(self):
        """(where it came from, value) of every num_heads the files state: metadata, the metadata
        config, diffusers' config.json; they must agree (an edited file that contradicts itself
        is damaged)."""
        hints = []
        for f in self.files:
            if "num_heads" in f.metadata:
                where = f"{f.path}: metadata 'num_heads'"
                hints.append((where, int_value(where, f.metadata["num_heads"], 1, _MAX_HEADS, text=True)))
        for where, cfg in self.stated_configs():
            if "num_heads" in cfg:
                hints.append((where, int_value(f"{where} num_heads", cfg["num_heads"], 1, _MAX_HEADS)))
        if "num_attention_heads" in self.config_json:
            where = f"{self.label}: diffusers config.json 'num_attention_heads'"
            hints.append((where, int_value(where, self.config_json["num_attention_heads"], 1, _MAX_HEADS)))
        if len({v for _, v in hints}) > 1:
            raise WeightsError(f"{self.label}: the file states different head counts: "
                               + ", ".join(f"{w.rsplit(': ', 1)[-1]} = {v}" for w, v in hints))
        return hints

    def read(self, name, shape, dtype):
        """Official tensor ``name`` in ``dtype``, read part by part into one array."""
        out = np.empty(shape, dtype)
        if name in self.computed:
            D, grid = shape[-1], math.isqrt(shape[1])
            out[0] = pos_embed_2d(D, grid).astype(np.float32)   # official buffer: float64 -> float32
            return out
        row = 0
        for k in self.file_keys(name):
            n = self.where[k].entries[k].shape[0]
            self.where[k].read(k, dtype, out=out[row:row + n])
            row += n
        return out


_MAX_HEADS = 1 << 16
_MAX_INPUT_SIZE = 1024           # latent (or pixel) side of a DiT input: 128 = 1024-pixel images with the SD VAE


def int_value(where, value, lo, hi, text=False):
    """An integer stated by a file, in [lo, hi]: a JSON integer (not a bool or a float), or with
    ``text`` a metadata string of decimal digits."""
    if text and isinstance(value, str) and re.fullmatch(r"[0-9]{1,18}", value):
        value = int(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    if type(value) is not int or not lo <= value <= hi:
        raise WeightsError(f"{where} is {describe_value(value)}, not an integer in {lo}..{hi}")
    return value


def _check_weight_map(label, weight_map, where):
    """A sharded index must list exactly the tensors the shards hold, each in the shard that holds it."""
    problems = []
    for k, shard in weight_map.items():
        if k not in where:
            problems.append(f"{describe_value(k)} is listed in {shard} but no shard holds it")
        elif os.path.basename(where[k].path) != shard:
            problems.append(f"{describe_value(k)} is listed in {shard} but held by {os.path.basename(where[k].path)}")
        if len(problems) >= 3:
            break
    unlisted = [k for k in where if k not in weight_map]
    if unlisted:
        problems.append(f"{len(unlisted)} tensors in the shards are not in the index, e.g. {describe_value(unlisted[0])}")
    if problems:
        raise WeightsError(f"{label}: the index does not match its shards: " + "; ".join(problems))


def _open_layout(path):
    """A file (official or diffusers keys), a diffusers model/pipeline folder, a folder with one file,
    or a bundled model's name (``resources.weights_path``)."""
    path = resources.weights_path(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or folder, nor a bundled model "
                           f"({', '.join(resources.bundled_models()) or 'none installed'})")
    config_json, weight_map = None, None
    if os.path.isdir(path):
        root = path
        if os.path.isfile(os.path.join(path, "transformer", "config.json")):
            root = os.path.join(path, "transformer")                  # a diffusers pipeline folder
        if os.path.isfile(os.path.join(root, "config.json")):
            config_json = read_json_file(os.path.join(root, "config.json"))
            if not isinstance(config_json, dict):
                raise WeightsError(f"{os.path.join(root, 'config.json')}: {describe_value(config_json)}, "
                                   f"not a JSON object")
        names, weight_map = _weight_files(root)
    else:
        names = [path]
    files = []
    try:
        for n in names:
            files.append(SafetensorsFile(n))
        return _Layout(path, files, config_json, weight_map)
    except BaseException:
        for f in files:
            f.close()
        raise


def _weight_files(root):
    """-> (paths of the weight files in ``root``, the sharded index's weight_map or None)."""
    index = os.path.join(root, _DIFFUSERS_WEIGHTS + ".index.json")
    if os.path.isfile(os.path.join(root, _DIFFUSERS_WEIGHTS)):
        return [os.path.join(root, _DIFFUSERS_WEIGHTS)], None
    if os.path.isfile(index):                                          # sharded diffusers weights
        return _shards(root, index)
    found = sorted(n for n in os.listdir(root) if n.endswith(".safetensors"))
    if len(found) != 1:
        bins = sorted(n for n in os.listdir(root) if n.endswith((".bin", ".pt", ".pth")))
        hint = f"; convert {bins[0]} with python -m tinylazy.convert" if bins and not found else ""
        raise WeightsError(f"{root}: expected one .safetensors file (or a diffusers {_DIFFUSERS_WEIGHTS}), "
                           f"found {found or 'none'}{hint}")
    return [os.path.join(root, found[0])], None


def _shards(root, index):
    """The shard files a diffusers index names: plain file names inside the model folder only
    (no absolute path, no ``..``, no folder, no symlink that leads out of it)."""
    idx = read_json_file(index, max_bytes=16 << 20)
    weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise WeightsError(f"{index}: needs a non-empty 'weight_map' object mapping tensor names to shard file names")
    real_root = os.path.realpath(root)
    paths = []
    for shard in sorted(set(weight_map.values())):
        if (shard in ("", ".", "..") or os.path.basename(shard) != shard or "/" in shard or "\\" in shard
                or "\0" in shard or not shard.endswith(".safetensors")):
            raise WeightsError(f"{index}: shard {describe_value(shard)} is not a .safetensors file name in the "
                               f"model folder (shards may not name other folders)")
        p = os.path.join(root, shard)
        if os.path.dirname(os.path.realpath(p)) != real_root:
            raise WeightsError(f"{index}: shard {describe_value(shard)} leads outside the model folder {root}")
        paths.append(p)
    return paths, weight_map


# ----------------------------------------------------------------------------
# Configuration inference and validation

def _infer_config(layout, num_heads=None):
    """DiTConfig from the tensor shapes (num_heads: the argument, the files or the width table);
    what the files state about the configuration must agree with the shapes."""
    label = layout.label

    def need(name, ndim):
        s = layout.shape(name)
        if s is None:
            raise WeightsError(f"{label}: cannot infer the model configuration: missing {name!r}{layout.describe(name)}")
        if len(s) != ndim or not all(isinstance(d, int) for d in s):
            raise WeightsError(f"{label}: {name!r}{layout.describe(name)} has shape {s}, expected {ndim} dimensions")
        return s

    D, C, p, p2 = need("x_embedder.proj.weight", 4)
    if p != p2:
        raise WeightsError(f"{label}: 'x_embedder.proj.weight' has a non-square {p}x{p2} kernel")
    stated = layout.stated_configs()
    if layout.shape("pos_embed") is not None:
        _, N, _ = need("pos_embed", 3)
        grid = math.isqrt(N)
        if grid * grid != N:
            raise WeightsError(f"{label}: 'pos_embed' has {N} tokens, not a square grid")
        input_size = grid * p
    elif "sample_size" in layout.config_json:
        input_size = int_value(f"{label}: diffusers config.json 'sample_size'", layout.config_json["sample_size"],
                                1, _MAX_INPUT_SIZE)
        if input_size % p:
            raise WeightsError(f"{label}: diffusers config.json 'sample_size' {input_size} is not a multiple of "
                               f"the patch size {p}")
        pos_bytes = (input_size // p) ** 2 * D * 4
        if pos_bytes > layout.tensor_bytes():
            raise WeightsError(f"{label}: diffusers config.json 'sample_size' {input_size} would make a "
                               f"{pos_bytes}-byte pos_embed, more than all the weights ({layout.tensor_bytes()} "
                               f"bytes): not this model's input size")
    else:
        raise WeightsError(f"{label}: cannot infer the input size: no 'pos_embed' tensor and no config.json sample_size")
    depth = layout.depth()
    if depth == 0:
        raise WeightsError(f"{label}: no transformer blocks found")
    rows = need("y_embedder.embedding_table.weight", 2)[0]
    F = need("blocks.0.mlp.fc1.weight", 2)[0]
    out_rows = need("final_layer.linear.weight", 2)[0]
    out_channels, rem = divmod(out_rows, p * p)
    if rem or out_channels not in (C, 2 * C):
        raise WeightsError(f"{label}: 'final_layer.linear.weight' has {out_rows} rows; expected "
                           f"{p}*{p}*{2 * C} (learned sigma) or {p}*{p}*{C}")
    dropout = 0.1                                     # official: > 0, so the table has a null row
    for where, cfg in stated:
        if "class_dropout_prob" in cfg:
            dropout = cfg["class_dropout_prob"]
            if type(dropout) not in (int, float) or not 0 <= dropout < 1:
                raise WeightsError(f"{where} class_dropout_prob is {describe_value(dropout)}, not a number in [0, 1)")
    heads = _resolve_heads(layout, D, num_heads)
    try:
        cfg = DiTConfig(input_size=input_size, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
                        num_heads=heads, mlp_ratio=F / D, num_classes=rows - (1 if dropout > 0 else 0),
                        learn_sigma=out_channels == 2 * C, class_dropout_prob=float(dropout)).validate()
    except ValueError as e:
        raise WeightsError(f"{label}: {e}") from None
    if cfg.mlp_hidden != F:
        raise WeightsError(f"{label}: MLP width {F} is not representable as hidden {D} x mlp_ratio")
    _check_stated(layout, cfg, stated)
    return cfg


def _check_stated(layout, cfg, stated):
    """The metadata 'config' (save_dit) and diffusers' config.json must agree with the shapes."""
    problems = []
    for where, d in stated:
        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_classes"):
            if key in d and not (type(d[key]) is int and d[key] == getattr(cfg, key)):
                problems.append(f"{where} {key} is {describe_value(d[key])}, the tensors give {getattr(cfg, key)}")
        if "learn_sigma" in d and d["learn_sigma"] is not cfg.learn_sigma:
            problems.append(f"{where} learn_sigma is {describe_value(d['learn_sigma'])}, the tensors give "
                            f"{cfg.learn_sigma}")
        r = d.get("mlp_ratio", cfg.mlp_ratio)
        width = cfg.hidden_size * r if type(r) in (int, float) else math.nan
        if not math.isfinite(width) or int(width) != cfg.mlp_hidden:
            problems.append(f"{where} mlp_ratio is {describe_value(r)}, the tensors give an MLP width "
                            f"of {cfg.mlp_hidden} = {cfg.hidden_size} x {cfg.mlp_ratio:g}")
    cj, where = layout.config_json, f"{layout.label}: diffusers config.json"
    expect = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth,
              "patch_size": cfg.patch_size, "sample_size": cfg.input_size, "num_embeds_ada_norm": cfg.num_classes}
    for key, want in expect.items():
        if cj.get(key) is not None and not (type(cj[key]) is int and cj[key] == want):
            problems.append(f"{where} {key} is {describe_value(cj[key])}, the tensors give {want}")
    if cj.get("attention_head_dim") is not None and not (
            type(cj["attention_head_dim"]) is int and cj["attention_head_dim"] * cfg.num_heads == cfg.hidden_size):
        problems.append(f"{where} attention_head_dim is {describe_value(cj['attention_head_dim'])}, the tensors "
                        f"give {cfg.hidden_size} / {cfg.num_heads} heads")
    if problems:
        raise WeightsError(f"{layout.label}: the stated configuration contradicts the tensors: " + "; ".join(problems))


def _resolve_heads(layout, D, num_heads):
    """num_heads: the argument, else what the files state (metadata, config.json), else the official widths."""
    hints = layout.heads_hints()
    candidates = [("num_heads argument", int_value("num_heads argument", num_heads, 1, _MAX_HEADS))] \
        if num_heads is not None else hints
    for source, heads in candidates[:1]:
        if D % heads:
            raise WeightsError(f"{layout.label}: {source} = {heads} does not divide hidden size {D}")
        return heads
    if D in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[D]
    raise WeightsError(f"{layout.label}: cannot tell the number of attention heads for hidden size {D} "
                       f"(not an official DiT width, and the file records none): pass load_dit(..., num_heads=N)")


def _listing(title, items, limit=12):
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def _validate(layout, cfg):
    """Every key present, no key left over, every shape and dtype right: one error listing all problems."""
    expected = param_shapes(cfg)
    missing, misshaped, used = [], [], set()
    for name, shape in expected.items():
        if name in layout.computed:
            continue
        keys = layout.file_keys(name)
        used.update(keys)
        absent = [k for k in keys if k not in layout.where]
        if absent:
            missing += [f"{k}" + ("" if k == name else f" (for {name})") for k in absent]
        elif layout.shape(name) != shape:
            misshaped.append(f"{name}{layout.describe(name)}: {layout.shape(name)}, expected {shape}")
    for key, ref in layout.copies(cfg.depth):
        used.add(key)
        if key not in layout.where:
            missing.append(key)
        elif ref in layout.where and layout.where[key].entries[key].shape != layout.where[ref].entries[ref].shape:
            misshaped.append(f"{key}: {layout.where[key].entries[key].shape}, expected {ref}'s "
                             f"{layout.where[ref].entries[ref].shape}")
    unexpected = sorted(k if len(k) <= 200 else k[:200] + "..." for k in set(layout.where) - used)
    nonfloat = sorted(f"{k} ({layout.where[k].entries[k].dtype})" for k in used
                      if k in layout.where and layout.where[k].entries[k].dtype not in FLOAT_DTYPES)
    problems = [_listing(t, items) for t, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                      ("wrong shapes", misshaped), ("non-float tensors", nonfloat))
                if items]
    if problems:
        kind = "diffusers DiT" if layout.diffusers else "official DiT"
        raise WeightsError(f"{layout.label}: does not match a {kind} with {_cfg_summary(cfg)}: " + "; ".join(problems))
    return expected


def _cfg_summary(cfg):
    return (f"depth {cfg.depth}, hidden {cfg.hidden_size}, patch {cfg.patch_size}, "
            f"{cfg.in_channels} channels, input {cfg.input_size}, {cfg.num_classes} classes")


def _iter_params(layout, cfg, dtype):
    """Validated (name, array) pairs in name order; diffusers' per-block embedder copies are checked first."""
    expected = _validate(layout, cfg)
    for key, ref in layout.copies(cfg.depth):
        a, b = layout.where[key].read(key), layout.where[ref].read(ref)
        if not np.array_equal(a, b):
            raise WeightsError(f"{layout.label}: {key!r} differs from block 0's copy {ref!r} "
                               f"(the official DiT has one timestep/label embedder)")
    for name in sorted(expected):
        yield name, layout.read(name, expected[name], dtype)


# ----------------------------------------------------------------------------
# Content hash

def config_identity(cfg):
    """The configuration as the weights hash covers it: every field that changes what the
    weights compute, as canonical JSON (sorted keys, no spaces).  The MLP width stands for
    mlp_ratio and null_class for class_dropout_prob > 0 (what they decide), so two configs
    that build the same network have the same identity.  Another model's config (the VAE's):
    its class name and every field of the dataclass, or, where the class says so itself
    (``identity()``: large_dit.LargeDiTConfig), its class name and those fields."""
    if not isinstance(cfg, DiTConfig):
        fields = cfg.identity() if hasattr(cfg, "identity") else dataclasses.asdict(cfg)
        return json.dumps({"family": type(cfg).__name__, **fields}, sort_keys=True, separators=(",", ":"))
    d = {"input_size": int(cfg.input_size), "patch_size": int(cfg.patch_size), "in_channels": int(cfg.in_channels),
         "hidden_size": int(cfg.hidden_size), "depth": int(cfg.depth), "num_heads": int(cfg.num_heads),
         "mlp_hidden": int(cfg.mlp_hidden), "num_classes": int(cfg.num_classes),
         "learn_sigma": bool(cfg.learn_sigma), "null_class": bool(cfg.class_dropout_prob > 0)}
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


class _WeightsHasher:
    """The weights hash, defined here only (docs/golden.md describes it for ports):

        tensors = sha256("tinylazy-weights-v1\\0" + for each tensor in name order:
                         name "\\0" shape as comma-separated decimals "\\0" float32 little-endian values)
        weights_hash = sha256("tinylazy-weights-v2\\0" + config_identity(config) + "\\0" + tensors digest)

    The values are hashed at float32 precision, so a model keeps its hash across
    formats (official / diffusers, bf16 / fp16 upcasts) and load dtypes; the config
    (num_heads included, which no tensor shape shows) is part of it, so an edited
    configuration changes the hash.  The tensors digest alone is what tinylazy
    recorded as ``weights_hash`` before the config was covered (v1).
    """

    def __init__(self):
        self._h = hashlib.sha256(b"tinylazy-weights-v1\0")

    def update(self, name, a):
        a = np.ascontiguousarray(to_numpy(a), dtype="<f4")
        self._h.update(f"{name}\0{','.join(map(str, a.shape))}\0".encode())
        self._h.update(a.reshape(-1).view(np.uint8))

    def tensors_digest(self):
        return self._h.hexdigest()

    def hexdigest(self, config):
        h = hashlib.sha256(b"tinylazy-weights-v2\0" + config_identity(config).encode() + b"\0")
        h.update(self._h.digest())
        return h.hexdigest()


def weights_hash(model_or_path, num_heads=None):
    """Content hash of a DiT: its configuration and weights (a model, or a path ``load_dit``
    accepts, with ``num_heads`` as there); see ``_WeightsHasher``."""
    h = _WeightsHasher()
    if hasattr(model_or_path, "params"):
        for name in sorted(model_or_path.params):
            h.update(name, model_or_path.params[name])
        return h.hexdigest(model_or_path.config)
    layout = _open_layout(model_or_path)
    try:
        cfg = _infer_config(layout, num_heads)
        for name, a in _iter_params(layout, cfg, np.float32):
            h.update(name, a)
    finally:
        layout.close()
    return h.hexdigest(cfg)


# ----------------------------------------------------------------------------
# DiT loading and saving

def load_dit(path, dtype="float32", backend="numpy", num_heads=None):
    """Load a ``DiT`` (backend "numpy" or "cupy") from official-key safetensors, a diffusers
    DiTTransformer2DModel folder, or a folder holding one official safetensors file.
    ``tinylazy.load_dit`` (api.py) also loads onto the OpenCL backend.

    The configuration is inferred from the tensor shapes (num_heads: the argument,
    the file's metadata, diffusers' config.json, or the official width table); what
    the files state about it must agree with the shapes.  Every key, shape and dtype
    is checked before any data is read (block indices 0..N-1 without holes, so
    nothing is sized by a number in a name); tensors are read one by one straight
    into arrays of the model dtype, so no second copy of the weights is made.
    A ``weights_hash`` in the metadata must match (the current hash, or the
    tensors-only hash older files record).  The model is built with the weights hash
    computed while reading.  ``path`` may be a bundled model's name; backend "numpy" or
    "cupy" (``tl.load_dit`` also takes "opencl").
    """
    check_backend(backend)
    if backend == "opencl":
        raise ValueError("io.load_dit builds NumPy/CuPy models; load an OpenCL model with tinylazy.load_dit")
    dt = resolve_dtype(dtype)
    layout = _open_layout(path)
    try:
        cfg = _infer_config(layout, num_heads)
        recorded = [(f.path, f.metadata["weights_hash"]) for f in layout.files if "weights_hash" in f.metadata]
        for where, value in recorded:
            if not re.fullmatch(r"[0-9a-f]{64}", value):
                raise WeightsError(f"{where}: metadata 'weights_hash' is {describe_value(value)}, not a sha256 "
                                   f"hex digest")
        h = _WeightsHasher()
        params, hashed = {}, []
        with ThreadPoolExecutor(max_workers=1) as pool:     # sha256 and reads release the GIL: overlap them
            for name, a in _iter_params(layout, cfg, dt):
                params[name] = a
                hashed.append(pool.submit(h.update, name, a))
        for f in hashed:
            f.result()
    finally:
        layout.close()
    digest = h.hexdigest(cfg)
    for where, value in recorded:
        if value not in (digest, h.tensors_digest()):
            raise WeightsError(f"{where}: tensors and configuration (num_heads {cfg.num_heads}) do not match the "
                               f"weights_hash in the file's metadata (modified or corrupted file)")
    return DiT(cfg, params, dtype=dt, backend=backend, weights_hash=digest)


def save_dit(model, path, metadata=None):
    """Save ``model`` with official keys in its dtype; metadata records the config, num_heads and weights_hash."""
    meta = dict(metadata or {})
    meta.update(config=json.dumps(dataclasses.asdict(model.config)), num_heads=str(model.config.num_heads),
                weights_hash=weights_hash(model))
    write_safetensors(path, {k: model.params[k] for k in sorted(model.params)}, meta)


# ----------------------------------------------------------------------------
# Resume checkpoints (train.Trainer, lazy_train.GateTrainer)

class CheckpointError(WeightsError):
    """A training checkpoint that cannot be resumed; the message names the file and the field."""


class ResumeCheckpoint(SafetensorsFile):
    """A resume checkpoint read field by field: every metadata value is parsed and range-checked
    before it is used, and the tensors must be exactly the expected ones (names, dtypes, shapes,
    from the header) before any is read.  Every refusal is a CheckpointError naming the file."""

    def __init__(self, path, fmt):
        super().__init__(path)
        if self.metadata.get("format") != fmt:
            self.close()
            raise CheckpointError(f"{self.path}: not a {fmt} checkpoint (format "
                                  f"{describe_value(self.metadata.get('format'))})")

    def error(self, msg):
        return CheckpointError(f"{self.path}: {msg}")

    def text(self, key):
        if key not in self.metadata:
            raise self.error(f"metadata has no {key!r}")
        return self.metadata[key]

    def integer(self, key, lo, hi):
        v = self.text(key)
        if not re.fullmatch(r"-?[0-9]{1,19}", v) or not lo <= int(v) <= hi:
            raise self.error(f"metadata {key!r} is {describe_value(v)}, not an integer in {lo}..{hi}")
        return int(v)

    def number(self, key, lo, hi):
        v = self.text(key)
        try:
            x = float(v) if len(v) <= 40 else math.nan
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and lo <= x <= hi):
            raise self.error(f"metadata {key!r} is {describe_value(v)}, not a finite number in {lo:g}..{hi:g}")
        return x

    def json(self, key, kind):
        v = parse_json(self.text(key), f"{self.path}: metadata {key!r}", CheckpointError)
        if not isinstance(v, kind):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(f"metadata {key!r} is {describe_value(v)}, not a JSON {names}")
        return v

    def rng_state(self, key, rng):
        """A bit-generator state for ``rng``: the same kind and layout as its own state, every number an
        integer in range (numpy would take 1.5 for 1, or a has_uint32 of 7, without a word)."""
        state, template = self.json(key, dict), rng.bit_generator.state

        def same(a, t, where):
            if isinstance(t, dict):
                if not isinstance(a, dict) or set(a) != set(t):
                    raise self.error(f"metadata {key!r}: {where or 'the state'} must have the fields {sorted(t)}")
                for k in t:
                    same(a[k], t[k], f"{where}.{k}".lstrip("."))
            elif isinstance(t, str):
                if a != t:
                    raise self.error(f"metadata {key!r}: {where} is {describe_value(a)}, this run uses {t!r}")
            else:
                hi = 2 if where == "has_uint32" else 1 << 32 if where == "uinteger" else 1 << 128
                if type(a) is not int or not 0 <= a < hi:
                    raise self.error(f"metadata {key!r}: {where} is {describe_value(a)}, not an integer in 0..{hi - 1}")
        same(state, template, "")
        return state

    def tensors(self, expected):
        """{name: array} for ``expected`` = {name: (shape or None for any 1-D, NumPy dtype)}, exactly."""
        entries = self.entries
        missing = [k for k in expected if k not in entries]
        extra = [k for k in entries if k not in expected]
        if missing or extra:
            raise self.error("tensors do not match this run: " + "; ".join(
                f"{what} {len(keys)}: " + ", ".join(describe_value(k) for k in keys[:3]) + (", ..." if len(keys) > 3
                                                                                          else "")
                for what, keys in (("missing", missing), ("unexpected", extra)) if keys))
        for name, (shape, dtype) in expected.items():
            e = entries[name]
            stored = None if e.dtype == "BF16" else _RAW[e.dtype].newbyteorder("=")
            ok = len(e.shape) == 1 if shape is None else e.shape == tuple(shape)
            if not ok or stored != np.dtype(dtype):
                raise self.error(f"tensor {name} is {e.dtype} {e.shape}, this run needs {np.dtype(dtype)} "
                                 f"{'(n,)' if shape is None else tuple(shape)}")
        return {name: self.read(name) for name in expected}
