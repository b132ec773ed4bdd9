"""The counter-based noise stream (noise.py) and ADM's sample files (samplefile.py, metrics --npz)."""
import zipfile

import json

import numpy as np
import pytest

from tinylazy import metrics, noise
from tinylazy.samplefile import SampleFileError, read_npz, read_samples, saved_uint8, to_adm_images, write_npz


def test_noise_is_philox4x64_box_muller_as_documented():
    """The derivation in noise.py, written out with Python integers, against Random123's known answer."""
    M0, M1, W0, W1, MASK = 0xD2E7470EE14C6C93, 0xCA5A826395121157, 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B, 2**64 - 1

    def philox(ctr, key):
        c, k = list(ctr), list(key)
        for r in range(10):
            if r:
                k = [(k[0] + W0) & MASK, (k[1] + W1) & MASK]
            p0, p1 = M0 * c[0], M1 * c[2]
            c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 64) ^ c[3] ^ k[1], p0 & MASK]
        return c

    assert philox([0] * 4, [0, 0]) == [0x16554d9eca36314c, 0xdb20fe9d672d0fdc, 0xd7e772cee186176b, 0x7e68b68aec7ba23b]
    seed, index, segment, n = 2**63 + 7, 12345, 3, 11
    words = [w for j in range(3) for w in philox([j + 1, 0, segment, 0], [index, seed])]
    want = []
    for a, b in zip(words[0::2], words[1::2]):
        u, v = ((a >> 11) + 1) * 2.0 ** -53, (b >> 11) * 2.0 ** -53
        r = np.sqrt(-2.0 * np.log(u))
        want += [r * np.cos(2.0 * np.pi * v), r * np.sin(2.0 * np.pi * v)]
    np.testing.assert_array_equal(noise.normals(seed, index, n, segment), np.array(want[:n]))
    batch = noise.image_noise(seed, [index, 0, index], (1, 3, 4), segment, np.float64)
    np.testing.assert_array_equal(batch[0], batch[2])
    np.testing.assert_array_equal(batch[0].reshape(-1), noise.normals(seed, index, 12, segment))
    with pytest.raises(ValueError, match="seed"):
        noise.normals(-1, 0, 4)



def test_sample_files_are_checked_before_anything_is_allocated(tmp_path):
    good = tmp_path / "good.npz"
    with open(good, "wb") as f:
        write_npz(f, {"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "arr_1": np.arange(2)})
    assert read_samples(good)[0].shape == (2, 4, 4, 3)
    lying = tmp_path / "lying.npz"                                  # a header that claims 10**12 images
    with zipfile.ZipFile(lying, "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 4, 4, 3)})
        f.write(bytes(96))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, np.array([{"a": 1}], dtype=object), np.arange(1))
    for path, said in ((lying, "holds 96 bytes of data, its header says"), (pickled, "expected uint8"),
                       (tmp_path / "none.npz", "no such file")):
        with pytest.raises(SampleFileError, match=said):
            read_samples(path)
    with pytest.raises(SampleFileError, match="arr_0 is uint8 .2, 4, 4, 3., expected uint8 .N, 16, 16, 3."):
        read_samples(good, size=(16, 16))
    with pytest.raises(SampleFileError, match="no run in the file"):
        read_npz(good, {"run": (np.uint8, (32,))})


def test_pixels_are_quantised_as_dit_saves_fid_samples():
    x = np.array([-2.0, -1.0, -1.0039, 0.0, 0.99, 0.9961, 1.0, 3.0])
    np.testing.assert_array_equal(saved_uint8(x), [0, 0, 0, 128, 254, 255, 255, 255])
    grey = np.linspace(-1, 1, 2 * 1 * 2 * 3).reshape(2, 1, 2, 3)
    rgb = to_adm_images(grey)                                       # (B, 1, H, W) -> (B, H, W, 3)
    assert rgb.shape == (2, 2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 2], saved_uint8(grey[:, 0]))


def test_metrics_scores_an_npz_of_real_digits_like_real_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    images, labels = metrics.heldout_digits()
    path = tmp_path / "real.npz"
    with open(path, "wb") as f:
        write_npz(f, {"arr_0": to_adm_images(images), "arr_1": labels.astype(np.int64)})
    assert metrics.main(["--npz", str(path), "--cache-dir", str(tmp_path / "judge"), "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["num"] == len(labels) and res["accuracy"] > 0.95 and 0.7 < res["fd_ratio"] < 1.3
    assert "FD ratio" in out
    with open(path, "wb") as f:
        write_npz(f, {"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "arr_1": np.arange(4)})
    assert metrics.main(["--npz", str(path), "--cache-dir", str(tmp_path / "judge")]) == 2
    assert "expected uint8 (N, 16, 16, 3)" in capsys.readouterr().err
