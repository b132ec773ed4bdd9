"""The model protocol: what the samplers, traces, lazy sampling and gate training ask of a model.

``DiT`` (NumPy or CuPy), ``opencl.OpenCLDiT`` and the lazy wrappers (``lazy.LazyDiT``,
``opencl.OpenCLLazyDiT``) satisfy it, and so does anything else with these members:

    config        the ``DiTConfig``
    backend       "numpy", "cupy" or "opencl": where the math runs
    xp            the array module of the arrays ``__call__`` takes and returns (NumPy for OpenCL)
    dtype         the model dtype, float32 or float64 (OpenCL: float32 only)
    params        official parameter name -> array (OpenCL: the host float32 copy)
    weights_hash  ``io.weights_hash`` of the weights, given at construction (``load_dit`` passes
                  the one it computed while reading); None when the caller gave none
    recorder      a ``trace.Recorder`` that receives every named intermediate, or None
    check_inputs(x, t, y) -> (x, t, y): x as an array of ``xp`` in ``dtype``, t and y (B,) on the
                  host; a ValueError naming the problem for anything the official forward rejects
    __call__(x, t, y) -> out          the official ``DiT.forward``: x (B, C, H, W), t (B,) original
                                      timesteps 0..999, y (B,) labels -> (B, out_channels, H, W)
    forward_with_cfg(x, t, y, cfg_scale, guide_channels=3) -> out
                                      the official guided forward on a [cond; uncond] batch

The branch hook.  ``DiT`` and ``OpenCLDiT`` run one block schema (``dit.DiTSchema``) and
take ``branch=`` in ``__call__`` and ``forward_with_cfg``:

    branch(l, kind, z, cache) -> out

is called for module ``kind`` (one of ``KINDS``) of block ``l`` with its modulated input z
(B, T, D) and returns the module's output before the gate_msa / gate_mlp multiply; ``cache``
is the dict the module fills for its backward, or None.  The default is ``model.branch``,
which computes the module.  The variations are hooks: reuse of the previous step's output
(``lazy.LazyDiT``), the soft blend of gate training and its teacher step that keeps every
output (``lazy_train``).  A hook runs once per module call, never per token.
"""
import math
import numbers
from typing import Protocol, runtime_checkable

KINDS = ("attn", "mlp")                      # the branches of a block, in order; index 0, 1 in (..., 2) arrays


def check_cfg_scale(cfg_scale):
    """Guidance scale: a finite number >= 1 (1 = no guidance); the samplers and ``forward_with_cfg`` use it.
    Not a number: TypeError; NaN, inf or below 1: ValueError."""
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real):
        raise TypeError(f"cfg_scale must be a number >= 1 (1 = no guidance), got {type(cfg_scale).__name__} "
                        f"{cfg_scale!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 1:
        raise ValueError(f"cfg_scale must be a number >= 1 (1 = no guidance), got {cfg_scale!r}")
    return float(cfg_scale)


@runtime_checkable
class Model(Protocol):
    """See the module docstring; ``isinstance(m, Model)`` checks that every member is there."""

    config: object
    backend: str
    xp: object
    dtype: object
    params: dict
    weights_hash: object
    recorder: object

    def check_inputs(self, x, t, y): ...

    def __call__(self, x, t, y): ...

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3): ...
