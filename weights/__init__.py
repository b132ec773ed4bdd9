"""The bundled models and their LazyDiT gates: package data of tinylazy (see tinylazy/resources.py)."""
