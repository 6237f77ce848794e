"""Crash-safe file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors.torch import save_file


def atomic_save(state: dict, file: str | Path, metadata: dict | None = None) -> None:
    """safetensors save_file to a temp name, then rename, so a crash never leaves half a file."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(file)


def atomic_write_text(file: str | Path, text: str) -> None:
    """Write text to a temp name, then rename."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(file)


def sha256(file: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
