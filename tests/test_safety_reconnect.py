"""A host that reconnects to a board must check against the limits the board that answered
declares, not the ones it read when it opened the address (the safety audit of 2026-12-07):
another board behind the address, or an emulator started again with narrower limits, took
requests the host had checked against the old, wider ones."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from drivers import Topology, open_device
from drivers.errors import ArraysLost, BoardChanged, LimitViolation
from emulator.server.launch import serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served(board: str, transport: str, port: int):  # type: ignore[no-untyped-def]
    ports = {"scpi_port": None, "framed_port": None}
    ports["framed_port" if transport == "serial-socket" else "scpi_port"] = port
    return serve(board, scpi_pty=False, framed_pty=False, **ports)


@pytest.mark.parametrize("transport", ["serial-socket", "visa-tcp"])
def test_a_reconnect_to_a_board_with_narrower_limits_refuses_on_the_host(transport: str) -> None:
    port = _free_port()
    first = _served("emulator://?preset=ideal", transport, port)
    uri = first.uris[transport] + ("?" if "?" not in first.uris[transport] else "&") + "timeout=2"
    try:
        d = open_device(uri)
    except BaseException:
        first.close()
        raise
    with d:
        assert d.info.limits.v_read_max == 0.25
        d.configure(Topology.layered([4, 3]))
        first.close()
        # the same address, now a board whose read-voltage limit is 0.21 V (state 1.05)
        second = _served("emulator://?preset=ideal&v_read_max=0.21", transport, port)
        try:
            x = np.full((1, 4), 1.2, np.float32)  # 0.24 V: within the first board's limit only
            with pytest.raises(BoardChanged, match=r"v_read_max 0\.25 -> 0\.21"):
                d.settle({"s0": x})
            assert d.info.limits.v_read_max == 0.21
            with pytest.raises(LimitViolation, match="read-voltage limit"):
                d.mvm("W0", np.full((1, 5), 1.2, np.float32))
            # nothing past its limits reached the new board, not even to be refused there
            assert second.device.safety().refused == 0
            assert second.device.safety().violations == 0
            # the next call recovers as ever (the new board's devices are not the programmed
            # ones), and what is within its limits then runs
            with pytest.raises(ArraysLost):
                d.settle({"s0": np.full((1, 4), 1.0, np.float32)})
            eq = d.settle({"s0": np.full((1, 4), 1.0, np.float32)})
            assert eq.states["s1"].shape == (1, 3)
            d.close()
        finally:
            second.close()


def test_a_reconnect_to_a_restarted_board_with_the_same_limits_is_no_change() -> None:
    port = _free_port()
    first = _served("emulator://?preset=ideal", "serial-socket", port)
    d = open_device(first.uris["serial-socket"] + "?timeout=2")
    first.close()
    second = _served("emulator://?preset=ideal", "serial-socket", port)
    try:
        with pytest.raises(ArraysLost):  # its devices are new, as before; its limits the same
            d.reconnect()
        d.configure(Topology.layered([4, 3]))
        d.mvm("W0", np.full((1, 5), 1.2, np.float32))
        assert second.device.safety().refused == second.device.safety().violations == 0
        d.close()
    finally:
        second.close()


@pytest.mark.parametrize("transport", ["serial-pty", "visa-asrl"])
def test_a_board_swapped_behind_a_serial_line_at_the_same_epoch_is_seen_before_anything_is_sent(
    transport: str,
) -> None:
    """A serial line does not break when the board behind it is power-cycled or swapped for a
    spare, and a fresh board starts at epoch 0, as the one opened may have been. Before, the
    host took the new board's "no topology" refusal for the caller's error (its epoch had not
    changed), kept the old limits, and after the caller configured again sent a 0.24 V input
    that only the new 0.21 V board's own check stopped. Now a board that holds no topology
    while the host configured one is a reset whatever its epoch: the host reconnects, reads
    INFO and raises BoardChanged, and refuses the input itself."""
    import dataclasses

    s = serve("emulator://?preset=ideal&seed=0", scpi_port=None, framed_port=None)
    try:
        with open_device(s.uris[transport]) as d:
            d.configure(Topology.layered([3, 2]))
            x = np.full((1, 4), 1.2, np.float32)  # 0.24 V: within the first board's 0.25 V only
            d.mvm("W0", x)
            served = s.device
            with served.lock:  # the spare, powered up behind the same line: epoch 0, 0.21 V
                board = served.board  # type: ignore[attr-defined]
                board.restart()
                board.epoch = 0
                narrower = dataclasses.replace(board.limits, v_read_max=0.21)
                board._limits = (board.preset, narrower)
                served._info = dataclasses.replace(served.info, limits=narrower)  # type: ignore[attr-defined]
            with pytest.raises(BoardChanged, match=r"v_read_max 0\.25 -> 0\.21"):
                d.mvm("W0", x)
            assert d.info.limits.v_read_max == 0.21
            with pytest.raises(LimitViolation, match="read-voltage limit"):
                d.configure(Topology.layered([3, 2]))
                d.mvm("W0", x)
            assert served.safety().refused == 0 and served.safety().violations == 0
    finally:
        s.close()


@pytest.mark.parametrize("transport", ["serial-pty", "visa-asrl"])
def test_a_board_swapped_behind_a_serial_line_before_the_host_configured_it_is_seen_at_configure(
    transport: str,
) -> None:
    """The case the test above leaves: the spare is powered up behind the line after the host
    opened the board and before it configured it, at the epoch the host saw. Nothing the host
    sends then needs a topology the board lacks, so nothing was refused: the configure went
    through on the host's old limits, and so did a 0.24 V input only the spare's own 0.21 V
    check stopped (refused + 1). Now configure asks STATUS first: a board whose arrays_id (or
    epoch) is not the one seen has its INFO read again, and other limits are BoardChanged before
    the configure is sent; the input is then refused on the host."""
    import dataclasses

    s = serve("emulator://?preset=ideal&seed=0", scpi_port=None, framed_port=None)
    try:
        with open_device(s.uris[transport]) as d:
            x = np.full((1, 4), 1.2, np.float32)  # 0.24 V: within the first board's 0.25 V only
            served = s.device
            with served.lock:  # the spare, powered up behind the same line: epoch 0, 0.21 V
                board = served.board  # type: ignore[attr-defined]
                board.restart()
                board.epoch = 0
                board.lose_arrays()  # a spare's own arrays (its own arrays_id)
                board.epoch = 0
                narrower = dataclasses.replace(board.limits, v_read_max=0.21)
                board._limits = (board.preset, narrower)
                served._info = dataclasses.replace(served.info, limits=narrower)  # type: ignore[attr-defined]
            with pytest.raises(BoardChanged, match=r"v_read_max 0\.25 -> 0\.21.*the configure was not sent"):
                d.configure(Topology.layered([3, 2]))
            assert d.info.limits.v_read_max == 0.21
            d.configure(Topology.layered([3, 2]))
            with pytest.raises(LimitViolation, match="read-voltage limit"):
                d.mvm("W0", x)
            assert served.safety().refused == 0 and served.safety().violations == 0
    finally:
        s.close()


def test_a_board_power_cycled_with_the_same_limits_configures_as_before() -> None:
    """The same board power-cycled before the host configures it (same limits): no change,
    the configure goes through."""
    s = serve("emulator://?preset=ideal&seed=0", scpi_port=None, framed_port=None)
    try:
        with open_device(s.uris["serial-pty"]) as d:
            with s.device.lock:
                s.device.board.restart()  # type: ignore[attr-defined]
            d.configure(Topology.layered([3, 2]))
            d.mvm("W0", np.full((1, 4), 1.2, np.float32))
            assert s.device.safety().refused == 0
    finally:
        s.close()


@pytest.mark.parametrize("transport", ["serial-pty", "visa-asrl"])
def test_a_board_that_lost_its_arrays_behind_a_serial_line_is_seen_at_the_next_configure(
    transport: str,
) -> None:
    """A board of the same limits powered up again with its arrays lost (erased, or an identical
    spare) between two configures (a training step configures twice when its free and nudged
    budgets differ): the configure's STATUS shows another arrays_id. With no repair set the
    configure raises ArraysLost; with one the tiles are programmed again and an mvm reads what
    the host programmed. Before, the configure went through and the host went on with the
    spare's devices, unprogrammed (an mvm of them, not of the weights, and no error)."""
    from drivers import repair_lost_arrays
    from drivers.errors import ArraysLost

    topo = Topology.layered([3, 2])
    gp = np.full((4, 2), 6e-6, np.float32)
    gm = np.full((4, 2), 2e-6, np.float32)
    x = np.full((1, 4), 0.5, np.float32)
    s = serve("emulator://?preset=ideal&seed=0", scpi_port=None, framed_port=None)
    try:
        with open_device(s.uris[transport]) as d:
            d.configure(topo)
            d.program("W0", gp, gm)
            want = d.mvm("W0", x)
            with s.device.lock:
                s.device.board.lose_arrays()  # type: ignore[attr-defined]
            with pytest.raises(ArraysLost, match="no longer hold what was programmed"):
                d.configure(topo)

            def program_again(dev: object) -> None:
                d.program("W0", gp, gm)

            with s.device.lock:
                s.device.board.lose_arrays()  # type: ignore[attr-defined]
            with repair_lost_arrays([d], program_again):
                d.configure(topo)
            np.testing.assert_allclose(d.mvm("W0", x), want, rtol=1e-6)
            assert s.device.safety().refused == 0
    finally:
        s.close()
