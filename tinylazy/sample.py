"""Sample a grid of images from a DiT into a PNG, like the official ``sample.py``.

    tinylazy sample --steps 20                    # the bundled tiny-dit-digits model -> sample.png
    tinylazy sample --steps 20 --lazy             # LazyDiT, with the model's gates for 20 steps
    tinylazy sample --weights DiT-XL-2-256x256.safetensors --vae sd-vae-ft-ema \\
        --classes 207 360 387 974 88 979 417 279 --sampler ddpm --steps 250

Prints the model and the run on stderr with a progress bar, then the sampling time, and
``wrote <out> (WxH)`` on stdout.  Latent models are decoded with ``vae.decode(z / 0.18215)``;
a pixel-space model (1 or 3 channels, no --vae) is saved directly.  The grid has 4 images per
row, values mapped from [-1, 1] as torchvision's ``save_image(normalize=True, value_range=(-1, 1))``;
small images are enlarged (nearest) for viewing.  --lazy looks for
``<model>.gates-ddim<steps>.safetensors`` in the current folder (where ``tinylazy train-gates``
writes them), then beside the weights (the bundled gates of the bundled model).
"""
import os
import sys
import time

import numpy as np

from . import cli, resources
from .backend import MODEL_BACKENDS
from .lazy import find_gates, gate_step_counts
from .resources import DEFAULT_MODEL

OFFICIAL_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]      # the official sample.py's labels
LATENT_SCALE = 0.18215                                          # sd-vae latent scaling (official)
DEFAULT_STEPS = {"ddim": 20, "ddpm": 250}


def add_arguments(p):
    p.add_argument("--weights", default=DEFAULT_MODEL,
                   help=f"DiT safetensors file, diffusers folder, or a bundled model's name (default: {DEFAULT_MODEL})")
    p.add_argument("--vae", help="sd-vae-ft-ema/-mse folder (config.json + diffusion_pytorch_model.safetensors) "
                   "or safetensors file; required for latent models")
    p.add_argument("--steps", type=int, help="sampling steps, 1..1000 (default: 20 for ddim, 250 for ddpm)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                   help="respaced DDIM (eta 0) or ancestral DDPM, the official sampler (default: ddim)")
    p.add_argument("--classes", type=int, nargs="+", help="class ids, one image each (default: the official "
                   "sample.py's 8 ImageNet classes for 1000-class models, else every class)")
    p.add_argument("--batch", type=int, help="number of images; the classes repeat to fill it "
                   "(default: one per class)")
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help="classifier-free guidance scale, >= 1; 1 = no guidance (default: 4.0, as official)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of the initial and per-step noise (default: 0)")
    p.add_argument("--out", default="sample.png", help="output PNG, replaced if it exists (default: sample.png)")
    p.add_argument("--backend", choices=MODEL_BACKENDS, default="numpy",
                   help="numpy (CPU), cupy (GPU) or opencl (PyOpenCL; DDIM only; the VAE runs in NumPy)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--lazy", action="store_true",
                   help="LazyDiT: reuse module outputs where the learned gates say so, with the gates "
                        "<model>.gates-ddim<steps>.safetensors of the current folder or beside the weights")
    p.add_argument("--gates", type=resources.gates_path,
                   help="LazyDiT gates file to use instead, or a bundled one's name (tiny-dit-digits.gates-ddim20-official: "
                        "the paper's recipe) (implies --lazy)")


def load_lazy_gates(args, path, model, steps):
    """The gates for --lazy / --gates, or None; a missing or unfitting file is a UsageError."""
    if not (args.lazy or args.gates):
        return None
    import tinylazy as tl
    gpath = args.gates or find_gates(path, steps)
    if gpath is None:
        have = ", ".join(map(str, gate_step_counts(path)))
        raise cli.UsageError(
            f"no LazyDiT gates for {steps} steps of {args.weights} in the current folder or beside the weights "
            f"({'gates exist for --steps ' + have if have else 'no gates for these weights'}); train them: "
            f"tinylazy train-gates --weights {args.weights} --steps {steps}")
    try:
        gates = tl.load_gates(gpath, model, steps)
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"--lazy: {e}") from e
    print(f"gates: {gpath}", file=sys.stderr)
    return gates


def load_model(args, path):
    from .api import load_dit, load_vae
    try:
        model = load_dit(path, dtype=args.dtype, backend=args.backend)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise cli.UsageError(f"cannot load the DiT from {path}: {e}") from e
    C = model.config.in_channels
    vae = None
    if args.vae is not None:
        try:
            vae = load_vae(args.vae, dtype=args.dtype, backend=args.backend)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise cli.UsageError(f"cannot load the VAE from {args.vae}: {e}") from e
        if vae.config.latent_channels != C:
            raise cli.UsageError(f"--vae {args.vae} has {vae.config.latent_channels} latent channels but the DiT "
                                 f"{path} takes {C}: pass the VAE this DiT was trained with")
    elif C not in (1, 3):
        raise cli.UsageError(f"{path} is a latent-space model ({C} channels): pass its VAE with --vae "
                             f"(e.g. the stabilityai/sd-vae-ft-ema folder)")
    return model, vae


def choose_labels(args, model):
    from .sampling import check_labels
    n = model.config.num_classes
    classes = args.classes if args.classes is not None else \
        (OFFICIAL_CLASSES if n == 1000 else list(range(min(n, 16))))
    count = len(classes) if args.batch is None else args.batch
    labels = np.resize(np.asarray(classes, dtype=np.int64), count)         # classes repeat to fill the batch
    try:
        return check_labels(model, labels, args.cfg_scale)
    except ValueError as e:
        raise cli.UsageError(f"--classes: {e}") from e


def check_args(args):
    """Everything that needs no file: the numbers, the backend, the output path, the inputs exist."""
    from .sampling import check_cfg_scale, check_steps
    args.steps = DEFAULT_STEPS[args.sampler] if args.steps is None else args.steps
    try:
        check_steps(args.steps)
        check_cfg_scale(args.cfg_scale)
    except ValueError as e:
        raise cli.UsageError(str(e).replace("steps must", "--steps must").replace("cfg_scale", "--cfg-scale")) from e
    if args.batch is not None and args.batch < 1:
        raise cli.UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.backend == "opencl" and (args.sampler != "ddim" or args.dtype != "float32"):
        raise cli.UsageError("--backend opencl runs --sampler ddim in --dtype float32")
    if (args.lazy or args.gates) and args.sampler != "ddim":
        raise cli.UsageError("--lazy works with --sampler ddim (the gates are trained for DDIM steps)")
    if args.vae is not None and not os.path.exists(args.vae):
        raise cli.UsageError(f"--vae {args.vae}: no such file or folder (give the sd-vae-ft-ema folder with "
                             f"config.json + diffusion_pytorch_model.safetensors, or a safetensors file)")
    cli.input_file(args.gates, "--gates")
    path = cli.weights_input(args.weights)
    cli.output_file(args.out, "--out", (".png",), inputs={"--weights": path, "--vae": args.vae, "--gates": args.gates})
    cli.check_backend(args.backend)
    return path


def run(args):
    import tinylazy as tl
    from .image import save_grid
    path = check_args(args)
    model, vae = load_model(args, path)
    labels = choose_labels(args, model)
    steps = args.steps
    gates = load_lazy_gates(args, path, model, steps)
    print(f"{model} from {path}", file=sys.stderr)
    print(f"{args.sampler.upper()} {steps} steps, cfg {args.cfg_scale}, seed {args.seed}, "
          f"classes {labels.tolist()}", file=sys.stderr)

    noise = tl.make_noise(model, len(labels), seed=args.seed)
    t0 = time.perf_counter()
    if gates is not None:
        stats = tl.LazyStats()
        z = tl.ddim_sample(model, noise, labels, steps=steps, cfg_scale=args.cfg_scale, progress=True,
                           gates=gates, lazy_stats=stats)
        print(f"LazyDiT: {stats}", file=sys.stderr)
    elif args.sampler == "ddim":
        z = tl.ddim_sample(model, noise, labels, steps=steps, cfg_scale=args.cfg_scale, progress=True)
    else:
        step_noise = np.random.default_rng([args.seed, 1])          # a stream apart from the initial noise
        z = tl.ddpm_sample(model, noise, labels, steps=steps, cfg_scale=args.cfg_scale,
                           step_noise=step_noise, progress=True)
    dt = time.perf_counter() - t0
    print(f"sampling: {dt:.2f} s, {1000 * dt / steps:.1f} ms/step for {len(labels)} images", file=sys.stderr)

    if vae is not None:
        t0 = time.perf_counter()
        images = vae.decode(z / LATENT_SCALE)
        print(f"VAE decode: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    else:
        images = z
    h, w = save_grid(images, args.out, nrow=4)
    print(f"wrote {args.out} ({w}x{h})")


def main(argv=None, prog=None):
    return cli.run_command("sample", argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tinylazy.sample"))
