"""A modern Hopfield memory larger than the board's tiles: the error names the memory (its
patterns, dimension and tile) and the fix, on a bare board and on a placed (tiled) one."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import ConfigurationError, open_device
from hil.boards import open_board
from hil.mhn import MHNBlock, RetrievalBudget, equidistant_patterns

SMALL = "emulator://?preset=ideal&seed=0&tile_rows_max=16&tile_cols_max=16"


def test_a_memory_past_a_bare_boards_tile_says_how_to_place_it() -> None:
    xi = equidistant_patterns(20, 24, 1.0).float().numpy()  # a 25 x 20 tile
    with open_device(SMALL) as dev, pytest.raises(ConfigurationError) as err:
        MHNBlock(dev, xi, beta=2.0)
    msg = str(err.value)
    assert "20 patterns" in msg and "25 x 20" in msg and "16 x 16" in msg
    assert "hil.boards.open_board" in msg


def test_the_placed_memory_retrieves_as_on_one_large_tile() -> None:
    xi = equidistant_patterns(20, 24, 1.0).float().numpy()
    budget = RetrievalBudget(max_steps=20, tol=0.0)
    x0 = np.random.default_rng(0).uniform(xi.min(), xi.max(), (8, 24))
    with open_board(SMALL) as dev:
        got = MHNBlock(dev, xi, beta=30.0, budget=budget).retrieve(x0).x
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        want = MHNBlock(dev, xi, beta=30.0, budget=budget).retrieve(x0).x
    assert np.abs(got - want).max() < 1e-5


def test_a_memory_past_a_placed_boards_tiles_names_the_patterns() -> None:
    xi = equidistant_patterns(20, 24, 1.0).float().numpy()
    with open_board(SMALL + "&max_tiles=2") as dev, pytest.raises(ConfigurationError) as err:
        MHNBlock(dev, xi, beta=2.0)
    msg = str(err.value)
    assert "20 patterns" in msg and "4 needed, 2 available" in msg and "fewer patterns" in msg
    assert "EB blocks" not in msg  # the ff-EBM's fix does not apply to a memory


@pytest.mark.parametrize("beta", [0.0, -0.01, 1.0, 5.0, float("nan")])
def test_an_mhn_layers_nudge_out_of_range_is_refused_when_built(beta: float) -> None:
    from hil.mhn.layer import MHNLayer

    xi = np.random.default_rng(0).uniform(0, 1, (12, 6)).astype(np.float32)
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        blk = MHNBlock(dev, xi, beta=3.0, margin=0.1)
        with pytest.raises(ConfigurationError, match=r"MHNLayer beta \(the EP nudge\) must be in \(0, 1\)"):
            MHNLayer(blk, 8, beta=beta)


@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_ep_gradients_nudge_out_of_range_is_refused(beta: float) -> None:
    from hil.mhn.learn import ep_gradient

    xi = np.random.default_rng(0).uniform(0, 1, (8, 4)).astype(np.float32)
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        blk = MHNBlock(dev, xi, beta=3.0)
        x0 = np.full((2, 8), 0.5)
        with pytest.raises(ConfigurationError, match=r"beta_ep \(the EP nudge\) must be in \(0, 1\)"):
            ep_gradient(blk, x0, x0, beta_ep=beta)


def test_an_mhn_layers_input_of_the_wrong_width_or_range_names_the_layer() -> None:
    import torch

    from hil.mhn.layer import MHNLayer

    xi = np.random.default_rng(0).uniform(0, 1, (12, 6)).astype(np.float32)
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        layer = MHNLayer(MHNBlock(dev, xi, beta=3.0, margin=0.1), 8, beta=0.01)
        with pytest.raises(ConfigurationError, match=r"MHNLayer input: 8 features per sample .* got 7"):
            layer(torch.full((4, 7), 0.5))
        with pytest.raises(
            ConfigurationError, match=r"MHNLayer input: .*state box \[-0.09\d*, 1.09\d*\].* 2"
        ):
            layer(torch.full((4, 8), 2.0))
        assert layer(torch.full((4, 2, 4), 0.5)).shape == (4, 4)  # flattened per sample


def test_a_board_of_a_gain_below_one_stores_the_memory(emulated_board, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The memory's tile (mode mvm: no settle, so no use for a gain) was configured at gain 1:
    a board declaring max_gain 0.5 refused it naming 'Topology.gain', which no option of
    `hil mhn phase` sets. It is now configured within the board's gain (served over pyvisa-py
    SCPI/TCP)."""
    from typer.testing import CliRunner

    from hil.cli import app

    served = emulated_board("emulator://?preset=ideal&seed=0&max_gain=0.5")
    args = ["mhn", "phase", "--device", served.uri("visa-tcp"), "--n", "4", "--d", "8", "--starts", "4"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "phase")])
    assert res.exit_code == 0, res.output
    assert "Topology.gain" not in res.output
    assert served.device.safety().refused == 0
