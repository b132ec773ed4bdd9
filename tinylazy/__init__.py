"""tinylazy: a from-scratch NumPy/CuPy reference implementation of DiT and LazyDiT."""
from .config import DIT_CONFIGS, DiTConfig, get_config
from .dit import DiT, init_params, param_shapes
from .large_dit import LARGE_DIT_CONFIGS, LargeDiT, LargeDiTConfig, get_large_config
from .io import save_dit
from .diffusion import GaussianDiffusion, SpacedDiffusion, create_diffusion, space_timesteps
from .sampling import ddpm_sample, make_noise, sample_labels
from .lazy import LazyGates, LazyStats, load_gates, save_gates
from .vae import AutoencoderKL, VAEConfig
from .api import ddim_sample, load_dit, load_vae

__version__ = "0.1.0"
