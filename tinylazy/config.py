"""DiT configurations: a frozen dataclass and the official registry.

The registry mirrors ``DiT_models`` in facebookresearch/DiT ``models.py``:
S/B/L/XL widths x patch sizes 2/4/8.  Sizes that the official code fixes by
argument (input size, channels, classes) are fields with the official defaults;
``load_dit`` infers them from the weight file.
"""
from dataclasses import dataclass, replace


class LatentGeometry:
    """What a latent-space transformer's config derives from its fields (DiT and Large-DiT)."""

    @property
    def out_channels(self):
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self):
        return self.input_size // self.patch_size

    @property
    def num_tokens(self):
        return self.grid_size ** 2

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class DiTConfig(LatentGeometry):
    input_size: int = 32          # latent H = W
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152       # D
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000       # the embedding table has one more (null) row
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1   # > 0 means the null row exists (official default)

    @property
    def mlp_hidden(self):
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 (2-D sin-cos position embedding)")
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def replace(self, **kw):
        return replace(self, **kw).validate()


# (depth, hidden_size, num_heads) per official width.
_WIDTHS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DIT_CONFIGS = {
    f"DiT-{w}/{p}": DiTConfig(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for w, (d, h, n) in _WIDTHS.items() for p in (2, 4, 8)
}

# The bundled pixel-space model trained on scikit-learn's digits (weights/README.md).
DIT_CONFIGS["tiny-dit-digits"] = DiTConfig(
    input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4,
    num_classes=10, learn_sigma=True)

# hidden_size -> num_heads of the official widths; used when a file does not say.
HEADS_BY_WIDTH = {h: n for (_, h, n) in _WIDTHS.values()}


def get_config(name, **overrides):
    """Look up a registered configuration by name ("DiT-XL/2", "DiT-S-2" also works)."""
    key = name.replace("DiT-", "DiT-", 1)
    if key not in DIT_CONFIGS and key.startswith("DiT-") and "-" in key[4:]:
        key = "DiT-" + key[4:].replace("-", "/")
    if key not in DIT_CONFIGS:
        raise KeyError(f"unknown DiT configuration {name!r}; known: {', '.join(DIT_CONFIGS)}")
    return DIT_CONFIGS[key].replace(**overrides) if overrides else DIT_CONFIGS[key]
