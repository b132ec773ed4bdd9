"""tinylazy.sample_many: one ADM file for any number of Dask workers, resumable and safe to rerun.

Every run samples the bundled digits model: 14 images in shards of 4 (the last one
short), 10 DDIM steps.  Clusters start on 127.0.0.1 inside the tests and every process
a test starts is ended by it.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import tinylazy as tl  # noqa: E402
from tinylazy.backend import cupy_available  # noqa: E402
from tinylazy import noise, sample_many  # noqa: E402
from tinylazy.samplefile import read_samples  # noqa: E402

SEED, NUM, BATCH, STEPS, CFG = 5, 14, 4, 10, 1.5
ARGS = ["--num", NUM, "--batch", BATCH, "--steps", STEPS, "--cfg-scale", CFG, "--seed", SEED]
SHARDS = 4


def run_main(capsys, *args):
    """sample_many.main in this process: (exit code, stderr lines)."""
    code = sample_many.main([str(a) for a in ARGS + list(args)])
    err = capsys.readouterr().err
    return code, err.strip().splitlines()


def spawn(*args, log):
    """A process of this test in its own session, so that it and its children can be ended together."""
    return subprocess.Popen([sys.executable, *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, TINYLAZY_NUM_THREADS="1"))


def end(proc):
    """End ``proc`` and every process in its session (SIGTERM, then SIGKILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
            if sig == signal.SIGTERM:
                time.sleep(0.5)                              # let the workers the nannies own go first


def wait_for(condition, timeout=120, what="condition"):
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def shard_files(out):
    folder = f"{out}.shards"
    return sorted(n for n in os.listdir(folder) if sample_many.SHARD_NAME.fullmatch(n)) if os.path.isdir(folder) else []


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def model():
    return tl.load_dit("tiny-dit-digits")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean one-worker run, its shard folder kept (copied to ``kept``)."""
    d = tmp_path_factory.mktemp("clean")
    out = d / "clean.npz"
    assert sample_many.main([str(a) for a in ARGS] + ["--workers", "1", "--out", str(out), "--keep-shards"]) == 0
    shutil.copytree(f"{out}.shards", d / "kept")
    return out, d / "kept"


def adm_pixels(z):
    """(B, 1 or 3, H, W) samples -> (B, H, W, 3) uint8, as DiT's sample_ddp.py quantises, written out here."""
    u = np.clip(127.5 * z.astype(np.float64) + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(u, 3, axis=3) if u.shape[3] == 1 else u


# ----------------------------------------------------------------------------
# The file

def test_one_worker_writes_the_adm_file_of_the_documented_images(clean, model):
    out, _ = clean
    images, labels = read_samples(out)
    np.testing.assert_array_equal(labels, np.arange(NUM) % 10)
    for a, b in sample_many.shard_ranges(NUM, BATCH):             # each shard as one batch, sampled here
        idx = np.arange(a, b)
        z = tl.ddim_sample(model, noise.image_noise(SEED, idx, (1, 16, 16)), idx % 10, STEPS, CFG)
        np.testing.assert_array_equal(images[a:b], adm_pixels(z))
    with zipfile.ZipFile(out) as zf:                                # as ADM's evaluator streams it
        assert zf.namelist() == ["arr_0.npy", "arr_1.npy"]
        with zf.open("arr_0.npy") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            assert np.lib.format.read_array_header_1_0(f) == ((NUM, 16, 16, 3), False, np.dtype(np.uint8))
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], images)
    assert sorted(os.listdir(clean[1])) == ["lock", "manifest.json"] + [
        f"shard-{a:09d}-{b:09d}.npz" for a, b in sample_many.shard_ranges(NUM, BATCH)]


@pytest.mark.parametrize("extra", [("--lazy",), ("--sampler", "ddpm")], ids=["lazy", "ddpm"])
def test_lazy_and_ddpm_runs_sample_the_documented_images(model, tmp_path, capsys, extra):
    """One shard: gates beside the weights; DDPM's per-step noise from segments 1..steps."""
    out = tmp_path / "s.npz"
    code, err = run_main(capsys, "--num", BATCH, "--workers", 1, "--out", out, *extra)
    assert code == 0, err
    idx = np.arange(BATCH)
    x_T = noise.image_noise(SEED, idx, (1, 16, 16))
    if extra[0] == "--lazy":
        gates = tl.load_gates(tl.lazy.gates_file(tl.resources.weights_path("tiny-dit-digits"), STEPS), model, STEPS)
        z = tl.ddim_sample(model, x_T, idx % 10, STEPS, CFG, gates=gates)
        assert any(line.startswith("LazyDiT: lazy ratio") for line in err)
    else:
        step_noise = [noise.image_noise(SEED, idx, (1, 16, 16), k + 1) for k in range(STEPS)]
        z = tl.ddpm_sample(model, x_T, idx % 10, STEPS, CFG, step_noise=step_noise)
    np.testing.assert_array_equal(read_samples(out)[0], adm_pixels(z))


def test_a_latent_model_is_decoded_by_its_vae(tmp_path, capsys):
    """A random 4x8x8 latent DiT and a two-block VAE (16x16 RGB), written here in diffusers' layout."""
    from safetensors.numpy import save_file
    from tinylazy.vae import VAEConfig, init_params
    cfg = tl.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=10)
    save_file({k: v.astype(np.float32) for k, v in tl.init_params(cfg, seed=0, scheme="random").items()},
              str(tmp_path / "latent.safetensors"), metadata={"num_heads": "2"})
    vc = VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
    (tmp_path / "vae").mkdir()
    save_file({k: np.asarray(v, np.float32) for k, v in init_params(vc, seed=0).items()},
              str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"latent_channels": 4, "block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 8}))
    out = tmp_path / "latent.npz"
    code, err = run_main(capsys, "--weights", tmp_path / "latent.safetensors", "--vae", tmp_path / "vae",
                         "--num", BATCH, "--workers", 1, "--out", out)
    assert code == 0, err
    model, vae = tl.load_dit(tmp_path / "latent.safetensors"), tl.load_vae(tmp_path / "vae")
    idx = np.arange(BATCH)
    z = tl.ddim_sample(model, noise.image_noise(SEED, idx, (4, 8, 8)), idx % 10, STEPS, CFG)
    images, labels = read_samples(out)
    assert images.shape == (BATCH, 16, 16, 3)
    np.testing.assert_array_equal(images, adm_pixels(vae.decode(z / vae.config.scaling_factor)))


def test_two_workers_write_the_same_bytes(clean, tmp_path, capsys):
    out = tmp_path / "two.npz"
    code, err = run_main(capsys, "--workers", 2, "--out", out)
    assert code == 0, err
    assert "2 worker processes" in " ".join(err)
    assert file_bytes(out) == file_bytes(clean[0])
    assert not os.path.exists(f"{out}.shards")                     # removed once the file is assembled


def test_local_workers_compute_on_one_thread_each(tmp_path):
    # A worker process re-imports the client's main module (multiprocessing's spawn), so a main
    # that imports tinylazy (the console command, a script) sized the pool before Dask applied its
    # env: 2 pool threads per worker, and 2 workers sampled only 1.1x as fast as one on 2 cores.
    script = tmp_path / "pools.py"
    script.write_text("import tinylazy\nfrom tinylazy import sample_many\n\n"
                      "if __name__ == '__main__':\n"
                      "    with sample_many.cluster_client(2, log=lambda msg: None) as client:\n"
                      "        print(sorted(client.run(lambda: tinylazy.parallel.get_num_threads()).values()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TINYLAZY_NUM_THREADS"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "[1, 1]", out.stderr[-2000:]


def test_another_batch_moves_a_pixel_by_at_most_one_and_no_label(clean, tmp_path, capsys):
    out = tmp_path / "b3.npz"
    code, err = run_main(capsys, "--batch", 3, "--workers", 2, "--out", out)
    assert code == 0, err
    (a, la), (b, lb) = read_samples(out), read_samples(clean[0])
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# ----------------------------------------------------------------------------
# Resuming, damage, mixing

def test_kill_9_of_the_client_then_rerun_gives_the_clean_file(clean, tmp_path, capsys):
    out = tmp_path / "killed.npz"
    with open(tmp_path / "client.log", "w") as log:
        client = spawn("-m", "tinylazy.sample_many", *ARGS, "--workers", 1, "--out", out, log=log)
        try:
            wait_for(lambda: shard_files(out) or client.poll() is not None, what="a first shard")
            os.kill(client.pid, signal.SIGKILL)
            client.wait(timeout=30)
        finally:
            end(client)                                              # its worker process too
    assert client.returncode == -signal.SIGKILL and not out.exists(), open(tmp_path / "client.log").read()
    done = len(shard_files(out))
    assert 1 <= done < SHARDS
    code, err = run_main(capsys, "--workers", 1, "--out", out)
    assert code == 0, err
    assert f"resuming: {done} of {SHARDS} shards already in {out}.shards" in err
    assert file_bytes(out) == file_bytes(clean[0])


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path):
    out = tmp_path / "interrupted.npz"
    with open(tmp_path / "client.log", "w") as log:
        client = spawn("-m", "tinylazy.sample_many", *ARGS, "--workers", 1, "--out", out, log=log)
        try:
            wait_for(lambda: shard_files(out) or client.poll() is not None, what="a first shard")
            os.killpg(client.pid, signal.SIGINT)                     # a terminal's Ctrl-C: the whole group
            client.wait(timeout=60)
        finally:
            end(client)
    err = open(tmp_path / "client.log").read()
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert client.returncode == 130 and "Traceback" not in err and len(said) == 1, err
    assert said[0].endswith("resume with: python -m tinylazy.sample_many " + " ".join(map(str, ARGS))
                            + f" --workers 1 --out {out}")
    assert shard_files(out) and not out.exists()


def test_damaged_shards_are_redone(clean, tmp_path, capsys):
    out = tmp_path / "damaged.npz"
    folder = shutil.copytree(clean[1], f"{out}.shards")
    names = [os.path.join(folder, n) for n in shard_files(out)]
    shutil.copy(names[1], names[0])                                 # images 4..7 under the name of 0..3
    data = bytearray(file_bytes(names[1]))
    data[500] ^= 0x40                                               # one bit of 4..7's pixels: CRC-32 mismatch
    with open(names[1], "wb") as f:
        f.write(data)
    with open(names[2], "r+b") as f:                                # 8..11 cut short
        f.truncate(1000)
    code, err = run_main(capsys, "--workers", 1, "--out", out)
    assert code == 0, err
    damaged = [line for line in err if line.startswith("damaged shard, redoing it")]
    assert len(damaged) == 3 and "labels" in damaged[0] and "CRC" in damaged[1] and "BadZipFile" in damaged[2], damaged
    assert "resuming: 1 of 4 shards" in " ".join(err)
    assert file_bytes(out) == file_bytes(clean[0])


def test_a_smaller_num_reuses_the_shards_and_keeps_the_rest(clean, tmp_path, capsys):
    out = tmp_path / "first8.npz"
    shutil.copytree(clean[1], f"{out}.shards")
    code, err = run_main(capsys, "--num", 8, "--out", out)           # shards 0..3 and 4..7 are there: no cluster
    assert code == 0, err
    assert not any("Dask" in line for line in err) and "resuming: 2 of 2 shards" in " ".join(err)
    np.testing.assert_array_equal(read_samples(out)[0], read_samples(clean[0])[0][:8])
    assert shard_files(out) == ["shard-000000008-000000012.npz", "shard-000000012-000000014.npz"]
    assert any(line.startswith(f"kept {out}.shards: it holds 2 more shards") for line in err)


@pytest.mark.parametrize("change,said", [(("--seed", 6), f"seed {SEED} there, 6 here"),
                                         (("--batch", 3), "batch 4 there, 3 here"),
                                         (("--lazy",), "gates_hash None there, ")])
def test_mixed_settings_are_refused(clean, tmp_path, capsys, change, said):
    out = tmp_path / "mixed.npz"
    shutil.copytree(clean[1], f"{out}.shards")
    before = sorted(os.listdir(f"{out}.shards"))
    code, err = run_main(capsys, "--workers", 1, "--out", out, *change)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert "holds shards of another run" in err[0]
    assert sorted(os.listdir(f"{out}.shards")) == before and not out.exists()


def test_a_second_run_on_the_same_out_is_refused(clean, tmp_path, capsys):
    import fcntl
    out = tmp_path / "busy.npz"
    shutil.copytree(clean[1], f"{out}.shards")
    with open(f"{out}.shards/lock", "a") as lock:                  # as the first run holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run_main(capsys, "--workers", 1, "--out", out)
    assert code == 2 and len(err) == 1 and "another sample-many run is writing" in err[0], err
    assert len(shard_files(out)) == SHARDS


# ----------------------------------------------------------------------------
# An existing cluster: `dask scheduler` and `dask worker` processes

def scheduler_address(path):
    with contextlib.suppress(OSError, ValueError, KeyError):
        with open(path) as f:
            return json.load(f)["address"]


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A scheduler and two single-threaded worker processes on 127.0.0.1, random free ports."""
    d = tmp_path_factory.mktemp("dask")
    procs = []
    with open(d / "cluster.log", "w") as log:
        try:
            procs.append(spawn("-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", 0, "--no-dashboard",
                               "--scheduler-file", d / "scheduler.json", log=log))
            wait_for(lambda: scheduler_address(d / "scheduler.json"), what="the scheduler")
            address = scheduler_address(d / "scheduler.json")
            procs.append(spawn("-m", "dask", "worker", address, "--nworkers", 2, "--nthreads", 1,
                               "--no-dashboard", "--host", "127.0.0.1", log=log))
            with distributed.Client(address, timeout=60, set_as_default=False) as client:
                client.wait_for_workers(2, timeout=120)
                yield address, client
        finally:
            for p in reversed(procs):
                end(p)


def test_existing_cluster_writes_the_same_bytes_even_when_a_worker_dies(clean, dask_cluster, tmp_path, capsys):
    address, client = dask_cluster
    out = tmp_path / "cluster.npz"
    code, err = run_main(capsys, "--scheduler", address, "--out", out)
    assert code == 0, err
    assert file_bytes(out) == file_bytes(clean[0])

    out = tmp_path / "worker-killed.npz"                             # now kill -9 a worker mid-run
    with open(tmp_path / "client.log", "w") as log:
        proc = spawn("-m", "tinylazy.sample_many", *ARGS, "--scheduler", address, "--out", out, log=log)
        try:
            wait_for(lambda: shard_files(out) or proc.poll() is not None, what="a first shard")
            busy = [addr for addr, keys in client.processing().items() if keys]
            os.kill(client.run(os.getpid, workers=busy[:1])[busy[0]], signal.SIGKILL)
            done = len(shard_files(out))
            assert proc.wait(timeout=300) == 0, open(tmp_path / "client.log").read()
        finally:
            end(proc)
    assert done < SHARDS                                             # killed with a shard in flight
    assert file_bytes(out) == file_bytes(clean[0])


# ----------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("args,said", [
    (("--num", 0), "--num must be >= 1"),
    (("--seed", -1), "--seed must be an integer in 0..18446744073709551615, got -1"),
    (("--seed", 2 ** 64), "--seed must be an integer in 0..18446744073709551615"),
    (("--workers", 0), "--workers must be >= 1, got 0"),
    (("--sampler", "ddpm", "--lazy"), "--lazy works with --sampler ddim"),
    (("--out", "/no/such/folder/x.npz"), "the folder /no/such/folder does not exist"),
    (("--lazy", "--steps", 7), "no gates for 7 steps"),
    (("--classes", 3, 10), "unknown class id 10"),
    (("--workers", 2, "--scheduler", "tcp://127.0.0.1:1"), "not allowed with argument"),
    (("--scheduler", "tcp://127.0.0.1:1"), "nothing listens on port 1 of 127.0.0.1"),    # at once, no 20 s wait
    pytest.param(("--backend", "cupy"), "--backend cupy: no CuPy GPU",
                 marks=pytest.mark.skipif(cupy_available(), reason="this machine has a CuPy GPU")),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, said):
    code, err = run_main(capsys, "--out", tmp_path / "x.npz", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert os.listdir(tmp_path) == []


def test_missing_extra_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)           # import distributed -> ImportError
    code, err = run_main(capsys, "--out", tmp_path / "x.npz")
    assert code == 2 and err == ["error: tinylazy sample-many (it runs on Dask) needs Dask distributed: "
                                 "pip install 'tinylazy[distributed]'"]

