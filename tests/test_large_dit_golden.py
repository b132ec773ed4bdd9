"""The Large-DiT goldens (tests/golden/tiny-large-dit.*): a tiny random Large-DiT, its random
gates, and traces of full and lazy DDIM runs that other ports compare against."""
import os

import numpy as np
import pytest

import tinylazy as tl
from tinylazy import golden
from tinylazy.golden import compare, trace_sampling, write_tiny_large_dit
from tinylazy.lazy import gates_file
from tinylazy.trace import load_trace

WEIGHTS = os.path.join(golden.GOLDEN_DIR, "tiny-large-dit.safetensors")
GATES = gates_file(WEIGHTS, golden.LAZY_GOLDEN_STEPS)


def path(name):
    return golden.golden_path(name, stem="tiny-large-dit")


def test_tiny_model_and_gates_are_reproducible(tmp_path):
    """The checked-in weights and gates are write_tiny_large_dit's bytes (regenerate: docs/large-dit.md)."""
    weights, gates = write_tiny_large_dit(tmp_path)
    for made, shipped in ((weights, WEIGHTS), (gates, GATES)):
        with open(made, "rb") as a, open(shipped, "rb") as b:
            assert a.read() == b.read(), shipped


@pytest.mark.parametrize("name", list(golden.GOLDENS))
def test_checked_in_golden_regenerates(name):
    ref = load_trace(path(name))
    assert ref.meta["model"]["config"]["qk_norm_groups"] == 2
    other = golden.rerun(ref, WEIGHTS, gates=GATES if ref.meta["lazy"] else None)
    tol = dict(rtol=1e-9, max_rtol=1e-9, atol=0.0) if ref.meta["dtype"] == "float64" else {}
    result = compare(ref, other, require_all=True, **tol)
    assert result.passed, result.format()


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_float32_golden_matches_float64_at_the_defaults(mode):
    result = compare(path(f"{mode}.float32"), path(f"{mode}.float64"))
    assert result.passed, result.format()


def test_lazy_golden_skips_and_a_wrong_layer_is_found():
    lazy = load_trace(path("lazy.float64"))
    assert 0.2 < lazy.meta["lazy"]["lazy_ratio"] < 0.8               # gates that skip some modules, not all
    model = tl.load_dit(WEIGHTS, dtype="float64")
    w = model.params.stored["layers.1.feed_forward.w3.weight"]
    model.params.stored["layers.1.feed_forward.w3.weight"] = np.asarray(w) * (1 + 1e-3)   # a port with one bad layer
    ref = load_trace(path("full.float64"))
    other = trace_sampling(model, steps=4, cfg_scale=4.0)
    first = compare(ref, other).first.name
    assert first == "step.00/block.01/mlp/up"
