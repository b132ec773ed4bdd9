"""The DiT training objective (ADM ``training_losses`` with a learned variance) and its gradient.

DiT trains with ``create_diffusion(timestep_respacing="")``: 1000 steps, eps prediction, loss
type MSE, ``learn_sigma=True`` (LEARNED_RANGE variance).  Per sample, as in ADM/DiT
``GaussianDiffusion.training_losses``:

    mse  = mean_flat((noise - eps)^2)
    vb   = mean_flat(KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))) / ln 2      for t > 0
         = mean_flat(-log p(x_0 | x_1)) / ln 2   (discretized Gaussian)        for t = 0
    loss = mse + vb       (vb is not rescaled: that is RESCALED_MSE, which DiT does not use)

p's mean is built from the eps half *detached* (``frozen_out``), so vb only trains the
variance half v: ``log var = frac * log(beta_t) + (1 - frac) * log(posterior var clipped)``,
``frac = (v + 1) / 2``.  The model minimises the batch mean of ``loss``;
``training_losses_backward`` is its gradient w.r.t. the model output, written by hand.

Not official, off by default: ``snr_gamma`` weights the mse term per sample by
``min(SNR(t), gamma) / SNR(t)``, SNR(t) = alphas_cumprod / (1 - alphas_cumprod): the Min-SNR-gamma
strategy for eps prediction (Hang et al., ICCV 2023), which takes weight off the nearly clean
steps (SNR > gamma: t < 130 of 1000 at gamma 5) whose large eps errors dominate the gradient.

Every schedule coefficient is looked up in float64 and cast to float32, as the official
``_extract_into_tensor(...).float()``; products with the arrays run in their dtype.
"""
import math

import numpy as np

from .backend import array_module_of, to_numpy
from .diffusion import extract

LN2 = math.log(2.0)
BIN_HALF = 1.0 / 255.0                    # half-width of an 8-bit bin on [-1, 1]
LOG_CLAMP = 1e-12                          # probabilities are clamped before the log
CDF_K = math.sqrt(2.0 / math.pi)          # tanh approximation of the normal CDF
CDF_C = 0.044715


def mean_flat(x):
    """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


# ----------------------------------------------------------------------------
# KL between two diagonal Gaussians (ADM ``normal_kl``), in nats, elementwise

def normal_kl_forward(mean1, logvar1, mean2, logvar2):
    xp = array_module_of(mean2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + xp.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * xp.exp(-logvar2))


def normal_kl_backward(dkl, mean1, logvar1, mean2, logvar2):
    """Gradient w.r.t. logvar2 only (the one input the training loss differentiates)."""
    xp = array_module_of(mean2)
    return dkl * 0.5 * (1.0 - xp.exp(logvar1 - logvar2) - ((mean1 - mean2) ** 2) * xp.exp(-logvar2))


# ----------------------------------------------------------------------------
# tanh approximation of the standard normal CDF (ADM ``approx_standard_normal_cdf``)

def approx_standard_normal_cdf_forward(x):
    xp = array_module_of(x)
    return 0.5 * (1.0 + xp.tanh(CDF_K * (x + CDF_C * x ** 3)))


def approx_standard_normal_cdf_backward(dy, x):
    xp = array_module_of(x)
    th = xp.tanh(CDF_K * (x + CDF_C * x ** 3))
    return dy * 0.5 * (1.0 - th * th) * CDF_K * (1.0 + 3.0 * CDF_C * x * x)


# ----------------------------------------------------------------------------
# log-likelihood of x (8-bit data on [-1, 1]) under a Gaussian discretised to bins of
# width 2/255, with open-ended edge bins (ADM ``discretized_gaussian_log_likelihood``)

def discretized_gaussian_log_likelihood_forward(x, means, log_scales):
    """x, means, log_scales same shape -> (log_probs in nats, cache)."""
    xp = array_module_of(means)
    centered = x - means
    inv_stdv = xp.exp(-log_scales)
    plus_in = inv_stdv * (centered + BIN_HALF)
    min_in = inv_stdv * (centered - BIN_HALF)
    cdf_plus = approx_standard_normal_cdf_forward(plus_in)
    cdf_min = approx_standard_normal_cdf_forward(min_in)
    one_minus_cdf_min = 1.0 - cdf_min
    cdf_delta = cdf_plus - cdf_min
    lo, hi = x < -0.999, x > 0.999                       # edge bins reach to -inf / +inf
    log_probs = xp.where(lo, xp.log(xp.maximum(cdf_plus, LOG_CLAMP)),
                         xp.where(hi, xp.log(xp.maximum(one_minus_cdf_min, LOG_CLAMP)),
                                  xp.log(xp.maximum(cdf_delta, LOG_CLAMP))))
    cache = (plus_in, min_in, cdf_plus, one_minus_cdf_min, cdf_delta, lo, hi)
    return log_probs, cache


def discretized_gaussian_log_likelihood_backward(dlog_probs, cache):
    """Gradient w.r.t. log_scales (means are frozen in the training loss).

    A clamped probability passes no gradient (PyTorch's clamp passes it where p >= the bound).
    d(plus_in)/d(log_scales) = -plus_in, likewise for min_in.
    """
    plus_in, min_in, cdf_plus, one_minus_cdf_min, cdf_delta, lo, hi = cache
    xp = array_module_of(plus_in)
    pdf_plus = approx_standard_normal_cdf_backward(1.0, plus_in)
    pdf_min = approx_standard_normal_cdf_backward(1.0, min_in)
    # d log_prob / d plus_in and d log_prob / d min_in for each of the three cases
    d_plus_lo = xp.where(cdf_plus >= LOG_CLAMP, pdf_plus / xp.maximum(cdf_plus, LOG_CLAMP), 0.0)
    d_min_hi = xp.where(one_minus_cdf_min >= LOG_CLAMP,
                        -pdf_min / xp.maximum(one_minus_cdf_min, LOG_CLAMP), 0.0)
    inv_delta = xp.where(cdf_delta >= LOG_CLAMP, 1.0 / xp.maximum(cdf_delta, LOG_CLAMP), 0.0)
    d_plus = xp.where(lo, d_plus_lo, xp.where(hi, 0.0, pdf_plus * inv_delta))
    d_min = xp.where(lo, 0.0, xp.where(hi, d_min_hi, -pdf_min * inv_delta))
    return dlog_probs * (d_plus * -plus_in + d_min * -min_in)


# ----------------------------------------------------------------------------
# the training loss and its gradient w.r.t. the model output

def min_snr_weight(diffusion, t, gamma, like):
    """min(SNR(t), gamma) / SNR(t) in float64, cast to float32 as ``extract`` casts: shape (B, 1, 1, 1)."""
    acp = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    snr = acp / (1.0 - acp)
    return extract(np.minimum(snr, gamma) / snr, t, like)


def training_losses(diffusion, model_output, x_start, x_t, t, noise, snr_gamma=None):
    """Per-sample loss terms of one batch.

    diffusion: a ``tinylazy.diffusion.GaussianDiffusion`` with the full (unrespaced) schedule.
    model_output (B, 2C, H, W) with learned sigma ([eps, v]) or (B, C, H, W) without;
    x_start, x_t = q_sample(x_start, t, noise), noise (B, C, H, W); t (B,) ints 0..T-1.
    snr_gamma: None (official) or gamma > 0: loss = w(t) mse (+ vb), w = ``min_snr_weight``.
    Returns (terms, cache): terms["mse"] (unweighted), terms["vb"] (learned sigma only), terms["loss"], each (B,).
    """
    xp = array_module_of(model_output)
    B, C = x_start.shape[:2]
    t = np.asarray(to_numpy(t)).reshape(-1).astype(np.int64)
    if t.shape != (B,) or t.min() < 0 or t.max() >= diffusion.num_timesteps:
        raise ValueError(f"t must hold {B} timesteps in 0..{diffusion.num_timesteps - 1}, got {t.tolist()[:8]}")
    if model_output.shape[1] not in (C, 2 * C) or model_output.shape[2:] != x_start.shape[2:]:
        raise ValueError(f"model output has shape {tuple(model_output.shape)}; expected (B, {C} or {2 * C}, "
                         f"{', '.join(map(str, x_start.shape[2:]))}) for x_start {tuple(x_start.shape)}")
    if snr_gamma is not None and not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be None or > 0, got {snr_gamma}")
    learn_sigma = model_output.shape[1] == 2 * C
    eps = model_output[:, :C]
    terms = {"mse": mean_flat((noise - eps) ** 2)}                       # eps target (ModelMeanType.EPSILON)
    w = None if snr_gamma is None else min_snr_weight(diffusion, t, snr_gamma, eps)
    weighted_mse = terms["mse"] if w is None else w.reshape(-1) * terms["mse"]
    cache = {"eps": eps, "noise": noise, "learn_sigma": learn_sigma, "shape": model_output.shape, "mse_weight": w}
    if not learn_sigma:
        terms["loss"] = weighted_mse
        return terms, cache

    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x_start, x_t, t)   # q(x_{t-1} | x_t, x_0)
    p = diffusion.p_mean_variance(model_output, x_t, t)        # p(x_{t-1} | x_t): eps is only read (frozen)
    model_mean, model_log_var = p["mean"], p["log_variance"]
    min_log = extract(diffusion.posterior_log_variance_clipped, t, x_t)
    max_log = extract(np.log(diffusion.betas), t, x_t)

    kl = normal_kl_forward(true_mean, true_log_var, model_mean, model_log_var)
    log_probs, dgll_cache = discretized_gaussian_log_likelihood_forward(x_start, model_mean, 0.5 * model_log_var)
    is_t0 = xp.asarray(t == 0)
    terms["vb"] = xp.where(is_t0, mean_flat(-log_probs) / LN2, mean_flat(kl) / LN2)
    terms["loss"] = weighted_mse + terms["vb"]
    cache.update(true_mean=true_mean, true_log_var=true_log_var, model_mean=model_mean,
                 model_log_var=model_log_var, dlog_var_dv=(max_log.astype(x_t.dtype) - min_log) / 2,
                 dgll_cache=dgll_cache, is_t0=is_t0)                  # d log_var / d v in the model dtype
    return terms, cache


def training_losses_backward(cache):
    """Gradient of ``terms["loss"].mean()`` (the batch mean) w.r.t. the model output."""
    eps, noise = cache["eps"], cache["noise"]
    xp = array_module_of(eps)
    B = eps.shape[0]
    scale = 1.0 / (B * (eps.size // B))                                  # batch mean of mean_flat
    dout = xp.empty(cache["shape"], dtype=eps.dtype)
    C = eps.shape[1]
    dout[:, :C] = (2.0 * scale) * (eps - noise)                          # d (noise - eps)^2 / d eps
    if cache.get("mse_weight") is not None:
        dout[:, :C] *= cache["mse_weight"]                                # min-SNR: w(t) per sample
    if not cache["learn_sigma"]:
        return dout
    # vb sees only v: d vb / d model_log_var, per sample from the KL or from the decoder NLL
    dlv_kl = normal_kl_backward(1.0, cache["true_mean"], cache["true_log_var"],
                                cache["model_mean"], cache["model_log_var"])
    dlv_nll = -0.5 * discretized_gaussian_log_likelihood_backward(1.0, cache["dgll_cache"])  # log_scales = lv / 2
    dlv = xp.where(cache["is_t0"][:, None, None, None], dlv_nll, dlv_kl)
    dout[:, C:] = dlv * cache["dlog_var_dv"] * (scale / LN2)
    return dout
