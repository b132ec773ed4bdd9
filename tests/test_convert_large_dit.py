"""Official Large-DiT checkpoints, written by torch.save in the official layout (model-parallel
shards as fairscale splits them, model_args.pth, LazyDiT's gate checkpoints), converted and run."""
import argparse
import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tinylazy as tl
from tinylazy import cli
from tinylazy.convert import ConvertError, convert
from tinylazy.convert_large_dit import convert_large_dit, main, split_axis
from tinylazy.large_dit import LargeDiT, init_params

from conftest import rel_err
from test_large_dit import QKNORM, SMALL, inputs
from torch_large_dit import TorchLargeDiT


def shard(params, M):
    """The state dicts of M model-parallel ranks: each rank's slice of every parallel tensor."""
    out = [collections.OrderedDict() for _ in range(M)]
    for k, a in params.items():
        axis = split_axis(k) if M > 1 else None
        parts = [a] * M if axis is None else np.split(a, M, axis=axis)
        for sd, p in zip(out, parts):
            sd[k] = torch.from_numpy(np.ascontiguousarray(p)).clone()
    return out


def write_checkpoint(folder, params, M, ema=True, args=None, dtype=torch.float32):
    """An official checkpoint folder as train.py writes it (both the model and its EMA, the EMA
    being the model + 0.01 here so that the two can be told apart)."""
    os.makedirs(folder, exist_ok=True)
    for prefix, offset in (("consolidated", 0.0), ("consolidated_ema", 0.01)) if ema else (("consolidated", 0.0),):
        for r, sd in enumerate(shard({k: v + offset for k, v in params.items()}, M)):
            torch.save(collections.OrderedDict((k, v.to(dtype)) for k, v in sd.items()),
                       os.path.join(folder, f"{prefix}.{r:02d}-of-{M:02d}.pth"))
    if args is not None:
        torch.save(argparse.Namespace(**args), os.path.join(folder, "model_args.pth"))
    with open(os.path.join(folder, "resume_step.txt"), "w") as f:
        print(1000, file=f)
    return folder


def run_ref(cfg, params, x, t, y):
    with torch.no_grad():
        tm = TorchLargeDiT.from_params(cfg, params, pinned_tables=True)      # compared at 1e-12: pinned tables
        return tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()


@pytest.fixture(scope="module")
def params():
    return {k: v.astype(np.float32) for k, v in init_params(QKNORM, seed=21, scheme="random").items()}


def test_two_rank_checkpoint_with_qk_norm(params, tmp_path):
    """Merged shards equal the model the two ranks computed together: q/k norm per rank's heads."""
    src = write_checkpoint(tmp_path / "ckpt", params, 2, args={"image_size": 64, "qk_norm": True, "lr": 1e-4,
                                                                "num_classes": 10, "data_path": "/x"})
    dst = tmp_path / "merged.safetensors"
    cfg, files = convert_large_dit(str(src), dst, num_heads=4, progress=False)
    assert [os.path.basename(f) for f in files] == ["consolidated_ema.00-of-02.pth", "consolidated_ema.01-of-02.pth"]
    assert cfg == QKNORM and cfg.qk_norm_groups == 2 and cfg.input_size == 8          # image_size 64 / 8
    model = tl.load_dit(dst, dtype="float64")
    assert model.config == QKNORM
    x, t, y = inputs(cfg=QKNORM)
    ema = {k: v + 0.01 for k, v in params.items()}
    assert rel_err(model(x, t, y), run_ref(QKNORM, ema, x, t, y)) <= 1e-12
    with pytest.raises(ConvertError, match="exists; choose another output"):
        convert_large_dit(str(src), dst, num_heads=4, ema=False, progress=False)
    cfg, _ = convert_large_dit(str(src), dst, num_heads=4, ema=False, progress=False, overwrite=True)
    assert rel_err(tl.load_dit(dst, dtype="float64")(x, t, y), run_ref(QKNORM, params, x, t, y)) <= 1e-12


@pytest.mark.parametrize("M", [1, 4])
def test_bfloat16_shards_and_storage(M, tmp_path):
    cfg = SMALL.replace(input_size=32)                                        # the official latent size
    p = {k: v.astype(np.float32) for k, v in init_params(cfg, seed=22, scheme="random").items()}
    src = write_checkpoint(tmp_path / "ckpt", p, M, ema=False, dtype=torch.bfloat16)
    out = {}
    for dtype in ("keep", "float32"):
        out[dtype] = tmp_path / f"{dtype}.safetensors"
        assert main([str(src), str(out[dtype]), "--dtype", dtype, "--num-heads", "4"]) == 0
    keep, f32 = tl.load_dit(out["keep"]), tl.load_dit(out["float32"])
    assert type(keep.params.stored["layers.0.feed_forward.w1.weight"]).__name__ == "Bfloat16Array"
    assert f32.params.stored["layers.0.feed_forward.w1.weight"].dtype == np.float32
    rounded = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in p.items()}   # what the ranks saved
    x, t, y = inputs(B=2, cfg=cfg)
    ref = LargeDiT(cfg, rounded)(x, t[:2], y[:2])
    np.testing.assert_array_equal(keep(x, t[:2], y[:2]), ref)
    np.testing.assert_array_equal(f32(x, t[:2], y[:2]), ref)


def test_single_state_dict_file(params, tmp_path):
    """The one-file state dict LazyDiT's scripts load (DiT_Llama_3B_patch2.pth), the registry naming the heads."""
    path = tmp_path / "DiT_Llama_small.pth"
    torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in params.items()), path)
    cfg, _ = convert_large_dit(str(path), tmp_path / "m.safetensors", num_heads=4, input_size=8, progress=False)
    assert cfg == QKNORM.replace(qk_norm_groups=1)
    model = tl.load_dit(tmp_path / "m.safetensors")
    assert model.config.qk_norm_groups == 1 and model.config.input_size == 8


def test_lazydit_gate_checkpoint_of_large_dit(tmp_path):
    """LazyDiT's save_lazy_learning_weights for a Large-DiT: block_{l}_{kind}_lazy_learning_weight_{s},
    (1, D), beside the optimizer state and the args; tinylazy.convert and load_gates read it."""
    model = LargeDiT(QKNORM, init_params(QKNORM, seed=23, scheme="random"))
    steps, D = 4, QKNORM.hidden_size
    rng = np.random.default_rng(0)
    weights = {f"block_{l}_{kind}_lazy_learning_weight_{s}": torch.from_numpy(rng.normal(0, 0.01, (1, D)))
               .float() for l in range(QKNORM.depth) for kind in ("attn", "mlp") for s in range(steps)}
    opt = torch.optim.AdamW([torch.nn.Parameter(w.clone()) for w in weights.values()])
    torch.save({"model": weights, "opt": opt.state_dict(), "args": argparse.Namespace(model="DiT_Llama_3B_patch2"),
                "epoch": 0, "step": 100}, tmp_path / "final_ckpt.pt")
    convert(tmp_path / "final_ckpt.pt", tmp_path / "gates.safetensors", progress=False)
    gates = tl.load_gates(tmp_path / "gates.safetensors", model, steps=steps)
    np.testing.assert_array_equal(gates.attn[2, 1], weights["block_1_attn_lazy_learning_weight_2"].numpy()[0])
    assert gates.blocks == "layers"
    stats = tl.LazyStats()
    tl.ddim_sample(model, tl.make_noise(model, 2), np.array([1, 2]), steps, gates=gates, lazy_stats=stats)
    assert stats.evals.sum() == steps * QKNORM.depth * 2 * 2


def test_checkpoints_that_are_refused(params, tmp_path):
    src = write_checkpoint(tmp_path / "a", params, 2, ema=False)
    os.remove(src / "consolidated.01-of-02.pth")
    with pytest.raises(ConvertError, match="not ranks 00..01 of 02"):
        convert_large_dit(str(src), tmp_path / "o.safetensors", num_heads=4, progress=False)
    src = write_checkpoint(tmp_path / "b", params, 2, ema=False)
    sd = torch.load(src / "consolidated.01-of-02.pth")
    sd["layers.0.ffn_norm.weight"] += 1.0                                     # replicated, but not equal
    torch.save(sd, src / "consolidated.01-of-02.pth")
    with pytest.raises(ConvertError, match="should be equal on every rank"):
        convert_large_dit(str(src), tmp_path / "o.safetensors", num_heads=4, progress=False)
    assert not os.path.exists(tmp_path / "o.safetensors")                    # nothing left behind
    src = write_checkpoint(tmp_path / "c", dict(params, **{"layers.0.attention.cache_k": np.zeros(4, np.float32)}),
                           1, ema=False)
    with pytest.raises(ConvertError, match="'layers.0.attention.cache_k' is not a Large-DiT parameter"):
        convert_large_dit(str(src), tmp_path / "o.safetensors", num_heads=4, progress=False)
    src = write_checkpoint(tmp_path / "d", params, 1, ema=False, args={"model": "DiT_Llama_3B_patch2"})
    with pytest.raises(ConvertError, match="does not match a Large-DiT|divisible|even integer"):
        convert_large_dit(str(src), tmp_path / "o.safetensors", progress=False)
    src = write_checkpoint(tmp_path / "e", params, 1, ema=False, args={"qk_norm": False})
    with pytest.raises(ConvertError, match="qk_norm=False but the tensors have"):
        convert_large_dit(str(src), tmp_path / "o.safetensors", num_heads=4, progress=False)


def test_hostile_checkpoints_are_refused_before_anything_is_sized(params, tmp_path):
    src = write_checkpoint(tmp_path / "a", params, 1, ema=False)
    os.rename(src / "consolidated.00-of-01.pth", src / "consolidated.00-of-99999999.pth")    # not a rank name
    with pytest.raises(ConvertError, match="no consolidated.RR-of-MM.pth"):
        convert_large_dit(str(src), tmp_path / "o.safetensors", num_heads=4, progress=False)
    os.rename(src / "consolidated.00-of-99999999.pth", src / "consolidated.00-of-9999.pth")  # 1 shard of 9999
    with pytest.raises(ConvertError, match="not ranks 00..9998 of 9999"):
        convert_large_dit(str(src), tmp_path / "o.safetensors", num_heads=4, progress=False)
    big = torch.zeros(1).expand(10 ** 6)                                      # one float seen a million times
    sd = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in params.items())
    sd["layers.0.ffn_norm.weight"] = big[:QKNORM.hidden_size]
    torch.save(sd, tmp_path / "expand.pth")
    with pytest.raises(ConvertError, match="visits storage elements more than once"):
        convert_large_dit(str(tmp_path / "expand.pth"), tmp_path / "o.safetensors", num_heads=4, progress=False)
    torch.save(collections.OrderedDict([(7, torch.zeros(2))]), tmp_path / "intkey.pth")
    with pytest.raises(ConvertError, match="entry 7 holds a TensorRef: expected a state dict of tensors by name"):
        convert_large_dit(str(tmp_path / "intkey.pth"), tmp_path / "o.safetensors", progress=False)
    with pytest.raises(ConvertError, match="the output is the checkpoint itself"):
        convert_large_dit(str(tmp_path / "expand.pth"), tmp_path / "expand.pth", progress=False, overwrite=True)
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_command_line(params, tmp_path, capsys):
    """`tinylazy convert-large-dit` (and python -m tinylazy.convert_large_dit) follows tinylazy.cli."""
    src = write_checkpoint(tmp_path / "ckpt", params, 2, ema=False)
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "tinylazy.convert_large_dit"]
    ok = subprocess.run(cmd + [str(src), str(out), "--num-heads", "4", "--input-size", "8"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "2 shard(s)" in ok.stdout
    before = out.read_bytes()
    for args, match in (([str(tmp_path / "nope"), str(out)], "SRC " + str(tmp_path / "nope") + ": no such file or "
                                                                                                   "folder"),
                        ([str(src), str(tmp_path / "no" / "m.safetensors")], "does not exist; create it first"),
                        ([str(src), str(tmp_path)], "is a folder; give a file name in it"),
                        ([str(src), str(tmp_path / "x.bin")], "unknown extension '.bin'"),
                        ([str(src), str(out)], "exists; choose another file (pass --force to replace it)"),
                        ([str(src), str(tmp_path / "x.safetensors"), "--num-heads", "0"],
                         "--num-heads must be an integer >= 1, got 0"),
                        ([str(src), str(tmp_path / "x.safetensors")], "number of attention heads")):
        assert cli.main(["convert-large-dit", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1, (args, err)
    assert out.read_bytes() == before and not os.path.exists(tmp_path / "x.safetensors")
    assert cli.main(["convert-large-dit", str(src), str(out), "--num-heads", "4", "--dtype", "bfloat16",
                     "--force"]) == 0
    assert tl.load_dit(out).params.stored["layers.0.attention.wq.weight"].st_dtype == "BF16"
