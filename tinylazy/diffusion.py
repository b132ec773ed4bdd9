"""The Gaussian diffusion of DiT: ADM's schedule, respacing and posterior, in float64.

Mirrors ``diffusion/gaussian_diffusion.py`` and ``diffusion/respace.py`` of
facebookresearch/DiT (which copy openai/guided-diffusion): a linear schedule of
1000 betas, eps prediction with a learned-range variance, and respacing that
keeps a subset of the timesteps.  Every coefficient is an array over the
(respaced) timesteps in float64 and is cast to float32 when it is looked up, as
``_extract_into_tensor(...).float()`` does; the products with the latents then
run in the latents' dtype (docs/numerics.md).  The samplers live in ``sampling.py``.

Index conventions: ``t`` is always the respaced index 0..num_timesteps-1 (what
the coefficient arrays are indexed by); the model is called with
``timestep_map[t]``, the original timestep 0..999.
"""
import numpy as np

from .backend import array_module_of, to_numpy

NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------
# Schedule and respacing

def linear_betas(num_timesteps=NUM_TRAIN_TIMESTEPS):
    """ADM ``get_named_beta_schedule("linear", n)``: 1e-4..0.02 scaled by 1000/n, float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, section_counts):
    """ADM ``space_timesteps``: the set of original timesteps kept by a respacing.

    section_counts: an int N (one section), a list of ints (one count per equal
    section), a string of comma-separated counts ("250", "10,15,20"), or "ddimN":
    the integer stride that gives exactly N steps (``range(0, num_timesteps, stride)``).
    Within a section the stride is fractional and accumulated as a running float
    sum, each entry taken with Python's ``round`` (half to even); that is not the
    same as ``round(i * stride)`` (e.g. N = 21).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make exactly {desired} steps out of {num_timesteps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} timesteps into {count} steps")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += frac_stride
        start += size
    return set(steps)


def respace_betas(use_timesteps, betas):
    """Betas of the respaced chain (ADM ``SpacedDiffusion``) and its timestep map.

    For each kept index i in ascending order: ``beta = 1 - acp[i] / acp[previous kept]``,
    so the respaced chain has the same alphas_cumprod at the kept steps (up to rounding).
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    last, new_betas, timestep_map = 1.0, [], []
    for i, acp in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - acp / last)
            last = acp
            timestep_map.append(i)
    return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)


def extract(arr, t, x):
    """ADM ``_extract_into_tensor(arr, t, x.shape)``: arr[t] cast to float32, shaped (B, 1, 1, 1).

    t: a respaced index or one per sample.  The result stays float32 on x's array module; a
    product with x then runs in x's dtype by type promotion (float32 * float64 -> float64),
    exactly as in PyTorch.
    """
    xp = array_module_of(x)
    t = np.asarray(to_numpy(t), dtype=np.int64).reshape(-1)
    if t.size == 1 and x.shape[0] != 1:
        t = np.repeat(t, x.shape[0])
    res = np.asarray(arr, dtype=np.float64)[t].astype(np.float32)     # (B,)
    return xp.asarray(res.reshape((-1,) + (1,) * (x.ndim - 1)))      # (B,) -> (B, 1, 1, 1)


# ----------------------------------------------------------------------------
# The diffusion process

class GaussianDiffusion:
    """ADM ``GaussianDiffusion`` with eps prediction (learned-range or fixed-large variance).

    betas: (T,) float64; timestep_map: (T,) original timesteps the model is called
    with (identity for an unrespaced chain).  Attribute names are ADM's.
    """

    def __init__(self, betas, timestep_map=None):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = T = int(betas.shape[0])
        self.timestep_map = np.arange(T, dtype=np.int64) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0), DDPM eq. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped to the value at t = 1.
        # A one-step chain has no t = 1 (ADM leaves the array empty and fails there); we use
        # log(beta_0), which is never used for noise since no noise is added at t = 0.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) if T > 1
            else np.log(betas))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- forward process ------------------------------------------------------
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise):
        """Sample q(x_t | x_0) = sqrt(acp_t) x_0 + sqrt(1 - acp_t) noise (DDPM eq. 4)."""
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x_start {tuple(x_start.shape)}")
        return (extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t) * x_start
                + extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = extract(self.posterior_variance, t, x_t)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # -- reverse process ------------------------------------------------------
    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = sqrt(1/acp_t) x_t - sqrt(1/acp_t - 1) eps."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (sqrt(1/acp_t) x_t - x_0) / sqrt(1/acp_t - 1)."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def p_mean_variance(self, model_output, x, t, clip_denoised=False):
        """p(x_{t-1} | x_t) from a model output, ADM ``p_mean_variance`` without the model call.

        model_output: (B, 2C, H, W) eps and variance values (learned range: v in [-1, 1]
        interpolates the log-variance between the clipped posterior variance and beta_t),
        or (B, C, H, W) eps only (fixed-large variance, DiT's choice without learn_sigma).
        Returns ADM's dict: mean, variance, log_variance, pred_xstart, plus eps (the eps
        channels of the output).
        """
        xp = array_module_of(x)
        B, C = x.shape[:2]
        if model_output.shape == (B, 2 * C) + tuple(x.shape[2:]):
            eps, model_var_values = model_output[:, :C], model_output[:, C:]
            min_log = extract(self.posterior_log_variance_clipped, t, x)
            max_log = extract(np.log(self.betas), t, x)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = xp.exp(model_log_variance)
        elif model_output.shape == tuple(x.shape):
            eps = model_output
            fixed_large = np.append(self.posterior_variance[1:2], self.betas[1:]) if self.num_timesteps > 1 \
                else self.betas
            model_variance = xp.broadcast_to(extract(fixed_large, t, x), x.shape)          # float32
            model_log_variance = xp.broadcast_to(extract(np.log(fixed_large), t, x), x.shape)
        else:
            raise ValueError(f"model output has shape {tuple(model_output.shape)}; expected "
                             f"{(B, 2 * C) + tuple(x.shape[2:])} (learned sigma) or {tuple(x.shape)}")
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = xp.clip(pred_xstart, -1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "eps": eps}


class SpacedDiffusion(GaussianDiffusion):
    """ADM ``SpacedDiffusion``: the chain restricted to ``use_timesteps`` of ``betas``."""

    def __init__(self, use_timesteps, betas):
        self.use_timesteps = set(int(i) for i in use_timesteps)
        self.original_num_steps = len(betas)
        new_betas, timestep_map = respace_betas(self.use_timesteps, betas)
        super().__init__(new_betas, timestep_map)


def create_diffusion(timestep_respacing="", diffusion_steps=NUM_TRAIN_TIMESTEPS):
    """DiT ``create_diffusion``: linear schedule, respaced ("" keeps every step).

    timestep_respacing: an int number of steps, "250", "ddim25", or a list of section counts.
    """
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    betas = linear_betas(diffusion_steps)
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas)
