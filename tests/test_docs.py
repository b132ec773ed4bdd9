"""The documented results against the data behind them: the LazyDiT tables of README.md and
docs/lazy.md are the JSON in docs/data, and every gates file behind a row of the current
model's table is in the repository."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tables():
    spec = importlib.util.spec_from_file_location("doc_tables", os.path.join(ROOT, "docs", "tables.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_tables_match_their_json():
    assert _tables().check() == []


def test_gates_behind_the_current_table_are_in_the_repository():
    """lazy_quality.py records the gates of each learned row; gates it trained went to its cache
    folder (outside the repository), and their copies live in docs/data/gates under the same name."""
    tables = _tables()
    data = tables.load(tables.CURRENT)
    sources = {r["source"] for r in data["rows"] if r["method"].startswith("LazyDiT")}
    assert sources
    hashes = _bundled_hashes()
    assert data["weights_hash"] in hashes                                 # the table is of the bundled model
    for source in sources:
        in_repo = source if not os.path.isabs(source) else os.path.join("docs", "data", "gates",
                                                                         os.path.basename(source))
        path = os.path.join(ROOT, in_repo)
        assert os.path.isfile(path), f"{source}: no copy at {in_repo}"
        with open(path, "rb") as f:                                       # safetensors: u64 header size, JSON
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n))["__metadata__"]
        assert meta["weights_hash"] in hashes, in_repo


def _bundled_hashes():
    """The bundled model's weights hash, and the tensors-only hash that tinylazy recorded before
    the hash covered the configuration (the tables' JSON from then records that one)."""
    import tinylazy as tl
    from tinylazy.io import _WeightsHasher
    model = tl.load_dit("tiny-dit-digits")
    h = _WeightsHasher()
    for name in sorted(model.params):
        h.update(name, model.params[name])
    assert h.hexdigest(model.config) == model.weights_hash
    return {model.weights_hash, h.tensors_digest()}
