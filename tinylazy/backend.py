"""Array-module layer: the one place that knows about CuPy.

Everything else is written against ``xp`` (NumPy or CuPy), as Chainer's
``get_array_module`` does.  PyOpenCL is imported only by ``tinylazy.opencl``.
"""
import numpy as np

BACKENDS = ("numpy", "cupy")                       # array modules (xp)
MODEL_BACKENDS = BACKENDS + ("opencl",)             # what load_dit and the commands accept
DTYPES = {"float32": np.float32, "float64": np.float64}


def get_xp(backend="numpy"):
    """Return the array module for ``backend`` ("numpy" or "cupy")."""
    if backend == "numpy":
        return np
    if backend == "cupy":
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError("backend='cupy' needs CuPy: pip install 'tinylazy[gpu]'") from e
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            raise RuntimeError(f"backend='cupy': no usable CUDA device ({e})") from e
        return cupy
    raise ValueError(f"unknown backend {backend!r}; the array backends are numpy and cupy "
                     f"(opencl models come from load_dit(..., backend='opencl'))")


def check_backend(backend):
    """A model backend name: numpy, cupy or opencl (ValueError listing all three otherwise)."""
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(MODEL_BACKENDS)}")
    return backend


def cupy_available():
    """True when CuPy imports and sees at least one GPU."""
    try:
        get_xp("cupy")
        return True
    except RuntimeError:
        return False


def resolve_dtype(dtype):
    """'float32' (default) or 'float64' ("audit mode") -> NumPy dtype."""
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose 'float32' or 'float64'")
    return np.dtype(DTYPES[key])


def array_module_of(x):
    """The array module (numpy or cupy) that owns ``x``."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def to_numpy(x):
    """Copy any backend array to a NumPy array on the host."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)
