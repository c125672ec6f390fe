"""PNG grids of images: samples, and reconstructions next to their inputs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend


def _tile(images: np.ndarray, shape: tuple[int, int], cols: int) -> np.ndarray:
    h, w = shape
    n = images.shape[0]
    rows = -(-n // cols)
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 0.3, np.float32)  # grey grid lines
    for i, img in enumerate(images.reshape(n, h, w)):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    return canvas


def save_grid(
    path: str | Path, images: np.ndarray, shape: tuple[int, int], title: str, cols: int = 10
) -> Path:
    """Save `images` (n, h*w) in [0, 1] as a grid, through a temporary file in the same folder
    and a rename: a crash or a full disk leaves the picture before (or none), never a truncated
    PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas = _tile(np.clip(images, 0, 1), shape, cols)
    fig = Figure(figsize=(cols * 0.6, canvas.shape[0] / canvas.shape[1] * cols * 0.6 + 0.4))
    ax = fig.add_subplot()
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_reconstructions(
    path: str | Path,
    inputs: np.ndarray,
    recons: np.ndarray,
    shape: tuple[int, int],
    title: str,
    cols: int = 10,
) -> Path:
    """Inputs and their reconstructions in alternating rows (input row above its reconstruction)."""
    n = min(len(inputs), len(recons))
    rows = []
    for start in range(0, n, cols):
        block_in, block_out = inputs[start : start + cols], recons[start : start + cols]
        pad = cols - len(block_in)
        if pad:
            filler = np.zeros((pad, inputs.shape[1]), np.float32)
            block_in, block_out = np.vstack([block_in, filler]), np.vstack([block_out, filler])
        rows += [block_in, block_out]
    return save_grid(path, np.vstack(rows), shape, title, cols)
