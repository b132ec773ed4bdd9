"""Sample a grid of images from a DiT: ``tinylazy sample`` (tinylazy/sample.py) under its old name.

    python examples/sample.py --steps 20                       # the bundled digits model -> sample.png
    python examples/sample.py --weights DiT-XL-2-256x256.safetensors --vae sd-vae-ft-ema \\
        --classes 207 360 387 974 88 979 417 279 --sampler ddpm --steps 250
"""
import sys

from tinylazy.sample import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/sample.py"))
