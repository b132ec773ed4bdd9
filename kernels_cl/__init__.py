"""The OpenCL kernel sources: package data of tinylazy (see tinylazy/resources.py)."""
