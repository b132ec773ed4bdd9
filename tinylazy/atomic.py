"""Atomic file writes: a temp file in the same folder, flushed to disk, then renamed over the target.

    with writing("out/grid.png") as f:        # f: a binary file open on out/grid.png.<pid>.<hex>.tmp
        image.save(f, format="PNG")

A reader sees the old file or the new one, never a part: ``os.replace`` is atomic
within one file system, which is why the temp file sits beside the target.  An
exception (Ctrl-C included) removes the temp file.  A killed process (SIGKILL, power
loss) cannot, so every write first removes the temp files that dead processes left
for the same target (``remove_orphans``); the pid in the name says whose a temp file is.
"""
import contextlib
import os
import re
import secrets
import time

SUFFIX = ".tmp"
_ORPHAN_AGE = 24 * 3600          # seconds; where a pid cannot be checked (not POSIX), only old temp files go


def temp_path(path):
    """A fresh temp name beside ``path``: ``<path>.<pid>.<8 hex>.tmp``."""
    return f"{os.fspath(path)}.{os.getpid()}.{secrets.token_hex(4)}{SUFFIX}"


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)                  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:              # it exists, owned by someone else
        pass
    try:                                 # a killed process can linger as a zombie until it is reaped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_orphans(path):
    """Remove the temp files of ``path`` whose writer is dead; returns their names.

    Also matches the names tinylazy used before the pid was part of them (``<path>.<hex>.tmp``)."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.(?:(\d+)\.)?[0-9a-f]{8}" + re.escape(SUFFIX))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        full = os.path.join(folder, name)
        if os.name == "posix" and m.group(1) is not None:
            orphan = not _alive(int(m.group(1)))
        else:
            try:
                orphan = time.time() - os.path.getmtime(full) > _ORPHAN_AGE
            except OSError:
                continue
        if orphan:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
                removed.append(full)
    return removed


@contextlib.contextmanager
def writing(path):
    """Open a temp file beside ``path`` for binary writing; on success fsync and rename it to ``path``."""
    path = os.fspath(path)
    remove_orphans(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def probe_folder(folder):
    """Raise OSError unless a file can be created in ``folder`` (the way ``writing`` will create one)."""
    tmp = temp_path(os.path.join(folder, ".tinylazy-probe"))
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.unlink(tmp)
