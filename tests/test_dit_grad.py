"""The DiT backward: whole-model gradients against PyTorch autograd on the stand-in
(float64, relative error <= 1e-10 per tensor), a random-direction check against
central differences, the input-gradient-only mode and the pieces the LazyDiT gate
trainer composes."""
import numpy as np
import pytest

import tinylazy as tl

torch = pytest.importorskip("torch")
from torch_dit import TorchDiT, modulate  # noqa: E402  (needs torch)

RTOL = 1e-10

CASES = {
    # name: (config, t, y); y = num_classes is the null class
    "learn_sigma": (tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                 num_heads=4, num_classes=10),
                    [0, 999, 500, 17], [10, 3, 3, 10]),
    "eps_only": (tl.DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1,
                              num_heads=2, num_classes=5, learn_sigma=False),
                 [999, 0, 999], [4, 5, 4]),
    "patch1": (tl.DiTConfig(input_size=4, patch_size=1, in_channels=2, hidden_size=48, depth=3,
                            num_heads=3, num_classes=7),
               [250, 999, 0], [7, 0, 7]),
}


def setup_case(name, dtype="float64"):
    cfg, t, y = CASES[name]
    params = tl.init_params(cfg, seed=1, scheme="random")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((len(t), cfg.in_channels, cfg.input_size, cfg.input_size))
    return cfg, params, x, np.array(t), np.array(y), rng


def torch_grads(cfg, params, x, t, y, loss_fn):
    """(dL/dparam by official name, dL/dx) from PyTorch autograd, float64.  Pinned timestep
    features: the gradients are compared at 1e-10, and PyTorch's own float32 cos/sin move them ~1e-7."""
    model = TorchDiT.from_params(cfg, params, torch.float64, pinned_features=True)
    tx = torch.from_numpy(x).requires_grad_(True)
    loss_fn(model(tx, torch.from_numpy(t), torch.from_numpy(y))).backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.requires_grad}
    return grads, tx.grad.numpy()


def assert_close(name, ours, ref):
    """Relative error of one tensor; on failure print where it diverged, llm.c style."""
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300)
    assert err <= RTOL, (f"{name}: relative error {err:.2e} > {RTOL:.0e}; first values ours "
                         f"{ours.ravel()[:4]} torch {ref.ravel()[:4]}")


@pytest.mark.parametrize("loss", ["dot", "mse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_torch_autograd(case, loss):
    cfg, params, x, t, y, rng = setup_case(case)
    model = tl.DiT(cfg, params, dtype="float64")
    out, cache = model.forward_train(x, t, y)
    assert np.array_equal(out, model(x, t, y)), "forward_train must compute the very same output"
    target = rng.standard_normal(out.shape)
    if loss == "dot":                                   # L = sum(out * R)
        dout = target

        def loss_fn(o):
            return (o * torch.from_numpy(target)).sum()
    else:                                               # L = mean((out - target)^2)
        dout = 2 * (out - target) / out.size

        def loss_fn(o):
            return torch.nn.functional.mse_loss(o, torch.from_numpy(target))
    grads, dx = model.backward(dout, cache)
    ref_grads, ref_dx = torch_grads(cfg, params, x, t, y, loss_fn)
    assert set(grads) == set(ref_grads) == set(params) - {"pos_embed"}
    for name in ref_grads:
        assert_close(name, grads[name], ref_grads[name])
    assert_close("dx", dx, ref_dx)


def test_label_table_gradient_sums_repeated_labels():
    cfg, params, x, t, _, rng = setup_case("learn_sigma")
    model = tl.DiT(cfg, params, dtype="float64")
    y = np.array([2, 2, 2, 10])
    out, cache = model.forward_train(x, t, y)
    dout = rng.standard_normal(out.shape)
    grads, _ = model.backward(dout, cache)
    table = grads["y_embedder.embedding_table.weight"]
    ref = torch_grads(cfg, params, x, t, y, lambda o: (o * torch.from_numpy(dout)).sum())[0]
    assert_close("y_embedder.embedding_table.weight", table, ref["y_embedder.embedding_table.weight"])
    unused = [r for r in range(table.shape[0]) if r not in (2, 10)]
    assert np.all(table[unused] == 0) and np.all(table[2] != 0)


def test_random_direction_whole_model():
    """<grad, V> over every parameter and the input against a central difference along V."""
    cfg, params, x, t, y, rng = setup_case("learn_sigma")
    model = tl.DiT(cfg, params, dtype="float64")
    out, cache = model.forward_train(x, t, y)
    r = rng.standard_normal(out.shape)
    grads, dx = model.backward(r, cache)
    v = {k: rng.standard_normal(p.shape) for k, p in params.items() if k != "pos_embed"}
    vx = rng.standard_normal(x.shape)
    analytic = sum(float(np.sum(grads[k] * v[k])) for k in v) + float(np.sum(dx * vx))

    def loss(step):
        moved = {k: p + step * v[k] if k in v else p for k, p in params.items()}
        return float(np.sum(tl.DiT(cfg, moved, dtype="float64")(x + step * vx, t, y) * r))

    eps = 1e-6
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (numeric, analytic)


def test_input_gradients_only():
    """param_grads=False: no parameter gradients and the same dx."""
    cfg, params, x, t, y, rng = setup_case("patch1")
    model = tl.DiT(cfg, params, dtype="float64")
    out, cache = model.forward_train(x, t, y)
    dout = rng.standard_normal(out.shape)
    grads, dx = model.backward(dout, cache)
    none, dx_only = model.backward(dout, model.forward_train(x, t, y)[1], param_grads=False)
    assert none is None
    np.testing.assert_array_equal(dx_only, dx)


def test_backward_consumes_its_cache():
    cfg, params, x, t, y, rng = setup_case("eps_only")
    model = tl.DiT(cfg, params, dtype="float64")
    out, cache = model.forward_train(x, t, y)
    model.backward(out, cache)
    assert cache == {}
    with pytest.raises(ValueError, match="cache is incomplete"):
        model.backward(out, cache)


def test_pieces_compose_like_the_gate_trainer():
    """Block 0 run piece by piece with input gradients only: the gradients flowing into
    each branch's output (da, dm) and input Z (dz_attn, dz_mlp) match PyTorch's."""
    cfg, params, x, t, y, rng = setup_case("learn_sigma")
    model = tl.DiT(cfg, params, dtype="float64")
    h = model.embed_tokens(x)
    c_act = model.condition(t, y)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = model.block_modulation(0, c_act)
    cz1, ca, cz2, cm = {}, {}, {}, {}
    z1 = model.modulated_input(h, shift_msa, scale_msa, cz1)
    a = model.attn(0, z1, ca)
    h1 = h + gate_msa[:, None, :] * a
    z2 = model.modulated_input(h1, shift_mlp, scale_mlp, cz2)
    m = model.mlp(0, z2, cm)
    h2 = h1 + gate_mlp[:, None, :] * m
    r = rng.standard_normal(h2.shape)                   # dL/dh2 for L = sum(h2 * r)
    dm = r * gate_mlp[:, None, :]
    dz2 = model.mlp_backward(0, dm, cm)
    dh1 = r + model.modulated_input_backward(dz2, cz2, mod_grads=False)[0]
    da = dh1 * gate_msa[:, None, :]
    dz1 = model.attn_backward(0, da, ca)
    dh = dh1 + model.modulated_input_backward(dz1, cz1, mod_grads=False)[0]

    tm = TorchDiT.from_params(cfg, params, torch.float64)                   # one block: no timestep features
    blk = tm.blocks[0]
    th = torch.from_numpy(h).requires_grad_(True)
    mods = blk.adaLN_modulation[1](torch.from_numpy(c_act)).chunk(6, dim=1)   # c_act is SiLU(c) already
    tz1 = modulate(blk.norm1(th), mods[0], mods[1])
    ta = blk.attn(tz1)
    th1 = th + mods[2].unsqueeze(1) * ta
    tz2 = modulate(blk.norm2(th1), mods[3], mods[4])
    tmm = blk.mlp(tz2)
    th2 = th1 + mods[5].unsqueeze(1) * tmm
    for v in (tz1, ta, tz2, tmm):
        v.retain_grad()
    (th2 * torch.from_numpy(r)).sum().backward()
    for name, ours, ref in [("z1", z1, tz1), ("a", a, ta), ("z2", z2, tz2), ("m", m, tmm)]:
        np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=0, atol=1e-12, err_msg=name)
    for name, ours, ref in [("dm", dm, tmm), ("dz_mlp", dz2, tz2), ("da", da, ta), ("dz_attn", dz1, tz1),
                            ("dx", dh, th)]:
        assert_close(name, ours, ref.grad.numpy())

    block_cache = {}
    model.block(0, h, c_act, block_cache)
    np.testing.assert_array_equal(model.block_backward(0, r, block_cache)[0], dh)


def _owned_arrays(cache, found):
    """Every distinct buffer a cache holds (views count once, by their owner)."""
    for v in (cache.values() if isinstance(cache, dict) else cache):
        if isinstance(v, (dict, tuple, list)):
            _owned_arrays(v, found)
        elif isinstance(v, np.ndarray):
            owner = v if v.base is None else v.base
            found[id(owner)] = owner
    return found


def test_block_cache_keeps_no_attention_matrix_and_nothing_twice():
    cfg = tl.DiTConfig(input_size=8, patch_size=1, in_channels=4, hidden_size=16, depth=2, num_heads=2,
                       num_classes=10)                   # H T^2 > 4 D T: a kept (T, T) matrix would stand out
    model = tl.DiT.from_config(cfg, scheme="random")
    B, T, D = 3, cfg.num_tokens, cfg.hidden_size
    rng = np.random.default_rng(0)
    _, cache = model.forward_train(rng.standard_normal((B, 4, 8, 8)), [5, 6, 7], [1, 2, 10])
    owned = _owned_arrays(cache["blocks.1"], {})
    assert max(a.size for a in owned.values()) < B * cfg.num_heads * T * T
    big = sum(a.size for a in owned.values() if a.size >= B * T * D)
    assert big == 18 * B * T * D, f"block cache holds {big / (B * T * D)} (B, T, D) arrays, expected 18"


def test_backward_rejects_a_wrong_gradient_shape():
    cfg, params, x, t, y, _ = setup_case("eps_only")
    model = tl.DiT(cfg, params, dtype="float64")
    out, cache = model.forward_train(x, t, y)
    with pytest.raises(ValueError, match="dout has shape"):
        model.backward(out[:, :1], cache)
