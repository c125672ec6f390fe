"""A board served with byte faults (`FaultPlan(ber=, drop_rate=)`, `hil emulator serve --ber
--byte-drop-rate`) corrupts or loses bytes on every link, TCP included. Its SCPI URIs were
printed plain, and plain SCPI has no check of its own: a host that opened them as printed took
corrupted numbers for data (seen: one mvm of 80 wrong at ber 1e-5, without an error) or was
refused for a request it never sent (a clamp of 3.6e37). Under byte faults the served SCPI
URIs now carry ``check=1`` (docs/protocol.md, "Checked mode"), as the fault harness's did."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from drivers import Topology, open_device
from hil.testing import FaultPlan, serve_board

BOARD = "emulator://?preset=ideal&seed=0"


def _work(dev):  # type: ignore[no-untyped-def]
    dev.configure(Topology.layered([32, 16, 4]))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(40):
        out.append(dev.mvm("W0", rng.uniform(-1, 1, (8, 33)).astype(np.float32)))
        out.append(dev.settle({"s0": rng.uniform(0, 1, (8, 32)).astype(np.float32)}).states["s1"])
    return out


def test_scpi_uris_of_a_board_with_byte_faults_are_checked_and_give_the_clean_numbers() -> None:
    with open_device(BOARD) as dev:
        clean = _work(dev)
    with serve_board(BOARD, plan=FaultPlan(ber=1e-5, seed=3)) as served:
        for transport in ("visa-tcp", "visa-asrl"):
            assert served.uris[transport].endswith("?check=1"), served.uris
            assert "?" not in served.resources[transport]  # what a VISA tool opens stays plain
        assert "?" not in served.uris["serial-socket"]  # the framed protocol checks every frame
        uri = served.uri("visa-tcp", attempts="20", backoff="0")
        assert uri.endswith("?check=1&attempts=20&backoff=0"), uri
        with open_device(uri) as dev:
            got = _work(dev)
        assert served.plan.summary()["corrupt"] > 0  # faults did strike
    wrong = [k for k, (a, b) in enumerate(zip(clean, got, strict=True)) if not np.array_equal(a, b)]
    assert not wrong, f"results {wrong} of {len(clean)} differ from the fault-free board's"
    with serve_board(BOARD) as served:  # no byte faults: plain, as before
        assert "?" not in served.uris["visa-tcp"]


def test_the_cli_prints_checked_scpi_uris_under_byte_faults() -> None:
    cmd = [sys.executable, "-m", "hil.cli", "emulator", "serve", "--json", "--preset", "ideal"]
    cmd += ["--scpi-port", "0", "--byte-drop-rate", "1e-6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        served = json.loads(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(30)
    assert served["uris"]["visa-tcp"].endswith("?check=1"), served
