"""benchmarks/fidelity.py: the distance statistics on known arrays, a tiny run end to end, its usage errors."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fidelity():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("fidelity", os.path.join(ROOT, "benchmarks", "fidelity.py"))
    mod = sys.modules["fidelity"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_statistics_of_a_known_deviation(fidelity):
    """x = ref + 0.4 g + h with h orthogonal to g: 40% of the way toward guidance 1, cos^2 = |0.4 g|^2 / |x - ref|^2."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 1, 4, 4))
    g = np.zeros_like(ref)
    g[:, 0, 0, 0] = 2.0                                     # the guidance direction: one pixel
    h = np.zeros_like(ref)
    h[:, 0, 1, 1] = 1.0                                     # and a deviation across it
    x = ref + 0.4 * g + h
    probes = {1.0: ref + g, 1.2: ref + 0.6 * g, 1.5: ref}
    out = fidelity.compare(x, ref, ref + g, probes)
    rel = np.linalg.norm((0.4 * g + h).reshape(3, -1), axis=1) / np.linalg.norm(ref.reshape(3, -1), axis=1)
    assert out["rel_rms_mean"] == pytest.approx(rel.mean()) and out["rel_rms_median"] == pytest.approx(np.median(rel))
    assert out["toward_1_mean"] == pytest.approx(0.4) and out["toward_1_median"] == pytest.approx(0.4)
    assert out["cos2_mean"] == pytest.approx(0.64 / (0.64 + 1.0))
    assert out["nearest_cfg_mean"] == 1.2                   # |0.4 g - 0.6 g| < |0.4 g| < |0.4 g - g|
    assert fidelity.compare(ref, ref)["rel_rms_p90"] == 0.0


def test_a_tiny_run_resumes_and_reports(fidelity, tmp_path, capsys):
    path = tmp_path / "fid.json"
    argv = ["--num", "3", "--batch", "3", "--cfg", "1.5", "--steps", "4", "--ratios", "0.5", "--recipes",
            "--probe-cfg", "1", "--json", str(path), "--gates-dir", str(tmp_path)]
    assert fidelity.main(argv) == 0
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    assert sorted(rows) == ["DDIM 2", "DDIM guidance 1", "rule (spread steps)"]
    assert rows["DDIM guidance 1"]["toward_1_mean"] == pytest.approx(1.0)
    assert rows["DDIM guidance 1"]["nearest_cfg_mean"] == 1.0
    assert rows["rule (spread steps)"]["lazy_ratio"] == 0.5 and 0 < rows["rule (spread steps)"]["rel_rms_mean"] < 1
    assert "| 1.5 | 4 | 50% | rule (spread steps) | 2.02 | " in capsys.readouterr().out
    assert fidelity.main(argv) == 0                         # a rerun: nothing to do, the same file
    assert sorted(r["method"] for r in json.loads(path.read_text())["rows"]) == sorted(rows)
    assert "DDIM 4" not in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--ratios", "1"], "--ratios must be a finite number in [0, 0.95], got 1"),
    (["--cfg", "0.5"], "--cfg must be a finite number >= 1, got 0.5"),
    (["--json", "x.txt"], "--json x.txt: unknown extension '.txt'"),
])
def test_usage_errors(fidelity, tmp_path, capsys, extra, message):
    assert fidelity.main(["--json", str(tmp_path / "f.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
