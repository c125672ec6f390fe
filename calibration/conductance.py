"""Conductance map, read-noise statistics and the stuck-device map of one tile.

Both routines program with direct writes (no verify): a calibration wants to see the
devices as they are, not as write-verify firmware hides them.

- `find_stuck`: write every device low (20 % of the window), read, write it high (80 %),
  read. A working device moves by about 60 % of the window (give or take its write noise);
  a stuck one does not move at all. The threshold sits halfway, at 30 % of the window, and
  the record keeps the margin of the closest device to it in units of the measurement noise.
- `conductance_map`: write random targets spread over the window, read every device
  `reads` times; the map is the mean read (error read_noise / sqrt(reads) per device), the
  per-device sample std gives the read noise, and the spread of (mean - target) over working
  devices the write noise.
"""

from __future__ import annotations

import numpy as np

from calibration.measure import Progress, no_progress, read_stats
from calibration.record import ConductanceMap, StuckMap
from drivers import Device, seeds

LOW, HIGH = 0.2, 0.8


def _window(device: Device) -> tuple[float, float]:
    lim = device.info.limits
    return lim.g_min, lim.g_max - lim.g_min


def find_stuck(
    device: Device, tile: str, shape: tuple[int, int], reads: int = 4, progress: Progress = no_progress
) -> StuckMap:
    """Map the devices of `tile` that do not follow writes (stuck at any value)."""
    g_min, span = _window(device)
    means = []
    stds = []
    for k, level in enumerate((LOW, HIGH)):
        g = np.full(shape, g_min + level * span, np.float32)
        device.program(tile, g, g)
        st = read_stats(device, tile, reads)
        means.append(st.mean)
        stds.append(st.std)
        progress("stuck", k + 1, 2)
    low, high = means
    moved = high - low
    threshold = 0.5 * (HIGH - LOW) * span
    stuck = moved < threshold
    working = moved[~stuck]
    # measurement noise of `moved` for a working device: its spread about the expected move
    noise = float(np.std(working)) if working.size > 1 else float(np.sqrt(2.0 / reads) * np.mean(stds))
    noise = max(noise, 1e-6 * span)  # a noise-free board: margins in millionths of the window
    margin = float(np.min(np.abs(moved - threshold)) / noise)
    return StuckMap(
        stuck=stuck,
        value=(0.5 * (low + high)).astype(np.float32),
        low=low.astype(np.float32),
        high=high.astype(np.float32),
        threshold=float(threshold),
        margin=margin,
    )


def conductance_map(
    device: Device,
    tile: str,
    shape: tuple[int, int],
    reads: int = 64,
    stuck: np.ndarray | None = None,
    seed: int = 0,
    progress: Progress = no_progress,
) -> ConductanceMap:
    """Program random targets over the middle 90 % of the window and read them `reads` times."""
    if reads < 2:
        raise ValueError(f"a conductance map needs reads >= 2 (the read noise is their spread), got {reads}")
    g_min, span = _window(device)
    rng = seeds.numpy_rng(seed, "calibration.conductance")
    target = (g_min + rng.uniform(0.05, 0.95, (2, *shape)) * span).astype(np.float32)
    device.program(tile, target[0], target[1])
    progress("gmap", 1, 2)
    st = read_stats(device, tile, reads)
    progress("gmap", 2, 2)
    var = st.std**2
    read_noise = float(np.sqrt(var.mean()))
    # the pooled variance is a mean of N scaled chi-square(reads - 1) variables
    read_noise_se = read_noise / np.sqrt(2.0 * var.size * (reads - 1))
    working = np.ones(target.shape, bool) if stuck is None else ~stuck
    err = (st.mean - target)[working]
    # robust spread (MAD), minus the part the read noise of the mean contributes
    mad = 1.4826 * float(np.median(np.abs(err - np.median(err)))) if err.size else float("nan")
    write_noise = float(np.sqrt(max(mad**2 - read_noise**2 / reads, 0.0)))
    return ConductanceMap(
        target=target,
        mean=st.mean,
        std=st.std.astype(np.float32),
        reads=reads,
        read_noise=read_noise,
        read_noise_se=float(read_noise_se),
        write_noise=write_noise,
    )
