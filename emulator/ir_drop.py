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

That exact map costs seconds per write on a 256 x 256 tile, so training (which programs
every tile at every batch) uses a cheaper one by default, ``ir_model="attenuation"``
(`WireSolver`): one solve of the same network with every row driven at the same voltage
(the network is linear, so any level gives the same answer) gives each cell's current
``G_ij u_ij``, and the tile's effective conductance is taken as ``G_ij u_ij``, i.e. every
cell keeps the fraction ``u_ij`` of its voltage that it gets under a uniform input. It is
exact for a uniform input (every column's current then equals the exact one) and
approximate for others (the drops along a wire depend on which rows are on); its error
against the exact map is measured by `benchmarks/ir_drop.py` and bounded by
`tests/test_ir_drop.py`. One solve costs ``iterations x R x C`` (not ``R x`` that), the
conjugate gradients are Jacobi-preconditioned and start from the previous write's cell
voltages (conductances change little between training batches), to a relative residual of
`ATTENUATION_TOL`; `MAX_IR_CELLS` bounds R C.
"""

from __future__ import annotations

import torch

from drivers.errors import ConfigurationError

TOL = 1e-10  # relative residual of the conjugate-gradient solve
MAX_ITERS = 2000
MAX_IR_WORK = 1 << 28  # R^2 C of a tile whose IR drop is solved exactly (e.g. 512 x 1024)
CHUNK_VALUES = 1 << 22  # unit inputs solved at once: at most this many (inputs x R x C) values
ATTENUATION_TOL = 1e-5  # relative residual of the attenuation model's solve (float32)
MAX_IR_CELLS = 1 << 22  # R C of a tile under the attenuation model (e.g. 2048 x 2048)
IR_MODELS = ("attenuation", "exact")


def check_ir_work(rows: int, cols: int) -> None:
    """Refuse a tile whose exact IR-drop solve would take more than `MAX_IR_WORK`."""
    if rows * rows * cols > MAX_IR_WORK:
        raise ConfigurationError(
            f"an exact IR-drop solve of a {rows} x {cols} tile takes rows^2 x cols = "
            f"{rows * rows * cols:,} operations per iteration and write, over the bound of "
            f"{MAX_IR_WORK:,}: use smaller tiles (at most 512 x 1024), or wire_resistance=0"
        )


def check_ir_model(name: str) -> None:
    if name not in IR_MODELS:
        raise ConfigurationError(f"ir_model must be one of {IR_MODELS}, got {name!r}")


def check_ir_size(rows: int, cols: int, ir_model: str) -> None:
    """Refuse a tile too large for `ir_model`: R^2 C over `MAX_IR_WORK` for the exact map,
    R C over `MAX_IR_CELLS` for the attenuation model."""
    check_ir_model(ir_model)
    if ir_model == "exact":
        check_ir_work(rows, cols)
    elif rows * cols > MAX_IR_CELLS:
        raise ConfigurationError(
            f"the IR-drop attenuation model of a {rows} x {cols} tile holds rows x cols = "
            f"{rows * cols:,} cells, over the bound of {MAX_IR_CELLS:,}: use smaller tiles, or "
            f"wire_resistance=0"
        )


def _revcumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.flip(dim).cumsum(dim).flip(dim)`` as total - cumsum + x (no flipped copies)."""
    return x.sum(dim, keepdim=True) - x.cumsum(dim) + x


def wire_operator(x: torch.Tensor) -> torch.Tensor:
    """``A x``: the wire voltage drops (per ohm of segment) that cell currents `x` (..., R, C)
    cause at every cell, row wires and column wires together."""
    # the column part on the transposed currents: a cumsum along the last, contiguous axis
    # is several times faster than along rows
    return _revcumsum(x, -1).cumsum(-1).add_(_revcumsum(x.mT.contiguous().cumsum(-1), -1).mT)


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


class WireSolver:
    """One array's IR drop under `ir_model`, with the attenuation model's warm start.

    `effective(g)` returns the array's effective conductance (R, C), float32: the exact map
    (`effective_conductance`) or the attenuation model (module docstring). The attenuation
    model keeps the cell voltages of its last solve and starts the next one from them."""

    def __init__(self, rows: int, cols: int, r: float, ir_model: str = "attenuation") -> None:
        check_ir_size(rows, cols, ir_model)
        self.shape = (rows, cols)
        self.r = r
        self.ir_model = ir_model
        self.iterations = 0  # conjugate-gradient iterations of the last attenuation solve
        self._u: torch.Tensor | None = None  # cell voltages of the last solve (unit input)

    def effective(self, g: torch.Tensor) -> torch.Tensor:
        if tuple(g.shape) != self.shape:
            raise ConfigurationError(f"expected conductances of shape {self.shape}, got {tuple(g.shape)}")
        if self.ir_model == "exact":
            return effective_conductance(g, self.r)
        x, self._u, self.iterations = uniform_currents(g, self.r, self._u)
        return x.to(torch.float32)


def uniform_currents(
    g: torch.Tensor, r: float, u0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cell currents (R, C) of conductances `g` with every row driven at 1 V, by
    Jacobi-preconditioned conjugate gradients to `ATTENUATION_TOL`, started from the cell
    voltages `u0` (R, C) of an earlier solve (None: from the ideal-wire solution); returns
    (currents, cell voltages, iterations). In float32 (the model's own error, percent-level
    on large tiles, is far above float32's; float32 makes a 785 x 512 iteration several times
    cheaper). ConfigurationError if it does not converge."""
    dtype = torch.float32
    g32 = g.to(dtype).clamp_min(0.0)
    rows, cols = g32.shape
    s = g32.sqrt()
    b = s.clone()  # S v with v = 1
    # the diagonal of 1 + r S A S: a cell's own current crosses the j + 1 row segments
    # between it and its driver and the R - i column segments between it and its sense end
    seg = (
        torch.arange(1, cols + 1, dtype=dtype, device=g.device)[None, :]
        + torch.arange(rows, 0, -1, dtype=dtype, device=g.device)[:, None]
    )
    inv_diag = 1.0 / (1.0 + r * g32 * seg)

    def op(y: torch.Tensor) -> torch.Tensor:
        return y + r * s * wire_operator(s * y)

    y = b.clone() if u0 is None else s * u0.to(device=g.device, dtype=dtype)
    res = b - op(y)
    z = inv_diag * res
    p = z.clone()
    rz = float((res * z).sum())
    target = ATTENUATION_TOL**2 * float((b * b).sum())
    for k in range(MAX_ITERS + 1):
        if float((res * res).sum()) <= target:
            x = s * y
            return x, 1.0 - r * wire_operator(x), k
        if k == MAX_ITERS:
            break
        ap = op(p)
        alpha = rz / max(float((p * ap).sum()), 1e-300)
        y.add_(p, alpha=alpha)
        res.sub_(ap, alpha=alpha)
        z = inv_diag * res
        rz_new = float((res * z).sum())
        p = z + (rz_new / max(rz, 1e-300)) * p
        rz = rz_new
    raise ConfigurationError(
        f"the IR-drop attenuation solve did not converge in {MAX_ITERS} iterations (wire resistance "
        f"{r} ohm, tile {tuple(g.shape)}): lower wire_resistance or the tile size"
    )
