"""`LentDevice`: an open Device handed to a test or served for one, whose board stays its
lender's: closing it closes nothing. The pytest plugin lends the lab board it holds for the
session to every fixture of every test (one owner, docs/sweep.md section 4); imported only
when a fixture is used (`hil.testing` imports no drivers until then)."""

from __future__ import annotations

from typing import Any

from drivers.wrapper import DeviceWrapper


class LentDevice(DeviceWrapper):
    """Every operation goes to `inner`; `close` and `close_link` leave it open (a `with`
    block still ends with the safe state, which `Device.__exit__` sends first). Attributes a
    backend adds (``name``, ``stats``, ``recovery``, ``owns``, ...) are the inner device's."""

    def close(self) -> None:
        return None

    def close_link(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
