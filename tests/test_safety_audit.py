"""Limit checks that a request could slip past (the safety audit of 2026-12-06): each test
drives the path that bypassed a check and asserts the refusal, its message and the board's
counters."""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import socket
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import checks
from drivers.base import Device, Nudge, SafetyCounters
from drivers.errors import ConfigurationError, LimitViolation
from drivers.topology import Topology
from drivers.uri import open_device
from drivers.wire import payload as pl
from drivers.wire.link import Link
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


# ---- raw peers past the host: the board's checks agree with the host's, over the real servers

_SPECIALS = (
    0.0, -0.0, 1.25, 1.2500001, 1.25000001, 5e-324, 1e-45, math.nan, math.inf, -math.inf,
    3.4028235e38, 3.5e38, 1e-6, 1e-5, 1.0000001e-5, 9.999999e-7, 2.0**31 - 1, 2.0**31, -(2.0**31),
    1000.0, 1001.0, -1000.0, -1001.0, 2.0**53 + 1, 0.5, 1.0,
)  # fmt: skip
_WIRE_DTYPES = ("<f4", "<f8", "<i4", "<i8")


def _filled(value: float, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    with np.errstate(all="ignore"):
        try:
            return np.full(shape, value, dtype=dtype)
        except (OverflowError, ValueError):
            return None


def _host_verdict(check: Callable[[], object]) -> bool:
    try:
        check()
    except (LimitViolation, ConfigurationError):
        return False
    return True


@pytest.fixture(scope="module")
def raw_framed() -> Iterator[tuple[Device, Link, itertools.count[int]]]:
    from emulator.server import FramedServer
    from hil.testing import socket_link

    dev = open_device("emulator://?preset=pcm&seed=0&pulse_endurance=100000&max_line_current_a=4e-5")
    dev.configure(Topology.layered([4, 3, 2]))
    with FramedServer(dev) as server:
        sock = socket.create_connection(("127.0.0.1", server.listen_tcp()[1]), timeout=5)
        with sock:
            yield dev, socket_link(sock, ack_timeout=1.0, retries=3), itertools.count()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    value=st.one_of(st.sampled_from(_SPECIALS), st.floats(width=64)),
    dtype=st.sampled_from(_WIRE_DTYPES),
    op=st.sampled_from(["program", "pulse", "mvm", "clamp", "init", "target", "grad"]),
)
def test_raw_framed_requests_are_refused_exactly_where_the_host_refuses(
    raw_framed: tuple[Device, Link, itertools.count[int]], value: float, dtype: str, op: str
) -> None:
    """Any value in any wire dtype, sent as a raw framed request (no host checks on the way):
    the board refuses it exactly when the host's own checks would (the host never sends what
    the board refuses, and the board takes everything the host sends), a refusal changes no
    conductance, and no violation reaches the array."""
    from drivers.wire.frames import Flag

    dev, link, rids = raw_framed
    rid = next(rids)  # each request its own id (a repeated one gets the stored outcome)
    topo, lim = dev.topology, dev.info.limits
    assert topo is not None
    half = np.full((1, 4), 0.5, np.float32)
    if op in ("program", "pulse"):
        a = _filled(value, dtype, (5, 3))
        if a is None:
            return
        other = np.full((5, 3), lim.g_min if op == "program" else 0, a.dtype)
        names = ("g_plus", "g_minus") if op == "program" else ("counts_plus", "counts_minus")
        msg = pl.Message({"tile": "W0", "rid": rid}, dict(zip(names, (a, other), strict=True)))
        if op == "program":
            msg.meta.update({"verify": False, "tol": None, "max_iters": 1})
            ok = _host_verdict(lambda: checks.check_program(topo, lim, "W0", a, other))
        else:
            ok = _host_verdict(lambda: checks.check_pulse(topo, lim, "W0", a, other))
        opcode = pl.Op.PROGRAM if op == "program" else pl.Op.PULSE
    elif op == "mvm":
        a = _filled(value, dtype, (2, 5))
        if a is None:
            return
        msg = pl.Message({"tile": "W0", "transpose": False}, {"x": a})
        ok = _host_verdict(lambda: checks.check_mvm(topo, lim, "W0", a, False, True))
        opcode = pl.Op.MVM
    else:
        a = _filled(value, dtype, (1, 4 if op == "clamp" else 3))
        if a is None:
            return
        clamp = {"s0": a if op == "clamp" else half}
        nudge = {"s1": Nudge(0.5, a if op == "target" else None, a if op == "grad" else None)}
        nudge = nudge if op in ("target", "grad") else {}
        init = {"s1": a} if op == "init" else {}
        msg = pl.settle_request(clamp, nudge, init, False)

        def host() -> None:
            cl, _, ini, _ = checks.check_settle(topo, lim, clamp, nudge, init)
            checks.check_settle_lines(topo, lim, cl, ini)

        ok = _host_verdict(host)
        opcode = pl.Op.SETTLE
    board = dev.board  # type: ignore[attr-defined]
    clock, before = board.clock, board.tile("W0").state64(board.clock).clone()
    seq = link.send(int(opcode), pl.pack(msg))
    got = link.receive(5.0, response=True, ref=seq)
    assert got is not None
    first, body = got
    refused = bool(first.flags & Flag.ERROR)
    assert refused != ok, (op, value, dtype, pl.loads(body) if refused else "accepted")
    if refused:  # nothing changed: not the devices, not the board's clock
        assert board.clock == clock and torch.equal(board.tile("W0").state64(clock), before)
    assert dev.safety().violations == 0


@pytest.fixture(scope="module")
def raw_scpi() -> Iterator[tuple[Device, Any]]:
    from emulator.server import ScpiServer
    from tests.raw_scpi import RawScpi

    dev = open_device("emulator://?preset=pcm&seed=0&pulse_endurance=100000&max_line_current_a=4e-5")
    dev.configure(Topology.layered([4, 3, 2]))
    with ScpiServer(dev) as server, RawScpi(server.listen_tcp()[1]) as raw:  # type: ignore[arg-type]
        yield dev, raw


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    value=st.one_of(st.sampled_from(_SPECIALS), st.floats(width=64)),
    op=st.sampled_from(["program", "pulse", "mvm"]),
    tol=st.sampled_from(["DEF", "0", "1e-7", "-1e-9", "nan", "inf", "9.9E37", "1e309"]),
    iters=st.sampled_from(["1", "20", "1000", "1001", "0", "-1", "2.5", "1e3", "9223372036854775808"]),
)
def test_raw_scpi_requests_are_refused_exactly_where_the_host_refuses(
    raw_scpi: tuple[Device, Any], value: float, op: str, tol: str, iters: str
) -> None:
    """The same over SCPI, whose blocks are little-endian f4 (program, mvm) and i4 (pulse), with
    the program's tolerance and iteration budget as text a host could send."""
    dev, raw = raw_scpi
    topo, lim = dev.topology, dev.info.limits
    assert topo is not None
    board = dev.board  # type: ignore[attr-defined]
    clock, before = board.clock, board.tile("W0").state64(board.clock).clone()
    if op == "program":
        a = _filled(value, "<f4", (2, 5, 3))
        if a is None:
            return
        a[1] = lim.g_min
        line = f"TILE:PROG? 'W0',0,{tol},{iters},".encode() + scpi_block(a.tobytes())

        def host() -> None:
            checks.check_program(topo, lim, "W0", a[0], a[1])
            t = None if tol == "DEF" else float(tol)
            n = float(iters)  # SCPI's integers: any decimal form of a whole number (1e3 is 1000)
            checks.check_verify(
                lim, t, int(iters) if iters.lstrip("-").isdigit() else int(n) if n.is_integer() else n
            )

        ok = _host_verdict(host) and tol not in ("nan", "inf", "1e309") and iters != "9223372036854775808"
    elif op == "pulse":
        a = _filled(value, "<i4", (2, 5, 3))
        if a is None or float(a.flat[0]) != value:  # the i4 block holds whole counts only
            return
        a[1] = 0
        line = b"TILE:PULS? 'W0'," + scpi_block(a.tobytes())
        ok = _host_verdict(lambda: checks.check_pulse(topo, lim, "W0", a[0], a[1]))
    else:
        a = _filled(value, "<f4", (2, 5))
        if a is None:
            return
        line = b"TILE:MVM? 'W0',0," + scpi_block(a.tobytes())
        ok = _host_verdict(lambda: checks.check_mvm(topo, lim, "W0", a, False, True))
    raw.send(line + b"\n")
    reply = raw.line()
    code, text = raw.error()
    refused = code != 0
    assert refused != ok, (op, value, tol, iters, code, text, reply[:40])
    assert raw.error()[0] == 0
    if refused:
        assert reply == b"#10"
        assert board.clock == clock and torch.equal(board.tile("W0").state64(clock), before)
    assert dev.safety().violations == 0


@pytest.mark.parametrize(
    ("make", "field", "value"),
    [
        ("session", "reads", 10**9),
        ("session", "reads", 1),
        ("session", "stuck_reads", 10**9),
        ("session", "pulse_chunks", 10**9),
        ("session", "reads", 64.0),
        ("converter", "levels", 10**12),
        ("converter", "samples", 10**12),
        ("converter", "reads", 10**9),
        ("converter", "level_reads", 10**9),
        ("converter", "repeats", 0),
        ("converter", "steps", True),
    ],
)
def test_every_count_of_a_calibration_session_is_bounded(make: str, field: str, value: object) -> None:
    """Through the Python API, the counts that set a calibration session's work (reads, sweep
    chunks, levels, samples, repeats, steps; `levels` also the writes of the state-ADC routine's
    reference pairs) are refused past their bound with one naming the option and the range:
    levels=10**12 went on to allocate (levels, channels) arrays and loop over them."""
    from calibration.converters import ConverterOptions
    from calibration.record import CalibrationError
    from calibration.session import SessionOptions

    cls = SessionOptions if make == "session" else ConverterOptions
    with pytest.raises(CalibrationError, match=rf"{cls.__name__}\.{field} is .*: give a whole number from"):
        cls(**{field: value})  # type: ignore[arg-type]
    cls()  # the defaults are within


def _long_budget(topo: Topology) -> Topology:
    from drivers.topology import SettleBudget

    return dataclasses.replace(topo, budget=SettleBudget(max_steps=100_000, tol=1e-3))


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_trace_past_what_one_reply_holds_is_refused_on_the_host_and_on_the_board(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """A traced settle's worst case (max_steps // k + 2 records of batch x (free nodes + 1)
    values) is bounded like its states (MAX_SETTLE_VALUES, what one reply carries): every step
    of 100 000 at batch 1024 of a 4-3-2 network is 614 million values (2.5 GB the board would
    keep). The host refuses it before sending; a raw peer that sends it is refused by the board
    before it settles; every 20th step fits and runs."""
    served = emulated_board("emulator://?preset=ideal&seed=0")
    topo = _long_budget(Topology.layered([4, 3, 2]))
    x = np.full((1024, 4), 0.5, np.float32)
    with open_device(served.uris[transport]) as dev:
        dev.configure(topo)
        with pytest.raises(LimitViolation, match=r"values in one settle's trace .*trace every k > 1 steps"):
            dev.settle({"s0": x}, trace=True)
        assert served.device.safety() == SafetyCounters(refused=0, violations=0)
        assert dev.safety().refused == 1
        eq = dev.settle({"s0": x[:4]}, trace=20)  # 5002 records of 4 x 6 values
        assert eq.trace is not None
    board = served.device
    clock = board.board.clock  # type: ignore[attr-defined]
    with pytest.raises(LimitViolation, match="values in one settle's trace"):
        board.settle({"s0": x}, trace=1)  # the board's own check (a peer past the host)
    assert board.safety() == SafetyCounters(refused=1, violations=0)
    assert board.board.clock == clock  # type: ignore[attr-defined]  # nothing ran


def test_the_host_iterated_settle_bounds_its_trace_alike() -> None:
    """An MVM-only board's settle runs on the host (`hil.host_settle`), which keeps the trace
    itself: its record is bounded as a board's (nothing is asked of the board)."""
    from hil.host_settle import HostSettle

    dev = open_device("emulator://?preset=ideal&seed=0&capabilities=mvm")
    dev.configure(_long_budget(Topology.layered([4, 3, 2])))
    host = HostSettle(dev)
    before = dev.meter()
    with pytest.raises(LimitViolation, match="values in one settle's trace"):
        host({"s0": np.full((1024, 4), 0.5, np.float32)}, trace=1)
    assert dev.meter() == before  # no mvm was run


def test_conformance_probes_of_the_boards_own_checks_send_the_least_excess(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """`hil conformance` runs on boards in bring-up, whose own limit checks are what it tests: a
    probe past a limit is what such a board takes if its check is missing. It sent 2 x clamp_max
    on every input line (0.5 V against 0.25 V) and 4 x g_max to every device of the tile; now
    one float32 step past the limit on one line or device, every other at 0 or g_min (the
    board still refuses it: its check must catch the least excess)."""
    from types import SimpleNamespace

    from hil.conformance import framed

    served = emulated_board("emulator://?preset=ideal&seed=0")
    got: list[pl.Message] = []
    with open_device(served.uris["serial-socket"]) as dev:
        topo = Topology.layered([4, 3])
        dev.configure(topo)
        lim = dev.info.limits

        def send(op: pl.Op, request: pl.Message) -> pl.Message:
            got.append(request)
            return dev.send_unchecked(op, request)  # type: ignore[attr-defined]

        sess = SimpleNamespace(
            lim=lim,
            topo=topo,
            counted_refusal=lambda sent, value, attempt, what=None: attempt(),
            tile_within_window=lambda tile: "",
        )
        framed._board_limit(sess, [], send, "W0", 5)  # type: ignore[arg-type]
        framed._board_conductance_limit(sess, [], send, "W0")  # type: ignore[arg-type]
    x = got[0].arrays["x"]
    step = float(np.nextafter(np.float32(lim.clamp_max), np.float32(np.inf)))
    assert float(x.max()) == step and np.count_nonzero(x) == 1
    gp, gm = got[1].arrays["g_plus"], got[1].arrays["g_minus"]
    top = checks.conductance_window(lim)[1]
    assert float(gp.max()) == float(np.nextafter(np.float32(top), np.float32(np.inf)))
    assert np.count_nonzero(gp > lim.g_min) == 1 and float(gm.max()) == np.float32(lim.g_min)
    assert served.device.safety() == SafetyCounters(refused=2, violations=0)


def test_conformance_fails_a_firmware_whose_target_check_has_slack() -> None:
    """The reference firmware (tests/fw_reference_board.py) checked program targets with a
    0.1 % slack, against docs/protocol.md's window (4 float32 steps of each end): the probe of
    4 x g_max passed it. The probe one step past the window fails such a firmware."""
    from tests.test_conformance_firmware import _conformance

    report = _conformance("slack")
    failed = {c.operation: c for c in report.checks if c.status == "FAIL"}
    assert set(failed) == {"unchecked board conductance limit"}, [c.line() for c in failed.values()]
    assert "the board ran PROGRAM; expected LimitViolation" in failed["unchecked board conductance limit"].got
