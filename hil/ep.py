"""Energy-based blocks bound to a Device, and Equilibrium Propagation (EP) gradients.

An `EBBlock` owns a `Topology` (layered or dense), a host copy of the weights (one
``nn.Parameter`` per tile, in the Device's weight units) and the Device it lives on. It
programs the weights through `hil.programming` whenever the host copy changed, runs the
free and nudged settles on the Device, and turns the equilibria into gradients:

- parameters: ``dL/dW = -[dPhi/dW(s^a) - dPhi/dW(s^b)] / (beta_a - beta_b)`` with
  ``dPhi/dW = s_rows^T s_cols`` for a bipartite tile (bias row: ``1^T s_cols``) and
  ``[s s^T / 2 (diagonal 0) ; s]`` for a dense tile;
- clamped inputs: they enter Phi like parameters, ``dPhi/dx`` is the drive the neighbours
  put on x (``W`` applied to them), and ``dL/dx`` follows by the same difference.

The phases, betas and the gradient difference are `hil.estimator.EPEstimator`'s, which takes
the settle function as an argument: the board's own settle (`Device.settle`), or, on a board
that only multiplies (no ``settle`` capability), the host-iterated settle over `Device.mvm`
(`hil.host_settle.HostSettle`); ``settle="auto" | "board" | "host"`` picks it. Nudges follow
the Device convention: a group's drive gets ``beta (target - s) - beta grad``, i.e. the cost
``l = 1/2|s - target|^2 + grad . s`` is added to the energy with weight beta.
``reduce="mean"`` gives the gradient of the batch mean of l (the parameter gradients are batch
averages), ``"sum"`` of the sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from drivers import (
    BIAS,
    ConfigurationError,
    Coupling,
    Device,
    Equilibrium,
    NotSupported,
    Nudge,
    SettleBudget,
    Topology,
    seeds,
)
from drivers.activation import HARD_SIGMOID, Activation
from drivers.base import repair_lost_arrays
from drivers.batches import batch_of, settle_in_chunks, settle_samples
from drivers.numerics import to_numpy
from hil.compute import resolve_compute
from hil.estimator import MODES, EPEstimator, Mode, SettleFn, check_phases
from hil.host_settle import HostSettle, HostUpdate, check_host_update
from hil.init import gaussian_init
from hil.programming import Programmed, ProgrammingScheme, SchemeBase, UpdateReport, make_scheme
from hil.reference import DHN

__all__ = [
    "MODES",
    "SETTLE_PATHS",
    "EBBlock",
    "EPResult",
    "Mode",
]

ArrayLike = Tensor | np.ndarray
SettlePath = Literal["auto", "board", "host"]
FreeStart = Literal["zero", "forward"]  # where a free settle starts: 0, or the forward sweep
SETTLE_PATHS: tuple[str, ...] = ("auto", "board", "host")


def settle_paths(blocks: Iterable[EBBlock]) -> str:
    """Where `blocks` settle, as `ep.settle` resolved: ``board``, ``host`` or both
    (``ep.settle = "auto"`` picks per board: its own settle if it has one, else the host's)."""
    return ", ".join(sorted({blk.settle_path for blk in blocks}))


def settle_path(device: Device, choice: str = "auto") -> Literal["board", "host"]:
    """Where a block's settles run: ``"board"`` (the board relaxes: `Device.settle`) or
    ``"host"`` (the host iterates the fixed point through `Device.mvm`). ``"auto"`` takes the
    board's settle when it has one, else the host's."""
    if choice not in SETTLE_PATHS:
        raise ValueError(f"settle must be one of {SETTLE_PATHS}, got {choice!r}")
    caps = device.info.capabilities
    if choice == "board" or (choice == "auto" and "settle" in caps):
        if "settle" not in caps:
            raise NotSupported(
                f"{device.info.identity.model} cannot settle (capability 'settle' not declared; it has "
                f"{sorted(caps)}); iterate the fixed point on the host instead: settle='host' "
                "(`--set ep.settle=host` for hil train, `--settle host` for hil demo and hil gradcheck), "
                "which needs 'mvm'"
            )
        return "board"
    if "mvm" not in caps:
        raise NotSupported(
            f"{device.info.identity.model} can neither settle nor multiply (capabilities {sorted(caps)}): "
            "the host-iterated settle needs 'mvm', the board settle 'settle'"
        )
    return "host"


@dataclass
class EPResult:
    grads: dict[str, Tensor]  # dL/dW per tile, the tile's shape
    input_grads: dict[str, Tensor]  # dL/dx per clamped group, (B, n)
    free: Equilibrium
    first: Equilibrium  # the phase with the larger beta (the free one in "negative" mode)
    second: Equilibrium  # the phase with the smaller beta (the free one in "positive" mode)
    betas: tuple[float, float]  # (beta of `first`, beta of `second`)
    settle_steps: int  # steps of the nudged settles (not the free one)


class EBBlock(nn.Module):
    """An energy-based block on a Device.

    `inputs`: the clamped groups (default: the first group of the topology); `outputs`: the
    groups that are read out and nudged (default: the last group). `budgets` may give a
    separate `SettleBudget` for the ``"free"`` and ``"nudge"`` phases; switching between
    them re-configures the Device, which must keep its programmed conductances (the
    emulator does). `programming` is the scheme that brings weight changes to the devices
    (a `hil.programming.ProgrammingScheme` or one of its names ``ideal``, ``verify``,
    ``pulsed``, ``mixed``; default ``ideal``). The reports of the last
    `sync` are in `last_reports` (one per tile) and `last_updates` (every operation, refreshes
    included); the scheme's `history` keeps all of them as dicts. With `joint_phases`
    (default), centered EP with error-current (grad) nudges settles its two nudged phases as
    one settle over a doubled batch (`hil.estimator.settle_both`); pass False to settle them
    one by one. `settle` picks the minimiser (`settle_path`): the board's analog settle, or
    the host iterating the fixed point through the board's `mvm` (`HostSettle`), which is
    what a board without the ``settle`` capability gets with ``"auto"``.

    `compute`: the torch device of the block's host arithmetic (``cpu``, ``cuda``, ``cuda:1``;
    `hil.compute`). With it, the weights, the read-back network and the EP gradients live
    there, and on a board that takes tensors (`Device.tensor_device`: the in-process
    emulator) clamps, nudges and states go to and come from `Device.settle_tensors` as tensors,
    with no numpy round trip; other boards get numpy (their wire carries it) and their states
    are moved to the compute device for the gradients. The settle results (`Equilibrium.states`)
    are then tensors. None (default): the numpy path of the Device API on the CPU, as before.
    Initial weights and the signs of ``"random"`` mode come from CPU generators of
    `drivers.seeds` whatever `compute` is (see `hil.compute` on reproducibility).
    """

    def __init__(
        self,
        device: Device,
        topology: Topology,
        *,
        inputs: tuple[str, ...] | None = None,
        outputs: tuple[str, ...] | None = None,
        weights: Mapping[str, ArrayLike] | None = None,
        init_scale: float = 1.0,
        budgets: Mapping[str, SettleBudget] | None = None,
        programming: ProgrammingScheme | str | None = None,
        clip: bool = True,
        seed: int = 0,
        joint_phases: bool = True,
        settle: SettlePath = "auto",
        compute: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.device = device
        self.compute = None if compute is None else resolve_compute(compute)
        self.host_settle: HostSettle | None = None
        self.use_settle(settle)  # a bad choice is refused before the network is built
        self.topology = topology
        groups = list(topology.groups)
        self.inputs = tuple(inputs) if inputs is not None else (groups[0],)
        self.outputs = tuple(outputs) if outputs is not None else (groups[-1],)
        for g in self.inputs + self.outputs:
            if g not in topology.groups:
                raise ValueError(f"group {g!r} is not in the topology; groups: {groups}")
        if set(self.inputs) & set(self.outputs):
            raise ValueError("a group cannot be both a (clamped) input and an output")
        self.free_groups = [g for g in groups if g not in self.inputs]
        # CPU generators whatever the compute device: the same seed draws the same numbers
        gen = seeds.torch_generator(seed, "ep.init")
        self.generator = seeds.torch_generator(seed, "ep.sign")
        self.estimator = EPEstimator(
            topology, joint_phases=joint_phases, generator=self.generator, device=self.compute,
            weights=lambda: self.device_weights().weights,
        )  # fmt: skip
        w0 = gaussian_init(topology, init_scale, gen) if weights is None else weights
        self.net = DHN(topology, {t: torch.as_tensor(w0[t]) for t in w0}, dtype=torch.float32, generator=gen)
        if self.compute is not None:
            self.net.to(self.compute)  # drawn on the CPU, moved (the parameters keep their identity)
        # weights as they are on the device (read back after programming), for dPhi/dx
        # (kept out of the module tree: it is not a parameter of the block)
        object.__setattr__(
            self,
            "device_net",
            DHN(topology, {t: p.detach() for t, p in self.net.weights.items()}, dtype=torch.float32),
        )
        self.device_net.requires_grad_(False)
        # (coupling, parameter) per tile, for `sync`'s check of what changed (the parameters
        # are created once, with the network; loading a state copies into them)
        self._tile_params = [(c, self.net.weights[c.tile]) for c in topology.couplings]
        self._pending: dict[str, Programmed] = {}  # read-backs not yet copied into device_net
        self.free_start: FreeStart = "zero"
        self.programming = make_scheme(programming, seed=seed)
        self.clip = clip
        self.budgets = dict(budgets or {})
        for k in self.budgets:
            if k not in ("free", "nudge"):
                raise ValueError(f"budgets keys are 'free' and 'nudge', got {k!r}")
        self._versions: dict[str, int] = {}
        self._phase_topologies: dict[str, Topology] = {}
        self.clipped = 0
        self.last_reports: dict[str, UpdateReport] = {}
        self.last_updates: list[UpdateReport] = []
        device.configure(topology)
        self._configured = topology.budget
        self.mappings = {c.tile: self.programming.mapping(device, c.tile) for c in topology.couplings}
        # a board that loses its arrays during this first write (it rebooted) has them written
        # again, and the write goes on: the trainers' repair is not in place yet (it needs the model)
        with repair_lost_arrays([device], lambda _: self.sync(force=True)):
            self.sync(force=True)

    # ------------------------------------------------------------------------------ factories
    @property
    def joint_phases(self) -> bool:
        return self.estimator.joint_phases

    @joint_phases.setter
    def joint_phases(self, value: bool) -> None:
        self.estimator.joint_phases = value

    def use_settle(self, settle: SettlePath, host_update: HostUpdate = "synchronous") -> None:
        """Where this block's settles run from now on (`settle_path`: the board's own settle, or
        the host iterating through the board's `mvm`, with `host_update`); e.g. a block trained
        on a board that relaxes, checked as an MVM-only board would settle it."""
        self.settle_path = settle_path(self.device, settle)
        # settles with tensors in and out (`Device.settle_tensors`): a compute device was chosen
        # and the board takes tensors (the in-process emulator) and settles itself
        self.tensor_settle = (
            self.compute is not None and self.device.tensor_device is not None and self.settle_path == "board"
        )
        # the host-iterated settle, for settle path "host" (None: the board's own settle)
        self.host_settle = None
        if self.settle_path == "host":
            self.host_settle = HostSettle(self.device, reference=self.device_weights)
        self.host_update = host_update

    @property
    def host_update(self) -> HostUpdate:
        """How the host-iterated settle updates the groups (`HostSettle.update`):
        ``"synchronous"`` (all from the same states) or ``"alternating"`` (the two halves of a
        layered network in turn); a board that relaxes by itself has only its own dynamics."""
        return "synchronous" if self.host_settle is None else self.host_settle.update

    @host_update.setter
    def host_update(self, value: HostUpdate) -> None:
        check_host_update(value)
        if self.host_settle is None:
            if value != "synchronous":
                raise ConfigurationError(
                    f"host_update={value!r} orders the steps of a settle the host iterates, and this "
                    "block's board settles by itself: iterate on the host (settle='host', config key "
                    "ep.settle=host) or leave host_update='synchronous'"
                )
            return
        self.host_settle.update = value

    @staticmethod
    def layered(
        device: Device,
        sizes: list[int],
        *,
        gain: float = 1.0,
        budget: SettleBudget | None = None,
        w_max: float = 1.0,
        mode: Literal["analog", "mvm"] = "analog",
        prefix: str = "s",
        activation: Activation | str = HARD_SIGMOID,
        **kw: object,
    ) -> EBBlock:
        """A layered DHN ``sizes[0] -> ... -> sizes[-1]``: s0 clamped, the last group read out.
        `activation`: the node curve (`drivers.activation`, e.g. ``"soft_sigmoid:0.05"``)."""
        topo = Topology.layered(
            sizes, gain=gain, budget=budget, w_max=w_max, mode=mode, prefix=prefix, activation=activation
        )
        return EBBlock(device, topo, **kw)  # type: ignore[arg-type]

    @staticmethod
    def dense(
        device: Device,
        groups: dict[str, int],
        *,
        inputs: tuple[str, ...],
        outputs: tuple[str, ...],
        gain: float = 1.0,
        budget: SettleBudget | None = None,
        w_max: float = 1.0,
        mode: Literal["analog", "mvm"] = "analog",
        activation: Activation | str = HARD_SIGMOID,
        **kw: object,
    ) -> EBBlock:
        """An all-to-all network over `groups` (one N x N tile plus a bias row)."""
        topo = Topology.dense(groups, gain=gain, budget=budget, w_max=w_max, mode=mode, activation=activation)
        return EBBlock(device, topo, inputs=inputs, outputs=outputs, **kw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------ weights
    @property
    def weights(self) -> nn.ParameterDict:
        return self.net.weights

    def sync(self, force: bool = False) -> int:
        """Program every tile whose host weights changed since the last write through the
        programming scheme; return how many tiles were written. Weights outside +-w_max are
        clipped (`clip`) on the host too."""
        if self.last_updates:
            object.__setattr__(self, "last_updates", [])  # a plain attribute: skip Module.__setattr__
        changed = [(c, p) for c, p in self._tile_params if force or self._versions.get(c.tile) != p._version]
        if changed:
            with torch.no_grad():
                self._program(changed, force)
        return len(changed)

    def _program(self, changed: list[tuple[Coupling, nn.Parameter]], force: bool) -> None:
        # clipped here, so a scheme of this package need not check the range again
        bounded = {"bounded": True} if self.clip and isinstance(self.programming, SchemeBase) else {}
        for c, p in changed:
            if c.kind == "dense":
                n = p.shape[1]
                p[:n].fill_diagonal_(0.0)  # the diagonal is disconnected
            if self.clip:
                lo, hi = torch.stack(torch.aminmax(p)).tolist()  # one read-back (a GPU waits once)
                if lo < -c.w_max or hi > c.w_max:
                    self.clipped += int((p.abs() > c.w_max).sum())
                    p.clamp_(-c.w_max, c.w_max)
            self._record(self.programming.program(self.device, c.tile, p, force=force, **bounded))
            self._versions[c.tile] = p._version

    def _record(self, results: list[Programmed]) -> None:
        for res in results:
            if res.clipped:
                self.clipped += res.clipped
            self.last_reports[res.report.tile] = res.report
            self.last_updates.append(res.report)
            self._pending[res.report.tile] = res

    def commit(self, reads: int = 32) -> None:
        """Make what the devices hold now the weights a later `refresh` restores
        (`ProgrammingScheme.commit`), e.g. right after training, before drift sets in. Each
        device is read `reads` times and averaged: with 4 reads the noise left on a pair's
        difference is as large as a refresh's tolerance."""
        self.sync()
        for c in self.topology.couplings:
            self.programming.commit(self.device, c.tile, reads)

    @torch.no_grad()
    def refresh(self, *, only_drifted: bool = False) -> list[UpdateReport]:
        """Write-verify every tile to the weights it is meant to hold (with `only_drifted`:
        only the tiles whose conductances decayed by more than the scheme's `drift_tol`)."""
        self.sync()
        self.last_updates = []
        for c in self.topology.couplings:
            if only_drifted:
                res = self.programming.refresh_if_drifted(self.device, c.tile)
                if res is not None:
                    self._record([res])
            else:
                self._record([self.programming.refresh(self.device, c.tile)])
        return self.last_updates

    @torch.no_grad()
    def device_weights(self) -> DHN:
        """The reference network with the weights as read back after the last programming."""
        for tile, res in self._pending.items():
            self.device_net.weights[tile].copy_(torch.as_tensor(res.achieved))
        self._pending.clear()
        return self.device_net

    def _use_budget(self, phase: str) -> None:
        b = self.budgets.get(phase, self.topology.budget)
        if b is self._configured or b == self._configured:
            return
        topo = self._phase_topologies.get(phase)
        if topo is None or topo.budget != b:
            topo = self._phase_topologies[phase] = replace(self.topology, budget=b)
        self.device.configure(topo)
        object.__setattr__(self, "_configured", b)  # a plain attribute: skip Module.__setattr__

    # ------------------------------------------------------------------------------ settles
    def _array(self, x: ArrayLike) -> np.ndarray:
        """What the settle takes: a float32 tensor on the compute device on the tensor path
        (no copy when `x` already is one), else a float32 numpy array."""
        if not self.tensor_settle:
            return to_numpy(x)
        t = torch.as_tensor(x).detach()
        return t.to(self.compute, torch.float32)  # type: ignore[return-value]

    def clamp_arrays(self, x: ArrayLike | Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
        """`x` as the clamp a settle takes: per input group, the array `_array` makes of it (one
        array, not a dict: the block's only input)."""
        if isinstance(x, Mapping):
            return {g: self._array(v) for g, v in x.items()}
        if len(self.inputs) != 1:
            raise ValueError(f"this block has inputs {self.inputs}: pass a dict")
        return {self.inputs[0]: self._array(x)}

    def as_tensor(self, x: ArrayLike) -> Tensor:
        """A settle result (numpy or tensor) as a row-major tensor on the compute device (on
        the CPU without one; a view of a numpy array, no copy). A board may hand its states
        over as (batch, n) views of a batch-major buffer: they are copied row-major here, so
        what a caller computes from them rounds as it did from the row-major states."""
        t = x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
        return (t if self.compute is None else t.to(self.compute)).contiguous()

    def settle(
        self,
        clamp: ArrayLike | Mapping[str, ArrayLike],
        nudge: Mapping[str, Nudge] | None = None,
        init: Mapping[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        self.sync()
        self._use_budget("nudge" if nudge else "free")
        minimiser: SettleFn = self.device.settle if self.host_settle is None else self.host_settle
        if self.tensor_settle:
            minimiser = self.device.settle_tensors
        clamps = self.clamp_arrays(clamp)
        nudges = dict(nudge) if nudge else None
        inits = dict(init) if init else None
        most = self.settle_batch_most()
        if self.host_settle is None and batch_of(clamps) > most:
            return settle_in_chunks(minimiser, clamps, nudges, inits, trace, most)
        return minimiser(clamps, nudge=nudges, init=inits, trace=trace)

    def settle_batch_most(self) -> int:
        """The most samples one settle request on the board carries: the board's `max_batch`,
        and at most `MAX_SETTLE_VALUES` states in its reply and pre-pooling values of each conv
        tile (`drivers.checks.settle_samples_most`). A larger batch is settled in chunks
        (`drivers.batches`); a host-iterated settle splits its own products. On a shared board
        the settle carries every block's groups (`board_topology`)."""
        return settle_samples(self.device.info.limits, self.board_topology())

    def board_topology(self) -> Topology:
        """The topology one of this block's settles carries on its board: the merged one on a
        `drivers.shared.SharedBoard` view (its bounds count every block's nodes), else its own."""
        return getattr(self.device, "settle_topology", None) or self.topology

    def free(self, clamp: ArrayLike | Mapping[str, ArrayLike], trace: bool | int = False) -> Equilibrium:
        """The free phase: inputs clamped, outputs not nudged; started from the forward
        sweep's states where `free_start` is ``"forward"`` (`forward_start`), else from 0."""
        if self.free_start == "zero":
            return self.settle(clamp, trace=trace)
        if self.free_start != "forward":
            raise ValueError(f"free_start must be 'zero' or 'forward', got {self.free_start!r}")
        start = self.forward_start(clamp)
        init = start if self.tensor_settle else {g: to_numpy(v) for g, v in start.items()}
        return self.settle(clamp, init=init, trace=trace)  # type: ignore[arg-type]

    def sweep_order(self) -> list[list[str]]:
        """The free groups by their distance from the clamped inputs through the couplings
        (groups at equal distance together; groups no input reaches last)."""
        links: dict[str, set[str]] = {g: set() for g in self.topology.groups}
        for c in self.topology.couplings:
            ends = [g for g in (*c.rows, *c.cols) if g != BIAS]
            for a in ends:
                links[a].update(b for b in ends if b != a)
        seen, front, order = set(self.inputs), list(self.inputs), []
        while front:
            nxt = sorted({b for a in front for b in links[a]} - seen, key=self.free_groups.index)
            if nxt:
                order.append(nxt)
            seen.update(nxt)
            front = nxt
        rest = [g for g in self.free_groups if g not in seen]
        return order + ([rest] if rest else [])

    @torch.no_grad()
    def forward_start(self, clamp: ArrayLike | Mapping[str, ArrayLike]) -> dict[str, Tensor]:
        """The free groups' states after one feedforward sweep from the inputs through the
        weights the device holds (`device_weights`): group by group in `sweep_order`, each
        ``rho(drive)`` of the groups before it, with the groups after it at 0 (so only the
        drive from below counts). A block of one layer with a clamped input starts at its
        fixed point; a deeper one at the same fixed point as from 0, a few steps sooner or
        later (its damped relaxation's slow tail sets the count; docs/conv.md)."""
        self.sync()  # the weights the settle will use (a no-op when nothing changed)
        net = self.device_weights()
        given = self.clamp_arrays(clamp)
        states = {g: torch.as_tensor(v, device=self.compute).float() for g, v in given.items()}
        like = next(iter(states.values()))
        for g in self.free_groups:
            states[g] = like.new_zeros(like.shape[0], self.topology.size(g))
        for layer in self.sweep_order():
            drive = net.drive(states, targets=set(layer))
            for g in layer:
                states[g] = net.activation.rho(drive[g], net.gain)
        return {g: states[g] for g in self.free_groups}

    def predict(self, clamp: ArrayLike | Mapping[str, ArrayLike]) -> Tensor:
        """The free-phase state of the (first) output group, (B, n)."""
        return self.as_tensor(self.free(clamp).states[self.outputs[0]])

    def _nudges(
        self,
        beta: float,
        target: Mapping[str, ArrayLike] | None,
        grad: Mapping[str, ArrayLike] | None,
        clamped: set[str],
    ) -> dict[str, Nudge]:
        out = {}
        for g in set(target or {}) | set(grad or {}):
            if g in clamped or g not in self.topology.groups:
                raise ValueError(f"cannot nudge {g!r}: nudge free groups, e.g. the outputs {self.outputs}")
            t = None if target is None or g not in target else self._array(target[g])
            d = None if grad is None or g not in grad else self._array(grad[g])
            out[g] = Nudge(float(beta), target=t, grad=d)
        return out

    def as_groups(self, v: ArrayLike | Mapping[str, ArrayLike] | None) -> Mapping[str, ArrayLike] | None:
        """`v` per output group (one array: the block's only output); None or a dict as given."""
        if v is None or isinstance(v, Mapping):
            return v
        if len(self.outputs) != 1:
            raise ValueError(f"this block has outputs {self.outputs}: pass a dict")
        return {self.outputs[0]: v}

    # ------------------------------------------------------------------------------ gradients
    def phi_grads(self, states: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        """dPhi/dW per tile, summed over the batch, at the given states."""
        return self.estimator.phi_grads(states)

    def phi_grad_difference(
        self, a: Mapping[str, np.ndarray | Tensor], b: Mapping[str, np.ndarray | Tensor]
    ) -> dict[str, Tensor]:
        """``phi_grads(a) - phi_grads(b)`` (`EPEstimator.phi_grad_difference`)."""
        return self.estimator.phi_grad_difference(a, b)

    def input_drive(
        self, states: Mapping[str, np.ndarray | Tensor], inputs: tuple[str, ...] | None = None
    ) -> dict[str, Tensor]:
        """dPhi/dx for the clamped groups `inputs` (default: the block's inputs): the drive
        their neighbours put on them, (B, n)."""
        st = {g: torch.as_tensor(v, device=self.compute).contiguous() for g, v in states.items()}
        with torch.no_grad():
            return self.device_weights().drive(st, targets=set(inputs or self.inputs))

    def ep(
        self,
        clamp: ArrayLike | Mapping[str, ArrayLike],
        *,
        target: ArrayLike | Mapping[str, ArrayLike] | None = None,
        grad: ArrayLike | Mapping[str, ArrayLike] | None = None,
        beta: float = 0.1,
        mode: Mode = "centered",
        reduce: Literal["mean", "sum"] = "mean",
        free: Equilibrium | None = None,
        input_grads: bool = True,
        trace: bool | int = False,
        out: Mapping[str, Tensor] | None = None,
    ) -> EPResult:
        """EP gradients of ``L = reduce_b beta-cost`` (see the module docstring) for the
        parameters and (with `input_grads`) the clamped inputs. `free`: reuse a free
        equilibrium of the same clamp. `out`: per tile, a tensor of its shape to write dL/dW
        into (e.g. the parameter's ``.grad`` of the last step; `EPEstimator.phi_grad_difference`)."""
        check_phases(beta, mode)
        tg, gd = self.as_groups(target), self.as_groups(grad)
        if not tg and not gd:
            raise ValueError("EP needs a target or a grad for at least one output group")
        cl = self.clamp_arrays(clamp)
        clamped = set(cl)
        f = free if free is not None else self.free(cl)
        ph = self.estimator.phases(
            self.settle, cl, f, lambda b: self._nudges(b, tg, gd, clamped), beta=beta, mode=mode, trace=trace,
            max_beta=self.device.info.limits.max_beta,
        )  # fmt: skip
        inputs = tuple(cl)
        grads, in_grads = self.estimator.gradients(
            ph,
            next(iter(cl.values())).shape[0],
            reduce,
            (lambda st: self.input_drive(st, inputs)) if input_grads else None,
            out,
        )
        return EPResult(grads, in_grads, f, ph.first, ph.second, ph.betas, ph.steps)

    def vjp(
        self,
        free: Equilibrium,
        grad: ArrayLike | Mapping[str, ArrayLike],
        *,
        beta: float = 0.1,
        mode: Mode = "centered",
        normalize: bool = True,
        trace: bool | int = False,
        inputs: tuple[str, ...] | None = None,
    ) -> EPResult:
        """Vector-Jacobian product of the block by EP: given ``dL/ds_out`` (`grad`, as autograd
        hands it over, already carrying any batch averaging), return dL/dW and dL/dx.

        `inputs`: the groups that were clamped in the free settle (default: the block's
        inputs; a block used in both directions, e.g. a shared VAE, passes its own). With
        `normalize`, the nudge is ``grad / max|grad|`` (so `beta` is the peak injected
        current whatever the loss scale) and the results are scaled back."""
        gd = self.as_groups(grad)
        assert gd is not None
        tens = {g: torch.as_tensor(v, dtype=torch.float32, device=self.compute) for g, v in gd.items()}
        # one read-back of the peaks (it picks the nudge's scale on the host)
        peak = float(torch.stack([v.abs().max() for v in tens.values()]).max()) if tens else 0.0
        c = peak if (normalize and peak > 0) else 1.0
        clamp = {g: free.states[g] for g in (inputs or self.inputs)}
        if peak == 0.0:
            zeros = {t: torch.zeros_like(p) for t, p in self.weights.items()}
            zx = {g: torch.zeros(clamp[g].shape, device=self.compute) for g in clamp}
            return EPResult(zeros, zx, free, free, free, (0.0, 0.0), 0)
        res = self.ep(
            clamp,
            grad={g: v / c for g, v in tens.items()},
            beta=beta,
            mode=mode,
            reduce="sum",
            free=free,
            trace=trace,
        )
        if c != 1.0:
            res.grads = {t: g * c for t, g in res.grads.items()}
            res.input_grads = {g: v * c for g, v in res.input_grads.items()}
        return res

    def loss(self, states: Mapping[str, np.ndarray], target: ArrayLike | Mapping[str, ArrayLike]) -> float:
        """Batch mean of ``1/2 |s_out - target|^2`` over the output groups."""
        tg = self.as_groups(target)
        assert tg is not None
        total = 0.0
        for g, t in tg.items():
            d = self.as_tensor(states[g]) - torch.as_tensor(t, dtype=torch.float32, device=self.compute)
            total += float(0.5 * (d**2).sum(-1).mean())
        return total

    def reference(self, dtype: torch.dtype = torch.float64, symmetric: bool = True) -> DHN:
        """A pure-torch `DHN` with the weights as they are on the device (read back)."""
        return DHN(
            self.topology,
            {t: p.detach() for t, p in self.device_weights().weights.items()},
            dtype=dtype,
            symmetric=symmetric,
        )
