"""Issue 10: `hil sweep`: Optuna sweeps in-process and on a Ray cluster of board actors."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hil.cli import app
from hil.runlog import open_run
from hil.sweep import SpecError, SweepError, load_spec, parse_spec, run_sweep
from hil.sweep.local import LocalExecutor
from hil.sweep.ray_runner import Board, import_ray
from hil.sweep.trial import TrialEvent
from hil.testing import BoardServers

# Four trials of a small digits classifier (under a second each); two per round, and TPE's
# model takes over after two trials, so the second round depends on what the first told it.
SPEC = """
[sweep]
trainer = "classifier"
objective = "val_acc"
n_trials = 4
batch = 2
seed = 3
startup_trials = 2

[base]
device = "emulator://?preset=ideal&seed=0"
model.sizes = [64, 32, 10]
train.epochs = 2
train.batch_size = 32
data.limit_train = 300
data.limit_test = 200
data.validation = 60
ep.free_steps = 30
ep.nudge_steps = 15

[space."train.lr"]
type = "float"
low = 0.01
high = 0.5
log = true

[space.ep.beta]
type = "float"
low = 0.05
high = 0.5

[space."ep.mode"]
type = "categorical"
choices = ["centered", "positive"]
"""


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "digits.toml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def local(spec_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sweep run in-process by the command line (on the base config's board, named
    explicitly); its summary and output."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    board = ["--board", "emulator://?preset=ideal&seed=0"]
    res = CliRunner().invoke(app, ["sweep", str(spec_file), "--out", str(out), *board])
    assert res.exit_code == 0, res.output
    return {"out": out, "output": res.output, **json.loads((out / "summary.json").read_text())}


def _same_trials(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [(t["number"], t["state"], t["params"], t["value"]) for t in a] == [
        (t["number"], t["state"], t["params"], t["value"]) for t in b
    ]


def test_in_process_sweep_keeps_and_links_every_run_log(local: dict[str, Any]) -> None:
    import optuna

    out, trials = local["out"], local["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 4
    assert len({t["params"]["train.lr"] for t in trials}) == 4
    best = local["best"]
    assert best["value"] == max(t["value"] for t in trials)
    lines = local["output"].splitlines()
    assert sum(line.startswith("trial ") for line in lines) == 4
    assert f"best trial {best['number']}: val_acc" in local["output"]
    assert lines[-1] == f"best run log {out / best['run_log']}"
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{out / 'optuna.db'}")
    for t, ft in zip(trials, study.trials, strict=True):
        assert ft.user_attrs["run_log"] == t["run_log"] == f"trials/{t['number']:04d}/run.zarr"
        run = open_run(out / t["run_log"])
        assert run.complete and run.config["name"] == f"digits-trial-{t['number']:04d}"
        assert run.config["train"]["lr"] == [t["params"]["train.lr"]]
        assert run.config["ep"]["beta"] == t["params"]["ep.beta"]
        assert run.config["ep"]["mode"] == t["params"]["ep.mode"]
        assert ft.value == t["value"] == pytest.approx(run.table("metrics/test")["val_acc"][-1])
    assert (out / "trials.csv").read_text().count("\n") == 5


def test_running_the_folder_again_continues_the_sweep(
    local: dict[str, Any], spec_file: Path, tmp_path: Path
) -> None:
    res = CliRunner().invoke(app, ["sweep", str(spec_file), "--out", str(local["out"]), "-n", "5"])
    assert res.exit_code == 0, res.output
    assert [line.split()[1] for line in res.output.splitlines() if line.startswith("trial ")] == ["4"]
    other = tmp_path / "digits.toml"
    other.write_text(SPEC.replace("seed = 3", "seed = 4"))
    res = CliRunner().invoke(app, ["sweep", str(other), "--out", str(local["out"])])
    assert res.exit_code == 2 and "(it differs in seed)" in res.output


# ------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, str]]:
    """A local two-node Ray cluster; each node is a host with one emulated board attached
    (resources board:a on the head, board:b on the second node). Yields node id per board."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"board:a": 1}, "include_dashboard": False},
    )
    second = cluster.add_node(num_cpus=1, resources={"board:b": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"a": cluster.head_node.node_id, "b": second.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_sweep_on_two_board_actors_gives_the_same_best_trial(
    ray_cluster: dict[str, str], spec_file: Path, local: dict[str, Any], tmp_path: Path
) -> None:
    from hil.sweep.ray_runner import RayExecutor

    executor = RayExecutor()  # the boards the cluster declares, opened by the base device URI
    try:
        assert {b: p["node"] for b, p in executor.placement.items()} == ray_cluster  # pinned
        t0 = time.perf_counter()
        result = run_sweep(load_spec(spec_file), tmp_path / "ray", executor)
        print(f"ray sweep: {time.perf_counter() - t0:.1f} s")
    finally:
        executor.close()
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    _same_trials(summary["trials"], local["trials"])
    assert {t.board for t in result.trials} == {"a", "b"}
    assert result.best is not None and result.best.number == local["best"]["number"]
    assert result.best.params == local["best"]["params"] and result.best.value == local["best"]["value"]
    assert result.best_run_log is not None and open_run(result.best_run_log).complete


def test_trial_on_a_killed_board_actor_is_retried_on_the_other(
    ray_cluster: dict[str, str], spec_file: Path, local: dict[str, Any], tmp_path: Path
) -> None:
    import ray

    from hil.sweep.ray_runner import RayExecutor

    executor = RayExecutor()
    events: list[TrialEvent] = []

    def kill_a_mid_trial(e: TrialEvent) -> None:
        events.append(e)
        if e.kind == "start" and e.number == 2 and e.board == "a":
            time.sleep(0.2)  # let the trial get going, then the board's host "goes down"
            ray.kill(executor.actors["a"])

    try:
        result = run_sweep(load_spec(spec_file), tmp_path / "ray", executor, on_event=kill_a_mid_trial)
        assert sorted(executor.actors) == ["b"]
    finally:
        executor.close()
    retried = [e for e in events if e.kind == "retry"]
    assert len(retried) == 1 and retried[0].board == "a" and retried[0].number == 2
    by_number = {t.number: t for t in result.trials}
    assert by_number[2].board == "b" and by_number[2].lost_on == ["a"]
    assert open_run(tmp_path / "ray" / by_number[2].run_log).complete
    _same_trials(json.loads((tmp_path / "ray" / "summary.json").read_text())["trials"], local["trials"])


def test_a_trial_that_loses_too_many_boards_is_failed_not_moved_on(
    ray_cluster: dict[str, str], spec_file: Path, tmp_path: Path
) -> None:
    """With max_board_losses=1 the trial whose board actor dies is reported failed (naming
    the board) and the sweep finishes its other trials on the remaining board."""
    import ray

    from hil.sweep.ray_runner import RayExecutor

    executor = RayExecutor(max_board_losses=1)

    def kill_a_mid_trial(e: TrialEvent) -> None:
        if e.kind == "start" and e.number == 2 and e.board == "a":
            time.sleep(0.2)
            ray.kill(executor.actors["a"])

    try:
        result = run_sweep(load_spec(spec_file), tmp_path / "ray", executor, on_event=kill_a_mid_trial)
    finally:
        executor.close()
    by_number = {t.number: t for t in result.trials}
    assert by_number[2].state != "COMPLETE" and by_number[2].lost_on == ["a"]
    assert "lost its board on 1 board(s) (a)" in (by_number[2].error or "")
    assert all(t.state == "COMPLETE" for n, t in by_number.items() if n != 2)


@pytest.mark.parametrize(("stop", "board"), [("close", "a"), ("sigterm", "a"), ("close", "b")])
def test_a_trial_stopped_mid_run_leaves_its_board_safe_and_free(
    stop: str,
    board: str,
    ray_cluster: dict[str, str],
    emulated_board: Callable[..., BoardServers],
    tmp_path: Path,
) -> None:
    """The safety audit: `RayExecutor.close` (the driver's Ctrl-C or SIGTERM, an error, the end)
    killed a board actor mid-trial at once: its board, served over TCP, never got SAFE_STATE
    and stayed locked by the dead actor's token until its lease ran out. Now the trial is
    interrupted first (as by Ctrl-C), its board made safe and released, then the actor killed.
    `sigterm`: the actor's worker is sent SIGTERM (its node shutting down); Ray's handler raised
    SystemExit wherever the trial was, whose clean-up then also made the board safe (so this
    case passed before too), but could cut a board transaction in flight; now the trial stops
    as on Ctrl-C (the transaction completes first), then the worker exits (the board is lost
    to the sweep). Board `a` sits on the driver's node, which signals its worker itself; board
    `b` on the cluster's second node, whose worker gets the interrupt from a task pinned there
    (the path of a board on another host)."""
    served = emulated_board("emulator://?preset=ideal&seed=0")
    calls: list[str] = []
    guard = threading.Lock()
    for op in ("configure", "program", "settle", "mvm", "safe_state"):
        inner = getattr(served.device, op)

        def logged(*args: Any, _op: str = op, _inner: Any = inner, **kw: Any) -> Any:
            with guard:
                calls.append(_op)
            return _inner(*args, **kw)

        setattr(served.device, op, logged)
    uri = served.uri("serial-socket")
    spec = tmp_path / "long.toml"
    spec.write_text(
        SPEC.replace("n_trials = 4", "n_trials = 1")
        .replace("batch = 2", "batch = 1")
        .replace("train.epochs = 2", "train.epochs = 200")
        .replace('device = "emulator://?preset=ideal&seed=0"', f'device = "{uri}"')
    )
    from hil.sweep.ray_runner import RayExecutor

    executor = RayExecutor([Board(board, uri)], stop_grace_s=20.0)
    assert executor.placement[board]["node"] == ray_cluster[board]

    stopped_at: list[float] = []

    def interrupt_mid_trial(e: TrialEvent) -> None:
        if e.kind != "start":
            return
        deadline = time.monotonic() + 60
        while sum(c in ("settle", "mvm") for c in calls) < 20:  # the trial trains on the board
            assert time.monotonic() < deadline, f"the trial did not start within 60 s: {calls[-5:]}"
            time.sleep(0.05)
        stopped_at.append(time.monotonic())
        if stop == "sigterm":
            os.kill(executor.placement[board]["pid"], signal.SIGTERM)
        else:
            raise KeyboardInterrupt  # the driver's Ctrl-C

    try:
        stopped = (SweepError, "every board was lost") if stop == "sigterm" else (KeyboardInterrupt, None)
        with pytest.raises(stopped[0], match=stopped[1]):
            run_sweep(load_spec(spec), tmp_path / "sweep", executor, on_event=interrupt_mid_trial)
    finally:
        executor.close()
    # stopped within the grace period (and the actor's end), not after the trial's 200 epochs:
    # timed from the stop, so a loaded machine's slow start (ray, the actor, the trial) is not counted
    assert time.monotonic() - stopped_at[0] < 40, time.monotonic() - stopped_at[0]
    assert not executor.actors and not executor.busy
    with guard:
        last_work = max(i for i, c in enumerate(calls) if c != "safe_state")
        assert "safe_state" in calls[last_work:], calls[-5:]  # made safe after its last operation
    assert served.lock is not None and served.lock.state().token is None  # released, not left to lapse


@pytest.mark.parametrize("grace", [-1.0, 301.0, float("nan")])
def test_the_stop_grace_period_is_checked(grace: float) -> None:
    from hil.sweep.ray_runner import RayExecutor

    with pytest.raises(SweepError, match=r"stop_grace_s must be within \[0, 300\] s"):
        RayExecutor(stop_grace_s=grace)


def test_a_board_that_does_not_open_is_left_out(ray_cluster: dict[str, str]) -> None:
    from hil.sweep.ray_runner import RayExecutor

    executor = RayExecutor([Board("a", "serial+socket://127.0.0.1:1"), Board("b")])
    try:
        assert sorted(executor.actors) == ["b"] and "127.0.0.1:1" in executor.unavailable["a"]
        assert "left out" in executor.describe()
    finally:
        executor.close()


def test_ray_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SweepError, match=r"pip install 'xbar-hil\[ray\]'"):
        import_ray()


def test_an_address_nothing_answers_fails_fast() -> None:
    from hil.sweep.ray_runner import _check_reachable

    t0 = time.perf_counter()
    with pytest.raises(SweepError, match="nothing answers"):
        _check_reachable("ray://127.0.0.1:1")
    assert time.perf_counter() - t0 < 5
    _check_reachable("auto")  # left to Ray


def test_board_arguments() -> None:
    assert Board.parse("rram0=serial:///dev/ttyACM0?baud=921600") == Board(
        "rram0", "serial:///dev/ttyACM0?baud=921600"
    )
    assert Board.parse("rram0") == Board("rram0")
    assert Board.parse("emulator://?preset=rram&seed=1") == Board("", "emulator://?preset=rram&seed=1")
    with pytest.raises(SweepError, match="--board"):
        Board.parse("not a board")


# ------------------------------------------------------------------------------- bad specs
BASE = {"sweep": {"trainer": "classifier"}}


@pytest.mark.parametrize(
    ("space", "key"),
    [
        ({"train.lrr": {"type": "float", "low": 0.1, "high": 1.0}}, "space.train.lrr:"),
        ({"training.lr": {"type": "float", "low": 0.1, "high": 1.0}}, "space.training.lr:"),
        ({"train": {"type": "float", "low": 0.1, "high": 1.0}}, "space.train:"),
        ({"train.lr": {"type": "float", "low": 1.0, "high": 0.1}}, "space.train.lr:"),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "space.train.lr.low:"),
        ({"train.lr": {"type": "float", "low": "a", "high": 0.1}}, "space.train.lr.low:"),
        ({"train.lr": {"type": "float", "high": 0.1}}, "space.train.lr:"),
        ({"train.lr": {"type": "uniform", "low": 0.0, "high": 0.1}}, "space.train.lr.type:"),
        ({"train.lr": {"type": "float", "low": 0.01, "high": 0.1, "lo": 1}}, "space.train.lr.lo:"),
        ({"train.epochs": {"type": "float", "low": 1, "high": 3}}, "space.train.epochs.type:"),
        ({"train.epochs": {"type": "int", "low": 0, "high": 3}}, "space.train.epochs:"),
        ({"ep.mode": {"type": "categorical", "choices": ["centered", "sideways"]}}, "space.ep.mode:"),
        ({"ep.mode": {"type": "categorical", "choices": []}}, "space.ep.mode.choices:"),
        ({"ep.beta": {"type": "float", "low": 0.0, "high": 0.5}}, "space.ep.beta:"),
        ({"device": {"type": "categorical", "choices": ["emulator://"]}}, "space.device:"),
        ({"model.sizes[3]": {"type": "int", "low": 16, "high": 64}}, "space.model.sizes[3]:"),
        ({"ep.beta[0]": {"type": "float", "low": 0.1, "high": 0.3}}, "space.ep.beta[0]:"),
        # the sweep audit: these ran, one drawn for nothing and reported as if it counted
        (
            {
                "train.lr": {"type": "float", "low": 0.1, "high": 0.3},
                "train.lr[0]": {"type": "float", "low": 0.1, "high": 0.3},
            },
            "space.train.lr[0]: sets what space.train.lr sets",
        ),
        (
            {
                "train.lr": {"type": "float", "low": 0.1, "high": 0.3},
                "train": {"lr": {"type": "float", "low": 0.1, "high": 0.3}},
            },
            "space.train.lr: given twice",
        ),
        (
            {"train.batch_size": {"type": "int", "low": 8, "high": 64, "step": 0}},
            "space.train.batch_size.step: must be > 0",
        ),
    ],
)
def test_bad_search_space_names_the_key(space: dict[str, Any], key: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "space": space})
    assert str(err.value).startswith(key), str(err.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"sweep": {"trainer": "gan"}}, "sweep.trainer:"),
        ({"sweep": {"objective": "accuracy"}}, "sweep.objective:"),
        ({"sweep": {"n_trial": 3}}, "sweep.n_trial:"),
        ({"sweep": {"batch": 0}}, "sweep.batch:"),
        ({"sweep": {}, "base": {"train": {"epochs": "many"}}}, "base.train.epochs:"),
        ({"sweep": {}, "spaces": {}}, "spaces:"),
    ],
)
def test_bad_sweep_table_names_the_key(data: dict[str, Any], key: str) -> None:
    data = {"space": {"ep.beta": {"type": "float", "low": 0.1, "high": 0.5}}, **data}
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert str(err.value).startswith(key), str(err.value)


def test_list_settings_take_one_value_or_one_element() -> None:
    spec = parse_spec(
        {
            "space": {
                "model.sizes[1]": {"type": "int", "low": 16, "high": 128, "log": True},
                "train.lr": {"type": "float", "low": 0.01, "high": 0.1},
            }
        }
    )
    cfg = spec.config_for({"model.sizes[1]": 32, "train.lr": 0.05}, device="emulator://?preset=pcm")
    assert cfg.model.sizes == [64, 32, 10] and cfg.train.lr == [0.05] and cfg.device.endswith("pcm")
    assert spec.base["model"]["sizes"] == [64, 256, 10]  # the base is left alone


def test_vae_spec_checks_against_the_vae_config() -> None:
    spec = parse_spec(
        {
            "sweep": {"trainer": "vae", "objective": "neg_elbo"},
            "space": {"model.hidden": {"type": "int", "low": 16, "high": 64, "step": 16}},
        }
    )
    assert spec.direction == "minimize" and spec.config_for({"model.hidden": 32}).model.hidden == 32
    with pytest.raises(SpecError, match=r"^space\.model\.sizes:"):
        parse_spec(
            {"sweep": {"trainer": "vae"}, "space": {"model.sizes": {"type": "int", "low": 1, "high": 2}}}
        )


def test_cli_refuses_several_boards_without_ray(spec_file: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["sweep", str(spec_file), "--out", str(tmp_path / "o"), "-b", "a", "-b", "b"]
    )
    assert res.exit_code == 2 and "--ray-address" in res.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("grace", ["-1", "301", "nan"])
def test_cli_stop_grace_outside_its_bound_is_refused_before_ray_starts(
    spec_file: Path, tmp_path: Path, grace: str
) -> None:
    """`--stop-grace` reaches the Ray executor, whose bound (0 to 300 s) refuses it before Ray
    is started or joined: exit 2, one line naming the bound, no sweep folder."""
    res = CliRunner().invoke(
        app,
        ["sweep", str(spec_file), "--out", str(tmp_path / "o"), "--ray-address", "local", "-b", "a=emulator://",
         "--stop-grace", grace],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: stop_grace_s must be within [0, 300] s"), res.output
    assert not (tmp_path / "o").exists()


def test_cli_bad_search_space_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(SPEC.replace('[space."train.lr"]', '[space."train.lrate"]'))
    res = CliRunner().invoke(app, ["sweep", str(bad), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert res.output.startswith("error: space.train.lrate: 'train.lrate' is not a config key")
    assert not (tmp_path / "out").exists()


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    spec = tmp_path / "fails.toml"
    spec.write_text(
        '[sweep]\nn_trials = 1\n[base]\ndata.root = "/nonexistent"\n'
        '[space."data.name"]\ntype = "categorical"\nchoices = ["mnist"]\n'
    )
    res = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "no trial completed" in res.output
    [trial] = json.loads((tmp_path / "out" / "summary.json").read_text())["trials"]
    assert trial["state"] == "FAIL" and "mnist" in trial["error"].lower()


def test_vae_sweep_in_process(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "sweep": {"trainer": "vae", "n_trials": 1},
            "base": {
                "model": {"variant": "tdh-vae", "hidden": 16},
                "train": {"epochs": 1},
                "data": {"limit_train": 64, "limit_test": 32},
                "eval": {"samples": 16, "eps_draws": 1},
                "ep": {"steps": 60},
            },
            "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        },
        default_name="vae",
    )
    from hil.sweep.local import LocalExecutor

    result = run_sweep(spec, tmp_path / "vae", LocalExecutor())
    assert result.best is not None and result.best.value == result.best.metrics["neg_elbo"]
    assert result.best_run_log is not None and open_run(result.best_run_log).complete
    assert (result.best_run_log.parent / "samples.png").exists()


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("examples").glob("sweep_*.toml")))
def test_shipped_example_sweeps_are_valid(path: Path) -> None:
    """Every example in examples/ parses and checks against its trainer's config."""
    spec = load_spec(path)
    assert spec.n_trials > 0 and spec.space


def test_start_at_base_runs_the_base_values_first_and_refuses_a_base_outside_the_space(
    tmp_path: Path,
) -> None:
    """`start_at_base = true`: trial 0 runs the base config's own values of the tuned keys (a
    list setting tuned as one number takes its first element), then the sampler goes on; a
    base value outside its parameter's range is refused when the spec is read."""
    from hil.sweep.local import LocalExecutor

    data = tomllib.loads(SPEC.replace("n_trials = 4", "n_trials = 2\nstart_at_base = true"))
    spec = parse_spec(data, default_name="base-first")
    assert spec.base_params() == {"train.lr": 0.1, "ep.beta": 0.2, "ep.mode": "centered"}  # trainer defaults
    result = run_sweep(spec, tmp_path / "sweep", LocalExecutor())
    first, second = sorted(result.trials, key=lambda t: t.number)
    assert first.params == {"train.lr": 0.1, "ep.beta": 0.2, "ep.mode": "centered"}
    assert second.params != first.params and first.state == second.state == "COMPLETE"
    assert parse_spec(tomllib.loads(SPEC)).to_dict().keys() == spec.to_dict().keys() - {"start_at_base"}
    data["space"]["ep"]["beta"]["low"] = 0.3
    with pytest.raises(SpecError, match=r"^sweep\.start_at_base: the base ep\.beta = 0\.2 is outside"):
        parse_spec(data)
    data["sweep"]["start_at_base"] = "yes"
    with pytest.raises(SpecError, match=r"^sweep\.start_at_base: expected true or false"):
        parse_spec(data)


def test_validation_objective_needs_a_validation_split() -> None:
    """Scoring trials on held-out training images needs them held out: a spec whose base
    config has none is refused when read, naming the key that fixes it."""
    space = {"space": {"ep.beta": {"type": "float", "low": 0.1, "high": 0.5}}}
    with pytest.raises(SpecError, match=r"^sweep\.objective: 'val_acc' .*data\.validation = N"):
        parse_spec({"sweep": {"objective": "val_acc"}, **space})
    spec = parse_spec({"sweep": {"objective": "val_acc"}, "base": {"data": {"validation": 50}}, **space})
    assert spec.objective == "val_acc" and spec.direction == "maximize"


KILLED_AFTER_ONE = """
import os, sys
from hil.sweep import load_spec, run_sweep
from hil.sweep.local import LocalExecutor

class DiesMidRound(LocalExecutor):
    # the first trial of the second round finishes; the process dies while the second runs
    def run(self, spec, jobs, on_event):
        for outcome in super().run(spec, jobs, on_event):
            yield outcome
            if outcome.number == 2:
                os._exit(9)

run_sweep(load_spec(sys.argv[1]), sys.argv[2], DiesMidRound())
"""


def test_a_killed_sweep_keeps_its_finished_trials_and_reruns_the_cut_one(
    spec_file: Path, tmp_path: Path
) -> None:
    """The sweep audit: a trial that finished before the sweep was killed mid-round was lost
    (told only when the round ended), and the cut trial counted towards n_trials: the
    continued sweep tried 4 settings of 6. Now the finished one is kept, the cut one fails as
    interrupted, its parameters run again, and n_trials counts the others."""
    import subprocess

    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ONE, str(spec_file), str(out)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == 9, killed.stderr
    assert json.loads((out / "sweep.lock").read_text())["pid"] != os.getpid()  # the dead process's lock
    result = run_sweep(load_spec(spec_file), out, LocalExecutor())
    by = {t.number: t for t in result.trials}
    assert by[2].state == "COMPLETE" and by[2].value is not None  # finished before the kill: kept
    assert by[3].state == "FAIL" and by[3].error.startswith("interrupted")
    assert by[4].params == by[3].params and by[4].state == "COMPLETE"  # the cut one, again
    assert len(result.trials) == 5 and sum(t.state == "COMPLETE" for t in result.trials) == 4  # n_trials 4


def test_a_second_sweep_on_a_busy_folder_is_refused(spec_file: Path, tmp_path: Path) -> None:
    """The sweep audit: a second sweep on the folder of a running one failed the first one's
    trials and crashed it with an Optuna traceback."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    (out / "spec.json").write_text("{}")  # the running sweep's: not rewritten under it
    res = CliRunner().invoke(app, ["sweep", str(spec_file), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert f"is in use by the sweep of process {os.getppid()}" in res.stderr
    assert (out / "spec.json").read_text() == "{}"
    (out / "spec.json").unlink()
    (out / "sweep.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # gone
    assert run_sweep(load_spec(spec_file), out, LocalExecutor()).best is not None
    assert not (out / "sweep.lock").exists()


def test_a_key_given_twice_in_the_file_says_so(tmp_path: Path) -> None:
    """tomllib says "Cannot overwrite a value (at line 5, column 13)", not what it means."""
    path = tmp_path / "twice.toml"
    path.write_text('[sweep]\ntrainer = "classifier"\n\n[space."ep.beta"]\ntype = "float"\ntype = "int"\n')
    with pytest.raises(SpecError, match=r"twice\.toml: Cannot overwrite a value .*given twice .*keep one"):
        load_spec(path)
