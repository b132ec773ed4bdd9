"""What FID-50K of DiT-XL/2 costs on this CPU: seconds per image per sampling step, measured.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fid50k_cost.py

A randomly initialised DiT-XL/2 (256x256, 32x32x4 latents; the weights do not change the
time) samples --batch images with classifier-free guidance (the model sees the doubled
batch, as ``sample_many`` runs it) for --timed-steps DDIM steps, in one process set up as
a ``sample_many`` worker (TINYLAZY_NUM_THREADS=1, one BLAS thread) unless --threads
says otherwise.  Full steps, then LazyDiT at 50% (the alternate-step rule: every module
reused on every other step; learned gates add their scoring, < 2% of a step), then the
sd-vae decoder (random weights) on one latent.  Prints seconds per image per step and
what 50,000 images cost at 50 and 250 steps, in core-hours and in days on this machine.
"""
import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="images per batch (the forward sees twice as many)")
    ap.add_argument("--timed-steps", type=int, default=2, help="DDIM steps timed, full and lazy (even; default 2)")
    ap.add_argument("--threads", type=int, default=1, help="TINYLAZY_NUM_THREADS (default 1, as a worker)")
    ap.add_argument("--num", type=int, default=50000)
    args = ap.parse_args()
    os.environ["TINYLAZY_NUM_THREADS"] = str(args.threads)          # read when tinylazy is imported
    os.environ["OPENBLAS_NUM_THREADS"] = "1" if args.threads == 1 else os.environ.get("OPENBLAS_NUM_THREADS", "")

    import numpy as np
    import tinylazy as tl
    from tinylazy.dit import param_shapes
    from tinylazy.embeddings import pos_embed_2d
    from tinylazy.lazy import alternate_decisions
    from tinylazy.vae import AutoencoderKL, VAEConfig

    cfg = tl.get_config("DiT-XL/2")
    rng = np.random.default_rng(0)
    params = {k: (0.02 * rng.standard_normal(s, dtype=np.float32)) for k, s in param_shapes(cfg).items()}
    params["pos_embed"] = pos_embed_2d(cfg.hidden_size, cfg.grid_size).astype(np.float32)[None]
    model = tl.DiT(cfg, params, dtype="float32")                    # float32 throughout: 2.7 GB, no float64 copy
    B, S = args.batch, args.timed_steps
    noise = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    labels = np.arange(B) % cfg.num_classes
    load = os.getloadavg()[0]

    def per_image_step(**lazy):
        t0 = time.perf_counter()
        tl.ddim_sample(model, noise, labels, steps=S, cfg_scale=1.5, **lazy)
        return (time.perf_counter() - t0) / (S * B)

    per_image_step()                                                # warm-up (allocations, first-call costs)
    full = per_image_step()
    lazy = per_image_step(decisions=alternate_decisions(S, cfg.depth))
    del model, params
    vae = AutoencoderKL.from_config(VAEConfig(), seed=0)
    z = rng.standard_normal((1, 4, cfg.input_size, cfg.input_size)).astype(np.float32)
    t0 = time.perf_counter()
    vae.decode(z)
    decode = time.perf_counter() - t0
    cores = len(os.sched_getaffinity(0))

    print(f"DiT-XL/2 256x256, guided batch {2 * B} ({B} image{'s' if B > 1 else ''}), {args.threads} thread(s), "
          f"load average {load:.1f} on {cores} cores when measured", file=sys.stderr)
    print(f"| | seconds per image per step | {args.num} images x 50 steps | x 250 steps |\n|---|---|---|---|")
    res = {"full_s": full, "lazy50_s": lazy, "vae_decode_s": decode, "load_average": load, "threads": args.threads,
           "batch": B}
    for key, name, t in (("full", "full", full), ("lazy50", "LazyDiT 50%", lazy)):
        cells = []
        for steps in (50, 250):
            core_h = args.num * (steps * t + decode) * args.threads / 3600
            cells.append(f"{core_h:,.0f} core-hours ({core_h / cores / 24:,.0f} days on {cores} cores)")
            res[f"{key}_{steps}_steps_core_hours"] = core_h
        print(f"| {name} | {t:.2f} | {cells[0]} | {cells[1]} |")
    print(f"\nVAE decode: {decode:.2f} s per image (included above)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
