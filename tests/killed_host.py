"""A host for the tests of a host killed mid-programming, run as a subprocess
(``python -c killed_host(...) URI``): it opens the board, configures the 6-5-3 network,
begins the programming transaction ``update-7``, programs tile W0, prints one
line, then sleeps until it is killed (the rest, W1 and the commit, is never reached)."""

from __future__ import annotations

_HOST = """
import sys, time
import numpy as np
from drivers import Topology, open_device
dev = open_device(sys.argv[1])
dev.configure(Topology.layered([6, 5, 3]))
lim = dev.info.limits
dev.begin("update-7")
dev.program("W0", np.full((7, 5), lim.g_max, np.float32), np.full((7, 5), lim.g_min, np.float32))
print({said}, flush=True)
time.sleep(60)
dev.program("W1", np.full((6, 3), lim.g_max, np.float32), np.full((6, 3), lim.g_min, np.float32))
dev.commit("update-7")
"""


def killed_host(said: str) -> str:
    """The host's program; `said`: the Python expression of the line it prints once W0 is
    programmed (e.g. ``'"programmed W0"'``, or ``"dev.lock_token"``)."""
    return _HOST.format(said=said)
