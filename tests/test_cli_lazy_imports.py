"""`hil --help`, and the help of every command group and command, import none of the heavy
packages (torch, zarr, matplotlib, ...): the commands import them when they run. In a fresh
interpreter, since a test process has most of them loaded already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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
    done = subprocess.run(
        [sys.executable, "-c", HELP_ALL, ",".join(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
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
