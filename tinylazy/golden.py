"""Golden traces: record every intermediate of a sampling run, and compare two runs tensor by tensor.

    tinylazy golden dump [--weights W] [--gates G] [--dtype float32|float64]
        [--backend numpy|cupy|opencl] --steps 4 --seed 0 --batch 2 --out trace.safetensors
    tinylazy golden compare REF OTHER [--rtol R] [--max-rtol M] [--atol A]
        [--per-tensor-tolerances FILE]
    tinylazy golden goldens              # from the checkout's root: rewrite tests/golden/

(``python -m tinylazy.golden ...`` is the same command.)

``compare`` walks REF's tensors in execution order and reports the first that
OTHER does not match (name, step, layer, rms / max error and where), gate
decisions that flipped (with the score's margin from the threshold), and a
summary table; it exits 0 when everything matches, 1 when something diverged and
2 when the traces cannot be compared (unreadable, or from another model, seed or
run).  A float tensor matches when both

    rms(other - ref) <= atol + rtol * rms(ref)          (a systematic error)
    max|other - ref| <= atol + max_rtol * max|ref|      (one wrong element)

errors measured against the tensor's own scale, so elements that happen to be
near zero do not make float32 rounding look like a bug.  docs/golden.md says how
the defaults were chosen and describes the file format for other languages.
"""
import dataclasses
import fnmatch
import math
import os
import sys

import numpy as np

from . import __version__, cli, large_dit, resources
from .backend import to_numpy
from .api import ddim_sample, load_dit, load_vae
from .diffusion import create_diffusion
from .large_dit_io import save_large_dit
from .lazy import (DEFAULT_THRESHOLD, LazyGates, LazyStats, gates_file, gates_hash, load_gates, model_weights_hash,
                   save_gates)
from .resources import DEFAULT_MODEL, weights_path
from .sampling import check_cfg_scale, check_labels, check_steps, make_noise, sample_labels
from .trace import Recorder, Trace, TraceError, kind_of, load_trace, position

DEFAULT_RTOL = 3e-4
DEFAULT_MAX_RTOL = 2e-3
DEFAULT_ATOL = 1e-7


# ----------------------------------------------------------------------------
# Recording a run

def model_meta(model, weights_file=None):
    return {"weights_hash": model_weights_hash(model), "file": os.path.basename(weights_file) if weights_file else None,
            "config": dataclasses.asdict(model.config)}


def trace_sampling(model, steps=4, seed=0, batch=2, cfg_scale=4.0, labels=None, gates=None,
                   threshold=DEFAULT_THRESHOLD, decisions=None, guide_channels=3, vae=None, recorder=None,
                   progress=False, weights_file=None, gates_file=None):
    """Run DDIM (eta = 0) with a recorder attached -> a ``Trace`` of the whole run.

    model: a ``DiT`` (any backend) or an ``OpenCLDiT``.  noise and labels come from
    ``seed`` (``make_noise`` / ``sample_labels``) unless labels are given.  gates /
    threshold / decisions: a LazyDiT run (``tinylazy.ddim_sample``).  vae: decode the
    final latents into ``image``.  recorder: a ``Recorder`` to choose what is kept.
    """
    rec = Recorder() if recorder is None else recorder
    steps, cfg_scale = check_steps(steps), check_cfg_scale(cfg_scale)
    if labels is None and not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    labels = sample_labels(model, batch, seed) if labels is None else check_labels(model, labels, cfg_scale)
    noise = make_noise(model, len(labels), seed)
    lazy = gates is not None or decisions is not None
    stats = LazyStats() if lazy else None

    def record_step(i, info):
        for name, key in (("model_output", "model_output"), ("eps", "eps"), ("x0", "pred_xstart"),
                          ("x_next", "x_next")):
            rec(name, info[key])
        rec.prefix = f"step.{info['step'] + 1:02d}/"

    rec.prefix = ""
    rec("noise", noise)
    rec("labels", labels)
    rec.prefix = "step.00/"
    previous, model.recorder = model.recorder, rec
    try:
        kw = dict(gates=gates, threshold=threshold, decisions=decisions, lazy_stats=stats) if lazy else {}
        sample = ddim_sample(model, noise, labels, steps=steps, cfg_scale=cfg_scale, guide_channels=guide_channels,
                         callback=record_step, progress=progress, **kw)
    finally:
        model.recorder = previous
        rec.prefix = ""
    rec("sample", sample)
    if vae is not None:
        rec("image", vae.decode(vae.xp.asarray(to_numpy(sample)) / vae.config.scaling_factor))
    diffusion = create_diffusion(steps)
    meta = {
        "kind": "sampling",
        "tinylazy_version": __version__,
        "model": model_meta(model, weights_file),
        "dtype": np.dtype(model.dtype).name,
        "backend": model.backend,
        "device": repr(model) if model.backend == "opencl" else None,
        "seed": int(seed),
        "sampler": {"name": "ddim", "steps": int(diffusion.num_timesteps), "eta": 0.0, "cfg_scale": cfg_scale,
                    "guide_channels": guide_channels, "clip_denoised": False, "batch": len(labels),
                    "labels": [int(v) for v in labels], "timestep_map": diffusion.timestep_map.tolist()},
        "lazy": None if not lazy else {
            "gates_hash": gates_hash(gates) if gates is not None else None,
            "gates_file": os.path.basename(gates_file) if gates_file else None,
            "threshold": float(threshold), "forced_decisions": decisions is not None,
            "lazy_ratio": stats.lazy_ratio},
        "vae": None if vae is None else {"scaling_factor": vae.config.scaling_factor},
    }
    return rec.trace(meta)


def trace_forward(model, x, t, y, recorder=None, weights_file=None):
    """One forward pass ``model(x, t, y)`` with a recorder attached -> a ``Trace`` (names without a step)."""
    rec = Recorder() if recorder is None else recorder
    previous, model.recorder = model.recorder, rec
    try:
        model(x, t, y)
    finally:
        model.recorder = previous
    meta = {"kind": "forward", "tinylazy_version": __version__, "model": model_meta(model, weights_file),
            "dtype": np.dtype(model.dtype).name, "backend": model.backend,
            "seed": None, "sampler": None, "lazy": None, "vae": None}
    return rec.trace(meta)


# ----------------------------------------------------------------------------
# The checked-in goldens (tests/golden/) and re-running a trace's run

GOLDEN_DIR = os.path.join("tests", "golden")          # relative: the checkout's, when run from its root
GOLDEN_MAX_ELEMENTS = 64          # values kept per tensor in the checked-in goldens (strided)
LAZY_GOLDEN_STEPS = 20            # the bundled gates' schedule (weights/tiny-dit-digits.gates-ddim20)
# The lazy goldens run all 20 steps and keep the first 4 whole, every step's decisions,
# scores and latents, and the sample: a drift anywhere still shows, at a few KB per step.
LAZY_GOLDEN_INCLUDE = ["noise", "labels", "step.0[0-3]/*", "*/compute", "*/score", "*/x_next", "sample"]
GOLDENS = {
    "full.float64": dict(dtype="float64", steps=4),
    "full.float32": dict(dtype="float32", steps=4),
    "lazy.float64": dict(dtype="float64", steps=LAZY_GOLDEN_STEPS, lazy=True, include=LAZY_GOLDEN_INCLUDE),
    "lazy.float32": dict(dtype="float32", steps=LAZY_GOLDEN_STEPS, lazy=True, include=LAZY_GOLDEN_INCLUDE),
}


def golden_path(name, directory=GOLDEN_DIR, stem="tiny-dit-digits"):
    """tests/golden/<stem>.<name>.safetensors: the golden ``name`` of the weights file <stem>.safetensors."""
    return os.path.join(directory, f"{stem}.{name}.safetensors")


def weights_stem(weights):
    """The name of a weights file without its folder and ``.safetensors``: its goldens' stem."""
    stem = os.path.basename(os.path.normpath(os.fspath(weights)))
    return stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem


def write_goldens(weights=DEFAULT_MODEL, directory=GOLDEN_DIR, names=None):
    """(Re)write the checked-in goldens of a weights file (default: the bundled model): seed 0,
    batch 2, cfg 4 (``GOLDENS``), named after the weights file (``golden_path``)."""
    weights = weights_path(weights)
    stem = weights_stem(weights)
    names = list(names or GOLDENS)
    for name in names:
        gpath = gates_file(weights, GOLDENS[name]["steps"]) if GOLDENS[name].get("lazy") else None
        if gpath and not os.path.exists(gpath):
            raise TraceError(f"{gpath}: no such file; the lazy goldens need the model's gates for "
                             f"{GOLDENS[name]['steps']} steps (write the others with --only full)")
    written = []
    for name in names:
        spec = GOLDENS[name]
        model = load_dit(weights, dtype=spec["dtype"])
        gpath = gates_file(weights, spec["steps"]) if spec.get("lazy") else None
        gates = load_gates(gpath, model, steps=spec["steps"]) if gpath else None
        rec = Recorder(include=spec.get("include"), max_elements=GOLDEN_MAX_ELEMENTS)
        trace = trace_sampling(model, steps=spec["steps"], seed=0, batch=2, cfg_scale=4.0, gates=gates, recorder=rec,
                               weights_file=weights, gates_file=gpath)
        os.makedirs(directory, exist_ok=True)
        written.append(trace.save(golden_path(name, directory, stem)))
    return written


def write_tiny_large_dit(folder=GOLDEN_DIR, steps=LAZY_GOLDEN_STEPS):
    """Write the tiny random Large-DiT of the Large-DiT goldens (``large_dit.TINY``, seed 0,
    float32) and random gates for ``steps`` DDIM steps beside it -> (weights, gates) paths.
    The same bytes on every machine; its goldens are then ``write_goldens(weights)``."""
    weights = os.path.join(os.fspath(folder), "tiny-large-dit.safetensors")
    save_large_dit(large_dit.init_params(large_dit.TINY, seed=0, scheme="random", dtype=np.float32),
                   large_dit.TINY, weights, metadata={"about": "random weights of the Large-DiT goldens"})
    gates = LazyGates.zeros(load_dit(weights), steps, dtype=np.float32)
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(large_dit.TINY.num_tokens * large_dit.TINY.hidden_size)   # scores spread around 0.5
    gates.attn[:] = rng.normal(0.0, scale, gates.attn.shape)
    gates.mlp[:] = rng.normal(0.0, scale, gates.mlp.shape)
    path = gates_file(weights, steps)
    save_gates(gates, path, training={"source": "random (tinylazy.golden.write_tiny_large_dit)"})
    return weights, path


def rerun(trace, weights, gates=None, backend="numpy", dtype=None):
    """Run again what ``trace`` records (same seed, labels, sampler, gates and recorder settings),
    with the weights file ``weights`` and gates file ``gates`` -> a new Trace."""
    m = trace.meta
    if m.get("kind") != "sampling":
        raise TraceError(f"{trace.label}: only sampling traces can be re-run")
    s, rec_cfg = m["sampler"], m.get("recorded") or {}
    model = load_dit(weights, dtype=dtype or m["dtype"], backend=backend)
    g = None
    if m.get("lazy"):
        if gates is None:
            raise TraceError(f"{trace.label} records a lazy run: give its gates file")
        g = load_gates(gates, model, steps=s["steps"])
    rec = Recorder(include=rec_cfg.get("include"), exclude=rec_cfg.get("exclude"),
                   attn_probs=rec_cfg.get("attn_probs", False), max_elements=rec_cfg.get("max_elements"))
    return trace_sampling(model, steps=s["steps"], seed=m["seed"], labels=s["labels"], cfg_scale=s["cfg_scale"],
                          guide_channels=s["guide_channels"], gates=g,
                          threshold=(m.get("lazy") or {}).get("threshold", DEFAULT_THRESHOLD), recorder=rec,
                          weights_file=weights, gates_file=gates)


# ----------------------------------------------------------------------------
# Comparing two traces

def _describe(trace):
    m = trace.meta
    return f"{m.get('dtype')} {m.get('backend')}, tinylazy {m.get('tinylazy_version')}"


def _run_summary(m):
    model = m.get("model") or {}
    who = f"model {model.get('file') or '?'} (weights {str(model.get('weights_hash'))[:12]})"
    if m.get("kind") == "forward":
        return f"one forward pass; {who}"
    s, lazy = m.get("sampler") or {}, m.get("lazy")
    mode = "full" if not lazy else (f"lazy (gates {str(lazy.get('gates_hash'))[:12]}, threshold "
                                    f"{lazy.get('threshold')})")
    return (f"DDIM {s.get('steps')} steps, cfg {s.get('cfg_scale')}, batch {s.get('batch')}, seed {m.get('seed')}, "
            f"{mode}; {who}")


def check_compatible(ref, other):
    """Raise TraceError unless the two traces record the same run (model, seed, sampler, gates);
    dtype, backend and what was recorded may differ."""
    r, o = ref.meta, other.meta
    rm, om = r.get("model") or {}, o.get("model") or {}
    problems = []
    if rm.get("weights_hash") != om.get("weights_hash"):
        problems.append(f"they come from different models: REF has weights {str(rm.get('weights_hash'))[:12]} "
                        f"({rm.get('file')}), OTHER {str(om.get('weights_hash'))[:12]} ({om.get('file')}); a trace "
                        f"written before the weights hash covered the configuration records the older hash "
                        f"(the bundled model's was 397f10f1478e): regenerate it")
    elif rm.get("config") != om.get("config"):
        problems.append(f"the model configs differ: REF {rm.get('config')}, OTHER {om.get('config')}")
    if r.get("kind") != o.get("kind"):
        problems.append(f"REF records a {r.get('kind')} run, OTHER a {o.get('kind')} run")
    if r.get("seed") != o.get("seed"):
        problems.append(f"they use different seeds: REF {r.get('seed')}, OTHER {o.get('seed')}")
    rs, os_ = r.get("sampler") or {}, o.get("sampler") or {}
    for key in sorted(set(rs) | set(os_)):
        if rs.get(key) != os_.get(key):
            problems.append(f"sampler setting {key!r} differs: REF {rs.get(key)}, OTHER {os_.get(key)}")
    rl, ol = r.get("lazy"), o.get("lazy")
    if (rl is None) != (ol is None):
        problems.append(f"REF is a {'lazy' if rl else 'full'} run, OTHER a {'lazy' if ol else 'full'} run")
    elif rl is not None:
        for key in ("gates_hash", "threshold"):
            if rl.get(key) != ol.get(key):
                problems.append(f"lazy setting {key!r} differs: REF {rl.get(key)}, OTHER {ol.get(key)}")
    if problems:
        raise TraceError(f"refusing to compare {ref.label} with {other.label}: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """rtol bounds rms(OTHER - REF) / rms(REF), max_rtol bounds max|OTHER - REF| / max|REF|; atol is
    added to both bounds (it decides for tensors that are zero in REF)."""
    rtol: float = DEFAULT_RTOL
    max_rtol: float = DEFAULT_MAX_RTOL
    atol: float = DEFAULT_ATOL

    def scaled(self, factor):
        return dataclasses.replace(self, rtol=self.rtol * factor, max_rtol=self.max_rtol * factor)

    def __str__(self):
        return f"rtol {self.rtol:g}, max-rtol {self.max_rtol:g}, atol {self.atol:g}"


_TOLERANCE_KEYS = {f.name for f in dataclasses.fields(Tolerance)}


def load_tolerances(path):
    """A JSON object {fnmatch pattern: {"rtol": r, "max_rtol": m, "atol": a} | "skip"}; the first
    matching pattern (in file order) sets a tensor's tolerances, missing keys keep the global ones."""
    from .io import describe_value, read_json_file
    table = read_json_file(path, TraceError)             # a regular file, bounded, valid JSON
    if not isinstance(table, dict):
        raise TraceError(f"{path}: the tolerances file must be a JSON object "
                         f"{{pattern: {{rtol, max_rtol, atol}} | \"skip\"}}")
    rules = []
    for pattern, rule in table.items():
        if rule == "skip":
            rules.append((pattern, None))
            continue
        if not isinstance(rule, dict) or not set(rule) <= _TOLERANCE_KEYS or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in rule.values()):
            raise TraceError(f"{path}: pattern {pattern[:100]!r}: expected {{\"rtol\": r, \"max_rtol\": m, "
                             f"\"atol\": a}} (any of them) with finite numbers >= 0, or \"skip\"; "
                             f"got {describe_value(rule)}")
        rules.append((pattern, rule))
    return rules


@dataclasses.dataclass
class TensorResult:
    """One REF tensor against OTHER.  status: ok | fail | missing | skipped | decision."""
    name: str
    status: str
    reason: str = ""            # fail: values | shape | nonfinite | exact
    rel: float = 0.0            # rms(other - ref) / rms(ref)
    max_rel: float = 0.0        # max|other - ref| / max|ref|
    max_abs: float = 0.0
    tol: Tolerance = None
    where: tuple = None         # index of the largest error in the full shape
    ref_value: float = None
    other_value: float = None
    ref_rms: float = 0.0
    ref_max: float = 0.0
    n_bad: int = 0              # elements off by more than rtol * max|ref| (or not finite, or unequal)
    n: int = 0                  # elements compared

    @property
    def failed(self):
        return self.status == "fail"


@dataclasses.dataclass
class DecisionMismatch:
    name: str                   # ...block.LL/{attn,mlp}/compute
    row: int
    ref_compute: bool
    other_compute: bool
    ref_score: float            # None where no gate scored (first step, forced decisions)
    other_score: float
    threshold: float

    @property
    def margin(self):
        """REF's score minus the threshold: how far REF was from deciding the other way."""
        return None if self.ref_score is None else self.ref_score - self.threshold

    def describe(self):
        step, layer = position(self.name)
        module = self.name.rsplit("/", 2)[-2]

        def side(who, compute, score):
            s = "no score" if score is None else f"score {score:.6f}"
            return f"{who} {'computes' if compute else 'skips (reuses the cache)'} ({s})"
        margin = "" if self.margin is None else f", REF's margin from threshold {self.threshold}: {self.margin:+.3e}"
        return (f"{self.name} row {self.row} (step {step}, layer {layer}, {module}): "
                f"{side('REF', self.ref_compute, self.ref_score)}, "
                f"{side('OTHER', self.other_compute, self.other_score)}{margin}")


def _flat(trace, name):
    """(stored values as 1-D, stride) of a tensor."""
    return trace.arrays[name].reshape(-1), trace.entries[name]["stride"]


def _aligned(ref, other, name):
    """REF and OTHER values at the flat positions both stored, and those positions."""
    a, sa = _flat(ref, name)
    b, sb = _flat(other, name)
    step = sa * sb // math.gcd(sa, sb)
    a, b = a[:: step // sa], b[:: step // sb]
    n = min(len(a), len(b))
    return a[:n], b[:n], np.arange(n, dtype=np.int64) * step


def _ratio(err, scale):
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def _compare_values(ref, other, name, tol):
    r = TensorResult(name, "ok", tol=tol)
    shape_r, shape_o = ref.entries[name]["shape"], other.entries[name]["shape"]
    if shape_r != shape_o:
        r.status, r.reason = "fail", f"shape: REF {tuple(shape_r)}, OTHER {tuple(shape_o)}"
        return r
    a, b, pos = _aligned(ref, other, name)
    r.n = len(a)
    if r.n == 0:
        return r
    unravel = lambda k: tuple(int(i) for i in np.unravel_index(int(pos[k]), shape_r))
    if a.dtype.kind != "f" and b.dtype.kind != "f":                   # ids, timesteps: exact
        bad = np.flatnonzero(a != b)
        if bad.size:
            k = int(bad[0])
            r.status, r.reason, r.n_bad, r.where = "fail", "exact", int(bad.size), unravel(k)
            r.ref_value, r.other_value = a[k].item(), b[k].item()
        return r
    a, b = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        r.status, r.reason, r.where = "fail", "nonfinite", unravel(k)
        r.ref_value, r.other_value = float(a[k]), float(b[k])
        r.max_abs = r.rel = r.max_rel = math.inf
        r.n_bad = int((~finite).sum())
        return r
    err = np.abs(a - b)
    k = int(np.argmax(err))
    r.ref_rms, r.ref_max = float(np.sqrt(np.mean(a * a))), float(np.abs(a).max())
    err_rms, r.max_abs = float(np.sqrt(np.mean(err * err))), float(err[k])
    r.rel, r.max_rel = _ratio(err_rms, r.ref_rms), _ratio(r.max_abs, r.ref_max)
    r.where, r.ref_value, r.other_value = unravel(k), float(a[k]), float(b[k])
    r.n_bad = int((err > tol.atol + tol.rtol * r.ref_max).sum())
    if err_rms > tol.atol + tol.rtol * r.ref_rms or r.max_abs > tol.atol + tol.max_rtol * r.ref_max:
        r.status, r.reason = "fail", "values"
    return r


def _compare_decisions(ref, other, name, threshold):
    a, b = ref.arrays[name].reshape(-1), other.arrays[name].reshape(-1)
    if a.shape != b.shape:
        return [], TensorResult(name, "fail", reason=f"shape: REF {a.shape}, OTHER {b.shape}")
    score_name = name[: -len("compute")] + "score"

    def score(trace, row):
        if score_name not in trace or trace.entries[score_name]["stride"] != 1:
            return None
        return float(trace.arrays[score_name].reshape(-1)[row])
    rows = np.flatnonzero(a.astype(bool) != b.astype(bool))
    mism = [DecisionMismatch(name, int(i), bool(a[i]), bool(b[i]), score(ref, i), score(other, i), threshold)
            for i in rows]
    return mism, TensorResult(name, "decision" if mism else "ok", n=len(a), n_bad=len(mism))


class Comparison:
    """The outcome of ``compare``: per-tensor results in REF order, decision mismatches, and a report."""

    def __init__(self, ref, other, results, decisions, tol):
        self.ref, self.other = ref, other
        self.results, self.decisions = results, decisions
        self.tol = tol
        self.extra = [n for n in other.names if n not in ref]

    @property
    def failures(self):
        return [r for r in self.results if r.failed]

    @property
    def first(self):
        """The first diverging tensor in execution order (None when all match)."""
        return next((r for r in self.results if r.failed), None)

    @property
    def missing(self):
        return [r for r in self.results if r.status == "missing"]

    @property
    def passed(self):
        return not self.failures and not self.decisions

    def summary_rows(self):
        """One row per tensor kind (step and block numbers taken out), in order of first appearance."""
        rows = {}
        for r in self.results:
            if r.status in ("missing", "skipped"):
                continue
            row = rows.setdefault(kind_of(r.name), {"n": 0, "fail": 0, "worst": None, "max": None})
            row["n"] += 1
            row["fail"] += r.failed or r.status == "decision"
            if r.reason in ("", "values", "nonfinite") and not r.name.endswith("/compute"):
                if row["worst"] is None or r.rel > row["worst"].rel:
                    row["worst"] = r
                row["max"] = max(row["max"] or 0.0, r.max_rel)
        return rows

    def format(self, max_listed=10):
        out = [f"REF    {self.ref.label}: {_describe(self.ref)}",
               f"OTHER  {self.other.label}: {_describe(self.other)}",
               f"run    {_run_summary(self.ref.meta)}",
               "check  per tensor: rms(OTHER - REF) <= atol + rtol * rms(REF) and "
               "max|OTHER - REF| <= atol + max-rtol * max|REF|",
               f"       ({self.tol}; step.KK/eps scaled by its conditioning, see docs/golden.md)", ""]
        n_cmp = sum(r.status not in ("missing", "skipped") for r in self.results)
        n_skip = sum(r.status == "skipped" for r in self.results)
        line = f"compared {n_cmp} of REF's {len(self.results)} tensors"
        if self.missing:
            line += (f"; OTHER did not record {len(self.missing)} (a partial trace, e.g. "
                     f"{', '.join(r.name for r in self.missing[:3])})")
        if n_skip:
            line += f"; {n_skip} skipped by the tolerances file"
        out.append(line)
        if self.extra:
            out.append(f"OTHER recorded {len(self.extra)} tensors REF lacks (not compared), e.g. "
                       f"{', '.join(self.extra[:3])}")
        first = self.first
        if first is not None:
            out += ["", f"FIRST DIVERGENCE  {first.name}  ({_where_in_run(first.name)})"]
            out += ["  " + s for s in _explain(first)]
            later = self.failures[1:]
            if later:
                more = " ..." if len(later) > max_listed else ""
                out.append(f"  then {len(later)} more diverging tensors: "
                           + ", ".join(r.name for r in later[:max_listed]) + more)
        if self.decisions:
            margins = [abs(d.margin) for d in self.decisions if d.margin is not None]
            out += ["", f"GATE DECISIONS: {len(self.decisions)} mismatch{'es' if len(self.decisions) > 1 else ''}"
                    + (f" (smallest |margin| {min(margins):.3e})" if margins else "")]
            out += ["  " + d.describe() for d in self.decisions[:max_listed]]
            if len(self.decisions) > max_listed:
                out.append(f"  ... and {len(self.decisions) - max_listed} more")
        out += ["", _table(self.summary_rows()), ""]
        if self.passed:
            out.append(f"PASS: {n_cmp} tensors match" + (" (partial trace)" if self.missing else ""))
        else:
            parts = []
            if self.failures:
                parts.append(f"{len(self.failures)} tensors diverge (first: {first.name})")
            if self.decisions:
                parts.append(f"{len(self.decisions)} gate decisions differ (first: {self.decisions[0].name} "
                             f"row {self.decisions[0].row})")
            out.append("FAIL: " + "; ".join(parts))
        return "\n".join(out)


def _where_in_run(name):
    step, layer = position(name)
    parts = [f"step {step}" if step is not None else "outside the sampling steps"]
    if layer is not None:
        parts.append(f"layer {layer}")
    return ", ".join(parts)


def _explain(r):
    if r.reason.startswith("shape"):
        return [r.reason]
    if r.reason == "exact":
        return [f"{r.n_bad} of {r.n} values differ; first at {list(r.where)}: REF {r.ref_value}, OTHER {r.other_value}"]
    if r.reason == "nonfinite":
        return [f"NaN or Inf: {r.n_bad} of {r.n} values; first at {list(r.where)}: REF {r.ref_value}, "
                f"OTHER {r.other_value}"]
    t = r.tol
    return [f"rms err {r.rel:.3e} of rms|REF| {r.ref_rms:.4g} (allowed {t.rtol:g} + atol)",
            f"max abs err {r.max_abs:.3e} at {list(r.where)} (REF {r.ref_value:.9g}, OTHER {r.other_value:.9g}), "
            f"{r.max_rel:.3e} of max|REF| {r.ref_max:.4g} (allowed {t.max_rtol:g} + atol)",
            f"{r.n_bad} of {r.n} compared values are off by more than rtol * max|REF|"]


def _table(rows):
    head = ("tensor", "n", "fail", "worst rms err", "worst max err", "worst rms at")
    lines = []
    for kind, row in rows.items():
        w = row["worst"]
        lines.append((kind, str(row["n"]), str(row["fail"]), "-" if w is None else f"{w.rel:.2e}",
                      "-" if w is None else f"{row['max']:.2e}", "-" if w is None else w.name))
    widths = [max(len(head[i]), *(len(l[i]) for l in lines)) if lines else len(head[i]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(widths[i]) if i in (0, len(head) - 1) else c.rjust(widths[i])
                                  for i, c in enumerate(cells)).rstrip()
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(l) for l in lines])


def eps_rtol_factors(meta):
    """step.KK/eps -> max(1, 1 / sqrt(1/acp_t - 1)) for each step of a sampling trace.

    ADM re-derives eps from x0, (sqrt(1/acp_t) x_t - x0) / sqrt(1/acp_t - 1): a cancellation
    divided by sqrt(1/acp_t - 1), which is 0.01 at t = 0, so rounding in x_t and x0 comes out
    up to 100x larger relative to eps.  Its tolerance is scaled by the same factor (the step's
    x_next is checked at the plain tolerance, and at t = 0 it does not use eps at all).
    """
    s = meta.get("sampler") or {}
    if meta.get("kind") != "sampling" or not s.get("steps"):
        return {}
    d = create_diffusion(int(s["steps"]))
    n = d.num_timesteps
    return {f"step.{k:02d}/eps": max(1.0, 1.0 / float(d.sqrt_recipm1_alphas_cumprod[n - 1 - k])) for k in range(n)}


def compare(ref, other, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, max_rtol=DEFAULT_MAX_RTOL, tolerances=None,
            require_all=False):
    """Compare trace OTHER against REF (``Trace`` objects or paths) -> ``Comparison``.

    rtol / max_rtol / atol: see ``Tolerance``.  tolerances: [(pattern, {"rtol", "max_rtol",
    "atol"} | None = skip)] (``load_tolerances``); the first matching pattern wins.
    require_all: tensors of REF that OTHER did not record count as failures.
    Raises TraceError when the traces are unreadable or record different runs.
    """
    ref = ref if isinstance(ref, Trace) else load_trace(ref)
    other = other if isinstance(other, Trace) else load_trace(other)
    check_compatible(ref, other)
    threshold = (ref.meta.get("lazy") or {}).get("threshold", DEFAULT_THRESHOLD)
    base = Tolerance(rtol, max_rtol, atol)
    results, decisions = [], []
    eps_factor = eps_rtol_factors(ref.meta)
    for name in ref.names:
        rule = next((rule for pattern, rule in (tolerances or []) if fnmatch.fnmatchcase(name, pattern)), {})
        if rule is None:
            results.append(TensorResult(name, "skipped"))
        elif name not in other:
            results.append(TensorResult(name, "fail" if require_all else "missing",
                                        reason="shape: not recorded by OTHER" if require_all else ""))
        elif kind_of(name).endswith("/compute"):
            mism, res = _compare_decisions(ref, other, name, threshold)
            decisions += mism
            results.append(res)
        else:
            tol = dataclasses.replace(base.scaled(eps_factor.get(name, 1.0)), **rule)
            results.append(_compare_values(ref, other, name, tol))
    if not any(r.status not in ("missing", "skipped") for r in results):
        raise TraceError(f"{ref.label} and {other.label} have no tensors in common: nothing to compare")
    return Comparison(ref, other, results, decisions, base)


# ----------------------------------------------------------------------------
# Command line

def _dump(args):
    weights = cli.weights_input(args.weights)
    cli.input_file(args.gates, "--gates")
    cli.input_file(args.vae, "--vae", folder=True)
    cli.output_file(args.out, "--out", (".safetensors",),
                    inputs={"--weights": weights, "--gates": args.gates, "--vae": args.vae})
    cli.check_backend(args.backend)
    if args.backend == "opencl" and args.dtype != "float32":
        raise cli.UsageError("the OpenCL backend runs float32 only (drop --dtype or use --dtype float32)")
    model = load_dit(weights, dtype=args.dtype, backend=args.backend, device=args.device)
    gates = load_gates(args.gates, model, steps=args.steps) if args.gates else None
    vae = load_vae(args.vae, dtype=args.dtype, backend=args.backend) if args.vae else None
    rec = Recorder(include=args.include, exclude=args.exclude, attn_probs=args.attn_probs,
                   max_elements=args.max_elements)
    trace = trace_sampling(model, steps=args.steps, seed=args.seed, batch=args.batch, cfg_scale=args.cfg_scale,
                           labels=args.classes, gates=gates, threshold=args.threshold, vae=vae, recorder=rec,
                           progress=True, weights_file=weights, gates_file=args.gates)
    trace.save(args.out)
    size = os.path.getsize(args.out)
    lazy = trace.meta["lazy"]
    print(f"wrote {args.out}: {len(trace)} tensors, {size / 1e6:.2f} MB ({_describe(trace)}; "
          f"{_run_summary(trace.meta)}" + (f"; lazy ratio {lazy['lazy_ratio']:.1%}" if lazy else "") + ")")
    return 0


def _compare(args):
    cli.input_file(args.ref, "REF")
    cli.input_file(args.other, "OTHER")
    cli.input_file(args.per_tensor_tolerances, "--per-tensor-tolerances")
    tolerances = load_tolerances(args.per_tensor_tolerances) if args.per_tensor_tolerances else None
    result = compare(args.ref, args.other, rtol=args.rtol, max_rtol=args.max_rtol, atol=args.atol,
                     tolerances=tolerances, require_all=args.require_all)
    print(result.format(max_listed=args.max_listed))
    return 0 if result.passed else 1


def _goldens(args):
    weights = cli.weights_input(args.weights)
    if not os.path.isdir(args.dir):
        raise cli.UsageError(f"--dir {args.dir}: no such folder (run from the checkout's root, where tests/golden "
                             f"is, or pass --dir)")
    try:                       # a damaged weights file is named before its (then missing) gates are
        load_dit(weights)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise cli.UsageError(f"cannot load the DiT from {weights}: {e}") from e
    names = [n for n in GOLDENS if args.only is None or n.startswith(args.only + ".")]
    inputs = {"--weights": weights, "the gates": gates_file(weights, LAZY_GOLDEN_STEPS)}
    for name in names:
        cli.output_file(golden_path(name, args.dir, weights_stem(weights)), "--dir", (".safetensors",),
                        inputs=inputs)
    for path in write_goldens(weights, args.dir, names):
        print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")
    return 0


def add_arguments(p):
    n = cli.number
    sub = p.add_subparsers(dest="command", required=True, metavar="{dump,compare,goldens}")
    d = sub.add_parser("dump", help="record every intermediate of a DDIM sampling run into a trace file")
    d.add_argument("--weights", default=DEFAULT_MODEL,
                   help=f"DiT safetensors file or folder, or a bundled model's name (default: {DEFAULT_MODEL})")
    d.add_argument("--gates", type=resources.gates_path,
                   help="LazyDiT gates file or a bundled one's name: record a lazy run (its step count must match "
                        "--steps)")
    d.add_argument("--threshold", type=n(float, 0, 1), default=DEFAULT_THRESHOLD, help="gate threshold (default 0.5)")
    d.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    d.add_argument("--backend", choices=("numpy", "cupy", "opencl"), default="numpy")
    d.add_argument("--device", help="OpenCL device (index or name substring; default: the first)")
    d.add_argument("--steps", type=n(int, 1, 1000), default=4, help="DDIM steps, 1..1000 (default 4)")
    d.add_argument("--seed", type=cli.SEED, default=0, help="seed of the noise and the labels (default 0)")
    d.add_argument("--batch", type=n(int, 1), default=2, help="samples (default 2; guidance doubles the model batch)")
    d.add_argument("--classes", type=int, nargs="+", help="class ids, one per sample (default: drawn from --seed)")
    d.add_argument("--cfg-scale", type=n(float, 1), default=4.0, help="guidance scale, >= 1 (default 4.0; 1 = none)")
    d.add_argument("--vae", help="AutoencoderKL folder: also record the decoded image")
    d.add_argument("--attn-probs", action="store_true", help="also record attention probabilities (large)")
    d.add_argument("--include", nargs="+", metavar="PATTERN", help="record only names matching these patterns")
    d.add_argument("--exclude", nargs="+", metavar="PATTERN", help="do not record names matching these patterns")
    d.add_argument("--max-elements", type=n(int, 1),
                   help="store larger tensors strided, keeping about this many values")
    d.add_argument("--out", default="trace.safetensors",
                   help="output trace (.safetensors), replaced if it exists (default: trace.safetensors)")
    c = sub.add_parser("compare", help="compare trace OTHER against REF; exit 0 match, 1 diverged, 2 not comparable")
    c.add_argument("ref")
    c.add_argument("other")
    c.add_argument("--rtol", type=n(float, 0), default=DEFAULT_RTOL,
                   help=f"bound on rms(OTHER - REF) / rms(REF) (default {DEFAULT_RTOL:g})")
    c.add_argument("--max-rtol", type=n(float, 0), default=DEFAULT_MAX_RTOL,
                   help=f"bound on max|OTHER - REF| / max|REF| (default {DEFAULT_MAX_RTOL:g})")
    c.add_argument("--atol", type=n(float, 0), default=DEFAULT_ATOL, help=f"absolute (default {DEFAULT_ATOL:g})")
    c.add_argument("--per-tensor-tolerances", metavar="FILE",
                   help='JSON {"pattern": {"rtol": r, "max_rtol": m, "atol": a} | "skip"}; '
                        'the first match in file order wins')
    c.add_argument("--require-all", action="store_true", help="tensors of REF that OTHER lacks are failures")
    c.add_argument("--max-listed", type=n(int, 1), default=10, help="list at most this many failures and flips")
    g = sub.add_parser("goldens", help="rewrite the checked-in goldens of a model (tests/golden/<weights' name>.*)")
    g.add_argument("--weights", default=DEFAULT_MODEL,
                   help="DiT or Large-DiT weights (default: the bundled tiny-dit-digits; its gates-ddim20 "
                        "beside it); the goldens are named after the file")
    g.add_argument("--dir", default=GOLDEN_DIR,
                   help="output folder, which must exist (default: tests/golden, i.e. run from the checkout's root)")
    g.add_argument("--only", choices=("full", "lazy"), help="write only the full or only the lazy goldens")


def run(args):
    try:
        return {"dump": _dump, "compare": _compare, "goldens": _goldens}[args.command](args)
    except ValueError as e:                   # unreadable traces; labels, gates or a VAE that do not fit the run
        raise cli.UsageError(str(e)) from e


def main(argv=None, prog=None):
    return cli.run_command("golden", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.golden"))
