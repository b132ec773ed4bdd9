"""tinylazy train-gates (examples/train_gates.py): an interrupted run resumes to the same gates; usage errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinylazy as tl
from tinylazy.io import read_safetensors, save_dit
from tinylazy.lazy_train import GateTrainer
from tinylazy.train_gates import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_gates.py")
CFG = tl.DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gates")
    model = tl.DiT(CFG, tl.init_params(CFG, seed=0, scheme="random"))
    save_dit(model, d / "tiny.safetensors")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 4, 24))
    return d


def _argv(files, out):
    return ["--weights", str(files / "tiny.safetensors"), "--data", str(files / "data.npz"), "--steps", "6",
            "--iters", "7", "--batch", "4", "--lr", "1e-2", "--rho-attn", "0.05", "--target-ratio", "0.3",
            "--checkpoint-every", "2", "--eval-samples", "2", "--out", str(out)]


@pytest.mark.parametrize("recipe", [None, "official"])                     # the default (chain) and the paper's
def test_interrupted_run_resumes_to_the_same_result(files, monkeypatch, capsys, recipe):
    extra = ["--recipe", recipe] if recipe else []
    name = recipe or "default"
    argv = lambda out: _argv(files, out) + extra                                          # noqa: E731
    assert main(argv(files / f"straight-{name}.safetensors")) == 0
    assert not os.path.exists(files / f"straight-{name}.train-state.safetensors")     # removed when done

    real_step = GateTrainer.step

    def interrupted(self):
        if self.iteration == 5:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(GateTrainer, "step", interrupted)
    assert main(argv(files / f"resumed-{name}.safetensors")) == 130
    assert "interrupted; continue with: tinylazy train-gates" in capsys.readouterr().err
    assert os.path.exists(files / f"resumed-{name}.train-state.safetensors")  # the checkpoint of iteration 4
    monkeypatch.setattr(GateTrainer, "step", real_step)
    assert main(argv(files / f"resumed-{name}.safetensors") + ["--resume"]) == 0
    assert "resuming at iteration 4" in capsys.readouterr().err
    a, meta_a = read_safetensors(files / f"straight-{name}.safetensors")
    b, meta_b = read_safetensors(files / f"resumed-{name}.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert meta_a == meta_b
    model = tl.io.load_dit(files / "tiny.safetensors")
    gates = tl.load_gates(files / f"straight-{name}.safetensors", model, steps=6)
    assert gates.training["recipe"] == (recipe or "chain")
    assert gates.training["iterations"] >= 7 and "measured_ratio" in gates.training


def test_diverging_run_exits_1_and_keeps_its_state(files, monkeypatch, capsys):
    real_step = GateTrainer.step

    def nan_gates_at_5(self):
        res = real_step(self)
        if self.iteration == 5:
            self.gates.mlp[0, 0, 0] = np.nan           # the update broke the gates; the loss was still finite
        return res

    monkeypatch.setattr(GateTrainer, "step", nan_gates_at_5)
    assert main(_argv(files, files / "nan.safetensors")) == 1
    assert "error: gate training diverged at iteration 5" in capsys.readouterr().err.splitlines()[-1]
    state = files / "nan.train-state.safetensors"
    assert read_safetensors(state)[1]["iteration"] == "4" and not os.path.exists(files / "nan.safetensors")


@pytest.mark.parametrize("recipe", ["x-norm", "chain", "all-steps-macs"])
def test_recipes_with_a_macs_budget_train_on_until_within_it(files, recipe):
    out = files / f"{recipe}.safetensors"
    assert main(_argv(files, out) + ["--recipe", recipe, "--iters", "2", "--target-ratio", "0.6"]) == 0
    model = tl.io.load_dit(str(files / "tiny.safetensors"))
    facts = tl.load_gates(out, model).training
    assert facts["recipe"] == recipe and facts["budget"] == "macs" and facts["all_steps"]
    assert 2 <= facts["iterations"] <= 4                                 # on, at most as long again
    check = GateTrainer(model, np.zeros((4, 1, 8, 8)), np.zeros(4, int), 6, batch=4)
    check.gates = tl.load_gates(out, model)
    within = check.measure(num=32, seed=2).macs_lazy_ratio >= 0.6        # the budget check: 32 samples, seed + 2
    assert within or facts["iterations"] == 4                            # it stops early only within the budget


@pytest.mark.parametrize("extra, message", [
    (["--steps", "1"], "--steps must be an integer in 2..1000, got 1"),
    (["--target-ratio", "1.5"], "--target-ratio must lie in"),
    (["--resume"], "no training state"),
    (["--data", "nowhere.npz"], "no such file"),
])
def test_usage_errors(files, capsys, extra, message):
    """In this process: main() is what the console command and examples/train_gates.py run (tests/test_cli.py
    checks the convention of each command's process once)."""
    assert main(_argv(files, files / "err.safetensors") + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(files / "err.safetensors")


def test_the_example_script_runs_under_the_convention():
    """examples/train_gates.py is a thin wrapper over main(): one process, to see that it is."""
    r = subprocess.run([sys.executable, SCRIPT, "--steps", "1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: --steps must be an integer in 2..1000, got 1") \
        and len(r.stderr.splitlines()) == 1, r.stderr


def test_sample_lazy_finds_the_gates_for_the_step_count(files, tmp_path, monkeypatch, capsys):
    from tinylazy.sample import main as sample
    weights = str(files / "tiny.safetensors")
    monkeypatch.chdir(tmp_path)                    # where --lazy looks first, then beside the weights

    def run(*extra):
        code = sample(["--weights", weights, "--out", str(tmp_path / "s.png"), "--lazy", *extra])
        return code, capsys.readouterr().err
    code, err = run("--steps", "6")
    assert code == 2 and "no LazyDiT gates for 6 steps" in err and "tinylazy train-gates" in err
    model = tl.io.load_dit(weights)
    gates = tl.LazyGates.zeros(model, 6)
    gates.attn[:4] = -1.0                          # non-zero gates: some modules reuse their cache
    tl.save_gates(gates, tl.lazy.gates_file(weights, 6))
    code, err = run("--steps", "6")
    assert code == 0, err
    assert "LazyDiT: lazy ratio" in err and os.path.isfile(tmp_path / "s.png")
    code, err = run("--steps", "8")
    assert code == 2 and "gates exist for --steps 6" in err
