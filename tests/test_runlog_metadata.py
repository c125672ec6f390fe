"""Run logs as other tools read them: zarr 3 dimension names (xarray opens a table group as one
Dataset), units on the arrays, the writer's full argv, the boards' counters at a run's start
and end."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from drivers import Device, Meter, Topology, open_device
from drivers.errors import DeviceTimeout
from drivers.wrapper import DeviceWrapper
from hil.runlog import RunLog, RunLogError, TraceConfig, open_for_resume, open_run
from hil.runlog.summary import summary
from tests.test_runlog import _make_run


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run on the ideal emulator: metrics, traces, tiles, programming, two snapshots
    (the second snapshot's arrays go past zarr's array creation)."""
    path = tmp_path_factory.mktemp("runs") / "made.zarr"
    _make_run(path, TraceConfig(every_steps=2, settle_stride=2, samples=4))
    return path


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, zarr.Array]:
    out: dict[str, zarr.Array] = {}
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            out[prefix + name] = node
        else:
            out.update(_arrays(node, f"{prefix}{name}/"))
    return out


def _dims(array: zarr.Array) -> tuple[str, ...] | None:
    return array.metadata.dimension_names  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------- dimension names
def test_every_array_has_dimension_names_and_a_table_shares_its_row_dimension(made: Path) -> None:
    root = zarr.open_group(made, mode="r")
    arrays = _arrays(root)
    assert len(arrays) > 20
    for path, arr in arrays.items():
        dims = _dims(arr)
        assert dims is not None and len(dims) == arr.ndim and all(dims), (path, dims)
    run = open_run(made)
    for table in run.tables:
        columns = root[table].attrs["columns"]
        firsts = {_dims(root[f"{table}/{c}"])[0] for c in columns}  # type: ignore[index]
        assert len(firsts) == 1, (table, firsts)
    assert _dims(root["metrics/train/loss"]) == ("row",)
    assert _dims(root["traces/settles/energy_j"]) == ("settle",)
    assert _dims(root["traces/points/energy"]) == ("point", "sample")
    assert _dims(root["traces/points/state.s1"]) == ("point", "sample", "state.s1.node")
    for col in ("weights", "g_plus", "g_minus"):
        assert _dims(root[f"tiles/W0/{col}"]) == ("snapshot", "tile_row", "tile_col")
    assert _dims(root["tiles/W0/step"]) == ("snapshot",)
    assert _dims(root["program/W0/pulses"]) == ("report",)
    snaps = root["snapshots"].attrs["committed"]
    assert len(snaps) == 2
    for name in snaps:  # the first through zarr, the second copied past it: both named
        assert _dims(root[f"snapshots/{name}/w"]) == ("w.dim0",)


def test_grown_trimmed_and_resumed_columns_keep_their_dimension_names(tmp_path: Path) -> None:
    """A table grows a chunk at a time, is trimmed at close and cut back on resume: every
    resize keeps the names."""
    path = tmp_path / "g.zarr"
    log = RunLog.create(path, {}, flush_every_s=3600)
    for step in range(5000):  # past one 4096-row chunk: the columns are resized
        log.metrics("train", step=step, loss=1.0 / (step + 1))
        if step == 4500:
            log.snapshot(step, {"step": step})
    log.flush()
    loss = zarr.open_array(path / "metrics/train/loss", mode="r")
    assert loss.shape[0] == 8192 and _dims(loss) == ("row",)
    del log  # killed: resume cuts the table back to the snapshot's rows
    log, _ = open_for_resume(path)
    log.metrics("train", step=4501, loss=0.5)
    log.close()
    loss = zarr.open_array(path / "metrics/train/loss", mode="r")
    assert loss.shape == (4502,) and _dims(loss) == ("row",)


def test_xarray_opens_each_table_group_as_one_dataset(made: Path) -> None:
    xr = pytest.importorskip("xarray")
    train = xr.open_zarr(made, group="metrics/train", consolidated=False)
    assert dict(train.sizes) == {"row": 4} and {"step", "epoch", "loss", "acc"} <= set(train.data_vars)
    np.testing.assert_allclose(train["loss"].values, [1.0, 0.5, 1 / 3, 0.25])
    tile = xr.open_zarr(made, group="tiles/W0", consolidated=False)
    assert tile["weights"].dims == ("snapshot", "tile_row", "tile_col")
    assert tile["g_plus"].dims == ("snapshot", "tile_row", "tile_col")
    program = xr.open_zarr(made, group="program/W0", consolidated=False)
    assert program["pulses"].dims == ("report",) and program.sizes["report"] == 4
    points = xr.open_zarr(made, group="traces/points", consolidated=False)
    assert points["energy"].dims == ("point", "sample")
    xr.open_zarr(made, group="traces/settles", consolidated=False)


def _strip_to_old_store(path: Path) -> None:
    """The store as the writer before dimension names and units left it, crashed mid-run."""
    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            doc.pop("dimension_names", None)
            doc["attributes"] = {}
            meta.write_text(json.dumps(doc))
    root = zarr.open_group(path, mode="r+")
    root.update_attributes({"status": "running", "complete": False, "finished": None})


def test_older_run_logs_without_dimension_names_still_resume_inspect_and_plot(
    made: Path, tmp_path: Path
) -> None:
    from hil.runlog.plots import plot_run

    path = tmp_path / "old.zarr"
    shutil.copytree(made, path)
    _strip_to_old_store(path)
    assert _dims(zarr.open_array(path / "metrics/train/loss", mode="r")) is None
    log, state = open_for_resume(path)
    assert state is not None
    log.metrics("train", step=4, epoch=2, loss=0.2, acc=1.0)
    log.metrics("train", step=4, epoch=2, new_metric=1.0)  # a column created after the resume
    log.close()
    run = open_run(path, verify=True)
    assert run.table("metrics/train")["loss"].tolist()[-2:] == [0.2, pytest.approx(np.nan, nan_ok=True)]
    assert _dims(run.root["metrics/train/new_metric"]) == ("row",)  # type: ignore[arg-type]
    assert "train: 6 rows" in summary(run)
    files, _ = plot_run(run, tmp_path / "plots")
    assert {p.name for p in files} >= {"loss.png", "conductance_W0.png"}


# ---------------------------------------------------------------------------------- units
def test_arrays_of_a_known_unit_record_it(made: Path, tmp_path: Path) -> None:
    root = zarr.open_group(made, mode="r")
    expected = {
        "tiles/W0/g_plus": "S",
        "tiles/W1/g_minus": "S",
        "program/W0/residual_max": "S",
        "program/W0/within_tol": "1",
        "program/W0/energy_j": "J",
        "program/W0/time_s": "s",
        "traces/settles/energy_j": "J",
        "traces/settles/settle_time_s": "s",
    }
    for path, unit in expected.items():
        assert root[path].attrs.asdict() == {"units": unit}, path
    for path in ("metrics/train/step", "metrics/train/loss", "tiles/W0/weights", "traces/points/energy"):
        assert "units" not in root[path].attrs, path  # no physical unit
    with RunLog.create(tmp_path / "m.zarr", {}) as log:  # a metric named as the project names quantities
        log.metrics("test", step=0, energy_per_image_j=1e-9, settle_s=0.5, neg_elbo=3.0)
    test = zarr.open_group(tmp_path / "m.zarr/metrics/test", mode="r")
    assert [test[c].attrs.get("units") for c in ("energy_per_image_j", "settle_s", "neg_elbo")] == [
        "J",
        "s",
        None,
    ]
    xr = pytest.importorskip("xarray")
    program = xr.open_zarr(made, group="program/W0", consolidated=False)
    assert program["energy_j"].attrs["units"] == "J"


# ---------------------------------------------------------------------------------- writer argv
def test_the_writer_records_the_whole_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["hil", "train", "classifier", "--config", "c.toml", "--no-progress", "--threads", "1"]
    argv += ["--out", str(tmp_path / "r.zarr"), "--set", "train.epochs=2", "--set", "model.sizes=[64,16,10]"]
    monkeypatch.setattr("sys.argv", argv)
    with RunLog.create(tmp_path / "r.zarr", {}):
        pass
    writer = open_run(tmp_path / "r.zarr").attrs["writer"]
    assert writer["argv"] == argv and "argv_total" not in writer
    huge = ["hil", "x" * 5000, *(f"--set=k{i}=1" for i in range(500))]  # bounded, and says so
    monkeypatch.setattr("sys.argv", huge)
    with RunLog.create(tmp_path / "h.zarr", {}):
        pass
    writer = open_run(tmp_path / "h.zarr").attrs["writer"]
    assert len(writer["argv"]) == 200 and writer["argv_total"] == 502
    assert writer["argv"][1] == "x" * 1000 + "..." and writer["argv"][2] == "--set=k0=1"


# ---------------------------------------------------------------------------------- board state
IDEAL0 = "emulator://?preset=ideal&seed=0"
IDEAL1 = "emulator://?preset=ideal&seed=1"


class BrokenMeter(DeviceWrapper):
    """A board whose meter read fails (a lost link at a failed run's end)."""

    def meter(self) -> Meter | None:
        raise DeviceTimeout("no reply to METER within 1 s")


def test_device_state_records_counters_per_uri_errors_and_resumes(
    tmp_path: Path, device_on: Callable[..., Device]
) -> None:
    path = tmp_path / "d.zarr"
    remote = device_on("visa-tcp", board=IDEAL0)
    with open_device(IDEAL1) as local, RunLog.create(path, {}) as log:
        log.device_state("start", [remote, BrokenMeter(local)], ["visa://remote", IDEAL1])
        topo = Topology.layered([4, 3])
        local.configure(topo)
        local.mvm("W0", np.ones((2, topo.tile_shape("W0")[0]), np.float32))
        log.device_state("end", [remote, local, local], ["visa://remote", IDEAL1, IDEAL1])
        log.snapshot(0, {"step": 0})
        with pytest.raises(RunLogError, match="'start' or 'end'"):
            log.device_state("middle", local)
    state = open_run(path).attrs["device_state"]
    start, end = state["start"], state["end"]
    assert list(start) == ["visa://remote", IDEAL1] and list(end) == ["visa://remote", IDEAL1, f"{IDEAL1}#2"]
    assert start["visa://remote"]["safety"] == {"refused": 0, "violations": 0}
    assert set(start["visa://remote"]["recovery"]) >= {"retries", "reconnects", "resets", "exhausted"}
    assert "recovery" not in start[IDEAL1]  # the in-process board has no link to recover
    assert start[IDEAL1]["meter"] == {"error": "DeviceTimeout: no reply to METER within 1 s"}
    assert start[IDEAL1]["status"]["configured"] is False and end[IDEAL1]["status"]["configured"] is True
    assert end[IDEAL1]["meter"]["mvm_calls"] == 1 and end[IDEAL1]["meter"]["clock_s"] > 0
    assert set(end[IDEAL1]) == {"time", "safety", "meter", "status"}
    text = summary(open_run(path))
    assert re.search(r"^board start  visa://remote: violations 0, refused 0; clock .* \| ", text, re.M), text
    assert "meter unread (DeviceTimeout: no reply to METER within 1 s)" in text
    assert re.search(r"^board end    .*1 mvm; epoch \d+", text, re.M), text

    zarr.open_group(path, mode="r+").update_attributes({"status": "failed", "complete": False})
    log, _ = open_for_resume(path)  # a new session: the counters of the one before go to its resumes entry
    log.close()
    run = open_run(path)
    assert run.attrs["device_state"] == {} and run.attrs["resumes"][-1]["device_state_before"] == state


def _classifier_cfg(*sets: str) -> Any:
    from hil.config import load_config

    return load_config(None, ["train.epochs=1", "data.limit_train=32", "data.limit_test=16", *sets])


def test_the_classifier_trainer_records_every_boards_state_at_start_and_end(tmp_path: Path) -> None:
    from hil.train_classifier import train_classifier

    model = ["model.kind=ffebm", "model.sizes=[64,24,16,10]", "model.block_layers=2", "model.between=linear"]
    cfg = _classifier_cfg(*model, "train.batch_size=16", f'devices=["{IDEAL0}", "{IDEAL1}"]')
    with RunLog.create(tmp_path / "two.zarr", cfg) as log:
        train_classifier(cfg, log=log).model.close()
    run = open_run(tmp_path / "two.zarr")
    state = run.attrs["device_state"]
    for uri in (IDEAL0, IDEAL1):
        start, end = state["start"][uri], state["end"][uri]
        assert start["safety"] == end["safety"] == {"refused": 0, "violations": 0}
        assert end["meter"]["clock_s"] > start["meter"]["clock_s"]
        assert end["meter"]["energy_j"] > start["meter"]["energy_j"]
    text = summary(run)
    assert re.search(
        rf"^board start  {re.escape(IDEAL0)}: violations 0, refused 0; .* \| {re.escape(IDEAL1)}:", text, re.M
    )
    assert re.search(r"^board end    ", text, re.M)


def test_a_failed_classifier_run_records_its_boards_end_state(tmp_path: Path) -> None:
    from hil.train_classifier import train_classifier

    cfg = _classifier_cfg("model.sizes=[64,8,10]", "train.epochs=2")

    def crash(_: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), RunLog.create(tmp_path / "f.zarr", cfg) as log:
        train_classifier(cfg, log=log, on_epoch=crash)
    run = open_run(tmp_path / "f.zarr")
    assert run.status == "failed"
    (uri,) = run.attrs["device_state"]["end"]
    end, start = run.attrs["device_state"]["end"][uri], run.attrs["device_state"]["start"][uri]
    assert end["meter"]["mvm_calls"] >= start["meter"]["mvm_calls"] and end["meter"]["clock_s"] > 0


def test_the_vae_trainer_records_its_boards_state_at_start_and_end(tmp_path: Path) -> None:
    from hil.config import load_into
    from hil.vae.config import VAERunConfig
    from hil.vae.train import train_vae

    sets = [
        "train.epochs=1",
        "data.limit_train=64",
        "data.limit_test=32",
        "eval.samples=32",
        "eval.eps_draws=1",
    ]
    cfg = load_into(VAERunConfig(), None, [*sets, "model.hidden=16", "model.variant=h-vae"])
    with RunLog.create(tmp_path / "v.zarr", cfg) as log:
        train_vae(cfg, progress=False, log=log)
    state = open_run(tmp_path / "v.zarr").attrs["device_state"]
    assert (
        list(state["start"]) == list(state["end"]) == [cfg.device, f"{cfg.device}#1"]
    )  # two boards, one URI
    for key in state["end"]:
        assert state["end"][key]["meter"]["clock_s"] > state["start"][key]["meter"]["clock_s"]
