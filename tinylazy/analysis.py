"""The paper's section 3.2, measured: how alike a module's outputs are at consecutive sampling steps,
how that follows the distance of its inputs, whether the lazy gates see it, and an oracle.

    tinylazy analyze --steps 20 --cfg-scale 1.5 --out docs/img/analysis-ddim20
    tinylazy analyze --random DiT-XL/2 --steps 3 --num 2 --no-gates --out xl

LazyDiT (arXiv 2412.12444, section 3.2) argues in three steps about the output Y_k of the
attention or MLP module of block l at sampling step k and its modulated input
Z_k = modulate(LN(x), shift, scale):

1. Y_{k-1} and Y_k are very similar: the cosine similarity
   f(Y_{k-1}, Y_k) = tr(Y_{k-1}^T Y_k) / (||Y_{k-1}||_F ||Y_k||_F) has a high lower bound (Theorem 2);
2. through the module's Lipschitz constant, Dist = ||Y_{k-1} - Y_k|| <= C ||Z_{k-1} - Z_k||;
3. f is approximated by a linear layer on Z_k (Theorem 3): that layer is the lazy gate.

A ``Probe`` wraps a model (the protocol of protocol.py) and records through the branch hook,
for every sampling step k (0 = the first), block l, module kind and model-batch row, in float64:

    sim            f(Y_{k-1}, Y_k) of the row (Frobenius over tokens x channels)
    dist, dy       ||Y_k - Y_{k-1}|| / ||Y_k|| and ||Y_k - Y_{k-1}||
    zdist, dz      ||Z_k - Z_{k-1}|| / ||Z_k|| and ||Z_k - Z_{k-1}||
    logit, score   the gate's sum over tokens of Z_k @ w and its sigmoid (``lazy.gate_score``),
                   where the probe was given gates (a plain run can be scored too)
    computed       True where the run computed the module at step k, False where a lazy run reused it
    fresh          True where Y_{k-1} was computed at step k - 1, so that Y_{k-1} = F(Z_{k-1})
    stale          with ``history=True`` only: f(Y_j, Y_k) for every earlier step j, (steps, steps, depth,
                   2, rows), NaN where j >= k: the similarity of a reuse of step j's output at step k
                   (``stale[k - 1, k] == sim[k]``; the others' products are summed in the model dtype,
                   about 1e-6 relative in float32); it keeps every step's outputs while the run lasts

Y_k is always the module's full output F(Z_k) on the run's own trajectory; Y_{k-1} is the output
the run used at step k - 1, which is what a reuse at step k returns.  In a plain run that is the
paper's definition.  In a lazy run (``tinylazy.ddim_sample(probe, ..., gates=...)``: the probe
composes with lazy sampling) F(Z_k) of a reused row is computed beside the run and dropped, so
the run keeps its bits, and ``sim`` is the similarity of what was reused to what computing would
have given: the reuse error the run took.  Where Y_{k-1} was itself reused (``fresh`` False) it
is not F(Z_{k-1}), so the Lipschitz fit takes fresh pairs only.  Step 0 has no predecessor: NaN.

Rows: with guidance the model sees [cond; uncond] and the two halves are rows of their own (they
decide independently in lazy sampling, as in the official code); ``uncond`` marks the second half.
Every statistic of the report pools all rows of steps 1.. (both halves as separate observations)
unless it says cond or uncond.  The probe is absent unless asked for: a plain run pays nothing.

The oracle (``oracle_decisions``) reuses, from such a record of a full run on the same noise, the
(step, layer, kind) evaluations of highest similarity within a MACs budget, counting a reuse of a
reuse by the similarity of the output it really gets: an upper baseline for learned gates, not a
deployable method.  Figures need matplotlib (``pip install 'tinylazy[analysis]'``).
"""
import json
import numbers
import os
import sys
import time
import warnings

import numpy as np

from . import atomic, cli, resources
from .api import ddim_sample
from .backend import array_module_of, to_numpy
from .diffusion import create_diffusion
from .lazy import DEFAULT_THRESHOLD, find_gates, gate_logit, gates_hash, module_macs, score_of_logit
from .protocol import KINDS
from .resources import DEFAULT_MODEL
from .sampling import check_steps

VALUES = ("sim", "dist", "dy", "zdist", "dz", "logit", "score")     # float64 (steps, depth, 2, rows), NaN = none
FLAGS = ("computed", "fresh")                                       # bool (steps, depth, 2, rows)
ROBUST_QUANTILE = 0.95                                              # the robust Lipschitz fit bounds this share
POINTS = 8000                                                       # at most this many points in a scatter panel


# ----------------------------------------------------------------------------
# The probe: a recording wrapper on the branch hook

class _DecisionListener:
    """The probe's ``recorder``.  A ``lazy.LazyDiT`` around the probe reports each decision through
    its model's trace recorder (``block.LL/kind/compute``, see trace.OPS); this keeps the latest one
    for the probe and passes every name on to the wrapped model's own recorder, if it has one."""

    def __init__(self, probe):
        self.probe = probe

    def __call__(self, name, array, op=None):
        if name.endswith("/compute"):
            self.probe.decided = np.array(to_numpy(array), dtype=bool).reshape(-1)
        inner = self.probe.model.recorder
        if inner is not None and op is None:
            inner(name, array)
        elif inner is not None:
            inner(name, array, op)


class _Run:
    """The record of one sampling run of ``rows`` model rows."""

    def __init__(self, num_steps, depth, rows, guided, history):
        shape = (num_steps, depth, len(KINDS), rows)
        self.values = {name: np.full(shape, np.nan) for name in VALUES}
        self.flags = {name: np.zeros(shape, dtype=bool) for name in FLAGS}
        self.stale = np.full((num_steps,) + shape, np.nan) if history else None
        self.history = {}                                    # (l, j) -> (Y used (rows, steps, n), their norms)
        self.uncond = np.arange(rows) >= rows // 2 if guided else np.zeros(rows, dtype=bool)
        self.rows, self.guided, self.step = rows, guided, 0
        self.left = num_steps * depth * len(KINDS)           # module records still to come
        self.prev = {}                                       # (l, j) -> (Y used, Z, computed) of the last step

    @property
    def complete(self):
        return self.left == 0


class Probe:
    """A model (protocol.py) that records the consecutive-step similarity of every module while the
    samplers drive it; the quantities are listed in the module docstring.

    model: a ``DiT`` (NumPy or CuPy); steps: the sampling run's step count (or respacing string);
    gates: ``LazyGates`` whose scores to record (None: no scores); history: also record ``stale``
    (every earlier step's output against this one; memory: all outputs of a run).  Drive it like the model:
    ``tinylazy.ddim_sample(probe, noise, labels, steps, cfg_scale)`` for a plain run, with
    ``gates=`` / ``decisions=`` for a lazy one; runs of several batches add rows.  ``result()``
    gives the ``Similarity`` of the complete runs so far.
    """

    def __init__(self, model, steps, gates=None, history=False):
        if model.backend == "opencl":
            raise ValueError("the similarity probe runs on the NumPy or CuPy backend (its statistics are "
                             "host/xp reductions); load the model with backend='numpy'")
        self.model = model
        self.config, self.backend, self.xp, self.dtype = model.config, model.backend, model.xp, model.dtype
        self.params, self.weights_hash = model.params, model.weights_hash
        self.timestep_map = create_diffusion(check_steps(steps)).timestep_map
        self.num_steps = len(self.timestep_map)
        self.step_of = {int(t): i for i, t in enumerate(self.timestep_map)}
        if gates is not None:
            gates.check_run(model, self.timestep_map)
        self.gates = gates
        self.gate_w = None if gates is None else \
            {kind: self.xp.asarray(gates.of(kind), dtype=self.dtype) for kind in KINDS}   # as LazyDiT's
        self.history = bool(history)
        self.runs = []
        self.decided = None                                  # the latest lazy decision (_DecisionListener)
        self.listener = _DecisionListener(self)

    # -- the model protocol ----------------------------------------------------------
    @property
    def recorder(self):
        """What a lazy model around the probe reports to (``_DecisionListener``); setting it sets the
        wrapped model's trace recorder, which the listener feeds."""
        return self.listener

    @recorder.setter
    def recorder(self, value):
        self.model.recorder = value

    def check_inputs(self, x, t, y):
        return self.model.check_inputs(x, t, y)

    def forward(self, x, t, y, branch=None):
        return self.model(x, t, y, branch=self.hook(t, len(x), branch, guided=False))

    __call__ = forward

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3, branch=None):
        return self.model.forward_with_cfg(x, t, y, cfg_scale, guide_channels,
                                           branch=self.hook(t, len(x), branch, guided=True))

    def branch(self, l, kind, z, cache=None):
        """The wrapped model's module (what a lazy model around the probe computes with)."""
        return self.model.branch(l, kind, z, cache)

    # -- recording -------------------------------------------------------------------------
    def hook(self, t, rows, inner, guided):
        """The branch hook of one forward pass: ``inner`` (a lazy model's hook, or None to compute),
        then the record of the module's step."""
        t0 = int(np.asarray(to_numpy(t)).reshape(-1)[0])
        if t0 not in self.step_of:
            raise ValueError(f"timestep {t0} is not a step of this {self.num_steps}-step schedule "
                             f"(make the probe with the run's step count)")
        k = self.num_steps - 1 - self.step_of[t0]
        run = self.runs[-1] if self.runs else None
        if k == 0:
            if run is not None and not run.complete:
                self.runs.pop()                              # an unfinished run (interrupted): dropped
            run = _Run(self.num_steps, self.config.depth, rows, guided, self.history)
            self.runs.append(run)
        elif run is None or run.complete or k != run.step + 1 or rows != run.rows:
            raise ValueError(f"the probe saw step {k} of a run it did not see start (or a batch of {rows} "
                             f"rows in a run of {run.rows if run else 0}): it records whole runs, step by step")
        run.step = k
        compute = self.model.branch if inner is None else inner

        def probe(l, kind, z, cache=None):
            self.decided = None
            out = compute(l, kind, z, cache)
            keep, self.decided = self.decided, None
            self.record(run, k, l, kind, z, out, keep)
            return out

        return probe

    def record(self, run, k, l, kind, z, out, keep):
        """The statistics of module ``kind`` of block l at step k.  keep: the rows the run computed
        (None: all of them); F(Z_k) of the other rows is computed here and dropped."""
        xp, j, rows = self.xp, KINDS.index(kind), z.shape[0]
        computed = np.ones(rows, dtype=bool) if keep is None else keep
        full = out
        if not computed.all():
            idx = xp.asarray(np.flatnonzero(~computed))
            full = out.copy()
            full[idx] = self._silent_branch(l, kind, z[idx])
        v, f = run.values, run.flags
        f["computed"][k, l, j] = computed
        if self.gate_w is not None:
            u = gate_logit(z, self.gate_w[kind][self.num_steps - 1 - k, l])     # respaced index s
            v["logit"][k, l, j] = to_numpy(u)
            v["score"][k, l, j] = to_numpy(score_of_logit(u))                  # LazyDiT's score, same bits
        b = full.reshape(rows, -1).astype(np.float64)
        nb = xp.sqrt(_rowdot(b, b))
        prev = run.prev.get((l, j))
        if prev is not None:
            y_prev, z_prev, fresh = prev
            a = y_prev.reshape(rows, -1).astype(np.float64)
            d = b - a
            zb = z.reshape(rows, -1).astype(np.float64)
            dzz = zb - z_prev.reshape(rows, -1).astype(np.float64)
            dy, dz = xp.sqrt(_rowdot(d, d)), xp.sqrt(_rowdot(dzz, dzz))
            with np.errstate(invalid="ignore", divide="ignore"):
                v["sim"][k, l, j] = to_numpy(_rowdot(a, b) / (xp.sqrt(_rowdot(a, a)) * nb))
                v["dist"][k, l, j] = to_numpy(dy / nb)
                v["zdist"][k, l, j] = to_numpy(dz / xp.sqrt(_rowdot(zb, zb)))
            v["dy"][k, l, j], v["dz"][k, l, j] = to_numpy(dy), to_numpy(dz)
            f["fresh"][k, l, j] = fresh
        if run.stale is not None:
            self._record_stale(run, k, l, j, out, full, nb)
        run.prev[(l, j)] = (out.copy(), z.copy(), computed)  # copies: a lazy cache is updated in place
        run.left -= 1
        if run.complete:
            run.prev, run.history = {}, {}

    def _record_stale(self, run, k, l, j, out, full, nb):
        """f(Y_i, F(Z_k)) for every step i < k - 1 from the run's stacked outputs (the products in the
        model dtype, on the BLAS; k - 1 is ``sim``), then this step's used output joins them."""
        xp, rows = self.xp, out.shape[0]
        if k == 0:
            run.history[(l, j)] = (xp.empty((rows, self.num_steps, full[0].size), dtype=self.dtype),
                                   xp.empty((rows, self.num_steps), dtype=np.float64))
        ys, norms = run.history[(l, j)]
        if k > 1:
            dots = xp.matmul(ys[:, :k - 1], full.reshape(rows, -1, 1))[..., 0].astype(np.float64)   # (rows, k-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                run.stale[:k - 1, k, l, j] = to_numpy(dots / (norms[:, :k - 1] * nb[:, None])).T
        if k > 0:
            run.stale[k - 1, k, l, j] = run.values["sim"][k, l, j]
        ys[:, k] = out.reshape(rows, -1)
        y = ys[:, k].astype(np.float64)
        norms[:, k] = xp.sqrt(_rowdot(y, y))

    def _silent_branch(self, l, kind, z):
        """The module on z with the wrapped model's trace recorder detached (its names are unique per step)."""
        rec, self.model.recorder = self.model.recorder, None
        try:
            return self.model.branch(l, kind, z)
        finally:
            self.model.recorder = rec

    def result(self):
        """The ``Similarity`` of every complete run so far, rows in run order."""
        runs = [r for r in self.runs if r.complete]
        if not runs:
            raise ValueError("the probe has recorded no complete sampling run")
        cat = lambda get: np.concatenate([get(r) for r in runs], axis=-1)
        values = {name: cat(lambda r: r.values[name]) for name in VALUES}
        flags = {name: cat(lambda r: r.flags[name]) for name in FLAGS}
        uncond = np.concatenate([r.uncond for r in runs])
        stale = np.concatenate([r.stale for r in runs], axis=-1) if self.history else None
        trained = None if self.gates is None else np.stack(
            [np.any(self.gates.of(kind)[::-1] != 0, axis=-1) for kind in KINDS], axis=-1)     # (S, L, 2)
        return Similarity(values, flags, uncond, self.timestep_map, self.config, trained,
                          guided=any(r.guided for r in runs), stale=stale)

    def __repr__(self):
        return f"Probe({self.model!r}, steps={self.num_steps}, gates={self.gates!r})"


def _rowdot(a, b):
    """Per-row sums of a * b: (rows, n) x (rows, n) -> (rows,), one pass, no temporary."""
    return array_module_of(a).einsum("ij,ij->i", a, b)


# ----------------------------------------------------------------------------
# The record and what it says

class Similarity:
    """The record of one or more runs: arrays (steps, depth, 2, rows) in sampling order (module
    docstring), ``uncond`` (rows,), the run's ``timestep_map``, the model ``config``, where
    gates were scored ``trained`` (steps, depth, 2): the gates with a non-zero vector (the
    official recipe leaves every other step's at zero, score exactly 0.5), and ``stale`` (or None)."""

    def __init__(self, values, flags, uncond, timestep_map, config, trained=None, guided=False, stale=None):
        for name in VALUES:
            setattr(self, name, values[name])
        for name in FLAGS:
            setattr(self, name, flags[name])
        self.uncond, self.timestep_map, self.config = uncond, np.asarray(timestep_map), config
        self.trained, self.guided, self.stale = trained, guided, stale
        self.num_steps, self.depth, _, self.rows = self.sim.shape

    @property
    def observed(self):
        """(steps, depth, 2, rows): where there is a similarity (every row of steps 1..)."""
        return np.isfinite(self.sim)

    @property
    def scored(self):
        return bool(np.isfinite(self.score).any())

    def mean_map(self):
        """(steps, depth, 2): the mean similarity over rows (NaN at step 0), the heat map."""
        return _nanmean(self.sim, axis=-1)

    def _pooled(self, j, rows=None):
        ok = self.observed[:, :, j]
        if rows is not None:
            ok = ok & rows
        return self.sim[:, :, j][ok]

    def summary(self):
        """Per kind: min, 5th percentile, median and mean similarity over all observations, those of
        the cond and uncond rows, where the mean map is lowest, the mean by step and by layer, the
        median relative input distance by step, and in a lazy run the same four over the reused and
        over the computed evaluations."""
        out, means = {}, self.mean_map()
        for j, kind in enumerate(KINDS):
            s = self._pooled(j)
            if s.size == 0:
                out[kind] = {"n": 0}
                continue
            m = means[:, :, j]
            k, l = np.unravel_index(np.nanargmin(m), m.shape)
            with np.errstate(invalid="ignore"):
                row = {"n": int(s.size), "min": float(s.min()), "p5": float(np.percentile(s, 5)),
                       "median": float(np.median(s)), "mean": float(s.mean()),
                       "lowest_cell": {"step": int(k) + 1, "layer": int(l), "mean": float(m[k, l])},
                       "by_step": _floats(_nanmean(m, axis=1)), "by_layer": _floats(_nanmean(m, axis=0)),
                       "min_by_step": _floats(_nanmean(self.sim[:, :, j], axis=(1, 2), reduce=np.nanmin)),
                       "zdist_by_step": _floats(_nanmean(self.zdist[:, :, j], axis=(1, 2), reduce=np.nanmedian))}
            if self.guided:
                for half, rows in (("cond", ~self.uncond), ("uncond", self.uncond)):
                    h = self._pooled(j, rows)
                    row[f"{half}_median"] = float(np.median(h))
                    row[f"{half}_p5"] = float(np.percentile(h, 5))
            for name, sel in (("reused", ~self.computed[:, :, j]), ("computed", self.computed[:, :, j])):
                h = self.sim[:, :, j][sel & self.observed[:, :, j]]
                if h.size and not self.computed.all():             # a lazy run: what it took and what it did not
                    row[name] = {"n": int(h.size), "min": float(h.min()), "p5": float(np.percentile(h, 5)),
                                 "median": float(np.median(h)), "mean": float(h.mean())}
            out[kind] = row
        return out

    def lipschitz(self, quantile=ROBUST_QUANTILE):
        """Per kind and layer, the fitted constant of Dist <= C ||dZ|| over the fresh pairs
        (Y_{k-1} = F(Z_{k-1})) with dz > 0, absolute Frobenius norms per row:

            C_max  the smallest C with ||Y_k - Y_{k-1}|| <= C ||Z_k - Z_{k-1}|| for every pair
            C_q    the smallest C that bounds ``quantile`` of them (the robust fit)

        and the same two for the relative distances (dist <= C zdist)."""
        out = {"quantile": quantile}
        for j, kind in enumerate(KINDS):
            rows = {"C_max": [], "C_q": [], "C_rel_max": [], "C_rel_q": [], "n": []}
            for l in range(self.depth):
                ok = self.fresh[:, l, j] & self.observed[:, l, j] & (self.dz[:, l, j] > 0)
                r = self.dy[:, l, j][ok] / self.dz[:, l, j][ok]
                rr = self.dist[:, l, j][ok] / self.zdist[:, l, j][ok]
                rows["n"].append(int(r.size))
                for key, x, q in (("C_max", r, 1.0), ("C_q", r, quantile), ("C_rel_max", rr, 1.0),
                                  ("C_rel_q", rr, quantile)):
                    rows[key].append(float(np.quantile(x, q, method="inverted_cdf")) if x.size else float("nan"))
            out[kind] = rows
        return out

    def gate_correlation(self, threshold=DEFAULT_THRESHOLD):
        """Does the gate predict the similarity (Theorem 3)?  Over the observations at steps whose
        gate was trained (non-zero vector): Pearson r of (1 - score) with the similarity (the
        paper's gate output is the similarity; the official score is the probability to compute),
        Spearman rho of -logit with it (the same ranking, unsaturated), per layer, per kind and
        overall; ``spearman_within``, the mean over (step, layer, kind) cells of the Spearman rho
        across the rows of the cell (what the gate's input dependence adds to a per-step constant);
        and the mean similarity of the evaluations the gates would reuse (score < threshold) and of
        those they would compute.  None without scores."""
        if not self.scored:
            return None
        trained = np.ones(self.sim.shape[:3], bool) if self.trained is None else self.trained
        ok = self.observed & trained[..., None] & np.isfinite(self.score)

        def within(sel):
            rho = [_corr(*_ranks(-self.logit[c][sel[c]], self.sim[c][sel[c]]))
                   for c in zip(*np.nonzero(sel.sum(axis=-1) >= 3))]
            return float(_nanmean(np.array(rho), axis=0)) if rho else float("nan")

        def corr(sel):
            s, sc, u = self.sim[sel], self.score[sel], self.logit[sel]
            reuse = sc < threshold
            return {"n": int(s.size), "pearson": _corr(1 - sc, s), "spearman": _corr(*_ranks(-u, s)),
                    "spearman_within": within(sel), "reuse_share": float(reuse.mean()) if s.size else float("nan"),
                    "sim_reused": float(s[reuse].mean()) if reuse.any() else float("nan"),
                    "sim_computed": float(s[~reuse].mean()) if (~reuse).any() else float("nan")}

        out = {"trained_steps": int(trained.any(axis=(1, 2)).sum()), "overall": corr(ok)}
        for j, kind in enumerate(KINDS):
            sel = np.zeros_like(ok)
            sel[:, :, j] = ok[:, :, j]
            per_layer = []
            for l in range(self.depth):
                one = np.zeros_like(ok)
                one[:, l, j] = ok[:, l, j]
                per_layer.append(corr(one))
            out[kind] = dict(corr(sel), by_layer=per_layer)
        return out

    def report(self):
        """Everything above as one JSON-ready dict."""
        return {"steps": self.num_steps, "depth": self.depth, "rows": self.rows, "guided": self.guided,
                "timestep_map": self.timestep_map.tolist(),
                "lazy_share": float(1 - self.computed[1:].mean()) if self.num_steps > 1 else 0.0,
                "aggregation": "every model-batch row of steps 2.. is one observation; with guidance the "
                               "cond and uncond halves are separate rows (also reported apart)",
                "summary": self.summary(), "lipschitz": self.lipschitz(), "gates": self.gate_correlation(),
                "mean_map": {kind: _floats(self.mean_map()[:, :, j]) for j, kind in enumerate(KINDS)}}


def _nanmean(a, axis, reduce=np.nanmean):
    """NaN-skipping reduction, NaN (without a warning) where a slice has no number."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return reduce(a, axis=axis)


def _floats(a):
    return np.asarray(a, dtype=np.float64).tolist()


def _json_ready(obj):
    """The report with every non-finite float as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _ranks(*arrays):
    from scipy.stats import rankdata
    return [rankdata(a) for a in arrays]


def _corr(a, b):
    """Pearson correlation; NaN when either side is constant (or empty)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------
# Runs and the oracle

def analyse(model, noise, labels, steps=20, cfg_scale=1.0, gates=None, lazy=False, threshold=DEFAULT_THRESHOLD,
            decisions=None, batch=None, progress=False, history=False):
    """Sample ``noise`` / ``labels`` with a ``Probe`` -> (final latents on the host, ``Similarity``).

    gates: scored on every step (and used to sample when ``lazy``); decisions: a lazy run with forced
    decisions (``tinylazy.ddim_sample``'s argument); batch: samples per run (default: all at once);
    history: record ``stale`` too (``Probe``)."""
    probe = Probe(model, steps, gates, history)
    n = len(labels)
    batch = n if batch is None else int(batch)
    lazy_kw = {"gates": gates, "threshold": threshold} if lazy else {}
    if decisions is not None:
        lazy_kw["decisions"] = decisions
    out = []
    for i in range(0, n, batch):
        x = ddim_sample(probe, noise[i:i + batch], labels[i:i + batch], steps, cfg_scale, progress=progress,
                        **lazy_kw)
        out.append(np.asarray(to_numpy(x)))
    return np.concatenate(out), probe.result()


def reuse_damage(model, noise, labels, steps=20, cfg_scale=1.0, batch=None, progress=False):
    """What one step of reuse costs the final sample, step by step: for each step k >= 1, every module
    reuses its step k - 1 output at step k and computes everywhere else; the result is the relative
    distance ||x_0 - x_0 full|| / ||x_0 full|| of the final latents to the full run's on the same noise
    (pooled over the samples) -> (steps,) float64, NaN at step 0.  steps - 1 lazy runs and one full."""
    n = len(labels)
    batch = n if batch is None else int(batch)
    S, L = len(create_diffusion(check_steps(steps)).timestep_map), model.config.depth

    def run(**lazy):
        return np.concatenate([np.asarray(to_numpy(ddim_sample(model, noise[i:i + batch], labels[i:i + batch], steps,
                                                               cfg_scale, **lazy)), dtype=np.float64)
                               for i in range(0, n, batch)])

    full = run()
    damage = np.full(S, np.nan)
    for k in range(1, S):
        keep = np.ones((S, L, len(KINDS)), dtype=bool)
        keep[k] = False
        damage[k] = np.linalg.norm(run(decisions=keep) - full) / np.linalg.norm(full)
        if progress:
            print(f"reuse at step {k + 1} only: final latents moved {damage[k]:.4g} (relative)", file=sys.stderr)
    return damage


def oracle_decisions(similarity, ratio, per_sample=True, chains=None):
    """Decisions (True = compute) that reuse the most similar evaluations of a full run within a MACs
    budget: an upper baseline, not a method (it needs the full run it is judged against).

    similarity: the ``Similarity`` of a plain run on the same noise, labels and guidance as the
    lazy run to come (its rows are that run's model rows).  The budget per row is ``ratio`` of the
    module MACs of the run (ratio * steps * depth * (attn + mlp), ``lazy.module_macs``), the MACs
    the evenly spread rule saves at that lazy ratio.  The candidates are the (step, layer, kind)
    evaluations of steps 1.. (the first step always computes).

    chains=False: candidates in order of decreasing f(Y_{k-1}, Y_k), taken while their saved MACs
    stay within the budget (the first that would exceed it ends the list).  This sees consecutive
    steps only, but two chosen neighbours make a reuse of a reuse: step k + 1 then gets step
    k - 1's output.
    chains=True (the default where the record has ``stale``, ``Probe(history=True)``): the cost of
    a reuse at step k is 1 - f(Y_j, Y_k), j the last step before k that computes the module, and
    evaluations are taken greedily by the least added cost per MAC saved (reusing step k also hands
    the reuses that followed it an older output) while one still fits in the budget.

    per_sample: each row chooses by its own similarities -> (steps, depth, 2, rows); otherwise one
    choice by the mean similarity over rows, shared by the batch -> (steps, depth, 2).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not similarity.computed.all():
        raise ValueError("the oracle ranks the similarities of a full (plain) run; this record is of a lazy run")
    chains = similarity.stale is not None if chains is None else chains
    if chains and similarity.stale is None:
        raise ValueError("the chain-aware oracle needs f(Y_j, Y_k) for all j < k: record with Probe(history=True)")
    S, L = similarity.num_steps, similarity.depth
    if ratio > (S - 1) / S:
        raise ValueError(f"cannot reuse {ratio:.0%} of {S} steps: the first step always computes")
    macs = module_macs(similarity.config)
    cost = np.tile(np.array([macs["attn"], macs["mlp"]], dtype=np.float64), L)      # (M,), M = L * 2 modules
    budget = ratio * S * L * (macs["attn"] + macs["mlp"]) * (1 + 1e-12)
    f = similarity.stale if chains else similarity.sim
    if not per_sample:
        f = _nanmean(f, axis=-1)[..., None]
    f = f.reshape(f.shape[:-3] + (2 * L, f.shape[-1]))                            # (S[, S], M, R)
    reused = _chain_greedy(f, cost, budget) if chains else _ranked(f, cost, budget)
    keep = np.ones((S, L, len(KINDS), f.shape[-1]), dtype=bool)
    keep[1:] = ~reused[1:].reshape(S - 1, L, len(KINDS), -1)
    return keep if per_sample else keep[..., 0]


def _ranked(sim, cost, budget):
    """sim (S, M, R) -> reused (S, M, R): the most similar of steps 1.., a prefix within the budget."""
    S, M, R = sim.shape
    rank = np.where(np.isfinite(sim[1:]), sim[1:], -np.inf).reshape(-1, R)
    costs = np.broadcast_to(cost, (S - 1, M)).reshape(-1)
    order = np.argsort(-rank, axis=0, kind="stable")                   # most similar first, per column
    within = (np.cumsum(costs[order], axis=0) <= budget) & np.isfinite(np.take_along_axis(rank, order, axis=0))
    reused = np.zeros_like(within)
    np.put_along_axis(reused, order, within, axis=0)
    return np.concatenate([np.zeros((1, M, R), bool), reused.reshape(S - 1, M, R)])


def _added_cost(f, reused):
    """f (S, S, M, R) with f[j, k] = f(Y_j, Y_k) for j < k; reused (S, M, R) -> (S, M, R): what reusing
    step k adds to the sum of 1 - f over the reuses (inf where k is no candidate)."""
    S = f.shape[0]
    src, last = np.zeros(reused.shape, dtype=np.int64), np.zeros(reused.shape[1:], dtype=np.int64)
    for k in range(1, S):                                              # the step each reuse takes its output from
        src[k] = last
        last = np.where(reused[k], last, k)
    at = lambda k, j: np.take_along_axis(f[:, k], j[None], axis=0)[0]  # f(Y_j, Y_k), j per (M, R)
    delta = np.full(reused.shape, np.inf)
    for k in range(1, S):
        j = src[k]
        d = 1 - at(k, j)
        run = np.ones(reused.shape[1:], dtype=bool)
        for k2 in range(k + 1, S):                                     # the reuses that took step k's output
            run &= reused[k2]
            if not run.any():
                break
            d = d + np.where(run, f[k, k2] - at(k2, j), 0.0)
        delta[k] = np.where(reused[k], np.inf, d)
    return np.where(np.isfinite(delta), delta, np.inf)


def _chain_greedy(f, cost, budget):
    """f (S, S, M, R) -> reused (S, M, R): repeatedly the reuse of least added cost per MAC that fits."""
    S, _, M, R = f.shape
    f = np.where(np.isfinite(f), f, -1.0)                              # (j >= k is never read)
    reused = np.zeros((S, M, R), dtype=bool)
    left, cols = np.full(R, float(budget)), np.arange(R)
    active = np.ones(R, dtype=bool)
    while active.any():
        per_mac = _added_cost(f, reused) / cost[None, :, None]
        per_mac[:, cost[:, None] > left[None, :]] = np.inf             # (S, M, R): what no longer fits
        best = per_mac.reshape(S * M, R).argmin(axis=0)
        active &= np.isfinite(per_mac.reshape(S * M, R)[best, cols])
        k, m = np.divmod(best, M)
        reused[k[active], m[active], cols[active]] = True
        left[active] -= cost[m[active]]
    return reused


# ----------------------------------------------------------------------------
# Figures (matplotlib, the [analysis] extra; imported only here)

def _figure(rows, cols, size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _layer_colours(depth):
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    return [cmap(l / max(depth - 1, 1)) for l in range(depth)]


def _thin(n, most, seed=0):
    """Indices of at most ``most`` of n points, fixed: scatter plots stay readable and small."""
    return np.arange(n) if n <= most else np.sort(np.random.default_rng(seed).choice(n, most, replace=False))


def plot_heatmap(sim, title):
    """The counterpart of the paper's Figure 4: the mean similarity f(Y_{k-1}, Y_k) over rows, one
    panel per kind, layer by step (steps 2.. in sampling order); colour: 1 - f on a log scale."""
    from matplotlib.colors import LogNorm
    m = sim.mean_map()[1:]                                             # (S-1, L, 2)
    gap = np.clip(1 - m, 1e-7, None)
    norm = LogNorm(vmin=float(np.nanmin(gap)), vmax=float(np.nanmax(gap))) if np.isfinite(gap).any() else None
    S = sim.num_steps
    fig, axes = _figure(2, 1, (max(7.0, 0.55 * S + 3), 2 * max(2.6, 0.3 * sim.depth + 1.4)))
    for j, kind in enumerate(KINDS):
        ax = axes[j, 0]
        im = ax.imshow(gap[:, :, j].T, aspect="auto", cmap="magma_r", norm=norm,
                       extent=(1.5, S + 0.5, sim.depth - 0.5, -0.5))
        if m.shape[0] * sim.depth <= 600:
            for k in range(m.shape[0]):
                for l in range(sim.depth):
                    dark = norm is not None and norm(gap[k, l, j]) > 0.6
                    ax.text(k + 2, l, f"{m[k, l, j]:.3f}", ha="center", va="center", fontsize=5,
                            color="white" if dark else "black")
        ax.set_xticks(range(2, S + 1, max(1, S // 10)))
        ax.set_yticks(range(0, sim.depth, max(1, sim.depth // 14)))
        ax.set_title(f"{'attention' if kind == 'attn' else 'MLP'}: mean f(Y_k-1, Y_k) per cell; median over "
                     f"all rows {np.median(sim._pooled(j)):.4f}", fontsize=9)
        ax.set_xlabel("sampling step k (1 = first)")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, shrink=0.9, label="1 - f (colour)")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_lipschitz(sim, title):
    """Per kind: ||dY|| against ||dZ|| (log-log) with the fitted C per layer, the fitted C per layer
    (max and robust), and the similarity against the relative input distance."""
    fit, colours = sim.lipschitz(), _layer_colours(sim.depth)
    fig, axes = _figure(3, 2, (11, 12))
    for j, kind in enumerate(KINDS):
        name = "attention" if kind == "attn" else "MLP"
        ax, bx, cx = axes[0, j], axes[1, j], axes[2, j]
        for l in range(sim.depth):
            ok = sim.fresh[:, l, j] & sim.observed[:, l, j] & (sim.dz[:, l, j] > 0)
            dz, dy = sim.dz[:, l, j][ok], sim.dy[:, l, j][ok]
            idx = _thin(dz.size, POINTS // sim.depth)
            ax.scatter(dz[idx], dy[idx], s=2, color=colours[l], alpha=0.4, lw=0,
                       label=f"L{l}" if sim.depth <= 12 or l % 4 == 0 else None)
            if dz.size:
                xs = np.array([dz.min(), dz.max()])
                ax.plot(xs, fit[kind]["C_q"][l] * xs, color=colours[l], lw=0.8)
            ok_s = sim.observed[:, l, j]
            zd, s = sim.zdist[:, l, j][ok_s], sim.sim[:, l, j][ok_s]
            idx = _thin(zd.size, POINTS // sim.depth)
            cx.scatter(zd[idx], s[idx], s=2, color=colours[l], alpha=0.4, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("||Z_k - Z_k-1||_F")
        ax.set_ylabel("||Y_k - Y_k-1||_F")
        ax.set_title(f"{name}: lines y = C x, C bounding {fit['quantile']:.0%} of each layer's pairs", fontsize=9)
        ax.legend(fontsize=6, markerscale=4, ncol=2)
        x = np.arange(sim.depth)
        bx.bar(x - 0.2, fit[kind]["C_max"], width=0.4, label="C_max (bounds every pair)", color="#777")
        bx.bar(x + 0.2, fit[kind]["C_q"], width=0.4, label=f"C_{fit['quantile']:.2f} (robust)",
               color=colours[sim.depth // 2])
        bx.set_xlabel("layer")
        bx.set_ylabel("C")
        bx.set_title(f"{name}: fitted Dist <= C ||dZ|| per layer", fontsize=9)
        bx.legend(fontsize=7)
        cx.set_xscale("log")
        cx.set_xlabel("||Z_k - Z_k-1|| / ||Z_k||")
        cx.set_ylabel("f(Y_k-1, Y_k)")
        cx.set_title(f"{name}: similarity against the input distance (colour = layer)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_damage(damage, title):
    """Per step: what reusing every module there costs the final latents, beside 1 - mean f."""
    d, f = np.array(damage["by_step"], dtype=float), np.array(damage["mean_f_by_step"], dtype=float)
    fig, axes = _figure(1, 1, (7, 3.6))
    ax = axes[0, 0]
    steps = np.arange(1, len(d) + 1)
    ax.semilogy(steps[1:], d[1:], "o-", color="#b2182b", label="||x_0 - x_0 full|| / ||x_0 full||")
    ax.semilogy(steps[1:], 1 - f[1:], "s--", color="#2166ac", label="1 - mean f(Y_k-1, Y_k)")
    ax.set_xticks(range(2, len(d) + 1, max(1, len(d) // 10)))
    ax.set_xlabel("the one step k at which every module reuses (1 = first)")
    ax.set_title(f"Spearman(damage, 1 - f) over steps: {damage['spearman_damage_vs_1_minus_f']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_gates(sim, title, threshold=DEFAULT_THRESHOLD):
    """Per kind: the gate logit against the measured similarity at the trained steps (colour = layer),
    and the Spearman correlation of -logit with the similarity per layer, pooled and within steps."""
    corr, colours = sim.gate_correlation(threshold), _layer_colours(sim.depth)
    trained = np.ones(sim.sim.shape[:3], bool) if sim.trained is None else sim.trained
    fig, axes = _figure(2, 2, (11, 8))
    for j, kind in enumerate(KINDS):
        name = "attention" if kind == "attn" else "MLP"
        ax, bx = axes[0, j], axes[1, j]
        for l in range(sim.depth):
            ok = sim.observed[:, l, j] & trained[:, l, j, None] & np.isfinite(sim.logit[:, l, j])
            u, s = sim.logit[:, l, j][ok], sim.sim[:, l, j][ok]
            idx = _thin(u.size, POINTS // sim.depth)
            ax.scatter(u[idx], s[idx], s=2, color=colours[l], alpha=0.4, lw=0,
                       label=f"L{l}" if sim.depth <= 12 or l % 4 == 0 else None)
        logit_t = float(np.log(threshold / (1 - threshold))) if 0 < threshold < 1 else 0.0
        ax.axvline(logit_t, color="k", lw=0.6, ls="--")
        c = corr[kind]
        ax.set_title(f"{name}: Spearman(-logit, f) {c['spearman']:.2f}, Pearson(1 - score, f) {c['pearson']:.2f}",
                     fontsize=9)
        ax.set_xlabel("gate logit (sum over tokens of Z w); left of the line: reuse")
        ax.set_ylabel("f(Y_k-1, Y_k)")
        ax.legend(fontsize=6, markerscale=4, ncol=2)
        x = np.arange(sim.depth)
        bx.bar(x - 0.2, [r["spearman"] for r in c["by_layer"]], width=0.4, color="#777",
               label="pooled over steps and rows")
        bx.bar(x + 0.2, [r["spearman_within"] for r in c["by_layer"]], width=0.4, color=colours[sim.depth // 2],
               label="within a step, across rows (mean)")
        bx.axhline(0, color="k", lw=0.6)
        bx.set_ylim(-1, 1)
        bx.set_xlabel("layer")
        bx.set_ylabel("Spearman(-logit, f)")
        bx.set_title(f"{name}: per layer ({corr['trained_steps']} trained steps)", fontsize=9)
        bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def save_png(fig, file, dpi=100):
    """The figure as a palette PNG (256 colours, Pillow): a third of matplotlib's RGBA file."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256).save(file, format="png", optimize=True)


# ----------------------------------------------------------------------------
# The command (``tinylazy analyze``, on tinylazy.cli's convention)

def add_arguments(p):
    n = cli.number
    p.add_argument("--weights", help=f"DiT safetensors file, diffusers folder, or a bundled model's name "
                   f"(default: {DEFAULT_MODEL})")
    p.add_argument("--random", metavar="CONFIG", help="analyse a randomly initialised model of this registered "
                   "configuration instead (e.g. DiT-XL/2; every tensor random, adaLN included)")
    p.add_argument("--steps", type=n(int, 2, 1000), default=20, help="DDIM steps, 2..1000 (default: 20)")
    p.add_argument("--cfg-scale", type=n(float, 1), default=1.5, help="guidance scale >= 1; 1 = none (default: 1.5)")
    p.add_argument("--num", type=n(int, 1), default=64, help="samples (default: 64)")
    p.add_argument("--batch", type=n(int, 1), help="samples per sampling run (default: all)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of the noise (default: 0)")
    p.add_argument("--gates", type=resources.gates_path,
                   help="LazyDiT gates file (or a bundled one's name) to score (default: the gates `tinylazy sample --lazy` "
                        "would use for --steps, where there are any)")
    p.add_argument("--no-gates", action="store_true", help="score no gates")
    p.add_argument("--lazy", action="store_true", help="sample lazily with the gates and analyse that run "
                   "(default: a plain run, the gates only scored)")
    p.add_argument("--threshold", type=n(float, 0, 1), default=DEFAULT_THRESHOLD,
                   help="gate threshold (default: 0.5)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--out", default="analysis", help="prefix of the outputs, replaced if they exist: "
                   "PREFIX-heatmap.png, PREFIX-lipschitz.png, PREFIX-gates.png (with gates), PREFIX-damage.png "
                   "(with --damage) and PREFIX.json (default: analysis, in the current folder)")
    p.add_argument("--json", help="the report (default: PREFIX.json)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON report only (no matplotlib needed)")
    p.add_argument("--damage", action="store_true", help="also measure what reusing every module at one step "
                   "costs the final latents, step by step (steps - 1 more lazy runs; PREFIX-damage.png)")


def _check_args(args):
    """Everything before any file is read: -> (weights path or None, the outputs: [json, heatmap, lipschitz,
    gates, damage] (the PNGs only without --no-plots))."""
    if args.random and args.weights:
        raise cli.UsageError("give --weights or --random, not both")
    if args.no_gates and (args.gates or args.lazy):
        raise cli.UsageError("--no-gates contradicts --gates / --lazy")
    if args.random and args.lazy and not args.gates:
        raise cli.UsageError("--lazy with --random needs --gates PATH (a random model has no gates of its own)")
    if not args.no_plots:
        cli.require("matplotlib", "the figures (or pass --no-plots)")
    cli.check_backend(args.backend)
    cli.input_file(args.gates, "--gates")
    path = None if args.random else cli.weights_input(args.weights or DEFAULT_MODEL)
    inputs = {"--weights": path, "--gates": args.gates}
    outputs = [cli.output_file(args.json or args.out + ".json", "--json" if args.json else "--out", (".json",),
                               inputs=inputs)]
    if not args.no_plots:
        outputs += [cli.output_file(f"{args.out}-{name}.png", "--out", (".png",), inputs=inputs)
                    for name in ("heatmap", "lipschitz", "gates", "damage")]
    return path, outputs


def _load(args, path):
    """-> (model, where it came from, gates or None, gates path or None); files that do not fit are UsageErrors."""
    from . import api
    from .config import get_config
    from .dit import DiT
    from .lazy import load_gates
    if args.random:
        try:
            cfg = get_config(args.random)
        except KeyError as e:
            raise cli.UsageError(f"--random: {e.args[0]}") from e
        model = DiT.from_config(cfg, seed=args.seed, scheme="random", dtype=args.dtype, backend=args.backend)
        source = f"random {args.random} (seed {args.seed})"
    else:
        try:
            model = api.load_dit(path, dtype=args.dtype, backend=args.backend)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise cli.UsageError(f"cannot load the DiT from {path}: {e}") from e
        source = path
    gpath = None if args.no_gates else args.gates or (find_gates(path, args.steps) if path else None)
    if args.lazy and gpath is None:
        raise cli.UsageError(f"--lazy: no LazyDiT gates for {args.steps} steps of {path} in the current folder or "
                             f"beside the weights; give --gates PATH or train them: tinylazy train-gates "
                             f"--steps {args.steps}")
    gates = None
    if gpath is not None:
        try:
            gates = load_gates(gpath, model, args.steps)
        except (OSError, ValueError) as e:
            raise cli.UsageError(f"--gates {gpath}: {e}") from e
    return model, source, gates, gpath


def markdown(report):
    """The report's numbers as markdown tables."""
    lines = ["| kind | n | min | p5 | median | mean | lowest mean cell (step, layer) |",
             "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        s = report["summary"][kind]
        if not s.get("n"):
            continue
        c = s["lowest_cell"]
        lines.append(f"| {kind} | {s['n']} | {s['min']:.4f} | {s['p5']:.4f} | {s['median']:.4f} | {s['mean']:.4f} "
                     f"| {c['mean']:.4f} ({c['step']}, {c['layer']}) |")
    fit = report["lipschitz"]
    lines += ["", f"| layer | attn C_max | attn C_{fit['quantile']:.2f} | mlp C_max | mlp C_{fit['quantile']:.2f} |",
              "|---|---|---|---|---|"]
    for l in range(report["depth"]):
        lines.append(f"| {l} | {fit['attn']['C_max'][l]:.3g} | {fit['attn']['C_q'][l]:.3g} | "
                     f"{fit['mlp']['C_max'][l]:.3g} | {fit['mlp']['C_q'][l]:.3g} |")
    g = report["gates"]
    if g is not None:
        lines += ["", f"Gates ({g['trained_steps']} trained steps): Spearman(-logit, f) / Pearson(1 - score, f) / "
                  f"Spearman within a (step, layer) cell, across rows",
                  "", "| | " + " | ".join(f"L{l}" for l in range(report["depth"])) + " | all |",
                  "|---" * (report["depth"] + 2) + "|"]
        for kind in KINDS:
            cells = [f"{r['spearman']:.2f} / {r['pearson']:.2f} / {r['spearman_within']:.2f}"
                     for r in g[kind]["by_layer"] + [g[kind]]]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        o = g["overall"]
        lines.append(f"\noverall: Spearman {o['spearman']:.3f}, Pearson {o['pearson']:.3f}, within cells "
                     f"{o['spearman_within']:.3f} (n = {o['n']}); the gates "
                     f"would reuse {o['reuse_share']:.1%}: mean f {o['sim_reused']:.4f} there, {o['sim_computed']:.4f} "
                     f"where they compute")
    return "\n".join(lines)


def run(args):
    path, outputs = _check_args(args)
    model, source, gates, gpath = _load(args, path)
    n = args.num
    from .sampling import make_noise
    noise = make_noise(model, n, seed=args.seed)
    labels = np.arange(n, dtype=np.int64) % model.config.num_classes
    print(f"{model} from {source}; DDIM {args.steps} steps, cfg {args.cfg_scale}, {n} samples, seed {args.seed}, "
          f"{'lazy with' if args.lazy else 'gates scored:'} {gpath or 'none'}", file=sys.stderr)
    t0 = time.perf_counter()
    _, sim = analyse(model, noise, labels, args.steps, args.cfg_scale, gates, args.lazy, args.threshold,
                     batch=args.batch, progress=True)
    report = sim.report()
    if args.damage:
        damage = reuse_damage(model, noise, labels, args.steps, args.cfg_scale, args.batch, progress=True)
        f = _nanmean(sim.mean_map(), axis=(1, 2))
        ok = np.isfinite(damage)
        report["damage"] = {"by_step": _floats(damage), "mean_f_by_step": _floats(f),
                            "spearman_damage_vs_1_minus_f": _corr(*_ranks(damage[ok], 1 - f[ok])),
                            "note": "relative L2 distance of the final latents to the full run's when every "
                                    "module reuses at that step only"}
    seconds = time.perf_counter() - t0
    report["run"] = {"model": source if args.random else os.path.basename(source),
                     "weights_hash": model.weights_hash, "steps": args.steps,
                     "cfg_scale": args.cfg_scale, "num": n, "seed": args.seed, "labels": "i % num_classes",
                     "dtype": args.dtype, "gates": os.path.basename(gpath) if gpath else None,
                     "gates_hash": gates_hash(gates) if gates is not None else None, "lazy": args.lazy,
                     "threshold": args.threshold, "seconds": round(seconds, 1)}
    text = json.dumps(_json_ready(report), indent=1, allow_nan=False)
    with atomic.writing(outputs[0]) as f:
        f.write(text.encode())
    written = [outputs[0]]
    if not args.no_plots:
        what = (f"{source if args.random else os.path.basename(source)}, DDIM {args.steps}, cfg {args.cfg_scale}, "
                f"{n} samples{', lazy' if args.lazy else ''}")
        figs = [(outputs[1], plot_heatmap(sim, f"consecutive-step similarity: {what}")),
                (outputs[2], plot_lipschitz(sim, f"Dist <= C ||dZ||: {what}"))]
        if sim.scored:
            figs.append((outputs[3], plot_gates(sim, f"gate vs similarity ({os.path.basename(gpath)}): {what}",
                                                args.threshold)))
        if args.damage:
            figs.append((outputs[4], plot_damage(report["damage"], f"one step of reuse: {what}")))
        for path, fig in figs:
            with atomic.writing(path) as f:
                save_png(fig, f)
            written.append(path)
    print(markdown(report))
    print(f"{seconds:.1f} s; wrote {', '.join(written)}", file=sys.stderr)


def main(argv=None, prog=None):
    return cli.run_command("analyze", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.analysis"))
