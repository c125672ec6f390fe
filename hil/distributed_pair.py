"""One recipe trained twice: by a real `torchrun` job of two ranks (`hil train classifier
--distributed`, each rank on its own emulated board) and by one board in this process, for
comparing the two runs' logs (docs/distributed.md, "Noisy boards draw their own noise").

`rram_pair` is that comparison on the rram boards of one board seed, shared by
tests/test_distributed.py (the fast test on one seed, the slow one on three) and
benchmarks/distributed_noisy_boards.py; `torchrun_job`, `finish`, `one_board` and `final` are
its steps, which the tests also use for their own recipes. Imported by neither the command
line nor the trainers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

TORCHRUN = Path(sys.executable).with_name("torchrun")
# the folder holding this package: the jobs import the same `hil` as this process
ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240

# a recipe that trains on the noisy rram board (digits_98.toml's, smaller), whole test set;
# its last item is the board, which `rram_pair` replaces by the seed's
RRAM = [
    "data.limit_train=800", "model.sizes=[64,64,10]", "model.activation=soft_sigmoid:0.1", "train.epochs=6",
    "train.optimizer=adam", "train.lr=[0.002,0.001]", "train.batch_size=25",
    "device=emulator://?preset=rram&seed=0",
]  # fmt: skip


def sets(items: list[str]) -> list[str]:
    """``--set ITEM`` for each item."""
    return [a for s in items for a in ("--set", s)]


def torchrun_job(out: Path, recipe: list[str], max_restarts: int = 0) -> subprocess.Popen[str]:
    """Start `hil train classifier --distributed` on two ranks under torchrun (one thread each),
    its run log at `out`; stdout and stderr together in the job's stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        str(TORCHRUN), "--standalone", "--nproc-per-node", "2", f"--max-restarts={max_restarts}",
        "-m", "hil.cli", "train", "classifier", "--distributed", "--no-progress", "--out", str(out),
        *sets(recipe),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(job: subprocess.Popen[str]) -> str:
    """Wait for `job` (at most JOB_TIMEOUT_S) and return its output; a job that failed raises
    AssertionError with the output's end."""
    output, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    if job.returncode != 0:
        raise AssertionError(output[-4000:])
    return output


def one_board(out: Path, recipe: list[str]) -> None:
    """`hil train classifier` on one board in this process, its run log at `out`; a failed run
    raises AssertionError with its output."""
    from typer.testing import CliRunner

    from hil.cli import app

    result = CliRunner().invoke(
        app,
        ["train", "classifier", "--no-progress", "--out", str(out), *sets(recipe)],
        catch_exceptions=False,
    )
    if result.exit_code != 0:
        raise AssertionError(result.output)


def final(run_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(host weights of the last snapshot, train metrics, test metrics) of a complete run."""
    from hil.runlog import open_run

    run = open_run(run_path)
    if not run.complete:
        raise AssertionError(f"{run_path}: the run is not complete ({run.status})")
    _, state = run.load_snapshot(run.snapshots[-1])
    weights: dict[str, Any] = {k: v.numpy() for k, v in state["model"].items()}
    return weights, run.table("metrics/train"), run.table("metrics/test")


def rram_pair(out: Path, seed: int) -> tuple[float, float, bool]:
    """On board seed `seed`: a torchrun job of two ranks on rram boards (seeds `seed` and
    `seed` + 1000) and one rram board in this process, both the RRAM recipe, their run logs in
    `out`: (one board's final test accuracy, the two boards', whether their weights differ)."""
    recipe = [*RRAM[:-1], f"device=emulator://?preset=rram&seed={seed}"]
    job = torchrun_job(out / f"two{seed}.zarr", recipe)
    one_board(out / f"one{seed}.zarr", recipe)  # meanwhile, in this process
    finish(job)
    w2, _, test2 = final(out / f"two{seed}.zarr")
    w1, _, test1 = final(out / f"one{seed}.zarr")
    differ = any(not np.array_equal(w2[k], w1[k]) for k in w1)
    return float(test1["test_acc"][-1]), float(test2["test_acc"][-1]), differ
