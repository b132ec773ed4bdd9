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

Recipes beyond the paper (``RECIPES``, ``tinylazy train-gates --recipe NAME``; docs/lazy.md
measures them on the frontier): ``x-norm`` weighs the reuse error by how far it moves the
next DDIM latent, normalised over the trained steps so that one rho fits every step count;
``chain`` trains on the gates' own guided sampling runs, so that the cache a gate decides
about is the one sampling will have, reused several steps in a row where the gates chain.
"""
import json

import numpy as np

from .backend import array_module_of, to_numpy
from .diffusion import create_diffusion
from .io import write_safetensors
from .lazy import LazyDiT, LazyGates, LazyStats, gate_score
from .optim import AdamW
from .protocol import KINDS
from .sampling import HostLatents, ddim_sample, ddim_step, make_noise

LABEL_DROP = 0.1                    # official DiT class_dropout_prob, used for CFG
CHECKPOINT_FORMAT = "tinylazy-gate-training-v1"
LOSSES = ("official", "x", "x-norm")
# A MACs budget steers the share of the modules' MACs reused to target + this margin: one point
# lazier than asked, so that the gates' own cost (0.1% of a step on the digits model) and the
# spread between the small calibration runs and a large sampling run stay within the rules' MACs.
MACS_MARGIN = 0.01
BUDGETS = ("ratio", "macs")

# name -> (GateTrainer settings, one line); "official" is the paper's and the default
RECIPES = {
    "official": (dict(all_steps=False, loss="official", trajectory=False, budget="ratio"),
                 "the paper's: odd t, one full DDIM step as the cache, MSE of every output channel"),
    "all-steps": (dict(all_steps=True, loss="official", trajectory=False, budget="ratio"),
                  "the official loss on every step's gates (any t >= 1)"),
    "all-steps-macs": (dict(all_steps=True, loss="official", trajectory=False, budget="macs"),
                       "all-steps with rho steered to a MACs budget, as x-norm and chain (comparable with the "
                       "rules at equal compute)"),
    "x-loss": (dict(all_steps=True, loss="x", trajectory=False, budget="ratio"),
               "every step, the error in the next DDIM latent (eps channels times d x_prev / d eps)"),
    "x-norm": (dict(all_steps=True, loss="x-norm", trajectory=False, budget="macs"),
               "x-loss with the gains divided by their RMS over the trained steps (one rho scale at any N), "
               "rho steered to a MACs budget"),
    "chain": (dict(all_steps=True, loss="x-norm", trajectory=True, budget="macs"),
              "the gates' own guided sampling runs: chained caches, the guided eps error, x-norm weights, a MACs "
              "budget"),
}


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
    res = _with_lazy_terms(mse, scores, rho_attn, rho_mlp)
    dscores = res.pop("dscores")
    if backward:
        dout = diff * (2.0 / diff.size)
        if out_weight is not None:
            dout *= xp.asarray(out_weight, dtype=model.dtype)
        res["grads"] = soft_backward(model, dout, dscores, w, caches, tape)
    return res


def _with_lazy_terms(mse, scores, rho_attn, rho_mlp):
    """The loss dict of an output error ``mse`` and the scores (R, L, 2): loss = mse + rho_attn *
    mean_r(sum_l score_attn) + rho_mlp * mean_r(sum_l score_mlp), and dscores = dloss / dscores."""
    sums = scores.sum(axis=1).mean(axis=0)                               # (2,): mean_b sum_l score
    lazy_attn, lazy_mlp = float(sums[0]), float(sums[1])
    dscores = array_module_of(scores).empty_like(scores)
    dscores[..., 0] = rho_attn / scores.shape[0]
    dscores[..., 1] = rho_mlp / scores.shape[0]
    return {"loss": mse + rho_attn * lazy_attn + rho_mlp * lazy_mlp, "mse": mse, "lazy_attn": lazy_attn,
            "lazy_mlp": lazy_mlp, "scores": to_numpy(scores), "grads": None, "dscores": dscores}


def trajectory_loss(model, x, t, y, caches, w, rho_attn, rho_mlp, target, cfg_scale, eps_weight, backward=True,
                    guide_channels=3):
    """The ``chain`` recipe's loss at one step of a sampling run and, with ``backward``, its gradient
    w.r.t. the gates w.

    x, t, y: the model batch the sampler ran at this step ([cond; uncond] halves of one latent
    when cfg_scale != 1, as ``HostLatents.denoiser`` builds it); caches: the run's module outputs
    before this step; target: the full output at x.  The error is taken where the sampler uses
    it: the eps channels of the guided output (uncond + cfg_scale (cond - uncond) on the first
    ``guide_channels`` channels, the cond row's own output on the others, as
    ``DiT.forward_with_cfg``), times ``eps_weight`` (the step's d x_prev / d eps, normalised).
    loss = mean(err^2) + the lazy terms of ``lazy_loss`` over the model rows.  Returns the dict
    of ``lazy_loss``.
    """
    xp = model.xp
    tape = {} if backward else None
    out, scores = soft_forward(model, x, t, y, w, caches, tape)
    C = model.config.in_channels
    diff = out[:, :C] - xp.asarray(target, dtype=model.dtype)[:, :C]
    g = C if guide_channels is None else min(guide_channels, C)
    guided = cfg_scale != 1
    B = len(diff) // 2 if guided else len(diff)
    err = diff[:B].copy()
    if guided:
        err[:, :g] = cfg_scale * diff[:B, :g] + (1 - cfg_scale) * diff[B:, :g]
    err *= eps_weight
    res = _with_lazy_terms(float((err * err).mean()), scores, rho_attn, rho_mlp)
    dscores = res.pop("dscores")
    if backward:
        derr = err * (2.0 * eps_weight / err.size)
        dout = xp.zeros_like(out)
        dout[:B, :C] = derr
        if guided:
            dout[:B, :g] *= cfg_scale
            dout[B:, :g] = (1 - cfg_scale) * derr[:, :g]
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
    DDIM latent, i.e. the eps channels weighted by ``ddim_eps_gain`` of the step after), or
    "x-norm" (the x loss with the gains divided by their RMS over ``trainable_steps``).

    trajectory (the ``chain`` recipe, an extension): an iteration is one sampling run of
    ``batch`` samples from fresh noise and random labels, guided at ``calib_cfg`` as sampling
    is, with the current gates deciding (``LazyDiT``); at every step after the first, the
    soft-lazy output against the full output at the run's own latent, with the run's own
    caches (stale by several steps where the gates reused in a row), trains that step's gates
    (``trajectory_loss``), and the run itself is the calibration run (rho is steered each
    iteration).  No real images are drawn.

    budget: what rho steers to target_ratio: "ratio", the lazy ratio (official), or "macs", the
    share of the modules' MACs reused (``LazyStats.macs_lazy_ratio``; an MLP costs more than
    attention here) plus ``MACS_MARGIN``: the rules' budget is compute.
    """

    def __init__(self, model, images, labels, steps, rho_attn=1e-2, rho_mlp=1e-2, lr=1e-2, batch=32, seed=0,
                 all_steps=False, target_ratio=None, ratio_gain=2.0, label_drop=LABEL_DROP, threshold=0.5,
                 calib_every=25, calib_samples=8, calib_cfg=1.5, loss="official", trajectory=False, budget="ratio"):
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
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        if trajectory and not all_steps:
            raise ValueError("trajectory training trains every step's gates (all_steps=True)")
        if target_ratio is not None and not 0.0 <= target_ratio < 1.0:
            raise ValueError(f"target_ratio must lie in [0, 1), got {target_ratio}")
        self.settings = {"steps": S, "rho_attn": float(rho_attn), "rho_mlp": float(rho_mlp), "lr": float(lr),
                         "batch": int(batch), "seed": int(seed), "all_steps": bool(all_steps),
                         "target_ratio": None if target_ratio is None else float(target_ratio),
                         "ratio_gain": float(ratio_gain), "label_drop": float(label_drop),
                         "threshold": float(threshold), "calib_every": int(calib_every),
                         "calib_samples": int(calib_samples), "calib_cfg": float(calib_cfg), "loss": loss,
                         "trajectory": bool(trajectory), "budget": budget}
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

    def eps_weight(self, s):
        """How the x losses weigh the eps error of the step taken from index s: ``ddim_eps_gain``
        ("x"), divided by the gains' RMS over ``trainable_steps`` ("x-norm"); 1 for "official"."""
        loss = self.settings["loss"]
        if loss == "official":
            return 1.0
        gain = ddim_eps_gain(self.diffusion, s)
        if loss == "x":
            return gain
        return gain / float(np.sqrt(np.mean([ddim_eps_gain(self.diffusion, i) ** 2 for i in self.trainable_steps])))

    def step(self):
        """One iteration; returns the loss dict of ``lazy_loss`` plus ``index`` (the trained gate
        step; None for a trajectory, whose dict holds the means over its steps)."""
        if self.settings["trajectory"]:
            return self._trajectory()
        model, xp, st = self.model, self.model.xp, self.settings
        x0, y, t, noise = self._draw()
        x_next, caches = teacher_step(model, self.diffusion, x0, y, t, noise)
        s = t - 1
        t_next = np.full(len(y), self.diffusion.timestep_map[s])
        target = model(x_next, t_next, y)
        w = {kind: xp.asarray(self.gates.of(kind)[s]) for kind in KINDS}
        rho_attn, rho_mlp = self.rho()
        weight = None
        if st["loss"] != "official":
            C = model.config.in_channels
            weight = np.zeros((1, model.config.out_channels, 1, 1))
            weight[:, :C] = self.eps_weight(s)                               # the step x_next takes next
        res = lazy_loss(model, x_next, t_next, y, caches, w, rho_attn, rho_mlp, target, out_weight=weight)
        self.opts[s].step({kind: to_numpy(g) for kind, g in res["grads"].items()})
        self.iteration += 1
        if st["calib_samples"] > 0 and self.iteration % st["calib_every"] == 0:
            self._steer(self.measure())
        res["index"] = s
        return res

    def _steer(self, stats):
        """Record a calibration run's LazyStats and steer rho: the lazy ratio towards target_ratio, or
        under a "macs" budget the share of module MACs reused towards target_ratio + ``MACS_MARGIN``."""
        st = self.settings
        macs = st["budget"] == "macs"
        self.measured = stats.macs_lazy_ratio if macs else stats.lazy_ratio
        if st["target_ratio"] is not None:
            self.log_scale += st["ratio_gain"] * (st["target_ratio"] + macs * MACS_MARGIN - self.measured)

    def _trajectory(self):
        """One iteration of the ``chain`` recipe: a guided sampling run that trains as it goes."""
        model, xp, st = self.model, self.model.xp, self.settings
        cfg, S, B = model.config, st["steps"], st["batch"]
        y = self.rng.integers(0, cfg.num_classes, B)
        noise = self.rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size))
        scale = st["calib_cfg"]
        stats = LazyStats()
        lazy = LazyDiT(model, self.diffusion.timestep_map, self.gates, st["threshold"], stats=stats)
        latents = HostLatents(model)
        denoise = latents.denoiser(lazy, y, scale, 3)                     # the sampler's official guide channels
        rows_y = y if scale == 1 else np.concatenate([y, np.full(B, cfg.num_classes)])
        x = latents.start(noise)
        rho = self.rho()
        done = []
        for k, s in enumerate(range(S - 1, -1, -1)):
            t = np.full(len(rows_y), self.diffusion.timestep_map[s])
            caches = {key: c.copy() for key, c in lazy.cache.items()}    # the lazy step rewrites rows in place
            out = denoise(x, int(t[0]))
            if k:                                                         # the first step has no cache
                rows_x = x if scale == 1 else xp.concatenate([x, x], axis=0)
                w = {kind: xp.asarray(self.gates.of(kind)[s]) for kind in KINDS}
                res = trajectory_loss(model, rows_x, t, rows_y, caches, w, *rho, model(rows_x, t, rows_y), scale,
                                      self.eps_weight(s))
                self.opts[s].step({kind: to_numpy(g) for kind, g in res["grads"].items()})
                done.append(res)
            x = ddim_step(self.diffusion, out, x, s)["x_next"]
        self.iteration += 1
        self._steer(stats)
        mean = {key: float(np.mean([r[key] for r in done])) for key in ("loss", "mse", "lazy_attn", "lazy_mlp")}
        return dict(mean, scores=np.stack([r["scores"] for r in done]), grads=None, index=None)

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
            saved = dict({"trajectory": False, "budget": "ratio"}, **ck.json("settings", dict))   # older checkpoints
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
            per = st["steps"] - 1 if st["trajectory"] else 1          # AdamW steps per iteration
            if sum(opt_steps) != iteration * per:
                raise ck.error(f"metadata opt_steps add up to {sum(opt_steps)}, not the {iteration} iterations"
                               + (f" x {per} steps" if per != 1 else ""))
            log_scale = ck.number("log_scale", -700.0, 700.0)         # exp() of it scales rho
            if st["target_ratio"] is None and log_scale != 0.0:
                raise ck.error(f"metadata log_scale is {log_scale}, but without a target ratio rho is never scaled")
            measured = ck.json("measured", (float, int, type(None)))
            calibrated = (iteration >= 1 if st["trajectory"]                  # each run calibrates
                          else st["calib_samples"] > 0 and iteration >= st["calib_every"])
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

    @property
    def recipe(self):
        """The name in ``RECIPES`` of these settings, else what they are."""
        st = self.settings
        name = next((n for n, (kw, _) in RECIPES.items() if all(st[k] == v for k, v in kw.items())), None)
        return name or (("all-steps" if st["all_steps"] else "official (odd t)") + f", {st['loss']} loss")

    def training_facts(self):
        rho_attn, rho_mlp = self.rho()
        return dict(self.settings, recipe=self.recipe,
                    iterations=self.iteration, final_rho_attn=rho_attn, final_rho_mlp=rho_mlp,
                    calibration_ratio=self.measured)
