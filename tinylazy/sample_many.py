"""Sample sets at FID-50K scale on Dask, the same file for any number of workers.

    python -m tinylazy.sample_many --num 2000 --out digits.npz          # bundled model, all cores
    python -m tinylazy.sample_many --weights DiT-XL-2-256x256.safetensors --vae sd-vae-ft-ema \\
        --num 50000 --sampler ddpm --steps 250 --scheduler tcp://head:8786 --out dit-xl-2.npz

Image i depends only on (seed, i): its starting noise (and DDPM's per-step noise) is
the counter-based stream of ``tinylazy.noise`` keyed by (seed, i), and its label is
``classes[i % len(classes)]``.  The indices are cut into fixed shards of --batch
consecutive images; each shard is one Dask task, sampled as one batch by a worker
process that computes on one thread, so 1 worker, 16 workers and a cluster write the
same file bit for bit (another --batch may move a pixel by 1 through float32 GEMM
blocking, never a label).

The run lives on disk in ``<out>.shards/``: ``manifest.json`` records what the images
depend on (weights, gates and VAE hashes, sampler settings, seed, batch) and refuses
to mix runs; the client writes ``shard-<start>-<stop>.npz`` atomically as each result
arrives.  Rerunning the same command skips finished shards (a killed run resumes),
redoes damaged ones and assembles ``--out`` in ADM's format (``tinylazy.samplefile``)
atomically; the folder is then removed unless --keep-shards.  A worker that dies has
its shard run again by Dask, and since only the client writes, one file per shard
range, no image is lost or written twice.

Dask is the optional extra ``[distributed]``; it is imported only when a run starts.
Clusters, Slurm, costs and ADM's evaluator: docs/distributed.md.
"""
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time

import numpy as np

from . import atomic, cli, resources
from .cli import RunError, UsageError
from .lazy import gates_hash
from .noise import FORMAT as NOISE_FORMAT, image_noise
from .resources import DEFAULT_MODEL, weights_path
from .samplefile import SampleFileError, read_npz, to_adm_images, write_npz

FORMAT = "tinylazy-sample-many-v1"
DEFAULT_STEPS = {"ddim": 50, "ddpm": 250}            # the paper's DDIM 50; DiT's sample_ddp.py: 250
THREADS_ENV = "TINYLAZY_NUM_THREADS"
WORKER_ENV = {THREADS_ENV: "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Set before a worker process starts (the nanny's pre-spawn environment).  Dask's default adds
# MALLOC_TRIM_THRESHOLD_=65536, which returns freed pages at once: measured on the digits
# model, 2.5x the page faults and ~25% more CPU time per sampling step.
# TINYLAZY_NUM_THREADS must be there too: tinylazy sizes its pool when the worker imports it (the
# preload), before Dask applies ``env``; measured: with it only in ``env``, each worker ran a pool of
# 2 threads (1.5 cores busy per worker) and 2 workers sampled only 1.1x as fast as one.
PRE_SPAWN_ENV = {"MALLOC_TRIM_THRESHOLD_": None, THREADS_ENV: 1, "OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1,
                 "OPENBLAS_NUM_THREADS": 1}
CONNECT_TIMEOUT = 20                                  # seconds to reach a --scheduler


# ----------------------------------------------------------------------------
# What image i is

def labels_for(classes, indices):
    """Image i's class: ``classes[i % len(classes)]`` (every class equally often over whole rounds)."""
    return np.asarray(classes, dtype=np.int64)[np.asarray(indices, dtype=np.int64) % len(classes)]


def shard_ranges(num, batch):
    """The fixed shards: [(start, stop)] of ``batch`` consecutive indices (the last may be shorter)."""
    return [(a, min(a + batch, num)) for a in range(0, num, batch)]


def sample_images(model, spec, indices, gates=None, vae=None):
    """Images ``indices`` sampled as one batch: ((B, H, W, 3) uint8, (B,) labels, LazyStats or None).

    spec: the run's settings (``sampler``, ``steps``, ``cfg_scale``, ``seed``, ``classes``).
    """
    from .api import ddim_sample
    from .lazy import LazyStats
    from .sampling import ddpm_sample
    c = model.config
    shape, seed = (c.in_channels, c.input_size, c.input_size), spec["seed"]
    labels = labels_for(spec["classes"], indices)
    noise = image_noise(seed, indices, shape, 0, model.dtype)                # segment 0: x_T
    stats = None
    if spec["sampler"] == "ddim":
        stats = LazyStats() if gates is not None else None
        z = ddim_sample(model, noise, labels, spec["steps"], spec["cfg_scale"], gates=gates, lazy_stats=stats)
    else:                                                                    # segment k + 1: step k's noise
        step_noise = lambda k: image_noise(seed, indices, shape, k + 1, model.dtype)
        z = ddpm_sample(model, noise, labels, spec["steps"], spec["cfg_scale"], step_noise=step_noise)
    images = z if vae is None else vae.decode(z / vae.config.scaling_factor)
    return to_adm_images(images), labels, stats


# ----------------------------------------------------------------------------
# Worker side: one shard per task

_WORKER_LOCK = threading.Lock()          # a worker with several threads still runs one shard at a time
_WORKER_CACHE = {}


def _load(spec):
    """(model, gates, vae) for ``spec``, loaded once per worker process and checked against its hashes."""
    from .api import load_dit, load_vae
    from .io import weights_hash
    key = tuple(spec[k] for k in ("weights", "weights_hash", "dtype", "backend", "gates", "vae"))
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        path = spec["weights"] or weights_path(DEFAULT_MODEL)
        model = load_dit(path, dtype=spec["dtype"], backend=spec["backend"])
        gates = vae = None
        if spec["gates"]:
            from .lazy import load_gates
            gates = load_gates(spec["gates"], model, spec["steps"])
        if spec["vae"]:
            vae = load_vae(spec["vae"], dtype=spec["dtype"], backend=spec["backend"])
        got = {"weights": model.weights_hash, "gates": gates and gates_hash(gates), "vae": vae and weights_hash(vae)}
        for what, digest in got.items():
            if digest != spec[f"{what}_hash"]:
                raise RuntimeError(f"the {what} at {spec[what] or path} on this worker differ from the client's "
                                   f"(hash {str(digest)[:12]}, expected {str(spec[what + '_hash'])[:12]}): every "
                                   f"worker must see the same files at the same paths")
        _WORKER_CACHE[key] = model, gates, vae
    return _WORKER_CACHE[key]


def dask_setup(worker):
    """Dask preload hook of the LocalCluster's workers: Ctrl-C in the terminal reaches the whole
    process group; the client stops the run, so its workers ignore it (no tracebacks)."""
    with contextlib.suppress(ValueError):                      # not the main thread: leave it
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_setup(dask_worker=None):
    """(tinylazy's pool threads, Dask threads) of the worker this runs on (``Client.run``): the pool as
    sized at import (``parallel``), which is what the images' bits depend on, not the variable now."""
    from . import parallel
    return parallel.get_num_threads(), getattr(dask_worker, "nthreads", None)


def sample_shard(spec, start, stop):
    """The Dask task: images start..stop-1 -> dict(start, stop, images, labels, seconds, load_seconds, lazy)."""
    threads, _ = worker_setup()
    if threads != 1:
        raise RuntimeError(f"this worker computes with {THREADS_ENV}={threads}; the images' bits depend on "
                           f"it: start workers with {THREADS_ENV}=1 (docs/distributed.md)")
    with _WORKER_LOCK:
        t0 = time.perf_counter()
        model, gates, vae = _load(spec)
        t1 = time.perf_counter()
        images, labels, stats = sample_images(model, spec, np.arange(start, stop), gates, vae)
        lazy = None if stats is None else np.stack([stats.skips.sum((0, 1)), stats.evals.sum((0, 1))])
    return {"start": start, "stop": stop, "images": images, "labels": labels, "lazy": lazy,
            "seconds": time.perf_counter() - t1, "load_seconds": t1 - t0}


# ----------------------------------------------------------------------------
# The engine: a Dask client on a LocalCluster or an existing scheduler

@contextlib.contextmanager
def _local_environ():
    """Undo what the LocalCluster's nannies write into this process's environment (their
    pre-spawn variables), so that later subprocesses of the caller do not inherit them."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        os.environ.update(saved)


def _refuses_connections(address):
    """Raise ConnectionRefusedError if a tcp:// (or bare host:port) address has nothing listening.

    Other protocols, names that do not resolve and slow hosts are left to Dask's own connect."""
    m = re.fullmatch(r"(?:tcp://)?\[?([^\[\]/]+?)\]?:(\d{1,5})/?", address)
    if m is None:
        return
    import socket
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=CONNECT_TIMEOUT / 4).close()
    except ConnectionRefusedError:
        raise ConnectionRefusedError(f"nothing listens on port {m.group(2)} of {m.group(1)}") from None
    except (OSError, ValueError, OverflowError):
        return


@contextlib.contextmanager
def cluster_client(workers=None, scheduler=None, log=None):
    """A ``distributed.Client``: on the cluster at ``scheduler``, or on a new in-process LocalCluster
    of ``workers`` single-threaded worker processes (TINYLAZY_NUM_THREADS=1 and one BLAS thread)."""
    import dask
    import distributed
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if scheduler is None:
        workers = workers or _cores()
        with _local_environ(), dask.config.set({"distributed.nanny.pre-spawn-environ": PRE_SPAWN_ENV}), \
                distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                         dashboard_address=None, silence_logs=logging.ERROR, env=WORKER_ENV,
                                         preload=[__name__]) as cluster, \
                distributed.Client(cluster, set_as_default=False) as client:
            log(f"Dask LocalCluster: {workers} worker process{'es' if workers > 1 else ''} "
                f"at {cluster.scheduler_address}")
            yield client
        return
    unreachable = (f"start one with `dask scheduler` and workers with `{THREADS_ENV}=1 dask worker ADDRESS "
                   f"--nthreads 1`")
    try:
        _refuses_connections(scheduler)       # nothing listening: say so at once (Dask retries for the timeout)
        client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise UsageError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({e}); {unreachable}") \
            from None
    with client:
        try:
            setup = client.run(worker_setup)
        except Exception as e:
            raise UsageError(f"the workers of {scheduler} cannot run tinylazy ({type(e).__name__}: {e}): install "
                             f"the same tinylazy on every worker") from None
        bad = sorted(addr for addr, (threads, _) in setup.items() if threads != 1)
        if bad:
            raise UsageError(f"worker{'s' if len(bad) > 1 else ''} {', '.join(bad[:3])} without {THREADS_ENV}=1, "
                             f"and the images' bits depend on it: restart them as "
                             f"`{THREADS_ENV}=1 dask worker {scheduler} --nthreads 1`")
        many = sorted(addr for addr, (_, n) in setup.items() if n and n > 1)
        log(f"Dask scheduler {scheduler}: {len(setup)} worker{'s' if len(setup) != 1 else ''}"
            + (" (waiting for workers to join)" if not setup else "")
            + (f"; {len(many)} have several threads but run one shard at a time: start workers with "
               f"--nworkers K --nthreads 1" if many else ""))
        yield client


def as_results(client, futures, what):
    """Yield each future's result as it completes; a failed task is a RunError naming ``what[future]``."""
    import distributed
    try:
        for fut in distributed.as_completed(futures, loop=client.loop):
            try:
                res = fut.result()
            except distributed.client.FutureCancelledError as e:
                raise RunError(f"{what[fut]} was cancelled ({e}): the Dask cluster went away; finished shards "
                               f"are kept, rerun to resume") from None
            except distributed.KilledWorker:
                raise RunError(f"{what[fut]} killed every worker that ran it (out of memory? try a smaller "
                               f"--batch)") from None
            except Exception as e:
                raise RunError(f"{what[fut]} failed: {type(e).__name__}: {e}") from None
            fut.release()
            yield res
    finally:
        client.cancel([f for f in futures if not f.done()])


# ----------------------------------------------------------------------------
# The run folder: manifest, shards, lock

SHARD_NAME = re.compile(r"shard-(\d{9})-(\d{9})\.npz")


class ShardStore:
    """``<out>.shards/``: manifest.json (the settings), shard-<start>-<stop>.npz, a lock file."""

    def __init__(self, folder, settings):
        self.folder = folder
        self.settings = settings
        self.digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).digest()
        self.image_shape = tuple(settings["image"])
        self.created = False
        self._lock = None

    def path(self, start, stop):
        return os.path.join(self.folder, f"shard-{start:09d}-{stop:09d}.npz")

    def open(self):
        """Create or adopt the folder: lock it, and check its manifest (written anew when no shard is there)."""
        self.created = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        self._take_lock()
        manifest = os.path.join(self.folder, "manifest.json")
        if self.shards() and not os.path.isfile(manifest):
            raise UsageError(f"{self.folder} holds shards but no manifest.json, so they cannot be checked: "
                             f"delete the folder or choose another --out")
        if self.shards():
            self._check_manifest(manifest)
        else:
            lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(self.settings.items())]
            text = '{"format": %s, "settings": {\n%s\n}}\n' % (json.dumps(FORMAT), ",\n".join(lines))
            with atomic.writing(manifest) as f:                      # JSON, one setting a line
                f.write(text.encode())
        for name in os.listdir(self.folder):                      # temp files of a killed client
            if name.startswith(".shard-") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.folder, name))

    def shards(self):
        return [n for n in os.listdir(self.folder) if SHARD_NAME.fullmatch(n)]

    def _check_manifest(self, manifest):
        try:
            with open(manifest, "rb") as f:
                found = json.loads(f.read(1 << 20))["settings"]
            if not isinstance(found, dict):
                raise TypeError("settings is not a mapping")
            diff = [k for k in sorted(set(found) | set(self.settings)) if found.get(k) != self.settings.get(k)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{manifest} is damaged ({type(e).__name__}): delete {self.folder} "
                             f"to start over") from None
        if diff:
            show = lambda v: (v[:12] if isinstance(v, str) and len(v) == 64 else
                              f"{len(v)} classes" if isinstance(v, list) and len(v) > 6 else v)
            said = "; ".join(f"{k} {show(found.get(k))} there, {show(self.settings.get(k))} here" for k in diff[:4])
            raise UsageError(f"{self.folder} holds shards of another run ({said}): rerun with that run's "
                             f"settings, or delete the folder (or choose another --out) to start over")

    def _take_lock(self):
        try:
            import fcntl
        except ImportError:                                       # no advisory locks (Windows): unguarded
            return
        self._lock = open(os.path.join(self.folder, "lock"), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise UsageError(f"another sample-many run is writing {self.folder}: wait for it, or choose "
                             f"another --out") from None

    def close(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def read(self, start, stop):
        """The images of a finished shard; SampleFileError if it is damaged or not this run's."""
        n, path = stop - start, self.path(start, stop)
        a = read_npz(path, {"arr_0": (np.uint8, (n,) + self.image_shape), "arr_1": (np.int64, (n,)),
                            "run": (np.uint8, (32,))})
        if a["run"].tobytes() != self.digest:
            raise SampleFileError(f"{path}: written by another run")
        if not np.array_equal(a["arr_1"], labels_for(self.settings["classes"], np.arange(start, stop))):
            raise SampleFileError(f"{path}: labels are not the ones of images {start}..{stop - 1}")
        return a["arr_0"]

    def missing(self, plan, log):
        """The shards of ``plan`` still to compute; damaged ones are reported and included."""
        todo = []
        for start, stop in plan:
            if not os.path.exists(self.path(start, stop)):
                todo.append((start, stop))
                continue
            try:
                self.read(start, stop)
            except SampleFileError as e:
                log(f"damaged shard, redoing it: {e}")
                todo.append((start, stop))
        return todo

    def write(self, res):
        with atomic.writing(self.path(res["start"], res["stop"])) as f:
            write_npz(f, {"arr_0": res["images"], "arr_1": res["labels"], "run": np.frombuffer(self.digest, np.uint8)})

    def remove(self, plan):
        """Delete the shards of ``plan``; then, if no other shard is left (a longer --num run's), the
        manifest, the lock and the folder (when nothing else is in it).  Returns the shards left."""
        self.close()
        for start, stop in plan:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(start, stop))
        left = self.shards()
        if not left:
            for name in ("manifest.json", "lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)
        return left


# ----------------------------------------------------------------------------
# The command

def add_arguments(p):
    p.add_argument("--weights", help="DiT safetensors file or diffusers folder (default: the bundled digits model)")
    p.add_argument("--num", type=int, default=50000, help="number of images (default: 50000, FID-50K)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                   help="respaced DDIM (eta 0) or ancestral DDPM, the official sampler (default: ddim)")
    p.add_argument("--steps", type=int, help="sampling steps, 1..1000 (default: 50 for ddim, 250 for ddpm)")
    p.add_argument("--cfg-scale", type=float, default=1.5,
                   help="classifier-free guidance scale, >= 1; 1 = none (default: 1.5, the FID setting)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of the noise, 0..2**64-1 (default: 0)")
    p.add_argument("--batch", type=int, default=32,
                   help="images per shard, sampled as one batch by one worker (default: 32); the file's bits "
                        "depend on it")
    p.add_argument("--classes", type=int, nargs="+",
                   help="class ids; image i gets classes[i %% len(classes)] (default: every class of the model)")
    p.add_argument("--lazy", action="store_true", help="LazyDiT with the gates <weights>.gates-ddim<steps>"
                   ".safetensors beside the weights (DDIM only)")
    p.add_argument("--gates", type=resources.gates_path,
                   help="LazyDiT gates file to use instead, or a bundled one's name (tiny-dit-digits.gates-ddim20-official: "
                        "the paper's recipe) (implies --lazy)")
    p.add_argument("--backend", choices=("numpy", "cupy", "opencl"), default="numpy",
                   help="numpy (CPU), cupy (GPU) or opencl (DDIM, float32) on every worker (default: numpy)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float32 (default) or float64, the audit mode")
    p.add_argument("--vae", help="sd-vae-ft-ema/-mse folder or safetensors file; required for latent models")
    p.add_argument("--out", default="samples.npz", help="output .npz in ADM's format (default: samples.npz); "
                   "the run is kept in <out>.shards/ until it is assembled")
    engine = p.add_mutually_exclusive_group()
    engine.add_argument("--workers", type=int, help="worker processes of the in-process Dask LocalCluster "
                        f"(default: the cores, {_cores()})")
    engine.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786) to use instead")
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after the file is assembled")


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_args(args):
    """Cheap checks, before anything is loaded; returns the number of steps."""
    from .sampling import check_cfg_scale, check_steps
    steps = DEFAULT_STEPS[args.sampler] if args.steps is None else args.steps
    for flag, check, value in (("--steps", check_steps, steps), ("--cfg-scale", check_cfg_scale, args.cfg_scale)):
        try:
            check(value)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    for name, value in (("--num", args.num), ("--batch", args.batch), ("--workers", 1 if args.workers is None else args.workers)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if (args.lazy or args.gates) and args.sampler != "ddim":
        raise UsageError("--lazy works with --sampler ddim (the gates are trained for DDIM steps)")
    if args.backend == "opencl" and (args.sampler != "ddim" or args.dtype != "float32"):
        raise UsageError("--backend opencl runs --sampler ddim in --dtype float32")
    if args.backend == "opencl":
        cli.check_backend("opencl")
    if args.backend == "cupy" and args.scheduler is None:
        from .backend import cupy_available
        if not cupy_available():
            raise UsageError("--backend cupy: no CuPy GPU on this machine, where the workers run: "
                             "pip install 'tinylazy[gpu]' on a machine with a CUDA GPU, or use --backend numpy")
    cli.input_file(args.gates, "--gates")
    cli.input_file(args.vae, "--vae", folder=True)
    weights = cli.weights_input(args.weights or DEFAULT_MODEL)
    cli.output_file(args.out, "--out", (".npz",), inputs={"--weights": weights, "--gates": args.gates,
                                                          "--vae": args.vae})
    return steps


def _load_client_side(args, steps):
    """Load and check what the workers will load; returns (spec, info lines)."""
    from .io import load_dit, weights_hash
    from .lazy import GatesError, find_gates, load_gates
    from .sampling import check_labels
    path = os.path.abspath(cli.weights_input(args.weights or DEFAULT_MODEL))
    try:
        model = load_dit(path, dtype=args.dtype, backend="numpy")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"cannot load the DiT from {path}: {e}") from None
    c = model.config
    classes = list(range(c.num_classes)) if args.classes is None else args.classes
    try:
        check_labels(model, np.asarray(classes, dtype=np.int64), args.cfg_scale)
    except ValueError as e:
        raise UsageError(f"--classes: {e}") from None
    gates = vae = None
    gates_path = args.gates or (find_gates(path, steps) if args.lazy else None)
    if args.lazy and gates_path is None:
        raise UsageError(f"--lazy: no gates for {steps} steps in the current folder or beside {path} (train "
                         f"them: tinylazy train-gates --weights {args.weights or DEFAULT_MODEL} --steps {steps})")
    if gates_path is not None:
        gates_path = os.path.abspath(gates_path)
        try:
            gates = load_gates(gates_path, model, steps)
        except (GatesError, OSError, ValueError) as e:
            raise UsageError(f"--lazy: {e}") from None
    if args.vae is not None:
        from .vae import load_vae
        try:
            vae = load_vae(args.vae, dtype=args.dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UsageError(f"cannot load the VAE from {args.vae}: {e}") from None
        if vae.config.latent_channels != c.in_channels:
            raise UsageError(f"--vae {args.vae} has {vae.config.latent_channels} latent channels but the DiT "
                             f"takes {c.in_channels}: pass the VAE this DiT was trained with")
        if vae.config.out_channels not in (1, 3):
            raise UsageError(f"--vae {args.vae} decodes to {vae.config.out_channels} channels, not 1 or 3")
    elif c.in_channels not in (1, 3):
        raise UsageError(f"{path} is a latent-space model ({c.in_channels} channels): pass its VAE with --vae")
    size = c.input_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
    spec = {"weights": os.path.abspath(args.weights) if args.weights else None, "weights_hash": model.weights_hash,
            "gates": gates_path, "gates_hash": gates and gates_hash(gates),
            "vae": os.path.abspath(args.vae) if args.vae else None, "vae_hash": vae and weights_hash(vae),
            "dtype": args.dtype, "backend": args.backend, "sampler": args.sampler, "steps": steps,
            "cfg_scale": args.cfg_scale, "seed": args.seed, "classes": [int(k) for k in classes],
            "image": [size, size, 3]}
    info = [f"{model} from {path}" + (f", gates {gates_path}" if gates else "") + (f", VAE {args.vae}" if vae else ""),
            f"{args.sampler.upper()} {steps} steps{' (LazyDiT)' if gates else ''}, cfg {args.cfg_scale}, seed "
            f"{args.seed}, {args.num} images {size}x{size} in shards of {args.batch}, {len(classes)} classes"]
    return spec, info


def _settings(spec, batch):
    """What the images depend on (the manifest): the spec less its paths, and the batch."""
    s = {k: v for k, v in spec.items() if k not in ("weights", "gates", "vae")}
    return dict(s, batch=batch, noise=NOISE_FORMAT, pixels="trunc(clamp(127.5 x + 128, 0, 255)) uint8, NHWC RGB")


def prepare(args):
    """Check the parsed arguments and load what the workers will load: (spec, manifest settings, info lines).

    Bad input is a UsageError, found before any sampling."""
    steps = _check_args(args)
    cli.require("distributed", "tinylazy sample-many (it runs on Dask)")
    spec, info = _load_client_side(args, steps)
    return spec, _settings(spec, args.batch), info


def run(args):
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    spec, settings, info = prepare(args)
    out = os.path.abspath(args.out)
    store = ShardStore(out + ".shards", settings)
    plan = shard_ranges(args.num, args.batch)
    try:
        store.open()
        todo = store.missing(plan, log)
        with contextlib.ExitStack() as stack:
            workers = min(args.workers or _cores(), len(todo))
            client = stack.enter_context(cluster_client(workers, args.scheduler, log)) if todo else None
            for line in info:
                log(line)
            if len(todo) < len(plan):
                log(f"resuming: {len(plan) - len(todo)} of {len(plan)} shards already in {store.folder}")
            t0 = time.perf_counter()
            if todo:
                compute_shards(client, spec, store, todo, log)
            wall = time.perf_counter() - t0
        _assemble(out, store, plan)
    except UsageError:
        if store.created and not store.shards():                   # leave no empty folder behind
            store.remove([])
        raise
    finally:
        store.close()
    left = [] if args.keep_shards else store.remove(plan)
    if left:
        log(f"kept {store.folder}: it holds {len(left)} more shards (of a run with a larger --num)")
    H, W, _ = store.image_shape
    print(f"wrote {args.out}: {args.num} images {H}x{W}x3 uint8 (arr_0) and their labels (arr_1)"
          + (f"; {sum(b - a for a, b in todo)} sampled in {wall:.1f} s" if todo else ""))


def compute_shards(client, spec, store, todo, log):
    """Sample the shards ``todo`` [(start, stop)] on ``client``'s cluster, writing each into ``store``
    as it arrives; returns (images, seconds of worker compute)."""
    from .progress import Progress
    images, busy, lazy = 0, 0.0, 0
    key = store.digest.hex()[:12]
    futures = [client.submit(sample_shard, spec, a, b, key=f"tinylazy-shard-{key}-{a}-{b}") for a, b in todo]
    what = {f: f"shard {a}..{b - 1}" for f, (a, b) in zip(futures, todo)}
    results = contextlib.closing(as_results(client, futures, what))     # cancels what is left on any exit
    with results as it:
        bar = Progress(it, total=len(todo), desc=f"{len(todo)} shards")
        for res in bar:
            store.write(res)
            images += len(res["labels"])
            busy += res["seconds"]
            lazy = lazy + res["lazy"] if res["lazy"] is not None else lazy
            bar.set_postfix(img_s=f"{images / bar.elapsed:.3g}")
    log(f"{images} images; {busy / images:.3g} s of worker time per image")
    if spec["gates"]:
        skips, evals = lazy
        log(f"LazyDiT: lazy ratio {skips.sum() / evals.sum():.1%} (attention {skips[0] / evals[0]:.1%}, "
            f"MLP {skips[1] / evals[1]:.1%}) over the sampled shards")
    return images, busy


def _assemble(out, store, plan):
    """Write ``out`` from the shards, streamed in index order; a damaged shard is removed (a RunError)."""
    def images():
        for a, b in plan:
            try:
                yield store.read(a, b)
            except SampleFileError as e:
                os.unlink(store.path(a, b))
                raise RunError(f"{e}; removed it: rerun the same command to redo it") from None

    N = plan[-1][1]
    with atomic.writing(out) as f:
        write_npz(f, {"arr_0": ((N,) + store.image_shape, np.uint8, images()),
                      "arr_1": labels_for(store.settings["classes"], np.arange(N))})


def resume_hint(args):
    """After Ctrl-C: the finished shards stay in <out>.shards/; the same command resumes."""
    return f"finished shards are kept, resume with: {cli.rerun_command(args)}"


def main(argv=None, prog=None):
    return cli.run_command("sample-many", argv, prog)


if __name__ == "__main__":
    from tinylazy.sample_many import main as _main     # tasks must name the importable module, not __main__
    sys.exit(_main(prog="python -m tinylazy.sample_many"))
