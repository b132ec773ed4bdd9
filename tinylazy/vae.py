"""The AutoencoderKL of Stable Diffusion (``stabilityai/sd-vae-ft-ema`` / ``-mse``), forward pass.

Mirrors diffusers' ``AutoencoderKL`` (models/autoencoders/autoencoder_kl.py and vae.py),
keyed by its state-dict names.  One image at a time, (C, H, W):

    decode:  post_quant_conv (1x1) -> conv_in -> mid block -> up blocks -> GroupNorm -> SiLU -> conv_out
    encode:  conv_in -> down blocks -> mid block -> GroupNorm -> SiLU -> conv_out -> quant_conv -> N(mean, var)

    mid block:  resnet, single-head self-attention over the H*W pixels, resnet
    resnet:     x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))   (1x1 conv_shortcut on x when channels change)
    up block:   layers_per_block + 1 resnets, then nearest 2x upsampling + 3x3 conv (all but the last block)
    down block: layers_per_block resnets, then F.pad(0, 1, 0, 1) + 3x3 conv with stride 2 (all but the last)

Every GroupNorm has eps 1e-6.  ``decode`` applies no latent scaling: the pipeline
divides by ``config.scaling_factor`` (0.18215) as the official sample.py does.
"""
import math
import numbers
import os
import re
import threading
from dataclasses import dataclass, replace

import numpy as np

from . import conv
from .backend import array_module_of, get_xp, resolve_dtype
from .io import FLOAT_DTYPES, SafetensorsFile, WeightsError, describe_value, read_json_file

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


# ----------------------------------------------------------------------------
# Configuration

# Sane ranges (SD's VAE: 128..512 channels, 4 blocks, 2 layers, 32 groups), so that a config.json
# cannot size the parameter table (a layers_per_block of 10^8 did) before the shapes are checked.
_LIMITS = {"in_channels": 4096, "out_channels": 4096, "latent_channels": 4096, "layers_per_block": 64,
           "norm_num_groups": 4096}
_MAX_BLOCKS, _MAX_CHANNELS = 16, 65536


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' AutoencoderKL config.json that shape the network.  Defaults: sd-vae-ft-ema."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215   # used by the pipeline, never inside decode/encode

    def validate(self):
        """Every field in a sane range (so that nothing sized by a config can be huge), channels
        multiples of the GroupNorm groups."""
        for name, hi in _LIMITS.items():
            v = getattr(self, name)
            if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= hi):
                raise ValueError(f"VAE config: {name} must be an integer in 1..{hi}, got {describe_value(v)}")
        ch = self.block_out_channels
        if not isinstance(ch, tuple) or not 1 <= len(ch) <= _MAX_BLOCKS:
            raise ValueError(f"VAE config: block_out_channels must list 1..{_MAX_BLOCKS} channel counts, "
                             f"got {describe_value(ch)}")
        for c in ch:
            if not (isinstance(c, numbers.Integral) and not isinstance(c, bool) and 1 <= c <= _MAX_CHANNELS) \
                    or c % self.norm_num_groups:
                raise ValueError(f"VAE config: block_out_channels {describe_value(ch)} must be integers in "
                                 f"1..{_MAX_CHANNELS}, multiples of norm_num_groups {self.norm_num_groups}")
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VAE config: {name} must be true or false, got {describe_value(getattr(self, name))}")
        sf = self.scaling_factor
        if isinstance(sf, bool) or not isinstance(sf, numbers.Real) or not (math.isfinite(sf) and sf > 0):
            raise ValueError(f"VAE config: scaling_factor must be a finite number > 0, got {describe_value(sf)}")
        return self

    def replace(self, **kw):
        return replace(self, **kw).validate()

    @classmethod
    def from_diffusers(cls, d, source="config.json"):
        """From a parsed diffusers config.json; anything this implementation does not build is an error."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: {describe_value(d)}, not a JSON object")
        fixed = {"act_fn": "silu", "norm_type": "group"}
        for key, value in fixed.items():
            if d.get(key, value) != value:
                raise ValueError(f"{source}: {key} = {describe_value(d[key])} is not supported (only {value!r})")
        if not isinstance(d.get("block_out_channels"), list):
            raise ValueError(f"{source}: no block_out_channels list")
        n = len(d["block_out_channels"])
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = d.get(key, [block] * n)
            if not isinstance(types, list) or any(t != block for t in types):
                raise ValueError(f"{source}: {key} = {describe_value(types)} is not supported (only {block})")
            if len(types) != n:
                raise ValueError(f"{source}: {key} has {len(types)} entries for {n} block_out_channels")
        kw = {f: d[f] for f in cls.__dataclass_fields__ if f in d and d[f] is not None}
        kw["block_out_channels"] = tuple(kw["block_out_channels"])
        try:
            return cls(**kw).validate()
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------
# Parameters: diffusers' AutoencoderKL state-dict names -> shapes

def _resnet_shapes(pre, cin, cout):
    s = {pre + "norm1.weight": (cin,), pre + "norm1.bias": (cin,),
         pre + "conv1.weight": (cout, cin, 3, 3), pre + "conv1.bias": (cout,),
         pre + "norm2.weight": (cout,), pre + "norm2.bias": (cout,),
         pre + "conv2.weight": (cout, cout, 3, 3), pre + "conv2.bias": (cout,)}
    if cin != cout:
        s.update({pre + "conv_shortcut.weight": (cout, cin, 1, 1), pre + "conv_shortcut.bias": (cout,)})
    return s


def _mid_shapes(pre, c, attention):
    s = {}
    if attention:
        a = pre + "attentions.0."
        s.update({a + "group_norm.weight": (c,), a + "group_norm.bias": (c,)})
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            s.update({a + proj + ".weight": (c, c), a + proj + ".bias": (c,)})
    s.update(_resnet_shapes(pre + "resnets.0.", c, c))
    s.update(_resnet_shapes(pre + "resnets.1.", c, c))
    return s


def _conv_shapes(name, cout, cin, k):
    return {name + ".weight": (cout, cin, k, k), name + ".bias": (cout,)}


def param_shapes(cfg: VAEConfig):
    """State-dict names -> shapes, in diffusers' module order."""
    ch, L, n = cfg.block_out_channels, cfg.latent_channels, len(cfg.block_out_channels)
    s = _conv_shapes("encoder.conv_in", ch[0], cfg.in_channels, 3)
    for i in range(n):
        cin = ch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block):
            s.update(_resnet_shapes(f"encoder.down_blocks.{i}.resnets.{j}.", cin if j == 0 else ch[i], ch[i]))
        if i < n - 1:
            s.update(_conv_shapes(f"encoder.down_blocks.{i}.downsamplers.0.conv", ch[i], ch[i], 3))
    s.update(_mid_shapes("encoder.mid_block.", ch[-1], cfg.mid_block_add_attention))
    s.update({"encoder.conv_norm_out.weight": (ch[-1],), "encoder.conv_norm_out.bias": (ch[-1],)})
    s.update(_conv_shapes("encoder.conv_out", 2 * L, ch[-1], 3))
    s.update(_conv_shapes("decoder.conv_in", ch[-1], L, 3))
    rev = ch[::-1]
    for i in range(n):
        cin = rev[max(i - 1, 0)]
        for j in range(cfg.layers_per_block + 1):
            s.update(_resnet_shapes(f"decoder.up_blocks.{i}.resnets.{j}.", cin if j == 0 else rev[i], rev[i]))
        if i < n - 1:
            s.update(_conv_shapes(f"decoder.up_blocks.{i}.upsamplers.0.conv", rev[i], rev[i], 3))
    s.update(_mid_shapes("decoder.mid_block.", ch[-1], cfg.mid_block_add_attention))
    s.update({"decoder.conv_norm_out.weight": (ch[0],), "decoder.conv_norm_out.bias": (ch[0],)})
    s.update(_conv_shapes("decoder.conv_out", cfg.out_channels, ch[0], 3))
    if cfg.use_quant_conv:
        s.update(_conv_shapes("quant_conv", 2 * L, 2 * L, 1))
    if cfg.use_post_quant_conv:
        s.update(_conv_shapes("post_quant_conv", L, L, 1))
    return s


def init_params(cfg: VAEConfig, seed=0):
    """Random float32 parameters, every tensor non-trivial (norm affines included), for tests and benchmarks.

    Convolutions and projections ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.1^2).
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if "norm" in name and name.endswith("weight"):
            params[name] = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("bias"):
            params[name] = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            params[name] = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(math.prod(shape[1:])))
    return params


# ----------------------------------------------------------------------------
# Older key layouts -> diffusers' current names

# diffusers before 0.14 named the mid-block attention query/key/value/proj_attn (the
# diffusers-format sd-vae-ft-ema file still does); the CompVis/LDM layout (the single-file
# vae-ft-ema-560000-ema-pruned checkpoint) uses its own names, with 1x1-conv attention
# projections and decoder up blocks numbered from the lowest resolution.
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_IGNORED = ("loss.", "model_ema.")     # training-time extras of LDM autoencoder checkpoints


def convert_state_dict(names, num_up_blocks=None):
    """Map each key to diffusers' current name: {file key: diffusers key}.

    names: the keys of a file (diffusers, older diffusers, or CompVis/LDM, optionally with
    the ``first_stage_model.`` prefix of a full Stable Diffusion checkpoint).  Keys the
    autoencoder does not use in LDM files (``loss.*``, ``model_ema.*``) are left out.
    """
    names = list(names)
    if any(k.startswith("first_stage_model.") for k in names):
        names = [k for k in names if k.startswith("first_stage_model.")]
    if num_up_blocks is None:
        up = re.compile(r"(?:first_stage_model\.)?decoder\.up\.(\d{1,6})\.")
        ups = {int(m.group(1)) for k in names for m in [up.match(k)] if m}
        num_up_blocks = max(ups) + 1 if ups else 0
    out = {}
    for key in names:
        k = key.removeprefix("first_stage_model.")
        if k.startswith(_LDM_IGNORED):
            continue
        out[key] = _rename(k, num_up_blocks)
    return out


def _rename(k, n_up):
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value|proj_attn)\.(weight|bias)", k)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_OLD_ATTN[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", k)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_LDM_ATTN[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", k)
    if m:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)", k)
    if m:
        if m[2] == "downsample":
            return f"encoder.down_blocks.{m[1]}.downsamplers.0.{m[4]}"
        return f"encoder.down_blocks.{m[1]}.resnets.{m[3]}.{m[4].replace('nin_shortcut', 'conv_shortcut')}"
    m = re.fullmatch(r"decoder\.up\.(\d{1,6})\.(block\.(\d+)|upsample)\.(.+)", k)
    if m:
        i = n_up - 1 - int(m[1])                  # LDM counts up blocks from the lowest resolution
        if m[2] == "upsample":
            return f"decoder.up_blocks.{i}.upsamplers.0.{m[4]}"
        return f"decoder.up_blocks.{i}.resnets.{m[3]}.{m[4].replace('nin_shortcut', 'conv_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", k)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    return k


def infer_config(shapes, source="weights"):
    """VAEConfig from {diffusers name: shape}.  norm_num_groups is not in the shapes: 32, as every SD VAE."""
    def need(name):
        if name not in shapes:
            raise WeightsError(f"{source}: cannot infer the VAE configuration: missing {name!r}")
        return shapes[name]

    blocks = sorted({int(m[1]) for k in shapes for m in [re.match(r"encoder\.down_blocks\.(\d{1,6})\.", k)] if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise WeightsError(f"{source}: cannot infer the VAE configuration: encoder.down_blocks numbered {blocks}")
    ch = tuple(need(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in blocks)
    layers = len({m[1] for k in shapes for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    cfg = VAEConfig(in_channels=need("encoder.conv_in.weight")[1], out_channels=need("decoder.conv_out.weight")[0],
                    latent_channels=need("decoder.conv_in.weight")[1], block_out_channels=ch,
                    layers_per_block=layers, use_quant_conv="quant_conv.weight" in shapes,
                    use_post_quant_conv="post_quant_conv.weight" in shapes,
                    mid_block_add_attention="decoder.mid_block.attentions.0.to_q.weight" in shapes)
    try:
        return cfg.validate()
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from None


def _check_shapes(shapes, cfg, source):
    """One error listing every missing, unexpected and misshaped tensor."""
    expected = param_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k}: {tuple(shapes[k])}, expected {s}" for k, s in expected.items()
             if k in shapes and tuple(shapes[k]) != s]
    problems = [f"{title}: {', '.join(items[:8])}" + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", wrong)) if items]
    if problems:
        raise WeightsError(f"{source}: does not match an AutoencoderKL with block_out_channels "
                           f"{cfg.block_out_channels}, layers_per_block {cfg.layers_per_block}, "
                           f"latent_channels {cfg.latent_channels}: " + "; ".join(problems))
    return expected


def _is_conv_attn(name, shape):
    """An attention projection stored as a 1x1 conv (LDM layout, (C, C, 1, 1)) instead of a Linear (C, C)."""
    return "mid_block.attentions.0.to_" in name and name.endswith("weight") and tuple(shape[2:]) == (1, 1) \
        and len(shape) == 4


def _as_linear(a, name):
    return a.reshape(a.shape[:2]) if _is_conv_attn(name, a.shape) else a


# ----------------------------------------------------------------------------
# The posterior: a diagonal Gaussian over the latents

class DiagonalGaussian:
    """diffusers' DiagonalGaussianDistribution: parameters (B, 2L, h, w) = [mean; logvar],
    logvar clamped to [-30, 20]."""

    def __init__(self, parameters):
        xp = array_module_of(parameters)
        L = parameters.shape[1] // 2
        self.parameters = parameters
        self.mean = parameters[:, :L]                             # (B, L, h, w)
        self.logvar = xp.clip(parameters[:, L:], -30.0, 20.0)
        self.std = xp.exp(0.5 * self.logvar)
        self.var = xp.exp(self.logvar)

    def sample(self, rng=None):
        """mean + std * noise; noise ~ N(0, 1) from ``rng`` (a NumPy Generator or a seed), drawn on the
        host in float64 so that every backend and dtype replays the same draw."""
        xp = array_module_of(self.mean)
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        noise = xp.asarray(rng.standard_normal(self.mean.shape), dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean


# ----------------------------------------------------------------------------
# Model

class AutoencoderKL:
    """diffusers' AutoencoderKL forward pass with parameters ``self.params[name]`` (diffusers names).

    ``decode(z)`` (B, latent_channels, h, w) -> (B, out_channels, 8h, 8w) for 4 blocks;
    ``encode(x)`` -> DiagonalGaussian.  Batches run one image at a time (memory bounded).
    """

    def __init__(self, config: VAEConfig, params, dtype="float32", backend="numpy", source="params"):
        self.config = config.validate()
        self.dtype = resolve_dtype(dtype)
        self.backend = backend
        self.xp = get_xp(backend)
        shapes = {k: tuple(_as_linear(v, k).shape) for k, v in params.items()}
        expected = _check_shapes(shapes, config, source)
        self.params = {k: self.xp.asarray(_as_linear(params[k], k), dtype=self.dtype) for k in expected}
        self._winograd = {}        # conv name -> transformed filters (16, Cout, Cin), made on first use
        self._local = threading.local()

    @classmethod
    def from_config(cls, config=VAEConfig(), seed=0, dtype="float32", backend="numpy"):
        return cls(config, init_params(config, seed), dtype=dtype, backend=backend)

    @property
    def downscale(self):
        """Pixels per latent along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # -- building blocks (one image, (C, H, W)) ---------------------------------
    def _padded(self, shape):
        """A zero-bordered (C, H+2, W+2) buffer and its interior, kept per shape and thread for reuse: each
        holds only a convolution's input, dead once the convolution returns, and fresh pages of this
        size cost the kernel's zeroing on every call."""
        cache = self._local.__dict__.setdefault("padded", {})
        if shape not in cache:
            cache[shape] = conv.pad_buffer(self.xp, shape, self.dtype, (1, 1, 1, 1))
        return cache[shape]

    def _conv3x3(self, name, xpad, residual=None):
        """Conv2d(k=3, padding=1) on its padded input (C, H+2, W+2): Winograd F(2x2, 3x3) when H and W
        are even and the image not tiny (the filters' transform is made once and kept), im2col + GEMM
        otherwise."""
        P = self.params
        H, W = xpad.shape[1] - 2, xpad.shape[2] - 2
        if H % 2 or W % 2 or H * W < conv.WINOGRAD_MIN_PIXELS:
            return conv.conv2d_forward(xpad, P[name + ".weight"], P[name + ".bias"], residual=residual)
        if name not in self._winograd:
            self._winograd[name] = conv.winograd_weights(P[name + ".weight"])
        return conv.conv3x3_winograd_forward(xpad, self._winograd[name], P[name + ".bias"], residual=residual)

    def _norm_silu_conv(self, norm, name, x, residual=None):
        """conv(SiLU(GroupNorm(x))), the GroupNorm writing straight into the convolution's padded input."""
        P, G = self.params, self.config.norm_num_groups
        buf, inner = self._padded(x.shape)
        conv.groupnorm_forward(x, P[norm + ".weight"], P[norm + ".bias"], G, silu=True, out=inner)
        return self._conv3x3(name, buf, residual=residual)

    def _resnet(self, pre, x):
        """ResnetBlock2D (temb None, output_scale_factor 1): (Cin, H, W) -> (Cout, H, W)."""
        P = self.params
        h = self._norm_silu_conv(pre + "norm1", pre + "conv1", x)
        skip = x
        if pre + "conv_shortcut.weight" in P:
            skip = conv.conv2d_forward(x, P[pre + "conv_shortcut.weight"], P[pre + "conv_shortcut.bias"])
        return self._norm_silu_conv(pre + "norm2", pre + "conv2", h, residual=skip)   # dropout: identity at eval

    def _attention(self, pre, x):
        """The mid block's single-head self-attention over the H*W pixels (GroupNorm in front, residual)."""
        P = self.params
        return conv.pixel_attention_forward(
            x, P[pre + "group_norm.weight"], P[pre + "group_norm.bias"], self.config.norm_num_groups,
            *(P[pre + f"{n}.{t}"] for n in ("to_q", "to_k", "to_v", "to_out.0") for t in ("weight", "bias")))

    def _mid(self, pre, x):
        x = self._resnet(pre + "resnets.0.", x)
        if self.config.mid_block_add_attention:
            x = self._attention(pre + "attentions.0.", x)
        return self._resnet(pre + "resnets.1.", x)

    # -- decoder ----------------------------------------------------------------
    def _decode_one(self, z):
        """(L, h, w) -> (out_channels, h * downscale, w * downscale)."""
        P, cfg = self.params, self.config
        if cfg.use_post_quant_conv:
            z = conv.conv2d_forward(z, P["post_quant_conv.weight"], P["post_quant_conv.bias"])
        x = self._conv3x3("decoder.conv_in", conv.pad_forward(z, (1, 1, 1, 1)))
        x = self._mid("decoder.mid_block.", x)
        n = len(cfg.block_out_channels)
        for i in range(n):
            for j in range(cfg.layers_per_block + 1):
                x = self._resnet(f"decoder.up_blocks.{i}.resnets.{j}.", x)
            if i < n - 1:
                C, H, W = x.shape
                buf, inner = self._padded((C, 2 * H, 2 * W))
                conv.upsample2x_forward(x, out=inner)                  # (C, H, W) -> (C, 2H, 2W), padded
                x = self._conv3x3(f"decoder.up_blocks.{i}.upsamplers.0.conv", buf)
        return self._norm_silu_conv("decoder.conv_norm_out", "decoder.conv_out", x)

    def decode(self, z):
        """z (B, latent_channels, h, w) -> images (B, out_channels, H, W), as ``AutoencoderKL.decode(z).sample``."""
        z = self._check_input(z, self.config.latent_channels, "z")
        f = self.downscale
        out = self.xp.empty((z.shape[0], self.config.out_channels, z.shape[2] * f, z.shape[3] * f), dtype=self.dtype)
        for b in range(z.shape[0]):
            out[b] = self._decode_one(z[b])
        return out

    # -- encoder ----------------------------------------------------------------
    def _encode_one(self, x):
        """(in_channels, H, W) -> (2 * latent_channels, h, w): the posterior's [mean; logvar]."""
        P, cfg = self.params, self.config
        x = self._conv3x3("encoder.conv_in", conv.pad_forward(x, (1, 1, 1, 1)))
        n = len(cfg.block_out_channels)
        for i in range(n):
            for j in range(cfg.layers_per_block):
                x = self._resnet(f"encoder.down_blocks.{i}.resnets.{j}.", x)
            if i < n - 1:
                name = f"encoder.down_blocks.{i}.downsamplers.0.conv"
                xpad = conv.pad_forward(x, (0, 1, 0, 1))               # Downsample2D(padding=0): F.pad(0, 1, 0, 1)
                x = conv.conv2d_forward(xpad, P[name + ".weight"], P[name + ".bias"], stride=2)
        x = self._mid("encoder.mid_block.", x)
        x = self._norm_silu_conv("encoder.conv_norm_out", "encoder.conv_out", x)
        if cfg.use_quant_conv:
            x = conv.conv2d_forward(x, P["quant_conv.weight"], P["quant_conv.bias"])
        return x

    def encode(self, x):
        """x (B, in_channels, H, W) in [-1, 1] -> DiagonalGaussian over (B, latent_channels, h, w)."""
        x = self._check_input(x, self.config.in_channels, "x")
        outs = [self._encode_one(x[b]) for b in range(x.shape[0])]
        return DiagonalGaussian(self.xp.stack(outs))

    def _check_input(self, a, channels, what):
        if a.ndim != 4 or a.shape[1] != channels or a.shape[0] < 1 or min(a.shape[2:]) < 1:
            raise ValueError(f"{what} has shape {tuple(a.shape)}, expected (B, {channels}, H, W) with B, H, W >= 1")
        return self.xp.asarray(a, dtype=self.dtype)


# ----------------------------------------------------------------------------
# Loading

def _find_weights(folder):
    for name in _DIFFUSERS_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    bins = sorted(n for n in os.listdir(folder) if n.endswith(".bin"))
    hint = (f"; convert {bins[0]} with python -m tinylazy.convert {os.path.join(folder, bins[0])} "
            f"{os.path.join(folder, _DIFFUSERS_WEIGHTS[0])}") if bins else ""
    raise WeightsError(f"{folder}: no {_DIFFUSERS_WEIGHTS[0]}{hint}")


def load_vae(path, dtype="float32", backend="numpy", config=None):
    """Load an AutoencoderKL from a diffusers folder (config.json + diffusion_pytorch_model.safetensors)
    or a single safetensors file (diffusers, older diffusers or CompVis/LDM keys).

    For a single file the configuration is inferred from the tensor shapes (norm_num_groups 32);
    ``config`` (a VAEConfig) overrides config.json or the inference.  Every key and shape is
    checked before the weights are read; float16/bfloat16 tensors are upcast to ``dtype``.
    """
    dt = resolve_dtype(dtype)
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = _find_weights(path)
        cfg_file = os.path.join(path, "config.json")
        if config is None:
            if not os.path.isfile(cfg_file):
                raise WeightsError(f"{path}: no config.json (a diffusers AutoencoderKL folder has one)")
            try:
                config = VAEConfig.from_diffusers(read_json_file(cfg_file), source=cfg_file)
            except WeightsError:
                raise
            except ValueError as e:
                raise WeightsError(str(e)) from None
    elif os.path.isfile(path):
        weights = path
    else:
        raise WeightsError(f"{path}: no such file or folder")
    with SafetensorsFile(weights) as f:
        names = convert_state_dict(f.keys())
        shapes = {}
        for key, name in names.items():
            if name in shapes:
                raise WeightsError(f"{weights}: {key!r} and another key both map to {name!r}")
            shape = f.entries[key].shape
            shapes[name] = shape[:2] if _is_conv_attn(name, shape) else shape
        cfg = config.validate() if config is not None else infer_config(shapes, weights)
        _check_shapes(shapes, cfg, weights)
        nonfloat = [k for k in names if f.entries[k].dtype not in FLOAT_DTYPES]
        if nonfloat:
            raise WeightsError(f"{weights}: non-float tensors {nonfloat[:8]}")
        params = {name: f.read(key, dt) for key, name in names.items()}
    return AutoencoderKL(cfg, params, dtype=dt, backend=backend, source=weights)
