"""The public entry points, where the user's choices arrive: which backend runs the model
(NumPy, CuPy or OpenCL) and whether sampling reuses modules (LazyDiT).

The modules below never choose: ``io`` loads NumPy/CuPy models, ``sampling`` runs one loop
over the model protocol (protocol.py), ``lazy`` and ``opencl`` provide the lazy wrapper and
the device twins.  This module picks them and passes them down; tests/test_layering.py
states the import directions that keep it so.
"""
import numpy as np

from . import io, large_dit_io, sampling, vae
from .backend import resolve_dtype
from .diffusion import create_diffusion
from .lazy import DEFAULT_THRESHOLD, LazyDiT
from .opencl import DeviceLatents, OpenCLDiT, OpenCLLazyDiT

OPENCL_DTYPE = "the OpenCL backend runs float32 only (use dtype='float32')"
LARGE_DIT_BACKENDS = ("Large-DiT runs on the NumPy backend only (its RMSNorm, rotary embeddings and SwiGLU "
                      "have no OpenCL or CuPy path yet): use backend='numpy'")


def load_dit(path, dtype="float32", backend="numpy", num_heads=None, device=None):
    """Load a DiT (``io.load_dit``): backend "numpy" or "cupy" gives a ``DiT``, "opencl" an
    ``OpenCLDiT`` (float32 only) on ``device`` (see ``opencl.select_device``).  The model
    carries the weights hash computed while reading.

    A Large-DiT file (``layers.*`` keys; ``large_dit_io``) gives a ``LargeDiT`` on NumPy,
    its weights memory-mapped from the file."""
    if large_dit_io.is_large_dit(path):
        if backend != "numpy":
            raise ValueError(LARGE_DIT_BACKENDS)
        return large_dit_io.load_large_dit(path, dtype, backend, num_heads)
    if backend != "opencl":
        return io.load_dit(path, dtype, backend, num_heads)
    if resolve_dtype(dtype) != np.float32:
        raise ValueError(OPENCL_DTYPE)
    return OpenCLDiT.from_model(io.load_dit(path, "float32", "numpy", num_heads), device=device)


def load_vae(path, dtype="float32", backend="numpy", config=None):
    """``vae.load_vae``; with backend "opencl" the VAE runs on NumPy (it has no OpenCL kernels)."""
    return vae.load_vae(path, dtype=dtype, backend="numpy" if backend == "opencl" else backend, config=config)


def lazy_dit(model, timestep_map, gates=None, threshold=DEFAULT_THRESHOLD, decisions=None, stats=None):
    """``lazy.LazyDiT`` around ``model``, its arrays where the model's are (OpenCL: on the device)."""
    cls = OpenCLLazyDiT if isinstance(model, OpenCLDiT) else LazyDiT
    return cls(model, timestep_map, gates, threshold, decisions, stats)


def ddim_sample(model, noise, labels, steps=20, cfg_scale=1.0, eta=0.0, step_noise=None, progress=False,
                callback=None, guide_channels=3, clip_denoised=False, gates=None, threshold=DEFAULT_THRESHOLD,
                decisions=None, lazy_stats=None):
    """``sampling.ddim_sample`` (every argument up to clip_denoised), lazy when asked, on the model's device.

    LazyDiT (``lazy.py``): ``gates`` (``load_gates``) skip modules whose score is below
    ``threshold``; ``decisions`` force them: a bool array (steps, depth, 2[, rows]) in sampling
    order, True = compute, or a callable (step, layer, kind, scores) -> bool / (rows,) bool,
    rows being the model's batch rows ([cond; uncond] halves with guidance); ``lazy_stats`` (a
    ``LazyStats``) is filled in.  An ``OpenCLDiT`` keeps the latents on its device (DDIM with
    eta = 0 and no clipping only).
    """
    net = model
    if gates is not None or decisions is not None or lazy_stats is not None:
        timestep_map = create_diffusion(sampling.check_steps(steps)).timestep_map
        net = lazy_dit(model, timestep_map, gates, threshold, decisions, lazy_stats)
    latents = DeviceLatents(model) if isinstance(model, OpenCLDiT) else None
    return sampling.ddim_sample(net, noise, labels, steps, cfg_scale, eta, step_noise, progress, callback,
                                guide_channels, clip_denoised, latents=latents)
