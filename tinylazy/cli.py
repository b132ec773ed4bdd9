"""The ``tinylazy`` command, and the conventions every tinylazy command follows.

    tinylazy sample --steps 20                   # also: python -m tinylazy sample, python -m tinylazy.sample
    tinylazy train-gates --help
    tinylazy golden dump --out trace.safetensors

The conventions (tests/test_cli.py checks them command by command):

- Bad input (arguments, input files, output paths, a missing optional extra) is one line
  ``error: ...`` on stderr naming the problem and the fix, exit status 2, no traceback, found
  before the expensive work: raise ``UsageError``.  tinylazy's typed errors for damaged or
  unfitting files (``WeightsError``, ``GatesError``, ``TraceError``) are reported the same way.
- A run that fails on its own (training diverged, disk full) is one line, exit status 1:
  raise ``RunError``; nothing good is destroyed (no output replaced, the last checkpoint kept).
- Ctrl-C is one line, with the command that resumes the run where one can, exit status 130;
  the temp files of unfinished writes are removed.
- Every output file is written through ``tinylazy.atomic`` (a temp file beside it, then a rename),
  and a write removes the temp files that killed runs left for the same file.
- Outputs are checked with ``output_file`` / ``output_folder`` before any work: the folder exists
  and is writable, the name is not a folder, the extension is known, it is none of the inputs,
  an existing file is replaced only where the command says so, a shipped file only with ``--force``.
- Default outputs go to the current folder, never into the installed package or a checkout.

A command is a module with ``add_arguments(parser)`` (its options, on an ``ArgumentParser``),
``run(args) -> int | None`` (the work; the exit status, None meaning 0) and optionally
``resume_hint(args) -> str | None`` (the line printed after Ctrl-C), plus one row in ``COMMANDS``.
Its ``main(argv=None)`` is ``run_command(name, argv)``, which ``python -m tinylazy.<module>`` calls.
"""
import argparse
import errno
import importlib
import importlib.util
import math
import os
import re
import shlex
import sys

from . import __version__, atomic, resources
from .errors import FileError

# name -> (module, one line for `tinylazy --help`); a module is imported only when its command runs.
COMMANDS = {
    "sample": ("tinylazy.sample", "sample a grid of images from a DiT into a PNG (the bundled model by default)"),
    "train": ("tinylazy.train", "train a DiT from scratch with the official recipe (resumable)"),
    "train-gates": ("tinylazy.train_gates", "train LazyDiT gates for a frozen DiT (resumable)"),
    "convert": ("tinylazy.convert", "convert a PyTorch checkpoint to safetensors (no PyTorch, no code from the file)"),
    "convert-large-dit": ("tinylazy.convert_large_dit", "merge an official Large-DiT checkpoint's model-parallel "
                                                        "shards into one safetensors file"),
    "golden": ("tinylazy.golden", "golden traces: dump a sampling run, compare two, rewrite the checked-in ones"),
    "metrics": ("tinylazy.metrics", "sample a digits model and score it (Frechet distance, class accuracy)"),
    "sample-many": ("tinylazy.sample_many", "sample N images on a Dask cluster into ADM's .npz (resumable, "
                                            "the same file for any number of workers)"),
    "analyze": ("tinylazy.analysis", "measure the paper's section 3.2 on a run: consecutive-step similarity, "
                                     "the Lipschitz fit, gates against similarity (JSON report and PNGs)"),
}

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# import name -> (what to install, extra)
EXTRAS = {
    "sklearn": ("scikit-learn", "train"),
    "pyopencl": ("PyOpenCL (and PoCL for the CPU)", "opencl"),
    "cupy": ("CuPy", "gpu"),
    "distributed": ("Dask distributed", "distributed"),
    "matplotlib": ("matplotlib", "analysis"),
}


class UsageError(Exception):
    """Bad input: reported as one line ``error: ...``, exit status 2."""


class RunError(Exception):
    """A run that failed on its own: reported as one line ``error: ...``, exit status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the convention's one line (a UsageError), not usage text and exit 2."""

    def error(self, message):
        message = re.sub(r"^argument (\S+): must ", r"\1 must ", message)      # messages of number()
        raise UsageError(f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------
# Running a command

def _overview():
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (f"usage: tinylazy <command> [options]    (tinylazy <command> --help for its options)\n\n"
            f"tinylazy {__version__}: a NumPy reference implementation of DiT and LazyDiT (arXiv 2412.12444).\n\n"
            f"commands:\n{rows}\n\nExit status: 0 done, 1 the run failed, 2 bad input, 130 interrupted.")


def _say(message, prefix="error: "):
    print(prefix + " ".join(str(message).split()), file=sys.stderr)      # always one line


def main(argv=None):
    """The console command ``tinylazy <command> [options]``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else [os.fspath(a) for a in argv]
    if argv[:1] in (["-h"], ["--help"]):
        print(_overview())
        return 0
    if argv[:1] == ["--version"]:
        print(f"tinylazy {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = "give a command" if not argv else f"unknown command {argv[0]!r}"
        _say(f"{problem}: one of {', '.join(COMMANDS)} (see tinylazy --help)")
        return EXIT_USAGE
    return run_command(argv[0], argv[1:])


def run_command(name, argv=None, prog=None):
    """Parse ``argv`` for command ``name`` and run it under the convention; returns the exit status."""
    return run_module(COMMANDS[name][0], argv, prog or f"tinylazy {name}")


def run_module(module, argv=None, prog=None):
    """``run_command`` for any module that has ``add_arguments`` and ``run`` (a module name or the module
    itself, e.g. a benchmark script's own ``sys.modules[__name__]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else [os.fspath(a) for a in argv]
    args = None
    try:
        module = importlib.import_module(module) if isinstance(module, str) else module
        parser = ArgumentParser(prog=prog, description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        args = parser.parse_args(argv)
        args.prog, args.argv = parser.prog, argv
        code = module.run(args)
        return 0 if code is None else int(code)
    except SystemExit as e:                                   # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _say(e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = module.resume_hint(args) if args is not None and hasattr(module, "resume_hint") else None
        _say("interrupted" + (f"; {hint}" if hint else ""), prefix="")
        return EXIT_INTERRUPTED
    except RunError as e:
        _say(e)
        return EXIT_FAILED
    except MemoryError as e:
        _say(f"out of memory{': ' + str(e) if str(e) else ''} (try a smaller --batch)")
        return EXIT_FAILED
    except OSError as e:                                      # disk full, a file vanished mid-run, ...
        _say(e)
        return EXIT_FAILED
    except Exception as e:
        if isinstance(e, FileError):
            _say(e)
            return EXIT_USAGE
        raise


def rerun_command(args, *extra):
    """The command line that ran ``args`` with ``extra`` options added once (e.g. "--resume")."""
    kept = [a for a in args.argv if a not in extra]
    return shlex.join([*shlex.split(args.prog), *kept, *extra])


def resume_hint(args, checkpoint, interval):
    """The line after Ctrl-C in a resumable run: the command that continues from ``checkpoint``, or, when
    none was written yet (one every ``interval``), that the run starts over."""
    if checkpoint and os.path.isfile(checkpoint):
        return f"continue with: {rerun_command(args, '--resume')}"
    return f"no checkpoint was written yet (one every {interval}); run the command again"


# ----------------------------------------------------------------------------
# Checks that run before any work

def number(kind=float, low=None, high=None, low_open=False):
    """An argparse ``type``: an int, or a finite float, within [low, high] ((low, high] when low_open)."""
    what = "an integer" if kind is int else "a finite number"
    if low is not None and high is not None:
        what += f" in {low}..{high}" if kind is int else f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        what += f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        what += f" <= {high:g}"

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(v)) or (low is not None and (v < low or (low_open and v == low))) \
                or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = what
    return parse


SEED = number(int, 0, 2 ** 64 - 1)         # the --seed of every command: NumPy's and Philox's key range


def require(module, purpose):
    """Raise a UsageError naming the extra that installs ``module`` unless it is installed.

    Only looks the module up (importing scikit-learn alone takes seconds), so the other checks
    may come after it and still answer at once."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        package, extra = EXTRAS[module]
        raise UsageError(f"{purpose} needs {package}: pip install 'tinylazy[{extra}]'")


def check_backend(backend, option="--backend"):
    """The extra a model backend needs: cupy -> CuPy and a GPU, opencl -> PyOpenCL."""
    if backend == "cupy":
        require("cupy", f"{option} cupy")
        from .backend import get_xp
        try:
            get_xp("cupy")
        except RuntimeError as e:
            raise UsageError(f"{option} cupy: {e}; use {option} numpy") from None
    elif backend == "opencl":
        require("pyopencl", f"{option} opencl")


def input_file(path, option, folder=False):
    """An input that must exist (a file, or also a folder when ``folder``) -> path, else a UsageError."""
    if path is None:
        return None
    what = "file or folder" if folder else "file"
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such {what}")
    if not folder and os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file")
    if not (os.path.isdir(path) or os.path.isfile(path)):            # a FIFO would block the reader
        raise UsageError(f"{option} {path} is not a regular file (a FIFO or a device); give a file")
    return path


def weights_input(spec, option="--weights"):
    """A weights file or folder, or a bundled model's name (``resources.weights_path``) -> its path."""
    path = resources.weights_path(spec)
    if not os.path.exists(path):
        raise UsageError(f"{option} {spec}: no such file or folder, nor a bundled model "
                         f"({', '.join(resources.bundled_models()) or 'none installed'}); convert official "
                         f".pt checkpoints with `tinylazy convert`")
    return path


def _same(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def output_file(path, option, exts, inputs=(), force=None, replace=True, create_folder=False):
    """Check an output file before any work; returns ``path``.

    exts: the extensions it may have (".png", ...).  inputs: {option: path} the run reads (an
    output may be none of them).  force: the value of the command's --force, or None when it
    has none.  replace: whether an existing file is replaced without --force.  create_folder:
    the run creates the file's folder (then its nearest existing parent must be writable).
    Also removes the temp files that killed runs left for it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name in it, e.g. "
                         f"{os.path.join(path, 'out' + exts[0])}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in exts:
        raise UsageError(f"{option} {path}: unknown extension {ext or '(none)'!r}; give a "
                         f"{' or '.join(exts)} file")
    folder = os.path.dirname(os.path.abspath(path))
    if create_folder:
        output_folder(folder, option)
    else:
        _check_folder(folder, option, path)
    for name, other in (inputs.items() if isinstance(inputs, dict) else inputs):
        if other is not None and _same(path, other):
            raise UsageError(f"{option} {path} is also the input {name}; write to another file")
    allowed = " (pass --force to replace it)" if force is not None else ""
    if os.path.exists(path) and resources.is_bundled(path) and not force:
        raise UsageError(f"{option} {path} is a file shipped with tinylazy; write to another file{allowed}")
    if os.path.exists(path) and not replace and not force:
        raise UsageError(f"{option} {path} exists; choose another file{allowed}")
    atomic.remove_orphans(path)
    return path


def output_folder(path, option):
    """Check a folder a run will create (with its parents) or add to; returns ``path``.  Creates nothing."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file; give a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option} {path}: {existing} is a file, so the folder cannot be created")
    _check_folder(existing, option, path)
    return path


def _check_folder(folder, option, path):
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first")
    try:
        atomic.probe_folder(folder)
    except OSError as e:
        why = "it is not writable" if e.errno == errno.ENOENT else (e.strerror or str(e)).lower()
        raise UsageError(f"{option} {path}: cannot write in {folder} ({why}); choose a writable folder") from None
