"""Re-key the shipped files to the weights hash that covers the configuration (tinylazy-weights-v2).

    python benchmarks/rehash_bundled.py

A one-off, metadata-only migration, kept so that what was done to the shipped binaries can be
read and re-run.  Until the hash covered the configuration, ``weights_hash`` was the tensors-only
digest (v1).  The bundled DiT records its hash in its metadata and its two gates files record the
hash of the DiT they were trained for; this script replaces the v1 value with the v2 value of the
same model in those three files and nothing else: each file is rewritten from its own tensors (in
its own order and dtype) and metadata, and the script checks that the data area after the header
is byte-for-byte what it was, and that every file really recorded this model's v1 digest before.
The goldens record the hash inside their JSON manifests (model.weights_hash): the same is done
there, changing that one field.  They are not regenerated with ``python -m tinylazy.golden
goldens``: on this machine that command writes other float bits than the checked-in goldens in
538 of the 559 tensors of the full goldens from step.00/cond/t_emb on, with or without this
change (a BLAS other than the one that wrote them), and the point here is to keep every bit.
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinylazy.io import SafetensorsFile, _WeightsHasher, load_dit, write_safetensors  # noqa: E402
from tinylazy.lazy import gates_file  # noqa: E402
from tinylazy.trace import MANIFEST_KEY  # noqa: E402
from tinylazy.golden import GOLDENS, golden_path  # noqa: E402

WEIGHTS = os.path.join(ROOT, "weights", "tiny-dit-digits.safetensors")


def data_area(path):
    with SafetensorsFile(path) as f:
        start = min((e.begin for e in f.entries.values()), default=os.path.getsize(path))
    with open(path, "rb") as f:
        f.seek(start)
        return f.read()


def read_all(path):
    """(tensors as stored, NaN kept; metadata) of any safetensors file."""
    with SafetensorsFile(path) as f:
        return {k: f.read(k, finite=False) for k in f.entries}, dict(f.metadata)


def rehash_manifest(meta, old, new):
    """The metadata with the manifest's model.weights_hash replaced, the manifest text otherwise unchanged."""
    text = meta[MANIFEST_KEY]
    manifest = json.loads(text)
    assert json.dumps(manifest, separators=(",", ":")) == text, "the manifest would not round-trip"
    if manifest["model"]["weights_hash"] != old:
        return None
    manifest["model"]["weights_hash"] = new
    return dict(meta, **{MANIFEST_KEY: json.dumps(manifest, separators=(",", ":"))})


def rewrite(path, old, new, edit):
    """Rewrite ``path`` with metadata ``edit(meta)`` and the same tensors; check the data area is unchanged."""
    tensors, meta = read_all(path)
    changed = edit(meta)
    if changed is None:
        print(f"{os.path.relpath(path, ROOT)}: does not record {old[:12]}: not touched")
        return
    before = data_area(path)
    write_safetensors(path, tensors, changed)
    after, after_meta = read_all(path)
    assert data_area(path) == before, f"{path}: the data area changed"
    assert list(after) == list(tensors) and after_meta == changed
    print(f"{os.path.relpath(path, ROOT)}: weights_hash {old[:12]} -> {new[:12]}; "
          f"{len(before)} data bytes identical")


def main():
    model = load_dit(WEIGHTS)                    # accepts the v1 value it records; verifies the tensors
    h = _WeightsHasher()
    for name in sorted(model.params):
        h.update(name, model.params[name])
    old, new = h.tensors_digest(), h.hexdigest(model.config)
    assert new == model.weights_hash
    print(f"bundled model: v1 {old[:12]} -> v2 {new[:12]}")
    published = sorted(glob.glob(os.path.join(ROOT, "docs", "data", "gates", "*.safetensors")))   # gates behind docs rows
    for path in (WEIGHTS, gates_file(WEIGHTS, 20), gates_file(WEIGHTS, 10), *published):
        rewrite(path, old, new, lambda meta: dict(meta, weights_hash=new) if meta.get("weights_hash") == old else None)
    for name in GOLDENS:
        rewrite(golden_path(name, os.path.join(ROOT, "tests", "golden")), old, new, lambda meta: rehash_manifest(meta, old, new))


if __name__ == "__main__":
    main()
