"""Safetensors reader/writer, DiT loading (official and diffusers layouts), validation errors, weights hash."""
import json
import os

import numpy as np
import pytest

import tinylazy as tl
from tinylazy import io
from tinylazy.io import WeightsError, load_dit, read_safetensors, save_dit, weights_hash, write_safetensors

from conftest import BACKENDS, rel_err

SMALL = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def small_params(cfg=SMALL, seed=0):
    return {k: v.astype(np.float32) for k, v in tl.init_params(cfg, seed=seed, scheme="random").items()}


def craft(path, header, data=b"", header_len=None):
    """A safetensors file with an arbitrary (possibly malformed) header."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little") + head + data)
    return path


class RawBF16:
    """A lazy writer value holding raw bfloat16 bits."""
    st_dtype = "BF16"

    def __init__(self, bits):
        self.bits, self.shape = bits, bits.shape

    def __array__(self, dtype=None, copy=None):
        return self.bits


def to_bf16_bits(a):
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)   # truncation: any bf16 is fine


# ----------------------------------------------------------------------------
# The format

def test_roundtrip_every_dtype_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 2)), "f32": rng.standard_normal(5).astype(np.float32),
        "f16": rng.standard_normal((2, 2, 2)).astype(np.float16), "i64": np.arange(-3, 3),
        "i32": np.arange(4, dtype=np.int32), "i16": np.arange(3, dtype=np.int16), "i8": np.arange(-2, 2, dtype=np.int8),
        "u8": np.arange(7, dtype=np.uint8), "u16": np.arange(3, dtype=np.uint16), "bool": np.array([True, False]),
        "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[::2, ::3],
    }
    p = tmp_path / "t.safetensors"
    write_safetensors(p, tensors, {"who": "test", "n": "3"})
    got, meta = read_safetensors(p)
    assert meta == {"who": "test", "n": "3"}
    assert list(got) == list(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k
    got32, _ = read_safetensors(p, dtype="float32")
    assert got32["f64"].dtype == np.float32 and got32["i64"].dtype == np.int64   # dtype converts floats only
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_interoperates_with_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file, save_file
    a = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.array([1.5, -2], np.float16)}
    write_safetensors(tmp_path / "ours.safetensors", a, {"k": "v"})
    theirs = load_file(tmp_path / "ours.safetensors")
    assert all(np.array_equal(theirs[k], a[k]) and theirs[k].dtype == a[k].dtype for k in a)
    save_file(a, tmp_path / "theirs.safetensors", metadata={"k": "v"})
    got, meta = read_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"k": "v"} and all(np.array_equal(got[k], a[k]) for k in a)


def test_bf16_and_fp16_upcast_exactly(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(5000) * 100).astype(np.float32)
    bits = to_bf16_bits(x)
    write_safetensors(tmp_path / "h.safetensors", {"bf": RawBF16(bits), "h": x.astype(np.float16)})
    with io.SafetensorsFile(tmp_path / "h.safetensors") as f:
        assert f.entries["bf"].dtype == "BF16" and f.entries["h"].dtype == "F16"
        bf32 = f.read("bf")
        assert bf32.dtype == np.float32
        assert np.array_equal(bf32.view(np.uint32), bits.astype(np.uint32) << 16)
        assert np.array_equal(f.read("bf", np.float64), bf32.astype(np.float64))
        assert np.array_equal(f.read("h", np.float32), x.astype(np.float16).astype(np.float32))
        assert np.array_equal(f.read("h", np.float64), x.astype(np.float16).astype(np.float64))


def test_bf16_written_by_torch_matches_torch_upcast(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    t = torch.randn(257, 3).bfloat16()
    save_file({"w": t}, tmp_path / "bf.safetensors")
    got, _ = read_safetensors(tmp_path / "bf.safetensors")
    assert np.array_equal(got["w"], t.float().numpy())


def test_chunked_conversion_covers_tensors_larger_than_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_CHUNK", 64)                # 32 f16 values per chunk
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float16)
    write_safetensors(tmp_path / "c.safetensors", {"x": x})
    got, _ = read_safetensors(tmp_path / "c.safetensors", dtype="float32")
    assert np.array_equal(got["x"], x.astype(np.float32))


def test_write_is_atomic(tmp_path):
    p = tmp_path / "w.safetensors"
    write_safetensors(p, {"a": np.ones(3, np.float32)})
    before = p.read_bytes()

    class Boom:
        shape, dtype = (3,), np.dtype(np.float32)

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(p, {"a": np.zeros(3, np.float32), "b": Boom()})
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]
    with pytest.raises(WeightsError, match="metadata"):
        write_safetensors(p, {"a": np.ones(1)}, {"n": 3})


# ----------------------------------------------------------------------------
# Malformed files: one clear error naming the file (and the key)

F32_4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data, header_len, match", [
    ({"a": F32_4}, bytes(16), 10 ** 6, "header length 1000000 exceeds the file"),
    (b"{not json", b"", None, "not valid JSON"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8), None, "duplicate name 'a'"),
    ({"a": F32_4, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), None,
     "tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(16), None,
     "tensor 'a': data_offsets .* span 16 bytes, but shape \\(2, 3\\) of F32 needs 24"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, bytes(16), None,
     "tensor 'a' ends at byte .* out of range"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(16), None, "tensor 'a': bad data_offsets"),
    ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, bytes(2), None, "tensor 'a': unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), None, "tensor 'a': bad shape"),
    ({"a": {"dtype": "F32"}}, b"", None, "tensor 'a': header entry needs"),
    ({"__metadata__": {"n": 1}}, b"", None, "__metadata__ must map strings to strings"),
    ({"__metadata__": []}, b"", None, "__metadata__ must map strings to strings"),
    ([1, 2], b"", None, "not a JSON object"),
    ({"a": dict(F32_4, extra=1)}, bytes(16), None, "tensor 'a': header entry needs exactly dtype, shape"),
    ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, bytes(16), None, "tensor 'a': unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [1] * 33, "data_offsets": [0, 4]}}, bytes(4), None, "tensor 'a': bad shape"),
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, NaN]}}', bytes(16), None, "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, b"", None, "nested too deeply"),
    (b'{"a": 1' + b"1" * 5000 + b"}", b"", None, "not valid JSON"),
    (b'{"\xff": 1}', b"", None, "not valid JSON"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(16), None,
     "8 bytes after the last tensor belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), None,
     "8 bytes at the start of the data belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, bytes(16), None,
     "4 bytes after tensor 'a' belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}, bytes(16), None, "tensors 'a' and 'e' overlap"),
])
def test_malformed_headers(tmp_path, header, data, header_len, match):
    p = craft(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(WeightsError, match=match) as e:
        read_safetensors(p)
    assert str(p) in str(e.value)


def test_a_shifted_header_length_is_refused_not_read_at_the_wrong_offset(tmp_path):
    """Lowering the length into the header's space padding still parses as JSON; the data area then starts
    k bytes early and ends k bytes before the file does: refused, as the safetensors library refuses it."""
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"b": np.arange(3, dtype=np.float32)}, {"pad": "x"})   # 8-byte padded header
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    assert raw[8 + n - 1:8 + n] == b" "
    for k in range(1, raw[8:8 + n].count(b" ") + 1):
        shifted = tmp_path / f"s{k}.safetensors"
        shifted.write_bytes((n - k).to_bytes(8, "little") + raw[8:])
        with pytest.raises(WeightsError, match=f"{k} bytes after the last tensor belong to no tensor"):
            read_safetensors(shifted)


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)                                    # no writer: opening it the usual way blocks forever
    with pytest.raises(WeightsError, match="is a FIFO, not a regular file"):
        read_safetensors(fifo)
    with pytest.raises(WeightsError, match="is a folder, not a regular file"):
        io.SafetensorsFile(tmp_path)
    with pytest.raises(WeightsError, match="is a device, not a regular file"):
        read_safetensors("/dev/zero")


def test_header_size_and_entry_count_are_bounded_by_the_data(tmp_path):
    big = tmp_path / "big.safetensors"
    n = (8 << 20) + 8
    with open(big, "wb") as f:
        f.write(n.to_bytes(8, "little"))
        f.truncate(8 + n + 100)                        # sparse: a header of zeros, 100 bytes of "data"
    with pytest.raises(WeightsError, match="header of 8388616 bytes for only 100 bytes of tensor data .* must "
                                           "describe 16 times its size"):
        read_safetensors(big)
    empty = {f"e{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(2000)}
    with pytest.raises(WeightsError, match="more than 1024 zero-byte tensors in the header"):
        read_safetensors(craft(tmp_path / "empty.safetensors", empty))
    claims = {f"b{i}": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]} for i in range(2000)}
    with pytest.raises(WeightsError, match="more than 1124 header entries for 100 bytes of tensor data"):
        read_safetensors(craft(tmp_path / "claims.safetensors", claims, bytes(100)))
    few = dict(list(empty.items())[:1024])
    assert len(read_safetensors(craft(tmp_path / "few.safetensors", few))[0]) == 1024


def test_truncated_and_tiny_files(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, small_params())
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsError, match="out of range \\(truncated file\\?\\)"):
        load_dit(tmp_path / "cut.safetensors")
    (tmp_path / "cut2.safetensors").write_bytes(data[:50])
    with pytest.raises(WeightsError, match="exceeds the file"):
        load_dit(tmp_path / "cut2.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_safetensors(tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_name_the_key(tmp_path, bad):
    params = small_params()
    params["blocks.1.mlp.fc2.weight"][3, 4] = bad
    write_safetensors(tmp_path / "m.safetensors", params)
    with pytest.raises(WeightsError, match="'blocks.1.mlp.fc2.weight' contains NaN or Inf"):
        load_dit(tmp_path / "m.safetensors", num_heads=4)
    with pytest.raises(WeightsError, match="contains NaN or Inf"):
        read_safetensors(tmp_path / "m.safetensors")


# ----------------------------------------------------------------------------
# load_dit: official layout

def test_load_official_file_exact_and_matches_in_memory_model(tmp_path):
    params = small_params()
    write_safetensors(tmp_path / "m.safetensors", params)
    m = load_dit(tmp_path / "m.safetensors", num_heads=4)
    assert m.config == SMALL
    for k, v in params.items():
        assert m.params[k].dtype == np.float32 and np.array_equal(m.params[k], v), k
    ref = tl.DiT(SMALL, params)
    rng = np.random.default_rng(0)
    x, t, y = rng.standard_normal((2, 4, 8, 8)), np.array([0, 999]), np.array([3, 10])
    assert np.array_equal(m(x, t, y), ref(x, t, y))
    m64 = load_dit(tmp_path / "m.safetensors", dtype="float64", num_heads=4)
    assert m64.params["pos_embed"].dtype == np.float64
    assert m.weights_hash == m64.weights_hash == weights_hash(ref) == weights_hash(tmp_path / "m.safetensors", num_heads=4)


@pytest.mark.parametrize("cfg", [
    tl.DiTConfig(input_size=16, patch_size=4, in_channels=3, hidden_size=384, depth=1, num_heads=6, num_classes=5,
                 learn_sigma=False),
    tl.DiTConfig(input_size=6, patch_size=2, in_channels=1, hidden_size=768, depth=1, num_heads=12, num_classes=1),
    tl.DiTConfig(input_size=4, patch_size=1, in_channels=2, hidden_size=1152, depth=1, num_heads=16, num_classes=3,
                 mlp_ratio=2.0),
])
def test_config_inferred_from_shapes_with_official_head_counts(tmp_path, cfg):
    write_safetensors(tmp_path / "m.safetensors", small_params(cfg))
    assert load_dit(tmp_path / "m.safetensors").config == cfg


def test_num_heads_resolution_order(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, small_params())                        # hidden 32: not an official width
    with pytest.raises(WeightsError, match="num_heads=N"):
        load_dit(p)
    assert load_dit(p, num_heads=8).config.num_heads == 8
    write_safetensors(p, small_params(), {"config": json.dumps({"num_heads": 2})})
    assert load_dit(p).config.num_heads == 2
    write_safetensors(p, small_params(), {"num_heads": "16", "config": json.dumps({"num_heads": 16})})
    assert load_dit(p).config.num_heads == 16
    assert load_dit(p, num_heads=4).config.num_heads == 4               # the caller's argument wins
    with pytest.raises(WeightsError, match="num_heads argument = 5 does not divide hidden size 32"):
        load_dit(p, num_heads=5)
    write_safetensors(p, small_params(), {"num_heads": "16", "config": json.dumps({"num_heads": 2})})
    with pytest.raises(WeightsError, match="states different head counts"):   # a file that contradicts itself
        load_dit(p, num_heads=4)
    for bad in ("4.0", "-4", "", "0x4", "1" * 30):
        write_safetensors(p, small_params(), {"num_heads": bad})
        with pytest.raises(WeightsError, match="metadata 'num_heads' is .*not an integer"):
            load_dit(p)


def test_save_dit_roundtrip_records_config_and_hash(tmp_path):
    m = tl.DiT(SMALL, small_params(), dtype="float64")
    save_dit(m, tmp_path / "s.safetensors", {"note": "hi"})
    _, meta = read_safetensors(tmp_path / "s.safetensors")
    assert json.loads(meta["config"])["num_heads"] == 4 and meta["note"] == "hi"
    m2 = load_dit(tmp_path / "s.safetensors", dtype="float64")            # heads from the metadata
    assert m2.config == SMALL and all(np.array_equal(m2.params[k], m.params[k]) for k in m.params)
    assert m2.weights_hash == meta["weights_hash"] == weights_hash(m)
    other = small_params(seed=1)
    assert weights_hash(tl.DiT(SMALL, other)) != weights_hash(m)
    write_safetensors(tmp_path / "tampered.safetensors", other, meta)      # metadata of another model
    with pytest.raises(WeightsError, match="do not match the weights_hash"):
        load_dit(tmp_path / "tampered.safetensors")


def test_the_hash_covers_the_configuration(tmp_path):
    """num_heads changes the computation but no shape: an edit of it fails the recorded hash, or (in a file
    without one) gives another hash, so gates and traces keyed on the old one refuse the model."""
    params = small_params()
    m4, m2 = tl.DiT(SMALL, params), tl.DiT(SMALL.replace(num_heads=2), params)
    assert weights_hash(m4) != weights_hash(m2)
    assert weights_hash(tl.DiT(SMALL.replace(mlp_ratio=4.001), params)) == weights_hash(m4)   # same MLP width
    p = tmp_path / "s.safetensors"
    save_dit(m4, p)
    tensors, meta = read_safetensors(p)
    both = {"num_heads": "2", "config": meta["config"].replace('"num_heads": 4', '"num_heads": 2')}
    for edit, match in (({"num_heads": "2"}, "states different head counts"),
                        (both, "do not match the weights_hash")):
        write_safetensors(tmp_path / "e.safetensors", tensors, dict(meta, **edit))
        with pytest.raises(WeightsError, match=match):
            load_dit(tmp_path / "e.safetensors")
    del meta["weights_hash"]
    write_safetensors(tmp_path / "nohash.safetensors", tensors, dict(meta, num_heads="2", config="{}"))
    assert load_dit(tmp_path / "nohash.safetensors").weights_hash == weights_hash(m2) != weights_hash(m4)
    v1 = io._WeightsHasher()                         # a file from before: its tensors-only hash is still checked
    for k in sorted(params):
        v1.update(k, params[k])
    write_safetensors(tmp_path / "v1.safetensors", tensors, dict(meta, weights_hash=v1.tensors_digest()))
    assert load_dit(tmp_path / "v1.safetensors").weights_hash == weights_hash(m4)
    tensors["blocks.0.mlp.fc2.bias"][3] += 1
    write_safetensors(tmp_path / "v1.safetensors", tensors, dict(meta, weights_hash=v1.tensors_digest()))
    with pytest.raises(WeightsError, match="do not match the weights_hash"):
        load_dit(tmp_path / "v1.safetensors")


@pytest.mark.parametrize("config, match", [
    ({"depth": 3}, "metadata 'config' depth is 3, the tensors give 2"),
    ({"input_size": 4096}, "metadata 'config' input_size is 4096, the tensors give 8"),
    ({"learn_sigma": False}, "learn_sigma is False, the tensors give True"),
    ({"mlp_ratio": 1e308}, "mlp_ratio is 1e\\+308"),
    ({"num_classes": 10.0}, "num_classes is 10.0"),
    ({"class_dropout_prob": float("nan")}, "not valid JSON"),
    ({"num_heads": True}, "num_heads is True, not an integer"),
    ([4], "metadata 'config' is a list"),
])
def test_a_stated_config_must_agree_with_the_shapes(tmp_path, config, match):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, small_params(), {"num_heads": "4", "config": json.dumps(config)})
    with pytest.raises(WeightsError, match=match):
        load_dit(p)


def test_a_null_free_label_table_is_read_as_the_stated_config_says(tmp_path):
    cfg = SMALL.replace(class_dropout_prob=0.0)                  # the table has num_classes rows, no null row
    m = tl.DiT(cfg, small_params(cfg))
    save_dit(m, tmp_path / "m.safetensors")
    back = load_dit(tmp_path / "m.safetensors")
    assert back.config == cfg and back.weights_hash == weights_hash(m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_on_each_backend(tmp_path, backend):
    params = small_params()
    write_safetensors(tmp_path / "m.safetensors", params)
    m = load_dit(tmp_path / "m.safetensors", backend=backend, num_heads=4)
    rng = np.random.default_rng(3)
    x, t, y = rng.standard_normal((2, 4, 8, 8)), np.array([5, 500]), np.array([1, 2])
    assert rel_err(m(x, t, y), tl.DiT(SMALL, params)(x, t, y)) <= 1e-5


def test_folder_with_one_file(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", small_params())
    assert load_dit(tmp_path, num_heads=4).config == SMALL
    write_safetensors(tmp_path / "other.safetensors", small_params())
    with pytest.raises(WeightsError, match="expected one .safetensors file"):
        load_dit(tmp_path, num_heads=4)
    with pytest.raises(WeightsError, match="no such file"):
        load_dit(tmp_path / "nope.safetensors")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="found none; convert diffusion_pytorch_model.bin with python -m tinylazy"):
        load_dit(tmp_path / "bin")


# ----------------------------------------------------------------------------
# load_dit: validation before building

def _load_error(tmp_path, params, **kw):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, params)
    with pytest.raises(WeightsError) as e:
        load_dit(p, num_heads=4, **kw)
    assert str(p) in str(e.value)
    return str(e.value)


def test_missing_key(tmp_path):
    params = small_params()
    del params["blocks.1.attn.proj.bias"]
    msg = _load_error(tmp_path, params)
    assert "missing keys (1): blocks.1.attn.proj.bias" in msg


def test_missing_key_needed_for_inference(tmp_path):
    params = small_params()
    del params["final_layer.linear.weight"]
    assert "cannot infer the model configuration: missing 'final_layer.linear.weight'" in _load_error(tmp_path, params)


def test_unexpected_key(tmp_path):
    params = small_params()
    params["blocks.0.attn.extra"] = np.ones(3, np.float32)
    params["blocks.2.mlp.fc1.weight"] = np.ones((128, 32), np.float32)   # a stray block makes depth 3
    msg = _load_error(tmp_path, params)
    assert "unexpected keys (1): blocks.0.attn.extra" in msg and "missing keys (9): blocks.2.attn.qkv.weight" in msg


def test_block_numbers_with_holes_size_nothing(tmp_path):
    """A stray block far away is refused as a hole, before anything is sized by its number."""
    params = small_params()
    params["blocks.99999.mlp.fc1.weight"] = np.ones((128, 32), np.float32)
    assert "blocks are numbered 0, 1, 99999: block indices must run 0..N-1 without holes (no blocks.2.*)" \
        in _load_error(tmp_path, params)


def test_wrong_shape(tmp_path):
    params = small_params()
    params["blocks.1.attn.qkv.weight"] = np.ones((96, 31), np.float32)
    assert "wrong shapes (1): blocks.1.attn.qkv.weight: (96, 31), expected (96, 32)" in _load_error(tmp_path, params)


def test_int_tensor(tmp_path):
    params = small_params()
    params["blocks.0.mlp.fc1.bias"] = np.arange(128, dtype=np.int64)
    assert "non-float tensors (1): blocks.0.mlp.fc1.bias (I64)" in _load_error(tmp_path, params)


def test_all_problems_in_one_error(tmp_path):
    params = small_params()
    del params["blocks.0.mlp.fc2.bias"]
    params["blocks.1.attn.qkv.bias"] = np.ones(3, np.float32)
    params["junk"] = np.ones(1, np.float32)
    msg = _load_error(tmp_path, params)
    assert "missing keys (1): blocks.0.mlp.fc2.bias" in msg and "unexpected keys (1): junk" in msg
    assert "wrong shapes (1): blocks.1.attn.qkv.bias" in msg


def test_bad_final_layer_rows(tmp_path):
    params = small_params()
    params["final_layer.linear.weight"] = np.ones((12, 32), np.float32)
    assert "'final_layer.linear.weight' has 12 rows" in _load_error(tmp_path, params)


def test_fp16_and_bf16_files_load_exactly(tmp_path):
    params = small_params()
    write_safetensors(tmp_path / "h.safetensors", {k: v.astype(np.float16) for k, v in params.items()})
    m = load_dit(tmp_path / "h.safetensors", num_heads=4)
    assert all(np.array_equal(m.params[k], params[k].astype(np.float16).astype(np.float32)) for k in params)
    write_safetensors(tmp_path / "b.safetensors", {k: RawBF16(to_bf16_bits(v)) for k, v in params.items()})
    m = load_dit(tmp_path / "b.safetensors", dtype="float64", num_heads=4)
    for k, v in params.items():
        want = (to_bf16_bits(v).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        assert m.params[k].dtype == np.float64 and np.array_equal(m.params[k], want), k


# ----------------------------------------------------------------------------
# load_dit: diffusers DiTTransformer2DModel folders

def _diffusers_model(cfg, torch, diffusers, share_embedders=True, seed=0):
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.depth, sample_size=cfg.input_size, patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():                          # random and non-zero everywhere (adaLN included)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
        if share_embedders:                               # as a model converted from the official DiT
            emb0 = m.transformer_blocks[0].norm1.emb
            for blk in m.transformer_blocks[1:]:
                blk.norm1.emb.load_state_dict(emb0.state_dict())
    return m


def _official_numerics(m, torch):
    """docs/numerics.md's two patches, plus the correctly rounded timestep features written out in
    tests/official_features.py (the comparison is at 1e-12)."""
    from official_features import official_timestep_features
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-6
    for blk in m.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
        blk.norm1.emb.time_proj.forward = lambda t: torch.from_numpy(official_timestep_features(t.numpy()))
    return m


def test_diffusers_folder_matches_the_diffusers_module(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2,
                       num_classes=10)
    dm = _diffusers_model(cfg, torch, diffusers)
    dm.save_pretrained(tmp_path / "transformer")
    m = load_dit(tmp_path / "transformer", dtype="float64")           # heads from config.json
    assert m.config == cfg
    assert np.array_equal(m.params["pos_embed"][0], tl.embeddings.pos_embed_2d(64, 4).astype(np.float32))
    rng = np.random.default_rng(0)
    x, t, y = rng.standard_normal((3, 4, 8, 8)), np.array([0, 999, 421]), np.array([3, 10, 9])
    with torch.no_grad():
        ref = _official_numerics(dm, torch)(torch.from_numpy(x), timestep=torch.from_numpy(t),
                                            class_labels=torch.from_numpy(y)).sample.numpy()
    err = rel_err(m(x, t, y), ref)
    assert err <= 1e-12, err
    assert load_dit(tmp_path).config == cfg                               # a pipeline folder (transformer/ inside)
    assert weights_hash(tmp_path) == m.weights_hash


def test_diffusers_embedder_copies_must_agree(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = tl.DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    _diffusers_model(cfg, torch, diffusers, share_embedders=False).save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="transformer_blocks.1.norm1.emb.* differs from block 0's copy"):
        load_dit(tmp_path)


def test_diffusers_missing_part_is_named(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = tl.DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    _diffusers_model(cfg, torch, diffusers).save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors, meta = read_safetensors(f)
    del tensors["transformer_blocks.1.attn1.to_k.bias"]
    write_safetensors(f, tensors, meta)
    with pytest.raises(WeightsError, match="missing keys \\(1\\): transformer_blocks.1.attn1.to_k.bias "
                                           "\\(for blocks.1.attn.qkv.bias\\)"):
        load_dit(tmp_path)


def diffusers_folder(path, cfg, params, config=None):
    """A diffusers DiTTransformer2DModel folder written from official params, without torch."""
    D, depth = cfg.hidden_size, cfg.depth
    layout = io._Layout("", [], None)
    layout.diffusers = True
    out = {}
    for name, a in params.items():
        if name == "pos_embed":
            continue
        keys = layout.file_keys(name)
        for k, part in zip(keys, np.split(a, len(keys)) if len(keys) > 1 else [a]):
            out[k] = part
    for i in range(1, depth):
        for k in io._DIFFUSERS_SHARED:
            out[f"transformer_blocks.{i}.{k}"] = out[f"transformer_blocks.0.{k}"]
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"), out)
    conf = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": cfg.num_heads,
            "attention_head_dim": D // cfg.num_heads, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "num_layers": depth, "sample_size": cfg.input_size,
            "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes}
    conf.update(config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    return out


def test_diffusers_folder_without_torch_loads_like_the_official_file(tmp_path):
    params = small_params()
    diffusers_folder(tmp_path / "d", SMALL, params)
    m = load_dit(tmp_path / "d")
    assert m.config == SMALL and m.weights_hash == weights_hash(tl.DiT(SMALL, params))


@pytest.mark.parametrize("config, match", [
    ({"sample_size": 4096}, "'sample_size' is 4096, not an integer in 1..1024"),
    ({"sample_size": 1024}, "would make a 33554432-byte pos_embed, more than all the weights"),
    ({"sample_size": 8.0}, "'sample_size' is 8.0, not an integer"),
    ({"num_attention_heads": 2}, "attention_head_dim is 8, the tensors give 32 / 2 heads"),
    ({"num_attention_heads": "4"}, "'num_attention_heads' is '4', not an integer"),
    ({"num_layers": 3}, "num_layers is 3, the tensors give 2"),
    ({"in_channels": [4]}, "in_channels is a list of 1 items, the tensors give 4"),
])
def test_diffusers_config_json_is_checked_before_anything_is_sized_by_it(tmp_path, config, match):
    params = small_params()
    diffusers_folder(tmp_path, SMALL, params, config)
    with pytest.raises(WeightsError, match=match):
        load_dit(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("[1]", "not a JSON object"), ("{", "not valid JSON"), ("[" * 50000, "nested too deeply"),
    ('{"sample_size": Infinity}', "not valid JSON"),
])
def test_diffusers_config_json_malformed(tmp_path, text, match):
    diffusers_folder(tmp_path, SMALL, small_params())
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(WeightsError, match=match):
        load_dit(tmp_path)


def test_sharded_index_stays_inside_the_model_folder(tmp_path):
    model = tmp_path / "model"
    out = diffusers_folder(model, SMALL, small_params())
    os.remove(model / "diffusion_pytorch_model.safetensors")
    names = sorted(out)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, keys in shards.items():
        write_safetensors(model / shard, {k: out[k] for k in keys})
    index = model / "diffusion_pytorch_model.safetensors.index.json"

    def write_index(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    good = {k: s for s, keys in shards.items() for k in keys}
    write_index(good)
    assert load_dit(model).config == SMALL
    write_safetensors(tmp_path / "outside.safetensors", {k: out[k] for k in shards["b.safetensors"]})
    os.symlink(tmp_path / "outside.safetensors", model / "link.safetensors")
    for shard, match in ((str(tmp_path / "outside.safetensors"), "not a .safetensors file name in the model folder"),
                         ("../outside.safetensors", "not a .safetensors file name in the model folder"),
                         ("link.safetensors", "leads outside the model folder"),
                         ("config.json", "not a .safetensors file name")):
        write_index(dict(good, **{k: shard for k in shards["b.safetensors"]}))
        with pytest.raises(WeightsError, match=match):
            load_dit(model)
    write_index(dict(good, **{names[0]: "b.safetensors"}))
    with pytest.raises(WeightsError, match="the index does not match its shards"):
        load_dit(model)
    index.write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(WeightsError, match="needs a non-empty 'weight_map' object"):
        load_dit(model)
