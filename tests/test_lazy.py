"""LazyDiT sampling: module reuse, per-sample decisions, statistics and gate files.

The reference for reuse is written here independently of ``tinylazy.lazy``: a
duck-typed model that runs the DiT's pieces, records every module output per
call, and replays the recorded outputs of an earlier call where told to.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

import tinylazy as tl
from tinylazy.lazy import (GatesError, LazyGates, LazyStats, alternate_decisions, full_step_macs, module_macs,
                           random_decisions)

CFG = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)
STEPS = 6


@pytest.fixture(scope="module")
def params():
    return tl.init_params(CFG, seed=2, scheme="random")


def _model(params, dtype="float64"):
    return tl.DiT(CFG, params, dtype=dtype)


def _noise_labels(model, B=3):
    return tl.make_noise(model, B, seed=5), np.arange(B) % CFG.num_classes


class ReplayDiT:
    """A DiT whose call number k replays the module outputs of call k - 1 where ``reuse[k][l][kind]``
    is set, either for all rows (True) or for the rows in a bool mask."""

    recorder = None

    def __init__(self, model, reuse):
        self.model, self.config, self.xp, self.dtype, self.params = model, model.config, model.xp, model.dtype, \
            model.params
        self.reuse = reuse
        self.calls = 0
        self.last = {}

    def forward(self, x, t, y, branch=None):
        m = self.model
        x, t, y = m.check_inputs(x, t, y)
        h, c = m.embed_tokens(x), m.condition(t, y)
        rule = self.reuse.get(self.calls, {})
        outs = {}
        for l in range(self.config.depth):
            mods = m.block_modulation(l, c)
            for j, (kind, fn) in enumerate((("attn", m.attn), ("mlp", m.mlp))):
                shift, scale, gate = mods[3 * j: 3 * j + 3]
                out = fn(l, m.modulated_input(h, shift, scale))
                mask = rule.get((l, kind), False)
                if mask is True:
                    out = self.last[(l, kind)]
                elif mask is not False:
                    out = np.where(np.asarray(mask)[:, None, None], self.last[(l, kind)], out)
                outs[(l, kind)] = out
                h = h + gate[:, None, :] * out
        self.last = outs
        self.calls += 1
        return m.final_layer(h, c)

    __call__ = forward

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        return tl.DiT.forward_with_cfg(self, x, t, y, cfg_scale, guide_channels)


# ----------------------------------------------------------------------------
# Reuse semantics

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_all_compute_is_plain_ddim_bit_for_bit(params, dtype, cfg_scale):
    model = _model(params, dtype)
    noise, y = _noise_labels(model)
    plain = tl.ddim_sample(model, noise, y, STEPS, cfg_scale)
    zero_gates = LazyGates.zeros(model, STEPS)                       # score 0.5 >= 0.5: compute
    stats = LazyStats()
    lazy = tl.ddim_sample(model, noise, y, STEPS, cfg_scale, gates=zero_gates, lazy_stats=stats)
    forced = tl.ddim_sample(model, noise, y, STEPS, cfg_scale, decisions=np.ones((STEPS, CFG.depth, 2), bool))
    assert np.array_equal(plain, lazy) and np.array_equal(plain, forced)
    assert stats.lazy_ratio == 0.0
    rows = len(y) * (2 if cfg_scale > 1 else 1)
    assert stats.evals.sum() == STEPS * CFG.depth * 2 * rows and stats.row_steps == STEPS * rows


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_forced_skip_reuses_previous_outputs(params, cfg_scale):
    model = _model(params)
    noise, y = _noise_labels(model)
    keep = np.ones((STEPS, CFG.depth, 2), bool)
    keep[2] = False                      # every module of step 2 reuses step 1's outputs
    keep[4, 1, 0] = keep[5, 1, 0] = False  # layer-1 attention reuses step 3's output twice
    keep[4, 2, 1] = False
    lazy = tl.ddim_sample(model, noise, y, STEPS, cfg_scale, decisions=keep)
    all_kinds = {(l, kind): True for l in range(CFG.depth) for kind in ("attn", "mlp")}
    # Replay: call 2 reuses call 1; call 4 reuses call 3 (attn 1, mlp 2); call 5 reuses call 4's
    # attn 1, which is itself call 3's.
    ref = ReplayDiT(model, {2: all_kinds, 4: {(1, "attn"): True, (2, "mlp"): True}, 5: {(1, "attn"): True}})
    expect = tl.ddim_sample(ref, noise, y, STEPS, cfg_scale)
    assert np.array_equal(lazy, expect)
    assert not np.allclose(lazy, tl.ddim_sample(model, noise, y, STEPS, cfg_scale))   # skipping changed something


def test_first_step_always_computes(params):
    model = _model(params)
    noise, y = _noise_labels(model)
    keep = np.ones((STEPS, CFG.depth, 2), bool)
    keep[0] = False
    stats = LazyStats()
    out = tl.ddim_sample(model, noise, y, STEPS, 1.0, decisions=keep, lazy_stats=stats)
    assert np.array_equal(out, tl.ddim_sample(model, noise, y, STEPS, 1.0))
    assert stats.skips.sum() == 0


def test_mixed_decisions_equal_samples_one_by_one(params):
    model = _model(params)
    B, cfg_scale = 4, 1.5
    noise, y = _noise_labels(model, B)
    rows = 2 * B                                                     # [cond; uncond]: halves decide independently
    keep = np.random.default_rng(0).random((STEPS, CFG.depth, 2, rows)) < 0.5
    stats = LazyStats()
    batch = tl.ddim_sample(model, noise, y, STEPS, cfg_scale, decisions=keep, lazy_stats=stats)
    for b in range(B):
        alone = tl.ddim_sample(model, noise[b:b + 1], y[b:b + 1], STEPS, cfg_scale, decisions=keep[..., [b, B + b]])
        np.testing.assert_allclose(batch[b:b + 1], alone, rtol=0, atol=1e-12)
    # The same run through the replay reference, rows masked per call.
    reuse = {k: {(l, kind): ~keep[k, l, j] for l in range(CFG.depth) for j, kind in enumerate(("attn", "mlp"))}
             for k in range(1, STEPS)}
    np.testing.assert_allclose(batch, tl.ddim_sample(ReplayDiT(model, reuse), noise, y, STEPS, cfg_scale),
                               rtol=0, atol=1e-12)
    assert stats.skips.sum() == (~keep[1:]).sum()


def test_gate_scores_decide_per_row(params):
    """Random gates: the sampler's decisions are exactly score >= threshold, row by row."""
    model = _model(params)
    noise, y = _noise_labels(model, 4)
    rng = np.random.default_rng(1)
    gates = LazyGates.zeros(model, STEPS)
    gates.attn[...] = rng.standard_normal(gates.attn.shape) * 0.02
    gates.mlp[...] = rng.standard_normal(gates.mlp.shape) * 0.02
    seen = []

    def by_score(k, l, kind, scores):
        seen.append(scores)
        return scores >= 0.5

    stats = LazyStats()
    a = tl.ddim_sample(model, noise, y, STEPS, 1.5, gates=gates, lazy_stats=stats)
    b = tl.ddim_sample(model, noise, y, STEPS, 1.5, gates=gates, decisions=by_score)
    assert np.array_equal(a, b)
    scores = np.concatenate(seen)
    assert 0.05 < stats.lazy_ratio < 0.95 and 0 < (scores < 0.5).mean() < 1
    # Threshold 1: every scored module reuses; 0: every module computes.
    skip_all = np.zeros((STEPS, CFG.depth, 2), bool)
    assert np.array_equal(tl.ddim_sample(model, noise, y, STEPS, 1.5, gates=LazyGates.zeros(model, STEPS),
                                         threshold=1.0),
                          tl.ddim_sample(model, noise, y, STEPS, 1.5, decisions=skip_all))
    assert np.array_equal(tl.ddim_sample(model, noise, y, STEPS, 1.5, gates=gates, threshold=0.0),
                          tl.ddim_sample(model, noise, y, STEPS, 1.5))


def test_gate_scores_are_the_papers_formula(params):
    """score = sigmoid(sum over tokens of Z @ w) (paper eq. 4; official: a Linear(D, 1, bias=False)
    summed over tokens), Z the modulated, normalised module input, w the gate of the step's
    respaced index: written here on the PyTorch stand-in's blocks, for every scored module of a run."""
    torch = pytest.importorskip("torch")
    from torch_dit import TorchDiT, modulate
    model = _model(params)
    noise, y = _noise_labels(model)
    rng = np.random.default_rng(4)
    gates = LazyGates.zeros(model, STEPS)
    gates.attn[...] = rng.standard_normal(gates.attn.shape) * 0.01
    gates.mlp[...] = rng.standard_normal(gates.mlp.shape) * 0.01
    got, inputs = {}, []

    def compute_all(k, l, kind, scores):                              # the run stays plain DDIM
        got[(k, l, kind)] = np.array(scores)
        return True

    tl.ddim_sample(model, noise, y, STEPS, 1.0, gates=gates, decisions=compute_all,
                   callback=lambda i, info: inputs.append((i, info["step"], info["x"], info["t"])))
    # pinned timestep features: the scores are compared at 1e-12 (PyTorch's own float32 cos/sin are an ulp off)
    tm = TorchDiT.from_params(CFG, params, torch.float64, pinned_features=True)
    want = {}
    with torch.no_grad():
        for i, k, x, t in inputs[1:]:                                 # the first step computes without scoring
            h = tm.x_embedder(torch.from_numpy(x)) + tm.pos_embed
            c = tm.t_embedder(torch.from_numpy(np.full(len(y), t))) + tm.y_embedder(torch.from_numpy(y))
            for l, blk in enumerate(tm.blocks):
                mods = blk.adaLN_modulation(c).chunk(6, dim=1)
                for j, (kind, norm, fn) in enumerate((("attn", blk.norm1, blk.attn), ("mlp", blk.norm2, blk.mlp))):
                    shift, scale, gate = mods[3 * j: 3 * j + 3]
                    z = modulate(norm(h), shift, scale).numpy()       # (B, T, D)
                    u = np.einsum("btd,d->b", z, gates.of(kind)[i, l])  # sum over tokens and channels of Z w
                    want[(k, l, kind)] = 1 / (1 + np.exp(-u))
                    h = h + gate.unsqueeze(1) * fn(torch.from_numpy(z))
    assert sorted(got) == sorted(want) and len(want) == (STEPS - 1) * CFG.depth * 2
    scores = np.concatenate(list(want.values()))
    assert 0.05 < scores.min() and scores.max() < 0.95                # away from saturation (0.19..0.91)
    err = max(np.abs(got[key] - want[key]).max() for key in want)
    print(f"gate scores vs the formula: max abs difference {err:.2e}")
    assert err <= 1e-12, f"gate scores differ from the formula by {err:.2e}"   # measured 1.1e-16


# ----------------------------------------------------------------------------
# Statistics

def test_stats_ratios_macs_and_heatmap(params, tmp_path):
    model = _model(params, "float32")
    noise, y = _noise_labels(model, 2)
    keep = alternate_decisions(STEPS, CFG.depth)
    keep[2, 0, 1] = False                                             # one extra skip: layer 0 MLP, step 2
    stats = LazyStats()
    tl.ddim_sample(model, noise, y, STEPS, 1.5, decisions=keep, lazy_stats=stats)
    rows, n = 4, STEPS * CFG.depth * 2
    assert stats.lazy_ratio == pytest.approx((n // 2 + 1) / n)
    assert stats.ratio_by_kind()["attn"] == pytest.approx(0.5)
    assert stats.ratio_by_step().tolist() == pytest.approx([0, 1, 1 / 6, 1, 0, 1])
    assert stats.ratio_by_layer()[0].tolist() == pytest.approx([0.5, 4 / 6])
    m = module_macs(CFG)
    spent, full = stats.macs()
    assert full == STEPS * rows * full_step_macs(CFG)
    assert spent == full - rows * (9 * m["attn"] + 10 * m["mlp"])    # no gates: nothing scored
    evals = STEPS * CFG.depth * rows                                  # per kind
    reused = rows * (9 * m["attn"] + 10 * m["mlp"])
    assert stats.macs_lazy_ratio == pytest.approx(reused / (evals * (m["attn"] + m["mlp"])))
    summary = stats.summary()
    assert summary["macs_ratio"] == pytest.approx(spent / full) and len(summary["by_layer"]) == CFG.depth
    path = stats.heatmap(tmp_path / "fig4.png")
    with Image.open(path) as img:
        assert img.size[0] > 2 * STEPS * 16 and img.size[1] > CFG.depth * 16
        px = np.asarray(img.convert("L"))
        assert px.min() < 100 and px.max() == 255                     # dark (reused) and white (computed) cells


def test_rule_decisions():
    alt = alternate_decisions(20, 4)
    assert alt[0].all() and not alt[1].any() and (~alt).mean() == 0.5
    rnd = random_decisions(20, 4, 0.5, seed=3)
    assert rnd[0].all() and (~rnd).sum() == 80
    assert not np.array_equal(rnd, random_decisions(20, 4, 0.5, seed=4))
    with pytest.raises(ValueError, match="first step"):
        random_decisions(2, 4, 0.9)


def test_bad_decisions_and_threshold(params):
    model = _model(params)
    noise, y = _noise_labels(model)
    with pytest.raises(ValueError, match="decisions must be"):
        tl.ddim_sample(model, noise, y, STEPS, decisions=np.ones((STEPS, 2, 2), bool))
    with pytest.raises(ValueError, match="threshold"):
        tl.ddim_sample(model, noise, y, STEPS, gates=LazyGates.zeros(model, STEPS), threshold=2)


# ----------------------------------------------------------------------------
# Gate files

def test_gates_roundtrip_official_names(params, tmp_path):
    model = _model(params, "float32")
    gates = LazyGates.zeros(model, STEPS, dtype=np.float32)
    gates.attn[...] = np.random.default_rng(0).standard_normal(gates.attn.shape)
    gates.mlp[...] = np.random.default_rng(1).standard_normal(gates.mlp.shape)
    path = tmp_path / "g.safetensors"
    tl.save_gates(gates, path, training={"iters": 3})
    from tinylazy.io import read_safetensors
    tensors, meta = read_safetensors(path)
    assert tensors["blocks.2.mlp_lazy_learning.5.weight"].shape == (1, CFG.hidden_size)
    assert np.array_equal(tensors["blocks.1.attn_lazy_learning.4.weight"][0], gates.attn[4, 1])
    assert len(tensors) == STEPS * CFG.depth * 2
    assert meta["num_sampling_steps"] == str(STEPS) and "weights_hash" in meta and "timestep_map" in meta
    back = tl.load_gates(path, model, steps=STEPS)
    assert np.array_equal(back.attn, gates.attn) and np.array_equal(back.mlp, gates.mlp)
    assert back.training["iters"] == 3 and np.array_equal(back.timestep_map, gates.timestep_map)


def test_gates_for_another_model_or_step_count_are_refused(params, tmp_path):
    model = _model(params, "float32")
    path = tmp_path / "g.safetensors"
    tl.save_gates(LazyGates.zeros(model, STEPS), path)
    other = tl.DiT(CFG, tl.init_params(CFG, seed=9, scheme="random"))
    with pytest.raises(GatesError, match="trained for DiT weights"):
        tl.load_gates(path, other)
    with pytest.raises(GatesError, match=f"made for {STEPS} sampling steps, not 10"):
        tl.load_gates(path, model, steps=10)
    gates = tl.load_gates(path, model)
    noise, y = _noise_labels(model)
    with pytest.raises(GatesError, match=f"made for {STEPS} sampling steps; this run uses 10"):
        tl.ddim_sample(model, noise, y, 10, gates=gates)
    wide = tl.DiT(CFG.replace(hidden_size=48, num_heads=2), tl.init_params(CFG.replace(hidden_size=48), seed=0))
    with pytest.raises(GatesError, match="hidden size 48"):
        tl.load_gates(path, wide)


def test_malformed_gate_files(params, tmp_path):
    model = _model(params, "float32")
    from tinylazy.io import write_safetensors
    full = LazyGates.zeros(model, STEPS).state_dict()
    missing = dict(full)
    del missing["blocks.1.mlp_lazy_learning.3.weight"]
    write_safetensors(tmp_path / "m.safetensors", missing)
    with pytest.raises(GatesError, match="blocks.1.mlp_lazy_learning.3.weight"):
        tl.load_gates(tmp_path / "m.safetensors", model)
    write_safetensors(tmp_path / "x.safetensors", dict(full, **{"blocks.0.attn.qkv.weight": np.zeros((3, 3))}))
    with pytest.raises(GatesError, match="not a LazyDiT gate"):
        tl.load_gates(tmp_path / "x.safetensors", model)


def test_hostile_gate_files_are_refused_from_the_header(params, tmp_path):
    """Nothing is sized by a step or layer number, only floating-point gates are read, and the metadata
    must describe the tensors; every refusal is a GatesError naming the file."""
    model = _model(params, "float32")
    from tinylazy.io import write_safetensors
    gates = LazyGates.zeros(model, STEPS)
    full = {k: np.asarray(v, np.float32) for k, v in gates.state_dict().items()}
    meta = gates.metadata()
    p = tmp_path / "g.safetensors"
    cases = [
        (dict(full, **{"blocks.0.attn_lazy_learning.999999.weight": full["blocks.0.attn_lazy_learning.0.weight"]}),
         meta, "numbered up to 999999 \\(no step"),
        (dict(full, **{"blocks.0.attn_lazy_learning.12345678901.weight": np.zeros((1, CFG.hidden_size), np.float32)}),
         meta, "not a LazyDiT gate"),
        (dict(full, **{"blocks.0.attn_lazy_learning.0.weight": np.ones((1, CFG.hidden_size), np.int32)}), meta,
         "is I32 \\(1, 32\\), a gate is a floating-point"),
        (dict(full, **{"blocks.0.mlp_lazy_learning.1.weight": np.ones((1, CFG.hidden_size), bool)}), meta,
         "is BOOL"),
        (full, dict(meta, timestep_map=json.dumps([10 ** 30] * STEPS)), "timestep_map must list"),
        (full, dict(meta, timestep_map="[" * 10000), "nested too deeply"),
        (full, dict(meta, timestep_map=json.dumps(list(range(STEPS))[::-1])), "increasing"),
        (full, dict(meta, num_sampling_steps="1e3"), "not a whole number"),
        (full, dict(meta, num_sampling_steps=str(STEPS + 1)), "says num_sampling_steps"),
        (full, dict(meta, depth="7"), "says depth 7"),
        (full, dict(meta, training="[1]"), "'training' is a JSON list"),
        (full, dict(meta, weights_hash="x" * 64), "not a sha256 hex digest"),
        (full, dict(meta, format="other"), "metadata format"),
        (full, {("weights_iash" if k == "weights_hash" else k): v for k, v in meta.items()},
         "unknown metadata 'weights_iash'"),
    ]
    for tensors, m, match in cases:
        write_safetensors(p, tensors, m)
        with pytest.raises(GatesError, match=match) as e:
            tl.load_gates(p, model)
        assert str(p) in str(e.value)


def test_official_checkpoint_converts_and_loads(params, tmp_path):
    """An official LazyDiT gate checkpoint (torch.save of {"model", "opt", "args", ...}) converts
    with the torch-free converter and loads for any model of its shape (no hash to check)."""
    torch = pytest.importorskip("torch")
    import argparse

    from tinylazy.convert import convert
    model = _model(params, "float32")
    rng = np.random.default_rng(0)
    w = {(kind, l, s): rng.standard_normal((1, CFG.hidden_size)).astype(np.float32)
         for kind in ("attn", "mlp") for l in range(CFG.depth) for s in range(STEPS)}
    ckpt = {"model": {f"block_{l}_{kind}_lazy_learning_weight_{s}": torch.from_numpy(a) for (kind, l, s), a in w.items()},
            "opt": {"state": {}, "param_groups": []}, "args": argparse.Namespace(lr=1e-4), "epoch": 0, "step": 500}
    torch.save(ckpt, tmp_path / "official.pt")
    convert(tmp_path / "official.pt", tmp_path / "official.safetensors", progress=False)
    gates = tl.load_gates(tmp_path / "official.safetensors", model, steps=STEPS)
    assert gates.weights_hash is None
    assert np.array_equal(gates.mlp[4, 2], w[("mlp", 2, 4)][0])
    assert np.array_equal(gates.timestep_map, tl.create_diffusion(STEPS).timestep_map)
    noise, y = _noise_labels(model)
    stats = LazyStats()
    tl.ddim_sample(model, noise, y, STEPS, 1.5, gates=gates, lazy_stats=stats)
    assert stats.scored.sum() == (STEPS - 1) * CFG.depth * 2 * 6


# ----------------------------------------------------------------------------
# The shipped gates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("steps, variant, ratio, recipe", [
    (20, None, 0.3, "chain"), (10, None, 0.3, "chain"),            # what --lazy uses (issue #19)
    (20, "official", 0.5, "official (odd t)"), (10, "official", 0.3, "official (odd t)")])   # the paper's baseline
def test_shipped_gates_fit_the_bundled_model_and_reproduce_their_recorded_ratio(steps, variant, ratio, recipe):
    """The lazy ratios the docs quote for the shipped gates are the ones recorded in the files;
    rerunning the recorded measurement must give them exactly."""
    from tinylazy.io import load_dit
    from tinylazy.lazy import gates_file
    weights = os.path.join(ROOT, "weights", "tiny-dit-digits.safetensors")
    path = gates_file(weights, steps, variant)
    if not (os.path.isfile(weights) and os.path.isfile(path)):
        pytest.skip("bundled weights or gates not present")
    model = load_dit(weights)
    gates = tl.load_gates(path, model, steps)                         # raises if made for other weights
    facts = gates.training
    assert facts["target_ratio"] == ratio and facts["recipe"] == recipe
    # train_gates.py's closing measurement: 32 guided samples, noise seed + 2 drawn as make_noise draws it
    noise = np.random.default_rng(facts["seed"] + 2).standard_normal((32, 1, 16, 16)).astype(np.float32)
    stats = LazyStats()
    tl.ddim_sample(model, noise, np.arange(32) % 10, steps, facts["calib_cfg"], gates=gates, lazy_stats=stats)
    # exact: on these 32 samples the scores closest to the 0.5 threshold are 1.3e-4 (chain, 20 steps) and
    # 1.1e-3 (chain, 10) away, the official gates' trained ones 0.02 (their untrained ones are exactly 0.5
    # and compute): beyond the rounding of one float32 run (an error the other way would flip a decision)
    assert stats.lazy_ratio == facts["measured_ratio"]
    assert stats.ratio_by_kind() == {"attn": facts["measured_attn"], "mlp": facts["measured_mlp"]}
    assert stats.summary()["macs_ratio"] == pytest.approx(facts["measured_macs_ratio"], rel=1e-12)


def test_bundled_gates_are_named_by_their_file_name(tmp_path, monkeypatch):
    """--gates takes a bundled gates file's name (resources.gates_path), as --weights a bundled model's."""
    names = tl.resources.bundled_gates()
    if "tiny-dit-digits.gates-ddim20-official" not in names:
        pytest.skip("bundled gates not present")
    assert names == [f"tiny-dit-digits.gates-ddim{n}{v}" for n in (10, 20) for v in ("", "-official")]
    assert tl.resources.bundled_models() == ["tiny-dit-digits"]                  # gates are not models
    path = tl.resources.gates_path("tiny-dit-digits.gates-ddim20-official")
    assert path == str(tl.resources.weights_dir() / "tiny-dit-digits.gates-ddim20-official.safetensors")
    assert path == tl.lazy.gates_file(tl.resources.weights_path("tiny-dit-digits"), 20, "official")
    assert tl.resources.gates_path("no-such.gates") == "no-such.gates"            # left for the reader to report
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-dit-digits.gates-ddim20-official").write_bytes(b"")
    assert tl.resources.gates_path("tiny-dit-digits.gates-ddim20-official") == "tiny-dit-digits.gates-ddim20-official"
