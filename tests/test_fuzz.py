"""Hostile and damaged files (issue #16): every class ends in a typed error naming the file, within a
memory bound, writing nothing and running nothing.  The cases are built in tests/fuzz_cases.py and
run in a child process whose address space is limited per case (benchmarks/fuzz_campaign.py runs the
full campaign with the same runner)."""
import os

import pytest

import fuzz_cases as F

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status") or not hasattr(os, "mkfifo"),
                                reason="the runner measures memory through Linux's /proc")


@pytest.fixture(scope="module")
def lean(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz"))
    jobs = F.lean_cases(os.path.join(folder, "cases"))
    for job in jobs:
        job["timeout"] = 20
    return jobs, F.run_jobs(jobs, folder)


def test_every_class_ends_in_a_clear_bounded_error(lean):
    jobs, results = lean
    surfaces = {j["surface"] for j in jobs}
    assert surfaces == {"read", "load_dit", "load_vae", "load_gates", "convert", "resume_train", "resume_gates",
                        "compare"}
    problems = []
    for job in jobs:
        r = results[job["id"]]
        what = f"{job['surface']} / {job['case']}: "
        if F.classify(job, r) != "clear error":
            problems.append(what + f"{r['outcome']} {r.get('error')} (typed {r.get('typed')}, names the file "
                                   f"{r.get('names_file')}, wrote {r.get('written')}, ran code {r.get('ran')}): "
                                   f"{r.get('message', '')[:200]}")
        elif r["peak"] is not None and r["peak"] >= F.MEM_LIMIT:
            problems.append(what + f"peak RSS {r['peak'] / 2**20:.0f} MiB above the start")
    assert not problems, "\n".join(problems)


def test_the_runner_sees_memory_crashes_and_hangs(tmp_path):
    """The measurement itself: an allocation beyond the budget fails, a crash and a hang are reported."""
    jobs = [{"id": i, "surface": "self", "case": do, "op": "selftest", "path": str(tmp_path), "dir": str(tmp_path),
             "args": dict(do=do, bytes=n), "timeout": 2} for i, (do, n) in
            enumerate((("allocate", F.AS_BUDGET + (64 << 20)), ("allocate", 100 << 20), ("crash", 0),
                       ("sleep", 0)))]
    r = F.run_jobs(jobs, str(tmp_path / ".."))
    assert (r[0]["outcome"], r[0]["error"]) == ("error", "MemoryError")
    assert r[1]["outcome"] == "loaded" and (r[1]["peak"] is None or 90 << 20 <= r[1]["peak"] < F.MEM_LIMIT)
    assert r[2]["outcome"] == "crash" and r[3]["outcome"] == "hang"
    assert [F.classify(j, r[j["id"]]) for j in jobs] == ["other exception", "identical load", "crash/hang",
                                                         "crash/hang"]


def test_code_running_pickles_are_live_and_refused(tmp_path):
    """The 36 payloads run code under a plain pickle.loads (checked in a child); convert refuses all 40
    and no marker appears."""
    import subprocess
    import sys

    from tinylazy.convert import ConvertError, convert
    labels = [label for label, _ in F.evil_pickles("x")]
    for i, label in enumerate(labels):
        d = tmp_path / f"{i:02d}"
        d.mkdir()
        F.archive(d / "m.pt", F.pickle_bytes(dict(F.evil_pickles(str(d / "pwned")))[label]))
        with pytest.raises(ConvertError, match="cannot read archive/data.pkl"):
            convert(d / "m.pt", d / "out.safetensors", progress=False)
        (d / "live.pkl").write_bytes(F.pickle_bytes(dict(F.evil_pickles(str(d / "live")))[label]))
    assert not list(tmp_path.glob("*/pwned")) and not list(tmp_path.glob("*/out.safetensors"))
    code = ("import glob, pickle, sys, time\n"
            "for p in sorted(glob.glob(sys.argv[1] + '/*/live.pkl')):\n"
            "    try:\n        pickle.loads(open(p, 'rb').read())\n    except Exception:\n        pass\n"
            "time.sleep(0.5)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, timeout=60)
    live = sorted(p.parent.name for p in tmp_path.glob("*/live"))
    assert live == [f"{i:02d}" for i in range(36)]
