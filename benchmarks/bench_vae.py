"""VAE decode: tinylazy (NumPy float32) vs diffusers' AutoencoderKL (PyTorch CPU eager), same threads, one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_vae.py

The sd-vae-ft-ema configuration (channels 128/256/512/512, 2 layers per block,
latent 4, 32 groups) with random weights (no download), one 32x32x4 latent ->
one 256x256 image by default.  Prints both medians and the ratio (PyTorch time /
tinylazy time: > 1 means tinylazy is faster), and the largest difference of the
two outputs relative to the image's largest value.

Threads: PyTorch runs ``--threads`` intra-op threads; tinylazy runs a pool of
``--threads`` threads (``tinylazy.parallel``) that shares out its elementwise work and
its GEMMs, with NumPy's BLAS single-threaded inside: OpenBLAS's per-thread switch, or
``--blas-threads 1`` (OPENBLAS_NUM_THREADS, set before NumPy loads) for another BLAS.
"""
import argparse
import os
import statistics
import time


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
    ap.add_argument("--reps", type=int, default=5, help="timed decodes per peer (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads and tinylazy's pool")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="NumPy BLAS threads outside tinylazy's pool (default 1)")
    ap.add_argument("--latent", type=int, default=32, help="latent side h = w (image side = 8 h)")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)       # read once, when NumPy loads BLAS

    import numpy as np
    import torch
    from tinylazy import parallel
    from tinylazy.vae import AutoencoderKL, VAEConfig
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    torch.set_num_threads(args.threads)
    parallel.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_info
        blas = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    except ImportError:
        blas = "threadpoolctl not installed"
    print(f"threads {args.threads} (tinylazy pool, torch intra-op); NumPy BLAS {blas}; "
          f"tinylazy splits GEMMs in its pool: {parallel.splits_gemms()}; "
          f"torch {torch.__version__}")

    cfg = VAEConfig()                                         # sd-vae-ft-ema
    n = len(cfg.block_out_channels)
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                             latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups).eval()
    with torch.no_grad():
        for p in ref.parameters():                              # move every weight (norms too) off its init
            p.add_(0.02 * torch.randn_like(p))
    ours = AutoencoderKL(cfg, {k: v.numpy() for k, v in ref.state_dict().items()}, dtype="float32")
    z = np.random.default_rng(0).standard_normal((args.batch, cfg.latent_channels, args.latent, args.latent))
    z = z.astype(np.float32)
    zt = torch.from_numpy(z)
    with torch.inference_mode():
        a, b = ours.decode(z), ref.decode(zt).sample.numpy()
        t_ours, t_ref = bench_pair(lambda: ours.decode(z), lambda: ref.decode(zt), args.reps)
    side = args.latent * ours.downscale
    print(f"decode {args.batch}x{cfg.latent_channels}x{args.latent}x{args.latent} -> {side}x{side}, "
          f"max |diff| / max |image| = {np.abs(a - b).max() / np.abs(b).max():.1e}")
    print(f"tinylazy median {t_ours:.3f} s   diffusers median {t_ref:.3f} s   "
          f"ratio {t_ref / t_ours:.2f}x (> 1: tinylazy faster)")


if __name__ == "__main__":
    main()
