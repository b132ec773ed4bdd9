"""AdamW against torch.optim.AdamW, its state round trip, and the EMA update."""
import numpy as np
import pytest

from tinylazy.optim import AdamW, update_ema

from conftest import rel_err


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((5, 3)), "a.bias": rng.standard_normal(5),
            "b": rng.standard_normal((2, 2, 2))}


def _grads(step, params):
    rng = np.random.default_rng(100 + step)
    return {k: rng.standard_normal(p.shape) * (1 + step) for k, p in params.items()}


@pytest.mark.parametrize("settings", [{}, {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}])
def test_adamw_matches_torch(settings):
    torch = pytest.importorskip("torch")
    params = _params()
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = AdamW(params, **settings)
    topt = torch.optim.AdamW(list(tparams.values()), **{"lr": 1e-4, "weight_decay": 0.0, **settings})
    for step in range(5):
        g = _grads(step, params)
        opt.step(g)
        for k, p in tparams.items():
            p.grad = torch.from_numpy(g[k].copy())
        topt.step()
        for k in params:
            assert rel_err(params[k], tparams[k].detach().numpy()) <= 1e-14, (step, k)
    for k, p in tparams.items():
        st = topt.state[p]
        assert rel_err(opt.exp_avg[k], st["exp_avg"].numpy()) <= 1e-14
        assert rel_err(opt.exp_avg_sq[k], st["exp_avg_sq"].numpy()) <= 1e-14


def test_state_dict_round_trip_continues_identically():
    p1, p2 = _params(), _params()
    o1 = AdamW(p1, lr=1e-3, weight_decay=0.01)
    for s in range(3):
        o1.step(_grads(s, p1))
    o2 = AdamW(p2)
    for k in p2:
        p2[k][...] = p1[k]
    o2.load_state_dict(o1.state_dict())
    for s in range(3, 6):
        o1.step(_grads(s, p1))
        o2.step(_grads(s, p2))
    for k in p1:
        assert np.array_equal(p1[k], p2[k])


def test_bad_state_and_grads_are_refused():
    p = _params()
    opt = AdamW(p)
    with pytest.raises(KeyError, match="no gradient for"):
        opt.step({"a.weight": np.zeros((5, 3))})
    before = {k: v.copy() for k, v in p.items()}
    bad = _grads(0, p)
    bad["a.bias"] = np.zeros(3)
    with pytest.raises(ValueError, match="gradient of a.bias has shape"):
        opt.step(bad)                                   # refused before any parameter moves
    assert opt.step_count == 0 and all(np.array_equal(p[k], before[k]) for k in p)
    assert all(not opt.exp_avg[k].any() for k in p)
    state = opt.state_dict()
    state["exp_avg"]["b"] = np.zeros(3)
    with pytest.raises(ValueError, match="exp_avg/b has shape"):
        AdamW(_params()).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid AdamW"):
        AdamW(p, betas=(1.0, 0.9))


def test_ema_official_update():
    torch = pytest.importorskip("torch")
    params = _params(1)
    ema = {k: v.astype(np.float32) for k, v in _params(2).items()}
    tema = {k: torch.from_numpy(v.copy()) for k, v in ema.items()}
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    update_ema(ema, p32, 0.999)
    for k, e in tema.items():
        e.mul_(0.999).add_(torch.from_numpy(p32[k]), alpha=1 - 0.999)
        assert rel_err(ema[k], e.numpy()) <= 1e-6
    update_ema(ema, p32, 0.0)                               # decay 0 copies (the official initialisation)
    for k in ema:
        assert np.array_equal(ema[k], p32[k])


def test_updates_do_not_depend_on_the_thread_count(monkeypatch):
    """AdamW and the EMA run per tensor on the pool: the same bits on 1 or 3 threads."""
    from tinylazy import parallel
    monkeypatch.setattr(parallel, "MIN_BLOCK", 4)                 # the small test tensors go to the pool too
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(parallel, "NUM_THREADS", threads)
        params = _params()
        ema = {k: v.copy() for k, v in params.items()}
        opt = AdamW(params, lr=1e-2, weight_decay=0.1)
        for s in range(3):
            opt.step(_grads(s, params))
            update_ema(ema, params, 0.9)
        results.append((params, ema))
    for a, b in zip(*results):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
