"""The hostile-file campaign of issue #16: damaged and crafted inputs for every surface that reads a file.

    python benchmarks/fuzz_campaign.py [--seed 0] [--scale 1] [--json out.json] [--keep DIR]

Builds undamaged files of every kind (small models from tests/fuzz_cases.py, the bundled DiT, its gates
and a golden trace, a real torch.save checkpoint when torch is installed), then, with seeded random
generators, damaged and crafted variants of them: bit flips in the header and in the data, truncations,
header lengths off by a little or a lot, trailing bytes, structural header edits, metadata and
config.json edits, block and step indices that would size allocations, converter amplifications
(strided views, deflate and pickle bombs, memo indices), 40 code-running pickles, FIFOs and folders,
resume-checkpoint fields, trace manifests, and the large classes at full size (a 100 MiB header of
1.78 M empty entries, an 8 MiB header of 1-byte tensors).  Every input runs in a child process under
an address-space limit (tests/fuzz_cases.py), and the outcomes are counted per surface:

    clear error        one of tinylazy's typed errors (WeightsError family, GatesError, TraceError) naming
                       the file, nothing written
    other exception    any other exception (MemoryError, RecursionError, TypeError, ...), or a typed one that
                       does not name the file or wrote something
    crash/hang         the child died, or no result in 30 s
    silent wrong load  loaded, and what loaded differs from the undamaged input, in a file that carries a
                       hash or checksum (the bundled DiT's weights_hash for load_dit, a zip's CRC-32)
    code executed      a file that a payload in the input would have created exists
    change, no checksum  loaded and different, from an input whose format has no checksum (gates, traces,
                       checkpoints, VAE weights, a DiT saved without a hash, and any file for the raw reader):
                       a flipped value (or an edit to a value that stays valid) cannot be told from the
                       original; counted, with what changed
    loaded as it should  loaded and the same as the undamaged input (a flip in JSON whitespace, in a
                       metadata text nothing reads, in a part that is not read), or a crafted input that is
                       valid

Exit status 0 when the last four columns of the issue (other, crash/hang, silent wrong, code executed)
are zero, every case took under 2 s of CPU and its peak RSS stayed under 200 MiB above the start; 1
otherwise.  Wall time is reported too: on a shared machine it counts the neighbours' work.
Takes a few minutes on 2 cores; writes ~110 MB of temporary files (deleted unless --keep).
"""
import argparse
import collections
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import fuzz_cases as F  # noqa: E402

COLUMNS = ["clear error", "other exception", "crash/hang", "silent wrong load", "code executed",
           "change, no checksum", "loaded as it should"]
BUNDLED = os.path.join(ROOT, "weights", "tiny-dit-digits.safetensors")
# Inputs whose format carries no checksum: a change that keeps them valid cannot be told from an edit.
HASHLESS = {"dit:nohash", "dit:diffusers", "vae", "gates:bundled", "train_ckpt", "gate_ckpt", "trace:small",
            "trace:golden"}


class Campaign:
    def __init__(self, folder, seed, scale):
        self.folder, self.scale = folder, scale
        self.rng = random.Random(seed)
        self.jobs = []
        self.refs = []                 # the undamaged inputs: run first, their fingerprints become the refs

    def job(self, surface, case, op, build, base, setup=None, args=None, nohash=None):
        """Add a case: ``build(dir)`` writes the input and returns its path; ``base`` names the undamaged
        input it was made from (its fingerprint is the reference)."""
        d = os.path.join(self.folder, "cases", f"{len(self.jobs):05d}")
        os.makedirs(d)
        path = build(d)
        if nohash is None:
            nohash = base in HASHLESS
        self.jobs.append({"id": len(self.jobs), "surface": surface, "case": case, "op": op, "path": path, "dir": d,
                          "setup": setup, "args": args(d) if callable(args) else dict(args or {}),
                          "marker": os.path.join(d, "pwned"), "base": base, "nohash": nohash})

    def reference(self, base, surface, op, path, setup=None, args=None):
        self.refs.append({"id": f"ref:{base}", "surface": surface, "case": "undamaged", "op": op, "path": path,
                          "setup": setup, "args": dict(args or {}), "base": base})

    def n(self, count):
        return max(1, int(round(count * self.scale)))


# ----------------------------------------------------------------------------
# Mutations of safetensors bytes

def flips(rng, raw, lo, hi, count):
    """``count`` copies of ``raw``, each with one random bit flipped in [lo, hi)."""
    out = []
    for _ in range(count):
        b = bytearray(raw)
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)
        out.append((f"bit flip at byte {i}", bytes(b)))
    return out


def framing(rng, raw, count):
    """Truncations, header lengths off by a little or a lot, trailing bytes."""
    n = struct.unpack("<Q", raw[:8])[0]
    out = [(f"header length {d:+d}", F.shifted(raw, -d)) for d in (-7, -5, -3, -2, -1, 1, 2, 3, 5, 7)]
    out += [(f"header length {v}", struct.pack("<Q", v) + raw[8:])
            for v in (0, 1, 7, n * 2, 1 << 32, (1 << 64) - 1, len(raw), len(raw) - 8, 100 << 20)]
    out += [(f"truncated to {k}", raw[:k]) for k in sorted(rng.sample(range(0, len(raw)), min(count, len(raw))))]
    out += [("trailing 1 byte", raw + b"\0"), ("trailing 8 bytes", raw + bytes(8)),
            ("trailing copy", raw + raw), ("empty file", b"")]
    return out


def header_edits(raw):
    """Structural edits of the JSON header (the first tensor's entry, the metadata, the text itself)."""
    header, data = F.split(raw)
    names = [k for k in header if k != "__metadata__"]
    k0 = names[0]
    e0 = header[k0]
    out = []

    def with_entry(label, **change):
        out.append((label, F.join(dict(header, **{k0: dict(e0, **change)}), data)))

    for dtype in (["F32"], {"F32": 1}, 4, None, "Q4", "f32", "F8_E4M3", "BF16", "I32", "BOOL", "U64"):
        with_entry(f"dtype {json.dumps(dtype)}", dtype=dtype)
    for shape in ([-1], [1.5], ["2"], [[1]], [1] * 33, [1 << 62, 1 << 62], [], [0], None, 5, [True]):
        with_entry(f"shape {json.dumps(shape)[:30]}", shape=shape)
    a, b = e0["data_offsets"]
    for offs in ([b, a], [a], [a, b, b], [a + 0.0, b], [-4, b - 4], [a, 1 << 70], ["0", b], [a + 4, b + 4], None,
                 [len(data) + 4, len(data) + 4 + b - a]):
        with_entry(f"data_offsets {json.dumps(offs)}", data_offsets=offs)
    with_entry("extra key", extra=1)
    out.append(("entry not an object", F.join(dict(header, **{k0: [e0]}), data)))
    out.append(("a second entry over the first's bytes", F.join(dict(header, dup=e0), data)))
    meta = header.get("__metadata__", {})
    for label, m in (("metadata value a number", dict(meta, x=1)), ("metadata a list", ["x"]),
                     ("metadata value nested", dict(meta, x={"a": "b"})), ("metadata null", None)):
        out.append((label, F.join(dict(header, __metadata__=m), data)))
    n = struct.unpack("<Q", raw[:8])[0]
    text = raw[8:8 + n].decode().rstrip()
    for label, t in (
            ("duplicate key", text.replace("{", '{"' + k0 + '":' + json.dumps(e0) + ",", 1)),
            ("NaN offset", text.replace(json.dumps(e0["data_offsets"]).replace(" ", ""), "[0,NaN]", 1)),
            ("nested 10^5", "[" * 100000 + "]" * 100000),
            ("5000-digit integer", text.replace(f'"data_offsets":[{a},', f'"data_offsets":[{"1" * 5000},', 1)),
            ("header a list", "[" + text + "]"), ("header a string", json.dumps(text)), ("header empty", ""),
            ("header {}", "{}"), ("trailing comma", text.rstrip()[:-1] + ",}"), ("not JSON", "not json at all")):
        out.append((label, F.join(t.encode(), data)))
    for label, enc in (("invalid UTF-8", b"\xff" + text.encode()[1:]), ("UTF-16 header", text.encode("utf-16")),
                       ("BOM", b"\xef\xbb\xbf" + text.encode())):
        out.append((label, F.join(enc, data)))
    return out


def add_files(camp, surface, op, base, raw, name, setup=None, args=None, nohash=False, data_flips=0,
              header_flips=0, structure=True):
    """The standard battery on one safetensors input."""
    ds = F.data_start(raw)
    cases = []
    cases += [(f"header {label}", r) for label, r in flips(camp.rng, raw, 8, ds, camp.n(header_flips))]
    cases += [(f"data {label}", r, True) for label, r in flips(camp.rng, raw, ds, len(raw), camp.n(data_flips))] \
        if ds < len(raw) else []
    cases += framing(camp.rng, raw, camp.n(8))
    if structure:
        cases += header_edits(raw)
    for c in cases:
        label, r = c[0], c[1]
        flip = len(c) > 2
        camp.job(surface, label, op, lambda d, r=r: F.write(f"{d}/{name}", r), base, setup, args,
                 nohash=nohash)


# ----------------------------------------------------------------------------
# Surfaces

def surface_read(camp, files):
    for kind in ("dit_hash", "gates", "trace", "train_ckpt"):
        raw = open(files[kind], "rb").read()
        camp.reference(f"read:{kind}", "read", "read", files[kind])
        add_files(camp, "read", "read", f"read:{kind}", raw, "f.safetensors", nohash=True,
                  data_flips=10, header_flips=25, structure=kind == "dit_hash")
    big = camp.folder + "/big"
    os.makedirs(big, exist_ok=True)
    camp.job("read", "100 MiB header, 1.78 M zero-size entries", "read",
             lambda d: F.write(f"{d}/h.safetensors", F.empty_entries_header(1_780_000)), None)
    camp.job("read", "100 MiB header of holes (sparse)", "read",
             lambda d: F.sparse(f"{d}/h.safetensors", (100 << 20) - 8, 100 << 20), None)
    camp.job("read", "just under 8 MiB: 120k zero-size entries", "read",
             lambda d: F.write(f"{d}/h.safetensors", F.empty_entries_header(120_000)), None)
    camp.job("read", "just under 8 MiB: 110k one-byte tensors (valid)", "read",
             lambda d: F.write(f"{d}/h.safetensors", one_byte_tensors(110_000)), None)
    camp.job("read", "just under 8 MiB: 700k metadata pairs (valid)", "read",
             lambda d: F.write(f"{d}/h.safetensors", metadata_pairs(700_000)), None)
    camp.job("read", "just under 8 MiB: 2M-element list", "read",
             lambda d: F.write(f"{d}/h.safetensors", F.join(b'{"__metadata__":' + b"[" + b"0," * 2_000_000 + b"0]}")),
             None)
    camp.job("read", "1.78 M zero-size entries backed by 100 MiB of data (sparse)", "read",
             lambda d: _sparse_data(f"{d}/h.safetensors", F.empty_entries_header(1_780_000), 100 << 20), None)
    camp.job("read", "1.78 M zero-size entries backed by 1.6 GB of data (sparse)", "read",
             lambda d: _sparse_data(f"{d}/h.safetensors", F.empty_entries_header(1_780_000), 1600 << 20), None)
    camp.job("read", "9 MiB header of overlapping 1-byte tensors over 16x its size (sparse)", "read",
             lambda d: _sparse_data(f"{d}/h.safetensors", overlapping(150_000), 150 << 20), None)
    for label, make in (("FIFO", lambda d: F._fifo(f"{d}/f.safetensors")), ("folder", lambda d: d),
                        ("/dev/zero", lambda d: "/dev/zero"), ("/dev/null", lambda d: "/dev/null"),
                        ("symlink to a FIFO", lambda d: _link(F._fifo(f"{d}/fifo"), f"{d}/l.safetensors")),
                        ("missing", lambda d: f"{d}/nothing.safetensors")):
        camp.job("read", label, "read", make, None)


def one_byte_tensors(n):
    body = ",".join(f'"t{i}":{{"dtype":"BOOL","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n))
    return F.join(("{" + body + "}").encode(), bytes(n))


def overlapping(n):
    """A header of ``n`` one-byte tensors all claiming byte 0 (refused only once the whole header is parsed)."""
    body = ",".join(f'"t{i:x}":{{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}' for i in range(n))
    return ("{" + body + "}").encode()


def _sparse_data(path, header, nbytes):
    """``header`` (bytes, or a file's bytes whose header is used) followed by ``nbytes`` of holes."""
    raw = header if header[:1] == b"{" else header[8:8 + struct.unpack("<Q", header[:8])[0]]
    with open(path, "wb") as f:
        f.write(F.join(raw))
        f.truncate(f.tell() + nbytes)
    return path


def metadata_pairs(n):
    body = ",".join(f'"{i:x}":""' for i in range(n))
    return F.join(('{"__metadata__":{' + body + "}}").encode())


def _link(target, path):
    os.symlink(target, path)
    return path


def surface_load_dit(camp, files):
    camp.reference("dit:bundled", "load_dit", "load_dit", BUNDLED)
    raw = open(BUNDLED, "rb").read()
    add_files(camp, "load_dit", "load_dit", "dit:bundled", raw, "w.safetensors", data_flips=100, header_flips=60,
              structure=False)
    camp.reference("dit:nohash", "load_dit", "load_dit", files["dit_nohash"])
    add_files(camp, "load_dit", "load_dit", "dit:nohash", open(files["dit_nohash"], "rb").read(), "w.safetensors",
              nohash=True, data_flips=30, header_flips=20, structure=False)
    header, data = F.split(raw)
    meta = header["__metadata__"]
    for label, m in (
            [(f"num_heads {v!r}", dict(meta, num_heads=v)) for v in ("2", "8", "16", "3", "0", "-4", "4.0", "x", "",
                                                                     "1" * 30)]
            + [(f"num_heads 2 and config heads 2", dict(meta, num_heads="2",
                                                         config=meta["config"].replace('"num_heads": 4',
                                                                                       '"num_heads": 2')))]
            + [(f"config {k} {v!r}", dict(meta, config=json.dumps(dict(json.loads(meta["config"]), **{k: v}))))
               for k, v in (("depth", 7), ("input_size", 4096), ("mlp_ratio", 1e308), ("mlp_ratio", 2.0),
                            ("learn_sigma", False), ("class_dropout_prob", 0.0), ("class_dropout_prob", 5),
                            ("num_classes", 11), ("hidden_size", "128"), ("patch_size", True))]
            + [("config not JSON", dict(meta, config="{")), ("config a list", dict(meta, config="[]")),
               ("config nested", dict(meta, config="[" * 10000)),
               ("weights_hash random", dict(meta, weights_hash="0" * 64)),
               ("weights_hash not hex", dict(meta, weights_hash="x")),
               ("weights_hash v1 value", dict(meta, weights_hash="397f10f1478ea5429b20f314bea26170db6c778731fd2262"
                                                                 "759f1bf9ec6c93a2"))]):
        camp.job("load_dit", f"metadata {label}", "load_dit",
                 lambda d, m=m: F.write(f"{d}/w.safetensors", F.join(dict(header, __metadata__=m), data)),
                 "dit:bundled")
    zero = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    for label, extra in ([(f"zero-byte blocks.{i[:12]}.x", {f"blocks.{i}.x": zero})
                          for i in ("6", "7", "99", "99999", "999999", "99999999", "1" + "0" * 12, "9" * 5000)]
                         + [("blocks.06.x", {"blocks.06.x": zero}), ("blocks.-1.x", {"blocks.-1.x": zero}),
                            ("stray final_layer.x", {"final_layer.x": zero})]):
        camp.job("load_dit", label, "load_dit", lambda d, e=extra: F.write(f"{d}/w.safetensors", F.join(
            dict(header, **e), data)), "dit:bundled")
    for label, drop in (("drop blocks.5.*", "blocks.5."), ("drop blocks.0.*", "blocks.0."),
                        ("drop pos_embed", "pos_embed"), ("drop y_embedder", "y_embedder")):
        kept = {k: v for k, v in header.items() if not k.startswith(drop)}
        camp.job("load_dit", label, "load_dit", lambda d, h=kept: F.write(f"{d}/w.safetensors", _repack(h, data)),
                 "dit:bundled")
    renamed = {("blocks.7." + k[len("blocks.5."):] if k.startswith("blocks.5.") else k): v for k, v in header.items()}
    camp.job("load_dit", "blocks.5 renamed blocks.7 (a hole)", "load_dit",
             lambda d: F.write(f"{d}/w.safetensors", F.join(renamed, data)), "dit:bundled")
    # diffusers folders
    camp.reference("dit:diffusers", "load_dit", "load_dit", files["diffusers"])
    for k, v in (("sample_size", 4096), ("sample_size", 1024), ("sample_size", 7), ("sample_size", 8.0),
                 ("sample_size", True), ("sample_size", None), ("sample_size", -8), ("sample_size", 10 ** 30),
                 ("num_attention_heads", 2), ("num_attention_heads", 0), ("num_attention_heads", "4"),
                 ("num_attention_heads", 1e999), ("attention_head_dim", 5), ("num_layers", 3), ("num_layers", 10 ** 8),
                 ("in_channels", [4]), ("out_channels", 4), ("patch_size", 4), ("num_embeds_ada_norm", 1000)):
        camp.job("load_dit", f"config.json {k} {v!r}", "load_dit",
                 lambda d, k=k, v=v: F._copy_folder(files["diffusers"], f"{d}/m", raw_config=_config_text(
                     files["diffusers"], k, v)), "dit:diffusers")
    for label, text in (("a list", "[1]"), ("not JSON", "{"), ("nested 10^5", "[" * 100000),
                        ("Infinity", '{"sample_size": Infinity}'), ("2 MiB", '{"x": "' + "a" * (2 << 20) + '"}'),
                        ("Latin-1, not UTF-8", b'{"_class_name": "\xe9"}')):
        camp.job("load_dit", f"config.json {label}", "load_dit",
                 lambda d, t=text: F._copy_folder(files["diffusers"], f"{d}/m", raw_config=t), "dit:diffusers")
    camp.job("load_dit", "config.json a FIFO", "load_dit", lambda d: _fifo_config(files["diffusers"], f"{d}/m"),
             "dit:diffusers")
    for label, shard in (("../outside", "../x.safetensors"), ("absolute", "/tmp/x.safetensors"),
                         ("subfolder", "sub/x.safetensors"), ("not .safetensors", "x.bin"), ("empty", ""),
                         ("NUL", "x\0.safetensors"), ("dot-dot", "..")):
        camp.job("load_dit", f"index shard {label}", "load_dit",
                 lambda d, s=shard: _sharded_safe(files["diffusers"], f"{d}/m", s), "dit:diffusers")
    camp.job("load_dit", "index shard a symlink out of the folder", "load_dit",
             lambda d: _sharded_link(files["diffusers"], f"{d}/m"), "dit:diffusers")
    add_files(camp, "load_dit", "load_dit", "dit:diffusers",
              open(os.path.join(files["diffusers"], "diffusion_pytorch_model.safetensors"), "rb").read(),
              "diffusion_pytorch_model.safetensors", nohash=True, data_flips=10, header_flips=10, structure=False)
    # the add_files jobs above wrote single files; make them folders with the original config.json
    for job in camp.jobs:
        if job["base"] == "dit:diffusers" and job["path"].endswith("diffusion_pytorch_model.safetensors"):
            shutil.copy(os.path.join(files["diffusers"], "config.json"), job["dir"])
            job["path"] = job["dir"]


def _repack(header, data):
    """A header with tensors removed, the data re-laid out so that it stays exactly covered."""
    meta = header.get("__metadata__")
    out, chunks, at = ({"__metadata__": meta} if meta else {}), [], 0
    for k, e in header.items():
        if k == "__metadata__":
            continue
        a, b = e["data_offsets"]
        out[k] = dict(e, data_offsets=[at, at + b - a])
        chunks.append(data[a:b])
        at += b - a
    return F.join(out, b"".join(chunks))


def _config_text(folder, key, value):
    conf = json.load(open(os.path.join(folder, "config.json")))
    conf[key] = value
    return json.dumps(conf)


def _fifo_config(src, dst):
    F._copy_folder(src, dst)
    os.remove(os.path.join(dst, "config.json"))
    os.mkfifo(os.path.join(dst, "config.json"))
    return dst


def _sharded_safe(src, dst, shard):
    try:
        return F._sharded(src, dst, shard)
    except (OSError, ValueError):          # the shard itself cannot be written there: the index still names it
        return dst


def _sharded_link(src, dst):
    F._sharded(src, dst, "b.safetensors")
    outside = os.path.join(os.path.dirname(dst), "outside.safetensors")
    os.replace(os.path.join(dst, "b.safetensors"), outside)
    os.symlink(outside, os.path.join(dst, "b.safetensors"))
    return dst


def surface_load_vae(camp, files):
    camp.reference("vae", "load_vae", "load_vae", files["vae"])
    for k, vals in (("layers_per_block", (10 ** 8, 65, 0, 2.0, True, "2", None)),
                    ("block_out_channels", ([8] * 17, [8, 10 ** 9], "abc", [], [8, 1e999], [[8]], 8, [8, 12])),
                    ("norm_num_groups", (10 ** 6, 0, 3, -4)), ("latent_channels", (10 ** 8, 0, 1.5)),
                    ("in_channels", (10 ** 9, [3])), ("scaling_factor", (-1, 0, "x", 1e999)),
                    ("use_quant_conv", ("yes", 1)), ("down_block_types", (3, "DownEncoderBlock2D", ["X", "Y"])),
                    ("act_fn", ("relu", 3)), ("up_block_types", (["UpDecoderBlock2D"],))):
        for v in vals:
            camp.job("load_vae", f"config.json {k} {json.dumps(v)[:30]}", "load_vae",
                     lambda d, k=k, v=v: F._copy_folder(files["vae"], f"{d}/v", raw_config=_config_text(
                         files["vae"], k, v)), "vae")
    for label, text in (("a list", "[1]"), ("not JSON", "{"), ("nested 10^5", "[" * 100000), ("empty", "")):
        camp.job("load_vae", f"config.json {label}", "load_vae",
                 lambda d, t=text: F._copy_folder(files["vae"], f"{d}/v", raw_config=t), "vae")
    weights = os.path.join(files["vae"], "diffusion_pytorch_model.safetensors")
    raw = open(weights, "rb").read()
    header, data = F.split(raw)
    zero = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    for key in ("encoder.down_blocks.99999999.x", "decoder.up.99999999.block.0.x", "encoder.down_blocks.1" + "0" * 5000
                + ".x"):
        camp.job("load_vae", f"zero-byte {key[:40]}", "load_vae", lambda d, k=key: _vae_with(
            files["vae"], f"{d}/v", F.join(dict(header, **{k: zero}), data)), "vae")
    before = len(camp.jobs)
    add_files(camp, "load_vae", "load_vae", "vae", raw, "diffusion_pytorch_model.safetensors", nohash=True,
              data_flips=30, header_flips=30, structure=False)
    for job in camp.jobs[before:]:
        shutil.copy(os.path.join(files["vae"], "config.json"), job["dir"])
        job["path"] = job["dir"]


def _vae_with(src, dst, raw):
    F._copy_folder(src, dst)
    F.write(os.path.join(dst, "diffusion_pytorch_model.safetensors"), raw)
    return dst


def surface_load_gates(camp, files):
    model = {"kind": "dit", "path": BUNDLED}
    from tinylazy.lazy import gates_file
    gates = gates_file(BUNDLED, 20)
    camp.reference("gates:bundled", "load_gates", "load_gates", gates, setup=model)
    raw = open(gates, "rb").read()
    add_files(camp, "load_gates", "load_gates", "gates:bundled", raw, "g.safetensors", setup=model, nohash=True,
              data_flips=60, header_flips=40, structure=False)
    header, data = F.split(raw)
    meta = header["__metadata__"]
    for k, vals in (("num_sampling_steps", ("21", "x", "1e3", "-20", "9" * 30)),
                    ("timestep_map", ("[" + ",".join(["1" + "0" * 30] * 20) + "]", "[]", "[" * 10000, '"x"',
                                      json.dumps(list(range(20))[::-1]), json.dumps([0.5] * 20), "{",
                                      json.dumps(list(range(0, 2000, 100))))),
                    ("training", ("[1]", "{", "[" * 10000, "null")), ("depth", ("7", "x")),
                    ("hidden_size", ("64",)), ("weights_hash", ("0" * 64, "x", "")), ("format", ("other",))):
        for v in vals:
            camp.job("load_gates", f"metadata {k} {v[:30]!r}", "load_gates", lambda d, k=k, v=v: F.write(
                f"{d}/g.safetensors", F.join(dict(header, __metadata__=dict(meta, **{k: v})), data)),
                "gates:bundled", setup=model)
    D = 128
    for label, name in (("step 999999", "blocks.0.attn_lazy_learning.999999.weight"),
                        ("step 20 (a 21st)", "blocks.0.attn_lazy_learning.20.weight"),
                        ("layer 99999", "blocks.99999.attn_lazy_learning.0.weight"),
                        ("layer 6", "blocks.6.mlp_lazy_learning.0.weight"),
                        ("step 7 digits", "blocks.0.attn_lazy_learning.1234567.weight"),
                        ("official name, step 10^5", "block_0_attn_lazy_learning_weight_100000"),
                        ("not a gate", "blocks.0.attn.qkv.weight")):
        extra = {name: {"dtype": "F32", "shape": [1, D], "data_offsets": [len(data), len(data) + 4 * D]}}
        camp.job("load_gates", label, "load_gates", lambda d, e=extra: F.write(
            f"{d}/g.safetensors", F.join(dict(header, **e), data + bytes(4 * D))), "gates:bundled", setup=model)
    k0 = "blocks.0.attn_lazy_learning.0.weight"
    for dtype in ("I32", "U32", "BOOL", "I64", "F64", "F16"):
        camp.job("load_gates", f"{k0} as {dtype}", "load_gates", lambda d, t=dtype: F.write(
            f"{d}/g.safetensors", F.join(dict(header, **{k0: dict(header[k0], dtype=t)}), data)), "gates:bundled",
            setup=model)
    camp.job("load_gates", "drop one gate", "load_gates", lambda d: F.write(
        f"{d}/g.safetensors", _repack({k: v for k, v in header.items() if k != k0}, data)), "gates:bundled",
        setup=model)
    camp.job("load_gates", "gates of another model (small DiT)", "load_gates", lambda d: files["gates"],
             "gates:bundled", setup=model)


def surface_convert(camp, files):
    dst = lambda d: {"dst": f"{d}/out.safetensors"}
    camp.reference("pt:handmade", "convert", "convert", files["pt"],
                   args={"dst": os.path.join(camp.folder, "ref-out.safetensors")})
    raw = open(files["pt"], "rb").read()
    for label, r in flips(camp.rng, raw, 0, len(raw), camp.n(150)) + framing_zip(camp.rng, raw):
        camp.job("convert", label, "convert", lambda d, r=r: F.write(f"{d}/m.pt", r), "pt:handmade", args=dst)
    torch_pt = real_torch_checkpoint(camp.folder)
    if torch_pt:
        camp.reference("pt:torch", "convert", "convert", torch_pt,
                       args={"dst": os.path.join(camp.folder, "ref-torch.safetensors")})
        raw = open(torch_pt, "rb").read()
        for label, r in flips(camp.rng, raw, 0, len(raw), camp.n(100)):
            camp.job("convert", f"torch.save {label}", "convert", lambda d, r=r: F.write(f"{d}/m.pt", r),
                     "pt:torch", args=dst)
    T, P, A = F.tensor_op, F.pickle_bytes, F.archive
    for label, body, storages in (
            ("stride-0 view of 1 float as 2^28", F.dict_op([("w", T("0", 1, 0, (1 << 28,), (0,)))]), {"0": bytes(4)}),
            ("stride-0 2-D view as 2^40", F.dict_op([("w", T("0", 1, 0, (1 << 20, 1 << 20), (0, 0)))]),
             {"0": bytes(4)}),
            ("overlapping strides (2,2):(1,1)", F.dict_op([("w", T("0", 4, 0, (2, 2), (1, 1)))]), {"0": bytes(16)}),
            ("1000 views of one 64k storage", F.dict_op([(f"w{i}", T("0", 1 << 16, 0, (1 << 16,), (1,)))
                                                        for i in range(1000)]), {"0": bytes(1 << 18)}),
            ("view past its storage", F.dict_op([("w", T("0", 4, 2, (4,), (1,)))]), {"0": bytes(16)}),
            ("numel 2^60", F.dict_op([("w", T("0", 1 << 60, 0, (4,), (1,)))]), {"0": bytes(16)}),
            ("offset 2^62", F.dict_op([("w", T("0", 4, 1 << 62, (1,), (1,)))]), {"0": bytes(16)}),
            ("33 dimensions", F.dict_op([("w", T("0", 1, 0, (1,) * 33, (1,) * 33))]), {"0": bytes(4)}),
            ("storage member missing", F.dict_op([("w", T("0", 4, 0, (4,), (1,)))]), {}),
            ("storage member short", F.dict_op([("w", T("0", 4, 0, (4,), (1,)))]), {"0": bytes(12)}),
            ("one storage as two dtypes", F.dict_op([("a", T("0", 4, 0, (4,), (1,))),
                                                     ("b", T("0", 8, 0, (8,), (1,), "HalfStorage"))]),
             {"0": bytes(16)}),
            ("dicts nested 40 deep", _nested(40), {}), ("dicts nested 10^4 deep", _nested(10 ** 4), {}),
            ("a dict that contains itself", b"}q\x00(" + F._s("self") + b"h\x00u", {}),
            ("tuple key", b"}(" + F._tup(F._i(1)) + F._i(2) + b"u", {}),
            ("float key", b"}(G" + struct.pack(">d", 1.5) + F._i(2) + b"u", {}),
            ("two names flatten to a.b", F.dict_op([("a", F.dict_op([("b", T("0", 1, 0, (1,), (1,)))])),
                                                    ("a.b", T("0", 1, 0, (1,), (1,)))]), {"0": bytes(4)}),
            ("no float tensors", F.dict_op([("w", F._i(3))]), {}), ("not a dict", F._i(3), {}),
            ("LONG_BINPUT 2^30", b"Nr" + (1 << 30).to_bytes(4, "little"), {}),
            ("LONG_BINPUT 10^8", b"Nr" + (10 ** 8).to_bytes(4, "little"), {}),
            ("PUT 10^9 (text)", b"Np1000000000\n", {}), ("PUT 5000 digits", b"Np" + b"9" * 5000 + b"\n", {}),
            ("GET of nothing", b"h\x05", {}), ("LONG 5000 digits", b"L" + b"9" * 5000 + b"L\n", {}),
            ("BINBYTES8 of 2^60 bytes", b"\x8e" + (1 << 60).to_bytes(8, "little"), {}),
            ("FRAME of 2^60 bytes", b"\x95" + (1 << 60).to_bytes(8, "little"), {}),
            ("1 MiB of EMPTY_DICT (stored)", b"}" * ((1 << 20) - 16), {}),
            ("1 MiB of EMPTY_LIST + APPENDS", b"](" + b"N" * ((1 << 20) - 16) + b"e", {}),
            ("truncated pickle", F.dict_op([("w", T("0", 4, 0, (4,), (1,)))])[:-5], {"0": bytes(16)})):
        camp.job("convert", label, "convert", lambda d, b=body, s=storages: A(f"{d}/m.pt", P(b), s), None,
                 args=dst)
    camp.job("convert", "deflated storage: 256 MiB of zeros", "convert", lambda d: F._deflate_bomb(f"{d}/m.pt", 256),
             "pt:handmade", args=dst)
    camp.job("convert", "deflated storage: 1 GiB of zeros", "convert", lambda d: F._deflate_bomb(f"{d}/m.pt", 1024),
             "pt:handmade", args=dst)
    camp.job("convert", "deflated data.pkl: 300 MiB", "convert", lambda d: F._pickle_bomb(f"{d}/m.pt", 300),
             "pt:handmade", args=dst)
    camp.job("convert", "deflated data.pkl: 1 MiB of EMPTY_DICT (at the limit)", "convert",
             lambda d: F._pickle_bomb(f"{d}/m.pt", 1, less=8), None, args=dst)
    camp.job("convert", "200k empty zip entries", "convert", lambda d: _many_entries(f"{d}/m.pt", 200_000),
             None, args=dst)
    camp.job("convert", "zip names ../../evil and /abs (converts; writes only dst)", "convert",
             lambda d: _traversal(f"{d}/m.pt"), None, args=dst)
    for label, bo in (("byteorder not UTF-8", b"\xff\xfe"), ("byteorder 'middle'", b"middle"),
                      ("byteorder 10 MiB", b"l" * (10 << 20))):
        camp.job("convert", label, "convert", lambda d, bo=bo: A(f"{d}/m.pt", P(F.dict_op([])), byteorder=bo),
                 None, args=dst)
    for label, _ in F.evil_pickles("pwned"):                 # built again in each case, aimed at its marker
        camp.job("convert", f"code: {label}", "convert",
                 lambda d, label=label: A(f"{d}/m.pt", P(dict(F.evil_pickles(f"{d}/pwned"))[label])), None,
                 args=dst)
    camp.job("convert", "src == dst", "convert", lambda d: F._copy(files["pt"], f"{d}/m.pt"), "pt:handmade",
             args=lambda d: {"dst": f"{d}/m.pt"})
    camp.job("convert", "src == dst through a symlink", "convert",
             lambda d: _link(F._copy(files["pt"], f"{d}/m.pt"), f"{d}/l.pt"), "pt:handmade",
             args=lambda d: {"dst": f"{d}/m.pt"})
    camp.job("convert", "existing dst", "convert", lambda d: F._copy(files["pt"], f"{d}/m.pt", also=f"{d}/out.safetensors"),
             "pt:handmade", args=dst)
    for label, make in (("FIFO", lambda d: F._fifo(f"{d}/m.pt")), ("folder", lambda d: d),
                        ("/dev/zero", lambda d: "/dev/zero"), ("legacy pickle", lambda d: F.write(
                            f"{d}/m.pt", b"\x80\x02}q\x00.")), ("empty zip", lambda d: _empty_zip(f"{d}/m.pt"))):
        camp.job("convert", label, "convert", make, "pt:handmade", args=dst)


def _nested(depth):
    """A pickled dict nested ``depth`` deep, {"w": {"w": ... 1}}, built without recursion."""
    return (b"}(" + F._s("w")) * depth + F._i(1) + b"u" * depth


def framing_zip(rng, raw):
    out = [(f"truncated to {k}", raw[:k]) for k in sorted(rng.sample(range(len(raw)), 20))]
    out += [("trailing bytes", raw + bytes(100)), ("empty file", b""), ("doubled", raw + raw)]
    return out


def _many_entries(path, n):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", F.pickle_bytes(F.dict_op([])))
        for i in range(n):
            z.writestr(str(i), b"")
    return path


def _traversal(path):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", F.pickle_bytes(F.dict_op([("w", F.tensor_op("0", 1, 0, (1,), (1,)))])))
        z.writestr("archive/data/0", bytes(4))
        z.writestr("../../evil", b"x")
        z.writestr("/abs/evil", b"x")
    return path


def _empty_zip(path):
    import zipfile
    zipfile.ZipFile(path, "w").close()
    return path


def real_torch_checkpoint(folder):
    """A real torch.save training checkpoint of the small DiT (model, ema, AdamW state, args), if torch is here."""
    try:
        import argparse as ap

        import torch
    except ImportError:
        return None
    model = F.small_dit()
    sd = {k: torch.from_numpy(v.copy()) for k, v in model.params.items()}
    path = os.path.join(folder, "torch.pt")
    torch.save({"model": sd, "ema": {k: v.clone() for k, v in sd.items()},
                "opt": {"state": {i: {"step": torch.tensor(3.0), "exp_avg": v.clone()} for i, v in
                                  enumerate(sd.values())}, "param_groups": [{"lr": 1e-4}]},
                "args": ap.Namespace(lr=1e-4, model="DiT-S/2")}, path)
    return path


def surface_resume(camp, files):
    for surface, op, kind, setup in (
            ("resume_train", "resume_train", "train_ckpt", {"kind": "trainer"}),
            ("resume_gates", "resume_gates", "gate_ckpt", {"kind": "gate_trainer", "model": files["dit_hash"]})):
        camp.reference(kind, surface, op, files[kind], setup=setup)
        raw = open(files[kind], "rb").read()
        add_files(camp, surface, op, kind, raw, "c.safetensors", setup=setup, nohash=True, data_flips=40,
                  header_flips=40, structure=False)
        header, data = F.split(raw)
        meta = header["__metadata__"]
        for k in sorted(meta):
            for v in ("", "-5", "1000000", "nan", "inf", "1e999", "x", "[]", "{}", "null", "[" * 10000,
                      "9" * 5000, '{"a": 1}'):
                camp.job(surface, f"metadata {k} = {v[:20]!r}", op, lambda d, k=k, v=v: F.write(
                    f"{d}/c.safetensors", F.join(dict(header, __metadata__=dict(meta, **{k: v})), data)), kind,
                    setup=setup)
            camp.job(surface, f"metadata {k} missing", op, lambda d, k=k: F.write(
                f"{d}/c.safetensors", F.join(dict(header, __metadata__={a: b for a, b in meta.items() if a != k}),
                                             data)), kind, setup=setup)
        rng_state = json.loads(meta["rng"])
        for label, st in (("has_uint32 7", dict(rng_state, has_uint32=7)),
                          ("state 1.5", dict(rng_state, state={"state": 1.5, "inc": 1})),
                          ("state 2^200", dict(rng_state, state={"state": 1 << 200, "inc": 1})),
                          ("state negative", dict(rng_state, state={"state": -1, "inc": 1})),
                          ("MT19937", dict(rng_state, bit_generator="MT19937")),
                          ("extra field", dict(rng_state, extra=1))):
            camp.job(surface, f"rng {label}", op, lambda d, st=st: F.write(
                f"{d}/c.safetensors", F.join(dict(header, __metadata__=dict(meta, rng=json.dumps(st))), data)),
                kind, setup=setup)
        names = [k for k in header if k != "__metadata__"]
        for name in camp.rng.sample(names, min(len(names), camp.n(12))):
            e = header[name]
            for label, change in (("as I32", dict(dtype="I32") if e["dtype"] in ("F32", "I64") else None),
                                  ("dropped", "drop")):
                if change is None:
                    continue
                h = ({k: v for k, v in header.items() if k != name} if change == "drop"
                     else dict(header, **{name: dict(e, **change)}))
                camp.job(surface, f"tensor {name} {label}", op, lambda d, h=h: F.write(
                    f"{d}/c.safetensors", _repack(h, data) if change == "drop" else F.join(h, data)), kind,
                    setup=setup)
        sq = [k for k in names if "exp_avg_sq" in k][0]
        a, b = header[sq]["data_offsets"]
        neg = data[:a] + (b"\x00\x00\x80\xbf" * ((b - a) // 4)) + data[b:]
        camp.job(surface, f"{sq} = -1", op, lambda d: F.write(f"{d}/c.safetensors", F.join(header, neg)), kind,
                 setup=setup)
        if "data/perm" in header:
            a, b = header["data/perm"]["data_offsets"]
            for label, perm in (("zeros", bytes(b - a)), ("reversed order kept", data[a:b][::-1]),
                                ("10^12 entries", struct.pack("<q", 10 ** 12) * ((b - a) // 8))):
                camp.job(surface, f"data/perm {label}", op, lambda d, p=perm: F.write(
                    f"{d}/c.safetensors", F.join(header, data[:a] + p + data[b:])), kind, setup=setup)


def surface_compare(camp, files):
    golden = os.path.join(ROOT, "tests", "golden", "tiny-dit-digits.full.float32.safetensors")
    for base, path, other in (("trace:small", files["trace"], files["trace_other"]),
                              ("trace:golden", golden, os.path.join(ROOT, "tests", "golden",
                                                                    "tiny-dit-digits.full.float64.safetensors"))):
        camp.reference(base, "compare", "compare", path, args={"other": other})
        raw = open(path, "rb").read()
        add_files(camp, "compare", "compare", base, raw, "t.safetensors", args={"other": other}, nohash=True,
                  data_flips=40, header_flips=60, structure=base == "trace:small")
        header, data = F.split(raw)
        manifest = json.loads(header["__metadata__"]["manifest"])
        edits = []
        for field in ("kind", "model", "dtype", "backend", "seed", "sampler", "lazy", "vae", "ops", "recorded",
                      "tensors", "format", "format_version", "tinylazy_version"):
            for v in ([4], {"a": 1}, "x", 10 ** 30, 1.5, None, True, [[[[]]]]):
                edits.append((f"{field} = {json.dumps(v)}", lambda m, f=field, v=v: m.update({f: v})))
        for field in ("steps", "labels", "timestep_map", "cfg_scale", "guide_channels", "batch", "eta"):
            for v in ([4], "4", -1, 10 ** 6, None, 1e308, ["x"]):
                edits.append((f"sampler.{field} = {json.dumps(v)}", lambda m, f=field, v=v: m["sampler"].update({f: v})))
        for field in ("weights_hash", "config", "file"):
            for v in ({"a": {"b": 1}}, [1], 3):
                edits.append((f"model.{field} = {json.dumps(v)}", lambda m, f=field, v=v: m["model"].update({f: v})))
        for i, v in ((0, {"name": 3}), (0, {"shape": [1 << 40] * 2}), (0, {"stride": 10 ** 30}), (0, {"stride": 0}),
                     (1, {"name": manifest["tensors"][0]["name"]}), (0, {"shape": [-1]})):
            edits.append((f"tensors[{i}] {json.dumps(v)[:30]}", lambda m, i=i, v=v: m["tensors"][i].update(v)))
        for label, edit in edits:
            m = json.loads(json.dumps(manifest))
            try:
                edit(m)
            except (TypeError, AttributeError, KeyError):
                continue
            text = json.dumps(m, separators=(",", ":"))
            camp.job("compare", f"manifest {label}", "compare", lambda d, t=text: F.write(
                f"{d}/t.safetensors", F.join(dict(header, __metadata__=dict(header["__metadata__"], manifest=t)),
                                             data)), base, args={"other": other})
        deep = json.dumps(manifest, separators=(",", ":"))[:-1] + ',"x":' + "[" * 100000 + "]" * 100000 + "}"
        for label, text in (("not JSON", "{"), ("a list", "[1]"), ("nested 10^5", deep)):
            camp.job("compare", f"manifest {label}", "compare", lambda d, t=text: F.write(
                f"{d}/t.safetensors", F.join(dict(header, __metadata__=dict(header["__metadata__"], manifest=t)),
                                             data)), base, args={"other": other})


# ----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the random mutations (default 0)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the number of random mutations (default 1)")
    ap.add_argument("--json", help="write the per-case results here")
    ap.add_argument("--keep", help="build the cases in this folder and keep them (default: a temporary folder)")
    args = ap.parse_args(argv)
    folder = args.keep or tempfile.mkdtemp(prefix="tinylazy-fuzz-")
    try:
        return run(folder, args)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def run(folder, args):
    t0 = time.time()
    camp = Campaign(folder, args.seed, args.scale)
    files = F.base_files(os.path.join(folder, "base"))
    for surface in (surface_read, surface_load_dit, surface_load_vae, surface_load_gates, surface_convert,
                    surface_resume, surface_compare):
        surface(camp, files)
    print(f"built {len(camp.jobs)} cases in {time.time() - t0:.0f} s", file=sys.stderr)
    refs = F.run_jobs(camp.refs, folder)
    ref_fp = {}
    for job in camp.refs:
        r = refs[job["id"]]
        if r["outcome"] != "loaded":
            sys.exit(f"the undamaged input {job['base']} does not load: {r}")
        ref_fp[job["base"]] = r["fp"]
    for job in camp.jobs:
        job["ref"] = ref_fp.get(job["base"])
    t1 = time.time()
    step = max(1, len(camp.jobs) // 20)
    results = F.run_jobs(camp.jobs, folder, progress=lambda done, total: print(
        f"  {done}/{total} cases", file=sys.stderr) if done % step == 0 or done == total else None)
    print(f"ran {len(camp.jobs)} cases in {time.time() - t1:.0f} s", file=sys.stderr)
    table = collections.OrderedDict()
    worst = collections.defaultdict(lambda: {"seconds": 0.0, "cpu": 0.0, "peak": 0, "slow": 0, "heavy": 0})
    rows = []
    for job in camp.jobs:
        r = results[job["id"]]
        outcome = classify(job, r)
        table.setdefault(job["surface"], collections.Counter())[outcome] += 1
        w = worst[job["surface"]]
        if r.get("seconds") is not None:
            w["seconds"] = max(w["seconds"], r["seconds"])
            w["cpu"] = max(w["cpu"], r["cpu"])
            w["slow"] += r["cpu"] >= F.TIME_LIMIT
        if r.get("peak") is not None:
            w["peak"] = max(w["peak"], r["peak"])
            w["heavy"] += r["peak"] >= F.MEM_LIMIT
        rows.append(dict(job, outcome=outcome, result=r))
    print_table(table, worst)
    changes = collections.Counter()
    for row in rows:
        if row["outcome"] == "change, no checksum":
            kind = ("data flip" if row["case"].startswith("data bit flip") else "header flip"
                    if row["case"].startswith("header bit flip") else f"valid edit: {row['surface']} / {row['case']}")
            changes[kind] += 1
    if changes:
        print("change, no checksum: " + "; ".join(f"{k} x{v}" for k, v in changes.most_common()))
    bad = [row for row in rows if row["outcome"] in ("other exception", "crash/hang", "silent wrong load",
                                                     "code executed")]
    for row in bad[:40]:
        r = row["result"]
        print(f"  {row['outcome']}: {row['surface']} / {row['case']}: {r.get('error')} {r.get('message', '')[:160]}")
    slow = [row for row in rows if (row["result"].get("cpu") or 0) >= F.TIME_LIMIT
            or (row["result"].get("peak") or 0) >= F.MEM_LIMIT]
    for row in slow[:20]:
        r = row["result"]
        print(f"  over a bound: {row['surface']} / {row['case']}: {r.get('cpu'):.2f} CPU s ({r.get('seconds'):.2f} s "
              f"wall), {(r.get('peak') or 0) / 2**20:.0f} MiB ({row['outcome']})")
    heavy = sorted(rows, key=lambda row: -(row["result"].get("cpu") or 0))[:3]
    print("slowest: " + "; ".join(f"{row['surface']} / {row['case']}: {row['result']['cpu']:.2f} CPU s, "
                                   f"{row['result']['seconds']:.2f} s wall" for row in heavy))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "scale": args.scale, "cases": [
                {"surface": r["surface"], "case": r["case"], "outcome": r["outcome"],
                 "error": r["result"].get("error"), "seconds": r["result"].get("seconds"), "cpu": r["result"].get("cpu"),
                 "peak": r["result"].get("peak"), "message": r["result"].get("message", "")[:200]} for r in rows]},
                f, indent=0)
    return 1 if bad or slow else 0


def classify(job, res):
    outcome = F.classify(job, res)
    if outcome in ("data flip, no hash", "silent wrong load") and job.get("nohash"):
        return "change, no checksum"
    return "loaded as it should" if outcome == "identical load" else outcome


def print_table(table, worst):
    head = ["surface", "cases"] + COLUMNS + ["max CPU s", "max wall s", "max MiB"]
    lines = [head]
    total = collections.Counter()
    for surface, c in table.items():
        n = sum(c.values())
        total.update(c)
        w = worst[surface]
        lines.append([surface, str(n)] + [str(c[k]) for k in COLUMNS] + [f"{w['cpu']:.2f}", f"{w['seconds']:.2f}",
                                                                          f"{w['peak'] / 2**20:.0f}"])
    lines.append(["total", str(sum(total.values()))] + [str(total[k]) for k in COLUMNS]
                 + [f"{max(w[k] for w in worst.values()):.2f}" for k in ("cpu", "seconds")]
                 + [f"{max(w['peak'] for w in worst.values()) / 2**20:.0f}"])
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    sys.exit(main())
