"""The package's layering, read from the source: which module may import which, and no private names across modules.

A module imports only from lower layers (imports inside functions count too), so no import
cycle can form and the math never reaches up to the layers that use it: ``sampling`` and
``io`` know nothing of ``lazy``, ``opencl`` or the dispatch in ``api``.
"""
import ast
import os

import pytest

import tinylazy

PACKAGE = os.path.dirname(tinylazy.__file__)

# Bottom to top.  A module may import the modules of lower layers only.
LAYERS = [
    {"protocol", "config", "backend", "memory", "progress", "embeddings", "data", "atomic", "resources", "errors",
     "noise"},                                                    # leaves: facts, files, the per-image noise
    {"parallel", "diffusion", "image", "cli", "samplefile"},     # cli: the convention every command follows
    {"storage"},                                                  # weights as stored, converted per block
    {"ops", "conv", "losses", "optim", "sampling"},              # the math and the one sampler loop
    {"llama_ops"},                                                # Large-DiT's LLaMA ops, on ops
    {"dit"},                                                      # the model: one block schema
    {"large_dit"},                                                # the second family: DiT's schema, LLaMA pieces
    {"io"},                                                       # files: loads a DiT
    {"lazy", "vae", "trace", "convert", "large_dit_io"},          # module reuse, the VAE, trace files, Large-DiT files
    {"opencl", "lazy_train", "train", "metrics", "convert_large_dit"},   # device twins; training; metrics; shards
    {"api"},                                                      # the user's choices: backend, lazy or not
    {"golden", "sample", "train_gates", "sample_many", "analysis"},   # the commands: whole runs, or measured
    {"__main__"},                                                 # python -m tinylazy: the console command
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}
PACKAGE_FACE = {"__version__"}                                    # what a module may take from tinylazy itself


def _modules():
    return sorted(f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py") and f != "__init__.py")


def _imports(name):
    """(line, imported module or None for the package itself, names taken) for every import of a tinylazy module."""
    with open(os.path.join(PACKAGE, name + ".py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("tinylazy")):
            module = node.module if node.level == 1 else node.module[len("tinylazy."):] or None
            if module is None:                                      # from . import a, b
                for alias in node.names:
                    if alias.name in LAYER or alias.name in _modules():
                        yield node.lineno, alias.name, []
                    else:
                        yield node.lineno, None, [alias.name]
            else:
                yield node.lineno, module.split(".")[0], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tinylazy" or alias.name.startswith("tinylazy."):
                    yield node.lineno, alias.name.split(".")[1] if "." in alias.name else None, []


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER), "put the new module into LAYERS: " + str(set(_modules()) ^ set(LAYER))


@pytest.mark.parametrize("name", _modules())
def test_imports_point_down(name):
    for line, module, names in _imports(name):
        where = f"tinylazy/{name}.py:{line}"
        if module is None:
            assert set(names) <= PACKAGE_FACE, f"{where} imports {names} from the package itself"
            continue
        if module == name:                                      # run as __main__, a module imports itself by name
            continue
        assert LAYER[module] < LAYER[name], (f"{where} imports {module} (layer {LAYER[module]}) from layer "
                                             f"{LAYER[name]}: dependencies point down (choose above, pass down)")
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{where} imports private names {private} of {module}"


@pytest.mark.parametrize("name", _modules())
def test_no_private_attribute_of_another_module(name):
    """``ops._x`` from another module is a private name crossing modules too."""
    with open(os.path.join(PACKAGE, name + ".py")) as f:
        tree = ast.parse(f.read())
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.level == 1 and node.module is None for alias in node.names}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            pytest.fail(f"tinylazy/{name}.py:{node.lineno} uses {node.value.id}.{node.attr}")
