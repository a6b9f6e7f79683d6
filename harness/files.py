"""Atomic writes and file hashes: the one writer every file of the project goes through (no torch here:
plot.py and data/prepare_common.py use it too).

A reader, or a crash, sees the old file or the new one, never half of one: each write goes to a temp file
in the same folder, is fsynced, then renamed over the target.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from harness.errors import UserError


def write_temp(path: Path, data) -> Path:
    """`data` in a fsynced temp file beside `path` (".<name>.XXXX.tmp"), readable by others; not renamed yet."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are meant to be read by others (as plot.py's)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_files(folder: Path, outputs: list, marker: str) -> None:
    """Several files as one: stage every (name, data) in a temp file, remove `marker` (the file that says the
    folder is complete, written last), then rename them all into place in order. A crash half-way leaves an
    incomplete folder, never a complete-looking mix of old and new files."""
    folder, staged = Path(folder), []
    try:
        for name, data in outputs:
            staged.append((write_temp(folder / name, data), folder / name))
        (folder / marker).unlink(missing_ok=True)
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)  # no-op for those already renamed


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def atomic_save_npy(path: Path, obj) -> None:
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path):
    """A JSON file we wrote; one UserError line when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time (enwik8's zip need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
