"""`hil info URI`: what a board says about itself, read over a real transport without
changing anything on it (the instrument audit found no read-only command: `conformance` and
`demo` both reconfigure and program the board)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drivers import Topology, open_device
from hil.cli import app
from hil.testing import BoardServers


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_info_reads_a_board_in_use_without_touching_it(
    board_servers: BoardServers, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    safe_calls: list[int] = []
    board = board_servers.device
    real_safe = board.safe_state
    monkeypatch.setattr(board, "safe_state", lambda: (safe_calls.append(1), real_safe())[1])
    uri = board_servers.uri(transport)
    x = np.full((2, 5), 0.5, np.float32)
    with open_device(uri) as host:  # another host's session on the same board
        host.configure(Topology.layered([4, 3]))
        lim = host.info.limits
        host.program("W0", np.full((5, 3), lim.g_max, np.float32), np.full((5, 3), lim.g_min, np.float32))
        host.mvm("W0", x)
        # what the board holds, exactly (a read's noise is drawn afresh: two reads of the same
        # state differ where it flips an output code, so they cannot show that nothing changed)
        emu = board.board  # type: ignore[attr-defined]
        held = (emu.topology, emu.arrays_id, emu.tile("W0").conductances(emu.clock))
        calls = host.meter().mvm_calls
        res = CliRunner().invoke(app, ["info", uri])
        assert res.exit_code == 0, res.output
        lines = dict(line.split(None, 1) for line in res.output.strip().splitlines())
        assert lines["device"].startswith("xbar-hil,emulator-") and uri in lines["device"]
        assert "mvm" in lines["capabilities"] and "settle" in lines["capabilities"]
        assert f"v_read {lim.v_read:g} V" in lines["voltages"]
        assert f"{lim.g_min:g} to {lim.g_max:g} S" in lines["conductances"]
        assert f"configured, no open transaction, arrays_id {host.status().arrays_id}" in lines["status"]
        assert lines["safety"].startswith("refused 0, violations 0")
        assert f"{calls} mvm calls" in lines["meter"]
        # nothing changed: no safe state, no mvm, the topology and conductances as the host left
        # them (the devices' true conductances, bit for bit: rram does not drift)
        assert safe_calls == []
        assert host.meter().mvm_calls == calls
        topology, arrays_id, (gp, gm) = held
        assert emu.topology == topology and emu.arrays_id == arrays_id
        gp2, gm2 = emu.tile("W0").conductances(emu.clock)
        assert torch.equal(gp2, gp) and torch.equal(gm2, gm)


def test_info_on_a_bad_uri_is_one_line() -> None:
    res = CliRunner().invoke(app, ["info", "emulator://?preset=nope"])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_info_shows_each_tiles_wear_on_a_board_with_an_endurance(
    emulated_board: Callable[..., BoardServers], transport: str, tmp_path: Path
) -> None:
    """A board that declares a pulse endurance counted each device's wear, but nothing showed
    it to a lab user: `hil info` prints one line per configured tile (SYST:WEAR?, opcode 0x24)."""
    worn = emulated_board("emulator://?preset=rram&seed=0&pulse_endurance=1000")
    worn.device.configure(Topology.layered([4, 3, 2]))
    cp, cm = np.zeros((5, 3), np.int32), np.zeros((5, 3), np.int32)
    cp[0, 0], cm[1, 1] = 950, 1000
    worn.device.pulse("W0", cp, cm)
    out = tmp_path / "info.json"
    res = CliRunner().invoke(app, ["info", worn.uri(transport), "--json", str(out)])
    assert res.exit_code == 0, res.output
    wear = [line for line in res.output.splitlines() if line.startswith("wear")]
    assert wear == [
        "wear          W0: most worn 1000 pulses (100%); 2 of 30 devices near the end (>= 900), 1 spent",
        "wear          W1: most worn 0 pulses (0%); 0 of 16 devices near the end (>= 900), 0 spent",
    ]
    # as wide as the other lines, and as docs/protocol.md ("Pulse endurance") shows them
    assert all(len(line) <= 100 for line in wear)
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    assert "\n".join(f"    {line}" for line in wear) in doc
    assert json.loads(out.read_text())["wear"] == {
        "endurance": 1000,
        "near_from": 900,
        "tiles": {
            "W0": {"max_wear": 1000, "near_end": 2, "spent": 1},
            "W1": {"max_wear": 0, "near_end": 0, "spent": 0},
        },
    }
    new = emulated_board("emulator://?preset=rram&seed=0")  # no endurance: no wear line, null
    res = CliRunner().invoke(app, ["info", new.uri(transport), "--json", str(out)])
    assert res.exit_code == 0 and "wear" not in res.output
    assert json.loads(out.read_text())["wear"] is None
