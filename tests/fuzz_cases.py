"""Hostile and damaged files, and a child process that feeds them to tinylazy under a memory limit.

tests/test_fuzz.py runs a lean, deterministic set of these in CI (``lean_cases``: one or more per
class of issue #16); benchmarks/fuzz_campaign.py runs the whole campaign (mutations of every file
kind, seeded) with the same runner and counts the outcomes.

A job is a dict: ``surface``, ``case``, ``op`` (a key of ``OPS``), ``path`` (the file or folder
tried), ``args`` (keyword arguments of the op), ``setup`` (what the op needs that is not under test,
e.g. the DiT a gates file is loaded for; built before the measurement starts), ``dir`` (a folder
whose listing must not change: nothing may be written), ``marker`` (a file that exists only if code
from the input ran), and for the campaign ``ref`` (the fingerprint of the undamaged input) and
``nohash_flip`` (a flipped data byte in a file that carries no checksum).

The child runs each job with the address space limited to what it uses before the job plus
``AS_BUDGET`` (virtual memory: a MemoryError is a failure), resets the peak RSS before the job
(/proc/self/clear_refs) and reports the peak RSS above the start, the time, and either the
fingerprint of what loaded or the error (type, whether it is one of tinylazy's typed errors, and
whether its message names the file).
"""
import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEM_LIMIT = 200 << 20            # the bound on extra memory per case
AS_BUDGET = MEM_LIMIT + (64 << 20)   # address space beyond the start: + room for a thread stack and page tables
TIME_LIMIT = 2.0                 # the bound per case, in CPU seconds (the machine is shared: wall
                                 # time is reported too; the tests do not time anything)
HANG = 30                        # seconds after which a job counts as hung


# ----------------------------------------------------------------------------
# Safetensors bytes

def split(raw):
    """(header dict, data bytes) of a safetensors file's bytes."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data=b"", length=None, pad=True):
    """Bytes of a safetensors file from a header (dict or raw bytes) and data; ``length`` overrides the
    8-byte header length."""
    head = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def padded(header, data, k):
    """(file bytes, spaces) with at least ``k`` spaces of header padding (a metadata entry grown to get them)."""
    for extra in range(8):
        meta = dict(header.get("__metadata__", {}), **({"pad": "x" * extra} if extra else {}))
        raw = join(dict(header, __metadata__=meta), data)
        n = struct.unpack("<Q", raw[:8])[0]
        spaces = n - len(raw[8:8 + n].rstrip(b" "))
        if spaces >= k:
            return raw, spaces
    raise AssertionError("unreachable: 8 lengths cover every padding")


def shifted(raw, k):
    """The file with its header length lowered by ``k`` (raised when k < 0)."""
    return struct.pack("<Q", struct.unpack("<Q", raw[:8])[0] - k) + raw[8:]


def data_start(raw):
    return 8 + struct.unpack("<Q", raw[:8])[0]


def write(path, raw):
    with open(path, "wb") as f:
        f.write(raw)
    return str(path)


# ----------------------------------------------------------------------------
# Undamaged inputs: small models and the files tinylazy writes for them

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def small_dit(seed=0):
    import tinylazy as tl
    cfg = tl.DiTConfig(**SMALL)
    params = {k: v.astype(np.float32) for k, v in tl.init_params(cfg, seed=seed, scheme="random").items()}
    return tl.DiT(cfg, params)


def fake_digits(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 17, size=(n, 1, 8, 8)) / 8.0 - 1.0).repeat(2, 2).repeat(2, 3).astype(np.float32)
    return images, np.arange(n, dtype=np.int64) % 10


TRAIN_RECIPE = dict(overrides={"depth": 1, "hidden_size": 32, "num_heads": 2}, batch_size=8, lr=1e-3, ema_decay=0.9,
                    steps=6)
GATE_TRAINER = dict(steps=6, rho_attn=1e-2, rho_mlp=1e-2, lr=1e-2, batch=4, seed=7)


def gate_trainer_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, SMALL["in_channels"], 8, 8)).astype(np.float32),
            rng.integers(0, SMALL["num_classes"], n))


def base_files(folder):
    """Write one undamaged file of every kind into ``folder`` -> {kind: path}."""
    import tinylazy as tl
    from tinylazy import train as T
    from tinylazy.golden import trace_sampling
    from tinylazy.io import save_dit, write_safetensors
    from tinylazy.lazy import LazyGates, save_gates
    from tinylazy.lazy_train import GateTrainer
    from tinylazy.trace import Recorder
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)
    model = small_dit()
    files = {"dit_hash": p("dit.safetensors"), "dit_nohash": p("dit-nohash.safetensors")}
    save_dit(model, files["dit_hash"])
    write_safetensors(files["dit_nohash"], {k: model.params[k] for k in sorted(model.params)},
                      {"num_heads": str(SMALL["num_heads"])})
    gates = LazyGates.zeros(model, 4)
    gates.attn[...] = np.random.default_rng(0).standard_normal(gates.attn.shape)
    gates.mlp[...] = np.random.default_rng(1).standard_normal(gates.mlp.shape)
    files["gates"] = p("dit.gates-ddim4.safetensors")
    save_gates(gates, files["gates"], training={"source": "fuzz"})
    files["trace"] = p("trace.safetensors")
    trace_sampling(model, steps=2, seed=0, batch=1, cfg_scale=4.0,
                   recorder=Recorder(max_elements=16)).save(files["trace"])
    files["trace_other"] = p("trace-other.safetensors")
    trace_sampling(model, steps=2, seed=0, batch=1, cfg_scale=4.0,
                   recorder=Recorder(max_elements=16)).save(files["trace_other"])
    tr = T.Trainer(T.Recipe(**TRAIN_RECIPE), *fake_digits())
    tr.step()
    files["train_ckpt"] = p("train-checkpoint.safetensors")
    tr.save_checkpoint(files["train_ckpt"])
    gt = GateTrainer(model, *gate_trainer_data(), **GATE_TRAINER)
    gt.step()
    files["gate_ckpt"] = p("gate-checkpoint.safetensors")
    gt.save(files["gate_ckpt"])
    files["vae"] = p("vae")
    vae_folder(files["vae"])
    files["diffusers"] = p("diffusers")
    diffusers_folder(files["diffusers"], model)
    files["pt"] = p("model.pt")
    handmade_checkpoint(files["pt"], {k: model.params[k] for k in sorted(model.params)})
    return files


def vae_folder(path, config=None):
    import tinylazy as tl
    from tinylazy.io import write_safetensors
    from tinylazy.vae import init_params
    cfg = tl.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2)
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"), init_params(cfg))
    conf = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 2,
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    conf.update(config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    return path


def diffusers_folder(path, model, config=None):
    """A diffusers DiTTransformer2DModel folder holding ``model`` (official -> diffusers names, no torch)."""
    from tinylazy import io as tio
    from tinylazy.io import write_safetensors
    cfg = model.config
    layout = tio._Layout("", [], None)
    layout.diffusers = True
    out = {}
    for name, a in model.params.items():
        if name == "pos_embed":
            continue
        keys = layout.file_keys(name)
        for k, part in zip(keys, np.split(np.asarray(a), len(keys)) if len(keys) > 1 else [np.asarray(a)]):
            out[k] = part
    for i in range(1, cfg.depth):
        for k in tio._DIFFUSERS_SHARED:
            out[f"transformer_blocks.{i}.{k}"] = out[f"transformer_blocks.0.{k}"]
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"), out)
    conf = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "num_layers": cfg.depth, "sample_size": cfg.input_size,
            "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes}
    conf.update(config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    return out


# torch.save archives by hand (a tiny protocol-2 pickle assembler), so CI needs no torch to build them.

def _g(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _s(text):
    b = text.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def _i(n):
    return b"J" + n.to_bytes(4, "little", signed=True)


def _long(n):
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b                    # LONG1


def _tup(*items):
    return b"(" + b"".join(items) + b"t"


def tensor_op(key, numel, offset, size, stride, storage="FloatStorage"):
    pid = _tup(_s("storage"), _g("torch", storage), _s(key), _s("cpu"), _long(numel)) + b"Q"        # BINPERSID
    hooks = _g("collections", "OrderedDict") + b")R"
    args = _tup(pid, _long(offset), _tup(*map(_long, size)), _tup(*map(_long, stride)), b"\x89", hooks)
    return _g("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def dict_op(items):
    return b"}(" + b"".join(_s(k) + v for k, v in items) + b"u"


def pickle_bytes(body):
    return b"\x80\x02" + body + b"."


def archive(path, pkl, storages=(), byteorder=b"little", compression=None):
    import zipfile
    with zipfile.ZipFile(path, "w", compression or zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, data in dict(storages).items():
            z.writestr(f"archive/data/{key}", data)
    return str(path)


def handmade_checkpoint(path, params):
    """A torch.save-layout archive of ``params`` (float32, contiguous) under "ema", one storage each."""
    items, storages = [], {}
    for n, (k, v) in enumerate(params.items()):
        v = np.asarray(v)
        stride = [int(np.prod(v.shape[i + 1:])) for i in range(v.ndim)]
        items.append((k, tensor_op(str(n), v.size, 0, v.shape, stride)))
        storages[str(n)] = np.ascontiguousarray(v, "<f4").tobytes()
    return archive(path, pickle_bytes(dict_op([("ema", dict_op(items))])), storages)


def _list(*items):
    return b"](" + b"".join(items) + b"e"


def evil_pickles(marker):
    """Pickles that would run code if any global they name were resolved (each writes ``marker``); the
    first 36 do, under a plain ``pickle.loads`` (tests/test_fuzz.py checks it), the last 4 are malformed
    uses of the allowed globals."""
    cmd, code = f"touch {marker}", f"open({marker!r}, 'w').close()"
    argv = _list(_s("touch"), _s(marker))
    calls = [("os", "system", _s(cmd)), ("posix", "system", _s(cmd)), ("builtins", "eval", _s(code)),
             ("builtins", "exec", _s(code)), ("subprocess", "check_call", argv), ("subprocess", "getoutput", _s(cmd)),
             ("subprocess", "run", argv), ("os", "popen", _s(cmd)), ("builtins", "open", _s(marker) + _s("w")),
             ("io", "open", _s(marker) + _s("w")), ("cProfile", "run", _s(code)),
             ("shutil", "copyfile", _s("/dev/null") + _s(marker))]
    out = []
    for module, name, args in calls:
        out.append((f"REDUCE {module}.{name}", dict_op([("w", _g(module, name) + _tup(args) + b"R")])))
        out.append((f"INST {module}.{name}", dict_op([("w", b"(" + args + b"i" + f"{module}\n{name}\n".encode())])))
        out.append((f"STACK_GLOBAL {module}.{name}",
                    dict_op([("w", _s(module) + _s(name) + b"\x93" + _tup(args) + b"R")])))
    out.append(("BUILD on a storage type", dict_op([("w", _g("torch", "FloatStorage") + _tup(_s(code)) + b"b")])))
    out.append(("REDUCE on OrderedDict with a callable", dict_op([("w", _g("collections", "OrderedDict")
                                                                     + _tup(_g("os", "system")) + b"R")])))
    out.append(("EXT1 extension registry", dict_op([("w", b"\x82\x01")])))
    out.append(("persistent id naming a global", dict_op([("w", _tup(_s("storage"), _g("os", "system"), _s("0"),
                                                                   _s("cpu"), _i(1)) + b"Q")])))
    return out


# ----------------------------------------------------------------------------
# The child: runs jobs, measures them

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from load_memory import _reset_peak, _status_kib  # noqa: E402  (one reader of /proc/self/status)


def _status():
    return {k: _status_kib(k) for k in ("VmSize", "VmRSS", "VmHWM")}


def _digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


_SETUP = {}


def _setup(spec):
    key = json.dumps(spec, sort_keys=True)
    if key not in _SETUP:
        kind = spec["kind"]
        if kind == "dit":
            from tinylazy.io import load_dit
            _SETUP[key] = load_dit(spec["path"])
        elif kind == "trainer":
            from tinylazy import train as T
            _SETUP[key] = T.Trainer(T.Recipe(**TRAIN_RECIPE), *fake_digits())
        elif kind == "gate_trainer":
            from tinylazy.io import load_dit
            from tinylazy.lazy_train import GateTrainer
            _SETUP[key] = GateTrainer(load_dit(spec["model"]), *gate_trainer_data(), **GATE_TRAINER)
        else:
            raise ValueError(f"unknown setup {kind}")
    return _SETUP[key]


def _op_read(job, _):
    from tinylazy.io import SafetensorsFile
    with SafetensorsFile(job["path"]) as f:
        meta, tensors = dict(f.metadata), {k: f.read(k, finite=False) for k in f.entries}
    return lambda: _digest(meta, list(tensors), *tensors.values())


def _op_load_dit(job, _):
    from tinylazy.io import load_dit
    m = load_dit(job["path"], **job.get("args", {}))
    return lambda: _digest(m.weights_hash, str(m.config))


def _op_load_vae(job, _):
    from tinylazy.vae import load_vae
    v = load_vae(job["path"])
    return lambda: _digest(str(v.config), *[v.params[k] for k in sorted(v.params)])


def _gates_fp(g):
    return lambda: _digest(g.attn, g.mlp, g.timestep_map, g.weights_hash)


def _op_load_gates(job, model):
    from tinylazy.lazy import load_gates
    return _gates_fp(load_gates(job["path"], model, **job.get("args", {})))


def _op_gates_for(job, _):
    """Load the (edited) weights, then the gates of the original weights for them."""
    from tinylazy.io import load_dit
    from tinylazy.lazy import load_gates
    return _gates_fp(load_gates(job["args"]["gates"], load_dit(job["path"])))


def _op_convert(job, _):
    from tinylazy.convert import convert
    convert(job["path"], job["args"]["dst"], progress=False, **job["args"].get("kw", {}))

    def fp():
        from tinylazy.io import SafetensorsFile
        with SafetensorsFile(job["args"]["dst"]) as f:
            out = _digest(list(f.entries), *[f.read(k, finite=False) for k in f.entries])
        os.remove(job["args"]["dst"])              # the one output expected; the folder check comes after
        return out
    return fp


def _op_resume_train(job, trainer):
    trainer.load_checkpoint(job["path"])
    return lambda: _digest(trainer.step_count, trainer.pos, trainer.perm, trainer.train_seconds,
                           trainer.rng.bit_generator.state, *[trainer.trainable[k] for k in sorted(trainer.trainable)],
                           *[trainer.ema[k] for k in sorted(trainer.ema)],
                           *[trainer.opt.exp_avg[k] for k in sorted(trainer.opt.exp_avg)],
                           *[trainer.opt.exp_avg_sq[k] for k in sorted(trainer.opt.exp_avg_sq)])


def _op_resume_gates(job, trainer):
    trainer.load(job["path"])
    return lambda: _digest(trainer.iteration, trainer.log_scale, trainer.measured, trainer.rng.bit_generator.state,
                           trainer.gates.attn, trainer.gates.mlp, [o.step_count for o in trainer.opts],
                           *[o.exp_avg[k] for o in trainer.opts for k in sorted(o.exp_avg)],
                           *[o.exp_avg_sq[k] for o in trainer.opts for k in sorted(o.exp_avg_sq)])


def _op_compare(job, _):
    """``golden compare PATH OTHER``: the library's compare either refuses with a TraceError (and the command
    then exits 2 with one line on stderr) or returns a verdict (exit 0 or 1).  The fingerprint is what decides
    a comparison: the run's identity, the tensors, and the verdict against OTHER."""
    from tinylazy import golden
    from tinylazy.trace import TraceError, load_trace
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = golden.main(["compare", job["path"], job["args"]["other"]])
    lines = err.getvalue().splitlines()
    try:
        result = golden.compare(job["path"], job["args"]["other"])
    except TraceError:
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            raise RuntimeError(f"golden compare exited {code} with {len(lines)} stderr lines on a refused trace")
        raise
    if code != (0 if result.passed else 1):
        verdict = "passed" if result.passed else "failed"
        raise RuntimeError(f"golden compare exited {code} for a comparison that {verdict}")
    t = load_trace(job["path"])
    identity = {k: t.meta.get(k) for k in ("kind", "model", "seed", "sampler", "lazy")}
    return lambda: _digest(identity, t.names, *[t.arrays[n] for n in t.names], result.passed,
                           [(r.name, r.status) for r in result.results], len(result.decisions))


def _op_selftest(job, _):
    """For the runner's own test: allocate, crash or sleep as asked."""
    what = job["args"]["do"]
    if what == "allocate":
        return float(np.ones(job["args"]["bytes"] // 8).sum())
    if what == "crash":
        os.abort()
    if what == "sleep":
        time.sleep(3600)
    return what


OPS = {"selftest": _op_selftest, "read": _op_read, "load_dit": _op_load_dit, "load_vae": _op_load_vae,
       "load_gates": _op_load_gates, "gates_for": _op_gates_for, "convert": _op_convert,
       "resume_train": _op_resume_train, "resume_gates": _op_resume_gates, "compare": _op_compare}


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang("no result in time")


def _listing(folder):
    return sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else None


def run_job(job):
    """Run one job here (the child) -> result dict."""
    from tinylazy.io import WeightsError
    from tinylazy.lazy import GatesError
    from tinylazy.trace import TraceError
    try:
        needed = _setup(job["setup"]) if job.get("setup") else None
    except Exception as e:                                          # the harness, not the input: never "clear"
        return {"id": job["id"], "outcome": "error", "error": "SetupError", "typed": False, "names_file": False,
                "message": f"setup {job['setup']}: {type(e).__name__}: {e}"[:400], "seconds": 0.0, "cpu": 0.0,
                "peak": None, "written": False, "ran": False}
    before = _listing(job.get("dir"))
    import gc
    gc.collect()
    measured = _reset_peak()
    start = _status()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (start["VmSize"] + AS_BUDGET, hard))
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(job.get("timeout", HANG))
    t0, c0 = time.perf_counter(), time.process_time()
    res = {"id": job["id"]}
    fp = None
    try:
        fp = OPS[job["op"]](job, needed)
        res["outcome"] = "loaded"
    except _Hang as e:
        res.update(outcome="hang", error="hang", message=str(e))
    except BaseException as e:                                      # noqa: B902 - everything is an outcome here
        msg = str(e)
        names = [job["path"]] + [v for v in job.get("args", {}).values() if isinstance(v, str)]
        res.update(outcome="error", error=type(e).__name__, typed=isinstance(e, (WeightsError, GatesError, TraceError)),
                   names_file=any(n and (n in msg or os.path.basename(n.rstrip("/")) in msg) for n in names),
                   message=msg[:400])
    finally:
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    end = _status()
    if res["outcome"] == "loaded":
        res["fp"] = fp() if callable(fp) else fp                    # after the measurement
    res.update(seconds=seconds, cpu=cpu, peak=(end["VmHWM"] - start["VmRSS"]) if measured else None,
               written=before != _listing(job.get("dir")),
               ran=bool(job.get("marker")) and os.path.exists(job["marker"]))
    return res


def child_main(jobs_path, results_path):
    with open(jobs_path) as f:
        jobs = json.load(f)
    done = set()
    if os.path.exists(results_path):
        with open(results_path) as f:
            done = {json.loads(line)["id"] for line in f if line.strip()}
    with open(results_path, "a") as out:
        for job in jobs:
            if job["id"] in done:
                continue
            out.write(json.dumps({"id": job["id"], "started": True}) + "\n")
            out.flush()
            out.write(json.dumps(run_job(job)) + "\n")
            out.flush()


# ----------------------------------------------------------------------------
# The parent: runs jobs in a child, survives crashes, classifies

CHILD_ENV = {"MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def run_jobs(jobs, workdir, progress=None):
    """Run ``jobs`` in child processes (a new one after a crash) -> {id: result}."""
    jobs_path, results_path = os.path.join(workdir, "jobs.json"), os.path.join(workdir, "results.jsonl")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    if os.path.exists(results_path):
        os.remove(results_path)
    env = dict(os.environ, **CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT] + env.get("PYTHONPATH", "").split(os.pathsep))
    code = f"import fuzz_cases; fuzz_cases.child_main({jobs_path!r}, {results_path!r})"
    results = {}
    while True:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=HANG * (len(jobs) + 2))
        results, started = {}, None
        with open(results_path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("started"):
                    started = r["id"]
                else:
                    results[r["id"]] = r
                    started = None
        if progress:
            progress(len(results), len(jobs))
        if started is None:
            if proc.returncode != 0:
                raise RuntimeError(f"the fuzz child failed outside any job:\n{proc.stderr[-3000:]}")
            return results
        crash = {"id": started, "outcome": "crash", "error": f"exit {proc.returncode}",
                 "message": proc.stderr[-400:], "seconds": None, "cpu": None, "peak": None, "written": None,
                 "ran": False}
        with open(results_path, "a") as f:                             # the child resumes after it
            f.write(json.dumps(crash) + "\n")


def classify(job, res):
    """The outcome of one job for the campaign's table."""
    if res.get("ran"):
        return "code executed"
    if res["outcome"] in ("crash", "hang"):
        return "crash/hang"
    if res["outcome"] == "error":
        ok = res["typed"] and res["names_file"] and not res["written"]
        return "clear error" if ok else "other exception"
    if res["written"]:
        return "other exception"
    if job.get("ref") is None or res["fp"] == job["ref"]:
        return "identical load"
    return "data flip, no hash" if job.get("nohash_flip") else "silent wrong load"


def sparse(path, header_length, size):
    """A file that claims a ``header_length`` header and is ``size`` bytes, mostly holes (no disk)."""
    with open(path, "wb") as f:
        f.write(header_length.to_bytes(8, "little"))
        f.truncate(size)
    return str(path)


def empty_entries_header(n, data=b""):
    """A header of ``n`` zero-size tensors (the 1.78 M-entry class at n = 1.78 M: just under 100 MiB)."""
    body = ",".join(f'"{i:x}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    return join(("{" + body + "}").encode(), data)


# ----------------------------------------------------------------------------
# The lean set: one or more cases per class of issue #16, every one must end in a clear error

def lean_cases(folder):
    """Build the CI cases in ``folder`` -> jobs (each must be a typed error naming the file, write
    nothing, run nothing, stay under the memory bound)."""
    files = base_files(os.path.join(folder, "base"))
    jobs = []

    def case(surface, name, op, build, setup=None, args=None):
        d = os.path.join(folder, f"{len(jobs):02d}")
        os.makedirs(d)
        path = build(d)
        jobs.append({"id": len(jobs), "surface": surface, "case": name, "op": op, "path": path, "dir": d,
                     "setup": setup, "args": args(d) if callable(args) else (args or {}),
                     "marker": os.path.join(d, "pwned")})

    dit = open(files["dit_nohash"], "rb").read()
    header, data = split(dit)
    gates = open(files["gates"], "rb").read()
    g_header, g_data = split(gates)
    model = {"kind": "dit", "path": files["dit_hash"]}

    # 1. Names and configs drive allocation
    far = dict(header, **{"blocks.99999999.x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})
    case("load_dit", "zero-byte blocks.99999999.x", "load_dit", lambda d: write(f"{d}/w.safetensors", join(far, data)))
    case("load_dit", "zero-byte blocks.99999.x", "load_dit", lambda d: write(f"{d}/w.safetensors", join(dict(
        header, **{"blocks.99999.x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}), data)))
    D = SMALL["hidden_size"]
    g_far = dict(g_header, **{"blocks.0.attn_lazy_learning.999999.weight": {
        "dtype": "F32", "shape": [1, D], "data_offsets": [len(g_data), len(g_data) + 4 * D]}})
    case("load_gates", "step index 999999", "load_gates",
         lambda d: write(f"{d}/g.safetensors", join(g_far, g_data + bytes(4 * D))), setup=model)
    case("load_dit", "diffusers sample_size 4096", "load_dit",
         lambda d: _copy_folder(files["diffusers"], f"{d}/m", {"sample_size": 4096}))
    case("load_vae", "layers_per_block 10^8", "load_vae",
         lambda d: _copy_folder(files["vae"], f"{d}/v", {"layers_per_block": 10 ** 8}))

    # 2. Silent shifted reads
    w_pad, w_spaces = padded(header, data, 3)
    case("load_dit", "header length - 3 (no hash, into the padding)", "load_dit",
         lambda d: write(f"{d}/w.safetensors", shifted(w_pad, 3)))
    g_pad, pad = padded(g_header, g_data, 5)
    case("load_gates", f"header length - {pad} (into the padding)", "load_gates",
         lambda d: write(f"{d}/g.safetensors", shifted(g_pad, pad)), setup=model)
    case("read", "trailing bytes", "read", lambda d: write(f"{d}/w.safetensors", dit + bytes(16)))
    gap = {k: (dict(v, data_offsets=[v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]) if k != "__metadata__"
               else v) for k, v in header.items()}
    case("read", "4-byte gap before the data", "read", lambda d: write(f"{d}/w.safetensors", join(gap, bytes(4) + data)))

    # 3. The hash covers the configuration
    hashed = open(files["dit_hash"], "rb").read()
    h_header, h_data = split(hashed)
    edited = dict(h_header, __metadata__=dict(h_header["__metadata__"], num_heads="2",
                                               config=h_header["__metadata__"]["config"].replace(
                                                   '"num_heads": 4', '"num_heads": 2')))
    case("load_dit", "metadata num_heads 4 -> 2 (with hash)", "load_dit",
         lambda d: write(f"{d}/w.safetensors", join(edited, h_data)))
    nohash = dict(header, __metadata__={"num_heads": "2"})
    case("load_gates", "num_heads edited, no hash: the old gates refuse", "gates_for",
         lambda d: write(f"{d}/w.safetensors", join(nohash, data)), args={"gates": files["gates"]})

    # 4. The converter builds what a checkpoint claims
    case("convert", "stride-0 view of 1 float as 2^28", "convert",
         lambda d: archive(f"{d}/x.pt", pickle_bytes(dict_op([("w", tensor_op("0", 1, 0, (1 << 28,), (0,)))])),
                           {"0": bytes(4)}), args=lambda d: {"dst": f"{d}/out.safetensors"})
    case("convert", "stride-0 view of 1 float as 2^40", "convert",
         lambda d: archive(f"{d}/x.pt", pickle_bytes(dict_op([("w", tensor_op("0", 1, 0, (1 << 20, 1 << 20),
                                                                                (0, 0)))])), {"0": bytes(4)}),
         args=lambda d: {"dst": f"{d}/out.safetensors"})
    case("convert", "deflated storage of 256 MiB zeros", "convert", lambda d: _deflate_bomb(f"{d}/x.pt", 256),
         args=lambda d: {"dst": f"{d}/out.safetensors"})
    case("convert", "deflated data.pkl of 64 MiB", "convert", lambda d: _pickle_bomb(f"{d}/x.pt", 64),
         args=lambda d: {"dst": f"{d}/out.safetensors"})
    case("convert", "LONG_BINPUT memo index 2^30", "convert",
         lambda d: archive(f"{d}/x.pt", b"\x80\x02Nr" + (1 << 30).to_bytes(4, "little") + b"."),
         args=lambda d: {"dst": f"{d}/out.safetensors"})
    case("convert", "src == dst", "convert", lambda d: _copy(files["pt"], f"{d}/m.pt"),
         args=lambda d: {"dst": f"{d}/m.pt"})
    case("convert", "existing dst", "convert", lambda d: _copy(files["pt"], f"{d}/m.pt", also=f"{d}/out.safetensors"),
         args=lambda d: {"dst": f"{d}/out.safetensors"})
    case("convert", "REDUCE os.system", "convert",
         lambda d: archive(f"{d}/x.pt", pickle_bytes(evil_pickles(f"{d}/pwned")[0][1])),
         args=lambda d: {"dst": f"{d}/out.safetensors"})

    # 5. Integer gates, and resume trusting its metadata
    int_gates = dict(g_header)
    k0 = "blocks.0.attn_lazy_learning.0.weight"
    int_gates[k0] = dict(g_header[k0], dtype="I32")
    case("load_gates", "I32 gate", "load_gates", lambda d: write(f"{d}/g.safetensors", join(int_gates, g_data)),
         setup=model)
    ck_header, ck_data = split(open(files["train_ckpt"], "rb").read())
    for name, edit in (("step -5", {"step": "-5", "adam_step": "-5"}), ("step 10^6", {"step": "1000000"}),
                       ("train_seconds nan", {"train_seconds": "nan"})):
        h = dict(ck_header, __metadata__=dict(ck_header["__metadata__"], **edit))
        case("resume_train", name, "resume_train", lambda d, h=h: write(f"{d}/c.safetensors", join(h, ck_data)),
             setup={"kind": "trainer"})
    perm = ck_header["data/perm"]["data_offsets"]
    bad_perm = ck_data[:perm[0]] + bytes(perm[1] - perm[0]) + ck_data[perm[1]:]
    case("resume_train", "data/perm all zeros", "resume_train",
         lambda d: write(f"{d}/c.safetensors", join(ck_header, bad_perm)), setup={"kind": "trainer"})
    gk_header, gk_data = split(open(files["gate_ckpt"], "rb").read())
    h = dict(gk_header, __metadata__=dict(gk_header["__metadata__"], opt_steps="[1e999]"))
    case("resume_gates", "opt_steps [1e999]", "resume_gates", lambda d: write(f"{d}/c.safetensors", join(h, gk_data)),
         setup={"kind": "gate_trainer", "model": files["dit_hash"]})

    # 6. FIFOs, huge headers, index paths
    case("load_dit", "FIFO as weights", "load_dit", lambda d: _fifo(f"{d}/w.safetensors"))
    case("read", "100 MiB header of holes", "read",
         lambda d: sparse(f"{d}/w.safetensors", (100 << 20) - 8, 100 << 20))
    case("read", "110k zero-size entries in a 7.3 MB header", "read",
         lambda d: write(f"{d}/w.safetensors", empty_entries_header(110_000)))
    case("load_dit", "index shard ../outside", "load_dit", lambda d: _sharded(files["diffusers"], f"{d}/m", "../x"))
    case("load_dit", "index shard absolute path", "load_dit",
         lambda d: _sharded(files["diffusers"], f"{d}/m", os.path.join(d, "abs.safetensors")))

    # 7. Exceptions outside the documented types
    lst = dict(header)
    k1 = next(k for k in header if k != "__metadata__")
    lst[k1] = dict(header[k1], dtype=["F32"])
    case("read", "dtype as a list", "read", lambda d: write(f"{d}/w.safetensors", join(lst, data)))
    case("read", "JSON nested 10^5 deep", "read", lambda d: write(f"{d}/w.safetensors", join(b"[" * 100000)))
    case("load_dit", "diffusers folder: config.json a list", "load_dit",
         lambda d: _copy_folder(files["diffusers"], f"{d}/m", raw_config="[1, 2]"))
    case("convert", "byteorder not UTF-8", "convert",
         lambda d: archive(f"{d}/x.pt", pickle_bytes(dict_op([])), byteorder=b"\xff\xfe"),
         args=lambda d: {"dst": f"{d}/out.safetensors"})
    case("load_gates", "timestep_map [10^30, ...]", "load_gates",
         lambda d: write(f"{d}/g.safetensors", join(dict(g_header, __metadata__=dict(
             g_header["__metadata__"], timestep_map=json.dumps([10 ** 30] * 4))), g_data)), setup=model)
    tr_header, tr_data = split(open(files["trace"], "rb").read())
    for name, edit in (("sampler not an object", lambda m: m.update(sampler=[4])),
                       ("steps [4]", lambda m: m["sampler"].update(steps=[4])),
                       ("nested 10^5 deep", lambda m: m.update(x=json.loads("[" * 500 + "]" * 500)))):
        manifest = json.loads(tr_header["__metadata__"]["manifest"])
        edit(manifest)
        text = json.dumps(manifest, separators=(",", ":"))
        if name.startswith("nested"):
            text = text[:-1] + ',"y":' + "[" * 100000 + "]" * 100000 + "}"
        h = dict(tr_header, __metadata__=dict(tr_header["__metadata__"], manifest=text))
        case("compare", f"manifest: {name}", "compare", lambda d, h=h: write(f"{d}/t.safetensors", join(h, tr_data)),
             args={"other": files["trace_other"]})
    return jobs


def _copy(src, dst, also=None):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    if also:
        open(also, "wb").close()
    return dst


def _copy_folder(src, dst, config=None, raw_config=None):
    os.makedirs(dst)
    for name in os.listdir(src):
        _copy(os.path.join(src, name), os.path.join(dst, name))
    if config is not None or raw_config is not None:
        path = os.path.join(dst, "config.json")
        conf = json.load(open(path))
        conf.update(config or {})
        text = raw_config if raw_config is not None else json.dumps(conf)
        with open(path, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode())
    return dst


def _sharded(src, dst, bad_shard):
    """A sharded diffusers folder whose index sends half the tensors to ``bad_shard``."""
    from tinylazy.io import read_safetensors, write_safetensors
    _copy_folder(src, dst)
    weights = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    tensors, _ = read_safetensors(weights)
    os.remove(weights)
    names = sorted(tensors)
    write_safetensors(os.path.join(dst, "a.safetensors"), {k: tensors[k] for k in names[::2]})
    outside = os.path.normpath(os.path.join(dst, bad_shard))
    write_safetensors(outside, {k: tensors[k] for k in names[1::2]})
    wm = {k: ("a.safetensors" if i % 2 == 0 else bad_shard) for i, k in enumerate(names)}
    with open(weights + ".index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    return dst


def _fifo(path):
    os.mkfifo(path)
    return path


def _deflate_bomb(path, mib):
    """A checkpoint whose one storage is ``mib`` MiB of zeros, deflated (about mib kB on disk)."""
    import zipfile
    numel = (mib << 20) // 4
    pkl = pickle_bytes(dict_op([("w", tensor_op("0", numel, 0, (numel,), (1,)))]))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(mib):
                f.write(chunk)
    return path


def _pickle_bomb(path, mib, less=0):
    """A checkpoint whose data.pkl inflates to ``mib`` MiB (minus ``less`` bytes) of EMPTY_DICT opcodes
    (~90 bytes of memory each)."""
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            f.write(b"\x80\x02")
            chunk = b"}" * (1 << 20)
            for _ in range(mib):
                f.write(chunk[:len(chunk) - less] if _ == mib - 1 else chunk)
            f.write(b".")
    return path
