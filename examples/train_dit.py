"""Train a DiT from scratch: ``tinylazy train`` (tinylazy/train.py) under its old name.

    python examples/train_dit.py --config tiny-dit-digits --steps 3000 --batch-size 64 --lr 1e-3 \\
        --lr-decay-steps 1500 --ema-decay 0.995 --ema-warmup --snr-gamma 5 --seed 0 --out runs/tiny-dit-digits
"""
import sys

from tinylazy.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/train_dit.py"))
