"""IR drop: the crossbar as the resistor network it is, wires included.

Each of a tile's two arrays (G+ and G-) is a grid of devices between row wires and column
wires, every wire segment between neighbouring cells (and between the first cell and its
driver or sense amplifier) a resistor of `r` ohms. Row i is driven at its column-0 end at
its input voltage v_i; column j ends at row R-1 in a virtual-ground sense amplifier (0 V)
that takes the column's current. With ``x[i, j]`` the current through cell (i, j):

- the row wire drops ``r * cumsum_j(revcumsum_j(x))``: the segment left of cell j carries
  every current drawn at and beyond j;
- the column wire rises above ground by ``r * revcumsum_i(cumsum_i(x))``;
- so ``x / G + r A x = v`` (v broadcast along the row), with ``A = A_row + A_col`` the sum
  of the two symmetric positive semi-definite wire operators above.

With ``S = sqrt(G)`` and ``y = x / S`` this is ``(1 + r S A S) y = S v``: symmetric positive
definite for any r and G (zero conductances included), solved here by conjugate gradients
in float64 to a relative residual of `TOL`. The network is linear, so its output currents
are ``v @ M`` for one matrix M (the tile's effective conductance): `effective_conductance`
computes it once per write from the R unit inputs (or, by reciprocity, from the C unit
outputs when C < R), and every later mvm and settle step
uses it exactly, at no cost of its own. The cost is at the write: about
``iterations x R^2 x C`` operations (measured by `benchmarks/ir_drop.py` at 2 ohms on one
CPU thread of a loaded 2-core machine: 0.10 s for a 64 x 64 array, 12.7 s for 256 x 256);
`MAX_IR_WORK` bounds R^2 C.
"""

from __future__ import annotations

import torch

from drivers.errors import ConfigurationError

TOL = 1e-10  # relative residual of the conjugate-gradient solve
MAX_ITERS = 2000
MAX_IR_WORK = 1 << 28  # R^2 C of a tile whose IR drop is solved exactly (e.g. 512 x 1024)
CHUNK_VALUES = 1 << 22  # unit inputs solved at once: at most this many (inputs x R x C) values


def check_ir_work(rows: int, cols: int) -> None:
    """Refuse a tile whose exact IR-drop solve would take more than `MAX_IR_WORK`."""
    if rows * rows * cols > MAX_IR_WORK:
        raise ConfigurationError(
            f"an exact IR-drop solve of a {rows} x {cols} tile takes rows^2 x cols = "
            f"{rows * rows * cols:,} operations per iteration and write, over the bound of "
            f"{MAX_IR_WORK:,}: use smaller tiles (at most 512 x 1024), or wire_resistance=0"
        )


def _revcumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.flip(dim).cumsum(dim).flip(dim)


def wire_operator(x: torch.Tensor) -> torch.Tensor:
    """``A x``: the wire voltage drops (per ohm of segment) that cell currents `x` (..., R, C)
    cause at every cell, row wires and column wires together."""
    return _revcumsum(x, -1).cumsum(-1) + _revcumsum(x.cumsum(-2), -2)


def cell_currents(g: torch.Tensor, v: torch.Tensor, r: float, *, columns: bool = False) -> torch.Tensor:
    """Currents (B, R, C) through the cells of conductances `g` (R, C) with row inputs `v`
    (B, R), float64, solved to `TOL`. With `columns`, `v` (B, C) drives the columns' sense
    ends instead, every row driver held at 0 V (the reciprocal problem: a cell then sees
    ``-v_j`` and its current flows from the column into the row). ConfigurationError if the
    solve does not converge."""
    g64 = g.to(torch.float64).clamp_min(0.0)
    s = g64.sqrt()
    v64 = v.to(torch.float64)
    b = s * (-v64[:, None, :] if columns else v64[:, :, None])  # S v, v along each row (column)

    def op(y: torch.Tensor) -> torch.Tensor:
        return y + r * s * wire_operator(s * y)

    y = b.clone()  # r = 0 solution as the start
    res = b - op(y)
    p = res.clone()
    rr = (res * res).sum((-2, -1))
    target = TOL**2 * (b * b).sum((-2, -1)).clamp_min(1e-300)
    for _ in range(MAX_ITERS):
        if bool((rr <= target).all()):
            return s * y
        ap = op(p)
        alpha = rr / (p * ap).sum((-2, -1)).clamp_min(1e-300)
        y = y + alpha[:, None, None] * p
        res = res - alpha[:, None, None] * ap
        rr_new = (res * res).sum((-2, -1))
        p = res + (rr_new / rr.clamp_min(1e-300))[:, None, None] * p
        rr = rr_new
    raise ConfigurationError(
        f"the IR-drop solve did not converge in {MAX_ITERS} iterations (wire resistance {r} ohm, "
        f"tile {tuple(g.shape)}): lower wire_resistance or the tile size"
    )


def output_currents(g: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """Column currents (B, C) into the sense amplifiers for row inputs `v` (B, R)."""
    return cell_currents(g, v, r).sum(-2)


def effective_conductance(g: torch.Tensor, r: float) -> torch.Tensor:
    """M (R, C), float32 on the device of `g`: output currents are ``v @ M`` for any input v.

    Row by row (R solves: the column currents for each unit row input), or, on a tile with
    fewer columns than rows, column by column (C solves): by reciprocity, M[m, j] is also
    the current a unit voltage at column j's sense end drives into row m's (grounded)
    driver, so a 1024 x 10 tile takes 10 solves, not 1024."""
    rows, cols = g.shape
    check_ir_work(rows, cols)
    chunk = max(1, CHUNK_VALUES // (rows * cols))
    if cols < rows:
        eye = torch.eye(cols, dtype=torch.float64, device=g.device)
        parts = [
            -cell_currents(g, eye[k : k + chunk], r, columns=True).sum(-1) for k in range(0, cols, chunk)
        ]
        return torch.cat(parts).T.contiguous().to(torch.float32)
    eye = torch.eye(rows, dtype=torch.float64, device=g.device)
    parts = [output_currents(g, eye[k : k + chunk], r) for k in range(0, rows, chunk)]
    return torch.cat(parts).to(torch.float32)
