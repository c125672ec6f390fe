"""The audit: a board's declared `Limits.pulse_endurance` (pulses per device over its life) was
enforced nowhere: 50 pulse requests of 1000 on a board rated for 1000 were all accepted, and a
calibration with --pulse-budget 500000 ran 7795 pulses per device. Now the board keeps each
device's wear and refuses (-222) a request that would take one past its endurance, applying
nothing; the host refuses a single request past it, and a session's own pulses past it, before
sending; a calibration budget above it is refused before any routine runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import SessionOptions, run_session
from calibration.pulse import PulseBudgetError
from drivers import Device, LimitViolation, Topology, checks, open_device
from drivers.base import Limits
from drivers.emulated import EmulatedDevice
from hil.programming import make_scheme
from hil.testing import BoardServers

ENDURANCE = 1000
WORN = f"emulator://?preset=rram&seed=0&pulse_endurance={ENDURANCE}"
SHAPE = (5, 3)  # W0 of a 4-3 layered network: 4 inputs and the bias row


def _full(n: int) -> np.ndarray:
    return np.full(SHAPE, n, np.int32)


def _board(dev: Device) -> EmulatedDevice:
    assert isinstance(dev, EmulatedDevice)
    return dev


def _state(dev: EmulatedDevice) -> torch.Tensor:
    b = dev.board
    return b.tile("W0").state(b.clock).clone()


# ---- host: one request past the endurance ------------------------------------------------


@pytest.fixture(scope="module")
def rram_limits() -> Limits:
    with open_device("emulator://?preset=rram&seed=0") as dev:
        return dev.info.limits


@settings(max_examples=200, deadline=None)
@given(
    endurance=st.integers(1, 990),
    delta=st.integers(-3, 3),
    dtype=st.sampled_from(["<i4", "<i8", "<f8", "<i2"]),
    which=st.sampled_from(["counts_plus", "counts_minus"]),
    sign=st.sampled_from([1, -1]),
)
def test_host_refuses_one_request_past_the_endurance(
    rram_limits: Limits, endurance: int, delta: int, dtype: str, which: str, sign: int
) -> None:
    topo = Topology.layered([4, 3])
    limits = dataclasses.replace(rram_limits, pulse_endurance=endurance)
    n = max(endurance + delta, 0)
    if np.dtype(dtype).kind == "i" and n > np.iinfo(dtype).max:
        return
    counts = np.zeros(SHAPE, dtype)
    counts[1, 2] = sign * n
    zero = np.zeros(SHAPE, np.int32)
    args = (counts, zero) if which == "counts_plus" else (zero, counts)
    if n > endurance:
        with pytest.raises(LimitViolation, match=rf"pulse endurance \({which} of 'W0'.*limit {endurance}"):
            checks.check_pulse(topo, limits, "W0", *args)
    else:
        cp, cm = checks.check_pulse(topo, limits, "W0", *args)
        assert cp.dtype == np.int32 and int(np.abs(np.stack((cp, cm))).max()) == n


def test_host_session_refuses_its_own_pulses_past_the_endurance_before_sending(
    emulated_board: Callable[..., BoardServers],
) -> None:
    served = emulated_board(WORN)
    board = _board(served.device)
    with open_device(served.uris["visa-tcp"]) as dev:
        dev.configure(Topology.layered([4, 3]))
        dev.pulse("W0", _full(400), -_full(400))
        dev.pulse("W0", _full(400), _full(0))
        before = _state(board)
        with pytest.raises(LimitViolation, match=r"this session's pulses.*requested 1200, limit 1000"):
            dev.pulse("W0", _full(400), _full(0))
        assert torch.equal(_state(board), before)
        assert board.safety().refused == 0  # refused on the host: it never reached the board
        assert dev.safety().refused == 1
        assert board.board.max_wear() == {"W0": 800}
        dev.pulse("W0", _full(0), _full(600))  # the G- devices have taken 400: 1000 is the limit


# ---- board: wear kept, refusal before anything is applied ----------------------------------


def test_board_refuses_cumulative_wear_and_applies_nothing() -> None:
    """The audit's reproduction: 50 requests of 1000 pulses on a board rated for 1000."""
    with open_device(WORN) as d:
        dev = _board(d)
        dev.configure(Topology.layered([4, 3]))
        dev.pulse("W0", _full(300), -_full(300))
        dev.pulse("W0", -_full(300), _full(300))
        dev.pulse("W0", _full(300), _full(0))
        clock, state = dev.board.clock, _state(dev)
        with pytest.raises(
            LimitViolation,
            match=r"pulse endurance of tile 'W0' exceeded: requested 1100, limit 1000\. G\+ device "
            r"\(0, 0\) has taken 900 pulses and this pulse request adds 200; nothing was applied",
        ):
            dev.pulse("W0", _full(200), _full(0))
        assert torch.equal(_state(dev), state) and dev.board.clock == clock
        assert dev.safety().refused == 1 and dev.safety().violations == 0
        dev.pulse("W0", _full(100), _full(400))  # exactly the endurance: accepted
        assert dev.board.max_wear() == {"W0": 1000}
        refused = 0
        for _ in range(50):
            with pytest.raises(LimitViolation, match="pulse endurance"):
                dev.pulse("W0", _full(1), _full(0))
            refused += 1
        assert refused == 50 and dev.safety().refused == 51 and dev.safety().violations == 0


def test_wear_survives_reset_and_safe_state_and_counts_programming_pulses() -> None:
    with open_device(WORN) as d:
        dev = _board(d)
        dev.configure(Topology.layered([4, 3]))
        g = np.full(SHAPE, 5e-6, np.float32)
        dev.program("W0", g, g)  # a direct write: one pulse per device
        assert dev.board.max_wear() == {"W0": 1}
        dev.pulse("W0", _full(500), _full(0))
        dev.safe_state()
        dev.reset()
        dev.configure(Topology.layered([2, 2]))  # a smaller block of the same physical tile
        assert dev.board.max_wear() == {"W0": 501}
        dev.configure(Topology.layered([4, 3]))
        wear = dev.board.wear("W0")
        assert wear is not None and int(wear[0].min()) == 501 and int(wear[1].max()) == 1
        with pytest.raises(LimitViolation, match="has taken 501 pulses"):
            dev.pulse("W0", _full(500), _full(0))


def test_a_program_skips_spent_devices_and_write_verify_stops_at_the_endurance() -> None:
    """A program's write refused the whole tile once one device was spent (with wear-out
    modelled, one dead cell made the tile unprogrammable for good: no more training, no
    calibration); it skips the spent devices now, as firmware skips a dead cell, and counts
    them in the report."""
    with open_device(WORN) as d:
        dev = _board(d)
        dev.configure(Topology.layered([4, 3]))
        dev.pulse("W0", _full(990), _full(990))
        # write-verify: the write's pulse, then at most the 9 each device has left; the devices
        # that need more are given up, never pulsed past the endurance
        rep = dev.program(
            "W0", np.full(SHAPE, 9e-6, np.float32), np.full(SHAPE, 2e-6, np.float32), verify=True
        )
        assert dev.board.max_wear()["W0"] <= ENDURANCE and rep.gave_up
        wear = dev.board.wear("W0")
        assert wear is not None
        left = (ENDURANCE - wear).numpy().astype(np.int32)
        dev.pulse("W0", left[0], -left[1])
        assert dev.board.max_wear() == {"W0": ENDURANCE}
        refused = dev.safety().refused
        rep = dev.program("W0", np.full(SHAPE, 5e-6, np.float32), np.full(SHAPE, 5e-6, np.float32))
        assert rep.spent == 2 * SHAPE[0] * SHAPE[1] and rep.pulses == 0, rep
        assert dev.board.max_wear() == {"W0": ENDURANCE} and dev.safety().refused == refused
        # one spent device among fresh ones: the others take their write, it does not
        dev.configure(Topology.layered([6, 3]))  # a larger block: rows 5.. of W0 are fresh
        wear = dev.board.wear("W0")
        assert wear is not None
        before = wear.clone()
        rep = dev.program("W0", np.full((7, 3), 5e-6, np.float32), np.full((7, 3), 5e-6, np.float32))
        spent = int((before >= ENDURANCE).sum())
        assert rep.spent == spent == 2 * SHAPE[0] * SHAPE[1] and rep.pulses == 2 * 7 * 3 - spent, rep
        after = dev.board.wear("W0")
        assert after is not None and torch.equal(after, before + (before < ENDURANCE).to(torch.int64))
        g = _state(dev)
        fresh = g[:, SHAPE[0] :, :]
        assert torch.allclose(fresh, torch.full_like(fresh, 5e-6), atol=1e-6)  # written


def test_without_a_declared_endurance_nothing_is_counted_or_refused() -> None:
    with open_device("emulator://?preset=rram&seed=0") as d:
        dev = _board(d)
        dev.configure(Topology.layered([4, 3]))
        for _ in range(3):
            dev.pulse("W0", _full(1000), -_full(1000))
        assert dev.board.wear("W0") is None and dev.board.max_wear() == {}
        assert dev.safety().refused == 0


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_board_refusal_over_the_real_transports(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """The host's session count starts at 0 in each session: a second session is refused by
    the board, whose count is the authority (-222 on both protocols, its text carried)."""
    served = emulated_board(WORN)
    board = _board(served.device)
    with open_device(served.uris[transport]) as dev:
        dev.configure(Topology.layered([4, 3]))
        dev.pulse("W0", _full(450), _full(0))
        dev.pulse("W0", _full(450), _full(0))
    state = _state(board)
    with open_device(served.uris[transport]) as dev:
        with pytest.raises(
            LimitViolation,
            match=r"pulse endurance of tile 'W0' exceeded: requested 1350, limit 1000\. G\+ device "
            r"\(0, 0\) has taken 900 pulses and this pulse request adds 450; nothing was applied",
        ):
            dev.pulse("W0", _full(450), _full(0))
        assert dev.safety().refused == 1 and dev.safety().violations == 0
        dev.pulse("W0", _full(0), _full(1000))  # the G- devices are new
    assert torch.equal(_state(board)[0], state[0])
    assert board.board.max_wear() == {"W0": 1000}


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_program_over_the_real_transports_reports_the_spent_devices_it_skipped(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    served = emulated_board(WORN)
    board = _board(served.device)
    with open_device(served.uris[transport]) as dev:
        dev.configure(Topology.layered([4, 3]))
        target = np.full(SHAPE, 5e-6, np.float32)
        assert dev.program("W0", target, target).spent == 0
        board.pulse("W0", _full(ENDURANCE - 1), _full(0))  # the G+ devices spent, the G- fresh
        rep = dev.program("W0", target, target)
        assert rep.spent == SHAPE[0] * SHAPE[1] and rep.pulses == SHAPE[0] * SHAPE[1], rep
        assert dev.safety().refused == 0 and dev.safety().violations == 0
    with open_device("emulator://?preset=rram&seed=0") as no_endurance:
        no_endurance.configure(Topology.layered([4, 3]))
        assert no_endurance.program("W0", target, target).spent is None  # not reported: nothing counted


def test_board_refusal_code_on_raw_scpi(emulated_board: Callable[..., BoardServers]) -> None:
    from drivers.wire import codes
    from tests.raw_scpi import RawScpi

    served = emulated_board(WORN)
    served.device.configure(Topology.layered([4, 3]))
    served.device.pulse("W0", _full(1000), _full(0))
    counts = np.concatenate([_full(1).ravel(), _full(0).ravel()]).astype("<i4").tobytes()
    n = str(len(counts))
    with RawScpi(served.uris["visa-tcp"]) as raw:
        raw.send(b'TILE:PULS? "W0",#' + str(len(n)).encode() + n.encode() + counts + b"\n")
        raw.line()
        code, message = raw.error()
    assert code == codes.DATA_OUT_OF_RANGE
    assert "pulse endurance of tile 'W0'" in message and "has taken 1000 pulses" in message


# ---- calibration and programming ---------------------------------------------------------


def test_calibration_budget_above_the_endurance_is_refused_before_any_routine() -> None:
    with open_device(WORN) as d:
        dev = _board(d)
        opts = SessionOptions(routines=("pulse",), tile_shapes=((4, 4),), pulse_budget=500_000)
        with pytest.raises(
            PulseBudgetError,
            match=r"above the board's declared pulse_endurance of 1000.*worst case on this board is 442007 "
            r"pulses per device.*no budget the board allows covers it. Leave pulse out of --routines",
        ):
            run_session(dev, opts)
        assert dev.board.clock == 0.0 and dev.topology is None  # nothing ran


def test_a_pulsed_scheme_meets_the_boards_refusal_cleanly() -> None:
    """The pulsed scheme's updates run into the board's refusal: a LimitViolation, the
    scheme's state and the tile as they were before the refused update."""
    with open_device("emulator://?preset=rram&seed=0&pulse_endurance=400") as d:
        dev = _board(d)
        dev.configure(Topology.layered([4, 3]))
        scheme = make_scheme("pulsed", seed=1)
        w = np.zeros(SHAPE)
        scheme.program(dev, "W0", w)
        with pytest.raises(LimitViolation, match="pulse endurance of tile 'W0'"):
            for k in range(200):
                host = scheme.tiles["W0"].host.copy()
                state = _state(dev)
                w = w + (0.5 if k % 2 == 0 else -0.5)
                scheme.program(dev, "W0", w)
        assert np.array_equal(scheme.tiles["W0"].host, host) and torch.equal(_state(dev), state)
        assert dev.safety().violations == 0 and dev.board.max_wear()["W0"] <= 400


# ---- one wording of the refusal, board and host ----------------------------------------------


def test_board_and_host_refusals_are_worded_by_one_function(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The refusal was built twice (emulator.board and drivers.checks.SessionWear): both now
    come from `drivers.wear.endurance_refusal`, so the texts cannot drift apart."""
    from drivers.wear import endurance_refusal

    worn = np.zeros((2, *SHAPE), np.int64)
    worn[1, 2, 1] = 900
    served = emulated_board(WORN)
    served.device.configure(Topology.layered([4, 3]))
    served.device.pulse("W0", _full(0), np.where(worn[1] > 0, 900, 0).astype(np.int32))
    with pytest.raises(LimitViolation) as board_err:
        served.device.pulse("W0", _full(0), _full(101))
    said = endurance_refusal("W0", ENDURANCE, worn, worn + 101, "pulse request")
    assert said is not None and str(board_err.value) == str(said)
    assert "G- device (2, 1) has taken 900 pulses and this pulse request adds 101" in str(said)
    with open_device(served.uris["visa-tcp"]) as dev:
        dev.pulse("W0", _full(600), _full(0))
        with pytest.raises(LimitViolation) as host_err:
            dev.pulse("W0", _full(401), _full(0))
    sent = np.zeros((2, *SHAPE), np.int64)
    sent[0] = 600
    said = endurance_refusal(
        "W0", ENDURANCE, sent, sent + np.stack((_full(401), _full(0))), "request", session=True
    )
    assert said is not None and str(host_err.value) == str(said)
    assert str(said).startswith(
        "pulse endurance of tile 'W0' (this session's pulses) exceeded: requested 1001"
    )
    assert endurance_refusal("W0", ENDURANCE, worn, worn + 100, "pulse request") is None  # at the limit: none


# ---- one count of wear, board and host: a one-sided (PCM) device's RESET is one pulse ------------

PCM_WORN = f"emulator://?preset=pcm&seed=0&pulse_endurance={ENDURANCE}"


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_host_session_counts_a_pcm_reset_as_the_board_does(
    emulated_board: Callable[..., BoardServers], transport: str
) -> None:
    """The host's SessionWear counted |n| for a negative count on a one-sided tile, where the
    board counts one RESET pulse: the third -400 here was refused by the host ("this session's
    pulses ... requested 1200") while the board had counted 3. Both count with
    `drivers.wear.pulse_wear` now, the host told by the board's `limits.one_sided`."""
    served = emulated_board(PCM_WORN)
    board = _board(served.device)
    with open_device(served.uris[transport]) as dev:
        assert dev.info.limits.one_sided is True
        dev.configure(Topology.layered([4, 3]))
        for _ in range(3):
            dev.pulse("W0", -_full(400), _full(0))
        assert board.board.max_wear() == {"W0": 3}
        assert dev.safety().refused == 0
        dev.pulse("W0", _full(997), _full(0))  # 3 RESETs + 997 SETs: exactly the endurance
        with pytest.raises(LimitViolation, match=r"this session's pulses.*requested 1001, limit 1000"):
            dev.pulse("W0", -_full(1), _full(0))
    assert board.board.max_wear() == {"W0": ENDURANCE}


def test_one_sided_is_declared_on_the_wire_only_by_a_one_sided_board() -> None:
    from drivers.wire import payload as pl

    for preset, one_sided in (("pcm", True), ("rram", False)):
        with open_device(f"emulator://?preset={preset}&seed=0") as dev:
            d = pl.info_to_dict(dev.info)
            assert d["limits"].get("one_sided", False) is one_sided
            assert ("one_sided" in d["limits"]) is one_sided  # omitted when false, as older boards do
            assert pl.info_from_dict(d).limits.one_sided is one_sided
    d["limits"]["one_sided"] = 1
    with pytest.raises(Exception, match=r"limits.one_sided must be true or false"):
        pl.info_from_dict(d)


@pytest.fixture(scope="module")
def tiles() -> dict[bool, Any]:
    """W0 of a two-sided (rram) and a one-sided (pcm) emulated board, by one-sidedness."""
    out = {}
    for preset in ("rram", "pcm"):
        dev = _board(open_device(f"emulator://?preset={preset}&seed=0"))
        dev.configure(Topology.layered([4, 3]))
        out[dev.board.tile("W0").model.one_sided] = dev.board.tile("W0")
    assert sorted(out) == [False, True]
    return out


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(-1000, 1000), min_size=15, max_size=15),
    one_sided=st.booleans(),
    endurance=st.integers(1, 1000),
)
def test_host_and_board_count_one_request_alike(
    rram_limits: Limits, tiles: dict[bool, Any], counts: list[int], one_sided: bool, endurance: int
) -> None:
    """The board's per-device count (`TileArray.pulse_counts`) and the host's single-request
    check agree: a request is refused on the host exactly when a device would take more than
    the endurance by the board's count (a PCM RESET of any size: 1)."""
    n = np.array(counts, np.int32).reshape(SHAPE)
    limits = dataclasses.replace(rram_limits, pulse_endurance=endurance, one_sided=one_sided)
    zero = np.zeros(SHAPE, np.int32)
    _, mag = tiles[one_sided].pulse_counts(torch.from_numpy(n), torch.from_numpy(zero))
    try:
        checks.check_pulse(Topology.layered([4, 3]), limits, "W0", n, zero)
        refused = False
    except LimitViolation:
        refused = True
    assert refused == (int(mag.max()) > endurance)
