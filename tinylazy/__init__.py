"""tinylazy: a from-scratch NumPy/CuPy reference implementation of DiT and LazyDiT."""
from .config import DIT_CONFIGS, DiTConfig, get_config
from .dit import DiT, init_params, param_shapes

__version__ = "0.1.0"
