"""A settle that clamps every group of its network has no node to settle. The emulated board's
settle crashed on one (analog: IndexError in the stop rule, mvm mode: ValueError of an empty
max), which a served board answered as -200 (execution error) or -224 (illegal parameter) with
the exception's text; the conv engine and the host-iterated settle ran it for a check's worth of
steps and mvm reads. Now every path refuses it before it starts, as a configuration error that
says what to do (`drivers.checks.check_settle`), the board included."""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np
import pytest

from drivers import ConfigurationError, Topology, open_device
from drivers.wire import payload as pl
from drivers.wire.frames import Flag
from drivers.wire.payload import Op
from hil.host_settle import HostSettle
from hil.testing import BoardServers, socket_link

WORDS = "no node is free to settle; leave at least one group unclamped (give its start as init)"


def _all_clamped(t: Topology) -> dict[str, np.ndarray]:
    return {g: np.full((2, n), 0.5, np.float32) for g, n in t.groups.items()}


@pytest.mark.parametrize("mode", ["analog", "mvm"])
@pytest.mark.parametrize("conv", [False, True], ids=["layered", "conv"])
def test_a_settle_with_every_group_clamped_is_refused_in_process(mode: str, conv: bool) -> None:
    t = (
        Topology.convolutional((1, 4, 4), [2], pools=[1], mode="analog")
        if conv
        else Topology.layered([6, 5, 3], mode=mode)
    )
    dev = open_device("emulator://?preset=rram&seed=0")
    dev.configure(t)
    settles = {"host": HostSettle(dev)}
    if not (conv and mode == "mvm"):
        settles["board"] = dev.settle
    for name, settle in settles.items():
        with pytest.raises(ConfigurationError) as info:
            settle(_all_clamped(t))
        assert WORDS in str(info.value), (name, str(info.value))
        assert "'s0', 's1'" in str(info.value)
    assert dev.safety().violations == 0


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
@pytest.mark.parametrize("mode", ["analog", "mvm"])
def test_a_settle_with_every_group_clamped_is_refused_over_a_link(
    emulated_board: Callable[..., BoardServers], transport: str, mode: str
) -> None:
    s = emulated_board("emulator://?preset=rram&seed=0")
    t = Topology.layered([6, 5, 3], mode=mode)
    with open_device(s.uri(transport)) as dev:
        dev.configure(t)
        with pytest.raises(ConfigurationError) as info:
            dev.settle(_all_clamped(t))
        assert WORDS in str(info.value)
        assert dev.safety().violations == 0


@pytest.mark.parametrize("mode", ["analog", "mvm"])
def test_the_board_refuses_a_raw_settle_with_every_group_clamped_as_a_configuration_error(
    emulated_board: Callable[..., BoardServers], mode: str
) -> None:
    """Sent raw over the framed link (no host check on the way): the board's answer is error
    100 with the words, not -200 with an IndexError's text."""
    s = emulated_board("emulator://?preset=rram&seed=0", lock=False)
    t = Topology.layered([6, 5, 3], mode=mode)
    s.device.configure(t)
    port = int(s.uris["serial-socket"].rsplit(":", 1)[1].split("?")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        link = socket_link(sock, ack_timeout=1.0, retries=3)
        msg = pl.settle_request(_all_clamped(t), {}, {}, False)
        ref = link.send(Op.SETTLE, pl.pack(msg))
        got = link.receive(10.0, response=True, ref=ref, opcode=Op.SETTLE)
    assert got is not None
    first, body = got
    assert first.flags & Flag.ERROR
    error = pl.loads(body)
    assert error["code"] == 100 and WORDS in error["message"], error
