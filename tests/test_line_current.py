"""The line-current limit (`Limits.max_line_current_a`): host bound, board check, wire field.

A current exactly at the limit passes and the next float above it is refused, on the host
(`drivers.checks`, every device at g_max) and on the board (`emulator.board`, the conductances
it holds); a request over it through a real transport is error -222, counted in the board's
`refused`, and leaves the board as it was; an older peer's info without the field parses."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drivers import checks, open_device
from drivers.base import Device, Limits
from drivers.errors import LimitViolation, ProtocolError
from drivers.topology import Coupling, Topology
from drivers.wire import payload as pl
from drivers.wire.payload import Op
from emulator.board import Board
from emulator.presets import get_preset
from hil.testing import BoardServers

V_READ, G_MAX = 0.2, 1e-5
LIMITS = Limits(0.2, 0.25, 1e-6, G_MAX, None, None, (0.0, 1.0), 64, 64, 8, 1000, 1000, 1e-8)


def _topology(rows: int, cols: int) -> Topology:
    return Topology({"a": rows, "b": cols}, (Coupling("W", ("a",), ("b",)),))


def _below(x: float) -> float:
    return float(np.nextafter(x, 0.0))


inputs = st.integers(1, 3).flatmap(
    lambda batch: st.integers(1, 6).flatmap(
        lambda n: st.lists(
            st.floats(-1.25, 1.25, allow_nan=False, width=32), min_size=batch * n, max_size=batch * n
        ).map(lambda v: np.array(v, np.float32).reshape(batch, n))
    )
)


@settings(max_examples=150, deadline=None)
@given(x=inputs, other=st.integers(1, 6), transpose=st.booleans())
def test_host_bound_at_the_limit_passes_and_one_float_below_is_refused(
    x: np.ndarray, other: int, transpose: bool
) -> None:
    n_in = x.shape[1]
    rows, cols = (other, n_in) if transpose else (n_in, other)
    topo = _topology(rows, cols)
    volts = np.abs(x).max(axis=0).astype(np.float64) * V_READ
    (driven, _), sensed = checks.worst_line_currents(LIMITS, other, volts)
    current = max(driven, sensed)
    if current == 0.0:
        return  # an all-zero input drives nothing: nothing to refuse
    at = dataclasses.replace(LIMITS, max_line_current_a=current)
    checks.check_mvm(topo, at, "W", x, transpose, lines=True)  # exactly at the limit: passes
    below = dataclasses.replace(LIMITS, max_line_current_a=_below(current))
    with pytest.raises(LimitViolation) as err:  # the current is the next float above this limit
        checks.check_mvm(topo, below, "W", x, transpose, lines=True)
    assert err.value.value == current and err.value.bound == below.max_line_current_a
    text = str(err.value)
    assert "line current (A) of" in text and "'W'" in text and "split the layer" in text


def test_check_line_current_boundary() -> None:
    lim = dataclasses.replace(LIMITS, max_line_current_a=1e-3)
    checks.check_line_current("column 0 of 'W'", 1e-3, lim)
    with pytest.raises(LimitViolation, match=r"column 0 of 'W'.*limit 0\.001.*smaller inputs"):
        checks.check_line_current("column 0 of 'W'", float(np.nextafter(1e-3, 1.0)), lim)
    checks.check_line_current("anything", 1e300, LIMITS)  # not declared (inf): nothing refused


def _board(limit: float | None = None) -> Board:
    preset = get_preset("ideal")
    board = Board(preset, seed=0)
    if limit is not None:
        _set_limit(board, limit)
    return board


def _set_limit(board: Board, limit: float) -> None:
    per = dataclasses.replace(board.preset.periphery, max_line_current_a=limit)
    board.preset = dataclasses.replace(board.preset, periphery=per)  # `limits` follow the preset


@pytest.fixture(scope="module")
def board() -> Board:
    b = _board()
    b.configure(_topology(6, 5))
    return b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    x=st.integers(1, 3).flatmap(
        lambda batch: st.lists(
            st.floats(-1.25, 1.25, allow_nan=False, width=32), min_size=batch * 6, max_size=batch * 6
        )
    ),
    g=st.lists(st.floats(1e-6, 1e-5).map(lambda v: float(np.float32(v))), min_size=60, max_size=60),
    transpose=st.booleans(),
)
def test_board_check_at_the_limit_passes_and_one_float_below_is_refused(
    board: Board, x: list[float], g: list[float], transpose: bool
) -> None:
    _set_limit(board, 1.0)
    gg = torch.tensor(g, dtype=torch.float32).reshape(2, 6, 5)
    board.program("W", gg[0], gg[1], verify=False, tol=None, max_iters=None)
    n = 5 if transpose else 6
    xt = torch.tensor(x, dtype=torch.float32).reshape(-1, 6)[:, :n]
    volts = xt.abs().amax(0).double() * board.preset.periphery.v_read
    current = max(float(c.max()) for c in board.line_currents("W", volts, transpose))
    if current == 0.0:
        return
    _set_limit(board, current)
    board.mvm("W", xt, transpose)  # exactly at the limit: runs
    _set_limit(board, _below(current))
    before = (board.safety.refused, board.clock, board.mvm_calls, board.energy_j)
    with pytest.raises(LimitViolation) as err:
        board.mvm("W", xt, transpose)
    assert err.value.value == current
    assert (board.safety.refused, board.clock, board.mvm_calls, board.energy_j) == (
        before[0] + 1,
        *before[1:],
    )
    assert board.safety.violations == 0


def test_board_refuses_settle_read_and_program_over_the_limit_and_changes_nothing() -> None:
    b = _board()
    b.configure(_topology(4, 3))
    g = torch.full((2, 4, 3), 1e-5)
    b.program("W", g[0], g[1], verify=False, tol=None, max_iters=None)
    # a read drives one row: 0.2 V x 3 x 10 uS = 6 uA; a settle's column sums 4 rows: 8 uA
    _set_limit(b, 7e-6)
    held = b.tile("W").state(b.clock).clone()
    clock, refused = b.clock, b.safety.refused
    with pytest.raises(LimitViolation, match=r"column .* of 'W'.*settle"):
        b.settle({"a": torch.ones(2, 4)})
    b.read_conductance("W")  # 6 uA: within the limit
    _set_limit(b, 5e-6)
    clock = b.clock
    with pytest.raises(LimitViolation, match=r"row 0 of 'W'.*read"):
        b.read_conductance("W")
    with pytest.raises(LimitViolation, match=r"row 0 of 'W'.*verify reads"):
        b.program("W", g[0], g[1], verify=True, tol=None, max_iters=None)
    assert b.safety.refused == refused + 3 and b.clock == clock and b.safety.violations == 0
    assert torch.equal(b.tile("W").state(b.clock), held)


def test_presets_declare_a_finite_limit_that_full_reads_of_the_largest_tile_meet() -> None:
    for name in ("ideal", "rram", "pcm", "ecram"):
        preset = get_preset(name)
        lim = Board(preset).limits
        per, m = preset.periphery, preset.device
        assert lim.max_line_current_a == max(per.tile_rows_max, per.tile_cols_max) * m.g_max * per.v_read
        assert 1e-4 < lim.max_line_current_a < 1e-2  # a line driver / TIA's mA, not a device's uA


# ---------------------------------------------------------------- the wire


def test_an_older_peers_info_without_the_field_parses_as_not_declared() -> None:
    board = _board()
    d = pl.info_to_dict(
        open_device("emulator://?preset=ideal&seed=0").info  # the field is declared: it travels
    )
    assert d["limits"]["max_line_current_a"] == board.limits.max_line_current_a
    del d["limits"]["max_line_current_a"]
    assert pl.info_from_dict(d).limits.max_line_current_a == math.inf
    undeclared = dataclasses.replace(board.limits, max_line_current_a=math.inf)
    info = dataclasses.replace(open_device("emulator://?preset=ideal").info, limits=undeclared)
    assert "max_line_current_a" not in pl.info_to_dict(info)["limits"]  # omitted, never Infinity


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.inf, math.nan, "1e-3", True, None])
def test_a_declared_limit_must_be_a_finite_positive_number(bad: object) -> None:
    d = pl.info_to_dict(open_device("emulator://?preset=ideal").info)
    d["limits"]["max_line_current_a"] = bad
    with pytest.raises(ProtocolError, match="max_line_current_a"):
        pl.info_from_dict(d)


def test_a_uri_override_must_be_positive() -> None:
    with pytest.raises(Exception, match="max_line_current_a"):
        open_device("emulator://?preset=ideal&max_line_current_a=0")


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_over_the_limit_through_a_real_transport(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """8 x 1 tile at 10 uS: a read drives 2 uA, an mvm of ones sums 8 rows into the column,
    16 uA; with a limit of 5 uA the host refuses the mvm first (its g_max bound), and an
    unchecked one (a buggy host) is -222 from the board, counted there, the board unchanged."""
    servers = emulated_board("emulator://?preset=ideal&seed=0&max_line_current_a=5e-6")
    with open_device(servers.uri(transport)) as dev:
        assert dev.info.limits.max_line_current_a == 5e-6
        dev.configure(_topology(8, 1))
        g = np.full((8, 1), 1e-5, np.float32)
        dev.program("W", g, g)
        x = np.ones((1, 8), np.float32)
        before = dev.safety()
        with pytest.raises(LimitViolation, match=r"every column of 'W'.*limit 5e-06"):
            dev.mvm("W", x)  # the host's bound: refused before sending
        assert dev.safety().refused == before.refused + 1
        held = dev.read_conductance("W")
        meter = dev.meter()
        for op, request in (
            (Op.MVM, pl.mvm_request("W", x, False)),
            (Op.SETTLE, pl.settle_request({"a": x}, {}, {}, False)),
        ):
            with pytest.raises(LimitViolation, match=r"column 0 of 'W'"):
                dev.send_unchecked(op, request)  # the board: -222
        after = dev.safety()
        assert after.refused == before.refused + 3 and after.violations == 0
        assert dev.meter() == meter  # nothing driven: no clock, energy or mvm counted
        again = dev.read_conductance("W")
        assert np.allclose(again[0], held[0], atol=1e-9) and np.allclose(again[1], held[1], atol=1e-9)


def test_hil_info_shows_the_line_current_limit() -> None:
    from hil.cli.info import describe

    with open_device("emulator://?preset=rram") as dev:
        text = "\n".join(describe(dev, "emulator://?preset=rram"))
    assert "line current  at most 0.002048 A on any tile line" in text


# ---------------------------------------------------------------- reads exactly at the limit

targets = st.lists(
    st.floats(1e-6, 1e-5).map(lambda v: float(np.float32(v))), min_size=2 * 6 * 5, max_size=2 * 6 * 5
).map(lambda v: np.array(v, np.float32).reshape(2, 6, 5))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(g=targets)
def test_a_read_row_exactly_at_the_limit_passes_on_host_and_board_and_one_float_over_is_refused(
    board: Board, g: np.ndarray
) -> None:
    """docs/protocol.md "Line currents": every current `<= max_line_current_a` (equal passes),
    reads included. The row current of a program's reads (from its targets, host and board)
    and of a read (the board, from what it holds) is ``v_read * sum_j G_ij`` with float64 row
    sums; the limit set to exactly the largest passes everywhere, the float below it is refused
    everywhere with the same current named. (A margin of 1e-9 on v_read refused a row at the
    limit, and every row within 1e-9 below it.)"""
    current = V_READ * float(g.astype(np.float64).sum(axis=2).max())
    at = dataclasses.replace(LIMITS, max_line_current_a=current)
    checks.check_program_lines(at, "W", g[0], g[1])  # the host: passes
    _set_limit(board, current)
    gt = torch.from_numpy(g)
    board.program("W", gt[0], gt[1], verify=True, tol=None, max_iters=None)  # the board: passes
    board.read_conductance("W")  # the ideal preset holds the targets exactly: the same rows
    below = dataclasses.replace(LIMITS, max_line_current_a=_below(current))
    with pytest.raises(LimitViolation) as host:
        checks.check_program_lines(below, "W", g[0], g[1])
    _set_limit(board, _below(current))
    with pytest.raises(LimitViolation) as on_board:
        board.read_conductance("W")
    assert host.value.value == on_board.value.value == current
    assert board.safety.violations == 0


def test_a_program_whose_reads_are_exactly_at_the_limit_runs_through_the_scpi_server(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """Through the SCPI server over pyvisa-py TCP: a program whose largest read row is exactly
    the declared limit passes the host's check and the board's, and the tile reads back."""
    g = np.full((2, 6, 5), np.float32(7e-6), np.float32)
    g[0, 2, :] = np.float32(1e-5)  # the G+ row 2: 5 devices at g_max
    current = V_READ * float(g.astype(np.float64).sum(axis=2).max())
    servers = emulated_board(f"emulator://?preset=ideal&seed=0&max_line_current_a={current!r}")
    with open_device(servers.uri("visa-tcp")) as dev:
        assert dev.info.limits.max_line_current_a == current
        dev.configure(_topology(6, 5))
        dev.program("W", g[0], g[1], verify=False)
        gp, _ = dev.read_conductance("W")
        np.testing.assert_array_equal(gp, g[0])
        assert dev.safety().refused == 0 and dev.safety().violations == 0


# ------------------------------------------- host, emulator board and reference firmware agree


@pytest.fixture(scope="module")
def firmware() -> Iterator[tuple[Device, Board]]:
    """The reference firmware (tests/fw_reference_board.py, written from docs/protocol.md alone)
    over its framed TCP server, configured with a 1 x 512 tile, and an emulator board with the
    firmware's limits: a full row of 512 devices at g_max read at v_read is its declared limit."""
    from tests.fw_reference_board import LIM, FirmwareBoard

    fw = FirmwareBoard().start()
    try:
        with open_device(fw.uri) as dev:
            dev.configure(_topology(1, 512))
            board = _board(LIM["max_line_current_a"])
            board.configure(_topology(1, 512))
            yield dev, board
    finally:
        fw.stop()


near_g_max = st.lists(st.integers(-4, 4), min_size=512, max_size=512).map(
    lambda k: (np.float32(G_MAX) + np.array(k, np.float32) * np.spacing(np.float32(G_MAX))).astype(np.float32)
)


_STEP = np.spacing(np.float32(G_MAX))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=near_g_max)
@example(row=np.full(512, np.float32(G_MAX), np.float32))  # under: float32(1e-5) < 1e-5
@example(row=np.full(512, np.float32(G_MAX) + _STEP, np.float32))  # over by 512 steps
def test_host_emulator_board_and_reference_firmware_agree_on_a_read_row_near_the_limit(
    firmware: tuple[Device, Board], row: np.ndarray
) -> None:
    """A program of a 1 x 512 tile whose row, read at v_read, carries about the declared limit
    (devices a few float32 steps around g_max): the host's check, the emulator board's and the
    reference firmware's (through its framed server, the host check skipped) take the same
    decision, and the firmware refuses with -222 exactly when the row is over the limit."""
    dev, board = firmware
    limits = dev.info.limits
    g = row.reshape(1, 512)
    low = np.full((1, 512), np.float32(limits.g_min), np.float32)
    current = V_READ * float(g.astype(np.float64).sum())
    over = current > limits.max_line_current_a

    def refused(fn: Callable[[], object]) -> bool:
        try:
            fn()
        except LimitViolation:
            return True
        return False

    host = refused(lambda: checks.check_program_lines(limits, "W", g, low))
    gt, lt = torch.from_numpy(g), torch.from_numpy(low)
    on_board = refused(lambda: board.program("W", gt, lt, verify=True, tol=None, max_iters=None))
    before = dev.safety().refused
    request = pl.program_request("W", g, low, False, None, 10)
    on_fw = refused(lambda: dev.send_unchecked(Op.PROGRAM, request))  # type: ignore[attr-defined]
    assert host == on_board == on_fw == over
    assert dev.safety().refused == before + int(over)


# ------------------------------------------------ the board checks what its DACs drive


@pytest.fixture(scope="module")
def rram_board() -> Board:
    b = Board(get_preset("rram"), seed=0)  # DACs with per-channel gain errors up to 1.5 %, 8 bits
    b.configure(_topology(6, 5))
    return b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    x=st.lists(st.floats(0.0625, 1.0, width=32), min_size=6, max_size=6),
    g=st.lists(st.floats(2e-6, 9e-6).map(lambda v: float(np.float32(v))), min_size=60, max_size=60),
)
def test_an_mvm_the_board_runs_never_drives_a_line_past_the_limit_at_its_dacs_output(
    rram_board: Board, x: list[float], g: list[float]
) -> None:
    """The limit set to exactly the current of the request's own inputs (what the host and the
    old board computed): the board runs the mvm only if the currents with each line at the
    larger of its input and its DAC's output (gain error, rounding: what the line carries) are
    within it, else refuses it (-222, refused + 1, nothing driven). Before, it checked the
    request and drove up to 1.5 % more."""
    b = rram_board
    _set_limit(b, 1.0)
    gg = torch.tensor(g, dtype=torch.float32).reshape(2, 6, 5)
    b.program("W", gg[0], gg[1], verify=False, tol=None, max_iters=None)
    xt = torch.tensor(x, dtype=torch.float32).reshape(1, 6)
    v_read = b.preset.periphery.v_read

    def currents(inputs: torch.Tensor) -> list[float]:
        """The largest current of the driven lines, then of the sensed lines (the board's order)."""
        volts = inputs.abs().amax(0).double() * v_read
        return [float(c.max()) for c in b.line_currents("W", volts, False)]

    xd = b.dac_convert(xt, 0, signed=True)
    asked = max(currents(xt))
    lines = currents(torch.maximum(xt.abs(), xd.abs()))  # each line at the larger of the two
    driven = max(lines)
    _set_limit(b, asked)
    refused, calls = b.safety.refused, b.mvm_calls
    if driven <= asked:
        b.mvm("W", xt)
        assert b.mvm_calls == calls + 1
    else:
        with pytest.raises(LimitViolation, match="as the DACs drive them") as err:
            b.mvm("W", xt)
        # the first kind of line past the limit is named (driven lines first): where both are,
        # the driven lines' current, which can be below the sensed lines' larger one
        assert err.value.value == next(c for c in lines if c > asked)
        assert (b.safety.refused, b.mvm_calls) == (refused + 1, calls)
    assert b.safety.violations == 0


def test_a_settle_bounds_free_nodes_by_what_an_unquantised_dac_with_gain_errors_drives() -> None:
    """A free node is written back through its DAC: an 8-bit one saturates at the state range,
    an unquantised one with gain errors only at its rails (clamp_max). With 20 % gain error a
    node at state 1.0 drives 1.25 (the board's own `dac_convert`), so a settle whose lines meet
    the limit with free nodes at 1.0 would carry up to 25 % more: the board refuses it, and runs
    it once the limit covers the nodes at their rails."""
    preset = get_preset("rram")
    per = dataclasses.replace(preset.periphery, dac_bits=None, gain_error=0.2)
    b = Board(dataclasses.replace(preset, periphery=per), seed=0)
    b.configure(_topology(6, 5))
    g = torch.full((2, 6, 5), float(np.float32(9e-6)))
    b.program("W", g[0], g[1], verify=False, tol=None, max_iters=None)
    top = float(b.dac_convert(torch.ones(1, 64), 0).max())
    assert top == b.limits.clamp_max == 1.25  # what a free node at 1.0 can drive
    v, col = per.v_read, float(b.tile("W").state64(b.clock).sum(1).max())  # G+ and G- columns
    # the largest line with free nodes at 1.0: a free column driven, its 6 devices
    _set_limit(b, 1.0 * v * col)
    refused = b.safety.refused
    with pytest.raises(LimitViolation, match=r"column \d of 'W'.*settle"):
        b.settle({"a": torch.full((1, 6), 0.5)})
    assert b.safety.refused == refused + 1
    _set_limit(b, top * v * col * (1 + 1e-9))
    b.settle({"a": torch.full((1, 6), 0.5)})
    assert b.safety.violations == 0


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_settle_at_the_design_point_of_a_128_wide_tile_runs_through_the_servers(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """A board declaring 128 x 128 tiles declares the current of a full 128-device line at g_max
    and v_read (rram: 128 x 10 uS x 0.2 V). A settle of a 4 x 128 tile whose free nodes may reach
    1.0 drives each row, in the host's bound, at exactly that current: it passes, as it does on
    the in-process board. Summing the 128 equal column voltages one by one came out one rounding
    above the limit, and `hil train classifier` on such a served board stopped at its first settle
    (refusing, by a float's last bit, a request the board accepts in-process)."""
    uri = "emulator://?preset=rram&seed=0&tile_rows_max=128&tile_cols_max=128"
    servers = emulated_board(uri)
    with open_device(servers.uri(transport)) as dev:
        limits = dev.info.limits
        assert limits.max_line_current_a == 128 * limits.g_max * limits.v_read
        dev.configure(_topology(4, 128))
        x = np.ones((2, 4), np.float32)
        eq = dev.settle({"a": x})
        assert eq.states["b"].shape == (2, 128)
        assert dev.safety().refused == 0 and dev.safety().violations == 0
