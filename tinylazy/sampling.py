"""Samplers: respaced DDIM and ancestral DDPM with classifier-free guidance.

The loops of ADM's ``ddim_sample_loop`` / ``p_sample_loop`` as DiT's ``sample.py``
drives them, on any backend (``model.xp``).  All randomness comes from the
caller (the initial noise, and for DDPM or DDIM with eta > 0 the per-step noise),
drawn on the host in NumPy, so every backend replays the same run.

Guidance, as the official ``sample.py``: for ``cfg_scale > 1`` the model sees
the doubled batch ``[x; x]`` with labels ``[y; null]`` through
``forward_with_cfg`` and the first (conditional) half is kept; for
``cfg_scale == 1`` a plain forward.  Every operation after the model is
per sample, so the loop carries only the kept half.

One loop serves every model of the protocol (protocol.py); a lazy run is a lazy
model (``lazy.LazyDiT``), and where the latents live is a ``latents`` object:
``HostLatents`` (arrays of ``model.xp``) or a backend's twin (``opencl.DeviceLatents``).
The choice of either is made above this module (``tinylazy.api``).
"""
import numbers

import numpy as np

from .backend import array_module_of, to_numpy
from .diffusion import NUM_TRAIN_TIMESTEPS, create_diffusion, extract
from .protocol import check_cfg_scale
from .progress import Progress


# ----------------------------------------------------------------------------
# Inputs

def make_noise(model_or_shape, batch=1, seed=0, dtype=None):
    """Seeded initial noise x_T on the host: (batch, C, H, W).

    model_or_shape: a DiT (shape from its config, dtype from the model) or a (C, H, W)
    tuple (dtype float32 unless given).  Drawn in float64 by
    ``np.random.default_rng(seed).standard_normal`` and then cast, so float32 and
    float64 runs start from the same numbers up to rounding.
    """
    if hasattr(model_or_shape, "config"):
        c = model_or_shape.config
        shape = (c.in_channels, c.input_size, c.input_size)
        dtype = model_or_shape.dtype if dtype is None else dtype
    else:
        shape = tuple(int(s) for s in model_or_shape)
        if len(shape) != 3:
            raise ValueError(f"make_noise wants a model or a (C, H, W) shape, got {shape}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch,) + shape).astype(np.float32 if dtype is None else dtype)


def sample_labels(model_or_num_classes, batch=1, seed=0):
    """Seeded uniform class ids (batch,) int64 in 0..num_classes-1."""
    n = model_or_num_classes.config.num_classes if hasattr(model_or_num_classes, "config") \
        else int(model_or_num_classes)
    return np.random.default_rng(seed).integers(0, n, size=batch, dtype=np.int64)


def check_steps(steps):
    """Sampling steps: an int in 1..1000 (or an ADM respacing string such as "ddim25")."""
    if isinstance(steps, str):
        return steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) \
            or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be an integer in 1..{NUM_TRAIN_TIMESTEPS}, got {steps!r}")
    return int(steps)


def check_labels(model, labels, cfg_scale=1.0):
    """Class ids (B,) as host int64; an id outside 0..num_classes-1 is a ValueError naming it."""
    n = model.config.num_classes
    y = np.asarray(to_numpy(labels)).reshape(-1)
    if y.size == 0:
        raise ValueError("labels is empty: give one class id per sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"class ids must be integers, got {y.dtype} values {y.tolist()[:8]}")
    bad = sorted({int(v) for v in y if not 0 <= v < n})
    if bad:
        raise ValueError(f"unknown class id{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: "
                         f"this model has classes 0..{n - 1}")
    if cfg_scale > 1 and not model.config.class_dropout_prob > 0:     # no null row (param_shapes)
        raise ValueError("cfg_scale > 1 needs the null-class row of the label table, which this model lacks")
    return y.astype(np.int64)


def _check_noise(model, noise, batch):
    c = model.config
    want = (batch, c.in_channels, c.input_size, c.input_size)
    if tuple(np.shape(noise)) != want:
        raise ValueError(f"noise has shape {tuple(np.shape(noise))}, expected {want} "
                         f"({batch} labels, model input {c.in_channels}x{c.input_size}x{c.input_size})")


def _noise_source(step_noise, shape, model, num_steps, who):
    """Per-step noise draw(k) from an int seed, a NumPy Generator, a list of num_steps arrays or a
    function k -> array (k = 0 the first step)."""
    xp, dtype = model.xp, model.dtype
    if step_noise is None:
        raise ValueError(f"{who} draws fresh noise every step: pass step_noise=<int seed | "
                         f"numpy Generator | list of {num_steps} arrays of shape {shape} | function of the step>")
    if isinstance(step_noise, numbers.Integral):
        step_noise = np.random.default_rng(step_noise)
    if isinstance(step_noise, np.random.Generator):
        rng = step_noise
        return lambda k: xp.asarray(rng.standard_normal(shape).astype(dtype))
    if callable(step_noise):
        return lambda k: xp.asarray(_check_shape(step_noise(k), shape, f"step_noise({k})"), dtype=dtype)
    arrays = list(step_noise)
    if len(arrays) != num_steps:
        raise ValueError(f"step_noise has {len(arrays)} arrays, expected one per step ({num_steps})")
    for k, a in enumerate(arrays):
        _check_shape(a, shape, f"step_noise[{k}]")
    return lambda k: xp.asarray(arrays[k], dtype=dtype)


def _check_shape(a, shape, name):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


class HostLatents:
    """The latents as arrays of ``model.xp`` in ``model.dtype`` (NumPy or CuPy), stepped by
    ``ddim_step``: the reference.  A backend that keeps them on its device has a twin with
    the same methods (``opencl.DeviceLatents``)."""

    def __init__(self, model):
        self.model = model

    def start(self, noise):
        return self.model.xp.asarray(noise, dtype=self.model.dtype)

    def denoiser(self, model, labels, cfg_scale, guide_channels):
        """x (B, C, H, W), original timestep -> model output (B, out_channels, H, W)."""
        xp, B = model.xp, len(labels)
        if cfg_scale == 1:
            return lambda x, t: model(x, np.full(B, t, dtype=np.int64), labels)
        y = np.concatenate([labels, np.full(B, model.config.num_classes, dtype=np.int64)])   # [y; null]
        t_batch = lambda t: np.full(2 * B, t, dtype=np.int64)
        return lambda x, t: model.forward_with_cfg(xp.concatenate([x, x], axis=0), t_batch(t), y, cfg_scale,
                                                   guide_channels=guide_channels)[:B]   # keep the cond half

    @staticmethod
    def ddim_step(eta, clip_denoised):
        return lambda d, out, x, i, z: ddim_step(d, out, x, i, eta, z, clip_denoised)

    @staticmethod
    def host(info):
        """What a callback sees: the arrays themselves."""
        return info

    @staticmethod
    def finish(x):
        return x


# ----------------------------------------------------------------------------
# One step (t: the respaced index, an int or one per sample)

def _nonzero_mask(t, x):
    """ADM's ``(t != 0).float()`` as (B, 1, 1, 1): no noise is added at t == 0."""
    t = np.asarray(to_numpy(t), dtype=np.int64).reshape(-1)
    t = np.repeat(t, x.shape[0]) if t.size == 1 else t
    return array_module_of(x).asarray((t != 0).astype(np.float32).reshape(-1, 1, 1, 1))


def _add_noise(x_next, scale, noise, t, who):
    if noise is None:
        raise ValueError(f"{who} at t > 0 needs noise of shape {tuple(x_next.shape)}")
    return x_next + _nonzero_mask(t, x_next) * scale * noise


def ddim_step(diffusion, model_output, x, t, eta=0.0, noise=None, clip_denoised=False):
    """ADM ``ddim_sample`` (DDIM eq. 12): x_t -> x_{t-1}; returns dict(x_next, pred_xstart, eps).

    alpha_bar, alpha_bar_prev and sigma are float32 like the looked-up coefficients,
    so sqrt(alpha_bar_prev) and sqrt(1 - alpha_bar_prev - sigma^2) are float32; the
    products with the latents run in the latents' dtype.  noise is used only for eta > 0.
    """
    xp = array_module_of(x)
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])        # re-derived, as ADM does
    alpha_bar = extract(diffusion.alphas_cumprod, t, x)             # float32 (B, 1, 1, 1)
    alpha_bar_prev = extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * xp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * xp.sqrt(1 - alpha_bar / alpha_bar_prev)
    x_next = out["pred_xstart"] * xp.sqrt(alpha_bar_prev) + xp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    if eta > 0 and np.any(np.asarray(to_numpy(t)) != 0):
        x_next = _add_noise(x_next, sigma, noise, t, "DDIM with eta > 0")
    return {"x_next": x_next, "pred_xstart": out["pred_xstart"], "eps": eps}


def ddpm_step(diffusion, model_output, x, t, noise=None, clip_denoised=False):
    """ADM ``p_sample``: x_{t-1} = mean + exp(log_variance / 2) * noise, no noise at t == 0.

    Returns dict(x_next, pred_xstart, eps, log_variance).
    """
    xp = array_module_of(x)
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    x_next = out["mean"]
    if np.any(np.asarray(to_numpy(t)) != 0):
        x_next = _add_noise(x_next, xp.exp(0.5 * out["log_variance"]), noise, t, "DDPM")
    return {"x_next": x_next, "pred_xstart": out["pred_xstart"], "eps": out["eps"],
            "log_variance": out["log_variance"]}


# ----------------------------------------------------------------------------
# Loops

def _sample_loop(name, step, model, noise, labels, steps, cfg_scale, guide_channels, draw_noise,
                 step_noise, progress, callback, latents):
    steps, cfg_scale = check_steps(steps), check_cfg_scale(cfg_scale)
    labels = check_labels(model, labels, cfg_scale)
    _check_noise(model, noise, len(labels))
    x = latents.start(noise)
    diffusion = create_diffusion(steps)
    T = diffusion.num_timesteps
    draw = _noise_source(step_noise, x.shape, model, T, name) if draw_noise else None
    denoise = latents.denoiser(model, labels, cfg_scale, guide_channels)
    indices = range(T - 1, -1, -1)
    for k, i in enumerate(Progress(indices, desc=f"{name} {T} steps") if progress else indices):
        t = int(diffusion.timestep_map[i])                    # the model sees the original timestep
        model_output = denoise(x, t)
        res = step(diffusion, model_output, x, i, None if draw is None else draw(k))
        if callback is not None:
            callback(i, latents.host(dict(res, step=k, t=t, x=x, model_output=model_output)))
        x = res["x_next"]
    return latents.finish(x)


def ddim_sample(model, noise, labels, steps=20, cfg_scale=1.0, eta=0.0, step_noise=None,
                progress=False, callback=None, guide_channels=3, clip_denoised=False, latents=None):
    """Respaced DDIM (ADM ``ddim_sample_loop``): noise x_T (B, C, H, W) -> final latents (B, C, H, W).

    model: the model protocol (protocol.py; the loop uses ``config``, ``xp``, ``dtype``,
    ``__call__`` and ``forward_with_cfg``), e.g. a DiT or a ``lazy.LazyDiT``; labels: (B,)
    class ids; steps: 1..1000 (ADM's running-sum respacing) or a respacing string such as
    "ddim25"; cfg_scale: 1 = plain forward, > 1 = official classifier-free guidance on the
    first ``guide_channels`` channels (None = all).  eta > 0 needs ``step_noise`` (int seed,
    NumPy Generator drawing (B, C, H, W) float64 per step, or a list of one array per step).
    callback(i, info) runs after every step with the respaced index i and info =
    {step, t (original timestep), x (x_t), model_output, eps, pred_xstart, x_next}.
    latents: where the latents live (default ``HostLatents(model)``).  ``tinylazy.ddim_sample``
    (api.py) adds the lazy arguments and picks the latents for the model's backend.
    """
    eta = float(eta)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    latents = HostLatents(model) if latents is None else latents
    return _sample_loop("DDIM", latents.ddim_step(eta, clip_denoised), model, noise, labels, steps, cfg_scale,
                        guide_channels, eta > 0, step_noise, progress, callback, latents)


def ddpm_sample(model, noise, labels, steps=250, cfg_scale=1.0, step_noise=None,
                progress=False, callback=None, guide_channels=3, clip_denoised=False):
    """Ancestral sampling (ADM ``p_sample_loop``, the official sampler, 250 steps by default).

    Arguments as ``ddim_sample``; ``step_noise`` is required (int seed, NumPy Generator, a
    list of one (B, C, H, W) array per step or a function of the step k; one is drawn at
    every step, the last one unused as in ADM, which draws noise at t == 0 and masks it).
    callback info also has log_variance.
    """
    step = lambda d, out, x, i, z: ddpm_step(d, out, x, i, z, clip_denoised)
    return _sample_loop("DDPM", step, model, noise, labels, steps, cfg_scale, guide_channels,
                        True, step_noise, progress, callback, HostLatents(model))
