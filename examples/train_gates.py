"""Train LazyDiT gates for a frozen DiT (the official lazy-learning recipe, paper section 3.3).

    python examples/train_gates.py                       # bundled digits model, 20 steps, a few minutes
    python examples/train_gates.py --steps 10 --target-ratio 0.3
    python examples/train_gates.py --resume              # continue an interrupted run

Writes ``<weights>.gates-ddim<steps>.safetensors`` (official gate names, tied to the
DiT's weights hash and the step count) which ``examples/sample.py --lazy`` finds.
A training checkpoint (gates, optimizer, RNG: temp file + rename) is written every
--checkpoint-every iterations to ``<out>.train-state.safetensors``; ``--resume``
continues from it to the same result as an uninterrupted run, and it is removed
when the run finishes.  Bad input prints one line on stderr and exits with status 2.
"""
import argparse
import os
import sys
import time

import numpy as np

import tinylazy as tl
from tinylazy.lazy import gates_file
from tinylazy.lazy_train import GateTrainer
from tinylazy.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "tiny-dit-digits.safetensors")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _ratio(v):
    return None if v == "none" else float(v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=BUNDLED, help="DiT safetensors file (default: the bundled digits model)")
    p.add_argument("--data", default="digits",
                   help="training images: 'digits' (scikit-learn's digits as the bundled model sees them) or a "
                        ".safetensors/.npz file with 'images' (N, C, H, W) in the model's input range and "
                        "'labels' (N,) (default: digits)")
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps the gates are for (default: 20)")
    p.add_argument("--rho-attn", type=float, default=1e-5,
                   help="lazy-loss weight of attention, or its start value under --target-ratio (default: 1e-5, "
                        "below the bundled model's one-module reuse errors; the paper sweeps 1e-7..1e-2)")
    p.add_argument("--rho-mlp", type=float, default=1e-5, help="the same for the MLP (default: 1e-5)")
    p.add_argument("--target-ratio", type=_ratio, default=0.5,
                   help="search rho for this lazy ratio of a sampling run: every 25 iterations 8 guided samples "
                        "are drawn with the current gates and both rho scale by exp(2 (target - measured)); "
                        "'none' keeps rho fixed (default: 0.5)")
    p.add_argument("--all-steps", action="store_true",
                   help="extension beyond the paper: train the gates of every step (any t >= 1), not only the "
                        "official odd-t draw, which caps the lazy ratio at 50%%")
    p.add_argument("--loss", choices=("official", "x"), default="official",
                   help="official: MSE over every output channel (eps and variance) at x_next; x (extension): the "
                        "error the reuse causes in the next DDIM latent, i.e. the eps channels weighted by that "
                        "step's d x_prev / d eps (default: official)")
    p.add_argument("--iters", type=int, default=500, help="training iterations (default: 500, as official)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="AdamW learning rate (default: 1e-4, the official run script's; larger rates saturate "
                        "the token-summed scores within a few updates)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of batches, label drop, timesteps, noise (default: 0)")
    p.add_argument("--out", help="output gates file (default: <weights>.gates-ddim<steps>.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.train-state.safetensors")
    p.add_argument("--checkpoint-every", type=int, default=50, help="iterations between checkpoints (default: 50)")
    p.add_argument("--eval-samples", type=int, default=32,
                   help="samples drawn at the end (cfg 1.5) to measure the lazy ratio (default: 32; 0 = skip)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    return p.parse_args(argv)


def load_data(spec, model):
    if spec == "digits":
        from tinylazy.data import load_digits_dataset
        return load_digits_dataset()
    if not os.path.isfile(spec):
        raise UsageError(f"--data {spec}: no such file (give 'digits', a .safetensors or a .npz file)")
    if spec.endswith(".npz"):
        with np.load(spec, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        from tinylazy.io import read_safetensors
        arrays, _ = read_safetensors(spec)
    if "images" not in arrays or "labels" not in arrays:
        raise UsageError(f"--data {spec}: needs arrays 'images' and 'labels', found {sorted(arrays)}")
    labels = np.asarray(arrays["labels"])
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= model.config.num_classes:
        raise UsageError(f"--data {spec}: labels must be integers in 0..{model.config.num_classes - 1}")
    return np.asarray(arrays["images"], dtype=np.float32), labels.astype(np.int64)


def check_args(args):
    for name in ("steps", "iters", "batch", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps < 2:
        raise UsageError("--steps must be >= 2 (the first step always computes)")
    for name in ("rho_attn", "rho_mlp", "lr"):
        if not getattr(args, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.target_ratio is not None and not 0 <= args.target_ratio < 1:
        raise UsageError(f"--target-ratio must lie in [0, 1), got {args.target_ratio}")
    if args.target_ratio is not None and args.rho_attn + args.rho_mlp == 0:
        raise UsageError("--target-ratio scales rho, so --rho-attn and --rho-mlp cannot both be 0")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    from tinylazy.io import load_dit
    if not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights}: no such file")
    try:
        model = load_dit(args.weights, dtype=args.dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load the DiT from {args.weights}: {e}") from e
    images, labels = load_data(args.data, model)
    out = args.out or gates_file(args.weights, args.steps)
    state_path = out[: -len(".safetensors")] + ".train-state.safetensors" if out.endswith(".safetensors") \
        else out + ".train-state.safetensors"
    try:
        trainer = GateTrainer(model, images, labels, args.steps, args.rho_attn, args.rho_mlp, args.lr, args.batch,
                              args.seed, all_steps=args.all_steps, target_ratio=args.target_ratio, loss=args.loss)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.resume:
        if not os.path.isfile(state_path):
            raise UsageError(f"--resume: no training state at {state_path} (the run finished or never started)")
        try:
            trainer.load(state_path)
        except ValueError as e:
            raise UsageError(f"--resume: {e}") from e
        print(f"resuming at iteration {trainer.iteration} from {state_path}", file=sys.stderr)
    print(f"{model} from {args.weights}; gates for {args.steps} DDIM steps "
          f"({'all steps' if args.all_steps else 'official odd-t recipe'}), {len(images)} images", file=sys.stderr)

    t0 = time.perf_counter()
    bar = Progress(range(trainer.iteration, args.iters), desc="gates")
    for _ in bar:
        res = trainer.step()
        lazy = "-" if trainer.measured is None else f"{trainer.measured:.1%}"
        bar.set_postfix(loss=res["loss"], mse=res["mse"], lazy=lazy, rho=trainer.rho()[0])
        if trainer.iteration % args.checkpoint_every == 0 and trainer.iteration < args.iters:
            trainer.save(state_path)
    facts = trainer.training_facts()
    facts.update(data=args.data if args.data == "digits" else os.path.basename(args.data),
                 weights=os.path.basename(args.weights))
    print(f"trained {args.iters} iterations in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.eval_samples > 0:
        stats = trainer.measure(num=args.eval_samples, seed=args.seed + 2)
        facts.update(measured_ratio=stats.lazy_ratio, measured_attn=stats.ratio_by_kind()["attn"],
                     measured_mlp=stats.ratio_by_kind()["mlp"], measured_macs_ratio=stats.summary()["macs_ratio"])
        print(f"{args.eval_samples} guided samples: {stats}", file=sys.stderr)
    tl.save_gates(trainer.gates, out, training=facts)
    if os.path.exists(state_path):
        os.unlink(state_path)
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
