"""Recycled memory for the large NumPy arrays of a training step.

A training step allocates the same big arrays every time (the forward's cache, the
backward's gradients) and frees them all by its end.  NumPy gets them from malloc, which
hands big blocks back to the kernel when they are freed and gets fresh ones the next step;
fresh pages cost a page fault each on first touch.  On this project's 2-core VM a step of
the digits model took 6k-36k faults (0.04-0.2 s of system time), depending on the machine's
state; recycled, 0-1k (docs/benchmarks.md, "Training step").

Inside ``with recycling():`` ``empty`` serves arrays of MIN_BYTES and more from buffers of
the same size that earlier arrays no longer use: each array sits on its own anonymous
mmap, and when the array and every view of it are gone (a ``weakref.finalize`` on the
array that owns the buffer; views keep that array alive), the buffer goes back to a free
list instead of to the kernel.  So the step's memory stays mapped between steps: what is
kept idle is at most what was in use at once, per size.  Outside the context, and for
small arrays, ``empty`` is ``np.empty``.  ``release()`` drops the idle buffers.
"""
import contextlib
import math
import mmap
import os
import threading
import weakref

import numpy as np

MIN_BYTES = 1 << 20                            # smaller arrays come from malloc, which reuses them anyway
PAGE = mmap.PAGESIZE
HUGE = 1 << 22                                 # from here on NumPy asks for transparent huge pages: so do we

_free = {}                                     # buffer size (bytes) -> [idle mmap, ...]
_lock = threading.Lock()                       # finalizers run in whichever thread drops the array
_active = 0                                    # recycling() depth; entered from one thread at a time


def _new_lock_in_child():
    global _lock
    _lock = threading.Lock()                   # a forked child may inherit it held by a parent thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


@contextlib.contextmanager
def recycling():
    """Serve ``empty`` from recycled buffers while inside (nestable)."""
    global _active
    _active += 1
    try:
        yield
    finally:
        _active -= 1


def _give_back(size, buf):
    with _lock:
        _free.setdefault(size, []).append(buf)


def empty(shape, dtype):
    """np.empty(shape, dtype), C order; from a recycled buffer inside ``recycling()``."""
    if not _active:
        return np.empty(shape, dtype=dtype)
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    size = -(-nbytes // PAGE) * PAGE
    with _lock:
        idle = _free.get(size)
        buf = idle.pop() if idle else None
    if buf is None:
        buf = mmap.mmap(-1, size)                                  # anonymous, zero pages on first touch
        if size >= HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)                        # as NumPy's own allocator does
    owner = np.frombuffer(buf, dtype=dtype, count=count)          # views of it keep it (not buf) as base
    weakref.finalize(owner, _give_back, size, buf)
    return owner.reshape(shape)


def idle_bytes():
    """Bytes held in idle buffers."""
    with _lock:
        return sum(size * len(bufs) for size, bufs in _free.items())


def release():
    """Unmap every idle buffer (buffers still in use return to the free list when freed)."""
    with _lock:
        bufs = [b for lst in _free.values() for b in lst]
        _free.clear()
    for b in bufs:
        b.close()
