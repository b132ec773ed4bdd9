"""tinylazy.metrics: the digits judge, Frechet distance, accuracy, PSNR, and the CLI."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

import tinylazy as tl  # noqa: E402
from tinylazy import metrics  # noqa: E402
from tinylazy.data import load_digits_dataset  # noqa: E402


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("judge")


@pytest.fixture(scope="module")
def judge(judge_dir):
    return metrics.load_classifier(judge_dir)


@pytest.fixture(scope="module")
def real():
    return load_digits_dataset()


def test_frechet_distance_matches_the_sqrtm_formula():
    from scipy import linalg
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((250, 6)) * 1.5 + 0.3
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb) - 2 * np.trace(linalg.sqrtm(sa @ sb).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9 * np.trace(sa)


def test_judge_accuracy_on_held_out_real_digits(judge):
    images, labels = metrics.heldout_digits()
    assert len(images) == judge.info["heldout_count"] == 359
    assert judge.accuracy(images, labels) >= 0.95
    assert judge.info["heldout_accuracy"] == judge.accuracy(images, labels)


def test_fd_real_vs_real_small_and_noise_large(judge, real):
    images, labels = real
    f = judge.features(images)
    assert abs(metrics.frechet_distance(f, f)) < 1e-8 * metrics.frechet_distance(f, f[::-1][:500])
    rng = np.random.default_rng(1)
    fd_noise, floor, n = metrics.fd_against_real(judge.features(rng.uniform(-1, 1, (1000, 1, 16, 16))), f)
    assert n == 898 and floor > 0
    assert fd_noise > 20 * floor
    # a held-out set scored as if generated: its FD stays near the floor, its accuracy high
    res = metrics.evaluate(*metrics.heldout_digits(), classifier=judge)
    assert res["fd_ratio"] < 2.0 and res["accuracy"] >= 0.95 and res["fd_count"] == 359


def test_judge_is_cached_and_deterministic(tmp_path, judge, real):
    recipe = dict(metrics.RECIPE, epochs=1)
    a = metrics.load_classifier(tmp_path / "a", recipe=recipe)
    b = metrics.load_classifier(tmp_path / "b", recipe=recipe)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k])
    assert len(list((tmp_path / "a").iterdir())) == 1
    again = metrics.load_classifier(tmp_path / "a", recipe=recipe)          # read back from the cache
    assert all(np.array_equal(again.params[k], a.params[k]) for k in a.params)
    assert a.info["key"] != judge.info["key"]                                # the key follows the recipe


def test_psnr_and_max_abs_diff():
    a = np.zeros((2, 1, 4, 4))
    b = a.copy()
    b[0, 0, 0, 0] = 0.5
    assert metrics.psnr(a, a) == float("inf") and metrics.max_abs_diff(a, b) == 0.5
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(4.0 / (0.25 / 32)))


def test_cli_samples_scores_and_compares(tmp_path, judge, judge_dir, capsys):
    from tinylazy.io import save_dit
    cfg = tl.get_config("tiny-dit-digits", depth=1, hidden_size=32, num_heads=2)
    save_dit(tl.DiT.from_config(cfg, seed=0, scheme="random"), tmp_path / "m.safetensors")
    args = ["--weights", str(tmp_path / "m.safetensors"), "--steps", "2", "--num", "20", "--batch-size", "8",
            "--cache-dir", str(judge_dir)]
    assert metrics.main(args + ["--save", str(tmp_path / "s.safetensors"), "--cfg-scale", "1.5", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert metrics.main(args + ["--compare", str(tmp_path / "s.safetensors"), "--cfg-scale", "1.5", "--json"]) == 0
    out = capsys.readouterr().out
    second = json.loads(out.splitlines()[-1])
    assert first["num"] == 20 and first["fd_count"] == 20
    assert second["psnr"] == float("inf") and second["max_abs_diff"] == 0.0
    assert "FD floor (real halves)" in out and "class accuracy" in out and "PSNR vs --compare" in out
    assert metrics.main(["--help"]) == 0
