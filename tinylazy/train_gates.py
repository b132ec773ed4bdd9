"""Train LazyDiT gates for a frozen DiT (paper section 3.3, and the recipes docs/lazy.md measures).

    tinylazy train-gates                          # the bundled digits model, 20 steps, 30% budget, a few minutes
    tinylazy train-gates --steps 10
    tinylazy train-gates --recipe official --target-ratio 0.5    # the paper's recipe (the bundled baseline)
    tinylazy train-gates --resume                 # continue an interrupted run

The default recipe is ``chain`` (lazy_train.RECIPES) at a 30% MACs budget: there it beat the evenly
spread rule at both guidance scales, 10 and 20 steps, on the frontier of issue #19 (docs/lazy.md), so
the bundled gates are those; the official recipe's are bundled beside them as
``<model>.gates-ddim<steps>-official``.

Writes ``<model>.gates-ddim<steps>.safetensors`` in the current folder (official gate names,
tied to the DiT's weights hash and the step count), where ``tinylazy sample --lazy`` looks
first; it never replaces an existing file (shipped gates included) without --force.  A
training state (gates, optimizer, RNG) is written every --checkpoint-every iterations to
``<out>.train-state.safetensors``; ``--resume`` continues from it to the same result as an
uninterrupted run, and it is removed when the run finishes.  The shipped gates are rewritten,
from the checkout, only by ``tinylazy train-gates --out weights/tiny-dit-digits.gates-ddim20.safetensors --force``
(weights/README.md gives the command of each bundled file).
"""
import os
import sys
import time
import zipfile

import numpy as np

from . import cli
from .lazy_train import LOSSES, RECIPES
from .resources import DEFAULT_MODEL

STATE_SUFFIX = ".train-state.safetensors"
DEFAULT_RECIPE = "chain"                # the frontier's winner (issue #19); "official" is the paper's
DEFAULT_TARGET = 0.3                    # where it won at both guidance scales, 10 and 20 steps (docs/lazy.md)
CHAIN_ITERS = 40                       # sampling runs of the chain recipe: about the compute of 500 official iterations
BUDGET_SAMPLES = 32                    # the guided samples that check a MACs budget after --iters


def _ratio(v):
    return None if v == "none" else cli.number(float)(v)


def add_arguments(p):
    n = cli.number
    p.add_argument("--weights", default=DEFAULT_MODEL,
                   help=f"DiT safetensors file or a bundled model's name (default: {DEFAULT_MODEL})")
    p.add_argument("--data", default="digits",
                   help="training images: 'digits' (scikit-learn's digits as the bundled model sees them; the "
                        "[train] extra) or a .safetensors/.npz file with 'images' (N, C, H, W) in the model's input "
                        "range and 'labels' (N,) (default: digits)")
    p.add_argument("--steps", type=n(int, 2, 1000), default=20,
                   help="DDIM sampling steps the gates are for, 2..1000 (default: 20)")
    p.add_argument("--rho-attn", type=n(float, 0), default=1e-5,
                   help="lazy-loss weight of attention, or its start value under --target-ratio (default: 1e-5, "
                        "below the bundled model's one-module reuse errors; the paper sweeps 1e-7..1e-2)")
    p.add_argument("--rho-mlp", type=n(float, 0), default=1e-5, help="the same for the MLP (default: 1e-5)")
    p.add_argument("--target-ratio", type=_ratio, default=DEFAULT_TARGET,
                   help="search rho for this lazy ratio of a sampling run, in [0, 1): every 25 iterations 8 guided "
                        "samples are drawn with the current gates and both rho scale by exp(2 (target - measured)); "
                        f"'none' keeps rho fixed (default: {DEFAULT_TARGET}, the bundled gates' budget).  The x-norm, chain and "
                        "all-steps-macs recipes steer the share of the "
                        "modules' MACs reused instead (a compute budget, as the rules'), and after --iters train on "
                        f"(at most as long again) until {BUDGET_SAMPLES} guided samples reuse at least this share")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help=f"how the gates are trained (default: {DEFAULT_RECIPE}, the bundled gates' recipe; official is "
                        "the paper's; docs/lazy.md measures them all): "
                        + "; ".join(f"{k}: {v[1]}" for k, v in RECIPES.items()))
    p.add_argument("--all-steps", action="store_true",
                   help="train the gates of every step (any t >= 1), not only the official odd-t draw, which caps "
                        "the lazy ratio at 50%% (--recipe all-steps)")
    p.add_argument("--loss", choices=LOSSES,
                   help="override the recipe's loss: official: MSE over every output channel (eps and variance); x: "
                        "the error the reuse causes in the next DDIM latent, i.e. the eps channels weighted by that "
                        "step's d x_prev / d eps; x-norm: x with the gains divided by their RMS over the trained steps")
    p.add_argument("--iters", type=n(int, 1),
                   help=f"training iterations (default: 500, as official; {CHAIN_ITERS} sampling runs for the chain "
                        f"recipe)")
    p.add_argument("--lr", type=n(float, 0, 1, low_open=True), default=1e-4,
                   help="AdamW learning rate, in (0, 1] (default: 1e-4, the official run script's; larger rates "
                        "saturate the token-summed scores within a few updates)")
    p.add_argument("--batch", type=n(int, 1),
                   help="batch size (default: 16; for the chain recipe 8 samples per sampling run, 16 model rows "
                        "when guided)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of batches, label drop, timesteps, noise (default: 0)")
    p.add_argument("--out", help="output gates file (default: <model>.gates-ddim<steps>.safetensors in the current "
                                 "folder)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (shipped gates included) and start over a run whose training "
                        "state is there")
    p.add_argument("--resume", action="store_true", help="continue from <out>.train-state.safetensors")
    p.add_argument("--checkpoint-every", type=n(int, 1),
                   help="iterations between training states (default: 50; 5 for the chain recipe)")
    p.add_argument("--eval-samples", type=n(int, 0), default=32,
                   help="samples drawn at the end (cfg 1.5) to measure the lazy ratio (default: 32; 0 = skip)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def default_out(weights, steps):
    """Where gates go unless --out says otherwise: the current folder, named after the weights."""
    from .lazy import gates_file
    return os.path.basename(gates_file(weights, steps))


def state_path(out):
    return out[: -len(".safetensors")] + STATE_SUFFIX


def load_data(spec, model):
    if spec == "digits":
        from .data import load_digits_dataset
        return load_digits_dataset()
    if spec.endswith(".npz") and not zipfile.is_zipfile(spec):
        raise cli.UsageError(f"--data {spec}: not an .npz archive (numpy.savez writes a zip of .npy files)")
    try:
        if spec.endswith(".npz"):
            with np.load(spec, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        else:
            from .io import read_safetensors
            arrays, _ = read_safetensors(spec)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise cli.UsageError(f"--data {spec}: cannot read it ({e})") from e
    if "images" not in arrays or "labels" not in arrays:
        raise cli.UsageError(f"--data {spec}: needs arrays 'images' and 'labels', found {sorted(arrays)}")
    labels = np.asarray(arrays["labels"])
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= model.config.num_classes:
        raise cli.UsageError(f"--data {spec}: labels must be integers in 0..{model.config.num_classes - 1}")
    return np.asarray(arrays["images"], dtype=np.float32), labels.astype(np.int64)


def recipe_settings(args):
    """GateTrainer keywords of --recipe, --all-steps and --loss."""
    kw = dict(RECIPES[args.recipe][0])
    kw["all_steps"] |= args.all_steps
    if args.loss is not None:
        kw["loss"] = args.loss
    return kw


def check_args(args):
    """Everything that needs no training: numbers, extras, the inputs, the output and the state file."""
    chain = RECIPES[args.recipe][0]["trajectory"]
    args.iters = args.iters or (CHAIN_ITERS if chain else 500)
    args.checkpoint_every = args.checkpoint_every or (5 if chain else 50)
    args.batch = args.batch or (8 if chain else 16)
    if args.target_ratio is not None and not 0 <= args.target_ratio < 1:
        raise cli.UsageError(f"--target-ratio must lie in [0, 1), got {args.target_ratio}")
    if args.target_ratio is not None and args.rho_attn + args.rho_mlp == 0:
        raise cli.UsageError("--target-ratio scales rho, so --rho-attn and --rho-mlp cannot both be 0")
    weights = cli.weights_input(args.weights)
    if args.data == "digits":
        cli.require("sklearn", "--data digits (scikit-learn's digits)")
    elif not args.data.endswith((".npz", ".safetensors")):
        raise cli.UsageError(f"--data {args.data}: give 'digits', a .safetensors or a .npz file")
    else:
        cli.input_file(args.data, "--data")
    args.out = args.out or default_out(args.weights, args.steps)
    inputs = {"--weights": weights, "--data": None if args.data == "digits" else args.data}
    cli.output_file(args.out, "--out", (".safetensors",), inputs=inputs, force=args.force, replace=False)
    args.state = state_path(args.out)
    cli.output_file(args.state, "the training state", (".safetensors",), inputs=inputs)
    if args.resume and not os.path.isfile(args.state):
        raise cli.UsageError(f"--resume: no training state at {args.state} (nothing to resume: the run finished "
                             f"or never wrote one); drop --resume to start")
    if not args.resume and not args.force and os.path.isfile(args.state):
        raise cli.UsageError(f"{args.state} holds an interrupted run: add --resume to continue it, or --force to "
                             f"start over")
    return weights


def run(args):
    import tinylazy as tl
    from .io import load_dit
    from .lazy_train import GateTrainer
    weights = check_args(args)
    model = load_dit(weights, dtype=args.dtype)
    images, labels = load_data(args.data, model)
    try:
        trainer = GateTrainer(model, images, labels, args.steps, args.rho_attn, args.rho_mlp, args.lr, args.batch,
                              args.seed, target_ratio=args.target_ratio, **recipe_settings(args))
    except ValueError as e:
        raise cli.UsageError(str(e)) from e
    if args.resume:
        try:
            trainer.load(args.state)
        except ValueError as e:
            raise cli.UsageError(f"--resume: {e}") from e
        print(f"resuming at iteration {trainer.iteration} from {args.state}", file=sys.stderr)
    print(f"{model} from {weights}; gates for {args.steps} DDIM steps ({trainer.recipe} recipe), "
          f"{len(images)} images", file=sys.stderr)

    t0 = time.perf_counter()
    train(trainer, args.iters, args)
    budget = trainer.settings["budget"] == "macs" and args.target_ratio is not None
    while budget and trainer.iteration < 2 * args.iters:                  # a MACs budget is a ceiling
        check = trainer.measure(num=BUDGET_SAMPLES, seed=args.seed + 2)
        if check.macs_lazy_ratio >= args.target_ratio:
            break
        print(f"{BUDGET_SAMPLES} guided samples reuse {check.macs_lazy_ratio:.1%} of the modules' MACs, under the "
              f"budget's {args.target_ratio:.0%}: training on", file=sys.stderr)
        train(trainer, min(2 * args.iters, trainer.iteration + (1 if trainer.settings["trajectory"] else
                                                                 trainer.settings["calib_every"])), args)
    facts = trainer.training_facts()
    facts.update(data=args.data if args.data == "digits" else os.path.basename(args.data),
                 weights=os.path.basename(weights))
    print(f"trained {trainer.iteration} iterations in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.eval_samples > 0:
        stats = trainer.measure(num=args.eval_samples, seed=args.seed + 2)
        facts.update(measured_ratio=stats.lazy_ratio, measured_attn=stats.ratio_by_kind()["attn"],
                     measured_mlp=stats.ratio_by_kind()["mlp"], measured_macs_ratio=stats.summary()["macs_ratio"])
        print(f"{args.eval_samples} guided samples: {stats}", file=sys.stderr)
    tl.save_gates(trainer.gates, args.out, training=facts)
    if os.path.exists(args.state):
        os.unlink(args.state)
    print(f"wrote {args.out}")


def train(trainer, until, args):
    """Train to iteration ``until``, checking for divergence and saving the training state on the way."""
    from .progress import Progress
    bar = Progress(range(trainer.iteration, until), desc="gates")
    for _ in bar:
        res = trainer.step()
        if not (np.isfinite(res["loss"]) and np.isfinite(trainer.gates.attn).all()
                and np.isfinite(trainer.gates.mlp).all()):           # checked before any state or gates are saved
            kept = f"the training state {args.state} is kept" if os.path.isfile(args.state) else "nothing was written"
            raise cli.RunError(f"gate training diverged at iteration {trainer.iteration} (loss {res['loss']}); "
                               f"{kept}; lower --lr (now {args.lr:g})")
        lazy = "-" if trainer.measured is None else f"{trainer.measured:.1%}"
        bar.set_postfix(loss=res["loss"], mse=res["mse"], lazy=lazy, rho=trainer.rho()[0])
        if trainer.iteration % args.checkpoint_every == 0 and trainer.iteration < 2 * args.iters:
            trainer.save(args.state)


def resume_hint(args):
    return cli.resume_hint(args, getattr(args, "state", None), f"{args.checkpoint_every} iterations")


def main(argv=None, prog=None):
    return cli.run_command("train-gates", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.train_gates"))
