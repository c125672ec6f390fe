"""TCP keepalive on the emulator servers' accepted connections (docs/protocol.md, "Ownership"):
a host that loses power, its cable or its network sends no FIN, so without keepalive its
connection (and the owner's token it presents) stays open until the server's idle timeout, an
hour by default, and the board stays driven and locked that long. With it, the kernel probes an
idle connection and drops one that does not answer within about the board's lease; the server
reads that as a close, applies the safe state and runs the lease. Loopback always answers the
probes, so what is checked here is that the options are set, and sized from the lease, on the
connections both servers accept (a real dead peer needs a second machine: docs/bringup.md)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from emulator.server.links import KEEPALIVE_PROBES, KEEPALIVE_S, EndpointServer, tcp_keepalive
from hil.testing import BoardLock, BoardServers
from tests.waiting import until

BOARD = "emulator://?preset=ideal&seed=0"


def _accepted(server: EndpointServer) -> socket.socket:
    """Connect to `server`'s TCP port; the server's side of that connection."""
    listener = server.listeners[0]
    peer = socket.create_connection(listener.address, timeout=5)
    try:
        assert until(lambda: len(listener._streams) == 1, 5.0), "the server did not accept the connection"
        (stream,) = listener._streams
        return stream.conn.dup()
    finally:
        peer.close()


def _options(conn: socket.socket) -> tuple[int, ...]:
    try:
        return (
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        )
    finally:
        conn.close()


needs_linux_options = pytest.mark.skipif(
    not all(hasattr(socket, o) for o in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")),
    reason="the platform lacks TCP_KEEPIDLE/KEEPINTVL/KEEPCNT",
)


@needs_linux_options
@pytest.mark.parametrize("server", ["scpi", "framed"])
def test_both_servers_turn_on_tcp_keepalive_sized_from_the_lease(
    server: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD, lock=BoardLock(lease_s=9.0))
    # a dead peer is dropped within about the lease: idle 3 s, then 3 probes 2 s apart (9 s)
    assert _options(_accepted(getattr(s, server))) == (1, 3, 2, KEEPALIVE_PROBES)


@needs_linux_options
def test_a_board_without_ownership_keeps_the_default_keepalive(
    emulated_board: Callable[..., BoardServers],
) -> None:
    s = emulated_board(BOARD, lock=False)
    idle, interval = round(KEEPALIVE_S / 3), round(KEEPALIVE_S * 2 / 9)
    assert _options(_accepted(s.scpi)) == (1, idle, interval, KEEPALIVE_PROBES)


def test_keepalive_times_are_whole_seconds_of_at_least_one() -> None:
    with socket.socket() as sock:
        done = tcp_keepalive(sock, 0.5)
    assert done["SO_KEEPALIVE"] == 1
    assert all(v >= 1 and isinstance(v, int) for v in done.values())
