"""The Device interface's front door: URIs, topology validation and request checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers import ConfigurationError, Coupling, LimitViolation, Nudge, Topology, open_device
from drivers.uri import parse_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("emulator://?preset=rram&seed=0", ("emulator", "", {"preset": "rram", "seed": "0"})),
        ("visa://TCPIP0::127.0.0.1::5025::SOCKET", ("visa", "TCPIP0::127.0.0.1::5025::SOCKET", {})),
        ("visa://ASRL/dev/ttyUSB0::INSTR", ("visa", "ASRL/dev/ttyUSB0::INSTR", {})),
        ("serial:///dev/ttyACM0?baud=921600", ("serial", "/dev/ttyACM0", {"baud": "921600"})),
        ("serial+socket://127.0.0.1:7000", ("serial+socket", "127.0.0.1:7000", {})),
        ("serial://COM3?baud=115200", ("serial", "COM3", {"baud": "115200"})),
    ],
)
def test_parse_uri(uri: str, expected: tuple) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("rram", "has no scheme"),
        ("gpib://1", "unknown device scheme 'gpib'"),
        ("emulator://?preset=memristor", "unknown preset 'memristor'"),
        ("emulator://?preset=rram&adc_bit=6", "unknown emulator URI parameter 'adc_bit'"),
        ("emulator://?preset=rram&adc_bits=six", "adc_bits='six': expected an integer or none"),
        ("emulator://?seed=x", "seed='x': expected an integer"),
        ("emulator://somehost?preset=rram", "take no host or path"),
        ("serial+socket://localhost", "need HOST:PORT"),
        ("serial://?baud=9600", "need a port"),
    ],
)
def test_bad_uris_name_the_problem(uri: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_device(uri)


def test_uri_overrides_reach_the_board() -> None:
    with open_device("emulator://?preset=rram&seed=4&adc_bits=6&dac_bits=none&read_noise=1e-8") as dev:
        assert dev.info.limits.adc_bits == 6 and dev.info.limits.dac_bits is None
        assert dev.board.preset.device.read_noise == 1e-8
        assert dev.info.identity.serial == "EMU-00000004"


def test_topology_validation() -> None:
    with pytest.raises(ConfigurationError, match="reserved"):
        Topology({"bias": 3}, ())
    with pytest.raises(ConfigurationError, match="unknown group 'h'"):
        Topology({"x": 3}, (Coupling("W", ("x",), ("h",)),))
    with pytest.raises(ConfigurationError, match="dense tile 'W': rows must be cols"):
        Topology({"x": 3, "h": 2}, (Coupling("W", ("x",), ("h",), kind="dense"),))
    topo = Topology.layered([4, 5, 3])
    assert topo.tile_shape("W0") == (5, 5) and topo.tile_shape("W1") == (6, 3)
    assert topo.cells() == 25 + 18
    dense = Topology.dense({"x": 4, "h": 6})
    assert dense.tile_shape("W") == (11, 10) and dense.cells() == 110


def test_requests_are_checked_before_the_board() -> None:
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        with pytest.raises(ConfigurationError, match="configure"):
            dev.settle({"s0": np.zeros((1, 4), np.float32)})
        dev.configure(Topology.layered([4, 5, 3]))
        with pytest.raises(ConfigurationError, match=r"expected shape \(batch, 4\)"):
            dev.settle({"s0": np.zeros((2, 5), np.float32)})
        with pytest.raises(ConfigurationError, match="NaN"):
            dev.settle({"s0": np.full((2, 4), np.nan, np.float32)})
        with pytest.raises(ConfigurationError, match="unknown group 'out'"):
            dev.settle({"s0": np.zeros((2, 4), np.float32)}, nudge={"out": Nudge(0.1)})
        with pytest.raises(ConfigurationError, match="batch size 3 differs"):
            dev.settle(
                {"s0": np.zeros((2, 4), np.float32)}, nudge={"s2": Nudge(0.1, target=np.zeros((3, 3)))}
            )
        with pytest.raises(ConfigurationError, match="unknown tile 'W9'"):
            dev.read_conductance("W9")
        with pytest.raises(ConfigurationError, match="whole pulse counts"):
            dev.pulse("W0", np.full((5, 5), 0.5), np.zeros((5, 5)))
        with pytest.raises(LimitViolation, match="tile size"):
            dev.configure(Topology.layered([2000, 3]))
        assert dev.safety().violations == 0


def test_boundary_arrays_are_not_copied_on_cpu() -> None:
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        dev.configure(Topology.layered([4, 3], bias=False))
        x = np.random.default_rng(0).uniform(0, 1, (2, 4)).astype(np.float32)
        eq = dev.settle({"s0": x})
        assert eq.states["s0"] is x  # the clamp comes back as given
        assert torch.from_numpy(x).data_ptr() == x.ctypes.data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_board_matches_cpu_board() -> None:
    x = np.random.default_rng(0).uniform(0, 1, (8, 16)).astype(np.float32)
    results = []
    for device in ("cpu", "cuda"):
        with open_device(f"emulator://?preset=ideal&seed=0&device={device}") as dev:
            dev.configure(Topology.layered([16, 12, 4]))
            lim = dev.info.limits
            g = np.random.default_rng(1).uniform(lim.g_min, lim.g_max, (17, 12)).astype(np.float32)
            dev.program("W0", g, g[::-1].copy())
            results.append(dev.settle({"s0": x}).states["s1"])
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


def test_wrapper_forwards_status_and_programming_transactions() -> None:
    """A wrapped board (e.g. calibrated) must not hide its reset epoch or an open transaction."""
    from drivers.wrapper import DeviceWrapper

    with open_device("emulator://?preset=ideal&seed=0") as inner:
        inner.configure(Topology.layered([3, 2]))
        dev = DeviceWrapper(inner)
        dev.begin("step-7")
        assert inner.status().transaction == "step-7" and dev.status().transaction == "step-7"
        dev.commit("step-7")
        assert dev.status().transaction is None and dev.status().configured
