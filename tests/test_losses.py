"""The training objective: values and hand-written gradient vs PyTorch autograd and central differences."""
import numpy as np
import pytest

from tinylazy import losses
from tinylazy.diffusion import create_diffusion

from conftest import rel_err

DIFF = create_diffusion("")


def _batch(seed=0, C=2, H=4, t=(0, 0, 0, 1, 7, 500, 998, 999)):
    """Digit-like x_0 (k/16 on [-1, 1], edges included), eps near the noise, v around [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.array(t)
    B = len(t)
    x_start = rng.integers(0, 17, size=(B, C, H, H)) / 16.0 * 2.0 - 1.0
    x_start[0, 0, 0, :3] = (-1.0, 1.0, 0.0)
    noise = rng.standard_normal((B, C, H, H))
    x_t = DIFF.q_sample(x_start, t, noise)
    eps = noise + 0.7 * rng.standard_normal((B, C, H, H))
    eps[1, 0, 0, :3] += 40.0     # t = 0, far off the bin: the 1e-12 clamps engage (zero gradient)
    v = rng.uniform(-1.5, 1.5, size=(B, C, H, H))
    return np.concatenate([eps, v], axis=1), x_start, x_t, t, noise


def _mean_loss(out, x_start, x_t, t, noise, frozen_eps, terms=("mse", "vb")):
    """Batch-mean loss with the vb term's eps held fixed: the function the gradient belongs to."""
    C = x_start.shape[1]
    total = 0.0
    if "mse" in terms:
        total += losses.training_losses(DIFF, out[:, :C], x_start, x_t, t, noise)[0]["mse"].mean()
    if "vb" in terms:
        total += losses.training_losses(DIFF, np.concatenate([frozen_eps, out[:, C:]], 1),
                                        x_start, x_t, t, noise)[0]["vb"].mean()
    return float(total)


def _torch_terms(torch, out, x_start, x_t, t, noise):
    """ADM/DiT ``training_losses`` (MSE, learned range) written with torch, official casts included."""
    tt = torch.from_numpy(t)
    ex = lambda arr: torch.from_numpy(np.asarray(arr))[tt].float().to(torch.float64)[:, None, None, None]  # noqa: E731
    x_start, x_t, noise = (torch.from_numpy(a) for a in (x_start, x_t, noise))
    C = x_start.shape[1]
    eps, v = out[:, :C], out[:, C:]
    frozen = torch.cat([eps.detach(), v], dim=1)
    true_mean = ex(DIFF.posterior_mean_coef1) * x_start + ex(DIFF.posterior_mean_coef2) * x_t
    true_lv = ex(DIFF.posterior_log_variance_clipped)
    f_eps, f_v = frozen[:, :C], frozen[:, C:]
    min_log, max_log = ex(DIFF.posterior_log_variance_clipped), ex(np.log(DIFF.betas))
    frac = (f_v + 1) / 2
    lv = frac * max_log + (1 - frac) * min_log
    pred_x0 = ex(DIFF.sqrt_recip_alphas_cumprod) * x_t - ex(DIFF.sqrt_recipm1_alphas_cumprod) * f_eps
    mean = ex(DIFF.posterior_mean_coef1) * pred_x0 + ex(DIFF.posterior_mean_coef2) * x_t
    kl = 0.5 * (-1.0 + lv - true_lv + torch.exp(true_lv - lv) + (true_mean - mean) ** 2 * torch.exp(-lv))
    kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)

    def cdf(z):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * torch.pow(z, 3))))
    cx = x_start - mean
    inv = torch.exp(-0.5 * lv)
    cdf_plus, cdf_min = cdf(inv * (cx + 1.0 / 255.0)), cdf(inv * (cx - 1.0 / 255.0))
    lp = torch.where(x_start < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                     torch.where(x_start > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                                 torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    nll = -lp.mean(dim=(1, 2, 3)) / np.log(2.0)
    vb = torch.where(tt == 0, nll, kl)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    return {"mse": mse, "vb": vb, "loss": mse + vb}


def test_terms_and_gradient_match_torch_autograd():
    torch = pytest.importorskip("torch")
    out, x_start, x_t, t, noise = _batch()
    terms, cache = losses.training_losses(DIFF, out, x_start, x_t, t, noise)
    dout = losses.training_losses_backward(cache)

    out_t = torch.from_numpy(out).requires_grad_(True)
    ref = _torch_terms(torch, out_t, x_start, x_t, t, noise)
    ref["loss"].mean().backward()
    for k in ("mse", "vb", "loss"):
        assert rel_err(terms[k], ref[k].detach().numpy()) <= 1e-12, k
    C = x_start.shape[1]
    assert rel_err(dout[:, :C], out_t.grad[:, :C].numpy()) <= 1e-10
    assert rel_err(dout[:, C:], out_t.grad[:, C:].numpy()) <= 1e-10
    assert np.all(dout[1, C, 0, :3] == 0.0)          # clamped probabilities pass no gradient
    assert np.abs(dout[:3, C:]).max() > 0            # the t = 0 decoder NLL does


def test_gradient_matches_central_differences():
    out, x_start, x_t, t, noise = _batch(seed=1)
    C = x_start.shape[1]
    frozen = out[:, :C].copy()
    _, cache = losses.training_losses(DIFF, out, x_start, x_t, t, noise)
    dout = losses.training_losses_backward(cache)
    f = lambda o: _mean_loss(o, x_start, x_t, t, noise, frozen)  # noqa: E731
    h = 1e-6
    # a random direction covers the whole tensor ...
    u = np.random.default_rng(2).standard_normal(out.shape)
    fd = (f(out + h * u) - f(out - h * u)) / (2 * h)
    assert abs(fd - float((dout * u).sum())) <= 1e-6 * abs(fd)
    # ... and single elements in each regime (t = 0 at the -1 / +1 / interior bins, t > 0, eps and v),
    # on the one sample and term they touch (batch mean: 1/B of it) so that rounding in f stays small
    B = out.shape[0]
    for idx in [(0, C, 0, 0), (0, C, 0, 1), (0, C, 0, 2), (2, C + 1, 3, 3), (5, C, 1, 2), (7, C + 1, 2, 0),
                (0, 0, 0, 0), (4, 1, 2, 3)]:
        b = idx[0]
        fb = lambda o: _mean_loss(o, x_start[b:b + 1], x_t[b:b + 1], t[b:b + 1], noise[b:b + 1],  # noqa: E731
                                  frozen[b:b + 1], ("vb",) if idx[1] >= C else ("mse",)) / B
        e = np.zeros_like(out[b:b + 1])
        e[(0,) + idx[1:]] = 1.0
        # a step of 1e-4 in the log-variance, whose span over v in [-1, 1] shrinks with t
        span = abs(np.log(DIFF.betas[t[b]]) - DIFF.posterior_log_variance_clipped[t[b]]) / 2
        hb = 1e-4 / span if idx[1] >= C else 1e-4
        fd = (fb(out[b:b + 1] + hb * e) - fb(out[b:b + 1] - hb * e)) / (2 * hb)
        assert abs(fd - dout[idx]) <= 1e-6 * abs(fd), (idx, fd, dout[idx])


def test_without_learned_sigma_is_eps_mse():
    out, x_start, x_t, t, noise = _batch(seed=3)
    C = x_start.shape[1]
    terms, cache = losses.training_losses(DIFF, out[:, :C], x_start, x_t, t, noise)
    assert set(terms) == {"mse", "loss"}
    np.testing.assert_allclose(terms["loss"], ((noise - out[:, :C]) ** 2).mean(axis=(1, 2, 3)), rtol=1e-14)
    dout = losses.training_losses_backward(cache)
    np.testing.assert_allclose(dout, 2 * (out[:, :C] - noise) / out[:, :C].size, rtol=1e-13)


def test_float32_close_to_float64():
    out, x_start, x_t, t, noise = _batch(seed=4)
    terms64, c64 = losses.training_losses(DIFF, out, x_start, x_t, t, noise)
    f32 = [a.astype(np.float32) for a in (out, x_start, x_t, noise)]
    terms32, c32 = losses.training_losses(DIFF, f32[0], f32[1], f32[2], t, f32[3])
    d64, d32 = losses.training_losses_backward(c64), losses.training_losses_backward(c32)
    assert terms32["loss"].dtype == np.float32 and d32.dtype == np.float32
    assert rel_err(terms32["loss"], terms64["loss"]) < 1e-4
    assert rel_err(d32, d64) < 1e-3


def test_bad_inputs_name_the_problem():
    out, x_start, x_t, t, noise = _batch(seed=5)
    with pytest.raises(ValueError, match="model output has shape"):
        losses.training_losses(DIFF, out[:, :3], x_start, x_t, t, noise)
    with pytest.raises(ValueError, match="timesteps in 0..999"):
        losses.training_losses(DIFF, out, x_start, x_t, t + 1, noise)
    with pytest.raises(ValueError, match="snr_gamma must be None or > 0"):
        losses.training_losses(DIFF, out, x_start, x_t, t, noise, snr_gamma=0.0)


def torch_min_snr_weight(torch, t, gamma):
    """min(SNR, gamma) / SNR of the timesteps t (numpy ints), float64 cast to float32 and back as
    the other float64 tables: Min-SNR for an eps target, as diffusers' train_text_to_image."""
    acp = torch.from_numpy(DIFF.alphas_cumprod)[torch.from_numpy(t)]
    snr = acp / (1 - acp)
    return (torch.clamp(snr, max=gamma) / snr).float().double()


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_min_snr_weighting_matches_torch_autograd(learn_sigma):
    """snr_gamma=5: the mse term weighted by min(SNR, 5) / SNR per sample (Min-SNR, eps target),
    as diffusers' train_text_to_image computes it; vb unchanged."""
    torch = pytest.importorskip("torch")
    out, x_start, x_t, t, noise = _batch(seed=6, t=(0, 3, 60, 128, 131, 300, 700, 999))
    C = x_start.shape[1]
    out = out if learn_sigma else out[:, :C]
    terms, cache = losses.training_losses(DIFF, out, x_start, x_t, t, noise, snr_gamma=5.0)
    dout = losses.training_losses_backward(cache)

    out_t = torch.from_numpy(out).requires_grad_(True)
    ref = _torch_terms(torch, out_t if learn_sigma else torch.cat([out_t, out_t.detach()], 1), x_start, x_t, t,
                       noise)
    w = torch_min_snr_weight(torch, t, 5.0)
    loss = w * ref["mse"] + (ref["vb"] if learn_sigma else 0.0)
    loss.mean().backward()
    assert rel_err(terms["mse"], ref["mse"].detach().numpy()) <= 1e-12     # reported unweighted
    assert rel_err(terms["loss"], loss.detach().numpy()) <= 1e-12
    assert rel_err(dout, out_t.grad.numpy()) <= 1e-10
    w = w.numpy()
    assert w[0] < 1e-3 and w[3] < 1.0 and np.all(w[4:] == 1.0)    # SNR = 5 falls between t = 129 and 130
