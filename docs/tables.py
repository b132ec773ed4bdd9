"""The LazyDiT quality tables of README.md and docs/lazy.md, regenerated from the JSON in docs/data.

    python docs/tables.py            # print every table
    python docs/tables.py --check    # exit 1 if a table in README.md or docs/lazy.md differs from its JSON

docs/data/lazy_quality-*.json are what ``benchmarks/lazy_quality.py --json`` wrote (one
row per method: lazy ratios, MACs, FD, accuracy, the gates file used).  The full tables
are formatted as ``lazy_quality.py --report-only`` prints them; the README's short table
takes the N = 5 and 10 pairs of the current model.  tests/test_docs.py runs the check, so
a number in those tables can only change together with the JSON it comes from.
"""
import json
import os
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


def tables():
    """[(file the table appears in, its lines)]"""
    current, first = load(CURRENT), load(FIRST)
    return [("README.md", short_table(current)), ("docs/lazy.md", full_table(current)),
            ("docs/lazy.md", full_table(first))]


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
