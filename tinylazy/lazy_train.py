"""Training LazyDiT gates: the official lazy-learning recipe on a frozen DiT.

Mirrors ``lazy_learning_imagenet.py`` and ``GaussianDiffusion.lazy_learning_loss`` of
the official LazyDiT code (paper section 3.3, eqs. 4-6).  One iteration:

1. draw a batch of real images x0 with labels (10% replaced by the null class),
   a respaced index t (official: odd, t = 2k + 1) and noise; x_t = q_sample(x0, t);
2. one full DDIM step x_t -> x_next with the model, caching every module's output
   (before the gate multiply): the "previous step" of the gates at index t - 1;
3. at x_next (original timestep timestep_map[t - 1]): the full output (target) and
   the soft-lazy output, where every module gives ``score * F(Z) + (1 - score) * cache``;
4. loss = mean((target - soft)^2) + rho_attn * mean_b(sum_l score_attn)
   + rho_mlp * mean_b(sum_l score_mlp); AdamW on the gates of index t - 1 only.

The gradient reaches each gate through its own score and through every block
downstream of it (their inputs, and so their scores, depend on it); the DiT's
piece-level backward runs in input-gradient-only mode, the DiT stays frozen.

Only gates of even indices are trained by the official recipe (t - 1 = 2k); the
rest keep score 0.5 and always compute, which caps the lazy ratio at 50%.
``all_steps=True`` (an extension beyond the paper) draws any t >= 1 and trains
every gate but the first step's.
"""
import json

import numpy as np

from .backend import to_numpy
from .diffusion import create_diffusion
from .io import write_safetensors
from .lazy import LazyDiT, LazyGates, LazyStats, gate_score
from .optim import AdamW
from .protocol import KINDS
from .sampling import ddim_sample, ddim_step, make_noise

LABEL_DROP = 0.1                    # official DiT class_dropout_prob, used for CFG
CHECKPOINT_FORMAT = "tinylazy-gate-training-v1"


# ----------------------------------------------------------------------------
# The two forward passes at x_next and the backward of the soft one

def teacher_step(model, diffusion, x0, y, index, noise):
    """x_t = q_sample(x0, index), then one full DDIM step that keeps every module's output.

    x0 (B, C, H, W), y (B,) labels (null class allowed), index: respaced t >= 1,
    noise like x0.  Returns x_next (B, C, H, W) and the module outputs at x_t,
    {(layer, kind): (B, T, D)}.
    """
    xp = model.xp
    x0 = xp.asarray(x0, dtype=model.dtype)
    x_t = diffusion.q_sample(x0, index, xp.asarray(noise, dtype=model.dtype))
    caches = {}

    def keep(l, kind, z, cache=None):                                    # the branch hook: compute and keep
        caches[(l, kind)] = out = model.branch(l, kind, z, cache)
        return out

    out = model(x_t, np.full(len(y), diffusion.timestep_map[index]), y, branch=keep)
    return ddim_step(diffusion, out, x_t, index)["x_next"], caches


def soft_forward(model, x, t, y, w, caches, tape=None):
    """The soft-lazy forward (paper eq. 5 with the official score = probability to compute): the
    model's block schema with a branch hook that blends each module's output with its cache.

    w: {"attn", "mlp": (L, D)} gate vectors of one step in the model dtype; caches:
    {(layer, kind): (B, T, D)}.  Returns out (B, out_channels, H, W) and scores
    (B, L, 2).  A dict ``tape`` receives what ``soft_backward`` reads: "model" (the
    schema's cache) and per (layer, kind) zsum (B, D), the score s (B,) and F(Z).
    """
    x, t, y = model.check_inputs(x, t, y)
    scores = model.xp.empty((x.shape[0], model.config.depth, 2), dtype=model.dtype)

    def soft(l, kind, z, cache):
        s = gate_score(z, w[kind][l])
        f = model.branch(l, kind, z, cache)
        scores[:, l, KINDS.index(kind)] = s
        if tape is not None:
            tape[(l, kind)] = {"zsum": z.sum(axis=1), "s": s, "f": f}
        s3 = s[:, None, None]
        return f * s3 + caches[(l, kind)] * (1 - s3)                     # official: F(Z) * mask + cache * (1 - mask)

    cache = None if tape is None else tape.setdefault("model", {})
    return model.forward_checked(x, t, y, cache, branch=soft), scores


def soft_backward(model, dout, dscores, w, caches, tape):
    """dout (B, out_channels, H, W) = dL/dout, dscores (B, L, 2) = the direct dL/dscore
    -> {"attn", "mlp": (L, D)} dL/dw.  The forward read bottom to top."""
    xp, cache = model.xp, tape["model"]
    L = model.config.depth
    grads = {kind: xp.zeros_like(w[kind]) for kind in KINDS}
    dh, _ = model.final_layer_backward(xp.asarray(dout, dtype=model.dtype), cache["final"], grads=None)
    backwards = (model.attn_backward, model.mlp_backward)
    for l in reversed(range(L)):
        block = cache[f"blocks.{l}"]
        for j in (1, 0):
            kind = KINDS[j]
            rec = tape[(l, kind)]
            s = rec["s"]
            do = dh * block[f"gate_{kind}"][:, None, :]                  # h = h + gate * o
            ds = xp.einsum("btd,btd->b", do, rec["f"] - caches[(l, kind)]) + dscores[:, l, j]
            du = ds * s * (1 - s)                                        # through the sigmoid, (B,)
            grads[kind][l] = du @ rec["zsum"]                            # (B,) @ (B, D) -> (D,)
            if l == 0 and j == 0:
                break                                                    # no gate upstream of the first module
            dz = backwards[j](l, do * s[:, None, None], block[kind])    # o = s F(Z) + (1 - s) cache
            dz += du[:, None, None] * w[kind][l]                         # score = sigmoid(sum_t Z @ w)
            dx, _, _ = model.branch_input_backward(l, kind, dz, block[f"{kind}_in"])
            dh = dh + dx
    return grads


def ddim_eps_gain(diffusion, index):
    """d x_{index-1} / d eps of the DDIM step (eta 0) taken from index: how much an error in the
    predicted noise moves the next latent.  x_prev = sqrt(a') x0 + sqrt(1 - a') eps with
    x0 = (x - sqrt(1 - a) eps) / sqrt(a), so the gain is sqrt(1 - a') - sqrt(a' / a) sqrt(1 - a)."""
    a, a_prev = diffusion.alphas_cumprod[index], diffusion.alphas_cumprod_prev[index]
    return float(np.sqrt(1 - a_prev) - np.sqrt(a_prev / a) * np.sqrt(1 - a))


def lazy_loss(model, x_next, t, y, caches, w, rho_attn, rho_mlp, target, backward=True, out_weight=None):
    """The official loss at x_next and, with ``backward``, its gradient w.r.t. the gates w.

    out_weight (optional): multiplies the output difference before it is squared,
    broadcast to (B, out_channels, H, W) (the "x" loss weighs the eps channels by
    ``ddim_eps_gain`` and drops the variance channels; None is the official loss).
    Returns a dict: loss, mse, lazy_attn, lazy_mlp (mean_b sum_l score), scores (B, L, 2)
    on the host, and grads {"attn", "mlp": (L, D)} (None without ``backward``).
    """
    xp = model.xp
    tape = {} if backward else None
    out, scores = soft_forward(model, x_next, t, y, w, caches, tape)
    diff = out - xp.asarray(target, dtype=model.dtype)
    if out_weight is not None:
        diff *= xp.asarray(out_weight, dtype=model.dtype)
    mse = float((diff * diff).mean())                                    # mean_flat(...).mean() = the overall mean
    B = diff.shape[0]
    sums = scores.sum(axis=1).mean(axis=0)                               # (2,): mean_b sum_l score
    lazy_attn, lazy_mlp = float(sums[0]), float(sums[1])
    res = {"loss": mse + rho_attn * lazy_attn + rho_mlp * lazy_mlp, "mse": mse,
           "lazy_attn": lazy_attn, "lazy_mlp": lazy_mlp, "scores": to_numpy(scores), "grads": None}
    if backward:
        dout = diff * (2.0 / diff.size)
        if out_weight is not None:
            dout *= xp.asarray(out_weight, dtype=model.dtype)
        dscores = xp.empty_like(scores)
        dscores[..., 0] = rho_attn / B
        dscores[..., 1] = rho_mlp / B
        res["grads"] = soft_backward(model, dout, dscores, w, caches, tape)
    return res


# ----------------------------------------------------------------------------
# The training loop state

class GateTrainer:
    """Gate training for one frozen DiT and one step count, resumable bit for bit.

    images (N, C, H, W) in the model's input range, labels (N,).  rho_attn, rho_mlp:
    the lazy-loss weights.  Every ``calib_every`` iterations the current gates sample
    ``calib_samples`` digits (fixed noise, guidance ``calib_cfg``) and the lazy ratio of
    that run is ``measured``.  target_ratio (optional) searches rho: both weights are
    scaled by exp(c), and c += ratio_gain * (target - measured) after each measurement.
    One AdamW per step index, stepped only when that index is trained, as the
    official optimizer skips the gates that got no gradient.  loss: "official" (MSE over
    every output channel) or "x" (an extension: the error the reuse causes in the next
    DDIM latent, i.e. the eps channels weighted by ``ddim_eps_gain`` of the step after).
    """

    def __init__(self, model, images, labels, steps, rho_attn=1e-2, rho_mlp=1e-2, lr=1e-2, batch=32, seed=0,
                 all_steps=False, target_ratio=None, ratio_gain=2.0, label_drop=LABEL_DROP, threshold=0.5,
                 calib_every=25, calib_samples=8, calib_cfg=1.5, loss="official"):
        self.model = model
        self.images = np.asarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        cfg = model.config
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if self.images.ndim != 4 or self.images.shape[1:] != want or len(self.labels) != len(self.images):
            raise ValueError(f"data: images {self.images.shape} / labels {self.labels.shape} do not fit the model "
                             f"(expected (N, {', '.join(map(str, want))}) and (N,))")
        if len(self.images) < batch:
            raise ValueError(f"batch {batch} is larger than the data ({len(self.images)} images)")
        self.diffusion = create_diffusion(steps)
        S = self.diffusion.num_timesteps
        if S < 2:
            raise ValueError("gate training needs at least 2 sampling steps")
        if loss not in ("official", "x"):
            raise ValueError(f"loss must be 'official' or 'x', got {loss!r}")
        if target_ratio is not None and not 0.0 <= target_ratio < 1.0:
            raise ValueError(f"target_ratio must lie in [0, 1), got {target_ratio}")
        self.settings = {"steps": S, "rho_attn": float(rho_attn), "rho_mlp": float(rho_mlp), "lr": float(lr),
                         "batch": int(batch), "seed": int(seed), "all_steps": bool(all_steps),
                         "target_ratio": None if target_ratio is None else float(target_ratio),
                         "ratio_gain": float(ratio_gain), "label_drop": float(label_drop),
                         "threshold": float(threshold), "calib_every": int(calib_every),
                         "calib_samples": int(calib_samples), "calib_cfg": float(calib_cfg), "loss": loss}
        self.gates = LazyGates.zeros(model, S, dtype=model.dtype)
        self.opts = [AdamW({"attn": self.gates.attn[s], "mlp": self.gates.mlp[s]}, lr=lr, weight_decay=0.0)
                     for s in range(S)]                                # views: AdamW updates the gates in place
        self.rng = np.random.default_rng(seed)
        self.iteration = 0
        self.log_scale = 0.0                                           # rho multiplier exp(log_scale)
        self.measured = None                                           # lazy ratio of the last calibration run

    # -- what each iteration trains ------------------------------------------------
    @property
    def trainable_steps(self):
        """Gate indices this recipe trains: official t - 1 = 2k (t odd); all-steps 0..S-2."""
        S = self.settings["steps"]
        return list(range(S - 1)) if self.settings["all_steps"] else list(range(0, 2 * (S // 2), 2))

    def rho(self):
        k = float(np.exp(self.log_scale))
        return self.settings["rho_attn"] * k, self.settings["rho_mlp"] * k

    def measure(self, num=None, seed=None, cfg_scale=None):
        """LazyStats of a sampling run with the current gates (default: the calibration run)."""
        st, model = self.settings, self.model
        num = st["calib_samples"] if num is None else num
        noise = make_noise(model, num, seed=st["seed"] + 1 if seed is None else seed)
        stats = LazyStats()
        lazy = LazyDiT(model, self.diffusion.timestep_map, self.gates, st["threshold"], stats=stats)
        ddim_sample(lazy, noise, np.arange(num) % model.config.num_classes, st["steps"],
                    st["calib_cfg"] if cfg_scale is None else cfg_scale)
        return stats

    def _draw(self):
        st, cfg = self.settings, self.model.config
        S, B = st["steps"], st["batch"]
        idx = self.rng.choice(len(self.images), size=B, replace=False)
        y = self.labels[idx].copy()
        y[self.rng.random(B) < st["label_drop"]] = cfg.num_classes        # label drop -> the null class
        t = int(self.rng.integers(1, S)) if st["all_steps"] else 2 * int(self.rng.integers(0, S // 2)) + 1
        noise = self.rng.standard_normal(self.images[idx].shape)
        return self.images[idx], y, t, noise

    def step(self):
        """One iteration; returns the loss dict of ``lazy_loss`` plus ``index`` (the trained gate step)."""
        model, xp, st = self.model, self.model.xp, self.settings
        x0, y, t, noise = self._draw()
        x_next, caches = teacher_step(model, self.diffusion, x0, y, t, noise)
        s = t - 1
        t_next = np.full(len(y), self.diffusion.timestep_map[s])
        target = model(x_next, t_next, y)
        w = {kind: xp.asarray(self.gates.of(kind)[s]) for kind in KINDS}
        rho_attn, rho_mlp = self.rho()
        weight = None
        if st["loss"] == "x":
            C = model.config.in_channels
            weight = np.zeros((1, model.config.out_channels, 1, 1))
            weight[:, :C] = ddim_eps_gain(self.diffusion, s)                 # the step x_next takes next
        res = lazy_loss(model, x_next, t_next, y, caches, w, rho_attn, rho_mlp, target, out_weight=weight)
        self.opts[s].step({kind: to_numpy(g) for kind, g in res["grads"].items()})
        self.iteration += 1
        if st["calib_samples"] > 0 and self.iteration % st["calib_every"] == 0:
            self.measured = self.measure().lazy_ratio
            if st["target_ratio"] is not None:
                self.log_scale += st["ratio_gain"] * (st["target_ratio"] - self.measured)
        res["index"] = s
        return res

    # -- checkpoints -------------------------------------------------------------------------
    def state(self):
        """(tensors, metadata) of a checkpoint: everything needed to continue bit for bit."""
        tensors = {"gates.attn": self.gates.attn, "gates.mlp": self.gates.mlp}
        steps_done = []
        for s, opt in enumerate(self.opts):
            sd = opt.state_dict()
            steps_done.append(sd["step"])
            for kind in KINDS:
                tensors[f"opt.{s}.exp_avg.{kind}"] = sd["exp_avg"][kind]
                tensors[f"opt.{s}.exp_avg_sq.{kind}"] = sd["exp_avg_sq"][kind]
        meta = {"format": CHECKPOINT_FORMAT, "iteration": str(self.iteration),
                "settings": json.dumps(self.settings, sort_keys=True), "log_scale": repr(self.log_scale),
                "measured": json.dumps(self.measured),
                "rng": json.dumps(self.rng.bit_generator.state), "opt_steps": json.dumps(steps_done),
                "weights_hash": self.gates.weights_hash, "dtype": self.model.dtype.name}
        return tensors, meta

    def save(self, path):
        tensors, meta = self.state()
        write_safetensors(path, tensors, meta)

    def load(self, path):
        """Continue from a checkpoint written by ``save`` with the same model and settings.

        Every field is checked before anything changes (a CheckpointError names the file and the
        field): the model's weights hash and dtype, the settings, the iteration and per-step AdamW
        counts, the rho scale, the calibration ratio, the generator state, and exactly this run's
        tensors (exp_avg_sq >= 0)."""
        from .io import ResumeCheckpoint, describe_value
        with ResumeCheckpoint(path, CHECKPOINT_FORMAT) as ck:
            if ck.text("weights_hash") != self.gates.weights_hash:
                raise ck.error(f"checkpoint is for DiT weights {ck.text('weights_hash')[:12]!r}, "
                               f"this model is {self.gates.weights_hash[:12]}")
            if ck.text("dtype") != self.model.dtype.name:
                raise ck.error(f"checkpoint was trained in {describe_value(ck.text('dtype'))}, "
                               f"the model is {self.model.dtype.name}")
            saved = ck.json("settings", dict)
            diff = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
            if diff:
                raise ck.error("checkpoint settings differ from this run: " + ", ".join(
                    f"{k} {describe_value(a)} (checkpoint) vs {b}" for k, (a, b) in diff.items()))
            st = self.settings
            iteration = ck.integer("iteration", 0, 10 ** 12)
            opt_steps = ck.json("opt_steps", list)
            if len(opt_steps) != len(self.opts) or not all(type(n) is int and 0 <= n <= iteration
                                                           for n in opt_steps):
                raise ck.error(f"metadata opt_steps must list {len(self.opts)} step counts in 0..{iteration}")
            if sum(opt_steps) != iteration:                           # each iteration steps one AdamW
                raise ck.error(f"metadata opt_steps add up to {sum(opt_steps)}, not the {iteration} iterations")
            log_scale = ck.number("log_scale", -700.0, 700.0)         # exp() of it scales rho
            if st["target_ratio"] is None and log_scale != 0.0:
                raise ck.error(f"metadata log_scale is {log_scale}, but without a target ratio rho is never scaled")
            measured = ck.json("measured", (float, int, type(None)))
            calibrated = st["calib_samples"] > 0 and iteration >= st["calib_every"]
            if isinstance(measured, bool) or (measured is None) == calibrated or (
                    measured is not None and not 0 <= measured <= 1):
                raise ck.error(f"metadata measured is {describe_value(measured)}: after {iteration} iterations it "
                               f"is " + ("a lazy ratio in [0, 1]" if calibrated else "null (no calibration yet)"))
            rng_state = ck.rng_state("rng", self.rng)
            tensors, _ = self.state()
            tensors = ck.tensors({k: (a.shape, a.dtype) for k, a in tensors.items()})
            negative = [k for k in tensors if ".exp_avg_sq." in k and (tensors[k] < 0).any()]
            if negative:
                raise ck.error(f"{negative[0]} has negative entries (a second moment is >= 0)")
        self.gates.attn[...] = tensors["gates.attn"]
        self.gates.mlp[...] = tensors["gates.mlp"]
        for s, (opt, n) in enumerate(zip(self.opts, opt_steps)):
            opt.load_state_dict({"step": n, "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
                                 "weight_decay": opt.weight_decay,
                                 "exp_avg": {k: tensors[f"opt.{s}.exp_avg.{k}"] for k in KINDS},
                                 "exp_avg_sq": {k: tensors[f"opt.{s}.exp_avg_sq.{k}"] for k in KINDS}})
        self.rng.bit_generator.state = rng_state
        self.log_scale, self.measured, self.iteration = log_scale, measured, iteration

    def training_facts(self):
        rho_attn, rho_mlp = self.rho()
        return dict(self.settings, recipe=("all-steps" if self.settings["all_steps"] else "official (odd t)")
                    + (", x loss" if self.settings["loss"] == "x" else ""),
                    iterations=self.iteration, final_rho_attn=rho_attn, final_rho_mlp=rho_mlp,
                    calibration_ratio=self.measured)
