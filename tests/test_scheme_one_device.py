"""A programming scheme keeps its per-tile state (mapping, written flag, stuck devices, the
conductances it expects) by tile name, so one scheme object used with two Devices (two boards
whose tiles have the same names, or two blocks' views of one shared board) programmed the
second with the first one's state: its first `program` was taken as an update of a tile
already written (an open-loop pulse update on rram left it 0.49 off the weights, where the
first board's write was 0.03 off). No trainer shares a scheme (each block makes its own);
a scheme passed by object to two blocks is now refused at the second Device, naming both and
the fix, and one Device goes on as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import SettleBudget, Topology, open_device
from drivers.shared import SharedBoard
from hil.ep import EBBlock
from hil.programming import make_scheme

TOPO = Topology.layered([6, 4, 3], budget=SettleBudget(max_steps=20))


def _weights() -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.5, 0.5, TOPO.tile_shape("W0")).astype(np.float32)


@pytest.mark.parametrize("name", ["pulsed", "verify"])
def test_one_scheme_on_a_second_board_is_refused_naming_both_and_the_fix(name: str) -> None:
    with (
        open_device("emulator://?preset=rram&seed=0") as a,
        open_device("emulator://?preset=rram&seed=1") as b,
    ):
        for d in (a, b):
            d.configure(TOPO)
        scheme = make_scheme(name, seed=0)
        w = _weights()
        first = scheme.program(a, "W0", w)
        assert [r.report.kind for r in first] == ["write"]
        with pytest.raises(ValueError) as info:
            scheme.program(b, "W0", w)
        text = str(info.value)
        assert f"this {name!r} programming scheme already holds the state of the tiles of" in text, text
        assert "tile 'W0' of another Device" in text and "One scheme serves one Device" in text, text
        assert "make one scheme per block" in text, text
        for call in (scheme.commit, scheme.drift, scheme.refresh):
            with pytest.raises(ValueError, match="One scheme serves one Device"):
                call(b, "W0")
        # the first board goes on as before: an update (no first write again), commit, drift
        scheme.program(a, "W0", w + 0.05)
        assert [h["kind"] for h in scheme.history] == ["write", "pulse" if name == "pulsed" else "write"]
        assert scheme.history[-1]["step"] == 1
        scheme.commit(a, "W0")
        assert np.isfinite(scheme.drift(a, "W0"))


def test_one_scheme_object_for_two_blocks_of_a_shared_board_is_refused() -> None:
    """Two blocks' views of one board name their tiles alike (W0, W1): the second block would
    have been programmed as if the first's tiles were its own."""
    with open_device("emulator://?preset=ideal&seed=0") as board:
        shared = SharedBoard(board)
        scheme = make_scheme("verify", seed=0)
        EBBlock(shared.view("b0"), TOPO, programming=scheme, seed=0)
        with pytest.raises(
            ValueError, match=r"another Device of the same board \(a wrapper, another block's view\)"
        ):
            EBBlock(shared.view("b1"), TOPO, programming=scheme, seed=1)


def test_each_block_with_its_own_scheme_by_name_still_trains_on_two_boards() -> None:
    with (
        open_device("emulator://?preset=rram&seed=0") as a,
        open_device("emulator://?preset=rram&seed=1") as b,
    ):
        blocks = [EBBlock(d, TOPO, programming="pulsed", seed=0) for d in (a, b)]
        for blk in blocks:
            with torch.no_grad():
                blk.weights["W0"].add_(0.01)
            blk.sync()
            assert blk.programming.device is blk.device
