"""The LazyDiT quality tables of README.md and docs/lazy.md, regenerated from the JSON in docs/data.

    python docs/tables.py            # print every table
    python docs/tables.py --check    # exit 1 if a table in README.md or docs/lazy.md differs from its JSON

docs/data/lazy_quality-*.json are what ``benchmarks/lazy_quality.py --json`` wrote (one
row per method: lazy ratios, MACs, FD, accuracy, the gates file used); docs/data/analysis-*.json
what ``tinylazy analyze`` wrote (docs/lazy.md's tables of the paper's analysis).  The full tables
are formatted as ``lazy_quality.py --report-only`` prints them; the README's short table
takes the N = 5 and 10 pairs of the current model.  docs/data/frontier.json is what
``benchmarks/frontier.py`` wrote; its table (docs/lazy.md) and the README's short one also take
the rows of the other JSON files here that are of the same model and sample count (``frontier_points``).
tests/test_docs.py runs the check, so a number in those tables can only change together
with the JSON it comes from.
"""
import glob
import json
import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
CURRENT = "lazy_quality-397f10-seed0.json"       # the current bundled model (weights 397f10f1478e)
FIRST = "lazy_quality-seed0.json"                # the first bundled model (weights 56942b2025df)
GROUPS = ("DDIM 5 vs Lazy 10 @50%", "DDIM 10 vs Lazy 20 @50%", "DDIM 25 vs Lazy 50 @50%",
          "DDIM 14 vs Lazy 20 @30%", "DDIM 7 vs Lazy 10 @30%")
METHODS = ("DDIM", "LazyDiT official", "LazyDiT all-steps", "LazyDiT all-steps x-loss", "rule (spread steps)",
           "random")


def load(name):
    with open(os.path.join(DOCS, "data", name)) as f:
        return json.load(f)


def full_table(data):
    """Every row, in lazy_quality.py's order: guidance 1.5 first, then by comparison and method."""
    lines = ["| cfg | comparison | method | steps | lazy (attn / MLP) | MACs | FD | FD/floor | accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: (-r["cfg"], GROUPS.index(r["group"]), METHODS.index(r["method"]))):
        lazy = "-" if r["method"] == "DDIM" else f"{r['lazy_ratio']:.0%} ({r['attn']:.0%} / {r['mlp']:.0%})"
        lines.append(f"| {r['cfg']} | {r['group']} | {r['method']} | {r['steps']} | {lazy} | {r['macs_vs_ddim']:.1f} | "
                     f"{r['fd']:.3f} | {r['fd_ratio']:.2f} | {r['accuracy']:.1%} |")
    return lines


def short_table(data, pairs=((5, 10), (10, 20))):
    """FD (accuracy) of DDIM N and of Lazy 2N with the official gates / the alternate-step rule,
    one line per guidance scale, and the MACs of each column."""
    rows = {(r["cfg"], r["group"], r["method"]): r for r in data["rows"]}
    cfgs = sorted({r["cfg"] for r in data["rows"]}, reverse=True)
    head, macs = ["guidance"], ["MACs (full steps)"]
    for n, lazy in pairs:
        group = f"DDIM {n} vs Lazy {lazy} @50%"
        ddim, off, rule = (rows[(cfgs[0], group, m)] for m in ("DDIM", "LazyDiT official", "rule (spread steps)"))
        head += [f"DDIM {n}", f"Lazy {lazy} official / rule"]
        macs += [f"{ddim['macs_vs_ddim']:.1f}", f"{off['macs_vs_ddim']:.1f} / {rule['macs_vs_ddim']:.1f}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head), "| " + " | ".join(macs) + " |"]
    for cfg in cfgs:
        cells = [f"{cfg:g}"]
        for n, lazy in pairs:
            group = f"DDIM {n} vs Lazy {lazy} @50%"
            ddim, off, rule = (rows[(cfg, group, m)] for m in ("DDIM", "LazyDiT official", "rule (spread steps)"))
            acc = f"{off['accuracy']:.1%}" if off["accuracy"] == rule["accuracy"] else \
                f"{off['accuracy']:.1%} / {rule['accuracy']:.1%}"
            cells += [f"{ddim['fd']:.2f} ({ddim['accuracy']:.1%})", f"{off['fd']:.2f} / {rule['fd']:.2f} ({acc})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------
# The paper's analysis (tinylazy analyze: docs/data/analysis-*.json)

ANALYSIS = (("DDIM 20, guidance 1.5", "analysis-ddim20-cfg1.5.json"),
            ("DDIM 20, guidance 1", "analysis-ddim20-cfg1.json"),
            ("DDIM 10, guidance 1.5", "analysis-ddim10-cfg1.5.json"),
            ("DDIM 10, guidance 1", "analysis-ddim10-cfg1.json"),
            ("random DiT-XL/2, DDIM 3, guidance 1.5, 2 samples", "analysis-xl-random-ddim3.json"))
KINDS = ("attn", "mlp")


def analysis_similarity_table():
    """Theorem 2: min / 5th percentile / median of f(Y_k-1, Y_k) per module kind, and the lowest cell."""
    lines = ["| run | attention min / p5 / median | MLP min / p5 / median | lowest mean cell (step, layer) attn / MLP |",
             "|---|---|---|---|"]
    for name, file in ANALYSIS:
        s = load(file)["summary"]
        cells = [f"{s[k]['min']:.3f} / {s[k]['p5']:.3f} / {s[k]['median']:.4f}" for k in KINDS]
        low = " / ".join(f"{s[k]['lowest_cell']['mean']:.3f} ({s[k]['lowest_cell']['step']}, "
                         f"{s[k]['lowest_cell']['layer']})" for k in KINDS)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {low} |")
    return lines


def analysis_fit_table():
    """Dist <= C ||dZ|| and Theorem 3: the fitted C over the layers, and the gates' correlation with f."""
    lines = ["| run | attention C_max / C_0.95 (range over layers) | MLP C_max / C_0.95 | gates: Spearman(-logit, f) "
             "all / attention / MLP | within a (step, layer) cell |", "|---|---|---|---|---|"]
    for name, file in ANALYSIS:
        d = load(file)
        fit = [f"{min(d['lipschitz'][k]['C_max']):.2f}-{max(d['lipschitz'][k]['C_max']):.2f} / "
               f"{min(d['lipschitz'][k]['C_q']):.2f}-{max(d['lipschitz'][k]['C_q']):.2f}" for k in KINDS]
        g = d["gates"]
        gates = ["no gates", "-"] if g is None else [
            f"{g['overall']['spearman']:.2f} / {g['attn']['spearman']:.2f} / {g['mlp']['spearman']:.2f}",
            f"{g['overall']['spearman_within']:.2f}"]
        lines.append(f"| {name} | {fit[0]} | {fit[1]} | {gates[0]} | {gates[1]} |")
    return lines


def analysis_layer_table(file="analysis-ddim20-cfg1.5.json"):
    """The fitted C per layer of one run."""
    fit = load(file)["lipschitz"]
    depth = len(fit["attn"]["C_max"])
    lines = ["| layer | " + " | ".join(map(str, range(depth))) + " |", "|---" * (depth + 1) + "|"]
    for k, label in zip(KINDS, ("attention", "MLP")):
        lines.append(f"| {label} C_max / C_0.95 | " + " | ".join(
            f"{fit[k]['C_max'][l]:.2f} / {fit[k]['C_q'][l]:.2f}" for l in range(depth)) + " |")
    return lines


ORACLE = "oracle-seed0.json"                     # lazy_quality.py --oracle-steps: the similarity oracle's rows


def oracle_table(data):
    """The oracle rows (and any rule rows beside them) at each N and lazy target."""
    lines = ["| guidance | steps | lazy target | method | lazy (attn / MLP) | MACs | FD | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    order = ("rule (spread steps)", "oracle (per sample)", "oracle (shared)", "oracle (consecutive f)")
    for r in sorted(data["rows"], key=lambda r: (-r["cfg"], r["steps"], r["group"], order.index(r["method"]))):
        lines.append(f"| {r['cfg']:g} | {r['steps']} | {r['group'].rsplit('@', 1)[1]} | {r['method']} | "
                     f"{r['lazy_ratio']:.1%} ({r['attn']:.0%} / {r['mlp']:.0%}) | {r['macs_vs_ddim']:.2f} | "
                     f"{r['fd']:.3f} | {r['accuracy']:.1%} |")
    return lines


# ----------------------------------------------------------------------------
# The frontier (benchmarks/frontier.py)

FRONTIER = "frontier.json"
RULE = "rule (spread steps)"
FRONTIER_METHODS = ("DDIM", RULE, "random", "LazyDiT official")      # then the recipes, then any oracle rows


def _target(row):
    """The lazy target of a row from its group ("Lazy 20 @50%", "DDIM 10 vs Lazy 20 @50%"); None for DDIM."""
    m = re.search(r"@(\d+)%$", row["group"])
    return None if row["method"] == "DDIM" or m is None else int(m.group(1)) / 100


def frontier_points(frontier, data_dir=None):
    """The frontier's points: the rows of ``frontier`` (the loaded docs/data/frontier.json) and the
    rows of every other JSON in ``data_dir`` written by lazy_quality.py (or in its row format, e.g.
    the oracle rows of tinylazy.analysis) for the same model (either weights hash the frontier
    records) and the same sample count.  Each point is its row plus seed, num, target (lazy ratio
    aimed at; None for DDIM) and origin (the file); where two files hold the same point, frontier.json's
    row and then the first file's in name order is kept.  A rule row of another file above 50% is
    left out: it may come from before the rule spread its computed steps there."""
    data_dir = data_dir or os.path.join(DOCS, "data")
    hashes = {frontier["weights_hash"], frontier.get("weights_tensors_hash")} - {None}
    points, seen = [], set()
    sources = [(FRONTIER, frontier)]
    for path in sorted(glob.glob(os.path.join(data_dir, "*.json"))):
        name = os.path.basename(path)
        if name == FRONTIER:
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list) and data.get("weights_hash") in hashes \
                and data.get("num") == frontier["num"]:
            sources.append((name, data))
    for name, data in sources:
        for row in data["rows"]:
            if not {"cfg", "group", "method", "steps", "fd", "accuracy", "macs_vs_ddim"} <= set(row):
                continue
            p = dict(row, seed=row.get("seed", data.get("seed", 0)), num=data["num"], target=_target(row), origin=name)
            if name != FRONTIER and p["method"] == RULE and (p["target"] or 0) > 0.5:
                continue                  # lazy_quality.py spread the rule's steps otherwise above 50% before c74f291
            key = point_key(p)
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points


def point_key(p):
    return (p["cfg"], p["seed"], p["method"], p["steps"], p["target"])


def _method_order(method):
    if method in FRONTIER_METHODS:
        return (FRONTIER_METHODS.index(method), method)
    return (len(FRONTIER_METHODS) + ("oracle" in method), method)


def frontier_table(points):
    """One line per (guidance, steps, lazy target, method), the seeds side by side: MACs (in full
    steps), FD, accuracy, and FD against the evenly spread rule's of the same seed (in %)."""
    seeds = sorted({p["seed"] for p in points})
    at = {point_key(p): p for p in points}
    head = ["guidance", "steps", "lazy target", "method"]
    for s in seeds:
        head += [f"seed {s}: lazy", "MACs", "FD", "acc.", "FD vs rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cases = sorted({(p["cfg"], p["steps"], p["target"], p["method"]) for p in points},
                   key=lambda c: (-c[0], c[2] is not None, c[1], c[2] or 0, _method_order(c[3])))
    for cfg, steps, target, method in cases:
        cells = [f"{cfg:g}", str(steps), "-" if target is None else f"{target:.0%}", method]
        for s in seeds:
            p = at.get((cfg, s, method, steps, target))
            if p is None:
                cells += ["not run", "", "", "", ""]
                continue
            rule = at.get((cfg, s, RULE, steps, target))
            vs = "" if rule is None or method == RULE or target is None else f"{100 * (p['fd'] / rule['fd'] - 1):+.1f}%"
            lazy = "-" if target is None else f"{p['lazy_ratio']:.0%}"
            cells += [lazy, f"{p['macs_vs_ddim']:.2f}", f"{p['fd']:.3f}", f"{p['accuracy']:.1%}", vs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def frontier_summary(points, targets=(0.3, 0.5, 0.7)):
    """The README's short frontier table: one line per (N, lazy method, oracles left out), one
    column per lazy target, each cell "MACs: FD at the highest guidance (seed 0 / 1); FD at the
    lowest (seed 0 / 1)", MACs of seed 0; "-" where the method has no point there."""
    at = {point_key(p): p for p in points}
    cfgs = sorted({p["cfg"] for p in points if p["target"] is not None}, reverse=True)
    seeds = sorted({p["seed"] for p in points})
    methods = sorted({p["method"] for p in points if p["target"] is not None and "oracle" not in p["method"]},
                     key=_method_order)
    head = ["N", "method"] + [f"lazy {t:.0%}" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for steps in sorted({p["steps"] for p in points if p["target"] is not None}):
        for method in methods:
            cells = [str(steps), method]
            for t in targets:
                got = [[at.get((c, s, method, steps, t)) for s in seeds] for c in cfgs[:1] + cfgs[-1:]]
                first = next((p for ps in got for p in ps if p is not None), None)
                if first is None:
                    cells.append("-")
                    continue
                fd = ["/".join("-" if p is None else f"{p['fd']:.2f}" for p in ps) for ps in got]
                cells.append(f"{first['macs_vs_ddim']:.2f}: {fd[0]}; {fd[1]}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# How close lazy sampling stays to the full sampler (benchmarks/fidelity.py)

FIDELITY = "fidelity.json"


def fidelity_table(data):
    """One line per (guidance, N, target, method): MACs, the relative RMS distance of the final images
    to plain DDIM N's at the same guidance and, with guidance, how much of it runs toward guidance 1."""
    def order(method):
        return (0 if method.startswith("DDIM guidance") else 1 if method.startswith("DDIM") else
                2 if method == RULE else 3, method)
    lines = ["| guidance | N | target | method | MACs | rel. RMS to DDIM N (mean / median / p90) | toward guidance 1 "
             "(mean / median) | cos^2 | nearest cfg |", "|" + "---|" * 9]
    for r in sorted(data["rows"], key=lambda r: (-r["cfg"], r["steps"], r["target"], order(r["method"]))):
        guided = "toward_1_mean" in r
        cells = [f"{r['cfg']:g}", str(r["steps"]), "-" if r["method"].startswith("DDIM guidance") else
                 f"{r['target']:.0%}", r["method"], f"{r['macs_vs_ddim']:.2f}",
                 f"{r['rel_rms_mean']:.4f} / {r['rel_rms_median']:.4f} / {r['rel_rms_p90']:.4f}",
                 f"{r['toward_1_mean']:+.3f} / {r['toward_1_median']:+.3f}" if guided else "-",
                 f"{r['cos2_mean']:.2f}" if guided else "-", f"{r['nearest_cfg_mean']:.2f}" if guided else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tables():
    """[(file the table appears in, its lines)]"""
    current, first = load(CURRENT), load(FIRST)
    out = [("README.md", short_table(current)), ("docs/lazy.md", full_table(current)),
           ("docs/lazy.md", full_table(first)), ("docs/lazy.md", analysis_similarity_table()),
           ("docs/lazy.md", analysis_layer_table()), ("docs/lazy.md", analysis_fit_table())]
    if os.path.isfile(os.path.join(DOCS, "data", ORACLE)):
        out.append(("docs/lazy.md", oracle_table(load(ORACLE))))
    if os.path.isfile(os.path.join(DOCS, "data", FRONTIER)):
        points = frontier_points(load(FRONTIER))
        out += [("docs/lazy.md", frontier_table(points)), ("README.md", frontier_summary(points))]
    if os.path.isfile(os.path.join(DOCS, "data", FIDELITY)):
        out.append(("docs/lazy.md", fidelity_table(load(FIDELITY))))
    return out


def check():
    """Problems: each table that does not appear, line for line, in its file."""
    problems = []
    for path, lines in tables():
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        if "\n".join(lines) + "\n" not in text:
            missing = [line for line in lines if line not in text.splitlines()]
            problems.append(f"{path}: the table starting {lines[0]!r} differs from its JSON; "
                            f"first line not found: {missing[0] if missing else '(the lines are out of order)'}")
    return problems


def main():
    if sys.argv[1:] == ["--check"]:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        sys.exit(1 if problems else 0)
    if sys.argv[1:]:
        print("usage: python docs/tables.py [--check]", file=sys.stderr)
        sys.exit(2)
    for path, lines in tables():
        print(f"{path}:\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
