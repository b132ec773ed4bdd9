"""Golden traces: the recorder, the trace file, and compare's reports (tinylazy.trace, tinylazy.golden)."""
import json
import os
import struct

import numpy as np
import pytest

import tinylazy as tl
from tinylazy import golden
from tinylazy.golden import compare, trace_forward, trace_sampling
from tinylazy.lazy import LazyGates, gates_file
from tinylazy.trace import OPS, Recorder, TraceError, kind_of, load_trace, position

THRESHOLD = 0.5
STEPS = 3


def small_model(seed=1, dtype="float64"):
    cfg = tl.get_config("tiny-dit-digits", depth=2, hidden_size=32, num_heads=2)
    return tl.DiT.from_config(cfg, seed=seed, scheme="random", dtype=dtype)


def random_gates(model, steps=STEPS, seed=0):
    """Gates whose scores spread around 0.5, so a run skips some modules and computes others."""
    g = LazyGates.zeros(model, steps)
    cfg = model.config
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(cfg.num_tokens * cfg.hidden_size)
    g.attn[:] = rng.normal(0.0, scale, g.attn.shape)
    g.mlp[:] = rng.normal(0.0, scale, g.mlp.shape)
    return g


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def full(model):
    return trace_sampling(model, steps=STEPS, seed=0, batch=2, cfg_scale=4.0)


@pytest.fixture(scope="module")
def lazy(model):
    return trace_sampling(model, steps=STEPS, seed=0, batch=2, cfg_scale=4.0, gates=random_gates(model))


# ----------------------------------------------------------------------------
# Recording

def test_recording_leaves_the_run_unchanged(model):
    noise, labels = tl.make_noise(model, 2, 0), tl.sample_labels(model, 2, 0)
    gates = random_gates(model)
    for kw in ({}, {"gates": gates}):
        plain = tl.ddim_sample(model, noise, labels, steps=STEPS, cfg_scale=4.0, **kw)
        trace = trace_sampling(model, steps=STEPS, seed=0, batch=2, cfg_scale=4.0, **kw)
        np.testing.assert_array_equal(trace["sample"], plain)
        assert model.recorder is None


def test_names_order_and_ops(full, lazy, model):
    names = full.names
    assert names[:4] == ["noise", "labels", "step.00/input/x", "step.00/input/t"]
    assert names[-1] == "sample"
    block = [n[len("step.01/block.01/"):] for n in names if n.startswith("step.01/block.01/")]
    assert block == [f"mod/{m}" for m in ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp",
                                           "gate_mlp")] + [
        "attn/norm", "attn/z", "attn/q", "attn/k", "attn/v", "attn/o", "attn/out", "attn/residual",
        "mlp/norm", "mlp/z", "mlp/hidden", "mlp/act", "mlp/out", "mlp/residual"]
    assert names.index("step.00/final/out") < names.index("step.00/cfg/eps") < names.index("step.00/x_next") \
        < names.index("step.01/input/x")
    for trace in (full, lazy):
        assert all(kind_of(n) in OPS for n in trace.names)
        assert set(trace.meta["ops"]) == {kind_of(n) for n in trace.names}
    D, T = model.config.hidden_size, model.config.num_tokens
    assert full["step.00/block.00/attn/q"].shape == (4, T, D)                 # guidance: 2B rows
    assert full["step.00/cfg/eps"].shape == (2, 2, 16, 16)                    # guide_channels 3 > out 2
    assert lazy["step.00/block.00/attn/compute"].tolist() == [True] * 4       # first step computes
    assert "step.00/block.00/attn/score" not in lazy and "step.01/block.00/attn/score" in lazy
    compute = [lazy[n] for n in lazy.names if n.endswith("/compute")]
    assert 0 < sum(int(c.sum()) for c in compute) < sum(c.size for c in compute)   # the run skips some


def test_lazy_internals_have_the_computing_rows(lazy):
    for name in lazy.names:
        if name.endswith("/compute") and not name.startswith("step.00"):
            keep = lazy[name]
            inner = name.replace("compute", "q" if "/attn/" in name else "hidden")
            assert (inner in lazy) == bool(keep.any())
            if keep.any():
                assert lazy[inner].shape[0] == keep.sum()
            assert lazy[name.replace("compute", "out")].shape[0] == keep.size


def test_forward_trace_matches_the_pieces(model):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 1, 16, 16))
    t, y = np.array([999, 500, 3]), np.array([1, 7, 10])
    trace = trace_forward(model, x, t, y, recorder=Recorder(attn_probs=True))
    np.testing.assert_array_equal(trace["final/out"], model(x, t, y))
    z = trace["block.01/mlp/z"]
    np.testing.assert_array_equal(trace["block.01/mlp/out"], model.mlp(1, z))
    probs = trace["block.00/attn/probs"]
    assert probs.shape == (3, 2, 64, 64)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    o = np.einsum("bhts,bshd->bthd", probs, trace["block.00/attn/v"].reshape(3, 64, 2, 16)).reshape(3, 64, 32)
    np.testing.assert_allclose(trace["block.00/attn/o"], o, rtol=1e-10, atol=1e-12)


def test_include_exclude_and_duplicates(model):
    rec = Recorder(include=["step.00/*"], exclude=["*/attn/*"])
    trace = trace_sampling(model, steps=2, recorder=rec)
    assert trace.names and all(n.startswith("step.00/") and "/attn/" not in n for n in trace.names)
    rec = Recorder()
    rec("a", np.zeros(2))
    with pytest.raises(TraceError, match="recorded twice"):
        rec("a", np.zeros(2))


# ----------------------------------------------------------------------------
# The file

def test_save_load_roundtrip_and_strided_storage(full, tmp_path):
    path = full.save(tmp_path / "t.safetensors")
    back = load_trace(path)
    assert back.names == full.names and back.meta == full.meta
    for n in full.names:
        np.testing.assert_array_equal(back.arrays[n], full.arrays[n])
        assert back.arrays[n].dtype == full.arrays[n].dtype
    small = Recorder(max_elements=50)
    small("a", np.arange(4 * 64 * 32, dtype=np.float64).reshape(4, 64, 32))
    e = small.entries["a"]
    assert e["shape"] == [4, 64, 32] and e["stride"] == 165                   # ceil(8192/50) = 164, made odd
    assert np.array_equal(small.arrays["a"], np.arange(0, 8192, 165))
    strided = trace_sampling(small_model(), steps=STEPS, cfg_scale=4.0, recorder=Recorder(max_elements=100))
    assert compare(full, strided).passed and compare(strided, full).passed


def test_file_layout_is_plain_safetensors(full, tmp_path):
    """What docs/golden.md tells a C or Kotlin reader: u64 header length, JSON header, raw little-endian data."""
    raw = open(full.save(tmp_path / "t.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    manifest = json.loads(header["__metadata__"]["manifest"])
    assert manifest["format"] == "tinylazy-trace" and manifest["format_version"] == 1
    assert [e["name"] for e in manifest["tensors"]] == full.names
    e = header["step.00/block.01/mlp/out"]
    begin, end = e["data_offsets"]
    values = np.frombuffer(raw[8 + n + begin: 8 + n + end], "<f8").reshape(e["shape"])
    np.testing.assert_array_equal(values, full["step.00/block.01/mlp/out"])
    assert header["step.00/input/t"]["dtype"] == "I64"


def _write(path, raw):
    with open(path, "wb") as f:
        f.write(raw)
    return str(path)


def _with_manifest(full, tmp_path, edit, name):
    raw = open(full.save(tmp_path / "ok.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["manifest"] = edit(header["__metadata__"]["manifest"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return _write(tmp_path / f"{name}.safetensors", struct.pack("<Q", len(head)) + head + raw[8 + n:])


def test_truncated_and_malformed_files_give_clear_errors(full, tmp_path):
    raw = open(full.save(tmp_path / "ok.safetensors"), "rb").read()
    cases = {
        "truncated": (_write(tmp_path / "cut.safetensors", raw[: len(raw) // 2]), "truncated"),
        "tiny": (_write(tmp_path / "tiny.safetensors", raw[:5]), "shorter than the 8-byte header"),
        "garbage": (_write(tmp_path / "junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
                    "not valid JSON"),
        "missing": (str(tmp_path / "nope.safetensors"), "no such file"),
        "bad json": (_with_manifest(full, tmp_path, lambda m: m[:-3], "json"), "the trace manifest: not valid JSON"),
        "version": (_with_manifest(full, tmp_path, lambda m: m.replace('"format_version":1', '"format_version":9'),
                                   "v9"), "format version 9"),
        "unlisted": (_with_manifest(full, tmp_path, lambda m: m.replace('"name":"sample"', '"name":"samples"'),
                                    "names"),
                     "manifest and tensors disagree"),
        "entry": (_with_manifest(full, tmp_path, lambda m: m.replace('"stride":1', '"stride":0', 1), "stride"),
                  "entry 0 is malformed"),
    }
    for what, (path, message) in cases.items():
        with pytest.raises(TraceError, match=message):
            load_trace(path)
    weights = tmp_path / "model.safetensors"
    tl.save_dit(small_model(), weights)
    with pytest.raises(TraceError, match="without a trace manifest"):
        load_trace(weights)
    assert golden.main(["compare", cases["truncated"][0], str(tmp_path / "ok.safetensors")]) == 2


def _edit_manifest(edit):
    def apply(text):
        m = json.loads(text)
        edit(m)
        return json.dumps(m, separators=(",", ":"))
    return apply


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(sampler=[4]), "manifest field sampler is a list of 1 items, expected dict"),
    (lambda m: m["sampler"].update(steps=[4]), "sampler.steps is a list of 1 items, expected an integer in 1..1000"),
    (lambda m: m["sampler"].update(steps=10 ** 6), "sampler.steps is 1000000"),
    (lambda m: m["sampler"].update(labels=["x"]), "sampler.labels is a list of 1 items, expected a list of integers"),
    (lambda m: m["sampler"].update(cfg_scale=True), "sampler.cfg_scale is True"),
    (lambda m: m.update(kind="backward"), "field kind is 'backward'"),
    (lambda m: m.update(model="tiny"), "field model is 'tiny', expected dict"),
    (lambda m: m["model"].update(config={"depth": {"a": 1}}), "model.config.depth is a dict"),
    (lambda m: m.update(lazy={"threshold": "0.5"}), "lazy.threshold is '0.5'"),
    (lambda m: m.update(seed=1.5), "field seed is 1.5"),
    (lambda m: m.update(recorded={"include": "*"}), "recorded.include is '\\*'"),
    (lambda m: m["tensors"][0].update(shape=[1 << 40] * 2), "entry 0 is malformed"),
    (lambda m: m["tensors"][0].update(stride=10 ** 30), "entry 0 is malformed"),
])
def test_a_manifest_that_cannot_be_compared_is_a_trace_error(full, tmp_path, capsys, edit, message):
    """golden compare on a malformed manifest printed a traceback and exited 1 ("diverged")."""
    path = _with_manifest(full, tmp_path, _edit_manifest(edit), "bad")
    with pytest.raises(TraceError, match=message):
        load_trace(path)
    full.save(tmp_path / "ok.safetensors")
    capsys.readouterr()
    assert golden.main(["compare", path, str(tmp_path / "ok.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_deeply_nested_manifest_is_a_trace_error(full, tmp_path):
    path = _with_manifest(full, tmp_path, lambda m: m[:-1] + ',"x":' + "[" * 100000 + "]" * 100000 + "}", "deep")
    with pytest.raises(TraceError, match="the trace manifest: JSON nested too deeply"):
        load_trace(path)


# ----------------------------------------------------------------------------
# Compare

def test_perturbed_mlp_output_is_the_first_divergence(model, full, monkeypatch, tmp_path, capsys):
    """One element of block 1's MLP output at step 1, nudged by 1% of the tensor's largest value."""
    mlp, calls = type(model).mlp, []

    def nudged(self, l, z, cache=None):
        out = mlp(self, l, z, cache)
        calls.append(l)
        if l == 1 and len(calls) == 2 * 2:              # step 1 (two blocks per forward)
            out = out.copy()
            out[3, 17, 5] += 1e-2 * np.abs(out).max()
        return out
    monkeypatch.setattr(type(model), "mlp", nudged)
    other = trace_sampling(model, steps=STEPS, seed=0, batch=2, cfg_scale=4.0)
    monkeypatch.undo()
    result = compare(full, other)
    assert not result.passed and not result.decisions
    first = result.first
    assert first.name == "step.01/block.01/mlp/out" and first.where == (3, 17, 5)
    assert position(first.name) == (1, 1) and first.n_bad == 1
    assert all(r.status == "ok" for r in result.results[: result.results.index(first)])
    full.save(tmp_path / "ref.safetensors")
    other.save(tmp_path / "other.safetensors")
    assert golden.main(["compare", str(tmp_path / "ref.safetensors"), str(tmp_path / "other.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "FIRST DIVERGENCE  step.01/block.01/mlp/out  (step 1, layer 1)" in out and "at [3, 17, 5]" in out
    assert "FAIL: " in out and "mlp/out" in out.split("FIRST DIVERGENCE")[1]


def test_flipped_gate_decision_is_reported_with_its_margin(model, lazy):
    gates = random_gates(model)
    flip = (1, 1, "mlp", 2)                              # step 1, layer 1, MLP, row 2

    def decide(k, l, kind, scores):
        keep = scores >= THRESHOLD
        if (k, l, kind) == flip[:3]:
            keep = keep.copy()
            keep[flip[3]] = not keep[flip[3]]
        return keep
    other = trace_sampling(model, steps=STEPS, seed=0, batch=2, cfg_scale=4.0, gates=gates, decisions=decide)
    result = compare(lazy, other)
    assert not result.passed
    (d,) = result.decisions
    assert (d.name, d.row) == ("step.01/block.01/mlp/compute", 2)
    score = float(lazy["step.01/block.01/mlp/score"][2])
    assert d.ref_compute == (score >= THRESHOLD) != d.other_compute
    assert d.margin == pytest.approx(score - THRESHOLD) and d.ref_score == d.other_score == score
    assert result.first is not None and position(result.first.name) >= (1, 1)
    report = result.format()
    assert "GATE DECISIONS: 1 mismatch" in report and "step.01/block.01/mlp/compute row 2" in report
    assert f"{score - THRESHOLD:+.3e}" in report and "gate decisions differ" in report


def test_other_model_or_seed_is_refused(model, full, tmp_path, capsys):
    cases = [(small_model(seed=2), dict(seed=0), "different models"),
             (model, dict(seed=1), "different seeds"),
             (model, dict(seed=0, labels=[3, 4]), "'labels' differs"),
             (model, dict(seed=0, steps=2), "'steps' differs")]
    for m, kw, message in cases:
        kw = dict(dict(steps=STEPS, batch=2, cfg_scale=4.0), **kw)
        with pytest.raises(TraceError, match=message):
            compare(full, trace_sampling(m, recorder=Recorder(include=["sample"]), **kw))
    with pytest.raises(TraceError, match="REF is a full run, OTHER a lazy run"):
        compare(full, trace_sampling(model, steps=STEPS, cfg_scale=4.0, gates=random_gates(model),
                                     recorder=Recorder(include=["sample"])))
    full.save(tmp_path / "ref.safetensors")
    trace_sampling(model, steps=STEPS, seed=7, cfg_scale=4.0,
                   recorder=Recorder(include=["sample"])).save(tmp_path / "seed7.safetensors")
    assert golden.main(["compare", str(tmp_path / "ref.safetensors"), str(tmp_path / "seed7.safetensors")]) == 2
    assert "refusing to compare" in capsys.readouterr().err


def test_partial_trace_and_require_all(model, full):
    partial = trace_sampling(model, steps=STEPS, cfg_scale=4.0,
                             recorder=Recorder(include=["*/residual", "*/x_next", "sample"]))
    result = compare(full, partial)
    assert result.passed and len(result.missing) == len(full) - len(partial)
    assert "OTHER did not record" in result.format() and "PASS" in result.format()
    strict = compare(full, partial, require_all=True)
    assert not strict.passed and strict.first.name == "noise"
    with pytest.raises(TraceError, match="no tensors in common"):
        compare(full, trace_sampling(model, steps=STEPS, cfg_scale=4.0, recorder=Recorder(include=["nothing"])))


def test_per_tensor_tolerances(model, full, tmp_path):
    other = load_trace(full.save(tmp_path / "o.safetensors"))
    other.arrays["step.02/block.00/attn/k"] = other.arrays["step.02/block.00/attn/k"] * (1 + 1e-3)
    assert compare(full, other).first.name == "step.02/block.00/attn/k"
    rules = tmp_path / "tol.json"
    rules.write_text(json.dumps({"*/attn/k": {"rtol": 2e-3}, "*": {"rtol": 1e-9}}))
    assert compare(full, other, tolerances=golden.load_tolerances(rules)).passed
    rules.write_text(json.dumps({"*": {"rtol": 1e-9}, "*/attn/k": {"rtol": 2e-3}}))     # the first match wins
    assert compare(full, other, tolerances=golden.load_tolerances(rules)).first.name == "step.02/block.00/attn/k"
    rules.write_text(json.dumps({"step.02/block.00/attn/k": "skip"}))
    result = compare(full, other, tolerances=golden.load_tolerances(rules))
    assert result.passed and "1 skipped" in result.format()
    for bad, message in (("[1, 2]", "JSON object"), ('{"*": {"rtol": -1}}', "numbers >= 0"), ("{", "not valid JSON")):
        rules.write_text(bad)
        with pytest.raises(TraceError, match=message):
            golden.load_tolerances(rules)


def test_nan_and_integer_mismatches(full, tmp_path):
    other = load_trace(full.save(tmp_path / "o.safetensors"))
    other.arrays["step.01/x0"] = other.arrays["step.01/x0"].copy()
    other.arrays["step.01/x0"][1, 0, 2, 3] = np.nan
    other.arrays["step.00/input/t"] = other.arrays["step.00/input/t"] - 1
    result = compare(full, other)
    assert result.first.name == "step.00/input/t" and result.first.reason == "exact"
    nan = next(r for r in result.failures if r.name == "step.01/x0")
    assert nan.reason == "nonfinite" and nan.where == (1, 0, 2, 3)


def test_eps_tolerance_scales_with_its_conditioning(full):
    factors = golden.eps_rtol_factors(full.meta)
    assert factors["step.00/eps"] == 1.0 and factors[f"step.{STEPS - 1:02d}/eps"] == pytest.approx(100, rel=1e-3)


def test_float32_against_float64_passes_and_a_perturbed_layer_is_found(model, full):
    """The defaults on a random model (the bundled one is checked in test_bundled_*)."""
    f32 = trace_sampling(small_model(dtype="float32"), steps=STEPS, cfg_scale=4.0)
    assert compare(f32, full).passed
    _assert_perturbations_found(small_model, f32, STEPS, dict(cfg_scale=4.0))


def _assert_perturbations_found(make_model, ref, steps, kw, layers=(0, 1)):
    """Each layer's weight and bias times (1 + 1e-3), in a model that keeps the file's weights hash
    (a backend that loaded the right file and got one layer wrong): the first divergence is that
    layer's first output, at the first step."""
    a, b = layers
    expect = {f"blocks.{a}.attn.qkv": f"step.00/block.{a:02d}/attn/q",
              f"blocks.{b}.attn.proj": f"step.00/block.{b:02d}/attn/out",
              f"blocks.{a}.mlp.fc1": f"step.00/block.{a:02d}/mlp/hidden",
              f"blocks.{b}.mlp.fc2": f"step.00/block.{b:02d}/mlp/out",
              f"blocks.{b}.adaLN_modulation.1": f"step.00/block.{b:02d}/mod/",
              "final_layer.linear": "step.00/final/tokens", "t_embedder.mlp.2": "step.00/cond/t_emb"}
    for layer, first in expect.items():
        m = make_model(dtype="float64")
        m.weights_hash = ref.meta["model"]["weights_hash"]
        for suffix in (".weight", ".bias"):
            m.params[layer + suffix] *= 1 + 1e-3
        result = compare(ref, trace_sampling(m, steps=steps, **kw))
        assert result.first is not None and result.first.name.startswith(first), (layer, result.first)


def test_opencl_dump_records_the_same_names(model, full, tmp_path):
    from tinylazy import opencl
    if not opencl.available():
        pytest.skip("no OpenCL device")
    weights = tmp_path / "m.safetensors"
    tl.save_dit(small_model(dtype="float32"), weights)
    ref = trace_sampling(tl.load_dit(weights), steps=STEPS, cfg_scale=4.0, gates=random_gates(model))
    save_gates = tmp_path / "g.safetensors"
    tl.save_gates(random_gates(model), save_gates)
    out = tmp_path / "cl.safetensors"
    assert golden.main(["dump", "--weights", str(weights), "--gates", str(save_gates), "--backend", "opencl",
                        "--steps", str(STEPS), "--out", str(out)]) == 0
    other = load_trace(out)
    assert other.meta["backend"] == "opencl" and set(other.names) < set(ref.names)
    assert {kind_of(n) for n in set(ref.names) - set(other.names)} == {"cond/y_emb", "attn/norm", "mlp/norm",
                                                                       "mlp/hidden", "final/norm"}
    result = compare(ref, other)
    assert result.passed, result.format()


def test_cli_dump_and_compare(tmp_path, capsys):
    weights = tmp_path / "m.safetensors"
    tl.save_dit(small_model(dtype="float32"), weights)
    paths = {}
    for dtype in ("float32", "float64"):
        paths[dtype] = str(tmp_path / f"{dtype}.safetensors")
        assert golden.main(["dump", "--weights", str(weights), "--dtype", dtype, "--steps", "2", "--batch", "1",
                            "--classes", "3", "--max-elements", "500", "--out", paths[dtype]]) == 0
    assert "wrote" in capsys.readouterr().out
    assert golden.main(["compare", paths["float32"], paths["float64"]]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "worst rms err" in out
    assert load_trace(paths["float64"]).meta["sampler"]["labels"] == [3]
    assert golden.main(["dump", "--weights", str(tmp_path / "none.safetensors"), "--out", paths["float32"]]) == 2


def test_vae_image_is_recorded(model):
    from tinylazy.vae import AutoencoderKL, VAEConfig
    vae = AutoencoderKL.from_config(VAEConfig(latent_channels=1, block_out_channels=(32, 32), layers_per_block=1),
                                    dtype="float64")
    trace = trace_sampling(model, steps=2, cfg_scale=4.0, vae=vae)
    assert trace.names[-2:] == ["sample", "image"] and trace.meta["vae"] == {"scaling_factor": 0.18215}
    np.testing.assert_array_equal(trace["image"], vae.decode(trace["sample"] / 0.18215))
    assert trace["image"].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------
# The bundled model and the checked-in goldens

BUNDLED = tl.resources.weights_path(tl.resources.DEFAULT_MODEL)
GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
BUNDLED_GATES = gates_file(BUNDLED, golden.LAZY_GOLDEN_STEPS)
HAVE_WEIGHTS = os.path.exists(BUNDLED)
HAVE_GATES = HAVE_WEIGHTS and os.path.exists(BUNDLED_GATES)
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="the bundled weights/tiny-dit-digits is not there")


def _needs(mode):
    ok = HAVE_GATES if mode == "lazy" else HAVE_WEIGHTS
    return pytest.mark.skipif(not ok, reason=f"the bundled weights{' and gates' if mode == 'lazy' else ''} "
                                             f"are not there")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n.split(".")[0])) for n in golden.GOLDENS])
def test_checked_in_golden_regenerates(name):
    """Run each golden's run again and compare: float64 to 1e-9 of each tensor's scale (BLAS
    summation order may differ between machines), float32 at the defaults."""
    path = golden.golden_path(name, GOLDEN_DIR)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: write the goldens with `python -m tinylazy.golden goldens` and commit them")
    ref = load_trace(path)
    other = golden.rerun(ref, BUNDLED, gates=BUNDLED_GATES if ref.meta["lazy"] else None)
    tight = ref.meta["dtype"] == "float64"
    tol = dict(rtol=1e-9, max_rtol=1e-9, atol=0.0) if tight else {}
    result = compare(ref, other, require_all=True, **tol)
    assert result.passed, result.format()


@pytest.mark.parametrize("mode", [pytest.param(m, marks=_needs(m)) for m in ("full", "lazy")])
def test_checked_in_float32_golden_matches_float64_at_the_defaults(mode):
    if not os.path.exists(golden.golden_path(f"{mode}.float32", GOLDEN_DIR)):
        pytest.fail("the goldens are missing: write them with `python -m tinylazy.golden goldens` and commit them")
    result = compare(*(golden.golden_path(f"{mode}.{dtype}", GOLDEN_DIR) for dtype in ("float32", "float64")))
    assert result.passed, result.format()


@needs_weights
def test_bundled_float32_vs_float64_defaults_pass_and_catch_a_perturbed_layer():
    load = lambda dtype: tl.load_dit(BUNDLED, dtype=dtype)
    kw = dict(cfg_scale=4.0)
    f32 = trace_sampling(load("float32"), steps=4, **kw)
    result = compare(f32, trace_sampling(load("float64"), steps=4, **kw))
    assert result.passed, result.format()
    depth = f32.meta["model"]["config"]["depth"]
    _assert_perturbations_found(load, f32, 4, kw, layers=(2, depth - 1))
