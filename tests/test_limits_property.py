"""Property tests of the limit checks (issue 16, classes 1-3): over integers of every numpy
width and Python integers beyond 64 bits, floats with NaN, infinities, subnormals and huge
values, and wrong types, every host-side check and its board-side counterpart (EmulatedDevice
and Board called directly) either refuses with the project's errors or accepts a value
within the declared range; the board's `violations` counter stays 0.

Each oracle below states the rule on its own (not by calling the check it tests)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import checks
from drivers.base import Nudge
from drivers.emulated import EmulatedDevice
from drivers.errors import ConfigurationError, DeviceError, LimitViolation, ProtocolError
from drivers.topology import MAX_NODES, Coupling, SettleBudget, Topology
from drivers.wire import payload as pl
from drivers.wire.payload import Message, Op
from emulator.board import Board
from emulator.presets import get_preset
from emulator.server import dispatch

# a check that overflows on its way (a cast warning) has looked at the value in the wrong width
pytestmark = pytest.mark.filterwarnings("error")

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**31, 2**32 + 3, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, 10**30]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, 5e-324, -5e-324, 1e300, -1e300, 2.0**31, -(2.0**31), 0.5]


def _fits(dtype: type, v: int) -> bool:
    info = np.iinfo(dtype)
    return info.min <= v <= info.max


@st.composite
def integers(draw: st.DrawFn) -> object:
    """A Python int (up to 2^70 and the edges), or the same value as a numpy integer of a
    width that holds it."""
    v = draw(st.one_of(st.integers(-(2**70), 2**70), st.integers(-2000, 2000), st.sampled_from(INT_EDGES)))
    dtype = draw(st.sampled_from([None, *INT_DTYPES]))
    return dtype(v) if dtype is not None and _fits(dtype, v) else v


@st.composite
def floats(draw: st.DrawFn) -> object:
    v = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(FLOAT_EDGES)))
    dtype = draw(st.sampled_from([None, *FLOAT_DTYPES]))
    if dtype is None:
        return v
    with np.errstate(over="ignore"):
        return dtype(v)


WRONG = st.one_of(
    st.booleans(),
    st.sampled_from([np.bool_(True), np.bool_(False), None, object(), "5", "nan", b"1", 1j, complex(3, 0)]),
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.complex_numbers(allow_nan=True),
)
SCALARS = st.one_of(integers(), floats(), WRONG)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _real(v: object) -> float | None:
    """The value as a finite float64 if it is a finite real number (no bool), else None."""
    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _outcome(fn: Any) -> tuple[bool, object]:
    """(accepted, result); a refusal must be one of the project's errors."""
    try:
        return True, fn()
    except DeviceError as exc:
        return False, exc


def _board() -> Board:
    return Board(get_preset("ideal"), seed=0)


TOPO = Topology.layered([3, 2])
SHAPE = TOPO.tile_shape("W0")  # (4, 2): three inputs and the bias row


@pytest.fixture(scope="module")
def dev() -> EmulatedDevice:
    d = EmulatedDevice(_board())
    d.configure(TOPO)
    return d


def _clean(dev: EmulatedDevice) -> None:
    assert dev.board.safety.violations == 0
    dev.configure(TOPO)


# ---- class 1: integer width and overflow ----------------------------------------------------


def _counts_array(value: object, pos: int) -> np.ndarray:
    """Zeros of the tile's shape in the value's own dtype, with `value` at one position."""
    arr = np.asarray(value)
    if arr.dtype.kind == "O" or arr.ndim:
        out = np.zeros(SHAPE, dtype=object)
    else:
        out = np.zeros(SHAPE, dtype=arr.dtype)
    out.flat[pos] = value
    return out


COUNTS = st.one_of(
    integers(),
    floats(),
    st.sampled_from([True, 1j, "3", None]),
)


@SETTINGS
@given(value=COUNTS, pos=st.integers(0, SHAPE[0] * SHAPE[1] - 1), minus=st.booleans())
def test_pulse_counts_host_and_board(dev: EmulatedDevice, value: object, pos: int, minus: bool) -> None:
    lim = dev.info.limits
    counts = _counts_array(value, pos)
    zeros = np.zeros(SHAPE, np.int32)
    args = (zeros, counts) if minus else (counts, zeros)
    want = _is_int(value) or (_real(value) is not None and float(value) == math.floor(float(value)))  # type: ignore[arg-type]
    if want:
        want = abs(int(value) if _is_int(value) else float(value)) <= lim.max_pulses  # type: ignore[arg-type]
    want = want and counts.dtype.kind in "iuf"
    ok, res = _outcome(lambda: checks.check_pulse(TOPO, lim, "W0", *args))
    assert ok == want, (value, counts.dtype, res)
    if ok:
        cp, cm = res  # type: ignore[misc]
        assert cp.dtype == np.int32 and cm.dtype == np.int32
        assert np.array_equal((cm if minus else cp).astype(np.float64), counts.astype(np.float64))
    ok_dev, res_dev = _outcome(lambda: dev.pulse("W0", *args))
    assert ok_dev == want, (value, res_dev)
    # the board on its own, with the tensor as it would arrive (torch has no wide unsigned ops)
    if counts.dtype.kind in "iuf" and counts.dtype not in (np.uint16, np.uint32, np.uint64):
        t = torch.from_numpy(np.ascontiguousarray(counts))
        z = torch.zeros(SHAPE, dtype=torch.int32)
        ok_b, res_b = _outcome(lambda: dev.board.pulse("W0", *((z, t) if minus else (t, z))))
        assert ok_b == want, (value, res_b)
    _clean(dev)


@SETTINGS
@given(
    value=st.one_of(st.integers(-2, 100), st.integers(99_990, 100_010), integers(), floats(), WRONG),
    field=st.sampled_from(["max_steps", "check_every"]),
)
def test_budget_integers(dev: EmulatedDevice, value: object, field: str) -> None:
    lim = dev.info.limits
    budget = SettleBudget(**{field: value})  # type: ignore[arg-type]
    want = _is_int(value) and 1 <= int(value) <= lim.max_settle_steps  # type: ignore[call-overload]
    ok, res = _outcome(lambda: checks.check_budget(budget, lim))
    assert ok == want, (field, value, res)
    topo = Topology.layered([3, 2], budget=budget)
    ok_b, res_b = _outcome(lambda: dev.board.configure(topo))
    assert ok_b == want, (field, value, res_b)
    _clean(dev)


def test_numpy_group_sizes_do_not_wrap_around() -> None:
    """Found by `test_group_sizes`: two int32 sizes summed in int32 wrapped around (with an
    overflow warning) instead of being refused; the topology keeps its sizes as Python ints,
    so the sums and products of the checks cannot wrap."""
    with pytest.raises(ConfigurationError, match="nodes of the topology"):
        Topology({"a": np.int32(2), "b": np.int32(2**31 - 2)}, (Coupling("W", ("a",), ("b",)),))
    topo = Topology({"a": np.int32(3), "b": np.int64(4)}, (Coupling("W", ("a",), ("b",)),))
    assert [type(n) for n in topo.groups.values()] == [int, int]


@SETTINGS
@given(value=st.one_of(st.integers(-2, 1030), st.integers(MAX_NODES - 4, MAX_NODES + 2), SCALARS))
def test_group_sizes(dev: EmulatedDevice, value: object) -> None:
    lim = dev.info.limits
    # a group's size in int32, and the topology's nodes (2 + value) within MAX_NODES
    want = _is_int(value) and 1 <= int(value) <= 2**31 - 1 and 2 + int(value) <= MAX_NODES  # type: ignore[call-overload]
    ok, res = _outcome(lambda: Topology({"a": 2, "b": value}, (Coupling("W", ("a",), ("b",)),)))  # type: ignore[dict-item]
    assert ok == want, (value, res)
    if ok:
        topo = res
        fits = int(value) <= lim.tile_cols_max  # type: ignore[call-overload]
        ok_h, _ = _outcome(lambda: checks.check_topology(topo, lim))  # type: ignore[arg-type]
        assert ok_h == fits
        ok_b, _ = _outcome(lambda: dev.board.configure(topo))  # type: ignore[arg-type]
        assert ok_b <= fits
    _clean(dev)


@SETTINGS
@given(value=st.one_of(st.integers(-2, 5), st.integers(99_990, 100_010), SCALARS))
def test_trace_interval(dev: EmulatedDevice, value: object) -> None:
    lim = dev.info.limits
    want = isinstance(value, bool) or (_is_int(value) and 0 <= int(value) <= lim.max_settle_steps)  # type: ignore[call-overload]
    ok, res = _outcome(lambda: checks.check_trace(lim, value))
    assert ok == want, (value, res)
    x = np.full((1, 3), 0.5, np.float32)
    ok_d, res_d = _outcome(lambda: dev.settle({"s0": x}, trace=value))  # type: ignore[arg-type]
    assert ok_d == want, (value, res_d)
    _clean(dev)


LAYOUT_DIMS = st.one_of(integers(), floats(), WRONG)


@SETTINGS
@given(
    shape=st.lists(LAYOUT_DIMS, max_size=10),
    code=st.sampled_from(["f4", "i4", "i8", "f8", "u8", "b1", 3]),
    data=st.binary(max_size=64),
)
def test_wire_layout_from_a_peer(shape: list[object], code: object, data: bytes) -> None:
    """A peer's layout never makes the decoder allocate or crash: ProtocolError or arrays
    that lie in the bytes sent."""
    spec = [["x", code, [int(d) if isinstance(d, np.integer) else d for d in shape]]]
    try:
        out = pl.unpack_arrays(spec, data)
    except ProtocolError:
        return
    assert out["x"].nbytes == len(data)
    assert all(isinstance(d, int) and 0 <= d < 2**31 for d in spec[0][2])


# ---- class 2: unbounded work per request ----------------------------------------------------


@SETTINGS
@given(
    tol=st.one_of(st.none(), st.floats(0, 1e-5), SCALARS),
    max_iters=st.one_of(st.integers(-2, 1100), SCALARS),
)
def test_program_tol_and_iterations(dev: EmulatedDevice, tol: object, max_iters: object) -> None:
    lim = dev.info.limits
    want_tol = tol is None or ((f := _real(tol)) is not None and f >= 0)
    # None: the default budget, min(20, max_verify_iters)
    want_iters = max_iters is None or (
        _is_int(max_iters) and 1 <= int(max_iters) <= lim.max_verify_iters  # type: ignore[call-overload]
    )
    want = want_tol and want_iters
    ok, res = _outcome(lambda: checks.check_verify(lim, tol, max_iters))
    assert ok == want, (tol, max_iters, res)
    g = np.full(SHAPE, 0.5 * (lim.g_min + lim.g_max), np.float32)
    ok_d, res_d = _outcome(lambda: dev.program("W0", g, g, tol=tol, max_iters=max_iters))  # type: ignore[arg-type]
    assert ok_d == want, (tol, max_iters, res_d)
    gt = torch.from_numpy(g)
    ok_b, res_b = _outcome(
        lambda: dev.board.program("W0", gt, gt, verify=False, tol=tol, max_iters=max_iters)  # type: ignore[arg-type]
    )
    assert ok_b == want, (tol, max_iters, res_b)
    # and through the servers' dispatch, as a peer's JSON would carry them
    if isinstance(tol, float | int | type(None)) and isinstance(max_iters, float | int):
        request = Message({"tile": "W0", "tol": tol, "max_iters": max_iters}, {"g_plus": g, "g_minus": g})
        ok_w, res_w = _outcome(lambda: dispatch.execute(dev, Op.PROGRAM, request))
        assert ok_w == want, (tol, max_iters, res_w)
    _clean(dev)


@SETTINGS
@given(seconds=st.one_of(st.floats(-1, 1e10), SCALARS))
def test_wait(dev: EmulatedDevice, seconds: object) -> None:
    lim = dev.info.limits
    f = _real(seconds)
    want = f is not None and 0 <= f <= lim.max_wait_s
    ok, res = _outcome(lambda: checks.check_wait(lim, seconds))
    assert ok == want, (seconds, res)
    before = dev.board.clock
    ok_d, res_d = _outcome(lambda: dev.wait(seconds))  # type: ignore[arg-type]
    assert ok_d == want, (seconds, res_d)
    assert dev.board.clock - before == (f if ok_d else 0.0)
    board = dev.board
    ok_b, _ = _outcome(lambda: board.wait(seconds))  # type: ignore[arg-type]
    assert ok_b == want
    if isinstance(seconds, float | int) and not isinstance(seconds, bool):
        ok_w, _ = _outcome(lambda: dispatch.execute(dev, Op.WAIT, Message({"seconds": seconds})))
        assert ok_w == want
    dev.board.clock = 0.0
    _clean(dev)


@SETTINGS
@given(
    value=st.one_of(st.floats(-0.5, 1.5), floats(), integers(), WRONG), field=st.sampled_from(["tol", "dt"])
)
def test_budget_floats(dev: EmulatedDevice, value: object, field: str) -> None:
    lim = dev.info.limits
    f = _real(value)
    want = f is not None and (f >= 0 if field == "tol" else 0 < f <= 1)
    budget = SettleBudget(**{field: value})  # type: ignore[arg-type]
    ok, res = _outcome(lambda: checks.check_budget(budget, lim))
    assert ok == want, (field, value, res)
    ok_b, res_b = _outcome(lambda: dev.board.configure(Topology.layered([3, 2], budget=budget)))
    assert ok_b == want, (field, value, res_b)
    _clean(dev)


# ---- class 3: non-finite and absurd floats ---------------------------------------------------


@SETTINGS
@given(value=st.one_of(st.floats(-1, 2e4), SCALARS), which=st.sampled_from(["gain", "w_max"]))
def test_gain_and_w_max(dev: EmulatedDevice, value: object, which: str) -> None:
    lim = dev.info.limits
    f = _real(value)
    bound = lim.max_gain if which == "gain" else lim.max_w_max
    ok_t, res_t = _outcome(lambda: Topology.layered([3, 2], **{which: value}))  # type: ignore[arg-type]
    assert ok_t == (f is not None and f > 0), (which, value, res_t)
    if ok_t:
        topo = res_t
        want = f <= bound  # type: ignore[operator]
        ok, res = _outcome(lambda: checks.check_topology(topo, lim))  # type: ignore[arg-type]
        assert ok == want, (which, value, res)
        if not ok:
            assert isinstance(res, LimitViolation)
        ok_b, res_b = _outcome(lambda: dev.board.configure(topo))  # type: ignore[arg-type]
        assert ok_b == want, (which, value, res_b)
        if ok_b and which == "gain":
            # the same network with another gain: the board's short path checks it too
            ok_s, _ = _outcome(lambda: dev.board.configure(Topology.layered([3, 2], gain=2 * bound)))
            assert not ok_s
    _clean(dev)


@SETTINGS
@given(beta=st.one_of(st.floats(-150, 150), SCALARS))
def test_nudge_beta(dev: EmulatedDevice, beta: object) -> None:
    lim = dev.info.limits
    f = _real(beta)
    want = f is not None and abs(f) <= lim.max_beta
    x = np.full((2, 3), 0.5, np.float32)
    target = np.zeros((2, 2), np.float32)
    nudge = {"s1": Nudge(beta, target=target)}  # type: ignore[arg-type]
    ok, res = _outcome(lambda: checks.check_settle(TOPO, lim, {"s0": x}, nudge, None))
    assert ok == want, (beta, res)
    ok_d, res_d = _outcome(lambda: dev.settle({"s0": x}, nudge))
    assert ok_d == want, (beta, res_d)
    if ok_d:
        assert all(np.isfinite(v).all() for v in res_d.states.values())  # type: ignore[attr-defined]
    _clean(dev)


def test_the_named_instances(dev: EmulatedDevice) -> None:
    """The issue's own cases: -2^31 in int32 (whose abs stays negative), an int64 count past
    32 bits that int32 would truncate to 3, and an infinite gain."""
    zeros = np.zeros(SHAPE, np.int32)
    edge = zeros.copy()
    edge[0, 0] = -(2**31)
    wide = np.zeros(SHAPE, np.int64)
    wide[0, 0] = 2**32 + 3
    for counts in (edge, wide):
        with pytest.raises(LimitViolation):
            dev.pulse("W0", counts, zeros)
    with pytest.raises(LimitViolation):
        dev.board.pulse("W0", torch.from_numpy(edge), torch.from_numpy(zeros))
    with pytest.raises(DeviceError):
        dev.configure(Topology.layered([3, 2], gain=math.inf))
    assert dev.safety().violations == 0


@SETTINGS
@given(
    field=st.sampled_from(["max_pulses", "max_verify_iters", "max_wait_s", "max_gain", "adc_bits"]),
    value=SCALARS,
)
def test_limits_declared_by_a_peer(dev: EmulatedDevice, field: str, value: object) -> None:
    """A board's declared limits reach the host's checks as numbers of their field's type,
    or the info is refused as malformed."""
    d = pl.info_to_dict(dev.info)
    d["limits"][field] = int(value) if isinstance(value, np.integer) else value
    try:
        info = pl.info_from_dict(d)
    except ProtocolError:
        return
    got = getattr(info.limits, field)
    if field in ("max_pulses", "max_verify_iters") or (field == "adc_bits" and got is not None):
        assert type(got) is int
    elif field != "adc_bits":
        assert type(got) is float and math.isfinite(got)


@SETTINGS
@given(beta=st.floats(-100, 100), grad=st.one_of(st.floats(-1e7, 1e7), floats()))
def test_nudge_drive(dev: EmulatedDevice, beta: float, grad: object) -> None:
    """An injected current |beta * grad| beyond max_drive is refused; an accepted one keeps
    the settle's states and energy finite."""
    lim = dev.info.limits
    x = np.full((2, 3), 0.5, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        g = np.full((2, 2), grad, dtype=np.float32)
    g_max = float(np.abs(g).max())
    want = math.isfinite(g_max) and abs(beta) * g_max <= lim.max_drive
    ok, res = _outcome(lambda: dev.settle({"s0": x}, {"s1": Nudge(beta, grad=g)}))
    assert ok == want, (beta, grad, res)
    if ok:
        assert all(np.isfinite(v).all() for v in res.states.values())  # type: ignore[attr-defined]
        assert res.energy is None or np.isfinite(res.energy).all()  # type: ignore[attr-defined]
    _clean(dev)


@SETTINGS
@given(
    field=st.sampled_from(["v_read", "dac_bits", "channels", "max_pulses", "max_settle_steps", "mvm_range"]),
    value=st.one_of(st.integers(-2, 40), SCALARS),
)
def test_periphery_overrides(field: str, value: object) -> None:
    """A board is never built from a periphery that would divide by zero or overflow later:
    every override either builds a board or raises ConfigurationError."""
    from drivers.emulated import EmulatorOptions

    text = str(int(value)) if isinstance(value, np.integer) else str(value)
    ok, res = _outcome(lambda: EmulatorOptions(overrides=((field, text),)).board_preset())
    if ok:
        per = res.periphery  # type: ignore[attr-defined]
        got = getattr(per, field)
        if field in ("v_read", "mvm_range"):
            assert math.isfinite(got) and got > 0
        elif got is not None:
            assert type(got) is int and 1 <= got <= 2**31 - 1


@SETTINGS
@given(value=st.one_of(st.floats(-2, 2), floats(), integers()), pos=st.integers(0, 2))
def test_clamp_states(dev: EmulatedDevice, value: object, pos: int) -> None:
    """A clamp value of any width is checked after its cast to float32 (a float64 past float32
    becomes inf and is refused, silently), against the read-voltage limit."""
    lim = dev.info.limits
    arr = np.asarray(value)
    x = np.zeros((1, 3), dtype=object if arr.dtype.kind == "O" else arr.dtype)  # the value's own dtype
    x.flat[pos] = value
    f = float(np.asarray(value, dtype=np.float64)) if x.dtype.kind != "O" else math.inf
    f32 = float(np.float32(f)) if abs(f) < 3.4e38 else math.inf
    want = math.isfinite(f32) and abs(f32) <= lim.clamp_max
    ok, res = _outcome(lambda: dev.settle({"s0": x}))
    assert ok == want, (value, x.dtype, res)
    ok_m, res_m = _outcome(lambda: dev.mvm("W0", np.concatenate([x, np.ones((1, 1), x.dtype)], 1)))
    assert ok_m == want, (value, res_m)
    _clean(dev)


# ---- the batch of mvm and settle (Limits.max_batch) -----------------------------------------


@SETTINGS
@given(
    batch=st.one_of(st.integers(1, 40), st.sampled_from([1023, 1024, 1025, 2048])),
    bound=st.one_of(st.integers(1, 40), st.just(1024)),
)
def test_batch_size(dev: EmulatedDevice, batch: int, bound: int) -> None:
    """A batch beyond `max_batch` is refused (LimitViolation naming it, the bound and the fix)
    by the host's checks of settle and mvm for any declared bound, and by the board itself
    (EmulatedDevice, Board called directly, the servers' dispatch) against its own; the
    refusal is counted and nothing reaches the array."""
    import dataclasses

    lim = dataclasses.replace(dev.info.limits, max_batch=bound)
    x = np.full((batch, 3), 0.5, np.float32)
    xm = np.full((batch, 4), 0.5, np.float32)
    for check in (
        lambda: checks.check_settle(TOPO, lim, {"s0": x}, None, None),
        lambda: checks.check_mvm(TOPO, lim, "W0", xm, False),
    ):
        ok, res = _outcome(check)
        assert ok == (batch <= bound), (batch, bound, res)
        if not ok:
            assert isinstance(res, LimitViolation) and res.bound == bound and res.value == batch
            assert f"chunks of at most {bound}" in str(res)
    want = batch <= dev.info.limits.max_batch
    refused = dev.board.safety.refused
    ok_s, res_s = _outcome(lambda: dev.settle({"s0": x}))
    ok_m, res_m = _outcome(lambda: dev.mvm("W0", xm))
    assert ok_s == ok_m == want, (batch, res_s, res_m)
    t, tm = torch.from_numpy(x), torch.from_numpy(xm)
    ok_b, _ = _outcome(lambda: dev.board.mvm("W0", tm))
    ok_bs, _ = _outcome(lambda: dev.board.settle({"s0": t}))
    assert ok_b == ok_bs == want
    ok_w, _ = _outcome(
        lambda: dispatch.execute(dev, Op.MVM, Message({"tile": "W0", "transpose": False}, {"x": xm}))
    )
    assert ok_w == want
    if not want:
        assert dev.board.safety.refused > refused
    _clean(dev)


@SETTINGS
@given(value=st.one_of(st.integers(-2, 4), st.sampled_from([2**31 - 1, 2**31, 2**63]), SCALARS))
def test_max_batch_declared_by_a_peer(dev: EmulatedDevice, value: object) -> None:
    """A peer's max_batch is an integer in [1, 2^31) or its info is malformed; one that
    omits it (an older board) gets the default."""
    d = pl.info_to_dict(dev.info)
    d["limits"]["max_batch"] = int(value) if isinstance(value, np.integer) else value
    ok, res = _outcome(lambda: pl.info_from_dict(d))
    assert ok == (_is_int(value) and 1 <= int(value) < 2**31), (value, res)  # type: ignore[call-overload]
    if ok:
        assert type(res.limits.max_batch) is int  # type: ignore[attr-defined]
    del d["limits"]["max_batch"]
    assert pl.info_from_dict(d).limits.max_batch == 1024
