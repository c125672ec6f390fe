"""Raw SCPI from a lab user (`VisaDevice.query` / `VisaDevice.write`): text that reads is sent;
text that drives or changes the board (a pulse, a program, an mvm or settle with inputs past the
voltage limit, a configure, a wait, a reset, ownership, checked mode) is refused before a byte is
sent, naming the typed method whose limit checks it would skip. Through the emulator's SCPI
server over pyvisa-py TCP: the board's own counters and conductances show nothing arrived."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import Topology, open_device
from drivers.errors import ConfigurationError
from drivers.visa import VisaDevice
from drivers.wire import scpi
from hil.testing import BoardServers

BOARD = "emulator://?preset=ideal&seed=0"


@pytest.fixture
def servers(emulated_board: Callable[..., BoardServers]) -> BoardServers:
    return emulated_board(BOARD)


@pytest.fixture
def dev(servers: BoardServers) -> Iterator[VisaDevice]:
    with open_device(servers.uri("visa-tcp")) as d:
        assert isinstance(d, VisaDevice)
        d.configure(Topology.layered([3, 2]))
        yield d


def _block(a: np.ndarray) -> str:
    """A block as text; the values are picked so that every byte is ASCII, as the client sends."""
    return scpi.block(np.ascontiguousarray(a).tobytes()).decode("ascii")


HOT = np.full((1, 3), 32.0, "<f4")  # 32 x clamp_max: 6.4 V on a 0.2 V read (bytes 00 00 00 42)
DRIVING = [
    'TILE:PULS? "W0",' + _block(np.full(12, 5, "<i4")),
    'TILE:PROG? "W0",0,DEF,10,' + _block(np.frombuffer(b"\x00\x00\x27\x36" * 12, "<f4")),  # 2.5 uS
    'TILE:MVM? "W0",0,' + _block(HOT),
    'TILE:COND? "W0"',
    "SYST:WAIT 0",
    "*RST",
    "SYST:SAFE",
    "SYST:LOCK:BRE",
    "SYST:COMM:CHEC ON",
    "*TST?",
    "*IDN?;SYST:WAIT 0",  # a driving unit after a reading one
    "system:wait 0",  # long and lower-case forms name the same command
    "VEND:ZAP 20",  # not of this protocol: the host cannot tell what it drives
    "*IDN?\nSYST:WAIT 0",  # a newline would start a second message
    '*IDN? "x\nSYST:WAIT 0"',  # a newline in a string still ends the message at the server
]


@pytest.mark.parametrize("text", DRIVING)
@pytest.mark.parametrize("method", ["query", "write"])
def test_raw_text_that_drives_the_board_is_refused_and_nothing_reaches_it(
    servers: BoardServers, dev: VisaDevice, method: str, text: str
) -> None:
    g_before = servers.device.read_conductance("W0")
    safety_before = servers.device.safety()
    epoch = servers.device.status().epoch
    with pytest.raises(ConfigurationError, match="refused, nothing sent"):
        getattr(dev, method)(text)
    assert servers.device.safety() == safety_before  # not even refused there: it never arrived
    assert servers.device.status().epoch == epoch  # no reset
    assert servers.device.topology is not None
    for a, b in zip(g_before, servers.device.read_conductance("W0"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert dev.query("SYST:ERR?") == '0,"No error"'  # the session is in step and usable


def test_refusal_names_the_typed_method(dev: VisaDevice) -> None:
    with pytest.raises(ConfigurationError, match=r"dev\.pulse\(tile, counts_plus, counts_minus\)"):
        dev.write('TILE:PULS? "W0",' + _block(np.full(12, 5, "<i4")))
    with pytest.raises(ConfigurationError, match=r"dev\.settle\(clamp"):
        dev.query("NET:SETT? #12{},#10")
    # a vendor query: the host cannot tell what it drives; one the user knows reads has a way
    with pytest.raises(ConfigurationError, match=r"not a command of this protocol.*query_unchecked"):
        dev.query("MEAS:TEMP?")


@pytest.mark.parametrize(
    "text", ["*IDN?", "SYST:ERR?", "SYST:INFO?", "SYST:SAF?", "SYST:STAT?", "CONF:TOP?", "SYST:METer?"]
)
def test_reading_queries_still_work(dev: VisaDevice, text: str) -> None:
    assert dev.query(text)


def test_harmless_commands_still_work(dev: VisaDevice) -> None:
    dev.write("*ESE 255")
    assert dev.query("*ESE?") == "255"
    dev.write("*CLS;*OPC")
    assert dev.query("*OPC?") == "1"


# every header the SCPI server knows, long and short; a raw message is a few of them joined by ';'
_ALL = [h for h, _ in scpi.RAW_INSTEAD] + list(scpi.RAW_ALLOWED)
_DRIVING = {h.spec for h, _ in scpi.RAW_INSTEAD}


def _forms(spec: str) -> list[str]:
    short = scpi.short_form(spec)
    long = spec.replace("[", "").replace("]", "").upper()
    return [short, long, short.lower()]


units = st.sampled_from(_ALL).flatmap(
    lambda h: st.tuples(
        st.just(h.spec), st.sampled_from(_forms(h.spec)), st.sampled_from(["", " 1", ' "W0"'])
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(units, min_size=1, max_size=4))
def test_a_message_is_sent_raw_only_if_every_unit_the_board_parses_only_reads(
    parts: list[tuple[str, str, str]],
) -> None:
    text = ";".join(form + param for _, form, param in parts)
    refusal = scpi.raw_refusal(text)
    parsed = scpi.parse_message(text.encode())  # what the board's parser runs
    drives = any(any(h.matches(u.header) for h, _ in scpi.RAW_INSTEAD) for u in parsed)
    assert drives == any(spec in _DRIVING for spec, _, _ in parts)
    if drives:
        assert refusal is not None
    else:
        assert refusal is None
