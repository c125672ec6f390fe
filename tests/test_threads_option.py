"""`--threads` means the same in every command: 0 is torch's default (one thread per core), N
sets N. `hil demo` and `hil emulator serve` refused 0 (min 1) where `hil train`, `hil train-vae`
and `hil calibrate` took it, and their help did not say what 0 would mean."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from hil.cli import app

COMMANDS = (("demo",), ("emulator", "serve"), ("train", "classifier"), ("train", "vae"), ("calibrate",))


def _option(path: tuple[str, ...]) -> Any:
    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    [opt] = [p for p in cmd.params if "--threads" in getattr(p, "opts", ())]
    return opt


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_threads_takes_0_as_torchs_default_and_says_so(path: tuple[str, ...]) -> None:
    opt = _option(path)
    assert opt.min == 0, opt.min
    assert "0: torch's default, one per core" in (opt.help or "")


class Stop(Exception):
    pass


def test_demo_threads_0_leaves_torchs_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def run_demo(*args: object) -> None:
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr("hil.demo.run_demo", run_demo)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        res = CliRunner().invoke(app, ["demo", "--uri", "emulator://?preset=ideal", "--threads", "0"])
    finally:
        torch.set_num_threads(before)
    assert isinstance(res.exception, Stop), res.output
    assert seen == [3]
