"""Every Device operation over every transport gives exactly what the in-process backend
gives for the same board seed: same arrays (bits and dtypes), same scalars, same errors."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from drivers import (
    BoardStatus,
    ConfigurationError,
    Device,
    DeviceError,
    LimitViolation,
    Nudge,
    SettleBudget,
    Topology,
)
from hil.testing import IN_PROCESS, REMOTE_TRANSPORTS, open_transport

BOARD = "emulator://?preset=rram&seed=3"

Record = list[tuple[str, Any]]
_ERROR = "error"


def _run(dev: Device, rec: Record, name: str, fn: Callable[[], Any]) -> Any:
    """Call `fn`, recording its result or the class and text of the error it raised."""
    try:
        out = fn()
    except DeviceError as exc:
        rec.append((name, (_ERROR, type(exc).__name__, str(exc))))
        return None
    rec.append((name, out))
    return out


def script(dev: Device) -> Record:
    """Every operation, including refusals and board-side errors, on a small network."""
    rng = np.random.default_rng(7)
    rec: Record = []
    lim = dev.info.limits
    # ownership (capability "lock") is the served link's: an in-process board has no other host
    rec.append(("info", dataclasses.replace(dev.info, capabilities=dev.info.capabilities - {"lock"})))
    rec.append(("topology0", dev.topology))
    _run(dev, rec, "settle unconfigured", lambda: dev.settle({"s0": np.zeros((1, 5), np.float32)}))
    topo = Topology.layered([5, 4, 3], budget=SettleBudget(max_steps=60, tol=1e-4, dt=0.5, check_every=3))
    _run(dev, rec, "configure", lambda: dev.configure(topo))
    rec.append(("topology", dev.topology))
    for tile in ("W0", "W1"):
        shape = topo.tile_shape(tile)
        gp = rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        gm = rng.uniform(lim.g_min, lim.g_max, shape).astype(np.float32)
        _run(
            dev,
            rec,
            f"program {tile}",
            lambda t=tile, a=gp, b=gm: dev.program(t, a, b, verify=True, max_iters=5),
        )
    _run(dev, rec, "begin", lambda: dev.begin("update-1"))
    _run(dev, rec, "status in a transaction", dev.status)
    _run(dev, rec, "commit another tag", lambda: dev.commit("update-2"))
    _run(dev, rec, "commit", lambda: dev.commit("update-1"))
    _run(dev, rec, "commit again", lambda: dev.commit("update-1"))
    _run(dev, rec, "status committed", dev.status)
    _run(dev, rec, "read", lambda: dev.read_conductance("W0"))
    counts = rng.integers(-3, 4, (6, 4)).astype(np.int32)
    _run(dev, rec, "pulse", lambda: dev.pulse("W0", counts, -counts))
    _run(dev, rec, "pulse int64", lambda: dev.pulse("W1", np.ones((5, 3), np.int64), np.zeros((5, 3))))
    x = rng.uniform(0, 1, (3, 6)).astype(np.float32)
    _run(dev, rec, "mvm", lambda: dev.mvm("W0", x))
    _run(dev, rec, "mvm T", lambda: dev.mvm("W0", rng.uniform(0, 1, (2, 4)), transpose=True))
    _run(dev, rec, "mvm 1-D", lambda: dev.mvm("W1", np.full(5, 0.5)))
    _run(dev, rec, "meter", dev.meter)
    clamp = {"s0": rng.uniform(0, 1, (4, 5)).astype(np.float32)}
    free = _run(dev, rec, "settle free", lambda: dev.settle(clamp, trace=True))
    target = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    _run(
        dev,
        rec,
        "settle nudged",
        lambda: dev.settle(
            clamp,
            nudge={"s2": Nudge(0.3, target=target, grad=0.1 * target)},
            init={g: free.states[g] for g in ("s1", "s2")},
            trace=4,
        ),
    )
    _run(dev, rec, "settle 1-D", lambda: dev.settle({"s0": np.full(5, 0.25, np.float32)}))
    _run(dev, rec, "wait", lambda: dev.wait(3600.0))
    _run(dev, rec, "meter after settles and a wait", dev.meter)
    _run(dev, rec, "read after drift", lambda: dev.read_conductance("W1"))
    # host-side refusals (counted as refused) and board-side errors
    _run(dev, rec, "clamp over limit", lambda: dev.settle({"s0": np.full((1, 5), 2 * lim.clamp_max)}))
    _run(
        dev,
        rec,
        "g over limit",
        lambda: dev.program("W1", np.full((5, 3), 2 * lim.g_max), np.full((5, 3), lim.g_min)),
    )
    _run(
        dev,
        rec,
        "pulse over limit",
        lambda: dev.pulse("W1", np.full((5, 3), lim.max_pulses + 1), np.zeros((5, 3))),
    )
    _run(dev, rec, "unknown tile", lambda: dev.read_conductance("W7"))
    _run(dev, rec, "bad shape", lambda: dev.mvm("W0", np.zeros((2, 3))))
    _run(
        dev,
        rec,
        "bad max_iters",
        lambda: dev.program("W1", np.full((5, 3), lim.g_min), np.full((5, 3), lim.g_min), max_iters=0),
    )
    _run(dev, rec, "bad trace", lambda: dev.settle(clamp, trace=-1))
    _run(dev, rec, "bad wait", lambda: dev.wait(-1.0))
    too_big = Topology.layered([lim.tile_rows_max + 1, 2])
    _run(dev, rec, "configure too big", lambda: dev.configure(too_big))
    _run(dev, rec, "safety", dev.safety)
    dense = Topology.dense({"a": 3, "b": 2}, budget=SettleBudget(max_steps=40, dt=0.3))
    _run(dev, rec, "configure dense", lambda: dev.configure(dense))
    _run(dev, rec, "settle dense", lambda: dev.settle({"a": np.full((2, 3), 0.5, np.float32)}))
    _run(dev, rec, "reset", dev.reset)
    rec.append(("topology after reset", dev.topology))
    _run(dev, rec, "status after reset", dev.status)
    _run(dev, rec, "read after reset", lambda: dev.read_conductance("W0"))
    _run(dev, rec, "safe state", dev.safe_state)
    return rec


def assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: values differ"
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def reference() -> Record:
    torch.manual_seed(0)
    with open_transport(IN_PROCESS, BOARD) as dev:
        return script(dev)


def test_reference_script_exercises_every_outcome(reference: Record) -> None:
    errors = {name: out[1] for name, out in reference if isinstance(out, tuple) and out[0] is _ERROR}
    assert (
        errors["clamp over limit"] == errors["g over limit"] == errors["pulse over limit"] == "LimitViolation"
    )
    assert (
        errors["unknown tile"] == errors["bad shape"] == errors["settle unconfigured"] == "ConfigurationError"
    )
    assert errors["configure too big"] == "LimitViolation"
    assert dict(reference)["safety"].refused == 4
    assert dict(reference)["safety"].violations == 0
    assert "settle free" not in errors and "settle dense" not in errors
    assert errors["commit another tag"] == "ConfigurationError" and "commit again" not in errors
    out = dict(reference)
    assert out["status in a transaction"].transaction == "update-1"
    assert out["status committed"].transaction is None
    assert out["status after reset"].epoch == out["status committed"].epoch + 1
    before, after = out["meter"], out["meter after settles and a wait"]
    assert before.mvm_calls == after.mvm_calls == 3  # one per mvm call, whatever the batch
    assert before.clock_s > 0 and 0 < before.energy_j < after.energy_j  # the settles spent energy
    assert after.clock_s - before.clock_s > 3600.0  # the wait is on the board's clock


@pytest.mark.parametrize("transport", REMOTE_TRANSPORTS)
def test_transport_matches_in_process(
    transport: str, reference: Record, device_on: Callable[..., Device]
) -> None:
    got = script(device_on(transport, BOARD))  # the plugin's fixture (hil.testing)
    assert [n for n, _ in got] == [n for n, _ in reference]
    for (name, want), (_, have) in zip(reference, got, strict=True):
        assert_same(_without_arrays_id(want), _without_request_name(_without_arrays_id(have)), name)


def _without_arrays_id(out: Any) -> Any:
    """A status with its `arrays_id` checked and left out: each emulated board draws its own
    (docs/protocol.md, "Board status"), so the served board's is not the in-process one's."""
    if not isinstance(out, BoardStatus):
        return out
    assert type(out.arrays_id) is int
    return dataclasses.replace(out, arrays_id=None)


def _without_request_name(out: Any) -> Any:
    """A board's error as the in-process device words it: over a link the host prefixes what
    the board said with the request it answered (``commit: ...``, ``program 'W0': ...``; its
    own refusals, made before sending, carry no prefix), and exactly once."""
    if not (isinstance(out, tuple) and out and out[0] is _ERROR):
        return out
    kind, text = out[1], out[2]
    head, sep, rest = text.partition(": ")
    if sep and re.fullmatch(r"[a-z_]+( '[^']*')?", head):
        assert not re.match(rf"{re.escape(head)}: ", rest), f"named twice: {text}"
        return (_ERROR, kind, rest)
    return out


@pytest.fixture
def remote(request: pytest.FixtureRequest, device_on: Callable[..., Device]) -> Device:
    return device_on(request.param, BOARD)


@pytest.mark.parametrize("remote", ["visa-tcp", "serial-socket"], indirect=True)
def test_limit_violation_is_refused_before_sending(remote: Device) -> None:
    remote.configure(Topology.layered([3, 2]))
    lim = remote.info.limits
    with pytest.raises(LimitViolation):
        remote.settle({"s0": np.full((1, 3), lim.clamp_max * 1.01, np.float32)})
    with pytest.raises(ConfigurationError):
        remote.pulse("W0", np.zeros((3, 2)), np.zeros((4, 2)))
    s = remote.safety()
    assert s.refused == 1 and s.violations == 0
