"""Limit checks that a request could slip past (the safety audit of 2026-12-06): each test
drives the path that bypassed a check and asserts the refusal, its message and the board's
counters."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import numpy as np
import pytest

from drivers.base import Nudge, SafetyCounters
from drivers.errors import LimitViolation
from drivers.topology import Topology
from drivers.uri import open_device
from drivers.wire.scpi import block as scpi_block
from hil.testing import BoardServers


def test_configure_with_new_shapes_is_checked_like_a_new_network() -> None:
    """The board's same-network shortcut (the couplings object and the group sizes unchanged:
    only gain, budget or mode checked) must not take a topology whose conv maps have other
    (C, H, W) shapes: those give its conv tiles other sizes (here 2305 rows on a board of
    1024), which the shortcut neither checked against the tile limits nor allocated."""
    d = open_device("emulator://?preset=ideal")
    limits = d.info.limits
    t = Topology.convolutional((1, 16, 16), [4], pools=[1])
    d.configure(t)
    t2 = dataclasses.replace(t, shapes={"s0": (256, 1, 1), "s1": (1024, 1, 1)})
    assert t2.couplings is t.couplings and t2.groups == t.groups
    assert t2.tile_shape("W0")[0] > limits.tile_rows_max
    with pytest.raises(LimitViolation, match="tile size"):
        d.configure(t2)
    assert d.safety().refused == 1 and d.safety().violations == 0
    # a reshape within the limits configures the tiles anew: the board's tile has the new shape
    t3 = dataclasses.replace(t, shapes={"s0": (4, 8, 8), "s1": (16, 8, 8)})
    d.configure(t3)
    assert d.board.tile("W0").shape == t3.tile_shape("W0") == (37, 16)
    r, c = t3.tile_shape("W0")
    y = d.mvm("W0", np.full((1, r), 0.5, np.float32))
    assert y.shape == (1, c)
    eq = d.settle({"s0": np.full((2, 256), 0.5, np.float32)})
    assert eq.states["s1"].shape == (2, 1024)


class _Trace:
    """A trace interval whose every conversion runs the caller's code (as a custom integer
    type may): the first gives 1, and it then writes 20 V into the clamp the host checked; a
    second conversion would give a value past the board's bound."""

    def __init__(self, clamp: np.ndarray) -> None:
        self.clamp = clamp
        self.calls = 0

    def __int__(self) -> int:
        self.calls += 1
        if self.calls == 1:
            self.clamp[...] = 100.0
            return 1
        return 10**12

    def __bool__(self) -> bool:
        return True


numbers.Integral.register(_Trace)  # an integer to `as_int`, as a user's integer type would be


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_remote_settle_checks_trace_before_the_arrays_and_sends_the_checked_interval(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """A remote settle converts `trace` once, before it checks the arrays (a conversion that
    runs the caller's code cannot change an array after its check), and sends the interval it
    checked (a second conversion could send another): the host refuses the 20 V clamp itself,
    nothing reaches the board."""
    served = emulated_board("emulator://?preset=ideal&seed=0")
    with open_device(served.uris[transport]) as dev:
        dev.configure(Topology.layered([4, 3, 2]))
        x = np.full((1, 4), 0.5, np.float32)
        trace = _Trace(x)
        with pytest.raises(LimitViolation, match="read-voltage"):
            dev.settle({"s0": x}, trace=trace)
        assert trace.calls == 1
        assert served.device.safety() == SafetyCounters(refused=0, violations=0)
        assert dev.safety().refused == 1
        # and a settle traced by such an interval sends the interval checked (1), not 10**12
        x[...] = 0.5
        eq = dev.settle({"s0": x}, trace=_Trace(np.zeros(1, np.float32)))
        assert eq.trace is not None and served.device.safety().refused == 0


class _Transpose:
    """A transpose flag whose second conversion writes 20 V into the mvm input the host checked."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.calls = 0

    def __bool__(self) -> bool:
        self.calls += 1
        if self.calls == 2:
            self.x[...] = 100.0
        return False


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_remote_mvm_converts_transpose_once_before_the_input_is_checked(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    served = emulated_board("emulator://?preset=ideal&seed=0")
    with open_device(served.uris[transport]) as dev:
        dev.configure(Topology.layered([4, 3]))
        x = np.full((1, 5), 0.5, np.float32)
        flag = _Transpose(x)
        y = dev.mvm("W0", x, transpose=flag)
        assert y.shape == (1, 3) and flag.calls == 1
        assert served.device.safety() == SafetyCounters(refused=0, violations=0)


LOW_LINE_LIMIT = "emulator://?preset=ideal&seed=0&max_line_current_a=1e-5"


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_host_refuses_a_program_whose_reads_would_pass_the_line_current_limit(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """A program is read back (its write-verify reads, and the read of its report) one row at a
    time at v_read, so its targets set the row currents: ``v_read * sum_j G_ij``. The host
    knows the targets exactly and checks them as the board does, before sending: a row of 8
    devices at g_max (1e-5 S, 0.2 V: 16 uA) on a board of 10 uA is refused on the host, the
    board never sees it (its refused counter stays 0), nothing is written; the same row at
    half the current is programmed."""
    served = emulated_board(LOW_LINE_LIMIT)
    with open_device(served.uris[transport]) as dev:
        dev.configure(Topology.layered([4, 8]))
        lim = dev.info.limits
        before = dev.read_conductance("W0")
        g_hi = np.full((5, 8), lim.g_max, np.float32)
        g_lo = np.full((5, 8), lim.g_min, np.float32)
        with pytest.raises(LimitViolation, match=r"line current \(A\) of row 0 of 'W0' \(G\+ array") as err:
            dev.program("W0", g_hi, g_lo)
        assert "program lower conductances" in str(err.value)
        assert served.device.safety() == SafetyCounters(refused=0, violations=0)
        assert dev.safety().refused == 1
        after = dev.read_conductance("W0")
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        g_half = np.full((5, 8), 0.5 * lim.g_max, np.float32)  # 4 uA of G+ rows, 0.8 uA of G-: within
        dev.program("W0", g_half, g_lo)
        # the G- array is checked too
        with pytest.raises(LimitViolation, match=r"row 0 of 'W0' \(G- array"):
            dev.program("W0", g_lo, g_hi)
        assert served.device.safety() == SafetyCounters(refused=0, violations=0)


def test_in_process_program_refusal_of_read_currents_is_counted_and_writes_nothing() -> None:
    d = open_device(LOW_LINE_LIMIT)
    d.configure(Topology.layered([4, 8]))
    lim = d.info.limits
    before = d.read_conductance("W0")
    with pytest.raises(LimitViolation, match="line current"):
        d.program("W0", np.full((5, 8), lim.g_max, np.float32), np.full((5, 8), lim.g_min, np.float32))
    assert d.safety() == SafetyCounters(refused=1, violations=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, d.read_conductance("W0"), strict=True))


def _refusal(call: Callable[[], object]) -> str:
    with pytest.raises(LimitViolation) as err:
        call()
    return str(err.value)


def test_every_limit_refusal_says_what_to_do_instead() -> None:
    """A refusal names the limit, the value, the bound and the fix: the gain, w_max, settle
    steps, write-verify rounds, wait, |beta| and injected-current refusals said only the first
    three."""
    d = open_device("emulator://?preset=ideal&seed=0")
    lim = d.info.limits
    topo = Topology.layered([4, 3, 2])
    d.configure(topo)
    g = np.full((5, 3), lim.g_min, np.float32)
    x = np.full((1, 4), 0.5, np.float32)
    cases = {
        "Topology.gain": lambda: d.configure(dataclasses.replace(topo, gain=2 * lim.max_gain)),
        "scale its weights down": lambda: d.configure(Topology.layered([4, 3, 2], w_max=2 * lim.max_w_max)),
        "SettleBudget.max_steps": lambda: d.configure(
            dataclasses.replace(
                topo, budget=dataclasses.replace(topo.budget, max_steps=lim.max_settle_steps + 1)
            )
        ),
        "program max_iters": lambda: d.program("W0", g, g, max_iters=lim.max_verify_iters + 1),
        "several calls for longer": lambda: d.wait(2 * lim.max_wait_s),
        "|beta| of at most": lambda: d.settle({"s0": x}, {"s2": Nudge(2 * lim.max_beta, np.zeros((1, 2)))}),
        "scale the grad": lambda: d.settle(
            {"s0": x}, {"s2": Nudge(1.0, grad=np.full((1, 2), 2 * lim.max_drive, np.float32))}
        ),
    }
    for fix, call in cases.items():
        text = _refusal(call)
        assert fix in text, text
    assert d.safety() == SafetyCounters(refused=len(cases), violations=0)


def test_the_boards_own_pulse_refusal_says_what_to_do_instead() -> None:
    """What a raw SCPI peer past the host's checks reads from the board."""
    from drivers.wire import codes
    from emulator.server import ScpiServer
    from tests.raw_scpi import RawScpi

    d = open_device("emulator://?preset=ideal&seed=0")
    d.configure(Topology.layered([4, 3]))
    counts = np.zeros((2, 5, 3), "<i4")
    counts[0, 0, 0] = d.info.limits.max_pulses + 1
    with ScpiServer(d) as server, RawScpi(server.listen_tcp()[1]) as raw:  # type: ignore[arg-type]
        raw.send(b"TILE:PULS? 'W0'," + scpi_block(counts.tobytes()) + b"\n")
        assert raw.line() == b"#10"
        code, text = raw.error()
    assert code == codes.DATA_OUT_OF_RANGE and "split into several calls" in text, text
    assert d.safety() == SafetyCounters(refused=1, violations=0)


def test_shared_board_view_reconfigured_with_new_map_shapes_reconfigures_the_board() -> None:
    """A block that configures its network again with other (C, H, W) shapes of the same group
    sizes has other conv tiles: the shared board re-configures (its check runs on the new tile
    sizes) instead of keeping the old merged network, which the view then mistook for the new
    one (37 x 16 tiles on the host, 10 x 4 on the board, settles of the old network)."""
    from drivers.shared import SharedBoard

    shared = SharedBoard(open_device("emulator://?preset=ideal&seed=0"))
    view = shared.view("a")
    t = Topology.convolutional((1, 8, 8), [4], pools=[1])
    view.configure(t)
    lim = view.info.limits
    g = np.full(t.tile_shape("W0"), lim.g_min, np.float32)
    view.program("W0", g, g)
    t2 = dataclasses.replace(t, shapes={"s0": (4, 4, 4), "s1": (16, 4, 4)})
    view.configure(t2)
    board = shared.device.topology
    assert board is not None and board.tile_shape("a.W0") == t2.tile_shape("W0") == (37, 16)
    assert board.shapes["a.s0"] == (4, 4, 4)
    eq = view.settle({"s0": np.full((1, 64), 0.5, np.float32)})
    assert eq.states["s1"].shape == (1, 256)
    # a block configuring a second time (another view's change re-writes its targets): the
    # old targets, of the old tile size, are not kept to be written to the new tile
    other = shared.view("b")
    other.configure(Topology.layered([3, 2]))
    assert shared.device.safety() == SafetyCounters(refused=0, violations=0)
