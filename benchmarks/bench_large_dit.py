"""Large-DiT forward at batch 2 on CPU: tinylazy vs PyTorch eager, peak memory, and the cost of FID-50K.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_large_dit.py \\
        --model 3B --storage float32 --dir /some/disk/with/space [--rounds 2 --reps 2] [--keep]

Writes random DiT_Llama weights of the chosen size to ``--dir`` (a tensor at a time: 16.9 GB
for 3B in float32, 14.6 GB for 7B in bfloat16; deleted at the end unless --keep), then runs
each engine in its own process, alternating (a 3B model in float32 does not fit this
machine's 24 GB twice): load the memory-mapped file, one forward to page it in, then
``--reps`` timed forwards of 2 samples at 32x32x4 (t = 500, labels 207 and 360).  Both
engines compute in float32 from the same mapping of the same file: tinylazy through
``large_dit_io.load_large_dit`` (float16/bfloat16 widened one block at a time), PyTorch
eager on ``torch.from_numpy`` views of it with the same per-block widening in forward
hooks (tests/torch_large_dit.py, the official numerics).

Reported per engine: the median forward, the peak RSS (VmHWM) and, sampled every 50 ms,
the peaks of private (RssAnon) and file-backed (RssFile) memory; memory-mapped weights are
file pages that the kernel can drop and read again, so RssFile is the page cache a run
used, RssAnon what it allocated.  A worker whose private memory passes --max-anon-gb stops
itself; a round does not start while MemAvailable is below what it needs.
FID-50K cost: with guidance (cfg > 1, as the paper's FID runs) one image is one forward at
batch 2 ([cond; uncond]), so seconds/image/step is the batch-2 forward.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
GB = 1e9


def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Peaks of RssAnon and RssFile every 50 ms; stops the process when RssAnon passes ``limit``."""

    def __init__(self, limit):
        super().__init__(daemon=True)
        self.limit, self.peak = limit, {"RssAnon": 0, "RssFile": 0}

    def run(self):
        while True:
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            if s["RssAnon"] > self.limit:
                print(json.dumps({"error": f"private memory {s['RssAnon'] / GB:.1f} GB passed the "
                                           f"--max-anon-gb limit; stopped"}), flush=True)
                os._exit(3)
            time.sleep(0.05)


def inputs(cfg):
    x = np.random.default_rng(0).standard_normal((2, cfg.in_channels, cfg.input_size, cfg.input_size))
    return x.astype(np.float32), np.array([500, 500]), np.array([207, 360])


# ----------------------------------------------------------------------------
# The two engines (each in its own process)

def run_tinylazy(path, reps):
    from tinylazy.large_dit_io import load_large_dit
    t0 = time.perf_counter()
    model = load_large_dit(path, dtype="float32", verify=False)
    load = time.perf_counter() - t0
    x, t, y = inputs(model.config)
    return load, lambda: model(x, t, y)


def run_torch(path, reps):
    import torch
    from tinylazy.io import SafetensorsFile
    from tinylazy.large_dit_io import infer_config, map_tensors
    from tinylazy.storage import Bfloat16Array
    from torch_large_dit import TorchLargeDiT
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    with SafetensorsFile(path) as f:
        cfg = infer_config(path, {k: e.shape for k, e in f.entries.items()}, json.loads(f.metadata["config"]))
        stored = map_tensors(f)

    def tensor(a):                                   # a view of the mapping (read-only: torch warns, never writes)
        if isinstance(a, Bfloat16Array):
            return torch.from_numpy(a.raw).view(torch.bfloat16)
        return torch.from_numpy(a)

    import warnings
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    with torch.device("meta"):
        model = TorchLargeDiT(cfg)
    model.freqs_cis = TorchLargeDiT.rotary_table(cfg, pinned=False)      # the official table, off the meta device
    blocks = {}
    for name, a in stored.items():
        src = tensor(a)
        if name.startswith("layers."):
            l, rest = name[len("layers."):].split(".", 1)
            blocks.setdefault(int(l), {})[rest] = src
            if src.dtype != torch.float32:
                continue
        _assign(model, name, src if src.dtype == torch.float32 else src.float())
    for l, layer in enumerate(model.layers):
        half = {k: v for k, v in blocks[l].items() if v.dtype != torch.float32}
        if half:                                     # the same rule as tinylazy: widen one block at a time
            layer.register_forward_pre_hook(_widen(half))
            layer.register_forward_hook(_drop(half))
    load = time.perf_counter() - t0
    x, t, y = (torch.from_numpy(a) for a in inputs(cfg))

    def forward():
        with torch.no_grad():
            return model(x, t, y)
    return load, forward


def _assign(module, name, value):
    import torch
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    module._parameters[leaf] = None if value is None else torch.nn.Parameter(value, requires_grad=False)


def _widen(half):
    def hook(module, args):                          # before the block: its float32 weights
        for k, v in half.items():
            _assign(module, k, v.float())
    return hook


def _drop(half):
    def hook(module, args, out):                     # after it: gone again
        for k in half:
            _assign(module, k, None)
    return hook


def worker(args):
    sampler = Sampler(args.max_anon_gb * GB)
    sampler.start()
    load, forward = (run_tinylazy if args.worker == "tinylazy" else run_torch)(args.weights, args.reps)
    t0 = time.perf_counter()
    forward()
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        forward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    s = _status()
    print(json.dumps({"engine": args.worker, "load_s": load, "first_s": first, "times_s": times, "cpu_s": cpu,
                      "VmHWM": s["VmHWM"], "RssAnon_peak": sampler.peak["RssAnon"],
                      "RssFile_peak": sampler.peak["RssFile"]}), flush=True)


# ----------------------------------------------------------------------------
# The driver

def write_weights(cfg, path, storage):
    from tinylazy.large_dit import init_param, param_shapes
    from tinylazy.large_dit_io import save_large_dit
    shapes = param_shapes(cfg)
    make = {k: (lambda k=k, s=s: init_param(k, s, seed=0, scheme="random", dtype=np.float32)) for k, s in shapes.items()}
    t0 = time.perf_counter()
    save_large_dit(make, cfg, path, storage=storage, record_hash=False, progress="write")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="3B", help="600M, 3B or 7B (official DiT_Llama widths; default 3B)")
    ap.add_argument("--storage", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--dir", required=True, help="folder for the weights file (needs its size free)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two engines (default 2)")
    ap.add_argument("--reps", type=int, default=2, help="timed forwards per process (default 2)")
    ap.add_argument("--depth", type=int, help="fewer blocks than the official depth (a quick try)")
    ap.add_argument("--max-anon-gb", type=float, default=8.0, help="a worker stops above this private memory")
    ap.add_argument("--keep", action="store_true", help="keep the weights file")
    ap.add_argument("--worker", choices=("tinylazy", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from tinylazy.large_dit import get_large_config
    from tinylazy.large_dit_io import nbytes_of
    cfg = get_large_config(args.model, **({"depth": args.depth} if args.depth else {}))
    size = nbytes_of(cfg, args.storage)
    path = os.path.join(args.dir, f"bench-{args.model}-d{cfg.depth}-{args.storage}.safetensors")
    if not os.path.exists(path):
        free = shutil.disk_usage(args.dir).free
        if free < size * 1.1:
            sys.exit(f"error: {args.dir} has {free / GB:.1f} GB free, the weights need {size / GB:.1f} GB")
        print(f"writing {size / GB:.1f} GB of random {args.model} weights ({args.storage}) to {path}", flush=True)
        print(f"  written in {write_weights(cfg, path, args.storage):.0f} s", flush=True)
    results = {"tinylazy": [], "torch": []}
    try:
        for r in range(args.rounds):
            for engine in (("tinylazy", "torch") if r % 2 == 0 else ("torch", "tinylazy")):
                need = args.max_anon_gb * GB * 1.5
                while mem_available() < need:
                    print(f"  waiting: MemAvailable {mem_available() / GB:.1f} GB < {need / GB:.1f} GB", flush=True)
                    time.sleep(30)
                env = dict(os.environ)
                cmd = [sys.executable, __file__, "--worker", engine, "--weights", path, "--reps", str(args.reps),
                       "--max-anon-gb", str(args.max_anon_gb), "--dir", args.dir]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = (proc.stdout.strip().splitlines() or [""])[-1]
                if proc.returncode or not line.startswith("{"):
                    sys.exit(f"error: the {engine} worker failed ({proc.returncode}): {line or proc.stderr[-2000:]}")
                res = json.loads(line)
                results[engine].append(res)
                print(f"round {r + 1} {engine:8s}: load {res['load_s']:.1f} s, first forward {res['first_s']:.1f} s, "
                      f"forwards {', '.join(f'{t:.1f}' for t in res['times_s'])} s (CPU "
                      f"{', '.join(f'{t:.1f}' for t in res['cpu_s'])} s); peak RSS "
                      f"{res['VmHWM'] / GB:.2f} GB (private {res['RssAnon_peak'] / GB:.2f}, file "
                      f"{res['RssFile_peak'] / GB:.2f})", flush=True)
    finally:
        if not args.keep and os.path.exists(path):
            os.remove(path)
    med = {e: statistics.median(t for r in rs for t in r["times_s"]) for e, rs in results.items()}
    cpu = {e: statistics.median(t for r in rs for t in r["cpu_s"]) for e, rs in results.items()}
    print(f"\n{args.model} (depth {cfg.depth}, {size / np.dtype(args.storage.replace('bfloat16', 'float16')).itemsize / 1e9:.2f} B "
          f"parameters, {size / GB:.1f} GB {args.storage}), batch 2, float32 compute, {os.cpu_count()} cores:")
    for e in results:
        peak = max(r["VmHWM"] for r in results[e])
        anon = max(r["RssAnon_peak"] for r in results[e])
        print(f"  {e:8s} median forward {med[e]:.2f} s (CPU {cpu[e]:.2f} s), peak RSS {peak / GB:.2f} GB "
              f"(private {anon / GB:.2f} GB)")
    print(f"  ratio PyTorch / tinylazy: {med['torch'] / med['tinylazy']:.2f} wall, {cpu['torch'] / cpu['tinylazy']:.2f} "
          f"CPU time (> 1: tinylazy faster)")
    steps = 20
    print(f"  FID-50K, tinylazy, guided DDIM-{steps} (one batch-2 forward per image and step): "
          f"{med['tinylazy']:.1f} s/image/step, {50000 * steps * med['tinylazy'] / 86400:.0f} days of this machine")


if __name__ == "__main__":
    main()
