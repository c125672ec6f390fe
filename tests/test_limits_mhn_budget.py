"""A modern Hopfield block on a board that declares fewer settle steps than the host's default
budget (the safety audit of 2026-12-07), over the real SCPI server through pyvisa-py: the
block's topology asks the board for no settle (mode mvm), and its budget keeps within the
board's declared steps instead of being refused with a fix the block's user cannot apply."""

from __future__ import annotations

import numpy as np

from drivers import open_device
from emulator.server.launch import serve
from hil.mhn import MHNBlock, RetrievalBudget, equidistant_patterns


def test_an_mhn_block_runs_on_an_mvm_board_of_few_settle_steps() -> None:
    board = "emulator://?preset=ideal&seed=0&max_settle_steps=50&capabilities=mvm,program_verify"
    served = serve(board, framed_port=None, scpi_pty=False, framed_pty=False)
    try:
        with open_device(served.uris["visa-tcp"]) as dev:
            assert dev.info.limits.max_settle_steps == 50
            xi = equidistant_patterns(4, 8, 1.0).float().numpy()  # 4 patterns of 8 dimensions
            block = MHNBlock(dev, xi, beta=30.0, budget=RetrievalBudget(max_steps=20, tol=0.0))
            assert dev.topology is not None and dev.topology.budget.max_steps <= 50
            x0 = xi.T[:2] * 0.8  # near patterns 0 and 1
            got = block.retrieve(x0).x
            near = np.argmin(((np.asarray(got)[:, None, :] - xi.T[None]) ** 2).sum(-1), axis=1)
            assert near.tolist() == [0, 1]
        assert served.device.safety().refused == 0
        assert served.device.safety().violations == 0
    finally:
        served.close()
