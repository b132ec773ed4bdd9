"""Weights kept as stored (float32, float16 or bfloat16, memory-mapped or in memory) and
converted to the model dtype one block at a time.

A 7B model is 29 GB in float32, more than this machine's memory; stored in bfloat16 it is
15 GB, and memory-mapped from its safetensors file it costs page cache, not private memory.
``BlockWeights`` is the model's ``params`` mapping (official name -> array in the model
dtype) over such storage: a tensor already in the model dtype is handed out as it is (a
memory-mapped view: no copy); the others are converted when first asked for and kept while
the same block is in use, so at most one block's converted weights exist at a time.  A
module that the lazy sampler skips is never converted.

NumPy has no bfloat16, so a bfloat16 tensor is a ``Bfloat16Array``: its raw uint16 values,
which are the top halves of float32 values.  Widening is exact; rounding to bfloat16 is
round-to-nearest-even, as PyTorch's ``.to(torch.bfloat16)`` does.
"""
import re
import sys
from collections.abc import Mapping

import numpy as np


class Bfloat16Array:
    """A bfloat16 tensor as its raw little-endian uint16 values (``raw``, any shape)."""

    st_dtype = "BF16"

    def __init__(self, raw):
        raw = np.asarray(raw)
        if raw.dtype.kind != "u" or raw.dtype.itemsize != 2:
            raise TypeError(f"bfloat16 values are stored as uint16, got {raw.dtype}")
        self.raw = raw

    @property
    def shape(self):
        return self.raw.shape

    @property
    def size(self):
        return self.raw.size

    @property
    def nbytes(self):
        return self.raw.nbytes

    def __array__(self, dtype=None, copy=None):
        """The raw uint16 values: what a safetensors writer stores for a BF16 tensor."""
        return self.raw

    def astype(self, dtype, out=None):
        """The values widened (exactly) to float32, or float64; into ``out`` when given."""
        if np.dtype(dtype) != np.float32:
            f64 = self.astype(np.float32).astype(dtype)
            return f64 if out is None else np.copyto(out, f64) or out
        # bf16 = the top 16 bits of a float32: one pass (astype to uint32, then shift: 20x slower)
        u = np.left_shift(self.raw, np.uint32(16), dtype=np.uint32, out=None if out is None else out.view(np.uint32))
        return u.view(np.float32)


def to_bfloat16(a):
    """float32 (or float64, rounded to float32 first) -> ``Bfloat16Array``, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if not np.isfinite(u.view(np.float32)).all():
        raise ValueError("cannot round NaN or Inf to bfloat16")
    bias = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))       # ties to the even neighbour
    return Bfloat16Array(((u + bias) >> np.uint32(16)).astype(np.uint16))


def to_float16(a):
    """float32/float64 -> float16 (round to nearest even); a value beyond float16's range is an error."""
    a = np.asarray(a)
    big = np.abs(a).max(initial=0.0)
    if not np.isfinite(big) or big > np.finfo(np.float16).max:
        raise ValueError(f"a value of magnitude {big:g} does not fit float16 (max {np.finfo(np.float16).max:g})")
    return a.astype(np.float16)


def stored_dtype(a):
    """'F64', 'F32', 'F16' or 'BF16': how a stored tensor holds its values."""
    if isinstance(a, Bfloat16Array):
        return "BF16"
    return {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[np.dtype(a.dtype)]


def convert(a, dtype, out=None):
    """A stored tensor as an array of ``dtype`` (into ``out`` when given): the stored array itself
    when it has that dtype."""
    if not isinstance(a, Bfloat16Array) and a.dtype == dtype:
        return a
    if isinstance(a, Bfloat16Array):
        return a.astype(dtype, out=out)
    if out is None:
        return a.astype(dtype)
    np.copyto(out, a)
    return out


_BLOCK = re.compile(r"[a-z_]+\.(\d+)\.")


class BlockWeights(Mapping):
    """Official name -> array in ``dtype``, over ``stored`` (name -> stored tensor).

    Names outside the blocks (embedders, final layer; small) are converted once here.
    A block's tensor in another dtype is converted on first access and kept until a
    tensor of another block is asked for.  The next block's conversions go into the
    previous block's arrays (all blocks have the same shapes) where nothing else holds
    them any more (a training cache may): fresh multi-GB allocations cost more in page
    faults than the conversion itself (measured: 7B, two blocks, 2.4-5.7 s vs 0.7 s).
    Not thread-safe: one forward at a time.
    """

    def __init__(self, stored, dtype):
        self.stored = dict(stored)
        self.dtype = np.dtype(dtype)
        self.resident = {k: convert(v, self.dtype) for k, v in self.stored.items() if _BLOCK.match(k) is None}
        self.block, self.converted, self.spare = None, {}, {}
        self.conversions = 0                         # tensors converted so far (for tests and benchmarks)

    def __getitem__(self, name):
        if name in self.resident:
            return self.resident[name]
        a = self.stored[name]
        if not isinstance(a, Bfloat16Array) and a.dtype == self.dtype:
            return a
        block = _BLOCK.match(name).group(1)
        if block != self.block:                       # the previous block's arrays become spares
            self.spare = {}
            for k, v in self.converted.items():
                self.spare.setdefault(v.shape, []).append(v)
            self.block, self.converted = block, {}
        if name not in self.converted:
            self.converted[name] = convert(a, self.dtype, out=self._spare(a.shape))
            self.conversions += 1
        return self.converted[name]

    def _spare(self, shape):
        """A spare array of ``shape`` that only the spare list references, or None."""
        spares = self.spare.get(tuple(shape), [])
        for i in range(len(spares)):
            if sys.getrefcount(spares[i]) <= 2:       # the list and getrefcount's argument: no one else
                return spares.pop(i)
        return None

    def __iter__(self):
        return iter(self.stored)

    def __len__(self):
        return len(self.stored)

    def release(self):
        """Drop the converted block and the spares (their memory goes back once no caller holds them)."""
        self.block, self.converted, self.spare = None, {}, {}

    def stored_bytes(self):
        return sum(a.nbytes for a in self.stored.values())
