"""Crash-safe writes: no half-written file, the mode a plain write would give, the writer's error kept."""

import os
import stat

import pytest

from rlstitch.io import atomic_write, atomic_write_text


def test_atomic_write_gives_the_umask_mode_not_mkstemps_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask != 0o600


def test_a_failed_write_leaves_nothing_and_keeps_the_writers_error(tmp_path):
    def fail(tmp):
        os.unlink(tmp)  # e.g. a writer that removes its own partial output before raising
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "b.bin", fail)
    assert list(tmp_path.iterdir()) == []
