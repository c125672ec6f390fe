"""The Device interface: the one boundary between the host stack and a board.

Units at the boundary:
- node states are normalised: 1.0 is the full-scale node voltage `Limits.v_read`
  (volts); clamps, targets and read-outs use this unit;
- conductances are in siemens;
- `mvm` returns weight units, ``x @ W`` with ``W = w_max (G+ - G-) / (g_max - g_min)``
  (multiply by ``v_read * (g_max - g_min) / w_max`` for amperes).

Arrays are numpy float32, batch first. Every backend checks a request against
`DeviceInfo.limits` before anything is sent to the hardware.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from types import TracebackType
from typing import Any

import numpy as np

# CAPABILITIES: the Device interface's vocabulary, also as drivers.base.CAPABILITIES
from drivers.capabilities import CAPABILITIES as CAPABILITIES
from drivers.capabilities import CAPABILITY_ACTIONS, CAPABILITY_INSTEAD
from drivers.errors import ConfigurationError, NotSupported, OpenTransactionWarning, SafeStateWarning
from drivers.numerics import to_numpy
from drivers.topology import Topology


@dataclass(frozen=True)
class Identity:
    """The four fields of an IEEE 488.2 ``*IDN?`` reply."""

    manufacturer: str
    model: str
    serial: str
    firmware: str

    def idn(self) -> str:
        return f"{self.manufacturer},{self.model},{self.serial},{self.firmware}"

    @staticmethod
    def parse(text: str) -> Identity:
        parts = [p.strip() for p in text.strip().split(",")]
        parts += [""] * (4 - len(parts))
        return Identity(*parts[:4])


@dataclass(frozen=True)
class Limits:
    v_read: float  # volts that node state 1.0 stands for
    v_read_max: float  # absolute read-voltage limit (volts) on any line
    g_min: float  # siemens
    g_max: float
    dac_bits: int | None  # None: ideal DAC
    adc_bits: int | None  # None: ideal ADC
    adc_range: tuple[float, float]  # normalised state units the ADC covers
    tile_rows_max: int
    tile_cols_max: int
    max_tiles: int
    max_settle_steps: int
    max_pulses: int  # per device per `pulse` call
    settle_step_s: float  # seconds one settle step takes on the board
    # Bounds on the work and the scale of one request (defaults, so that boards and peers that
    # predate them keep working; a peer's `info` carries them like every other field):
    max_verify_iters: int = 1000  # write-verify rounds per `program` call (50x the default of 20)
    max_wait_s: float = 1e9  # one `wait` (about 32 years: drift studies use days to years)
    # activation gain: EP uses O(1); past ~100 every node is a comparator and a settle's step is
    # cut to 1.8 / (1 + gain |W|), so larger gains only buy slower settles and overflow risk
    max_gain: float = 100.0
    # weight of a full-on pair: networks use O(1); the mvm-range probe of the calibration
    # drives a tile with 1e4 / rows to saturate the read-out ADC, so the bound allows 1e4
    max_w_max: float = 1e4
    max_beta: float = 100.0  # |beta| of a nudge (EP uses 0.01 to 1; the states clip to the range)
    # |beta * grad| of an injected nudge current (normalised drive): with gain <= max_gain and
    # states in [0, 1] a drive past ~1e3 saturates a node anyway; the bound keeps the float32
    # drive and energy sums of a settle finite (3e38 gave energies of NaN)
    max_drive: float = 1e6
    # samples in one mvm or settle request (the work of a request grows with it): at 1024 the
    # mvm input of the widest default tile (1024 rows of f4, 4 MiB) and the settle reply of a
    # 784-512-10 network (1306 nodes, 5.3 MiB) fit one framed message (8 MiB) and one SCPI
    # block (16 MiB); training uses 16 to 128, evaluation chunks of 512
    max_batch: int = 1024
    # amps one line of a tile may carry (a column into its TIA/ADC, a row out of its driver),
    # computed as docs/protocol.md "Limits" says; inf: not declared (a board or peer that
    # predates the field), nothing checked. A declared value is finite and > 0.
    max_line_current_a: float = math.inf
    # pulses one device is rated to take over its life (its datasheet's write endurance; for
    # devices rated in SET/RESET cycles, the cycles: a partial pulse wears no more than a full
    # one), from which the calibration's default pulse budget is derived
    # (`calibration.pulse.default_pulse_budget`), and which a board that declares it enforces
    # on each device's life count (docs/protocol.md, "Pulse endurance"); None: not declared (a
    # board or peer that predates the field, or a board that models no wear)
    pulse_endurance: int | None = None
    # the devices are one-sided (PCM): pulses only raise G, and a negative count of any size is
    # one RESET pulse (to near g_min), which wears a device once; False: a count of n is |n|
    # pulses either way (also what a board or peer that predates the field is taken to have)
    one_sided: bool = False

    @property
    def unit_scales(self) -> tuple[float, float]:
        """(gain, w_max) of a network whose scale the caller does not choose (conformance
        checks, calibration routines, demos): 1 and 1, or the most this board declares
        (`max_gain`, `max_w_max`) where that is less, so that its configure is not refused."""
        return min(1.0, self.max_gain), min(1.0, self.max_w_max)

    @cached_property  # every checked array asks (each mvm of a host-iterated settle): found once
    def clamp_max(self) -> float:
        """Largest normalised clamp value the read-voltage limit allows: the largest float32
        ``x`` (states travel as float32) whose voltage ``x * v_read`` (computed in float64, as
        the board computes it) is within `v_read_max`. So the host's ``|x| <= clamp_max`` and
        the board's ``|x| * v_read <= v_read_max`` agree on every float32 value, where
        ``v_read_max / v_read`` could pass one that the board then counts as a violation."""
        return largest_state(self.v_read, self.v_read_max)

    @property
    def dac_range(self) -> tuple[float, float]:
        """What the board's DACs drive of an accepted state (a settle's clamp, nudge target or
        init; an mvm input is driven sign and magnitude, within ``+-max(|dac_range|)``): a
        quantised DAC (`dac_bits` set) has its codes over `adc_range` (its step is
        ``lsb(dac_bits, hi - lo)``) and saturates at its ends, so a value the voltage limit
        accepts past them (up to `clamp_max`; a negative clamp on a range from 0) is driven at
        the end, not refused; the settle reports clamps as requested. An ideal DAC drives every
        accepted value: ``(-clamp_max, clamp_max)``. Keep inputs within this range where the
        value matters (the voltage limit is what protects the devices, not what the DAC
        reproduces; docs/protocol.md, "Limits")."""
        if self.dac_bits is None:
            return -self.clamp_max, self.clamp_max
        return self.adc_range


def largest_state(v_read: float, v_read_max: float) -> float:
    """The largest float32 ``x`` with ``float(x) * v_read <= v_read_max`` (`Limits.clamp_max`)."""
    with np.errstate(over="ignore"):  # past float32's range: inf, which callers refuse
        x = np.float32(v_read_max / v_read)
        while np.isfinite(x) and float(x) * v_read > v_read_max:
            x = np.nextafter(x, np.float32(-np.inf))
        while np.isfinite(up := np.nextafter(x, np.float32(np.inf))) and float(up) * v_read <= v_read_max:
            x = up
    return float(x)


@dataclass(frozen=True)
class DeviceInfo:
    identity: Identity
    limits: Limits
    capabilities: frozenset[str]
    preset: str = ""  # the emulator's preset name; a real board's device technology or model ("" if none)
    extra: dict[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Nudge:
    """An extra drive on one group during a nudged settle:
    ``beta * (target - s) - beta * grad`` (either term may be absent).

    With ``target`` it nudges toward ``1/2 |s - target|^2``; with ``grad`` it injects
    the error current of a downstream block (``grad`` = dL/ds)."""

    beta: float
    target: np.ndarray | None = None
    grad: np.ndarray | None = None


@dataclass
class Equilibrium:
    # free groups, after the ADC; clamped groups as requested (a quantised DAC drives them
    # saturated to `Limits.dac_range`: a clamp past it is reported as sent, not as driven)
    states: dict[str, np.ndarray]
    steps: int
    converged: bool
    residual: float  # max |s_t - s_{t-1}| at the last check
    energy: np.ndarray | None  # (batch,) energy at the end, if the board measures it
    settle_time_s: float
    energy_j: float
    trace: dict[str, np.ndarray] | None = None  # "step": (T,), "energy": (T, B), group: (T, B, n)

    def defer_energy(self, fn: Callable[[], np.ndarray | None]) -> Equilibrium:
        """Compute `energy` by calling `fn` when it is first read (for a backend whose energy
        costs work that most callers never look at: a training step reads the states only).
        The equilibrium reads as before; a copy or a pickle carries the computed value."""
        self.__dict__["_energy_fn"] = fn
        return self

    @property
    def energy_pending(self) -> bool:
        """`energy` is still to be computed (`defer_energy`)."""
        return "_energy_fn" in self.__dict__

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if "_energy_fn" in state:
            state["_energy"] = self.energy
            del state["_energy_fn"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "energy" in state:  # pickled before `energy` became a property
            state = {("_energy" if k == "energy" else k): v for k, v in state.items()}
        self.__dict__.update(state)


def _energy(self: Equilibrium) -> np.ndarray | None:
    fn = self.__dict__.pop("_energy_fn", None)
    if fn is not None:
        self.__dict__["_energy"] = fn()
    return self.__dict__.get("_energy")


def _set_energy(self: Equilibrium, value: np.ndarray | None) -> None:
    self.__dict__.pop("_energy_fn", None)
    self.__dict__["_energy"] = value


# `energy` as a property over the dataclass field (set after the class is made, so the field
# stays an ordinary required field): a backend may hand over a function instead of the value
# (`defer_energy`), called when someone first reads it.
Equilibrium.energy = property(  # type: ignore[assignment]
    _energy, _set_energy, doc="(batch,) energy at the end, if the board measures it"
)


@dataclass
class ProgramReport:
    tile: str
    g_plus: np.ndarray  # conductances read back after programming (siemens)
    g_minus: np.ndarray
    iterations: int  # write-verify iterations used (0 without verify)
    pulses: int  # programming pulses applied in total
    residual_max: float  # max |G - target| over the tile's devices (siemens, read back)
    within_tol: float  # fraction of devices within tolerance
    energy_j: float
    time_s: float
    # devices write-verify stopped correcting because they did not move (stuck or worn; 0
    # without verify); None: the board did not report it (an older board), unknown, not 0
    gave_up: int | None = None
    # devices the write skipped because they were spent (at the declared pulse endurance: no
    # pulse left; docs/protocol.md "Pulse endurance"); None: no endurance declared, or a board
    # that does not report it
    spent: int | None = None


@dataclass
class PulseReport:
    tile: str
    pulses: int
    energy_j: float
    time_s: float


@dataclass
class SafetyCounters:
    refused: int  # requests refused before reaching the array
    violations: int  # out-of-limit conditions that reached the array: must stay 0


@dataclass(frozen=True)
class Meter:
    """Cumulative counters of the board since power-on (differences give a call's cost).

    A host that iterates settles through `mvm` accounts time and energy from these, as the
    board measures them, instead of estimating them itself."""

    clock_s: float  # board clock, seconds (array time of settles, mvms, reads, programming; waits included)
    energy_j: float  # joules spent in the array
    mvm_calls: int  # mvm operations run (one per Device.mvm call, whatever the batch)


@dataclass(frozen=True)
class TileWear:
    """How worn one tile's devices are (G+ and G-, each a device), against the board's declared
    pulse endurance (docs/protocol.md, "Pulse endurance")."""

    max_wear: int  # the most pulses any device of the tile has taken over its life
    near_end: int  # devices at `Wear.near_from` or more: at most a tenth of the endurance left
    spent: int  # devices at the endurance: none left, so every `program` of the tile is refused


@dataclass(frozen=True)
class Wear:
    """The wear of a board that declares a pulse endurance (`Device.wear`): per configured tile,
    in the topology's order (none without a topology: wear is counted per device and kept across
    reconfigures, but only a configured tile has a name)."""

    endurance: int  # pulses per device over its life (`Limits.pulse_endurance`)
    near_from: int  # the wear from which a device counts as near its end (`drivers.wear.near_end_from`)
    tiles: dict[str, TileWear]
    # where each tile lives, filled by the host's wrappers (`drivers.tiled.TiledDevice`, a
    # `drivers.shared` block view), empty as a board reports it: per tile, the *IDN string of the
    # board that holds it and the board's own (physical) tiles it lies on
    boards: dict[str, str] = field(default_factory=dict)
    physical: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class BoardStatus:
    """What a host checks after a link failure and when a session starts.

    `epoch` changes whenever the board loses its configuration (power-on, reset, watchdog);
    a host that remembers the value it saw learns of a reset it did not ask for.
    `transaction` is the tag of a programming sequence begun (`Device.begin`) and never
    committed: a host died or the board reset in the middle of it, so the conductances may
    be a mix of old and new targets until the tiles are programmed again.
    `arrays_id` (None: the board does not say) changes whenever its devices may no longer hold
    what was programmed (arrays re-formed or erased, a chip or board replaced; an emulator
    started again) and at no other time: a reset or power cycle that keeps the
    conductances keeps it. A host that remembers the value it saw learns that every tile
    must be programmed again (`drivers.errors.ArraysLost`)."""

    epoch: int = 0
    transaction: str | None = None
    configured: bool = False
    arrays_id: int | None = None


@dataclass(frozen=True)
class BoardOwner:
    """Who owns a shared board (docs/protocol.md, "Ownership"): the token of the host that
    holds it (None: nobody), when it took it (Unix seconds, the board's clock), how many open
    connections present that token, the lease the board keeps for a token no connection
    presents, and the seconds left of that lease (None while a connection presents it)."""

    token: str | None = None
    since: float | None = None
    connections: int = 0
    lease_s: float = 0.0
    lapses_in: float | None = None


class Device(ABC):
    """One analog crossbar board. Use as a context manager: exit puts it in its safe state."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # called (no arguments) by a board that finds its arrays lost, after configuring its
        # topology again and before resending the interrupted operation; None: raise
        # `ArraysLost` instead (`repair_lost_arrays` sets it for the length of a block)
        self.arrays_repair: Callable[[], None] | None = None

    @property
    @abstractmethod
    def info(self) -> DeviceInfo: ...

    @property
    @abstractmethod
    def topology(self) -> Topology | None: ...

    @abstractmethod
    def configure(self, topology: Topology) -> None:
        """Allocate tiles for `topology` and set activation gain, settle mode and budget."""

    @abstractmethod
    def program(
        self,
        tile: str,
        g_plus: np.ndarray,
        g_minus: np.ndarray,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        """Write target conductances; with `verify`, iterate read/correct until within `tol`
        siemens (default: 2 % of the conductance range) or `max_iters`."""

    @abstractmethod
    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        """Apply signed pulse counts (positive: potentiate) to each device of a tile."""

    @abstractmethod
    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        """One noisy read of (G+, G-) for every device of a tile, in siemens."""

    @abstractmethod
    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        """``x @ W`` (or ``x @ W.T``) through the tile, DAC on x and ADC on the result. A
        quantised DAC drives ``|x|`` past ``max(|Limits.dac_range|)`` (still within `clamp_max`,
        so accepted) saturated at it, silently: keep x within it where its value matters."""

    @abstractmethod
    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        """Relax the network with `clamp` groups held; `trace` True or every-k steps. A quantised
        DAC drives clamps, nudge targets and init states past `Limits.dac_range` (a negative clamp
        on a range from 0, one over its top up to `clamp_max`) saturated at its ends, silently."""

    # -- the in-process fast path: numpy stays the documented type of every call above
    tensor_device: Any = None
    """The torch device of a backend whose `settle_tensors` takes and returns torch tensors
    without a host round trip (the in-process emulator); None for backends that speak numpy
    (every remote board: the wire carries numpy)."""

    def settle_tensors(
        self,
        clamp: dict[str, Any],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, Any] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        """`settle` with float32 torch tensors on `tensor_device` in (clamps, nudge arrays,
        init) and out (the equilibrium's states; energy and trace stay numpy). Only a backend
        with a `tensor_device` has it."""
        raise NotSupported(f"{type(self).__name__} takes numpy arrays only (no tensor_device); use settle")

    def program_stacked(
        self,
        tile: str,
        g: Any,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int | None = None,
    ) -> ProgramReport:
        """`program` of the (2, rows, cols) targets `g` (G+ then G-, a numpy array or a torch
        tensor). Here: `g` as numpy through `program` (a tensor is copied to the host once). A
        backend with a `tensor_device` keeps a tensor there: checked with torch, written without
        a host copy, its report's read-backs tensors on that device (the in-process emulator).
        Without a copy, the tensor checked is the one written: the caller must not change it
        (from another thread, say) until the call returns, as with any in-place torch work."""
        arr = to_numpy(g, dtype=None)
        if arr.ndim != 3 or arr.shape[0] != 2:
            raise ConfigurationError(
                f"program {tile!r}: targets have shape {arr.shape}; stacked targets are (2, rows, cols), "
                "G+ then G-"
            )
        return self.program(tile, arr[0], arr[1], verify=verify, tol=tol, max_iters=max_iters)

    @abstractmethod
    def wait(self, seconds: float) -> None:
        """Let time pass (drift). Hardware sleeps; the emulator advances its clock."""

    @abstractmethod
    def safety(self) -> SafetyCounters: ...

    @abstractmethod
    def reset(self) -> None:
        """Return to power-on state: topology cleared, error queue emptied."""

    @abstractmethod
    def safe_state(self) -> None:
        """All lines to 0 V, no settle or programming in flight."""

    @abstractmethod
    def close(self) -> None: ...

    def close_link(self) -> None:
        """Close without driving the lines to the safe state, for a session that only looked
        at a board another host may drive (`hil info`, the pytest plugin's URI check). A
        backend whose `close` leaves the board as it is (the in-process emulator) closes."""
        self.close()

    # -- reliability: reset detection and programming transactions (defaults for backends
    # without them: no epoch, transactions not recorded)
    def status(self) -> BoardStatus:
        """The board's epoch, open programming transaction and whether it is configured."""
        return BoardStatus(configured=self.topology is not None)

    def begin(self, tag: str) -> None:
        """Mark the start of a multi-tile programming sequence `tag` on the board (kept there
        until `commit`, across host crashes and board resets). Without support: nothing."""
        return None

    def commit(self, tag: str) -> None:
        """Mark the sequence `tag` complete. Committing a tag that is not open is a no-op
        (a retried commit); committing while another tag is open raises ConfigurationError."""
        return None

    def require_settle(self, trace: bool | int = False, init: object = None) -> None:
        """The capabilities a settle request needs: `settle`; `trace` when traced; `preset_state`
        when it starts from given states (`init`)."""
        self.require("settle")
        if trace:
            self.require("trace")
        if init:
            self.require("preset_state")

    def meter(self) -> Meter | None:
        """The board's cumulative clock, energy and mvm counters; None: it keeps none."""
        return None

    def wear(self) -> Wear | None:
        """Per tile, the most pulses a device has taken and how many devices are near or at the
        board's declared pulse endurance; None: the board declares no endurance (and counts no
        wear). NotSupported: it declares one but does not report its wear."""
        if self.info.limits.pulse_endurance is None:
            return None
        raise NotSupported(
            f"{type(self).__name__} does not report wear, though the board declares a pulse endurance"
        )

    def owner(self) -> BoardOwner | None:
        """Who owns the board (a served board that announces the capability ``lock``);
        None: a board no other host can reach, or one without ownership."""
        return None

    def require(self, capability: str, instead: str | None = None) -> None:
        """Raise NotSupported, saying what to use `instead`, unless the board declares
        `capability` (the default hint for each capability is `CAPABILITY_INSTEAD`)."""
        declared = self.info.capabilities
        if capability in declared:
            return
        action = CAPABILITY_ACTIONS.get(capability, f"do {capability!r}")
        hint = instead if instead is not None else CAPABILITY_INSTEAD.get(capability, "")
        raise NotSupported(
            f"this board cannot {action} (capability {capability!r} not declared)"
            + (f"; {hint}" if hint else "")
            + f". {self.info.identity.model} declares: {', '.join(sorted(declared)) or 'nothing'}"
        )

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Put the board in its safe state, then close it. If the block raised, its exception
        is the one that propagates: a safe_state failure (the board that made the block fail
        is often the one that cannot be reached) is then a `SafeStateWarning` and a note on
        that exception, not a replacement for it."""
        try:
            self.safe_state()
        except Exception as failure:
            if exc is None:
                raise
            what = "; ".join([f"{type(failure).__name__}: {failure}", *getattr(failure, "__notes__", ())])
            exc.add_note(f"leaving the with block, safe_state() failed too ({what})")
            name = getattr(self, "name", type(self).__name__)
            warnings.warn(
                f"{name}: the board may not be in its safe state: safe_state() failed ({what}) "
                f"while the with block raised {type(exc).__name__}",
                SafeStateWarning,
                stacklevel=2,
            )
        finally:
            self.close()


@contextlib.contextmanager
def programming_transaction(devices: Iterable[Device], tag: str) -> Iterator[None]:
    """Bracket a programming sequence on every board: `begin(tag)` before, `commit(tag)`
    after. If the block raises (or the host dies), the transaction stays open on the
    boards, and the next session learns of it from `Device.status()`."""
    devices = list(devices)
    for d in devices:
        d.begin(tag)
    yield
    for d in devices:
        d.commit(tag)


@contextlib.contextmanager
def repair_lost_arrays(devices: Iterable[Device], repair: Callable[[Device], None]) -> Iterator[None]:
    """While the block runs, a board of `devices` that finds its arrays lost (STATUS
    `arrays_id` changed across a reconnect: docs/protocol.md, "Board status") calls
    ``repair(board)``, which must program every tile of that board again from the host's
    weights, and then resends the operation it was running, instead of raising
    `ArraysLost`. The trainers use it so that a board whose conductances were lost mid-run
    is reprogrammed, and the step goes on as if nothing happened (on the ideal preset the
    run is bit-identical to an uninterrupted one). `devices` may be wrappers (a placement):
    the board each drives is the one watched, and `repair` gets the device as given."""
    boards = {id(board_of(d)): (board_of(d), d) for d in devices}  # wrappers: the board they drive
    before = {key: getattr(board, "arrays_repair", None) for key, (board, _) in boards.items()}
    for board, d in boards.values():
        board.arrays_repair = functools.partial(repair, d)
    try:
        yield
    finally:
        for key, (board, _) in boards.items():
            board.arrays_repair = before[key]  # an enclosing repair (a block built mid-run) again


def board_of(device: Device) -> Device:
    """The board a wrapper (a placement, a shared board's view: `drivers.wrapper`) drives,
    following its `inner` devices; a board itself for a board."""
    inner = getattr(device, "inner", None)
    while isinstance(inner, Device):
        device, inner = inner, getattr(inner, "inner", None)
    return device


def report_open_transactions(devices: Iterable[Device]) -> list[str]:
    """Warn of every board holding a programming transaction that was never committed;
    return the warnings. The caller repairs by programming every tile again."""
    found = []
    for d in devices:
        tag = d.status().transaction
        if tag is not None:
            found.append(
                f"{d.info.identity.idn()}: programming transaction {tag!r} was begun and never "
                "committed (a host stopped or the board reset mid-sequence); every tile is "
                "programmed again before training"
            )
    for text in found:
        warnings.warn(text, OpenTransactionWarning, stacklevel=2)
    return found
