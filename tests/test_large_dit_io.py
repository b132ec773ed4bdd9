"""Large-DiT files: memory-mapped loading, the configuration from the keys, float16/bfloat16
storage converted a block at a time, and files that must be refused."""
import json
import os

import numpy as np
import pytest
import torch

import tinylazy as tl
from tinylazy.io import WeightsError, config_identity, read_safetensors, write_safetensors
from tinylazy.large_dit import LargeDiT, init_params
from tinylazy.large_dit_io import is_large_dit, load_large_dit, nbytes_of, save_large_dit, storage_of
from tinylazy.storage import Bfloat16Array, BlockWeights, to_bfloat16

from conftest import rel_err
from test_large_dit import QKNORM, SMALL, inputs


@pytest.fixture(scope="module")
def params():
    return {k: v.astype(np.float32) for k, v in init_params(QKNORM, seed=11, scheme="random").items()}


@pytest.fixture(scope="module")
def files(params, tmp_path_factory):
    d = tmp_path_factory.mktemp("large")
    out = {}
    for storage in ("float32", "bfloat16", "float16"):
        out[storage] = str(d / f"m-{storage}.safetensors")
        save_large_dit(params, QKNORM, out[storage], storage=storage)
    return out


def test_float32_file_is_used_in_place(files, params):
    model = tl.load_dit(files["float32"])
    assert isinstance(model, LargeDiT) and model.config == QKNORM
    w = model.params["layers.1.feed_forward.w2.weight"]
    assert isinstance(w.base, np.memmap) or isinstance(w, np.memmap)      # a view of the mapping, no copy
    assert not w.flags.writeable
    x, t, y = inputs(cfg=QKNORM)
    np.testing.assert_array_equal(model(x, t, y), LargeDiT(QKNORM, params)(x, t, y))
    assert model.params.conversions == 0 and storage_of(model) == {"F32": nbytes_of(QKNORM, "float32")}
    assert model.weights_hash == tl.io.weights_hash(LargeDiT(QKNORM, params))


@pytest.mark.parametrize("storage, tol", [("bfloat16", 2e-2), ("float16", 2e-3)])
def test_half_storage_is_widened_a_block_at_a_time(files, params, storage, tol):
    model = tl.load_dit(files[storage])
    stored = model.params.stored["layers.0.attention.wq.weight"]
    assert isinstance(stored, Bfloat16Array if storage == "bfloat16" else np.memmap)
    assert storage_of(model) == {"BF16" if storage == "bfloat16" else "F16": nbytes_of(QKNORM, storage)}
    model.params.conversions = 0
    x, t, y = inputs(cfg=QKNORM)
    out = model(x, t, y)
    per_block = sum(1 for k in model.params.stored if k.startswith("layers.0."))
    assert model.params.conversions == QKNORM.depth * per_block                 # each block's tensors once
    assert model.params.block == str(QKNORM.depth - 1)                          # only the last block is held
    # The model equals a float32 model of the rounded weights; the rounding is what moves the output.
    rounded = {k: np.asarray(model.params.stored[k].astype(np.float32)) for k in params}
    np.testing.assert_array_equal(out, LargeDiT(QKNORM, rounded)(x, t, y))
    assert 0 < rel_err(out, LargeDiT(QKNORM, params)(x, t, y)) <= tol


def test_bfloat16_rounding_is_torchs():
    a = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 10.0 ** np.arange(-20, 20, 0.0004)
    a[:4] = [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.4e38]             # ties to even, near overflow
    ours = to_bfloat16(a).raw
    theirs = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(to_bfloat16(a).astype(np.float32), torch.from_numpy(a).bfloat16().float().numpy())
    with pytest.raises(ValueError, match="NaN or Inf"):
        to_bfloat16(np.array([np.inf], np.float32))


def test_block_weights_convert_on_demand():
    stored = {"t.weight": np.ones(3, np.float16), "layers.0.a": np.ones(2, np.float16),
              "layers.0.b": np.zeros(2, np.float32), "layers.1.a": np.ones(2, np.float16)}
    w = BlockWeights(stored, np.float32)
    assert w.conversions == 0 and w["t.weight"].dtype == np.float32                  # outside blocks: converted once
    assert w["layers.0.b"] is stored["layers.0.b"]                                   # already float32: no copy
    a0 = w["layers.0.a"]
    assert w["layers.0.a"] is a0 and w.conversions == 1
    w["layers.1.a"]
    assert w.block == "1" and "layers.0.a" not in w.converted and w.conversions == 2


def test_save_records_config_and_hash(files):
    tensors, meta = read_safetensors(files["bfloat16"])
    assert json.loads(meta["config"])["qk_norm_groups"] == 2 and meta["num_heads"] == "4"
    assert tensors["layers.0.ffn_norm.weight"].dtype == np.float32                    # BF16, widened by the reader
    assert load_large_dit(files["bfloat16"]).weights_hash == meta["weights_hash"]
    assert load_large_dit(files["bfloat16"], verify=False).weights_hash is None


# ----------------------------------------------------------------------------
# The configuration from the keys

def _write(path, params, meta=None):
    write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in params.items()}, meta or {})
    return str(path)


def test_official_keys_without_metadata(tmp_path, params):
    """A file as the converter makes it from an official checkpoint that said nothing about heads:
    the official widths know their heads; other widths need the argument."""
    path = _write(tmp_path / "m.safetensors", params)
    assert is_large_dit(path) and is_large_dit(tmp_path) and not is_large_dit(tmp_path / "missing")
    with pytest.raises(WeightsError, match="number of attention heads for hidden size 48"):
        tl.load_dit(path)
    model = tl.load_dit(path, num_heads=4)
    assert model.config == QKNORM.replace(qk_norm_groups=1, input_size=32)   # official defaults: 32x32, 1 group
    model = load_large_dit(path, num_heads=4, input_size=16)
    assert model.config.input_size == 16 and model.config.num_tokens == 64


def test_files_that_are_refused(tmp_path, params):
    meta = {"config": json.dumps({"num_heads": 4})}
    bad = dict(params)
    bad["layers.1.attention.wo.weight"] = np.full((48, 48), np.nan)
    with pytest.raises(WeightsError, match="'layers.1.attention.wo.weight' contains NaN"):
        tl.load_dit(_write(tmp_path / "nan.safetensors", bad, meta))
    extra = dict(params, **{"layers.1.attention.cache": np.zeros(3)})
    with pytest.raises(WeightsError, match="unexpected keys .1.: layers.1.attention.cache"):
        tl.load_dit(_write(tmp_path / "extra.safetensors", extra, meta))
    gqa = dict(params, **{f"layers.{i}.attention.w{n}.weight": np.zeros((24, 48)) for i in range(2) for n in "kv"})
    with pytest.raises(WeightsError, match="grouped-query attention"):
        tl.load_dit(_write(tmp_path / "gqa.safetensors", gqa, meta))
    for cfg, match in (({"num_heads": "4"}, "not an integer in 1..1048576"), ({"num_heads": 5}, "even integer"),
                       ({"num_heads": 4, "input_size": 1024}, "positions"), ({"num_heads": 4, "norm_eps": 0},
                                                                              "norm_eps")):
        with pytest.raises(WeightsError, match=match):
            tl.load_dit(_write(tmp_path / "cfg.safetensors", params, {"config": json.dumps(cfg)}))
    path = _write(tmp_path / "hash.safetensors", params, dict(meta, weights_hash="0" * 64))
    with pytest.raises(WeightsError, match="do not match the weights_hash"):
        tl.load_dit(path)
    with pytest.raises(ValueError, match="NumPy backend only"):
        tl.load_dit(_write(tmp_path / "ok.safetensors", params, meta), backend="opencl")


def test_damaged_and_hostile_files(tmp_path, params, files):
    """As io.load_dit: nothing is sized from a name before the names are checked, what the
    metadata states must agree with the shapes, and the hash covers the configuration."""
    meta = {"config": json.dumps({"num_heads": 4})}
    holes = {k.replace("layers.1.", "layers.2."): v for k, v in params.items()}
    with pytest.raises(WeightsError, match=r"layers are numbered 0, 2: .* \(no layers.1.\*\)"):
        tl.load_dit(_write(tmp_path / "holes.safetensors", holes, meta))
    far = dict(params, **{"layers.1234567.ffn_norm.weight": np.ones(48)})
    with pytest.raises(WeightsError, match="block index 1234567... is not a plausible block number"):
        tl.load_dit(_write(tmp_path / "far.safetensors", far, meta))
    for stated, match in (({"num_heads": 4, "hidden_size": 64}, "hidden_size is 64, the tensors give 48"),
                          ({"num_heads": 4, "qk_norm": 1}, "qk_norm is 1, the tensors give True"),
                          ({"num_heads": 4, "depth": 3}, "depth is 3, the tensors give 2"),
                          ({"num_heads": 4, "class_dropout_prob": "x"}, "class_dropout_prob is 'x'")):
        with pytest.raises(WeightsError, match=match):
            tl.load_dit(_write(tmp_path / "stated.safetensors", params, {"config": json.dumps(stated)}))
    for extra, match in (({"num_heads": "8"}, "metadata 'num_heads' is 8 but its config says 4"),
                         ({"config": '{"num_heads": NaN}'}, "metadata 'config': not valid JSON"),
                         ({"weights_hash": "ab" * 40}, "not a sha256 hex digest")):
        with pytest.raises(WeightsError, match=match):
            tl.load_dit(_write(tmp_path / "meta.safetensors", params, dict(meta, **extra)))
    # The hash covers the configuration: the same tensors stated with 2 heads are another model.
    tensors, m = read_safetensors(files["float32"])
    m.update(num_heads="2", config=json.dumps(dict(json.loads(m["config"]), num_heads=2)))
    with pytest.raises(WeightsError, match="configuration .num_heads 2. do not match the weights_hash"):
        tl.load_dit(_write(tmp_path / "heads.safetensors", tensors, m))
    path = tmp_path / "fifo.safetensors"
    os.mkfifo(path)
    with pytest.raises(WeightsError, match="is a FIFO, not a regular file"):
        load_large_dit(path)


def test_config_identity_covers_what_changes_the_computation():
    ident = json.loads(config_identity(QKNORM))
    assert ident["family"] == "LargeDiTConfig" and "class_dropout_prob" not in ident and ident["null_class"]
    assert {"norm_eps", "qk_norm", "qk_norm_groups", "ffn_hidden", "cond_size", "num_heads"} <= set(ident)
    assert config_identity(QKNORM.replace(class_dropout_prob=0.2)) == config_identity(QKNORM)
    assert config_identity(SMALL.replace(qk_norm_groups=2)) == config_identity(SMALL)      # no q/k norm: no groups
    for other in (QKNORM.replace(norm_eps=1e-6), QKNORM.replace(qk_norm_groups=1), QKNORM.replace(num_heads=2),
                  QKNORM.replace(class_dropout_prob=0.0)):
        assert config_identity(other) != config_identity(QKNORM)


def test_dit_files_still_load_as_dit(tmp_path):
    dit = tl.DiT.from_config(tl.DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10))
    tl.save_dit(dit, tmp_path / "d.safetensors")
    assert not is_large_dit(tmp_path / "d.safetensors") and type(tl.load_dit(tmp_path / "d.safetensors")) is tl.DiT


def test_save_from_callables_matches_arrays(tmp_path, params):
    """The benchmarks write models a tensor at a time from callables: the same file as from arrays."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_large_dit(params, QKNORM, a, storage="bfloat16")
    save_large_dit({k: (lambda v=v: v) for k, v in params.items()}, QKNORM, b, storage="bfloat16")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="storage must be one of"):
        save_large_dit(params, QKNORM, a, storage="int8")
    with pytest.raises(ValueError, match="do not match"):
        save_large_dit(params, SMALL, a)


def test_block_conversions_reuse_arrays_nobody_holds():
    stored = {f"layers.{l}.{n}": Bfloat16Array(np.full(4, 0x3F80 + l, np.uint16)) for l in range(3) for n in "ab"}
    w = BlockWeights(stored, np.float32)
    a0 = w["layers.0.a"]
    first = a0.__array_interface__["data"][0]
    del a0
    w["layers.0.b"]
    kept = w["layers.0.b"]                                            # a cache holds block 0's b
    a1 = w["layers.1.a"]
    assert a1.__array_interface__["data"][0] == first                 # block 0's a, reused
    b1 = w["layers.1.b"]
    assert not np.shares_memory(b1, kept) and kept[0] == 1.0           # the held one is left alone
    np.testing.assert_array_equal(a1, stored["layers.1.a"].astype(np.float32))
    np.testing.assert_array_equal(w["layers.2.b"], stored["layers.2.b"].astype(np.float32))


def test_backward_through_half_storage(files):
    """A training cache holds converted weights across blocks: the spares must leave them alone."""
    model = tl.load_dit(files["bfloat16"], dtype="float64")
    rounded = LargeDiT(QKNORM, {k: np.asarray(model.params.stored[k].astype(np.float32)) for k in model.params.stored},
                       dtype="float64")
    x, t, y = inputs(cfg=QKNORM)
    dout = np.random.default_rng(2).standard_normal((3, 8, 8, 8))
    (ga, dxa), (gb, dxb) = (m.backward(dout, m.forward_train(x, t, y)[1]) for m in (model, rounded))
    np.testing.assert_array_equal(dxa, dxb)
    assert all(np.array_equal(ga[k], gb[k]) for k in gb)
