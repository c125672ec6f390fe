"""Run one Device operation from a decoded request: the half both servers share."""

from __future__ import annotations

from collections.abc import Callable

from drivers.base import Device
from drivers.errors import DeviceFault, ProtocolError
from drivers.wire import codes
from drivers.wire import payload as pl
from drivers.wire.payload import Message, Op


def _info(d: Device, m: Message) -> Message:
    return Message(pl.info_to_dict(d.info))


def _topology(d: Device, m: Message) -> Message:
    t = d.topology
    return Message({"topology": None if t is None else pl.topology_to_dict(t)})


def _configure(d: Device, m: Message) -> Message:
    d.configure(pl.topology_from_dict(m.meta))
    return Message()


def _program(d: Device, m: Message) -> Message:
    r = d.program(
        m.meta["tile"],
        m.arrays["g_plus"],
        m.arrays["g_minus"],
        verify=bool(m.meta.get("verify", False)),
        tol=m.meta.get("tol"),
        max_iters=int(m.meta.get("max_iters", 20)),
    )
    return pl.program_reply(r)


def _pulse(d: Device, m: Message) -> Message:
    return pl.pulse_reply(d.pulse(m.meta["tile"], m.arrays["counts_plus"], m.arrays["counts_minus"]))


def _read(d: Device, m: Message) -> Message:
    return pl.conductance_reply(*d.read_conductance(m.meta["tile"]))


def _mvm(d: Device, m: Message) -> Message:
    return Message({}, {"y": d.mvm(m.meta["tile"], m.arrays["x"], transpose=bool(m.meta.get("transpose")))})


def _settle(d: Device, m: Message) -> Message:
    return pl.equilibrium_reply(d.settle(**pl.settle_args(m)))


def _wait(d: Device, m: Message) -> Message:
    d.wait(float(m.meta["seconds"]))
    return Message()


def _safety(d: Device, m: Message) -> Message:
    return pl.safety_reply(d.safety())


def _reset(d: Device, m: Message) -> Message:
    d.reset()
    return Message()


def _safe_state(d: Device, m: Message) -> Message:
    d.safe_state()
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
}


def execute(device: Device, op: Op, request: Message) -> Message:
    """Run `op`; a request the device cannot even read raises DeviceFault(-109/-224)."""
    handler = HANDLERS[op]
    with device.lock:
        try:
            return handler(device, request)
        except KeyError as exc:
            raise DeviceFault(codes.MISSING_PARAMETER, f"{op.name.lower()} request lacks {exc}") from None
        except ProtocolError as exc:
            raise DeviceFault(codes.ILLEGAL_PARAMETER_VALUE, str(exc)) from None
