"""Gate training: the gradient of the official lazy-learning loss, and the training loop state.

Gradients are checked two ways: float64 central differences (every gate entry, plus
random directions), and PyTorch autograd of the same loss built here on the
stand-in ``tests/torch_dit.TorchDiT`` with the gates added in this file.
"""
import json

import numpy as np
import pytest

import tinylazy as tl
from tinylazy.lazy_train import GateTrainer, ddim_eps_gain, lazy_loss, teacher_step, trajectory_loss

CFG = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)
STEPS, INDEX, B = 10, 5, 3                     # x_t at respaced index 5, gates of index 4
RHO = (2e-2, 5e-2)


@pytest.fixture(scope="module")
def setup():
    params = tl.init_params(CFG, seed=1, scheme="random")
    model = tl.DiT(CFG, params, dtype="float64")
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((B, 4, 8, 8))
    y = np.array([1, CFG.num_classes, 3])       # one dropped label (null class)
    noise = rng.standard_normal(x0.shape)
    diffusion = tl.create_diffusion(STEPS)
    x_next, caches = teacher_step(model, diffusion, x0, y, INDEX, noise)
    t = np.full(B, diffusion.timestep_map[INDEX - 1])
    target = model(x_next, t, y)
    w = {k: rng.standard_normal((CFG.depth, CFG.hidden_size)) * 0.05 for k in ("attn", "mlp")}
    return dict(params=params, model=model, x0=x0, y=y, noise=noise, diffusion=diffusion, x_next=x_next,
                caches=caches, t=t, target=target, w=w)


def _loss(s, w, backward=False, out_weight=None):
    return lazy_loss(s["model"], s["x_next"], s["t"], s["y"], s["caches"], w, *RHO, s["target"], backward,
                     out_weight)


def test_gate_gradients_match_central_differences(setup):
    s = setup
    res = _loss(s, s["w"], backward=True)
    assert 0.05 < res["scores"].mean() < 0.95 and res["mse"] > 0      # a non-trivial point
    eps = 1e-6
    for kind in ("attn", "mlp"):
        num = np.zeros_like(s["w"][kind])
        for idx in np.ndindex(*num.shape):
            wp = {k: v.copy() for k, v in s["w"].items()}
            wm = {k: v.copy() for k, v in s["w"].items()}
            wp[kind][idx] += eps
            wm[kind][idx] -= eps
            num[idx] = (_loss(s, wp)["loss"] - _loss(s, wm)["loss"]) / (2 * eps)
        err = np.abs(res["grads"][kind] - num).max() / np.abs(num).max()
        assert err <= 1e-6, f"{kind}: relative error {err:.2e}"
    rng = np.random.default_rng(3)                                      # random directions through all gates
    for _ in range(3):
        v = {k: rng.standard_normal(a.shape) for k, a in s["w"].items()}
        h = 1e-6
        shift = lambda sign: {k: s["w"][k] + sign * h * v[k] for k in v}
        num = (_loss(s, shift(1))["loss"] - _loss(s, shift(-1))["loss"]) / (2 * h)
        ana = sum(float((res["grads"][k] * v[k]).sum()) for k in v)
        assert abs(ana - num) <= 1e-6 * abs(num)
    # The "x" loss: eps channels weighted by the DDIM gain of the next step, variance channels dropped.
    weight = np.zeros((1, CFG.out_channels, 1, 1))
    weight[:, :CFG.in_channels] = ddim_eps_gain(s["diffusion"], INDEX - 1)
    res = _loss(s, s["w"], backward=True, out_weight=weight)
    v = {k: rng.standard_normal(a.shape) for k, a in s["w"].items()}
    num = (_loss(s, {k: s["w"][k] + 1e-6 * v[k] for k in v}, out_weight=weight)["loss"]
           - _loss(s, {k: s["w"][k] - 1e-6 * v[k] for k in v}, out_weight=weight)["loss"]) / 2e-6
    assert abs(sum(float((res["grads"][k] * v[k]).sum()) for k in v) - num) <= 1e-6 * abs(num)


def test_trajectory_loss_is_the_guided_eps_error_and_its_gradient(setup):
    """The chain recipe's loss: the eps error of the guided output the sampler uses (the official
    forward_with_cfg, guidance on 3 of the 4 eps channels, the fourth the cond row's own), weighted,
    plus the lazy terms over all model rows; its gradient against central differences."""
    s, model = setup, setup["model"]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 8, 8))
    rows_x, t, rows_y = np.concatenate([x, x]), np.full(4, 333), np.array([1, 7, 10, 10])
    caches = {k: c[[0, 1, 2, 0]] + 0.1 for k, c in s["caches"].items()}
    target, scale, weight = model(rows_x, t, rows_y), 1.5, 0.7
    loss = lambda w, backward=False: trajectory_loss(model, rows_x, t, rows_y, caches, w, *RHO, target, scale,  # noqa
                                                     weight, backward)
    res = loss(s["w"], backward=True)
    cached = lambda l, kind, z, cache=None: caches[(l, kind)]                     # noqa: E731

    def guided(branch):
        w = s["w"]
        def soft(l, kind, z, cache=None):
            sc = tl.lazy.gate_score(z, w[kind][l])[:, None, None]
            return model.branch(l, kind, z) * sc + cached(l, kind, z) * (1 - sc)
        return model.forward_with_cfg(rows_x, t, rows_y, scale, branch=soft if branch else None)[:2, :4]
    err = (guided(True) - guided(False)) * weight
    assert res["mse"] == pytest.approx(float((err ** 2).mean()), rel=1e-12)
    lazy = res["scores"].sum(1).mean(0)
    assert res["loss"] == pytest.approx(res["mse"] + RHO[0] * lazy[0] + RHO[1] * lazy[1], rel=1e-12)
    for _ in range(3):
        v = {k: rng.standard_normal(a.shape) for k, a in s["w"].items()}
        num = (loss({k: s["w"][k] + 1e-6 * v[k] for k in v})["loss"]
               - loss({k: s["w"][k] - 1e-6 * v[k] for k in v})["loss"]) / 2e-6
        assert abs(sum(float((res["grads"][k] * v[k]).sum()) for k in v) - num) <= 1e-6 * abs(num)


def test_gate_gradients_match_torch_autograd(setup):
    torch = pytest.importorskip("torch")
    from torch_dit import TorchDiT, modulate
    s = setup
    tm = TorchDiT.from_params(CFG, s["params"], torch.float64, pinned_features=True)   # compared at 1e-12: pinned
    T = lambda a: torch.from_numpy(np.asarray(a))

    def branches(x, t, y, w=None, caches=None):
        """The torch DiT forward with LazyDiT gates (official DiTBlock, training mode):
        -> output, module outputs {(l, kind)}, scores (B, L, 2)."""
        h = tm.x_embedder(x) + tm.pos_embed
        c = tm.t_embedder(t) + tm.y_embedder(y)
        outs, scores = {}, []
        for l, blk in enumerate(tm.blocks):
            mods = blk.adaLN_modulation(c).chunk(6, dim=1)
            row = []
            for j, (kind, norm, fn) in enumerate((("attn", blk.norm1, blk.attn), ("mlp", blk.norm2, blk.mlp))):
                shift, scale, gate = mods[3 * j: 3 * j + 3]
                z = modulate(norm(h), shift, scale)
                o = fn(z)
                if w is not None:
                    score = torch.sigmoid(torch.sum(z @ w[kind][l][:, None], dim=(-1, -2)))   # Linear(D, 1), sum
                    mask = score[:, None, None]
                    o = o * mask + caches[(l, kind)] * (1 - mask)
                    row.append(score)
                outs[(l, kind)] = o
                h = h + gate.unsqueeze(1) * o
            if row:
                scores.append(torch.stack(row, dim=1))
        return tm.unpatchify(tm.final_layer(h, c)), outs, (torch.stack(scores, dim=1) if scores else None)

    d = s["diffusion"]
    x_t = d.q_sample(s["x0"], INDEX, s["noise"])
    with torch.no_grad():
        out, caches, _ = branches(T(x_t), T(np.full(B, d.timestep_map[INDEX])), T(s["y"]))
        x_next = tl.sampling.ddim_step(d, out.numpy(), x_t, INDEX)["x_next"]
        target, _, _ = branches(T(x_next), T(s["t"]), T(s["y"]))
    w = {k: T(a).clone().requires_grad_(True) for k, a in s["w"].items()}
    soft, _, scores = branches(T(x_next), T(s["t"]), T(s["y"]), w, caches)
    mse = ((target - soft) ** 2).mean()
    loss = mse + RHO[0] * scores[..., 0].sum(1).mean() + RHO[1] * scores[..., 1].sum(1).mean()
    loss.backward()
    res = _loss(s, s["w"], backward=True)
    assert abs(res["loss"] - loss.item()) <= 1e-12 * abs(loss.item())
    for kind in ("attn", "mlp"):
        ref = w[kind].grad.numpy()
        err = np.abs(res["grads"][kind] - ref).max() / np.abs(ref).max()
        assert err <= 1e-10, f"{kind}: relative error {err:.2e}"


def test_ddim_eps_gain_values():
    """d x_prev / d eps of a DDIM step (eta 0), from the ADM schedule written out here: linear betas
    1e-4..0.02 over 1000 steps, 10 respaced steps keep t = 0, 111, ..., 999; x_prev = sqrt(a') x0 +
    sqrt(1 - a') eps with x0 = (x - sqrt(1 - a) eps) / sqrt(a), a' = 1 after the last step."""
    d = tl.create_diffusion(10)
    kept = np.arange(10) * 111
    assert d.timestep_map.tolist() == kept.tolist()
    acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    eps = np.random.default_rng(1).standard_normal(x.shape)
    for index in range(10):
        a, a_prev = acp[kept[index]], (acp[kept[index - 1]] if index else 1.0)
        want = np.sqrt(1 - a_prev) - np.sqrt(a_prev / a) * np.sqrt(1 - a)
        gain = ddim_eps_gain(d, index)
        assert gain == pytest.approx(want, rel=1e-12, abs=0), index
        # the sampler's own step moves x_next by gain * delta when eps moves by delta; it rounds its
        # coefficients to float32, as official: measured <= 2.3e-6 relative (index 1), checked at 2e-5
        step = lambda e: tl.sampling.ddim_step(d, np.concatenate([e, e], 1), x, index)["x_next"]   # noqa: E731
        moved = (step(eps + 0.5) - step(eps - 0.5)).ravel()
        assert np.abs(moved - gain).max() <= 2e-5 * abs(gain), index
    assert ddim_eps_gain(d, 0) == pytest.approx(-np.sqrt((1 - acp[0]) / acp[0]), rel=1e-12)   # last step: x0 itself
    assert ddim_eps_gain(d, 9) == pytest.approx(-1.8843172, abs=1e-7)                        # t = 999 -> 888


# ----------------------------------------------------------------------------
# The training loop

def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 4, 8, 8)).astype(np.float32), rng.integers(0, CFG.num_classes, n)


def _trainer(model, **kw):
    images, labels = _data()
    args = dict(steps=6, rho_attn=1e-2, rho_mlp=1e-2, lr=1e-2, batch=4, seed=7)
    args.update(kw)
    return GateTrainer(model, images, labels, **args)


@pytest.mark.parametrize("kw", [{}, {"all_steps": True, "target_ratio": 0.4, "calib_every": 2, "calib_samples": 2,
                                 "loss": "x"},
                                {"all_steps": True, "trajectory": True, "loss": "x-norm", "target_ratio": 0.4, "budget": "macs"}])
def test_resume_continues_bit_for_bit(setup, tmp_path, kw):
    model = tl.DiT(CFG, setup["params"], dtype="float32")
    straight = _trainer(model, **kw)
    for _ in range(6):
        straight.step()
    first = _trainer(model, **kw)
    for _ in range(3):
        first.step()
    first.save(tmp_path / "ckpt.safetensors")
    resumed = _trainer(model, **kw)
    resumed.load(tmp_path / "ckpt.safetensors")
    assert resumed.iteration == 3
    for _ in range(3):
        resumed.step()
    assert np.array_equal(straight.gates.attn, resumed.gates.attn)
    assert np.array_equal(straight.gates.mlp, resumed.gates.mlp)
    assert straight.log_scale == resumed.log_scale and straight.measured == resumed.measured
    with pytest.raises(ValueError, match="settings differ"):
        _trainer(model, lr=1e-3, **kw).load(tmp_path / "ckpt.safetensors")


def test_official_recipe_trains_even_indices_only(setup):
    model = tl.DiT(CFG, setup["params"], dtype="float32")
    official = _trainer(model, steps=7)
    assert official.trainable_steps == [0, 2, 4]
    for _ in range(12):
        official.step()
    trained = [s for s in range(7) if np.abs(official.gates.attn[s]).max() > 0]
    assert trained and set(trained) <= {0, 2, 4}
    assert not official.gates.mlp[[1, 3, 5, 6]].any()
    every = _trainer(model, steps=7, all_steps=True)
    assert every.trainable_steps == [0, 1, 2, 3, 4, 5]
    seen = {every.step()["index"] for _ in range(20)}
    assert 6 not in seen and len(seen) >= 4 and not every.gates.attn[6].any()


def test_large_rho_makes_the_sampler_lazy(setup):
    model = tl.DiT(CFG, setup["params"], dtype="float32")
    trainer = _trainer(model, steps=4, rho_attn=1.0, rho_mlp=1.0, lr=5e-2)
    for _ in range(10):
        res = trainer.step()
    assert res["scores"].mean() < 0.5
    stats = trainer.measure(num=2, cfg_scale=1.0)
    assert 0 < stats.lazy_ratio <= 0.5                                  # odd indices always compute
    assert stats.skips[0::2].sum() == 0                                 # k = 0 first step, k = 2 untrained index 1


def test_resume_validates_every_field(setup, tmp_path):
    from tinylazy.io import CheckpointError, SafetensorsFile, write_safetensors
    model = tl.DiT(CFG, setup["params"], dtype="float32")
    tr = _trainer(model)
    tr.step()
    tr.save(tmp_path / "ok.safetensors")
    with SafetensorsFile(tmp_path / "ok.safetensors") as f:
        tensors, meta = {k: f.read(k) for k in f.entries}, dict(f.metadata)
    S = tr.settings["steps"]
    cases = [
        (dict(iteration="-1"), "'iteration' is '-1'"),
        (dict(opt_steps=json.dumps([5] * S)), "opt_steps must list 6 step counts in 0..1"),
        (dict(opt_steps=json.dumps([0] * (S + 1))), "opt_steps must list 6"),
        (dict(log_scale="inf"), "'log_scale' is 'inf', not a finite number"),
        (dict(log_scale="1e308"), "not a finite number in -700..700"),
        (dict(measured="2.5"), "measured is 2.5: after 1 iterations it is null"),
        (dict(iteration="2"), "opt_steps add up to 1, not the 2 iterations"),
        (dict(log_scale="0.5"), "without a target ratio rho is never scaled"),
        (dict(measured='"x"'), "'measured' is 'x', not a JSON"),
        (dict(settings="{" * 5000), "nested too deeply|not valid JSON"),
        (dict(weights_hash="0" * 64), "checkpoint is for DiT weights"),
        (dict(dtype="float64"), "trained in 'float64'"),
        (dict(rng=json.dumps({"bit_generator": "PCG64"})), "the state must have the fields"),
        ({"gates.attn": tensors["gates.attn"].astype(np.int32)}, "tensor gates.attn is I32"),
        ({"opt.0.exp_avg_sq.mlp": -np.ones_like(tensors["opt.0.exp_avg_sq.mlp"])}, "negative entries"),
    ]
    fresh = _trainer(model)
    before = fresh.gates.attn.copy()
    for edit, match in cases:
        t = dict(tensors, **{k: v for k, v in edit.items() if "." in k})
        write_safetensors(tmp_path / "bad.safetensors", t, dict(meta, **{k: v for k, v in edit.items() if "." not in k}))
        with pytest.raises(CheckpointError, match=match):
            fresh.load(tmp_path / "bad.safetensors")
    assert fresh.iteration == 0 and np.array_equal(fresh.gates.attn, before)
    fresh.load(tmp_path / "ok.safetensors")
    assert fresh.iteration == 1
