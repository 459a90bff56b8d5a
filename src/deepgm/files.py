"""Writing result files whole: a reader (or a killed run) sees the old file or the new one, never half of one;
and checksums of files."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call write(tmp_path) on a temp file beside `path` (its folder made if missing), then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2))


def write_npz(path: str | Path, arrays: dict) -> Path:
    """Arrays to an .npz file, whole or not at all."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the temp file's name
            np.savez(f, **arrays)
    return atomic_write(path, write)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def beside(stem: str | Path, suffix: str) -> Path:
    """The file stem + suffix (a stem already ending in .png or .npz names the pair). Not with_suffix: sample stems
    carry plan names with dots (w2.5, dynamic0.9) that it would cut, with the seed after them, so that other plans
    and seeds overwrote the same files."""
    stem = Path(stem)
    if stem.suffix in (".png", ".npz"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + suffix)
