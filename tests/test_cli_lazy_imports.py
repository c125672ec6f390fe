"""`hil --help`, and the help of every command group and command, import none of the heavy
packages (torch, zarr, matplotlib, ...): the commands import them when they run. In a fresh
interpreter, since a test process has most of them loaded already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hil.testing import BoardServers

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -c args[0] args[1:]`` in the repository, its output captured as text (at most
    5 minutes; the caller checks the exit code)."""
    return subprocess.run(
        [sys.executable, "-c", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


HEAVY = ("torch", "zarr", "matplotlib", "sklearn", "pyvisa", "ray", "optuna")

# Renders the help of every group and command of the `hil` tree, in one interpreter; prints, as
# JSON, each command path with its exit code and the heavy packages loaded once its help was shown.
HELP_ALL = """
import json, sys
import typer.main
from typer.testing import CliRunner
from hil.cli import app

heavy = sys.argv[1].split(",")

def paths(command, path):
    yield path
    for name, sub in getattr(command, "commands", {}).items():  # a group's commands
        yield from paths(sub, [*path, name])

runner = CliRunner()
shown = []
for path in paths(typer.main.get_command(app), []):
    result = runner.invoke(app, [*path, "--help"])
    loaded = [m for m in heavy if m in sys.modules]
    shown.append({"path": " ".join(["hil", *path]), "exit": result.exit_code, "loaded": loaded})
print(json.dumps(shown))
"""


def test_help_imports_no_heavy_package() -> None:
    done = _python(HELP_ALL, ",".join(HEAVY))
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    # the tree as it is today: every command's help was rendered, not only the root's
    paths = {s["path"] for s in shown}
    assert {"hil", "hil calibrate", "hil train classifier", "hil train vae", "hil emulator serve"} <= paths
    assert {"hil lock break", "hil mhn phase", "hil sweep", "hil gradcheck", "hil plot"} <= paths
    assert [s["path"] for s in shown if s["exit"] != 0] == []
    first = {}  # heavy package -> the first help that had it loaded
    for s in shown:
        for module in s["loaded"]:
            first.setdefault(module, s["path"])
    assert first == {}, f"--help imported heavy packages (package: first help with it loaded): {first}"


# ---------------------------------------------------------------- the read-only commands
# Runs `hil ARGS...` in this interpreter (as the console script does) and prints, as JSON, the
# exit code and which of the packages given were loaded once the command was done.
RUN_COMMAND = """
import json, sys
from hil.cli import main

packages = sys.argv[1].split(",")
sys.argv = ["hil", *sys.argv[2:]]
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "loaded": [m for m in packages if m in sys.modules]}), file=sys.stderr)
"""

# what a reader of a run log, or of a board, never needs: the model's packages and the ones of
# other commands (zarr is the run log's own format, matplotlib draws `hil plot`'s PNGs)
NOT_FOR_READING = ("torch", "sklearn", "optuna", "ray", "hil.runlog.writer", "hil.runlog.order")


def _loaded(*args: str | Path) -> list[str]:
    """The packages of HEAVY and NOT_FOR_READING loaded by `hil ARGS...` in a fresh interpreter."""
    watched = ",".join(dict.fromkeys((*HEAVY, *NOT_FOR_READING)))
    done = _python(RUN_COMMAND, watched, *map(str, args))
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["exit"] == 0, (done.stdout, done.stderr)
    return report["loaded"]


@pytest.fixture(scope="module")
def run_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run log as a training run leaves it, written by the run log's writer: the device, metrics,
    settles with traces, tile snapshots, programming reports and a resume snapshot with a tensor."""
    import numpy as np
    import torch

    from drivers import Nudge, SettleBudget, Topology, open_device
    from hil.runlog import RunLog, TraceConfig

    uri, sizes = "emulator://?preset=ideal&seed=0", [8, 6, 3]
    path = tmp_path_factory.mktemp("runs") / "run.zarr"
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, sizes[0])).astype(np.float32)
    target = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], 4)]
    topo = Topology.layered(sizes, budget=SettleBudget(max_steps=30, tol=1e-4, dt=0.5))
    traces = TraceConfig(every_steps=1, settle_stride=2, samples=2)
    with open_device(uri) as dev, RunLog.create(path, {"sizes": sizes}, traces=traces) as log:
        log.set_device(dev.info, uri=uri)
        dev.configure(topo)
        lim = dev.info.limits
        for step in range(2):
            for c in topo.couplings:
                w = rng.uniform(0, 1, topo.tile_shape(c.tile)).astype(np.float32)
                g = (lim.g_min + w * (lim.g_max - lim.g_min)).astype(np.float32)
                log.program(step, dev.program(c.tile, g, g), conductances=True)
                log.tile(step, c.tile, weights=w)
            free = dev.settle({"s0": x}, trace=log.trace_for(step))
            log.settle(step, "free", free)
            nudge = {"s2": Nudge(0.2, target=target)}
            log.settle(step, "nudged+", dev.settle({"s0": x}, nudge=nudge, init=free.states))
            log.metrics("train", step=step, epoch=step, loss=1.0 / (step + 1), acc=0.5 * step)
            log.snapshot(step, {"w": torch.arange(3.0), "step": step})
    return path


def test_inspect_loads_no_torch(run_log: Path) -> None:
    """`hil inspect RUN` (text and --json) reads the store with zarr and nothing of the model:
    the run log's reader needs no torch (it took ~1.1 s of its ~1.6 s)."""
    assert _loaded("inspect", run_log) == ["zarr"]
    assert _loaded("inspect", run_log, "--json", "-") == ["zarr"]


def test_plot_loads_no_torch(run_log: Path, tmp_path: Path) -> None:
    """`hil plot RUN` reads the store and draws it: zarr and matplotlib, no torch."""
    assert _loaded("plot", run_log, "--out", tmp_path / "plots") == ["zarr", "matplotlib"]
    assert (tmp_path / "plots" / "loss.png").is_file()


@pytest.mark.parametrize("configured", [False, True], ids=["fresh", "configured"])
@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_info_of_a_served_board_loads_no_torch(
    board_servers: BoardServers, transport: str, configured: bool
) -> None:
    """`hil info URI` and `hil lock status URI` of a board behind a server (a lab board, `hil
    emulator serve`) only query it over the link: numpy and the transport's packages, no torch
    (it took ~0.8 s of `hil info`'s ~1.2 s: drivers.base -> drivers.topology ->
    drivers.activation, and drivers.numerics), also when the board holds a network (the client
    decodes its Topology, whose curve is named by drivers.activation; the curves' torch code is
    drivers.activation_curves). An emulator:// URI runs the board in this process, torch and all."""
    from drivers import Topology, open_device

    uri = board_servers.uri(transport)
    if configured:
        with open_device(uri) as dev:
            dev.configure(Topology.layered([4, 3], activation="soft_sigmoid:0.05"))
    transport_packages = ["pyvisa"] if transport == "visa-tcp" else []
    assert _loaded("info", uri) == transport_packages
    assert _loaded("info", uri, "--json", "-") == transport_packages
    assert _loaded("lock", "status", uri) == transport_packages
    done = subprocess.run(
        [sys.executable, "-c", "from hil.cli import main; main()", "info", uri],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert (", configured," in done.stdout) is configured, done.stdout


def test_conformance_of_a_served_board_loads_no_torch(board_servers: BoardServers) -> None:
    """`hil conformance URI` checks a board over its link; its networks are hard sigmoids, whose
    predicted fixed points are numpy (hil.conformance.settle): no torch (~0.8 s of ~2.6 s)."""
    assert _loaded("conformance", board_servers.uri("serial-socket")) == []


# a session small enough for a test: every default routine, on one 8 x 8 tile
SMALL_SESSION = ("--tile-size", "8", "--channels", "16", "--reads", "4", "--no-progress")


def test_calibrate_of_a_served_board_loads_no_torch(board_servers: BoardServers, tmp_path: Path) -> None:
    """`hil calibrate URI` of a board behind a link (a lab board, `hil emulator serve`) runs every
    routine with numpy on the host: no torch (~0.8 s of start-up). It was loaded twice over:
    by --threads' default of 1 (torch.set_num_threads before the board was opened) and by
    drivers.batches (calibration.measure's chunked settles and mvms), which imported it to
    recognise a tensor."""
    uri = board_servers.uri("serial-socket")
    loaded = _loaded("calibrate", uri, "--out", tmp_path / "cal.zarr", *SMALL_SESSION)
    assert (tmp_path / "cal.zarr").is_dir() and (tmp_path / "cal.png").is_file()
    assert [m for m in loaded if m in ("torch", "sklearn", "optuna", "ray")] == [], loaded


def test_calibrate_of_an_in_process_board_still_takes_its_threads(tmp_path: Path) -> None:
    """An emulator:// board runs in this process on torch: --threads (default 1) reaches torch
    before the session runs, once the board is open."""
    script = (
        "import sys\n"
        "from hil.cli import main\n"
        "sys.argv = ['hil', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "import torch\n"  # loaded by the board, not by this script
        "print('threads', torch.get_num_threads())\n"
    )
    out = tmp_path / "cal.zarr"
    uri = "emulator://?preset=ideal&seed=0"
    args = ["calibrate", uri, "--out", str(out), "--routines", "gmap", *SMALL_SESSION]
    done = _python(script, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "threads 1", done.stdout
