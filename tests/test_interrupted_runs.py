"""Runs stopped part-way (Ctrl-C, SIGTERM, a board that vanished, a full disk, two runs on
one folder): what they leave behind and what the user is told (the interrupted-runs audit)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest


def test_a_picture_cut_by_a_full_disk_leaves_the_one_before_whole(tmp_path: Path, monkeypatch) -> None:
    """`save_grid` wrote the PNG in place: a full disk (or a kill) mid-write left a truncated
    picture where a whole one was. Now the old one stays, and no temporary file is left."""
    from matplotlib.figure import Figure

    from hil.vae.images import save_grid, save_reconstructions

    images = np.random.default_rng(0).random((20, 64)).astype(np.float32)
    path = save_grid(tmp_path / "samples.png", images, (8, 8), "before")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def full_disk(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(before[:50])  # part of a PNG, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_grid(path, images[::-1], (8, 8), "after")
    with pytest.raises(OSError, match="No space"):
        save_reconstructions(tmp_path / "recon.png", images, images, (8, 8), "after")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]
