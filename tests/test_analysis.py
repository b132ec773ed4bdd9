"""tinylazy.analysis: the recorded similarities are the paper's f between two plain forward passes
(float64, to float64 precision), the probe changes no bit of a plain or lazy run, the oracle takes
the most similar evaluations within its budget, and the command keeps the CLI convention."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tinylazy as tl
from tinylazy import analysis, cli
from tinylazy.analysis import Probe, oracle_decisions
from tinylazy.lazy import LazyGates, module_macs
from tinylazy.protocol import KINDS
from tinylazy.trace import Recorder

CFG = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
STEPS = 5


@pytest.fixture(scope="module")
def models():
    """One random DiT in float64 (the precision checks) and float32 (the bits of ordinary runs)."""
    return {dt: tl.DiT.from_config(CFG, seed=3, scheme="random", dtype=dt) for dt in ("float64", "float32")}


def mixed_gates(model, scale=0.05, seed=0):
    """Random gate vectors whose scores straddle 0.5: some rows compute, some reuse."""
    rng = np.random.default_rng(seed)
    shape = (STEPS, CFG.depth, CFG.hidden_size)
    return LazyGates(rng.normal(0, scale, shape), rng.normal(0, scale, shape),
                     tl.create_diffusion(STEPS).timestep_map, tl.io.weights_hash(model))


def plain_outputs(model, x, t, y, cfg_scale):
    """One plain forward pass -> {(l, kind): (Z, Y)} of every module (the model's own rows)."""
    seen = {}

    def keep(l, kind, z, cache=None):
        seen[(l, kind)] = (z, model.branch(l, kind, z, cache))
        return seen[(l, kind)][1]

    if cfg_scale == 1:
        model(x, np.full(len(x), t), y, branch=keep)
    else:
        null = np.full(len(y), model.config.num_classes)
        model.forward_with_cfg(np.concatenate([x, x]), np.full(2 * len(x), t), np.concatenate([y, null]),
                               cfg_scale, branch=keep)
    return seen


@pytest.mark.parametrize("family, cfg_scale", [("DiT", 1.0), ("DiT", 3.0), ("Large-DiT", 3.0)])
def test_similarities_are_those_of_two_plain_forward_passes(models, family, cfg_scale):
    if family == "DiT":
        model = models["float64"]
    else:                                   # the second family, on the same block schema and branch hook
        from tinylazy.large_dit import TINY, LargeDiT
        model = LargeDiT.from_config(TINY, seed=0, scheme="random", dtype="float64")
    depth = model.config.depth
    noise, y = tl.make_noise(model, 3, seed=1), np.array([0, 4, 9])
    xs = {}
    probe = Probe(model, STEPS, history=True)
    tl.ddim_sample(probe, noise, y, STEPS, cfg_scale, callback=lambda i, info: xs.__setitem__(info["step"], info))
    sim = probe.result()
    rows = 3 if cfg_scale == 1 else 6
    assert sim.sim.shape == (STEPS, depth, 2, rows) and sim.guided == (cfg_scale > 1)
    assert np.isnan(sim.sim[0]).all() and np.isfinite(sim.sim[1:]).all() and sim.computed.all() and sim.fresh[1:].all()
    np.testing.assert_array_equal(sim.uncond, np.arange(rows) >= 3 if cfg_scale > 1 else np.zeros(rows, bool))
    plain = [plain_outputs(model, xs[k]["x"], xs[k]["t"], y, cfg_scale) for k in range(STEPS)]
    cos = lambda a, b: np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))      # tr(A^T B) / (|A|_F |B|_F)
    for k in range(1, STEPS):
        for (l, kind), (z, out) in plain[k].items():
            z0, out0 = plain[k - 1][(l, kind)]
            j = KINDS.index(kind)
            for r in range(rows):
                a, b = out0[r], out[r]
                dy, dz = np.linalg.norm(b - a), np.linalg.norm(z[r] - z0[r])
                got = [sim.sim[k, l, j, r], sim.dy[k, l, j, r], sim.dist[k, l, j, r], sim.dz[k, l, j, r],
                       sim.zdist[k, l, j, r]]
                want = [cos(a, b), dy, dy / np.linalg.norm(b), dz, dz / np.linalg.norm(z[r])]
                np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
                stale = [cos(plain[i][(l, kind)][1][r], b) for i in range(k)]
                np.testing.assert_allclose(sim.stale[:k, k, l, j, r], stale, rtol=1e-13, atol=0)


def trace_of(model, run):
    """The LazyDiT decisions and scores (and the samples) of ``run(callback)`` with a trace recorder on the DiT."""
    rec = Recorder(include=["*/compute", "*/score"])
    rec.prefix = "step.00/"
    model.recorder = rec
    try:
        out = run(lambda i, info: setattr(rec, "prefix", f"step.{info['step'] + 1:02d}/"))
    finally:
        model.recorder = None
    return out, rec.arrays


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_the_probe_changes_no_bit_of_a_plain_or_lazy_run(models, cfg_scale):
    model = models["float32"]
    noise, y = tl.make_noise(model, 4, seed=2), np.array([1, 3, 5, 7])
    gates = mixed_gates(model)
    plain = tl.ddim_sample(model, noise, y, STEPS, cfg_scale)
    probe = Probe(model, STEPS, gates)
    np.testing.assert_array_equal(tl.ddim_sample(probe, noise, y, STEPS, cfg_scale), plain)
    stats = [tl.LazyStats(), tl.LazyStats()]
    lazy, want = trace_of(model, lambda cb: tl.ddim_sample(model, noise, y, STEPS, cfg_scale, gates=gates,
                                                             lazy_stats=stats[0], callback=cb))
    probe = Probe(model, STEPS, gates)
    got_x, got = trace_of(model, lambda cb: tl.ddim_sample(probe, noise, y, STEPS, cfg_scale, gates=gates,
                                                             lazy_stats=stats[1], callback=cb))
    np.testing.assert_array_equal(got_x, lazy)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    np.testing.assert_array_equal(stats[0].skips, stats[1].skips)
    assert 0.1 < stats[0].lazy_ratio < 0.9
    sim = probe.result()
    rows = len(y) * (2 if cfg_scale > 1 else 1)
    mixed = 0
    for k in range(STEPS):
        for l in range(CFG.depth):
            for j, kind in enumerate(KINDS):
                compute = want[f"step.{k:02d}/block.{l:02d}/{kind}/compute"]
                np.testing.assert_array_equal(sim.computed[k, l, j], compute)
                mixed += 0 < compute.sum() < rows
                if k:                                                   # LazyDiT's score, the same bits
                    np.testing.assert_array_equal(sim.score[k, l, j],
                                                  want[f"step.{k:02d}/block.{l:02d}/{kind}/score"])
                    np.testing.assert_array_equal(sim.fresh[k, l, j], sim.computed[k - 1, l, j])
    assert mixed > 0, "the gates should make some batches split between computing and reusing rows"
    reused = ~sim.computed[1:]
    assert (sim.dy[1:][reused] > 0).all(), "a reused row is compared with its full computation, not itself"
    summary = sim.summary()
    for j, kind in enumerate(KINDS):
        assert summary[kind]["reused"]["n"] == reused[:, :, j].sum()
        assert summary[kind]["reused"]["n"] + summary[kind]["computed"]["n"] == summary[kind]["n"]


def test_a_lazy_run_that_computes_everything_records_the_plain_run(models):
    model = models["float64"]
    noise, y = tl.make_noise(model, 2, seed=4), np.array([2, 8])
    records = []
    for kw in ({}, {"decisions": np.ones((STEPS, CFG.depth, 2), bool)}):
        probe = Probe(model, STEPS)
        tl.ddim_sample(probe, noise, y, STEPS, 3.0, **kw)
        records.append(probe.result())
    for name in analysis.VALUES + analysis.FLAGS:
        np.testing.assert_array_equal(getattr(records[0], name), getattr(records[1], name))


def test_batches_add_rows_and_a_run_must_be_seen_from_its_start(models):
    model = models["float32"]
    noise, y = tl.make_noise(model, 3, seed=5), np.array([0, 1, 2])
    _, sim = analysis.analyse(model, noise, y, STEPS, 1.0, batch=2)
    _, whole = analysis.analyse(model, noise, y, STEPS, 1.0)
    assert sim.rows == 3
    np.testing.assert_allclose(sim.sim, whole.sim, rtol=1e-5)
    probe = Probe(model, STEPS)
    t = tl.create_diffusion(STEPS).timestep_map[2]
    with pytest.raises(ValueError, match="did not see start"):
        probe(noise, np.full(3, t), y)
    with pytest.raises(ValueError, match="no complete sampling run"):
        probe.result()


def test_lipschitz_fit_bounds_the_pairs_and_summary_says_where(models):
    model = models["float32"]
    noise, y = tl.make_noise(model, 4, seed=6), np.array([0, 1, 2, 3])
    _, sim = analysis.analyse(model, noise, y, STEPS, 3.0, gates=mixed_gates(model))
    fit = sim.lipschitz()
    for j, kind in enumerate(KINDS):
        for l in range(CFG.depth):
            dy, dz = sim.dy[1:, l, j], sim.dz[1:, l, j]
            assert (dy <= fit[kind]["C_max"][l] * dz * (1 + 1e-12)).all()
            assert np.mean(dy <= fit[kind]["C_q"][l] * dz * (1 + 1e-12)) >= 0.95
            assert fit[kind]["C_q"][l] <= fit[kind]["C_max"][l]
    rep = sim.report()
    s = rep["summary"]["attn"]
    assert s["min"] <= s["p5"] <= s["median"] <= 1 and s["n"] == (STEPS - 1) * CFG.depth * 8
    assert s["min"] == pytest.approx(np.nanmin(sim.sim[:, :, 0]))
    assert rep["gates"]["overall"]["n"] == (STEPS - 1) * CFG.depth * 2 * 8
    assert -1 <= rep["gates"]["overall"]["spearman"] <= 1
    json.dumps(analysis._json_ready(rep), allow_nan=False)
    assert analysis.analyse(model, noise, y, STEPS)[1].gate_correlation() is None


@pytest.mark.parametrize("chains", [False, True])
@pytest.mark.parametrize("per_sample", [True, False])
def test_oracle_decisions_fit_the_budget_and_run(models, per_sample, chains):
    model = models["float32"]
    noise, y = tl.make_noise(model, 3, seed=7), np.array([4, 5, 6])
    _, sim = analysis.analyse(model, noise, y, STEPS, 3.0, history=True)
    for k in range(1, STEPS):
        np.testing.assert_array_equal(sim.stale[k - 1, k], sim.sim[k])
    assert np.isfinite(sim.stale[np.triu_indices(STEPS, 1)]).all() and np.isnan(sim.stale[np.tril_indices(STEPS)]).all()
    macs = module_macs(CFG)
    cost = np.array([macs["attn"], macs["mlp"]])
    for ratio in (0.3, 0.5, 0.7):
        keep = oracle_decisions(sim, ratio, per_sample, chains)
        assert keep.shape == ((STEPS, CFG.depth, 2, 6) if per_sample else (STEPS, CFG.depth, 2))
        assert keep[0].all()
        k4 = keep if per_sample else keep[..., None]
        s = sim.sim if per_sample else np.concatenate([sim.sim[:1, ..., :1], sim.sim[1:].mean(-1, keepdims=True)])
        budget = ratio * STEPS * CFG.depth * cost.sum()
        for r in range(k4.shape[-1]):
            reused = ~k4[1:, ..., r]
            saved = (reused * cost).sum()
            assert budget - cost.max() < saved <= budget
            if not chains:                                  # the most similar, a prefix of the ranking
                assert s[1:, ..., r][reused].min() >= s[1:, ..., r][~reused].max()
        stats = tl.LazyStats()
        tl.ddim_sample(model, noise, y, STEPS, 3.0, decisions=keep, lazy_stats=stats)
        assert stats.skips.sum() == (~k4).sum() * (1 if per_sample else 6)
    with pytest.raises(ValueError, match="first step always computes"):
        oracle_decisions(sim, 0.9)
    probe = Probe(model, STEPS)
    tl.ddim_sample(probe, noise, y, STEPS, 3.0, decisions=keep)
    with pytest.raises(ValueError, match="full"):
        oracle_decisions(probe.result(), 0.5)


def test_the_chain_aware_oracle_avoids_a_reuse_of_a_reuse():
    """Every consecutive pair is alike (f = 0.99, steps 1 to 2 a little more), but a reuse across two
    steps is poor (f = 0.5): ranked by consecutive similarity the oracle reuses steps 2 and 1, so
    step 2 gets step 0's output; the chain-aware one reuses steps 2 and 4."""
    cfg = CFG.replace(depth=1)
    S = 5
    stale = np.full((S, S, 1, 2, 1), 0.9)
    stale[np.tril_indices(S)] = np.nan
    for k in range(1, S):
        stale[k - 1, k] = 0.99
    stale[1, 2], stale[0, 2], stale[1, 3], stale[2, 4] = 0.995, 0.5, 0.5, 0.5
    values = {name: np.full((S, 1, 2, 1), np.nan) for name in analysis.VALUES}
    values["sim"][1:] = np.stack([stale[k - 1, k] for k in range(1, S)])
    flags = {"computed": np.ones((S, 1, 2, 1), bool), "fresh": np.ones((S, 1, 2, 1), bool)}
    rec = analysis.Similarity(values, flags, np.zeros(1, bool), np.arange(S), cfg, stale=stale)
    ratio = 2 / S                                           # two reuses of each module
    naive = oracle_decisions(rec, ratio, chains=False)[:, 0, :, 0]
    aware = oracle_decisions(rec, ratio)[:, 0, :, 0]
    np.testing.assert_array_equal(np.flatnonzero(~naive[:, 0]), [1, 2])
    np.testing.assert_array_equal(np.flatnonzero(~aware[:, 0]), [2, 4])
    np.testing.assert_array_equal(aware[:, 0], aware[:, 1])


def test_reuse_damage_is_the_distance_of_the_final_latents(models):
    model = models["float64"]
    noise, y = tl.make_noise(model, 2, seed=8), np.array([3, 7])
    damage = analysis.reuse_damage(model, noise, y, STEPS, 3.0, batch=1)
    full = tl.ddim_sample(model, noise, y, STEPS, 3.0)
    keep = np.ones((STEPS, CFG.depth, 2), bool)
    keep[2] = False
    lazy = tl.ddim_sample(model, noise, y, STEPS, 3.0, decisions=keep)
    assert np.isnan(damage[0]) and (damage[1:] > 0).all()
    assert damage[2] == pytest.approx(np.linalg.norm(lazy - full) / np.linalg.norm(full), rel=1e-12)


# -- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    tl.save_dit(tl.DiT.from_config(CFG, seed=3, scheme="random", dtype="float32"), str(path))
    return str(path)


def run_main(argv, capsys):
    code = analysis.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "--steps must be an integer in 2..1000, got 1"),
    (["--num", "0"], "--num must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer in 0..18446744073709551615, got -1"),
    (["--cfg-scale", "0.5"], "--cfg-scale must be a finite number >= 1, got 0.5"),
    (["--threshold", "2"], "--threshold must be a finite number in [0, 1], got 2"),
    (["--out", "/nonexistent/dir/a"], "does not exist; create it first"),
    (["--json", "r.txt"], "unknown extension '.txt'; give a .json file"),
    (["--weights", "/nonexistent.safetensors", "--no-plots"], "no such file or folder, nor a bundled model"),
    (["--random", "DiT-Q/3", "--no-plots"], "unknown DiT configuration"),
    (["--random", "DiT-S/2", "--lazy", "--no-plots"], "--lazy with --random needs --gates"),
    (["--gates", "/nonexistent.safetensors", "--no-plots"], "--gates /nonexistent.safetensors: no such file"),
    (["--gates", "/dev/null", "--no-plots"], "--gates /dev/null is not a regular file"),
    (["--gates", "WEIGHTS", "--no-plots"], "--gates WEIGHTS: "),                        # not a gates file
    (["--no-gates", "--lazy"], "--no-gates contradicts"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = [weights if a == "WEIGHTS" else a for a in argv], message.replace("WEIGHTS", weights)
    if "--weights" not in argv and "--random" not in argv:
        argv = argv + ["--weights", weights]
    code, out, err = run_main(argv + (["--out", tmp_path / "a"] if "--out" not in argv else []), capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_is_exit_2_before_any_work(weights, tmp_path, capsys, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else real(name, *a))
    assert cli.main(["analyze", "--weights", weights, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err == "error: the figures (or pass --no-plots) needs matplotlib: pip install 'tinylazy[analysis]'\n"
    code, _, err = run_main(["--weights", weights, "--out", tmp_path / "a", "--num", 2, "--steps", 3,
                             "--no-plots"], capsys)
    assert code == 0 and os.listdir(tmp_path) == ["a.json"]


def test_the_command_writes_its_report_and_figures(weights, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tinylazy.lazy import gates_file, gates_hash, save_gates
    model = tl.load_dit(weights)
    save_gates(mixed_gates(model), gates_file(weights, STEPS))          # found beside the weights
    code, out, err = run_main(["--weights", weights, "--steps", STEPS, "--num", 3, "--out", tmp_path / "r",
                               "--damage"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["r-damage.png", "r-gates.png", "r-heatmap.png", "r-lipschitz.png", "r.json"]
    with open(tmp_path / "r.json") as f:
        rep = json.load(f)
    assert rep["run"]["gates"].endswith(f"gates-ddim{STEPS}.safetensors") and rep["rows"] == 6
    assert rep["run"]["gates_hash"] == gates_hash(mixed_gates(model))
    assert "| attn |" in out and "Spearman" in out
    assert rep["damage"]["by_step"][0] is None and all(d > 0 for d in rep["damage"]["by_step"][1:])
    for name in ("r-heatmap.png", "r-lipschitz.png", "r-gates.png", "r-damage.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_console_command_and_the_module_refuse_bad_input():
    for argv in (["-m", "tinylazy", "analyze"], ["-m", "tinylazy.analysis"]):
        r = subprocess.run([sys.executable, *argv, "--steps", "0"], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: --steps must") and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "tinylazy", "analyze", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: tinylazy analyze" in r.stdout
