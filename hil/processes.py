"""Whether a process recorded by a writer (a run log's, a sweep folder's lock) still runs."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def other_process_alive(record: object) -> int | None:
    """The pid of `record` (``{"host", "pid"}``) if that is another live process on this
    host; None if it is on another host, this process, gone, a zombie, or not a record."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return None if _is_zombie(pid) else pid


def this_process() -> dict[str, object]:
    """The record `other_process_alive` reads: this host and process id."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


_STOP_SIGNAL: list[str] = []  # the signal this process was asked to stop by, taken as Ctrl-C


def note_stop_signal(name: str | None) -> None:
    """Record which signal this process was asked to stop by, when a handler turns it into
    Ctrl-C (``"SIGTERM"``: `hil.cli.common.TermAsInterrupt`); None forgets it. The run log
    reads it as it closes an interrupted run (`stop_signal`)."""
    _STOP_SIGNAL[:] = [] if name is None else [name]


def stop_signal() -> str | None:
    """The signal `note_stop_signal` recorded, or None (a KeyboardInterrupt is then Ctrl-C)."""
    return _STOP_SIGNAL[0] if _STOP_SIGNAL else None
