"""Limits of conv topologies (issue 18): the declared bounds on a topology's nodes and on a
settle's size, on the host and on the board, and random conv geometries sent through the
real SCPI and framed servers: a valid one configures the tile shape the host computes, an
invalid one is refused with a ConfigurationError and the server keeps serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import ConfigurationError, Coupling, LimitViolation, SettleBudget, Topology
from drivers.checks import MAX_SETTLE_VALUES, check_settle
from drivers.topology import MAX_NODES
from drivers.wire import payload
from tests.raw_scpi import RawScpi

BUDGET = SettleBudget(max_steps=2, tol=0.0)


def test_a_topology_over_max_nodes_is_refused() -> None:
    c = Coupling("W0", ("a",), ("b",), "conv", 1.0, 1, 0, 1)
    side = 1024  # 1 x 1024 x 1024 in, 1 x 1024 x 1024 out: 2^21 nodes
    with pytest.raises(ConfigurationError, match="nodes of the topology"):
        shapes = {"a": (1, side, side), "b": (1, side, side)}
        Topology({"a": side * side, "b": side * side}, (c,), shapes=shapes)
    assert MAX_NODES == 1 << 20


def test_a_settle_over_its_value_bound_is_refused_on_host_and_board(device_on) -> None:
    """128 x 24 x 24 maps: 74 304 nodes; 1024 samples hold 76 M values (bound 2^26 = 67 M)."""
    t = Topology.convolutional((1, 24, 24), [128], pools=[1], budget=BUDGET)
    nodes = sum(t.groups.values())
    assert 1024 * nodes > MAX_SETTLE_VALUES > 900 * nodes
    dev = device_on("emulator", board="emulator://?preset=ideal&seed=0")
    dev.configure(t)
    x = np.zeros((1024, 576), np.float32)
    with pytest.raises(LimitViolation, match="chunks of at most 903"):
        check_settle(t, dev.info.limits, {"s0": x}, None, None)
    board = dev.board  # the board's own check, past the host's
    before = board.safety.refused
    with pytest.raises(LimitViolation, match="values in one settle"):
        board.settle({"s0": torch.zeros(1024, 576)})
    assert board.safety.refused == before + 1


@st.composite
def geometry(draw: st.DrawFn) -> dict:
    """A conv geometry, in or out of bounds; half the time the destination's side is the one
    the kernel, padding and pool give (so both outcomes are drawn often)."""
    g = {
        "c_in": draw(st.integers(1, 4)),
        "h": draw(st.integers(1, 12)),
        "c_out": draw(st.integers(1, 4)),
        # mostly in range, sometimes past either end
        "kernel": draw(st.one_of(st.integers(1, 5), st.integers(-1, 17))),
        "padding": draw(st.one_of(st.integers(0, 2), st.integers(-1, 4))),
        "pool": draw(st.one_of(st.integers(1, 2), st.integers(0, 9))),
        "bias": draw(st.booleans()),
    }
    side = g["h"] + 2 * g["padding"] - g["kernel"] + 1
    fits = g["pool"] > 0 and side > 0 and side % g["pool"] == 0
    g["out_h"] = side // g["pool"] if fits and draw(st.booleans()) else draw(st.integers(1, 12))
    return g


def _topology(g: dict) -> dict:
    rows = ["a", "bias"] if g["bias"] else ["a"]
    shapes = {"a": [g["c_in"], g["h"], g["h"]], "b": [g["c_out"], g["out_h"], g["out_h"]]}
    return {
        "groups": {k: a * b * c for k, (a, b, c) in shapes.items()},
        "shapes": shapes,
        "couplings": [
            {
                "tile": "W0",
                "rows": rows,
                "cols": ["b"],
                "kind": "conv",
                "w_max": 1.0,
                "kernel": g["kernel"],
                "padding": g["padding"],
                "pool": g["pool"],
            }
        ],
        "budget": {"max_steps": 2, "tol": 0.0},
    }


accepted: list[bool] = []  # per example: the board took the topology (the test below checks both occur)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(g=geometry())
def random_geometry_example(g: dict, emulated_board) -> None:
    """The raw topology over a TCP socket (no host checks in front): the board accepts exactly
    what `Topology` accepts, reports the tile shape the host computes, and refuses the rest
    with an error naming it, still serving afterwards."""
    served = emulated_board(board="emulator://?preset=ideal&seed=0")
    d = _topology(g)
    accepted.append(False)
    try:
        want = payload.topology_from_dict(json.loads(json.dumps(d))).tile_shape("W0")
    except ConfigurationError:
        want = None
    body = json.dumps(d).encode()
    n = str(len(body)).encode()
    with RawScpi(served.resources["visa-tcp"], timeout=10) as raw:
        raw.send(b"CONF:TOP #" + str(len(n)).encode() + n + body + b"\n")
        err = raw.query("SYST:ERR?")
        if want is None:
            assert not err.startswith(b"0,"), err  # refused
        else:
            assert err.startswith(b"0,"), err
            assert want == (g["c_in"] * g["kernel"] ** 2 + g["bias"], g["c_out"])
            accepted[-1] = True
        assert b"xbar-hil" in raw.query("*IDN?")  # still serving


def test_random_conv_geometries_through_the_scpi_server(emulated_board) -> None:
    accepted.clear()
    random_geometry_example(emulated_board)
    assert any(accepted) and not all(accepted), accepted


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_conv_network_settles_over_the_wire_as_in_process(transport: str, device_on) -> None:
    budget = SettleBudget(max_steps=50, tol=0.0)
    t = Topology.convolutional((2, 6, 6), [3], pools=[2], head=[4], budget=budget)
    x = np.random.default_rng(1).random((3, 72), dtype=np.float32)
    out = []
    for tr in ("emulator", transport):
        dev = device_on(tr, board="emulator://?preset=ideal&seed=0")
        dev.configure(t)
        gp = np.full(t.tile_shape("W0"), 6e-6, np.float32)
        gm = np.full(t.tile_shape("W0"), 5e-6, np.float32)
        dev.program("W0", gp, gm)
        out.append(dev.settle({"s0": x}).states["s2"])
    assert np.allclose(out[0], out[1], atol=1e-6)
