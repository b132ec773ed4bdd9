"""One full-width block of the paper's Large-DiT 3B and 7B against the official numerics.

Depth 1 at the real widths (D 3072 / 4096, 32 heads of 96 / 128, SwiGLU 8192 / 11008, adaLN
from 1024, q/k norm on), 32x32x4 latents (256 tokens, the rotary table's first 256 positions), one sample (the small
configs of test_large_dit.py test batches).  The PyTorch stand-in
shares the NumPy weights (no second copy): about 2.8 GB for the 7B block (float32 values, and
their float64 copy for the audit)."""
import gc

import numpy as np
import pytest
import torch

from tinylazy.large_dit import LargeDiT, get_large_config, init_params

from conftest import rel_err
from torch_large_dit import TorchLargeDiT


@pytest.mark.parametrize("name", ["3B", "7B"])
def test_one_full_width_block_matches_official(name):
    cfg = get_large_config(name, depth=1, qk_norm=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 32, 32))
    t, y = np.array([999]), np.array([207])
    p32 = init_params(cfg, seed=1, scheme="random", dtype=np.float32)
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        params = {k: v.astype(dtype) for k, v in p32.items()} if dtype == "float64" else p32
        out = LargeDiT(cfg, params, dtype=dtype)(x, t, y)
        tdt = getattr(torch, dtype)
        with torch.no_grad():
            ref = TorchLargeDiT.from_params(cfg, params, dtype=tdt, share=True, pinned_tables=True)(
                torch.from_numpy(x).to(tdt), torch.from_numpy(t), torch.from_numpy(y)).numpy()
        assert rel_err(out, ref) <= tol, (name, dtype)
        del params
        gc.collect()
