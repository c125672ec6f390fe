"""`close()` on a board whose link is lost, against the real servers (pyvisa-py over TCP to the
SCPI server, pyserial's socket:// to the framed one): it returns within the bounded safe-state
try, raises nothing (an error being handled is not hidden), and says with a `SafeStateWarning`
that the board was not told to go safe and when its lease does it; a healthy close says nothing,
and a `with` block whose safe state already failed is warned of once, not twice."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable

import pytest

from drivers import RetriesExhausted, SafeStateWarning, open_device
from hil.testing import BoardServers, FaultPlan
from tests.waiting import until

BOARD = "emulator://?preset=ideal&seed=0"
TRANSPORTS = ["visa-tcp", "serial-socket"]
NOT_SAFE = r"closed without putting the board in its safe state"
LEASE = r"applies its safe state itself once it finds this host gone.*within about 15 s of the close"


def _lose_the_board(s: BoardServers) -> None:
    """Stop both servers and wait until their connections have ended (the board's process is gone)."""
    s.scpi.close()
    s.framed.close()
    assert until(lambda: not s.framed.links and s.scpi.gate.active == 0, 5.0)


def _uri(s: BoardServers, transport: str) -> str:
    return s.uri(transport, timeout="0.5", attempts="2", backoff="0")


def _safe_state_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, SafeStateWarning)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_on_a_board_that_is_gone_warns_that_it_is_not_safe_and_when_its_lease_makes_it(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    dev = open_device(_uri(s, transport))
    _lose_the_board(s)
    t0 = time.monotonic()
    with pytest.warns(SafeStateWarning, match=NOT_SAFE) as caught:
        dev.close()  # raises nothing
    assert time.monotonic() - t0 < 2.5  # the safe state tried twice at most, no retry budget
    (said,) = _safe_state_warnings(caught.list)
    assert dev.name in said and "RetriesExhausted: safe_state failed" in said
    assert re.search(LEASE, said), said


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_after_an_operation_lost_the_link_warns_without_trying_again(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    dev = open_device(_uri(s, transport))
    _lose_the_board(s)
    with pytest.raises(RetriesExhausted, match="safety failed 2 time"):
        dev.safety()
    t0 = time.monotonic()
    with pytest.warns(SafeStateWarning, match=NOT_SAFE + r" \(its link had already failed\)"):
        dev.close()
    assert time.monotonic() - t0 < 0.5  # no new round of reconnects on a link known lost


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_healthy_close_and_a_second_close_say_nothing(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    dev = open_device(_uri(s, transport))
    dev.safety()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dev.close()
        _lose_the_board(s)
        dev.close()
    assert _safe_state_warnings(caught) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_with_block_on_a_board_that_is_gone_is_warned_of_once(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="the block's own error"), open_device(_uri(s, transport)):
            _lose_the_board(s)
            raise ValueError("the block's own error")
    said = _safe_state_warnings(caught)
    assert len(said) == 1 and "while the with block raised ValueError" in said[0], said
    assert re.search(LEASE, said[0]), said[0]  # and when the board's lease makes it safe


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_with_block_whose_safe_state_fails_raises_it_saying_when_the_lease_makes_the_board_safe(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    s = emulated_board(BOARD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with (
            pytest.raises(RetriesExhausted, match="safe_state failed 2 time") as info,
            open_device(_uri(s, transport)),
        ):
            _lose_the_board(s)
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and re.search(LEASE, notes[0]), notes
    assert _safe_state_warnings(caught) == []  # raised, so not warned of again by close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_on_a_board_that_stopped_answering_is_bounded_and_warns(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """A board that hangs (every reply 1.5 s late, past the 0.5 s timeout): close() waits for
    two tries of the safe state at most (its timeout twice, or the framed link's two rounds of
    retransmissions), not the retry budget, then warns."""
    s = emulated_board(BOARD, plan=FaultPlan())
    uri = s.uri(transport, timeout="0.5", attempts="4", backoff="0")
    if transport == "serial-socket":
        uri += "&ack_timeout=0.05"
    dev = open_device(uri)
    s.plan.reply_delay_s = 1.5
    t0 = time.monotonic()
    with pytest.warns(SafeStateWarning, match=NOT_SAFE + r" \(RetriesExhausted: safe_state failed 2 time"):
        dev.close()
    assert time.monotonic() - t0 < 2.0
    s.plan.reply_delay_s = 0.0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_on_a_board_without_ownership_says_it_will_not_make_itself_safe(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """A board without capability 'lock' has no lease: nothing puts it in its safe state when
    this host goes, and the warning says so instead of promising a lease."""
    s = emulated_board(BOARD, lock=False)
    dev = open_device(_uri(s, transport))
    _lose_the_board(s)
    with pytest.warns(SafeStateWarning, match=NOT_SAFE) as caught:
        dev.close()
    (said,) = _safe_state_warnings(caught.list)
    assert "the board will not make itself safe (it has no ownership lease" in said, said
    assert "call safe_state(), or switch it off" in said and "applies its safe state itself" not in said, said


def test_close_of_a_session_that_did_not_take_the_lock_says_the_lease_will_not_make_the_board_safe(
    emulated_board: Callable[..., BoardServers],
) -> None:
    """A lock=0 session holds no lease: the board does not make itself safe when it goes."""
    s = emulated_board(BOARD)
    dev = open_device(s.uri("visa-tcp", timeout="0.5", attempts="2", backoff="0", lock="0"))
    _lose_the_board(s)
    with pytest.warns(SafeStateWarning, match=NOT_SAFE) as caught:
        dev.close()
    (said,) = _safe_state_warnings(caught.list)
    assert "will not make itself safe (this session did not hold its lock: opened with lock=0" in said, said


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_from_another_thread_does_not_wait_for_the_request_in_flight_to_spend_its_budget(
    transport: str, emulated_board: Callable[..., BoardServers]
) -> None:
    """A board that stopped answering while a request of another thread is in flight: close()
    waited for that request's whole retry budget (attempts x timeout, 4 s here; 40 s at the
    defaults) before its own safe-state try. Now the request is not retried once a close is
    waiting: the close returns after the current attempt, warning that the board was not told."""
    import threading

    s = emulated_board(BOARD, plan=FaultPlan())
    dev = open_device(s.uri(transport, timeout="0.5", attempts="8", backoff="0"))
    s.plan.reply_delay_s = 30.0  # the board stops answering
    failed: list[BaseException] = []

    def in_flight() -> None:
        try:
            dev.safety()
        except BaseException as exc:
            failed.append(exc)

    worker = threading.Thread(target=in_flight)
    worker.start()
    time.sleep(0.1)  # the request is in flight
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dev.close()
    took = time.monotonic() - t0
    worker.join(10)
    s.plan.reply_delay_s = 0.0
    assert took < 2.0, f"close took {took:.2f} s: it waited for the request's retries"
    assert failed and isinstance(failed[0], RetriesExhausted), failed
    assert "close() was called from another thread" in " ".join(getattr(failed[0], "__notes__", []))
    assert any(re.search(NOT_SAFE, w) for w in _safe_state_warnings(caught)), _safe_state_warnings(caught)
