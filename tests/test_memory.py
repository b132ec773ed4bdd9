"""Recycled buffers for the big arrays of a training step (tinylazy.memory)."""
import contextlib
import gc
import threading

import numpy as np
import pytest

import tinylazy as tl
from tinylazy import memory
from tinylazy.diffusion import create_diffusion
from tinylazy.optim import AdamW
from tinylazy.train import train_step

SHAPE = (512, 1024)                                  # 2 MiB of float32: recycled


@pytest.fixture(autouse=True)
def no_idle_buffers():
    memory.release()
    yield
    memory.release()


def address(a):
    return a.__array_interface__["data"][0]


def test_a_buffer_is_reused_only_once_every_view_is_gone():
    with memory.recycling():
        a = memory.empty(SHAPE, np.float32)
        a[...] = 7
        where = address(a)
        view = a[::2, 3:]
        del a
        gc.collect()
        assert memory.idle_bytes() == 0                          # the view still uses it
        b = memory.empty(SHAPE, np.float32)
        assert address(b) != where
        view_values = view.copy()
        b[...] = -1
        np.testing.assert_array_equal(view, view_values)        # nothing shared
        del view
        gc.collect()
        assert memory.idle_bytes() == 2 << 20
        c = memory.empty((1024, 512), np.float32)               # same bytes, other shape
        assert address(c) == where and memory.idle_bytes() == 0
        assert c.shape == (1024, 512) and c.dtype == np.float32 and c.flags.c_contiguous and c.flags.writeable


def test_outside_the_context_and_for_small_arrays_it_is_numpy():
    a = memory.empty(SHAPE, np.float64)
    with memory.recycling():
        small = memory.empty((100, 100), np.float32)
    for x in (a, small):
        assert x.base is None and x.flags.owndata
    del a, small
    gc.collect()
    assert memory.idle_bytes() == 0


def test_arrays_freed_in_other_threads_come_back():
    with memory.recycling():
        arrays = [memory.empty(SHAPE, np.float32) for _ in range(8)]
    threads = [threading.Thread(target=lambda i=i: arrays.__setitem__(i, None)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert memory.idle_bytes() == 8 * (2 << 20)
    memory.release()
    assert memory.idle_bytes() == 0


def test_recycling_does_not_change_a_training_step(monkeypatch):
    """Three steps with recycled buffers give the bits of three without (and reuse memory)."""
    cfg = tl.DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2,
                       num_classes=10, learn_sigma=True)
    rng = np.random.default_rng(0)
    B = 32                                                        # (B, T, 4D) float32 = 2 MiB
    x0 = rng.uniform(-1, 1, (B, 1, 16, 16)).astype(np.float32)
    noise = rng.standard_normal((B, 1, 16, 16)).astype(np.float32)
    t, y = rng.integers(0, 1000, B), rng.integers(0, 11, B)
    diffusion = create_diffusion("")

    def run():
        model = tl.DiT.from_config(cfg, seed=0, scheme="random")
        trainable = {k: v for k, v in model.params.items() if k != "pos_embed"}
        opt = AdamW(trainable, lr=1e-3)
        losses = [train_step(model, diffusion, opt, x0, y, t, noise) for _ in range(3)]
        return model.params, losses

    params, losses = run()
    assert memory.idle_bytes() > 0                               # the step's buffers wait for the next
    monkeypatch.setattr(memory, "recycling", contextlib.nullcontext)
    params_plain, losses_plain = run()
    for a, b in zip(losses, losses_plain):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in params:
        np.testing.assert_array_equal(params[k], params_plain[k], err_msg=k)
