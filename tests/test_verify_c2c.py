"""Write-verify on a one-sided (PCM) board gives up on stuck or unreachable devices, not on
working ones whose climb back from a RESET scatters by the pulses' cycle-to-cycle noise.

On `pcm` a device above its target is RESET to the bottom of its window and climbs again in
full-size steps (1 uS) whose c2c std (0.6 of a step) is as large as the stall test's margin
after three rounds; before the firmware allowed for that scatter it gave up on about 45 of
32,768 working devices per tile (41-48 over seeds 0-3, targets 10-90 % of the window, no stuck
devices), leaving about 20 of them more than twice the tolerance (1 uS) from their targets.
With the allowance: 1-3 given up, 0-5 that far off."""

from __future__ import annotations

import numpy as np

from drivers import Topology, open_device

SHAPE = (128, 128)  # a layered 127-128 network's tile (bias row included): 32,768 devices


def _verify(seed: int) -> tuple[int, int]:
    """(devices given up, devices read back more than 2 tol from their targets) after a
    write-verify of targets at 10-90 % of a pcm window with no stuck devices and no wires."""
    uri = f"emulator://?preset=pcm&seed={seed}&stuck_fraction=0&wire_resistance=0"
    with open_device(uri) as dev:
        dev.configure(Topology.layered([SHAPE[0] - 1, SHAPE[1]]))
        lim = dev.info.limits
        span = lim.g_max - lim.g_min
        rng = np.random.default_rng(seed)
        gp, gm = (
            rng.uniform(lim.g_min + 0.1 * span, lim.g_min + 0.9 * span, SHAPE).astype(np.float32)
            for _ in "+-"
        )
        tol = 0.02 * span
        rep = dev.program("W0", gp, gm, verify=True, tol=tol, max_iters=100)
        far = int((np.abs(rep.g_plus - gp) > 2 * tol).sum() + (np.abs(rep.g_minus - gm) > 2 * tol).sum())
        assert rep.gave_up is not None
        return rep.gave_up, far


def test_pcm_verify_does_not_give_up_on_working_devices() -> None:
    # two tiles, 65,536 devices, every one working and its target inside its own window: the
    # old firmware gave up on ~93 (Poisson sd ~10) and left ~46 (sd ~7) beyond 2 tol; this one
    # ~6 (sd ~2.5) and ~7 (sd ~2.7). The bound of 20 is > 5 sd above the new means and > 3.5 sd
    # below the old ones (measured old: 93 and 46 for these seeds)
    gave_up, far = (sum(v) for v in zip(*(_verify(seed) for seed in (0, 1)), strict=True))
    assert gave_up <= 20, f"write-verify gave up on {gave_up} working pcm devices"
    assert far <= 20, f"{far} working pcm devices read back more than 2 tol from their targets"
