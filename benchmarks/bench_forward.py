"""DiT forward: tinylazy (NumPy float32) vs PyTorch CPU eager, same threads, interleaved.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_forward.py --runs 3
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_forward.py --breakdown --xl-depth 8

Each repetition times, one after the other, the float32 GEMM peak (2048^3, split over
tinylazy's pool as the forward's GEMMs are), a tinylazy forward and a PyTorch forward, so that
background load hits all three alike.  Printed per case: medians and quartiles [q1 q3] of the
repetitions, the ratio of the medians (PyTorch time / tinylazy time: > 1 means tinylazy is
faster) with the quartiles of the per-repetition ratios, and tinylazy's GFLOP/s against the
peak measured in the same run.  ``--runs N`` repeats the whole measurement N times
(``--pause`` seconds apart) and ends with a summary line per case.

``--vs CHECKOUT``: also the tinylazy of another checkout, loaded beside this one and timed in
the same interleaved repetitions (an A/B of two versions; prints whether the outputs agree bit
for bit).

``--breakdown``: where the time of one tinylazy forward goes, per op (summed over the blocks)
and per block, against the GEMM-only time of the same shapes: just the matmuls of one
forward (every block's own weights, the same pool threads and the same splitting, no bias,
no elementwise work; attention's q k^T and p v per (sample, head) in the forward's chunks).
"""
import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

import tinylazy as tl
from tinylazy import ops, parallel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

TARGETS = {"DiT-S/2": 0.70, "DiT-XL/2": 0.80}      # fraction of the GEMM peak (issue #20)
TARGET_RATIO = 1.2                                  # vs PyTorch eager


def dit_flops(cfg, B):
    """Multiply-adds x 2 of one forward (GEMMs and attention; elementwise work not counted)."""
    T, D, F = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    per_block = 2 * B * T * (3 * D * D + D * D + 2 * D * F) + 2 * 2 * B * T * T * D + 2 * B * D * 6 * D
    embed = 2 * B * T * D * cfg.in_channels * cfg.patch_size ** 2 + 2 * B * (256 * D + D * D)
    final = 2 * B * T * D * cfg.patch_size ** 2 * cfg.out_channels + 2 * B * D * 2 * D
    return cfg.depth * per_block + embed + final


def quartiles(xs):
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return q1, q2, q3


def fmt(xs, scale=1.0, digits=3):
    q1, q2, q3 = (scale * v for v in quartiles(xs))
    return f"{q2:.{digits}f} [{q1:.{digits}f} {q3:.{digits}f}]"


class Peak:
    """The float32 GEMM peak: 2048^3 split by rows over the pool, serial BLAS per thread."""

    def __init__(self, n=2048):
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((n, n), dtype=np.float32)
        self.out = np.empty_like(self.a)
        self.flops = 2 * n ** 3
        self()

    def __call__(self):
        parallel.rowwise(lambda o, a: np.matmul(a, self.a, out=o), self.out, self.a)

    def gflops(self, reps=3):
        """Best of ``reps`` back-to-back GEMMs (one sample of the peak)."""
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            self()
            best = min(best, time.perf_counter() - t0)
        return self.flops / best / 1e9


def interleaved(fns, reps):
    """{name: [seconds per repetition]} for fns {name: f}, run in turn ``reps`` times after one warm-up each."""
    for f in fns.values():
        f()
    times = defaultdict(list)
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------
# cases

def load_other(path):
    """The tinylazy package of another checkout (path/tinylazy), imported as ``tinylazy_vs``, so that
    the two run interleaved in one process (--vs)."""
    import importlib.util
    init = os.path.join(path, "tinylazy", "__init__.py")
    spec = importlib.util.spec_from_file_location("tinylazy_vs", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tinylazy_vs"] = module
    spec.loader.exec_module(module)
    return module


def make_case(name, cfg, B, torch_too=True, other=None):
    params = tl.init_params(cfg, seed=0, scheme="random")
    model = tl.DiT(cfg, params, dtype="float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t, y = rng.integers(0, 1000, B), rng.integers(0, cfg.num_classes, B)
    case = {"name": name, "cfg": cfg, "B": B, "model": model, "ours": lambda: model(x, t, y)}
    if other is not None:
        other_model = other.DiT(cfg, params, dtype="float32")
        case["vs"] = lambda: other_model(x, t, y)
        a, b = model(x, t, y), other_model(x, t, y)
        case["vs_diff"] = float(np.abs(a - b).max() / np.abs(b).max())
    if torch_too:
        import torch
        from torch_dit import TorchDiT
        tm = TorchDiT.from_params(cfg, params, torch.float32).eval()
        xt, tt, yt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)

        def theirs():
            with torch.inference_mode():
                tm(xt, tt, yt)
        case["theirs"] = theirs
    del params
    return case


def run_cases(cases, peak, reps):
    """One run: every case's repetitions interleaved with peak samples -> {case name: result}."""
    results = {}
    for case in cases:
        fns = {"peak": lambda: peak_samples.append(peak.gflops()), "ours": case["ours"]}
        for k in ("theirs", "vs"):
            if k in case:
                fns[k] = case[k]
        peak_samples = []
        times = interleaved(fns, reps)
        peak_samples = peak_samples[1:]                    # the warm-up's
        flops = dit_flops(case["cfg"], case["B"])
        pk = statistics.median(peak_samples)
        ours = statistics.median(times["ours"])
        r = {"ours": times["ours"], "peak": peak_samples, "frac": flops / ours / 1e9 / pk,
             "gflops": flops / ours / 1e9}
        if "theirs" in case:
            r["theirs"] = times["theirs"]
            r["ratios"] = [b / a for a, b in zip(times["ours"], times["theirs"])]
            r["ratio"] = statistics.median(times["theirs"]) / ours
        if "vs" in case:
            r["vs"] = times["vs"]
            r["vs_ratios"] = [b / a for a, b in zip(times["ours"], times["vs"])]
            r["vs_diff"] = case["vs_diff"]
        results[case["name"]] = r
    return results


def print_run(results, cases):
    print(f"{'model':<24}{'tinylazy s [q1 q3]':>24}{'PyTorch s [q1 q3]':>24}{'ratio [q1 q3]':>20}"
          f"{'GFLOP/s':>9}{'peak GFLOP/s':>20}{'% peak':>8}")
    for case in cases:
        r = results[case["name"]]
        theirs = fmt(r["theirs"]) if "theirs" in r else "-"
        ratio = f"{r['ratio']:.2f}x [{quartiles(r['ratios'])[0]:.2f} {quartiles(r['ratios'])[2]:.2f}]" \
            if "theirs" in r else "-"
        print(f"{case['name']:<24}{fmt(r['ours']):>24}{theirs:>24}{ratio:>20}{r['gflops']:>9.0f}"
              f"{fmt(r['peak'], digits=0):>20}{100 * r['frac']:>7.0f}%")
    for case in cases:
        r = results[case["name"]]
        if "vs" in r:
            q1, q2, q3 = quartiles(r["vs_ratios"])
            same = "bit-identical outputs" if r["vs_diff"] == 0 else f"outputs differ by {r['vs_diff']:.1e} (max, relative)"
            print(f"  --vs {case['name']}: {fmt(r['vs'])} s there; this checkout {statistics.median(r['vs']) / statistics.median(r['ours']):.3f}x "
                  f"faster (per-repetition ratios {q1:.3f} {q2:.3f} {q3:.3f}); {same}")


# ----------------------------------------------------------------------------
# --breakdown

class OpTimer:
    """Exclusive wall time per label: a wrapped call's time goes to its label, minus the
    time of the wrapped calls inside it (which go to theirs)."""

    def __init__(self):
        self.totals = defaultdict(float)
        self.stack = []

    def wrap(self, owner, attr, label):
        """Replace owner.attr by a timed version; label: a string, or f(args) -> string or None
        (None: not timed on its own; the time stays with the caller's label)."""
        f = getattr(owner, attr)

        def timed(*args, **kwargs):
            lab = label(*args) if callable(label) else label
            if lab is None:
                return f(*args, **kwargs)
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                inner = self.stack.pop()
                self.totals[lab] += dt - inner
                if self.stack:
                    self.stack[-1] += dt
        return timed


BLOCK_OPS = ["adaLN", "LN+modulate", "qkv", "attention (sdpa)", "proj", "attn other", "MLP (fc1+GELU+fc2)",
             "gated residual", "block other"]
OTHER_OPS = ["embed", "condition", "final layer"]


@contextlib.contextmanager
def instrumented(model, timer):
    """Time the pieces of ``model``'s forward by op (instance attributes shadow the methods;
    the ops module's functions are patched for the duration)."""
    D = model.config.hidden_size
    inside_attn = []

    def attn_label(*a):
        return "attn other"

    def linear_label(x, w, *rest):
        if not inside_attn:
            return None
        return "qkv" if w.shape[0] == 3 * D else "proj"

    patches = [(model, "embed_tokens", "embed"), (model, "condition", "condition"),
               (model, "block", "block other"), (model, "block_modulation", "adaLN"),
               (model, "branch_input", "LN+modulate"), (model, "mlp", "MLP (fc1+GELU+fc2)"),
               (model, "gated_residual", "gated residual"), (model, "final_layer", "final layer"),
               (ops, "linear_forward", linear_label), (ops, "sdpa_forward", "attention (sdpa)")]
    saved_ops = {attr: getattr(ops, attr) for owner, attr, _ in patches if owner is ops}
    for owner, attr, label in patches:
        setattr(owner, attr, timer.wrap(owner, attr, label))
    attn_timed = timer.wrap(model, "attn", attn_label)

    def attn(*a, **k):
        inside_attn.append(1)
        try:
            return attn_timed(*a, **k)
        finally:
            inside_attn.pop()
    model.attn = attn
    try:
        yield
    finally:
        for owner, attr, _ in patches:
            if owner is ops:
                setattr(ops, attr, saved_ops[attr])
            else:
                delattr(owner, attr)
        del model.attn


def gemm_only(model, B):
    """{op: f} running just the matmuls of one forward of ``model`` at batch B, grouped as the
    breakdown's ops, with the forward's threading (ops._pooled_matmul without bias, which splits
    each GEMM as the forward does; attention's q k^T and p v per (sample, head) in sdpa's pool
    blocks and chunks)."""
    cfg, P = model.config, model.params
    T, D, H, F = cfg.num_tokens, cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((B * T, max(D, F)), dtype=np.float32)
    x_d, x_f = np.ascontiguousarray(rows[:, :D]), np.ascontiguousarray(rows[:, :F])
    c = rng.standard_normal((B, D), dtype=np.float32)
    freq = rng.standard_normal((B, 256), dtype=np.float32)
    q, k, v = (rng.standard_normal((B, H, T, D // H), dtype=np.float32) for _ in range(3))
    patches = rng.standard_normal((B * T, cfg.in_channels * cfg.patch_size ** 2), dtype=np.float32)
    blk = model.BLOCK

    def mm(a, w):
        ops._pooled_matmul(a, w.T)

    def attention_gemms():
        def kernel(qq, kk, vv):
            for ch, (qs, s) in ops._chunks(qq, 1, 1):
                np.matmul(qq[ch], kk[ch].swapaxes(-1, -2), out=s)
                np.matmul(s, vv[ch], out=qs)
        split = ops._pool_blocks(q)
        parallel.rowwise(kernel, split(q), split(k), split(v))

    def each_block(fn):
        return lambda: [fn(l) for l in range(cfg.depth)]

    return {
        "embed": lambda: mm(patches, P[model.X_EMBEDDER + ".weight"].reshape(D, -1)),
        "condition": lambda: (mm(freq, P["t_embedder.mlp.0.weight"]), mm(c, P["t_embedder.mlp.2.weight"])),
        "adaLN": each_block(lambda l: mm(c, P[f"{blk}.{l}.adaLN_modulation.1.weight"])),
        "qkv": each_block(lambda l: mm(x_d, P[f"{blk}.{l}.attn.qkv.weight"])),
        "attention (sdpa)": each_block(lambda l: attention_gemms()),
        "proj": each_block(lambda l: mm(x_d, P[f"{blk}.{l}.attn.proj.weight"])),
        "MLP (fc1+GELU+fc2)": each_block(lambda l: (mm(x_d, P[f"{blk}.{l}.mlp.fc1.weight"]),
                                                    mm(x_f, P[f"{blk}.{l}.mlp.fc2.weight"]))),
        "final layer": lambda: (mm(c, P["final_layer.adaLN_modulation.1.weight"]), mm(x_d, P["final_layer.linear.weight"])),
    }


def gemm_flops(cfg, B):
    T, D, F, p = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden, cfg.patch_size
    L = cfg.depth
    return {"embed": 2 * B * T * D * cfg.in_channels * p * p, "condition": 2 * B * 2 * D * D,
            "adaLN": L * 2 * B * D * 6 * D, "qkv": L * 2 * B * T * D * 3 * D,
            "attention (sdpa)": L * 2 * 2 * B * T * T * D, "proj": L * 2 * B * T * D * D,
            "MLP (fc1+GELU+fc2)": L * 2 * 2 * B * T * D * F,
            "final layer": 2 * B * D * 2 * D + 2 * B * T * D * p * p * cfg.out_channels}


def breakdown(case, peak, reps):
    """Per-op times of one forward (instrumented), the GEMM-only times of the same shapes and
    the plain forward, interleaved with peak samples; prints the table."""
    model, cfg, B = case["model"], case["cfg"], case["B"]
    timer = OpTimer()
    per_rep = []

    def profiled():
        timer.totals.clear()
        with instrumented(model, timer):
            case["ours"]()
        per_rep.append(dict(timer.totals))
    gemms = gemm_only(model, B)
    gemm_times = defaultdict(list)

    def gemm_forward():
        for op, f in gemms.items():
            t0 = time.perf_counter()
            f()
            gemm_times[op].append(time.perf_counter() - t0)
    peak_samples = []
    times = interleaved({"peak": lambda: peak_samples.append(peak.gflops()), "forward": case["ours"],
                         "profiled": profiled, "gemm-only": gemm_forward}, reps)
    per_rep, peak_samples = per_rep[1:], peak_samples[1:]
    gemm_times = {op: ts[1:] for op, ts in gemm_times.items()}
    pk = statistics.median(peak_samples)
    flops = gemm_flops(cfg, B)
    L = cfg.depth
    print(f"\n{case['name']}: {reps} interleaved repetitions, milliseconds per forward: median [q1 q3]")
    print(f"GEMM peak {fmt(peak_samples, digits=0)} GFLOP/s; forward {fmt(times['forward'], 1e3, 1)} ms, "
          f"instrumented {fmt(times['profiled'], 1e3, 1)} ms, GEMM-only {fmt(times['gemm-only'], 1e3, 1)} ms "
          f"(at the peak: {1e3 * sum(flops.values()) / pk / 1e9:.1f} ms)")
    print(f"{'op':<22}{'time':>22}{'GEMM-only':>22}{'GEMM GFLOP/s':>14}{'% peak':>8}{'time - GEMM':>13}"
          f"{'per block':>11}{'% fwd':>7}")
    total = statistics.median(times["profiled"])
    rows, sums = [], [0.0, 0.0]
    for op in OTHER_OPS[:2] + BLOCK_OPS + OTHER_OPS[2:]:
        ts = [r.get(op, 0.0) for r in per_rep]
        gs = gemm_times.get(op)
        t_med = statistics.median(ts)
        g_med = statistics.median(gs) if gs else 0.0
        sums[0] += t_med
        sums[1] += g_med
        gf = flops[op] / g_med / 1e9 if gs else None
        per_block = f"{1e3 * (t_med - g_med) / L:.2f}" if op in BLOCK_OPS else ""
        rows.append(op)
        print(f"{op:<22}{fmt(ts, 1e3, 1):>22}{fmt(gs, 1e3, 1) if gs else '-':>22}"
              f"{(f'{gf:.0f}' if gf else '-'):>14}{(f'{100 * gf / pk:.0f}%' if gf else '-'):>8}"
              f"{1e3 * (t_med - g_med):>13.1f}{per_block:>11}{100 * t_med / total:>6.0f}%")
    block = [sum(r.get(op, 0.0) for op in BLOCK_OPS) / L for r in per_rep]
    print(f"{'sum of ops':<22}{1e3 * sums[0]:>13.1f}{1e3 * sums[1]:>22.1f}{'':>22}{1e3 * (sums[0] - sums[1]):>13.1f}")
    print(f"per block: {fmt(block, 1e3, 2)} ms (GEMM-only "
          f"{1e3 * sum(statistics.median(gemm_times[op]) for op in BLOCK_OPS if op in gemm_times) / L:.2f} ms); "
          f"'time - GEMM' per block in the column before last")


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions per run (default 7)")
    ap.add_argument("--runs", type=int, default=1, help="whole measurements, one after the other (default 1)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between runs (default 0)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--xl-depth", type=int, default=28, help="blocks of the XL/2 geometry (default 28)")
    ap.add_argument("--cases", default="s2,xl2", help="comma-separated: s2 (DiT-S/2 b8), xl2 (DiT-XL/2 b2)")
    ap.add_argument("--breakdown", action="store_true", help="per-op times against the GEMM-only time")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch (tinylazy and the peak only)")
    ap.add_argument("--vs", metavar="CHECKOUT", help="also time the tinylazy of another checkout (e.g. a "
                    "`git worktree add /tmp/old <commit>`), interleaved in the same process: an A/B")
    args = ap.parse_args()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in wanted if c not in ("s2", "xl2")]
    if bad or not wanted or args.reps < 2 or args.runs < 1 or args.threads < 1 or args.xl_depth < 1:
        print(f"error: bad arguments (cases {bad or wanted}; reps >= 2, runs >= 1, threads >= 1, xl-depth >= 1); "
              "see --help", file=sys.stderr)
        sys.exit(2)
    if args.vs and not os.path.isfile(os.path.join(args.vs, "tinylazy", "__init__.py")):
        print(f"error: --vs {args.vs}: no tinylazy/__init__.py there; give the root of a tinylazy checkout",
              file=sys.stderr)
        sys.exit(2)
    if args.vs and args.breakdown:
        print("error: --vs times whole forwards; leave out --breakdown", file=sys.stderr)
        sys.exit(2)

    torch_too = not args.no_torch and not args.breakdown
    tl.parallel.set_num_threads(args.threads)          # tinylazy's pool ...
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        threadpool_limits(limits=args.threads, user_api="blas")     # ... and NumPy's BLAS: the same count
        blas = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    except ImportError:
        blas = "threadpoolctl not installed"
    versions = f"numpy {np.__version__}"
    if torch_too:
        import torch
        torch.set_num_threads(args.threads)
        versions += f", torch {torch.__version__}"
    print(f"threads {args.threads}; BLAS {blas}; {versions}; GEMMs split over the pool: {parallel.splits_gemms()}")
    spec = {"s2": ("DiT-S/2 b8", tl.get_config("DiT-S/2"), 8),
            "xl2": (f"DiT-XL/2 b2 ({args.xl_depth} blk)", tl.get_config("DiT-XL/2", depth=args.xl_depth), 2)}
    other = None
    if args.vs:
        other = load_other(args.vs)
        other.parallel.set_num_threads(args.threads)
        print(f"--vs: {other.__file__}")
    cases = [make_case(*spec[c], torch_too=torch_too, other=other) for c in wanted]
    peak = Peak()

    if args.breakdown:
        for case in cases:
            breakdown(case, peak, args.reps)
        return

    runs = []
    for i in range(args.runs):
        if i and args.pause:
            time.sleep(args.pause)
        print(f"\nrun {i + 1}/{args.runs} ({time.strftime('%H:%M:%S')}), {args.reps} interleaved repetitions")
        runs.append(run_cases(cases, peak, args.reps))
        print_run(runs[-1], cases)
    print("\nsummary (medians over runs of each run's median; targets: issue #20)")
    for case in cases:
        rs = [run[case["name"]] for run in runs]
        target = TARGETS[case["name"].split()[0]]
        fracs = [r["frac"] for r in rs]
        line = (f"{case['name']:<24} % of peak per run {' '.join(f'{100 * f:.0f}%' for f in fracs)}, "
                f"median {100 * statistics.median(fracs):.0f}% (target {100 * target:.0f}%: "
                f"{'met' if statistics.median(fracs) >= target else 'MISSED'})")
        if "ratio" in rs[0]:
            ratios = [r["ratio"] for r in rs]
            line += (f"; vs PyTorch per run {' '.join(f'{x:.2f}x' for x in ratios)}, median "
                     f"{statistics.median(ratios):.2f}x (target {TARGET_RATIO}x: "
                     f"{'met' if statistics.median(ratios) >= TARGET_RATIO else 'MISSED'})")
        print(line)


if __name__ == "__main__":
    main()
