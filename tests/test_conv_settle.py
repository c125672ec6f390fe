"""Conv couplings on the emulated board and on boards that only multiply (issue 18): the fixed
point of the board's settle against a plain torch ``conv2d`` fixed-point iteration, the
host-iterated settle through `Device.mvm` against the reference, over a real wire too, and
the accounting of one tile read at every position."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drivers import SettleBudget, Topology, open_device
from hil.ep import EBBlock
from hil.host_settle import HostSettle

BUDGET = SettleBudget(max_steps=400, tol=0.0, dt=0.5)


# (pools, pool mode): the first layer's pool routes nothing back (its source is clamped); with
# (2, 2) the second one's does, through the mean's adjoint
NETS = {"max": ((2, 1), "max"), "avg": ((2, 2), "avg")}


def topology(head: tuple[int, ...] = (3,), net: str = "max") -> Topology:
    pools, mode = NETS[net]
    return Topology.convolutional(
        (2, 8, 8), [3, 4], pools=list(pools), pool_mode=mode, head=list(head), budget=BUDGET
    )


def weights(t: Topology, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in t.couplings:
        rows, cols = t.tile_shape(c.tile)
        w = 0.5 * torch.randn(rows, cols, generator=gen) / rows**0.5
        w[-1] = 0.3  # biases at mid-range: units off the kinks
        out[c.tile] = w
    return out


def torch_fixed_point(
    x: torch.Tensor, w: dict[str, torch.Tensor], steps: int, dt: float, net: str = "max"
) -> list[torch.Tensor]:
    """The same network written with plain torch ops: conv2d + max_pool2d or avg_pool2d
    forwards, autograd of the pooled term for the feedback, linear head;
    ``s <- s + dt (clamp(u, 0, 1) - s)``."""
    (p0, p1), mode = NETS[net]
    pool = F.max_pool2d if mode == "max" else F.avg_pool2d

    def pooled(pre: torch.Tensor, p: int) -> torch.Tensor:
        return pre if p == 1 else pool(pre, p)

    k0, b0 = w["W0"][:-1].T.reshape(3, 2, 3, 3), w["W0"][-1]
    k1, b1 = w["W1"][:-1].T.reshape(4, 3, 3, 3), w["W1"][-1]
    h, bh = w["W2"][:-1], w["W2"][-1]
    img = x.reshape(-1, 2, 8, 8)
    side = 4 // p1
    s1 = torch.zeros(x.shape[0], 3, 4, 4)
    s2 = torch.zeros(x.shape[0], 4, side, side)
    s3 = torch.zeros(x.shape[0], 3)
    drive1 = pooled(F.conv2d(img, k0, b0, padding=1), p0)
    for _ in range(steps):
        a = s1.clone().requires_grad_()
        phi = (pooled(F.conv2d(a, k1, b1, padding=1), p1) * s2).sum()  # the s1 -> s2 term
        (back1,) = torch.autograd.grad(phi, a)
        u1 = drive1 + back1
        u2 = pooled(F.conv2d(s1, k1, b1, padding=1), p1) + (s3 @ h.T).reshape(-1, 4, side, side)
        u3 = s2.flatten(1) @ h + bh
        s1 = s1 + dt * (u1.clamp(0, 1) - s1)
        s2 = s2 + dt * (u2.clamp(0, 1) - s2)
        s3 = s3 + dt * (u3.clamp(0, 1) - s3)
    return [s1.flatten(1), s2.flatten(1), s3]


@pytest.mark.parametrize("net", sorted(NETS))
def test_board_settles_a_conv_network_to_the_torch_conv2d_fixed_point(net: str) -> None:
    t = topology(net=net)
    w = weights(t)
    dev = open_device("emulator://?preset=ideal&seed=0")
    blk = EBBlock(dev, t, weights=w)
    x = torch.rand(5, 128, generator=torch.Generator().manual_seed(1))
    eq = blk.free(x)
    want = torch_fixed_point(x, {k: v.detach() for k, v in blk.device_net.weights.items()}, 400, 0.5, net)
    for g, ref in zip(["s1", "s2", "s3"], want, strict=True):
        got = torch.as_tensor(eq.states[g])
        assert float((got - ref).abs().max()) < 1e-5, g
        assert float(((ref > 0) & (ref < 1)).float().mean()) > 0.3, g  # not a trivially clamped state
    # the trainer's cell count: (C_in k^2 + 1) C_out per conv layer, the head a full tile
    assert t.cells() == (2 * 9 + 1) * 3 + (3 * 9 + 1) * 4 + (t.groups["s2"] + 1) * 3


def test_conv_settle_accounting_counts_a_read_per_position() -> None:
    t = topology(head=())
    dev = open_device("emulator://?preset=ideal&seed=0")
    EBBlock(dev, t, weights=weights(t))
    info = dev.info.limits
    x = np.random.default_rng(0).random((4, 128), dtype=np.float32)
    before = dev.meter()
    eq = dev.settle({"s0": x})
    after = dev.meter()
    # W0's source is clamped: its 64 positions are read once per settle; W1 is read forwards
    # and transposed at its 16 positions every step; no fully connected coupling: no analog step
    per = 2 * 16
    want = (eq.steps * per + 64) * 4 * dev.board.preset.periphery.mvm_time_s
    assert eq.settle_time_s == pytest.approx(want, rel=1e-9)
    assert after.clock_s - before.clock_s == pytest.approx(want, rel=1e-9)
    assert eq.energy_j > 0 and info.max_batch >= 4


def test_conv_settle_energy_is_computed_when_read_from_the_settles_weights() -> None:
    t = topology()
    dev = open_device("emulator://?preset=ideal&seed=0")
    blk = EBBlock(dev, t, weights=weights(t))
    x = {"s0": torch.rand(4, 128, generator=torch.Generator().manual_seed(2))}
    first = dev.board.settle(x)
    assert first.energy_pending  # a training step never reads it
    want = first.energy.clone()
    later = dev.board.settle(x)
    with torch.no_grad():  # new weights on every tile before the second settle's energy is read
        for p in blk.weights.values():
            p.mul_(0.5)
    blk.sync()
    assert dev.board.settle(x).energy_pending
    assert later.energy_pending
    assert torch.equal(later.energy, want)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("transport", ["emulator", "visa-tcp", "serial-socket"])
def test_host_iterated_conv_settle_through_mvm_equals_the_reference(
    transport: str, net: str, device_on
) -> None:
    """Over the real servers the topology (with its conv geometry, the pool mode included)
    crosses the wire at configure, and every product is an `mvm` request."""
    t = topology(net=net)
    dev = device_on(transport, board="emulator://?preset=ideal&seed=0&capabilities=mvm")
    blk = EBBlock(dev, t, weights=weights(t), settle="host")
    x = torch.rand(3, 128, generator=torch.Generator().manual_seed(2))
    eq = blk.free(x)
    ref = blk.reference().settle({"s0": x.double()}, newton=True)
    for g in ("s1", "s2", "s3"):
        assert float((torch.as_tensor(eq.states[g]).double() - ref.states[g]).abs().max()) < 1e-5
    hs = blk.host_settle
    assert hs is not None and isinstance(hs, HostSettle)
    # the clamped W0 read once (64 positions x 3 samples: one call), per step W1 forwards and
    # transposed (48 rows each) and the head both ways
    assert hs.stats.per_settle == 1 and hs.stats.per_step == 4


@pytest.mark.parametrize("transport", ["visa-tcp", "serial-socket"])
def test_a_board_across_the_wire_settles_the_average_pool_it_was_sent(transport: str, device_on) -> None:
    """The board relaxes the network itself: a board that lost `pool_mode` on the way would
    max-pool, which settles elsewhere (checked: the max-pooled network's states differ)."""
    t = topology(net="avg")
    dev = device_on(transport, board="emulator://?preset=ideal&seed=0")
    blk = EBBlock(dev, t, weights=weights(t))
    x = torch.rand(3, 128, generator=torch.Generator().manual_seed(2))
    eq = blk.free(x)
    ref = blk.reference().settle({"s0": x.double()}, newton=True)
    maxed = EBBlock(
        open_device("emulator://?preset=ideal&seed=0"), replace_mode(t, "max"), weights=weights(t)
    )
    other = maxed.free(x)
    for g in ("s1", "s2", "s3"):
        got = torch.as_tensor(eq.states[g]).double()
        assert float((got - ref.states[g]).abs().max()) < 1e-5, g
    assert float((torch.as_tensor(other.states["s2"]).double() - ref.states["s2"]).abs().max()) > 1e-2


def replace_mode(t: Topology, mode: str) -> Topology:
    return dataclasses.replace(
        t,
        couplings=tuple(
            dataclasses.replace(c, pool_mode=mode) if c.kind == "conv" else c for c in t.couplings
        ),
    )
