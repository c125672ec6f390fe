"""Conv couplings (issue 18): the topology's checks, the maps of `drivers.conv` against torch
autograd and against the tile read at every position, the reference network's implicit
gradients against backprop through time, and the wire carrying the geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import BIAS, ConfigurationError, Coupling, SettleBudget, Topology, conv
from drivers.wire import payload
from hil.gradcheck import cosine, rel_error
from hil.reference import DHN


def small(
    pool: int = 2, head: tuple[int, ...] = (3,), budget: SettleBudget | None = None, pool_mode: str = "max"
) -> Topology:
    return Topology.convolutional(
        (2, 8, 8), [3, 4], pools=[pool, pool], head=list(head), budget=budget, pool_mode=pool_mode
    )


def test_tile_shape_and_cells_are_one_kernel_per_layer() -> None:
    t = small()
    # (C_in k^2 + 1 bias) x C_out per conv layer; the head is a full tile
    assert t.tile_shape("W0") == (2 * 9 + 1, 3)
    assert t.tile_shape("W1") == (3 * 9 + 1, 4)
    assert t.shapes["s1"] == (3, 4, 4) and t.shapes["s2"] == (4, 2, 2)
    assert t.tile_shape("W2") == (16 + 1, 3)
    assert t.cells() == 19 * 3 + 28 * 4 + 17 * 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kernel": 0}, "kernel"),
        ({"kernel": 16}, "kernel"),
        ({"padding": 3}, "padding"),
        ({"pool": 3}, "pooling windows"),
        ({"pool": 9}, "pool"),
        ({"pool_mode": "mean"}, "pool_mode is one of 'max', 'avg', got 'mean'"),
    ],
)
def test_bad_conv_geometry_is_refused_with_its_name(change: dict, match: str) -> None:
    base = {"kernel": 3, "padding": 1, "pool": 2, "pool_mode": "max"}
    base.update(change)
    c = Coupling("W0", ("a", BIAS), ("b",), "conv", 1.0, **base)
    with pytest.raises(ConfigurationError, match=match):
        Topology({"a": 64, "b": 48}, (c,), shapes={"a": (1, 8, 8), "b": (3, 4, 4)})


def test_conv_shape_mismatch_and_missing_shape_are_refused() -> None:
    c = Coupling("W0", ("a",), ("b",), "conv", 1.0, 3, 1, 2)
    with pytest.raises(ConfigurationError, match="gives maps of 4 x 4"):
        Topology({"a": 64, "b": 75}, (c,), shapes={"a": (1, 8, 8), "b": (3, 5, 5)})
    with pytest.raises(ConfigurationError, match="needs a \\(C, H, W\\)"):
        Topology({"a": 64, "b": 48}, (c,), shapes={"a": (1, 8, 8)})
    with pytest.raises(ConfigurationError, match="holds 60"):
        Topology({"a": 64, "b": 48}, (c,), shapes={"a": (1, 8, 8), "b": (3, 4, 5)})
    for lin in (Coupling("W1", ("a",), ("b",), kernel=3), Coupling("W1", ("a",), ("b",), pool_mode="avg")):
        with pytest.raises(ConfigurationError, match="for conv couplings"):
            Topology({"a": 4, "b": 4}, (lin,))
    with pytest.raises(ConfigurationError, match="kind must be"):
        Topology({"a": 4, "b": 4}, (Coupling("W1", ("a",), ("b",), "sparse"),))  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    c_in=st.integers(1, 3),
    size=st.integers(2, 7),
    c_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    padding=st.integers(0, 2),
    pool=st.integers(1, 3),
    mode=st.sampled_from(["max", "avg"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_maps_are_the_derivatives_of_phi_and_the_tile_read_at_every_position(
    c_in: int, size: int, c_out: int, kernel: int, padding: int, pool: int, mode: str, bias: bool, seed: int
) -> None:
    padding = min(padding, kernel - 1)
    side = size + 2 * padding - kernel + 1
    if side < 1 or side % pool:
        return
    g = conv.ConvGeometry(c_in, size, size, c_out, kernel, padding, pool, bias, mode)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g.rows, c_out, generator=gen, dtype=torch.float64)
    x = torch.rand(3, c_in * size * size, generator=gen, dtype=torch.float64)
    y = torch.rand(3, int(np.prod(g.out_shape)), generator=gen, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    conv.phi(xr, y, wr, g).sum().backward()
    idx = conv.winners(x, w, g)
    assert torch.allclose(conv.backward(y, w, g, idx), xr.grad, atol=1e-12)
    assert torch.allclose(conv.weight_grad(x, y, g, idx), wr.grad, atol=1e-12)
    # the same maps as MVMs of the one tile, one row per position
    pre = conv.from_positions(conv.patches(x, g) @ w, g)
    assert torch.allclose(conv.pool(pre, g)[0], conv.forward(x, w, g)[0], atol=1e-12)
    back = conv.fold_patches(conv.to_positions(conv.unpool(y, g, idx)) @ w.T, g)
    assert torch.allclose(back, conv.backward(y, w, g, idx), atol=1e-12)
    # the patches and the fold are torch's im2col and col2im, bit for bit
    cols = F.unfold(g.maps(x), kernel, padding=padding).transpose(1, 2).reshape(-1, g.kernel_rows)
    assert torch.equal(conv.patches(x, g)[:, : g.kernel_rows], cols)
    # the read energy's totals per kernel entry, without the patches
    assert torch.allclose(conv.patch_totals(x, g), cols.sum(0), rtol=1e-12, atol=0)
    # and per position, each read's squared input norm (the bias line included), for its noise
    norms = conv.patch_norms(x, g).flatten(1)
    assert torch.allclose(norms, (conv.patches(x, g) ** 2).sum(1).reshape(3, -1), rtol=1e-12, atol=0)
    rows = torch.rand(3 * g.positions, g.rows, generator=gen, dtype=torch.float64)
    blocks = rows[:, : g.kernel_rows].reshape(3, g.positions, g.kernel_rows).transpose(1, 2)
    folded = F.fold(blocks, (size, size), kernel, padding=padding).flatten(1)
    assert torch.equal(conv.fold_patches(rows, g), folded)
    if mode == "avg" and pool > 1:  # the window's mean, with no winners to route through
        assert idx is None
        want = F.avg_pool2d(F.conv2d(g.maps(x), *conv.kernel(w, g), padding=padding), pool)
        assert torch.allclose(conv.forward(x, w, g)[0], want.flatten(1), atol=1e-12)


@pytest.mark.parametrize("pool_mode", ["max", "avg"])
def test_reference_implicit_gradients_equal_backprop_through_time(pool_mode: str) -> None:
    t = small(budget=SettleBudget(max_steps=400, tol=1e-10, dt=0.5), pool_mode=pool_mode)
    gen = torch.Generator().manual_seed(3)
    net = DHN(t, generator=gen)
    with torch.no_grad():  # units away from the kinks: biases at mid-range
        for w in net.weights.values():
            w.mul_(0.5)
            w[-1] = 0.4
    x = torch.rand(4, 128, generator=gen, dtype=torch.float64)
    target = torch.rand(4, 3, generator=gen, dtype=torch.float64)

    def loss(states: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((states["s3"] - target) ** 2).sum(-1).mean()

    _, gw, gx, eq = net.implicit_gradients({"s0": x}, loss)
    assert eq.converged
    on = [float(((v > 0) & (v < 1)).double().mean()) for g, v in eq.states.items() if g != "s0"]
    assert min(on) > 0.5, on  # most units off the kinks: the gradients are not trivially zero
    xr = x.clone().requires_grad_()
    bptt = loss(net.settle_bptt({"s0": xr}, 400))
    grads = torch.autograd.grad(bptt, [*net.weights.values(), xr])
    for (tile, a), b in zip(gw.items(), grads[:-1], strict=True):
        assert cosine(a, b) > 0.999999, tile
        assert rel_error(a, b) < 1e-6, tile
    assert rel_error(gx["s0"], grads[-1]) < 1e-6


def test_reference_refuses_a_clamped_destination_with_a_free_source() -> None:
    net = DHN(small())
    with pytest.raises(ValueError, match="pooling winners"):
        net.settle({"s0": torch.rand(2, 128), "s2": torch.rand(2, 16)})


def test_the_wire_carries_the_geometry_and_an_older_topology_reads_as_before() -> None:
    t = small()
    back = payload.topology_from_dict(payload.topology_to_dict(t))
    assert back == t and back.tile_shape("W1") == t.tile_shape("W1")
    assert "pool_mode" not in payload.topology_to_dict(t)["couplings"][0]  # a max-pool's payload as before
    avg = small(pool_mode="avg")
    d = payload.topology_to_dict(avg)
    assert d["couplings"][0]["pool_mode"] == "avg"
    assert payload.topology_from_dict(d) == avg != t
    flat = Topology.layered([4, 3])
    d = payload.topology_to_dict(flat)
    assert "shapes" not in d and "kernel" not in d["couplings"][0]
    assert payload.topology_from_dict(d) == flat
    d = payload.topology_to_dict(t)
    d["shapes"]["s1"] = [3, 4]
    with pytest.raises(ConfigurationError, match="channels, height, width"):
        payload.topology_from_dict(d)
