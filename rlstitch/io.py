"""Crash-safe file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> None:
    """write(tmp) into path's folder, then rename over path, so readers never see a half-written file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; the result gets the mode a plain open() would (other workers may read it).
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # write() may have moved it: keep the original error
            os.unlink(tmp)
        raise


def atomic_save(state: dict, file: str | Path, metadata: dict | None = None) -> None:
    """safetensors save_file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_text(file: str | Path, text: str) -> None:
    """Write a text file, atomically."""
    atomic_write(file, lambda tmp: Path(tmp).write_text(text))


def sha256(file: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
