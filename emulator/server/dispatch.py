"""Run one Device operation from a decoded request: the half both servers share."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from drivers.base import Device, board_of
from drivers.errors import DeviceFault, NotSupported, ProtocolError
from drivers.wire import codes
from drivers.wire import payload as pl
from drivers.wire.payload import IDEMPOTENT, LOCK_CAPABILITY, LOCK_OPS, Message, Op
from emulator.board import Board
from emulator.server.ownership import BoardLock, LockSession


def _info(d: Device, m: Message) -> Message:
    info = pl.info_to_dict(d.info)
    # ownership is the server's, not the device's: announced by `execute` where it is served
    info["capabilities"] = [c for c in info["capabilities"] if c != LOCK_CAPABILITY]
    return Message(info)


def _topology(d: Device, m: Message) -> Message:
    t = d.topology
    return Message({"topology": None if t is None else pl.topology_to_dict(t)})


def _configure(d: Device, m: Message) -> Message:
    d.configure(pl.topology_from_dict(m.meta))
    return Message()


def _flag(m: Message, key: str) -> bool:
    """A boolean parameter, refused unless it is a JSON boolean (``bool("false")`` is True)."""
    value = m.meta.get(key, False)
    if not isinstance(value, bool):
        raise DeviceFault(
            codes.ILLEGAL_PARAMETER_VALUE, f"{key} must be true or false, got {str(value)[:40]}"
        )
    return value


def _program(d: Device, m: Message) -> Message:
    r = d.program(
        m.meta["tile"],
        m.arrays["g_plus"],
        m.arrays["g_minus"],
        verify=_flag(m, "verify"),
        tol=m.meta.get("tol"),
        # the device checks it (an int() would truncate 2.5); none given: the board's default
        max_iters=m.meta.get("max_iters"),
    )
    return pl.program_reply(r)


def _pulse(d: Device, m: Message) -> Message:
    return pl.pulse_reply(d.pulse(m.meta["tile"], m.arrays["counts_plus"], m.arrays["counts_minus"]))


def _read(d: Device, m: Message) -> Message:
    return pl.conductance_reply(*d.read_conductance(m.meta["tile"]))


def _mvm(d: Device, m: Message) -> Message:
    return Message({}, {"y": d.mvm(m.meta["tile"], m.arrays["x"], transpose=_flag(m, "transpose"))})


def _settle(d: Device, m: Message) -> Message:
    return pl.equilibrium_reply(d.settle(**pl.settle_args(m)))


def _wait(d: Device, m: Message) -> Message:
    d.wait(m.meta["seconds"])  # the device checks type and range
    return Message()


def _safety(d: Device, m: Message) -> Message:
    return pl.safety_reply(d.safety())


def _reset(d: Device, m: Message) -> Message:
    d.reset()
    return Message()


def _safe_state(d: Device, m: Message) -> Message:
    d.safe_state()
    return Message()


def _status(d: Device, m: Message) -> Message:
    return pl.status_reply(d.status())


def _meter(d: Device, m: Message) -> Message:
    found = d.meter()
    if found is None:
        raise NotSupported("this board keeps no meter (clock, energy and mvm counters)")
    return pl.meter_reply(found)


def _wear(d: Device, m: Message) -> Message:
    found = d.wear()
    if found is None:
        raise NotSupported("this board declares no pulse endurance and counts no wear")
    return pl.wear_reply(found)


def _tag(m: Message) -> str:
    tag = m.meta["tag"]
    if not isinstance(tag, str):
        raise DeviceFault(codes.ILLEGAL_PARAMETER_VALUE, f"a transaction tag is a string, got {tag!r}")
    return tag


def _begin(d: Device, m: Message) -> Message:
    d.begin(_tag(m))
    return Message()


def _commit(d: Device, m: Message) -> Message:
    d.commit(_tag(m))
    return Message()


HANDLERS: dict[Op, Callable[[Device, Message], Message]] = {
    Op.INFO: _info,
    Op.TOPOLOGY: _topology,
    Op.CONFIGURE: _configure,
    Op.PROGRAM: _program,
    Op.PULSE: _pulse,
    Op.READ_CONDUCTANCE: _read,
    Op.MVM: _mvm,
    Op.SETTLE: _settle,
    Op.WAIT: _wait,
    Op.SAFETY: _safety,
    Op.RESET: _reset,
    Op.SAFE_STATE: _safe_state,
    Op.STATUS: _status,
    Op.BEGIN: _begin,
    Op.COMMIT: _commit,
    Op.METER: _meter,
    Op.WEAR: _wear,
}

MAX_RID = (1 << 53) - 1  # request ids are JSON integers that a double holds exactly


class ReplayCache:
    """The outcome (reply or error) of the last `size` non-idempotent requests by request id.

    A host that lost a reply sends the request again with the same id and gets the stored
    outcome instead of a second execution. Entries are tied to the board's epoch: a restart
    clears them, as it clears a real board's RAM (the host then learns from the new epoch
    that the request may not have run).

    The ids alone of the last `window` requests are kept longer than their outcomes (8 bytes
    each against a reply's kilobytes): a request replayed after its outcome has aged out is
    refused (`-200`, "already ran") rather than run a second time, so at most once holds for
    `window` requests, not only for `size`."""

    def __init__(self, size: int = 64, window: int = 4096, keep: bool = True) -> None:
        """`keep` False: a firmware without the record (`FaultPlan.rerun_ids`): every request
        runs, resent or not."""
        if not 1 <= size <= window:
            raise ValueError(f"need 1 <= size <= window, got size {size}, window {window}")
        self.keep = keep
        self.size = size
        self.window = window
        self._entries: OrderedDict[int, tuple[int, Message | BaseException]] = OrderedDict()
        self._ran: OrderedDict[int, int] = OrderedDict()  # rid -> epoch, the last `window` ids run
        self._lock = threading.Lock()
        self.hits = 0
        self.refused = 0  # replays of ids whose outcome had aged out

    def get(self, rid: int, epoch: int) -> Message | BaseException | None:
        """The stored outcome of `rid` in `epoch`; None if it has not run in this epoch.
        Raises DeviceFault if it ran but its outcome is no longer held."""
        if not self.keep:
            return None
        with self._lock:
            entry = self._entries.get(rid)
            if entry is not None and entry[0] == epoch:
                self.hits += 1
                return entry[1]
            if self._ran.get(rid) == epoch:
                self.refused += 1
                raise DeviceFault(
                    codes.EXECUTION_ERROR,
                    f"request id {rid} already ran; its outcome is no longer held (the board keeps the "
                    f"last {self.size}): read the state back instead of resending",
                )
            return None

    def put(self, rid: int, epoch: int, outcome: Message | BaseException) -> None:
        with self._lock:
            self._entries[rid] = (epoch, outcome)
            self._entries.move_to_end(rid)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            self._ran[rid] = epoch
            self._ran.move_to_end(rid)
            while len(self._ran) > self.window:
                self._ran.popitem(last=False)


def request_id(op: Op, request: Message) -> int | None:
    """The request id of a non-idempotent request (None: none given). One that is present
    but not an integer in [0, 2^53), JSON null included, is -224 (docs/protocol.md, section 1):
    a null must not run the request without a record of it."""
    if op in IDEMPOTENT or "rid" not in request.meta:
        return None
    rid = request.meta["rid"]
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_RID:
        raise DeviceFault(codes.ILLEGAL_PARAMETER_VALUE, f"rid must be an integer in [0, 2^53), got {rid!r}")
    return rid


def reboot(device: Device, lock: BoardLock | None, *, arrays_lost: bool = False) -> None:
    """The board reboots (the fault plan's injected `reset`: a power cycle or a watchdog
    reset, not the RESET command): its configuration is lost and its epoch advances
    (`Device.reset`), the conductances and the transaction tag are kept (non-volatile), and
    the ownership, which lives in RAM, is forgotten (`BoardLock.reboot`). `arrays_lost` (the
    plan's `lose`): the conductances are not kept either: the devices come back as fabricated,
    under a new STATUS `arrays_id` (`emulator.board.Board.lose_arrays`; an emulated board only)."""
    if arrays_lost:
        board = emulated_board(device)
        with device.lock:
            board.lose_arrays()
    else:
        device.reset()
    if lock is not None:
        lock.reboot()


def emulated_board(device: Device) -> Board:
    """The emulator's board behind `device` (through its wrappers), for the faults only an
    emulated board can show (`lose`); ValueError naming the fix for any other device."""
    board = getattr(board_of(device), "board", None)
    if not isinstance(board, Board):
        raise ValueError(
            f"the 'lose' fault (arrays lost) needs an emulated board (emulator://...) to give fresh "
            f"devices; {type(board_of(device)).__name__} is not one: serve an emulator, or leave p_lose 0"
        )
    return board


def guard(device: Device, lock: BoardLock | None) -> None:
    """Firmware: the board applies its own safe state when its owner is gone (docs/protocol.md,
    "Ownership", Lease): `lock` runs SAFE_STATE on `device` as a request does (`execute`, under
    the device's lock) when no connection presents the owner's token any more without a
    RELEASE. Both servers of a board attach it to the board's lock; None: no ownership."""
    if lock is not None:
        lock.attach(device.lock, lambda: execute(device, Op.SAFE_STATE, Message()))


def _lock_op(session: LockSession, op: Op, request: Message) -> Message:
    lock = session.lock
    if op is Op.ACQUIRE:
        return pl.owner_reply(lock.acquire(session, request.meta["token"], request.meta.get("lease_s")))
    if op is Op.RELEASE:
        lock.release(session, request.meta["token"])
        return Message()
    if op is Op.BREAK:
        lock.break_()
        return Message()
    return pl.owner_reply(lock.state())


def execute(
    device: Device,
    op: Op,
    request: Message,
    cache: ReplayCache | None = None,
    session: LockSession | None = None,
) -> Message:
    """Run `op`; a request the device cannot even read raises DeviceFault(-109/-224). With a
    `cache`, a non-idempotent request whose id ran before gets the stored outcome. With a
    `session` (the connection's side of the board's lock; None: a board without ownership),
    a request that drives or changes a board another host owns is refused (120), and the
    board announces the capability ``lock``."""
    if op in LOCK_OPS:
        if session is None:
            raise DeviceFault(codes.NOT_SUPPORTED, "this board has no ownership (capability 'lock')")
        try:
            return _lock_op(session, op, request)
        except KeyError as exc:
            raise DeviceFault(codes.MISSING_PARAMETER, f"{op.name.lower()} request lacks {exc}") from None
    with device.lock:
        if session is not None:
            session.lock.check(session, op)
            if op is Op.INFO:
                reply = _run(device, op, request)
                reply.meta["capabilities"] = sorted({*reply.meta["capabilities"], LOCK_CAPABILITY})
                return reply
        rid = request_id(op, request) if cache is not None else None
        if rid is None or cache is None:
            return _run(device, op, request)
        epoch = device.status().epoch
        done = cache.get(rid, epoch)
        if isinstance(done, BaseException):
            raise done
        if done is not None:
            return done
        try:
            reply = _run(device, op, request)
        except Exception as exc:
            cache.put(rid, epoch, exc)
            raise
        cache.put(rid, epoch, reply)
        return reply


def _run(device: Device, op: Op, request: Message) -> Message:
    try:
        if op is not Op.SETTLE:  # a settle's arrays are checked with its nudges (`settle_args`)
            pl.check_request_arrays(op, request)
        return HANDLERS[op](device, request)
    except KeyError as exc:
        raise DeviceFault(codes.MISSING_PARAMETER, f"{op.name.lower()} request lacks {exc}") from None
    except ProtocolError as exc:
        raise DeviceFault(codes.ILLEGAL_PARAMETER_VALUE, str(exc)) from None
