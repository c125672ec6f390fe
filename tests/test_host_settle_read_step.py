"""The host-iterated settle's stop floor counts the mvm read-out's step, as the board's own
mvm-mode settle does (``gain * lsb(adc_bits, 2 mvm_range)`` in `emulator.settle`): the limits
do not declare the mvm read-out's range, so the host measures the step from its reads
(`HostSettle._read_step`), here through the emulator's real SCPI and framed servers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from drivers import Device, SettleBudget, open_device
from drivers.converters import lsb
from hil.gradcheck import check_block
from hil.host_settle import HostSettle

SERVED = "emulator://?preset=rram&seed=0&adc_bits=6&capabilities=mvm,program_verify"
LINKS = ("visa-tcp", "serial-socket")
STEP = lsb(6, 8.0)  # the 6-bit mvm read-out over the emulator's +-4
BUDGET = SettleBudget(max_steps=300, tol=1e-4, dt=0.5, check_every=5)


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, Device]]:
    from hil.testing import serve_board

    servers = serve_board(SERVED, lock=False)
    devs = {t: open_device(servers.uri(t)) for t in LINKS}
    try:
        yield devs
    finally:
        for d in devs.values():
            d.close()
        servers.close()


@pytest.mark.parametrize("link", LINKS)
def test_the_host_measures_the_read_step_and_stops_within_it(
    hosts: dict[str, Device], link: str, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """The step the reads show is the read-out's, through either wire, and the floor holds it
    (times the gain, 1) on top of a DAC step of the states. A settle without noise probes
    (judged on its residual alone) ends in a one-step limit cycle (a drive on a code boundary
    flips between two codes: residual one read step): within that floor, it converges; with
    the DAC step alone as its floor it ran its 300 steps, not converged."""
    x, _ = digits
    blk = check_block(hosts[link], [64, 24, 10], dense=False, budget=BUDGET, settle="host")
    dev = blk.device
    blind = HostSettle(dev, probe_noise=False)
    eq = blind({"s0": x})
    assert eq.converged and eq.steps < 300
    assert blind.stats.read_step == pytest.approx(STEP, rel=1e-6)
    assert blind.stats.noise_floor == pytest.approx(STEP + lsb(8, 1.0), rel=1e-6)
    assert 0.9 * STEP < eq.residual <= blind.stats.noise_floor  # the limit cycle: about one read step
    host = HostSettle(dev, reference=blk.device_weights)
    assert host({"s0": x}).converged
    assert host.stats.read_step == pytest.approx(STEP, rel=1e-6) and host.stats.noise_floor >= STEP


def test_the_read_step_is_a_channels_smallest_gap() -> None:
    """Per output column (a calibration record's per-channel gain keeps one channel's codes
    evenly spaced, not the channels' together) and the smallest nonzero change between two
    reads; never below the step, and 0.0 where nothing shows one."""
    rs = HostSettle._read_step
    y = np.array([[0.0, 0.011], [0.5, 0.511], [0.25, 0.761]], np.float32)  # columns 0.25 apart
    assert rs(0.0, y) == pytest.approx(0.25)
    assert rs(0.0, y[:1]) == 0.0 and rs(0.0, np.zeros((3, 2), np.float32)) == 0.0
    assert rs(0.25, y[:1], np.array([[0.0, 0.125]], np.float32)) == pytest.approx(0.125)
    assert rs(0.125, y) == pytest.approx(0.125)  # the smallest seen so far stays
