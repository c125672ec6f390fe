"""The host-iterated settle's noise probe and its statistics: a noisy board whose first check
reads two equal products (the free states all 0, no bias: no current flows) is still probed
at the later checks, and a settle interrupted by Ctrl-C leaves statistics that say so (not
the last finished settle's)."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from drivers import SettleBudget, Topology, open_device
from hil.ep import EBBlock
from hil.gradcheck import gaussian_init
from hil.host_settle import HostSettle

MVM_ONLY = "capabilities=mvm,pulse,program_verify"
NOISY = f"emulator://?preset=rram&seed=0&adc_bits=6&{MVM_ONLY}"
X = np.random.default_rng(0).random((8, 64)).astype(np.float32)


def _host(uri: str, budget: SettleBudget) -> HostSettle:
    dev = open_device(uri)
    topo = Topology.layered([64, 24, 10], bias=False, budget=budget)
    w = gaussian_init(topo, 1.0, torch.Generator().manual_seed(0))
    blk = EBBlock(dev, topo, inputs=("s0",), outputs=("s2",), weights=w, seed=0, settle="host")
    return HostSettle(dev, reference=blk.device_weights)


def test_a_noisy_board_is_probed_past_a_first_check_at_zero_states() -> None:
    host = _host(NOISY, SettleBudget(300, 1e-4, 0.5, 1))
    zero = np.zeros((4, 24), np.float32)
    dev = host.device
    assert np.array_equal(dev.mvm("W1", zero), dev.mvm("W1", zero))  # no input, no noise to see
    half = np.full((4, 24), 0.3, np.float32)
    assert not np.array_equal(dev.mvm("W1", half), dev.mvm("W1", half))  # but the board is noisy
    eq = host({"s0": X})
    # the first check (step 1: s1 and s2 still 0) read equal products; the settle went on probing
    assert host.stats.probe_calls > 2 * 2, host.stats
    assert host.stats.noise_floor > 1e-3
    assert eq.converged and eq.steps < 300, (eq.steps, eq.converged)


def test_a_deterministic_board_stops_probing_after_one_informative_check() -> None:
    host = _host(f"emulator://?preset=ideal&seed=0&{MVM_ONLY}", SettleBudget(300, 1e-4, 0.5, 1))
    host({"s0": X})
    # step 1 (zero states) tells nothing; step 2 reads equal products: no more probes
    assert host.stats.probe_calls == 2 * 2 and host.stats.noise_floor < 1e-2


def test_statistics_after_a_ctrl_c_mid_settle_are_not_the_last_settles() -> None:
    host = _host(NOISY, SettleBudget(3, 0.0, 0.5, 5))
    dev = host.device
    host({"s0": X})
    last = host.stats
    assert last.mvm_calls == 1 + 3 * 2
    topo = dev.topology
    assert topo is not None
    dev.configure(replace(topo, budget=SettleBudget(20000, 0.0, 0.5, 5)))  # tol 0: all 20000 steps
    before = dev.meter().mvm_calls
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C, half a second in
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        host({"s0": X})
    timer.join()
    calls = dev.meter().mvm_calls - before
    assert calls > 10, "interrupted before it got going"
    assert host.stats is not last, "the interrupted settle left the last one's statistics"
    assert abs(host.stats.mvm_calls - calls) <= 1, (host.stats.mvm_calls, calls)  # what it cost
    assert not host.stats.finished and last.finished
