"""The transport-independent half of a remote Device (used by drivers.visa and drivers.serial).

`RemoteDevice` implements every Device method as: host-side limit checks (the same
`drivers.checks` the in-process backend runs), encode, one transaction over the link,
decode. A subclass supplies the transaction (`_call`) and the link (`_connect`,
`_disconnect`). Transactions hold the device lock, are never cut in half by Ctrl-C (the
interrupt is delivered after the transaction, once the board is in its safe state), and a
link that failed mid-transaction is reconnected before the next one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from drivers import checks
from drivers.base import (
    Device,
    DeviceInfo,
    Equilibrium,
    Nudge,
    ProgramReport,
    PulseReport,
    SafetyCounters,
)
from drivers.errors import DeviceError, DeviceTimeout, LimitViolation, ProtocolError
from drivers.topology import Topology
from drivers.wire import payload as pl
from drivers.wire.payload import Message, Op

T = TypeVar("T")


class _InterruptGuard:
    """Defers SIGINT in the main thread while active; `fired` tells whether one came."""

    def __init__(self) -> None:
        self.fired = False
        self.previous: Any = None

    def _handler(self, signum: int, frame: object) -> None:
        self.fired = True

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        installed = False
        if threading.current_thread() is threading.main_thread():
            try:
                self.previous = signal.signal(signal.SIGINT, self._handler)
                installed = True
            except ValueError:  # not the interpreter's main thread (embedded interpreters)
                installed = False
        try:
            yield
        finally:
            if installed:
                signal.signal(signal.SIGINT, self.previous)

    def deliver(self) -> None:
        """Hand the deferred interrupt to whoever handled SIGINT before us."""
        self.fired = False
        previous = self.previous
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


class RemoteDevice(Device):
    """A Device whose board sits at the other end of a link."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._info: DeviceInfo | None = None
        self._topology: Topology | None = None
        self._refused = 0  # requests refused here, before they reached the link
        self._broken = False
        self._closed = False
        self._depth = 0
        self._guard = _InterruptGuard()
        self._safe = False  # the last transaction was a successful safe_state

    # -- what a transport provides
    @abstractmethod
    def _connect(self) -> None:
        """Open the link and greet the board."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Close the link (must not raise)."""

    @abstractmethod
    def _call(self, op: Op, request: Message) -> Message:
        """One complete transaction; raise `drivers.errors` exceptions."""

    # -- connection management
    def open(self) -> RemoteDevice:
        with self.lock:
            try:
                self._connect()
                self._info = pl.info_from_dict(self._call(Op.INFO, Message()).meta)
                self._topology = self._remote_topology()
            except BaseException:
                self._disconnect()
                raise
            self._broken = False
        return self

    def reconnect(self) -> None:
        """Drop the link and open it again (the board keeps its state)."""
        with self.lock:
            self._disconnect()
            self.open()

    def _remote_topology(self) -> Topology | None:
        t = self._call(Op.TOPOLOGY, Message()).meta.get("topology")
        return None if t is None else pl.topology_from_dict(t)

    def _transact(self, op: Op, request: Message) -> Message:
        with self.lock:
            if self._closed:
                raise DeviceError(f"{self.name} is closed; open a new device with open_device()")
            self._depth += 1
            try:
                if self._depth == 1:
                    with self._guard.active():
                        reply = self._run(op, request)
                else:
                    reply = self._run(op, request)
            finally:
                self._depth -= 1
            if self._depth == 0 and self._guard.fired:
                self._after_interrupt()
            return reply

    def _run(self, op: Op, request: Message) -> Message:
        if self._broken:
            self.reconnect()
        self._safe = False
        try:
            reply = self._call(op, request)
            self._safe = op is Op.SAFE_STATE
            return reply
        except (DeviceTimeout, ProtocolError, OSError) as exc:
            self._broken = True
            if isinstance(exc, OSError):
                raise ProtocolError(f"{self.name}: link failed ({exc}); the next call reconnects") from exc
            raise

    def _after_interrupt(self) -> None:
        """Ctrl-C came during a transaction: now that it is complete, make the board safe
        (itself not interruptible), then deliver the interrupt."""
        with self._guard.active(), contextlib.suppress(DeviceError):
            self._run(Op.SAFE_STATE, Message())
        self._guard.deliver()

    def _checked(self, check: Callable[..., T], *args: Any) -> T:
        try:
            return check(*args)
        except LimitViolation:
            self._refused += 1
            raise

    # -- the Device interface
    @property
    def info(self) -> DeviceInfo:
        if self._info is None:
            raise DeviceError(f"{self.name} is not open")
        return self._info

    @property
    def topology(self) -> Topology | None:
        return self._topology

    def configure(self, topology: Topology) -> None:
        with self.lock:
            self._checked(checks.check_topology, topology, self.info.limits)
            self._transact(Op.CONFIGURE, Message(pl.topology_to_dict(topology)))
            self._topology = topology

    def program(
        self,
        tile: str,
        g_plus: np.ndarray,
        g_minus: np.ndarray,
        *,
        verify: bool = False,
        tol: float | None = None,
        max_iters: int = 20,
    ) -> ProgramReport:
        with self.lock:
            gp, gm = self._checked(
                checks.check_program, self.topology, self.info.limits, tile, g_plus, g_minus
            )
            reply = self._transact(Op.PROGRAM, pl.program_request(tile, gp, gm, verify, tol, max_iters))
            return pl.program_report(reply)

    def pulse(self, tile: str, counts_plus: np.ndarray, counts_minus: np.ndarray) -> PulseReport:
        with self.lock:
            cp, cm = self._checked(
                checks.check_pulse, self.topology, self.info.limits, tile, counts_plus, counts_minus
            )
            return pl.pulse_report(self._transact(Op.PULSE, pl.pulse_request(tile, cp, cm)))

    def read_conductance(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            checks.check_tile(self.topology, tile)
            reply = self._transact(Op.READ_CONDUCTANCE, Message({"tile": tile}))
            return reply.arrays["g_plus"], reply.arrays["g_minus"]

    def mvm(self, tile: str, x: np.ndarray, *, transpose: bool = False) -> np.ndarray:
        with self.lock:
            arr = self._checked(checks.check_mvm, self.topology, self.info.limits, tile, x, transpose)
            return self._transact(Op.MVM, pl.mvm_request(tile, arr, transpose)).arrays["y"]

    def settle(
        self,
        clamp: dict[str, np.ndarray],
        nudge: dict[str, Nudge] | None = None,
        init: dict[str, np.ndarray] | None = None,
        trace: bool | int = False,
    ) -> Equilibrium:
        with self.lock:
            cl, nd, ini, _ = self._checked(
                checks.check_settle, self.topology, self.info.limits, clamp, nudge, init
            )
            return pl.equilibrium(self._transact(Op.SETTLE, pl.settle_request(cl, nd, ini, trace)))

    def wait(self, seconds: float) -> None:
        self._transact(Op.WAIT, Message({"seconds": float(seconds)}))

    def safety(self) -> SafetyCounters:
        remote = pl.safety_counters(self._transact(Op.SAFETY, Message()))
        return SafetyCounters(remote.refused + self._refused, remote.violations)

    def reset(self) -> None:
        with self.lock:
            self._transact(Op.RESET, Message())
            self._topology = pl.topology_from_dict(t) if (t := self._topology_meta()) else None

    def _topology_meta(self) -> dict[str, Any] | None:
        return self._transact(Op.TOPOLOGY, Message()).meta.get("topology")

    def safe_state(self) -> None:
        """Idempotent, so a link that fails is reconnected and the request sent once more."""
        with self.lock:
            try:
                self._transact(Op.SAFE_STATE, Message())
            except (DeviceTimeout, ProtocolError) as exc:
                if not self._broken:
                    raise
                exc.add_note("reconnected and sent the safe-state request again")
                self._transact(Op.SAFE_STATE, Message())

    def close(self) -> None:
        """Put the board in its safe state (if the link still works) and close the link."""
        with self.lock:
            if self._closed:
                return
            try:
                if not (self._broken or self._safe) and self._info is not None:
                    self.safe_state()
            except DeviceError:
                pass
            finally:
                self._closed = True
                self._disconnect()
