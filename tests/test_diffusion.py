"""The diffusion schedule and the samplers against independent re-implementations of ADM.

Two references, both written here from the official loops (facebookresearch/DiT
``diffusion/``), not from tinylazy's code:
- a plain float64 NumPy loop with the official float32 casts spelled out, driven by
  a random tinylazy DiT (guidance done here by hand);
- the official arithmetic in PyTorch (``_extract_into_tensor`` with ``.float()``,
  PyTorch's type promotion, the doubled CFG batch carried through the loop),
  driven by the PyTorch stand-in ``tests/torch_dit.py``.
Trajectories are compared step by step through the sampler's callback.
"""
import numpy as np
import pytest

import tinylazy as tl
from tinylazy.backend import cupy_available, to_numpy
from tinylazy.diffusion import GaussianDiffusion, create_diffusion, extract, linear_betas, space_timesteps
from tinylazy.sampling import ddim_step

from conftest import rel_err

CFG = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                   num_classes=10)
LABELS = np.array([3, 7, 0])
TOL = 1e-10


@pytest.fixture(scope="module")
def params():
    return tl.init_params(CFG, seed=1, scheme="random")


@pytest.fixture(scope="module")
def model64(params):
    return tl.DiT(CFG, params, dtype="float64")


# ----------------------------------------------------------------------------
# The independent NumPy reference

def running_sum_steps(n):
    """ADM's single-section respacing, written out: running float sum, Python round."""
    stride = 999 / (n - 1) if n > 1 else 1
    cur, kept = 0.0, []
    for _ in range(n):
        kept.append(round(cur))
        cur += stride
    return sorted(set(kept))


def ref_schedule(kept):
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
    acp_full = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for i in kept:
        new_betas.append(1.0 - acp_full[i] / last)
        last = acp_full[i]
    b = np.array(new_betas)
    a = np.cumprod(1.0 - b)
    a_prev = np.append(1.0, a[:-1])
    post_var = b * (1.0 - a_prev) / (1.0 - a)
    return dict(b=b, a=a, a_prev=a_prev, post_log=np.log(np.append(post_var[1], post_var[1:])),
                coef1=b * np.sqrt(a_prev) / (1.0 - a), coef2=(1.0 - a_prev) * np.sqrt(1.0 - b) / (1.0 - a))


def f32(v):
    """The official float32 cast of a float64 schedule coefficient, widened back (exact)."""
    return np.float64(np.float32(v))


def ref_model_fn(model, labels, cfg_scale):
    """The model output for the kept half, guidance written out (official forward_with_cfg)."""
    B = len(labels)

    def fn(x, t):
        if cfg_scale == 1:
            return model(x, np.full(B, t), labels)
        out = model(np.concatenate([x, x]), np.full(2 * B, t), np.concatenate([labels, np.full(B, 10)]))
        cond, uncond = out[:B, :3], out[B:, :3]                     # guidance on 3 channels only
        return np.concatenate([uncond + cfg_scale * (cond - uncond), out[:B, 3:]], axis=1)
    return fn


def ref_sample(model_fn, x, kept, sampler, eta=0.0, step_noise=None):
    """ADM's respaced DDIM / p_sample loops in float64 with the official casts; returns every x_{t-1}."""
    s = ref_schedule(kept)
    C, traj = x.shape[1], []
    for k, i in enumerate(reversed(range(len(kept)))):
        out = model_fn(x, kept[i])
        eps, v = out[:, :C], out[:, C:]
        x0 = f32(np.sqrt(1.0 / s["a"][i])) * x - f32(np.sqrt(1.0 / s["a"][i] - 1)) * eps
        if sampler == "ddim":
            eps = (f32(np.sqrt(1.0 / s["a"][i])) * x - x0) / f32(np.sqrt(1.0 / s["a"][i] - 1))
            ab, abp = np.float32(s["a"][i]), np.float32(s["a_prev"][i])      # float32 from here on
            sigma = np.float32(eta) * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
            x = x0 * np.float64(np.sqrt(abp)) + np.float64(np.sqrt(1 - abp - sigma * sigma)) * eps
            if eta > 0 and i > 0:
                x = x + np.float64(sigma) * step_noise[k]
        else:
            mean = f32(s["coef1"][i]) * x0 + f32(s["coef2"][i]) * x
            frac = (v + 1) / 2
            log_var = frac * f32(np.log(s["b"][i])) + (1 - frac) * f32(s["post_log"][i])
            x = mean + np.exp(0.5 * log_var) * step_noise[k] if i > 0 else mean
        traj.append(x)
    return traj


def recorder():
    steps = []
    return steps, lambda i, info: steps.append((i, info))


# ----------------------------------------------------------------------------
# Schedule and respacing

def test_linear_schedule_and_attributes():
    d = GaussianDiffusion(linear_betas())
    betas = np.linspace(1e-4, 0.02, 1000)
    assert d.betas.dtype == np.float64 and np.array_equal(d.betas, betas)
    acp = np.cumprod(1 - betas)
    assert np.array_equal(d.alphas_cumprod, acp)
    assert d.alphas_cumprod_prev[0] == 1.0 and np.array_equal(d.alphas_cumprod_prev[1:], acp[:-1])
    assert rel_err(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / acp - 1)) < 1e-15
    pv = betas * (1 - np.append(1.0, acp[:-1])) / (1 - acp)
    assert d.posterior_variance[0] == 0 and rel_err(d.posterior_variance, pv) < 1e-15
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1] == np.log(pv[1])
    assert np.array_equal(d.timestep_map, np.arange(1000))


def test_space_timesteps_known_values():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim20") == set(range(0, 1000, 50))
    assert space_timesteps(1000, "10") == {0, 111, 222, 333, 444, 555, 666, 777, 888, 999}
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[:6] == [0, 4, 8, 12, 16, 20] and s250[-1] == 999
    assert space_timesteps(1000, "1") == {0}
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [5, 5]) == {0, 125, 250, 374, 499, 500, 625, 750, 874, 999}
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(1000, "1001")


def test_space_timesteps_uses_the_running_sum():
    """For 21 steps the running float sum and round(i * stride) disagree (499 vs 500)."""
    stride = 999 / 20
    naive = {round(i * stride) for i in range(21)}
    running = set(running_sum_steps(21))
    assert naive ^ running == {499, 500}
    assert space_timesteps(1000, 21) == space_timesteps(1000, "21") == running
    assert 499 in space_timesteps(1000, 21)


def test_respaced_chain():
    d = create_diffusion(21)
    kept = running_sum_steps(21)
    assert d.num_timesteps == 21 and d.timestep_map.tolist() == kept
    s = ref_schedule(kept)
    assert np.array_equal(d.betas, s["b"]) and np.array_equal(d.alphas_cumprod, s["a"])
    full = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert rel_err(d.alphas_cumprod, full[kept]) < 1e-13        # same marginals at the kept steps
    assert np.array_equal(d.posterior_log_variance_clipped, s["post_log"])
    assert np.array_equal(d.posterior_mean_coef1, s["coef1"]) and np.array_equal(d.posterior_mean_coef2, s["coef2"])
    assert create_diffusion("").num_timesteps == 1000


def test_extract_casts_to_float32_and_promotes():
    d = create_diffusion(21)
    x = np.ones((2, 4, 8, 8))
    c = extract(d.sqrt_recip_alphas_cumprod, 20, x)
    assert c.dtype == np.float32 and c.shape == (2, 1, 1, 1)
    assert c[0, 0, 0, 0] == np.float32(d.sqrt_recip_alphas_cumprod[20])
    assert (c * x).dtype == np.float64 and (c * x.astype(np.float32)).dtype == np.float32


def test_q_sample_and_posterior():
    d = create_diffusion(50)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8, 8))
    t = np.array([3, 40])
    xt = d.q_sample(x0, t, noise)
    for b in range(2):
        want = f32(d.sqrt_alphas_cumprod[t[b]]) * x0[b] + f32(d.sqrt_one_minus_alphas_cumprod[t[b]]) * noise[b]
        assert np.array_equal(xt[b], want)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    assert np.array_equal(mean[1], f32(d.posterior_mean_coef1[40]) * x0[1] + f32(d.posterior_mean_coef2[40]) * xt[1])
    assert var.dtype == logvar.dtype == np.float32
    # eps -> x0 -> eps round trip
    assert rel_err(d.predict_eps_from_xstart(xt, t, d.predict_xstart_from_eps(xt, t, noise)), noise) < 1e-12


def test_p_mean_variance_learned_range_endpoints():
    d = create_diffusion(21)
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8))
    eps = np.random.default_rng(2).standard_normal((1, 4, 8, 8))
    for v, table in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        out = d.p_mean_variance(np.concatenate([eps, np.full_like(eps, v)], axis=1), x, 7)
        assert np.all(out["log_variance"] == np.float32(table[7]))
        assert np.array_equal(out["eps"], eps)
    fixed = d.p_mean_variance(eps, x, 7)                              # no learn_sigma: fixed-large variance
    assert np.all(fixed["variance"] == np.float32(d.betas[7]))
    with pytest.raises(ValueError, match="model output has shape"):
        d.p_mean_variance(eps[:, :3], x, 7)


# ----------------------------------------------------------------------------
# Samplers against the NumPy reference

@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_ddim_matches_reference(model64, cfg_scale):
    noise = tl.make_noise(model64, len(LABELS), seed=0)
    steps, cb = recorder()
    out = tl.ddim_sample(model64, noise, LABELS, steps=21, cfg_scale=cfg_scale, callback=cb)
    ref = ref_sample(ref_model_fn(model64, LABELS, cfg_scale), noise, running_sum_steps(21), "ddim")
    assert [i for i, _ in steps] == list(range(20, -1, -1))
    assert [info["t"] for _, info in steps] == running_sum_steps(21)[::-1]
    errs = [rel_err(info["x_next"], r) for (_, info), r in zip(steps, ref)]
    assert max(errs) <= TOL, f"per-step relative errors {errs}"
    assert rel_err(out, ref[-1]) <= TOL


def test_ddim_eta_matches_reference(model64):
    noise = tl.make_noise(model64, len(LABELS), seed=3)
    zs = [np.random.default_rng(100 + k).standard_normal(noise.shape) for k in range(21)]
    out = tl.ddim_sample(model64, noise, LABELS, steps=21, cfg_scale=4.0, eta=0.7, step_noise=zs)
    ref = ref_sample(ref_model_fn(model64, LABELS, 4.0), noise, running_sum_steps(21), "ddim", 0.7, zs)
    assert rel_err(out, ref[-1]) <= TOL
    # a Generator is drawn once per step, (B, C, H, W) float64 each
    again = tl.ddim_sample(model64, noise, LABELS, steps=21, cfg_scale=4.0, eta=0.7,
                           step_noise=np.random.default_rng(5))
    rng = np.random.default_rng(5)
    ref5 = ref_sample(ref_model_fn(model64, LABELS, 4.0), noise, running_sum_steps(21), "ddim", 0.7,
                      [rng.standard_normal(noise.shape) for _ in range(21)])
    assert rel_err(again, ref5[-1]) <= TOL


@pytest.mark.parametrize("cfg_scale,steps", [(1.0, 21), (4.0, 21), (4.0, 250)])
def test_ddpm_matches_reference(model64, cfg_scale, steps):
    noise = tl.make_noise(model64, len(LABELS), seed=1)
    rng = np.random.default_rng(9)
    zs = [rng.standard_normal(noise.shape) for _ in range(steps)]
    rec, cb = recorder()
    out = tl.ddpm_sample(model64, noise, LABELS, steps=steps, cfg_scale=cfg_scale, step_noise=9, callback=cb)
    ref = ref_sample(ref_model_fn(model64, LABELS, cfg_scale), noise, running_sum_steps(steps), "ddpm",
                     step_noise=zs)
    errs = [rel_err(info["x_next"], r) for (_, info), r in zip(rec, ref)]
    assert len(errs) == steps and max(errs) <= TOL, f"max per-step relative error {max(errs)}"
    assert rel_err(out, ref[-1]) <= TOL


class Oracle:
    """The exact eps-predictor for data that is one point x0: eps = (x_t - sqrt(acp) x0) / sqrt(1 - acp).

    It is called with the original timestep and uses the 1000-step schedule, so a sampler
    that passed the respaced index (or mis-mapped it) would not land on x0.
    """

    def __init__(self, x0):
        self.config = CFG
        self.xp, self.dtype = np, np.dtype(np.float64)
        self.x0 = x0
        self.acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))

    def __call__(self, x, t, y):
        a = self.acp[np.asarray(t)][:, None, None, None]
        eps = (x - np.sqrt(a) * self.x0[: len(x)]) / np.sqrt(1 - a)
        return np.concatenate([eps, np.zeros_like(eps)], axis=1)      # variance values 0: mid-range

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        return self(x, t, y)                                           # cond == uncond: guidance is a no-op


@pytest.mark.parametrize("steps", [1, 7, 21, "ddim25", 250])
def test_samplers_land_on_the_data_point(steps):
    x0 = np.random.default_rng(0).uniform(-1, 1, (2, 4, 8, 8))
    oracle = Oracle(np.concatenate([x0, x0]))
    noise = tl.make_noise(oracle, 2, seed=1)
    ddim = tl.ddim_sample(oracle, noise, [1, 2], steps=steps, cfg_scale=1.0)
    ddpm = tl.ddpm_sample(oracle, noise, [1, 2], steps=steps, cfg_scale=3.0, step_noise=2)
    # ~6e-8 measured: the official float32 casts of the coefficients; a wrong timestep gives O(1)
    assert rel_err(ddim, x0) < 1e-6 and rel_err(ddpm, x0) < 1e-6


def test_callback_info_and_one_step(model64):
    noise = tl.make_noise(model64, 2, seed=4)
    rec, cb = recorder()
    out = tl.ddim_sample(model64, noise, [1, 2], steps=1, cfg_scale=1.5, callback=cb)
    (i, info), = rec
    assert i == 0 and info["t"] == 0 and info["step"] == 0
    assert set(info) >= {"t", "x", "model_output", "eps", "pred_xstart", "x_next"}
    assert info["model_output"].shape == (2, 8, 8, 8) and info["x"] is not None
    assert np.array_equal(out, info["pred_xstart"])                  # acp_prev = 1 at the last step
    ddpm = tl.ddpm_sample(model64, noise, [1, 2], steps=1, cfg_scale=1.5, step_noise=0)
    assert rel_err(ddpm, out) < 1e-14                                 # t = 0: mean = x0, no noise


def test_ddim_step_public_api(model64):
    d = create_diffusion(10)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8))
    out = model64(x, np.full(2, d.timestep_map[5]), np.array([1, 2]))
    res = ddim_step(d, out, x, 5)
    a, ap = np.float32(d.alphas_cumprod[5]), np.float32(d.alphas_cumprod_prev[5])
    want = res["pred_xstart"] * np.float64(np.sqrt(ap)) + np.float64(np.sqrt(1 - ap)) * res["eps"]
    assert a > 0 and np.array_equal(res["x_next"], want)


def test_float32_run_tracks_float64(params):
    m32 = tl.DiT(CFG, params, dtype="float32")
    m64 = tl.DiT(CFG, params, dtype="float64")
    a = tl.ddim_sample(m32, tl.make_noise(m32, 3, 0), LABELS, steps=10, cfg_scale=4.0)
    b = tl.ddim_sample(m64, tl.make_noise(m64, 3, 0), LABELS, steps=10, cfg_scale=4.0)
    assert a.dtype == np.float32 and rel_err(a, b) < 1e-4


@pytest.mark.skipif(not cupy_available(), reason="no CuPy GPU (on NumPy this would compare NumPy with itself)")
def test_cupy_replays_the_numpy_run(params):
    m = tl.DiT(CFG, params, dtype="float64", backend="cupy")
    ref = tl.DiT(CFG, params, dtype="float64")
    noise = tl.make_noise(ref, 3, 0)
    a = tl.ddpm_sample(m, noise, LABELS, steps=12, cfg_scale=4.0, step_noise=3)
    b = tl.ddpm_sample(ref, noise, LABELS, steps=12, cfg_scale=4.0, step_noise=3)
    assert rel_err(to_numpy(a), b) <= TOL


# ----------------------------------------------------------------------------
# Inputs

def test_make_noise_and_labels(model64):
    n = tl.make_noise(model64, 3, seed=7)
    assert n.shape == (3, 4, 8, 8) and n.dtype == np.float64
    assert np.array_equal(n, np.random.default_rng(7).standard_normal((3, 4, 8, 8)))
    n32 = tl.make_noise((1, 16, 16), 2, seed=7)
    assert n32.dtype == np.float32 and n32.shape == (2, 1, 16, 16)
    y = tl.sample_labels(model64, 50, seed=1)
    assert y.dtype == np.int64 and y.min() >= 0 and y.max() <= 9
    assert np.array_equal(y, tl.sample_labels(10, 50, seed=1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be an integer in 1..1000"),
    (dict(steps=1001), "steps must be an integer in 1..1000"),
    (dict(steps=2.5), "steps must be"),
    (dict(labels=[3, 12, 10]), "unknown class ids 10, 12: this model has classes 0..9"),
    (dict(labels=[-1, 0, 1]), "unknown class id -1"),
    (dict(labels=[1.0, 2.0, 3.0]), "class ids must be integers"),
    (dict(labels=[1, 2]), r"noise has shape \(3, 4, 8, 8\), expected \(2, 4, 8, 8\)"),
    (dict(cfg_scale=0.5), "cfg_scale must be a number >= 1"),
    (dict(eta=0.5), "step_noise"),
])
def test_bad_input(model64, kwargs, match):
    args = dict(steps=5, labels=LABELS, cfg_scale=1.0)
    args.update(kwargs)
    labels = args.pop("labels")
    with pytest.raises(ValueError, match=match):
        tl.ddim_sample(model64, tl.make_noise(model64, 3, 0), labels, **args)


def test_ddpm_needs_step_noise(model64):
    noise = tl.make_noise(model64, 3, 0)
    with pytest.raises(ValueError, match="step_noise"):
        tl.ddpm_sample(model64, noise, LABELS, steps=5)
    with pytest.raises(ValueError, match="one per step"):
        tl.ddpm_sample(model64, noise, LABELS, steps=5, step_noise=[noise] * 4)


def test_cfg_needs_null_class(params):
    cfg = CFG.replace(class_dropout_prob=0.0)
    p = dict(params, **{"y_embedder.embedding_table.weight": params["y_embedder.embedding_table.weight"][:10]})
    m = tl.DiT(cfg, p, dtype="float64")
    noise = tl.make_noise(m, 3, 0)
    assert tl.ddim_sample(m, noise, LABELS, steps=3).shape == noise.shape
    with pytest.raises(ValueError, match="null-class"):
        tl.ddim_sample(m, noise, LABELS, steps=3, cfg_scale=2.0)


# ----------------------------------------------------------------------------
# The official loop arithmetic in PyTorch, driven by the PyTorch stand-in

def torch_official_loop(torch, tmodel, z, labels, kept, cfg_scale, sampler, step_noise=None, exact_sqrt=True):
    """ADM's loops as DiT's sample.py runs them: doubled batch, _extract_into_tensor(...).float().

    cfg_scale == 1 is a plain forward on the undoubled batch.  PyTorch's float32 sqrt on
    the CPU is not correctly rounded (measured: sqrt(alpha_bar_prev) at the 2nd of 21 steps
    is 1 ulp off, |error| 0.65 ulp), unlike CUDA's and NumPy's; exact_sqrt=True takes the
    float32 square roots correctly rounded, as tinylazy defines them.
    """
    sqrt32 = (lambda v: torch.sqrt(v.double()).float()) if exact_sqrt else torch.sqrt
    s = ref_schedule(kept)
    sqrt_recip = np.sqrt(1.0 / s["a"])
    sqrt_recipm1 = np.sqrt(1.0 / s["a"] - 1)
    B = len(labels)
    guided = cfg_scale > 1
    x = torch.from_numpy(np.concatenate([z, z]) if guided else z)
    y = torch.from_numpy(np.concatenate([labels, np.full(B, 10)]) if guided else labels)
    timestep_map = torch.tensor(kept)

    def extract(arr, t, shape):
        res = torch.from_numpy(arr)[t].float()
        while res.dim() < len(shape):
            res = res[..., None]
        return res + torch.zeros(shape)

    traj = []
    for k, i in enumerate(reversed(range(len(kept)))):
        t = torch.tensor([i] * len(x))
        with torch.no_grad():
            out = tmodel.forward_with_cfg(x, timestep_map[t], y, cfg_scale) if guided else tmodel(x, timestep_map[t], y)
        C = x.shape[1]
        eps, v = out[:, :C], out[:, C:]
        min_log = extract(s["post_log"], t, x.shape)
        max_log = extract(np.log(s["b"]), t, x.shape)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = extract(sqrt_recip, t, x.shape) * x - extract(sqrt_recipm1, t, x.shape) * eps
        mean = extract(s["coef1"], t, x.shape) * x0 + extract(s["coef2"], t, x.shape) * x
        mask = (t != 0).float().view(-1, 1, 1, 1)
        if sampler == "ddim":
            eps = (extract(sqrt_recip, t, x.shape) * x - x0) / extract(sqrt_recipm1, t, x.shape)
            ab, abp = extract(s["a"], t, x.shape), extract(s["a_prev"], t, x.shape)
            sigma = 0.0 * sqrt32((1 - abp) / (1 - ab)) * sqrt32(1 - ab / abp)
            x = x0 * sqrt32(abp) + sqrt32(1 - abp - sigma ** 2) * eps
        else:
            n = torch.from_numpy(np.concatenate([step_noise[k]] * (len(x) // B)))
            x = mean + mask * torch.exp(0.5 * log_var) * n
        traj.append(x[:B].numpy())                               # samples.chunk(2): keep the cond half
    return traj


@pytest.mark.parametrize("sampler,cfg_scale", [("ddim", 1.0), ("ddim", 4.0), ("ddpm", 4.0)])
def test_official_loop_in_torch(params, model64, sampler, cfg_scale):
    torch = pytest.importorskip("torch")
    from torch_dit import TorchDiT
    # pinned timestep features: compared at 1e-10; PyTorch's own float32 cos/sin move x_next ~5e-7
    tmodel = TorchDiT.from_params(CFG, params, dtype=torch.float64, pinned_features=True)
    noise = tl.make_noise(model64, len(LABELS), seed=2)
    rng = np.random.default_rng(4)
    zs = [rng.standard_normal(noise.shape) for _ in range(21)]
    ref = torch_official_loop(torch, tmodel, noise, LABELS, running_sum_steps(21), cfg_scale, sampler, zs)
    rec, cb = recorder()
    if sampler == "ddim":
        tl.ddim_sample(model64, noise, LABELS, steps=21, cfg_scale=cfg_scale, callback=cb)
    else:
        tl.ddpm_sample(model64, noise, LABELS, steps=21, cfg_scale=cfg_scale, step_noise=4, callback=cb)
    errs = [rel_err(info["x_next"], r) for (_, info), r in zip(rec, ref)]
    assert len(errs) == 21 and max(errs) <= TOL, f"per-step relative errors {errs}"


def test_official_loop_with_pytorch_cpu_sqrt(params, model64):
    """The remaining difference to PyTorch's own float32 sqrt (not correctly rounded on the CPU)."""
    torch = pytest.importorskip("torch")
    from torch_dit import TorchDiT
    tmodel = TorchDiT.from_params(CFG, params, dtype=torch.float64, pinned_features=True)   # isolates the sqrt
    noise = tl.make_noise(model64, len(LABELS), seed=2)
    ref = torch_official_loop(torch, tmodel, noise, LABELS, running_sum_steps(21), 4.0, "ddim", exact_sqrt=False)
    out = tl.ddim_sample(model64, noise, LABELS, steps=21, cfg_scale=4.0)
    err = rel_err(out, ref[-1])
    print(f"DDIM 21 steps, cfg 4, float64: tinylazy vs official loop with PyTorch's CPU float32 sqrt: {err:.2e}")
    assert err < 1e-6
