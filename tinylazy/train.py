"""Train a class-conditional DiT from scratch with the official DiT recipe, in NumPy.

    tinylazy train --config tiny-dit-digits --steps 3000 --lr 1e-3 --ema-decay 0.999 --out runs/digits
    tinylazy train --config tiny-dit-digits --steps 3000 --lr 1e-3 --ema-decay 0.999 --out runs/digits --resume

One step, as facebookresearch/DiT ``train.py``: a batch of the data (shuffled every epoch, the
last partial batch dropped), uniform t in 0..999, labels dropped to the null class with
probability 0.1 (classifier-free guidance), ADM's learned-sigma loss (``losses.py``),
AdamW, then the EMA update.  Every random draw comes from one ``np.random.Generator``,
in a fixed order per step: the epoch's permutation (when one starts), t, the noise, the
label-drop mask.  A checkpoint holds the model, the EMA, the AdamW moments, that
generator's state, the step, and the epoch's permutation and position, so a resumed run
gives bit-identical weights to an uninterrupted one.  Checkpoints are safetensors
with JSON metadata (no pickle), written to a temp file and renamed.
At the end the EMA weights are exported with official keys, the configuration and the
training facts in the file's metadata.
"""
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np

from . import atomic, cli, memory
from .config import DIT_CONFIGS, get_config
from .diffusion import create_diffusion
from .dit import DiT
from .losses import training_losses, training_losses_backward
from .optim import AdamW, update_ema
from .progress import Progress

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "tinylazy-train-checkpoint-1"
FROZEN = ("pos_embed",)            # a fixed sin-cos buffer in the official model (requires_grad=False)
# Settings that must not change when a run is resumed (the step count may grow).
RECIPE_KEYS = ("config", "overrides", "data", "batch_size", "lr", "lr_decay_steps", "betas", "adam_eps",
               "weight_decay", "ema_decay", "ema_warmup", "snr_gamma", "class_dropout_prob", "seed", "dtype", "init")


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; the last checkpoint is the last good state."""


@dataclasses.dataclass
class Recipe:
    config: str = "tiny-dit-digits"
    overrides: dict = dataclasses.field(default_factory=dict)   # DiTConfig fields changed from the preset
    data: str = "digits"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-4                # official DiT AdamW settings
    lr_decay_steps: int = 0         # > 0: lr falls linearly to 0 over the last steps (official: constant)
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    ema_decay: float = 0.9999       # official; the bundled model uses 0.995 with ema_warmup
    # True: the decay of update n (0-based) is min(ema_decay, (1 + n) / (10 + n)), the ramp of
    # TensorFlow's ExponentialMovingAverage(num_updates) and of diffusers' EMAModel by default.
    # The official EMA starts as a copy of the initial weights and keeps a share ema_decay ** steps
    # of them: nothing after 400K steps at 0.9999, but 4% of the zero-initialised adaLN and final
    # layer after 3200 steps at 0.999 (the first bundled model, whose EMA it ruined).
    ema_warmup: bool = False
    snr_gamma: float = 0.0          # > 0: Min-SNR-gamma weights on the mse term (losses.py); 0: official
    class_dropout_prob: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    init: str = "official"          # DiT.initialize_weights

    def model_config(self):
        return get_config(self.config, **self.overrides)

    def to_json(self):
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return json.dumps(d, sort_keys=True)


def load_data(name):
    """Training images (N, C, H, W) float32 in [-1, 1] and labels (N,) int64."""
    if name == "digits":
        from .data import load_digits_dataset
        return load_digits_dataset()
    raise ValueError(f"unknown dataset {name!r}; known: digits")


# ----------------------------------------------------------------------------
# One step

def train_step(model, diffusion, opt, x_start, y, t, noise, snr_gamma=None):
    """One AdamW step on ADM's loss for the batch (x_start, y, t, noise); returns the loss terms (B,).

    The step's big arrays come from recycled buffers (memory.recycling): the same
    memory every step instead of fresh pages from the kernel."""
    with memory.recycling():
        x_t = diffusion.q_sample(x_start, t, noise)
        out, cache = model.forward_train(x_t, t, y)
        terms, loss_cache = training_losses(diffusion, out, x_start, x_t, t, noise, snr_gamma=snr_gamma)
        grads, _ = model.backward(training_losses_backward(loss_cache), cache)
        opt.step(grads)
    return terms


class Trainer:
    """The whole training state; ``step()`` advances it by one step."""

    def __init__(self, recipe: Recipe, images=None, labels=None):
        self.recipe = r = recipe
        self.config = r.model_config()
        if images is None:
            images, labels = load_data(r.data)
        cfg = self.config
        if images.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"data {r.data!r} has images {images.shape[1:]}, the model takes "
                             f"{(cfg.in_channels, cfg.input_size, cfg.input_size)}")
        if labels.min() < 0 or labels.max() >= cfg.num_classes:
            raise ValueError(f"data {r.data!r} has labels {labels.min()}..{labels.max()}, the model "
                             f"{cfg.num_classes} classes")
        if r.batch_size < 1 or r.batch_size > len(images):
            raise ValueError(f"batch size {r.batch_size} must be in 1..{len(images)} (the dataset size)")
        self.model = DiT.from_config(cfg, seed=r.seed, scheme=r.init, dtype=r.dtype)
        self.images = images.astype(self.model.dtype)
        self.labels = labels.astype(np.int64)
        self.diffusion = create_diffusion("")
        self.trainable = {k: v for k, v in self.model.params.items() if k not in FROZEN}   # shared arrays
        self.opt = AdamW(self.trainable, lr=r.lr, betas=r.betas, eps=r.adam_eps, weight_decay=r.weight_decay)
        self.ema = {k: v.copy() for k, v in self.trainable.items()}          # official: update_ema(decay=0)
        self.rng = np.random.default_rng([r.seed, 1])                         # a stream apart from the init's
        self.step_count = 0
        self.perm = np.zeros(0, dtype=np.int64)                               # current epoch order
        self.pos = 0
        self.train_seconds = 0.0
        self.last_terms = None

    # -- data ---------------------------------------------------------------------
    def next_batch(self):
        """Indices of the next batch; a new permutation starts each epoch (drop_last, as official)."""
        B = self.recipe.batch_size
        if self.pos + B > len(self.perm):
            self.perm = self.rng.permutation(len(self.images))
            self.pos = 0
        idx = self.perm[self.pos:self.pos + B]
        self.pos += B
        return idx

    def lr_at(self, step):
        """Learning rate of the update after ``step`` completed steps."""
        r = self.recipe
        if r.lr_decay_steps <= 0:
            return r.lr
        return r.lr * min(1.0, (r.steps - step) / r.lr_decay_steps)

    def ema_decay_at(self, step):
        """EMA decay of the update after ``step`` completed optimizer steps."""
        r = self.recipe
        return min(r.ema_decay, (1.0 + step) / (10.0 + step)) if r.ema_warmup else r.ema_decay

    def step(self):
        t0 = time.perf_counter()
        self.opt.lr = self.lr_at(self.step_count)
        idx = self.next_batch()
        B = len(idx)
        x_start = self.images[idx]
        t = self.rng.integers(0, self.diffusion.num_timesteps, size=B)                   # uniform t
        noise = self.rng.standard_normal(x_start.shape).astype(self.model.dtype)
        drop = self.rng.random(B) < self.recipe.class_dropout_prob                       # LabelEmbedder.token_drop
        y = np.where(drop, self.config.num_classes, self.labels[idx])
        self.last_terms = train_step(self.model, self.diffusion, self.opt, x_start, y, t, noise,
                                     self.recipe.snr_gamma or None)
        update_ema(self.ema, self.trainable, self.ema_decay_at(self.step_count))
        self.step_count += 1
        self.train_seconds += time.perf_counter() - t0
        return self.last_terms

    # -- models -------------------------------------------------------------------------
    def ema_model(self):
        """A DiT on the EMA weights (sharing their arrays)."""
        params = dict(self.ema)
        params.update({k: self.model.params[k] for k in FROZEN})
        return DiT(self.config, params, dtype=self.model.dtype)

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, path):
        from .io import write_safetensors
        tensors = {}
        for k in self.trainable:
            tensors[f"model/{k}"] = self.trainable[k]
            tensors[f"ema/{k}"] = self.ema[k]
            tensors[f"exp_avg/{k}"] = self.opt.exp_avg[k]
            tensors[f"exp_avg_sq/{k}"] = self.opt.exp_avg_sq[k]
        tensors["data/perm"] = self.perm
        meta = {"format": CHECKPOINT_FORMAT, "recipe": self.recipe.to_json(), "step": str(self.step_count),
                "adam_step": str(self.opt.step_count), "data_pos": str(self.pos),
                "rng": json.dumps(self.rng.bit_generator.state), "train_seconds": repr(self.train_seconds)}
        write_safetensors(path, tensors, meta)                # temp file + os.replace

    def load_checkpoint(self, path):
        """Restore a checkpoint of the same recipe (the step count may differ) in place.

        Every field is checked before anything changes (a CheckpointError names the file and the
        field): the recipe, step == adam_step in 0..steps, the epoch permutation (empty, or a
        permutation of the dataset) and a position in it on a batch boundary, the generator
        state, a finite training time, and exactly this model's tensors (exp_avg_sq >= 0); the epoch
        position must be the one the step count implies."""
        from .io import ResumeCheckpoint, describe_value
        with ResumeCheckpoint(path, CHECKPOINT_FORMAT) as ck:
            saved = ck.json("recipe", dict)
            mine = json.loads(self.recipe.to_json())
            for k, v in json.loads(Recipe().to_json()).items():
                saved.setdefault(k, v)                    # settings added since the checkpoint: their defaults
            keys = RECIPE_KEYS + (("steps",) if mine["lr_decay_steps"] > 0 else ())  # the schedule ends at steps
            diff = [f"{k}: checkpoint {describe_value(saved.get(k))}, now {mine[k]!r}" for k in keys
                    if saved.get(k) != mine[k]]
            if diff:
                raise ck.error(f"the run's settings changed since the checkpoint ({'; '.join(diff)})")
            step = ck.integer("step", 0, self.recipe.steps)
            if ck.integer("adam_step", 0, self.recipe.steps) != step:
                raise ck.error(f"metadata adam_step {ck.text('adam_step')} differs from step {step} (one AdamW "
                               f"step per training step)")
            n = len(self.images)
            expected = {f"{part}/{k}": (a.shape, a.dtype) for part, target in self._state_parts()
                        for k, a in target.items()}
            expected["data/perm"] = (None, np.int64)
            tensors = ck.tensors(expected)
            perm = tensors["data/perm"]
            if len(perm) not in (0, n) or (len(perm) and not np.array_equal(np.sort(perm), np.arange(n))):
                raise ck.error(f"data/perm is not a permutation of the {n} training images")
            B = self.recipe.batch_size
            pos = ck.integer("data_pos", 0, len(perm))
            want = 0 if step == 0 else ((step - 1) % (n // B) + 1) * B          # next_batch: drop_last epochs
            if pos != want or (len(perm) == 0) != (step == 0):
                raise ck.error(f"metadata data_pos {pos} with {len(perm)} permuted images does not follow from "
                               f"step {step} (batch {B} of {n} images: position {want})")
            negative = [k for k in self.opt.exp_avg_sq if (tensors[f"exp_avg_sq/{k}"] < 0).any()]
            if negative:
                raise ck.error(f"exp_avg_sq/{negative[0]} has negative entries (a second moment is >= 0)")
            rng_state = ck.rng_state("rng", self.rng)
            seconds = ck.number("train_seconds", 0.0, 1e12)
        for part, target in self._state_parts():
            for k, a in target.items():
                a[...] = tensors[f"{part}/{k}"]
        self.opt.step_count = self.step_count = step
        self.perm, self.pos = perm.astype(np.int64), pos
        self.rng.bit_generator.state = rng_state
        self.train_seconds = seconds

    def _state_parts(self):
        return (("model", self.trainable), ("ema", self.ema), ("exp_avg", self.opt.exp_avg),
                ("exp_avg_sq", self.opt.exp_avg_sq))

    # -- export ---------------------------------------------------------------------------
    def export(self, path, extra=None):
        """EMA weights, official keys, in the training dtype; config and training facts in the metadata."""
        from .io import save_dit
        from . import __version__
        r = self.recipe
        meta = {"recipe": r.to_json(), "steps": str(self.step_count), "train_seconds": f"{self.train_seconds:.1f}",
                "seed": str(r.seed), "data": r.data, "weights": "ema", "ema_decay": repr(r.ema_decay),
                "ema_warmup": str(r.ema_warmup),
                "objective": "ADM training_losses, learned sigma (eps MSE + vb), uniform t, 10% label drop"
                             + (f"; eps MSE weighted min(SNR, {r.snr_gamma:g}) / SNR (Min-SNR)" if r.snr_gamma else ""),
                "trainer": f"tinylazy {__version__} (python -m tinylazy.train), NumPy {np.__version__}, "
                           f"{platform.machine()}"}
        if r.data == "digits":
            from .data import SOURCE
            meta["data"] = f"digits: {SOURCE}, nearest upsampled to 16x16, [-1, 1]"
        meta.update(extra or {})
        save_dit(self.ema_model(), path, meta)


# ----------------------------------------------------------------------------
# The loop

def sample_grid(trainer, path, steps=20, cfg_scale=1.5, per_class=2, seed=0):
    """A PNG grid from the EMA model: ``per_class`` rows of the classes in order (DDIM)."""
    from .image import save_grid
    from .sampling import ddim_sample, make_noise
    model = trainer.ema_model()
    n = model.config.num_classes
    labels = np.tile(np.arange(n, dtype=np.int64), per_class)
    x = ddim_sample(model, make_noise(model, batch=len(labels), seed=seed), labels, steps=steps,
                    cfg_scale=cfg_scale)
    save_grid(x, path, nrow=n)


def _finite(arrays):
    return all(bool(np.isfinite(a).all()) for a in arrays.values())


def _logged_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):        # a line cut short by a killed run
        return None


def _trim_log(path, step):
    """Keep the log lines of steps <= ``step``: a resumed (or restarted) run logs each step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    kept = [line for line in lines if (n := _logged_step(line)) is not None and n <= step]
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        with atomic.writing(path) as f:
            f.write("".join(line + "\n" for line in kept).encode())


def train(recipe, out_dir, resume=False, ckpt_every=250, sample_every=500, log_every=50, export=None,
          progress=True, callback=None, images=None, labels=None):
    """Run (or resume) ``recipe`` to ``recipe.steps`` steps; returns the Trainer.

    out_dir receives checkpoint.safetensors, log.jsonl, samples/step_*.png and (unless
    ``export`` names another path) ema.safetensors.  ``callback(trainer)`` runs after every step.
    resume: continue from out_dir's checkpoint (FileNotFoundError when there is none); without
    it an existing checkpoint is a FileExistsError.  A loss or weights that stop being finite
    raise ``TrainingDiverged``: the last checkpoint stays the last good state, nothing is exported.
    """
    ckpt = os.path.join(out_dir, CHECKPOINT)
    if resume and not os.path.exists(ckpt):
        raise FileNotFoundError(f"{ckpt}: no checkpoint to resume (drop --resume to start a new run)")
    if not resume and os.path.exists(ckpt):
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue that run, or use another --out")
    tr = Trainer(recipe, images, labels)
    if resume:
        tr.load_checkpoint(ckpt)
        print(f"resumed {ckpt} at step {tr.step_count}", file=sys.stderr)
    os.makedirs(out_dir, exist_ok=True)

    def grid(s):                         # the sample grid of step s, or None when that step has none
        if sample_every and (s % sample_every == 0 or s == recipe.steps):
            return os.path.join(out_dir, "samples", f"step_{s:06d}.png")
        return None

    def samples(s):
        path = grid(s)
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sample_grid(tr, path)

    log_path = os.path.join(out_dir, "log.jsonl")
    _trim_log(log_path, tr.step_count)
    log = open(log_path, "a")
    window = []
    saved = tr.step_count if resume else None
    if resume and grid(saved) and not os.path.exists(grid(saved)):
        samples(saved)                 # killed while writing the checkpointed step's grid: write it now

    def diverged(what):
        kept = f"the checkpoint of step {saved} in {ckpt} is kept" if saved is not None else "no checkpoint was written"
        return TrainingDiverged(f"training diverged at step {tr.step_count}: {what}; {kept} and nothing was "
                                f"exported (a lower --lr may help)")

    try:
        steps = range(tr.step_count, recipe.steps)
        bar = Progress(steps, desc="train", disable=not progress)
        for _ in bar:
            terms = tr.step()
            window.append([float(terms[k].mean()) for k in ("loss", "mse", "vb")])
            if not np.isfinite(window[-1][0]):
                raise diverged(f"the loss is {window[-1][0]}")
            window = window[-log_every:]
            s = tr.step_count
            bar.set_postfix(step=s, loss=float(np.mean([w[0] for w in window])))
            if s % log_every == 0 or s == recipe.steps:
                loss, mse, vb = np.mean(window, axis=0)
                log.write(json.dumps({"step": s, "loss": loss, "mse": mse, "vb": vb,
                                      "train_seconds": round(tr.train_seconds, 2)}) + "\n")
                log.flush()
            if s % ckpt_every == 0 or s == recipe.steps:
                if not (_finite(tr.trainable) and _finite(tr.ema)):
                    raise diverged("the weights are not finite")
                tr.save_checkpoint(ckpt)
                saved = s
            samples(s)
            if callback is not None:
                callback(tr)
    finally:
        log.close()
    if not _finite(tr.ema):
        raise diverged("the EMA weights are not finite")
    export = export or os.path.join(out_dir, "ema.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(export)), exist_ok=True)      # --export may name a new folder
    tr.export(export)
    return tr


# ----------------------------------------------------------------------------
# Command line

def add_arguments(p):
    d, n = Recipe(), cli.number
    p.add_argument("--config", default=d.config, help=f"model configuration (default {d.config}; known: "
                   f"{', '.join(DIT_CONFIGS)})")
    p.add_argument("--depth", type=n(int, 1), help="override the configuration's depth")
    p.add_argument("--hidden-size", type=n(int, 1), help="override the configuration's hidden size")
    p.add_argument("--num-heads", type=n(int, 1), help="override the configuration's number of heads")
    p.add_argument("--data", default=d.data, choices=("digits",),
                   help="training data (default digits: scikit-learn's, the [train] extra)")
    p.add_argument("--steps", type=n(int, 1), default=d.steps, help=f"total training steps (default {d.steps})")
    p.add_argument("--batch-size", type=n(int, 1), default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=n(float, 0, 1, low_open=True), default=d.lr,
                   help=f"AdamW learning rate, in (0, 1] (default {d.lr}, official)")
    p.add_argument("--lr-decay-steps", type=n(int, 0), default=d.lr_decay_steps,
                   help="decay the learning rate linearly to 0 over the last N steps (default 0: constant, "
                        "as official)")
    p.add_argument("--weight-decay", type=n(float, 0), default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--ema-decay", type=n(float, 0, 1), default=d.ema_decay, help=f"default {d.ema_decay} (official)")
    p.add_argument("--ema-warmup", action="store_true",
                   help="warm the EMA decay up as min(decay, (1+n)/(10+n)) so that a short run forgets its "
                        "initial weights (default off: official, the EMA starts as a copy of them)")
    p.add_argument("--snr-gamma", type=n(float, 0), default=d.snr_gamma,
                   help="weight the eps MSE of each sample by min(SNR(t), G) / SNR(t) (Min-SNR-gamma, Hang et "
                        "al. 2023; e.g. 5); default 0: unweighted, official")
    p.add_argument("--class-dropout", type=n(float, 0, 1), default=d.class_dropout_prob,
                   help="probability of the null label (default 0.1)")
    p.add_argument("--seed", type=cli.SEED, default=d.seed, help="seed of the initialisation and of the data/noise "
                   "generator (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    p.add_argument("--out", default="runs/train", help="run folder: checkpoint, log.jsonl, sample grids "
                   "(default runs/train in the current folder)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--ckpt-every", type=n(int, 1), default=250, help="checkpoint interval in steps (default 250)")
    p.add_argument("--sample-every", type=n(int, 0), default=500,
                   help="sample-grid interval in steps (0 = never; default 500)")
    p.add_argument("--log-every", type=n(int, 1), default=50, help="log.jsonl interval in steps (default 50)")
    p.add_argument("--export", default=None,
                   help="where to write the EMA weights, replaced if it exists (default OUT/ema.safetensors)")
    p.add_argument("--force", action="store_true", help="let --export replace a file shipped with tinylazy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_args(args):
    """The recipe, the extras, the folders and the checkpoint, before any training."""
    overrides = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                                   ("num_heads", args.num_heads)) if v is not None}
    recipe = Recipe(config=args.config, overrides=overrides, data=args.data, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, lr_decay_steps=args.lr_decay_steps,
                    weight_decay=args.weight_decay, ema_decay=args.ema_decay, ema_warmup=args.ema_warmup,
                    snr_gamma=args.snr_gamma, class_dropout_prob=args.class_dropout, seed=args.seed,
                    dtype=args.dtype)
    try:
        recipe.model_config()
    except (KeyError, ValueError) as e:
        raise cli.UsageError(str(e).strip('"')) from e
    cli.require("sklearn", f"--data {args.data} (scikit-learn's digits)")
    cli.output_folder(args.out, "--out")
    ckpt = os.path.join(args.out, CHECKPOINT)
    if args.resume and not os.path.isfile(ckpt):
        raise cli.UsageError(f"--resume: no checkpoint at {ckpt} (nothing to resume); drop --resume to start")
    if not args.resume and os.path.exists(ckpt):
        raise cli.UsageError(f"{ckpt} exists: add --resume to continue that run, or give another --out")
    if args.resume:                      # its header and format now, not after the data has loaded
        from .io import ResumeCheckpoint
        with ResumeCheckpoint(ckpt, CHECKPOINT_FORMAT):
            pass
    args.export = args.export or os.path.join(args.out, "ema.safetensors")
    cli.output_file(args.export, "--export", (".safetensors",), inputs={"the checkpoint": ckpt}, force=args.force,
                    create_folder=True)
    return recipe


def run(args):
    recipe = check_args(args)
    try:
        tr = train(recipe, args.out, resume=args.resume, ckpt_every=args.ckpt_every, sample_every=args.sample_every,
                   log_every=args.log_every, export=args.export, progress=not args.no_progress)
    except TrainingDiverged as e:
        raise cli.RunError(str(e)) from e
    except ValueError as e:                        # the data or a checkpoint that does not fit the recipe
        raise cli.UsageError(str(e)) from e
    print(f"{tr.step_count} steps in {tr.train_seconds:.1f} s of training; EMA weights: {args.export}",
          file=sys.stderr)


def resume_hint(args):
    return cli.resume_hint(args, os.path.join(args.out, CHECKPOINT), f"{args.ckpt_every} steps")


def main(argv=None, prog=None):
    return cli.run_command("train", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.train"))
