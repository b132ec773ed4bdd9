"""ADM's sample batch: the ``.npz`` that guided-diffusion's evaluator scores for FID.

guided-diffusion's sampling scripts save ``np.savez(path, images, labels)``: ``arr_0``
(N, H, W, 3) uint8 RGB and ``arr_1`` (N,) int64 class labels; its
``evaluations/evaluator.py`` takes a reference batch and a sample batch in that form.
Pixels are quantised as DiT's ``sample_ddp.py`` saves its FID samples,
``clamp(127.5 x + 128, 0, 255)`` truncated to uint8; a one-channel model's images are
replicated to three channels.

Files are written as ``np.savez`` writes them (an uncompressed zip of NumPy-format
``.npy`` members), streamed member by member so a 50,000-image file never sits in
memory, with fixed zip timestamps so that equal arrays give equal bytes.  They are
read without pickle, and every member's header is checked against its expectation and
against the member's size before anything is allocated.
"""
import zipfile

import numpy as np

from .backend import to_numpy
from .errors import FileError

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)           # the zip epoch: the same bytes for the same arrays
_MAX_RATIO = 1100                              # deflate cannot expand beyond ~1032:1
_CHUNK = 1 << 24


class SampleFileError(FileError):
    """A sample file (or shard) that is damaged or not what it should be; the message names the file."""


def saved_uint8(x):
    """Samples in [-1, 1] -> uint8 as ``sample_ddp.py`` saves them: trunc(clamp(127.5 x + 128, 0, 255)).

    Computed in float64 (the official code runs it in float32: the two differ only
    where 127.5 x + 128 is within float32 rounding of an integer)."""
    x = np.asarray(to_numpy(x), dtype=np.float64)
    return np.trunc(np.clip(127.5 * x + 128.0, 0.0, 255.0)).astype(np.uint8)


def to_adm_images(images):
    """(B, C, H, W) samples in [-1, 1], C in {1, 3} -> (B, H, W, 3) uint8 RGB."""
    u = saved_uint8(images)
    if u.ndim != 4 or u.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W), got shape {u.shape}")
    if u.shape[1] == 1:
        u = np.repeat(u, 3, axis=1)                                    # grey -> RGB
    return np.ascontiguousarray(u.transpose(0, 2, 3, 1))              # (B, C, H, W) -> (B, H, W, C)


# ----------------------------------------------------------------------------
# Writing

def write_npz(fileobj, arrays):
    """Write an ``np.savez``-style file to the seekable binary ``fileobj``.

    arrays: {name: ndarray, or (shape, dtype, iterable of arrays)}; an iterable's
    arrays are written one after another as the C-order data of one member of that
    shape and dtype (the assembled ``arr_0`` comes shard by shard).  Members are
    ``<name>.npy`` in the given order.
    """
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            if isinstance(a, tuple):
                shape, dtype, chunks = tuple(int(s) for s in a[0]), np.dtype(a[1]), a[2]
            else:
                a = np.asarray(a)
                shape, dtype, chunks = a.shape, a.dtype, [a]
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
            info.create_system, info.external_attr = 3, 0o644 << 16
            want = int(np.prod(shape)) * dtype.itemsize
            written = 0
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                for c in chunks:
                    c = np.ascontiguousarray(c)
                    if c.dtype != dtype:
                        raise ValueError(f"{name}: a chunk of dtype {c.dtype}, the member is {dtype}")
                    f.write(c.reshape(-1).view(np.uint8).data)
                    written += c.nbytes
            if written != want:
                raise ValueError(f"{name}: wrote {written} bytes of data for shape {shape} {dtype} ({want} bytes)")


# ----------------------------------------------------------------------------
# Reading

def _read_member(zf, path, name, dtype, shape):
    try:
        info = zf.getinfo(f"{name}.npy")
    except KeyError:
        raise SampleFileError(f"{path}: no {name} in the file (members: {sorted(zf.namelist())[:8]})") from None
    if info.file_size > max(info.compress_size, 1) * _MAX_RATIO:
        raise SampleFileError(f"{path}: {name} claims {info.file_size} bytes from {info.compress_size} stored")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise SampleFileError(f"{path}: {name} has .npy format version {version}, expected 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read_header(f)
        want = np.dtype(dtype)
        if got_dtype != want or fortran or len(got_shape) != len(shape) \
                or any(w is not None and g != w for g, w in zip(got_shape, shape)):
            want_shape = "(" + ", ".join("N" if w is None else str(w) for w in shape) + ")"
            raise SampleFileError(f"{path}: {name} is {got_dtype} {tuple(got_shape)}"
                                  f"{' Fortran-order' if fortran else ''}, expected {want} {want_shape}")
        nbytes = int(np.prod(got_shape, dtype=object)) * want.itemsize
        if f.tell() + nbytes != info.file_size:
            raise SampleFileError(f"{path}: {name} holds {info.file_size - f.tell()} bytes of data, its header "
                                  f"says {tuple(got_shape)} {want} ({nbytes} bytes)")
        out = np.empty(got_shape, dtype=want)
        buf = out.reshape(-1).view(np.uint8)
        for lo in range(0, nbytes, _CHUNK):
            data = f.read(min(_CHUNK, nbytes - lo))
            if len(data) != min(_CHUNK, nbytes - lo):
                raise SampleFileError(f"{path}: {name} ends early")
            buf[lo:lo + len(data)] = np.frombuffer(data, dtype=np.uint8)
        f.read(1)                                                    # reaching the end checks the CRC-32
    return out


def read_npz(path, members):
    """{name: array} of an ``.npz`` whose members must be ``members``: {name: (dtype, shape)},
    shape entries None where any size is allowed.  Other members are ignored.

    Raises SampleFileError for a missing, truncated, corrupt (CRC) or unexpected file.
    """
    path = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return {name: _read_member(zf, path, name, dtype, shape) for name, (dtype, shape) in members.items()}
    except SampleFileError:
        raise
    except FileNotFoundError:
        raise SampleFileError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        raise SampleFileError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None


def read_samples(path, size=None):
    """An ADM sample batch: (images (N, H, W, 3) uint8, labels (N,) int64); size: the (H, W) it must have."""
    H, W = (None, None) if size is None else size
    arrays = read_npz(path, {"arr_0": (np.uint8, (None, H, W, 3)), "arr_1": (np.int64, (None,))})
    images, labels = arrays["arr_0"], arrays["arr_1"]
    if len(images) != len(labels):
        raise SampleFileError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels
