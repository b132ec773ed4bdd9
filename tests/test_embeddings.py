"""The timestep features bit for bit against the official float32 arithmetic written out in the tests.

tests/official_features.py computes each float32 operation of the official
``timestep_embedding`` on Python floats with explicit rounding (no NumPy float32, no
tinylazy code), so a float64 phase, a swapped cos/sin or a frequency off by an ulp
anywhere in t = 0..999 fails here.
"""
import numpy as np
import pytest

from tinylazy.embeddings import timestep_features

from official_features import f32, official_timestep_features


def test_every_timestep_equals_the_official_float32_arithmetic_bit_for_bit():
    t = np.arange(1000)
    got = timestep_features(t)
    assert got.dtype == np.float32 and got.shape == (1000, 256)
    want = official_timestep_features(t)
    bad = np.flatnonzero((got.view(np.uint32) != want.view(np.uint32)).any(axis=1))
    assert bad.size == 0, f"{bad.size} timesteps differ, first t = {bad[:5].tolist()}"
    np.testing.assert_array_equal(got[0, :128], 1.0)                  # cos first: cos(0) = 1, sin(0) = 0
    np.testing.assert_array_equal(got[0, 128:], 0.0)


@pytest.mark.parametrize("dim", [7, 64])
def test_other_widths_and_float_timesteps(dim):
    t = np.array([0.0, 2.5, 998.75])                                   # t.float(): fractional timesteps too
    assert np.array_equal(timestep_features(t, dim).view(np.uint32), official_timestep_features(t, dim).view(np.uint32))


def test_the_reference_rounds_like_float32():
    assert f32(0.1) == float(np.float32(0.1)) and f32(1 + 2.0 ** -24) == 1.0          # ties to even
    assert f32(1 + 3 * 2.0 ** -24) == 1 + 2.0 ** -22
