"""The quality-compute frontier of lazy sampling on the bundled digits model (issue #19).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/frontier.py --workers 2
    python benchmarks/frontier.py --cfg 1.5 --seeds 0 1 --steps 20      # a part of the grid
    python benchmarks/frontier.py --report-only                          # figure and table only

Every point is the Frechet distance, class accuracy and MACs (in full forward passes per
sample) of --num samples drawn from the noise of one seed, scored by ``tinylazy.metrics``,
computed by ``benchmarks/lazy_quality.py``'s row task (same noise, labels and metric as its
tables).  The grid, for each guidance scale (--cfg) and noise seed (--seeds):

- plain DDIM at each of --ddim-steps: the baseline curve;
- at each N of --steps and lazy target of --ratios: ``rule (spread steps)`` (every module
  reused on evenly spread steps), ``random`` (a random set of (step, layer, module)
  evaluations), ``LazyDiT official`` (the paper's recipe, rho steered to the target; left
  out above 50%, which it cannot reach: it trains only the gates of alternate steps) and
  ``LazyDiT <recipe>`` for each of --recipes (``tinylazy train-gates --recipe``).

Gates are trained once per (recipe, N, target), from seed 0, into --gates-dir: the official
ones as lazy_quality.py trains them (the shipped gates where their recipe matches), the
others by ``tinylazy train-gates --recipe R --steps N --target-ratio r --seed 0 --out F``
(the command is in each file's metadata, with the training time).

Resumable: each finished point is added to --json at once (rewritten atomically); a rerun
skips the points already there, and the rows of the other JSON files in the same folder
that are of the same model and sample count (lazy_quality.py's tables, the oracle rows of
issue #21), so that nothing measured is measured twice.  Points run one after another in
this process, or as Dask tasks with --workers K (a LocalCluster of single-threaded worker
processes) or --scheduler ADDRESS: one task per set of gates, then one per point.

Writes the figure (--figure: FD against MACs, one panel per guidance scale, every seed)
and prints the table, which ``python docs/tables.py`` regenerates into docs/lazy.md.
"""
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lazy_quality as lq  # noqa: E402

from tinylazy import atomic, cli  # noqa: E402
from tinylazy.lazy_train import RECIPES  # noqa: E402

ROOT = lq.ROOT
DATA = os.path.join(ROOT, "docs", "data")
FORMAT = "tinylazy-frontier-v1"
OFFICIAL_CAP = 0.5               # the official recipe trains alternate steps only
RECIPE_SEED = 0


@functools.lru_cache(maxsize=None)
def _tables():
    """docs/tables.py: the one definition of which rows are points and of the table."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("doc_tables", os.path.join(ROOT, "docs", "tables.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def add_arguments(p):
    n = cli.number
    recipes = [r for r in RECIPES if r != "official"]
    p.add_argument("--num", type=n(int, 2), default=2000, help="samples per point (default: 2000)")
    p.add_argument("--batch", type=n(int, 1), default=500, help="samples per sampling batch (default: 500)")
    p.add_argument("--cfg", type=n(float, 1), nargs="+", default=[1.5, 1.0],
                   help="guidance scales, run in this order (default: 1.5 1)")
    p.add_argument("--seeds", type=n(int, 0), nargs="+", default=[0, 1], help="noise seeds (default: 0 1)")
    p.add_argument("--steps", type=n(int, 2, 1000), nargs="+", default=[10, 20],
                   help="step counts of the lazy points (default: 10 20)")
    p.add_argument("--ratios", type=n(float, 0, 0.95), nargs="+", default=[0.3, 0.5, 0.7],
                   help="lazy targets (default: 0.3 0.5 0.7)")
    p.add_argument("--ddim-steps", type=n(int, 1, 1000), nargs="*", default=[3, 4, 5, 7, 10, 14, 20],
                   help="step counts of the plain DDIM curve (default: 3 4 5 7 10 14 20)")
    p.add_argument("--methods", nargs="*", choices=("DDIM", "rule", "random", "official"),
                   default=["DDIM", "rule", "random", "official"],
                   help="baselines to run (default: all: DDIM rule random official)")
    p.add_argument("--recipes", nargs="*", choices=recipes, default=[],
                   help=f"gate-training recipes to run beside them (default: none; of {', '.join(recipes)})")
    p.add_argument("--json", default=os.path.join(DATA, "frontier.json"),
                   help="the points (default: docs/data/frontier.json); points already there are not run again")
    p.add_argument("--figure", default=os.path.join(ROOT, "docs", "img", "frontier.png"),
                   help="the figure (default: docs/img/frontier.png)")
    p.add_argument("--gates-dir", default=os.path.join(DATA, "gates"),
                   help="where trained gates are kept and looked for (default: docs/data/gates)")
    p.add_argument("--weights", default=lq.BUNDLED, help=argparse_suppress())
    p.add_argument("--report-only", action="store_true", help="write the figure and print the table, run nothing")
    p.add_argument("--dry-run", action="store_true", help="list the points that would run, run nothing")
    p.add_argument("--gates-only", action="store_true",
                   help="train (or find) the gates the points to run need, sample nothing")
    engine = p.add_mutually_exclusive_group()
    engine.add_argument("--workers", type=n(int, 1), help="run the points as tasks on a Dask LocalCluster of this "
                        "many single-threaded worker processes (the [distributed] extra)")
    engine.add_argument("--scheduler", help="run the points as tasks on the Dask cluster at this address")


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


# ----------------------------------------------------------------------------
# The grid

def plan(args):
    """The points of the grid: [(cfg, group, method, steps, lazy, seed)] as ``lq.run_rows`` takes them, in
    the order they run: per guidance scale the DDIM curve, then per (N, target) every seed's methods."""
    todo = []
    for cfg_scale in args.cfg:
        if "DDIM" in args.methods:
            todo += [(cfg_scale, f"DDIM {n}", "DDIM", n, None, seed) for seed in args.seeds for n in args.ddim_steps]
        for steps in args.steps:                           # the seeds of one comparison run one after another
            for ratio in args.ratios:
                for seed in args.seeds:
                    group = f"Lazy {steps} @{ratio:.0%}"
                    if "rule" in args.methods:
                        todo.append((cfg_scale, group, "rule (spread steps)", steps, ("rule", ratio), seed))
                    if "random" in args.methods:
                        todo.append((cfg_scale, group, "random", steps, ("random", ratio), seed))
                    recipes = (["official"] if "official" in args.methods and ratio <= OFFICIAL_CAP else [])
                    for recipe in recipes + args.recipes:
                        todo.append((cfg_scale, group, f"LazyDiT {recipe}", steps,
                                     ("gates", (args.weights, steps, ratio, recipe, args.gates_dir)), seed))
    return todo


def _key(item):
    """The point key (docs/tables.point_key) of a ``plan`` entry: its target as the group names it."""
    cfg_scale, group, method, steps, lazy, seed = item
    ratio = None if lazy is None else lazy[1] if lazy[0] != "gates" else lazy[1][2]
    return cfg_scale, seed, method, steps, None if ratio is None else round(100 * ratio) / 100


def kept_gates(model, weights, steps, ratio, recipe, gates_dir):
    """The gates of (recipe, N, target) where they are already made, or None: the official ones in
    gates_dir (also under an older hash) or shipped (lazy_quality's first choice, where their recorded
    recipe matches), the others as ``gates_task`` names them."""
    import tinylazy as tl
    tag = f"ddim{steps}-r{int(round(100 * ratio))}"
    if recipe == "official":
        for name in sorted(os.listdir(gates_dir)) if os.path.isdir(gates_dir) else []:
            if name.endswith(f".gates-{tag}.safetensors"):
                try:
                    tl.load_gates(os.path.join(gates_dir, name), model, steps)
                except tl.lazy.GatesError:
                    continue
                return os.path.join(gates_dir, name)
        return lq.shipped_gates(model, weights, steps, ratio)
    path = os.path.join(gates_dir, f"{model.weights_hash[:12]}.gates-{tag}-{recipe}.safetensors")
    return path if os.path.isfile(path) else None


def gates_task(weights, steps, ratio, recipe, gates_dir):
    """The gates of one (recipe, N, target): (path, source), made here unless kept (``kept_gates``)."""
    from tinylazy.io import load_dit
    from tinylazy.train_gates import main as train_gates, state_path
    model = load_dit(weights)
    kept = kept_gates(model, weights, steps, ratio, recipe, gates_dir)
    if kept:
        return _where(kept)
    if recipe == "official":                                  # trained as lazy_quality.py trains them
        train = lambda: lq.gates_task(weights, steps, ratio, False, "official", gates_dir, lq.ITERS)[0]  # noqa
        return _where(_timed(train, "benchmarks/lazy_quality.py's learned_gates, official recipe "
                                    f"{steps} steps, target {ratio}", gates_dir))
    path = os.path.join(gates_dir, f"{model.weights_hash[:12]}.gates-ddim{steps}-r{int(round(100 * ratio))}"
                                   f"-{recipe}.safetensors")
    os.makedirs(gates_dir, exist_ok=True)
    argv = ["--recipe", recipe, "--steps", str(steps), "--target-ratio", str(ratio), "--seed", str(RECIPE_SEED)]
    if os.path.isfile(state_path(path)):                   # an interrupted training: resumed, to the same gates
        argv.append("--resume")

    def train():
        if train_gates(argv + ["--weights", weights, "--out", path]) != 0:
            raise RuntimeError(f"tinylazy train-gates {' '.join(argv)} --out {path} failed")
        return path
    _timed(train, f"tinylazy train-gates {' '.join(argv)} --out {os.path.relpath(path, ROOT)}", gates_dir)
    return _where(path)


def _timed(train, command, gates_dir):
    """train() -> the gates path.  Where that is a file it made (not in gates_dir before), what it took
    is written beside it (<gates>.json: the command, wall seconds, and the machine's 1-minute load
    average before and after, as timings on this shared machine are noisy); the gates file itself
    stays bit-reproducible."""
    before = set(os.listdir(gates_dir)) if os.path.isdir(gates_dir) else set()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    path = train()
    seconds = time.perf_counter() - t0
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(gates_dir) and os.path.basename(path) not in before:
        with atomic.writing(path[: -len(".safetensors")] + ".json") as f:
            f.write(json.dumps({"command": command, "train_seconds": round(seconds, 1),
                                "loadavg_1min_before_after": [load0, os.getloadavg()[0]]}, indent=1).encode())
    return path


def _where(path):
    """(path, source): the source a row records is relative to the checkout where the file is in it."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return path, os.path.relpath(path, ROOT) if inside else path


# ----------------------------------------------------------------------------
# The JSON, the figure, the table

def load_points(args, model):
    """(the frontier JSON's content, every point known for this model and --num)."""
    from tinylazy.io import _WeightsHasher
    h = _WeightsHasher()
    for name in sorted(model.params):
        h.update(name, model.params[name])
    data = {"format": FORMAT, "weights_hash": model.weights_hash, "weights_tensors_hash": h.tensors_digest(),
            "num": args.num, "rows": []}
    if os.path.isfile(args.json):
        with open(args.json) as f:
            old = json.load(f)
        if old.get("format") != FORMAT or old.get("weights_hash") != model.weights_hash or old.get("num") != args.num:
            raise cli.UsageError(f"--json {args.json} holds points of another model or --num "
                                 f"({old.get('num')} samples); give another --json")
        data["rows"] = old["rows"]
    return data, _tables().frontier_points(data, os.path.dirname(os.path.abspath(args.json)))


def add_point(data, row, path):
    """Add ``row`` to the JSON at ``path`` (``data`` holds its header): read, add, write atomically,
    under an exclusive lock, so that several frontier runs (e.g. one per recipe) can share one file."""
    import fcntl
    lock = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)     # the folder: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = []
        if os.path.isfile(path):
            with open(path) as f:
                rows = json.load(f)["rows"]
        key = _tables().point_key
        rows = [r for r in rows if key(_as_point(r)) != key(_as_point(row))] + [row]
        with atomic.writing(path) as f:
            f.write(json.dumps(dict(data, rows=rows), indent=1).encode())
    finally:
        os.close(lock)                                                       # and with it the lock


def _as_point(row):
    return dict(row, target=_tables()._target(row))


ZOOM_MACS = (4.5, 15.0)          # the second row: where the 30% and 50% points of both N compete


def _panel(ax, points, cfg_scale, cfgs, ladder, greys, methods, colours, zoom):
    """One guidance scale's panel of ``draw``; zoom: only ZOOM_MACS, the FD axis cut at the DDIM curve."""
    marker = {10: "o", 20: "s"}
    here = [p for p in points if p["cfg"] == cfg_scale]
    drawn = list(here)
    for c in ladder:                       # the panel of the lowest scale above c (else the highest one)
        if min((x for x in cfgs if x > c), default=cfgs[0]) != cfg_scale:
            continue
        for seed in sorted({p["seed"] for p in points if p["cfg"] == c}):
            pts = sorted((p for p in points if p["cfg"] == c and p["seed"] == seed), key=lambda p: p["steps"])
            drawn += pts
            ax.plot([p["macs_vs_ddim"] for p in pts], [p["fd"] for p in pts], "-" if seed == 0 else "--",
                    color=greys[c], marker="x", ms=6, lw=0.9, label=f"DDIM N at guidance {c:g} (seed {seed})")
    for seed in sorted({p["seed"] for p in here}):
        style = "-" if seed == 0 else "--"
        ddim = sorted((p for p in here if p["method"] == "DDIM" and p["seed"] == seed), key=lambda p: p["steps"])
        if ddim:
            ax.plot([p["macs_vs_ddim"] for p in ddim], [p["fd"] for p in ddim], style, color="black", marker=".",
                    lw=1.2, label=f"DDIM N (seed {seed})")
        for method in methods:
            for steps in sorted({p["steps"] for p in here if p["method"] == method}):
                pts = sorted((p for p in here if p["method"] == method and p["steps"] == steps
                              and p["seed"] == seed), key=lambda p: p["macs_vs_ddim"])
                if not pts:
                    continue
                ax.plot([p["macs_vs_ddim"] for p in pts], [p["fd"] for p in pts], style, lw=0.8,
                        color=colours[method], marker=marker.get(steps, "^"), ms=6,
                        mfc=colours[method] if seed == 0 else "white",
                        label=f"{method}, {steps} steps" if seed == min(p["seed"] for p in here) else None)
    ax.set_xlabel("MACs per sample (full forward passes)")
    ax.set_ylabel(f"FD to real digits ({points[0]['num']} samples)")
    ax.grid(alpha=0.3)
    if not zoom:
        ax.set_title(f"guidance {cfg_scale:g}: filled seed 0, open seed 1; lazy targets 30/50/70%")
        ax.legend(fontsize=7, ncol=2)
        return
    inside = [p for p in drawn if ZOOM_MACS[0] <= p["macs_vs_ddim"] <= ZOOM_MACS[1]]
    if not inside:                                            # a small grid: nothing there to zoom into
        ax.set_axis_off()
        return
    top = max(p["fd"] for p in [p for p in inside if p["method"] == "DDIM" and p["cfg"] == cfg_scale] or inside)
    ax.set_xlim(*ZOOM_MACS)
    ax.set_ylim(0.97 * min(p["fd"] for p in inside), 1.03 * top)
    ax.set_title(f"guidance {cfg_scale:g}, zoomed: {ZOOM_MACS[0]:g}-{ZOOM_MACS[1]:g} MACs, FD up to the DDIM curve's")


def draw(points, path):
    """FD against MACs, one panel per guidance scale with lazy points: the DDIM curve and every lazy
    method, seed 0 filled and seed 1 open; the lazy targets of one method, N and seed joined by a
    line.  The DDIM curves of guidance scales with no lazy points (the guidance ladder of docs/lazy.md)
    are drawn in grey in the panel of the next higher scale.  The second row zooms each panel to
    ZOOM_MACS, the FD axis cut just above the DDIM curve there, where the 30% and 50% points sit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tables = _tables()
    cfgs = sorted({p["cfg"] for p in points if p["method"] != "DDIM"} or {p["cfg"] for p in points}, reverse=True)
    ladder = sorted({p["cfg"] for p in points} - set(cfgs), reverse=True)
    greys = dict(zip(ladder, plt.get_cmap("Greys")(np.linspace(0.75, 0.4, max(len(ladder), 1)))))
    methods = sorted({p["method"] for p in points if p["method"] != "DDIM"}, key=tables._method_order)
    colours = dict(zip(methods, plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors))   # > 10 methods
    fig, axes = plt.subplots(2, len(cfgs), figsize=(6.5 * len(cfgs), 10.4), squeeze=False)
    for row, zoom in ((0, False), (1, True)):
        for ax, cfg_scale in zip(axes[row], cfgs):
            _panel(ax, points, cfg_scale, cfgs, ladder, greys, methods, colours, zoom)
    fig.tight_layout()
    import io
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as im, atomic.writing(path) as f:                # a palette PNG: a third of the bytes
        im.convert("RGB").quantize(colors=256).save(f, format="png", optimize=True)   # 64 merged the tab10 hues
    return path


# ----------------------------------------------------------------------------
# The command

def check_args(args):
    cli.weights_input(args.weights)
    cli.output_file(args.json, "--json", (".json",))
    cli.output_file(args.figure, "--figure", (".png",))
    cli.require("sklearn", "the digits metric (scikit-learn's digits)")
    if args.figure:
        cli.require("matplotlib", "--figure")
    if args.workers or args.scheduler:
        cli.require("distributed", "--workers / --scheduler")
    if not os.path.isdir(args.gates_dir) and os.path.exists(args.gates_dir):
        raise cli.UsageError(f"--gates-dir {args.gates_dir} is a file; give a folder")


def run(args):
    from tinylazy import metrics
    from tinylazy.io import load_dit
    from tinylazy.progress import Progress
    check_args(args)
    model = load_dit(args.weights)
    data, points = load_points(args, model)
    tables = _tables()
    done = {tables.point_key(p) for p in points}
    todo = [] if args.report_only else [t for t in plan(args) if _key(t) not in done]
    if args.dry_run:
        for t in todo:
            print(f"cfg {t[0]} | seed {t[5]} | {t[1]} | {t[2]}")
        print(f"{len(todo)} points to run, {len(done)} known", file=sys.stderr)
        return 0
    if args.workers or args.scheduler:                          # the tasks travel by value, not as module names
        import cloudpickle
        for module in (lq, sys.modules[__name__]):
            cloudpickle.register_pickle_by_value(module)
    if args.gates_only:
        for path, source in make_gates(todo, args):
            print(f"gates: {source}", file=sys.stderr)
        return 0
    if todo:
        metrics.load_classifier()                               # trained and cached once, before any worker needs it
        args.figdir = None
        print(f"{len(todo)} points to run ({len(done)} known)", file=sys.stderr)
        t0 = time.perf_counter()
        for row in Progress(lq.run_rows(todo, args, gates_task), total=len(todo), desc="points"):
            row = dict(row, num=args.num)
            if row["source"]:
                row["training"] = _training(os.path.join(ROOT, row["source"]), model)
            add_point(data, row, args.json)
            print(f"cfg {row['cfg']} | seed {row['seed']} | {row['group']} | {row['method']}: lazy "
                  f"{row['lazy_ratio']:.1%} MACs {row['macs_vs_ddim']:.2f} FD {row['fd']:.3f} acc "
                  f"{row['accuracy']:.1%} [{row['seconds']} s]", file=sys.stderr, flush=True)
        print(f"ran {len(todo)} points in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        data, points = load_points(args, model)
    if not points:
        raise cli.RunError("no points to report yet: run the grid first")
    if args.figure:
        print(f"wrote {draw(points, args.figure)}", file=sys.stderr)
    print("\n".join(tables.frontier_table(points)))


def make_gates(todo, args):
    """Yield (path, source) of each distinct set of gates that ``todo`` needs, made where it is missing."""
    from tinylazy.progress import Progress
    specs = list(dict.fromkeys(lazy[1] for _, _, _, _, lazy, _ in todo if lazy and lazy[0] == "gates"))
    if not (args.workers or args.scheduler):
        yield from Progress((gates_task(*spec) for spec in specs), total=len(specs), desc="gates")
        return
    from tinylazy.sample_many import as_results, cluster_client
    with cluster_client(args.workers, args.scheduler) as client:
        futures = [client.submit(gates_task, *spec, pure=False) for spec in specs]
        what = {f: f"gates {spec[3]} {spec[1]} steps @{spec[2]:.0%}" for f, spec in zip(futures, specs)}
        yield from Progress(as_results(client, futures, what), total=len(specs), desc="gates")


def _training(path, model):
    """What a row keeps of its gates' training: the recipe, the target, the rho it ended at, the
    calibration and the training time (where the training recorded it)."""
    import tinylazy as tl
    facts = tl.load_gates(path, model).training
    keep = ("recipe", "target_ratio", "iterations", "final_rho_attn", "calibration_ratio", "measured_ratio")
    out = {k: facts[k] for k in keep if k in facts}
    timing = path[: -len(".safetensors")] + ".json"
    if os.path.isfile(timing):
        with open(timing) as f:
            out.update(json.load(f))
    return out


def resume_hint(args):
    return f"the finished points are in {args.json}; run the same command again to go on"


def main(argv=None):
    return cli.run_module(sys.modules[__name__], argv, "python benchmarks/frontier.py")


if __name__ == "__main__":
    sys.exit(main())
