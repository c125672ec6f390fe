"""Run logs: the store layout read with plain zarr, buffering and consistency, resume after
SIGKILL, garbage and truncated stores, and the inspect/plot commands.

Run as a script, this file is the toy training loop of the SIGKILL test:
``python tests/test_runlog.py RUN [--resume] [--sleep S] [--flush S]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from drivers import Nudge, ProgramReport, SettleBudget, Topology, open_device
from hil.runlog import (
    DataOrder,
    RunLog,
    RunLogError,
    TraceConfig,
    open_for_resume,
    open_run,
    restore_training,
    training_state,
)
from hil.runlog.state import encode_state

ROOT = Path(__file__).resolve().parents[1]
URI = "emulator://?preset=ideal&seed=0"


# ---------------------------------------------------------------------------------- toy training
EPOCHS, BATCH, N, SNAPSHOT_EVERY = 4, 8, 96, 5


def toy_train(path: Path, *, resume: bool = False, sleep: float = 0.0, flush_every_s: float = 10.0) -> None:
    """A small shuffled-data classifier with dropout, Adam and a cosine schedule, drawing from
    the torch, numpy and Python RNGs; a snapshot every 5 steps and at the end."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, generator=gen)
    y = x[:, :4].argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    config = {"epochs": EPOCHS, "batch": BATCH, "lr": 0.02, "model": {"sizes": [8, 16, 4]}}
    if resume:
        log, state = open_for_resume(path)
    else:
        log, state = RunLog.create(path, config, flush_every_s=flush_every_s), None
    with log:
        extra = restore_training(state, model=model, optimizer=opt, scheduler=sched) if state else {}
        order = DataOrder.from_state(extra["order"]) if state else DataOrder(N, seed=2)
        step = extra.get("step", 0)
        for epoch, idx in order.batches(BATCH, EPOCHS):
            jitter = torch.from_numpy(np.random.normal(0, 0.05, (len(idx), 8))).float() + random.gauss(
                0, 0.05
            )
            out = model(x[idx] + jitter)
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            acc = float((out.argmax(1) == y[idx]).float().mean())
            log.metrics("train", step=step, epoch=epoch, loss=loss.item(), acc=acc)
            step += 1
            if order.pos == 0:
                sched.step()
                with torch.no_grad():
                    model.eval()
                    full = F.cross_entropy(model(x), y).item()
                    model.train()
                log.metrics("eval", step=step, epoch=epoch, loss=full, lr=sched.get_last_lr()[0])
            if step % SNAPSHOT_EVERY == 0 or order.epoch == EPOCHS:
                log.snapshot(
                    step,
                    training_state(
                        model=model, optimizer=opt, scheduler=sched, step=step, order=order.state()
                    ),
                )
            time.sleep(sleep)


def _script(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    ref, run = tmp_path / "ref.zarr", tmp_path / "run.zarr"
    subprocess.run(_script(str(ref)), check=True, env=_env(), cwd=ROOT, timeout=120)

    proc = subprocess.Popen(_script(str(run), "--sleep", "0.05", "--flush", "0.02"), env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while True:  # two snapshots committed and metrics flushed past the last one
            assert proc.poll() is None, "the training process ended before it was killed"
            assert time.monotonic() < deadline, "no snapshots appeared in time"
            try:
                root = zarr.open_group(str(run), mode="r")
                committed = root["snapshots"].attrs["committed"]
                if len(committed) >= 2:
                    snap_rows = root[f"snapshots/{committed[-1]}"].attrs["tables"]["metrics/train"]
                    if root["metrics/train"].attrs["rows"] > snap_rows:
                        break
            except (KeyError, FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    killed = open_run(run)  # opens and validates
    assert killed.status == "running" and not killed.complete
    last = killed.snapshot_attrs(killed.snapshots[-1])
    assert killed.tables["metrics/train"] > last["tables"]["metrics/train"]  # rows to be dropped
    order = killed.load_snapshot(killed.snapshots[-1])[1]["extra"]["order"]
    assert 0 < order["pos"] < N  # the snapshot it resumes from is mid-epoch

    subprocess.run(_script(str(run), "--resume"), check=True, env=_env(), cwd=ROOT, timeout=120)
    a, b = open_run(ref), open_run(run)
    assert b.complete and b.status == "complete"
    assert len(b.attrs["resumes"]) == 1 and b.attrs["resumes"][0]["status_before"] == "running"
    for table in ("metrics/train", "metrics/eval"):
        ta, tb = a.table(table), b.table(table)
        assert ta.keys() == tb.keys()
        np.testing.assert_array_equal(ta["step"], tb["step"])
        for col in ta:
            np.testing.assert_allclose(tb[col], ta[col], rtol=0, atol=1e-6, err_msg=f"{table}/{col}")
    assert len(a.table("metrics/train")["step"]) == EPOCHS * N // BATCH
    _, sa = a.load_snapshot(a.snapshots[-1])
    _, sb = b.load_snapshot(b.snapshots[-1])
    for name, w in sa["model"].items():
        torch.testing.assert_close(sb["model"][name], w, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- a full run
SIZES = [8, 16, 4]


def _make_run(path: Path, traces: TraceConfig | None = None) -> None:
    """A short run on the ideal emulator: settles with traces, tiles, programming, metrics."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, SIZES[0])).astype(np.float32)
    target = np.eye(SIZES[-1], dtype=np.float32)[rng.integers(0, SIZES[-1], 6)]
    topo = Topology.layered(SIZES, budget=SettleBudget(max_steps=30, tol=1e-4, dt=0.5))
    with open_device(URI) as dev, RunLog.create(path, {"sizes": SIZES, "beta": 0.2}, traces=traces) as log:
        log.set_device(dev.info, uri=URI)
        log.set_calibration("cal-test-1")
        dev.configure(topo)
        lim = dev.info.limits
        for step in range(4):
            for c in topo.couplings:
                rows, cols = topo.tile_shape(c.tile)
                w = rng.normal(0, 0.5, (rows, cols)).astype(np.float32)
                gp = lim.g_min + np.clip(w, 0, 1) * (lim.g_max - lim.g_min)
                gm = lim.g_min + np.clip(-w, 0, 1) * (lim.g_max - lim.g_min)
                rep = dev.program(c.tile, gp.astype(np.float32), gm.astype(np.float32))
                log.program(step, rep, conductances=step % 2 == 0)
                log.tile(step, c.tile, weights=w)
            k = log.trace_for(step)
            free = dev.settle({"s0": x}, trace=k)
            log.settle(step, "free", free)
            for sign, name in ((1, "nudged+"), (-1, "nudged-")):
                eq = dev.settle(
                    {"s0": x}, nudge={"s2": Nudge(sign * 0.2, target=target)}, init=free.states, trace=k
                )
                log.settle(step, name, eq)
            log.metrics("train", step=step, epoch=step // 2, loss=1.0 / (step + 1), acc=0.25 * step)
            if step % 2 == 1:
                log.metrics("eval", step=step, epoch=step // 2, acc=0.2 * step)
                log.snapshot(step, {"w": torch.arange(3.0), "step": step})


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "template.zarr"
    _make_run(path, TraceConfig(every_steps=2, settle_stride=2, samples=4))
    return path


@pytest.fixture
def copy(template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(template, dst)
    return dst


def test_plain_zarr_reader_follows_the_spec(template: Path) -> None:
    """Only zarr and numpy below, as docs/runlog.md describes."""
    root = zarr.open_group(str(template), mode="r")
    attrs = root.attrs.asdict()
    assert attrs["format"] == "xbar-hil.runlog" and attrs["format_version"] == 1
    assert attrs["status"] == "complete" and attrs["complete"] is True
    assert attrs["config"] == {"sizes": SIZES, "beta": 0.2}
    assert attrs["calibration_id"] == "cal-test-1"
    assert attrs["device"]["preset"] == "ideal" and attrs["device"]["idn"].count(",") == 3
    assert set(attrs["device"]["identity"]) == {"manufacturer", "model", "serial", "firmware"}
    assert {"python", "torch", "numpy", "zarr", "xbar-hil"} <= set(attrs["versions"])
    assert attrs["log"]["traces"] == {"every_steps": 2, "settle_stride": 2, "samples": 4}

    train = root["metrics/train"]
    n = train.attrs["rows"]
    assert n == 4 and train["loss"].shape == (4,)  # closed: arrays exactly `rows` long
    np.testing.assert_array_equal(train["step"][:n], np.arange(4))
    np.testing.assert_allclose(train["loss"][:n], 1.0 / np.arange(1, 5))
    assert train["loss"].dtype == np.float64 and train["step"].dtype == np.int64
    ev = root["metrics/eval"]
    np.testing.assert_allclose(ev["acc"][: ev.attrs["rows"]], [0.2, 0.6])

    settles, points = root["traces/settles"], root["traces/points"]
    m = settles.attrs["rows"]
    assert m == 6  # 3 phases at steps 0 and 2
    phases = settles.attrs["labels"]["phase"]
    assert phases == ["free", "nudged+", "nudged-"]
    np.testing.assert_array_equal(settles["step"][:m], [0, 0, 0, 2, 2, 2])
    for i in range(m):
        a, k = int(settles["start"][i]), int(settles["length"][i])
        steps = points["settle_step"][a : a + k]
        assert steps[0] == 0 and steps[-1] == settles["steps"][i]
        assert np.all(steps[1:-1] % 2 == 0)  # settle stride 2
        assert points["energy"][a : a + k].shape == (k, 4)
        assert points["state.s1"][a : a + k].shape == (k, 4, SIZES[1])
        assert np.isfinite(points["energy_mean"][a : a + k]).all()

    w0 = root["tiles/W0"]
    r = w0.attrs["rows"]
    assert r == 6  # 4 weight snapshots + 2 conductance snapshots of programming reports
    assert w0["weights"][:r].shape == (r, SIZES[0] + 1, SIZES[1])
    gp = w0["g_plus"][:r]
    assert np.isnan(gp[1]).all() and np.isfinite(gp[0]).all()  # G logged at steps 0 and 2 only
    prog = root["program/W0"]
    assert prog.attrs["rows"] == 4 and prog["pulses"].dtype == np.int64

    committed = root["snapshots"].attrs["committed"]
    assert committed == ["000000", "000001"]
    snap = root[f"snapshots/{committed[-1]}"]
    assert snap.attrs["step"] == 3 and snap.attrs["tables"]["metrics/train"] == 4
    assert snap.attrs["state"]["w"]["__array__"] in set(snap.array_keys())


def test_metrics_are_written_in_chunk_aligned_blocks(tmp_path: Path) -> None:
    log = RunLog.create(tmp_path / "m.zarr", {}, flush_every_s=3600)
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")
    for i in range(5000):
        log.metrics("train", step=i, loss=float(i))
    chunk = group["metrics/train"].attrs["chunk_rows"]
    assert chunk == 4096
    assert group["metrics/train"].attrs["rows"] == chunk  # one whole chunk flushed, the rest buffered
    log.metrics("train", step=5000, loss=1.0, extra=2.0)  # a new metric appears late
    log.close()
    t = open_run(tmp_path / "m.zarr").table("metrics/train")
    assert len(t["loss"]) == 5001 and t["loss"][4999] == 4999.0
    assert np.isnan(t["extra"][:5000]).all() and t["extra"][5000] == 2.0


def test_chunks_written_past_zarr_read_back_through_plain_zarr(tmp_path: Path) -> None:
    """Table chunks and snapshot arrays go straight to the store (hil.runlog.chunks); plain
    zarr reads them, checksums included, as if zarr had written them."""
    from hil.runlog.chunks import chunk_writer

    path = tmp_path / "d.zarr"
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    log = RunLog.create(path, {}, flush_every_s=3600)
    for i in range(3):  # three flushes into the same chunk: its earlier rows come from memory
        for j in range(7):
            log.metrics("train", step=7 * i + j, loss=float(7 * i + j))
        log.tile(i, "W", weights=w + i)
        log.snapshot(7 * i + 6, {"w": torch.from_numpy(w + i), "n": np.arange(i + 3)})
    assert chunk_writer(log._tables["metrics/train"].arrays["loss"]) is not None
    log.close()
    root = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(root["metrics/train/loss"][:], np.arange(21.0))
    np.testing.assert_array_equal(root["tiles/W/weights"][:], np.stack([w, w + 1, w + 2]))
    for k, name in enumerate(root["snapshots"].attrs["committed"]):
        snap = root[f"snapshots/{name}"]
        state = snap.attrs["state"]
        np.testing.assert_array_equal(snap[state["w"]["__array__"]][:], w + k)
        np.testing.assert_array_equal(snap[state["n"]["__array__"]][:], np.arange(k + 3))
    run = open_run(path, verify=True)
    assert run.table("metrics/train")["step"].tolist() == list(range(21))
    assert not list(path.rglob("*.partial"))


def test_flush_interrupted_before_the_row_count_leaves_a_consistent_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.zarr"
    log = RunLog.create(path, {})
    for i in range(10):
        log.metrics("train", step=i, loss=float(i))
    log.snapshot(10, {"step": 10})
    for i in range(10, 15):
        log.metrics("train", step=i, loss=float(i))
    from hil.runlog.table import Table

    def killed(self: Table, rows: int) -> None:
        raise KeyboardInterrupt  # as if the process died between the arrays and the row count

    monkeypatch.setattr(Table, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        log.flush()
    monkeypatch.undo()
    root = zarr.open_group(str(path), mode="r")
    assert root["metrics/train"].attrs["rows"] == 10  # the count still says 10 ...
    loss = root["metrics/train"]["loss"]
    np.testing.assert_array_equal(loss[10:15], np.arange(10.0, 15.0))  # ... 15 were written
    run = open_run(path)
    assert len(run.table("metrics/train")["loss"]) == 10
    log2, state = open_for_resume(path)
    assert state == {"step": 10} and log2.resumed_step == 10
    log2.metrics("train", step=10, loss=-1.0)
    log2.close()
    t = open_run(path).table("metrics/train")
    np.testing.assert_array_equal(t["loss"], [*range(10), -1.0])


def test_a_new_tables_first_flush_interrupted_before_its_columns_are_committed_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The distributed audit: torchrun stopped rank 0 while its run log's first flush of a new
    table had created the column arrays but not yet committed their names; every resume then
    failed on "An array exists in store ... at path 'metrics/test/step'". The orphans of an
    uncommitted flush are replaced, as rows past the committed count are."""
    path = tmp_path / "o.zarr"
    log = RunLog.create(path, {})
    for i in range(4):
        log.metrics("train", step=i, loss=float(i))
    log.snapshot(4, {"step": 4})
    log.metrics("test", step=4, acc=0.5)
    from hil.runlog.table import Table

    def killed(self: Table, rows: int) -> None:
        raise KeyboardInterrupt  # the process died between the arrays and their names

    monkeypatch.setattr(Table, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        log.flush()
    monkeypatch.undo()
    root = zarr.open_group(str(path), mode="r")
    assert "acc" in root["metrics/test"] and root["metrics/test"].attrs["columns"] == []
    log2, state = open_for_resume(path)
    assert state == {"step": 4}
    log2.metrics("test", step=4, acc=0.75)
    log2.close()
    assert open_run(path, verify=True).table("metrics/test")["acc"].tolist() == [0.75]


def test_exception_marks_failed_and_keeps_flushed_rows(tmp_path: Path) -> None:
    path = tmp_path / "f.zarr"
    with pytest.raises(RuntimeError), RunLog.create(path, {"a": 1}) as log:
        log.metrics("train", step=0, loss=0.5)
        raise RuntimeError("board on fire")
    run = open_run(path)
    assert run.status == "failed" and not run.complete
    assert run.attrs["error"] == "RuntimeError: board on fire"
    assert run.table("metrics/train")["loss"].tolist() == [0.5]
    with pytest.raises(RunLogError, match="closed"):
        log.metrics("train", step=1, loss=0.1)
    log2, state = open_for_resume(path)  # a failed run without snapshots starts over
    assert state is None and open_run(path).tables["metrics/train"] == 0
    log2.close()


def test_state_round_trip_without_pickle(tmp_path: Path) -> None:
    opt_like = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]}
    state = {
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "i64": torch.arange(4),
        "empty": torch.zeros(0, 3),
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "npscalar": np.float32(2.5),
        "big": 2**70,
        "nan": math.nan,
        "inf": -math.inf,
        "tup": (1, "a", None, True),
        "__dunder": 1,
        "opt": opt_like,
    }
    state["zeros"] = torch.zeros(5)  # a chunk equal to the fill value is still written
    state["scalar"] = torch.tensor(7, dtype=torch.int32)
    json.dumps(encode_state(state)[0], allow_nan=False)  # the tree is plain JSON
    with RunLog.create(tmp_path / "s.zarr", {}) as log:
        log.snapshot(3, state)
    step, back = open_run(tmp_path / "s.zarr").load_snapshot("000000")  # through the store
    assert step == 3 and torch.equal(back["zeros"], torch.zeros(5))
    assert back["scalar"].dtype == torch.int32 and back["scalar"].item() == 7
    assert back["bf16"].dtype == torch.bfloat16 and back["bf16"].tolist() == [1.5, -2.0]
    assert torch.equal(back["i64"], torch.arange(4)) and back["empty"].shape == (0, 3)
    assert back["np"].dtype == np.int16 and back["npscalar"] == np.float32(2.5)
    assert back["big"] == 2**70 and math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["tup"] == (1, "a", None, True) and back["__dunder"] == 1
    assert back["opt"]["state"][0]["step"].item() == 3.0
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    with pytest.raises(RunLogError, match=r"state x\.f: cannot store a function"):
        encode_state({"x": {"f": lambda: 0}})


def test_trace_sub_sampling_and_snapshot_pruning(tmp_path: Path) -> None:
    log = RunLog.create(
        tmp_path / "s.zarr", {}, traces=TraceConfig(every_steps=10, settle_stride=3), keep_snapshots=2
    )
    assert [log.trace_for(s) for s in (0, 5, 10, 11, 20)] == [3, 0, 3, 0, 3]
    for s in range(4):
        log.snapshot(s, {"s": s})
    log.close()
    run = open_run(tmp_path / "s.zarr")
    assert run.snapshots == ["000002", "000003"]
    assert (
        sorted(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["snapshots"].group_keys()) == run.snapshots
    )
    off = RunLog.create(tmp_path / "o.zarr", {}, traces=TraceConfig(every_steps=0))
    assert off.trace_for(0) == 0
    off.close()


def test_snapshot_cadence_waits_its_interval_and_always_takes_the_last_epoch(tmp_path: Path) -> None:
    log = RunLog.create(tmp_path / "c.zarr", {}, snapshot_every_s=3600.0)
    assert not log.snapshot_due() and log.snapshot_due(last=True)
    log.configure(snapshot_every_s=0.0, flush_every_s=5.0, keep_snapshots=0)
    assert log.snapshot_due() and (log.flush_every_s, log.keep_snapshots) == (5.0, 0)
    assert log.root.attrs["log"]["snapshot_every_s"] == 0.0  # recorded for the run's reader
    log.configure(snapshot_every_s=0.05, flush_every_s=5.0, keep_snapshots=0)
    log.snapshot(1, {"s": 1})
    assert not log.snapshot_due()  # the interval counts from the last snapshot
    time.sleep(0.06)
    assert log.snapshot_due()
    log.close()


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_trainer_snapshots_every_epoch_or_only_the_last_by_the_log_config(
    every_s: float, tmp_path: Path
) -> None:
    """`log.snapshot_every_s` reaches the run log through the trainer: 0 gives a snapshot per
    epoch (the last 3 kept), an hour only the last epoch's, at the final step."""
    from hil.config import ConfigError, load_config, validate
    from hil.train_classifier import train_classifier

    sets = ["train.epochs=4", "data.limit_train=64", "data.limit_test=32", "model.sizes=[64,16,10]"]
    cfg = load_config(None, [*sets, f"log.snapshot_every_s={every_s}"])
    with RunLog.create(tmp_path / "t.zarr", cfg) as log:
        res = train_classifier(cfg, log=log)
    res.model.close()
    run = open_run(tmp_path / "t.zarr")
    steps = [run.snapshot_attrs(name)["step"] for name in run.snapshots]
    per_epoch = 64 // cfg.train.batch_size + (64 % cfg.train.batch_size > 0)
    assert steps == ([2 * per_epoch, 3 * per_epoch, 4 * per_epoch] if every_s == 0 else [4 * per_epoch])
    assert run.attrs["log"]["snapshot_every_s"] == every_s
    with pytest.raises(ConfigError, match="snapshot_every_s"):
        validate(load_config(None, ["log.snapshot_every_s=-1"]))


def test_resume_refusals(copy: Path, tmp_path: Path) -> None:
    with pytest.raises(RunLogError, match="complete; nothing to resume"):
        open_for_resume(copy)
    path = tmp_path / "live.zarr"
    log = RunLog.create(path, {})
    log.flush()
    zarr.open_group(str(path), mode="r+").attrs.update(
        {"writer": {**log.root.attrs["writer"], "pid": os.getppid()}}
    )
    with pytest.raises(RunLogError, match=f"still being written by process {os.getppid()}"):
        open_for_resume(path)
    with pytest.raises(RunLogError, match="already exists"):
        RunLog.create(path, {})
    # the crash audit: overwrite deleted part of a live store under its writer
    with pytest.raises(
        RunLogError, match=r"still being written by process .*cannot be overwritten while it runs"
    ):
        RunLog.create(path, {}, overwrite=True)
    assert open_run(path, validate=False).status == "running"  # nothing of it was removed
    with pytest.raises(RunLogError, match="plain JSON"):
        RunLog.create(tmp_path / "bad.zarr", {"x": float("nan")})


def test_program_report_fields(tmp_path: Path) -> None:
    rep = ProgramReport("W0", np.ones((2, 2)), np.ones((2, 2)), 3, 40, 1e-7, 0.75, 1e-9, 2e-3, gave_up=2)
    unknown = ProgramReport("W0", np.ones((2, 2)), np.ones((2, 2)), 3, 40, 1e-7, 0.75, 1e-9, 2e-3)
    with RunLog.create(tmp_path / "p.zarr", {}) as log:
        log.program(7, rep)
        log.program(8, unknown)  # a board that did not report gave_up: -1
    t = open_run(tmp_path / "p.zarr").table("program/W0")
    assert {k: v.tolist() for k, v in t.items()} == {
        "step": [7, 8],
        "iterations": [3, 3],
        "pulses": [40, 40],
        "residual_max": [1e-7, 1e-7],
        "within_tol": [0.75, 0.75],
        "energy_j": [1e-9, 1e-9],
        "time_s": [2e-3, 2e-3],
        "gave_up": [2, -1],
    }


# ---------------------------------------------------------------------------------- bad stores
def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _no_format(p: Path) -> None:
    zarr.open_group(str(p), mode="w").attrs["x"] = 1


BAD = {
    "missing": (lambda p: shutil.rmtree(p), "no such file"),
    "a file": (lambda p: (shutil.rmtree(p), p.write_text("hello")), "a file, not a zarr store"),
    "empty folder": (lambda p: (shutil.rmtree(p), p.mkdir()), r"no zarr\.json"),
    "garbage root json": (lambda p: (p / "zarr.json").write_text("{not json"), "unreadable zarr.json"),
    "truncated root json": (lambda p: _cut(p / "zarr.json"), "unreadable zarr.json"),
    "not a run log": (lambda p: (shutil.rmtree(p), _no_format(p)), "not an xbar-hil run log"),
    "missing chunk": (lambda p: (p / "metrics/train/loss/c/0").unlink(), "chunk .* is missing"),
    "missing column": (lambda p: shutil.rmtree(p / "metrics/train/acc"), "acc is missing"),
    "missing snapshot": (lambda p: shutil.rmtree(p / "snapshots/000001"), "listed but missing"),
    "missing snapshot chunk": (
        lambda p: next(
            f for f in sorted((p / "snapshots/000001").rglob("*")) if f.is_file() and "c" in f.parts
        ).unlink(),
        r"chunk snapshots/000001/.* is missing",
    ),
    "truncated table json": (lambda p: _cut(p / "traces/points/zarr.json"), "cannot list traces"),
    "cut chunk": (lambda p: _cut(p / "metrics/train/loss/c/0"), "cannot read metrics/train/loss"),
}


# a resume falls back past a damaged newest snapshot to an older whole one (the crash audit:
# a missing directory or chunk in the newest snapshot blocked the resume)
FALLS_BACK = {"missing snapshot", "missing snapshot chunk"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_stores_give_one_line_errors(case: str, copy: Path) -> None:
    from typer.testing import CliRunner

    from hil.cli import app

    zarr.open_group(str(copy), mode="r+").attrs.update({"status": "running", "complete": False})  # killed
    damage, message = BAD[case]
    damage(copy)
    runner = CliRunner()
    for args in (["inspect", str(copy)], ["plot", str(copy), "--out", str(copy.parent / "plots")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        err = result.stderr.strip()
        assert "\n" not in err and "Traceback" not in err
        assert err.startswith(f"error: {copy}"), err
        assert re.search(message, err), err
    if case in FALLS_BACK:  # the newest snapshot is damaged, an older one whole: resume from it
        log, state = open_for_resume(copy)
        with log:
            assert state is not None and re.search(message, " ".join(log.fallback_notes()))
        return
    with pytest.raises(RunLogError, match=message) as info:
        open_for_resume(copy)
    assert str(info.value).startswith(str(copy))


# ---------------------------------------------------------------------------------- the commands
def test_inspect_and_plot(template: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hil.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(template)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("status       complete", "preset ideal", "cal-test-1", "sizes = [8, 16, 4]", "loss", "acc"):
        assert text in out, text
    assert "train: 4 rows, steps 0..3, epochs 0..1" in out
    assert "6 settles at 2 training steps (free 2, nudged+ 2, nudged- 2)" in out
    assert "snapshots    2 kept, last at step 3" in out

    dest = tmp_path / "plots"
    result = runner.invoke(app, ["plot", str(template), "--out", str(dest)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in dest.iterdir())
    assert names == [
        "accuracy.png",
        "conductance_W0.png",
        "conductance_W1.png",
        "loss.png",
        "settle_energy.png",
    ]
    for p in dest.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert "note: no other metrics" in result.stdout


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the toy training loop of the SIGKILL test")
    parser.add_argument("run", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--flush", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    toy_train(args.run, resume=args.resume, sleep=args.sleep, flush_every_s=args.flush)


def test_snapshots_with_and_without_the_global_generators_resume(tmp_path: Path) -> None:
    """The trainers' snapshots no longer carry the process's global generator states
    (`training_state(global_rng=False)`: their runs never draw from them); a snapshot that
    has them (an older store, or a loop of one's own) still resumes with them or without."""
    model = nn.Linear(3, 2)
    for global_rng in (True, False):
        path = tmp_path / f"rng-{global_rng}.zarr"
        log = RunLog.create(path, {"seed": 0})
        log.snapshot(1, training_state(model=model, step=1, global_rng=global_rng))
        log.fail("stopped")  # a failed run, as a resume finds it
        resumed, state = open_for_resume(path)
        assert state is not None and ("rng" in state) is global_rng
        assert restore_training(state, model=model, global_rng=False) == {"step": 1}
        if global_rng:
            with torch.random.fork_rng(devices=[]):
                assert restore_training(state, model=model) == {"step": 1}
        else:
            with pytest.raises(RunLogError, match=r"no global RNG states.*global_rng=False"):
                restore_training(state, model=model)
        resumed.close()
