"""Sample a grid of images from a DiT, like the official ``sample.py``.

    python examples/sample.py --steps 20                       # the bundled digits model
    python examples/sample.py --weights DiT-XL-2-256x256.safetensors --vae sd-vae-ft-ema \\
        --classes 207 360 387 974 88 979 417 279 --sampler ddpm --steps 250

Latent models are decoded with ``vae.decode(z / 0.18215)``; a pixel-space model
(1 or 3 channels, no --vae) is saved directly.  The grid has 4 images per row,
values mapped from [-1, 1] as torchvision's ``save_image(normalize=True,
value_range=(-1, 1))``; small images are enlarged (nearest) for viewing.
Bad input prints one line on stderr and exits with status 2.
"""
import argparse
import os
import sys
import time

import numpy as np

import tinylazy as tl
from tinylazy.backend import BACKENDS
from tinylazy.image import save_grid
from tinylazy.sampling import check_cfg_scale, check_labels, check_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "tiny-dit-digits.safetensors")
OFFICIAL_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]      # the official sample.py's labels
LATENT_SCALE = 0.18215                                          # sd-vae latent scaling (official)
DEFAULT_STEPS = {"ddim": 20, "ddpm": 250}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="DiT safetensors file or diffusers folder "
                   "(default: the bundled weights/tiny-dit-digits.safetensors)")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the initial and per-step noise (default: 0)")
    p.add_argument("--out", default="sample.png", help="output PNG (default: sample.png)")
    p.add_argument("--backend", choices=BACKENDS + ("opencl",), default="numpy",
                   help="numpy (CPU), cupy (GPU) or opencl (PyOpenCL; DDIM only; the VAE runs in NumPy)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--lazy", action="store_true",
                   help="LazyDiT: reuse module outputs where the learned gates say so, with the gates "
                        "<weights>.gates-ddim<steps>.safetensors (made by examples/train_gates.py)")
    p.add_argument("--gates", help="LazyDiT gates file to use instead of the one beside the weights (implies --lazy)")
    return p.parse_args(argv)


def load_lazy_gates(args, path, model, steps):
    """The gates for --lazy / --gates, or None; a missing or unfitting file is a UsageError."""
    if not (args.lazy or args.gates):
        return None
    import glob
    from tinylazy.lazy import GatesError, gates_file
    if args.sampler != "ddim":
        raise UsageError("--lazy works with --sampler ddim (the gates are trained for DDIM steps)")
    gpath = args.gates or gates_file(path, steps)
    if not os.path.isfile(gpath):
        found = sorted(glob.glob(gates_file(path, 0).replace("ddim0", "ddim*")))
        have = ", ".join(f.rsplit("ddim", 1)[1].split(".")[0] for f in found)
        raise UsageError(f"no LazyDiT gates for {steps} steps: {gpath} does not exist "
                         f"({'gates exist for --steps ' + have if have else 'no gates for these weights'}; "
                         f"train them: python examples/train_gates.py --weights {path} --steps {steps})")
    try:
        return tl.load_gates(gpath, model, steps)
    except (GatesError, OSError, ValueError) as e:
        raise UsageError(f"--lazy: {e}") from e


def resolve_weights(path):
    if path is None:
        if os.path.isfile(BUNDLED):
            return BUNDLED
        raise UsageError(
            "no --weights given and the bundled weights/tiny-dit-digits.safetensors is not there; pass a "
            "converted official checkpoint and its VAE: --weights DiT-XL-2-256x256.safetensors --vae "
            "sd-vae-ft-ema (convert with `python -m tinylazy.convert DiT-XL-2-256x256.pt "
            "DiT-XL-2-256x256.safetensors`; the VAE folder is Hugging Face stabilityai/sd-vae-ft-ema's "
            "config.json + diffusion_pytorch_model.safetensors; see weights/README.md)")
    if not os.path.exists(path):
        raise UsageError(f"--weights {path}: no such file or folder (give a DiT .safetensors file or a "
                         f"diffusers folder; convert .pt checkpoints with `python -m tinylazy.convert`)")
    return path


def load_model(args):
    path = resolve_weights(args.weights)
    if args.vae is not None and not os.path.exists(args.vae):
        raise UsageError(f"--vae {args.vae}: no such file or folder (give the sd-vae-ft-ema folder with "
                         f"config.json + diffusion_pytorch_model.safetensors, or a safetensors file)")
    try:
        model = tl.load_dit(path, dtype=args.dtype, backend=args.backend)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"cannot load the DiT from {path}: {e}") from e
    C = model.config.in_channels
    vae = None
    if args.vae is not None:
        try:
            vae = tl.load_vae(args.vae, dtype=args.dtype, backend=args.backend)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UsageError(f"cannot load the VAE from {args.vae}: {e}") from e
        if vae.config.latent_channels != C:
            raise UsageError(f"--vae {args.vae} has {vae.config.latent_channels} latent channels but the DiT "
                             f"{path} takes {C}: pass the VAE this DiT was trained with")
    elif C not in (1, 3):
        raise UsageError(f"{path} is a latent-space model ({C} channels): pass its VAE with --vae "
                         f"(e.g. the stabilityai/sd-vae-ft-ema folder)")
    return path, model, vae


def choose_labels(args, model):
    n = model.config.num_classes
    classes = args.classes if args.classes is not None else \
        (OFFICIAL_CLASSES if n == 1000 else list(range(min(n, 16))))
    count = len(classes) if args.batch is None else args.batch
    if count < 1:
        raise UsageError(f"--batch must be >= 1, got {count}")
    labels = np.resize(np.asarray(classes, dtype=np.int64), count)         # classes repeat to fill the batch
    try:
        return check_labels(model, labels, args.cfg_scale)
    except ValueError as e:
        raise UsageError(f"--classes: {e}") from e


def main(argv=None):
    args = parse_args(argv)
    steps = DEFAULT_STEPS[args.sampler] if args.steps is None else args.steps
    try:
        check_steps(steps)
        check_cfg_scale(args.cfg_scale)
    except ValueError as e:
        raise UsageError(str(e).replace("steps must", "--steps must").replace("cfg_scale", "--cfg-scale")) from e
    if args.backend == "opencl" and (args.sampler != "ddim" or args.dtype != "float32"):
        raise UsageError("--backend opencl runs --sampler ddim in --dtype float32")
    path, model, vae = load_model(args)
    labels = choose_labels(args, model)
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


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
