"""Write-verify's `gave_up` end to end: counted by the board's array, sent in the program
reply over both servers, read by the host (None from a board that does not send it), summed
by the training loop and warned about above `GAVE_UP_WARN`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from drivers import Device, ProgramReport, Topology, open_device
from drivers.wire import scpi
from drivers.wrapper import DeviceWrapper
from emulator.array import TileArray, VerifyStats
from hil.cli import app
from hil.cli.train import GAVE_UP_WARN, gave_up_line, gave_up_warning
from hil.programming.scheme import UpdateReport
from hil.testing import BoardServers
from hil.train_classifier import EpochStats, _closed_loop
from tests.raw_scpi import RawScpi

STUCK_BOARD = "emulator://?preset=pcm&seed=0&stuck_fraction=0.05"
WIRES = ("visa-tcp", "serial-socket")  # pyvisa-py to the SCPI server, a socket to the framed one


def _targets(dev: Device, tile: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Targets mid-window, so that devices stuck at either end are far from theirs."""
    lim = dev.info.limits
    assert dev.topology is not None
    shape = dev.topology.tile_shape(tile)
    rng = np.random.default_rng(seed)
    span = lim.g_max - lim.g_min
    gp, gm = (
        rng.uniform(lim.g_min + 0.3 * span, lim.g_min + 0.7 * span, shape).astype(np.float32) for _ in "+-"
    )
    return gp, gm


@pytest.mark.parametrize("transport", WIRES)
def test_gave_up_over_the_wire_is_what_the_array_counted(
    transport: str, emulated_board: Callable[..., BoardServers], monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list[int] = []
    real = TileArray.program_verify

    def spy(self: TileArray, *args: Any, **kw: Any) -> VerifyStats:
        st = real(self, *args, **kw)
        counted.append(st.gave_up)
        return st

    monkeypatch.setattr(TileArray, "program_verify", spy)
    servers = emulated_board(board=STUCK_BOARD)
    with open_device(servers.uri(transport)) as dev:
        dev.configure(Topology.layered([16, 12]))
        gp, gm = _targets(dev, "W0")
        rep = dev.program("W0", gp, gm, verify=True)
        plain = dev.program("W0", gp, gm)  # no verify: nothing given up
    assert len(counted) == 1 and counted[0] > 0  # 5 % of 2 x 17 x 12 devices are stuck
    assert rep.gave_up == counted[0]
    assert plain.gave_up == 0


class OldFirmware(DeviceWrapper):
    """A board older than `gave_up`: its program reports do not have it."""

    def program(self, *args: Any, **kw: Any) -> ProgramReport:
        r = super().program(*args, **kw)
        r.gave_up = None
        return r


@pytest.mark.parametrize("transport", WIRES)
def test_a_board_that_does_not_send_gave_up_reads_as_unknown(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    servers = emulated_board(board=OldFirmware(open_device(STUCK_BOARD)))
    with open_device(servers.uri(transport)) as dev:
        dev.configure(Topology.layered([16, 12]))
        rep = dev.program("W0", *_targets(dev, "W0"), verify=True)
    assert rep.gave_up is None and rep.iterations > 0


class FixedReport(DeviceWrapper):
    """A board whose program report is fixed, so its reply's bytes are known."""

    def program(self, tile: str, g_plus: np.ndarray, g_minus: np.ndarray, **kw: Any) -> ProgramReport:
        g = np.full(g_plus.shape, 3e-6, np.float32)
        return ProgramReport(tile, g, g, 3, 40, 1e-8, 0.75, 1e-10, 1e-6, gave_up=2)


def test_the_scpi_program_reply_carries_gave_up_byte_for_byte(
    emulated_board: Callable[..., BoardServers],
) -> None:
    inner = open_device("emulator://?preset=ideal&seed=0")
    inner.configure(Topology.layered([1, 2], bias=False))
    servers = emulated_board(board=FixedReport(inner))
    values = np.full(4, 2e-6, "<f4").tobytes()
    with RawScpi(servers.uris["visa-tcp"]) as raw:
        raw.send(b'TILE:PROG? "W0",1,DEF,10,' + scpi.block(values) + b"\n")
        reply = raw.line()
        assert not raw.buf  # nothing after it
    json = (
        b'{"tile":"W0","iterations":3,"pulses":40,"residual_max":1e-08,"within_tol":0.75,'
        b'"energy_j":1e-10,"time_s":1e-06,"gave_up":2,'
        b'"arrays":[["g_plus","f4",[1,2]],["g_minus","f4",[1,2]]]}'
    )
    assert reply == scpi.block(json)


# ---- the host: training's share and its warning ------------------------------------


def test_closed_loop_counts_only_verified_reports_and_unknown_stays_unknown() -> None:
    g = np.zeros((2, 3), np.float32)

    def rep(gave_up: int | None, verified: int) -> UpdateReport:
        return UpdateReport("W0", g, g, 1, 12, 0.0, 1.0, 0.0, 0.0, gave_up, verified=verified)

    assert _closed_loop([rep(3, 12), rep(0, 0), rep(1, 12)], 0, 0) == (24, 4)
    assert _closed_loop([rep(3, 12), rep(None, 12)], 0, 0) == (24, None)
    assert _closed_loop([rep(None, 0)], 5, 1) == (5, 1)  # a write without verify says nothing


def test_the_warning_starts_above_the_threshold_and_names_the_counts() -> None:
    assert gave_up_warning(20, 1000) is None  # 2 %: not above
    assert gave_up_warning(None, 1000) is None and gave_up_warning(0, 0) is None
    note = gave_up_warning(21, 1000)
    assert note is not None and "21 of the 1000 devices" in note and "worn" in note
    assert GAVE_UP_WARN == 0.02
    h = [EpochStats(1, 0, 0, 0, 0, 0, 0, 0, None, 100, 1), EpochStats(2, 0, 0, 0, 0, 0, 0, 0, None, 100, 2)]
    assert gave_up_line(h) == "write-verify gave up on 3 of 200 devices programmed (1.50%)"
    h[1].gave_up = None
    assert "did not report" in str(gave_up_line(h))
    assert gave_up_line([EpochStats(1, 0, 0, 0, 0, 0, 0, 0)]) is None


def test_training_on_a_chip_with_many_stuck_devices_warns_once(tmp_path: Any) -> None:
    args = [
        "train", "classifier", "--no-progress", "--out", str(tmp_path / "run"),
        "--set", "device=emulator://?preset=pcm&seed=0&stuck_fraction=0.1", "--set", "ep.programming=verify",
        "--set", "train.epochs=2", "--set", "model.sizes=[64,10]", "--set", "data.limit_train=32",
        "--set", "data.limit_test=16", "--set", "ep.free_steps=20", "--set", "ep.nudge_steps=20",
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.output.count("write-verify gave up on") == 2  # the warning once, the summary line
    assert "warning (epoch 1): write-verify gave up on" in res.output
    assert "gave up " in next(line for line in res.output.splitlines() if line.startswith("epoch   2"))
