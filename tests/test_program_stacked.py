"""`Device.program_stacked`: (2, rows, cols) targets in one call. The in-process emulator takes
a float32 tensor on its device as it is (checked with torch, no host copy, read-backs as
tensors); every other backend gets numpy through `program`. Both must write the same
conductances and refuse the same targets with the same errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import open_device
from drivers.errors import ConfigurationError, LimitViolation
from drivers.topology import Topology
from hil.testing import open_transport

TOPOLOGY = Topology.layered([6, 5, 3])  # W0 is (7, 5): 6 sources and the bias row


def _targets(seed: int, lo: float, hi: float) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, (2, 7, 5)).astype(np.float32)


@pytest.mark.parametrize("preset", ["ideal", "rram", "pcm"])
@pytest.mark.parametrize("verify", [False, True])
def test_a_tensor_writes_what_numpy_writes(preset: str, verify: bool) -> None:
    """Same seed, same targets: the tensor path and `program` leave the same conductances and
    report the same numbers; the tensor path's read-backs are tensors on the board's device."""
    reports, held = [], []
    for as_tensor in (False, True):
        with open_device(f"emulator://?preset={preset}&seed=4") as dev:
            dev.configure(TOPOLOGY)
            lim = dev.info.limits
            g = _targets(1, lim.g_min, lim.g_max)
            if as_tensor:
                r = dev.program_stacked("W0", torch.from_numpy(g), verify=verify)
                assert isinstance(r.g_plus, torch.Tensor) and r.g_plus.device == dev.tensor_device
            else:
                r = dev.program("W0", g[0], g[1], verify=verify)
                assert isinstance(r.g_plus, np.ndarray)
            reports.append(r)
            held.append(np.stack(dev.read_conductance("W0")))
    a, b = reports
    np.testing.assert_array_equal(np.asarray(a.g_plus), np.asarray(b.g_plus))
    np.testing.assert_array_equal(np.asarray(a.g_minus), np.asarray(b.g_minus))
    assert (a.iterations, a.pulses, a.residual_max, a.within_tol, a.energy_j) == (
        b.iterations, b.pulses, b.residual_max, b.within_tol, b.energy_j,
    )  # fmt: skip
    np.testing.assert_array_equal(held[0], held[1])


def _outcome(call) -> tuple[str, str]:
    try:
        call()
    except (LimitViolation, ConfigurationError) as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    half=st.sampled_from([0, 1]),
    where=st.tuples(st.integers(0, 6), st.integers(0, 4)),
    value=st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1e-6]),
        st.floats(5e-7, 1.2e-5),  # the ideal preset's window is [1e-6, 1e-5] S
    ),
)
def test_a_tensor_is_refused_as_numpy_is(half: int, where: tuple[int, int], value: float) -> None:
    """One entry of valid targets set to `value` (in range or out of it, NaN, infinite): the
    tensor path and `program` both accept it or both refuse it, with the same error and
    message, and a refused tensor leaves the tile as it was."""
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        dev.configure(TOPOLOGY)
        lim = dev.info.limits
        g = _targets(2, lim.g_min, lim.g_max)
        g[half][where] = np.float32(value)
        before = np.stack(dev.read_conductance("W0"))
        tensor = _outcome(lambda: dev.program_stacked("W0", torch.from_numpy(g.copy())))
        if tensor[0] != "ok":
            np.testing.assert_array_equal(np.stack(dev.read_conductance("W0")), before)
        plain = _outcome(lambda: dev.program("W0", g[0].copy(), g[1].copy()))
    assert tensor == plain


def test_a_tensor_of_the_wrong_shape_names_the_tile_shape() -> None:
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        dev.configure(TOPOLOGY)
        g = torch.full((2, 5, 7), dev.info.limits.g_min)
        shape = r"targets have shape \(2, 5, 7\), the tile is \(2, 7, 5\)"
        with pytest.raises(ConfigurationError, match=shape):
            dev.program_stacked("W0", g)


@pytest.mark.parametrize("shape", [(3, 7, 5), (7, 5), (1, 7, 5)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_targets_that_are_not_two_stacked_halves_are_refused(shape: tuple[int, ...], as_tensor: bool) -> None:
    """A third half is not dropped and a single matrix is not split by rows: the call names
    the shape it expected."""
    with open_device("emulator://?preset=ideal&seed=0") as dev:
        dev.configure(TOPOLOGY)
        g = np.full(shape, dev.info.limits.g_min, np.float32)
        with pytest.raises(ConfigurationError, match=r"stacked targets are \(2, rows, cols\)|the tile is"):
            dev.program_stacked("W0", torch.from_numpy(g) if as_tensor else g)


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_remote_board_gets_the_tensor_as_numpy(transport: str) -> None:
    """A board behind a wire has no tensor path: `program_stacked` sends the tensor's numbers
    through `program`, and the board holds what an in-process board of the same seed holds."""
    board = "emulator://?preset=rram&seed=3"
    held = []
    with open_transport(transport, board) as remote, open_device(board) as local:
        for dev in (remote, local):
            dev.configure(TOPOLOGY)
            lim = dev.info.limits
            r = dev.program_stacked("W0", torch.from_numpy(_targets(5, lim.g_min, lim.g_max)))
            held.append(np.stack((np.asarray(r.g_plus), np.asarray(r.g_minus))))
    assert remote.tensor_device is None
    np.testing.assert_array_equal(held[0], held[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_board_takes_a_cuda_tensor_where_it_is() -> None:
    """On a CUDA board a CUDA tensor is written there (read-backs stay on the GPU) and the
    tile holds what a CPU board holds after the same targets (an ideal write is a clamp)."""
    held = []
    for device in ("cpu", "cuda"):
        with open_device(f"emulator://?preset=ideal&seed=0&device={device}") as dev:
            dev.configure(TOPOLOGY)
            lim = dev.info.limits
            g = torch.from_numpy(_targets(3, lim.g_min - 1e-7, lim.g_max)).clamp_(min=lim.g_min)
            r = dev.program_stacked("W0", g.to(dev.tensor_device))
            assert isinstance(r.g_plus, torch.Tensor) and r.g_plus.device.type == device
            held.append(torch.stack((r.g_plus, r.g_minus)).cpu())
    torch.testing.assert_close(held[1], held[0], rtol=0, atol=0)
