"""LazyDiT (Shen et al., AAAI 2025): gates that skip attention / MLP modules while sampling.

For every respaced sampling step s, block l and module kind (attention, MLP) a gate
is a vector w (D,), no bias, zero-initialised.  With Z (B, T, D) the modulated,
normalised input of the module, the score (the probability to *compute*, as in the
official code) is

    score = sigmoid(sum over tokens of Z @ w)                      (paper eq. 4)

At sampling time a module runs when ``score >= threshold`` (0.5) and otherwise
reuses its own output of the previous step (paper eq. 7), cached *before* the
gate_msa / gate_mlp multiply; adaLN, the residual and the gate multiply still run.
The first step always computes (there is no cache yet).  Decisions are per sample:
a batch with mixed decisions runs the module on the rows that compute only, and
the two halves of a guided batch [cond; uncond] decide independently, as the
official ``DiTBlock.forward(accelerate=True)`` does.

Gates live in ``LazyGates`` ((steps, depth, D) arrays per kind) and are stored in
safetensors under the official names ``blocks.{l}.attn_lazy_learning.{s}.weight``
and ``blocks.{l}.mlp_lazy_learning.{s}.weight`` (shape (1, D); ``layers.{l}...`` for
Large-DiT, whose block list has that name), with metadata that
ties them to one DiT (its weights hash), one step count and one timestep map.
Training the gates is ``lazy_train.py``.
"""
import glob
import hashlib
import json
import numbers
import os
import re

import numpy as np

from .backend import array_module_of, to_numpy
from .diffusion import NUM_TRAIN_TIMESTEPS, create_diffusion
from .errors import FileError
from .io import FLOAT_DTYPES, SafetensorsFile, weights_hash, write_safetensors
from .protocol import KINDS

FORMAT = "tinylazy-lazydit-gates-v1"
DEFAULT_THRESHOLD = 0.5                      # official attn_threshold / mlp_threshold


class GatesError(FileError):
    """Gates that do not fit a model or a sampling run; the message names the file and the reason."""


def gate_key(kind, layer, step, blocks="blocks"):
    """Official state-dict name of a gate: ``blocks.{l}.{kind}_lazy_learning.{s}.weight``
    (``blocks``: the model's block list, "layers" for Large-DiT)."""
    return f"{blocks}.{layer}.{kind}_lazy_learning.{step}.weight"


def block_prefix(config):
    """The official name of a model's block list: "blocks" (DiT) or "layers" (Large-DiT)."""
    return getattr(config, "block_prefix", "blocks")


# Indices of at most 6 digits: a longer number is not a gate name (and sizes nothing).
_OFFICIAL_KEY = re.compile(r"(blocks|layers)\.(\d{1,6})\.(attn|mlp)_lazy_learning\.(\d{1,6})\.weight")
# The official LazyDiT checkpoint dict ("model" entry of its .pt files, as tinylazy.convert writes it).
_CHECKPOINT_KEY = re.compile(r"block_(\d{1,6})_(attn|mlp)_lazy_learning_weight_(\d{1,6})")


def gates_hash(gates):
    """sha256 of a LazyGates' timestep map and float32 gate vectors: which gates a lazy run used."""
    h = hashlib.sha256(b"tinylazy-gates-v1\0")
    for a in (gates.timestep_map.astype("<i8"), gates.attn.astype("<f4"), gates.mlp.astype("<f4")):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def gates_file(weights_path, steps, variant=None):
    """Where the gates of a weights file live: ``<weights stem>.gates-ddim<steps>.safetensors`` beside it
    (the ones ``--lazy`` uses); ``variant`` names others kept beside them, ``...ddim<steps>-<variant>``
    (the bundled model's ``official``: the paper's recipe, kept as its baseline)."""
    stem = str(weights_path)
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    return f"{stem.rstrip('/')}.gates-ddim{int(steps)}{'-' + variant if variant else ''}.safetensors"


def _gate_places(weights, steps):
    """Where --lazy looks, in order: the current folder (what train-gates writes), then beside the weights."""
    beside = gates_file(weights, steps)
    return list(dict.fromkeys([os.path.basename(beside), beside]))


def find_gates(weights, steps):
    """The gates file --lazy uses for ``steps`` sampling steps, or None."""
    return next((p for p in _gate_places(weights, steps) if os.path.isfile(p)), None)


def gate_step_counts(weights):
    """The step counts that gates exist for in those places (for error messages)."""
    found = [f for p in _gate_places(weights, 0) for f in glob.glob(glob.escape(p[: -len("0.safetensors")]) + "*")]
    return sorted({int(m.group(1)) for f in found if (m := re.search(r"ddim(\d+)\.safetensors$", f))})


def model_weights_hash(model):
    """The hash of ``model``'s weights: the one it was built with, else ``io.weights_hash`` of its params."""
    return weights_hash(model) if model.weights_hash is None else model.weights_hash


# ----------------------------------------------------------------------------
# Gates

class LazyGates:
    """The gate vectors of one DiT for one respaced schedule.

    attn, mlp: host arrays (num_steps, depth, D), indexed by the respaced step s
    (s = num_steps - 1 is the first sampling step, s = 0 the last), as the official
    ``create_lazy_learning`` indexes its ModuleLists through ``timestep_map``.
    timestep_map: (num_steps,) original timesteps of the schedule.  weights_hash:
    the DiT they were trained for (None when unknown, e.g. a converted official
    checkpoint).  training: a dict of facts about how they were made.  blocks: the official
    name of the model's block list, the prefix of the gates' names ("layers" for Large-DiT).
    """

    def __init__(self, attn, mlp, timestep_map, weights_hash=None, training=None, blocks="blocks"):
        attn, mlp = np.asarray(attn), np.asarray(mlp)
        if attn.ndim != 3 or attn.shape != mlp.shape:
            raise GatesError(f"gate arrays must both be (num_steps, depth, D), got {attn.shape} and {mlp.shape}")
        timestep_map = np.asarray(timestep_map, dtype=np.int64).reshape(-1)
        if timestep_map.shape[0] != attn.shape[0]:
            raise GatesError(f"timestep_map has {timestep_map.shape[0]} entries for {attn.shape[0]} steps")
        self.attn, self.mlp = attn, mlp
        self.timestep_map = timestep_map
        self.weights_hash = weights_hash
        self.training = dict(training or {})
        self.blocks = blocks

    @classmethod
    def zeros(cls, model, steps, dtype=None):
        """Fresh gates (score 0.5 everywhere, so every module computes) for ``steps`` DDIM steps."""
        cfg = model.config
        tmap = create_diffusion(steps).timestep_map
        shape = (len(tmap), cfg.depth, cfg.hidden_size)
        dt = model.dtype if dtype is None else np.dtype(dtype)
        return cls(np.zeros(shape, dt), np.zeros(shape, dt), tmap, model_weights_hash(model),
                   blocks=block_prefix(cfg))

    @property
    def num_steps(self):
        return self.attn.shape[0]

    @property
    def depth(self):
        return self.attn.shape[1]

    @property
    def hidden_size(self):
        return self.attn.shape[2]

    def of(self, kind):
        return self.attn if kind == "attn" else self.mlp

    def state_dict(self):
        """Official names -> (1, D) arrays (views)."""
        return {gate_key(kind, l, s, self.blocks): self.of(kind)[s, l][None]
                for s in range(self.num_steps) for l in range(self.depth) for kind in KINDS}

    def metadata(self):
        meta = {"format": FORMAT, "num_sampling_steps": str(self.num_steps),
                "timestep_map": json.dumps(self.timestep_map.tolist()),
                "depth": str(self.depth), "hidden_size": str(self.hidden_size),
                "training": json.dumps(self.training, sort_keys=True)}
        if self.weights_hash is not None:
            meta["weights_hash"] = self.weights_hash
        return meta

    def check_run(self, model, timestep_map):
        """Raise GatesError unless these gates fit ``model`` and a run with ``timestep_map``."""
        cfg = model.config
        if (self.depth, self.hidden_size) != (cfg.depth, cfg.hidden_size):
            raise GatesError(f"gates are for depth {self.depth}, hidden {self.hidden_size}; the model has "
                             f"depth {cfg.depth}, hidden {cfg.hidden_size}")
        tmap = np.asarray(timestep_map)
        if len(tmap) != self.num_steps:
            raise GatesError(f"gates were made for {self.num_steps} sampling steps; this run uses {len(tmap)} "
                             f"(train gates for {len(tmap)} steps: tinylazy train-gates --steps {len(tmap)})")
        if not np.array_equal(tmap, self.timestep_map):
            raise GatesError(f"gates were made for another respacing of {self.num_steps} steps "
                             f"(timestep map {self.timestep_map.tolist()[:4]}..., run {tmap.tolist()[:4]}...)")
        mh = model.weights_hash
        if self.weights_hash is not None and mh is not None and mh != self.weights_hash:
            raise GatesError(f"gates were trained for DiT weights {self.weights_hash[:12]}, "
                             f"this model's weights are {mh[:12]}")

    def __repr__(self):
        h = self.weights_hash[:12] if self.weights_hash else "unknown"
        return f"LazyGates(steps={self.num_steps}, depth={self.depth}, hidden={self.hidden_size}, weights={h})"


def save_gates(gates, path, training=None):
    """Write ``gates`` to a safetensors file (atomic), float32, official names, with metadata."""
    if training:
        gates.training.update(training)
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in gates.state_dict().items()}
    write_safetensors(path, tensors, gates.metadata())


def _parse_keys(path, entries, blocks="blocks"):
    """-> {(kind, l, s): file key} from official names (of a model whose block list is ``blocks``)
    or the official checkpoint's names (the same for both families); header only."""
    found = {}
    for name in entries:
        m = _OFFICIAL_KEY.fullmatch(name)
        if m is not None:
            if m.group(1) != blocks:
                raise GatesError(f"{path}: {name!r} is a gate of a model whose blocks are {m.group(1)}.*, "
                                 f"this model's are {blocks}.* (gates of another model family)")
            l, kind, s = int(m.group(2)), m.group(3), int(m.group(4))
        else:
            m = _CHECKPOINT_KEY.fullmatch(name)
            if m is None:
                shown = name if len(name) <= 120 else name[:120] + "..."
                raise GatesError(f"{path}: {shown!r} is not a LazyDiT gate "
                                 f"(expected {blocks}.{{l}}.attn_lazy_learning.{{s}}.weight or the mlp one)")
            l, kind, s = int(m.group(1)), m.group(2), int(m.group(3))
        if (kind, l, s) in found:
            raise GatesError(f"{path}: gate {kind} layer {l} step {s} appears twice")
        found[(kind, l, s)] = name
    if not found:
        raise GatesError(f"{path}: no gates in the file")
    return found


_GATES_METADATA = {"format", "num_sampling_steps", "timestep_map", "depth", "hidden_size", "training", "weights_hash"}


def _meta_int(path, meta, key):
    v = meta[key]
    if not re.fullmatch(r"[0-9]{1,9}", v):
        raise GatesError(f"{path}: metadata {key!r} is {v[:40]!r}, not a whole number")
    return int(v)


def _meta_json(path, meta, key, kind):
    from .io import parse_json
    v = parse_json(meta[key], f"{path}: metadata {key!r}", GatesError)
    if not isinstance(v, kind):
        raise GatesError(f"{path}: metadata {key!r} is a JSON {type(v).__name__}, not a {kind.__name__}")
    return v


def _check_gates_metadata(path, meta, S, cfg):
    """The metadata must describe the tensors it travels with; -> (timestep map or None, training dict)."""
    if "format" in meta and meta["format"] != FORMAT:
        raise GatesError(f"{path}: metadata format {meta['format'][:40]!r}, expected {FORMAT!r}")
    unknown = sorted(set(meta) - _GATES_METADATA) if "format" in meta else []
    if unknown:                                 # e.g. a damaged 'weights_hash' key would silently drop the check
        raise GatesError(f"{path}: unknown metadata {unknown[0][:40]!r} in a {FORMAT} file")
    for key, have in (("num_sampling_steps", S), ("depth", cfg.depth), ("hidden_size", cfg.hidden_size)):
        if key in meta and _meta_int(path, meta, key) != have:
            raise GatesError(f"{path}: metadata says {key} {meta[key]}, the tensors hold {have}")
    tmap = None
    if "timestep_map" in meta:
        tmap = _meta_json(path, meta, "timestep_map", list)
        if (len(tmap) != S or not all(type(t) is int and 0 <= t < NUM_TRAIN_TIMESTEPS for t in tmap)
                or any(a >= b for a, b in zip(tmap, tmap[1:]))):
            raise GatesError(f"{path}: metadata timestep_map must list {S} increasing timesteps in "
                             f"0..{NUM_TRAIN_TIMESTEPS - 1}, one per step")
        tmap = np.asarray(tmap, dtype=np.int64)
    training = _meta_json(path, meta, "training", dict) if "training" in meta \
        else {"source": meta.get("source", "unknown")[:200]}
    if "weights_hash" in meta and not re.fullmatch(r"[0-9a-f]{64}", meta["weights_hash"]):
        raise GatesError(f"{path}: metadata weights_hash {meta['weights_hash'][:70]!r} is not a sha256 hex digest")
    return tmap, training


def load_gates(path, model, steps=None):
    """Read gates for ``model`` from ``path``; refuse gates made for another model or step count.

    Accepts tinylazy's files and official LazyDiT gate checkpoints converted with
    ``python -m tinylazy.convert`` (their ``block_{l}_attn_lazy_learning_weight_{s}``
    names; such a file carries no weights hash, so only its shapes and step count are
    checked and the timestep map is the official ``create_diffusion(str(steps))`` one).
    steps: the number of sampling steps the caller will use (checked when given).
    Names, dtypes (floating point only), shapes, indices (layers 0..depth-1, steps
    0..S-1, every one present once) and metadata are checked from the header before
    any gate is read; a file that does not fit is a GatesError (a malformed file a
    WeightsError), never a partial or shifted load.
    """
    path = str(path)
    cfg = model.config
    with SafetensorsFile(path) as f:
        found = _parse_keys(path, f.entries, block_prefix(cfg))
        bad = next(((k, f.entries[k]) for k in found.values()
                    if f.entries[k].dtype not in FLOAT_DTYPES or len(f.entries[k].shape) != 2
                    or f.entries[k].shape[0] != 1), None)
        if bad is not None:
            raise GatesError(f"{path}: {bad[0]!r} is {bad[1].dtype} {bad[1].shape}, a gate is a floating-point "
                             f"(1, D) vector")
        layers = {l for _, l, _ in found}
        if max(layers) >= cfg.depth:
            raise GatesError(f"{path}: gates for block {max(layers)} but the model has depth {cfg.depth}")
        step_ids = {s for _, _, s in found}
        S = len(step_ids)
        if S > NUM_TRAIN_TIMESTEPS or step_ids != set(range(S)):
            hole = min(set(range(S)) - step_ids, default=S)
            raise GatesError(f"{path}: gate steps are numbered up to {max(step_ids)} (no step {hole}): they must "
                             f"run 0..S-1 without holes, S <= {NUM_TRAIN_TIMESTEPS}")
        if len(found) != S * cfg.depth * len(KINDS):
            missing = next(gate_key(kind, l, s, block_prefix(cfg)) for s in range(S) for l in range(cfg.depth)
                           for kind in KINDS if (kind, l, s) not in found)
            raise GatesError(f"{path}: missing {S * cfg.depth * len(KINDS) - len(found)} gates for a "
                             f"depth-{cfg.depth} model with {S} steps, e.g. {missing!r}")
        D = {f.entries[k].shape[1] for k in found.values()}
        if D != {cfg.hidden_size}:
            raise GatesError(f"{path}: gates of width {sorted(D)[:4]}, the model has hidden size {cfg.hidden_size}")
        tmap, training = _check_gates_metadata(path, f.metadata, S, cfg)
        if steps is not None and int(steps) != S:
            raise GatesError(f"{path}: gates were made for {S} sampling steps, not {steps}")
        file_hash = f.metadata.get("weights_hash")
        if file_hash is not None and file_hash != model_weights_hash(model):
            raise GatesError(f"{path}: gates were trained for DiT weights {file_hash[:12]}, this model's weights "
                             f"are {model_weights_hash(model)[:12]} (different weights file, or gates recorded with the "
                             f"tensors-only hash of tinylazy before the hash covered the config)")
        gates = {kind: np.empty((S, cfg.depth, cfg.hidden_size), np.float32) for kind in KINDS}
        for (kind, l, s), key in found.items():
            f.read(key, np.float32, out=gates[kind][s, l][None])
    if tmap is None:
        tmap = create_diffusion(S).timestep_map
    return LazyGates(gates["attn"], gates["mlp"], tmap, file_hash, training, block_prefix(cfg))


# ----------------------------------------------------------------------------
# Decisions: forced tables (tests, baselines, benchmarks; True = compute), the rule, the gate score

def alternate_decisions(steps, depth):
    """The alternate-step rule: compute every module on even sampling steps, reuse on odd ones.

    Steps count in sampling order (k = 0 is the first step).  Lazy ratio floor(steps/2)/steps.
    """
    keep = np.ones((steps, depth, 2), dtype=bool)
    keep[1::2] = False
    return keep


def random_decisions(steps, depth, ratio, seed=0):
    """Skip a random ``ratio`` of all (step, layer, module) evaluations, shared by every sample.

    The first step cannot skip, so round(ratio * steps * depth * 2) skips are drawn
    from the other steps' evaluations.
    """
    n_total, n_free = steps * depth * 2, (steps - 1) * depth * 2
    n_skip = int(round(ratio * n_total))
    if not 0 <= n_skip <= n_free:
        raise ValueError(f"cannot skip {ratio:.0%} of {n_total} evaluations: the first step always computes")
    keep = np.ones(n_total, dtype=bool)
    keep[n_total - n_free + np.random.default_rng(seed).permutation(n_free)[:n_skip]] = False
    return keep.reshape(steps, depth, 2)


class DecisionRule:
    """The one rule by which a module computes (True) or reuses its cached output (False), per row.

    decisions (forced; they win over the gates): None, a bool array (steps, depth, 2) or
    (steps, depth, 2, rows) in sampling order, or a callable (step, layer, kind, scores) ->
    bool or (rows,) bool.  Otherwise a gated row computes when its score >= threshold (the
    official ``attn_threshold`` / ``mlp_threshold``), and without gates every row computes.
    The first step has no cache and computes whatever the rule says (``LazyDiT.module``).
    """

    def __init__(self, threshold=DEFAULT_THRESHOLD, decisions=None, num_steps=None, depth=None):
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.fn = decisions if callable(decisions) else None
        self.table = None
        if decisions is not None and self.fn is None:
            table = np.asarray(decisions)
            if table.dtype != bool or table.shape[:3] != (num_steps, depth, 2) or table.ndim not in (3, 4):
                raise ValueError(f"decisions must be a bool array of shape ({num_steps}, {depth}, 2) or "
                                 f"({num_steps}, {depth}, 2, rows), or a callable; got {table.dtype} {table.shape}")
            self.table = table

    def __call__(self, k, l, kind, scores, rows):
        """-> (rows,) bool on the host for module kind of layer l at sampling step k; scores: (rows,) or None."""
        if self.fn is not None:
            keep = self.fn(k, l, kind, scores)
        elif self.table is not None:
            keep = self.table[k, l, KINDS.index(kind)]
        elif scores is not None:
            keep = scores >= self.threshold
        else:
            keep = True
        return np.broadcast_to(np.asarray(to_numpy(keep), dtype=bool), (rows,))


def gate_logit(z, w):
    """sum over tokens of Z @ w, the gate's logit before the sigmoid: z (B, T, D), w (D,) -> (B,).

    The official order: the per-token products, then their sum over tokens."""
    return (z @ w).sum(axis=1)                                           # (B, T, D) @ (D,) -> (B, T) -> (B,)


def score_of_logit(u):
    """sigmoid(u), in u's array module: the score (probability to compute) of a gate logit."""
    with np.errstate(over="ignore"):                                     # exp(-u) = inf gives the right 0
        return 1.0 / (1.0 + array_module_of(u).exp(-u))


def gate_score(z, w):
    """sigmoid(sum over tokens of Z @ w) (paper eq. 4): z (B, T, D), w (D,) -> (B,), in z's array module."""
    return score_of_logit(gate_logit(z, w))


# ----------------------------------------------------------------------------
# Cost model and statistics

def module_macs(cfg):
    """Multiply-accumulates per sample row of each part of one forward pass (GEMMs and attention).

    A config of another family (large_dit.LargeDiTConfig) counts its own (``cfg.module_macs()``)."""
    if hasattr(cfg, "module_macs"):
        return cfg.module_macs()
    T, D, F, C = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden, cfg.in_channels
    p = cfg.patch_size
    return {
        "attn": 4 * T * D * D + 2 * T * T * D,          # qkv 3TD^2, q k^T and p v 2T^2 D, proj TD^2
        "mlp": 2 * T * D * F,                           # fc1 and fc2
        "adaLN": 6 * D * D,                             # per block
        "gate": T * D,                                  # Z @ w for one module
        "embed": T * C * p * p * D + 256 * D + D * D,   # patches, timestep MLP
        "final": 2 * D * D + T * D * p * p * cfg.out_channels,
    }


def full_step_macs(cfg):
    """MACs of one plain forward per sample row."""
    m = module_macs(cfg)
    return m["embed"] + cfg.depth * (m["adaLN"] + m["attn"] + m["mlp"]) + m["final"]


class LazyStats:
    """Counts of one or more lazy sampling runs (pass it as ``lazy_stats=`` to ``ddim_sample``).

    Arrays, in sampling order k (k = 0 the first step):
    evals / skips / scored (steps, depth, 2): module evaluations (sample rows, both
    halves of a guided batch counted), how many reused the cache, and how many
    were scored by a gate; row_steps: forward passes x rows.
    """

    def __init__(self):
        self.config = None
        self.evals = self.skips = self.scored = None
        self.row_steps = 0
        self.scores = None             # (steps, depth, 2): sum of gate scores, for mean_score

    def start(self, config, num_steps):
        if self.evals is None:
            self.config = config
            shape = (num_steps, config.depth, 2)
            self.evals, self.skips, self.scored = (np.zeros(shape, np.int64) for _ in range(3))
            self.scores = np.zeros(shape)
        elif self.evals.shape != (num_steps, config.depth, 2):
            raise ValueError(f"these stats hold runs of shape {self.evals.shape[:2]} (steps, depth); "
                             f"use a new LazyStats for {num_steps} steps")

    def record(self, k, l, kind, rows, skipped, scores=None):
        j = KINDS.index(kind)
        self.evals[k, l, j] += rows
        self.skips[k, l, j] += skipped
        if scores is not None:
            self.scored[k, l, j] += rows
            self.scores[k, l, j] += float(np.sum(scores))

    # -- ratios --------------------------------------------------------------------
    @staticmethod
    def _ratio(s, e):
        return float(s.sum() / e.sum()) if e.sum() else 0.0

    @property
    def lazy_ratio(self):
        """Skipped module evaluations / all module evaluations (the paper's Gamma, both kinds)."""
        return self._ratio(self.skips, self.evals)

    def ratio_by_kind(self):
        return {kind: self._ratio(self.skips[..., j], self.evals[..., j]) for j, kind in enumerate(KINDS)}

    @property
    def macs_lazy_ratio(self):
        """The lazy ratio weighted by cost: the modules' MACs reused / all the modules' MACs (an MLP
        costs more than attention on small images); equal to ``lazy_ratio`` when both kinds are reused
        alike, as by the rules."""
        m = module_macs(self.config)
        cost = np.array([m[kind] for kind in KINDS], dtype=np.float64)
        return self._ratio((self.skips.sum((0, 1)) * cost), (self.evals.sum((0, 1)) * cost))

    def ratio_by_layer(self):
        """(depth, 2): the lazy ratio of each layer's attention and MLP over all steps."""
        return self.skips.sum(0) / np.maximum(self.evals.sum(0), 1)

    def ratio_by_step(self):
        """(steps,): the lazy ratio of each sampling step over layers and kinds."""
        return self.skips.sum((1, 2)) / np.maximum(self.evals.sum((1, 2)), 1)

    def ratio_map(self):
        """(steps, depth, 2): the lazy ratio of every (step, layer, kind)."""
        return self.skips / np.maximum(self.evals, 1)

    def mean_score(self):
        """(steps, depth, 2): the mean gate score where scored, NaN elsewhere."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.scored > 0, self.scores / np.maximum(self.scored, 1), np.nan)

    # -- cost ---------------------------------------------------------------------------
    def macs(self):
        """(spent, full): MACs of the lazy runs and of the same runs without skipping."""
        m = module_macs(self.config)
        full = self.row_steps * full_step_macs(self.config)
        saved = int(self.skips[..., 0].sum()) * m["attn"] + int(self.skips[..., 1].sum()) * m["mlp"]
        return full - saved + int(self.scored.sum()) * m["gate"], full

    def summary(self):
        spent, full = self.macs()
        kinds = self.ratio_by_kind()
        return {"lazy_ratio": self.lazy_ratio, "attn": kinds["attn"], "mlp": kinds["mlp"],
                "by_layer": self.ratio_by_layer().tolist(), "by_step": self.ratio_by_step().tolist(),
                "macs_spent": spent, "macs_full": full, "macs_ratio": spent / full if full else 1.0}

    def __str__(self):
        s = self.summary()
        return (f"lazy ratio {s['lazy_ratio']:.1%} (attention {s['attn']:.1%}, MLP {s['mlp']:.1%}); "
                f"MACs {s['macs_spent'] / 1e9:.3g} G of {s['macs_full'] / 1e9:.3g} G full ({s['macs_ratio']:.1%})")

    def heatmap(self, path, title=None):
        """Write the paper's Figure 4 as a PNG: per-layer laziness of attention and MLP (Pillow only).

        Two panels (attention, MLP); in each, one row per layer, one column per
        sampling step (first step on the left), and a last column with the layer's
        lazy ratio over all steps; white = always computed, dark = always reused.
        """
        from PIL import Image, ImageDraw, ImageFont
        from .image import save_png
        ratios = self.ratio_map()                                  # (S, L, 2)
        S, L, _ = ratios.shape
        cell, gap, left, top, label_h = 16, 24, 44, 34, 18
        panel_w = (S + 2) * cell
        W = left + 2 * panel_w + gap + 8
        H = top + L * cell + label_h + 24
        img = Image.new("RGB", (W, H), "white")
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default()
        colour = lambda r: tuple(int(round(255 - r * (255 - c))) for c in (20, 60, 140))   # white -> navy
        s = self.summary()
        draw.text((4, 4), title or f"lazy ratio {s['lazy_ratio']:.0%} over {S} steps", fill="black", font=font)
        for j, name in enumerate(("attention", "MLP")):
            x0 = left + j * (panel_w + gap)
            draw.text((x0, top - 14), f"{name} {self.ratio_by_kind()[KINDS[j]]:.0%}", fill="black", font=font)
            per_layer = self.ratio_by_layer()[:, j]
            for l in range(L):
                y = top + l * cell
                for k in range(S):
                    draw.rectangle([x0 + k * cell, y, x0 + (k + 1) * cell - 1, y + cell - 1],
                                   fill=colour(ratios[k, l, j]))
                xs = x0 + (S + 1) * cell                                # the per-layer column, one cell apart
                draw.rectangle([xs, y, xs + cell - 1, y + cell - 1], fill=colour(per_layer[l]),
                               outline=(160, 160, 160))
                if j == 0:
                    draw.text((4, y + 2), f"L{l}", fill="black", font=font)
            draw.rectangle([x0 - 1, top - 1, x0 + S * cell, top + L * cell], outline=(120, 120, 120))
            draw.text((x0, top + L * cell + 4), f"step 1..{S}  | all", fill="black", font=font)
        return save_png(img, path)


# ----------------------------------------------------------------------------
# Lazy sampling

class LazyDiT:
    """A model that reuses module outputs across the steps of one sampling run (paper eq. 7).

    It has the model protocol (protocol.py), so the ordinary samplers drive it, and runs the
    wrapped model's block schema with a branch hook (``module``) that computes or reuses
    each module, row by row, by ``DecisionRule``.  One instance holds the cache of one run.
    The gate of a forward pass is looked up from its first timestep, as the official code
    does (a batch shares one step).  Where the arrays live is the business of four methods
    that the OpenCL backend overrides (``opencl.OpenCLLazyDiT``): ``upload_gates``,
    ``scores``, ``rows`` and ``run_branch``.
    """

    def __init__(self, model, timestep_map, gates=None, threshold=DEFAULT_THRESHOLD, decisions=None, stats=None):
        self.num_steps = len(timestep_map)
        self.rule = DecisionRule(threshold, decisions, self.num_steps, model.config.depth)
        self.model = model
        self.config, self.backend, self.xp, self.dtype = model.config, model.backend, model.xp, model.dtype
        self.params, self.weights_hash = model.params, model.weights_hash
        self.step_of = {int(t): i for i, t in enumerate(timestep_map)}     # original timestep -> s
        if gates is not None:
            gates.check_run(model, timestep_map)
        self.gates = gates
        self.gate_w = None if gates is None else self.upload_gates(gates)
        self.stats = stats
        if stats is not None:
            stats.start(model.config, self.num_steps)
        self.cache = {}                     # (layer, kind) -> module output before the gate multiply

    @property
    def recorder(self):
        """The wrapped model's trace recorder (tinylazy.trace): one run records through it."""
        return self.model.recorder

    def check_inputs(self, x, t, y):
        return self.model.check_inputs(x, t, y)

    def forward(self, x, t, y):
        return self.model(x, t, y, branch=self.hook(t, len(x)))

    __call__ = forward

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        return self.model.forward_with_cfg(x, t, y, cfg_scale, guide_channels, branch=self.hook(t, len(x)))

    def hook(self, t, rows):
        """The branch hook of one forward pass of ``rows`` rows at timestep t[0]."""
        t0 = int(np.asarray(to_numpy(t)).reshape(-1)[0])
        s = self.step_of.get(t0)
        if s is None:
            raise ValueError(f"timestep {t0} is not a step of this {self.num_steps}-step schedule")
        k = self.num_steps - 1 - s                                       # sampling order
        if self.stats is not None:
            self.stats.row_steps += rows
        return lambda l, kind, z, cache=None: self.module(k, s, l, kind, z)

    def module(self, k, s, l, kind, z):
        """Module kind of block l at sampling step k (respaced index s) on z: computed for the
        rows the rule keeps, the previous step's output for the others."""
        rows, cached = self.rows(z), self.cache.get((l, kind))
        scores = None
        if cached is None:                                              # first step: no cache, compute
            keep = np.ones(rows, dtype=bool)
        else:
            if cached.shape != z.shape:
                raise ValueError(f"the batch changed within a lazy run ({self.rows(cached)} -> {rows} rows)")
            scores = None if self.gates is None else self.scores(s, l, kind, z)
            keep = self.rule(k, l, kind, scores, rows)
        rec = self.model.recorder
        if rec is not None:                                             # the computing rows' internals follow
            if scores is not None:
                rec(f"block.{l:02d}/{kind}/score", scores)
            rec(f"block.{l:02d}/{kind}/compute", keep)
        out = self.cache[(l, kind)] = self.run_branch(l, kind, z, keep, cached)
        if self.stats is not None:
            self.stats.record(k, l, kind, rows, rows - int(keep.sum()), scores)
        return out

    # -- where the arrays live (NumPy / CuPy; opencl.OpenCLLazyDiT has the device twins) ------
    def upload_gates(self, gates):
        """{kind: (steps, depth, D)} gate vectors as model arrays in the model dtype."""
        return {kind: self.xp.asarray(gates.of(kind), dtype=self.dtype) for kind in KINDS}

    def scores(self, s, l, kind, z):
        """Gate scores (rows,) on the host."""
        return to_numpy(gate_score(z, self.gate_w[kind][s, l]))

    @staticmethod
    def rows(z):
        return z.shape[0]

    def run_branch(self, l, kind, z, keep, cached):
        """The module's output on the rows where keep, ``cached`` on the others (None: none cached)."""
        n_keep = int(keep.sum())
        if n_keep == len(keep):
            return self.model.branch(l, kind, z)
        if n_keep == 0:
            return cached
        idx = self.xp.asarray(np.flatnonzero(keep))                     # gather the computing rows, scatter back
        cached[idx] = self.model.branch(l, kind, z[idx])                # (n_keep, T, D) into the cache, in place
        return cached
