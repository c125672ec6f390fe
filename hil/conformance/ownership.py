"""Ownership (capability ``lock``, docs/protocol.md "Ownership"): while the suite's own
connection owns the board, a second connection is refused what drives the board (error 120)
and still gets the read-only queries."""

from __future__ import annotations

from drivers.base import Device
from drivers.errors import BoardLocked, DeviceError
from drivers.uri import looking_uri, open_device, parse_options, replace_params
from drivers.wire.payload import LOCK_CAPABILITY
from hil.conformance.report import Mismatch
from hil.conformance.session import Session


def checks(sess: Session) -> None:
    if LOCK_CAPABILITY not in sess.caps or not sess.report.uri or serial_line(sess.report.uri):
        return
    owner = sess.dev.owner()
    if owner is None or not getattr(sess.dev, "owns", False):  # opened with lock=0: nothing to check
        return
    sess.run(
        "ownership",
        "while this connection owns the board, a second one is refused wait and safe_state (error 120) and "
        "taking the board, and still reads SYST:INFO?, SYST:STAT?, SYST:SAF?, SYST:MET? and the owner",
        lambda sent: _second_connection(sess, sent),
    )


def serial_line(uri: str) -> bool:
    """A serial port is one session: a second host cannot share it, so there is no second
    connection to refuse (over TCP there is)."""
    scheme, _, target = uri.partition("://")
    return scheme.lower() == "serial" or (scheme.lower() == "visa" and target.upper().startswith("ASRL"))


def _second_connection(sess: Session, sent: list[str]) -> str:
    uri = sess.report.uri
    if not hasattr(parse_options(uri)[2], "lock"):
        raise Mismatch(f"{uri}: its backend has no lock= option to open a second, looking connection")
    sent.append("a second connection (lock=0): SYST:INFO?, SYST:STAT?, SYST:SAF?, SYST:MET?, owner")
    other: Device = open_device(looking_uri(uri))
    try:
        other.status()
        other.safety()
        other.meter()
        seen = other.owner()
        mine = getattr(sess.dev, "lock_token", None)
        if seen is None or seen.token != mine:
            raise Mismatch(f"the second connection sees owner {seen}, expected {mine!r}")
        refused = []
        for name, call in (("wait", lambda: other.wait(0.0)), ("safe_state", other.safe_state)):
            sent.append(f"the second connection: {name}")
            try:
                call()
            except BoardLocked:
                refused.append(name)
                continue
            except DeviceError as exc:
                raise Mismatch(
                    f"{name} from the second connection: {type(exc).__name__} ({exc}), not 120"
                ) from exc
            raise Mismatch(f"{name} from the second connection ran while this one owns the board")
    finally:
        other.close_link()
    sent.append("a third connection that takes the board (lock=1)")
    try:
        taker = open_device(replace_params(uri, lock=True))
    except BoardLocked:
        pass
    else:
        taker.close_link()
        raise Mismatch("a second host took the board while this connection owns it")
    sess.dev.wait(0.0)  # the owner is still served
    return f"refused {', '.join(refused)} and the take (120); read-only queries answered; owner {mine}"
