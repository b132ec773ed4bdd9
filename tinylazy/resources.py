"""Bundled data: the models and their LazyDiT gates (``weights/``) and the OpenCL kernels (``kernels_cl/``).

The repository keeps one copy of each, in those two top-level folders; pyproject.toml packages
them as ``tinylazy.weights`` and ``tinylazy.kernels_cl``, so an editable install reads them in
the checkout and a wheel, ``pip install .`` or ``pip install --target`` carries them inside the
package.  Code finds them here, through importlib.resources, never by a path into a checkout.

A bundled model's name stands wherever a weights path does: ``load_dit("tiny-dit-digits")``,
``--weights tiny-dit-digits``, and a bundled gates file's name wherever a gates path does
(``--gates tiny-dit-digits.gates-ddim20-official``).  An existing file or folder of that name wins.
"""
import importlib.resources
import os
from pathlib import Path

WEIGHTS_PACKAGE = "tinylazy.weights"
KERNELS_PACKAGE = "tinylazy.kernels_cl"
DEFAULT_MODEL = "tiny-dit-digits"
_GATES = ".gates-"                       # <model>.gates-ddim<steps>.safetensors (lazy.gates_file)


def _folder(package):
    # Every supported install puts package data on the file system (no zip imports).
    return Path(os.fspath(importlib.resources.files(package)))


def weights_dir():
    """The folder of the bundled models and gates."""
    return _folder(WEIGHTS_PACKAGE)


def kernel_dir():
    """The folder of the OpenCL kernel sources (``<family>.cl``)."""
    return _folder(KERNELS_PACKAGE)


def bundled_models():
    """Names of the bundled models: the ``.safetensors`` files in ``weights_dir()`` that are not gates."""
    return sorted(p.name[: -len(".safetensors")] for p in weights_dir().glob("*.safetensors") if _GATES not in p.name)


def weights_path(spec):
    """A weights path or a bundled model's name -> the path to read (an existing path wins; anything
    else is returned unchanged, for the reader to report)."""
    path = os.fspath(spec)
    if os.path.exists(path) or path not in bundled_models():
        return path
    return str(weights_dir() / f"{path}.safetensors")


def bundled_gates():
    """Names of the bundled gates files (``<model>.gates-ddim<steps>[-<variant>]``)."""
    return sorted(p.name[: -len(".safetensors")] for p in weights_dir().glob("*.safetensors") if _GATES in p.name)


def gates_path(spec):
    """A gates path or a bundled gates file's name -> the path to read (an existing path wins), so that
    ``--gates tiny-dit-digits.gates-ddim20-official`` works from any install."""
    path = os.fspath(spec)
    if os.path.exists(path) or path not in bundled_gates():
        return path
    return str(weights_dir() / f"{path}.safetensors")


def is_bundled(path):
    """Whether ``path`` names a file shipped in ``weights_dir()`` (so no command may overwrite it by default)."""
    path = os.path.realpath(os.fspath(path))
    return os.path.dirname(path) == os.path.realpath(weights_dir()) and os.path.isfile(path)
