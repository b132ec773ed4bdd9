"""Convert official Large-DiT checkpoints (all model-parallel shards merged) to one safetensors file.

    tinylazy convert-large-dit CHECKPOINT_DIR out.safetensors [--dtype bfloat16]   # or python -m tinylazy.convert_large_dit

The official ``train.py`` (LLaMA2-Accessory ``Large-DiT-ImageNet``) saves a checkpoint as a
folder: per model-parallel rank r of M, ``consolidated.{r:02d}-of-{M:02d}.pth`` (the model)
and ``consolidated_ema.{r:02d}-of-{M:02d}.pth`` (its EMA, which ``sample.py`` loads by
default), plus ``model_args.pth`` (the training arguments, a pickled argparse.Namespace),
``optimizer.*.pth`` and ``resume_step.txt``.  Each rank holds its slice of every
fairscale-parallel tensor:

* ColumnParallelLinear (x_embedder, t_embedder.mlp.0, wq, wk, wv, w1, w3, every
  adaLN_modulation.1, final_layer.linear): weight and bias split on the output rows;
* RowParallelLinear (t_embedder.mlp.2, wo, w2): weight split on the input columns, the
  bias whole on every rank;
* ParallelEmbedding (y_embedder.embedding_table): split on the embedding columns;
* the RMSNorms (attention_norm, ffn_norm) are whole on every rank; the q/k LayerNorms are
  per rank, over that rank's heads: merged, they normalise M groups (``qk_norm_groups``).

A single ``.pth`` state dict (one rank, or the file LazyDiT's scripts load) converts too.
Every file is read with ``tinylazy.convert``'s restricted unpickler under its limits (no code
from it runs; every tensor view is checked against its storage before any data is read); the
shard names, the names and shapes in them and model_args.pth are checked before the output is
sized, and the output is written to a temporary file and renamed.  LazyDiT's Large-DiT gate
checkpoints are LazyDiT's usual gate files and convert with ``tinylazy convert``
(``lazy.load_gates`` reads them).
"""
import os
import re
import sys

import numpy as np

from . import cli
from .convert import Checkpoint, ConvertError, TensorRef, check_output, check_tensors, select_state_dict
from .io import WeightsError, describe_value
from .large_dit import LARGE_DIT_CONFIGS
from .large_dit_io import STORAGES, infer_config, save_large_dit, validate
from .storage import Bfloat16Array

SHARD = re.compile(r"consolidated(_ema)?\.(\d{2,4})-of-(\d{2,4})\.pth")     # fairscale ranks: {:02d}
MODEL_ARGS = "model_args.pth"

# How each name is split over the ranks: the axis the slices are concatenated on, or None
# (whole on every rank: the slices must be equal).
_SPLITS = [
    (r"x_embedder\.(weight|bias)", 0),
    (r"t_embedder\.mlp\.0\.(weight|bias)", 0),
    (r"t_embedder\.mlp\.2\.weight", 1),
    (r"t_embedder\.mlp\.2\.bias", None),
    (r"y_embedder\.embedding_table\.weight", 1),
    (r"layers\.\d+\.attention\.w[qkv]\.weight", 0),
    (r"layers\.\d+\.attention\.wo\.weight", 1),
    (r"layers\.\d+\.attention\.[qk]_norm\.(weight|bias)", 0),      # per rank: its own heads
    (r"layers\.\d+\.feed_forward\.w[13]\.weight", 0),
    (r"layers\.\d+\.feed_forward\.w2\.weight", 1),
    (r"layers\.\d+\.(attention_norm|ffn_norm)\.weight", None),
    (r"layers\.\d+\.adaLN_modulation\.1\.(weight|bias)", 0),
    (r"final_layer\.(linear|adaLN_modulation\.1)\.(weight|bias)", 0),
]
_STORED = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}


def split_axis(name):
    """The axis ``name`` is split on over model-parallel ranks (None: whole on every rank)."""
    for pattern, axis in _SPLITS:
        if re.fullmatch(pattern, name):
            return axis
    raise ConvertError(f"{name!r} is not a Large-DiT parameter (no official model-parallel layout for it)")


def find_shards(src, ema=None):
    """The checkpoint files of ``src`` in rank order: a folder's consolidated shards (EMA ones
    when ``ema`` is True, or None and they exist: the official sample.py default) or one file."""
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: no such file or folder" if not os.path.exists(src) else
                           f"{src} is not a regular file (a FIFO or a device); give a file or a folder")
    found = {}
    for n in os.listdir(src):
        m = SHARD.fullmatch(n)
        if m:
            found.setdefault(bool(m.group(1)), []).append((int(m.group(2)), int(m.group(3)), n))
    if ema is None:
        ema = True in found
    shards = sorted(found.get(ema, []))
    kind = "consolidated_ema" if ema else "consolidated"
    if not shards:
        raise ConvertError(f"{src}: no {kind}.RR-of-MM.pth files (an official Large-DiT checkpoint folder)")
    M = shards[0][1]
    if len(shards) != M or [(r, m) for r, m, _ in shards] != [(r, M) for r in range(M)]:
        raise ConvertError(f"{src}: the {kind} shards are not ranks 00..{M - 1:02d} of {M:02d}: "
                           f"{', '.join(n for _, _, n in shards)}")
    return [os.path.join(src, n) for _, _, n in shards]


def read_model_args(src):
    """The plain fields of ``model_args.pth`` beside the shards ({} when there is none)."""
    path = os.path.join(src, MODEL_ARGS) if os.path.isdir(src) else None
    if path is None or not os.path.isfile(path):
        return {}
    ckpt = Checkpoint(path)
    try:
        return dict(getattr(ckpt.obj, "fields", {}))
    finally:
        ckpt.close()


def _meta_from_args(args, src):
    """What model_args.pth tells that the tensors cannot: heads (by the registered model) and the latent size."""
    meta = {}
    model = args.get("model")
    if model is not None:
        if model not in LARGE_DIT_CONFIGS:
            raise ConvertError(f"{src}/{MODEL_ARGS}: model {describe_value(model)} is not one of "
                               f"{', '.join(LARGE_DIT_CONFIGS)}")
        meta["num_heads"] = LARGE_DIT_CONFIGS[model].num_heads
    if type(args.get("image_size")) is int:
        if args["image_size"] % 8:
            raise ConvertError(f"{src}/{MODEL_ARGS}: image_size {args['image_size']} is not a multiple of 8")
        meta["input_size"] = args["image_size"] // 8                          # the VAE's factor (train.py)
    return meta


class _Merged:
    """One parameter merged from its rank slices, read when written."""

    def __init__(self, name, refs, axis):
        self.name, self.refs, self.axis = name, refs, axis

    def shape(self):
        shapes = [r.shape for r in self.refs]
        if any(len(s) != len(shapes[0]) for s in shapes):
            raise ConvertError(f"{self.name}: the ranks hold slices of different ranks {shapes}")
        if self.axis is None or len(self.refs) == 1:
            if any(s != shapes[0] for s in shapes):
                raise ConvertError(f"{self.name}: should be whole on every rank, got shapes {shapes}")
            return shapes[0]
        other = [s[:self.axis] + s[self.axis + 1:] for s in shapes]
        if any(o != other[0] for o in other):
            raise ConvertError(f"{self.name}: rank slices {shapes} differ off the split axis {self.axis}")
        s = list(shapes[0])
        s[self.axis] = sum(x[self.axis] for x in shapes)
        return tuple(s)

    def dtype(self):
        dtypes = {r.st_dtype for r in self.refs}
        if not dtypes <= set(_STORED):
            raise ConvertError(f"{self.name}: not a float tensor ({', '.join(sorted(dtypes))})")
        return dtypes.pop() if len(dtypes) == 1 else "F32"

    def __call__(self):
        dtype = self.dtype()
        parts = [_values(r, dtype) for r in self.refs]
        if self.axis is None or len(parts) == 1:
            if any(not np.array_equal(p, parts[0]) for p in parts[1:]):
                raise ConvertError(f"{self.name}: should be equal on every rank, but the ranks differ")
            a = parts[0]
        else:
            a = np.concatenate(parts, axis=self.axis)
        return Bfloat16Array(a) if dtype == "BF16" else a


def _values(ref, dtype):
    """A tensor's values: as stored when that is ``dtype`` (bfloat16: raw uint16), else float32."""
    a = ref.read()
    if ref.st_dtype == dtype:
        return a
    return Bfloat16Array(a).astype(np.float32) if ref.st_dtype == "BF16" else a.astype(np.float32)


def convert_large_dit(src, dst, dtype="float32", ema=None, num_heads=None, input_size=None, progress=True,
                      overwrite=False):
    """Merge the official checkpoint ``src`` (a folder of shards, or one .pth) into ``dst``.

    dtype: "float32" (bfloat16/float16 widened exactly), "bfloat16", "float16", "float64"
    or "keep" (as stored).  ``dst`` may not be one of the files read, and may not exist
    unless ``overwrite``.  Returns (the LargeDiTConfig, the shard files read)."""
    if dtype != "keep" and dtype not in STORAGES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGES)} or keep, got {dtype!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    files = find_shards(src, ema)
    model_args = os.path.join(src, MODEL_ARGS)
    check_output(files + ([model_args] if os.path.isdir(src) and os.path.exists(model_args) else []), dst, overwrite)
    args = read_model_args(src)
    ckpts = []
    try:
        states = []
        for path in files:
            ckpts.append(Checkpoint(path))
            _, tree = select_state_dict(ckpts[-1].obj, "auto", path)
            bad = next(((k, v) for k, v in tree.items() if type(k) is not str or not isinstance(v, TensorRef)), None)
            if bad is not None:
                raise ConvertError(f"{path}: entry {describe_value(bad[0])} holds a {type(bad[1]).__name__}: "
                                   f"expected a state dict of tensors by name")
            check_tensors(ckpts[-1], tree)
            states.append(tree)
        names = list(states[0])
        for path, tree in zip(files[1:], states[1:]):
            if set(tree) != set(names):
                diff = sorted(set(tree) ^ set(names))
                raise ConvertError(f"{path}: holds other names than {files[0]}: {', '.join(diff[:5])}")
        merged = {k: _Merged(k, [s[k] for s in states], split_axis(k)) for k in names}
        shapes = {k: m.shape() for k, m in merged.items()}
        dtypes = {k: m.dtype() for k, m in merged.items()}
        meta = _meta_from_args(args, src)
        if len(files) > 1 and any(".q_norm." in k for k in names):
            meta["qk_norm_groups"] = len(files)
        if args.get("qk_norm") is not None and bool(args["qk_norm"]) != any(".q_norm." in k for k in names):
            raise ConvertError(f"{src}/{MODEL_ARGS}: qk_norm={args['qk_norm']} but the tensors "
                               f"{'lack' if args['qk_norm'] else 'have'} q_norm/k_norm")
        try:
            cfg = infer_config(src, shapes, meta, num_heads, input_size)
            validate(src, shapes, dtypes, cfg)
        except WeightsError as e:
            raise ConvertError(str(e)) from None
        storage = dtype
        if dtype == "keep":
            kinds = set(dtypes.values())
            if len(kinds) != 1:
                raise ConvertError(f"{src}: --dtype keep needs one stored dtype, the tensors have {sorted(kinds)}")
            storage = _STORED[kinds.pop()]
        source = ", ".join(os.path.basename(f) for f in files)
        save_large_dit(merged, cfg, dst, storage=storage, record_hash=False, progress="convert" if progress else None,
                       metadata={"source": source, "converter": "tinylazy.convert_large_dit",
                                 "model_parallel_size": str(len(files))})
    finally:
        for c in ckpts:
            c.close()
    return cfg, files


# ----------------------------------------------------------------------------
# Command line (tinylazy.cli: bad input exit 2, a failed run exit 1, Ctrl-C 130)

def add_arguments(p):
    p.add_argument("src", help="an official Large-DiT checkpoint folder (consolidated[_ema].RR-of-MM.pth shards, "
                               "model_args.pth) or one .pth state dict")
    p.add_argument("dst", help="output .safetensors file (written atomically; never an input)")
    p.add_argument("--dtype", choices=STORAGES + ("keep",), default="float32",
                   help="stored dtype: float32 (default; bf16/f16 widened exactly), bfloat16 or float16 (rounded "
                        "to nearest even; half the size: a 7B model is 14.6 GB), float64, or keep (as stored)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="the EMA weights (consolidated_ema.*; the default when present, as sample.py)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="the trained weights (consolidated.*)")
    p.add_argument("--num-heads", type=cli.number(int, 1), help="attention heads (default: from model_args.pth, "
                                                                "else 32 for the official widths)")
    p.add_argument("--input-size", type=cli.number(int, 1), help="latent size H = W (default: model_args.pth "
                                                                 "image_size / 8, else 32)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args):
    cli.input_file(args.src, "SRC", folder=True)
    cli.output_file(args.dst, "DST", (".safetensors",), inputs={"SRC": args.src}, force=args.force, replace=False)
    cfg, files = convert_large_dit(args.src, args.dst, args.dtype, args.ema, args.num_heads, args.input_size,
                                   overwrite=bool(args.force))
    print(f"wrote {args.dst}: Large-DiT depth {cfg.depth}, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
          f"qk_norm {cfg.qk_norm} ({cfg.qk_norm_groups} group(s)), {args.dtype}, from {len(files)} shard(s)")


def main(argv=None, prog=None):
    return cli.run_command("convert-large-dit", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.convert_large_dit"))
