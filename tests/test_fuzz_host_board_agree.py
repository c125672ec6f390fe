"""Host and board agree on accept/refuse for any float32 in a program target, an mvm input or a
settle clamp, through the emulator's real servers: SCPI over TCP (pyvisa-py) and framed over a
socket. The host's decision is the checks its driver runs before sending (`drivers.checks`, as
`drivers.wire.client` calls them); the board's is its answer to the same arrays sent unchecked
(`send_unchecked`), in float32 as the wire carries them. Values: every float32 (subnormals,
-0.0, inf, NaN) and the float32 neighbours of each limit (the conductance window's ends and their
4-step slack, +-clamp_max, the DAC's range, 0). pcm has g_min = 0 (a negative subnormal target
must be refused on both sides, -0.0 accepted on both); rram has g_min > 0; the reference firmware
(tests/fw_reference_board.py, framed, mvm only) checks with code of its own. A NaN or infinite
target is ConfigurationError on the host and -222 on that firmware: both refuse, which is what
is compared."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from drivers import checks, open_device
from drivers.base import Device, Limits
from drivers.errors import DeviceError
from drivers.topology import Topology
from drivers.wire import payload as pl
from drivers.wire.payload import Op
from emulator.server.launch import serve
from tests.fw_reference_board import FirmwareBoard

TOPO = Topology.layered([3, 2])  # W0: 4 x 2 (s0 and the bias), clamps of s0: 3 wide
TRANSPORTS = ("serial-socket", "visa-tcp")


def _neighbours(edge: float, steps: int = 6) -> list[float]:
    """`edge` as float32 and its float32 neighbours up to `steps` either side."""
    out, lo, hi = [], np.float32(edge), np.float32(edge)
    out.append(float(lo))
    for _ in range(steps):
        lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
        out += [float(lo), float(hi)]
    return out


def _values(edges: list[float]) -> st.SearchStrategy[float]:
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    fixed = [0.0, -0.0, tiny, -tiny, float("inf"), float("-inf"), float("nan")]
    near = sorted({v for e in edges for v in _neighbours(e)} | set(fixed[:4]), key=float)
    return st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
        st.sampled_from(near + fixed[4:]),
    )


# every board on every transport it is served over: the emulator's presets on both, the
# reference firmware framed only
BOARDS = [(preset, t) for preset in ("pcm", "rram") for t in TRANSPORTS] + [
    ("reference firmware", "serial-socket")
]


@pytest.fixture(scope="module", params=BOARDS, ids=[f"{b}-{t}" for b, t in BOARDS])
def board(request: pytest.FixtureRequest) -> Iterator[Device]:
    """A host on the board over one transport: the emulator's servers (no lock: one host), or
    the independent reference firmware of tests/fw_reference_board.py (framed only, mvm only),
    whose checks share no code with the host's."""
    name, transport = request.param
    with contextlib.ExitStack() as stack:
        if name == "reference firmware":
            fw = FirmwareBoard().start()
            stack.callback(fw.stop)
            uri = fw.uri
        else:
            s = serve(f"emulator://?preset={name}&seed=0", scpi_pty=False, framed_pty=False, lock=False)
            stack.callback(s.close)
            uri = s.uris[transport]
        dev = stack.enter_context(open_device(uri))
        dev.configure(TOPO)
        yield dev


def _device(board: Device, capability: str) -> Device:
    if capability not in board.info.capabilities:
        pytest.skip(f"this board does not declare {capability!r}")
    return board


def _decides(call: object) -> str:
    """'accept', or the refusal's type (any `DeviceError`)."""
    try:
        call()  # type: ignore[operator]
    except DeviceError as exc:
        return type(exc).__name__
    return "accept"


def _agree(dev: Device, host: object, op: Op, request: pl.Message, value: float) -> None:
    on_host = _decides(host)
    on_board = _decides(lambda: dev.send_unchecked(op, request))  # type: ignore[attr-defined]
    event(f"{op.name}: host {on_host}, board {on_board}")  # both outcomes must be reached
    assert (on_host == "accept") == (on_board == "accept"), (op.name, value, on_host, on_board)
    assert dev.safety().violations == 0


def _lim(dev: Device) -> Limits:
    return dev.info.limits


SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(data=st.data(), pos=st.integers(0, 7))
def test_program_targets(board: Device, data: st.DataObject, pos: int) -> None:
    dev = _device(board, "mvm")
    lim = _lim(dev)
    low, high = checks.conductance_window(lim)
    value = data.draw(_values([lim.g_min, lim.g_max, low, high]))
    mid = np.float32(lim.g_min + 0.5 * (lim.g_max - lim.g_min))
    gp, gm = np.full((4, 2), mid, np.float32), np.full((4, 2), mid, np.float32)
    gp.flat[pos] = np.float32(value)
    _agree(
        dev,
        lambda: checks.check_program(TOPO, lim, "W0", gp, gm),
        Op.PROGRAM,
        pl.program_request("W0", gp, gm, False, None, 1),
        value,
    )


@SETTINGS
@given(data=st.data(), pos=st.integers(0, 3))
def test_mvm_inputs(board: Device, data: st.DataObject, pos: int) -> None:
    dev = _device(board, "mvm")
    lim = _lim(dev)
    value = data.draw(_values([lim.clamp_max, -lim.clamp_max, *lim.dac_range]))
    x = np.full((1, 4), 0.5, np.float32)
    x[0, pos] = np.float32(value)
    _agree(
        dev,
        lambda: checks.check_mvm(TOPO, lim, "W0", x, False, lines=True),
        Op.MVM,
        pl.mvm_request("W0", x, False),
        value,
    )


@SETTINGS
@given(data=st.data(), pos=st.integers(0, 2))
def test_settle_clamps(board: Device, data: st.DataObject, pos: int) -> None:
    dev = _device(board, "settle")
    lim = _lim(dev)
    value = data.draw(_values([lim.clamp_max, -lim.clamp_max, *lim.dac_range]))
    x = np.full((1, 3), 0.5, np.float32)
    x[0, pos] = np.float32(value)

    def host() -> None:
        clamp, _, init, _ = checks.check_settle(TOPO, lim, {"s0": x}, None, None)
        checks.check_settle_lines(TOPO, lim, clamp, init)

    _agree(dev, host, Op.SETTLE, pl.settle_request({"s0": x}, {}, {}, False), value)
