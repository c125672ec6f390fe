"""Issue 16, class 6: run logs notice corruption. Every chunk carries a CRC-32C; a flipped byte in
any chunk makes `hil inspect` refuse the log naming the array, and `--resume` falls back to the
last intact snapshot and ends equal to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from drivers import Nudge, SettleBudget, Topology, open_device
from hil.cli import app
from hil.runlog import RunLog, RunLogCorrupt, RunLogError, TraceConfig, open_for_resume, open_run

URI = "emulator://?preset=ideal&seed=0"
SIZES = [8, 6, 4]


def _make_run(path: Path) -> None:
    """A short run on the ideal emulator with every kind of array: metrics, settle traces,
    tile snapshots, programming reports and resume snapshots."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, SIZES[0])).astype(np.float32)
    target = np.eye(SIZES[-1], dtype=np.float32)[rng.integers(0, SIZES[-1], 4)]
    topo = Topology.layered(SIZES, budget=SettleBudget(max_steps=20, tol=1e-4, dt=0.5))
    traces = TraceConfig(every_steps=2, settle_stride=2, samples=2)
    with open_device(URI) as dev, RunLog.create(path, {"sizes": SIZES}, traces=traces) as log:
        log.set_device(dev.info, uri=URI)
        dev.configure(topo)
        lim = dev.info.limits
        for step in range(4):
            for c in topo.couplings:
                rows, cols = topo.tile_shape(c.tile)
                w = rng.uniform(0, 1, (rows, cols)).astype(np.float32)
                g = (lim.g_min + w * (lim.g_max - lim.g_min)).astype(np.float32)
                rep = dev.program(c.tile, g, np.full_like(g, lim.g_min))
                log.program(step, rep, conductances=step % 2 == 0)
            free = dev.settle({"s0": x}, trace=log.trace_for(step))
            log.settle(step, "free", free)
            eq = dev.settle({"s0": x}, nudge={"s2": Nudge(0.2, target=target)}, init=free.states, trace=1)
            log.settle(step, "nudged+", eq)
            log.metrics("train", step=step, epoch=step // 2, loss=1.0 / (step + 1))
            if step % 2 == 1:
                log.metrics("eval", step=step, epoch=step // 2, acc=0.2 * step)
                log.snapshot(step, {"w": torch.arange(3.0), "n": np.int64(step), "step": step})


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "run.zarr"
    _make_run(path)
    return path


@pytest.fixture
def copy(template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(template, dst)
    return dst


def _arrays(store: Path) -> list[str]:
    """Every array of a store, as paths relative to it."""
    out = []
    for meta in sorted(store.rglob("zarr.json")):
        if json.loads(meta.read_text()).get("node_type") == "array":
            out.append(meta.parent.relative_to(store).as_posix())
    return out


def _flip(store: Path, array: str, chunk: str | None = None) -> str:
    """Flip one bit of one byte in the middle of a chunk file of `array`; return its key."""
    files = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    path = files[0] if chunk is None else store / array / chunk
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return path.relative_to(store / array).as_posix()


# One array of every kind a run log has.
KINDS = {
    "metrics": "metrics/train/loss",
    "metrics index": "metrics/eval/step",
    "settle table": "traces/settles/residual",
    "settle points": "traces/points/energy",
    "settle states": "traces/points/state.s1",
    "tile snapshot": "tiles/W0/g_plus",
    "programming report": "program/W1/pulses",
    "resume snapshot": "snapshots/000001/w",
}


def test_every_array_carries_a_checksum(template: Path) -> None:
    arrays = _arrays(template)
    assert set(KINDS.values()) <= set(arrays)
    for array in arrays:
        codecs = json.loads((template / array / "zarr.json").read_text())["codecs"]
        assert codecs[-1] == {"name": "crc32c"}, (array, codecs)


def test_a_clean_log_inspects_and_verifies(template: Path) -> None:
    open_run(template, verify=True)
    result = CliRunner().invoke(app, ["inspect", str(template)])
    assert result.exit_code == 0, result.output
    assert "snapshots    2 kept, last at step 3" in result.stdout


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_flipped_byte_in_any_chunk_is_refused_naming_the_array(kind: str, copy: Path) -> None:
    array = KINDS[kind]
    chunk = _flip(copy, array)
    result = CliRunner().invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"error: {copy}: cannot read {array}: chunk {chunk} is damaged"), err
    assert "checksum" in err
    with pytest.raises(RunLogCorrupt, match=f"cannot read {array}"):
        open_run(copy, verify=True)
    with pytest.raises(RunLogCorrupt, match=f"chunk {chunk}"):  # reading the array without verify
        run = open_run(copy)
        if array.startswith("snapshots/"):
            run.load_snapshot(array.split("/")[1])
        else:
            run.table(array.rsplit("/", 1)[0])


def test_damaged_newest_snapshot_falls_back_to_the_one_before(copy: Path) -> None:
    zarr.open_group(str(copy), mode="r+").attrs.update({"status": "running", "complete": False})  # killed
    before = open_run(copy)
    first = before.snapshot_attrs("000000")["tables"]
    _flip(copy, "snapshots/000001/w")
    log, state = open_for_resume(copy)
    assert state is not None and state["step"] == 1 and log.resumed_step == 1
    assert log._committed == ["000000"]
    (note,) = log.fallback_notes()  # what the train commands print on stderr
    assert note.startswith("snapshot 000001 is damaged (cannot read snapshots/000001/w: chunk c/0")
    assert note.endswith("resuming from step 1")
    with log:
        pass
    after = open_run(copy, verify=True)
    assert after.snapshots == ["000000"] and not (copy / "snapshots/000001").exists()
    assert after.tables == {p: first.get(p, 0) for p in before.tables}  # cut back to the snapshot
    entry = after.attrs["resumes"][-1]
    assert entry["from_step"] == 1
    assert [s["snapshot"] for s in entry["skipped"]] == ["000001"]
    assert "snapshots/000001/w" in entry["skipped"][0]["error"]
    result = CliRunner().invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 0, result.output
    assert "skipped damaged snapshot 000001: cannot read snapshots/000001/w" in result.stdout


def test_damaged_rows_below_every_snapshot_refuse_the_resume(copy: Path) -> None:
    zarr.open_group(str(copy), mode="r+").attrs.update({"status": "running", "complete": False})
    _flip(copy, "metrics/train/loss")
    with pytest.raises(RunLogCorrupt, match=r"no intact snapshot .*cannot read metrics/train/loss"):
        open_for_resume(copy)


def test_stores_without_checksums_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs written before the checksum (zstd only) open, verify, inspect and resume unchecked."""
    from zarr.codecs import ZstdCodec

    import hil.runlog.table
    import hil.runlog.writer

    old = (ZstdCodec(level=0, checksum=False),)
    monkeypatch.setattr(hil.runlog.table, "COMPRESSORS", old)
    monkeypatch.setattr(hil.runlog.writer, "COMPRESSORS", old)
    path = tmp_path / "old.zarr"
    _make_run(path)
    monkeypatch.undo()
    codecs = json.loads((path / "metrics/train/loss/zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "zstd"]
    open_run(path, verify=True)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    zarr.open_group(str(path), mode="r+").attrs.update({"status": "failed", "complete": False})
    log, state = open_for_resume(path)
    assert state is not None and state["step"] == 3
    with log:
        log.metrics("train", step=4, loss=0.1)  # a new column chunk gets the checksum, old ones keep none
    assert open_run(path, verify=True).table("metrics/train")["step"].tolist() == [0, 1, 2, 3, 4]


def test_resume_after_a_damaged_snapshot_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Ideal preset: a run that dies after its second epoch's snapshot, whose newest snapshot is
    then damaged, resumes from the first one and ends with the accuracy, weights and metrics
    of a run that never stopped."""
    from hil.config import load_config
    from hil.train_classifier import train_classifier

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(
            None,
            [
                "train.epochs=3",
                "data.limit_train=64",
                "data.limit_test=32",
                "model.sizes=[64,16,10]",
                "log.snapshot_every_s=0",
            ],
        )

        class Crash(RuntimeError):
            pass

        epochs: list[int] = []

        def crash(stats) -> None:
            epochs.append(stats.epoch)
            if len(epochs) == 2:
                raise Crash("simulated crash after epoch 2")

        path = tmp_path / "run.zarr"
        with pytest.raises(Crash), RunLog.create(path, cfg) as log:
            train_classifier(cfg, log=log, on_epoch=crash)
        killed = open_run(path)
        assert len(killed.snapshots) == 2
        newest = killed.snapshots[-1]
        array = sorted(zarr.open_group(str(path / "snapshots" / newest), mode="r").array_keys())[0]
        _flip(path, f"snapshots/{newest}/{array}")
        result = CliRunner().invoke(app, ["inspect", str(path)])
        assert result.exit_code == 2 and f"snapshots/{newest}/{array}" in result.stderr
        killed_copy = tmp_path / "killed.zarr"
        shutil.copytree(path, killed_copy)

        log, state = open_for_resume(path)
        assert state is not None and log.resumed_step == killed.snapshot_attrs(killed.snapshots[0])["step"]
        with log:
            resumed = train_classifier(cfg, log=log, state=state)
        again = tmp_path / "again.zarr"  # the same through the command, from a copy of the killed store
        shutil.copytree(killed_copy, again)
        result = CliRunner().invoke(app, ["train", "classifier", "--resume", str(again), "--no-progress"])
        assert result.exit_code == 0, result.output
        note = f"note: snapshot {newest} is damaged (cannot read snapshots/{newest}/"
        assert result.stderr.startswith(note), result.stderr
        straight_path = tmp_path / "straight.zarr"
        with RunLog.create(straight_path, cfg) as log:
            straight = train_classifier(cfg, log=log)
    finally:
        torch.set_num_threads(n)
    assert resumed.test_acc == straight.test_acc
    for tile, p in resumed.model.block.weights.items():
        torch.testing.assert_close(p, straight.model.block.weights[tile], atol=1e-6, rtol=0)
    ref = open_run(straight_path, verify=True)
    assert {"metrics/train", "metrics/test"} <= set(ref.tables)
    for store in (path, again):
        done = open_run(store, verify=True)
        assert done.complete and done.attrs["resumes"][-1]["skipped"][0]["snapshot"] == newest
        assert done.tables == ref.tables
        for table in ref.tables:  # metrics, tile weights, programming reports, traces
            a, b = done.table(table), ref.table(table)
            assert a.keys() == b.keys()
            for col in a:
                if "time" in col or "seconds" in col:
                    continue
                what = f"{store} {table}/{col}"
                np.testing.assert_allclose(a[col], b[col], atol=1e-6, rtol=0, err_msg=what)


def test_inspect_error_is_a_run_log_error() -> None:
    assert issubclass(RunLogCorrupt, RunLogError) and issubclass(RunLogCorrupt, ValueError)


def test_damaged_rows_after_the_newest_snapshot_are_cut_and_written_again(tmp_path: Path) -> None:
    """A damaged chunk holding only rows written after the newest snapshot does not cost that
    snapshot: the resume cuts the table back to the snapshot's rows (dropping the chunk) and the
    resumed run writes those rows again."""
    path = tmp_path / "run.zarr"

    def rows(log: RunLog, steps: range) -> None:
        for step in steps:
            log.metrics("train", step=step, loss=1.0 / (step + 1))

    with pytest.raises(RuntimeError), RunLog.create(path, {}, flush_every_s=1e9) as log:
        rows(log, range(4096))  # one whole chunk
        log.snapshot(4096, {"step": 4096})
        rows(log, range(4096, 4200))
        log.flush()
        raise RuntimeError("killed")
    chunk = _flip(path, "metrics/train/loss", "c/1")
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2 and f"metrics/train/loss: chunk {chunk}" in result.stderr
    log, state = open_for_resume(path)
    assert state == {"step": 4096} and not log.skipped_snapshots
    with log:
        rows(log, range(4096, 4200))
    train = open_run(path, verify=True).table("metrics/train")
    assert train["step"].tolist() == list(range(4200))
    np.testing.assert_array_equal(train["loss"], 1.0 / (np.arange(4200) + 1))
