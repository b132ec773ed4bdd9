"""The installed path: a non-editable install, used from an empty folder, carries the bundled model,
its gates and the kernels, and runs the main commands (issue 15's "done when").

The package is built from a copy of the files pyproject.toml packages (so nothing else of the
checkout can help, and no build/ folder lands in it) and installed with pip --target, offline.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "tinylazy", "weights", "kernels_cl")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    pytest.importorskip("setuptools")
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return target


def _run(installed, cwd, *cmd):
    env = dict(os.environ, PYTHONPATH=str(installed))
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_package_works_from_an_empty_folder(installed, tmp_path):
    script = installed / "bin" / "tinylazy"                       # the console command pip wrote
    assert script.is_file()
    r = _run(installed, tmp_path, sys.executable, "-c", "import tinylazy as tl, tinylazy.opencl as o; "
             "print(tl.__file__, o.KERNEL_DIR, tl.load_dit('tiny-dit-digits'), sep='\\n')")
    assert r.returncode == 0, r.stderr
    module, kernels, model = r.stdout.splitlines()
    assert module.startswith(str(installed)) and kernels.startswith(str(installed))   # not the checkout's copies
    assert model.startswith("DiT(depth=6, hidden=128")
    r = _run(installed, tmp_path, sys.executable, str(script), "sample", "--steps", "2")
    assert r.returncode == 0 and "wrote sample.png" in r.stdout, r.stderr
    r = _run(installed, tmp_path, sys.executable, str(script), "sample", "--steps", "20", "--lazy", "--out", "l.png")
    assert r.returncode == 0 and "LazyDiT: lazy ratio 35.4%" in r.stderr, r.stderr     # the chain gates
    assert f"gates: {installed}" in r.stderr                     # the bundled gates, inside the package
    r = _run(installed, tmp_path, sys.executable, str(script), "sample", "--steps", "20", "--out", "o.png",
             "--gates", "tiny-dit-digits.gates-ddim20-official")  # a bundled gates file by name: the paper's recipe
    assert r.returncode == 0 and "LazyDiT: lazy ratio 44.6%" in r.stderr, r.stderr
    assert f"gates: {installed}" in r.stderr and "ddim20-official" in r.stderr
    r = _run(installed, tmp_path, sys.executable, "-m", "tinylazy.golden", "dump", "--steps", "2", "--batch", "1",
             "--out", "t.safetensors")
    assert r.returncode == 0 and "wrote t.safetensors" in r.stdout, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["l.png", "o.png", "sample.png", "t.safetensors"]   # nothing else written
    want = sorted(n for n in os.listdir(os.path.join(ROOT, "kernels_cl")) if n.endswith(".cl"))
    assert sorted(p.name for p in (installed / "tinylazy" / "kernels_cl").glob("*.cl")) == want
