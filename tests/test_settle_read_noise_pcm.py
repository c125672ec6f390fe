"""A settle's read noise on `pcm` is the devices' own, state-dependent noise, as an mvm's and a
host read's are, not the nominal mid-window figure.

pcm's read noise grows with the conductance (as G^0.35 over most of the window, 0 at G = 0).
With the host's default mapping (the sign picks the device that carries a weight, its partner
sits at g_min = 0) half the devices sit at the bottom: for N(0, 0.3) weights the RMS of the
devices' read-noise stds is 0.081 uS, against the nominal 0.15 uS the settles took, so an
analog settle on pcm drew 1.85 times the noise an mvm of the same tile draws."""

from __future__ import annotations

import math

import numpy as np
import torch

from drivers import Topology, open_device


def test_a_pcm_settle_takes_the_read_noise_an_mvm_takes() -> None:
    with open_device("emulator://?preset=pcm&seed=0") as dev:
        dev.configure(Topology.layered([64, 32, 10]))
        lim = dev.info.limits
        span = lim.g_max - lim.g_min
        rng = np.random.default_rng(0)
        board = dev.board
        for name in ("W0", "W1"):
            w = rng.normal(0.0, 0.3, dev.topology.tile_shape(name)).astype(np.float32)
            g_plus = lim.g_min + np.clip(w, 0.0, 1.0) * span
            g_minus = lim.g_min + np.clip(-w, 0.0, 1.0) * span
            dev.program(name, g_plus, g_minus, verify=False)
        dev.settle({"s0": rng.uniform(0.0, 1.0, (4, 64)).astype(np.float32)})
        (_sources, plan), *_ = board.engine.planner.plans.values()
        for term in plan.const_terms + plan.dyn_terms:
            for *_g, k in term.dsts:
                tiles = [board.tile(n) for n in ("W0", "W1")]
                # an mvm's output std for a unit input (w_max 1): sqrt(2) sigma atten / span
                mvm_k = [float(t.mvm_noise_std(torch.tensor([[1.0]]).expand(1, 1))[0]) ** 2 for t in tiles]
                assert any(math.isclose(k, m, rel_tol=1e-6) for m in mvm_k), (k, mvm_k)
        rms = board.tile("W0").read_noise_rms()
        assert rms < 0.7 * 0.15e-6  # the nominal figure is far off: the old settles' noise
