"""LazyDiT sampling: wall time of lazy vs full DDIM, and the cost of scoring the gates.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_lazy.py

Two cases, each against full sampling measured in the same run (interleaved, medians):
- the bundled digits model with its learned 20-step gates (the chain recipe's, 30% MACs budget,
  35% lazy) and the official recipe's (``-official``, 45% lazy), guided (cfg 1.5); without a gates
  file the alternate-step rule stands in;
- a DiT-S/2-sized model (32x32x4 latents, depth 12, hidden 384) with random weights
  and forced decisions: the alternate-step rule (50%), and a random 50% per sample.
Speed-up = full time / lazy time.  Gate scoring overhead = the time spent in the
scores (Z @ w, token sum, sigmoid, decision to the host) over the time of a full step.
"""
import argparse
import os
import statistics
import time

import numpy as np

import tinylazy as tl
from tinylazy.lazy import LazyDiT, alternate_decisions, gates_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "tiny-dit-digits.safetensors")


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


class TimedScores(LazyDiT):
    """LazyDiT that adds up the seconds spent scoring gates."""
    seconds = 0.0

    def scores(self, s, l, kind, z):
        t0 = time.perf_counter()
        s = super().scores(s, l, kind, z)
        TimedScores.seconds += time.perf_counter() - t0
        return s


def scoring_overhead(model, gates, noise, labels, steps, cfg_scale, reps):
    """Seconds of gate scoring per step over the seconds of one full step (medians over reps)."""
    tmap = tl.create_diffusion(steps).timestep_map
    fracs = []
    for _ in range(reps):
        TimedScores.seconds = 0.0
        runner = TimedScores(model, tmap, gates, decisions=np.ones((steps, model.config.depth, 2), bool))
        t0 = time.perf_counter()
        tl.ddim_sample(runner, noise, labels, steps, cfg_scale)
        total = time.perf_counter() - t0
        fracs.append(TimedScores.seconds / (total - TimedScores.seconds))
    return statistics.median(fracs)


def report(name, full, lazy, stats):
    s = stats.summary()
    print(f"{name:<44}{full:>9.3f}{lazy:>9.3f}{full / lazy:>8.2f}x{s['lazy_ratio']:>8.1%}{s['macs_ratio']:>8.1%}",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--digits-batch", type=int, default=64, help="samples per digits run (default 64)")
    ap.add_argument("--s2-batch", type=int, default=4, help="samples per DiT-S/2 run (default 4, 8 rows guided)")
    ap.add_argument("--s2-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, help="BLAS threads (threadpoolctl; default: the library's own); "
                    "1 is steadier on a machine that other jobs share")
    args = ap.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.threads, user_api="blas")
    print(f"{'case':<44}{'full s':>9}{'lazy s':>9}{'speedup':>9}{'lazy':>8}{'MACs':>8}")

    # The bundled model and its learned gates.
    if os.path.isfile(BUNDLED):
        model = tl.load_dit(BUNDLED)
        steps, B = 20, args.digits_batch
        noise, labels = tl.make_noise(model, B, seed=0), np.arange(B) % model.config.num_classes
        path = gates_file(BUNDLED, steps)
        gates = tl.load_gates(path, model, steps) if os.path.isfile(path) else None
        alt = {"decisions": alternate_decisions(steps, model.config.depth)}
        official = gates_file(BUNDLED, steps, "official")              # the paper's recipe, kept as the baseline
        cases = [] if gates is None else [("learned gates", {"gates": gates})]
        if gates is not None and os.path.isfile(official):
            cases.append(("official gates", {"gates": tl.load_gates(official, model, steps)}))
        for name, kw in cases + [("alternate rule", alt)]:       # the bench_pair inside reads this kw
            stats = tl.LazyStats()
            tl.ddim_sample(model, noise, labels, steps, 1.5, lazy_stats=stats, **kw)
            full, lazy = bench_pair(lambda: tl.ddim_sample(model, noise, labels, steps, 1.5),
                                    lambda: tl.ddim_sample(model, noise, labels, steps, 1.5, **kw), args.reps)
            report(f"digits b{B} cfg1.5 {steps} steps, {name}", full, lazy, stats)
        if gates is not None:
            frac = scoring_overhead(model, gates, noise, labels, steps, 1.5, args.reps)
            print(f"  gate scoring: {frac:.2%} of a full step (time); MACs "
                  f"{2 * model.config.depth * tl.lazy.module_macs(model.config)['gate'] / tl.lazy.full_step_macs(model.config):.3%}")
    else:
        print(f"(no {BUNDLED}: digits case skipped)")

    # DiT-S/2 geometry, random weights, forced decisions.
    cfg = tl.get_config("DiT-S/2", num_classes=1000)
    model = tl.DiT(cfg, tl.init_params(cfg, seed=0, scheme="random"), dtype="float32")
    steps, B = args.s2_steps, args.s2_batch
    noise, labels = tl.make_noise(model, B, seed=0), np.arange(B)
    cases = [("alternate rule", alternate_decisions(steps, cfg.depth)),
             ("random 50% per sample row",
              np.random.default_rng(0).random((steps, cfg.depth, 2, 2 * B)) < 0.5)]
    for name, keep in cases:
        stats = tl.LazyStats()
        tl.ddim_sample(model, noise, labels, steps, 1.5, decisions=keep, lazy_stats=stats)
        full, lazy = bench_pair(lambda: tl.ddim_sample(model, noise, labels, steps, 1.5),
                                lambda: tl.ddim_sample(model, noise, labels, steps, 1.5, decisions=keep), args.reps)
        report(f"DiT-S/2 b{B} cfg1.5 {steps} steps, {name}", full, lazy, stats)
    gates = tl.LazyGates.zeros(model, steps)
    gates.attn[...] = np.random.default_rng(1).standard_normal(gates.attn.shape) * 1e-3
    frac = scoring_overhead(model, gates, noise, labels, steps, 1.5, max(1, args.reps // 2))
    print(f"  gate scoring: {frac:.2%} of a full step (time); MACs "
          f"{2 * cfg.depth * tl.lazy.module_macs(cfg)['gate'] / tl.lazy.full_step_macs(cfg):.3%}")


if __name__ == "__main__":
    main()
