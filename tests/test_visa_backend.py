"""``visa://...?backend=@ivi`` on a computer without NI-VISA: pyvisa cannot load the library.
The open took that for a board it could not reach, tried 4 times and said, over two lines,
"cannot reach the board during open (Could not open VISA library:" / "); ... Is the board on
and serving at this address?": a host-side set-up problem blamed on the board. It is one line
saying which library is missing and how to fix it, at once."""

from __future__ import annotations

import time

import pytest

from drivers import ConfigurationError, open_device

RESOURCE = "visa://TCPIP0::127.0.0.1::5025::SOCKET"  # never reached: the library fails first


def _ivi_missing() -> bool:
    import pyvisa

    try:
        pyvisa.ResourceManager("@ivi").close()
    except (OSError, ValueError):
        return True
    return False


def _open_fails(backend: str) -> str:
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError) as info:
        open_device(f"{RESOURCE}?backend={backend}")
    text = str(info.value)
    assert "\n" not in text, text  # one line (README)
    assert "Is the board on" not in text and "cannot reach the board" not in text, text
    assert "failed 4 time(s)" not in text and time.monotonic() - t0 < 1.0
    assert "leave backend= out" in text and "@py" in text, text
    return text


@pytest.mark.skipif(not _ivi_missing(), reason="a VISA library (NI-VISA, Keysight) is installed here")
def test_ivi_without_ni_visa_says_the_library_is_missing() -> None:
    text = _open_fails("@ivi")
    assert "the VISA library of backend=@ivi cannot be loaded" in text, text
    assert "install NI-VISA" in text, text


def test_a_visa_library_path_that_does_not_load_is_named(tmp_path: object) -> None:
    text = _open_fails(f"{tmp_path}/libvisa.so")
    assert "cannot be loaded" in text and "check the path of the VISA library" in text, text


def test_a_backend_pyvisa_does_not_know_is_named() -> None:
    text = _open_fails("@nosuchvisa")
    assert "backend=@nosuchvisa names no VISA library pyvisa knows" in text, text
