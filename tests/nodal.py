"""The resistor network of one crossbar array with wire resistance, as a nodal-analysis matrix:
the independent reference that the emulator's IR-drop model (emulator/ir_drop.py) and its read
noise (tests/test_ir_read_noise.py) are checked against."""

from __future__ import annotations

import numpy as np


def nodal_matrix(g: np.ndarray, r: float) -> tuple[np.ndarray, list[int], list[int]]:
    """(A, drive nodes, sense nodes) of one array of conductances `g` (rows, cols): every cell
    has a row-wire node (index ``i * cols + j``) and a column-wire node (``n + i * cols + j``),
    joined by its device; one segment of `r` ohms joins neighbouring nodes of a wire, row i is
    driven through one segment into cell (i, 0) (its drive node), column j is sensed at 0 V
    through one segment below cell (rows - 1, j) (its sense node). ``A V = b`` with ``b`` the
    drivers' ``v_i / r`` at their drive nodes; column j's current is ``V[sense_j] / r``."""
    rows, cols = g.shape
    n = rows * cols
    a = np.zeros((2 * n, 2 * n))
    gw = 1.0 / r

    def link(p: int, q: int, c: float) -> None:
        a[p, p] += c
        a[q, q] += c
        a[p, q] -= c
        a[q, p] -= c

    for i in range(rows):
        for j in range(cols):
            link(i * cols + j, n + i * cols + j, g[i, j])  # the device
            if j + 1 < cols:
                link(i * cols + j, i * cols + j + 1, gw)
            if i + 1 < rows:
                link(n + i * cols + j, n + (i + 1) * cols + j, gw)
    drive = [i * cols for i in range(rows)]
    sense = [n + (rows - 1) * cols + j for j in range(cols)]
    for p in drive + sense:
        a[p, p] += gw  # the driver's and the sense amplifier's segment
    return a, drive, sense
