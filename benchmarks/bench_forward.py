"""DiT forward: tinylazy (NumPy float32) vs PyTorch CPU eager, same threads, one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_forward.py

Prints medians, the ratio (PyTorch time / tinylazy time: > 1 means tinylazy is faster),
and achieved GFLOP/s against this machine's measured float32 GEMM peak.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

import tinylazy as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def dit_flops(cfg, B):
    """Multiply-adds x 2 of one forward (GEMMs and attention; elementwise work not counted)."""
    T, D, F = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    per_block = 2 * B * T * (3 * D * D + D * D + 2 * D * F) + 2 * 2 * B * T * T * D + 2 * B * D * 6 * D
    embed = 2 * B * T * D * cfg.in_channels * cfg.patch_size ** 2 + 2 * B * (256 * D + D * D)
    final = 2 * B * T * D * cfg.patch_size ** 2 * cfg.out_channels + 2 * B * D * 2 * D
    return cfg.depth * per_block + embed + final


def gemm_peak(reps=5, n=2048):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def bench_pair(fa, fb, reps):
    """Median seconds of fa and fb, interleaved so that background load hits both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--xl-depth", type=int, default=28, help="blocks of the XL/2 geometry (>= 4)")
    args = ap.parse_args()

    import torch
    from torch_dit import TorchDiT
    torch.set_num_threads(args.threads)
    tl.parallel.set_num_threads(args.threads)          # tinylazy's pool ...
    try:
        from threadpoolctl import threadpool_limits     # ... and NumPy's BLAS: the same count
        threadpool_limits(limits=args.threads, user_api="blas")
    except ImportError:
        print("threadpoolctl not installed: NumPy's BLAS keeps its own thread count")
    try:
        from threadpoolctl import threadpool_info
        blas = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    except ImportError:
        blas = "threadpoolctl not installed"
    print(f"threads {args.threads}; NumPy BLAS {blas}; torch {torch.__version__}")
    peak = gemm_peak()
    print(f"measured NumPy float32 GEMM peak (2048^3): {peak:.0f} GFLOP/s\n")
    print(f"{'model':<26}{'tinylazy s':>12}{'torch s':>10}{'ratio':>8}{'GFLOP/s':>10}{'% peak':>8}")
    cases = [("DiT-S/2 b8", tl.get_config("DiT-S/2"), 8),
             (f"DiT-XL/2 b2 ({args.xl_depth} blk)", tl.get_config("DiT-XL/2", depth=args.xl_depth), 2)]
    for name, cfg, B in cases:
        params = tl.init_params(cfg, seed=0, scheme="random")
        model = tl.DiT(cfg, params, dtype="float32")
        tm = TorchDiT.from_params(cfg, params, torch.float32).eval()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
        t, y = rng.integers(0, 1000, B), rng.integers(0, cfg.num_classes, B)
        xt, tt, yt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)
        with torch.inference_mode():
            ours, theirs = bench_pair(lambda: model(x, t, y), lambda: tm(xt, tt, yt), args.reps)
        gf = dit_flops(cfg, B) / ours / 1e9
        print(f"{name:<26}{ours:>12.3f}{theirs:>10.3f}{theirs / ours:>7.2f}x{gf:>10.0f}{100 * gf / peak:>7.0f}%")


if __name__ == "__main__":
    main()
