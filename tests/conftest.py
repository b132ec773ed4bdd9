import pytest

from tinylazy.backend import cupy_available

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.skipif(not cupy_available(), reason="no CuPy GPU"))]


def rel_err(a, b):
    """max |a - b| / max |b|: one number per tensor, robust to tiny elements."""
    import numpy as np
    from tinylazy.backend import to_numpy
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
