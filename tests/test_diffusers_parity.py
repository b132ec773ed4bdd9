"""diffusers' DiTTransformer2DModel, with the two patches of docs/numerics.md, as a second PyTorch stand-in.

This checks tinylazy (and tests/torch_dit.py) against independently written code: diffusers'
port of DiT, weights mapped from the official names in the test.
"""
import numpy as np
import pytest

import tinylazy as tl
from conftest import rel_err
from official_features import official_timestep_features

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def official_to_diffusers(params, depth):
    """Official state dict -> diffusers DiTTransformer2DModel state dict (tinylazy/io.py's mapping)."""
    T = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    sd = {"pos_embed.proj.weight": T(params["x_embedder.proj.weight"]),
          "pos_embed.proj.bias": T(params["x_embedder.proj.bias"]),
          "proj_out_1.weight": T(params["final_layer.adaLN_modulation.1.weight"]),
          "proj_out_1.bias": T(params["final_layer.adaLN_modulation.1.bias"]),
          "proj_out_2.weight": T(params["final_layer.linear.weight"]),
          "proj_out_2.bias": T(params["final_layer.linear.bias"])}
    for i in range(depth):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for k in ("weight", "bias"):
            sd[d + f"norm1.emb.timestep_embedder.linear_1.{k}"] = T(params[f"t_embedder.mlp.0.{k}"])
            sd[d + f"norm1.emb.timestep_embedder.linear_2.{k}"] = T(params[f"t_embedder.mlp.2.{k}"])
            sd[d + f"norm1.linear.{k}"] = T(params[o + f"adaLN_modulation.1.{k}"])
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                sd[d + f"attn1.{name}.{k}"] = T(np.split(params[o + f"attn.qkv.{k}"], 3, axis=0)[j])
            sd[d + f"attn1.to_out.0.{k}"] = T(params[o + f"attn.proj.{k}"])
            sd[d + f"ff.net.0.proj.{k}"] = T(params[o + f"mlp.fc1.{k}"])
            sd[d + f"ff.net.2.{k}"] = T(params[o + f"mlp.fc2.{k}"])
        sd[d + "norm1.emb.class_embedder.embedding_table.weight"] = T(params["y_embedder.embedding_table.weight"])
    return sd


def patched_diffusers_dit(cfg, params, dtype):
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.depth, sample_size=cfg.input_size, patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes)
    m = m.to(dtype).eval()                        # cast first: loading float64 into float32 params would round
    m.load_state_dict(official_to_diffusers(params, cfg.depth), strict=True)
    for mod in m.modules():                       # patch 2: every LayerNorm eps 1e-6 (diffusers' norm2 uses 1e-5)
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-6
    for blk in m.transformer_blocks:              # patch 1: official frequencies; and, as the comparison is
        tp = blk.norm1.emb.time_proj              # at 1e-12, the correctly rounded features of official_features.py
        tp.downscale_freq_shift = 0
        tp.forward = lambda t: torch.from_numpy(official_timestep_features(t.numpy()))
    return m


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_tinylazy_matches_patched_diffusers(dtype, tol):
    cfg = tl.get_config("DiT-XL/2", input_size=8, depth=2, num_classes=10)
    params = tl.init_params(cfg, seed=11, scheme="random")
    # diffusers recomputes pos_embed; use exactly the float32-rounded sin-cos table it builds
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 8, 8))
    t, y = np.array([0, 999, 421]), np.array([3, 10, 9])
    tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
    m = patched_diffusers_dit(cfg, params, tdt)
    with torch.no_grad():
        ref = m(torch.from_numpy(x).to(tdt), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    ours = tl.DiT(cfg, params, dtype=dtype)(x, t, y)
    err = rel_err(ours, ref.numpy())
    assert err <= tol, f"{dtype}: {err:.3e}"
