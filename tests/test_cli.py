"""The CLI convention (tinylazy.cli), command by command.

Bad input is one line ``error: ...`` and exit 2, found before any work (nothing is written);
a run that fails on its own is one line and exit 1 with the last good checkpoint kept; Ctrl-C
is one line and exit 130; a killed write leaves the previous file whole and the next write
removes its temp file; --resume with nothing to resume is an error and a resumed log has each
step once.  Commands run in-process through ``cli.main`` (a subprocess only where a process
must die or an import must fail).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tinylazy as tl
from tinylazy import cli, resources
from tinylazy import train as T
from tinylazy.io import read_safetensors, save_dit, write_safetensors
from tinylazy.lazy import gates_file

CFG = tl.DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=4)
TINY_TRAIN = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--batch-size", "8", "--no-progress",
              "--sample-every", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_dit(tl.DiT(CFG, tl.init_params(CFG, seed=0, scheme="random")), d / "m.safetensors")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32), labels=np.arange(8) % 4)
    (d / "old.safetensors").write_bytes(b"kept")
    os.makedirs(d / "folder.png")
    os.mkfifo(d / "fifo.npz")                 # a reader would block on it
    return d


def _cases(f):
    m, data, old, bundled_gates = f / "m.safetensors", f / "data.npz", f / "old.safetensors", \
        gates_file(resources.weights_path(resources.DEFAULT_MODEL), 20)
    return [
        ([], "give a command: one of sample, train"),
        (["nope"], "unknown command 'nope'"),
        (["sample", "--steps", "0"], "--steps must be an integer in 1..1000, got 0"),
        (["sample", "--cfg-scale", "nan"], "--cfg-scale must be a number >= 1"),
        (["sample", "--weights", "none.safetensors"], "no such file or folder, nor a bundled model (tiny-dit-digits)"),
        (["sample", "--weights", m, "--out", "missing/x.png"], "does not exist; create it first"),
        (["sample", "--weights", m, "--out", f / "folder.png"], "is a folder; give a file name in it"),
        (["sample", "--weights", m, "--out", "x.txt"], "unknown extension '.txt'; give a .png file"),
        (["sample", "--weights", m, "--out", "/proc/x.png"], "cannot write in /proc (it is not writable)"),
        (["sample", "--weights", m, "--lazy"], "no LazyDiT gates for 20 steps"),
        (["sample", "--gates", bundled_gates, "--steps", "10"], "gates were made for 20"),    # one line, no info
        (["sample", "--seed", "-1"], "--seed must be an integer in 0..18446744073709551615, got -1"),
        (["metrics", "--seed", "-1"], "--seed must be an integer in 0..18446744073709551615, got -1"),
        (["metrics", "--npz", f / "fifo.npz"], "fifo.npz is not a regular file (a FIFO or a device)"),
        (["train-gates", "--weights", m, "--data", f / "fifo.npz"], "is not a regular file (a FIFO"),
        (["train", "--lr", "nan"], "--lr must be a finite number in (0, 1], got nan"),
        (["train", "--lr", "100"], "--lr must be a finite number in (0, 1], got 100"),
        (["train", "--steps", "x"], "--steps must be an integer >= 1, got 'x'"),
        (["train", "--out", "/proc/r"], "cannot write in /proc"),
        (["train", "--out", "run", "--resume"], "--resume: no checkpoint at run/checkpoint.safetensors"),
        (["train", "--out", "run", "--export", "x.txt"], "unknown extension '.txt'"),
        (["train-gates", "--out", bundled_gates], "is a file shipped with tinylazy; write to another file (pass --force"),
        (["train-gates", "--weights", m, "--data", data, "--out", m], "is also the input --weights"),
        (["train-gates", "--weights", m, "--data", data, "--out", old], "exists; choose another file (pass --force"),
        (["train-gates", "--weights", m, "--data", data, "--resume"], "--resume: no training state"),
        (["train-gates", "--weights", m, "--data", "nowhere.npz"], "--data nowhere.npz: no such file"),
        (["train-gates", "--steps", "1"], "--steps must be an integer in 2..1000, got 1"),
        (["convert", "missing.pt", "o.safetensors"], "SRC missing.pt: no such file"),
        (["convert", old, old], "is also the input SRC"),
        (["convert", m, old], "exists; choose another file (pass --force to replace it)"),
        (["convert", m, "o.bin"], "unknown extension '.bin'; give a .safetensors file"),
        (["convert", old, "o.safetensors"], "not a zip checkpoint"),
        (["golden", "dump", "--steps", "0"], "--steps must be an integer in 1..1000, got 0"),
        (["golden", "dump", "--out", "t.npz"], "unknown extension '.npz'"),
        (["golden", "dump", "--gates", "g.safetensors"], "--gates g.safetensors: no such file"),
        (["golden", "compare", "a.safetensors", "b.safetensors"], "REF a.safetensors: no such file"),
        (["golden", "compare", m, m], "m.safetensors: "),                      # a TraceError
        (["golden", "goldens"], "--dir tests/golden: no such folder"),
        (["golden", "goldens", "--weights", old, "--dir", f], "cannot load the DiT from"),   # not its gates
        (["golden"], "the following arguments are required"),
        (["metrics", "--num", "2"], "--num must be an integer >= 4, got 2"),
        (["metrics", "--weights", m, "--save", "s.txt"], "unknown extension '.txt'"),
        (["metrics", "--weights", m], "the digits metrics need a 1x16x16 model"),
    ]


def test_bad_input_is_one_line_and_exit_2_before_any_work(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(files))
    for argv, phrase in _cases(files):
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, (argv, err)
        assert os.listdir(tmp_path) == [] and sorted(os.listdir(files)) == before, argv    # nothing written


_BLOCK_SKLEARN = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'sklearn':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from tinylazy.cli import main
print([main(argv) for argv in (['train', '--out', 'run'], ['train-gates'], ['metrics'])])
"""


def test_train_refuses_a_damaged_checkpoint_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("run")
    (tmp_path / "run" / T.CHECKPOINT).write_bytes(b"\xff" * 64)
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("the run started"))
    assert cli.main(["train", "--out", "run", "--resume", *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "checkpoint.safetensors" in err, err


def test_train_creates_the_folder_of_its_export(files, tmp_path, monkeypatch):
    # the export's folder is checked to be creatable up front, and made by the run (it used to fail
    # at the end, after all the training)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--out", "run", "--export", "new/e.safetensors",
                     "--steps", "2", *TINY_TRAIN]) == 0
    assert read_safetensors(tmp_path / "new" / "e.safetensors")[1]["steps"] == "2"


def test_missing_extra_names_the_pip_command(tmp_path):
    r = subprocess.run([sys.executable, "-c", _BLOCK_SKLEARN], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout.strip() == "[2, 2, 2]", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and all("needs scikit-learn: pip install 'tinylazy[train]'" in s for s in lines), lines
    assert os.listdir(tmp_path) == []                                 # no empty run folder left behind


def _sample(model, out):
    return ["sample", "--weights", str(model), "--steps", "1", "--batch", "1", "--out", str(out)]


def test_ctrl_c_is_one_line_130_and_leaves_the_old_file(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "g.png"
    assert cli.main(_sample(files / "m.safetensors", out)) == 0
    old = out.read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    capsys.readouterr()
    assert cli.main(_sample(files / "m.safetensors", out)) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert out.read_bytes() == old and os.listdir(tmp_path) == ["g.png"]      # no temp file left


_KILL = """
import os, signal, sys
import PIL.Image
from tinylazy import cli, io
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
class Dies:                                   # a tensor whose bytes are never produced
    shape, dtype = (4,), 'float32'
    __array__ = killed
real_save = PIL.Image.Image.save
def save(self, fp, *args, **kwargs):          # the whole PNG in the temp file, then killed before the rename
    real_save(self, fp, *args, **kwargs)
    fp.flush()
    killed()
PIL.Image.Image.save = save
kind, out, model = sys.argv[1:]
if kind == "png":
    cli.main(["sample", "--weights", model, "--steps", "1", "--batch", "1", "--out", out])
else:
    io.write_safetensors(out, {"a": io.np.ones(1000, "float32"), "b": Dies()})
"""


@pytest.mark.parametrize("kind, name", [("png", "g.png"), ("safetensors", "c.safetensors")])
def test_kill_during_a_write_keeps_the_old_file_and_the_next_write_removes_the_temp(files, tmp_path, kind, name):
    """kill -9 mid-write (PNG grids; safetensors: checkpoints, conversions, gates, traces)."""
    out = tmp_path / name
    if kind == "png":
        assert cli.main(_sample(files / "m.safetensors", out)) == 0
    else:
        write_safetensors(out, {"a": np.zeros(3, np.float32)})
    old = out.read_bytes()
    r = subprocess.run([sys.executable, "-c", _KILL, kind, str(out), str(files / "m.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert out.read_bytes() == old and len(temps) == 1 and temps[0].startswith(name + ".")
    if kind == "png":
        assert cli.main(_sample(files / "m.safetensors", out)) == 0
        assert Image.open(out).size == (64, 64)                    # one 8x8 image, enlarged x8
    else:
        write_safetensors(out, {"a": np.ones(3, np.float32)})
        assert read_safetensors(out)[0]["a"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == [name]


def test_train_diverges_to_exit_1_keeps_the_checkpoint_and_resumes_with_one_log_line_per_step(
        tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--steps", "4", "--ckpt-every", "2", "--log-every", "1", *TINY_TRAIN]
    real_step = T.Trainer.step

    def nan_at_3(self):
        terms = real_step(self)
        if self.step_count == 3:
            terms["loss"][:] = np.nan
        return terms

    monkeypatch.setattr(T.Trainer, "step", nan_at_3)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: training diverged at step 3: the loss is nan; the checkpoint of step 2"), err
    assert sorted(os.listdir("runs/train")) == ["checkpoint.safetensors", "log.jsonl"]     # nothing exported
    assert read_safetensors("runs/train/checkpoint.safetensors")[1]["step"] == "2"
    monkeypatch.setattr(T.Trainer, "step", real_step)
    with open("runs/train/log.jsonl", "a") as f:                      # a run killed after logging step 3
        f.write(json.dumps({"step": 3, "loss": 1.0}) + '\n{"step": 4, "lo')      # and while writing step 4
    assert cli.main(argv) == 2 and "add --resume to continue" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 0
    steps = [json.loads(s)["step"] for s in open("runs/train/log.jsonl")]
    assert steps == [1, 2, 3, 4] and os.path.isfile("runs/train/ema.safetensors")
