"""Data parallel training on the Ray board pool (`hil.distributed_ray`, docs/distributed.md):
two board actors of a local Ray instance are the two ranks of one job, compared with one board
trained in-process on the whole batch (the comparison of tests/test_distributed.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_distributed import RUN, _snapshots

from hil import distributed_pair
from hil.config import load_config
from hil.distributed_pair import final
from hil.sweep.ray_runner import Board
from hil.sweep.study import SweepError

ROOT = Path(__file__).resolve().parents[1]
# the ideal run of tests/test_distributed.py, shortened: 3 epochs of 16 batches of 25 (shards 13 and 12)
SHORT = [*RUN, "train.epochs=3"]  # the torchrun tests add train.shift; not needed here
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def executor() -> Iterator[Any]:
    """A local Ray instance declaring two emulated boards, b0 and b1, without URIs: the ranks
    train on the config's emulator, rank r with seed + 1000 r (as under torchrun)."""
    pytest.importorskip("ray")
    from hil.sweep.ray_runner import RayExecutor

    ex = RayExecutor([Board("b0"), Board("b1")], address="local", cpus_per_board=0.5)
    try:
        yield ex
    finally:
        ex.close()


@pytest.fixture(scope="module")
def one_board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "one.zarr"
    distributed_pair.one_board(out, SHORT)
    return out


def test_cli_runs_the_job_on_a_local_ray_instance(one_board: Path, tmp_path: Path) -> None:
    """`hil train classifier --distributed --ray-address local --board b0 --board b1`, a real
    subprocess with its own Ray instance (first in this module: before the fixture's Ray
    instance holds the boards b0 and b1)."""
    pytest.importorskip("ray")
    out = tmp_path / "cli.zarr"
    cmd = [
        sys.executable, "-m", "hil.cli", "train", "classifier", "--distributed", "--ray-address", "local",
        "--board", "b0", "--board", "b1", "--no-progress", "--out", str(out),
        *[a for s in SHORT for a in ("--set", s)],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "boards b0, b1 | restarts 0" in job.stdout.splitlines()[-1]
    w2, _, test2 = final(out)
    w1, _, _ = final(one_board)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-6, err_msg=k)
    assert f"test accuracy {test2['test_acc'][-1]:.2%}" in job.stdout


def test_cli_ray_options_need_distributed(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hil.cli import app

    result = CliRunner().invoke(
        app, ["train", "classifier", "--ray-address", "local", "--out", str(tmp_path / "r.zarr")]
    )
    assert result.exit_code == 2 and "--distributed" in result.stderr, result.output
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("grace", ["-1", "301", "nan"])
def test_cli_stop_grace_outside_its_bound_is_refused_before_ray_starts(tmp_path: Path, grace: str) -> None:
    """`--stop-grace` reaches the job's Ray executor, whose bound (0 to 300 s) refuses it before
    Ray is started: exit 2, one line naming the bound, no run log; without --ray-address it
    is refused as the other Ray options are."""
    from typer.testing import CliRunner

    from hil.cli import app

    out = tmp_path / "r.zarr"
    args = ["train", "classifier", "--distributed", "--out", str(out), "--stop-grace", grace]
    result = CliRunner().invoke(app, [*args, "--ray-address", "local", "--board", "b0=emulator://"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: stop_grace_s must be within [0, 300] s"), result.output
    alone = CliRunner().invoke(app, args)
    assert alone.exit_code == 2 and "--stop-grace go with --distributed" in alone.stderr, alone.output
    assert not out.exists()


def test_two_board_actors_equal_one_board_with_the_whole_batch(
    executor: Any, one_board: Path, tmp_path: Path
) -> None:
    from hil.distributed_ray import run_data_parallel

    out = tmp_path / "ray.zarr"
    t0 = time.perf_counter()
    res = run_data_parallel(executor, load_config(None, SHORT), out)
    print(f"ray data parallel, 2 ranks: {time.perf_counter() - t0:.1f} s")
    assert (res.boards, res.restarts, res.epochs) == (("b0", "b1"), 0, 3)
    w2, train2, test2 = final(out)
    w1, train1, test1 = final(one_board)
    for k in w1:
        assert np.abs(w1[k]).max() > 0.1  # trained weights, not zeros
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-6, err_msg=k)
    assert len(train2["loss"]) == 3 * 16
    np.testing.assert_allclose(train2["loss"], train1["loss"], rtol=1e-5)
    np.testing.assert_allclose(train2["acc"], train1["acc"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np.rint(test2["test_acc"] * 200), np.rint(test1["test_acc"] * 200))
    assert res.test_acc == pytest.approx(test2["test_acc"][-1])
    assert test1["test_acc"][-1] > 0.5  # it learned


def _kill_after_first_snapshot(executor: Any, out: Path, name: str) -> threading.Thread:
    import ray

    def watch() -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while _snapshots(out) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        ray.kill(executor.actors[name], no_restart=True)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_rank_restarts_the_job_from_the_last_snapshot(
    executor: Any, one_board: Path, tmp_path: Path
) -> None:
    """Kill rank 1's actor once the first epoch's snapshot is in the run log: the job is
    started again on fresh actors, resumes from that snapshot and ends as one board does."""
    from hil.distributed_ray import run_data_parallel
    from hil.runlog import open_run

    out = tmp_path / "killed.zarr"
    watcher = _kill_after_first_snapshot(executor, out, "b1")
    res = run_data_parallel(executor, load_config(None, SHORT), out, max_restarts=1)
    watcher.join()
    assert res.restarts == 1
    resumes = open_run(out).attrs.get("resumes", [])
    assert len(resumes) == 1 and 0 < resumes[0]["from_step"] < 3 * 16, resumes
    w, train, _ = final(out)
    w1, train1, _ = final(one_board)
    for k in w1:
        np.testing.assert_allclose(w[k], w1[k], rtol=0, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(train["loss"], train1["loss"], rtol=1e-5)


def test_without_restarts_a_killed_rank_says_what_to_rerun(executor: Any, tmp_path: Path) -> None:
    from hil.distributed_ray import run_data_parallel

    out = tmp_path / "failed.zarr"
    watcher = _kill_after_first_snapshot(executor, out, "b0")
    with pytest.raises(
        SweepError, match=r"failed 1 time\(s\) \(rank \d on board b\d.*--resume .*failed\.zarr --distributed"
    ):
        run_data_parallel(executor, load_config(None, SHORT), out, max_restarts=0)
    watcher.join()


def test_bad_restart_count_is_refused(executor: Any, tmp_path: Path) -> None:
    from hil.distributed_ray import run_data_parallel

    with pytest.raises(SweepError, match=r"max_restarts = 9: give 0 to 8"):
        run_data_parallel(executor, load_config(None, SHORT), tmp_path / "r.zarr", max_restarts=9)
