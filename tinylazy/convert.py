"""Convert a PyTorch checkpoint to safetensors, without PyTorch and without running its code.

    tinylazy convert DiT-XL-2-256x256.pt DiT-XL-2-256x256.safetensors      # or python -m tinylazy.convert

``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a pickle of the object,
with each tensor storage replaced by a persistent id ``('storage', <Type>Storage,
key, location, numel)``), the raw storages as ``<name>/data/<key>``, and
``<name>/byteorder``.  The pickle is read with a restricted unpickler whose
``find_class`` resolves only the globals needed to rebuild tensors and ordered
dicts, each to tinylazy's own inert stand-in; every other global is refused, so
no code named by the file ever runs.  One exception: ``argparse.Namespace`` (the
``args`` entry that the official DiT train.py and LazyDiT checkpoints carry)
becomes an inert placeholder, its class never imported, only its plain fields
(str, int, float, bool, None) kept for ``convert_large_dit`` to read, and it never
reaches the output.  Tensors are read lazily, one storage at a time,
while the output is written.

What a checkpoint may cost is bounded before it is paid (every refusal a ConvertError
naming the file): a regular file only; at most 4096 + size/1024 zip entries; a
``data.pkl`` of at most max(1 MiB, size/64) bytes, pre-scanned so that its memo
indices stay below the number of opcodes read (one 5-byte opcode could make the
unpickler allocate gigabytes); nested dicts at most 32 deep; a compressed member
expanding to at most max(64 MiB, the archive's size) (torch.save stores members
uncompressed); every tensor a view that stays inside its storage and never visits an
element twice (a stride-0 view of one float was written out as 1 GiB), and all
tensors together at most as many elements as the storages they view (+ 65536).
"""
import collections
import io
import math
import os
import pickle
import pickletools
import sys
import zipfile

import numpy as np

from . import cli
from .io import FLOAT_DTYPES, WeightsError, describe_value, open_regular, write_safetensors


class ConvertError(WeightsError):
    """A checkpoint that cannot be converted; the message names the file and the entry."""


# torch.<Name>Storage -> (stored dtype, safetensors dtype); bfloat16 is kept as raw uint16.
_STORAGES = {
    "DoubleStorage": ("f8", "F64"), "FloatStorage": ("f4", "F32"), "HalfStorage": ("f2", "F16"),
    "BFloat16Storage": ("u2", "BF16"), "LongStorage": ("i8", "I64"), "IntStorage": ("i4", "I32"),
    "ShortStorage": ("i2", "I16"), "CharStorage": ("i1", "I8"), "ByteStorage": ("u1", "U8"),
    "BoolStorage": ("b1", "BOOL"),
}
_TORCH_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "double", "float", "half", "long", "int", "short"}
_PLACEHOLDER_GLOBALS = {("argparse", "Namespace")}
_MAX_NDIM = 32
_MAX_DEPTH = 32                  # nested dicts in the checkpoint (official: 3, e.g. opt/state/<i>)
_PICKLE_FLOOR, _PICKLE_SHARE = 1 << 20, 64       # data.pkl <= max(1 MiB, archive bytes / 64)
_INFLATE_FLOOR = 64 << 20        # a compressed member expands to at most max(64 MiB, archive bytes)
_ENTRIES_FLOOR, _ENTRY_BYTES = 4096, 1024        # zip entries <= 4096 + archive bytes / 1024
_SHARED_VIEWS = 1 << 16          # elements written beyond those of the storages viewed


# ----------------------------------------------------------------------------
# Inert stand-ins for the allowed globals

class _Inert:
    """Base of the stand-ins: pickle's BUILD may not set attributes on them."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD on a tensor/storage object is not part of the torch.save format")


class _StorageType(_Inert):
    def __init__(self, name):
        self.name = name
        code, self.st_dtype = _STORAGES[name]
        self.raw = np.dtype(code)


class _TorchDtype(_Inert):
    def __init__(self, name):
        self.name = name


class _Storage(_Inert):
    """One raw storage in the archive, read on first use."""

    def __init__(self, archive, key, stype, numel):
        self.archive, self.key, self.stype, self.numel = archive, key, stype, numel


class TensorRef(_Inert):
    """A tensor of the checkpoint: a strided view of a storage, materialised by ``read()``."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    @property
    def st_dtype(self):
        return self.storage.stype.st_dtype

    @property
    def numel(self):
        return math.prod(self.shape)

    def check_view(self, name):
        """Raise ConvertError unless the view stays inside its storage and visits no element twice."""
        where = f"{self.storage.archive.path}: tensor {name} (offset {self.offset}, shape {self.shape}, " \
                f"stride {self.stride})"
        if self.numel == 0:
            return
        if self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) >= self.storage.numel:
            raise ConvertError(f"{where} runs past its storage of {self.storage.numel} elements")
        reach = 0                        # sorted by stride, each dimension must step over all the smaller ones
        for stride, size in sorted((st, s) for s, st in zip(self.shape, self.stride) if s > 1):
            if stride <= reach:
                raise ConvertError(f"{where} visits storage elements more than once (an expanding view): refused, "
                                   f"its output would be larger than its data")
            reach += (size - 1) * stride

    def read(self):
        """The tensor as a C-contiguous array of the stored dtype (bfloat16 as raw uint16)."""
        data = self.storage.archive.storage_array(self.storage)
        n = self.numel
        if n and self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) >= data.size:
            raise ConvertError(f"{self.storage.archive.path}: tensor view (offset {self.offset}, shape {self.shape}, "
                               f"stride {self.stride}) runs past its storage of {data.size} elements")
        if n == 0:
            return np.empty(self.shape, data.dtype)
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], self.shape, [s * item for s in self.stride],
                                               writeable=False)
        return np.ascontiguousarray(view)


class _Placeholder(_Inert):
    """Stands in for an allowed non-tensor global (argparse.Namespace): takes anything and keeps
    only the plain values of its state (str, int, float, bool, None) in ``fields``; the
    Large-DiT converter reads the official model_args.pth (model name, image size) from them."""

    qualname = "argparse.Namespace"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.fields = {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        plain = (str, int, float, bool, type(None))
        self.fields = {k: v for k, v in state.items() if type(k) is str and type(v) in plain} \
            if isinstance(state, dict) else {}


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Stand-in for torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2 expects a storage, got {type(storage).__name__}")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= _MAX_NDIM
            and all(type(v) is int and v >= 0 for v in (storage_offset, *size, *stride))):
        raise pickle.UnpicklingError(f"bad tensor geometry: offset {describe_value(storage_offset)}, "
                                     f"size {describe_value(size)}, stride {describe_value(stride)}")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    """Stand-in for torch._utils._rebuild_parameter(data, requires_grad, hooks[, state]): the tensor itself."""
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive):
        super().__init__(file)
        self.archive = archive
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        if (module, name) in _PLACEHOLDER_GLOBALS:
            return _Placeholder
        raise pickle.UnpicklingError(f"refused global '{module}.{name}': only tensors, storages and "
                                     f"ordered dicts may be rebuilt (no code from the checkpoint is run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unsupported persistent id ({describe_value(pid)})")
        _, stype, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = _Storage(self.archive, key, stype, numel)
        elif self.storages[key].stype.name != stype.name:
            # One storage viewed as two dtypes: torch itself refuses to load this.
            raise pickle.UnpicklingError(f"storage {key} is referenced as {self.storages[key].stype.name} and {stype.name}")
        return self.storages[key]


# ----------------------------------------------------------------------------
# The archive

class Checkpoint:
    """A torch.save zip checkpoint: ``obj`` is the unpickled object with ``TensorRef`` leaves."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = open_regular(self.path, ConvertError)
        self.zip = None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._open_zip()
            self._read_pickle()
        except BaseException:
            self.close()
            raise

    def _open_zip(self):
        end = _end_record(self._file)
        if end is None:
            raise ConvertError(f"{self.path}: not a zip checkpoint (torch.save writes zip archives since "
                               f"PyTorch 1.6; the legacy format is not supported)")
        entries, limit = end[zipfile._ECD_ENTRIES_TOTAL], _ENTRIES_FLOOR + self.size // _ENTRY_BYTES
        if entries > limit:
            raise ConvertError(f"{self.path}: {entries} zip entries, more than the {limit} a checkpoint of "
                               f"{self.size} bytes may hold")
        try:
            self.zip = zipfile.ZipFile(self._file)
        except Exception as e:                               # BadZipFile, bad names (UnicodeDecodeError), ...
            raise ConvertError(f"{self.path}: not a readable zip archive ({type(e).__name__}: "
                               f"{_message(e)})") from None

    def _read_pickle(self):
        pkls = [n for n in self.zip.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ConvertError(f"{self.path}: expected one data.pkl in the archive, found "
                               f"{describe_value(pkls) if pkls else 'none'}")
        self.prefix = pkls[0][:-len("data.pkl")]
        order = "little"                                    # files from before the byteorder record are little-endian
        if self.prefix + "byteorder" in self.zip.NameToInfo:
            order = self._member("byteorder", limit=16).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise ConvertError(f"{self.path}: unknown byteorder {describe_value(order)}")
        self.byteorder = "<" if order == "little" else ">"
        self._cached = (None, None)
        pkl = self._member("data.pkl", limit=max(_PICKLE_FLOOR, self.size // _PICKLE_SHARE))
        try:
            _prescan(pkl)
            self.obj = _RestrictedUnpickler(io.BytesIO(pkl), self).load()
        except Exception as e:                              # any failure here means a malformed or hostile pickle
            raise ConvertError(f"{self.path}: cannot read {pkls[0]}: {_message(e)}") from None

    def _member(self, name, nbytes=None, limit=None):
        """The bytes of member ``prefix + name``: its size (exactly ``nbytes``, at most ``limit``) and how
        far it may inflate are checked from the central directory before anything is decompressed."""
        try:
            info = self.zip.getinfo(self.prefix + name)
        except KeyError:
            raise ConvertError(f"{self.path}: archive has no {self.prefix + name}") from None
        if nbytes is not None and info.file_size != nbytes:
            raise ConvertError(f"{self.path}: {info.filename} has {info.file_size} bytes, expected {nbytes}")
        if limit is not None and info.file_size > limit:
            raise ConvertError(f"{self.path}: {info.filename} has {info.file_size} bytes, more than the {limit}-byte "
                               f"limit for it")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise ConvertError(f"{self.path}: stored member {info.filename} claims {info.file_size} bytes in "
                                   f"{info.compress_size}")
        elif info.file_size > max(_INFLATE_FLOOR, self.size):
            raise ConvertError(f"{self.path}: compressed member {info.filename} would inflate to {info.file_size} "
                               f"bytes, more than the archive's {self.size} (or 64 MiB): refused")
        try:
            return self.zip.read(info)
        except Exception as e:                               # bad CRC, truncated archive, unknown compression
            raise ConvertError(f"{self.path}: cannot read {info.filename} ({type(e).__name__}: "
                               f"{_message(e)})") from None

    def storage_array(self, storage):
        """The storage's elements as a 1-D array (byte order as recorded); the last one read is cached."""
        if self._cached[0] is not storage:
            self._cached = (None, None)
            raw = storage.stype.raw.newbyteorder(self.byteorder)
            buf = self._member("data/" + storage.key, storage.numel * raw.itemsize)
            self._cached = (storage, np.frombuffer(buf, raw))
        return self._cached[1]

    def check_storage(self, storage):
        """The storage's member exists with the size its numel implies (read from the directory only)."""
        info = self.zip.NameToInfo.get(self.prefix + "data/" + storage.key)
        nbytes = storage.numel * storage.stype.raw.itemsize
        if info is None:
            raise ConvertError(f"{self.path}: archive has no {self.prefix}data/{storage.key}")
        if info.file_size != nbytes:
            raise ConvertError(f"{self.path}: {info.filename} has {info.file_size} bytes, expected {nbytes}")

    def close(self):
        self._cached = (None, None)
        if self.zip is not None:
            self.zip.close()
        self._file.close()


def _message(e, limit=300):
    text = str(e)
    return text if len(text) <= limit else text[:limit] + "..."


def _end_record(f):
    """zipfile's end-of-central-directory record (entry count, directory size), or None if not a zip."""
    try:
        return zipfile._EndRecData(f)
    except Exception:                                        # e.g. BadZipFile for multi-disk zip64
        return None


def _prescan(data):
    """Walk the pickle's opcodes before unpickling: a memo index (PUT, BINPUT, LONG_BINPUT) may not exceed
    the number of opcodes read so far, as every writer numbers them (the C unpickler grows its memo table
    to the index: one 5-byte LONG_BINPUT of 10^8 costs 1.6 GB)."""
    for count, (op, arg, _) in enumerate(pickletools.genops(data)):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) <= count:
            raise pickle.UnpicklingError(f"memo index {arg} at opcode {count}: not one a pickler writes")


def select_state_dict(obj, key="auto", path="checkpoint"):
    """The mapping that holds the weights -> (key used or None for the top level, mapping).

    ``auto``: ``ema`` when present (as the official DiT ``find_model`` picks for train.py
    checkpoints), else ``model`` (official LazyDiT gate checkpoints), else the top level.
    """
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    if key == "auto":
        for k in ("ema", "model"):
            if isinstance(obj.get(k), dict):
                return k, obj[k]
        return None, obj
    if not isinstance(obj.get(key), dict):
        keys = ", ".join(str(k)[:100] if isinstance(k, (str, int)) else describe_value(k) for k in list(obj)[:20]) \
            + (", ..." if len(obj) > 20 else "")
        raise ConvertError(f"{path}: no dict under key {key!r}; top-level keys: {keys}")
    return key, obj[key]


def _flatten(d, path, prefix="", depth=0):
    """(dotted name, leaf) pairs of nested dicts; string and integer keys only, at most _MAX_DEPTH deep."""
    if depth >= _MAX_DEPTH:
        raise ConvertError(f"{path}: dicts nested more than {_MAX_DEPTH} deep (at {describe_value(prefix)})")
    for k, v in d.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise ConvertError(f"{path}: key {describe_value(k)} under {describe_value(prefix or '<top>')} is not "
                               f"a string or an integer")
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, path, name + ".", depth + 1)
        else:
            yield name, v


def _describe(v):
    if isinstance(v, TensorRef):
        return f"{v.st_dtype} tensor"
    if isinstance(v, _Placeholder):
        return v.qualname
    return type(v).__name__


class _Converted:
    """A tensor to write: float32 (widened exactly from f16/bf16, rounded from f64) or as stored."""

    def __init__(self, ref, keep):
        self.ref, self.shape = ref, ref.shape
        self.st_dtype = ref.st_dtype if keep else "F32"

    def __array__(self, dtype=None, copy=None):
        a = self.ref.read()
        if self.st_dtype == "F32" and self.ref.st_dtype != "F32":
            a = (a.astype(np.uint32) << 16).view(np.float32) if self.ref.st_dtype == "BF16" else a.astype(np.float32)
        return a


def check_tensors(ckpt, refs):
    """Every view (name -> ``TensorRef``) inside its storage, no element visited twice, every storage
    present with its size, and all tensors together no more elements than the storages they view
    (+ _SHARED_VIEWS): checked from the pickle and the zip directory, before any data is read or any
    output is written."""
    storages, total = {}, 0
    for name, ref in refs.items():
        ref.check_view(describe_value(name))
        storages[id(ref.storage)] = ref.storage
        total += ref.numel
    for storage in storages.values():
        ckpt.check_storage(storage)
    backing = sum(st.numel for st in storages.values())
    if total > backing + _SHARED_VIEWS:
        raise ConvertError(f"{ckpt.path}: the tensors hold {total} elements but view storages of only {backing}: "
                           f"views that repeat data are refused (the output would be larger than the checkpoint)")


def check_output(sources, dst, overwrite=False):
    """A converter's output ``dst`` may be none of the files it reads (``sources``), and may not
    exist unless ``overwrite``."""
    for src in sources:
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            same = os.path.realpath(src) == os.path.realpath(dst)
        if same:
            raise ConvertError(f"{dst}: the output is the checkpoint itself; write to another file")
    if not overwrite and os.path.lexists(dst):
        raise ConvertError(f"{dst}: exists; choose another output (or overwrite it explicitly)")


def convert(src, dst, key="auto", dtype="float32", progress=True, overwrite=False):
    """Convert checkpoint ``src`` to safetensors ``dst``; float tensors are kept by name.

    ``dst`` may not be ``src``, and may not exist unless ``overwrite``.  The checkpoint's
    limits (module docstring) are checked before the output is written; the output is
    written to a temporary file and renamed, so nothing is left behind by a failure.
    Returns (key used, names written, {skipped name: why}).
    """
    if dtype not in ("float32", "keep"):
        raise ValueError(f"dtype must be 'float32' or 'keep', got {dtype!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    check_output([src], dst, overwrite)
    ckpt = Checkpoint(src)
    try:
        used, tree = select_state_dict(ckpt.obj, key, ckpt.path)
        tensors, skipped = {}, {}
        for name, v in _flatten(tree, ckpt.path):
            if name in tensors or name in skipped:
                raise ConvertError(f"{ckpt.path}: two entries flatten to the name {describe_value(name)}")
            if isinstance(v, TensorRef) and v.st_dtype in FLOAT_DTYPES:
                tensors[name] = _Converted(v, keep=dtype == "keep")
            else:
                skipped[name] = _describe(v)
        if not tensors:
            raise ConvertError(f"{ckpt.path}: no float tensors " + (f"under key {used!r}" if used else "in the checkpoint"))
        check_tensors(ckpt, {name: t.ref for name, t in tensors.items()})
        names = list(tensors)
        meta = {"source": os.path.basename(ckpt.path), "key": used or "", "converter": "tinylazy.convert"}
        write_safetensors(dst, tensors, meta, progress="convert" if progress else None)
    finally:
        ckpt.close()
    return used, names, skipped


# ----------------------------------------------------------------------------
# Command line

def add_arguments(p):
    p.add_argument("src", help="checkpoint written by torch.save, e.g. DiT-XL-2-256x256.pt")
    p.add_argument("dst", help="output .safetensors file (written atomically; never the input)")
    p.add_argument("--key", default="auto",
                   help="top-level entry holding the weights: ema, model, any other key, or auto "
                        "(default: ema if present, else model, else the whole dict)")
    p.add_argument("--dtype", choices=("float32", "keep"), default="float32",
                   help="float32 (default): store float32 (f16/bf16 widened exactly); keep: store as in the checkpoint")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args):
    cli.input_file(args.src, "SRC")
    cli.output_file(args.dst, "DST", (".safetensors",), inputs={"SRC": args.src}, force=args.force, replace=False)
    used, names, skipped = convert(args.src, args.dst, args.key, args.dtype, overwrite=bool(args.force))
    if skipped:
        print(f"skipped {len(skipped)} non-float entries: " +
              ", ".join(f"{k} ({v})" for k, v in list(skipped.items())[:10]) + (" ..." if len(skipped) > 10 else ""),
              file=sys.stderr)
    print(f"wrote {args.dst}: {len(names)} tensors from {args.src}" + (f" [{used}]" if used else ""))


def main(argv=None, prog=None):
    return cli.run_command("convert", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.convert"))
