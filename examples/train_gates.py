"""Train LazyDiT gates for a frozen DiT: ``tinylazy train-gates`` (tinylazy/train_gates.py) under its old name.

    python examples/train_gates.py                       # bundled digits model, 20 steps, a few minutes
    python examples/train_gates.py --steps 10 --target-ratio 0.3
    python examples/train_gates.py --resume              # continue an interrupted run
"""
import sys

from tinylazy.train_gates import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/train_gates.py"))
