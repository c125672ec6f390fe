"""A host that dies on a serial line while the board sends it a long reply (an mvm of a
host-iterated settle, the reads of an MVM-only board's training run): the board must take the
line as silent from when the reply was ready, as for a reply of one frame
(tests/test_ownership_owner_gone.py), and apply its safe state about a lease later, not only
once the resends of the reply to nobody are spent."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from drivers import Topology
from drivers.wire import payload as pl
from drivers.wire.payload import Op
from hil.testing import BoardServers
from tests.pty_host import PtyHost, count_safe_states
from tests.waiting import until

BOARD = "emulator://?preset=ideal&seed=0&capabilities=mvm,program_verify"


def test_a_host_that_dies_during_a_long_reply_on_a_serial_line_is_made_safe_a_lease_later(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """The host owns the board over the framed pty with a lease of 1 s, asks for an mvm whose
    reply is 513 kB (17 fragments) and dies as it is sent: nothing reads the line any more.
    The board resent the reply's first fragment until its retries were spent, each resend
    waiting 2 s for a line nobody drains (6 x (2 + 0.25) s), and counted the line as silent
    only after that: its safe state came 14-15 s after the request (seen failing: 14.5 s with a
    lease of 1 s). Now the silence is checked while the reply is resent, from when it was
    ready, as after a failed reply: the safe state comes within a lease and one resend."""
    s = emulated_board(BOARD)
    topo = Topology.layered([512, 8, 2])
    s.device.configure(topo)  # a free board: configured before the host takes it
    calls = count_safe_states(s)
    with PtyHost(s) as host:
        host.acquire("t1", 1.0)
        x = np.full((256, 8), 0.5, np.float32)  # transposed through the 513 x 8 tile: 256 x 513 back
        host.link.send(Op.MVM, pl.pack(pl.mvm_request("W0", x, True)))  # its one frame acknowledged
        asked = time.monotonic()
        host.reads = host.writes = False  # the host dies: it reads and writes nothing more
        assert until(lambda: len(calls) == 1, 8.0), (
            "the board did not make a silent owner's board safe in 8 s"
        )
        assert calls[0] - asked < 4.5, calls[0] - asked
