"""benchmarks/frontier.py: a tiny grid end to end (JSON, resume, figure, table), the rows it takes
from other JSON files (oracle rows of issue #21), and its usage errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "frontier.py")
TINY = ["--num", "4", "--batch", "4", "--cfg", "1.5", "--steps", "4", "--ratios", "0.5", "--ddim-steps", "2",
        "--methods", "DDIM", "rule"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)      # as a script is: in sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def frontier():
    return _load("frontier", SCRIPT)


def test_a_tiny_grid_runs_resumes_and_reports(frontier, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = ["--json", tmp_path / "f.json", "--figure", tmp_path / "f.png", "--gates-dir", tmp_path / "gates"]
    argv = [str(a) for a in TINY + ["--seeds", "0"] + out]
    assert frontier.main(argv) == 0
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["num"] == 4 and data["weights_tensors_hash"] != data["weights_hash"]
    assert sorted((r["method"], r["steps"], r["seed"]) for r in data["rows"]) == [
        ("DDIM", 2, 0), ("rule (spread steps)", 4, 0)]
    rule = next(r for r in data["rows"] if r["method"] != "DDIM")
    assert rule["lazy_ratio"] == 0.5 and rule["group"] == "Lazy 4 @50%" and rule["fd"] > 0
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| 1.5 | 4 | 50% | rule (spread steps) | 50% | " in table

    # a rerun with a second seed runs only that seed's points; the first seed's rows stay as they were
    assert frontier.main([str(a) for a in TINY + ["--seeds", "0", "1"] + out]) == 0
    again = json.loads((tmp_path / "f.json").read_text())
    assert again["rows"][:2] == data["rows"] and [r["seed"] for r in again["rows"][2:]] == [1, 1]
    assert "2 points to run (2 known)" in capsys.readouterr().err

    # rows of the same model and sample count in other JSON files of the folder are points too (the
    # oracle rows of issue #21, in lazy_quality.py's row format); another sample count is not
    oracle = dict(rule, method="oracle (per sample)", fd=rule["fd"] / 2)
    for name, num in (("oracle.json", 4), ("other.json", 8)):
        (tmp_path / name).write_text(json.dumps({"num": num, "seed": 0, "weights_hash": data["weights_tensors_hash"],
                                                 "rows": [dict(oracle, method=f"oracle ({name})")]}))
    assert frontier.main([str(a) for a in TINY + ["--seeds", "0", "--report-only"] + out]) == 0
    table = capsys.readouterr().out
    assert "| oracle (oracle.json) | 50% |" in table and "-50.0% |" in table and "other.json" not in table


def test_runs_sharing_one_json_keep_each_others_points(frontier, tmp_path):
    """Each point is added to the file as it is now (read, add, write under a lock), not to what a
    run read when it started, so two runs of the grid (e.g. one per recipe) can share one JSON."""
    path = str(tmp_path / "f.json")
    header = {"format": frontier.FORMAT, "weights_hash": "a" * 64, "num": 4, "rows": []}
    row = {"cfg": 1.5, "group": "Lazy 20 @50%", "method": "rule (spread steps)", "steps": 20, "seed": 0, "fd": 1.0}
    frontier.add_point(dict(header), row, path)
    frontier.add_point(dict(header), dict(row, method="LazyDiT chain"), path)      # a run that read the file empty
    frontier.add_point(dict(header), dict(row, fd=2.0), path)                      # the same point again: replaced
    rows = json.loads(open(path).read())["rows"]
    assert [(r["method"], r["fd"]) for r in rows] == [("LazyDiT chain", 1.0), ("rule (spread steps)", 2.0)]


@pytest.mark.parametrize("extra, message", [
    (["--json", "points.txt"], "--json points.txt: unknown extension '.txt'"),
    (["--ratios", "1.5"], "--ratios must be a finite number in [0, 0.95], got 1.5"),
    (["--recipes", "nope"], "invalid choice: 'nope'"),
])
def test_usage_errors(frontier, tmp_path, capsys, extra, message):
    assert frontier.main(["--figure", str(tmp_path / "f.png"), "--json", str(tmp_path / "f.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "f.json")


def test_the_script_runs_under_the_cli_convention(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--num", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --num must be an integer >= 2, got 1"), r.stderr


def test_the_seeds_of_one_comparison_run_together(frontier, tmp_path, capsys):
    """--dry-run lists the plan in run order: the DDIM curve, then per (N, target) each seed's methods."""
    argv = ["--num", "4", "--cfg", "1.5", "--seeds", "0", "1", "--steps", "4", "--ratios", "0.3", "0.5",
            "--ddim-steps", "2", "--methods", "DDIM", "rule", "--json", str(tmp_path / "f.json"),
            "--figure", str(tmp_path / "f.png"), "--dry-run"]
    assert frontier.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["cfg 1.5 | seed 0 | DDIM 2 | DDIM", "cfg 1.5 | seed 1 | DDIM 2 | DDIM",
                   "cfg 1.5 | seed 0 | Lazy 4 @30% | rule (spread steps)",
                   "cfg 1.5 | seed 1 | Lazy 4 @30% | rule (spread steps)",
                   "cfg 1.5 | seed 0 | Lazy 4 @50% | rule (spread steps)",
                   "cfg 1.5 | seed 1 | Lazy 4 @50% | rule (spread steps)"]
