"""One DiT training step: tinylazy (NumPy float32) vs PyTorch CPU eager, same model, batch and threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_train.py

A step is the whole official step: q_sample, forward, ADM's learned-sigma loss, backward,
AdamW, EMA update.  Both sides start from the same weights and see the same batch, t
and noise; their steps are interleaved so background load hits both alike.  Prints
median seconds per step and the ratio PyTorch time / tinylazy time (> 1: tinylazy faster),
and the quartiles of the per-rep ratios (each rep's two adjacent steps), which show how
much this machine's timings move.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

import tinylazy as tl
from tinylazy.diffusion import create_diffusion
from tinylazy.optim import AdamW, update_ema
from tinylazy.train import train_step

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def torch_loss(torch, diffusion, out, x0, x_t, t, noise):
    """ADM training_losses (MSE, learned range), batch mean, official float32 coefficient casts."""
    tt = torch.from_numpy(t)
    C = x0.shape[1]

    def ex(arr):
        return torch.from_numpy(np.asarray(arr))[tt].float().to(out.dtype)[:, None, None, None]
    eps, v = out[:, :C], out[:, C:]
    f_eps = eps.detach()
    true_mean = ex(diffusion.posterior_mean_coef1) * x0 + ex(diffusion.posterior_mean_coef2) * x_t
    min_log, max_log = ex(diffusion.posterior_log_variance_clipped), ex(np.log(diffusion.betas))
    frac = (v + 1) / 2
    lv = frac * max_log + (1 - frac) * min_log
    pred_x0 = ex(diffusion.sqrt_recip_alphas_cumprod) * x_t - ex(diffusion.sqrt_recipm1_alphas_cumprod) * f_eps
    mean = ex(diffusion.posterior_mean_coef1) * pred_x0 + ex(diffusion.posterior_mean_coef2) * x_t
    kl = 0.5 * (-1.0 + lv - min_log + torch.exp(min_log - lv) + (true_mean - mean) ** 2 * torch.exp(-lv))
    kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)

    def cdf(z):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * torch.pow(z, 3))))
    inv = torch.exp(-0.5 * lv)
    cdf_plus, cdf_min = cdf(inv * (x0 - mean + 1.0 / 255.0)), cdf(inv * (x0 - mean - 1.0 / 255.0))
    lp = torch.where(x0 < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                     torch.where(x0 > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                                 torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    vb = torch.where(tt == 0, -lp.mean(dim=(1, 2, 3)) / np.log(2.0), kl)
    return (((noise - eps) ** 2).mean(dim=(1, 2, 3)) + vb).mean()


def bench_pair(fa, fb, reps):
    """Seconds of fa and fb per rep, interleaved (one of each per rep)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return ta, tb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from threadpoolctl import threadpool_info, threadpool_limits
    from torch_dit import TorchDiT
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads, user_api="blas")
    blas = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    print(f"threads {args.threads}; NumPy BLAS {blas}; torch {torch.__version__}")
    print(f"{'model':<24}{'tinylazy s/step':>16}{'torch s/step':>14}{'ratio':>8}   per-rep ratios: quartiles")
    diffusion = create_diffusion("")
    cases = [("tiny-dit-digits b64", tl.get_config("tiny-dit-digits"), 64),
             ("DiT-S/2 b8", tl.get_config("DiT-S/2"), 8)]
    for name, cfg, B in cases:
        params = tl.init_params(cfg, seed=0, scheme="random")
        rng = np.random.default_rng(0)
        C, H = cfg.in_channels, cfg.input_size
        x0 = rng.uniform(-1, 1, (B, C, H, H)).astype(np.float32)
        noise = rng.standard_normal((B, C, H, H)).astype(np.float32)
        t, y = rng.integers(0, 1000, B), rng.integers(0, cfg.num_classes + 1, B)
        t[0] = 0                                                   # the decoder-NLL branch too

        model = tl.DiT(cfg, {k: v.copy() for k, v in params.items()}, dtype="float32")
        trainable = {k: v for k, v in model.params.items() if k != "pos_embed"}
        opt = AdamW(trainable, lr=1e-4)
        ema = {k: v.copy() for k, v in trainable.items()}

        def ours():
            train_step(model, diffusion, opt, x0, y, t, noise)
            update_ema(ema, trainable, 0.9999)

        tm = TorchDiT.from_params(cfg, params, torch.float32)
        tparams = [p for n, p in tm.named_parameters() if n != "pos_embed"]
        topt = torch.optim.AdamW(tparams, lr=1e-4, weight_decay=0.0)
        tema = [p.detach().clone() for p in tparams]
        x0t, noiset, tt, yt = (torch.from_numpy(a) for a in (x0, noise, t, y))

        def theirs():
            topt.zero_grad(set_to_none=True)
            xt = (torch.from_numpy(diffusion.sqrt_alphas_cumprod)[tt].float()[:, None, None, None] * x0t
                  + torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod)[tt].float()[:, None, None, None]
                  * noiset)
            torch_loss(torch, diffusion, tm(xt, tt, yt), x0t, xt, t, noiset).backward()
            topt.step()
            with torch.no_grad():
                for e, p in zip(tema, tparams):
                    e.mul_(0.9999).add_(p, alpha=1 - 0.9999)

        ours_t, theirs_t = bench_pair(ours, theirs, args.reps)
        ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
        q = statistics.quantiles([b / a for a, b in zip(ours_t, theirs_t)], n=4)   # each rep's own ratio
        print(f"{name:<24}{ours_s:>16.3f}{theirs_s:>14.3f}{theirs_s / ours_s:>7.2f}x   "
              f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}")


if __name__ == "__main__":
    main()
