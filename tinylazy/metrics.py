"""Sample quality of digit models: a Frechet distance, class accuracy, and PSNR between sample sets.

    tinylazy metrics --steps 50 --cfg-scale 1.5 --num 2000 --sampler ddim     # or python -m tinylazy.metrics

The judge is a small MLP (16x16 -> 128 -> 64 -> 10, ReLU) that tinylazy trains on the real
digits (80% of them; the other 20% measure its accuracy), deterministically from a fixed
seed, and caches under ``~/.cache/tinylazy`` keyed by a hash of its recipe and data.
Its penultimate features (64 ReLU units, less any that no real digit activates) play
Inception's role in FID:

- ``fd``: Frechet distance between generated and real digits in that feature space;
- ``fd_floor``: the same distance between two disjoint random halves of the real digits.
  FD is biased upwards at finite sample counts, so both are taken at the same count
  n = min(generated, real // 2), against the same real half, averaged over ``splits``
  random splits; ``fd_ratio = fd / fd_floor`` (1 = as close as real data is to itself);
- ``accuracy``: the judge's predictions on the samples vs the requested labels;
  both are scored on 8-bit images, as the official FID pipeline scores saved samples;
- ``psnr`` / ``max_abs_diff`` between two sample sets drawn from the same noise.

scikit-learn (for the data) is the ``[train]`` extra; the rest is NumPy and SciPy.
"""
import hashlib
import json
import os
import sys
import time

import numpy as np

from . import cli
from .data import load_digits_dataset
from .optim import AdamW
from .parallel import serial_blas
from .resources import DEFAULT_MODEL
from .samplefile import SampleFileError, read_samples, saved_uint8

RECIPE = {
    "name": "digits-mlp", "version": 1, "data": "load_digits, 1x16x16 nearest, [-1, 1]",
    "layers": [256, 128, 64, 10], "activation": "relu", "init": "he-uniform",
    "prune": "fc2 units dead on every real digit",
    "holdout": 0.2, "split_seed": 0, "seed": 0, "epochs": 60, "batch_size": 64,
    "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
    "augment": "random shift by up to 1 pixel (16x16 grid), edge filled with -1",
}
LAYERS = ("fc1", "fc2", "fc3")
DATA_RANGE = 2.0                      # images live in [-1, 1]


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tinylazy")


# ----------------------------------------------------------------------------
# The judge: a NumPy MLP with its hand-written backward

def _relu_forward(x):
    return np.maximum(x, 0.0)


def _linear_forward(x, params, name):
    return x @ params[name + ".weight"].T + params[name + ".bias"]


def _split(n, holdout, seed):
    """Fixed train / held-out indices of the n real digits."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * holdout))
    return np.sort(perm[k:]), np.sort(perm[:k])


def _shift(images, rng):
    """Random translation by -1, 0 or +1 pixel on each axis, edges filled with the background -1."""
    out = np.full_like(images, -1.0)
    H = images.shape[-1]
    dy, dx = rng.integers(-1, 2, size=(2, len(images)))
    for sy in (-1, 0, 1):
        for sx in (-1, 0, 1):
            sel = (dy == sy) & (dx == sx)
            src = images[sel][..., max(0, -sy):H - max(0, sy), max(0, -sx):H - max(0, sx)]
            out[sel, ..., max(0, sy):H - max(0, -sy), max(0, sx):H - max(0, -sx)] = src
    return out


class DigitsClassifier:
    """The MLP judge.  ``params``: fc{1,2,3}.weight (out, in) / .bias, float64."""

    def __init__(self, params, info=None):
        self.params = params
        self.info = dict(info or {})

    # -- forward ------------------------------------------------------------------
    def _hidden(self, images):
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)     # (N, 1, 16, 16) -> (N, 256)
        if x.shape[1] != RECIPE["layers"][0]:
            raise ValueError(f"the digits judge takes 1x16x16 images, got shape {tuple(np.shape(images))}")
        h1 = _relu_forward(_linear_forward(x, self.params, "fc1"))            # (N, 128)
        h2 = _relu_forward(_linear_forward(h1, self.params, "fc2"))           # (N, 64)
        return x, h1, h2

    def features(self, images, batch=4096):
        """(N, 1, 16, 16) -> (N, F) penultimate features (F <= 64 after pruning)."""
        return np.concatenate([self._hidden(images[i:i + batch])[2] for i in range(0, len(images), batch)]) \
            if len(images) else np.zeros((0, len(self.params["fc2.bias"])))

    def logits(self, images):
        return _linear_forward(self.features(images), self.params, "fc3")     # (N, 10)

    def predict(self, images):
        return self.logits(images).argmax(axis=1)

    def accuracy(self, images, labels):
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    # -- training ---------------------------------------------------------------------
    @classmethod
    def train(cls, images, labels, recipe=RECIPE):
        """Fit on (images, labels) with softmax cross-entropy; deterministic for a recipe.

        BLAS runs on one thread: the same bits on any machine.
        """
        with serial_blas():                 # small matrices are faster on one thread, on a busy machine above all
            return cls._train(images, labels, recipe)

    @classmethod
    def _train(cls, images, labels, recipe):
        rng = np.random.default_rng(recipe["seed"])
        sizes = recipe["layers"]
        params = {}
        for name, (fan_in, fan_out) in zip(LAYERS, zip(sizes[:-1], sizes[1:])):
            a = np.sqrt(6.0 / fan_in)                                          # He-uniform
            params[name + ".weight"] = rng.uniform(-a, a, size=(fan_out, fan_in))
            params[name + ".bias"] = np.zeros(fan_out)
        model = cls(params)
        opt = AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        images = np.asarray(images, dtype=np.float64)
        labels = np.asarray(labels)
        onehot = np.eye(sizes[-1])[labels]
        B = recipe["batch_size"]
        for _ in range(recipe["epochs"]):
            perm = rng.permutation(len(images))
            for i in range(0, len(images), B):
                idx = perm[i:i + B]
                xb = _shift(images[idx], rng)
                opt.step(model._grads(xb, onehot[idx]))
        return model

    def _prune(self, images):
        """Drop fc2 units that are 0 on every given image: constant features make FD's covariances singular."""
        alive = self.features(images).max(axis=0) > 0
        P = self.params
        P["fc2.weight"], P["fc2.bias"] = P["fc2.weight"][alive], P["fc2.bias"][alive]
        P["fc3.weight"] = P["fc3.weight"][:, alive]

    def _grads(self, images, onehot):
        """Gradient of the mean cross-entropy: the forward read bottom to top."""
        P = self.params
        x, h1, h2 = self._hidden(images)
        logits = _linear_forward(h2, P, "fc3")
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dlogits = (p - onehot) / len(x)                                       # d mean CE / d logits
        g = {"fc3.weight": dlogits.T @ h2, "fc3.bias": dlogits.sum(0)}
        dh2 = (dlogits @ P["fc3.weight"]) * (h2 > 0)
        g.update({"fc2.weight": dh2.T @ h1, "fc2.bias": dh2.sum(0)})
        dh1 = (dh2 @ P["fc2.weight"]) * (h1 > 0)
        g.update({"fc1.weight": dh1.T @ x, "fc1.bias": dh1.sum(0)})
        return g


def _recipe_key(images, labels, recipe):
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    h.update(np.ascontiguousarray(images, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def load_classifier(cache_dir=None, recipe=RECIPE, verbose=False):
    """The judge for ``recipe``: read from the cache, or trained (seconds) and cached.

    ``info``: recipe, key, heldout_accuracy (on the 20% of the digits it never saw).
    """
    from .io import WeightsError, read_safetensors, write_safetensors

    images, labels = load_digits_dataset()
    key = _recipe_key(images, labels, recipe)
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"{recipe['name']}-{key}.safetensors")
    if os.path.exists(path):
        try:
            params, meta = read_safetensors(path, dtype=np.float64)
            if meta.get("key") == key and set(params) == {f"{n}.{p}" for n in LAYERS for p in ("weight", "bias")}:
                return DigitsClassifier(params, json.loads(meta["info"]))
        except (WeightsError, KeyError, ValueError):
            pass                                                            # a bad cache entry is rebuilt
        if verbose:
            print(f"rebuilding the judge cache {path}", file=sys.stderr)
    if verbose:
        print(f"training the digits judge (once; cached in {path})", file=sys.stderr)
    train_idx, held_idx = _split(len(images), recipe["holdout"], recipe["split_seed"])
    clf = DigitsClassifier.train(images[train_idx], labels[train_idx], recipe)
    clf._prune(images)
    clf.info = {"recipe": recipe, "key": key, "heldout_accuracy": clf.accuracy(images[held_idx], labels[held_idx]),
                "heldout_count": int(len(held_idx))}
    os.makedirs(cache_dir, exist_ok=True)
    write_safetensors(path, clf.params, {"key": key, "info": json.dumps(clf.info)})
    return clf


def heldout_digits(recipe=RECIPE):
    """The real digits the judge was not trained on: (images, labels)."""
    images, labels = load_digits_dataset()
    _, held = _split(len(images), recipe["holdout"], recipe["split_seed"])
    return images[held], labels[held]


# ----------------------------------------------------------------------------
# Distances

def frechet_distance(feat_a, feat_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (N, d) feature sets.

    tr((S_a S_b)^(1/2)) is taken as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b:
    the value of FID's ``sqrtm`` route, and stable when a covariance is singular (a feature
    that one set never activates).
    """
    mu_a, mu_b = feat_a.mean(axis=0), feat_b.mean(axis=0)
    s_a, s_b = np.atleast_2d(np.cov(feat_a, rowvar=False)), np.atleast_2d(np.cov(feat_b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    half_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T                  # S_a^(1/2)
    m = half_a @ s_b @ half_a
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    d = mu_a - mu_b
    return float(d @ d + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean)


def fd_against_real(gen_features, real_features, splits=10, seed=0):
    """(fd, fd_floor, n): means over ``splits`` random splits of the real features into halves A, B.

    fd = FD(n generated, B), floor = FD(A, B), each side n = min(generated, real // 2).
    """
    n = min(len(gen_features), len(real_features) // 2)
    if n < 2:
        raise ValueError(f"need at least 2 generated samples and 4 real ones, got {len(gen_features)}, "
                         f"{len(real_features)}")
    rng = np.random.default_rng(seed)
    fds, floors = [], []
    with serial_blas():
        for _ in range(splits):
            perm = rng.permutation(len(real_features))
            a, b = real_features[perm[:n]], real_features[perm[n:2 * n]]
            g = gen_features[rng.permutation(len(gen_features))[:n]]
            floors.append(frechet_distance(a, b))
            fds.append(frechet_distance(g, b))
    return float(np.mean(fds)), float(np.mean(floors)), n


def psnr(a, b, data_range=DATA_RANGE):
    """Peak signal-to-noise ratio in dB between two sample sets (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def as_saved_image(x):
    """The image a user gets, as the official ``sample_ddp.py`` saves it for FID:
    ``clamp(127.5 x + 128, 0, 255).to(uint8)`` (``samplefile.saved_uint8``), mapped back to
    [-1, 1] as u / 127.5 - 1."""
    return saved_uint8(x) / 127.5 - 1.0


def load_npz_samples(path):
    """A sample file of a digits model in ADM's format (``tinylazy.sample_many``):
    (samples (N, 1, 16, 16) in [-1, 1], labels (N,)).  Raises SampleFileError."""
    images, labels = read_samples(path, size=(16, 16))
    if not (np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])):
        raise SampleFileError(f"{path}: colour images; the digits judge takes grey ones (three equal channels)")
    return images[:, None, :, :, 0] / 127.5 - 1.0, labels           # (N, H, W, 3) -> (N, 1, H, W)


def evaluate(samples, labels, classifier=None, splits=10, seed=0):
    """All numbers for generated digits (N, 1, 16, 16) with requested labels (N,).

    Generated and real digits are both scored as 8-bit images (``as_saved_image``), as the
    official FID pipeline scores saved samples: out-of-range values count as clipped.
    """
    clf = load_classifier() if classifier is None else classifier
    if np.asarray(samples).shape[1:] != (1, 16, 16) or len(samples) != len(labels):
        raise ValueError(f"samples must be (N, 1, 16, 16) with N labels, got {np.shape(samples)} and "
                         f"{len(labels)} labels")
    samples = as_saved_image(samples)
    real = as_saved_image(load_digits_dataset()[0])
    fd, floor, n = fd_against_real(clf.features(samples), clf.features(real), splits, seed)
    return {"fd": fd, "fd_floor": floor, "fd_ratio": fd / floor, "accuracy": clf.accuracy(samples, labels),
            "num": int(len(samples)), "fd_count": n, "judge_heldout_accuracy": clf.info.get("heldout_accuracy")}


# ----------------------------------------------------------------------------
# Command line

def generate(model, num, steps, cfg_scale, sampler="ddim", seed=0, batch_size=500, progress=True):
    """``num`` samples of labels 0..9 in turn from the noise ``make_noise(model, num, seed)``."""
    from .progress import Progress
    from .sampling import ddim_sample, ddpm_sample, make_noise

    noise = make_noise(model, batch=num, seed=seed)
    labels = np.arange(num, dtype=np.int64) % model.config.num_classes
    out = []
    starts = range(0, num, batch_size)
    for i in (Progress(starts, desc=f"{sampler} {steps} steps, cfg {cfg_scale}") if progress else starts):
        sl = slice(i, i + batch_size)
        if sampler == "ddim":
            x = ddim_sample(model, noise[sl], labels[sl], steps=steps, cfg_scale=cfg_scale)
        else:
            x = ddpm_sample(model, noise[sl], labels[sl], steps=steps, cfg_scale=cfg_scale, step_noise=seed + 1 + i)
        out.append(np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float32))
    return np.concatenate(out), labels


def _table(rows):
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _score_rows(res, splits):
    return [("FD", f"{res['fd']:.3f}  (n = {res['fd_count']} per side, {splits} splits)"),
            ("FD floor (real halves)", f"{res['fd_floor']:.3f}"),
            ("FD ratio", f"{res['fd_ratio']:.3f}"),
            ("class accuracy", f"{100 * res['accuracy']:.2f}%"),
            ("judge held-out accuracy", f"{100 * res['judge_heldout_accuracy']:.2f}%")]


def add_arguments(p):
    n = cli.number
    p.add_argument("--weights", default=DEFAULT_MODEL,
                   help=f"DiT safetensors file or a bundled model's name (default: {DEFAULT_MODEL})")
    p.add_argument("--steps", type=n(int, 1, 1000), default=50, help="sampling steps, 1..1000 (default 50)")
    p.add_argument("--cfg-scale", type=n(float, 1), default=1.5,
                   help="classifier-free guidance scale, >= 1 (default 1.5)")
    p.add_argument("--num", type=n(int, 4), default=2000, help="number of samples, >= 4 (default 2000)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--seed", type=cli.SEED, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=n(int, 1), default=500)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--splits", type=n(int, 1), default=10, help="random real-data splits averaged for FD (default 10)")
    p.add_argument("--cache-dir", default=None, help=f"where the judge is cached (default {default_cache_dir()})")
    p.add_argument("--save", default=None, help="write the samples and labels to this .safetensors file")
    p.add_argument("--compare", default=None,
                   help="a --save file from the same --seed/--num: print PSNR and max |diff| against it")
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON line too")
    p.add_argument("--npz", default=None, help="score this sample file (ADM format: arr_0 images, arr_1 "
                   "labels, as `tinylazy sample-many` writes it) instead of sampling")


def _read_compare(args):
    """The --compare sample set, checked against this run's seed and count before any sampling."""
    from .io import read_safetensors
    ref, meta = read_safetensors(args.compare)
    shape = getattr(ref.get("samples"), "shape", None)
    if shape != (args.num, 1, 16, 16) or "labels" not in ref or meta.get("seed") != str(args.seed):
        raise cli.UsageError(f"--compare {args.compare}: not a sample set of the same noise (seed {meta.get('seed')}, "
                             f"samples {shape}; this run: seed {args.seed}, {args.num} samples of (1, 16, 16))")
    return ref


def score_npz(args):
    """``--npz``: the numbers for a sample file of a digits model (ADM format)."""
    cli.input_file(args.npz, "--npz")
    try:
        samples, labels = load_npz_samples(args.npz)
    except SampleFileError as e:
        raise cli.UsageError(str(e)) from None
    if len(samples) < 4:
        raise cli.UsageError(f"--npz {args.npz}: {len(samples)} samples, the Frechet distance needs at least 4")
    res = evaluate(samples, labels, load_classifier(args.cache_dir, verbose=True), splits=args.splits)
    print(_table([("samples", f"{args.npz} ({len(samples)})")] + _score_rows(res, args.splits)))
    if args.json:
        print(json.dumps(res))


def run(args):
    from .io import load_dit, write_safetensors
    cli.require("sklearn", "tinylazy metrics (the real digits)")
    if args.npz:
        cli.output_folder(default_cache_dir() if args.cache_dir is None else args.cache_dir, "--cache-dir")
        return score_npz(args)
    weights = cli.weights_input(args.weights)
    cli.input_file(args.compare, "--compare")
    if args.save:
        cli.output_file(args.save, "--save", (".safetensors",), inputs={"--weights": weights, "--compare": args.compare})
    cli.output_folder(default_cache_dir() if args.cache_dir is None else args.cache_dir, "--cache-dir")
    cli.check_backend(args.backend)
    ref = _read_compare(args) if args.compare else None
    model = load_dit(weights, dtype=args.dtype, backend=args.backend)
    if (model.config.in_channels, model.config.input_size) != (1, 16):
        raise cli.UsageError(f"--weights {args.weights}: the digits metrics need a 1x16x16 model, got "
                             f"{model.config.in_channels}x{model.config.input_size}x{model.config.input_size}")
    clf = load_classifier(args.cache_dir, verbose=True)
    t0 = time.perf_counter()
    samples, labels = generate(model, args.num, args.steps, args.cfg_scale, args.sampler, args.seed, args.batch_size)
    seconds = time.perf_counter() - t0
    res = evaluate(samples, labels, clf, splits=args.splits)
    rows = [("weights", weights), ("sampler", f"{args.sampler} {args.steps} steps, cfg {args.cfg_scale}, "
                                              f"seed {args.seed}, {args.dtype}"),
            ("samples", f"{args.num} ({seconds:.1f} s)")] + _score_rows(res, args.splits)
    if ref is not None:
        if not np.array_equal(ref["labels"], labels):
            raise cli.UsageError(f"--compare {args.compare}: its labels are not this run's (labels 0..9 in turn)")
        res["psnr"], res["max_abs_diff"] = psnr(samples, ref["samples"]), max_abs_diff(samples, ref["samples"])
        rows += [("PSNR vs --compare", f"{res['psnr']:.2f} dB"),
                 ("max |diff| vs --compare", f"{res['max_abs_diff']:.4g}")]
    if args.save:
        write_safetensors(args.save, {"samples": samples, "labels": labels},
                          {"seed": str(args.seed), "sampler": args.sampler, "steps": str(args.steps),
                           "cfg_scale": str(args.cfg_scale), "weights": os.path.abspath(weights)})
    print(_table(rows))
    if args.json:
        print(json.dumps(res))


def main(argv=None, prog=None):
    return cli.run_command("metrics", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.metrics"))
