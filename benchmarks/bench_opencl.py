"""The OpenCL backend against NumPy in one run: the tiled GEMM and a DiT-S/2 forward.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_opencl.py

1. GEMM GFLOP/s of kernels_cl/gemm.cl (bias included) vs NumPy's ``x @ w.T + b`` on the
   linear layers of a DiT-S/2 forward at batch 8, and on a square 2048^3 product.
2. A forward pass of a DiT-S/2-sized model (random weights, 32x32x4 latents, batch 8):
   the OpenCL forward with input and output on the device, the same with the host
   upload and download (``OpenCLDiT.__call__``), the same with float16 weight storage,
   and the NumPy float32 backend.
3. With --lazy: DDIM sampling on the device, every module computed vs LazyDiT's
   alternate-step rule (50% of the modules reuse their cache): latency should track MACs.
Ratios are OpenCL time / NumPy time (< 1: OpenCL is faster); the two peers run interleaved,
so background load hits both alike.  --profile adds the device time per kernel.
On PoCL (the CPU) the target is a forward within 2x of NumPy.
"""
import argparse
import statistics
import time

import numpy as np

import tinylazy as tl
from tinylazy import lazy
from tinylazy import opencl as O


def bench_pair(fa, fb, reps):
    """Median seconds of fa and fb, interleaved."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench_gemm(rt, reps):
    cfg, B = tl.get_config("DiT-S/2"), 8
    M, D, F = B * cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    shapes = [("attn.qkv", M, D, 3 * D), ("attn.proj", M, D, D), ("mlp.fc1", M, D, F), ("mlp.fc2", M, F, D),
              ("adaLN (M = B)", B, D, 6 * D), ("square", 2048, 2048, 2048)]
    print(f"{'GEMM (M x K -> N)':<34}{'OpenCL GF/s':>12}{'NumPy GF/s':>12}{'ratio':>8}")
    rng = np.random.default_rng(0)
    for name, M, K, N in shapes:
        x = rng.standard_normal((M, K)).astype(np.float32)
        w, b = rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal(N).astype(np.float32)
        layer, dx, out = O.PackedLinear(rt, w, b), rt.to_device(x), rt.empty((M, N))

        def run_cl():
            O.linear(rt, dx, layer, out=out)
            rt.finish()

        t_cl, t_np = bench_pair(run_cl, lambda: x @ w.T + b, reps)
        flops = 2 * M * K * N
        label = f"{name} {M}x{K}->{N}"
        print(f"{label:<34}{flops / t_cl / 1e9:>12.1f}{flops / t_np / 1e9:>12.1f}{t_cl / t_np:>7.2f}x")


def bench_forward(rt, host, dev, reps, profile):
    cfg, B = host.config, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t, y = rng.integers(0, 1000, B), rng.integers(0, cfg.num_classes, B)
    dx = rt.to_device(x)
    err = np.abs(dev(x, t, y) - host(x, t, y)).max() / np.abs(host(x, t, y)).max()

    def run_device():
        dev.forward_device(dx, t, y)
        rt.finish()

    t_dev, t_np = bench_pair(run_device, lambda: host(x, t, y), reps)
    t_host, _ = bench_pair(lambda: dev(x, t, y), lambda: None, reps)
    dev16 = O.OpenCLDiT.from_model(host, device=rt, weights="float16")

    def run_half():
        dev16.forward_device(dx, t, y)
        rt.finish()

    t_half, t_np2 = bench_pair(run_half, lambda: host(x, t, y), reps)
    print(f"\nDiT-S/2 forward, batch 8, 32x32x4 (relative error vs NumPy {err:.1e})")
    print(f"  OpenCL, on the device   {t_dev:.3f} s   ratio to NumPy {t_dev / t_np:.2f}x")
    print(f"  OpenCL, host in/out     {t_host:.3f} s   ratio to NumPy {t_host / t_np:.2f}x")
    print(f"  OpenCL, float16 weights {t_half:.3f} s   ratio to NumPy {t_half / t_np2:.2f}x")
    print(f"  NumPy float32           {t_np:.3f} s")
    if profile:
        rt.events.clear()
        run_device()
        total = rt.profile_summary()
        print("\ndevice time per kernel, one forward:")
        for name, s in total.items():
            print(f"  {name:<22}{s * 1e3:>9.1f} ms")


def bench_lazy(host, dev, steps, reps):
    cfg, B = host.config, 8
    noise, labels = tl.make_noise(host, batch=B, seed=0), tl.sample_labels(host, batch=B, seed=0)
    stats = lazy.LazyStats()
    skip = lazy.alternate_decisions(steps, cfg.depth)
    t_full, t_lazy = bench_pair(lambda: tl.ddim_sample(dev, noise, labels, steps=steps),
                                lambda: tl.ddim_sample(dev, noise, labels, steps=steps, decisions=skip,
                                                       lazy_stats=stats), reps)
    print(f"\nDDIM {steps} steps on the device, DiT-S/2 batch 8, no guidance")
    print(f"  all modules       {t_full:.3f} s")
    print(f"  lazy, ratio {stats.lazy_ratio:.2f}   {t_lazy:.3f} s   speedup {t_full / t_lazy:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", help=f"OpenCL device: 'P:D' or a name substring (default: ${O.DEVICE_ENV} "
                                     "or the first GPU, else the first device)")
    ap.add_argument("--profile", action="store_true", help="print the device time per kernel")
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--lazy", type=int, default=0, metavar="STEPS",
                    help="also time DDIM sampling over STEPS steps, full vs 50%% lazy (e.g. 10)")
    args = ap.parse_args()
    rt = O.Runtime(args.device, profile=args.profile)
    print(f"OpenCL device: {rt.device.platform.name.strip()} / {rt.device.name.strip()} "
          f"({rt.device.max_compute_units} compute units)")
    if not args.skip_gemm:
        bench_gemm(rt, args.reps)
    host = tl.DiT.from_config(tl.get_config("DiT-S/2"), seed=0, scheme="random", dtype="float32")
    dev = O.OpenCLDiT.from_model(host, device=rt)
    bench_forward(rt, host, dev, args.reps, args.profile)
    if args.lazy:
        bench_lazy(host, dev, args.lazy, max(1, args.reps // 2))


if __name__ == "__main__":
    main()
