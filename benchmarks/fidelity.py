"""How close lazy sampling stays to the full sampler, and whether it weakens the guidance (issue #19).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fidelity.py          # docs/data/fidelity.json
    python benchmarks/fidelity.py --report-only                                          # the table only

FD to the real digits (benchmarks/frontier.py) scores samples against the data, not against what
the full model would have drawn: a lazy method can lower FD by *moving away* from the full
sampler, e.g. by weakening classifier-free guidance, which at guidance 1.5 brings the samples
closer to the data (plain DDIM's FD falls from guidance 1.5 to 1).  This measures the other thing,
from the same noise and labels as the frontier (its first --num samples of seed --seed):

- ``rel. RMS``: per sample, ||x_lazy - x_full|| / ||x_full|| of the final images, x_full being plain
  DDIM N at the same guidance (mean, median and 90th percentile over the samples); beside each lazy
  method at a target, plain DDIM with the steps that cost the same MACs (round(N (1 - target))).
- With guidance (cfg > 1), the share of the deviation that runs along the guidance direction
  g = x_full(guidance 1) - x_full(cfg), the unguided sample minus the guided one:
  ``toward 1`` = <x_lazy - x_full, g> / <g, g> (0: the guidance is kept, 1: all of it is lost; the
  linearised effective guidance is cfg - toward_1 (cfg - 1)), ``cos^2`` the share of the
  deviation's energy along g, and ``nearest cfg`` the mean over samples of the guidance c of
  --probe-cfg whose plain DDIM N sample is nearest to the lazy one.

Methods: the evenly spread rule (``lazy_quality.spread_decisions``), the official recipe's gates
and those of each --recipes, found as frontier.py keeps them (never trained here: a recipe whose
gates are missing is left out, with a line saying so).  Each finished (cfg, N) group is written
to --json at once; a rerun skips the groups already there.
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import frontier  # noqa: E402
import lazy_quality as lq  # noqa: E402

from tinylazy import atomic, cli  # noqa: E402

FORMAT = "tinylazy-fidelity-v1"


def add_arguments(p):
    n = cli.number
    p.add_argument("--num", type=n(int, 2), default=400, help="samples (default: 400, the frontier's first)")
    p.add_argument("--batch", type=n(int, 1), default=200, help="samples per sampling batch (default: 200)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="noise seed, as the frontier's (default: 0)")
    p.add_argument("--cfg", type=n(float, 1), nargs="+", default=[1.5, 1.0], help="guidance scales (default: 1.5 1)")
    p.add_argument("--steps", type=n(int, 2, 1000), nargs="+", default=[10, 20], help="N (default: 10 20)")
    p.add_argument("--ratios", type=n(float, 0, 0.95), nargs="+", default=[0.5], help="lazy targets (default: 0.5)")
    p.add_argument("--recipes", nargs="*", default=["official", "x-norm", "chain"],
                   choices=list(frontier.RECIPES), help="gates to measure beside the rule (default: official x-norm "
                   "chain; those not in --gates-dir are left out)")
    p.add_argument("--probe-cfg", type=n(float, 1), nargs="*", default=[1.0, 1.1, 1.2, 1.3, 1.4],
                   help="guidance scales of the plain DDIM N runs a guided lazy sample is compared with "
                        "(default: 1 1.1 1.2 1.3 1.4, and the run's own)")
    p.add_argument("--json", default=os.path.join(frontier.DATA, "fidelity.json"),
                   help="results (default: docs/data/fidelity.json); groups already there are not run again")
    p.add_argument("--gates-dir", default=os.path.join(frontier.DATA, "gates"),
                   help="where frontier.py keeps its trained gates (default: docs/data/gates)")
    p.add_argument("--weights", default=lq.BUNDLED, help=frontier.argparse_suppress())
    p.add_argument("--report-only", action="store_true", help="print the table of --json, run nothing")


def compare(x, ref, unguided=None, probes=None):
    """The row's statistics of samples x against the full sampler's ref (see the module doc)."""
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64)  # noqa: E731
    x, ref = flat(x), flat(ref)
    d = x - ref
    rel = np.linalg.norm(d, axis=1) / np.linalg.norm(ref, axis=1)
    out = {"rel_rms_mean": float(rel.mean()), "rel_rms_median": float(np.median(rel)),
           "rel_rms_p90": float(np.quantile(rel, 0.9))}
    if unguided is not None:
        g = flat(unguided) - ref
        gg, dg, dd = (g * g).sum(1), (d * g).sum(1), (d * d).sum(1)
        toward = dg / gg
        out.update(toward_1_mean=float(toward.mean()), toward_1_median=float(np.median(toward)),
                   cos2_mean=float(np.mean(dg ** 2 / np.maximum(gg * dd, 1e-300))))
    if probes:
        cs = sorted(probes)
        dist = np.stack([np.linalg.norm(x - flat(probes[c]), axis=1) for c in cs])
        out["nearest_cfg_mean"] = float(np.mean(np.asarray(cs)[dist.argmin(0)]))
    return out


def run_group(model, weights, args, cfg_scale, steps):
    """The rows of one (cfg, N): every method at every target, and DDIM at the same MACs."""
    import tinylazy as tl
    noise = tl.make_noise(model, args.num, seed=args.seed)
    labels = np.arange(args.num) % model.config.num_classes
    t0 = time.perf_counter()

    def draw(what, n, c, **kw):
        t = time.perf_counter()
        x, stats = lq.sample(model, noise, labels, n, c, args.batch, **kw)
        print(f"  cfg {c:g} | {what}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return x, stats

    ref, _ = draw(f"DDIM {steps}", steps, cfg_scale)
    probes, unguided = {}, None
    if cfg_scale > 1:
        for c in sorted(set(args.probe_cfg) - {cfg_scale}):
            if c < cfg_scale:
                probes[c] = draw(f"DDIM {steps} (probe)", steps, c)[0]
        probes[cfg_scale] = ref
        unguided = probes[1.0] if 1.0 in probes else draw(f"DDIM {steps} (unguided)", steps, 1.0)[0]
    rows = []

    def add(method, ratio, x, stats, n, source=""):
        row = {"cfg": cfg_scale, "steps": steps, "method": method, "target": ratio, "sampler_steps": n,
               "lazy_ratio": stats.lazy_ratio if stats else 0.0,
               "macs_vs_ddim": stats.macs()[0] / stats.macs()[1] * n if stats else float(n), "source": source}
        row.update(compare(x, ref, unguided, probes))
        rows.append(row)
        extra = f" toward 1 {row['toward_1_mean']:.3f} nearest cfg {row['nearest_cfg_mean']:.2f}" \
            if unguided is not None else ""
        print(f"cfg {cfg_scale:g} | {steps} steps | {method} @{ratio:.0%}: MACs {row['macs_vs_ddim']:.2f} rel. RMS "
              f"{row['rel_rms_mean']:.4f} (median {row['rel_rms_median']:.4f}){extra}", file=sys.stderr, flush=True)

    if unguided is not None:                                      # the guidance ladder itself, for scale
        for c in sorted(probes):
            if c != cfg_scale:
                add(f"DDIM guidance {c:g}", 0.0, probes[c], None, steps)
    for ratio in args.ratios:
        n = max(1, int(round(steps * (1 - ratio))))
        add(f"DDIM {n}", ratio, *draw(f"DDIM {n}", n, cfg_scale), n)
        x, stats = draw(f"rule @{ratio:.0%}", steps, cfg_scale,
                        decisions=lq.spread_decisions(steps, model.config.depth, ratio))
        add(lq.FULL[4], ratio, x, stats, steps)
        for recipe in args.recipes:
            found = frontier.kept_gates(model, weights, steps, ratio, recipe, args.gates_dir)
            if found is None:
                print(f"  {recipe} {steps} steps @{ratio:.0%}: no gates in {args.gates_dir}, left out",
                      file=sys.stderr)
                continue
            x, stats = draw(f"{recipe} @{ratio:.0%}", steps, cfg_scale, gates=tl.load_gates(found, model, steps))
            add(f"LazyDiT {recipe}", ratio, x, stats, steps, frontier._where(found)[1])
    print(f"cfg {cfg_scale:g} | {steps} steps: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def run(args):
    from tinylazy.io import load_dit
    cli.weights_input(args.weights)
    cli.output_file(args.json, "--json", (".json",))
    model = load_dit(args.weights)
    data = {"format": FORMAT, "weights_hash": model.weights_hash, "num": args.num, "seed": args.seed, "rows": []}
    if os.path.isfile(args.json):
        with open(args.json) as f:
            old = json.load(f)
        if old.get("format") != FORMAT or old.get("weights_hash") != model.weights_hash \
                or old.get("num") != args.num or old.get("seed") != args.seed:
            raise cli.UsageError(f"--json {args.json} holds another model, --num or --seed; give another --json")
        data["rows"] = old["rows"]
    if not args.report_only:
        key = lambda r: (r["cfg"], r["steps"], r["method"], r["target"])  # noqa: E731
        for cfg_scale in args.cfg:
            for steps in args.steps:
                if all(any(r["cfg"] == cfg_scale and r["steps"] == steps and r["target"] == t for r in data["rows"])
                       for t in args.ratios):
                    continue
                have = {key(r) for r in data["rows"]}
                data["rows"] += [r for r in run_group(model, args.weights, args, cfg_scale, steps) if key(r) not in have]
                with atomic.writing(args.json) as f:
                    f.write(json.dumps(data, indent=1).encode())
    if not data["rows"]:
        raise cli.RunError("no rows yet: run without --report-only first")
    print("\n".join(frontier._tables().fidelity_table(data)))


def resume_hint(args):
    return f"the finished groups are in {args.json}; run the same command again to go on"


def main(argv=None):
    return cli.run_module(sys.modules[__name__], argv, "python benchmarks/fidelity.py")


if __name__ == "__main__":
    sys.exit(main())
