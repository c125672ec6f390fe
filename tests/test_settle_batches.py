"""A settle of more samples than the board takes in one request goes as several
(`drivers.batches`): `hil train classifier --set train.batch_size=600` stopped at its first
step ("batch size of clamp 's0' exceeded: requested 1200, limit 1024", the centered nudged
phases settle the doubled batch as one) with a fix its user could not apply, and a board that
declares a smaller `max_batch` refused evaluations of 512 samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drivers import SettleBudget, Topology, open_device
from drivers.batches import _joined_trace
from emulator.server.launch import serve
from hil.cli import app
from hil.data import load_digits
from hil.ep import EBBlock

IDEAL = "emulator://?preset=ideal&seed=0"


def _block(dev) -> EBBlock:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    w = {"W0": 0.3 * torch.randn(65, 32, generator=gen), "W1": 0.3 * torch.randn(33, 10, generator=gen)}
    topo = Topology.layered([64, 32, 10], budget=SettleBudget(max_steps=25, tol=0.0))
    return EBBlock(dev, topo, weights=w)


def test_a_batch_past_the_boards_max_batch_settles_in_chunks_over_the_wire() -> None:
    """A board behind the framed protocol over TCP declares max_batch 8: a free settle of 20
    samples (with its trace) and centered EP (40 samples nudged) give the states and gradients
    of one request on a board that takes them all, and the board refused nothing."""
    x = load_digits().x_train[:20].float()
    grad = torch.linspace(-1, 1, 200).reshape(20, 10)
    served = serve(IDEAL + "&max_batch=8", scpi_port=None, scpi_pty=False, framed_pty=False)
    try:
        with open_device(served.uris["serial-socket"]) as small, open_device(IDEAL) as whole:
            assert small.info.limits.max_batch == 8
            blk_s, blk_w = _block(small), _block(whole)
            assert blk_s.settle_batch_most() == 8
            f_s, f_w = blk_s.free(x, trace=True), blk_w.free(x, trace=True)
            assert f_s.steps == f_w.steps == 25 and f_s.converged == f_w.converged
            for g in ("s1", "s2"):
                np.testing.assert_allclose(f_s.states[g], f_w.states[g], rtol=0, atol=1e-6)
                assert (
                    f_s.trace[g].shape
                    == f_w.trace[g].shape
                    == (len(f_w.trace["step"]), 20, 10 if g == "s2" else 32)
                )
                np.testing.assert_allclose(f_s.trace[g], f_w.trace[g], rtol=0, atol=1e-6)
            np.testing.assert_allclose(f_s.energy, f_w.energy, rtol=1e-5, atol=1e-7)
            r_s = blk_s.ep(x, grad=grad, beta=0.1, free=f_s)
            r_w = blk_w.ep(x, grad=grad, beta=0.1, free=f_w)
            for k in ("W0", "W1"):
                a, b = r_s.grads[k].numpy(), r_w.grads[k].numpy()
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()), err_msg=k)
            counters = served.device.safety()
            assert counters.refused == 0 and counters.violations == 0
    finally:
        served.close()


def test_a_training_batch_past_the_boards_max_batch_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The CLI with batches of 600: the nudged phases settle 1200 samples, past the ideal
    board's 1024; before, the run stopped at its first step."""
    result = CliRunner().invoke(
        app,
        ["train", "classifier", "--out", str(tmp_path / "run"), "--set", "train.batch_size=600",
         "--set", "train.epochs=1", "--set", "data.limit_train=700", "--set", "data.limit_test=100"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output


def test_chunks_that_stop_at_other_steps_join_into_one_trace() -> None:
    """A chunk that converged sooner keeps its last traced row for the steps it did not take."""
    first = {"step": np.array([0, 5, 10]), "s1": np.arange(3 * 2 * 1, dtype=np.float32).reshape(3, 2, 1)}
    second = {"step": np.array([0, 5]), "s1": np.full((2, 1, 1), 7, np.float32)}
    joined = _joined_trace([second, first])
    assert joined is not None
    assert joined["step"].tolist() == [0, 5, 10]
    assert joined["s1"].shape == (3, 3, 1)
    assert joined["s1"][:, 0, 0].tolist() == [7, 7, 7]  # the shorter chunk, padded with its last row
    np.testing.assert_array_equal(joined["s1"][:, 1:], first["s1"])
    assert _joined_trace([first, None]) is None


@pytest.mark.parametrize("most", [0, -3])
def test_a_chunk_holds_at_least_one_sample(most: int) -> None:
    from drivers.batches import settle_in_chunks

    with pytest.raises(ValueError, match="at least one sample"):
        settle_in_chunks(lambda *a, **k: None, {"s0": np.zeros((2, 3))}, None, None, False, most)  # type: ignore[arg-type,return-value]
