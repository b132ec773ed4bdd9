"""The LazyDiT quality table on the bundled digits model (paper Table 1, same-compute pairs).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/lazy_quality.py --num 2000

For each guidance scale (1.5, the paper's, and 1): DDIM at N steps against Lazy at 2N
steps with ~50% of the modules reused (about the same MACs), N = 5, 10, 25, and Lazy 20
at ~30% against DDIM 14; next to each learned row, two rules at the same skip ratio:
``rule`` reuses every module on evenly spread steps (for 50%: every other step, the
alternate-step rule) and ``random`` reuses a random set of (step, layer, module)
evaluations.  Learned gates: the official recipe (odd t, trained gates at even respaced
indices), the ``--all-steps`` extension, and all-steps with the ``x`` loss (reuse error in
the next DDIM latent), trained to the target ratio by rho steering
(``GateTrainer(target_ratio=...)``).  Shipped gates in weights/ are used where they fit;
others are trained once and kept in --gates-dir.

``--oracle-steps 10 20`` adds, at N steps and each of ``--oracle-ratios`` (30%, 50%, 70%),
the similarity oracle (``tinylazy.analysis.oracle_decisions``) beside the evenly spread rule:
from an analysed full DDIM N run on the same batch, reuse the most similar (step, layer,
module) evaluations within the MACs the rule saves at that ratio.  ``oracle (per sample)`` and
``oracle (shared)`` (one choice for the batch) count a reuse of a reuse by its similarity to
the output it really gets; ``oracle (consecutive f)`` ranks by f(Y_k-1, Y_k) alone, per sample.
An upper baseline for learned gates, not a method.

Quality: ``tinylazy.metrics`` (Frechet distance to the real digits in the judge's
feature space, its ratio to the real-vs-real floor, class accuracy), all rows from the
same fixed noise and labels.  Prints a markdown table and writes --json.

Rows run one after another in this process, or as Dask tasks with ``--workers K`` (a
LocalCluster of single-threaded worker processes) or ``--scheduler ADDRESS`` (an existing
cluster; docs/distributed.md): one task per row, after one task per set of gates to
train, each row sampled and scored where it runs.  A row is the same computation
either way, so its numbers do not depend on where it ran.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import tinylazy as tl
from tinylazy import analysis, metrics
from tinylazy.lazy import alternate_decisions, gates_file, random_decisions
from tinylazy.lazy_train import GateTrainer
from tinylazy.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "tiny-dit-digits.safetensors")
FULL = ("DDIM", "LazyDiT official", "LazyDiT all-steps", "LazyDiT all-steps x-loss", "rule (spread steps)", "random",
        "oracle (per sample)", "oracle (shared)", "oracle (consecutive f)")
ORACLES = {"oracle (per sample)": (True, True), "oracle (shared)": (False, True),     # (per_sample, chains)
           "oracle (consecutive f)": (True, False)}
HEAVY = ("LazyDiT all-steps", "LazyDiT all-steps x-loss")      # left out of light rows (they train gates)
TRAIN = dict(rho_attn=1e-5, rho_mlp=1e-5, lr=1e-4, batch=16, seed=0)   # train_gates.py's, at batch 16
ITERS = 500


def spread_decisions(steps, depth, ratio):
    """Reuse every module on round(ratio * steps) steps spread evenly: up to half of the steps, the
    reused ones spread over steps 1..steps-1 (ratio 0.5 on an even count: the alternate-step rule);
    beyond half, the computed ones spread evenly from step 0 (step i * steps / computed), so that
    the runs of reuse between them are as short as the ratio allows (spreading the reused steps
    there bunched the computed ones at the ends: 70% of 10 steps computed steps 1, 2 and 10 only)."""
    n = int(round(ratio * steps))
    if n * 2 == steps:
        return alternate_decisions(steps, depth)
    if n * 2 > steps:
        keep = np.zeros((steps, depth, 2), dtype=bool)
        keep[np.arange(steps - n) * steps // (steps - n)] = True
        return keep
    keep = np.ones((steps, depth, 2), dtype=bool)
    skip = np.unique(np.round(np.linspace(1, steps - 1, n + 2)[1:-1] if n else []).astype(int))
    keep[skip] = False
    return keep


def train_iters(steps, all_steps, cap):
    """About 10 updates per trained gate step (at least 200 iterations: the rho search needs them)."""
    trained = steps - 1 if all_steps else steps // 2
    return min(cap, max(200, 10 * trained))


def shipped_gates(model, weights, steps, ratio, all_steps=False, loss="official"):
    """The bundled gates file (the default one, then ``-official``) whose recorded recipe is this one, or None."""
    want = {"target_ratio": ratio, "all_steps": all_steps, "loss": loss}
    for path in (gates_file(weights, steps), gates_file(weights, steps, "official")):
        if os.path.isfile(path) and all(tl.load_gates(path, model, steps).training.get(k, "official") == v
                                        for k, v in want.items()):
            return path
    return None


def learned_gates(model, weights, steps, ratio, all_steps, gates_dir, data, iters, tol=0.03, loss="official"):
    """Shipped gates when their recorded recipe matches, else trained once and cached.

    Training runs ``train_iters`` iterations, then on in blocks of one calibration period
    until the calibration run's lazy ratio is within ``tol`` of the target (at most 3x as
    long): the rho search starts low, so a hard target can take longer than the base count.
    """
    shipped = shipped_gates(model, weights, steps, ratio, all_steps, loss)
    if shipped:
        return tl.load_gates(shipped, model, steps), os.path.relpath(shipped, ROOT)
    tag = f"ddim{steps}-r{int(round(100 * ratio))}{'-all' if all_steps else ''}{'-x' if loss == 'x' else ''}"
    path = os.path.join(gates_dir, f"{model.weights_hash[:12]}.gates-{tag}.safetensors")
    if os.path.isfile(path):
        return tl.load_gates(path, model, steps), path
    trainer = GateTrainer(model, *data, steps, target_ratio=ratio, all_steps=all_steps, loss=loss, **TRAIN)
    base = train_iters(steps, all_steps, iters)
    bar = Progress(iter(lambda: trainer.iteration, None), total=base, desc=f"train gates {tag}")
    for _ in bar:
        res = trainer.step()
        bar.set_postfix(mse=res["mse"], lazy=f"{trainer.measured or 0:.1%}", rho=trainer.rho()[0])
        done = trainer.iteration >= base and abs(trainer.measured - ratio) <= tol
        if done or trainer.iteration >= 3 * base:
            break
    os.makedirs(gates_dir, exist_ok=True)
    tl.save_gates(trainer.gates, path, training=trainer.training_facts())
    return trainer.gates, path


def sample(model, noise, labels, steps, cfg_scale, batch, per_batch=None, **lazy):
    """Samples in batches; per_batch(i) -> lazy arguments of the batch that starts at sample i (the oracle's)."""
    stats = tl.LazyStats() if lazy or per_batch else None
    out = []
    for i in range(0, len(labels), batch):
        kw = dict(lazy, **(per_batch(i) if per_batch else {}))
        kw = dict(kw, lazy_stats=stats) if kw else {}
        x = tl.ddim_sample(model, noise[i:i + batch], labels[i:i + batch], steps, cfg_scale, **kw)
        out.append(np.asarray(x, dtype=np.float32))
    return np.concatenate(out), stats


def gates_task(weights, steps, ratio, all_steps, loss, gates_dir, iters):
    """Learned gates for one row kind: (path, source), trained here when neither shipped nor cached."""
    from tinylazy.data import load_digits_dataset
    from tinylazy.io import load_dit
    model = load_dit(weights)
    _, source = learned_gates(model, weights, steps, ratio, all_steps, gates_dir, load_digits_dataset(), iters,
                              loss=loss)
    return os.path.join(ROOT, source) if not os.path.isabs(source) else source, source


_RECORDS = {}          # the oracle's analysed full runs in this process: the three oracle rows share them


def oracle_batches(model, noise, labels, steps, cfg_scale, batch, ratio, per_sample, chains, seed):
    """per_batch for ``sample``: the oracle's decisions for the batch at i, from the similarity record of
    the full DDIM run of the same noise and labels (analysed once per process and batch)."""
    def decide(i):
        key = (model.weights_hash, seed, len(labels), batch, cfg_scale, steps, i)
        if key not in _RECORDS:
            t0 = time.perf_counter()
            _, _RECORDS[key] = analysis.analyse(model, noise[i:i + batch], labels[i:i + batch], steps, cfg_scale,
                                                history=True)
            print(f"cfg {cfg_scale} | oracle: analysed full DDIM {steps}, samples {i}.."
                  f"{min(i + batch, len(labels)) - 1} [{time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
        return {"decisions": analysis.oracle_decisions(_RECORDS[key], ratio, per_sample, chains)}
    return decide


def row_task(weights, num, seed, batch, cfg_scale, group, method, steps, lazy, figdir=None):
    """One row of the table: sample ``num`` images of the fixed noise and labels, score them.

    lazy: None (DDIM), ("gates", (path, source)), ("rule", ratio), ("random", ratio) or
    ("oracle", (ratio, per_sample, chains)).
    """
    from tinylazy.io import load_dit
    t0 = time.perf_counter()
    model = load_dit(weights)
    noise = tl.make_noise(model, num, seed=seed)
    labels = np.arange(num) % model.config.num_classes
    kind, arg = lazy or (None, None)
    L, source = model.config.depth, ""
    if kind == "gates":
        path, source = arg
        kw = {"gates": tl.load_gates(path, model, steps)}
    elif kind == "rule":
        kw = {"decisions": spread_decisions(steps, L, arg)}
    elif kind == "random":
        kw = {"decisions": random_decisions(steps, L, arg, seed=seed)}
    elif kind == "oracle":
        ratio, per_sample, chains = arg
        kw = {"per_batch": oracle_batches(model, noise, labels, steps, cfg_scale, batch, ratio, per_sample, chains,
                                          seed)}
        source = (f"oracle of the full DDIM {steps} run on the same noise, batches of {batch}: "
                  + ("each sample's own decisions" if per_sample else "one set of decisions per batch")
                  + (", a reuse of a reuse charged by what it reuses" if chains else ", ranked by f(Y_k-1, Y_k)"))
    else:
        kw = {}
    x, stats = sample(model, noise, labels, steps, cfg_scale, batch, **kw)
    m = metrics.evaluate(x, labels, metrics.load_classifier())
    row = {"cfg": cfg_scale, "group": group, "method": method, "steps": steps, "seed": seed,
           "lazy_ratio": stats.lazy_ratio if stats else 0.0,
           "attn": stats.ratio_by_kind()["attn"] if stats else 0.0,
           "mlp": stats.ratio_by_kind()["mlp"] if stats else 0.0,
           "macs_vs_ddim": (stats.macs()[0] / stats.macs()[1] * steps if stats else steps),
           "fd": m["fd"], "fd_ratio": m["fd_ratio"], "accuracy": m["accuracy"], "source": source,
           "by_layer": stats.ratio_by_layer().tolist() if stats else None,
           "by_step": stats.ratio_by_step().tolist() if stats else None,
           "seconds": round(time.perf_counter() - t0, 1)}
    if figdir and kind == "gates":
        os.makedirs(figdir, exist_ok=True)
        tag = f"{method.split()[-1]}-ddim{steps}-r{int(round(100 * row['lazy_ratio']))}-cfg{cfg_scale}"
        stats.heatmap(os.path.join(figdir, f"lazy-fig4-{tag}.png"),
                      title=f"{method}, {steps} steps, cfg {cfg_scale}: lazy {row['lazy_ratio']:.0%}")
    return row


def run_rows(todo, args, gates_fn=None):
    """Yield the finished rows of ``todo`` [(cfg, group, method, steps, lazy)], where lazy is None,
    ("gates", gates_fn arguments), ("rule", ratio) or ("random", ratio); as they finish.  An entry
    may add a sixth item, the noise seed of its row (default args.seed).  gates_fn (default
    ``gates_task``) -> (path, source) runs once per distinct arguments, before the rows that use it."""
    gates_fn = gates_fn or gates_task
    todo = [t if len(t) == 6 else (*t, args.seed) for t in todo]
    common = (args.weights, args.num)
    if not (args.workers or args.scheduler):
        made = {}
        for cfg_scale, group, method, steps, lazy, seed in todo:
            if lazy and lazy[0] == "gates":
                if lazy[1] not in made:
                    made[lazy[1]] = gates_fn(*lazy[1])
                lazy = ("gates", made[lazy[1]])
            yield row_task(*common, seed, args.batch, cfg_scale, group, method, steps, lazy, args.figdir)
        return
    from tinylazy.sample_many import as_results, cluster_client
    with cluster_client(args.workers, args.scheduler) as client:
        gates = {lazy[1]: client.submit(gates_fn, *lazy[1], pure=False)
                 for _, _, _, _, lazy, _ in todo if lazy and lazy[0] == "gates"}
        futures = [client.submit(row_task, *common, seed, args.batch, cfg_scale, group, method, steps,
                                 ("gates", gates[lazy[1]]) if lazy and lazy[0] == "gates" else lazy, args.figdir,
                                 pure=False) for cfg_scale, group, method, steps, lazy, seed in todo]
        what = {f: f"row cfg {t[0]} | {t[1]} | {t[2]} | seed {t[5]}" for f, t in zip(futures, todo)}
        yield from as_results(client, futures, what)


def _row_key(r):
    return (r["cfg"], r["group"], r["method"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000, help="samples per row (default 2000)")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.5, 1.0])
    ap.add_argument("--pairs", type=int, nargs="*", default=[5, 10, 25],
                    help="N of DDIM N vs Lazy 2N @50%% (none: --pairs alone)")
    ap.add_argument("--iters", type=int, default=ITERS, help="at most this many gate training iterations "
                    "(default 500; 10 per trained step, at least 200)")
    ap.add_argument("--weights", default=BUNDLED, help="DiT (default: the bundled digits model)")
    ap.add_argument("--methods", nargs="+", default=list(FULL), help=f"rows to run (default: all of {FULL})")
    ap.add_argument("--light-cfg", type=float, nargs="*", default=[],
                    help="guidance scales at which the rows that train extra gates (all-steps, x-loss) are left out")
    ap.add_argument("--thirty", type=int, nargs="*", default=[14, 7], choices=[14, 7],
                    help="the ~30%% comparisons to run: 14 = DDIM 14 vs Lazy 20 @30%%, 7 = DDIM 7 vs Lazy 10 @30%% "
                         "(default: both)")
    ap.add_argument("--light-pairs", type=int, nargs="*", default=[],
                    help="N (of --pairs or --thirty) for which the rows that train gates beyond the shipped "
                         "recipe (all-steps, x-loss) are left out")
    ap.add_argument("--oracle-steps", type=int, nargs="*", default=[],
                    help="N for the groups 'Lazy N @r' of the similarity oracle (per sample and shared) and the "
                         "spread rule at each of --oracle-ratios (default: none)")
    ap.add_argument("--oracle-ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                    help="lazy ratios (MACs budgets) of the oracle groups (default: 0.3 0.5 0.7)")
    ap.add_argument("--consecutive-ratios", type=float, nargs="*", default=[0.5],
                    help="the oracle groups that also get the 'oracle (consecutive f)' row (default: 0.5)")
    ap.add_argument("--report-only", action="store_true", help="print the table of the rows in --json, run nothing")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the noise (and of the random rows' decisions); another seed shows the spread")
    ap.add_argument("--threads", type=int, help="BLAS threads (threadpoolctl) when the rows run in this process")
    engine = ap.add_mutually_exclusive_group()
    engine.add_argument("--workers", type=int, help="run the rows as tasks on a Dask LocalCluster of this many "
                        "single-threaded worker processes (the [distributed] extra)")
    engine.add_argument("--scheduler", help="run the rows as tasks on the Dask cluster at this address")
    ap.add_argument("--gates-dir", default=os.path.join(metrics.default_cache_dir(), "lazy_quality"))
    ap.add_argument("--figdir", help="write a Figure-4 heat map PNG per learned row here")
    ap.add_argument("--json", default="lazy_quality.json",
                    help="results, rewritten after every row; rows already there are not run again")
    args = ap.parse_args()

    from tinylazy.io import load_dit
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.threads, user_api="blas")
    model = load_dit(args.weights)
    metrics.load_classifier()                               # trained and cached once, before any worker needs it

    # (group, method, steps, light, lazy): lazy as run_rows takes it
    plans = []
    groups = [(n, 2 * n, 0.5, n in args.light_pairs) for n in args.pairs]
    groups += [(n, {14: 20, 7: 10}[n], 0.3, n == 7 or n in args.light_pairs) for n in args.thirty]
    for N, lazy_steps, ratio, light in groups:
        group = f"DDIM {N} vs Lazy {lazy_steps} @{ratio:.0%}"
        plans.append((group, "DDIM", N, light, None))
        for all_steps, loss in ((False, "official"), (True, "official"), (True, "x")):
            name = "LazyDiT " + ("all-steps" if all_steps else "official") + (" x-loss" if loss == "x" else "")
            plans.append((group, name, lazy_steps, light, ("gates", (args.weights, lazy_steps, ratio, all_steps, loss,
                                                                     args.gates_dir, args.iters))))
        plans.append((group, "rule (spread steps)", lazy_steps, light, ("rule", ratio)))
        plans.append((group, "random", lazy_steps, light, ("random", ratio)))
    # method by method, so that one kind of row is complete at every point before the next starts (a
    # process keeps the analysed full runs, which all oracle rows of one N share)
    for method in ("rule (spread steps)", *ORACLES):
        for N in args.oracle_steps:
            for ratio in args.oracle_ratios:
                if method in ORACLES and (ORACLES[method][1] or ratio in args.consecutive_ratios):
                    plans.append((f"Lazy {N} @{ratio:.0%}", method, N, False, ("oracle", (ratio, *ORACLES[method]))))
                elif method not in ORACLES:
                    plans.append((f"Lazy {N} @{ratio:.0%}", method, N, False, ("rule", ratio)))

    rows = []
    if os.path.isfile(args.json):
        with open(args.json) as f:
            old = json.load(f)
        if old.get("num") == args.num and old.get("weights_hash") == model.weights_hash \
                and old.get("seed", 0) == args.seed:
            rows = old["rows"]
    done = {_row_key(r) for r in rows}
    todo = [(cfg_scale, group, method, steps, lazy) for cfg_scale in ([] if args.report_only else args.cfg)
            for group, method, steps, light, lazy in plans
            if method in args.methods and not ((light or cfg_scale in args.light_cfg) and method in HEAVY)
            and (cfg_scale, group, method) not in done]
    for row in Progress(run_rows(todo, args), total=len(todo), desc="rows", disable=not todo):
        rows.append(row)
        with open(args.json + ".tmp", "w") as f:
            json.dump({"num": args.num, "seed": args.seed, "weights_hash": model.weights_hash,
                       "fd_note": "fd_ratio = fd / fd(real half vs real half)", "rows": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
        print(f"cfg {row['cfg']} | {row['group']} | {row['method']} {row['steps']}: lazy {row['lazy_ratio']:.1%} "
              f"FD {row['fd']:.3f} ({row['fd_ratio']:.2f}x floor) acc {row['accuracy']:.1%} "
              f"[{row['seconds']} s]", file=sys.stderr, flush=True)

    print(f"\n{args.num} samples per row, same noise and labels (seed {args.seed}); FD (lower is better), "
          f"FD / real-vs-real floor, "
          f"class accuracy; MACs in units of one full step.\n")
    print("| cfg | comparison | method | steps | lazy (attn / MLP) | MACs | FD | FD/floor | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = {f"DDIM {n} vs Lazy {s} @{r:.0%}": i for i, (n, s, r) in enumerate(
        [(5, 10, .5), (10, 20, .5), (25, 50, .5), (14, 20, .3), (7, 10, .3)])}
    order.update({f"Lazy {n} @{r:.0%}": 10 + i for i, (n, r) in enumerate(
        (n, r) for n in sorted(set(args.oracle_steps) | {10, 20}) for r in sorted(args.oracle_ratios))})
    for r in sorted(rows, key=lambda r: (-r["cfg"], order.get(r["group"], 0), FULL.index(r["method"]))):
        lazy = "-" if r["method"] == "DDIM" else f"{r['lazy_ratio']:.0%} ({r['attn']:.0%} / {r['mlp']:.0%})"
        print(f"| {r['cfg']} | {r['group']} | {r['method']} | {r['steps']} | {lazy} | {r['macs_vs_ddim']:.1f} | "
              f"{r['fd']:.3f} | {r['fd_ratio']:.2f} | {r['accuracy']:.1%} |")


if __name__ == "__main__":
    main()
