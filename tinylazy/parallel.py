"""Threads for the CPU math: one pool, one knob, one BLAS policy (ops, conv, optim and metrics use it).

NumPy's ufuncs run on one core but release the GIL, so the expensive elementwise work
(exp, tanh, softmax, LayerNorm, GroupNorm, the optimiser's updates) runs on blocks of rows
from a small thread pool, between the BLAS calls.  Each block computes its rows exactly as
one call would, so those results do not depend on the thread count.

The knob: ``TINYLAZY_NUM_THREADS`` (read at import; default the usable cores, at most 8),
or ``set_num_threads(n)``.

The BLAS policy: pool threads run single-threaded BLAS and the large GEMMs are split over
the pool (by rows, or by output channels in the VAE), as PyTorch's CPU backend does.
OpenBLAS threads every GEMM it is handed and its threads spin for a while after each call,
on the cores the pool needs next; a batched matmul hands it one small GEMM per (sample,
head) (measured on DiT-S/2 attention under load: 18 ms single-threaded, 2.8 s on OpenBLAS's
2 threads; in the VAE a multi-threaded BLAS cost 8x the CPU time on a busy machine).  The
per-thread switch is OpenBLAS's ``openblas_set_num_threads_local``; without it (another BLAS)
the GEMMs are left whole to BLAS's own threads, unless the environment makes BLAS serial
(``OPENBLAS_NUM_THREADS=1`` and the like), which gives the pool single-threaded BLAS anyway.
A GEMM split by rows rounds like BLAS's own threading does: float32 results can move by an
ulp with the thread count, float64 results as well (rarely).
In OpenBLAS 0.3.31 as NumPy ships it the switch acts process-wide: the pool threads' setting
used to leave the calling thread's own GEMMs on one thread once the pool had started (a 2048^3
sgemm at 306 GFLOP/s before, 152 after), so ``run_all`` sets the caller to one thread for its
span and restores it after.
"""
import contextlib
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backend import array_module_of

ENV = "TINYLAZY_NUM_THREADS"
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
MIN_BLOCK = 1 << 15            # elements per row block worth a thread hand-off
MIN_WORK = 1 << 16             # elements touched by a whole job (for_each) worth the pool


def _default_threads():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(os.environ.get(ENV, "0")) or min(cores, 8)


def _openblas_thread_switch():
    """OpenBLAS's ``openblas_set_num_threads_local`` for the library NumPy loaded, or None
    (another BLAS, another OS).  Found the way threadpoolctl finds it: among the mapped files."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
        for path in sorted(paths):
            switch = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
            if switch is not None:
                switch.argtypes, switch.restype = [ctypes.c_int], ctypes.c_int
                return switch
    except OSError:
        pass
    return None


NUM_THREADS = _default_threads()
BLAS_SWITCH = _openblas_thread_switch()
# Whether GEMMs are split over the pool: its threads then run single-threaded BLAS.
SPLIT_GEMMS = BLAS_SWITCH is not None or any(os.environ.get(v, "").strip() == "1" for v in BLAS_THREAD_VARS)
_pool = None


def set_num_threads(n):
    """Threads of the pool (1 = everything in the calling thread)."""
    global NUM_THREADS, _pool
    if int(n) < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    if _pool is not None:
        _pool.shutdown()
        _pool = None
    NUM_THREADS = int(n)


def get_num_threads():
    return NUM_THREADS


def splits_gemms():
    """Whether GEMMs are split over more than one pool thread (see the module docstring)."""
    return SPLIT_GEMMS and NUM_THREADS > 1


def _init_pool_thread():
    if BLAS_SWITCH is not None:
        BLAS_SWITCH(1)


def _forget_pool():
    global _pool
    _pool = None                               # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_all(tasks):
    """Run [(fn, args), ...] on the pool at once and wait for all of them.

    The calling thread's BLAS switch is set to 1 for the span and restored after: in the OpenBLAS
    NumPy ships the "local" switch acts on the whole process, so the pool threads' initializer
    used to leave the caller's own GEMMs on one thread after the first forward (a 2048^3 GEMM
    306 -> 152 GFLOP/s); where the switch is truly per thread this costs nothing."""
    global _pool
    before = BLAS_SWITCH(1) if BLAS_SWITCH is not None else None
    try:
        if _pool is None:
            _pool = ThreadPoolExecutor(NUM_THREADS, thread_name_prefix="tinylazy", initializer=_init_pool_thread)
        jobs = [_pool.submit(fn, *args) for fn, args in tasks]
        for job in jobs:
            job.result()
    finally:
        if before is not None:
            BLAS_SWITCH(before)


def run_here(fn, *args):
    """fn(*args) in the calling thread, its GEMMs on single-threaded BLAS as in the pool:
    OpenBLAS's own threads would spin on the cores the pool needs next (measured: a DiT-S/2
    training step 5% slower with the main thread's small adaLN GEMMs on OpenBLAS's 2 threads)."""
    if BLAS_SWITCH is None:
        return fn(*args)
    before = BLAS_SWITCH(1)
    try:
        return fn(*args)
    finally:
        BLAS_SWITCH(before)


@contextlib.contextmanager
def serial_blas():
    """Single-threaded BLAS in the calling thread for the duration (the same bits on any machine):
    the per-thread switch, else threadpoolctl when it is installed (it comes with scikit-learn)."""
    if BLAS_SWITCH is not None:
        before = BLAS_SWITCH(1)
        try:
            yield
        finally:
            BLAS_SWITCH(before)
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def cuts(n, k):
    """[0, n) as at most k contiguous (lo, hi) blocks, as even as can be."""
    k = max(1, min(k, n))
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def rowwise(kernel, *arrays):
    """kernel(*blocks) on row blocks (axis 0) of ``arrays``, which share their first
    dimension; the kernel writes its results into blocks of output arrays passed in."""
    n = arrays[0].shape[0]
    k = min(NUM_THREADS, n, arrays[0].size // MIN_BLOCK)
    if k <= 1 or array_module_of(arrays[0]) is not np:
        run_here(kernel, *arrays)
        return
    run_all([(kernel, [a[lo:hi] for a in arrays]) for lo, hi in cuts(n, k)])


def for_each(fn, items, work):
    """fn(item) for every item: on the pool when the job touches ``work`` >= MIN_WORK elements,
    else (or with CuPy arrays, which the GPU queues anyway: pass work=0) in the calling thread."""
    items = list(items)
    if NUM_THREADS == 1 or len(items) == 1 or work < MIN_WORK:
        for it in items:
            run_here(fn, it)
        return
    run_all([(fn, (it,)) for it in items])


def parts(n):
    """[0, n) in one contiguous range per pool thread."""
    return cuts(n, NUM_THREADS)


def gemm_parts(n):
    """Output-channel ranges for a GEMM: one per pool thread when GEMMs are split, else one range
    (``for_each`` then runs it in the calling thread, on BLAS's own threads)."""
    return parts(n) if SPLIT_GEMMS else [(0, n)]


def for_each_name(fn, arrays):
    """fn(name) for every name of ``arrays`` (name -> array), for per-tensor updates such as
    the optimiser's: on NumPy the names go to the pool threads in groups of about equal
    size when there is enough work to be worth the hand-off; each fn(name) computes the
    same whichever thread runs it."""
    names = sorted(arrays, key=lambda k: -arrays[k].size)
    if (NUM_THREADS <= 1 or not names or array_module_of(arrays[names[0]]) is not np
            or sum(arrays[k].size for k in names) < NUM_THREADS * MIN_BLOCK):
        for k in names:
            fn(k)
        return
    groups, load = [[] for _ in range(NUM_THREADS)], [0] * NUM_THREADS
    for k in names:                                          # biggest first, to the least loaded
        i = load.index(min(load))
        groups[i].append(k)
        load[i] += arrays[k].size
    run_all([(lambda group: [fn(k) for k in group], (g,)) for g in groups if g])
