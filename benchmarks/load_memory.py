"""Peak memory of loading DiT-XL/2 (2.7 GB of float32 weights) and one forward at batch 2.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/load_memory.py

Writes a random DiT-XL/2-shaped safetensors file to a temporary folder (deleted at
the end), then loads it in a fresh subprocess per loader and reads the kernel's
peak RSS (VmHWM in /proc/self/status): after loading, and during one forward at
batch 2 (the peak is reset in between through /proc/self/clear_refs).  Numbers are
ratios of the weight bytes, measured above the interpreter's RSS after imports.
Peer in the same run: ``safetensors.numpy.load_file`` followed by ``DiT(...)``.
Target (issue 3): load + forward peak < 1.3 x weights + the forward's activations.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

GiB = 1 << 30


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(loader, path, batch):
    """Runs in a fresh interpreter: load, forward, print one JSON line."""
    import tinylazy as tl
    from tinylazy.io import load_dit
    from safetensors.numpy import load_file
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if loader == "tinylazy":
        model = load_dit(path)
    else:
        params = load_file(path)
        model = tl.DiT(tl.get_config("DiT-XL/2"), params)
        del params
    t_load = time.perf_counter() - t0
    peak_load = _status_kib("VmHWM")
    rss_loaded = _status_kib("VmRSS")
    reset = _reset_peak()
    cfg = model.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t0 = time.perf_counter()
    model(x, np.full(batch, 500), np.arange(batch))
    t_fwd = time.perf_counter() - t0
    peak_fwd = _status_kib("VmHWM")
    print(json.dumps(dict(base=base, peak_load=peak_load, rss_loaded=rss_loaded, peak_fwd=peak_fwd,
                          reset=reset, t_load=t_load, t_fwd=t_fwd)))


class _RandomTensor:
    """A lazy writer value: drawn only when written, so the parent never holds the model."""

    def __init__(self, shape, seed):
        self.shape, self.dtype, self.seed = shape, np.dtype(np.float32), seed

    def __array__(self, dtype=None, copy=None):
        return np.random.default_rng(self.seed).standard_normal(self.shape, dtype=np.float32) * np.float32(0.02)


def write_random_model(path, name):
    import tinylazy as tl
    from tinylazy.dit import param_shapes
    from tinylazy.embeddings import pos_embed_2d
    from tinylazy.io import write_safetensors
    cfg = tl.get_config(name)
    tensors = {k: _RandomTensor(s, i) for i, (k, s) in enumerate(param_shapes(cfg).items())}
    tensors["pos_embed"] = pos_embed_2d(cfg.hidden_size, cfg.grid_size).astype(np.float32)[None]
    write_safetensors(path, tensors, progress="write random " + name)
    return sum(4 * math.prod(t.shape) for t in tensors.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="DiT-XL/2")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to put the temporary weight file (default: system temp)")
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.batch)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "dit.safetensors")
        W = write_random_model(path, args.config)
        print(f"{args.config}: weights {W / GiB:.3f} GiB ({W} bytes), batch {args.batch}")
        print(f"{'loader':<12} {'load s':>7} {'fwd s':>6} {'load peak/W':>12} {'fwd peak/W':>11} "
              f"{'act/W':>6} {'peak-(W+act)':>13}  target <1.3xW+act")
        rows = {}
        for loader in ("tinylazy", "safetensors"):
            r = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--child", loader, path],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{loader}: failed\n{r.stderr}")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            load = m["peak_load"] - m["base"]
            fwd = m["peak_fwd"] - m["base"]
            act = m["peak_fwd"] - m["rss_loaded"] if m["reset"] else float("nan")
            peak = max(load, fwd)
            ok = peak < 1.3 * W + act
            rows[loader] = peak
            print(f"{loader:<12} {m['t_load']:>7.2f} {m['t_fwd']:>6.2f} {load / W:>12.3f} {fwd / W:>11.3f} "
                  f"{act / W:>6.3f} {(peak - W - act) / GiB:>+10.3f} GiB  {'PASS' if ok else 'FAIL'}")
        if len(rows) == 2:
            print(f"peak RSS ratio tinylazy / safetensors.numpy: {rows['tinylazy'] / rows['safetensors']:.3f}")
    print(f"temporary file deleted: {not os.path.exists(path)}")


if __name__ == "__main__":
    main()
