"""The PyTorch-checkpoint converter: real torch.save files, hand-made archives, hostile pickles."""
import argparse
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tinylazy as tl
from tinylazy.convert import ConvertError, convert, main
from tinylazy.io import SafetensorsFile, load_dit, read_safetensors, write_safetensors

from conftest import rel_err
from fuzz_cases import _g, _i, _s, _tup, dict_op as _dict, tensor_op as _tensor

SMALL = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def small_params(seed=0):
    return {k: v.astype(np.float32) for k, v in tl.init_params(SMALL, seed=seed, scheme="random").items()}


# ----------------------------------------------------------------------------
# Hand-made torch.save archives (the pickle assembler is fuzz_cases.py's), no torch needed

def _nested(depth):
    """A pickled dict nested ``depth`` deep: {"w": {"w": ... 1}}."""
    return b"}(" + _s("w") + (_nested(depth - 1) if depth else _i(1)) + b"u"


def write_archive(path, pickle_bytes, storages=(), byteorder="little"):
    """A zip laid out as torch.save lays it out: archive/data.pkl, archive/byteorder, archive/data/<key>."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", byteorder)
        for key, data in dict(storages).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def handmade_state_dict(path, params):
    """An archive holding ``params`` (float32, contiguous) as a plain state dict, one storage each."""
    items, storages = [], {}
    for n, (k, v) in enumerate(params.items()):
        stride = [int(np.prod(v.shape[i + 1:])) for i in range(v.ndim)]
        items.append((k, _tensor(str(n), v.size, 0, v.shape, stride)))
        storages[str(n)] = np.ascontiguousarray(v, "<f4").tobytes()
    return write_archive(path, b"\x80\x02" + _dict(items) + b".", storages)


def test_handmade_views_and_shared_storage(tmp_path):
    base = np.arange(24, dtype="<f4")
    body = _dict([
        ("whole", _tensor("0", 24, 0, (4, 6), (6, 1))),
        ("transposed", _tensor("0", 24, 0, (6, 4), (1, 6))),
        ("sliced", _tensor("0", 24, 7, (2, 3), (6, 2))),
        ("half", _tensor("1", 3, 0, (3,), (1,), "HalfStorage")),
        ("bf16", _tensor("2", 2, 0, (2,), (1,), "BFloat16Storage")),
        ("ints", _tensor("3", 2, 0, (2,), (1,), "LongStorage")),
    ])
    bf_bits = np.array([0x3FC0, 0xC2F7], "<u2")                      # 1.5, -123.5
    src = write_archive(tmp_path / "h.pt", b"\x80\x02" + body + b".",
                        {"0": base.tobytes(), "1": np.array([1, -2, 0.5], "<f2").tobytes(),
                         "2": bf_bits.tobytes(), "3": np.array([1, 2], "<i8").tobytes()})
    used, names, skipped = convert(src, tmp_path / "h.safetensors", progress=False)
    assert used is None and skipped == {"ints": "I64 tensor"}
    got, meta = read_safetensors(tmp_path / "h.safetensors")
    m = base.reshape(4, 6)
    assert np.array_equal(got["whole"], m) and np.array_equal(got["transposed"], m.T)
    assert np.array_equal(got["sliced"], m[1:3, 1::2])
    assert np.array_equal(got["half"], [1, -2, 0.5]) and np.array_equal(got["bf16"], [1.5, -123.5])
    assert meta == {"source": "h.pt", "key": "", "converter": "tinylazy.convert"}


def test_big_endian_archive(tmp_path):
    src = write_archive(tmp_path / "be.pt", b"\x80\x02" + _dict([("w", _tensor("0", 3, 0, (3,), (1,)))]) + b".",
                        {"0": np.array([1.5, -2, 3], ">f4").tobytes()}, byteorder="big")
    convert(src, tmp_path / "be.safetensors", progress=False)
    assert np.array_equal(read_safetensors(tmp_path / "be.safetensors")[0]["w"], [1.5, -2, 3])


@pytest.mark.parametrize("body, storages, match", [
    (_dict([("w", _tensor("0", 6, 4, (2, 2), (2, 1)))]), {"0": bytes(24)}, "runs past its storage of 6 elements"),
    (_dict([("w", _tensor("0", 6, 0, (6,), (1,)))]), {"0": bytes(20)}, "archive/data/0 has 20 bytes, expected 24"),
    (_dict([("w", _tensor("0", 6, 0, (6,), (1,)))]), {}, "archive has no archive/data/0"),
    (_dict([("w", _tensor("0", 6, 0, (2, 3), (3,)))]), {"0": bytes(24)}, "bad tensor geometry"),
    (_dict([("w", _tensor("0", 6, 0, (6,), (1,)) + b"}" + b"b")]), {"0": bytes(24)}, "BUILD on a tensor"),
    (_dict([("w", _i(3))]), {}, "no float tensors"),
])
def test_malformed_archives(tmp_path, body, storages, match):
    src = write_archive(tmp_path / "bad.pt", b"\x80\x02" + body + b".", storages)
    with pytest.raises(ConvertError, match=match) as e:
        convert(src, tmp_path / "out.safetensors", progress=False)
    assert str(src) in str(e.value) and not (tmp_path / "out.safetensors").exists()


def test_the_output_is_never_the_checkpoint_and_never_an_existing_file(tmp_path):
    src = handmade_state_dict(tmp_path / "m.pt", {"w": np.arange(3, dtype=np.float32)})
    before = src.read_bytes()
    for dst in (src, tmp_path / "." / "m.pt"):
        with pytest.raises(ConvertError, match="the output is the checkpoint itself"):
            convert(src, dst, progress=False, overwrite=True)
    assert src.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="o.safetensors: exists"):
        convert(src, out, progress=False)
    assert out.read_bytes() == b"keep me"
    convert(src, out, progress=False, overwrite=True)
    assert np.array_equal(read_safetensors(out)[0]["w"], [0, 1, 2])


@pytest.mark.parametrize("body, storages, match", [
    (_dict([("w", _tensor("0", 1, 0, (1 << 28,), (0,)))]), {"0": bytes(4)}, "visits storage elements more than once"),
    (_dict([("w", _tensor("0", 4, 0, (2, 2), (1, 1)))]), {"0": bytes(16)}, "visits storage elements more than once"),
    (_dict([(f"w{i}", _tensor("0", 1 << 14, 0, (1 << 14,), (1,))) for i in range(6)]), {"0": bytes(1 << 16)},
     "hold 98304 elements but view storages of only 16384"),
    (_dict([("a", _dict([("b", _tensor("0", 1, 0, (1,), (1,)))])), ("a.b", _tensor("0", 1, 0, (1,), (1,)))]),
     {"0": bytes(4)}, "two entries flatten to the name 'a.b'"),
    (_nested(40), {}, "dicts nested more than 32 deep"),
    (b"}(" + _tup(_i(1)) + _tensor("0", 1, 0, (1,), (1,)) + b"u", {"0": bytes(4)}, "is not a string or an integer"),
    (b"Nr\xff\xff\xff\x00", {}, "memo index 16777215 at opcode 2"),
])
def test_what_a_checkpoint_may_cost_is_bounded(tmp_path, body, storages, match):
    src = write_archive(tmp_path / "bad.pt", b"\x80\x02" + body + b".", storages)
    with pytest.raises(ConvertError, match=match):
        convert(src, tmp_path / "out.safetensors", progress=False)
    assert os.listdir(tmp_path) == ["bad.pt"]


def test_compressed_members_and_byteorder(tmp_path):
    pkl = b"\x80\x02" + _dict([("w", _tensor("0", 1 << 25, 0, (1 << 25,), (1,)))]) + b"."
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as z:   # 128 MiB of zeros, ~130 kB
        z.writestr("archive/data.pkl", pkl)
        with z.open("archive/data/0", "w") as f:
            for _ in range(128):
                f.write(bytes(1 << 20))
    with pytest.raises(ConvertError, match="would inflate to 134217728 bytes"):
        convert(tmp_path / "bomb.pt", tmp_path / "o.safetensors", progress=False)
    with zipfile.ZipFile(tmp_path / "pkl.pt", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + b"}" * (2 << 20) + b".")
    with pytest.raises(ConvertError, match="data.pkl has 2097155 bytes, more than the 1048576-byte limit"):
        convert(tmp_path / "pkl.pt", tmp_path / "o.safetensors", progress=False)
    src = tmp_path / "bo.pt"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"\xff\xfe")
    with pytest.raises(ConvertError, match="unknown byteorder"):
        convert(src, tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_only_regular_zip_files_with_a_bounded_directory(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(ConvertError, match="is a FIFO, not a regular file"):
        convert(tmp_path / "fifo.pt", tmp_path / "o.safetensors", progress=False)
    with zipfile.ZipFile(tmp_path / "many.pt", "w") as z:
        for i in range(6000):
            z.writestr(f"{i}", b"")
    with pytest.raises(ConvertError, match="6000 zip entries, more than the 4"):
        convert(tmp_path / "many.pt", tmp_path / "o.safetensors", progress=False)


def test_not_a_zip(tmp_path):
    p = tmp_path / "legacy.pt"
    p.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ConvertError, match="not a zip checkpoint"):
        convert(p, tmp_path / "o.safetensors")
    assert main([str(p), str(tmp_path / "o.safetensors")]) == 2                 # a bad input file


# ----------------------------------------------------------------------------
# Hostile pickles: refused by name, and their code never runs

class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    import builtins
    import subprocess as sp
    touch = f"open({str(marker)!r}, 'w').close()"
    # (payload, the global named in the refusal: protocol 2 writes Python 2 names where they differ)
    return {
        "os.system": (_Evil(os.system, (f"touch {marker}",)), "(posix|os).system"),
        "builtins.eval": (_Evil(builtins.eval, (touch,)), "(__builtin__|builtins).eval"),
        "builtins.exec": (_Evil(builtins.exec, (touch,)), "(__builtin__|builtins).exec"),
        "subprocess.call": (_Evil(sp.call, (["touch", str(marker)],)), "(commands|subprocess).call"),
        "subprocess.Popen": (_Evil(sp.Popen, (["touch", str(marker)],)), "(commands|subprocess).Popen"),
    }


def _hostile(kind, where, marker):
    evil, qualname = _payloads(marker)[kind]
    if where == "top":
        return pickle.dumps(evil, protocol=2), qualname
    if where == "in_state_dict":
        return pickle.dumps({"model": {"w": evil}}, protocol=2), qualname
    if where == "in_args_namespace":                          # the placeholder must not open a hole
        return pickle.dumps({"model": {}, "args": argparse.Namespace(lr=evil)}, protocol=2), qualname
    return pickle.dumps({"ema": evil}, protocol=4), qualname   # STACK_GLOBAL instead of GLOBAL


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call", "subprocess.Popen"])
@pytest.mark.parametrize("where", ["top", "in_state_dict", "in_args_namespace", "protocol4"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, kind, where):
    marker = tmp_path / "pwned"
    payload, qualname = _hostile(kind, where, marker)
    src = write_archive(tmp_path / "evil.pt", payload)
    with pytest.raises(ConvertError, match=f"refused global '{qualname}'"):
        convert(src, tmp_path / "out.safetensors", progress=False)
    assert main([str(src), str(tmp_path / "out.safetensors")]) == 2
    # The payload is live: a plain unpickler, in a child process, does run it.
    live = tmp_path / "live"
    (tmp_path / "live.pkl").write_bytes(_hostile(kind, where, live)[0])
    code = "import pickle, sys; r = pickle.loads(open(sys.argv[1], 'rb').read()); getattr(r, 'wait', int)()"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "live.pkl")], capture_output=True)
    assert live.exists()
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_protocol0_inst_opcode_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."     # INST os.system
    src = write_archive(tmp_path / "evil.pt", payload)
    with pytest.raises(ConvertError, match="refused global 'os.system'"):
        convert(src, tmp_path / "o.safetensors", progress=False)
    assert not marker.exists()


def test_other_harmless_globals_are_refused_too(tmp_path):
    import datetime
    src = write_archive(tmp_path / "d.pt", pickle.dumps({"model": {}, "when": datetime.date(2025, 1, 1)}, protocol=2))
    with pytest.raises(ConvertError, match="refused global 'datetime.date'"):
        convert(src, tmp_path / "o.safetensors", progress=False)


def test_args_namespace_is_a_discarded_placeholder(tmp_path):
    args = pickle.dumps(argparse.Namespace(lr=0.1, model="DiT-XL/2"), protocol=2)[2:-1]   # without PROTO/STOP
    w = _tensor("0", 2, 0, (2,), (1,))
    data = {"0": np.array([1, 2], "<f4").tobytes()}
    src = write_archive(tmp_path / "t.pt", b"\x80\x02" + _dict([("model", _dict([("w", w)])), ("args", args)]) + b".", data)
    assert convert(src, tmp_path / "o.safetensors", progress=False) == ("model", ["w"], {})
    with pytest.raises(ConvertError, match="no dict under key 'args'; top-level keys: model, args"):
        convert(src, tmp_path / "o2.safetensors", key="args", progress=False)
    flat = write_archive(tmp_path / "f.pt", b"\x80\x02" + _dict([("w", w), ("args", args)]) + b".", data)
    assert convert(flat, tmp_path / "o3.safetensors", progress=False) == (None, ["w"], {"args": "argparse.Namespace"})
    assert list(read_safetensors(tmp_path / "o3.safetensors")[0]) == ["w"]


# ----------------------------------------------------------------------------
# Real torch.save checkpoints

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _torch_model(torch, seed=0, dtype=None, pinned_features=False):
    from torch_dit import TorchDiT
    return TorchDiT.from_params(SMALL, small_params(seed), dtype=dtype or torch.float32,
                                pinned_features=pinned_features)


def _adamw_state(torch, params):
    """What torch.optim.AdamW.state_dict() holds after a step (built directly: torch.optim is slow to import)."""
    params = list(params)
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
             for i, p in enumerate(params)}
    group = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
             "params": list(range(len(params)))}
    return {"state": state, "param_groups": [group]}


def _assert_converted_equals(tmp_path, sd, **kw):
    out = tmp_path / "c.safetensors"
    used, names, skipped = convert(tmp_path / "c.pt", out, progress=False, overwrite=True, **kw)
    got, _ = read_safetensors(out)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert np.array_equal(got[k], v.float().numpy()), k
    return used, out


def test_state_dict_converts_exactly_and_matches_the_torch_forward(tmp_path, torch):
    tm = _torch_model(torch)
    torch.save(tm.state_dict(), tmp_path / "c.pt")
    used, out = _assert_converted_equals(tmp_path, tm.state_dict())
    assert used is None
    m = load_dit(out, dtype="float64", num_heads=4)
    # the same float32 values, in float64; pinned timestep features, as the comparison is at 1e-12
    t64 = _torch_model(torch, dtype=torch.float64, pinned_features=True)
    rng = np.random.default_rng(0)
    x, t, y = rng.standard_normal((3, 4, 8, 8)), np.array([0, 999, 250]), np.array([0, 10, 7])
    with torch.no_grad():
        ref = t64(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert rel_err(m(x, t, y), ref) <= 1e-12


def test_xl_width_checkpoint_infers_the_official_config(tmp_path, torch):
    from torch_dit import TorchDiT
    cfg = tl.get_config("DiT-XL/2", input_size=8, depth=1)             # 1152 wide: 16 heads from the width table
    params = {k: v.astype(np.float32) for k, v in tl.init_params(cfg, seed=3, scheme="random").items()}
    tm = TorchDiT.from_params(cfg, params, dtype=torch.float32)
    torch.save(tm.state_dict(), tmp_path / "xl.pt")
    convert(tmp_path / "xl.pt", tmp_path / "xl.safetensors", progress=False)
    m = load_dit(tmp_path / "xl.safetensors")
    assert m.config == cfg
    rng = np.random.default_rng(1)
    x, t, y = rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([999, 0]), np.array([1000, 207])
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert rel_err(m(x, t, y), ref) <= 1e-5


def test_training_checkpoint_picks_ema_by_default(tmp_path, torch):
    model, ema = _torch_model(torch, 0), _torch_model(torch, 1)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": _adamw_state(torch, model.parameters()),
            "args": argparse.Namespace(model="DiT-S/2", lr=1e-4, results_dir="results")}
    torch.save(ckpt, tmp_path / "c.pt")
    used, _ = _assert_converted_equals(tmp_path, ema.state_dict())
    assert used == "ema"
    used, _ = _assert_converted_equals(tmp_path, model.state_dict(), key="model")
    assert used == "model"


def test_fp16_bf16_checkpoints(tmp_path, torch):
    for tdtype, st in ((torch.float16, "F16"), (torch.bfloat16, "BF16")):
        sd = {k: v.to(tdtype) for k, v in _torch_model(torch).state_dict().items()}
        torch.save({"model": sd}, tmp_path / "c.pt")
        _, out = _assert_converted_equals(tmp_path, sd)
        with SafetensorsFile(out) as f:
            assert {e.dtype for e in f.entries.values()} == {"F32"}
        convert(tmp_path / "c.pt", tmp_path / "keep.safetensors", dtype="keep", progress=False, overwrite=True)
        with SafetensorsFile(tmp_path / "keep.safetensors") as f:
            assert {e.dtype for e in f.entries.values()} == {st}
        m = load_dit(tmp_path / "keep.safetensors", num_heads=4)
        assert all(np.array_equal(m.params[k], v.float().numpy()) for k, v in sd.items())


def test_views_and_shared_storages_from_torch(tmp_path, torch):
    w = torch.randn(6, 8, dtype=torch.float64)
    sd = {"w": w, "t": w.t(), "rows": w[2:5], "cols": w[:, 1::3], "diag": w.diagonal(), "h": w.half()[1:, 2]}
    torch.save(sd, tmp_path / "c.pt")
    assert sum(n.split("/")[-2] == "data" for n in zipfile.ZipFile(tmp_path / "c.pt").namelist()) == 2
    convert(tmp_path / "c.pt", tmp_path / "k.safetensors", dtype="keep", progress=False)
    got, _ = read_safetensors(tmp_path / "k.safetensors")
    for k, v in sd.items():
        assert got[k].dtype == v.numpy().dtype and np.array_equal(got[k], v.numpy()), k


def test_lazydit_gate_checkpoint_keeps_names(tmp_path, torch):
    # The layout of the official LazyDiT save_lazy_learning_weights: model (gate weights), opt, args, epoch, step.
    gates = {f"block_{i}_{m}_lazy_learning_weight_{s}": torch.randn(1, 32)
             for i in range(2) for m in ("attn", "mlp") for s in range(3)}
    torch.save({"model": gates, "opt": _adamw_state(torch, gates.values()), "args": argparse.Namespace(num_sampling_steps=3),
                "epoch": 0, "step": 500}, tmp_path / "c.pt")
    used, _ = _assert_converted_equals(tmp_path, gates)
    assert used == "model"


def test_diffusers_bin_folder_converts_and_loads(tmp_path, torch):
    diffusers = pytest.importorskip("diffusers")
    from test_io import _diffusers_model
    cfg = tl.DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    dm = _diffusers_model(cfg, torch, diffusers)
    dm.save_pretrained(tmp_path / "t", safe_serialization=False)          # diffusion_pytorch_model.bin (torch.save)
    convert(tmp_path / "t" / "diffusion_pytorch_model.bin", tmp_path / "t" / "diffusion_pytorch_model.safetensors",
            dtype="keep", progress=False)
    m = load_dit(tmp_path / "t", dtype="float64")
    assert m.config == cfg
    qkv = dm.transformer_blocks[1].attn1
    want = torch.cat([qkv.to_q.weight, qkv.to_k.weight, qkv.to_v.weight]).detach().numpy()
    assert np.array_equal(m.params["blocks.1.attn.qkv.weight"], want)


def test_legacy_torch_format_is_refused(tmp_path, torch):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ConvertError, match="not a zip checkpoint"):
        convert(tmp_path / "old.pt", tmp_path / "o.safetensors")


def test_cli(tmp_path, torch):
    torch.save({"ema": _torch_model(torch).state_dict()}, tmp_path / "c.pt")
    r = subprocess.run([sys.executable, "-m", "tinylazy.convert", str(tmp_path / "c.pt"),
                        str(tmp_path / "c.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0 and "[ema]" in r.stdout, r.stderr
    assert load_dit(tmp_path / "c.safetensors", num_heads=4).config == SMALL
    r = subprocess.run([sys.executable, "-m", "tinylazy.convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--key" in r.stdout and "--dtype" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tinylazy.convert", str(tmp_path / "c.pt"),
                        str(tmp_path / "x.safetensors"), "--key", "model"], capture_output=True, text=True)
    assert r.returncode == 2 and "no dict under key 'model'" in r.stderr


# ----------------------------------------------------------------------------
# No torch at runtime

_BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
import tinylazy, tinylazy.io, tinylazy.convert
src, dst, out = sys.argv[1:4]
assert tinylazy.convert.main([src, dst]) == 0
m = tinylazy.io.load_dit(dst, num_heads=4)
rng = np.random.default_rng(0)
np.save(out, m(rng.standard_normal((2, 4, 8, 8)), np.array([0, 999]), np.array([1, 10])))
bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'diffusers')]
assert not bad, bad
"""


def test_package_runs_without_torch(tmp_path):
    params = small_params()
    src = handmade_state_dict(tmp_path / "c.pt", params)
    r = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, str(src), str(tmp_path / "c.safetensors"),
                        str(tmp_path / "out.npy")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    want = tl.DiT(SMALL, params)(rng.standard_normal((2, 4, 8, 8)), np.array([0, 999]), np.array([1, 10]))
    assert np.array_equal(np.load(tmp_path / "out.npy"), want)


def test_writer_accepts_converted_and_plain_arrays_together(tmp_path):
    # write_safetensors is shared: a converted file can be extended and re-read without surprises
    src = handmade_state_dict(tmp_path / "c.pt", small_params())
    convert(src, tmp_path / "c.safetensors", progress=False)
    t, meta = read_safetensors(tmp_path / "c.safetensors")
    t["extra"] = np.ones(2, np.float32)
    write_safetensors(tmp_path / "d.safetensors", t, meta)
    assert read_safetensors(tmp_path / "d.safetensors")[1]["source"] == "c.pt"
