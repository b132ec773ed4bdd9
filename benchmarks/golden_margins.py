"""How far the golden-trace defaults sit from what they must pass and what they must catch.

    python benchmarks/golden_margins.py [--weights W] [--steps 4]

Prints, for the bundled model (docs/golden.md, "How the defaults were chosen"):
1. float32 vs float64, full and lazy runs: the worst error (max|a - b| / max|ref|) per
   tensor kind, over all steps and layers; eps also divided by its conditioning factor.
2. One layer's weight and bias times (1 + 1e-3), for every linear layer of the model:
   the error of the first tensor that layer makes, which the default rtol must exceed,
   and whether compare names that tensor first.  With --signs, times (1 + 1e-3 s),
   s = +-1 per element instead: the same relative size, but the errors partly cancel
   in each output, so the outputs move by less (a harder case, for information).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tinylazy as tl                                                        # noqa: E402
from tinylazy import golden                                                  # noqa: E402
from tinylazy.lazy import gates_file                                         # noqa: E402
from tinylazy.trace import kind_of                                           # noqa: E402

FIRST = {"attn.qkv": "attn/q", "attn.proj": "attn/out", "mlp.fc1": "mlp/hidden", "mlp.fc2": "mlp/out",
         "adaLN_modulation.1": "mod/"}


def worst_by_kind(result, field):
    """The worst error per kind of tensor; eps divided by its conditioning factor."""
    worst = {}
    for r in result.results:
        if r.reason in ("", "values") and not r.name.endswith("/compute"):
            k = kind_of(r.name)
            worst[k] = max(worst.get(k, 0.0), getattr(r, field) * result.tol.rtol / r.tol.rtol)
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=golden.BUNDLED)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--signs", action="store_true", help="perturb by 1e-3 with a random sign per element")
    args = p.parse_args()
    load = lambda dtype: tl.load_dit(args.weights, dtype=dtype)
    kw = dict(cfg_scale=4.0, seed=0, batch=2)
    print(f"float32 vs float64 ({os.path.basename(args.weights)}, batch 2, cfg 4, seed 0): the worst errors "
          f"(rms err / rms|REF|, max err / max|REF|) and the kinds of tensor they are in")
    runs = [("full", args.steps, None)]
    gpath = gates_file(args.weights, golden.LAZY_GOLDEN_STEPS)
    if os.path.exists(gpath):
        runs.append(("lazy", golden.LAZY_GOLDEN_STEPS, gpath))
    refs = {}
    for mode, steps, gpath in runs:
        traces = {}
        for dtype in ("float32", "float64"):
            m = load(dtype)
            gates = tl.load_gates(gpath, m) if gpath else None
            traces[dtype] = golden.trace_sampling(m, steps=steps, gates=gates, **kw)
        refs[mode] = traces["float32"]
        result = golden.compare(traces["float32"], traces["float64"])
        print(f"  {mode:4s} {steps:2d} steps: {'PASS' if result.passed else 'FAIL'}")
        for field, label in (("rel", "rms"), ("max_rel", "max")):
            top = sorted(worst_by_kind(result, field).items(), key=lambda kv: -kv[1])[:5]
            print(f"       {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in top))
        if result.decisions or gpath:
            scores = [abs(float(s) - 0.5) for n, s in ((n, traces["float32"].arrays[n]) for n in traces["float32"].names
                                                       if n.endswith("/score")) for s in np.ravel(s)]
            scored = [s for s in scores if s > 0]                            # 0: an untrained gate, exactly 0.5
            print(f"       gate decisions flipped: {len(result.decisions)}; {len(scores) - len(scored)} of "
                  f"{len(scores)} scores exactly 0.5 (untrained gates), smallest other |score - 0.5| "
                  f"{min(scored) if scored else float('nan'):.3e}")
    ref = refs["full"]
    cfg = ref.meta["model"]["config"]
    layers = [f"blocks.{l}.{name}" for l in range(cfg["depth"]) for name in FIRST] + [
        "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.adaLN_modulation.1", "final_layer.linear"]
    how = "(1 + 1e-3 s), s = +-1" if args.signs else "(1 + 1e-3)"
    print(f"\none layer x {how}: the first divergence (rtol {golden.DEFAULT_RTOL:g}, "
          f"max-rtol {golden.DEFAULT_MAX_RTOL:g})")
    lowest, wrong = np.inf, []
    rng = np.random.default_rng(0)
    for layer in layers:
        m = load("float64")
        m.weights_hash = ref.meta["model"]["weights_hash"]
        for suffix in (".weight", ".bias"):
            s = rng.choice([-1.0, 1.0], size=m.params[layer + suffix].shape) if args.signs else 1.0
            m.params[layer + suffix] *= 1 + 1e-3 * s
        result = golden.compare(ref, golden.trace_sampling(m, steps=args.steps, **kw))
        first = result.first
        lowest = min(lowest, first.rel if first else 0.0)
        where = layer.split(".")
        expect = f"block.{int(where[1]):02d}/" if where[0] == "blocks" else ("final/" if where[0] == "final_layer"
                                                                            else "cond/t_emb")
        ok = first is not None and expect in first.name and first.name.startswith("step.00/")
        if not ok:
            wrong.append(layer)
        print(f"  {layer:32s} {first.name if first else '-':32s} rms err {first.rel if first else 0:.2e}"
              f"{'' if ok else '   <- not in this layer'}")
    print(f"\nsmallest rms error of a first divergence {lowest:.2e} (rtol {golden.DEFAULT_RTOL:g}); "
          f"{len(layers) - len(wrong)} of {len(layers)} layers found where perturbed")


if __name__ == "__main__":
    main()
